"""Training objectives behind one interface, so one loop trains both.

An objective draws an epoch of batches (`epoch_batches`), says which images each batch needs
(`Batch.indices`), and turns the embeddings of those images into a loss (`forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from faceid.config import TrainConfig
from faceid.data import classification_batches, sample_pairs
from faceid.model import ArcMarginProduct, EmbeddingNet


@dataclass
class Batch:
    indices: np.ndarray  # [B] image indices to load, in the order the objective expects
    target: torch.Tensor  # arcface: labels [B]; pair: same/different [B/2] as float


class ArcFaceObjective(nn.Module):
    """Cross-entropy over ArcFace logits of the training identities."""

    name = "arcface"

    def __init__(self, cfg: TrainConfig, labels: np.ndarray, num_classes: int) -> None:
        super().__init__()
        self.labels = labels
        self.batch_size = cfg.batch_size
        self.balanced = cfg.balanced_sampling
        self.target_m = cfg.arcface_m
        self.margin_warmup_epochs = cfg.margin_warmup_epochs
        self.label_smoothing = cfg.label_smoothing
        self.head = ArcMarginProduct(
            cfg.embedding_size, num_classes, s=cfg.arcface_s, m=cfg.arcface_m, easy_margin=cfg.easy_margin
        )

    def epoch_batches(self, rng: np.random.Generator) -> list[Batch]:
        return [
            Batch(b, torch.from_numpy(self.labels[b]))
            for b in classification_batches(self.labels, self.batch_size, rng, balanced=self.balanced)
        ]

    def set_progress(self, epochs_done: float) -> None:
        """Margin warm-up: m rises linearly from 0 to arcface_m over margin_warmup_epochs. A
        margin from the first step pushes randomly initialised embeddings apart before any class
        structure exists, and small-data runs then stall (see docs/CLI.md, training recipe)."""
        if self.margin_warmup_epochs > 0:
            frac = min(1.0, epochs_done / self.margin_warmup_epochs)
            self.head.set_margin(self.target_m * frac)

    def forward(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """emb [B, D], target [B] -> scalar loss."""
        return F.cross_entropy(self.head(emb, target), target, label_smoothing=self.label_smoothing)


class PairObjective(nn.Module):
    """BCE on scale_logits * cosine of balanced same/different pairs drawn each epoch."""

    name = "pair"

    def __init__(self, cfg: TrainConfig, labels: np.ndarray) -> None:
        super().__init__()
        self.labels = labels
        self.pairs_per_epoch = cfg.pairs_per_epoch
        self.pairs_per_batch = cfg.batch_size  # pair mode: batch_size counts pairs (2x images)
        self.scale = cfg.scale_logits

    def epoch_batches(self, rng: np.random.Generator) -> list[Batch]:
        ia, ib, y = sample_pairs(self.labels, self.pairs_per_epoch, rng)
        order = rng.permutation(len(y))  # mix positives and negatives within batches
        ia, ib, y = ia[order], ib[order], y[order]
        k = self.pairs_per_batch
        nb = max(1, len(y) // k)
        return [
            Batch(
                np.concatenate([ia[i * k : (i + 1) * k], ib[i * k : (i + 1) * k]]),
                torch.from_numpy(y[i * k : (i + 1) * k]).float(),
            )
            for i in range(nb)
        ]

    def set_progress(self, epochs_done: float) -> None:
        pass

    def forward(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """emb [2P, D] (first P: left images, last P: right), target [P] -> scalar loss."""
        ea, eb = emb.float().chunk(2)
        cos = F.cosine_similarity(ea, eb)
        return F.binary_cross_entropy_with_logits(self.scale * cos, target)


Objective = Union[ArcFaceObjective, PairObjective]


def build_objective(cfg: TrainConfig, labels: np.ndarray, num_classes: int) -> Objective:
    builders: dict[str, Callable[[], Objective]] = {
        "arcface": lambda: ArcFaceObjective(cfg, labels, num_classes),
        "pair": lambda: PairObjective(cfg, labels),
    }
    return builders[cfg.train_mode]()


class Trainee(nn.Module):
    """Network + objective as one module, so DistributedDataParallel wraps everything that trains."""

    def __init__(self, model: EmbeddingNet, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.objective(self.model(x), target)
