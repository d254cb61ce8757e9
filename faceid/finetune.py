"""Fine-tuning: a run whose network starts from a FaceID model (`init_from`).

The base checkpoint gives the trunk and the embedding layer; the ArcFace head is new, sized for the
run's own people. The base must fit the run: the same embedding size and neck, the same image size
(a flat neck's embedding layer is sized by it, and the trunk learned that scale), and faces prepared
the same way. A mismatch stops the run before any data is read, with the flags that fix it.
"""

from __future__ import annotations

from typing import Any

from faceid.config import TrainConfig
from faceid.errors import CheckpointError, ConfigError


def base_settings(config: dict[str, Any]) -> dict[str, Any]:
    """What a base model fixes for the runs fine-tuned from it, from its (training) config dict."""
    return {"embedding_size": config.get("embedding_size", 512), "neck": config.get("neck", "gap"),
            "img_size": config.get("img_size"), "align": config.get("align", "none"),
            "crop": config.get("crop", 1.0)}


def check_fits(cfg: TrainConfig, base: dict[str, Any], what: str) -> None:
    """ConfigError unless a run with `cfg` can start from a model trained with config `base`."""
    want = base_settings(base)
    wrong = {k: v for k, v in want.items() if v is not None and getattr(cfg, k) != v}
    if wrong:
        have = ", ".join(f"{k} {getattr(cfg, k)}" for k in wrong)
        flags = " ".join(f"--{k} {v}" for k, v in wrong.items())
        raise ConfigError(f"init_from {what} was trained with {', '.join(f'{k} {v}' for k, v in wrong.items())}, "
                          f"this run has {have}; set {flags} to fine-tune it")


def load_base(model: Any, cfg: TrainConfig) -> dict[str, Any]:
    """Load `cfg.init_from`'s trunk and embedding layer into `model` (an EmbeddingNet built from
    `cfg`); return the base checkpoint's epoch, metrics and config. CheckpointError for a file that
    is not a FaceID model, ConfigError for one that does not fit the run."""
    from faceid.checkpoint import load_checkpoint

    ck = load_checkpoint(cfg.init_from, what="init_from model")
    base_config = dict(ck.get("config") or {})
    base_config.setdefault("embedding_size", ck.get("embedding_size"))
    base_config.setdefault("img_size", ck.get("img_size"))
    base_config["align"] = (ck.get("faces") or {}).get("align", "none")
    check_fits(cfg, base_config, cfg.init_from)
    try:
        missing, unexpected = model.load_state_dict(ck["model"], strict=False)
    except RuntimeError as e:  # shapes that do not match raise even when not strict
        raise CheckpointError(f"init_from {cfg.init_from} does not fit this network: "
                              f"{' '.join(str(e).split())[:300]}") from None
    if missing or unexpected:
        raise CheckpointError(f"init_from {cfg.init_from} does not fit this network: missing "
                              f"{list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    return {"epoch": ck.get("epoch"), "metrics": ck.get("metrics") or {}, "config": base_config}
