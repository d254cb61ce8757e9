"""Learning curve on real faces: LFW fold-1 AUC at fixed wall-clock points of training.

Trains on the LFW people (>= 2 images) who are not in pairs.txt fold 1 and scores fold 1 (the
official 600 pairs: 10-fold accuracy and AUC) plus sampled pairs of the fold-1 people, at fixed
training-time points (evaluation time is not counted), for, in one run:

  untrained  the network as initialised (the score to beat; not chance)
  plain      the recipe of shared/MEASURED.md: random init, 112 px, ArcFace s=64 m=0.5, SGD lr 0.1,
             300 warmup steps, batch 64
  faceid     the cpu-small preset (see README, training recipe)

    python bench/learning_curve.py --lfw ../shared/data/lfw --minutes 0,5,10,20,30

Prints one table; each recipe's schedule (cosine) is sized to the last time point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faceid.config import TrainConfig  # noqa: E402
from faceid.pairs import identities_in, load_pairs  # noqa: E402
from faceid.train import Trainer  # noqa: E402

RECIPES = {
    "plain": dict(train_mode="arcface", img_size=112, batch_size=64, optimizer="sgd", lr=0.1,
                  arcface_s=64.0, arcface_m=0.5, weight_decay=5e-4, scheduler="cosine"),
    "faceid": dict(preset="cpu-small"),
}
KEYS = ("pairs_auc", "pairs_acc", "auc", "acc", "tar_1e-2")


def split(lfw: Path, out: Path) -> tuple[Path, Path]:
    fold1 = identities_in(load_pairs(lfw / "pairs.txt", folds=[1]))
    train, val = out / "train", out / "val"
    train.mkdir(parents=True, exist_ok=True)
    val.mkdir(parents=True, exist_ok=True)
    for d in sorted(p for p in lfw.iterdir() if p.is_dir()):
        if sum(1 for _ in d.iterdir()) >= 2:
            link = (val if d.name in fold1 else train) / d.name
            if not link.exists():
                link.symlink_to(d.resolve())
    return train, val


def curve(name: str, overrides: dict, base: dict, minutes: list[float]) -> list[dict]:
    """Train `name` and evaluate at each training-time point; returns one row per point."""
    rows: list[dict] = []
    cfg0 = TrainConfig(**{**base, **overrides})
    # Size the schedule to the run: steps per minute measured on the first steps, then epochs.
    state = {"train_s": 0.0, "mark": None, "next": 0}
    trainer: Trainer

    def on_event(ev: dict) -> None:
        if ev["event"] != "progress":
            return
        now = time.time()
        state["train_s"] += now - state["mark"]
        state["mark"] = now
        while state["next"] < len(minutes) and state["train_s"] >= minutes[state["next"]] * 60:
            m = trainer.evaluate()
            rows.append({"recipe": name, "minute": minutes[state["next"]],
                         "steps": ev["step"] + (ev["epoch"] - 1) * ev["steps"],
                         "images_per_s": ev["images_per_s"], **{k: m[k] for k in KEYS}})
            logging.info("%s", rows[-1])
            state["next"] += 1
            state["mark"] = time.time()
        if state["next"] >= len(minutes):
            trainer.stop.set()

    # Schedule length: estimate images/s with a short probe, then pick epochs for the last point.
    probe = Trainer(cfg0.model_copy(update={"epochs": 1, "max_steps_per_epoch": 6, "eval_pairs": 100,
                                            "ckpt_dir": base["ckpt_dir"] + f"/{name}-probe"}))
    probe.setup()
    n_images = len(probe.train_folder)
    t = time.time()
    probe.fit()
    rate = 6 * cfg0.batch_size / max(1e-6, time.time() - t)
    epochs = max(1, round(rate * minutes[-1] * 60 / n_images))
    cfg = cfg0.model_copy(update={"epochs": epochs, "ckpt_dir": base["ckpt_dir"] + f"/{name}"})
    cfg = TrainConfig(**cfg.model_dump())
    logging.info("%s: ~%.1f images/s, schedule of %d epochs", name, rate, epochs)
    trainer = Trainer(cfg, on_event)
    trainer.setup()
    m = trainer.evaluate()
    rows.append({"recipe": name, "minute": 0.0, "steps": 0, "images_per_s": 0.0, **{k: m[k] for k in KEYS}})
    state["next"] = 1 if minutes[0] == 0 else 0
    state["mark"] = time.time()
    trainer.fit()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lfw", default=os.environ.get("FACEID_LFW_DIR", "../shared/data/lfw"))
    ap.add_argument("--minutes", default="0,5,10,20,30")
    ap.add_argument("--recipes", default="plain,faceid")
    ap.add_argument("--out", help="also write the rows as JSON lines here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    minutes = [float(x) for x in args.minutes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="faceid-curve-"))
    train, val = split(Path(args.lfw), work / "data")
    base = dict(train=str(train), val=str(val), pairs_file=str(Path(args.lfw) / "pairs.txt"),
                pairs_folds=[1], ckpt_dir=str(work / "ck"), eval_pairs=6000, workers=2,
                progress_step_pct=1)
    rows = []
    for name in args.recipes.split(","):
        rows += curve(name, RECIPES[name], base, minutes)
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"\nLFW fold 1 (600 pairs; train: {len(list(train.iterdir()))} other people), "
          f"AUC / 10-fold acc at training minutes:")
    print(f"{'recipe':<10}{'min':>6}{'steps':>8}{'img/s':>8}" + "".join(f"{k:>11}" for k in KEYS))
    for r in rows:
        label = "untrained" if r["minute"] == 0 else r["recipe"]
        print(f"{label:<10}{r['minute']:>6.0f}{r['steps']:>8}{r['images_per_s']:>8.1f}"
              + "".join(f"{r[k]:>11.4f}" for k in KEYS))


if __name__ == "__main__":
    main()
