"""Metrics, bootstrap intervals and paired tests, checked against scikit-learn / scipy called
here directly (plain loops over the same resample indices) and against small hand-computed
cases (docs/run.md).  The calibration of the p-values is in ``test_metrics_calibration.py``, the
statistics' building blocks (interval, p-value, McNemar, Holm) in ``test_stats.py`` and the
sentences written from these tables in ``tests/reporting/test_summary.py``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas.testing as pd_testing
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
from common.evaluation.metrics import (
    METRICS,
    MetricSpec,
    _bootstrap_metrics,
    compute_metrics,
    ensemble_predictions,
    evaluate_modes,
    metric_columns,
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
    table = evaluate_modes(y, {"no-ttr": p[None], "ttr": p[::-1][None]}, MetricSpec(c), n_boot=20)
    assert (table[["top3", "top3_lo", "top3_hi"]] == 1.0).all().all()
    assert (table.loc[1, ["top3_diff", "top3_diff_lo", "top3_diff_hi"]] == 0.0).all()


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
    fast = _bootstrap_metrics(y, p, spec, W)
    vanished = 0
    for b, row in enumerate(idx):
        ref = sklearn_metrics(y[row], p[row], c, qwk=True, makers=makers)
        vanished += len(np.unique(y[row])) < len(np.unique(y))
        for name, value in ref.items():
            assert fast[name][b] == pytest.approx(value, abs=1e-12, nan_ok=True), (name, b)
    assert vanished > 0  # some resamples lost a class: the AUC/macro label sets changed


# --------------------------------------------------------------------------- plain references


def resample_rows(n: int, n_boot: int, seed: int) -> np.ndarray:
    """The documented resampling: row indices ``[B, N]`` from ``default_rng(seed)``."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def untie(d: np.ndarray) -> np.ndarray:
    """The documented tie rule: |difference| <= 1e-12 is 0."""
    d = np.array(d, dtype=float)
    d[np.abs(d) <= 1e-12] = 0.0
    return d


