"""Which part of the cpu-small recipe buys how much: one knob changed at a time, at a fixed step count.

Each variant is the cpu-small preset with one or two fields changed. All variants train for the
same number of steps on the same data (the LFW people outside pairs.txt fold 1; `--min_images 2`:
only those with 2+ images) from the same seed, then score fold 1 (the official 600 pairs: AUC and
10-fold accuracy) and sampled
pairs of the fold-1 people. Steps, not minutes, are the budget, so the comparison holds whatever
else the machine is doing, and variants can run side by side (one per process, `--threads 1`);
at 64 px every variant here costs the same per step, except `img48`.

    python bench/recipe_ablation.py --variants preset,no_margin_warmup --out ablation.jsonl
    python bench/recipe_ablation.py --table ablation.jsonl

The schedule is compressed to fit the step budget: `--epochs` epochs of `--steps_per_epoch`
steps, with the preset's warm-ups scaled the same way (lr warm-up 1/4 of the run, margin warm-up
3/4 of it).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learning_curve import KEYS, split

from faceid.config import TrainConfig
from faceid.train import Trainer

VARIANTS: dict[str, dict] = {
    "preset": {},
    "no_margin_warmup": {"margin_warmup_epochs": 0.0},
    "balanced": {"balanced_sampling": True},
    "no_augment": {"augment": "none"},
    "flip_only": {"augment": "flip"},
    "origin_s64_m05": {"arcface_s": 64.0, "arcface_m": 0.5},
    "sgd_lr0.1": {"optimizer": "sgd", "lr": 0.1},
    "lr3e-3": {"lr": 3e-3},
    "lr3e-4": {"lr": 3e-4},
    "img48": {"img_size": 48},
    "no_eval_flip": {"eval_flip": False},
    "wd0.05": {"weight_decay": 0.05},
    "s16": {"arcface_s": 16.0},
    "m0.5": {"arcface_m": 0.5},
    "gap": {"neck": "gap"},
    "drop0.4": {"dropout": 0.4},
}


def run_variant(name: str, base: dict, epochs: int, steps_per_epoch: int) -> dict:
    cfg = TrainConfig(
        **{
            "preset": "cpu-small",
            **base,
            "epochs": epochs,
            "max_steps_per_epoch": steps_per_epoch,
            "warmup_epochs": epochs / 4,
            "margin_warmup_epochs": epochs * 3 / 4,
            "ckpt_dir": base["ckpt_dir"] + f"/{name}",
            **VARIANTS[name],
        }
    )
    t = time.time()
    trainer = Trainer(cfg)
    trainer.setup()
    m = trainer.fit().history[-1]  # the last epoch's evaluation
    return {
        "variant": name,
        "steps": epochs * steps_per_epoch,
        "changed": VARIANTS[name],
        "train_loss": m["train_loss"],
        "wall_s": round(time.time() - t, 1),
        **{k: round(float(m[k]), 4) for k in KEYS},
    }


def table(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["variant"] == "preset"), None)
    lines = [
        f"{'variant':<18}{'steps':>6}"
        + "".join(f"{k:>11}" for k in KEYS)
        + (f"{'d pairs_auc':>13}" if ref else "")
        + "  changed"
    ]
    for r in rows:
        d = f"{r['pairs_auc'] - ref['pairs_auc']:>+13.4f}" if ref else ""
        lines.append(
            f"{r['variant']:<18}{r['steps']:>6}"
            + "".join(f"{r[k]:>11.4f}" for k in KEYS)
            + d
            + "  "
            + (json.dumps(r["changed"]) if r["changed"] else "(the preset)")
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--lfw",
        default=os.environ.get("FACEID_LFW_DIR"),
        help="the LFW folder with pairs.txt (default: FACEID_LFW_DIR)",
    )
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"any of {','.join(VARIANTS)}")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps_per_epoch", type=int, default=80)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: the trainer decides)")
    ap.add_argument(
        "--min_images",
        type=int,
        default=1,
        help="train on the people outside fold 1 with at "
        "least this many images (the tables before 2026-11-29 05:00 used 2)",
    )
    ap.add_argument("--out", help="append one JSON line per variant here")
    ap.add_argument("--table", metavar="FILE", help="only print the table of an --out file")
    args = ap.parse_args()
    if not args.lfw or not (Path(args.lfw) / "pairs.txt").is_file():
        ap.error("give --lfw DIR or set FACEID_LFW_DIR to the LFW folder (with pairs.txt)")
    if args.table:
        print(table([json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {','.join(VARIANTS)}")
    work = Path(tempfile.mkdtemp(prefix="faceid-ablation-"))
    train, val = split(Path(args.lfw), work / "data", min_images=args.min_images)
    base = dict(
        train=str(train),
        val=str(val),
        pairs_file=str(Path(args.lfw) / "pairs.txt"),
        pairs_folds=[1],
        ckpt_dir=str(work / "ck"),
        threads=args.threads,
        seed=0,
    )
    rows = []
    for name in args.variants.split(","):
        rows.append(run_variant(name, base, args.epochs, args.steps_per_epoch))
        logging.info("%s", rows[-1])
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
