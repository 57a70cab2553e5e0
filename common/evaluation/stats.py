"""The statistics of a comparison of two modes on the same test images (docs/statistics.md).

Real runs change few predictions, so every test here is chosen to stay right when only a handful
of test images differ between the modes.  :mod:`common.evaluation.compare` applies them to the
metrics of :mod:`common.evaluation.metrics` and writes ``metrics.csv``.

Proportions of correct images (top-1, manufacturer top-1)
    * **Exact McNemar** (:func:`mcnemar_p`): with ``better`` = images only the mode gets right and
      ``worse`` = images only the baseline gets right, the two-sided exact binomial test of
      ``better`` successes in ``better + worse`` trials at probability 1/2 (1 when nothing is
      discordant).  Exact at every number of discordant pairs, so never liberal.
    * **Tango's score interval** (Tango 1998) for the paired difference ``(better - worse) / N``
      (:func:`tango_interval`): the differences ``delta`` whose score statistic, with the
      nuisance probability at its restricted maximum-likelihood value, stays within the normal
      quantile.  Its width is positive whenever ``N > 0``, also when nothing changed (about
      +-0.11 at N = 30).
    * **Wilson** interval per mode (:func:`wilson_interval`).

Other metrics (F1, AUC, QWK, ...)
    * **Paired permutation test** (approximate randomisation, :func:`swap_weights`,
      :func:`permutation_p`): per test image the two modes' predictions are swapped with
      probability 1/2; ``p = (k + 1) / (B + 1)`` with ``k`` the permutations whose |difference|
      reaches the observed one.  Never 0.
    * **Paired percentile bootstrap** interval of the difference (:func:`resample_weights`,
      :func:`bootstrap_difference`): the same resamples of the test images for both modes; the
      95% interval is the pair of order statistics ``j``-th smallest and ``j``-th largest with
      ``j = #{k >= 0 : 2k/B < 0.05}`` (:func:`order_rank`).

Beyond the fitted probes
    :func:`combined_interval` adds the between-refit variance of the difference (the probe
    procedure rerun on bootstrap resamples of the training set) to the test-set variance:
    ``d +- z sqrt(se_test^2 + sd_refit^2)`` (normal approximation).

Power
    :func:`mde_mcnemar` is the smallest difference exact McNemar detects with 80% power at a
    given discordance rate; :func:`mde_normal` the normal-approximation one, ``(z_{1-a/2} +
    z_{0.8}) se``, for the other metrics.

Multiplicity
    :func:`holm` is the Holm (1979) step-down adjustment (family-wise error rate); the reports
    say which comparisons form a family.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import binom, binomtest, norm

from common.errors import UserError

ALPHA = 0.05  # the intervals are 95%; the verdicts and the Holm markers test at 5%
POWER = 0.8   # the power a minimum detectable effect is stated at
TIE_TOL = 1e-12  # |difference| at or below this is a tie (floating-point noise)


def z_value(alpha: float = ALPHA) -> float:
    """The two-sided normal quantile ``z_{1 - alpha/2}`` (1.95996... for 5%)."""
    return float(norm.ppf(1.0 - alpha / 2.0))


# --------------------------------------------------------------------------- resamples


def _check_count(value, name: str, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name}={value!r} must be an integer >= 1 ({what})")


def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap resamples as multiplicities ``W [B, N]`` (float64): ``W[b, i]`` = how often
    test row ``i`` was drawn in resample ``b``.  Indices from ``numpy.random.default_rng(seed)``,
    ``integers(0, N, size=(B, N))``."""
    _check_count(n_boot, "n_boot", "bootstrap resamples")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def swap_weights(n: int, n_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The permutations of the paired permutation test as weights over the stacked rows
    ``[mode rows; baseline rows]`` (``2N``): ``(W_mode [P, 2N], W_base [P, 2N])``.

    In permutation ``b`` test image ``i`` is swapped with probability 1/2 (draws from
    ``numpy.random.default_rng([seed, 1])``, a stream apart from the bootstrap's): the permuted
    mode takes the baseline's row of a swapped image and the permuted baseline the mode's."""
    _check_count(n_perm, "n_perm", "permutations")
    swap = np.random.default_rng([seed, 1]).random((n_perm, n)) < 0.5
    keep = ~swap
    return (np.hstack([keep, swap]).astype(np.float64), np.hstack([swap, keep]).astype(np.float64))


def order_rank(n: int, alpha: float = ALPHA) -> int:
    """``j = #{k >= 0 : 2k/n < alpha}``: the interval's order statistic (1-based) for ``n`` values."""
    k = np.arange(n + 1)
    return int(min(n, max(1, np.count_nonzero(2.0 * k / n < alpha))))


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval ``(j-th smallest, j-th largest)`` of the finite ``values [B]``;
    ``(nan, nan)`` when none is finite."""
    v = np.sort(values[np.isfinite(values)])
    if v.size == 0:
        return math.nan, math.nan
    j = order_rank(v.size)
    return float(v[j - 1]), float(v[v.size - j])


def untie(x: np.ndarray) -> np.ndarray:
    """Differences within :data:`TIE_TOL` of 0 set to exactly 0 (equal metrics summed in another
    order differ by ~1e-16 and must count as ties, not as an arbitrary side)."""
    x = np.array(x, dtype=np.float64)
    x[np.abs(x) <= TIE_TOL] = 0.0
    return x


def sample_sd(values) -> float:
    """Sample standard deviation (ddof 1) of the finite ``values``; exactly 0 when they agree to
    within :data:`TIE_TOL` (no float noise such as 1e-16), NaN for fewer than two values."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return math.nan
    if np.ptp(v) <= TIE_TOL:
        return 0.0
    return float(np.std(v, ddof=1))


def bootstrap_difference(mode_values: np.ndarray, base_values: np.ndarray) -> tuple[float, float, float, float]:
    """``(d, lo, hi, se)`` of ``mode - baseline`` for one metric.

    ``mode_values`` and ``base_values`` are ``[1 + B]``: row 0 the metric on the full test set,
    rows 1.. on the shared resamples.  ``d`` is the full-set difference, ``(lo, hi)`` the 95%
    percentile interval and ``se`` the standard deviation of the resampled differences.  A
    resample where either side is undefined is skipped; when ``d`` is undefined, so is the rest."""
    d = untie(np.asarray(mode_values, dtype=np.float64) - np.asarray(base_values, dtype=np.float64))
    if math.isnan(d[0]):
        return (math.nan,) * 4
    lo, hi = percentile_interval(d[1:])
    se = sample_sd(d[1:])
    return float(d[0]), lo, hi, se


def permutation_p(observed: float, permuted: np.ndarray) -> float:
    """Two-sided paired-permutation p-value: ``(k + 1) / (B + 1)`` with ``k`` the finite permuted
    differences (tie-rounded) whose magnitude reaches ``|observed|`` (within :data:`TIE_TOL`).
    Never 0; 1 when the observed difference is 0; NaN when nothing is defined."""
    d = np.asarray(permuted, dtype=np.float64)
    d = d[np.isfinite(d)]
    if not math.isfinite(observed) or d.size == 0:
        return math.nan
    k = int(np.count_nonzero(np.abs(d) >= abs(observed) - TIE_TOL))
    return (k + 1) / (d.size + 1)


# --------------------------------------------------------------------------- proportions


def discordant(hit_base: np.ndarray, hit_mode: np.ndarray) -> tuple[int, int]:
    """``(better, worse)`` of paired correctness ``[N]`` bools: images only the mode gets right,
    images only the baseline gets right."""
    hit_base, hit_mode = np.asarray(hit_base, bool), np.asarray(hit_mode, bool)
    return int(np.count_nonzero(hit_mode & ~hit_base)), int(np.count_nonzero(hit_base & ~hit_mode))


def mcnemar_p(better: int, worse: int) -> float:
    """Exact McNemar: the two-sided binomial test of ``better`` in ``better + worse`` at 1/2
    (1 when there is no discordant pair)."""
    total = int(better) + int(worse)
    return float(binomtest(int(better), total, 0.5, alternative="two-sided").pvalue) if total else 1.0


def wilson_interval(successes: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Wilson's score interval of a proportion ``successes / n`` (NaN for ``n = 0``)."""
    if n <= 0:
        return math.nan, math.nan
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=1.0 - alpha, method="wilson")
    return float(ci.low), float(ci.high)


def _tango_score(delta: float, better: int, worse: int, n: int) -> float:
    """Tango's score statistic at ``delta`` (= p_better - p_worse): ``(better - worse - N delta) /
    sqrt(N (2 q + delta (1 - delta)))`` with ``q`` the restricted maximum-likelihood probability
    of a "worse" pair given ``delta`` (the root of Tango's quadratic)."""
    a = 2.0 * n
    b = -better - worse + (2.0 * n - better + worse) * delta
    c = -worse * delta * (1.0 - delta)
    q = (math.sqrt(max(b * b - 4.0 * a * c, 0.0)) - b) / (2.0 * a)
    variance = max(n * (2.0 * q + delta * (1.0 - delta)), 1e-300)
    return (better - worse - n * delta) / math.sqrt(variance)


def tango_interval(better: int, worse: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """Tango's (1998) score interval of the paired difference of proportions ``(better - worse) /
    n``: every ``delta`` in [-1, 1] whose score statistic lies within ``+-z_{1-alpha/2}``.  The
    statistic falls as ``delta`` rises, so each end is one root (Brent's method)."""
    if n <= 0:
        return math.nan, math.nan
    better, worse, n = int(better), int(worse), int(n)
    z = z_value(alpha)
    estimate = (better - worse) / n
    edge = 1e-12

    def root(target: float, lo: float, hi: float) -> float:
        return float(brentq(lambda d: _tango_score(d, better, worse, n) - target, lo, hi, xtol=1e-12))

    low_end, high_end = -1.0 + edge, 1.0 - edge
    lower = -1.0 if estimate <= low_end or _tango_score(low_end, better, worse, n) <= z else \
        root(z, low_end, estimate)
    upper = 1.0 if estimate >= high_end or _tango_score(high_end, better, worse, n) >= -z else \
        root(-z, estimate, high_end)
    return lower, upper


# --------------------------------------------------------------------------- power


def _rejection_bounds(n: int, alpha: float) -> np.ndarray:
    """Per number of discordant pairs ``D = 0..n``: the largest ``k`` with ``2 P(X <= k) < alpha``
    for ``X ~ Bin(D, 1/2)`` (exact McNemar rejects when the smaller side is at most ``k``);
    -1 where nothing rejects.  ``ppf(alpha/2)`` is the smallest ``k`` with ``P(X <= k) >=
    alpha/2``, so the bound is one below it."""
    return binom.ppf(alpha / 2.0, np.arange(n + 1), 0.5).astype(np.int64) - 1


def _mcnemar_power(n: int, discordance: float, delta: float, bounds: np.ndarray) -> float:
    """Power of exact McNemar with ``n`` pairs, each discordant with probability
    ``max(discordance, delta)``, of which a share ``(1 + delta / that) / 2`` favour the mode:
    each discordant count's rejection region (``bounds``, :func:`_rejection_bounds`) weighted
    by its probability."""
    psi = max(discordance, delta)
    if psi <= 0:
        return 0.0
    counts = np.arange(n + 1)
    favour = min(1.0, (1.0 + delta / psi) / 2.0)
    reject = np.where(bounds >= 0, binom.cdf(bounds, counts, favour)
                      + binom.sf(counts - bounds - 1, counts, favour), 0.0)
    return float(np.sum(binom.pmf(counts, n, psi) * reject))


def mde_mcnemar(n: int, discordance: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest paired difference of proportions that exact McNemar at ``alpha`` detects with
    probability ``power`` in ``n`` pairs at the discordance rate ``discordance`` (a difference
    larger than the rate raises the rate to the difference: every discordant pair favours the
    mode).  NaN when even a difference of 1 is not detected (fewer than 6 pairs)."""
    if n <= 0:
        return math.nan
    bounds = _rejection_bounds(int(n), alpha)
    if _mcnemar_power(n, discordance, 1.0, bounds) < power:
        return math.nan
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-5:
        mid = (lo + hi) / 2.0
        if _mcnemar_power(n, discordance, mid, bounds) >= power:
            hi = mid
        else:
            lo = mid
    return hi


def mde_normal(se: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Normal-approximation minimum detectable effect ``(z_{1-alpha/2} + z_power) se``."""
    return float((z_value(alpha) + norm.ppf(power)) * se) if math.isfinite(se) else math.nan


# --------------------------------------------------------------------------- refits


def combined_interval(d: float, se_test: float, refit_diffs, alpha: float = ALPHA) -> dict[str, float]:
    """The difference over probe refits and the combined interval.

    ``refit_diffs [R]``: the difference from each refit of the probe procedure on a bootstrap
    resample of the training set.  Returns ``mean``, ``sd`` (ddof 1) and ``share_better`` (share
    of refits with a positive difference) of them, and ``lo``/``hi``: ``d +- z sqrt(se_test^2 +
    sd^2)``, the test-set variance plus the between-refit variance (normal approximation)."""
    r = np.asarray(refit_diffs, dtype=np.float64)
    r = untie(r[np.isfinite(r)])
    nan = {"mean": math.nan, "sd": math.nan, "share_better": math.nan, "lo": math.nan, "hi": math.nan}
    if r.size == 0:
        return nan
    sd = sample_sd(r) if r.size > 1 else 0.0
    out = {"mean": float(r.mean()), "sd": sd, "share_better": float(np.mean(r > 0))}
    if not (math.isfinite(d) and math.isfinite(se_test)):
        return {**out, "lo": math.nan, "hi": math.nan}
    half = z_value(alpha) * math.sqrt(se_test ** 2 + sd ** 2)
    return {**out, "lo": d - half, "hi": d + half}


# --------------------------------------------------------------------------- multiplicity


def holm(p_values) -> np.ndarray:
    """Holm-adjusted p-values (Holm 1979): with the family's ``m`` p-values sorted ascending,
    ``p_holm_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.  NaN stays NaN and is not counted
    in the family."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted
