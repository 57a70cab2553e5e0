"""The study report's ``report.md``: the answer first (the paper table with Holm over the grid),
then per-class deltas, calibration, register neurons, outlier tokens, the cells and what was not run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.evaluation.calibration import ECE_BINS
from common.evaluation.stats import ALPHA
from common.reporting.format import (
    MISSING,
    P_ZERO_NOTE,
    estimate,
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
from common.reporting.study_tables import PAPER_LABEL, calibration_pairs, paper_set


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
              + f"), {len(study['skipped'])} combinations not run (section 8)."
              + (f" This invocation took {number(study['wall_seconds'], 0)} s" if study.get("wall_seconds") else "")
              + (f"; the finished cells' runs took {number(run_seconds, 0)} s in all (their config.json)."
                 if run_seconds else "."),
              "", f"Command: `{' '.join(study.get('command_line', []))}`", ""]
    failed = [c for c in cells if c["status"] == "failed"]
    if failed:
        lines += ["**Failed cells** (not in the tables below):", ""] + \
                 [f"- {c['name']}: exit {c['exit_code']}: {c['error'] or 'no error line'}" for c in failed] + [""]
    if not paper.empty:
        probe = paper[paper["comparison"] == "probe"]
        for metric in ("top1", "f1_macro"):
            part = probe[probe["metric"] == metric]
            if part.empty:
                continue
            up = int(((part["p_holm"] < ALPHA) & (part["diff"] > 0)).sum())
            down = int(((part["p_holm"] < ALPHA) & (part["diff"] < 0)).sum())
            lines.append(f"- {metric_label(metric, capital=True)}: ttr is better in {up}, worse in {down}, and not "
                         f"detectably different in {len(part) - up - down} of {len(part)} cells (Holm-adjusted "
                         f"p < {ALPHA:g} over the grid).")
        lines.append("")
    return lines


def _paper_section(paper: pd.DataFrame, mcnemar: pd.DataFrame) -> list[str]:
    if paper.empty:
        return ["## 1. The paper table", "", "No finished cell."]
    metrics = in_report_order(set(paper["metric"]))
    indexed = paper.set_index(["cell", "comparison", "metric"])
    probe_n = paper.loc[paper["comparison"] == "probe", "cell"].nunique()
    zero_n = paper.loc[paper["comparison"] == "zero-shot", "cell"].nunique()
    lines = ["## 1. The paper table: ttr − no-ttr per cell", "",
             "Each cell's difference of the seed ensembles (ttr − no-ttr) on the same test images with its 95% "
             f"paired-bootstrap interval, as the cell's metrics.csv holds them. **Bold**: Holm-adjusted p < {ALPHA:g}. "
             "Rates are fractions; kappa is in [-1, 1].", ""]
    rows = []
    for cell, kind in _entries(paper):
        cells = []
        for m in metrics:
            if (cell, kind, m) not in indexed.index:
                cells.append(MISSING)
                continue
            r = indexed.loc[(cell, kind, m)]
            text = estimate(r["diff"], r["diff_lo"], r["diff_hi"], sign=True)
            cells.append(f"**{text}**" if not is_missing(r["p_holm"]) and r["p_holm"] < ALPHA else text)
        rows.append([entry_label(cell, kind), *cells])
    lines += markdown_table(["cell", *map(metric_label, metrics)], rows)
    lines += ["", "Paired-bootstrap p-value and, in brackets, the Holm-adjusted p-value:", ""]
    rows = []
    for cell, kind in _entries(paper):
        rows.append([entry_label(cell, kind), *(
            f"{p_value(indexed.loc[(cell, kind, m), 'p'])} ({p_value(indexed.loc[(cell, kind, m), 'p_holm'])})"
            if (cell, kind, m) in indexed.index else MISSING for m in metrics)])
    lines += markdown_table(["cell", *map(metric_label, metrics)], rows)
    lines += ["", f"**Multiplicity (Holm 1979, family-wise error rate).** For each metric, the family is the "
              f"{probe_n} probe comparisons of the grid (one per finished cell that reports the metric: qwk exists "
              "for APTOS cells only, manufacturer top-1 for Pacemaker cells only)"
              + (f"; the {zero_n} CLIP zero-shot comparisons form a separate family per metric" if zero_n else "")
              + "; McNemar on top-1 is its own family. A comparison without that p-value is left out of its "
              "family (paper_table.csv gives each family's size). A difference is established across the grid "
              f"only where its Holm-adjusted p is below {ALPHA:g}. {P_ZERO_NOTE}", "",
              "![ttr minus no-ttr per cell, headline metrics](paper_table.png)", "",
              "Exact McNemar test on top-1 correctness:", ""]
    rows = [[entry_label(r["cell"], r["comparison"]), number(r["only_ttr_right"], 0),
             number(r["only_no_ttr_right"], 0), p_value(r["p"]), p_value(r["p_holm"])] for _, r in mcnemar.iterrows()]
    lines += markdown_table(["cell", "only ttr right", "only no-ttr right", "p", "p Holm"], rows)
    return lines


def _other_rows(runs: list[CellRun]) -> list[str]:
    """Rows of the cells' metrics.csv that no comparison above uses (extra modes, course probes)."""
    used = {mode for _, base, mode in COMPARISONS} | {base for _, base, _ in COMPARISONS}
    other = sorted({mode for run in runs for mode in run.metrics.index} - used)
    if not other:
        return []
    return ["", "Rows of the cells' metrics.csv outside this report (each with the comparison its run recorded, "
            "outside the Holm families): " + ", ".join(f"`{mode}`" for mode in other) + "."]


