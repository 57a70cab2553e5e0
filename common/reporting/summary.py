"""``summary.md``: a run for a human, the answer first (docs/run.md).

It opens with the verdict - one sentence per headline metric (better, worse, or no detectable
difference at the 5% level, with the difference and its interval) - and the outlier effect in
numbers, then flags what a reader must know (probes that did not converge, strong register
neurons left out by ``highest_layer``, leaks between splits), then the side-by-side table, the
run's settings and the figures.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from common.errors import UserError
from common.evaluation.analysis import outlier_effect
from common.evaluation.metrics import METRIC_LABELS
from common.evaluation.stats import ALPHA
from common.io import write_text
from common.registers.modes import BASELINE, TTR
from common.reporting.format import (
    estimate,
    in_report_order,
    interval,
    markdown_table,
    metric_label,
    number,
    p_text,
    p_value,
    signed,
)

if TYPE_CHECKING:  # the run's state is built by the app layer, above this one
    from common.app.runstate import RunState


def verdicts(table: pd.DataFrame, *, mode: str = TTR, baseline: str = BASELINE, alpha: float = ALPHA) -> list[str]:
    """One plain-English sentence per headline metric of ``table`` (a ``metrics.csv`` table of
    :func:`common.evaluation.metrics.evaluate_modes`): is ``mode`` better, worse, or not detectably
    different from ``baseline``?

    ``baseline`` names the baseline the table was computed against (its row carries no
    differences).  The decision is ``p_m < alpha`` (paired bootstrap) and the sign of
    ``m_diff``; the sentence quotes the difference, its 95% interval and ``p``.  At the default
    ``alpha = 0.05`` the decision agrees exactly with the interval (``p < 0.05`` if and only if
    the 95% interval excludes 0, :mod:`common.evaluation.stats`); at another ``alpha`` the quoted
    interval is still the 95% one.  Every metric, top-1 included, is decided by its paired
    bootstrap (McNemar's exact p-value and counts are in the table for the caller to quote beside
    it).  A metric whose difference is undefined (e.g. no class usable for AUC) says so.
    """
    modes = list(table["mode"]) if "mode" in table.columns else []
    for wanted in (mode, baseline):
        if wanted not in modes:
            raise UserError(f"no row for mode {wanted!r} in the metrics table; rows: {', '.join(map(str, modes))}")
    # the differences on every row are against the baseline evaluate_modes used: its row has none
    base_diffs = table.loc[table["mode"] == baseline, [c for c in table.columns if c.endswith("_diff")]]
    if base_diffs.notna().to_numpy().any():
        raise UserError(f"{baseline!r} is not the baseline this metrics table was computed against")
    row = table.loc[table["mode"] == mode].iloc[0]
    level = f"{alpha * 100:g}%"
    sentences = []
    for m in in_report_order(c[: -len("_diff")] for c in table.columns if c.endswith("_diff")):
        label = metric_label(m, capital=True)
        d, lo, hi, p = (float(row.get(f"{m}_diff", math.nan)), float(row.get(f"{m}_diff_lo", math.nan)),
                        float(row.get(f"{m}_diff_hi", math.nan)), float(row.get(f"p_{m}", math.nan)))
        if math.isnan(d) or math.isnan(p):
            sentences.append(f"{label}: not testable on this test split (the metric is undefined for "
                             f"{mode} or {baseline}).")
            continue
        ci = f"95% CI {interval(lo, hi, sign=True)}"
        boot = f"paired bootstrap {p_text(p)}" + (", no resample reached 0" if p == 0 else "")
        # direction from d; a significant d of exactly 0 (possible only for odd non-linear
        # metrics) takes the side of its interval
        side = np.sign(d) or np.sign(lo + hi)
        if p < alpha and side > 0:
            text = f"{mode} is better than {baseline} by {signed(d)} ({ci}, {boot})."
        elif p < alpha and side < 0:
            text = f"{mode} is worse than {baseline} by {number(-d)} (difference {signed(d)}, {ci}, {boot})."
        else:
            text = (f"no detectable difference between {mode} and {baseline} at the {level} level "
                    f"(difference {signed(d)}, {ci}, {boot}).")
        sentences.append(f"{label}: {text}")
    return sentences


def headline(summary: str) -> str | None:
    """The answer's first verdict line as ``summary.md`` states it (the first item under "The
    answer"), for the terminal's last line; None when there is none."""
    answer = summary.split("## The answer", 1)[-1] if "## The answer" in summary else ""
    for line in answer.splitlines():
        if line.startswith("## "):
            break
        if line.startswith("- "):
            return line[2:].strip()
    return None


