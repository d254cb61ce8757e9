"""The state of a training run: how far it is (`RunState`), what its checkpoints hold and a resume
from last.pt (docs/CONTRACTS.md, section 2), and what it returns (`RunResult`).

backbone_best.pt and last.pt hold the model and what serving needs (`checkpoint_dict`); last.pt
adds what a resume needs (`last_checkpoint_dict`): the head, optimizer, scheduler and scaler, the
best epoch so far, the history, and how far a stopped epoch got. `check_resumable`,
`restore_weights` and `resumed_state` read it back.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from faceid.checkpoint import FORMAT, FORMAT_VERSION
from faceid.config import TrainConfig
from faceid.errors import CheckpointError, ConfigError
from faceid.events import thresholds_of
from faceid.faces import DetectorSpec, Preparation
from faceid.model import ARCH, IMAGENET_MEAN, IMAGENET_STD

log = logging.getLogger("faceid.train")  # the training log lines keep the name they always had


@dataclass
class RunState:
    epoch: int = 0  # last completed epoch
    partial_steps: int = 0  # steps of epoch `epoch + 1` trained before a stop (resume goes on from there)
    global_step: int = 0
    best_epoch: int = 0
    best_value: float = -math.inf
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunResult:
    best_epoch: int
    best_metric: str
    best_value: float
    best_checkpoint: Optional[str]
    last_checkpoint: Optional[str]
    history: list[dict[str, Any]]
    thresholds: dict[str, float]
    stopped_early: bool = False

    @classmethod
    def of(cls, state: RunState, best_metric: str, ckpt_dir: Path, stopped: bool) -> "RunResult":
        """The result of a run that ended in `state` (`stopped`: by a stop or its time limit)."""
        best = ckpt_dir / "backbone_best.pt"
        # The last record that was best is the one backbone_best.pt holds (an epoch stopped and
        # then resumed has two records: as stopped and as completed)
        best_rec: dict[str, Any] = next((h for h in reversed(state.history) if h.get("is_best")), {})
        return cls(
            best_epoch=state.best_epoch,
            best_metric=best_metric,
            best_value=state.best_value,
            best_checkpoint=str(best) if best.exists() else None,
            last_checkpoint=str(ckpt_dir / "last.pt"),
            history=state.history,
            thresholds=thresholds_of(best_rec),
            stopped_early=stopped,
        )

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def checkpoint_dict(cfg: TrainConfig, model: nn.Module, epoch: int, metrics: dict[str, Any]) -> dict:
    """The model of `epoch` and what serving needs to use it (backbone_best.pt)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": ARCH,
        "embedding_size": cfg.embedding_size,
        "img_size": cfg.img_size,
        "crop": cfg.crop,
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        # how photos become its input (faceid.faces.Preparation): the server prepares uploads so
        "faces": Preparation(cfg.align, cfg.img_size, cfg.crop, DetectorSpec()).to_json(),
        "config": cfg.to_json_dict(),
        "epoch": epoch,
        "metrics": metrics,
        "thresholds": thresholds_of(metrics),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def last_checkpoint_dict(
    cfg: TrainConfig,
    model: nn.Module,
    epoch: int,
    record: dict[str, Any],
    *,
    head: Optional[nn.Module],
    projection: Optional[nn.Module] = None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    state: RunState,
    plan: dict[str, int],
    ema: Optional[Any] = None,
) -> dict:
    """`checkpoint_dict` and what a resume needs (last.pt); `plan` is the epoch's batches
    ({"steps": steps per epoch, "world_size": processes}); `ema` the moving average of the
    weights (torch.optim.swa_utils.AveragedModel) under --ema_decay; `projection` the map of
    the embedding onto the teacher's descriptors under --distill."""
    ck = checkpoint_dict(cfg, model, epoch, record)
    # The ArcMarginProduct's own state_dict (key "weight"), as docs/CONTRACTS.md says.
    ck.update(
        head={k: v.detach().cpu() for k, v in head.state_dict().items()} if head is not None else None,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        scaler=scaler.state_dict() if scaler.is_enabled() else None,
        best={"epoch": state.best_epoch, "value": state.best_value, "metric": cfg.best_metric},
        history=state.history,
        global_step=state.global_step,
        partial_steps=state.partial_steps,
        epoch_plan=plan,
    )
    if projection is not None:
        ck["projection"] = {k: v.detach().cpu() for k, v in projection.state_dict().items()}
    if ema is not None:
        ck["ema"] = {
            "model": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()},
            "n_averaged": int(ema.n_averaged),
        }
    return ck


