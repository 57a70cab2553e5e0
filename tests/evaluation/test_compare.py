"""``metrics.csv`` (common.evaluation.compare.evaluate_modes) against plain references: per-mode
Wilson and percentile-bootstrap intervals, Tango's interval and exact McNemar with the discordant
counts, the paired permutation test by a per-permutation loop, the refit columns, the minimum
detectable effect and the decision rule (docs/statistics.md)."""

from __future__ import annotations

import math

import numpy as np
import pandas.testing as pd_testing
import pytest
from scipy.stats import binomtest, norm
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score
from stats_reference import (
    permutation_by_loop,
    plain_interval,
    sklearn_metrics,
    tango_by_grid,
    untie,
    wilson,
)

from common.errors import UserError
from common.evaluation.compare import (
    BETTER,
    NO_DIFFERENCE,
    NOT_ROBUST,
    SCHEMA_VERSION,
    UNTESTABLE,
    WORSE,
    decide,
    evaluate_modes,
    metric_columns,
)
from common.evaluation.metrics import METRICS, MetricSpec

MAKERS = ["Medtronic", "Medtronic", "Boston", "Biotronik"]  # manufacturer per class 0..3


def make_proba(y: np.ndarray, c: int, seed: int, signal: float = 1.5, n_seeds: int | None = None) -> np.ndarray:
    """Softmax of noisy logits that favour the true class: ``[N, C]`` or ``[S, N, C]``."""
    rng = np.random.default_rng(seed)
    shape = (len(y), c) if n_seeds is None else (n_seeds, len(y), c)
    logits = rng.normal(size=shape)
    logits[..., np.arange(len(y)), y] += signal
    p = np.exp(logits)
    return p / p.sum(axis=-1, keepdims=True)


def test_evaluate_modes_equals_plain_references():
    rng = np.random.default_rng(11)
    n, c, n_boot, n_perm = 40, 4, 60, 40
    y = rng.integers(0, c, n)
    P = {"no-ttr": make_proba(y, c, seed=12, signal=1.0, n_seeds=3),
         "ttr": make_proba(y, c, seed=13, signal=2.5, n_seeds=2)}  # S differs between the modes
    spec = MetricSpec(c, qwk=True, manufacturer_of_class=MAKERS)
    table = evaluate_modes(y, P, spec, n_boot=n_boot, n_perm=n_perm, seed=5, primary="qwk").set_index("mode")
    assert (table["schema_version"] == SCHEMA_VERSION).all()

    idx = np.random.default_rng(5).integers(0, n, size=(n_boot, n))   # the documented resamples
    ens = {mode: proba.mean(axis=0) for mode, proba in P.items()}
    ref = {mode: sklearn_metrics(y, e, c, qwk=True, makers=MAKERS) for mode, e in ens.items()}
    boot = {mode: [sklearn_metrics(y[row], e[row], c, qwk=True, makers=MAKERS) for row in idx] for mode, e in ens.items()}
    for mode, proba in P.items():
        per_seed = [sklearn_metrics(y, proba[k], c, qwk=True, makers=MAKERS) for k in range(len(proba))]
        for m in spec.names():
            assert table.loc[mode, m] == pytest.approx(ref[mode][m], abs=1e-12), (mode, m)
            if m in ("top1", "manufacturer_top1"):
                lo, hi = wilson(round(ref[mode][m] * n), n)
            else:
                lo, hi = plain_interval([b[m] for b in boot[mode]])
            assert (table.loc[mode, f"{m}_lo"], table.loc[mode, f"{m}_hi"]) == pytest.approx((lo, hi), abs=1e-9)
            sd = np.std([d[m] for d in per_seed], ddof=1)
            assert table.loc[mode, f"{m}_seed_sd"] == pytest.approx(sd, abs=1e-12), (mode, m)

    ttr = table.loc["ttr"]
    makers = np.asarray(MAKERS)
    for m, right in (("top1", lambda e: e.argmax(1) == y), ("manufacturer_top1", lambda e: makers[e.argmax(1)] == makers[y])):
        base_right, mode_right = right(ens["no-ttr"]), right(ens["ttr"])
        better, worse = int(np.sum(mode_right & ~base_right)), int(np.sum(base_right & ~mode_right))
        assert (ttr[f"{m}_discordant_ttr_better"], ttr[f"{m}_discordant_ttr_worse"]) == (better, worse)
        assert ttr[f"{m}_diff"] == pytest.approx((better - worse) / n)
        assert ttr[f"p_{m}"] == pytest.approx(binomtest(better, better + worse, 0.5).pvalue if better + worse else 1.0)
        grid = tango_by_grid(better, worse, n, step=1e-3)
        assert (ttr[f"{m}_diff_lo"], ttr[f"{m}_diff_hi"]) == pytest.approx(grid, abs=1.1e-3), m
    assert ttr["p_mcnemar_top1"] == ttr["p_top1"]
    assert ttr["changed_predictions"] == int(np.sum(ens["ttr"].argmax(1) != ens["no-ttr"].argmax(1)))

    metrics = {"f1_macro": lambda t, p: f1_score(t, p.argmax(1), average="macro", zero_division=0),
               "qwk": lambda t, p: cohen_kappa_score(t, p.argmax(1), labels=range(c), weights="quadratic")}
    for m, metric in metrics.items():
        d = untie([b[m] - a[m] for a, b in zip(boot["no-ttr"], boot["ttr"])])
        assert ttr[f"{m}_diff"] == pytest.approx(ref["ttr"][m] - ref["no-ttr"][m], abs=1e-12), m
        assert (ttr[f"{m}_diff_lo"], ttr[f"{m}_diff_hi"]) == pytest.approx(plain_interval(d), abs=1e-12)
        assert ttr[f"{m}_diff_se"] == pytest.approx(np.std(d, ddof=1), abs=1e-12)
        expected = permutation_by_loop(y, ens["ttr"], ens["no-ttr"], metric, n_perm, seed=5)
        assert ttr[f"p_{m}"] == pytest.approx(expected, abs=1e-12), m
    # the primary metric's minimum detectable effect: normal approximation with the bootstrap SE
    assert ttr["mde_basis"] == "bootstrap SE"
    assert ttr["mde_qwk"] == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * ttr["qwk_diff_se"])
    assert table.loc["no-ttr", ["top1_diff", "p_top1", "mde_qwk"]].isna().all() and table.loc["no-ttr", "refits"] == 0


