"""The files of a run's ckpt_dir besides its checkpoints: the folder itself, config.json,
no_face.txt and metrics.jsonl (docs/CLI.md, "Metrics and artifacts")."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

from faceid.config import TrainConfig
from faceid.data import IdentityFolder
from faceid.errors import ConfigError

if TYPE_CHECKING:
    from faceid.metrics import RocPoints

log = logging.getLogger("faceid.train")  # the training log lines keep the name they always had


def prepare_ckpt_dir(ckpt_dir: Path) -> None:
    """Create `ckpt_dir`; ConfigError, naming the flag, when it cannot be created or written."""
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        what = "is a file" if ckpt_dir.is_file() else f"cannot be created ({e.strerror or e})"
        raise ConfigError(f"ckpt_dir {ckpt_dir} {what}; choose another --ckpt_dir") from None
    if not os.access(ckpt_dir, os.W_OK):
        raise ConfigError(f"ckpt_dir {ckpt_dir} is not writable; choose another --ckpt_dir")


def write_no_face(ckpt_dir: Path, folders: Iterable[tuple[str, Optional[IdentityFolder]]]) -> None:
    """no_face.txt: every image left out (or, in a pairs protocol, used unaligned) because no
    face was found in it, one per line after its set; removed when there is none."""
    path = ckpt_dir / "no_face.txt"
    lines = [f"{what}\t{p}" for what, folder in folders if folder is not None for p in folder.no_face]
    if lines:
        tmp = ckpt_dir / ".no_face.txt.tmp"
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    elif path.exists():
        path.unlink()


def start_files(ckpt_dir: Path, cfg: TrainConfig, folders: Iterable[tuple[str, Optional[IdentityFolder]]]) -> None:
    """Once the run can start: its config.json and no_face.txt (of `folders`: each set's name and
    folder), and a fresh metrics.jsonl unless it resumes (so neither a run refused at setup nor a
    new run in the same folder mixes with the last one)."""
    tmp = ckpt_dir / ".config.json.tmp"
    tmp.write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
    os.replace(tmp, ckpt_dir / "config.json")
    write_no_face(ckpt_dir, folders)
    metrics = ckpt_dir / "metrics.jsonl"
    if not cfg.resume and metrics.exists():
        log.warning(
            "%s: a new run (no --resume) starts a new metrics.jsonl; the checkpoints there "
            "are replaced as it saves its own",
            ckpt_dir,
        )
        metrics.unlink()
    if cfg.resume:
        # Resumed into another folder: the best model so far comes along, so that the folder
        # holds a backbone_best.pt even if no later epoch beats it
        best, source = ckpt_dir / "backbone_best.pt", Path(cfg.resume).parent / "backbone_best.pt"
        if not best.exists() and source.is_file() and source.resolve() != best.resolve():
            tmp = ckpt_dir / ".backbone_best.pt.copy.tmp"
            shutil.copyfile(source, tmp)
            os.replace(tmp, best)
            log.info("copied %s (the best epoch so far) into %s", source, ckpt_dir)


def append_metrics(ckpt_dir: Path, record: dict[str, Any]) -> None:
    """One epoch's record, a line of metrics.jsonl."""
    with open(ckpt_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def write_roc(ckpt_dir: Path, epoch: int, roc: RocPoints, metrics: dict[str, Any]) -> None:
    """roc.json: the best epoch's ROC curve (faceid.metrics.roc_points) with its operating points,
    written atomically; the web page plots it (GET /jobs/{id}/roc)."""
    from faceid.checkpoint import save_json
    from faceid.events import thresholds_of

    save_json({"epoch": epoch, **roc, "thresholds": thresholds_of(metrics)}, ckpt_dir / "roc.json")
