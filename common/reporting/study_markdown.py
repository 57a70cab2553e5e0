"""The study report's ``report.md``: the answer first (the paper table with Holm over the grid),
then per-class deltas, calibration, register neurons, outlier tokens, the cells and what was not run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.evaluation.calibration import ECE_BINS
from common.evaluation.compare import BETTER, NO_DIFFERENCE, NOT_ROBUST, UNTESTABLE, WORSE
from common.evaluation.stats import ALPHA
from common.reporting.format import (
    MISSING,
    estimate,
    interval,
    in_report_order,
    is_missing,
    markdown_table,
    metric_label,
    number,
    p_value,
    percent,
    signed,
)
from common.reporting.study_figures import TOP_PER_LAYER
from common.reporting.study_read import COMPARISONS, CellRun, Ranking, entry_label, to_float
from common.reporting.study_tables import CONFIRMATORY, PAPER_LABEL, calibration_pairs, paper_set


def _entries(table: pd.DataFrame) -> list[tuple[str, str]]:
    """The (cell, comparison) pairs of ``table`` in first-appearance order."""
    return list(dict.fromkeys(zip(table["cell"], table["comparison"])))


def _section(heading: str, intro: str) -> list[str]:
    return [heading, "", intro, ""]


def _change(before, after, digits: int = 3) -> str:
    """``before → after`` (no-ttr -> ttr)."""
    return f"{number(before, digits)} → {number(after, digits)}"


def _header(study: dict, paper: pd.DataFrame, runs: list[CellRun]) -> list[str]:
    cells = study["cells"]
    counts = {s: sum(c["status"] == s for c in cells) for s in ("done", "resumed", "failed", "interrupted", "pending")}
    axes = study["axes"]
    run_seconds = sum(to_float((r.info.get("stage_seconds") or {}).get("total")) for r in runs
                      if math.isfinite(to_float((r.info.get("stage_seconds") or {}).get("total"))))
    lines = ["# Test-time registers on medical images: the study", ""]
    if study.get("demo"):
        planted = sorted({tuple(map(tuple, r.info.get("planted") or [])) for r in runs})
        lines += ["> **Demo study on synthetic data with planted models.** Every image was generated (in each "
                  "dataset's real folder layout) and every backbone is a small randomly initialised ViT with register "
                  "neurons planted by hand"
                  + (f" (planted (layer, neuron): {', '.join(str(list(p)) for p in planted)})" if planted else "")
                  + ". These numbers show that the pipeline works; they say nothing about real medical images or "
                    "pretrained CLIP / DINOv2.", ""]
    lines += [f"Grid: datasets {', '.join(study['datasets'])} × models {', '.join(study['models'])}"
              + "".join(f" × {axis} {{{', '.join(v)}}}" for axis, v in axes.items())
              + f"; {len(cells)} cells ({counts['done']} run now, {counts['resumed']} resumed, {counts['failed']} "
                f"failed"
              + (f", {counts['pending'] + counts['interrupted']} not run" if counts['pending'] + counts['interrupted']
                 else "")
              + f"), {len(study['skipped'])} combinations not run (section 9)." + _timing(study, run_seconds),
              "", f"Command: `{' '.join(study.get('command_line', []))}`", ""]
    failed = [c for c in cells if c["status"] == "failed"]
    if failed:
        lines += ["**Failed cells** (not in the tables below):", ""] + \
                 [f"- {c['name']}: exit {c['exit_code']}: {c['error'] or 'no error line'}" for c in failed] + [""]
    family = paper[paper["family"] == CONFIRMATORY] if not paper.empty else paper
    if not family.empty:
        counts = family["verdict"].value_counts()
        lines.append(f"**The answer** (primary metric of each of the {len(family)} main cells, Holm over the "
                     f"{int(family['family_size'].max())} of them): ttr is better in {counts.get(BETTER, 0)}, worse "
                     f"in {counts.get(WORSE, 0)}, not robust to probe retraining in {counts.get(NOT_ROBUST, 0)} and "
                     f"not detectably different in {counts.get(NO_DIFFERENCE, 0)}"
                     + (f" (untestable in {counts.get(UNTESTABLE, 0)})" if counts.get(UNTESTABLE, 0) else "")
                     + ". Everything else in this report is exploratory.")
        lines.append("")
    return lines


def _paper_section(paper: pd.DataFrame) -> list[str]:
    if paper.empty:
        return ["## 1. The paper table", "", "No finished cell."]
    metrics = in_report_order(set(paper["metric"]))
    indexed = paper.set_index(["cell", "comparison", "metric"])
    family = paper[paper["family"] == CONFIRMATORY]
    size = int(family["family_size"].max()) if not family.empty else 0
    lines = ["## 1. The answer: the primary metric of the main cells", "",
             "Main cells: the datasets × models the study lists, each at its axes' main values (the configured value "
             "where the grid has it, else the first value given). Per main cell, ttr − no-ttr on its primary metric "
             "(configs.PRIMARY_METRIC: top-1 for Pacemaker and OrthoNet, quadratic weighted kappa for APTOS) with its "
             "95% interval and test, conditional on the fitted probes; the p-value Holm-adjusted over the family of "
             f"these {size} tests (Holm 1979, family-wise error rate); with probe refits, the combined interval (test "
             f"set + probe retraining). The verdict needs the Holm-adjusted p below {ALPHA:g} and, with refits, a "
             "combined interval that excludes 0.", ""]
    rows = [[r["cell"], metric_label(r["metric"]), _difference(r), p_value(r["p"]), r["test"], p_value(r["p_holm"]),
             interval(r["diff_lo_refit"], r["diff_hi_refit"], sign=True) if r["refits"] > 0 else "no refits",
             r["verdict"]] for _, r in family.iterrows()]
    lines += markdown_table(["main cell", "primary metric", "ttr − no-ttr [95% CI]", "p", "test", "p Holm",
                             "combined 95% CI (refits)", "verdict"], rows) if rows else ["No main cell finished."]
    recomputed = sorted(set(paper.loc[paper["recomputed"].astype(bool), "cell"]))
    if recomputed:
        lines += ["", "Cells written by an older version, their statistics recomputed here from their predictions "
                  "files (no probe refits; seed spread as recorded): " + ", ".join(recomputed) + "."]
    lines += ["", "## 2. Every cell and metric (exploratory, unadjusted)", "",
              "The sensitivity axes (every cell that is not a main cell), the secondary metrics and the CLIP zero-shot "
              "comparisons, each with its 95% interval (Tango's score interval for top-1 and manufacturer top-1 with "
              "the discordant counts; the paired percentile bootstrap otherwise) and its unadjusted p-value (exact "
              "McNemar; paired permutation test otherwise). **Bold**: the primary metric of a main cell. Rates are "
              "fractions; kappa is in [-1, 1].", ""]
    rows = []
    for cell, kind in _entries(paper):
        cells = []
        for m in metrics:
            if (cell, kind, m) not in indexed.index:
                cells.append(MISSING)
                continue
            r = indexed.loc[(cell, kind, m)]
            text = f"{estimate(r['diff'], r['diff_lo'], r['diff_hi'], sign=True)} p {p_value(r['p'])}"
            cells.append(f"**{text}**" if r["family"] == CONFIRMATORY else text)
        rows.append([entry_label(cell, kind) + ("" if paper.loc[paper["cell"] == cell, "main"].any() else " (sensitivity)"),
                     *cells])
    lines += markdown_table(["cell", *map(metric_label, metrics)], rows)
    lines += ["", "![ttr minus no-ttr per cell, headline metrics](paper_table.png)"]
    return lines


def _difference(r) -> str:
    """``+0.031 [+0.008, +0.054]``, with the discordant counts of a proportion."""
    text = estimate(r["diff"], r["diff_lo"], r["diff_hi"], sign=True)
    if not is_missing(r["discordant_ttr_better"]):
        text += (f" (ttr right where no-ttr wrong: {int(r['discordant_ttr_better'])}, the reverse: "
                 f"{int(r['discordant_ttr_worse'])})")
    return text


def _other_rows(runs: list[CellRun]) -> list[str]:
    """Rows of the cells' metrics.csv that no comparison above uses (extra modes, course probes)."""
    used = {mode for _, base, mode in COMPARISONS} | {base for _, base, _ in COMPARISONS}
    other = sorted({mode for run in runs for mode in run.metrics.index} - used)
    if not other:
        return []
    return ["", "Rows of the cells' metrics.csv outside this report (each with the comparison its run recorded, "
            "outside the Holm families): " + ", ".join(f"`{mode}`" for mode in other) + "."]


