"""faceid.metrics: hand-computed cases, agreement with scikit-learn, k-fold protocol, errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from faceid.metrics import (
    VerificationReport,
    best_threshold,
    far_key,
    kfold_accuracy,
    verification_report,
)


def _random_pairs(n: int, seed: int, decimals: int | None = None):
    """Scores [n] of overlapping classes (optionally rounded to create ties), labels [n]."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)
    s = np.where(y == 1, rng.normal(0.5, 0.2, n), rng.normal(0.1, 0.2, n))
    s = np.clip(s, -1.0, 1.0)
    if decimals is not None:
        s = np.round(s, decimals)
    return s, y


def _brute_best_acc(s, y):
    """The best accuracy over every possible cut, by trying each score as a `>=` threshold."""
    cands = np.concatenate((np.unique(s), [np.inf]))
    return max(np.mean((s >= t) == (y == 1)) for t in cands)


# ----------------------------------------------------------------------------------------------
# far_key and the dict


@pytest.mark.parametrize("far, key", [(1e-2, "1e-2"), (1e-3, "1e-3"), (1e-4, "1e-4"), (0.5, "5e-1"), (1.0, "1e0")])
def test_far_key(far, key):
    assert far_key(far) == key


@pytest.mark.parametrize("far", [0.0, -0.1, 1.5])
def test_far_key_rejects_out_of_range(far):
    with pytest.raises(ValueError, match="false accept rate"):
        far_key(far)


def test_as_dict_keys_and_plain_types():
    s, y = _random_pairs(2000, seed=0)
    d = verification_report(np.float32(s), y).as_dict()
    assert list(d) == [
        "acc",
        "th",
        "auc",
        "tar_1e-2",
        "tar_1e-3",
        "th_far_1e-2",
        "th_far_1e-3",
        "n_pos",
        "n_neg",
    ]
    for k in ("n_pos", "n_neg"):
        assert type(d[k]) is int
    for k in set(d) - {"n_pos", "n_neg"}:
        assert type(d[k]) is float
    assert json.loads(json.dumps(d)) == d
    assert d["n_pos"] + d["n_neg"] == 2000


def test_report_is_frozen():
    r = verification_report(np.array([0.9, 0.1]), np.array([1, 0]))
    assert isinstance(r, VerificationReport)
    with pytest.raises(AttributeError):  # a frozen dataclass
        r.acc = 0.0  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# Hand-computed cases


def test_hand_computed_roc():
    # Sorted: 0.9 P, 0.8 P, 0.7 N, 0.4 P, 0.3 N, 0.2 N, 0.1 N  (3 positives, 4 negatives).
    # Accepting the top 2 or top 4 both give 6/7 correct; ties go to the higher threshold,
    # halfway between 0.7 and 0.8. FAR 1e-2 of 4 negatives allows 0 false accepts: the lowest
    # such cut is also after 0.8 -> TAR 2/3. FAR 0.25 allows 1 -> after 0.4 (th 0.35), TAR 1.
    # FAR 0.5 allows 2 -> after 0.3 (th 0.25). AUC: 4 + 4 + 3 of 12 ordered pairs = 11/12.
    s = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
    y = np.array([1, 1, 1, 0, 0, 0, 0])
    r = verification_report(s, y, fars=(1e-2, 0.25, 0.5))
    assert r.acc == pytest.approx(6 / 7)
    assert r.th == pytest.approx(0.75)
    assert r.auc == pytest.approx(11 / 12)
    assert r.tar[1e-2] == pytest.approx(2 / 3)
    assert r.th_far[1e-2] == pytest.approx(0.75)
    assert r.tar[0.25] == pytest.approx(1.0)
    assert r.th_far[0.25] == pytest.approx(0.35)
    assert r.tar[0.5] == pytest.approx(1.0)
    assert r.th_far[0.5] == pytest.approx(0.25)
    assert (r.n_pos, r.n_neg) == (3, 4)
    assert best_threshold(s, y) == (r.th, r.acc)