def plain_interval(values) -> tuple[float, float]:
    """95% percentile interval as order statistics over the finite values: the 2.5% point of the
    empirical distribution from below and from above (numpy's ``inverted_cdf`` percentile)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return (float(np.percentile(v, 2.5, method="inverted_cdf")),
            float(-np.percentile(-v, 2.5, method="inverted_cdf")))


def plain_p(diffs) -> float:
    """Two-sided percentile-inversion p-value over the finite differences."""
    d = np.asarray(diffs, dtype=float)
    d = d[np.isfinite(d)]
    return min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)))


# --------------------------------------------------------------------------- evaluate_modes


def test_evaluate_modes_equals_a_plain_sklearn_bootstrap_of_the_ensemble():
    rng = np.random.default_rng(11)
    n, c, n_boot = 40, 4, 60
    y = rng.integers(0, c, n)
    P = {"no-ttr": make_proba(y, c, seed=12, signal=1.0, n_seeds=3),
         "ttr": make_proba(y, c, seed=13, signal=2.5, n_seeds=2)}  # S differs between the modes
    spec = MetricSpec(c, qwk=True, manufacturer_of_class=MAKERS)
    table = evaluate_modes(y, P, spec, n_boot=n_boot, seed=5).set_index("mode")

    idx = resample_rows(n, n_boot, 5)
    ref, boot = {}, {}
    for mode, proba in P.items():
        ens = proba.mean(axis=0)  # the seed ensemble, computed here
        ref[mode] = sklearn_metrics(y, ens, c, qwk=True, makers=MAKERS)
        boot[mode] = [sklearn_metrics(y[row], ens[row], c, qwk=True, makers=MAKERS) for row in idx]
        per_seed = [sklearn_metrics(y, proba[k], c, qwk=True, makers=MAKERS) for k in range(len(proba))]
        for m in spec.names():
            assert table.loc[mode, m] == pytest.approx(ref[mode][m], abs=1e-12), (mode, m)
            lo, hi = plain_interval([b[m] for b in boot[mode]])
            assert table.loc[mode, f"{m}_lo"] == pytest.approx(lo, abs=1e-12), (mode, m)
            assert table.loc[mode, f"{m}_hi"] == pytest.approx(hi, abs=1e-12), (mode, m)
            sd = np.std([d[m] for d in per_seed], ddof=1)
            assert table.loc[mode, f"{m}_seed_sd"] == pytest.approx(sd, abs=1e-12), (mode, m)
    for m in spec.names():
        d = untie([b[m] - a[m] for a, b in zip(boot["no-ttr"], boot["ttr"])])
        assert table.loc["ttr", f"{m}_diff"] == pytest.approx(ref["ttr"][m] - ref["no-ttr"][m], abs=1e-12), m
        lo, hi = plain_interval(d)
        assert table.loc["ttr", f"{m}_diff_lo"] == pytest.approx(lo, abs=1e-12), m
        assert table.loc["ttr", f"{m}_diff_hi"] == pytest.approx(hi, abs=1e-12), m
        assert table.loc["ttr", f"p_{m}"] == pytest.approx(plain_p(d), abs=1e-12), m
    assert table.loc["ttr", "top1_diff"] > 0 and table.loc["ttr", "p_top1"] < 0.05  # a real effect here
    assert (table["auc_classes"] == 4).all()


def test_auc_and_qwk_difference_intervals_equal_a_plain_sklearn_loop():
    """A rare class vanishes from some resamples: the AUC then averages over the classes left."""
    rng = np.random.default_rng(41)
    n, c, n_boot = 30, 4, 200
    y = rng.choice(c, size=n, p=[0.45, 0.3, 0.2, 0.05])
    A = make_proba(y, c, seed=42, signal=0.8)
    B = make_proba(y, c, seed=43, signal=1.2)
    table = evaluate_modes(y, {"no-ttr": A[None], "ttr": B[None]}, MetricSpec(c, qwk=True), n_boot=n_boot, seed=3)
    ttr = table.set_index("mode").loc["ttr"]

    def auc(rows, p):
        present = [k for k in range(c) if 0 < np.sum(y[rows] == k) < len(rows)]
        return np.mean([roc_auc_score(y[rows] == k, p[rows, k]) for k in present])

    def qwk(rows, p):
        return cohen_kappa_score(y[rows], p[rows].argmax(axis=1), labels=range(c), weights="quadratic")

    idx = resample_rows(n, n_boot, 3)
    assert any(len(np.unique(y[row])) < len(np.unique(y)) for row in idx)  # the AUC's class set changes
    for name, metric in (("auc_macro", auc), ("qwk", qwk)):
        diffs = untie([metric(row, B) - metric(row, A) for row in idx])
        everything = np.arange(n)
        assert ttr[f"{name}_diff"] == pytest.approx(metric(everything, B) - metric(everything, A), abs=1e-12)
        assert (ttr[f"{name}_diff_lo"], ttr[f"{name}_diff_hi"]) == pytest.approx(plain_interval(diffs), abs=1e-12)
        assert ttr[f"p_{name}"] == pytest.approx(plain_p(diffs), abs=1e-12)
        assert ttr[f"{name}_diff_lo"] < ttr[f"{name}_diff_hi"]


def test_issue_example_no_longer_disagrees_with_itself():
    """Issue 12: no-ttr seeds at 0.80/0.80/0.62 (mean 0.74, ensemble 0.78) against ttr at 0.76
    every seed (ensemble 0.75).  The seed mean put ttr ahead while McNemar and the predictions
    file (the ensemble) put no-ttr ahead; now every number is the ensemble's."""
    n, c = 100, 4
    y = np.arange(n) % c
    wrong = (y + 1) % c

    def seed_proba(correct_rows) -> np.ndarray:
        """0.7 on the true class where correct, else 0.7 on the same wrong class; 0.1 elsewhere."""
        target = wrong.copy()
        target[correct_rows] = y[correct_rows]
        p = np.full((n, c), 0.1)
        p[np.arange(n), target] = 0.7
        return p

    rows = np.arange
    no_ttr = np.stack([seed_proba(np.r_[rows(78), 78, 79]), seed_proba(np.r_[rows(78), 80, 81]),
                       seed_proba(rows(62))])
    ttr = np.stack([seed_proba(np.r_[rows(75), 75 + k]) for k in range(3)])
    seed_top1 = {m: [accuracy_score(y, p.argmax(axis=1)) for p in P] for m, P in (("no-ttr", no_ttr), ("ttr", ttr))}
    assert seed_top1 == {"no-ttr": [0.80, 0.80, 0.62], "ttr": [0.76, 0.76, 0.76]}  # the issue's numbers

    table = evaluate_modes(y, {"no-ttr": no_ttr, "ttr": ttr}, MetricSpec(c), n_boot=200).set_index("mode")
    ens_top1 = {m: accuracy_score(y, ensemble_predictions(P).argmax(axis=1))
                for m, P in (("no-ttr", no_ttr), ("ttr", ttr))}
    assert ens_top1 == {"no-ttr": 0.78, "ttr": 0.75}
    assert table.loc["no-ttr", "top1"] == 0.78 and table.loc["ttr", "top1"] == 0.75  # the ensemble, not 0.74/0.76
    assert table.loc["no-ttr", "top1_seed_sd"] == pytest.approx(np.std([0.8, 0.8, 0.62], ddof=1))
    assert table.loc["ttr", "top1_seed_sd"] == pytest.approx(0.0, abs=1e-12)
    b, c_ = table.loc["ttr", "mcnemar_b"], table.loc["ttr", "mcnemar_c"]
    assert (b, c_) == (3, 0)  # rows 75..77: no-ttr's ensemble right, ttr's wrong
    # top-1 difference, McNemar and the table tell one story
    assert table.loc["ttr", "top1_diff"] == pytest.approx((c_ - b) / n) == pytest.approx(-0.03)
    assert table.loc["ttr", "top1_diff_hi"] <= 0
    assert table.loc["ttr", "p_mcnemar_top1"] == pytest.approx(binomtest(3, 3, 0.5).pvalue)