def _per_class_section(per_class: pd.DataFrame, datasets: list[str], top: int = 3) -> list[str]:
    lines = _section("## 3. Per-class deltas: which classes gain, which lose",
                     "Per class of the test split, recall (and F1) of ttr minus no-ttr, from the cells' predictions "
                     "files (per_class.csv has every class). Below, per cell, the largest recall gains and losses "
                     "(class, change in percentage points, test images of the class).")
    if per_class.empty:
        return lines + ["No predictions files."]
    rows = []
    for (cell, kind), part in per_class.groupby(["cell", "comparison"], sort=False):
        part = part[np.isfinite(part["recall_delta"])]
        gains = part[part["recall_delta"] > 0].nlargest(top, "recall_delta")
        losses = part[part["recall_delta"] < 0].nsmallest(top, "recall_delta")
        same = int((part["recall_delta"] == 0).sum())

        def listing(frame: pd.DataFrame) -> str:
            return "; ".join(f"{r['class']} {signed(100 * r['recall_delta'], 0)} (n={int(r['support'])})"
                             for _, r in frame.iterrows()) or "none"

        rows.append([entry_label(cell, kind), listing(gains), listing(losses),
                     f"{int((part['recall_delta'] > 0).sum())} / {int((part['recall_delta'] < 0).sum())} / {same}",
                     signed(part["f1_delta"].mean())])
    lines += markdown_table(["cell", "top gains (recall, pp)", "top losses (recall, pp)", "classes up / down / same",
                     "mean F1 change"], rows)
    for dataset in datasets:
        if (per_class["dataset"] == dataset).any():
            lines += ["", f"![{dataset}: per-class recall change](per_class_{dataset}.png)"]
    return lines