def test_far_exactly_at_target_is_allowed():
    # 1000 negatives, FAR 1e-3 allows exactly one false accept (1e-3 * 1000 is not exactly 1.0
    # in floating point arithmetic everywhere; the limit must still admit it).
    neg = np.linspace(-0.5, 0.5, 1000)
    pos = np.array([0.45, 0.7, 0.8, 0.9])  # 0.45 sits below the top negative 0.5
    s = np.concatenate((pos, neg))
    y = np.concatenate((np.ones(4, int), np.zeros(1000, int)))
    r = verification_report(s, y, fars=(1e-3,))
    # One false accept (0.5) is allowed; the next cut would add a second negative (0.499).
    # Between 0.5 and 0.499 there is no positive, so TAR = 3/4 and th sits below 0.5.
    assert r.tar[1e-3] == pytest.approx(3 / 4)
    assert 0.4990 < r.th_far[1e-3] < 0.5
    fa = np.sum((s >= r.th_far[1e-3]) & (y == 0))
    assert fa == 1


def test_perfect_separation():
    s = np.array([0.6, 0.9, 0.75, -0.2, 0.1, 0.05])
    y = np.array([1, 1, 1, 0, 0, 0])
    th, acc = best_threshold(s, y)
    assert acc == 1.0
    assert 0.1 < th < 0.6
    assert th == pytest.approx(0.35)
    r = verification_report(s, y)
    assert r.acc == 1.0 and r.auc == 1.0
    assert r.tar[1e-2] == 1.0 and r.tar[1e-3] == 1.0


def test_threshold_is_applied_with_greater_equal():
    # Two adjacent floats: no value lies strictly between them, so the threshold must be the
    # positive's own score, and `score >= th` must accept it.
    lo = 0.5
    hi = np.nextafter(lo, 1.0)
    s = np.array([hi, lo])
    y = np.array([1, 0])
    th, acc = best_threshold(s, y)
    assert acc == 1.0
    assert th == hi
    assert np.array_equal(s >= th, y == 1)


def test_all_positive_cut_uses_minus_one():
    # Every pair is the same person: accepting all is best, th must accept the lowest (-1).
    s = np.array([-1.0, 0.3, 0.9])
    th, acc = best_threshold(s, np.array([1, 1, 1]))
    assert acc == 1.0 and th == -1.0


def test_thresholds_stay_in_range_at_the_bounds():
    # Float32 cosines slightly above 1 and negatives at exactly 1.
    s = np.array([1.0000001, 1.0, 1.0, -1.0, -1.0000001], dtype=np.float64)
    y = np.array([1, 0, 1, 0, 0])
    r = verification_report(s, y)
    for th in [r.th, *r.th_far.values()]:
        assert -1.0 <= th <= 1.0
    assert r.acc == pytest.approx(np.mean((s >= r.th) == (y == 1)))


# ----------------------------------------------------------------------------------------------
# Agreement with scikit-learn and brute force on random data


@pytest.mark.parametrize("decimals", [None, 2])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_sklearn_roc(seed, decimals):
    s, y = _random_pairs(4000, seed=seed, decimals=decimals)
    r = verification_report(s, y, fars=(1e-1, 1e-2, 1e-3))
    assert r.auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)
    for far in (1e-1, 1e-2, 1e-3):
        assert r.tar[far] == pytest.approx(tpr[fpr <= far].max(), abs=1e-12)
        # The reported threshold reproduces that TAR and never exceeds the FAR.
        th = r.th_far[far]
        acc_pos = np.mean(s[y == 1] >= th)
        far_at_th = np.mean(s[y == 0] >= th)
        assert acc_pos == pytest.approx(r.tar[far], abs=1e-12)
        assert far_at_th <= far + 1e-12
    # Accuracy: the best over all cuts, reproduced exactly by the chosen threshold.
    assert r.acc == pytest.approx(_brute_best_acc(s, y), abs=1e-12)
    assert r.acc == pytest.approx(np.mean((s >= r.th) == (y == 1)), abs=1e-12)
    assert -1.0 <= r.th <= 1.0