def test_identical_modes_give_p_one_and_zero_difference():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    P = make_proba(y, 5, seed=1, n_seeds=3)
    spec = MetricSpec(5, qwk=True, manufacturer_of_class=["a", "a", "b", "c", "c"])
    # seeds in another order: the ensembles are equal up to floating-point summation order
    table = evaluate_modes(y, {"no-ttr": P, "ttr": P[::-1]}, spec, n_boot=300).set_index("mode")
    ttr = table.loc["ttr"]
    assert (ttr["mcnemar_b"], ttr["mcnemar_c"], ttr["p_mcnemar_top1"]) == (0, 0, 1.0)
    for m in spec.names():
        assert ttr[f"p_{m}"] == 1.0, m
        assert ttr[f"{m}_diff"] == ttr[f"{m}_diff_lo"] == ttr[f"{m}_diff_hi"] == 0.0, m
        assert ttr[m] == pytest.approx(table.loc["no-ttr", m], abs=1e-12)


def test_equal_metrics_of_different_predictions_are_a_tie():
    """ttr's errors are no-ttr's with the classes relabelled 0 -> 1 -> 2 -> 0 (balanced classes):
    every per-class F1 is the same, in another order, so macro F1 is equal but summed in another
    order, 1e-16 apart in floating point.  That is a tie (difference exactly 0), not a sign."""
    k, c = 7, 3
    y = np.repeat(np.arange(c), k)
    pred_a = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 1, 2, 2, 0, 2, 2, 2, 2])
    sigma = np.array([1, 2, 0])
    pred_b = sigma[pred_a.reshape(c, k)[np.argsort(sigma)]].ravel()
    f1 = [f1_score(y, p, average="macro") for p in (pred_a, pred_b)]
    assert f1[0] == pytest.approx(f1[1], abs=1e-15)
    proba = {mode: (np.eye(c)[p] * 0.7 + 0.1)[None] for mode, p in (("no-ttr", pred_a), ("ttr", pred_b))}
    ttr = evaluate_modes(y, proba, MetricSpec(c), n_boot=100).set_index("mode").loc["ttr"]
    assert ttr["f1_macro_diff"] == 0.0 and ttr["top1_diff"] == 0.0


