"""Where a training job's time goes: preset jobs through POST /jobs, their time split from
GET /jobs/{id}.

Trains on the LFW people outside pairs.txt fold 1 (as bench/learning_curve.py splits them) and
scores fold 1 at every evaluation. Each row is one job, run one after another on a FaceID server
(uvicorn, the production app) started on a free port with the split as its data folder:

  preset   the preset as it is (`--preset`: cpu-small here, gpu on a GPU)
  every    the same job evaluating after every epoch and writing last.pt at each evaluation
           (eval_every 1, eval_every_min 0, save_every_min 0: the cadence before these settings)

and prints, per job: its epochs, wall time, the split (setup: listing, decoding and finding the
data's faces, building the model, the first step; train: the steps; eval; checkpoint: what writing
checkpoints held the steps up), the share of the wall time that trained, that share once setup is
done, and the final fold-1 AUC.

    python bench/job_time.py --rows preset --work /tmp/jt      # about 22 min on 2 cores
    python bench/job_time.py --rows preset --work /tmp/jt      # again: the faces come from the cache
    python bench/job_time.py --preset gpu --device cuda        # on a GPU (bench/gpu_check.sh job)
    python bench/job_time.py --rows preset --epochs 1 --max_steps_per_epoch 4   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_curve import fold1_pairs, run_job, split
from serve_common import Server, loadavg, machine

ROWS = {
    "preset": {},
    "every": {"eval_every": 1, "eval_every_min": 0.0, "save_every_min": 0.0},
}
SPLIT = ("setup_s", "train_s", "eval_s", "checkpoint_s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", default=os.environ.get("FACEID_LFW_DIR"), help="LFW with pairs.txt (FACEID_LFW_DIR)")
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", default="preset,every", help=f"any of {','.join(ROWS)}")
    ap.add_argument("--epochs", type=int, help="override the preset's epochs")
    ap.add_argument("--max_steps_per_epoch", type=int, default=0, help="cap the epochs (a dry run)")
    ap.add_argument("--time_limit_min", type=float, default=0.0, help="end each job after this many minutes")
    ap.add_argument("--json", help="also write every job's final record and split here")
    ap.add_argument(
        "--work",
        help="keep the split and the face cache in this folder (default: a new temporary one); a folder "
        "from an earlier run is reused, so its jobs find their faces in the cache",
    )
    args = ap.parse_args()
    if not args.lfw or not (Path(args.lfw) / "pairs.txt").is_file():
        ap.error("give --lfw DIR or set FACEID_LFW_DIR to the LFW folder (with pairs.txt)")
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {','.join(ROWS)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="faceid-jobtime-"))
    root = work / "data"
    if not (root / "fold1" / "pairs.txt").is_file():
        split(Path(args.lfw), root, copy=True, min_images=1)
        fold1_pairs(Path(args.lfw), root / "fold1")
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    base = {
        "preset": args.preset,
        "train": "train",
        "val": "val",
        "pairs_file": "fold1/pairs.txt",
        "best_metric": "pairs_auc",
        "device": args.device,
        "max_steps_per_epoch": args.max_steps_per_epoch,
        "time_limit_min": args.time_limit_min,
        **({"epochs": args.epochs} if args.epochs else {}),
    }
    jobs = {}
    # One face cache for every job: the first finds the faces, the others read them (setup shows it)
    env = {"FACEID_CACHE_DIR": str(work / "faces")}
    for name in args.rows.split(","):
        body = {**base, **ROWS[name]}
        with Server(None, data_dir=root, device=args.device, env=env) as server:
            jobs[name] = run_job(server, body, args.time_limit_min or 60)
        print(f"{name}: job {jobs[name]['id']} {jobs[name]['status']}", flush=True)
    print(f"\n{started}, {machine()}, load average after {loadavg()}; preset {args.preset} on {args.device}")
    print("| row | epochs evaluated | wall s | setup s | train s | eval s | checkpoint s | train share | "
          "train share after setup | fold-1 AUC |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = {}
    for name, job in jobs.items():
        t = (job.get("progress") or {}).get("time_split") or {}
        last = (job.get("metrics") or [{}])[-1]
        if job["status"] != "succeeded" or not t:
            print(f"| {name} | job {job['status']}: {job.get('error')} |")
            continue
        wall = t["wall_s"]
        share = t["train_s"] / wall
        after = t["train_s"] / max(1e-9, wall - t["setup_s"])
        evaluated = ",".join(str(m["epoch"]) for m in job["metrics"])
        print(
            f"| {name} | {evaluated} | {wall:.0f} | "
            + " | ".join(f"{t[k]:.1f}" for k in SPLIT)
            + f" | {share:.1%} | {after:.1%} | {last.get('pairs_auc', float('nan')):.4f} |"
        )
        out[name] = {"time_split": t, "final": last, "config": job.get("config")}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
