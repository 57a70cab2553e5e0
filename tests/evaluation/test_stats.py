"""The statistics of a comparison (docs/statistics.md): resample multiplicities, the order-statistic
interval, the percentile-inversion p-value and its agreement with the interval, ties, McNemar's
exact test and Holm's adjustment, each against a hand computation or a plain re-implementation
(an index loop, the binomial sum, Holm's step-down procedure run at many levels).  Their use in
``metrics.csv`` is tested through ``evaluate_modes`` in ``test_metrics.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.errors import UserError
from common.evaluation.stats import (
    ALPHA,
    bootstrap_p,
    holm,
    mcnemar,
    order_rank,
    paired_difference,
    percentile_interval,
    resample_weights,
    untie,
)


def test_resample_weights_count_the_drawn_indices():
    n, n_boot, seed = 7, 50, 3
    W = resample_weights(n, n_boot, seed)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    for b in range(n_boot):
        assert W[b].tolist() == [float(list(idx[b]).count(i)) for i in range(n)]
    assert W.dtype == np.float64 and (W.sum(axis=1) == n).all()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserError, match="n_boot"):
            resample_weights(n, bad, seed)


@pytest.mark.parametrize("n, j", [(1000, 25), (200, 5), (37, 1), (40, 1), (41, 2), (1, 1)])
def test_order_rank_by_hand(n, j):
    # j = #{k >= 0 : 2k/n < 0.05}: k < 0.025 n, so 25 for 1000 (k = 0..24), 5 for 200, 1 for 37 and 40
    # (k = 0 only), 2 for 41 (k = 0, 1: 2/41 = 0.0488); never below 1 or above n
    assert order_rank(n) == j


def test_percentile_interval_is_the_j_th_order_statistic():
    values = np.arange(200, dtype=float)[::-1].copy()   # 0..199 in reverse
    values[[3, 9]] = np.nan                           # dropped: 198 finite values, j = 5 (2*4/198 < 0.05)
    finite = sorted(v for v in values if not math.isnan(v))
    assert percentile_interval(values) == (finite[4], finite[-5])
    assert all(math.isnan(x) for x in percentile_interval(np.full(4, np.nan)))


def test_bootstrap_p_by_hand():
    # 3 of 10 at or below 0, 8 at or above (the one 0 counts on both sides): p = 2 * 3 / 10
    d = np.array([-0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert bootstrap_p(d) == pytest.approx(0.6)
    assert bootstrap_p(np.zeros(5)) == 1.0                       # identical modes
    assert bootstrap_p(np.array([0.1, 0.2, np.nan])) == 0.0      # no resample reached 0
    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == 0.5   # 2 * 1 / 4
    assert bootstrap_p(np.array([0.0, 0.0, 1.0])) == 1.0         # 2 * 2 / 3, capped at 1
    assert math.isnan(bootstrap_p(np.array([np.nan])))


def test_untie_rounds_floating_point_noise_to_zero():
    assert untie(np.array([1e-16, -1e-13, 2e-12, -0.5])).tolist() == [0.0, 0.0, 2e-12, -0.5]


def test_p_below_alpha_exactly_when_the_interval_excludes_zero():
    rng = np.random.default_rng(5)
    for B in (37, 199, 200, 1000):
        for shift in np.linspace(-0.3, 0.3, 13):
            mode = np.r_[shift, rng.normal(shift, 0.1, B)]
            d, lo, hi, p = paired_difference(mode, np.zeros(B + 1))
            assert d == pytest.approx(shift)
            assert (p < ALPHA) == (lo > 0 or hi < 0), (B, shift, p, lo, hi)


def test_paired_difference_of_an_undefined_metric_is_untestable():
    mode, base = np.array([np.nan, 0.5, 0.6]), np.array([0.4, 0.5, 0.5])
    assert all(math.isnan(x) for x in paired_difference(mode, base))
    # a resample where either side is undefined is skipped
    d, lo, hi, p = paired_difference(np.array([0.6, 0.7, np.nan, 0.8]), np.array([0.5, 0.5, 0.5, np.nan]))
    assert (d, lo, hi, p) == (pytest.approx(0.1), pytest.approx(0.2), pytest.approx(0.2), 0.0)


def test_mcnemar_is_the_exact_binomial_test():
    base = np.array([1, 1, 1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    mode = np.array([0, 0, 0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    b, c, p = mcnemar(base, mode)
    assert (b, c) == (4, 1)
    # two-sided exact: 2 * P(X <= 1) for X ~ Bin(5, 1/2) = 2 * (1 + 5) / 32
    assert p == pytest.approx(2 * (math.comb(5, 0) + math.comb(5, 1)) / 2 ** 5)
    assert mcnemar(base, base) == (0, 0, 1.0)


def _holm_rejects(p: list[float], alpha: float) -> set[int]:
    """Holm's step-down procedure at level ``alpha``: walk the sorted p-values, reject while
    p_(k) <= alpha / (m - k + 1) (k from 1), stop at the first that is not."""
    valid = sorted((v, i) for i, v in enumerate(p) if not math.isnan(v))
    m, rejected = len(valid), set()
    for k, (value, i) in enumerate(valid, start=1):
        if value > alpha / (m - k + 1):
            break
        rejected.add(i)
    return rejected


def test_holm_by_hand_and_as_the_step_down_procedure():
    adjusted = holm([0.01, 0.04, float("nan"), 0.03])
    # sorted 0.01, 0.03, 0.04 with m = 3: 0.03, max(0.03, 0.06), max(0.06, 0.04) -> 0.03, 0.06, 0.06
    assert adjusted[[0, 3, 1]] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[2])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]
    assert np.isnan(holm([np.nan, np.nan])).all()
    # the adjusted p-value is the smallest level at which Holm's procedure rejects the hypothesis
    rng = np.random.default_rng(2)
    for _ in range(20):
        p = list(rng.uniform(0, 0.2, 6) ** 2)
        p[rng.integers(6)] = math.nan
        adjusted = holm(p)
        for alpha in np.linspace(0.001, 0.3, 120):
            rejected = {i for i, a in enumerate(adjusted) if a <= alpha}
            assert rejected == _holm_rejects(p, alpha), (p, alpha)
