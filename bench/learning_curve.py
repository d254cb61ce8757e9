"""Learning curve on real faces: LFW fold-1 AUC at fixed wall-clock points of a training job.

Trains on the LFW people who are not in pairs.txt fold 1 (all of them, those with a single image
too: each person is a class; `--min_images 2` keeps only people with 2+ images) and scores fold 1
(the official 600 pairs: AUC and 10-fold accuracy) plus
sampled pairs of the fold-1 people with 2+ images, for, in one run:

  untrained  the network as initialised, scored in this process (the score to beat; not chance)
  plain      a plain ArcFace recipe: random init, 112 px, ArcFace s=64 m=0.5, SGD lr 0.1,
             warm-up 300 steps (or 30% of the run if that is shorter: at fp32 on 2 cores the whole
             run is about 250 steps), batch 64, natural class frequencies, no flip at evaluation
  faceid     `"preset": "cpu-small"` (docs/CLI.md, "Training recipe"), on aligned faces
  faceid_noalign   the preset with `align` none: the centred photo, as before alignment
  faceid_drop0.4   the preset with `dropout` 0.4 (not in the default --recipes)
  faceid_56c08     the preset at 56 px with `crop` 0.8 (the centred 80% of each photo's side), and
  faceid_64c08     at 64 px with `crop` 0.8: the runs that chose the preset's crop (bench/README.md)
  faceid_distill   the preset with `distill` dlib: dlib's descriptors as a teacher

Each trained recipe runs as a real job: a FaceID server (uvicorn, the production app) is started
on a free port with a data folder holding the split, the recipe is sent to `POST /jobs` with
`time_limit_min` = the last time point, and `GET /jobs/{id}` is polled. The trainer scores fold 1
at the end of every epoch; the value reported at minute t is that of the last epoch finished by t
minutes after the job started running, so the times include decoding the data, every evaluation
and every checkpoint: what a user of the service waits. Epochs are sized from a short in-process
probe of each recipe's speed with 25% to spare, and the job's learning-rate schedule and margin
warm-up follow its time limit (`fit_to_time_limit`, on by default), so the cosine ends at the limit.
Every recipe's epochs are capped at about 3 minutes of steps at the probed rate
(`max_steps_per_epoch`; an epoch of the faceid recipe is then about 160 steps, 85% of a pass over
the 12,052 images), so each job has an evaluated point by 5 minutes and about as many as the others.

    python bench/learning_curve.py --lfw "$FACEID_LFW_DIR"                   # about 70 min on 2 cores
    python bench/learning_curve.py --minutes 0,2,4 --recipes faceid         # a quick look

Prints one table per time point, then every epoch of every job. `--scenes` also scores each job's
best checkpoint, before its server stops, on fold 1's pairs with every photo pasted into a cluttered
scene (the photos align_compare.py scores: people the job never trained on, in whole-scene photos).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_common import Server, loadavg, machine

from faceid.config import TrainConfig
from faceid.pairs import identities_in, load_pairs
from faceid.train import Trainer

log = logging.getLogger("learning_curve")

RECIPES = {
    "plain": {
        "train_mode": "arcface",
        "img_size": 112,
        "batch_size": 64,
        "optimizer": "sgd",
        "lr": 0.1,
        "arcface_s": 64.0,
        "arcface_m": 0.5,
        "weight_decay": 5e-4,
        "scheduler": "cosine",
        "balanced_sampling": False,
        "augment": "none",
        "eval_flip": False,
        "eval_pairs": 6000,
    },
    "faceid": {"preset": "cpu-small"},  # faces found and aligned (align arcface, the default)
    "faceid_noalign": {"preset": "cpu-small", "align": "none"},  # the same on the unaligned photos
    "faceid_drop0.4": {"preset": "cpu-small", "dropout": 0.4},
    "faceid_56c08": {"preset": "cpu-small", "img_size": 56, "crop": 0.8},
    "faceid_64c08": {"preset": "cpu-small", "crop": 0.8},
    "faceid_56c10": {"preset": "cpu-small", "crop": 1.0},  # the preset's 56 px on the whole image
    # also reproducing dlib's descriptors (pip install 'faceid[teacher]'; faceid prepare --distill dlib
    # on the LFW folder first keeps their one-time computation out of the job)
    "faceid_distill": {"preset": "cpu-small", "distill": "dlib"},
}
KEYS = ("pairs_auc", "pairs_acc", "auc", "acc", "tar_1e-2", "tar_1e-3")
EPOCH_TARGET_S = 180  # cap an epoch at about this much training, so that every recipe has a point by 5 minutes


def split(lfw: Path, out: Path, *, copy: bool = False, min_images: int = 1) -> tuple[Path, Path]:
    """out/train: the LFW people with >= `min_images` images who are not in pairs.txt fold 1 (anyone
    named in a fold-1 pair, matched or mismatched, stays out); out/val: the fold-1 people with >= 2
    images. Symbolic links to the person folders, or (`copy`) hard links or copies of the images,
    which a server's data folder needs (it refuses links that point outside it)."""
    fold1 = identities_in(load_pairs(lfw / "pairs.txt", folds=[1]))
    train, val = out / "train", out / "val"
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    for d in sorted(p for p in lfw.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.is_file())
        if d.name in fold1:
            if len(files) >= 2:
                _place(d, files, val / d.name, copy)
        elif len(files) >= max(1, min_images):
            _place(d, files, train / d.name, copy)
    return train, val


def _place(d: Path, files: list[Path], dest: Path, copy: bool) -> None:
    if dest.exists():
        return
    if not copy:
        dest.symlink_to(d.resolve())
        return
    dest.mkdir()
    for f in files:
        try:
            os.link(f, dest / f.name)
        except OSError:
            shutil.copy2(f, dest / f.name)


def fold1_pairs(lfw: Path, out: Path) -> Path:
    """out/pairs.txt holding fold 1 of LFW's pairs.txt (header `1<TAB>300`) and, beside it, copies of
    the images it names (its mismatched pairs include people with one image, outside the split)."""
    lines = (lfw / "pairs.txt").read_text().splitlines()
    per = int(lines[0].split()[1])
    fold = lines[1 : 1 + 2 * per]
    out.mkdir(parents=True, exist_ok=True)
    for ln in fold:
        f = ln.split("\t")
        for name, num in ((f[0], f[1]), (f[0], f[2])) if len(f) == 3 else ((f[0], f[1]), (f[2], f[3])):
            src = lfw / name / f"{name}_{int(num):04d}.jpg"
            dest = out / name / src.name
            if not dest.exists():
                dest.parent.mkdir(exist_ok=True)
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copy2(src, dest)
    (out / "pairs.txt").write_text(f"1\t{per}\n" + "\n".join(fold) + "\n")
    return out / "pairs.txt"


def probe(name: str, cfg: TrainConfig, steps: int = 6) -> tuple[dict, float, int]:
    """Untrained metrics, training images/s and the number of training images, in this process."""
    trainer = Trainer(
        cfg.model_copy(update={"epochs": 1, "max_steps_per_epoch": steps, "ckpt_dir": cfg.ckpt_dir + f"/{name}-probe"})
    )
    trainer.setup()
    untrained = trainer.evaluate()
    times: list[float] = []
    trainer.emit_fn = lambda ev: times.append(ev["time"]) if ev["event"] == "progress" else None
    trainer.fit()
    trainer.dist.close()
    rate = (steps - 1) * cfg.batch_size / max(1e-6, times[-1] - times[0])  # first step = warm-up
    return untrained, rate, len(trainer.train_folder)


def schedule(name: str, overrides: dict, rate: float, n_images: int, minutes: float) -> dict:
    """Job fields that size the recipe's epochs to `minutes` at `rate` training images/s, with 25%
    to spare: the job's time limit ends it, and its schedule follows the limit (fit_to_time_limit),
    so a run slower than the probe still anneals and a faster one still uses its time."""
    batch = TrainConfig(**overrides).batch_size
    total_steps = max(1, int(rate * minutes * 60 * 0.9 * 1.25 / batch))  # 0.9: evaluations, checkpoints
    full = math.ceil(n_images / batch)
    per_epoch = max(1, min(full, int(rate * EPOCH_TARGET_S / batch)))
    if name == "plain":
        epochs = max(1, round(total_steps / per_epoch))
        warmup_steps = min(300, 0.3 * epochs * per_epoch)
        return {"epochs": epochs, "max_steps_per_epoch": per_epoch, "warmup_epochs": round(warmup_steps / per_epoch, 3)}
    return {
        "epochs": max(1, math.ceil(total_steps / per_epoch)),
        **({"max_steps_per_epoch": per_epoch} if per_epoch < full else {}),
    }


def started(job: dict) -> float:
    return datetime.fromisoformat(job["started_at"]).timestamp()


def run_job(server: Server, body: dict, minutes: float) -> dict:
    with httpx.Client(base_url=server.base, timeout=60) as c:
        r = c.post("/jobs", json=body)
        if r.status_code != 202:
            raise SystemExit(f"POST /jobs refused the recipe: {r.status_code} {r.text}")
        job_id = r.json()["id"]
        log.info("job %s: %s", job_id, json.dumps(body))
        seen = 0
        deadline = time.time() + minutes * 60 + 1800
        while True:
            job = c.get(f"/jobs/{job_id}").json()
            for m in job.get("metrics", [])[seen:]:
                log.info(
                    "job %s epoch %s at %.1f min: %s",
                    job_id,
                    m.get("epoch"),
                    (m["time"] - started(job)) / 60,
                    {k: m.get(k) for k in KEYS},
                )
            seen = len(job.get("metrics", []))
            if job["status"] not in ("queued", "running"):
                return job
            if time.time() > deadline:
                c.post(f"/jobs/{job_id}/cancel")
                raise SystemExit(f"job {job_id} still {job['status']} long after its time limit")
            time.sleep(5)


