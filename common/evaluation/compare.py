"""Every mode scored on the test split and compared with the baseline: the ``metrics.csv`` table
(docs/statistics.md).

Per mode (each mode's prediction is its seed ensemble, :func:`common.evaluation.metrics.ensemble_predictions`):
the metric, its 95% interval (Wilson for the proportions top-1 and manufacturer top-1, the
percentile bootstrap of the test images otherwise) and the sample SD of the per-seed metrics.

Per mode against the baseline, on the same test images (:mod:`common.evaluation.stats`):

* top-1 and manufacturer top-1: the discordant counts, exact McNemar and Tango's score interval;
* every other metric: a paired permutation test and the paired percentile bootstrap interval;
* with probe refits (the probe procedure rerun on bootstrap resamples of the training set), the
  differences over refits and the combined interval (test set + probe retraining);
* for the primary metric, the minimum detectable effect at 80% power.

``SCHEMA_VERSION`` names this set of methods; it is written into every row, and reports
recompute the statistics of a run written by an older version from its predictions files.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pandas as pd

from common.errors import UserError
from common.evaluation.metrics import (
    PROPORTIONS,
    MetricSpec,
    check_labels,
    check_probabilities,
    ensemble_predictions,
    proportion_hits,
    weighted_metrics,
)
from common.evaluation.stats import (
    ALPHA,
    bootstrap_difference,
    combined_interval,
    discordant,
    mcnemar_p,
    mde_mcnemar,
    mde_normal,
    percentile_interval,
    permutation_p,
    resample_weights,
    sample_sd,
    swap_weights,
    tango_interval,
    untie,
    wilson_interval,
    z_value,
)
from common.registers.modes import BASELINE

# 1: percentile-bootstrap tests for every metric, McNemar beside them (no version column).
# 2: exact McNemar + Tango (proportions), paired permutation tests, Wilson per mode, refits, MDE.
SCHEMA_VERSION = 2
PERMUTATION_CHUNK = 250   # permutations per vectorised pass (bounds memory at large N)
REFIT_COLUMNS = ("refit_mean", "refit_sd", "refit_share_better", "diff_lo_refit", "diff_hi_refit")


def metric_columns(spec: MetricSpec, primary: str) -> list[str]:
    """``metrics.csv`` column names in order (docs/run.md): ``mode, schema_version``; per metric
    ``m, m_lo, m_hi, m_seed_sd``; ``auc_classes, changed_predictions, refits``; per metric
    ``m_diff, m_diff_lo, m_diff_hi, m_diff_se, p_m`` (+ ``m_discordant_ttr_better``,
    ``m_discordant_ttr_worse`` for a proportion) and the refit columns ``m_refit_mean,
    m_refit_sd, m_refit_share_better, m_diff_lo_refit, m_diff_hi_refit``; then
    ``p_mcnemar_top1`` (alias of ``p_top1``), ``mde_<primary>, mde_basis, mde_discordance``."""
    names = spec.names()
    columns = ["mode", "schema_version"] + [f"{m}{s}" for m in names for s in ("", "_lo", "_hi", "_seed_sd")]
    columns += ["auc_classes", "changed_predictions", "refits"]
    for m in names:
        columns += [f"{m}_diff", f"{m}_diff_lo", f"{m}_diff_hi", f"{m}_diff_se", f"p_{m}"]
        if m in PROPORTIONS:
            columns += [f"{m}_discordant_ttr_better", f"{m}_discordant_ttr_worse"]
        columns += [f"{m}_{suffix}" for suffix in REFIT_COLUMNS]
    return columns + ["p_mcnemar_top1", f"mde_{primary}", "mde_basis", "mde_discordance"]


def permutation_ps(y: np.ndarray, mode: np.ndarray, base: np.ndarray, spec: MetricSpec, names: list[str],
                   n_perm: int, seed: int) -> dict[str, float]:
    """Paired permutation p-value of ``mode - base`` per metric of ``names``: the two ensembles
    ``[N, C]`` stacked (``[2N, C]``), each permutation a 0/1 weighting that takes, per test
    image, either mode's row (:func:`common.evaluation.stats.swap_weights`)."""
    if not names:
        return {}
    n = len(y)
    y2, stacked = np.concatenate([y, y]), np.vstack([mode, base])
    w_mode, w_base = swap_weights(n, n_perm, seed)
    observed = np.r_[np.ones(n), np.zeros(n)][None]
    chunks = [(observed, 1.0 - observed)] + [(w_mode[i:i + PERMUTATION_CHUNK], w_base[i:i + PERMUTATION_CHUNK])
                                           for i in range(0, n_perm, PERMUTATION_CHUNK)]
    diffs: dict[str, list[np.ndarray]] = {m: [] for m in names}
    for wm, wb in chunks:
        vm = weighted_metrics(y2, stacked, spec, wm, names)
        vb = weighted_metrics(y2, stacked, spec, wb, names)
        for m in names:
            diffs[m].append(untie(vm[m] - vb[m]))
    out = {}
    for m in names:
        d = np.concatenate(diffs[m])
        out[m] = permutation_p(d[0], d[1:])
    return out


