"""Training objectives behind one interface, so one loop trains both.

An objective draws an epoch of batches (`epoch_batches`), says which images each batch needs
(`Batch.indices`), and turns the embeddings of those images into a loss (`forward`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

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
    """Cross-entropy over ArcFace logits of the training identities; with a `teacher` (one
    descriptor per training image: faceid.teacher) plus `distill_weight` times the cosine distance
    between each image's descriptor (about the descriptors' mean) and a linear map of its unit
    embedding. The
    map (`projection`) trains with the head and is not part of the served model. A batch's target
    is then [B, 2]: the label and the image's index."""

    name = "arcface"

    def __init__(
        self, cfg: TrainConfig, labels: np.ndarray, num_classes: int, teacher: Optional[np.ndarray] = None
    ) -> None:
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
        self.distill_weight = cfg.distill_weight
        self.teacher: Optional[torch.Tensor] = None  # [N, T], moved to the embeddings' device on use
        self.projection: Optional[nn.Linear] = None
        if teacher is not None:
            if len(teacher) != len(labels):
                raise ValueError(f"{len(teacher)} teacher descriptors for {len(labels)} training images")
            # dlib's descriptors of all faces lie in a narrow cone (cosine about 0.85 between
            # different people): taken about their mean, they spread over the sphere and the
            # distance to them measures identity, not the cone
            t = torch.from_numpy(np.asarray(teacher, dtype=np.float32))
            self.teacher = F.normalize(t - t.mean(dim=0, keepdim=True), dim=1).contiguous()
            self.projection = nn.Linear(cfg.embedding_size, self.teacher.shape[1], bias=False)

    def epoch_batches(self, rng: np.random.Generator) -> list[Batch]:
        batches = classification_batches(self.labels, self.batch_size, rng, balanced=self.balanced)
        if self.teacher is None:
            return [Batch(b, torch.from_numpy(self.labels[b])) for b in batches]
        return [Batch(b, torch.from_numpy(np.stack([self.labels[b], b], axis=1).astype(np.int64))) for b in batches]

    def set_progress(self, epochs_done: float) -> None:
        """Margin warm-up: m rises linearly from 0 to arcface_m over margin_warmup_epochs. A
        margin from the first step pushes randomly initialised embeddings apart before any class
        structure exists, and small-data runs then stall (see docs/CLI.md, training recipe)."""
        if self.margin_warmup_epochs > 0:
            frac = min(1.0, epochs_done / self.margin_warmup_epochs)
            self.head.set_margin(self.target_m * frac)

    def forward(self, emb: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """emb [B, D], target [B] (or [B, 2] with a teacher) -> scalar loss."""
        if self.teacher is None or self.projection is None:
            return F.cross_entropy(self.head(emb, target), target, label_smoothing=self.label_smoothing)
        labels, index = target[:, 0], target[:, 1]
        loss = F.cross_entropy(self.head(emb, labels), labels, label_smoothing=self.label_smoothing)
        if self.teacher.device != emb.device:
            self.teacher = self.teacher.to(emb.device)
        mapped = self.projection(F.normalize(emb.float(), dim=1))
        gap = 1.0 - F.cosine_similarity(mapped, self.teacher[index], dim=1)
        return loss + self.distill_weight * gap.mean()


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


def build_objective(
    cfg: TrainConfig, labels: np.ndarray, num_classes: int, teacher: Optional[np.ndarray] = None
) -> Objective:
    """The objective of cfg.train_mode; `teacher` (descriptors of the training images) with
    cfg.distill (arcface only)."""
    builders: dict[str, Callable[[], Objective]] = {
        "arcface": lambda: ArcFaceObjective(cfg, labels, num_classes, teacher),
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
