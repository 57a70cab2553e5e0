"""``summary.md``: a run for a human, the answer first (docs/run.md, docs/statistics.md).

It opens with the verdict on the **primary metric** (better, worse, not robust to probe
retraining, or no detectable difference with the smallest detectable one), then the secondary
metrics with their intervals and no verdict words, the outlier effect (and, with object masks,
the attention localization: :mod:`common.reporting.localization_summary`) in numbers, what a
reader must know (probes that did not converge, strong register neurons left out by
``highest_layer``, leaks between splits), the side-by-side table, the probe refits, the controls
(and ``controls.csv``, :mod:`common.reporting.controls`), the run's settings and the figures.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from common.errors import UserError
from common.evaluation.analysis import outlier_effect
from common.evaluation.compare import BETTER, NOT_ROBUST, UNTESTABLE, WORSE, decide
from common.evaluation.metrics import METRIC_LABELS, PROPORTIONS
from common.evaluation.stats import ALPHA, POWER
from common.io import write_csv, write_text
from common.registers.controls import mode_setup
from common.registers.modes import BASELINE, REMOVED, TTR, draw_index, is_control
from common.reporting.controls import controls_section, controls_table
from common.reporting.format import (
    estimate,
    in_report_order,
    interval,
    is_missing,
    markdown_table,
    metric_label,
    number,
    p_text,
    p_value,
    percent,
    signed,
)
from common.reporting.localization_summary import localization_effect, localization_section

if TYPE_CHECKING:  # the run's state is built by the app layer, above this one
    from common.app.runstate import RunState


def _comparison_row(table: pd.DataFrame, mode: str, baseline: str) -> pd.Series:
    """The row of ``mode`` in a ``metrics.csv`` table computed against ``baseline`` (one line
    naming what is wrong otherwise)."""
    modes = list(table["mode"]) if "mode" in table.columns else []
    for wanted in (mode, baseline):
        if wanted not in modes:
            raise UserError(f"no row for mode {wanted!r} in the metrics table; rows: {', '.join(map(str, modes))}")
    # the differences on every row are against the baseline evaluate_modes used: its row has none
    base_diffs = table.loc[table["mode"] == baseline, [c for c in table.columns if c.endswith("_diff")]]
    if base_diffs.notna().to_numpy().any():
        raise UserError(f"{baseline!r} is not the baseline this metrics table was computed against")
    return table.loc[table["mode"] == mode].iloc[0]


def _get(row, key: str) -> float:
    value = row.get(key, math.nan)
    return math.nan if is_missing(value) else float(value)


def _unchanged(row) -> bool:
    return _get(row, "changed_predictions") == 0


def claim(row, metric: str, mode: str = TTR, baseline: str = BASELINE) -> str:
    """The difference of ``metric`` with its interval, what the interval is, the test and, for a
    proportion, the discordant counts: ``+0.031, 95% CI [+0.008, +0.054] (Tango score interval),
    exact McNemar p = 0.012; ttr right where no-ttr wrong: 14, the reverse: 6``."""
    d, lo, hi, p = (_get(row, key) for key in (f"{metric}_diff", f"{metric}_diff_lo", f"{metric}_diff_hi",
                                                 f"p_{metric}"))
    if metric in PROPORTIONS:
        counts = (f"{mode} right where {baseline} wrong: {int(_get(row, f'{metric}_discordant_ttr_better'))}, "
                  f"the reverse: {int(_get(row, f'{metric}_discordant_ttr_worse'))}")
        return (f"{signed(d)}, 95% CI {interval(lo, hi, sign=True)} (Tango score interval), exact McNemar "
                f"{p_text(p)}; {counts}")
    if _unchanged(row) and lo == hi == d == 0:
        return f"{signed(d)}, no test prediction changed"
    return (f"{signed(d)}, 95% CI {interval(lo, hi, sign=True)} (paired bootstrap of the test images), paired "
            f"permutation test {p_text(p)}")


def refit_clause(row, metric: str, mode: str = TTR) -> str:
    """What the probe refits say about ``metric`` (empty without refits)."""
    refits = _get(row, "refits")
    if not refits > 0:
        return ""
    mean, sd, share = (_get(row, f"{metric}_refit_{s}") for s in ("mean", "sd", "share_better"))
    lo, hi = _get(row, f"{metric}_diff_lo_refit"), _get(row, f"{metric}_diff_hi_refit")
    return (f"Over {int(refits)} probe refits on bootstrap resamples of the training set the difference is "
            f"{signed(mean)} on average (SD {number(sd)}, {mode} better in {percent(share)}); the combined 95% CI "
            f"(test set + probe retraining) is {interval(lo, hi, sign=True)}")


def mde_clause(row, metric: str) -> str:
    """The smallest difference the test detects with 80% power, and what that assumes."""
    mde = _get(row, f"mde_{metric}")
    basis = row.get("mde_basis")
    rate = _get(row, "mde_discordance")
    if is_missing(mde):
        return "the smallest detectable difference cannot be estimated here"
    assumption = {
        "observed": f"exact McNemar at the observed discordance rate, {number(rate)}",
        "probe seeds": f"exact McNemar at the discordance rate between probe seeds, {number(rate)}, since no test "
                       "prediction changed",
        "none": "exact McNemar with every discordant pair favouring one mode, since no test prediction changed and "
                "the probe seeds agree",
        "bootstrap SE": "normal approximation with the paired-bootstrap standard error of the difference",
        "independent-modes SE": "normal approximation with the standard error of two independent modes, √2 × the "
                                "baseline's bootstrap standard error, since too few test predictions changed to "
                                "estimate the pairing; a paired test needs at least 6 changed predictions to reach "
                                "5%",
    }.get(basis, str(basis))
    return (f"the smallest difference this test detects with {POWER:.0%} power is ±{number(mde)} "
            f"({assumption})")


def answer(table: pd.DataFrame, primary: str, *, mode: str = TTR, baseline: str = BASELINE,
           alpha: float = ALPHA) -> str:
    """The verdict on the primary metric in one sentence (:func:`common.evaluation.compare.decide`):
    better, worse, not robust to probe retraining, or no detectable difference (with the smallest
    detectable one), quoting the difference, its interval, the test and the refits."""
    row = _comparison_row(table, mode, baseline)
    label = f"{metric_label(primary, capital=True)} (primary metric)"
    verdict = decide(row, primary, alpha)
    level = f"{alpha * 100:g}%"
    refits = refit_clause(row, primary, mode)
    if verdict == UNTESTABLE:
        return f"{label}: not testable on this test split (the metric is undefined for {mode} or {baseline})."
    text = claim(row, primary, mode, baseline)
    if verdict in (BETTER, WORSE):
        sentence = f"{label}: {mode} is {verdict} than {baseline}: {text}."
    elif verdict == NOT_ROBUST:
        sentence = (f"{label}: {mode} differs from {baseline} with these fitted probes ({text}), but the difference is "
                    "not robust to probe retraining.")
    else:
        unchanged = "; no test prediction changed" if _unchanged(row) and primary in PROPORTIONS else ""
        mde = mde_clause(row, primary)
        sentence = (f"{label}: no detectable difference between {mode} and {baseline} at the {level} level: "
                    f"{text}{unchanged}. {mde[:1].upper()}{mde[1:]}.")
    return f"{sentence} {refits}." if refits else sentence


def secondary(table: pd.DataFrame, primary: str, *, mode: str = TTR, baseline: str = BASELINE) -> list[str]:
    """One line per other metric: its difference, interval and test, without a verdict."""
    row = _comparison_row(table, mode, baseline)
    names = in_report_order(c[: -len("_diff")] for c in table.columns if c.endswith("_diff"))
    lines = []
    for m in names:
        if m == primary:
            continue
        if is_missing(row.get(f"{m}_diff")):
            lines.append(f"{metric_label(m, capital=True)}: undefined on this test split.")
        else:
            lines.append(f"{metric_label(m, capital=True)}: {claim(row, m, mode, baseline)}.")
    return lines


def results_table(table: pd.DataFrame, baseline: str, mode: str, primary: str | None = None) -> list[str]:
    """Markdown rows: per metric, both modes with interval and seed spread, the difference with its
    interval, the p-value and its test; the primary metric marked."""
    rows = table.set_index("mode")

    def value(m: str, name: str) -> str:
        row = rows.loc[m]
        return estimate(row[name], row[f"{name}_lo"], row[f"{name}_hi"], sd=row.get(f"{name}_seed_sd"))

    def difference(row, name: str) -> str:
        if name not in PROPORTIONS and _unchanged(row) and _get(row, f"{name}_diff_lo") == _get(row, f"{name}_diff_hi") == 0:
            return f"{signed(row.get(f'{name}_diff'))} (no test prediction changed)"
        return estimate(row.get(f"{name}_diff"), row.get(f"{name}_diff_lo"), row.get(f"{name}_diff_hi"), sign=True)

    row = rows.loc[mode]
    return markdown_table(
        ["metric", baseline, mode, f"{mode} − {baseline} [95% CI]", "p", "test"],
        [[metric_label(name) + (" (primary)" if name == primary else ""), value(baseline, name), value(mode, name),
          difference(row, name), p_value(row.get(f"p_{name}")),
          "exact McNemar" if name in PROPORTIONS else "permutation"]
         for name in in_report_order(set(table.columns) & set(METRIC_LABELS))])


def refits_table(table: pd.DataFrame, baseline: str, mode: str, primary: str) -> list[str]:
    """Markdown rows of the probe refits per metric (empty without refits)."""
    row = _comparison_row(table, mode, baseline)
    if not _get(row, "refits") > 0:
        return []
    names = in_report_order(set(table.columns) & set(METRIC_LABELS))
    return markdown_table(
        ["metric", "difference (this fit)", "mean over refits", "SD over refits", f"refits with {mode} better",
         "combined 95% CI", "verdict"],
        [[metric_label(m) + (" (primary)" if m == primary else ""), signed(row.get(f"{m}_diff")),
          signed(row.get(f"{m}_refit_mean")), number(row.get(f"{m}_refit_sd")),
          percent(row.get(f"{m}_refit_share_better")),
          interval(row.get(f"{m}_diff_lo_refit"), row.get(f"{m}_diff_hi_refit"), sign=True),
          decide(row, m) if m == primary else "(secondary)"] for m in names])


def write_summary(state: RunState, extra_sections: list[str]) -> list[str]:
    """Write ``summary.md`` of a finished run; returns the lines the terminal ends with (the
    verdict on the primary metric)."""
    config, dataset, backbone, metrics = state.config, state.dataset, state.backbone, state.metrics
    primary = config["primary_metric"]
    title = f"# {state.spec.title}: {state.options.model}, no-ttr vs ttr"
    lines = [title, ""]
    if state.options.demo:
        lines += ["> **Demo run on synthetic data with a planted model.** The images were generated, the "
                  "backbone is a small randomly initialised ViT with register neurons planted by hand at "
                  f"{state.planted}. These numbers say nothing about real medical images.", ""]
        lines += [*state.demo_check, ""] if state.demo_check else []
    n_test = int((dataset.table["split"] == "test").sum())
    verdict = answer(metrics, primary, mode=TTR, baseline=BASELINE)
    lines += ["## The answer", "", f"**{verdict}**", "",
              f"Does moving the register neurons onto a test-time register (ttr) change the linear probe on "
              f"{n_test} test images? Each mode's prediction is its {len(config['probe_seeds'])} probe seed(s)' "
              f"ensemble; the answer is about the primary metric, {metric_label(primary)} (configs.PRIMARY_METRIC; "
              "`--set primary_metric=...`). Its conditional test compares the two fitted probes on the same test "
              f"images; \"{BETTER}\" or \"{WORSE}\" also needs the combined interval over probe refits to exclude 0 "
              "(docs/statistics.md).", "",
              "Secondary metrics (exploratory, no verdict, not adjusted for multiplicity):", ""]
    lines += [f"- {line}" for line in secondary(metrics, primary, mode=TTR, baseline=BASELINE)]
    if state.outliers is not None:
        effect = outlier_effect(state.outliers)
        if effect:
            lines += ["", effect]
    if state.localization is not None and localization_effect(state.localization):
        lines += ["", localization_effect(state.localization)]
    lines += ["", "These p-values are for this one run: when many datasets, backbones or settings are compared, "
              "correct for multiplicity (`python -m common.study` applies Holm over the primary metric of its main "
              "cells; `python -m common.report` over the runs' primary metrics)."]
    warnings = _warnings(state)
    if warnings:
        lines += ["", "**Read with care:**", ""] + [f"- {w}" for w in warnings]

    rows = metrics.set_index("mode")
    lines += ["", "## Results", ""] + results_table(metrics, BASELINE, TTR, primary)
    lines += ["", "Values: the seed ensemble's metric with its 95% interval (Wilson for top-1 and manufacturer "
              "top-1; otherwise the percentile bootstrap over test images, "
              f"{config['bootstrap_resamples']} resamples) and, after sd, the standard deviation of the per-seed "
              "metrics (sd 0: the seeds agree exactly; none with one seed). Differences ttr − no-ttr: Tango's score "
              "interval and the exact McNemar test for top-1 and manufacturer top-1; the paired percentile bootstrap "
              f"and a paired permutation test ({config['permutations']} permutations, p ≥ 1/"
              f"{config['permutations'] + 1}) for the others. Every interval and test here is conditional on the "
              "fitted probes (it resamples the test images only). Rates are fractions; kappa is in [-1, 1]."]
    auc_classes = rows.loc[TTR].get("auc_classes")
    if auc_classes is not None and np.isfinite(auc_classes):
        lines[-1] += f" AUC averages over the {int(auc_classes)} classes present in the test split."
    refits = refits_table(metrics, BASELINE, TTR, primary)
    if refits:
        lines += ["", f"Probe refits: the whole probe procedure (grid, early stopping, {len(config['probe_seeds'])} "
                  "seed(s)) rerun for both modes on bootstrap resamples of the training set (the same resample and "
                  "seeds for both). The combined interval adds the between-refit variance to the test-set variance "
                  "(normal approximation), so it covers probe retraining as well as the test sample:", ""] + refits
    extras = [m for m in metrics["mode"] if m not in (BASELINE, TTR) and "(" not in m]
    for extra in [m for m in extras if m == REMOVED or not is_control(m)]:
        lines += ["", f"Extra mode `{extra}` against no-ttr (exploratory; docs/intervention.md):", ""] \
            + results_table(metrics, BASELINE, extra)
    zero_shot = [m for m in metrics["mode"] if "(zero-shot)" in m]
    if len(zero_shot) == 2:
        lines += ["", "CLIP zero-shot from class-name prompts (no training; prompts in zero_shot_prompts.json), "
                  "the same paired tests (exploratory):", ""] + results_table(metrics, *zero_shot)
    course = [m for m in metrics["mode"] if "(course probe)" in m]
    if len(course) == 2:
        lines += ["", "The course project's saved probes (`--reference_probes`) on raw test features extracted the "
                  "course's way: its code appends one zero register token in both modes (`run_model(..., "
                  "num_registers=1)`), so `no-ttr (course probe)` is scored on features with one zero register "
                  "appended and nothing moved onto it - not the model as released, which our no-ttr is - and "
                  "`ttr (course probe)` on ttr features with one register (class order mapped from the course "
                  "code's sorted labels):", ""] + results_table(metrics, *course)

    lines += _controls(state)
    lines += ["", "## Run", "",
              f"- backbone: {backbone.description} (activation {backbone.activation}, precision "
              f"{backbone.precision}), device {backbone.device}",
              f"- dataset: {dataset.root} ({dataset.layout}); {len(dataset.class_names)} classes; "
              + ", ".join(f"{s} {int((dataset.table['split'] == s).sum())}" for s in ("train", "val", "test")),
              f"- register neurons: {state.ranking.source}, {sum(len(v) for v in state.selected.values())} selected "
              f"(highest_layer {config['highest_layer']}, top_k {config['top_k']}) in layers {sorted(state.selected)}; "
              f"threshold {state.ranking.threshold:g} ({state.ranking.threshold_reason or 'configured'}), images "
              f"counted {state.ranking.images_counted}/{state.ranking.images_used}",
              f"- ttr: {config['num_registers']} register(s), scale {config['scale']}, normal_values "
              f"{config['normal_values']}, intervention_max {config['intervention_max']}; probe feature "
              f"`{config['feature']}`, {len(config['probe_seeds'])} probe seeds"]
    for section in extra_sections:
        lines += ["", section]
    if state.localization is not None:
        lines += [""] + localization_section(state.localization, config["bootstrap_resamples"],
                                                  config["permutations"])
    write_text(state.options.out / "summary.md", "\n".join(lines) + "\n")
    return [verdict]


def _controls(state: RunState) -> list[str]:
    """The controls section (empty without a control); ``controls.csv`` written beside summary.md."""
    draws = {m: mode_setup(m, state.intervention, state.config["num_registers"], state.controls).change.neurons
             for m in state.metrics["mode"] if draw_index(m) is not None}
    table = controls_table(state.metrics, state.outliers, state.config["primary_metric"], draws)
    if table is None:
        return []
    write_csv(state.options.out / "controls.csv", table)
    outliers = state.outliers.set_index("mode") if state.outliers is not None else None
    no_ttr = outliers.loc[BASELINE, "patch_share_above_threshold"] if outliers is not None else math.nan
    return [""] + controls_section(table, state.config["primary_metric"], no_ttr)


def _warnings(state: RunState) -> list[str]:
    config = state.config
    notes = list(state.not_converged)
    above = state.ranking.above_highest_layer(config["highest_layer"], config["top_k"])
    if above:
        scores = ", ".join(f"{s:.3g} (layer {l}, neuron {n})" for l, n, s in above[:5])
        kept = state.ranking.selected_scores(config["highest_layer"], config["top_k"])
        notes.append(f"{len(above)} of the top {config['top_k']} ranked register neurons lie above highest_layer="
                     f"{config['highest_layer']} and are not selected: {scores}"
                     + (" ..." if len(above) > 5 else "")
                     + (f"; the selected ones score {min(kept):.3g} to {max(kept):.3g}" if kept else "")
                     + ". The method leaves layers above highest_layer out on purpose (docs/detection.md); the "
                     "study's `highest_layer` axis (`--axes highest_layer=...`) measures what including them "
                     "changes.")
    if state.dataset.leaks:
        notes.append(f"{len(state.dataset.leaks)} file(s) with identical content appear in two splits (see "
                     "--check_data); the test metrics may be optimistic.")
    return notes
