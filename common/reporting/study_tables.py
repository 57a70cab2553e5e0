"""The study report's tables (one CSV each): the paper table with Holm over the primary metric of
the main cells, per-class recall and F1, calibration with paired intervals on its change, the
outlier statistics and the register-neuron overlap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.errors import UserError
from common.evaluation.calibration import ECE_BINS, brier_score, expected_calibration_error, weighted_brier, weighted_ece
from common.evaluation.compare import decide
from common.evaluation.metrics import PROPORTIONS
from common.evaluation.stats import bootstrap_difference, holm, resample_weights
from common.registers.modes import BASELINE, TTR
from common.registers.neurons import PAPER_IDENTITY, PAPER_NEURONS_DINOV2_VITL14
from common.reporting.format import in_report_order
from common.reporting.report import OUTLIER_STATS
from common.reporting.study_read import (
    COMPARISONS,
    CellRun,
    Ranking,
    comparisons_of,
    identity_of,
    predictions_path,
    read_predictions,
    to_float,
    value_of,
)

PAPER_LABEL = "published ImageNet set"


CONFIRMATORY = "primary, main cells"
EXPLORATORY = "exploratory"


def paper_table(runs: list[CellRun], axes: list[str]) -> pd.DataFrame:
    """Per (cell, comparison, metric) the ttr - no-ttr difference, its interval, test and p-value
    (from the cell's metrics.csv, recomputed first when an older schema wrote it), the refits'
    combined interval, and the family: Holm runs over the **primary metric of the main cells**
    (probe comparisons), which get ``p_holm``, ``family_size`` and a ``verdict``
    (:func:`common.evaluation.compare.decide` on the Holm-adjusted p); every other row is
    exploratory, unadjusted."""
    rows, sources = [], []
    for run in runs:
        columns = run.metrics.columns
        metrics = in_report_order(m for m in columns if f"{m}_diff" in columns)
        for kind, base, mode in comparisons_of(run):
            source = run.metrics.loc[mode]
            for metric in metrics:
                confirmatory = kind == "probe" and run.main and metric == run.primary
                rows.append({**identity_of(run, axes), "comparison": kind, "metric": metric, "main": run.main,
                             "primary": metric == run.primary,
                             "family": CONFIRMATORY if confirmatory else EXPLORATORY,
                             "no_ttr": value_of(run.metrics, base, metric), "ttr": value_of(run.metrics, mode, metric),
                             "diff": value_of(run.metrics, mode, f"{metric}_diff"),
                             "diff_lo": value_of(run.metrics, mode, f"{metric}_diff_lo"),
                             "diff_hi": value_of(run.metrics, mode, f"{metric}_diff_hi"),
                             "p": value_of(run.metrics, mode, f"p_{metric}"),
                             "test": "exact McNemar" if metric in PROPORTIONS else "permutation",
                             "discordant_ttr_better": value_of(run.metrics, mode, f"{metric}_discordant_ttr_better"),
                             "discordant_ttr_worse": value_of(run.metrics, mode, f"{metric}_discordant_ttr_worse"),
                             "changed_predictions": value_of(run.metrics, mode, "changed_predictions"),
                             "refits": value_of(run.metrics, mode, "refits"),
                             "diff_lo_refit": value_of(run.metrics, mode, f"{metric}_diff_lo_refit"),
                             "diff_hi_refit": value_of(run.metrics, mode, f"{metric}_diff_hi_refit"),
                             "recomputed": run.recomputed})
                sources.append(source)
    table = pd.DataFrame(rows, columns=paper_columns(axes))
    table["p_holm"] = math.nan
    table["family_size"] = 0
    table["verdict"] = ""
    family = table.index[table["family"] == CONFIRMATORY] if not table.empty else []
    if len(family):
        values = table.loc[family, "p"].to_numpy(float)
        table.loc[family, "p_holm"] = holm(values)
        table.loc[family, "family_size"] = int(np.isfinite(values).sum())
        table.loc[family, "verdict"] = [decide(sources[i], table.at[i, "metric"], p=table.at[i, "p_holm"])
                                        for i in family]
    return table


def paper_columns(axes: list[str]) -> list[str]:
    """The paper table's columns before the Holm ones."""
    return ["cell", "dataset", "model", *axes, "comparison", "metric", "main", "primary", "family", "no_ttr", "ttr",
            "diff", "diff_lo", "diff_hi", "p", "test", "discordant_ttr_better", "discordant_ttr_worse",
            "changed_predictions", "refits", "diff_lo_refit", "diff_hi_refit", "recomputed"]


def per_class_scores(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> pd.DataFrame:
    """Per class: ``support`` (true rows), ``recall`` (NaN without support) and ``f1``
    (``2 tp / (2 tp + fp + fn)``, NaN when the class is neither true nor predicted)."""
    tp = np.bincount(true[true == predicted], minlength=n_classes).astype(float)
    support = np.bincount(true, minlength=n_classes).astype(float)
    predicted_count = np.bincount(predicted, minlength=n_classes).astype(float)
    fn, fp = support - tp, predicted_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        denominator = 2 * tp + fp + fn
        f1 = np.where(denominator > 0, 2 * tp / denominator, np.nan)
    return pd.DataFrame({"support": support.astype(int), "recall": recall, "f1": f1})


def per_class_table(runs: list[CellRun], axes: list[str]) -> pd.DataFrame:
    """Per (cell, comparison, class) recall and F1 of both modes and ttr - no-ttr."""
    frames = []
    for run in runs:
        for kind, base, mode in comparisons_of(run):
            paths = predictions_path(run.folder, base), predictions_path(run.folder, mode)
            if not all(p.is_file() for p in paths):
                continue
            (names, y0, p0, _), (names1, y1, p1, _) = (read_predictions(p) for p in paths)
            if names != names1:
                raise UserError(f"{run.folder}: the predictions files of {base} and {mode} list different classes")
            before, after = per_class_scores(y0, p0, len(names)), per_class_scores(y1, p1, len(names))
            frame = pd.DataFrame({"class": names, "support": before["support"],
                                  "recall_no_ttr": before["recall"], "recall_ttr": after["recall"],
                                  "recall_delta": after["recall"] - before["recall"],
                                  "f1_no_ttr": before["f1"], "f1_ttr": after["f1"],
                                  "f1_delta": after["f1"] - before["f1"]})
            for key, value in reversed(list({**identity_of(run, axes), "comparison": kind}.items())):
                frame.insert(0, key, value)
            frames.append(frame)
    columns = ["cell", "dataset", "model", *axes, "comparison", "class", "support", "recall_no_ttr", "recall_ttr",
               "recall_delta", "f1_no_ttr", "f1_ttr", "f1_delta"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def calibration_table(runs: list[CellRun], axes: list[str], n_bins: int = ECE_BINS) -> pd.DataFrame:
    """Per (cell, mode): ``n, accuracy, mean_confidence, ece`` (``n_bins`` equal-width bins on the
    top-class probability) and ``brier`` (multi-class), from the mode's predictions file; on the
    ttr row of each comparison the change ttr - no-ttr of both with its 95% paired percentile
    bootstrap interval (``ece_diff, ece_diff_lo, ece_diff_hi``, likewise ``brier_``; the cell's
    ``bootstrap_resamples`` and ``seed``, the same resamples for both modes)."""
    rows = []
    for run in runs:
        config = run.info.get("config") or {}
        for kind, base, mode in comparisons_of(run):
            paths = {which: predictions_path(run.folder, which) for which in (base, mode)}
            read = {which: read_predictions(path) for which, path in paths.items() if path.is_file()}
            for which, (_, true, predicted, proba) in read.items():
                rows.append({**identity_of(run, axes), "comparison": kind, "mode": which, "n": len(true),
                             "accuracy": float((true == predicted).mean()) if len(true) else math.nan,
                             "mean_confidence": float(proba.max(axis=1).mean()) if len(true) else math.nan,
                             "ece": expected_calibration_error(proba, true, n_bins), "brier": brier_score(proba, true)})
            if len(read) == 2 and len(read[base][1]) == len(read[mode][1]) and len(read[base][1]):
                (_, true, _, p0), (_, _, _, p1) = read[base], read[mode]
                W = np.vstack([np.ones((1, len(true))), resample_weights(
                    len(true), int(config.get("bootstrap_resamples", 1000)), int(config.get("seed", 0)))])
                for name, score in (("ece", lambda p: weighted_ece(p, true, W, n_bins)),
                                    ("brier", lambda p: weighted_brier(p, true, W))):
                    d, lo, hi, _ = bootstrap_difference(score(p1), score(p0))
                    rows[-1].update({f"{name}_diff": d, f"{name}_diff_lo": lo, f"{name}_diff_hi": hi})
    return pd.DataFrame(rows, columns=["cell", "dataset", "model", *axes, "comparison", "mode", "n", "accuracy",
                                       "mean_confidence", "ece", "brier", "ece_diff", "ece_diff_lo", "ece_diff_hi",
                                       "brier_diff", "brier_diff_lo", "brier_diff_hi"])


def calibration_pairs(calibration: pd.DataFrame):
    """``(cell, comparison, no-ttr row, ttr row)`` of each comparison of :func:`calibration_table`
    that has both modes."""
    for (cell, kind), part in calibration.groupby(["cell", "comparison"], sort=False):
        modes = part.set_index("mode")
        base, mode = next((m0, m1) for k, m0, m1 in COMPARISONS if k == kind)
        if base in modes.index and mode in modes.index:
            yield cell, kind, modes.loc[base], modes.loc[mode]


def outliers_table(runs: list[CellRun], axes: list[str]) -> pd.DataFrame:
    """Per cell the no-ttr and ttr values of each column of its outliers.csv (``<stat>_no_ttr``,
    ``<stat>_ttr``) and the threshold the run used."""
    rows = []
    for run in runs:
        if run.outliers is None or BASELINE not in run.outliers.index or TTR not in run.outliers.index:
            continue
        row = {**identity_of(run, axes), "threshold": to_float(run.info.get("register_norm_threshold_used"))}
        for stat in OUTLIER_STATS:
            row[f"{stat}_no_ttr"] = value_of(run.outliers, BASELINE, stat)
            row[f"{stat}_ttr"] = value_of(run.outliers, TTR, stat)
        rows.append(row)
    return pd.DataFrame(rows, columns=["cell", "dataset", "model", *axes, "threshold",
                                       *(f"{s}_{m}" for s in OUTLIER_STATS for m in ("no_ttr", "ttr"))])


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b| (NaN for two empty sets)."""
    union = a | b
    return len(a & b) / len(union) if union else math.nan


def spearman(a: dict, b: dict, keys=None) -> tuple[float, int]:
    """Spearman's rho of the scores of the (layer, neuron) pairs in ``keys`` (default: every pair
    both rankings score) that both score with a finite value, and how many."""
    from scipy.stats import spearmanr

    keys = [k for k in (a if keys is None else sorted(keys))
            if k in a and k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    if len(keys) < 3:
        return math.nan, len(keys)
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, len(keys)
    rho = spearmanr(x, y).statistic
    return float(rho), len(keys)


def paper_set() -> set[tuple[int, int]]:
    """The published DINOv2 ViT-L/14 register neurons as (layer, neuron) pairs."""
    return {(layer, n) for layer, ids in PAPER_NEURONS_DINOV2_VITL14.items() for n in ids}


def _is_paper_backbone(identity: tuple | None) -> bool:
    return identity is not None and identity[:4] == (PAPER_IDENTITY.family, PAPER_IDENTITY.architecture,
                                                     PAPER_IDENTITY.layers, PAPER_IDENTITY.mlp_width)


def neuron_overlap(rankings: list[Ranking]) -> pd.DataFrame:
    """Per backbone (and selection) and pair of datasets: Jaccard of the selected (layer, neuron)
    sets and Spearman's rho of their scores over the union of the two selections (the neurons
    either ranking puts on top; the thousands of non-register neurons would swamp it); for DINOv2 ViT-L/14, each dataset against the
    published ImageNet set (Jaccard; rho is NaN, no scores were published) with the published
    neurons' median rank in the detected ranking and how many of them the selection holds."""
    rows = []
    groups: dict[tuple, list[Ranking]] = {}
    for ranking in rankings:
        groups.setdefault((ranking.identity, ranking.highest_layer, ranking.top_k), []).append(ranking)
    paper = paper_set()
    for (identity, highest, top_k), members in groups.items():
        base = {"backbone": members[0].backbone, "highest_layer": highest, "top_k": top_k}
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                rho, n = spearman(a.scores(), b.scores(), a.selected | b.selected)
                rows.append({**base, "set_a": a.dataset, "set_b": b.dataset, "selected_a": len(a.selected),
                             "selected_b": len(b.selected), "shared": len(a.selected & b.selected),
                             "jaccard": jaccard(a.selected, b.selected), "spearman_rho": rho, "spearman_n": n,
                             "paper_median_rank": math.nan})
            if _is_paper_backbone(identity):
                order = {(int(l), int(n)): rank + 1 for rank, (l, n, _) in enumerate(a.ranked)}
                ranks = [order[k] for k in paper if k in order]
                rows.append({**base, "set_a": a.dataset, "set_b": PAPER_LABEL, "selected_a": len(a.selected),
                             "selected_b": len(paper), "shared": len(a.selected & paper),
                             "jaccard": jaccard(a.selected, paper), "spearman_rho": math.nan, "spearman_n": 0,
                             "paper_median_rank": float(np.median(ranks)) if ranks else math.nan})
    return pd.DataFrame(rows, columns=["backbone", "highest_layer", "top_k", "set_a", "set_b", "selected_a",
                                       "selected_b", "shared", "jaccard", "spearman_rho", "spearman_n",
                                       "paper_median_rank"])