def _calibration_section(calibration: pd.DataFrame) -> list[str]:
    lines = _section("## 4. Calibration per mode",
                     "From each mode's predictions file (the seed ensemble's probabilities on the test split). "
                     f"**ECE**: {ECE_BINS} equal-width bins on the top-class probability (bin m holds confidences in "
                     f"(m/{ECE_BINS}, (m+1)/{ECE_BINS}]); ECE = Σ (images in bin / N) · |accuracy − mean confidence| "
                     "over the bins. **Brier**: multi-class, mean over images of Σ_c (p_c − 1[c = true])², in [0, 2]. "
                     "Lower is better for both. Each change ttr − no-ttr has its 95% paired percentile bootstrap "
                     "interval (the cell's resamples of the test images, the same for both modes; exploratory).")
    if calibration.empty:
        return lines + ["No predictions files."]
    rows = [[entry_label(cell, kind), number(b["n"], 0), _change(b["ece"], a["ece"]),
             estimate(a["ece_diff"], a["ece_diff_lo"], a["ece_diff_hi"], sign=True), _change(b["brier"], a["brier"]),
             estimate(a["brier_diff"], a["brier_diff_lo"], a["brier_diff_hi"], sign=True),
             _change(b["mean_confidence"], a["mean_confidence"])]
            for cell, kind, b, a in calibration_pairs(calibration)]
    lines += markdown_table(["cell", "test images", "ECE no-ttr → ttr", "ΔECE [95% CI]", "Brier no-ttr → ttr",
                             "ΔBrier [95% CI]", "mean confidence"], rows)
    return lines + ["", "![ECE and Brier score per cell](calibration.png)"]


