"""Verification metrics in cosine similarity: pure numpy and scikit-learn, no torch.

Every function takes `scores` [N] (cosine similarity of the two embeddings of a pair, in [-1, 1])
and `labels` [N] (1 = same identity, 0 = different). The decision rule everywhere is

    match = score >= th

All thresholds come from one sweep over the sorted scores (O(N log N)), so millions of pairs are
fine. A threshold is placed halfway between two adjacent distinct scores rather than on a score,
so it does not sit on a training sample and generalises to new pairs.

`verification_report` returns one `VerificationReport`; its `as_dict()` is what the training log,
checkpoint ranking, the job API and the checkpoint `metrics` field carry (see docs/CONTRACTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, TypedDict, Union

import numpy as np
from sklearn.metrics import roc_auc_score

DEFAULT_FARS: tuple[float, ...] = (1e-2, 1e-3)

__all__ = [
    "DEFAULT_FARS",
    "RocPoints",
    "VerificationReport",
    "best_threshold",
    "far_key",
    "kfold_accuracy",
    "operating_points",
    "roc_points",
    "verification_report",
]

# A FAR threshold is resolved when at least this many false accepts define it: FAR 1e-3 needs
# 10,000 negative pairs.
MIN_FALSE_ACCEPTS = 10


def far_key(far: float) -> str:
    """The short key of a false accept rate, as used in metric names: 1e-2 -> "1e-2".

    Python's "{:.0e}" pads the exponent ("1e-02"); the contract uses the unpadded form, so
    `f"tar_{far_key(1e-3)}"` is "tar_1e-3".
    """
    far = float(far)
    if not 0.0 < far <= 1.0:
        raise ValueError(f"a false accept rate must be in (0, 1], got {far}")
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


@dataclass(frozen=True)
class VerificationReport:
    """Verification metrics of one set of scored pairs.

    acc: best accuracy over all thresholds; th: the cosine threshold reaching it (match if
    score >= th); auc: ROC-AUC; tar[far]: true accept rate at the lowest threshold whose false
    accept rate does not exceed `far`; th_far[far]: that threshold; n_pos / n_neg: pair counts.
    """

    acc: float
    th: float
    auc: float
    tar: dict[float, float] = field(default_factory=dict)
    th_far: dict[float, float] = field(default_factory=dict)
    n_pos: int = 0
    n_neg: int = 0

    def as_dict(self) -> dict[str, Union[float, int]]:
        """Flat, JSON-ready dict: acc, th, auc, tar_<far>, th_far_<far>, n_pos, n_neg."""
        out: dict[str, Union[float, int]] = {
            "acc": float(self.acc),
            "th": float(self.th),
            "auc": float(self.auc),
        }
        for far, tar in self.tar.items():
            out[f"tar_{far_key(far)}"] = float(tar)
        for far, th in self.th_far.items():
            out[f"th_far_{far_key(far)}"] = float(th)
        out["n_pos"] = int(self.n_pos)
        out["n_neg"] = int(self.n_neg)
        return out


# ----------------------------------------------------------------------------------------------
# Input checks


def _check(scores: np.ndarray, labels: np.ndarray, need_both: bool) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: scores [N] -> float64, labels [N] -> int8 of 0/1."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1 or y.ndim != 1:
        raise ValueError(f"scores and labels must be 1-D arrays, got shapes {s.shape} and {y.shape}")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} scores, {y.shape[0]} labels")
    if s.shape[0] == 0:
        raise ValueError("no pairs to score: scores and labels are empty")
    s = s.astype(np.float64, copy=False)
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(
            f"{int(bad.sum())} of {s.shape[0]} scores are NaN or infinite "
            f"(first at index {int(np.argmax(bad))}); check the embeddings for NaN"
        )
    if y.dtype != np.bool_:
        bad_y = (y != 0) & (y != 1)
        if bad_y.any():
            raise ValueError(
                f"labels must be 1 (same) or 0 (different), got {y[bad_y][0]!r} at index {int(np.argmax(bad_y))}"
            )
    y = y.astype(np.int8, copy=False)
    if need_both:
        n_pos = int(y.sum())
        if n_pos == 0:
            raise ValueError(f"no positive (same-identity) pairs among {y.shape[0]} pairs")
        if n_pos == y.shape[0]:
            raise ValueError(f"no negative (different-identity) pairs among {y.shape[0]} pairs")
    return s, y


# ----------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class _Sweep:
    """Counts at every cut of the distinct scores, highest threshold first.

    With the distinct scores u_0 > u_1 > ... > u_{m-1}, cut j (0..m) accepts exactly the pairs
    with score >= u_{j-1} (cut 0 accepts none, cut m accepts all).
    tp, fp: [m+1] accepted positives / negatives; th: [m+1] the threshold of each cut;
    valid: [m+1] False where no threshold in [-1, 1] realises the cut (cut 0 when max score >= 1).
    """

    tp: np.ndarray
    fp: np.ndarray
    th: np.ndarray
    valid: np.ndarray
    n_pos: int
    n_neg: int


def _midpoint(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """A threshold t with lo < t <= hi for lo < hi: halfway, or hi when no float lies between."""
    mid = lo + (hi - lo) / 2.0
    return np.where(mid > lo, mid, hi)


def _sort(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores [N] clipped to [-1, 1] and sorted high to low, labels [N] and the order [N].

    Float32 cosines can land a hair outside [-1, 1]; clipping keeps every cut reachable by a
    threshold in [-1, 1] and does not change `score >= th` for any such th above -1. The order
    among equal scores does not matter: a cut never splits them.
    """
    order = np.argsort(s)[::-1]
    return np.clip(s[order], -1.0, 1.0), y[order], order


