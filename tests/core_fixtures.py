"""Shared pieces of the faceid core tests: the shipped LFW sample, tiny run settings, and one
tiny arcface run that several test modules reuse (trained once per session).

Not a conftest.py (the app tests own that); test modules import from here. A tiny run means
img_size 32, batch 8, 2 steps per epoch, 200 evaluation pairs, no worker processes, one compute
thread: seconds on a CPU, enough to exercise every artifact, not to learn anything.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
SAMPLE_TRAIN = SAMPLE / "train"
SAMPLE_VAL = SAMPLE / "val"
SAMPLE_PAIRS = SAMPLE / "pairs.txt"

# Keys every metrics.jsonl line must have (docs/CLI.md, metrics and artifacts).
METRIC_KEYS = ("epoch", "train_loss", "acc", "th", "auc", "tar_1e-2", "tar_1e-3")

TINY: dict[str, Any] = {
    "img_size": 32,
    "batch_size": 8,
    "max_steps_per_epoch": 2,
    "eval_pairs": 200,
    "workers": 0,
    "device": "cpu",
    "seed": 0,
    "progress_step_pct": 50,
    # One compute thread: on a shared 2-core machine two OpenMP threads wait on each other at
    # every small op whenever another process holds a core (measured: 12x slower backward).
    "threads": 1,
    # Most behaviour tests run on the raw images; alignment has tests of its own (test_faces.py)
    "align": "none",
}


def tiny_flags(**overrides: Any) -> list[str]:
    """TINY (plus overrides) as `faceid train` flags."""
    out: list[str] = []
    for k, v in {**TINY, **overrides}.items():
        if isinstance(v, bool):
            out.append(f"--{k}" if v else f"--no-{k}")
        else:
            out += [f"--{k}", str(v)]
    return out


def subprocess_env() -> dict[str, str]:
    """Environment for a child `python -m faceid...`: the repo importable, logs at INFO."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("FACEID_LOG_LEVEL", None)
    return env


def faceid_cmd(*args: str) -> list[str]:
    """Argument list that runs the `faceid` command with this interpreter."""
    return [sys.executable, "-m", "faceid.cli", *args]


def sample_images(n: int) -> list[Path]:
    """The first n val images of the sample, sorted (two of the same person first)."""
    files = sorted(p for p in SAMPLE_VAL.rglob("*.jpg"))
    return files[:n]


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (40, 48)) -> Path:
    """A small random RGB image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def make_identity_folder(root: Path, counts: dict[str, int], ext: str = ".png") -> Path:
    """root/<name>/<name>_<i>.<ext> with counts[name] random images each."""
    seed = 0
    for name, n in counts.items():
        for i in range(n):
            write_image(root / name / f"{name}_{i:04d}{ext}", seed=seed)
            seed += 1
    return root


def small_sample(tmp_path_factory) -> tuple[Path, Path]:
    """(train, val) folders cut from the sample, once per session: 6 training people x 6 images
    and 4 validation people x 3 images. Evaluation then embeds 12 images instead of 110."""
    if "small" not in _SMALL:
        import shutil

        root = tmp_path_factory.mktemp("small_sample")
        for split, src, n_ids, n_img in (("train", SAMPLE_TRAIN, 6, 6), ("val", SAMPLE_VAL, 4, 3)):
            people = sorted(d for d in src.iterdir() if d.is_dir())[:n_ids]
            for d in people:
                (root / split / d.name).mkdir(parents=True)
                for f in sorted(d.glob("*.jpg"))[:n_img]:
                    shutil.copy(f, root / split / d.name / f.name)
        _SMALL["small"] = (root / "train", root / "val")
    return _SMALL["small"]


_SMALL: dict[str, tuple[Path, Path]] = {}


@dataclass
class TinyRun:
    """The shared in-process arcface run: its config, ckpt_dir, result and events."""

    cfg: Any
    ckpt_dir: Path
    result: Any
    events: list[dict[str, Any]]

    @property
    def best(self) -> Path:
        return self.ckpt_dir / "backbone_best.pt"

    @property
    def last(self) -> Path:
        return self.ckpt_dir / "last.pt"


_CACHE: dict[str, TinyRun] = {}


def tiny_arcface_run(tmp_path_factory) -> TinyRun:
    """Train arcface for 1 epoch on the sample (with the sample's pairs file), once per session.

    Call it from a fixture in each module that needs a trained checkpoint; callers must not
    write into its ckpt_dir (copy it first)."""
    if "arcface" not in _CACHE:
        from faceid.config import TrainConfig
        from faceid.train import run

        ckpt_dir = tmp_path_factory.mktemp("tiny_arcface")
        cfg = TrainConfig(
            train=str(SAMPLE_TRAIN),
            val=str(SAMPLE_VAL),
            pairs_file=str(SAMPLE_PAIRS),
            ckpt_dir=str(ckpt_dir),
            train_mode="arcface",
            epochs=1,
            **TINY,
        )
        events: list[dict[str, Any]] = []
        result = run(cfg, on_event=events.append)
        _CACHE["arcface"] = TinyRun(cfg, ckpt_dir, result, events)
    return _CACHE["arcface"]


def tiny_aligned_run(tmp_path_factory) -> TinyRun:
    """Train arcface for 1 epoch on the small sample with faces aligned (align arcface), once per
    session: a checkpoint whose served model detects and aligns. Callers must not write into its
    ckpt_dir."""
    if "aligned" not in _CACHE:
        from faceid.config import TrainConfig
        from faceid.train import run

        train, val = small_sample(tmp_path_factory)
        ckpt_dir = tmp_path_factory.mktemp("tiny_aligned")
        cfg = TrainConfig(
            train=str(train),
            val=str(val),
            ckpt_dir=str(ckpt_dir),
            train_mode="arcface",
            epochs=1,
            **{**TINY, "align": "arcface"},
        )
        events: list[dict[str, Any]] = []
        result = run(cfg, on_event=events.append)
        _CACHE["aligned"] = TinyRun(cfg, ckpt_dir, result, events)
    return _CACHE["aligned"]
