"""The study report's tables (one CSV each): the paper table and McNemar with Holm over the grid,
per-class recall and F1, calibration, the outlier statistics and the register-neuron overlap."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from common.errors import UserError
from common.evaluation.calibration import ECE_BINS, brier_score, expected_calibration_error
from common.evaluation.stats import holm
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


def _holm_by(table: pd.DataFrame, groups: list[str], column: str = "p") -> pd.DataFrame:
    """``table`` with ``<column>_holm`` (Holm within each group of ``groups``) and ``family_size``
    (the p-values each family holds)."""
    table = table.copy()
    table[f"{column}_holm"] = math.nan
    table["family_size"] = 0
    if table.empty:
        return table
    for _, part in table.groupby(groups, sort=False):
        index = part.index
        values = table.loc[index, column].to_numpy(float)
        table.loc[index, f"{column}_holm"] = holm(values)
        table.loc[index, "family_size"] = int(np.isfinite(values).sum())
    return table


def paper_table(runs: list[CellRun], axes: list[str]) -> pd.DataFrame:
    """Per (cell, comparison, metric) the ttr - no-ttr difference, its interval and p-value from the
    cell's metrics.csv, and the Holm-adjusted p over the grid (family: one metric, one comparison kind)."""
    rows = []
    for run in runs:
        columns = run.metrics.columns
        metrics = in_report_order(m for m in columns if f"{m}_diff" in columns)
        for kind, base, mode in comparisons_of(run):
            for metric in metrics:
                rows.append({**identity_of(run, axes), "comparison": kind, "metric": metric,
                             "no_ttr": value_of(run.metrics, base, metric), "ttr": value_of(run.metrics, mode, metric),
                             "diff": value_of(run.metrics, mode, f"{metric}_diff"),
                             "diff_lo": value_of(run.metrics, mode, f"{metric}_diff_lo"),
                             "diff_hi": value_of(run.metrics, mode, f"{metric}_diff_hi"),
                             "p": value_of(run.metrics, mode, f"p_{metric}")})
    table = pd.DataFrame(rows, columns=["cell", "dataset", "model", *axes, "comparison", "metric", "no_ttr", "ttr",
                                        "diff", "diff_lo", "diff_hi", "p"])
    return _holm_by(table, ["comparison", "metric"])


def mcnemar_table(runs: list[CellRun], axes: list[str]) -> pd.DataFrame:
    """Per (cell, comparison) the exact McNemar test on top-1 correctness, Holm over the grid."""
    rows = []
    for run in runs:
        for kind, _, mode in comparisons_of(run):
            rows.append({**identity_of(run, axes), "comparison": kind,
                         "only_ttr_right": value_of(run.metrics, mode, "mcnemar_c"),
                         "only_no_ttr_right": value_of(run.metrics, mode, "mcnemar_b"),
                         "p": value_of(run.metrics, mode, "p_mcnemar_top1")})
    table = pd.DataFrame(rows, columns=["cell", "dataset", "model", *axes, "comparison", "only_ttr_right",
                                        "only_no_ttr_right", "p"])
    return _holm_by(table, ["comparison"])


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
    top-class probability) and ``brier`` (multi-class), from the mode's predictions file."""
    rows = []
    for run in runs:
        for kind, base, mode in comparisons_of(run):
            for which in (base, mode):
                path = predictions_path(run.folder, which)
                if not path.is_file():
                    continue
                _, true, predicted, proba = read_predictions(path)
                rows.append({**identity_of(run, axes), "comparison": kind, "mode": which, "n": len(true),
                             "accuracy": float((true == predicted).mean()) if len(true) else math.nan,
                             "mean_confidence": float(proba.max(axis=1).mean()) if len(true) else math.nan,
                             "ece": expected_calibration_error(proba, true, n_bins),
                             "brier": brier_score(proba, true)})
    return pd.DataFrame(rows, columns=["cell", "dataset", "model", *axes, "comparison", "mode", "n", "accuracy",
                                       "mean_confidence", "ece", "brier"])


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


def spearman(a: dict, b: dict) -> tuple[float, int]:
    """Spearman's rho of the scores of the (layer, neuron) pairs both rankings score, and how many."""
    from scipy.stats import spearmanr

    keys = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
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
    sets and Spearman's rho of the full score vectors; for DINOv2 ViT-L/14, each dataset against the
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
                rho, n = spearman(a.scores(), b.scores())
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