def _sweep(s: np.ndarray, y: np.ndarray) -> _Sweep:
    s_sorted, y_sorted, _ = _sort(s, y)
    return _sweep_sorted(s_sorted, y_sorted)


def _sweep_sorted(s_sorted: np.ndarray, y_sorted: np.ndarray) -> _Sweep:
    """The sweep over scores already sorted high to low: s_sorted [N], y_sorted [N]."""
    # Last index of each run of equal scores: the counts there belong to one cut.
    ends = np.flatnonzero(np.diff(s_sorted) != 0.0)
    ends = np.append(ends, s_sorted.shape[0] - 1)
    tp_all = np.cumsum(y_sorted, dtype=np.int64)
    tp = np.concatenate(([0], tp_all[ends]))
    fp = np.concatenate(([0], ends + 1 - tp_all[ends]))
    distinct = s_sorted[ends]  # u_0 > u_1 > ... > u_{m-1}

    # Cut j lies between u_{j-1} (above) and u_j (below); pad with the ends of [-1, 1].
    above = np.concatenate(([1.0], distinct))
    below = np.concatenate((distinct, [-1.0]))
    th = _midpoint(below, above)
    valid = np.ones(th.shape[0], dtype=bool)
    # Cut 0 rejects everything: needs a threshold above the top score, impossible at score >= 1.
    valid[0] = distinct[0] < 1.0
    th = np.clip(th, -1.0, 1.0)
    n_pos = int(tp[-1])
    return _Sweep(tp=tp, fp=fp, th=th, valid=valid, n_pos=n_pos, n_neg=int(fp[-1]))


def _best(sw: _Sweep) -> tuple[float, float]:
    """(threshold, accuracy) of the cut with the most correct decisions; ties -> highest th."""
    correct = sw.tp + (sw.n_neg - sw.fp)
    correct = np.where(sw.valid, correct, -1)
    j = int(np.argmax(correct))
    return float(sw.th[j]), float(correct[j]) / float(sw.n_pos + sw.n_neg)


