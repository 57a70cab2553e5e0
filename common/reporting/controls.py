"""``controls.csv`` and the controls section of ``summary.md`` (docs/run.md, docs/statistics.md "Controls").

Every control is a row of ``metrics.csv``, compared with no-ttr by the same conditional tests as
ttr (:mod:`common.evaluation.compare`).  This module gathers, per control, the primary metric's
difference with its interval and test and the control's share of image patches above the norm
threshold (``outliers``: the analysis pass of every mode), and places ttr among the random draws:

* **percentile** of ttr's value among the draws' values ``d_1..d_n``:
  ``100 (#{d_k < t} + #{d_k = t} / 2) / n`` (mid-rank; equal within 1e-12);
* **rank p-value** (two-sided, Monte Carlo): ``min(1, 2 min(1 + #{d_k <= t}, 1 + #{d_k >= t}) / (n + 1))``;
  with n draws it cannot go below ``2 / (n + 1)``, so it is descriptive at the default 10 draws.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from common.evaluation.metrics import PROPORTIONS
from common.registers.controls import neurons_hash
from common.registers.modes import BASELINE, REMOVED, TTR, TTR_RANDOM, draw_index, is_control
from common.reporting.format import (
    estimate,
    interval,
    is_missing,
    markdown_table,
    metric_label,
    number,
    p_value,
    percent,
    signed,
)

CONTROL_COLUMNS = ("mode", "control", "draw", "neurons_hash", "neurons", "primary_metric", "primary_diff",
                   "primary_diff_lo", "primary_diff_hi", "p_primary", "test", "changed_predictions",
                   "patch_share_above_threshold", "patch_share_diff")
TIES = 1e-12

# What each control puts where ttr puts the signed max (the summary's table).
WHAT = {
    TTR: "ttr: the registers get the signed max (the reference)",
    REMOVED: "the register neurons zeroed at the patches, no register (R = 0)",
    "ttr-mean": "ttr, the registers get each neuron's mean over the image's patches",
    "ttr-noise": "ttr, the registers get a Gaussian draw with the patches' mean and SD",
    "ttr-shuffle": "ttr, the registers get another image's signed max (same batch)",
    "trained-zero": "the trained registers set to 0 after every block",
    "trained-mean": "the trained registers set to their mean over the detection images",
    "trained-noise": "the trained registers drawn from a Gaussian with their mean and SD",
    "trained-shuffle": "the trained registers of another image of the batch",
}


def percentile_among(value: float, draws) -> float:
    """Mid-rank percentile of ``value`` among ``draws`` (NaN when either is missing)."""
    draws = np.asarray([d for d in draws if not is_missing(d)], dtype=float)
    if is_missing(value) or not draws.size:
        return math.nan
    below = np.sum(draws < value - TIES)
    equal = np.sum(np.abs(draws - value) <= TIES)
    return float(100.0 * (below + 0.5 * equal) / draws.size)


def rank_p(value: float, draws) -> float:
    """Two-sided Monte Carlo rank p-value of ``value`` against ``draws`` (module docstring)."""
    draws = np.asarray([d for d in draws if not is_missing(d)], dtype=float)
    if is_missing(value) or not draws.size:
        return math.nan
    low = 1 + np.sum(draws <= value + TIES)
    high = 1 + np.sum(draws >= value - TIES)
    return float(min(1.0, 2.0 * min(low, high) / (draws.size + 1)))


def _value(frame: pd.DataFrame | None, mode: str, column: str) -> float:
    if frame is None or column not in frame.columns or mode not in frame.index:
        return math.nan
    value = frame.loc[mode, column]
    return math.nan if is_missing(value) else float(value)


def controls_table(metrics: pd.DataFrame, outliers: pd.DataFrame | None, primary: str,
                   draws: dict[str, dict[int, list[int]]]) -> pd.DataFrame | None:
    """``controls.csv``: ttr (the reference), then one row per control of ``metrics`` (each random
    draw, ``draws``: mode -> its neurons, and every other control); None without a control."""
    rows_of = metrics.set_index("mode")
    shares = outliers.set_index("mode") if outliers is not None else None
    controls = [m for m in metrics["mode"] if is_control(m)]
    if not controls or TTR not in rows_of.index:
        return None
    base_share = _value(shares, BASELINE, "patch_share_above_threshold")
    rows = []
    for mode in [TTR, *controls]:
        draw = draw_index(mode)
        neurons = draws.get(mode)
        share = _value(shares, mode, "patch_share_above_threshold")
        rows.append({
            "mode": mode, "control": TTR_RANDOM if draw is not None else mode, "draw": draw,
            "neurons_hash": neurons_hash(neurons) if neurons else None,
            "neurons": json.dumps({str(k): v for k, v in sorted(neurons.items())}) if neurons else None,
            "primary_metric": primary,
            **{f"primary{suffix}": _value(rows_of, mode, f"{primary}{suffix}")
               for suffix in ("_diff", "_diff_lo", "_diff_hi")},
            "p_primary": _value(rows_of, mode, f"p_{primary}"),
            "test": "exact McNemar" if primary in PROPORTIONS else "paired permutation",
            "changed_predictions": _value(rows_of, mode, "changed_predictions"),
            "patch_share_above_threshold": share,
            "patch_share_diff": share - base_share,
        })
    table = pd.DataFrame(rows, columns=list(CONTROL_COLUMNS))
    table["draw"] = table["draw"].astype("Int64")
    return table


def _range(values) -> str:
    values = [v for v in values if not is_missing(v)]
    if not values:
        return "n/a"
    return f"median {signed(float(np.median(values)))}, range {interval(min(values), max(values), sign=True)}"


def _share_range(values) -> str:
    values = [v for v in values if not is_missing(v)]
    if not values:
        return "n/a"
    return f"median {percent(float(np.median(values)))}, range {percent(min(values))} to {percent(max(values))}"


def random_draws_sentence(table: pd.DataFrame, primary: str, no_ttr_share: float) -> str:
    """Where ttr lies among the random draws: on the primary metric and on the outlier share."""
    draws = table[table["draw"].notna()]
    reference = table.set_index("mode").loc[TTR]
    n = len(draws)
    sizes = json.loads(draws["neurons"].iloc[0]) if n and not is_missing(draws["neurons"].iloc[0]) else {}
    per_layer = ", ".join(f"{len(ids)} in layer {layer}" for layer, ids in sizes.items())
    label = metric_label(primary)
    diffs, shares = draws["primary_diff"].tolist(), draws["patch_share_above_threshold"].tolist()
    t_diff, t_share = reference["primary_diff"], reference["patch_share_above_threshold"]
    return (f"**Random neurons** (`ttr-random`, {n} draw{'s' if n != 1 else ''} of as many neurons per layer as the selection: "
            f"{per_layer}; never a selected neuron): ttr's difference in {label} ({signed(t_diff)}) lies at "
            f"percentile {number(percentile_among(t_diff, diffs), 0)} of the draws' ({_range(diffs)}; percentile 0: "
            f"below every draw, 100: above every draw); rank test "
            f"against the draws, two-sided p = {number(rank_p(t_diff, diffs))} (with {n} draws no p below "
            f"{number(2 / (n + 1))} is possible). The share of image patches above the norm threshold under ttr "
            f"({percent(t_share)}; no-ttr {percent(no_ttr_share)}) lies at percentile "
            f"{number(percentile_among(t_share, shares), 0)} of the draws' ({_share_range(shares)}); "
            f"rank p = {number(rank_p(t_share, shares))}.")


def controls_section(table: pd.DataFrame, primary: str, no_ttr_share: float) -> list[str]:
    """The summary's controls section: where ttr lies among the random draws, and one row per
    control (the draws summarised in one row)."""
    label = metric_label(primary)
    lines = ["## Controls: is it the register neurons?", "",
             "Each control is a mode of its own, scored against no-ttr exactly like ttr: the same probe procedure "
             "and the same conditional tests (exact McNemar and Tango's interval for top-1, a paired permutation "
             "test and the paired bootstrap otherwise; probe refits apply to ttr only). Exploratory: no verdict "
             "words, not adjusted for multiplicity. Full rows in `metrics.csv`; one row per control in "
             "`controls.csv` (docs/intervention.md, docs/statistics.md).", ""]
    draws = table[table["draw"].notna()]
    if len(draws):
        lines += [random_draws_sentence(table, primary, no_ttr_share), ""]

    def difference(entry) -> str:
        if primary not in PROPORTIONS and entry["changed_predictions"] == 0:
            return f"{signed(entry['primary_diff'])} (no test prediction changed)"
        return estimate(entry["primary_diff"], entry["primary_diff_lo"], entry["primary_diff_hi"], sign=True)

    def row(mode: str, what: str, entry) -> list[str]:
        return [f"`{mode}`", what, difference(entry), p_value(entry["p_primary"]),
                number(entry["changed_predictions"], 0), percent(entry["patch_share_above_threshold"])]

    rows = []
    for _, entry in table.iterrows():
        if not is_missing(entry["draw"]):
            continue
        rows.append(row(entry["mode"], WHAT.get(entry["mode"], ""), entry))
        if entry["mode"] == TTR and len(draws):
            rows.append([f"`{TTR_RANDOM}` ({len(draws)} draws)", "ttr on random neurons, layer-matched",
                         _range(draws["primary_diff"]), "per draw in controls.csv",
                         f"median {number(float(draws['changed_predictions'].median()), 0)}",
                         _share_range(draws["patch_share_above_threshold"])])
    test = "exact McNemar" if primary in PROPORTIONS else "paired permutation test"
    lines += markdown_table(["mode", "what it does", f"{label} − no-ttr [95% CI]", f"p ({test})",
                             "changed predictions", "patches above threshold"], rows)
    lines += ["", f"Patches above threshold: the share of image patches whose norm at the detect layer exceeds the "
              f"threshold, over the analysis images (no-ttr: {percent(no_ttr_share)})."]
    return lines