def _seed_discordance(per_seed_hits: list[list[np.ndarray]]) -> float:
    """Mean over modes and pairs of probe seeds of the share of test images that exactly one of
    the two seeds gets right; NaN without two seeds."""
    shares = [float(np.mean(a != b)) for hits in per_seed_hits for a, b in combinations(hits, 2)]
    return float(np.mean(shares)) if shares else math.nan


# A paired test of per-image changes cannot reach p < 0.05 with fewer changed predictions than this
# (its smallest two-sided p is 2 / 2^k); below it the bootstrap SE of the difference says nothing.
FEWEST_CHANGES = 6


def test_se(row: dict, metric: str, base_resamples: np.ndarray) -> float:
    """The test-set SE of a difference for the combined refit interval: ``<metric>_diff_se``;
    for a metric other than a proportion with fewer than :data:`FEWEST_CHANGES` changed
    predictions (whose bootstrap SE then says nothing), that of two independent modes, sqrt(2)
    x the baseline's bootstrap SE (``base_resamples``: its metric on the resamples)."""
    se = row[f"{metric}_diff_se"]
    if metric in PROPORTIONS or row["changed_predictions"] >= FEWEST_CHANGES or not math.isfinite(se):
        return se
    return max(se, math.sqrt(2.0) * sample_sd(base_resamples))


def _mde(row: dict, primary: str, n: int, seed_discordance: float, base_se: float) -> dict:
    """``mde_<primary>`` and what it assumes (docs/statistics.md, "Power")."""
    if primary in PROPORTIONS:
        pairs = row[f"{primary}_discordant_ttr_better"] + row[f"{primary}_discordant_ttr_worse"]
        if pairs:
            rate, basis = pairs / n, "observed"
        elif math.isfinite(seed_discordance):
            rate, basis = seed_discordance, "probe seeds"
        else:
            rate, basis = 0.0, "none"
        return {f"mde_{primary}": mde_mcnemar(n, rate), "mde_basis": basis, "mde_discordance": rate}
    se = row[f"{primary}_diff_se"]
    if row["changed_predictions"] >= FEWEST_CHANGES and math.isfinite(se):
        return {f"mde_{primary}": mde_normal(se), "mde_basis": "bootstrap SE", "mde_discordance": math.nan}
    # too few changes to estimate the pairing: the SE of two independent modes, sqrt(2) x the
    # baseline's own bootstrap SE (the largest a non-negative correlation allows: conservative)
    return {f"mde_{primary}": mde_normal(math.sqrt(2.0) * base_se), "mde_basis": "independent-modes SE",
            "mde_discordance": math.nan}