def test_identical_modes_and_few_test_images():
    """Nothing changed: p = 1 everywhere, top-1's Tango interval still has width (about +-0.11 at
    N = 30), the bootstrap intervals of the other metrics are [0, 0] and the row says that no
    prediction changed; per-mode accuracy 30/30 is Wilson's [0.886, 1], not [1, 1]."""
    y = np.arange(30) % 3
    P = np.eye(3)[y][None] * 0.8 + 0.2 / 3         # every image right, both modes alike
    spec = MetricSpec(3)
    table = evaluate_modes(y, {"no-ttr": P, "ttr": P.copy()}, spec, n_boot=50, n_perm=50).set_index("mode")
    ttr = table.loc["ttr"]
    assert ttr["changed_predictions"] == 0
    assert (ttr["top1_discordant_ttr_better"], ttr["top1_discordant_ttr_worse"], ttr["p_top1"]) == (0, 0, 1.0)
    z2 = norm.ppf(0.975) ** 2
    assert ttr["top1_diff_hi"] == pytest.approx(z2 / (30 + z2)) == pytest.approx(-ttr["top1_diff_lo"])  # by hand
    assert 0.11 < ttr["top1_diff_hi"] < 0.12
    assert (ttr["top1_lo"], ttr["top1_hi"]) == pytest.approx(wilson(30, 30))
    for m in spec.names():
        assert ttr[f"p_{m}"] == 1.0, m
        if m != "top1":
            assert ttr[f"{m}_diff"] == ttr[f"{m}_diff_lo"] == ttr[f"{m}_diff_hi"] == 0.0, m


def test_mde_of_top1_uses_the_probe_seeds_when_nothing_changed():
    y = np.arange(60) % 3
    right, wrong = np.eye(3)[y], np.eye(3)[(y + 1) % 3]
    seed_a = right.copy()
    seed_b = right.copy()
    seed_b[:6] = wrong[:6]                       # the two seeds disagree on 6 of 60 images' correctness
    P = np.stack([seed_a * 0.9 + 0.1 / 3, seed_b * 0.6 + 0.4 / 3])   # ensemble right everywhere
    table = evaluate_modes(y, {"no-ttr": P, "ttr": P.copy()}, MetricSpec(3), n_boot=20, n_perm=20).set_index("mode")
    ttr = table.loc["ttr"]
    assert ttr["changed_predictions"] == 0 and ttr["mde_basis"] == "probe seeds"
    assert ttr["mde_discordance"] == pytest.approx(0.1)
    # power of exact McNemar at that MDE, by simulation with scipy's binomtest: about 0.8
    rng = np.random.default_rng(0)
    mde, psi = ttr["mde_top1"], max(0.1, ttr["mde_top1"])
    hits = 0
    for _ in range(2000):
        d = rng.binomial(60, psi)
        b = rng.binomial(d, (1 + mde / psi) / 2)
        hits += d > 0 and binomtest(b, d, 0.5).pvalue < 0.05
    assert 0.76 <= hits / 2000 <= 0.86


