"""The statistics of a comparison: bootstrap resamples, percentile intervals, the paired tests of
two modes on the same test images, and the Holm adjustment over many comparisons (docs/statistics.md).

:func:`common.evaluation.metrics.evaluate_modes` computes each metric on the full test set and on
every resample; everything here turns those values into intervals and p-values.

Bootstrap
    ``n_boot`` resamples of the test rows (indices from ``numpy.random.default_rng(seed)``,
    ``integers(0, N, size=(n_boot, N))``), held as multiplicities ``W [B, N]``
    (:func:`resample_weights`).  The same ``W`` serves every mode, so the per-mode intervals and
    the paired differences come from the same resamples.  A resample on which a metric is
    undefined (AUC with no class that has a positive and a negative; QWK with no expected
    disagreement) is skipped for that metric, and for a difference, every resample where either
    mode's value is undefined.

Intervals
    95% percentile intervals taken as order statistics (:func:`percentile_interval`): with ``B``
    usable resamples and ``j = #{k >= 0 : 2k/B < 0.05}`` (``j = 25`` for ``B = 1000``) the
    interval is ``[j-th smallest, j-th largest]``.  That choice makes the interval of a
    difference agree exactly with its p-value (below).

Paired tests (``mode - baseline`` on the same test images)
    * **Paired bootstrap** for every headline metric (:func:`paired_difference`):
      ``d* = m*(mode) - m*(baseline)`` on each shared resample, ``d`` on the full test set.
      p-value by **percentile inversion**: ``p = min(1, 2 * min(#{d* <= 0}, #{d* >= 0}) / B)``
      (resamples with no difference count on both sides, so identical modes give ``p = 1``;
      differences within 1e-12 are floating-point noise and count as 0).  With the
      order-statistic interval above, ``p < 0.05`` holds exactly when the 95% interval of the
      difference excludes 0: ``#{d* <= 0} < j`` is the same statement as "the j-th smallest
      ``d*`` is > 0" (and likewise above), and ``j`` is defined through the same floating-point
      expression ``2k/B < 0.05`` as the comparison ``p < 0.05``.  So the verdict (decided on
      ``p``) never contradicts the interval it quotes.  A p-value of 0 means no resample reached
      0: the test's resolution is ``2/B``.
    * **Exact McNemar** on top-1 correctness of the two ensembles (:func:`mcnemar`): ``b`` =
      images the baseline gets right and the mode gets wrong, ``c`` = the reverse,
      ``p = scipy.stats.binomtest(b, b + c, 0.5)`` (two-sided; 1 when ``b + c = 0``).

Why percentile inversion (measured calibration)
    It was measured against the null-centred construction ``p = #{|d* - d| >= |d|} / B`` on
    simulated test sets where the two modes are exchangeable (two probability matrices drawn
    alike, with a shared component so the modes are correlated as real ones are, and swapped
    between the modes on a random half of the rows: the true difference is 0 for every metric).
    Share of p < 0.05 (nominal 0.05; Monte Carlo SE about 0.003-0.004):

    =====================  ================  ================  =====================
    metric                 N=200 C=5, ~57%   N=60 C=4, ~62%    N=200 C=5, ~88% top-1
                           B=1000, 5000 sims B=1000, 4000 sims B=1000, 4000 sims
                           pct. / centred    pct. / centred    pct. / centred
    =====================  ================  ================  =====================
    top1                   0.048 / 0.050     0.043 / 0.043     0.044 / 0.050
    top3                   0.045 / 0.046     0.043 / 0.019     0.028 / 0.009
    f1_macro               0.054 / 0.053     0.059 / 0.055     0.056 / 0.052
    precision_macro        0.050 / 0.050     0.055 / 0.052     0.057 / 0.056
    recall_macro           0.054 / 0.054     0.057 / 0.054     0.056 / 0.054
    auc_macro              0.051 / 0.049     0.053 / 0.048     0.057 / 0.041
    balanced_accuracy      0.054 / 0.054     0.057 / 0.054     0.056 / 0.054
    qwk                    0.051 / 0.051     0.074 / 0.066     0.059 / 0.049
    McNemar (exact)        0.039             0.027             0.033
    =====================  ================  ================  =====================

    Over these and four more settings (N = 500 with imbalanced classes; N = 100 with 8 classes;
    N = 150 imbalanced with two independent seeds of one mode instead of swapped rows; B = 200),
    56 metric x setting cells in all: percentile inversion 0.028-0.074, RMS error 0.0084;
    null-centred 0.009-0.070, RMS error 0.0094.  The two agree within Monte Carlo error on the
    smooth metrics; the null-centred test collapses on top-3 (a difference made of a few
    discordant rows, a lattice on which ``|d* - d| >= |d|`` is rarely reached) while percentile
    inversion is at worst mildly liberal at small N.  Percentile inversion is kept: smaller
    overall error, no collapse, and it is exactly the test that the reported percentile interval
    of the difference implies.  McNemar's exact test is conservative (0.027-0.041).
    ``tests/evaluation/test_metrics_calibration.py`` re-measures the chosen construction through
    :func:`common.evaluation.metrics.evaluate_modes` on every test run (fewer simulations, B = 200).

Multiplicity
    These are per-comparison p-values: many comparisons across datasets and backbones call for a
    multiplicity correction.  :func:`holm` is the Holm (1979) step-down adjustment, which controls
    the family-wise error rate; the reports say which comparisons form a family.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binomtest

from common.errors import UserError

ALPHA = 0.05  # the intervals are 95%; the verdicts and the Holm markers test at 5%
TIE_TOL = 1e-12  # |difference| at or below this is a tie (floating-point noise)


def resample_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap resamples as multiplicities ``W [B, N]`` (float64): ``W[b, i]`` = how often
    test row ``i`` was drawn in resample ``b``.  Indices from ``numpy.random.default_rng(seed)``."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise UserError(f"n_boot={n_boot!r} must be an integer >= 1 (bootstrap resamples)")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    flat = (np.arange(n_boot)[:, None] * n + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n).astype(np.float64)


def order_rank(n: int, alpha: float = ALPHA) -> int:
    """``j = #{k >= 0 : 2k/n < alpha}``: the interval's order statistic (1-based) for ``n`` values.

    Written with the same floating-point expression as :func:`bootstrap_p`'s ``2k/n`` so that
    ``p < alpha`` and "the interval excludes 0" are one statement (module docstring)."""
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


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided paired-bootstrap p-value by percentile inversion over the finite ``diffs [B]``
    (already tie-rounded): ``min(1, 2 min(#{d* <= 0}, #{d* >= 0}) / B)``; NaN when none."""
    d = diffs[np.isfinite(diffs)]
    if d.size == 0:
        return math.nan
    k = min(int(np.count_nonzero(d <= 0)), int(np.count_nonzero(d >= 0)))
    return float(min(1.0, 2.0 * k / d.size))


