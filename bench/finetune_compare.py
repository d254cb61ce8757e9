"""Fine-tuning a FaceID model on a small group against training that group from scratch.

Data, all from LFW (FACEID_LFW_DIR):
  base    the people with 2+ images who are not in pairs.txt fold 1, less a held-back group
  group   --group people (default 100) drawn from the rest with --min_photos+ images each, at most
          --photos (default 10) photos of each: the small data a user brings
  val     the fold-1 people with 2+ images (each run's own evaluation after every epoch)
The base model is the cpu-small preset trained on `base`. On `group`, each of --runs trains (from
scratch: the cpu-small preset; fine-tuned: init_from the base model with the finetune preset), and
every best checkpoint, the base's too, is scored as `faceid evaluate` scores it on fold 1's 600
pairs. The table gives fold-1 AUC and accuracy, the run's own AUC and TAR at FAR 1e-3 on its
sampled fold-1 pairs (10,000 negatives), and the run's wall time.

    python bench/finetune_compare.py                                   # ~30 min on 2 cores
    python bench/finetune_compare.py --base models/base/backbone_best.pt  # reuse a base model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from align_compare import evaluate
from learning_curve import fold1_pairs, split
from serve_common import machine

from faceid.config import TrainConfig
from faceid.finetune import base_config_of, inherit
from faceid.train import run

log = logging.getLogger("finetune_compare")

# What trains on the small group. "init_from" marks the runs that start from the base model.
RUNS: dict[str, dict] = {
    "scratch": {"preset": "cpu-small"},
    "finetune": {"preset": "finetune", "init_from": True},
    "finetune_nofreeze": {"preset": "finetune", "init_from": True, "freeze_backbone_epochs": 0},
    "finetune_lr1": {"preset": "finetune", "init_from": True, "backbone_lr_scale": 1.0},
}


def hold_back(train: Path, out: Path, *, group: int, photos: int, min_photos: int, seed: int) -> tuple[Path, Path]:
    """out/base: the people of `train` less `group` people drawn (seeded) from those with
    `min_photos`+ images; out/group: those people with their first `photos` images (links)."""
    people = sorted(d for d in train.iterdir() if d.is_dir())
    eligible = [d for d in people if sum(1 for f in d.iterdir() if f.is_file()) >= min_photos]
    if len(eligible) < group:
        raise SystemExit(f"only {len(eligible)} people have {min_photos}+ images; ask for a smaller --group")
    rng = np.random.default_rng(seed)
    held = {eligible[i].name for i in rng.choice(len(eligible), size=group, replace=False)}
    base, small = out / "base", out / "group"
    for folder in (base, small):  # links only: drawn afresh, so another --group never mixes in
        shutil.rmtree(folder, ignore_errors=True)
    for d in people:
        if d.name in held:
            dest = small / d.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(f for f in d.resolve().iterdir() if f.is_file())[:photos]:
                (dest / f.name).symlink_to(f)
        else:
            base.mkdir(parents=True, exist_ok=True)
            (base / d.name).symlink_to(d.resolve())
    return base, small


def train(cfg: TrainConfig) -> tuple[Path, dict, float, int]:
    """Run `cfg`; the best checkpoint, the best epoch's own metrics, the wall time and the number of
    training images."""
    events: list[dict] = []
    t0 = time.time()
    result = run(cfg, on_event=events.append)
    wall = time.time() - t0
    epochs = [e for e in events if e["event"] == "epoch"]
    best = next(e for e in reversed(epochs) if e["epoch"] == result.best_epoch)
    start = next(e for e in events if e["event"] == "start")
    return Path(result.best_checkpoint), best, wall, start["train_images"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lfw", default=os.environ.get("FACEID_LFW_DIR"), help="LFW folder with pairs.txt (default: FACEID_LFW_DIR)"
    )
    p.add_argument("--runs", default="scratch,finetune", help=f"comma-separated, of {', '.join(RUNS)}")
    p.add_argument("--base", default=None, help="a base model to reuse (default: train one)")
    p.add_argument("--group", type=int, default=100, help="people held back from the base")
    p.add_argument("--photos", type=int, default=10, help="photos of each held-back person the runs get")
    p.add_argument("--min_photos", type=int, default=5, help="held-back people have at least this many")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the group runs (default: the presets')")
    p.add_argument("--base_epochs", type=int, default=None, help="(default: the cpu-small preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for the data and checkpoints (default: a temp dir)")
    p.add_argument("--max_steps", type=int, default=0, help="cap steps per epoch (a quick check; 0: none)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.lfw or not (Path(args.lfw) / "pairs.txt").is_file():
        raise SystemExit("give --lfw DIR or set FACEID_LFW_DIR to the LFW folder (with pairs.txt)")
    lfw = Path(args.lfw)
    work = Path(args.work or tempfile.mkdtemp(prefix="finetune_compare-"))
    os.environ.setdefault("FACEID_CACHE_DIR", str(work / "face-cache"))
    everyone, val = split(lfw, work / "data", min_images=2)
    base_train, group = hold_back(
        everyone, work / "data", group=args.group, photos=args.photos, min_photos=args.min_photos, seed=0
    )
    crops = fold1_pairs(lfw, work / "fold1")
    common = {"val": str(val), "device": args.device, "workers": args.workers}
    if args.max_steps:
        common["max_steps_per_epoch"] = args.max_steps
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = []
    if args.base:
        base = Path(args.base)
    else:
        extra = {"epochs": args.base_epochs} if args.base_epochs else {}
        cfg = TrainConfig(
            preset="cpu-small", train=str(base_train), ckpt_dir=str(work / "runs" / "base"), **common, **extra
        )
        base, best, wall, n = train(cfg)
        rows.append(
            {
                "run": "base (not fine-tuned)",
                "people": len(list(base_train.iterdir())),
                "images": n,
                "own_auc": best["auc"],
                "own_tar_1e-3": best["tar_1e-3"],
                "wall_s": round(wall),
            }
        )
        log.info("%s", json.dumps(rows[-1]))
    if not rows:
        rows.append(
            {
                "run": "base (not fine-tuned)",
                "people": None,
                "images": None,
                "own_auc": None,
                "own_tar_1e-3": None,
                "wall_s": None,
            }
        )
    rows[0].update(
        {
            f"fold1_{k}": v
            for k, v in evaluate(base, crops, args.workers, args.device).items()
            if k in ("pairs_auc", "pairs_acc")
        }
    )
    base_config = base_config_of(str(base))
    for name in args.runs.split(","):
        spec = dict(RUNS[name])
        data = {**spec, "train": str(group), "ckpt_dir": str(work / "runs" / name), **common}
        if data.pop("init_from", False):
            data = inherit({**data, "init_from": str(base)}, base_config)
        if args.epochs:
            data["epochs"] = args.epochs
        ckpt, best, wall, n = train(TrainConfig(**data))
        row = {
            "run": name,
            "people": args.group,
            "images": n,
            "own_auc": best["auc"],
            "own_tar_1e-3": best["tar_1e-3"],
            "wall_s": round(wall),
        }
        row.update(
            {
                f"fold1_{k}": v
                for k, v in evaluate(ckpt, crops, args.workers, args.device).items()
                if k in ("pairs_auc", "pairs_acc")
            }
        )
        rows.append(row)
        log.info("%s", json.dumps(row))
    print(f"\n{started}, {machine()}, device {args.device}")
    print("| run | people | images | LFW fold-1 AUC | fold-1 accuracy | own AUC | own TAR@FAR 1e-3 | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(
            f"| {r['run']} | {fmt(r['people'], 'd')} | {fmt(r['images'], 'd')} "
            f"| {fmt(r.get('fold1_pairs_auc'), '.3f')} "
            f"| {fmt(r.get('fold1_pairs_acc'), '.3f')} | {fmt(r['own_auc'], '.3f')} | {fmt(r['own_tar_1e-3'], '.3f')} "
            f"| {fmt(r['wall_s'], 'd')} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
