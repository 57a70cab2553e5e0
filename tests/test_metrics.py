"""Metrics, bootstrap intervals and paired tests, checked against scikit-learn / scipy called
here directly and against small hand-computed cases (SPEC §7)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.stats import binomtest
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
from common.metrics import (
    METRICS,
    MetricSpec,
    _bootstrap_metrics,
    compute_metrics,
    ensemble_predictions,
    evaluate_mode,
    metrics_table,
    paired_tests,
)

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
    assert evaluate_mode(y, p[None], MetricSpec(c), n_boot=20)["top3_lo"] == 1.0


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
    with pytest.raises(UserError, match="same seeds"):
        paired_tests(y, np.ones((2, 3, 3)) / 3, np.ones((3, 3, 3)) / 3, MetricSpec(3))


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
    fast = _bootstrap_metrics(y, p, spec, W)
    vanished = 0
    for b, row in enumerate(idx):
        ref = sklearn_metrics(y[row], p[row], c, qwk=True, makers=makers)
        vanished += len(np.unique(y[row])) < len(np.unique(y))
        for name, value in ref.items():
            assert fast[name][b] == pytest.approx(value, abs=1e-12, nan_ok=True), (name, b)
    assert vanished > 0  # some resamples lost a class: the AUC/macro label sets changed


# --------------------------------------------------------------------------- evaluate_mode


def test_evaluate_mode_equals_an_independent_sklearn_bootstrap():
    rng = np.random.default_rng(11)
    n, c, s, n_boot = 40, 4, 2, 25
    y = rng.integers(0, c, n)
    P = make_proba(y, c, seed=12, n_seeds=s)
    spec = MetricSpec(c, qwk=True, manufacturer_of_class=MAKERS)
    res = evaluate_mode(y, P, spec, n_boot=n_boot, seed=5)

    per_seed = [sklearn_metrics(y, P[k], c, qwk=True, makers=MAKERS) for k in range(s)]
    idx = np.random.default_rng(5).integers(0, n, size=(n_boot, n))  # the documented resampling
    boot = [[sklearn_metrics(y[row], P[k][row], c, qwk=True, makers=MAKERS) for k in range(s)] for row in idx]
    for m in spec.names():
        vals = [d[m] for d in per_seed]
        assert res[m] == pytest.approx(np.mean(vals), abs=1e-12), m
        assert res[f"{m}_std"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12), m
        dist = np.array([np.mean([d[m] for d in seeds]) for seeds in boot])
        dist = dist[~np.isnan(dist)]
        lo, hi = np.percentile(dist, [2.5, 97.5])
        assert res[f"{m}_lo"] == pytest.approx(lo, abs=1e-12), m
        assert res[f"{m}_hi"] == pytest.approx(hi, abs=1e-12), m
    assert res["auc_classes"] == 4


def test_bootstrap_ci_contains_point_is_seeded_and_shrinks_with_more_data():
    c = 5
    spec = MetricSpec(c, qwk=True)

    def run(n, seed):
        y = np.random.default_rng(n).integers(0, c, n)
        return evaluate_mode(y, make_proba(y, c, seed=n + 1, n_seeds=3), spec, n_boot=300, seed=seed)

    a, b, other = run(300, 0), run(300, 0), run(300, 1)
    for m in spec.names():
        assert a[f"{m}_lo"] <= a[m] <= a[f"{m}_hi"], m
        assert a[f"{m}_lo"] < a[f"{m}_hi"], m
        assert a[f"{m}_n_boot"] == 300
    assert a == b  # same seed, same intervals
    assert (a["f1_macro_lo"], a["f1_macro_hi"]) != (other["f1_macro_lo"], other["f1_macro_hi"])
    assert a["f1_macro"] == other["f1_macro"]  # the seed moves only the intervals
    small, large = run(100, 0), run(1600, 0)
    for m in ("top1", "f1_macro", "auc_macro"):
        assert large[f"{m}_hi"] - large[f"{m}_lo"] < 0.6 * (small[f"{m}_hi"] - small[f"{m}_lo"]), m


def test_single_seed_std_is_zero_and_auc_skips_degenerate_resamples():
    y = np.array([0] * 9 + [1])  # class 1 vanishes from ~35% of resamples: then no AUC at all
    p = make_proba(y, 2, seed=0)
    res = evaluate_mode(y, p[None], MetricSpec(2), n_boot=200, seed=0)
    assert res["top1_std"] == 0.0
    idx = np.random.default_rng(0).integers(0, 10, size=(200, 10))
    expected_valid = int(np.sum((y[idx] == 1).any(axis=1)))
    assert 0 < expected_valid < 200
    assert res["auc_macro_n_boot"] == expected_valid
    assert res["top1_n_boot"] == 200
    assert np.isfinite(res["auc_macro_lo"]) and np.isfinite(res["auc_macro_hi"])


# --------------------------------------------------------------------------- paired tests


def test_mcnemar_equals_binomtest_on_discordant_pairs():
    rng = np.random.default_rng(21)
    n, c = 80, 4
    y = rng.integers(0, c, n)
    A = make_proba(y, c, seed=22, signal=0.5, n_seeds=2)
    B = make_proba(y, c, seed=23, signal=1.5, n_seeds=2)
    res = paired_tests(y, A, B, MetricSpec(c), n_boot=200)
    ok_a = A.mean(axis=0).argmax(axis=1) == y  # seed ensemble, computed here
    ok_b = B.mean(axis=0).argmax(axis=1) == y
    b, c_ = int(np.sum(ok_a & ~ok_b)), int(np.sum(~ok_a & ok_b))
    assert (res["mcnemar_b"], res["mcnemar_c"]) == (b, c_)
    assert b + c_ > 0 and b != c_
    assert res["p_mcnemar_top1"] == pytest.approx(binomtest(b, b + c_, 0.5).pvalue, rel=1e-12)
    assert np.array_equal(ensemble_predictions(A), A.mean(axis=0))


def test_identical_predictions_give_p_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 500)
    logits = rng.normal(size=(3, 500, 5))
    logits[:, np.arange(500), y] += 1.5
    P = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    # the same predictions (argmax unchanged), seeds in another order: the seed-mean F1s are
    # equal up to floating-point summation order and must count as ties
    res = paired_tests(y, P, P[::-1] * 0.9 + 0.1 / 5, MetricSpec(5), n_boot=300)
    assert res["mcnemar_b"] == res["mcnemar_c"] == 0
    assert res["p_mcnemar_top1"] == 1.0
    assert res["p_bootstrap_f1_macro"] == 1.0
    assert res["delta_f1_macro"] == res["delta_f1_macro_lo"] == res["delta_f1_macro_hi"] == 0.0


def test_paired_bootstrap_equals_an_independent_computation():
    rng = np.random.default_rng(31)
    n, c, n_boot = 50, 3, 80
    y = rng.integers(0, c, n)
    A = make_proba(y, c, seed=32, signal=0.8, n_seeds=2)
    B = make_proba(y, c, seed=33, signal=1.4, n_seeds=2)
    res = paired_tests(y, A, B, MetricSpec(c), n_boot=n_boot, seed=9)

    def f1(P, rows):
        return np.mean([f1_score(y[rows], P[k][rows].argmax(axis=1), average="macro", zero_division=0)
                        for k in range(P.shape[0])])

    idx = np.random.default_rng(9).integers(0, n, size=(n_boot, n))
    diff = np.array([f1(B, row) - f1(A, row) for row in idx])
    p = min(1.0, 2 * min(np.mean(diff <= 0), np.mean(diff >= 0)))
    assert res["p_bootstrap_f1_macro"] == pytest.approx(p, abs=1e-12)
    assert res["delta_f1_macro"] == pytest.approx(f1(B, np.arange(n)) - f1(A, np.arange(n)), abs=1e-12)
    assert res["delta_f1_macro"] > 0 and res["p_bootstrap_f1_macro"] < 0.05
    lo, hi = np.percentile(diff, [2.5, 97.5])
    assert (res["delta_f1_macro_lo"], res["delta_f1_macro_hi"]) == pytest.approx((lo, hi), abs=1e-12)


# --------------------------------------------------------------------------- table


@pytest.mark.parametrize("spec", [MetricSpec(4), MetricSpec(4, qwk=True), MetricSpec(4, manufacturer_of_class=MAKERS)])
def test_metrics_table_columns_and_rows(spec):
    y = np.arange(40) % 4
    A, B = make_proba(y, 4, 1, n_seeds=2), make_proba(y, 4, 2, n_seeds=2)
    results = {"ttr": evaluate_mode(y, B, spec, n_boot=50), "no-ttr": evaluate_mode(y, A, spec, n_boot=50)}
    tests = paired_tests(y, A, B, spec, n_boot=50)
    table = metrics_table(results, tests)
    extra = (["qwk"] if spec.qwk else []) + (["manufacturer_top1"] if spec.manufacturer_of_class else [])
    expected = ["mode"]
    for m in [*METRICS, *extra]:
        expected += [m, f"{m}_lo", f"{m}_hi", f"{m}_std"]
    expected += ["auc_classes", "p_mcnemar_top1", "p_bootstrap_f1_macro"]
    assert list(table.columns) == expected
    assert list(table["mode"]) == ["no-ttr", "ttr"]
    assert table.loc[0, "top1"] == results["no-ttr"]["top1"]
    assert table.loc[1, "f1_macro_hi"] == results["ttr"]["f1_macro_hi"]
    assert table.loc[1, "p_mcnemar_top1"] == tests["p_mcnemar_top1"]
    assert table.loc[1, "p_bootstrap_f1_macro"] == tests["p_bootstrap_f1_macro"]
    assert table[["p_mcnemar_top1", "p_bootstrap_f1_macro"]].iloc[0].isna().all()
    assert table.loc[0, "auc_classes"] == 4