def _neurons_section(overlap: pd.DataFrame, rankings: list[Ranking], figures: list[tuple[str, str]],
                     paper_cells: list[str]) -> list[str]:
    lines = ["## 5. Register neurons: overlap across datasets and with the published ImageNet set", "",
             "Jaccard index of the selected (layer, neuron) sets (|A ∩ B| / |A ∪ B|) between the datasets of one "
             "backbone, and Spearman's rank correlation of their detection scores over the union of the two selections "
             "(the neurons either dataset puts on top; over every neuron the thousands of non-register neurons would "
             "dominate it). Cells that differ only in ttr settings share their dataset's detection, "
             "so each (backbone, dataset) appears once.", ""]
    if not rankings:
        lines += ["No cell detected its register neurons" + (" (every DINOv2 cell used --neurons paper)."
                                                             if paper_cells else ".")]
    elif overlap.empty:
        lines += ["Only one dataset per backbone was detected: no pair to compare."]
    else:
        rows = [[r["backbone"], f"{r['highest_layer']} / {r['top_k']}", r["set_a"], r["set_b"],
                 f"{int(r['shared'])} of {int(r['selected_a'])} / {int(r['selected_b'])}", number(r["jaccard"]),
                 number(r["spearman_rho"]) + (f" (n={int(r['spearman_n'])})" if r["spearman_n"] else ""),
                 number(r["paper_median_rank"], 0)] for _, r in overlap.iterrows()]
        lines += markdown_table(["backbone", "highest_layer / top_k", "A", "B", "shared of selected A / B", "Jaccard",
                         "Spearman ρ of scores", "published neurons' median rank in A"], rows)
    has_paper = (overlap["set_b"] == PAPER_LABEL).any() if not overlap.empty else False
    lines += ["", f"The published set: the {len(paper_set())} register neurons of DINOv2 ViT-L/14 found on "
              "ImageNet by the test-time-registers authors (common.registers.neurons.PAPER_NEURONS_DINOV2_VITL14); no scores "
              "were published, so against it only the Jaccard index and the published neurons' median rank in the "
              "detected ranking (1 = best) are given."
              + ("" if has_paper else " No DINOv2 ViT-L/14 cell detected its own neurons here (the demo's planted "
                                      "models are not ViT-L/14), so no row compares with it.")]
    if paper_cells:
        lines += ["", "Cells run with the published neurons (`--neurons paper`): " + ", ".join(paper_cells) + "."]
    lines += ["", "## 6. Register-neuron scores by layer", "",
              "Per backbone, the detection scores of every layer (top "
              f"{TOP_PER_LAYER} per layer and dataset; scores of 0 - layers without a sparse neuron - are not "
              "drawn). The dashed line is the `highest_layer` cut: neurons right of it are never selected; stars "
              "mark neurons ranked within the top_k of the whole ranking that the cut leaves out.", ""]
    lines += [f"![{title}]({name})" for name, title in figures] or ["No detected ranking."]
    return lines