def check_resumable(ck: dict[str, Any], path: str, cfg: TrainConfig, num_identities: int) -> None:
    """CheckpointError or ConfigError unless this run (`cfg`, --train's `num_identities`) can go
    on from `ck`, the checkpoint at `path`."""
    if "optimizer" not in ck:
        raise CheckpointError(f"{path} is a best-model checkpoint; resume needs last.pt")
    old = {"neck": "gap", "align": "none", "distill": "none", **ck["config"]}  # checkpoints from before these options
    # the flat neck's weights are sized by the image size; gap's are not
    keys = ("train_mode", "embedding_size", "neck", "align", "distill") + (("img_size",) if cfg.neck == "flat" else ())
    for key in keys:
        if old.get(key) != getattr(cfg, key):
            raise ConfigError(
                f"cannot resume {path}: it was trained with {key}={old.get(key)!r}, this run has {getattr(cfg, key)!r}"
            )
    head = ck.get("head")
    if head is not None and head["weight"].shape[0] != num_identities:
        raise ConfigError(
            f"cannot resume {path}: it was trained on {head['weight'].shape[0]} "
            f"identities, --train now has {num_identities}"
        )
    b = ck.get("best") or {}
    if b.get("metric") and b["metric"] != cfg.best_metric:
        raise ConfigError(
            f"cannot resume {path}: its best epoch was chosen by best_metric={b['metric']!r}, "
            f"this run has {cfg.best_metric!r}; resume with --best_metric {b['metric']}, "
            "or start a new run"
        )


def restore_weights(
    ck: dict[str, Any],
    *,
    model: nn.Module,
    head: Optional[nn.Module],
    projection: Optional[nn.Module] = None,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
) -> None:
    """Load last.pt's model, head, (distillation) projection, optimizer, scheduler and scaler states."""
    model.load_state_dict(ck["model"])
    if ck.get("head") is not None:
        assert head is not None  # a last.pt with a head is resumed by a run that has one
        head.load_state_dict(ck["head"])
    if projection is not None and ck.get("projection") is not None:
        projection.load_state_dict(ck["projection"])
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    if ck.get("scaler"):
        scaler.load_state_dict(ck["scaler"])


def resumed_state(ck: dict[str, Any], path: str, plan: dict[str, int]) -> RunState:
    """Where a resume from `ck` (at `path`) goes on, with this run's epoch `plan`."""
    partial = int(ck.get("partial_steps") or 0)
    if partial and ck.get("epoch_plan") != plan:
        # Other batches now (another batch size, process count or step cap): the stopped
        # epoch's remaining steps are not known, so it counts as done, as a complete one would
        log.warning(
            "%s stopped epoch %d after %d steps of a different plan (%s, now %s); this run goes on with the next epoch",
            path,
            int(ck["epoch"]),
            partial,
            ck.get("epoch_plan"),
            plan,
        )
        partial = 0
    b = ck.get("best") or {}
    return RunState(
        epoch=int(ck["epoch"]) - (1 if partial else 0),
        partial_steps=partial,
        global_step=int(ck.get("global_step", 0)),
        best_epoch=int(b.get("epoch", 0)),
        best_value=float(b.get("value", -math.inf)),
        history=list(ck.get("history", [])),
    )