def evaluate_modes(
    y_true,
    proba_by_mode: dict[str, np.ndarray],
    spec: MetricSpec,
    *,
    n_boot: int = 1000,
    n_perm: int = 2000,
    seed: int = 0,
    baseline: str = BASELINE,
    primary: str = "top1",
    refits: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Score every mode on the test split and compare each with ``baseline``: the ``metrics.csv`` table.

    ``y_true``: int ``[N]`` class indices.  ``proba_by_mode``: mode -> ``[S, N, C]`` test
    probabilities per probe seed (``S`` may differ between modes, ``S = 1`` for a fixed saved
    probe); it must contain ``baseline``.  ``n_boot`` bootstrap resamples (the same for every
    mode) and ``n_perm`` permutations, both from ``seed``.  ``primary``: the metric the answer is
    about (gets ``mde_<primary>``).  ``refits``: mode -> ``[R, N, C]``, the seed ensemble of each
    probe refit; the refit columns are filled for a mode when it and the baseline have them.

    Returns one row per mode in the dict's order, columns :func:`metric_columns`; the baseline's
    row has no comparison (NaN).  Raises :class:`UserError` for bad labels, shapes, NaN
    probabilities, a missing baseline, an unknown primary metric or bad counts.
    """
    C = spec.n_classes
    y = check_labels(y_true, C)
    n = len(y)
    names = spec.names()
    if primary not in names:
        raise UserError(f"primary metric {primary!r} is not reported here; use one of {', '.join(names)}")
    if baseline not in proba_by_mode:
        raise UserError(f"baseline mode {baseline!r} is missing; modes given: {', '.join(map(str, proba_by_mode))}")
    probas = {mode: check_probabilities(p, n, C, 3, f"{mode} probabilities per seed") for mode, p in proba_by_mode.items()}
    refits = {mode: np.asarray(r, dtype=np.float64) for mode, r in (refits or {}).items() if mode in probas}
    W = np.vstack([np.ones((1, n)), resample_weights(n, n_boot, seed)])   # row 0: the full test set
    ones = W[:1]

    ensembles = {mode: ensemble_predictions(P) for mode, P in probas.items()}
    values = {mode: weighted_metrics(y, ens, spec, W) for mode, ens in ensembles.items()}
    hits = {mode: proportion_hits(y, ens, spec) for mode, ens in ensembles.items()}
    counts = np.bincount(y, minlength=C)
    auc_classes = int(np.count_nonzero((counts > 0) & (counts < n)))   # a positive and a negative each
    rows: dict[str, dict] = {}
    for mode, P in probas.items():
        per_seed = [weighted_metrics(y, P[s], spec, ones) for s in range(P.shape[0])]
        row: dict = {"mode": mode, "schema_version": SCHEMA_VERSION}
        for m in names:
            row[m] = float(values[mode][m][0])
            row[f"{m}_lo"], row[f"{m}_hi"] = (wilson_interval(int(hits[mode][m].sum()), n) if m in PROPORTIONS
                                              else percentile_interval(values[mode][m][1:]))
            row[f"{m}_seed_sd"] = sample_sd([v[m][0] for v in per_seed])
        row["auc_classes"] = auc_classes
        rows[mode] = row

    refit_values = {mode: [weighted_metrics(y, R_r, spec, ones) for R_r in R] for mode, R in refits.items()}
    for mode in probas:
        row = rows[mode]
        if mode == baseline:
            continue
        row.update(_compare(y, mode, baseline, spec, values, hits, ensembles, n_perm, seed))
        if mode in refits and baseline in refits:
            count = min(len(refits[mode]), len(refits[baseline]))
            row["refits"] = count
            for m in names:
                diffs = [refit_values[mode][r][m][0] - refit_values[baseline][r][m][0] for r in range(count)]
                summary = combined_interval(row[f"{m}_diff"], test_se(row, m, values[baseline][m][1:]), diffs)
                row.update({f"{m}_refit_mean": summary["mean"], f"{m}_refit_sd": summary["sd"],
                            f"{m}_refit_share_better": summary["share_better"],
                            f"{m}_diff_lo_refit": summary["lo"], f"{m}_diff_hi_refit": summary["hi"]})
        seed_rate = _seed_discordance([[proportion_hits(y, P[s], spec)[primary] for s in range(P.shape[0])]
                                       for P in (probas[mode], probas[baseline])]) if primary in PROPORTIONS else math.nan
        row.update(_mde(row, primary, n, seed_rate, sample_sd(values[baseline][primary][1:])))
    for row in rows.values():
        row.setdefault("refits", 0)
    return pd.DataFrame([rows[mode] for mode in probas], columns=metric_columns(spec, primary))


def _compare(y, mode: str, baseline: str, spec: MetricSpec, values, hits, ensembles, n_perm: int,
             seed: int) -> dict:
    """The paired comparison columns of ``mode`` against ``baseline`` (module docstring)."""
    n = len(y)
    names = spec.names()
    out: dict = {"changed_predictions": int(np.count_nonzero(ensembles[mode].argmax(axis=1)
                                                             != ensembles[baseline].argmax(axis=1)))}
    others = [m for m in names if m not in PROPORTIONS]
    p_values = permutation_ps(y, ensembles[mode], ensembles[baseline], spec, others, n_perm, seed)
    z = z_value(ALPHA)
    for m in names:
        if m in PROPORTIONS:
            better, worse = discordant(hits[baseline][m], hits[mode][m])
            lo, hi = tango_interval(better, worse, n)
            out.update({f"{m}_diff": (better - worse) / n, f"{m}_diff_lo": lo, f"{m}_diff_hi": hi,
                        f"{m}_diff_se": (hi - lo) / (2 * z), f"p_{m}": mcnemar_p(better, worse),
                        f"{m}_discordant_ttr_better": better, f"{m}_discordant_ttr_worse": worse})
        else:
            d, lo, hi, se = bootstrap_difference(values[mode][m], values[baseline][m])
            out.update({f"{m}_diff": d, f"{m}_diff_lo": lo, f"{m}_diff_hi": hi, f"{m}_diff_se": se,
                        f"p_{m}": p_values[m] if math.isfinite(d) else math.nan})
    out["p_mcnemar_top1"] = out["p_top1"]
    return out


# --------------------------------------------------------------------------- the decision

BETTER, WORSE, NOT_ROBUST, NO_DIFFERENCE, UNTESTABLE = "better", "worse", "not robust", "no detectable", "untestable"


def _value(row, key: str) -> float:
    value = row.get(key, math.nan) if hasattr(row, "get") else math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def decide(row, metric: str, alpha: float = ALPHA, p: float | None = None) -> str:
    """The verdict on ``metric`` of a ``metrics.csv`` row (a mode against its baseline).

    ``better`` / ``worse``: the conditional test (``p_<metric>``, or ``p`` when given, e.g. a
    Holm-adjusted one) is below ``alpha`` and, when the row has probe refits, the combined
    interval ``<metric>_diff_lo_refit .. _hi_refit`` excludes 0; the direction is the sign of
    the difference (of its interval's midpoint for a significant difference of exactly 0).
    ``not robust``: the conditional test passes but the combined interval holds 0.
    ``no detectable``: the conditional test does not pass.  ``untestable``: no difference or no
    p-value (the metric is undefined on this test split)."""
    d, lo, hi = (_value(row, f"{metric}{s}") for s in ("_diff", "_diff_lo", "_diff_hi"))
    p = _value(row, f"p_{metric}") if p is None else float(p)
    if math.isnan(d) or math.isnan(p):
        return UNTESTABLE
    if p >= alpha:
        return NO_DIFFERENCE
    refits = _value(row, "refits")
    if math.isfinite(refits) and refits > 0:
        lo_r, hi_r = _value(row, f"{metric}_diff_lo_refit"), _value(row, f"{metric}_diff_hi_refit")
        if not (lo_r > 0 or hi_r < 0):
            return NOT_ROBUST
    side = np.sign(d) or np.sign(lo + hi)
    return BETTER if side > 0 else WORSE if side < 0 else NO_DIFFERENCE