def score_scenes(job: dict, scenes: Path) -> Optional[dict]:
    """`faceid evaluate` of the job's best checkpoint on the scene pairs (None when it made none)."""
    from align_compare import evaluate

    if not job.get("checkpoint"):
        return None
    return evaluate(Path(job["checkpoint"]), scenes, workers=2, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--lfw",
        default=os.environ.get("FACEID_LFW_DIR"),
        help="the LFW folder with pairs.txt (default: FACEID_LFW_DIR)",
    )
    ap.add_argument("--minutes", default="0,5,10,20,30")
    ap.add_argument("--recipes", default="plain,faceid_noalign,faceid", help=f"any of {','.join(RECIPES)}")
    ap.add_argument(
        "--min_images",
        type=int,
        default=1,
        help="train on the people outside fold 1 with at "
        "least this many images (1: all of them; 2: the split of the runs before 2026-11-29 05:00)",
    )
    ap.add_argument("--out", help="also write every epoch record of every job as JSON lines here")
    ap.add_argument(
        "--scenes",
        action="store_true",
        help="also score each job's best checkpoint on fold 1's pairs pasted into whole-scene photos",
    )
    args = ap.parse_args()
    if not args.lfw or not (Path(args.lfw) / "pairs.txt").is_file():
        ap.error("give --lfw DIR or set FACEID_LFW_DIR to the LFW folder (with pairs.txt)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    minutes = [float(x) for x in args.minutes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="faceid-curve-"))
    root = work / "data"
    unknown = [n for n in args.recipes.split(",") if n not in RECIPES]
    if unknown:
        sys.exit(f"error: unknown recipe(s) {unknown}; choose from {','.join(RECIPES)}")
    train, val = split(Path(args.lfw), root, copy=True, min_images=args.min_images)
    pairs = fold1_pairs(Path(args.lfw), root / "fold1")
    scenes = None
    if args.scenes:
        from align_compare import scene_copy

        scenes = scene_copy(root / "fold1", work / "scenes")
    base = {
        "train": "train",
        "val": "val",
        "pairs_file": "fold1/pairs.txt",
        "best_metric": "pairs_auc",
        "progress_step_pct": 5,
    }
    local = {**base, "train": str(train), "val": str(val), "pairs_file": str(pairs), "ckpt_dir": str(work / "ck")}
    print(f"machine: {machine()}; load average {loadavg()}", flush=True)
    results: dict[str, dict] = {}
    for name in args.recipes.split(","):
        untrained, rate, n_images = probe(name, TrainConfig(**{**local, **RECIPES[name]}))
        fit = schedule(name, RECIPES[name], rate, n_images, minutes[-1])
        log.info(
            "%s: untrained %s; probe %.1f images/s on %d images -> %s",
            name,
            {k: round(untrained[k], 4) for k in KEYS},
            rate,
            n_images,
            fit,
        )
        body = {**base, **RECIPES[name], **fit, "time_limit_min": minutes[-1]}
        with Server(None, data_dir=root) as server:
            job = run_job(server, body, minutes[-1])
            on_scenes = score_scenes(job, scenes) if scenes else None
        results[name] = {"untrained": untrained, "rate": rate, "body": body, "job": job, "scenes": on_scenes}
    load_after = loadavg()

    rows = []
    for name, res in results.items():
        job = res["job"]
        for m in job.get("metrics", []):
            rows.append({"recipe": name, "minute": (m["time"] - started(job)) / 60, **m})
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))

    print(
        f"\nLFW fold 1 (600 official pairs; sampled pairs of the {len(list(val.iterdir()))} fold-1 people), "
        f"training on {len(list(train.iterdir()))} other people with {args.min_images}+ images; "
        f"load average after: {load_after}"
    )
    print(
        f"value at minute t = the last epoch evaluated within t minutes of the job starting (decode, "
        f"evaluations and checkpoints included); at the last point, {minutes[-1]:g} = the job's time limit, the "
        "job's final epoch (its training stopped at the limit; 'at' says when its evaluation ended)\n"
    )
    print(f"| recipe | minute | at | epoch | steps | {' | '.join(KEYS)} |")
    print("|---|---:|---:|---:|---:|" + "---:|" * len(KEYS))
    for name, res in results.items():
        u = res["untrained"]
        print(f"| {name}, untrained | 0 | 0 | 0 | 0 | " + " | ".join(f"{u[k]:.4f}" for k in KEYS) + " |")
        mine = [r for r in rows if r["recipe"] == name]
        for t in minutes:
            if t == 0:
                continue
            done = mine if t == minutes[-1] else [r for r in mine if r["minute"] <= t + 1e-9]
            if not done:
                print(f"| {name} | {t:g} | - | - | - | " + " | ".join("-" for _ in KEYS) + " |")
                continue
            r = done[-1]
            steps = r.get("global_step", "-")
            print(
                f"| {name} | {t:g} | {r['minute']:.1f} | {r['epoch']} | {steps} | "
                + " | ".join(f"{r[k]:.4f}" for k in KEYS)
                + " |"
            )
    print("\nevery epoch:")
    print("| recipe | epoch | minute | train loss | " + " | ".join(KEYS) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(KEYS))
    for r in rows:
        print(
            f"| {r['recipe']} | {r['epoch']} | {r['minute']:.1f} | {r['train_loss']:.3f} | "
            + " | ".join(f"{r[k]:.4f}" for k in KEYS)
            + " |"
        )
    for name, res in results.items():
        job = res["job"]
        print(
            f"\n{name}: job {job['id']} {job['status']}; probe {res['rate']:.1f} images/s; "
            f"body {json.dumps(res['body'])}"
        )
        if job.get("error"):
            print(f"  error: {job['error']}")
        if res["scenes"]:
            sc = res["scenes"]
            print(
                f"  its best checkpoint on fold 1's pairs in whole-scene photos: AUC {sc['pairs_auc']:.4f}, "
                f"accuracy {sc['pairs_acc']:.4f}, pairs without a face {sc.get('pairs_no_face', 0)}"
            )


if __name__ == "__main__":
    main()