def test_labels_may_be_bool_or_float():
    s, y = _random_pairs(500, seed=4)
    a = verification_report(s, y).as_dict()
    assert verification_report(s, y.astype(bool)).as_dict() == a
    assert verification_report(s, y.astype(np.float32)).as_dict() == a


def test_large_input_is_fast():
    s, y = _random_pairs(1_000_000, seed=5)
    t0 = time.perf_counter()
    r = verification_report(s.astype(np.float32), y)
    k = kfold_accuracy(s, y, folds=10)
    elapsed = time.perf_counter() - t0
    assert 0.5 < r.acc < 1.0 and 0.5 < k["pairs_acc"] < 1.0
    assert elapsed < 5.0, f"1M pairs took {elapsed:.2f}s"


# ----------------------------------------------------------------------------------------------
# k-fold


def test_kfold_reasoned_case():
    # Fold 1: pos 0.9, neg 0.1. Fold 2: pos 0.6, neg 0.5.
    # Held-out fold 1: th from fold 2 = 0.55 -> both right (acc 1).
    # Held-out fold 2: th from fold 1 = 0.5 -> 0.6 accepted, 0.5 >= 0.5 also accepted (acc 0.5).
    s = np.array([0.9, 0.1, 0.6, 0.5])
    y = np.array([1, 0, 1, 0])
    by_ids = kfold_accuracy(s, y, folds=np.array([1, 1, 2, 2]))
    assert by_ids["pairs_acc"] == pytest.approx(0.75)
    assert by_ids["pairs_acc_std"] == pytest.approx(0.25)
    assert by_ids["pairs_th"] == pytest.approx((0.55 + 0.5) / 2)
    # An int splits in order into contiguous chunks: the same folds here.
    assert kfold_accuracy(s, y, folds=2) == by_ids
    assert set(by_ids) == {"pairs_acc", "pairs_acc_std", "pairs_th"}


def test_kfold_perfect_separation():
    rng = np.random.default_rng(6)
    y = np.tile([1, 0], 300)
    s = np.where(y == 1, rng.uniform(0.5, 1.0, 600), rng.uniform(-1.0, 0.3, 600))
    k = kfold_accuracy(s, y, folds=10)
    assert k["pairs_acc"] == 1.0 and k["pairs_acc_std"] == 0.0
    assert 0.3 <= k["pairs_th"] <= 0.5


def test_kfold_matches_loop_with_fold_ids():
    s, y = _random_pairs(3000, seed=7, decimals=2)
    folds = np.random.default_rng(8).integers(1, 6, size=3000)
    got = kfold_accuracy(s, y, folds=folds)
    accs, ths = [], []
    for f in range(1, 6):
        th, _ = best_threshold(s[folds != f], y[folds != f])
        accs.append(np.mean((s[folds == f] >= th) == (y[folds == f] == 1)))
        ths.append(th)
    assert got["pairs_acc"] == pytest.approx(np.mean(accs))
    assert got["pairs_acc_std"] == pytest.approx(np.std(accs))
    assert got["pairs_th"] == pytest.approx(np.mean(ths))


def test_kfold_uneven_int_split():
    s, y = _random_pairs(103, seed=9)
    k = kfold_accuracy(s, y, folds=10)
    assert 0.0 <= k["pairs_acc"] <= 1.0


@pytest.mark.parametrize("folds", [1, 0, 1000])
def test_kfold_bad_int_folds(folds):
    s, y = _random_pairs(100, seed=10)
    with pytest.raises(ValueError, match="folds"):
        kfold_accuracy(s, y, folds=folds)


def test_kfold_bad_fold_array():
    s, y = _random_pairs(100, seed=11)
    with pytest.raises(ValueError, match="one fold id per pair"):
        kfold_accuracy(s, y, folds=np.ones(99, int))
    with pytest.raises(ValueError, match="at least 2 folds"):
        kfold_accuracy(s, y, folds=np.ones(100, int))


