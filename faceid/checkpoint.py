"""Self-describing checkpoints, written atomically (see docs/CONTRACTS.md, section 2)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from faceid.errors import CheckpointError

FORMAT = "faceid-checkpoint"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "format_version", "arch", "embedding_size", "img_size", "normalize",
                 "config", "epoch", "metrics", "thresholds", "model")


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> Path:
    """Write `obj` to `path` through a temp file in the same folder and os.replace, so a reader
    (or a crash) never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a FaceID checkpoint with weights_only=True. Raises CheckpointError naming
    the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file makes the unpickler raise almost anything
        # (UnpicklingError, BadZipFile, RuntimeError, EOFError, IndexError, KeyError, ...); with
        # weights_only=True none of it ran code, and all of it means "not a readable checkpoint".
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt, truncated or not a "
                              f"weights-only PyTorch file ({first[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a FaceID checkpoint (no format '{FORMAT}'); give a "
                              "backbone_best.pt or last.pt written by faceid train")
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {obj.get('format_version')}; "
                              f"this FaceID reads version {FORMAT_VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it is incomplete")
    return obj