def test_mde_of_another_metric_with_too_few_changes_assumes_independent_modes():
    y = np.arange(60) % 3
    P = make_proba(y, 3, seed=4, n_seeds=2)
    refits = {"no-ttr": make_proba(y, 3, 20, n_seeds=4), "ttr": make_proba(y, 3, 21, n_seeds=4)}
    ttr = evaluate_modes(y, {"no-ttr": P, "ttr": P.copy()}, MetricSpec(3), n_boot=80, n_perm=20,
                         primary="f1_macro", refits=refits).set_index("mode").loc["ttr"]
    assert ttr["changed_predictions"] == 0 and ttr["mde_basis"] == "independent-modes SE"
    ensemble = P.mean(axis=0)
    idx = np.random.default_rng(0).integers(0, 60, size=(80, 60))        # the documented resamples
    se = np.std([f1_score(y[row], ensemble[row].argmax(1), average="macro", zero_division=0) for row in idx], ddof=1)
    assert ttr["mde_f1_macro"] == pytest.approx((norm.ppf(0.975) + norm.ppf(0.8)) * math.sqrt(2) * se)
    # the combined refit interval takes the same test-set SE (the bootstrap one is 0 here)
    assert ttr["f1_macro_diff_se"] == 0.0
    half = norm.ppf(0.975) * math.sqrt(2 * se ** 2 + ttr["f1_macro_refit_sd"] ** 2)
    assert (ttr["f1_macro_diff_lo_refit"], ttr["f1_macro_diff_hi_refit"]) == pytest.approx((-half, half))


def test_refit_columns_equal_a_plain_computation():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 50)
    P = {"no-ttr": make_proba(y, 4, 1, n_seeds=2), "ttr": make_proba(y, 4, 2, signal=2.0, n_seeds=2)}
    refits = {"no-ttr": make_proba(y, 4, 10, n_seeds=5), "ttr": make_proba(y, 4, 11, signal=2.0, n_seeds=5)}
    ttr = evaluate_modes(y, P, MetricSpec(4), n_boot=80, n_perm=20, refits=refits).set_index("mode").loc["ttr"]
    assert ttr["refits"] == 5
    for m in ("top1", "f1_macro"):
        diffs = [sklearn_metrics(y, refits["ttr"][r], 4)[m] - sklearn_metrics(y, refits["no-ttr"][r], 4)[m]
                 for r in range(5)]
        assert ttr[f"{m}_refit_mean"] == pytest.approx(np.mean(diffs))
        assert ttr[f"{m}_refit_sd"] == pytest.approx(np.std(diffs, ddof=1))
        assert ttr[f"{m}_refit_share_better"] == pytest.approx(np.mean(np.array(diffs) > 0))
        half = norm.ppf(0.975) * math.sqrt(ttr[f"{m}_diff_se"] ** 2 + np.var(diffs, ddof=1))
        assert ttr[f"{m}_diff_lo_refit"] == pytest.approx(ttr[f"{m}_diff"] - half)
        assert ttr[f"{m}_diff_hi_refit"] == pytest.approx(ttr[f"{m}_diff"] + half)


def test_decide_follows_the_rule():
    base = {"top1_diff": 0.05, "top1_diff_lo": 0.01, "top1_diff_hi": 0.09, "p_top1": 0.01, "refits": 0}
    assert decide(base, "top1") == BETTER
    assert decide({**base, "top1_diff": -0.05, "top1_diff_lo": -0.09, "top1_diff_hi": -0.01}, "top1") == WORSE
    assert decide({**base, "p_top1": 0.2}, "top1") == NO_DIFFERENCE
    assert decide(base, "top1", p=0.06) == NO_DIFFERENCE                 # a Holm-adjusted p decides instead
    refit = {**base, "refits": 20, "top1_diff_lo_refit": -0.01, "top1_diff_hi_refit": 0.11}
    assert decide(refit, "top1") == NOT_ROBUST
    assert decide({**refit, "top1_diff_lo_refit": 0.002}, "top1") == BETTER
    assert decide({**base, "top1_diff": math.nan}, "top1") == UNTESTABLE
    assert decide({"mode": "ttr"}, "qwk") == UNTESTABLE