def test_class_absent_from_the_test_split():
    rng = np.random.default_rng(5)
    y = rng.choice([0, 1, 3], size=60)  # class 2 of 4 never occurs in the test split
    P = {"no-ttr": make_proba(y, 4, seed=6, n_seeds=2), "ttr": make_proba(y, 4, seed=7, n_seeds=2)}
    table = evaluate_modes(y, P, MetricSpec(4), n_boot=100).set_index("mode")
    assert (table["auc_classes"] == 3).all()
    ens = P["ttr"].mean(axis=0)
    auc = np.mean([roc_auc_score(y == k, ens[:, k]) for k in (0, 1, 3)])
    assert table.loc["ttr", "auc_macro"] == pytest.approx(auc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "y_pred contains classes not in y_true": the point here
        assert table.loc["ttr", "balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, ens.argmax(axis=1)))
    assert table.loc["ttr", [c for c in table.columns if c != "p_mcnemar_top1"]].notna().all()


def test_undefined_auc_resamples_are_skipped_and_an_undefined_auc_is_untestable():
    y = np.array([0] * 9 + [1])  # the one positive vanishes from ~35% of resamples: no AUC there
    A, B = make_proba(y, 2, seed=0), make_proba(y, 2, seed=1, signal=0.5)
    n_boot = 200
    table = evaluate_modes(y, {"no-ttr": A[None], "ttr": B[None]}, MetricSpec(2), n_boot=n_boot, seed=0)
    ttr = table.set_index("mode").loc["ttr"]
    idx = resample_rows(10, n_boot, 0)
    usable = [row for row in idx if (y[row] == 1).any()]
    assert 0 < len(usable) < n_boot
    auc = {m: [roc_auc_score(y[row], p[row, 1]) for row in usable] for m, p in (("no-ttr", A), ("ttr", B))}
    assert (ttr["auc_macro_lo"], ttr["auc_macro_hi"]) == pytest.approx(plain_interval(auc["ttr"]), abs=1e-12)
    diffs = untie(np.subtract(auc["ttr"], auc["no-ttr"]))
    assert (ttr["auc_macro_diff_lo"], ttr["auc_macro_diff_hi"]) == pytest.approx(plain_interval(diffs), abs=1e-12)
    assert ttr["p_auc_macro"] == pytest.approx(plain_p(diffs), abs=1e-12)

    one_class = np.zeros(12, dtype=int)  # no class has a positive and a negative: AUC undefined
    P = make_proba(one_class, 3, seed=2)[None]
    table = evaluate_modes(one_class, {"no-ttr": P, "ttr": P[:, ::-1]}, MetricSpec(3), n_boot=50)
    row = table.set_index("mode").loc["ttr"]
    assert row["auc_classes"] == 0
    assert np.isnan(row[["auc_macro", "auc_macro_lo", "auc_macro_diff", "auc_macro_diff_lo", "p_auc_macro"]]
                    .to_numpy(float)).all()
    assert np.isfinite(row["p_top1"])


def test_single_seed_modes_and_dict_order():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 3, 50)
    one = make_proba(y, 3, seed=9)[None]  # a fixed saved probe: S = 1
    three = make_proba(y, 3, seed=10, n_seeds=3)
    table = evaluate_modes(y, {"ttr": three, "no-ttr (course probe)": one, "no-ttr": one}, MetricSpec(3), n_boot=50)
    assert list(table["mode"]) == ["ttr", "no-ttr (course probe)", "no-ttr"]  # the dict's order
    rows = table.set_index("mode")
    assert (rows.loc["no-ttr", [f"{m}_seed_sd" for m in METRICS]] == 0.0).all()
    assert (rows.loc["ttr", [f"{m}_seed_sd" for m in METRICS]] > 0.0).any()
    # the baseline row carries no comparison; a copy of the baseline compares as identical
    assert rows.loc["no-ttr", ["p_mcnemar_top1", "mcnemar_b", "top1_diff", "p_top1"]].isna().all()
    assert rows.loc["no-ttr (course probe)", "p_top1"] == 1.0
    assert rows.loc["ttr", "top1"] == accuracy_score(y, three.mean(axis=0).argmax(axis=1))


@pytest.mark.parametrize("spec", [MetricSpec(4), MetricSpec(4, qwk=True), MetricSpec(4, manufacturer_of_class=MAKERS)])
def test_metrics_csv_columns(spec):
    y = np.arange(40) % 4
    table = evaluate_modes(y, {"no-ttr": make_proba(y, 4, 1, n_seeds=2), "ttr": make_proba(y, 4, 2, n_seeds=2)},
                           spec, n_boot=50)
    extra = (["qwk"] if spec.qwk else []) + (["manufacturer_top1"] if spec.manufacturer_of_class else [])
    names = [*METRICS, *extra]
    expected = ["mode"] + [f"{m}{s}" for m in names for s in ("", "_lo", "_hi", "_seed_sd")] + ["auc_classes"]
    expected += ["p_mcnemar_top1", "mcnemar_b", "mcnemar_c"]
    expected += [c for m in names for c in (f"{m}_diff", f"{m}_diff_lo", f"{m}_diff_hi", f"p_{m}")]
    assert list(table.columns) == expected == metric_columns(spec)
    assert list(table["mode"]) == ["no-ttr", "ttr"]
    rates = [m for m in names if m != "qwk"]
    assert ((table[rates] >= 0) & (table[rates] <= 1)).all().all()
    for m in names:
        assert (table[f"{m}_lo"] <= table[m]).all() and (table[m] <= table[f"{m}_hi"]).all(), m


def test_seeded_and_reproducible():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 120)
    P = {"no-ttr": make_proba(y, 5, 3, n_seeds=2), "ttr": make_proba(y, 5, 4, n_seeds=2)}
    a, b = (evaluate_modes(y, P, MetricSpec(5), n_boot=200, seed=0) for _ in range(2))
    other = evaluate_modes(y, P, MetricSpec(5), n_boot=200, seed=1)
    pd_testing.assert_frame_equal(a, b)
    assert (a["f1_macro"] == other["f1_macro"]).all()  # the seed moves only the intervals and p-values
    assert (a["f1_macro_lo"] != other["f1_macro_lo"]).any()


