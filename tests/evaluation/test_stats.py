"""The statistics of a comparison (docs/statistics.md), each against a hand computation, a published
example or an independent re-implementation: resample and permutation weights, the
order-statistic interval, ties, the permutation p-value, exact McNemar, Wilson (Newcombe 1998),
Tango's interval (published examples and a brute-force inversion), the minimum detectable effect
(by simulation), the combined refit interval and Holm (the step-down procedure at many levels, the
closed-testing definition, a published example).  Their use in ``metrics.csv`` is tested in
``test_compare.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.errors import UserError
from scipy.stats import binomtest, norm
from stats_reference import tango_by_grid, wilson

from common.evaluation.stats import (
    bootstrap_difference,
    combined_interval,
    discordant,
    holm,
    mcnemar_p,
    mde_mcnemar,
    mde_normal,
    order_rank,
    percentile_interval,
    permutation_p,
    resample_weights,
    sample_sd,
    swap_weights,
    tango_interval,
    untie,
    wilson_interval,
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


def test_untie_rounds_floating_point_noise_to_zero():
    assert untie(np.array([1e-16, -1e-13, 2e-12, -0.5])).tolist() == [0.0, 0.0, 2e-12, -0.5]


def test_sample_sd_is_exactly_zero_for_float_noise_and_undefined_for_one_value():
    assert sample_sd([0.3, 0.1 + 0.2, 0.3]) == 0.0              # 0.30000000000000004: noise, not spread
    assert sample_sd([0.2, 0.4]) == pytest.approx(math.sqrt(0.02))
    assert math.isnan(sample_sd([0.5])) and math.isnan(sample_sd([math.nan, 0.5]))


def test_bootstrap_difference_is_the_percentile_interval_and_sd_of_the_resamples():
    rng = np.random.default_rng(1)
    mode, base = rng.normal(0.1, 0.05, 201), rng.normal(0.0, 0.05, 201)
    d, lo, hi, se = bootstrap_difference(mode, base)
    diffs = np.sort(mode[1:] - base[1:])
    assert d == pytest.approx(mode[0] - base[0])
    assert (lo, hi) == (pytest.approx(diffs[4]), pytest.approx(diffs[-5]))   # j = 5 of 200
    assert se == pytest.approx(np.std(diffs, ddof=1))
    assert all(math.isnan(x) for x in bootstrap_difference(np.array([np.nan, 1.0]), np.array([0.0, 0.0])))


def test_permutation_p_counts_the_reached_magnitudes_and_is_never_zero():
    assert permutation_p(0.3, np.array([-0.4, 0.1, 0.3, -0.2, 0.05])) == pytest.approx((2 + 1) / (5 + 1))
    assert permutation_p(0.3, np.zeros(99)) == pytest.approx(1 / 100)          # none reached: 1/(B+1)
    assert permutation_p(0.0, np.array([0.0, 0.2, -0.1])) == 1.0               # no difference
    assert permutation_p(0.1, np.array([0.1 + 1e-13, np.nan])) == 1.0           # ties count; NaN skipped
    assert math.isnan(permutation_p(math.nan, np.zeros(3)))


def test_swap_weights_choose_one_row_of_each_pair():
    n, n_perm = 6, 400
    w_mode, w_base = swap_weights(n, n_perm, seed=4)
    swap = np.random.default_rng([4, 1]).random((n_perm, n)) < 0.5
    assert w_mode.shape == w_base.shape == (n_perm, 2 * n)
    np.testing.assert_array_equal(w_mode[:, n:], swap)                 # the mode takes the baseline's row
    np.testing.assert_array_equal(w_mode[:, :n] + w_mode[:, n:], 1.0)  # exactly one row of each pair
    np.testing.assert_array_equal(w_mode + w_base, 1.0)
    assert 0.45 < swap.mean() < 0.55


def test_mcnemar_is_the_exact_binomial_test():
    base = np.array([1, 1, 1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    mode = np.array([0, 0, 0, 0, 1, 1, 0, 1, 0, 1], dtype=bool)
    better, worse = discordant(base, mode)
    assert (better, worse) == (1, 4)
    # two-sided exact: 2 * P(X <= 1) for X ~ Bin(5, 1/2) = 2 * (1 + 5) / 32
    assert mcnemar_p(better, worse) == pytest.approx(2 * (math.comb(5, 0) + math.comb(5, 1)) / 2 ** 5)
    assert mcnemar_p(4, 0) == pytest.approx(0.125)          # the 4:0, where the bootstrap said 0.03
    assert mcnemar_p(0, 0) == 1.0


@pytest.mark.parametrize("k, n, expected", [(15, 148, (0.0624, 0.1605)), (0, 20, (0.0, 0.1611)),
                                            (1, 29, (0.0061, 0.1718))])
def test_wilson_matches_newcombe_1998_and_the_closed_form(k, n, expected):
    # Newcombe (1998), Statistics in Medicine 17:857, Table II, method 3 (Wilson score, no correction)
    lo, hi = wilson_interval(k, n)
    assert (round(lo, 4), round(hi, 4)) == expected
    assert (lo, hi) == pytest.approx(wilson(k, n), abs=1e-12)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


# Published 95% (one 90%) Tango intervals of paired differences p1 - p2 from 2x2 tables (a, b, c, d),
# b = only condition 1 a success, c = only condition 2: Tango (1998) examples (4, 9, 3, 16) and, at
# 90%, (43, 0, 1, 0); Agresti & Min (2005) (53, 16, 8, 9); Fagerland, Lydersen & Laake (2014) (1, 1,
# 7, 12); Tang et al. (2010) (8, 3, 1, 2); Chang et al. (2024) (7, 25, 2, 68) - as collected in the
# test suite of the R package ratesci (pairbinci, contrast RD, skew = FALSE, bcf = FALSE).
# (table, level, published interval, its decimals)
PUBLISHED_TANGO = [((4, 9, 3, 16), 0.95, (-0.027, 0.390), 3), ((43, 0, 1, 0), 0.90, (-0.096, 0.037), 3),
                   ((53, 16, 8, 9), 0.95, (-0.020, 0.207), 3), ((1, 1, 7, 12), 0.95, (-0.517, -0.026), 3),
                   ((8, 3, 1, 2), 0.95, (-0.1670, 0.4327), 4), ((7, 25, 2, 68), 0.95, (0.139, 0.321), 3)]


@pytest.mark.parametrize("table, level, expected, digits", PUBLISHED_TANGO)
def test_tango_interval_reproduces_published_examples(table, level, expected, digits):
    a, b, c, d = table
    lo, hi = tango_interval(b, c, a + b + c + d, alpha=1 - level)
    assert (round(lo, digits), round(hi, digits)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("better, worse, n", [(0, 0, 30), (0, 0, 200), (4, 0, 30), (5, 1, 200), (23, 9, 200),
                                              (0, 7, 40), (30, 0, 30)])
def test_tango_interval_equals_a_brute_force_inversion(better, worse, n):
    """Against the score statistic inverted on a grid of step 1e-3, with the nuisance probability
    maximised numerically (not Tango's closed-form root)."""
    lo, hi = tango_interval(better, worse, n)
    grid_lo, grid_hi = tango_by_grid(better, worse, n, step=1e-3)
    assert lo == pytest.approx(grid_lo, abs=1.1e-3) and hi == pytest.approx(grid_hi, abs=1.1e-3)
    assert lo <= (better - worse) / n <= hi
    assert hi - lo > 0                                   # positive width, also when nothing changed


def test_tango_interval_when_nothing_changed_by_hand():
    # with no discordant pair the statistic is sqrt(N d / (1 - d)): the ends are +-z^2 / (N + z^2)
    z2 = norm.ppf(0.975) ** 2
    lo, hi = tango_interval(0, 0, 30)
    assert hi == pytest.approx(z2 / (30 + z2)) and lo == pytest.approx(-hi)
    assert 0.11 < hi < 0.12


def test_mde_mcnemar_by_simulation():
    """At the reported MDE exact McNemar (scipy's binomtest) rejects in about 80% of simulated
    test sets; 20% below it clearly less often."""
    rng = np.random.default_rng(5)
    n, psi = 200, 0.25
    mde = mde_mcnemar(n, psi)

    def power(delta: float, sims: int = 3000) -> float:
        rate = max(psi, delta)
        d = rng.binomial(n, rate, sims)
        b = rng.binomial(d, (1 + delta / rate) / 2)
        return float(np.mean([binomtest(int(bb), int(dd), 0.5).pvalue < 0.05 if dd else False
                              for bb, dd in zip(b, d)]))

    assert 0.77 <= power(mde) <= 0.83                         # Monte Carlo SE 0.007
    assert power(0.8 * mde) < 0.7
    assert math.isnan(mde_mcnemar(5, 0.5))                     # 5 pairs: 5:0 gives p = 0.0625
    assert 0 < mde_mcnemar(30, 0.0) < 1                        # defined with no discordance


def test_mde_normal_and_combined_interval_by_hand():
    z = norm.ppf(0.975)
    assert mde_normal(0.01) == pytest.approx((z + norm.ppf(0.8)) * 0.01)
    out = combined_interval(0.05, 0.02, [0.01, 0.03, 0.05, -0.01])
    sd = np.std([0.01, 0.03, 0.05, -0.01], ddof=1)
    assert out["mean"] == pytest.approx(0.02) and out["sd"] == pytest.approx(sd)
    assert out["share_better"] == 0.75
    assert (out["lo"], out["hi"]) == pytest.approx((0.05 - z * math.hypot(0.02, sd), 0.05 + z * math.hypot(0.02, sd)))
    assert math.isnan(combined_interval(0.05, 0.02, [])["lo"])


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


def _holm_by_closed_testing(p: list[float]) -> list[float]:
    """Holm as the closed testing procedure with Bonferroni local tests (Marcus, Peritz & Gabriel
    1976; Holm 1979): the adjusted p of H_i is the largest, over every intersection hypothesis
    H_J with i in J, of min(1, |J| min_{j in J} p_j).  Brute force over all subsets."""
    from itertools import combinations

    m = len(p)
    adjusted = []
    for i in range(m):
        worst = 0.0
        for size in range(1, m + 1):
            for subset in combinations(range(m), size):
                if i in subset:
                    worst = max(worst, min(1.0, size * min(p[j] for j in subset)))
        adjusted.append(worst)
    return adjusted


def test_holm_equals_closed_testing_and_a_published_example():
    rng = np.random.default_rng(9)
    for m in (1, 2, 3, 5, 7):
        for _ in range(10):
            p = list(rng.uniform(0, 0.1, m) ** 1.5)
            assert holm(p) == pytest.approx(_holm_by_closed_testing(p), abs=1e-15)
    # The worked example of the Holm-Bonferroni article (Wikipedia): p1..p4 = 0.01, 0.04, 0.03,
    # 0.005 at alpha 0.05 rejects H4 and H1 only
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    assert [bool(a < 0.05) for a in adjusted] == [True, False, False, True]
    assert adjusted.tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])