def test_single_seed_modes_dict_order_and_columns():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 4, 50)
    one = make_proba(y, 4, seed=9)[None]          # a fixed saved probe: S = 1
    three = make_proba(y, 4, seed=10, n_seeds=3)
    spec = MetricSpec(4, qwk=True, manufacturer_of_class=MAKERS)
    table = evaluate_modes(y, {"ttr": three, "no-ttr (course probe)": one, "no-ttr": one}, spec, n_boot=30,
                           n_perm=30, primary="manufacturer_top1")
    assert list(table["mode"]) == ["ttr", "no-ttr (course probe)", "no-ttr"]
    assert list(table.columns) == metric_columns(spec, "manufacturer_top1")
    assert {"top1_discordant_ttr_better", "manufacturer_top1_diff_lo_refit", "mde_manufacturer_top1",
            "p_mcnemar_top1", "qwk_diff_se"} <= set(table.columns)
    assert "qwk_discordant_ttr_better" not in table.columns
    rows = table.set_index("mode")
    assert rows.loc["no-ttr", [f"{m}_seed_sd" for m in METRICS]].isna().all()    # one seed: no spread
    assert (rows.loc["ttr", [f"{m}_seed_sd" for m in METRICS]] > 0).any()
    assert rows.loc["no-ttr (course probe)", "p_top1"] == 1.0
    assert rows.loc["ttr", "top1"] == accuracy_score(y, three.mean(axis=0).argmax(axis=1))
    for m in spec.names():
        assert (table[f"{m}_lo"] <= table[m] + 1e-12).all() and (table[m] <= table[f"{m}_hi"] + 1e-12).all(), m


def test_seed_spread_is_exactly_zero_when_the_seeds_agree():
    y = np.arange(40) % 4
    p = make_proba(y, 4, 1)
    # the same seed twice, columns permuted and back: metrics equal up to summation order
    table = evaluate_modes(y, {"no-ttr": np.stack([p, p]), "ttr": np.stack([p, p])}, MetricSpec(4), n_boot=10,
                           n_perm=10)
    assert (table[[f"{m}_seed_sd" for m in METRICS]] == 0.0).all().all()


def test_seeded_and_reproducible():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 120)
    P = {"no-ttr": make_proba(y, 5, 3, n_seeds=2), "ttr": make_proba(y, 5, 4, n_seeds=2)}
    a, b = (evaluate_modes(y, P, MetricSpec(5), n_boot=100, n_perm=100, seed=0) for _ in range(2))
    other = evaluate_modes(y, P, MetricSpec(5), n_boot=100, n_perm=100, seed=1)
    pd_testing.assert_frame_equal(a, b)
    assert (a["f1_macro"] == other["f1_macro"]).all()      # the seed moves only intervals and p-values
    assert (a["f1_macro_lo"] != other["f1_macro_lo"]).any()


def test_bad_inputs_to_evaluate_modes_raise_user_error():
    y = np.array([0, 1, 2, 1])
    good = np.full((2, 4, 3), 1 / 3)
    spec = MetricSpec(3)
    cases = [
        ({"no-ttr": good, "ttr": good[0]}, "ttr probabilities per seed have shape"),
        ({"no-ttr": good, "ttr": good[:, :3]}, r"N=4 test rows"),
        ({"no-ttr": good, "ttr": np.full((2, 4, 5), 0.2)}, r"C=3 classes"),
        ({"no-ttr": good, "ttr": np.full((2, 4, 3), np.nan)}, "NaN"),
        ({"ttr": good}, "baseline mode 'no-ttr' is missing"),
    ]
    for probas, message in cases:
        with pytest.raises(UserError, match=message):
            evaluate_modes(y, probas, spec, n_boot=10, n_perm=10)
    for key in ("n_boot", "n_perm"):
        with pytest.raises(UserError, match=key):
            evaluate_modes(y, {"no-ttr": good, "ttr": good}, spec, **{"n_boot": 10, "n_perm": 10, key: 0})
    with pytest.raises(UserError, match="primary metric 'qwk'"):
        evaluate_modes(y, {"no-ttr": good}, spec, n_boot=10, primary="qwk")