def test_bad_inputs_to_evaluate_modes_raise_user_error():
    y = np.array([0, 1, 2, 1])
    good = np.full((2, 4, 3), 1 / 3)
    spec = MetricSpec(3)
    cases = [
        ({"no-ttr": good, "ttr": good[0]}, "ttr probabilities per seed have shape"),       # [N, C], not [S, N, C]
        ({"no-ttr": good, "ttr": good[:, :3]}, r"N=4 test rows"),                        # wrong N
        ({"no-ttr": good, "ttr": np.full((2, 4, 5), 0.2)}, r"C=3 classes"),              # wrong C
        ({"no-ttr": good, "ttr": good[:0]}, "shape"),                                     # S = 0
        ({"no-ttr": good, "ttr": np.full((2, 4, 3), np.nan)}, "NaN"),
        ({"ttr": good}, "baseline mode 'no-ttr' is missing"),
        ({}, "no modes"),
    ]
    for probas, message in cases:
        with pytest.raises(UserError, match=message):
            evaluate_modes(y, probas, spec, n_boot=10)
    with pytest.raises(UserError, match="n_boot"):
        evaluate_modes(y, {"no-ttr": good}, spec, n_boot=0)
    with pytest.raises(UserError, match="label 3 is outside"):
        evaluate_modes(np.array([0, 1, 3, 1]), {"no-ttr": good}, spec, n_boot=10)


def test_p_value_and_interval_always_agree():
    """p < 0.05 exactly when the 95% interval of the difference excludes 0, for every metric,
    over effects from none to large and resample counts whose 2.5% point is or is not a whole
    number of resamples."""
    rng = np.random.default_rng(17)
    spec = MetricSpec(4, qwk=True)
    seen = set()
    for k, (shift, n_boot) in enumerate([(s, b) for s in (0.0, 0.2, 0.4, 0.6, 1.0) for b in (37, 200, 1000)]):
        y = rng.integers(0, 4, 80)
        table = evaluate_modes(y, {"no-ttr": make_proba(y, 4, 100 + k, signal=1.0)[None],
                                   "ttr": make_proba(y, 4, 200 + k, signal=1.0 + shift)[None]},
                               spec, n_boot=n_boot, seed=k)
        ttr = table.set_index("mode").loc["ttr"]
        for m in spec.names():
            significant = ttr[f"p_{m}"] < 0.05
            excludes_zero = ttr[f"{m}_diff_lo"] > 0 or ttr[f"{m}_diff_hi"] < 0
            assert significant == excludes_zero, (m, shift, n_boot, ttr[f"p_{m}"])
            seen.add(bool(significant))
    assert seen == {True, False}  # both outcomes were exercised
