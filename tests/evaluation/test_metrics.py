"""The metrics of one probability matrix, on the full test set and on weighted resamples, checked
against scikit-learn called here directly and against small hand-computed cases
(docs/statistics.md).  The comparison of modes (``metrics.csv``) is tested in
``test_compare.py``, its calibration in ``test_calibration_tests.py``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from common.errors import UserError
from common.evaluation.metrics import MetricSpec, compute_metrics, proportion_hits, weighted_metrics

MAKERS = ["Medtronic", "Medtronic", "Boston", "Biotronik"]  # manufacturer per class 0..3


def make_proba(y: np.ndarray, c: int, seed: int, signal: float = 1.5, n_seeds: int | None = None) -> np.ndarray:
    """Softmax of noisy logits that favour the true class: ``[N, C]`` or ``[S, N, C]``."""
    rng = np.random.default_rng(seed)
    shape = (len(y), c) if n_seeds is None else (n_seeds, len(y), c)
    logits = rng.normal(size=shape)
    logits[..., np.arange(len(y)), y] += signal
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def sklearn_metrics(y: np.ndarray, p: np.ndarray, c: int, qwk: bool = False, makers=None) -> dict[str, float]:
    """Reference values straight from scikit-learn (AUC: mean of per-class binary AUCs)."""
    pred = p.argmax(axis=1)
    present = [k for k in range(c) if 0 < (y == k).sum() < len(y)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = {
            "top1": accuracy_score(y, pred),
            "top3": top_k_accuracy_score(y, p, k=3, labels=range(c)) if c > 3 else 1.0,
            "f1_macro": f1_score(y, pred, average="macro", zero_division=0),
            "precision_macro": precision_score(y, pred, average="macro", zero_division=0),
            "recall_macro": recall_score(y, pred, average="macro", zero_division=0),
            "auc_macro": np.mean([roc_auc_score(y == k, p[:, k]) for k in present]) if present else math.nan,
            "balanced_accuracy": balanced_accuracy_score(y, pred),
        }
        if qwk:
            ref["qwk"] = cohen_kappa_score(y, pred, labels=range(c), weights="quadratic")
    if makers is not None:
        m = np.asarray(makers)
        ref["manufacturer_top1"] = float(np.mean(m[pred] == m[y]))
    return ref


# --------------------------------------------------------------------------- point metrics


def test_metrics_equal_sklearn_on_a_4_class_example():
    y = np.random.default_rng(0).integers(0, 4, 60)
    p = make_proba(y, 4, seed=1, signal=1.0)
    spec = MetricSpec(4, qwk=True)
    got = compute_metrics(y, p, spec)
    assert set(got) == set(spec.names()) | {"auc_classes"}
    # all four classes present: the multiclass one-vs-rest macro AUC of sklearn applies too
    assert got["auc_macro"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert got["auc_classes"] == 4
    assert got["top3"] == pytest.approx(top_k_accuracy_score(y, p, k=3), abs=1e-12)
    assert got["qwk"] == pytest.approx(cohen_kappa_score(y, p.argmax(axis=1), weights="quadratic"), abs=1e-12)
    for name, value in sklearn_metrics(y, p, 4, qwk=True).items():
        assert got[name] == pytest.approx(value, abs=1e-12), name
    assert 0.0 < got["top1"] < got["top3"] < 1.0  # a non-trivial example


def test_macro_scores_use_classes_true_or_predicted_hand_computed():
    # classes 0..3; class 3 is never true and predicted once; class 2 is true but never predicted
    y = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 3])
    p = np.eye(4)[pred] * 0.7 + 0.075
    got = compute_metrics(y, p, MetricSpec(4))
    # per class (0, 1, 2, 3): precision 1, 2/3, 0, 0; recall 1/2, 1, 0, 0; F1 2/3, 4/5, 0, 0
    assert got["precision_macro"] == pytest.approx((1 + 2 / 3) / 4)
    assert got["recall_macro"] == pytest.approx((0.5 + 1) / 4)
    assert got["f1_macro"] == pytest.approx((2 / 3 + 4 / 5) / 4)
    assert got["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0) / 3)  # over the true classes only
    assert got["top1"] == pytest.approx(3 / 5)


def test_manufacturer_top1_hand_computed():
    spec = MetricSpec(4, manufacturer_of_class=MAKERS)
    y = np.array([0, 1, 2, 3, 0])
    pred = np.array([1, 1, 0, 3, 2])  # same maker: yes (Medtronic), yes, no, yes, no
    got = compute_metrics(y, np.eye(4)[pred], spec)
    assert got["manufacturer_top1"] == pytest.approx(3 / 5)
    assert got["top1"] == pytest.approx(2 / 5)
    assert spec.names()[-1] == "manufacturer_top1"


def test_qwk_uses_grade_distance_when_a_grade_is_missing():
    y = np.array([0, 0, 1, 2, 4, 4, 4, 2])  # grade 3 absent from truth and predictions
    pred = np.array([0, 1, 1, 2, 4, 2, 4, 0])
    got = compute_metrics(y, np.eye(5)[pred], MetricSpec(5, qwk=True))["qwk"]
    assert got == pytest.approx(cohen_kappa_score(y, pred, labels=range(5), weights="quadratic"))
    # hand computation with weights (i - j)^2 over grades 0..4
    O = np.zeros((5, 5))
    np.add.at(O, (y, pred), 1)
    E = np.outer(O.sum(1), O.sum(0)) / len(y)
    w = (np.arange(5)[:, None] - np.arange(5)[None, :]) ** 2
    assert got == pytest.approx(1 - (w * O).sum() / (w * E).sum())


def test_auc_averages_over_classes_present_in_the_test_split():
    rng = np.random.default_rng(3)
    y = rng.choice([0, 1, 3], size=50)  # class 2 absent from the test split
    p = make_proba(y, 4, seed=4)
    got = compute_metrics(y, p, MetricSpec(4))
    assert got["auc_classes"] == 3
    expected = np.mean([roc_auc_score(y == k, p[:, k]) for k in (0, 1, 3)])
    assert got["auc_macro"] == pytest.approx(expected, abs=1e-12)
    single = compute_metrics(np.zeros(10, dtype=int), make_proba(np.zeros(10, dtype=int), 4, 5), MetricSpec(4))
    assert math.isnan(single["auc_macro"]) and single["auc_classes"] == 0


@pytest.mark.parametrize("c", [2, 3])
def test_top3_with_at_most_3_classes_is_one(c):
    y = np.arange(20) % c
    p = make_proba(y, c, seed=0, signal=-2.0)  # mostly wrong at top-1
    got = compute_metrics(y, p, MetricSpec(c))
    assert got["top3"] == 1.0
    assert got["top1"] < 0.5
    W = np.vstack([np.ones(20), np.random.default_rng(0).integers(0, 3, (5, 20))]).astype(float)
    assert (weighted_metrics(y, p, MetricSpec(c), W)["top3"] == 1.0).all()


def test_bad_inputs_raise_user_error():
    y = np.array([0, 1, 2])
    with pytest.raises(UserError, match="shape"):
        compute_metrics(y, np.ones((3, 4)) / 4, MetricSpec(3))
    with pytest.raises(UserError, match="label 5 is outside"):
        compute_metrics(np.array([0, 1, 5]), np.ones((3, 3)) / 3, MetricSpec(3))
    with pytest.raises(UserError, match="NaN"):
        compute_metrics(y, np.full((3, 3), np.nan), MetricSpec(3))
    with pytest.raises(UserError, match="one manufacturer per class"):
        MetricSpec(3, manufacturer_of_class=["a", "b"])


# --------------------------------------------------------------------------- the fast bootstrap kernel


def test_vectorised_bootstrap_metrics_equal_sklearn_on_resamples():
    rng = np.random.default_rng(7)
    n, c = 24, 5
    y = rng.choice(5, size=n, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    p = np.round(make_proba(y, c, seed=8, signal=1.0), 1)  # rounded: many tied scores
    p[:3] = 0.2  # fully tied rows: argmax/top-k tie-breaking must match sklearn
    makers = ["a", "a", "b", "c", "c"]
    spec = MetricSpec(c, qwk=True, manufacturer_of_class=makers)
    idx = rng.integers(0, n, size=(30, n))
    idx = np.vstack([np.arange(n), idx])  # the identity resample = the point estimate
    W = np.stack([np.bincount(row, minlength=n) for row in idx]).astype(float)
    fast = weighted_metrics(y, p, spec, W)
    vanished = 0
    for b, row in enumerate(idx):
        ref = sklearn_metrics(y[row], p[row], c, qwk=True, makers=makers)
        vanished += len(np.unique(y[row])) < len(np.unique(y))
        for name, value in ref.items():
            assert fast[name][b] == pytest.approx(value, abs=1e-12, nan_ok=True), (name, b)
    assert vanished > 0  # some resamples lost a class: the AUC/macro label sets changed


def test_proportion_hits_by_hand():
    y = np.array([0, 1, 2, 3, 0])
    p = np.eye(4)[[0, 0, 2, 2, 1]]          # predicted 0, 0, 2, 2, 1
    hits = proportion_hits(y, p, MetricSpec(4, manufacturer_of_class=MAKERS))
    assert hits["top1"].tolist() == [True, False, True, False, False]
    # MAKERS: classes 0 and 1 share Medtronic; 2 is Boston, 3 Biotronik
    assert hits["manufacturer_top1"].tolist() == [True, True, True, False, True]
    assert set(proportion_hits(y, p, MetricSpec(4))) == {"top1"}
