"""Evaluation: embed each image once, then score pairs (sampled balanced pairs of a folder, or a
pairs.txt protocol) with the pure functions of faceid.metrics."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from faceid.data import BatchTransform, IdentityFolder, iterate_in_batches, sample_pairs
from faceid.imagestore import ImageStore
from faceid.metrics import kfold_accuracy, verification_report

EVAL_SEED_OFFSET = 1_000_003  # evaluation pairs use their own stream, the same every epoch


def autocast_ctx(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def embed_store(
    model: nn.Module,
    store: ImageStore,
    transform: BatchTransform,
    *,
    batch_size: int,
    amp_dtype: Optional[torch.dtype],
    flip: bool = False,
    indices: Optional[np.ndarray] = None,
) -> np.ndarray:
    """Embed every image of `store` (or those at `indices`, in that order): returns float32
    [N, D], L2-normalised. With `flip`, the embedding of the mirrored image is added before
    normalising (a cheap test-time boost)."""
    was_training = model.training
    model.eval()
    out = []
    which = np.arange(len(store.folder)) if indices is None else np.asarray(indices, dtype=np.int64)
    try:
        for pos in iterate_in_batches(len(which), batch_size):
            x = transform(store.batch(which[pos]))
            with autocast_ctx(transform.device, amp_dtype):
                e = model(x).float()
                if flip:
                    e = e + model(x.flip(3)).float()
            out.append(torch.nn.functional.normalize(e, dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


def same_files(paths: list[Path], others: list[Path]) -> np.ndarray:
    """For each of `paths`, the index in `others` of the same file (the same file system entry:
    through a symbolic or hard link too), else -1. Lets evaluation embed an image once when the
    pairs file and --val name it both."""

    def key(p: Path):
        try:
            st = os.stat(p)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    where: dict[tuple[int, int], int] = {}  # (device, inode) -> index in `others`
    for i, p in enumerate(others):
        k = key(p)
        if k is not None:
            where.setdefault(k, i)
    return np.array([where.get(key(p), -1) for p in paths], dtype=np.int64)


@dataclass(frozen=True)
class EvalPairs:
    """Fixed evaluation pairs over a folder: ia [P], ib [P], y [P]."""

    ia: np.ndarray
    ib: np.ndarray
    y: np.ndarray

    @classmethod
    def sample(cls, folder: IdentityFolder, n_pairs: int, seed: int) -> "EvalPairs":
        rng = np.random.default_rng(seed + EVAL_SEED_OFFSET)
        return cls(*sample_pairs(folder.labels, n_pairs, rng))


def cosine_scores(emb: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """Row-wise cosine of unit embeddings: [P]."""
    return np.einsum("ij,ij->i", emb[ia], emb[ib]).astype(np.float64)


def score_sampled(emb: np.ndarray, pairs: EvalPairs) -> dict[str, Any]:
    return verification_report(cosine_scores(emb, pairs.ia, pairs.ib), pairs.y).as_dict()


def score_protocol(
    emb: np.ndarray, ia: np.ndarray, ib: np.ndarray, labels: np.ndarray, folds: np.ndarray
) -> dict[str, Any]:
    """pairs.txt protocol: k-fold accuracy (threshold chosen on the other folds) and AUC."""
    scores = cosine_scores(emb, ia, ib)
    rep = verification_report(scores, labels).as_dict()
    if len(np.unique(folds)) < 2:
        folds = stratified_folds(labels, 10)
    kf = kfold_accuracy(scores, labels, folds)
    return {
        **kf,
        "pairs_auc": rep["auc"],
        "pairs_tar_1e-2": rep["tar_1e-2"],
        "pairs_tar_1e-3": rep["tar_1e-3"],
        "pairs_n": int(len(labels)),
        "pairs_n_neg": rep["n_neg"],
    }


def stratified_folds(labels: np.ndarray, k: int) -> np.ndarray:
    """Fold ids 1..k [P] that give every fold the same share of positives and of negatives, in file
    order within each class (as the 10 folds of LFW pairs.txt are built)."""
    folds = np.empty(len(labels), dtype=np.int64)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        folds[idx] = 1 + (np.arange(len(idx)) * k) // max(1, len(idx))
    return folds


def protocol_folder(paths: list[Path]) -> IdentityFolder:
    """An IdentityFolder over a protocol's images (labels unused: the protocol gives them)."""
    root = Path(paths[0]).parent.parent if paths else Path(".")
    return IdentityFolder(root, list(paths), np.arange(len(paths), dtype=np.int64), [str(p) for p in paths])
