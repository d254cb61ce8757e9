"""Fine-tuning: a run whose network starts from a FaceID model (`init_from`).

The base checkpoint gives the trunk and the embedding layer; the ArcFace head is new, sized for the
run's own people. The base must fit the run: the same embedding size and neck, the same image size
(a flat neck's embedding layer is sized by it, and the trunk learned that scale), and faces prepared
the same way. A mismatch stops the run before any data is read, with the flags that fix it.
"""

from __future__ import annotations

from typing import Any, Optional

from faceid.config import TrainConfig
from faceid.errors import CheckpointError, ConfigError, FaceIDError

# What a base model fixes for the runs fine-tuned from it (its weights' shapes and what they learned
# to see), with the value a config from before the field existed meant.
FIXED: dict[str, Any] = {"embedding_size": 512, "neck": "gap", "img_size": None, "align": "none", "crop": 1.0}


def base_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What a base model fixes for the runs fine-tuned from it, from its (training) config dict."""
    return {k: config.get(k, default) for k, default in FIXED.items()}


def inherit(data: dict[str, Any], base_config: dict[str, Any]) -> dict[str, Any]:
    """Config fields `data` (what the caller set) with the settings the base fixes filled in where
    it leaves them out, so that fine-tuning needs no more than `init_from`; a value the caller
    set that differs from the base's is left for `check_fits` to refuse."""
    fixed = {k: v for k, v in base_settings(base_config).items() if v is not None and k not in data}
    return {**data, **fixed}


def _checkpoint_config(ck: dict[str, Any]) -> dict[str, Any]:
    config = dict(ck.get("config") or {})
    config.setdefault("embedding_size", ck.get("embedding_size"))
    config.setdefault("img_size", ck.get("img_size"))
    config["align"] = (ck.get("faces") or {}).get("align", "none")
    return config


def base_config_of(path: str) -> Optional[dict[str, Any]]:
    """The training config of the FaceID model at `path`, or None when it cannot be read as one
    (the run's own checks then name what is wrong with the file)."""
    from faceid.checkpoint import load_checkpoint

    try:
        return _checkpoint_config(load_checkpoint(path, what="init_from model"))
    except FaceIDError:
        return None


def check_fits(cfg: TrainConfig, base: dict[str, Any], what: str) -> None:
    """ConfigError unless a run with `cfg` can start from a model trained with config `base`."""
    want = base_settings(base)
    wrong = {k: v for k, v in want.items() if v is not None and getattr(cfg, k) != v}
    if wrong:
        have = ", ".join(f"{k} {getattr(cfg, k)}" for k in wrong)
        flags = " ".join(f"--{k} {v}" for k, v in wrong.items())
        raise ConfigError(
            f"init_from {what} was trained with {', '.join(f'{k} {v}' for k, v in wrong.items())}, "
            f"this run has {have}; set {flags} to fine-tune it"
        )


def load_base(model: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Load `cfg.init_from`'s trunk and embedding layer into `model` (an EmbeddingNet built from
    `cfg`); return the base checkpoint's epoch, metrics and config. CheckpointError for a file that
    is not a FaceID model, ConfigError for one that does not fit the run."""
    from faceid.checkpoint import load_checkpoint

    init_from = cfg.init_from
    assert init_from is not None  # callers load a base only for a run with init_from
    ck = load_checkpoint(init_from, what="init_from model")
    base_config = _checkpoint_config(ck)
    check_fits(cfg, base_config, init_from)
    try:
        missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    except RuntimeError as e:  # shapes that do not match raise even when not strict
        raise CheckpointError(
            f"init_from {cfg.init_from} does not fit this network: {' '.join(str(e).split())[:300]}"
        ) from None
    if missing or unexpected:
        raise CheckpointError(
            f"init_from {cfg.init_from} does not fit this network: missing "
            f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
        )
    return {"epoch": ck.get("epoch"), "metrics": ck.get("metrics") or {}, "config": base_config}