# ----------------------------------------------------------------------------------------------
# Input errors


def test_error_no_positives():
    with pytest.raises(ValueError, match="no positive"):
        verification_report(np.array([0.1, 0.2]), np.array([0, 0]))


def test_error_no_negatives():
    with pytest.raises(ValueError, match="no negative"):
        verification_report(np.array([0.1, 0.2]), np.array([1, 1]))


def test_error_length_mismatch():
    with pytest.raises(ValueError, match="differ in length: 3 scores, 2 labels"):
        verification_report(np.array([0.1, 0.2, 0.3]), np.array([1, 0]))
    with pytest.raises(ValueError, match="differ in length"):
        best_threshold(np.array([0.1, 0.2, 0.3]), np.array([1, 0]))


def test_error_nan():
    with pytest.raises(ValueError, match="NaN"):
        verification_report(np.array([0.1, np.nan, 0.3]), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        kfold_accuracy(np.array([0.1, np.nan, 0.3, 0.4]), np.array([1, 0, 1, 0]), folds=2)


def test_error_bad_labels_and_empty():
    with pytest.raises(ValueError, match="labels must be 1"):
        verification_report(np.array([0.1, 0.2]), np.array([1, 2]))
    with pytest.raises(ValueError, match="empty"):
        verification_report(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="1-D"):
        verification_report(np.zeros((2, 2)), np.zeros((2, 2)))


def test_operating_points_carry_the_negatives_behind_each_far_threshold():
    from faceid.metrics import operating_points

    s, y = _random_pairs(20_000, seed=3)
    metrics = verification_report(s, y).as_dict()
    points = operating_points(metrics)
    n_neg = int((y == 0).sum())
    assert points["far_1e-3"]["negatives"] == n_neg and points["far_1e-3"]["threshold"] == metrics["th_far_1e-3"]
    assert points["far_1e-3"]["false_accepts"] == int(n_neg * 1e-3)
    # 20,000 pairs with 30 % positives: 14,000 negatives resolve FAR 1e-3 (14 false accepts)
    assert points["far_1e-3"]["resolved"] and points["far_1e-2"]["resolved"]
    few = operating_points(verification_report(s[:3000], y[:3000]).as_dict())
    assert not few["far_1e-3"]["resolved"] and few["far_1e-2"]["resolved"]
    assert points["acc"]["pairs"] == 20_000 and "pairs_acc" not in points
    # metrics recorded before the counts existed: thresholds without evidence, said so
    old = {k: v for k, v in metrics.items() if k not in ("n_pos", "n_neg")}
    assert operating_points(old)["far_1e-3"]["negatives"] is None


def test_roc_points_are_the_curve_thinned_exactly_where_verification_runs():
    from faceid.metrics import roc_points

    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(5000), np.zeros(20000)]
    scores = np.r_[rng.normal(0.45, 0.2, 5000), rng.normal(0.0, 0.15, 20000)].clip(-0.99, 0.99)
    roc = roc_points(scores, labels, max_points=100)
    far, tar, th = (np.array(roc[k]) for k in ("far", "tar", "threshold"))
    assert (roc["n_pos"], roc["n_neg"]) == (5000, 20000)
    assert 20 < len(far) <= 102 and len(far) == len(tar) == len(th)
    assert (np.diff(far) >= 0).all() and (np.diff(tar) >= 0).all() and (np.diff(th) <= 0).all()
    assert (far[0], tar[0]) == (0.0, 0.0) and (far[-1], tar[-1]) == (1.0, 1.0)
    # each point is a real cut: its threshold gives exactly its FAR and TAR
    for f, t, h in zip(far, tar, th):
        assert f == np.mean(scores[labels == 0] >= h) and t == np.mean(scores[labels == 1] >= h)
    # the report's TAR at FAR 1e-3 and 1e-2 is a point of the thinned curve
    rep = verification_report(scores, labels)
    for target in (1e-3, 1e-2):
        assert tar[far <= target].max() == pytest.approx(rep.tar[target])