def _per_class_section(per_class: pd.DataFrame, datasets: list[str], top: int = 3) -> list[str]:
    lines = _section("## 2. Per-class deltas: which classes gain, which lose",
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
    lines = _section("## 3. Calibration per mode",
                     "From each mode's predictions file (the seed ensemble's probabilities on the test split). "
                     f"**ECE**: {ECE_BINS} equal-width bins on the top-class probability (bin m holds confidences in "
                     f"(m/{ECE_BINS}, (m+1)/{ECE_BINS}]); ECE = Σ (images in bin / N) · |accuracy − mean confidence| "
                     "over the bins. **Brier**: multi-class, mean over images of Σ_c (p_c − 1[c = true])², in [0, 2]. "
                     "Lower is better for both.")
    if calibration.empty:
        return lines + ["No predictions files."]
    rows = [[entry_label(cell, kind), number(b["n"], 0), _change(b["ece"], a["ece"]), signed(a["ece"] - b["ece"]),
             _change(b["brier"], a["brier"]), signed(a["brier"] - b["brier"]),
             _change(b["mean_confidence"], a["mean_confidence"])]
            for cell, kind, b, a in calibration_pairs(calibration)]
    lines += markdown_table(["cell", "test images", "ECE no-ttr → ttr", "ΔECE", "Brier no-ttr → ttr", "ΔBrier",
                     "mean confidence"], rows)
    return lines + ["", "![ECE and Brier score per cell](calibration.png)"]


def _neurons_section(overlap: pd.DataFrame, rankings: list[Ranking], figures: list[tuple[str, str]],
                     paper_cells: list[str]) -> list[str]:
    lines = ["## 4. Register neurons: overlap across datasets and with the published ImageNet set", "",
             "Jaccard index of the selected (layer, neuron) sets (|A ∩ B| / |A ∪ B|) between the datasets of one "
             "backbone, and Spearman's rank correlation of the full score vectors (every neuron of every layer that "
             "both detections scored). Cells that differ only in ttr settings share their dataset's detection, "
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
    lines += ["", "## 5. Register-neuron scores by layer", "",
              "Per backbone, the detection scores of every layer (top "
              f"{TOP_PER_LAYER} per layer and dataset; scores of 0 - layers without a sparse neuron - are not "
              "drawn). The dashed line is the `highest_layer` cut: neurons right of it are never selected; stars "
              "mark neurons ranked within the top_k of the whole ranking that the cut leaves out.", ""]
    lines += [f"![{title}]({name})" for name, title in figures] or ["No detected ranking."]
    return lines


def _outliers_section(outliers: pd.DataFrame) -> list[str]:
    lines = _section("## 6. Outlier tokens per cell",
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
    lines = ["## 7. Cells", "",
             f"Each cell is an ordinary run folder; re-run one alone with its command from the repository root "
             f"(`cd {root}`). A cell is resumed when its config.json says done and records this same command.", ""]
    rows = [[c["name"], c["status"], number(c["exit_code"], 0), number(c["seconds"], 0), c["error"] or "",
             f"`{c['command']}`"] for c in study["cells"]]
    lines += markdown_table(["cell", "status", "exit", "seconds", "error", "command"], rows)
    if notes:
        lines += ["", "Finished cells that could not be read: " + "; ".join(notes)]
    lines += ["", "## 8. Combinations not run", ""]
    if study["skipped"]:
        lines += markdown_table(["dataset", "model", "combination", "reason"],
                        [[s["dataset"], s["model"], s["combination"], s["reason"]] for s in study["skipped"]])
    else:
        lines += ["None: every combination of the grid applies."]
    return lines


def markdown(study: dict, runs: list[CellRun], notes: list[str], tables: dict[str, pd.DataFrame],
             rankings: list[Ranking], score_figures: list[tuple[str, str]]) -> str:
    """The whole ``report.md``: ``tables`` holds the study's ``paper_table``, ``mcnemar``,
    ``per_class``, ``calibration``, ``outliers`` and ``neuron_overlap`` tables; ``score_figures``
    the (file name, title) of each scores-by-layer figure."""
    paper_cells = [r.name for r in runs if (r.neurons or {}).get("source") == "paper"]
    lines = _header(study, tables["paper_table"], runs)
    lines += _paper_section(tables["paper_table"], tables["mcnemar"]) + _other_rows(runs) + [""]
    lines += _per_class_section(tables["per_class"], list(study["datasets"])) + [""]
    lines += _calibration_section(tables["calibration"]) + [""]
    lines += _neurons_section(tables["neuron_overlap"], rankings, score_figures, paper_cells) + [""]
    lines += _outliers_section(tables["outliers"]) + [""]
    lines += _cells_section(study, notes) + [""]
    lines += ["## Files", "", "paper_table.csv (every metric, p and Holm p), mcnemar.csv, per_class.csv, "
              "calibration.csv, neuron_overlap.csv, outliers.csv, cells.csv, skipped.csv and the figures above; "
              "the study record is ../study.json, each cell's output tail ../logs/<cell>.log.", ""]
    return "\n".join(lines)
