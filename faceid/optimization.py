"""What training changes, and how fast: the optimizer's parameter groups (the trunk at
--backbone_lr_scale of --lr), the learning-rate schedule, and a trunk frozen for the first epochs."""

from __future__ import annotations

import math
from typing import Callable

import torch

from faceid.config import TrainConfig
from faceid.model import EmbeddingNet
from faceid.objectives import Trainee


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int, pace: Callable[[int], float] = float) -> Callable[[int], float]:
    """Per-step multiplier: linear warmup over warmup_epochs, then cosine to 0 or constant.
    `pace(step)` is how far the schedule is, in steps (at least `step`; more when a time limit
    runs ahead of the steps)."""
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    total = max(1, cfg.epochs * steps_per_epoch)

    def f(step: int) -> float:
        at = pace(step)
        if warmup and at < warmup:
            return min(1.0, (at + 1) / warmup)
        if cfg.scheduler == "constant":
            return 1.0
        t = min(1.0, (at - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * t))

    return f


def build_optimizer(cfg: TrainConfig, trainee: Trainee) -> torch.optim.Optimizer:
    """SGD (Nesterov) or AdamW over two groups: "backbone" (the trunk) and "head" (the rest)."""
    trunk = list(trainee.model.trunk.parameters())
    trunk_ids = {id(p) for p in trunk}
    rest = [p for p in trainee.parameters() if id(p) not in trunk_ids]
    groups = [
        {"params": trunk, "lr": cfg.lr * cfg.backbone_lr_scale, "name": "backbone"},
        {"params": rest, "lr": cfg.lr, "name": "head"},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def set_trunk_frozen(model: EmbeddingNet, frozen: bool) -> None:
    for p in model.trunk.parameters():
        p.requires_grad_(not frozen)


def train_mode(model: EmbeddingNet, frozen: bool) -> None:
    """Training mode, except a frozen trunk stays in eval mode so its BatchNorm statistics stay."""
    model.train()
    if frozen:
        model.trunk.eval()