def results_table(table: pd.DataFrame, baseline: str, mode: str) -> list[str]:
    """Markdown rows: per metric, both modes with interval and seed spread, the difference with its
    interval and the paired p-value."""
    rows = table.set_index("mode")

    def value(m: str, name: str) -> str:
        row = rows.loc[m]
        sd = row.get(f"{name}_seed_sd", math.nan)
        return estimate(row[name], row[f"{name}_lo"], row[f"{name}_hi"], sd=sd if sd > 0 else None)

    row = rows.loc[mode]
    return markdown_table(
        ["metric", baseline, mode, f"{mode} − {baseline} [95% CI]", "p (paired bootstrap)"],
        [[metric_label(name), value(baseline, name), value(mode, name),
          estimate(row.get(f"{name}_diff"), row.get(f"{name}_diff_lo"), row.get(f"{name}_diff_hi"), sign=True),
          p_value(row.get(f"p_{name}"))]
         for name in in_report_order(set(table.columns) & set(METRIC_LABELS))])


def write_summary(state: RunState, extra_sections: list[str]) -> None:
    """Write ``summary.md`` of a finished run."""
    config, dataset, backbone, metrics = state.config, state.dataset, state.backbone, state.metrics
    title = f"# {state.spec.title}: {state.options.model}, no-ttr vs ttr"
    lines = [title, ""]
    if state.options.demo:
        lines += ["> **Demo run on synthetic data with a planted model.** The images were generated, the "
                  "backbone is a small randomly initialised ViT with register neurons planted by hand at "
                  f"{state.planted}. These numbers say nothing about real medical images.", ""]
        lines += [*state.demo_check, ""] if state.demo_check else []
    n_test = int((dataset.table["split"] == "test").sum())
    lines += ["## The answer", "",
              f"Does moving the register neurons onto a test-time register (ttr) change the linear probe on "
              f"{n_test} test images? Each mode's prediction is its {len(config['probe_seeds'])} probe seeds' "
              "ensemble; differences are paired (the same bootstrap resamples of the test set for both modes).", ""]
    lines += [f"- {sentence}" for sentence in verdicts(metrics, mode=TTR, baseline=BASELINE)]
    if state.outliers is not None:
        effect = outlier_effect(state.outliers)
        if effect:
            lines += ["", effect]
    rows = metrics.set_index("mode")
    lines += ["", f"Exact McNemar test on top-1 correctness: {p_text(rows.loc[TTR].get('p_mcnemar_top1'))} "
              f"({int(rows.loc[TTR].get('mcnemar_c', 0))} images only ttr gets right, "
              f"{int(rows.loc[TTR].get('mcnemar_b', 0))} only no-ttr). These p-values are for this one run: when "
              "many datasets, backbones or settings are compared, correct for multiplicity (Holm or "
              "Benjamini-Hochberg over the runs; `python -m common.report` and `python -m common.study` list "
              "Holm-adjusted values)."]
    warnings = _warnings(state)
    if warnings:
        lines += ["", "**Read with care:**", ""] + [f"- {w}" for w in warnings]

    lines += ["", "## Results", ""] + results_table(metrics, BASELINE, TTR)
    lines += ["", "Values: the seed ensemble's metric with its 95% percentile bootstrap interval "
              f"({config['bootstrap_resamples']} resamples of the test set) and, after sd, the standard deviation of "
              "the per-seed metrics where it is above 0. Rates are fractions; kappa is in [-1, 1]."]
    auc_classes = rows.loc[TTR].get("auc_classes")
    if auc_classes is not None and np.isfinite(auc_classes):
        lines[-1] += f" AUC averages over the {int(auc_classes)} classes present in the test split."
    for extra in [m for m in metrics["mode"] if m not in (BASELINE, TTR) and "(" not in m]:
        lines += ["", f"Extra mode `{extra}` (docs/intervention.md step 3 alone, R = 0: outliers removed with nowhere to go; "
                  "not ttr):", ""] + results_table(metrics, BASELINE, extra)
    zero_shot = [m for m in metrics["mode"] if "(zero-shot)" in m]
    if len(zero_shot) == 2:
        lines += ["", "CLIP zero-shot from class-name prompts (no training; prompts in zero_shot_prompts.json), "
                  "the same paired tests:", ""] + results_table(metrics, *zero_shot)
    course = [m for m in metrics["mode"] if "(course probe)" in m]
    if len(course) == 2:
        lines += ["", "The course project's saved probes (`--reference_probes`) on raw test features extracted the "
                  "course's way: its code appends one zero register token in both modes (`run_model(..., "
                  "num_registers=1)`), so `no-ttr (course probe)` is scored on features with one zero register "
                  "appended and nothing moved onto it - not the model as released, which our no-ttr is - and "
                  "`ttr (course probe)` on ttr features with one register (class order mapped from the course "
                  "code's sorted labels):", ""] + results_table(metrics, *course)

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
    write_text(state.options.out / "summary.md", "\n".join(lines) + "\n")


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
