"""Aligned against unaligned faces: the same preset job trained both ways, scored on tight crops and
on whole-scene photos of people it never saw.

Training data: the LFW people with 2+ images who are not in pairs.txt fold 1. Each recipe (default:
the cpu-small preset with `align` none, and with `align` arcface) is trained in this process and
its best checkpoint scored, as `faceid evaluate` scores it, on
  crops    LFW pairs.txt fold 1 (the 600 official pairs of tight face crops)
  scenes   the same 600 pairs with every image pasted into a cluttered photo at a random scale,
           place and in-plane rotation of up to 30 degrees (faceid.scenes; fixed seed)
and the table gives AUC on each, the gap between them, TAR at FAR 1e-2 on scenes, how many scene
images had no face found (they are then used unaligned), and the time split.

    python bench/align_compare.py                                  # FACEID_LFW_DIR; ~25 min on 2 cores
    python bench/align_compare.py --recipes arcface,arcface_64 --device cuda --workers 8
    python bench/align_compare.py --recipes preset,arcface_ema_20   # cpu-small as it is, 20 epochs
    python bench/align_compare.py --recipes preset,distill          # with dlib as a teacher ([teacher] extra)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import time
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_curve import fold1_pairs, split
from serve_common import machine

from faceid.cli import main as faceid_main
from faceid.config import TrainConfig
from faceid.scenes import make_scene
from faceid.train import run

log = logging.getLogger("align_compare")

# The recipes measured before cpu-small took the weight average name it off (ema_decay 0), so the
# commands of bench/README.md's tables still train what they trained; "preset" is cpu-small now.
_BEFORE_EMA = {"preset": "cpu-small", "ema_decay": 0.0}
RECIPES = {
    "preset": {"preset": "cpu-small"},
    "none": {**_BEFORE_EMA, "align": "none"},
    "arcface": {**_BEFORE_EMA, "align": "arcface"},
    "arcface_light": {**_BEFORE_EMA, "align": "arcface", "augment": "light"},
    "arcface_64": {**_BEFORE_EMA, "align": "arcface", "img_size": 64},
    "arcface_drop0.3": {**_BEFORE_EMA, "align": "arcface", "dropout": 0.3},
    "arcface_ema": {**_BEFORE_EMA, "align": "arcface", "ema_decay": 0.995},
    "arcface_ls": {**_BEFORE_EMA, "align": "arcface", "label_smoothing": 0.1},
    "arcface_20": {**_BEFORE_EMA, "align": "arcface", "epochs": 20},
    "arcface_ema_20": {**_BEFORE_EMA, "align": "arcface", "ema_decay": 0.995, "epochs": 20},
    # cpu-small as it is, also reproducing dlib's descriptors (pip install 'faceid[teacher]')
    "distill": {"preset": "cpu-small", "distill": "dlib"},  # distill_weight 50, the default
    "distill_w5": {"preset": "cpu-small", "distill": "dlib", "distill_weight": 5.0},
    "distill_w1": {"preset": "cpu-small", "distill": "dlib", "distill_weight": 1.0},
    "distill_20": {"preset": "cpu-small", "distill": "dlib", "epochs": 20},
    "distill_w20": {"preset": "cpu-small", "distill": "dlib", "distill_weight": 20.0},
    "distill_w50": {"preset": "cpu-small", "distill": "dlib", "distill_weight": 50.0},
    "distill_wd0.05": {"preset": "cpu-small", "distill": "dlib", "weight_decay": 0.05},
}


def scene_copy(pairs_dir: Path, out: Path, seed: int = 0) -> Path:
    """out/<Name>/<file>.jpg: each image of the fold-1 pairs pasted into a scene (a seed of its own
    per file, so the scenes do not depend on the order), and out/pairs.txt, the same pairs."""
    for f in sorted(pairs_dir.glob("*/*.jpg")):
        dest = out / f.parent.name / f.name
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, zlib.crc32(f.name.encode())])
        scene, _ = make_scene([Image.open(f)], rng)
        scene.save(dest, quality=90)
    (out / "pairs.txt").write_text((pairs_dir / "pairs.txt").read_text())
    return out / "pairs.txt"


def evaluate(ckpt: Path, pairs: Path, workers: int, device: str) -> dict:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = faceid_main(
            ["evaluate", str(ckpt), "--pairs_file", str(pairs), "--workers", str(workers), "--device", device]
        )
    if rc != 0:
        raise SystemExit(f"faceid evaluate failed on {pairs}")
    return json.loads(buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--lfw", default=os.environ.get("FACEID_LFW_DIR"), help="LFW folder with pairs.txt (default: FACEID_LFW_DIR)"
    )
    p.add_argument("--recipes", default="none,arcface", help=f"comma-separated, of {', '.join(RECIPES)}")
    p.add_argument("--epochs", type=int, default=None, help="(default: the preset's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for the split, scenes and checkpoints (default: a temp dir)")
    p.add_argument("--max_steps", type=int, default=0, help="cap steps per epoch (a quick check; 0: none)")
    p.add_argument("--people", type=int, default=0, help="train on the first N people only (a quick check)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.lfw or not (Path(args.lfw) / "pairs.txt").is_file():
        raise SystemExit("give --lfw DIR or set FACEID_LFW_DIR to the LFW folder (with pairs.txt)")
    lfw = Path(args.lfw)
    work = Path(args.work or tempfile.mkdtemp(prefix="align_compare-"))
    os.environ.setdefault("FACEID_CACHE_DIR", str(work / "face-cache"))
    train, val = split(lfw, work / "data", min_images=2)
    if args.people:
        import shutil

        for d in sorted(train.iterdir())[args.people :]:
            d.unlink() if d.is_symlink() else shutil.rmtree(d)
    crops = fold1_pairs(lfw, work / "fold1")
    t = time.monotonic()
    scenes = scene_copy(work / "fold1", work / "scenes")
    log.info("scenes made in %.0f s", time.monotonic() - t)
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    rows = []
    for name in args.recipes.split(","):
        overrides = dict(RECIPES[name])
        if args.epochs:
            overrides["epochs"] = args.epochs
        if args.max_steps:
            overrides["max_steps_per_epoch"] = args.max_steps
        cfg = TrainConfig(
            train=str(train),
            val=str(val),
            ckpt_dir=str(work / "runs" / name),
            device=args.device,
            workers=args.workers,
            **overrides,
        )
        events: list[dict] = []
        t0 = time.time()
        result = run(cfg, on_event=events.append)
        wall = time.time() - t0
        start = next(e for e in events if e["event"] == "start")
        first_epoch = next(e for e in events if e["event"] == "epoch")
        setup_s = start["time"] - t0  # finding faces (or not), decoding, building the model
        ckpt = Path(result.best_checkpoint)
        on_crops = evaluate(ckpt, crops, args.workers, args.device)
        on_scenes = evaluate(ckpt, scenes, args.workers, args.device)
        best = next(e for e in events if e["event"] == "epoch" and e["epoch"] == result.best_epoch)
        row = {
            "recipe": name,
            "align": cfg.align,
            "img_size": cfg.img_size,
            "epochs": cfg.epochs,
            "crops_auc": on_crops["pairs_auc"],
            "crops_acc": on_crops["pairs_acc"],
            "scenes_auc": on_scenes["pairs_auc"],
            "scenes_acc": on_scenes["pairs_acc"],
            "gap": on_crops["pairs_auc"] - on_scenes["pairs_auc"],
            # the run's own validation: sampled pairs of the fold-1 people (10,000 negatives)
            "own_auc": best["auc"],
            "own_tar_1e-3": best["tar_1e-3"],
            "scenes_no_face": on_scenes.get("pairs_no_face", 0),
            "crops_no_face": on_crops.get("pairs_no_face", 0),
            "train_images": start["train_images"],
            "no_face_images": start.get("no_face_images", 0),
            "setup_s": round(setup_s, 1),
            "wall_s": round(wall, 1),
            "epoch_s": first_epoch.get("epoch_time_s"),
        }
        rows.append(row)
        log.info("%s", json.dumps(row))
    print(f"\n{started}, {machine()}, device {args.device}")
    n_scene = len(list(scenes.parent.glob("*/*.jpg")))
    print(
        "| recipe | align | px | epochs | LFW fold-1 AUC (crops) | scenes AUC | gap | own AUC | own TAR@FAR 1e-3 "
        "| scene images without a face | train images (no face) | setup s | run wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['recipe']} | {r['align']} | {r['img_size']} | {r['epochs']} | {r['crops_auc']:.3f} | "
            f"{r['scenes_auc']:.3f} | {r['gap']:+.3f} | {r['own_auc']:.3f} | {r['own_tar_1e-3']:.3f} | "
            f"{r['scenes_no_face'] if r['align'] != 'none' else '-'} of {n_scene} | "
            f"{r['train_images']} ({r['no_face_images']}) | {r['setup_s']} | {r['wall_s']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
