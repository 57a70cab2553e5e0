"""``summary.md``: a run for a human, the answer first (docs/run.md).

It opens with the verdict - one sentence per headline metric (better, worse, or no detectable
difference at the 5% level, with the difference and its interval) - and the outlier effect in
numbers, then flags what a reader must know (probes that did not converge, strong register
neurons left out by ``highest_layer``, leaks between splits), then the side-by-side table, the
run's settings and the figures.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.app.runstate import RunState
from common.evaluation.analysis import outlier_effect
from common.evaluation.metrics import verdicts
from common.io import write_text
from common.registers.modes import BASELINE, TTR

METRIC_NAMES = {
    "top1": "top-1 accuracy", "top3": "top-3 accuracy", "f1_macro": "macro F1",
    "precision_macro": "macro precision", "recall_macro": "macro recall", "auc_macro": "macro one-vs-rest AUC",
    "balanced_accuracy": "balanced accuracy", "qwk": "quadratic weighted kappa",
    "manufacturer_top1": "manufacturer top-1",
}


def _fmt(value, digits: int = 3, sign: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _p(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return "<0.001" if value < 1e-3 else f"{value:.3f}"


def metric_names(table: pd.DataFrame) -> list[str]:
    return [m for m in METRIC_NAMES if m in table.columns]


def results_table(table: pd.DataFrame, baseline: str, mode: str) -> list[str]:
    """Markdown rows: per metric, both modes with interval and seed spread, the difference with its
    interval and the paired p-value."""
    rows = table.set_index("mode")
    lines = [f"| metric | {baseline} | {mode} | {mode} − {baseline} [95% CI] | p (paired bootstrap) |",
             "|---|---|---|---|---|"]
    for name in metric_names(table):
        cells = []
        for m in (baseline, mode):
            row = rows.loc[m]
            sd = row.get(f"{name}_seed_sd", float("nan"))
            cells.append(f"{_fmt(row[name])} [{_fmt(row[name + '_lo'])}, {_fmt(row[name + '_hi'])}]"
                         + (f" ± {_fmt(sd)}" if isinstance(sd, float) and np.isfinite(sd) and sd > 0 else ""))
        row = rows.loc[mode]
        difference = (f"{_fmt(row.get(name + '_diff'), sign=True)} [{_fmt(row.get(name + '_diff_lo'), sign=True)}, "
                      f"{_fmt(row.get(name + '_diff_hi'), sign=True)}]")
        lines.append(f"| {METRIC_NAMES[name]} | {cells[0]} | {cells[1]} | {difference} | {_p(row.get('p_' + name))} |")
    return lines


def write_summary(state: RunState, extra_sections: list[str]) -> None:
    """Write ``summary.md`` of a finished run."""
    config, dataset, backbone, metrics = state.config, state.dataset, state.backbone, state.metrics
    title = f"# {state.spec.title}: {state.options.model}, no-ttr vs ttr"
    lines = [title, ""]
    if state.options.demo:
        lines += ["> **Demo run on synthetic data with a planted model.** The images were generated, the "
                  "backbone is a small randomly initialised ViT with register neurons planted by hand at "
                  f"{state.planted}. These numbers say nothing about real medical images.", ""]
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
    lines += ["", f"Exact McNemar test on top-1 correctness: p = {_p(rows.loc[TTR].get('p_mcnemar_top1'))} "
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
              f"({config['bootstrap_resamples']} resamples of the test set) and ± the standard deviation of the "
              "per-seed metrics. Rates are fractions; kappa is in [-1, 1]."]
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
        lines += ["", "The course project's saved probes (`--reference_probes`), on this run's raw test features "
                  "(class order mapped from the course code's sorted labels):", ""] + results_table(metrics, *course)

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
                     + ". Raise highest_layer to include them.")
    if state.dataset.leaks:
        notes.append(f"{len(state.dataset.leaks)} file(s) with identical content appear in two splits (see "
                     "--check_data); the test metrics may be optimistic.")
    return notes