def _outliers_section(outliers: pd.DataFrame) -> list[str]:
    lines = _section("## 7. Outlier tokens per cell",
                     "From each cell's outliers.csv (the analysis images of its test split, at the detect layer): the "
                     "share of image patches whose norm exceeds the threshold, the mean over images of the largest "
                     "image-patch norm, the test-time register's norm, and the last layer's share of CLS attention on "
                     "the register.")
    if outliers.empty:
        return lines + ["No outliers.csv."]
    share = "patch_share_above_threshold"
    rows = [[r["cell"], number(r["threshold"], 1),
             f"{percent(r[f'{share}_no_ttr'])} → {percent(r[f'{share}_ttr'])}",
             _change(r["mean_max_patch_norm_no_ttr"], r["mean_max_patch_norm_ttr"], 1),
             number(r["register_norm_ttr"], 1), number(r["cls_attention_on_register_ttr"]),
             _change(r["cls_attention_entropy_no_ttr"], r["cls_attention_entropy_ttr"])]
            for _, r in outliers.iterrows()]
    lines += markdown_table(["cell", "threshold", "patches above threshold no-ttr → ttr", "max patch norm no-ttr → ttr",
                     "register norm (ttr)", "CLS attention on register (ttr)", "CLS attention entropy (nats)"], rows)
    return lines + ["", "![outlier tokens per cell](outliers.png)"]


def _cells_section(study: dict, notes: list[str]) -> list[str]:
    root = study.get("root", ".")
    lines = ["## 8. Cells", "",
             f"Each cell is an ordinary run folder; re-run one alone with its command from the repository root "
             f"(`cd {root}`). A cell is resumed when its config.json says done and records this same command.", ""]
    rows = [[c["name"], c["status"], number(c["exit_code"], 0), number(c["seconds"], 0), c["error"] or "",
             f"`{c['command']}`"] for c in study["cells"]]
    lines += markdown_table(["cell", "status", "exit", "seconds", "error", "command"], rows)
    if notes:
        lines += ["", "Finished cells that could not be read: " + "; ".join(notes)]
    lines += ["", "## 9. Combinations not run", ""]
    if study["skipped"]:
        lines += markdown_table(["dataset", "model", "combination", "reason"],
                        [[s["dataset"], s["model"], s["combination"], s["reason"]] for s in study["skipped"]])
    else:
        lines += ["None: every combination of the grid applies."]
    return lines


def markdown(study: dict, runs: list[CellRun], notes: list[str], tables: dict[str, pd.DataFrame],
             rankings: list[Ranking], score_figures: list[tuple[str, str]]) -> str:
    """The whole ``report.md``: ``tables`` holds the study's ``paper_table``,
    ``per_class``, ``calibration``, ``outliers`` and ``neuron_overlap`` tables; ``score_figures``
    the (file name, title) of each scores-by-layer figure."""
    paper_cells = [r.name for r in runs if (r.neurons or {}).get("source") == "paper"]
    lines = _header(study, tables["paper_table"], runs)
    lines += _paper_section(tables["paper_table"]) + _other_rows(runs) + [""]
    lines += _per_class_section(tables["per_class"], list(study["datasets"])) + [""]
    lines += _calibration_section(tables["calibration"]) + [""]
    lines += _neurons_section(tables["neuron_overlap"], rankings, score_figures, paper_cells) + [""]
    lines += _outliers_section(tables["outliers"]) + [""]
    lines += _cells_section(study, notes) + [""]
    lines += ["## Files", "", "paper_table.csv (every metric, its test and p, the Holm family and verdicts), per_class.csv, "
              "calibration.csv, neuron_overlap.csv, outliers.csv, cells.csv, skipped.csv and the figures above; "
              "the study record is ../study.json, each cell's output tail ../logs/<cell>.log.", ""]
    return "\n".join(lines)


def _timing(study: dict, run_seconds: float) -> str:
    """' This invocation took 11 s; the finished cells' runs took 9 s in all (their config.json).', or
    the part of it that is known (a --report_only invocation runs no cell and has no wall time)."""
    parts = []
    if study.get("wall_seconds"):
        parts.append(f"this invocation took {number(study['wall_seconds'], 0)} s")
    if run_seconds:
        parts.append(f"the finished cells' runs took {number(run_seconds, 0)} s in all (their config.json)")
    text = "; ".join(parts)
    return f" {text[0].upper()}{text[1:]}." if text else ""