def untie(x: np.ndarray) -> np.ndarray:
    """Differences within :data:`TIE_TOL` of 0 set to exactly 0 (equal metrics summed in another
    order differ by ~1e-16 and must count as ties, not as an arbitrary side)."""
    x = np.array(x, dtype=np.float64)
    x[np.abs(x) <= TIE_TOL] = 0.0
    return x


def paired_difference(mode_values: np.ndarray, base_values: np.ndarray) -> tuple[float, float, float, float]:
    """``(d, lo, hi, p)`` of ``mode - baseline`` for one metric.

    ``mode_values`` and ``base_values`` are ``[1 + B]``: row 0 the metric on the full test set,
    rows 1.. on the shared resamples.  ``d`` is the full-set difference, ``(lo, hi)`` the 95%
    percentile interval of the resampled differences and ``p`` the paired-bootstrap p-value
    (percentile inversion).  When ``d`` is undefined (NaN), so are the interval and ``p``:
    nothing to test."""
    d = untie(np.asarray(mode_values, dtype=np.float64) - np.asarray(base_values, dtype=np.float64))
    if math.isnan(d[0]):
        return math.nan, math.nan, math.nan, math.nan
    lo, hi = percentile_interval(d[1:])
    return float(d[0]), lo, hi, bootstrap_p(d[1:])


def mcnemar(correct_base: np.ndarray, correct_mode: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar on paired correctness ``[N]`` bools: ``(b, c, p)`` with ``b`` = baseline
    right and mode wrong, ``c`` = the reverse, ``p`` two-sided binomial (1 when ``b + c = 0``)."""
    b = int(np.count_nonzero(correct_base & ~correct_mode))
    c = int(np.count_nonzero(~correct_base & correct_mode))
    p = float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue) if b + c else 1.0
    return b, c, p


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