def _at_far(sw: _Sweep, far: float) -> tuple[float, float]:
    """(TAR, threshold) at the lowest threshold whose FAR does not exceed `far`.

    FAR only grows as the threshold falls, so that cut is the last one with fp <= far * n_neg.
    A hair of relative slack absorbs float error in far * n_neg (1e-3 * 3000 must allow 3).
    """
    limit = far * sw.n_neg * (1.0 + 1e-9)
    ok = (sw.fp <= limit) & sw.valid
    if not ok.any():  # only when cut 0 is invalid and the top score is a negative at 1.0
        return 0.0, 1.0
    j = int(np.flatnonzero(ok)[-1])
    return float(sw.tp[j]) / float(sw.n_pos), float(sw.th[j])


# ----------------------------------------------------------------------------------------------
# Public API


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """The cosine threshold with the best accuracy, and that accuracy.

    scores: [N] cosine similarities; labels: [N] 1 same / 0 different (one class alone is
    allowed). Returns (th, acc) with th in [-1, 1]; `scores >= th` reproduces acc exactly.
    """
    s, y = _check(scores, labels, need_both=False)
    return _best(_sweep(s, y))


def verification_report(
    scores: np.ndarray,
    labels: np.ndarray,
    fars: Iterable[float] = DEFAULT_FARS,
) -> VerificationReport:
    """Accuracy at the best threshold, ROC-AUC and TAR at each target FAR.

    scores: [N] cosine similarities; labels: [N] 1 same / 0 different, with at least one of
    each. Raises ValueError on empty, mismatched, single-class or non-finite input.
    """
    s, y = _check(scores, labels, need_both=True)
    sw = _sweep(s, y)
    th, acc = _best(sw)
    tar: dict[float, float] = {}
    th_far: dict[float, float] = {}
    for far in fars:
        far = float(far)
        far_key(far)  # validates the range
        tar[far], th_far[far] = _at_far(sw, far)
    auc = float(roc_auc_score(y, s))
    return VerificationReport(acc=acc, th=th, auc=auc, tar=tar, th_far=th_far, n_pos=sw.n_pos, n_neg=sw.n_neg)


def kfold_accuracy(
    scores: np.ndarray,
    labels: np.ndarray,
    folds: Union[np.ndarray, int] = 10,
) -> dict[str, float]:
    """Cross-validated accuracy, the LFW protocol: for each fold, pick the threshold on the other
    folds and count correct decisions on the held-out one.

    scores: [N]; labels: [N]; folds: [N] a fold id per pair (any hashable ints), or an int K to
    cut the pairs in order into K contiguous chunks (as LFW's pairs.txt is laid out).
    Returns {"pairs_acc": mean held-out accuracy, "pairs_acc_std": its population std over
    folds, "pairs_th": mean chosen threshold}.
    """
    s, y = _check(scores, labels, need_both=False)
    n = s.shape[0]
    if isinstance(folds, (int, np.integer)):
        k = int(folds)
        if not 2 <= k <= n:
            raise ValueError(f"folds must be between 2 and the number of pairs ({n}), got {k}")
        fold_ids = np.repeat(np.arange(k), [len(c) for c in np.array_split(np.arange(n), k)])
    else:
        fold_ids = np.asarray(folds)
        if fold_ids.shape != (n,):
            raise ValueError(f"folds must be an int or one fold id per pair: shape ({n},), got {fold_ids.shape}")
    ids = np.unique(fold_ids)
    if ids.shape[0] < 2:
        raise ValueError(f"k-fold accuracy needs at least 2 folds, got {ids.shape[0]}")
    # Sort once: the training pairs of each fold, taken in that order, are already sorted.
    s_sorted, y_sorted, order = _sort(s, y)
    fold_sorted = fold_ids[order]
    accs = np.empty(ids.shape[0])
    ths = np.empty(ids.shape[0])
    for i, fold in enumerate(ids):
        train = fold_sorted != fold
        th, _ = _best(_sweep_sorted(s_sorted[train], y_sorted[train]))
        held = fold_ids == fold
        accs[i] = np.mean((s[held] >= th) == (y[held] == 1))
        ths[i] = th
    return {
        "pairs_acc": float(accs.mean()),
        "pairs_acc_std": float(accs.std()),
        "pairs_th": float(ths.mean()),
    }


def operating_points(metrics: dict) -> dict[str, dict]:
    """Each calibrated threshold of an epoch's `metrics` with the evidence behind it.

    acc (and pairs_acc with a pairs file): the threshold, its accuracy and the pairs it was chosen
    on. far_<far>: the threshold, the TAR it reaches, the negative pairs behind it
    (`negatives`), how many of them it lets through (`false_accepts`, at most far x negatives),
    and `resolved`: whether at least MIN_FALSE_ACCEPTS false accepts define it. With fewer, the
    threshold rests on a handful of pairs and the true FAR on new pairs may be several times
    `far`. Counts are null for metrics recorded without them.
    """
    n_pos, n_neg = metrics.get("n_pos"), metrics.get("n_neg")
    out: dict[str, dict] = {}
    if metrics.get("th") is not None:
        out["acc"] = {
            "threshold": metrics["th"],
            "accuracy": metrics.get("acc"),
            "pairs": n_pos + n_neg if n_pos is not None and n_neg is not None else None,
        }
    for far in DEFAULT_FARS:
        key = far_key(far)
        if metrics.get(f"th_far_{key}") is None:
            continue
        out[f"far_{key}"] = {
            "threshold": metrics[f"th_far_{key}"],
            "far": far,
            "tar": metrics.get(f"tar_{key}"),
            "negatives": n_neg,
            "false_accepts": int(far * n_neg) if n_neg is not None else None,
            "resolved": n_neg * far >= MIN_FALSE_ACCEPTS if n_neg is not None else None,
        }
    if metrics.get("pairs_th") is not None:
        out["pairs_acc"] = {
            "threshold": metrics["pairs_th"],
            "accuracy": metrics.get("pairs_acc"),
            "pairs": metrics.get("pairs_n"),
        }
    return out


class RocPoints(TypedDict):
    """roc_points: the cuts, strictest first, and the pair counts behind them."""

    far: list[float]
    tar: list[float]
    threshold: list[float]
    n_pos: int
    n_neg: int


def roc_points(scores: np.ndarray, labels: np.ndarray, max_points: int = 200) -> RocPoints:
    """The ROC curve of `scores`/`labels`, thinned for plotting: at most about `max_points` cuts,
    spread evenly over log10(FAR) from one false accept to all of them and over TAR, so the curve
    stays exact where verification runs (FAR 1e-3 and below) and is drawn smoothly elsewhere. The
    cuts `verification_report` reports at DEFAULT_FARS are among the points.

    Returns {"far": [...], "tar": [...], "threshold": [...], "n_pos": P, "n_neg": N}; the points run
    from the strictest cut to the most lenient, `match = score >= threshold` at each.
    """
    s, y = _check(scores, labels, need_both=True)
    sw = _sweep(s, y)
    keep = np.flatnonzero(sw.valid)
    far = sw.fp[keep] / sw.n_neg
    tar = sw.tp[keep] / sw.n_pos
    half = max(2, max_points // 2)
    # the cut at each FAR step (the last cut with at most that FAR) and at each TAR step
    log_far = np.log10(np.maximum(far, 0.5 / sw.n_neg))
    far_grid = np.append(np.linspace(np.log10(1.0 / sw.n_neg), 0.0, half), np.log10(DEFAULT_FARS))
    far_grid = far_grid + 1e-9  # float slack: the cut at exactly FAR 1e-3 belongs to 1e-3
    by_far = np.searchsorted(log_far, far_grid, side="right") - 1
    by_tar = np.searchsorted(tar, np.linspace(0.0, 1.0, half), side="left")
    picked = np.unique(np.concatenate(([0, len(keep) - 1], by_far[by_far >= 0], np.minimum(by_tar, len(keep) - 1))))
    idx = keep[picked]
    return {
        "far": [float(v) for v in sw.fp[idx] / sw.n_neg],
        "tar": [float(v) for v in sw.tp[idx] / sw.n_pos],
        "threshold": [float(v) for v in sw.th[idx]],
        "n_pos": sw.n_pos,
        "n_neg": sw.n_neg,
    }
