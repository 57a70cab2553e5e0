"""The study's report (docs/study.md): one folder of Markdown, CSVs and figures over the grid's cells.

Input: the study record (``OUT/study.json``, written by :mod:`common.app.study`): each cell's name,
dataset, model, axis settings, folder, command, status, exit code and error line, and the skipped
combinations.  Every number comes from the cells' run folders (``config.json``, ``metrics.csv``,
``predictions_<mode>.csv``, ``outliers.csv``, ``register_neurons.json``); nothing is recomputed
from features.  Files (``OUT/report/``):

==========================  =====================================================================
``report.md``                everything below for a human, the answer first
``paper_table.csv``          one row per (cell, comparison, metric): ``cell, dataset, model,
                             <axis>..., comparison`` (``probe`` | ``zero-shot``), ``metric,
                             no_ttr, ttr, diff, diff_lo, diff_hi, p, p_holm, family_size``
                             (``diff`` = ttr - no-ttr of the seed ensembles with its 95% paired-
                             bootstrap interval and p-value, as the cell's metrics.csv has them)
``mcnemar.csv``              per (cell, comparison): ``only_ttr_right, only_no_ttr_right, p, p_holm,
                             family_size`` (exact McNemar on top-1 correctness)
``per_class.csv``            per (cell, comparison, class): ``support, recall_no_ttr, recall_ttr,
                             recall_delta, f1_no_ttr, f1_ttr, f1_delta`` (from the predictions files)
``calibration.csv``          per (cell, mode): ``n, accuracy, mean_confidence, ece, brier``
``neuron_overlap.csv``       per backbone and pair of datasets: ``selected_a, selected_b, shared,
                             jaccard, spearman_rho, spearman_n`` (+ rows against the published set)
``outliers.csv``             per cell: the no-ttr and ttr values of each run's outliers.csv
``cells.csv``                per cell: status, exit code, error line, seconds, folder, command
``skipped.csv``              the combinations not run and why
``paper_table.png``          forest plot of the headline differences, Holm-filled markers
``per_class_<dataset>.png``  recall change per class and cell (heat map, percentage points)
``calibration.png``          ECE and Brier score per cell, no-ttr -> ttr
``outliers.png``             share of patches above threshold and max patch norm, no-ttr -> ttr
``scores_by_layer_<b>.png``  register-neuron scores by layer per backbone, highest_layer cut drawn
==========================  =====================================================================

Multiplicity: Holm (1979) across the whole grid; for each metric the family is the grid's
probe comparisons (one per cell), and separately the zero-shot comparisons (one per clip cell
with ``--zero_shot``), McNemar likewise.  Holm values come from :func:`common.report.holm`.

``python -m common.studyreport STUDY_DIR`` writes the report again from ``STUDY_DIR/study.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError, run_entry
from common.evaluation.calibration import (
    ECE_BINS,
    brier_score,
    expected_calibration_error,
)
from common.evaluation.metrics import METRIC_LABELS
from common.io import save_figure, write_csv, write_text
from common.registers.modes import BASELINE, TTR, ZERO_SHOT_SUFFIX, predictions_file
from common.registers.neurons import PAPER_IDENTITY, PAPER_NEURONS_DINOV2_VITL14
from common.reporting.report import OUTLIER_STATS, holm, read_run

log = logging.getLogger(__name__)

ZERO_SHOT = ZERO_SHOT_SUFFIX
COMPARISONS = (("probe", BASELINE, TTR), ("zero-shot", BASELINE + ZERO_SHOT, TTR + ZERO_SHOT))
# The forest plot shows these (and qwk / manufacturer top-1 where a dataset has them); the CSV has all.
FOREST_METRICS = ("top1", "f1_macro", "balanced_accuracy", "auc_macro", "qwk", "manufacturer_top1")
ALPHA = 0.05
DPI = 110
COLOURS = {BASELINE: "tab:orange", TTR: "tab:blue", "zero-shot": "tab:purple", "probe": "tab:blue"}
PAPER_LABEL = "published ImageNet set"
TOP_PER_LAYER = 5       # scores drawn per layer and dataset in the score-by-layer plot
ANNOTATE_ABOVE = 4      # strong neurons above highest_layer named per dataset


@dataclass
class CellRun:
    """A finished cell, read from its run folder."""

    name: str
    dataset: str
    model: str
    settings: dict
    folder: Path
    info: dict                      # config.json
    metrics: pd.DataFrame           # metrics.csv, index mode
    outliers: pd.DataFrame | None   # outliers.csv, index mode
    neurons: dict | None            # register_neurons.json

    @property
    def backbone(self) -> str:
        return str(self.info.get("backbone") or self.model)


def predictions_path(folder: Path, mode: str) -> Path:
    """The predictions file of a metrics.csv row (:func:`common.registers.modes.predictions_file`)."""
    return folder / predictions_file(mode)


def read_predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """``(class names [C], true [N], predicted [N], probabilities [N, C])`` of a predictions file
    (class indices in the file's ``p[<class>]`` column order)."""
    frame = pd.read_csv(path)
    columns = [c for c in frame.columns if c.startswith("p[") and c.endswith("]")]
    names = [c[2:-1] for c in columns]
    index = {name: i for i, name in enumerate(names)}
    true = frame["true"].astype(str).map(index)
    predicted = frame["predicted"].astype(str).map(index)
    if true.isna().any() or predicted.isna().any():
        raise UserError(f"{path}: a true or predicted class is not among its p[...] columns")
    return names, true.to_numpy(np.int64), predicted.to_numpy(np.int64), frame[columns].to_numpy(float)


def read_cells(study: dict) -> tuple[list[CellRun], list[str]]:
    """The finished cells (status done or resumed) and a note per cell that could not be read."""
    runs, notes = [], []
    for cell in study["cells"]:
        if cell["status"] not in ("done", "resumed"):
            continue
        folder = Path(cell["folder"])
        try:
            run = read_run(folder)
        except UserError as error:
            notes.append(f"{cell['name']}: {error}")
            continue
        neurons = None
        if (folder / "register_neurons.json").is_file():
            try:
                neurons = json.loads((folder / "register_neurons.json").read_text())
            except (OSError, ValueError) as error:
                notes.append(f"{cell['name']}: register_neurons.json cannot be read ({error})")
        runs.append(CellRun(cell["name"], cell["dataset"], cell["model"], dict(cell["settings"]), folder,
                            run["info"], run["metrics"], run["outliers"], neurons))
    return runs, notes


def _identity(run: CellRun, axes: list[str]) -> dict:
    row = {"cell": run.name, "dataset": run.dataset, "model": run.model}
    row.update({axis: run.settings.get(axis, "n/a") for axis in axes})
    return row


def _comparisons(run: CellRun):
    for kind, base, mode in COMPARISONS:
        if base in run.metrics.index and mode in run.metrics.index:
            yield kind, base, mode


def _number(frame: pd.DataFrame, row: str, column: str) -> float:
    if column not in frame.columns:
        return math.nan
    value = frame.loc[row, column]
    return math.nan if value is None or pd.isna(value) else float(value)


def _holm_by(table: pd.DataFrame, groups: list[str], column: str = "p") -> pd.DataFrame:
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


# --------------------------------------------------------------------------------------------
# tables


def paper_table(runs: list[CellRun], axes: list[str]) -> pd.DataFrame:
    """Per (cell, comparison, metric) the ttr - no-ttr difference, its interval and p-value from the
    cell's metrics.csv, and the Holm-adjusted p over the grid (family: one metric, one comparison kind)."""
    rows = []
    for run in runs:
        columns = run.metrics.columns
        metrics = [m for m in METRIC_LABELS if m in columns and f"{m}_diff" in columns]
        for kind, base, mode in _comparisons(run):
            for metric in metrics:
                rows.append({**_identity(run, axes), "comparison": kind, "metric": metric,
                             "no_ttr": _number(run.metrics, base, metric), "ttr": _number(run.metrics, mode, metric),
                             "diff": _number(run.metrics, mode, f"{metric}_diff"),
                             "diff_lo": _number(run.metrics, mode, f"{metric}_diff_lo"),
                             "diff_hi": _number(run.metrics, mode, f"{metric}_diff_hi"),
                             "p": _number(run.metrics, mode, f"p_{metric}")})
    table = pd.DataFrame(rows, columns=["cell", "dataset", "model", *axes, "comparison", "metric", "no_ttr", "ttr",
                                        "diff", "diff_lo", "diff_hi", "p"])
    return _holm_by(table, ["comparison", "metric"])


def mcnemar_table(runs: list[CellRun], axes: list[str]) -> pd.DataFrame:
    """Per (cell, comparison) the exact McNemar test on top-1 correctness, Holm over the grid."""
    rows = []
    for run in runs:
        for kind, _, mode in _comparisons(run):
            rows.append({**_identity(run, axes), "comparison": kind,
                         "only_ttr_right": _number(run.metrics, mode, "mcnemar_c"),
                         "only_no_ttr_right": _number(run.metrics, mode, "mcnemar_b"),
                         "p": _number(run.metrics, mode, "p_mcnemar_top1")})
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
        for kind, base, mode in _comparisons(run):
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
            for key, value in reversed(list({**_identity(run, axes), "comparison": kind}.items())):
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
        for kind, base, mode in _comparisons(run):
            for which in (base, mode):
                path = predictions_path(run.folder, which)
                if not path.is_file():
                    continue
                _, true, predicted, proba = read_predictions(path)
                rows.append({**_identity(run, axes), "comparison": kind, "mode": which, "n": len(true),
                             "accuracy": float((true == predicted).mean()) if len(true) else math.nan,
                             "mean_confidence": float(proba.max(axis=1).mean()) if len(true) else math.nan,
                             "ece": expected_calibration_error(proba, true, n_bins),
                             "brier": brier_score(proba, true)})
    return pd.DataFrame(rows, columns=["cell", "dataset", "model", *axes, "comparison", "mode", "n", "accuracy",
                                       "mean_confidence", "ece", "brier"])


def outliers_table(runs: list[CellRun], axes: list[str]) -> pd.DataFrame:
    """Per cell the no-ttr and ttr values of each column of its outliers.csv (``<stat>_no_ttr``,
    ``<stat>_ttr``) and the threshold the run used."""
    rows = []
    for run in runs:
        if run.outliers is None or BASELINE not in run.outliers.index or TTR not in run.outliers.index:
            continue
        row = {**_identity(run, axes), "threshold": _float(run.info.get("register_norm_threshold_used"))}
        for stat in OUTLIER_STATS:
            row[f"{stat}_no_ttr"] = _number(run.outliers, BASELINE, stat)
            row[f"{stat}_ttr"] = _number(run.outliers, TTR, stat)
        rows.append(row)
    return pd.DataFrame(rows, columns=["cell", "dataset", "model", *axes, "threshold",
                                       *(f"{s}_{m}" for s in OUTLIER_STATS for m in ("no_ttr", "ttr"))])


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------------------------
# register neurons


@dataclass
class Ranking:
    """One dataset's detected ranking on one backbone."""

    dataset: str
    cell: str
    backbone: str
    identity: tuple
    highest_layer: int
    top_k: int
    selected: set[tuple[int, int]]
    ranked: np.ndarray              # [M, 3]: layer, neuron, score (best first; NaN scores kept)

    def scores(self) -> dict[tuple[int, int], float]:
        return {(int(l), int(n)): float(s) for l, n, s in self.ranked}


def _identity_key(model: dict | None) -> tuple | None:
    if not model:
        return None
    return (model.get("family"), model.get("architecture"), model.get("layers"), model.get("mlp_width"),
            model.get("weights"))


def detected_rankings(runs: list[CellRun]) -> list[Ranking]:
    """Each detected ranking once per (backbone, dataset, highest_layer, top_k): the cells of one
    dataset and backbone that differ only in ttr settings share one detection."""
    seen, rankings = set(), []
    for run in runs:
        data = run.neurons
        if not data or data.get("source") != "detected" or not data.get("ranked"):
            continue
        identity = _identity_key(data.get("model"))
        key = (identity, run.dataset, data.get("highest_layer"), data.get("top_k"))
        if key in seen:
            continue
        seen.add(key)
        selected = {(int(layer), int(n)) for layer, ids in (data.get("selected") or {}).items() for n in ids}
        ranked = np.array([[l, n, math.nan if s is None else s] for l, n, s in data["ranked"]], dtype=float)
        rankings.append(Ranking(run.dataset, run.name, run.backbone, identity, int(data.get("highest_layer", -1)),
                                int(data.get("top_k", 0)), selected, ranked))
    return rankings


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


def _paper_set() -> set[tuple[int, int]]:
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
    paper = _paper_set()
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


# --------------------------------------------------------------------------------------------
# figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "backbone"


def _entry_label(cell: str, comparison: str) -> str:
    return cell + ("  (zero-shot)" if comparison == "zero-shot" else "")


def forest_figure(table: pd.DataFrame):
    """Per headline metric a panel; per (cell, comparison) the difference with its 95% interval;
    filled marker where the Holm-adjusted p < 0.05."""
    plt = _plt()
    metrics = [m for m in FOREST_METRICS if m in set(table["metric"])]
    entries = list(dict.fromkeys(zip(table["cell"], table["comparison"])))
    labels = [_entry_label(*e) for e in entries]
    height = 1.6 + 0.34 * len(entries)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.9 * len(metrics) + 0.16 * max(map(len, labels)), height),
                             sharey=True, squeeze=False)
    y = np.arange(len(entries))[::-1]
    position = {e: y[i] for i, e in enumerate(entries)}
    for ax, metric in zip(axes[0], metrics):
        part = table[table["metric"] == metric]
        ax.axvline(0, color="0.4", lw=1)
        span = 0.01
        for kind in ("probe", "zero-shot"):
            rows = part[part["comparison"] == kind]
            if rows.empty:
                continue
            ys = np.array([position[(c, kind)] for c in rows["cell"]])
            d, lo, hi = (rows[c].to_numpy(float) for c in ("diff", "diff_lo", "diff_hi"))
            ok = np.isfinite(d)
            colour = COLOURS[kind]
            ax.errorbar(d[ok], ys[ok], xerr=np.clip(np.vstack([d - lo, hi - d])[:, ok], 0, None), fmt="none",
                        ecolor=colour, elinewidth=1.5, capsize=3)
            significant = ok & (rows["p_holm"].to_numpy(float) < ALPHA)
            ax.scatter(d[significant], ys[significant], s=36, color=colour, zorder=3)
            ax.scatter(d[ok & ~significant], ys[ok & ~significant], s=36, facecolor="white", edgecolor=colour,
                       linewidth=1.4, zorder=3)
            if ok.any():
                span = max(span, float(np.nanmax(np.abs(np.r_[lo[ok], hi[ok]]))))
        ax.set_xlim(-1.15 * span, 1.15 * span)
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=10)
        ax.set_xlabel("ttr − no-ttr (fraction)" if metric != "qwk" else "ttr − no-ttr (kappa)", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8.5)
    axes[0, 0].set_yticks(y, labels, fontsize=8.5)
    axes[0, 0].set_ylim(-0.7, len(entries) - 0.3)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", ls="", color=COLOURS["probe"], label="linear probe"),
               Line2D([], [], marker="o", ls="", color=COLOURS["zero-shot"], label="CLIP zero-shot"),
               Line2D([], [], marker="o", ls="", color="0.3", label="filled: Holm-adjusted p < 0.05"),
               Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor="0.3",
                      label="open: Holm-adjusted p ≥ 0.05")]
    if "zero-shot" not in set(table["comparison"]):
        handles.pop(1)
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8.5, frameon=False)
    fig.suptitle("ttr minus no-ttr per cell: difference of the seed ensembles with its 95% paired-bootstrap "
                 "interval", fontsize=11)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    return fig


def per_class_figure(table: pd.DataFrame, dataset: str):
    """Heat map: rows (cell, comparison) of ``dataset``, columns its classes, colour the recall
    change ttr - no-ttr in percentage points."""
    plt = _plt()
    part = table[table["dataset"] == dataset]
    entries = list(dict.fromkeys(zip(part["cell"], part["comparison"])))
    classes = list(dict.fromkeys(part["class"]))
    grid = np.full((len(entries), len(classes)), np.nan)
    for _, row in part.iterrows():
        grid[entries.index((row["cell"], row["comparison"])), classes.index(row["class"])] = 100 * row["recall_delta"]
    labels = [_entry_label(*e) for e in entries]
    limit = max(5.0, float(np.nanmax(np.abs(grid))) if np.isfinite(grid).any() else 5.0)
    width = 3.0 + 0.075 * max(map(len, labels)) + 0.42 * len(classes)
    height = 2.2 + 0.09 * max(map(len, classes)) + 0.36 * len(entries)
    fig, ax = plt.subplots(figsize=(max(width, 6.5), height))
    image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(np.arange(len(classes)), classes, rotation=60, ha="right", fontsize=8.5)
    ax.set_yticks(np.arange(len(entries)), labels, fontsize=8.5)
    if len(classes) <= 16:
        for (i, j), value in np.ndenumerate(grid):
            if np.isfinite(value):
                ax.text(j, i, f"{value:+.0f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(value) > 0.6 * limit else "black")
    colourbar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    colourbar.set_label("recall: ttr − no-ttr\n(percentage points)", fontsize=9)
    ax.set_xlabel("class (test split)", fontsize=9)
    ax.set_title(f"{dataset}: per-class recall change, ttr − no-ttr\n(blue: gains, red: losses; blank: class "
                 "absent from the test split)", fontsize=10)
    fig.tight_layout()
    return fig


def _dumbbell(ax, labels: list[str], before: np.ndarray, after: np.ndarray, xlabel: str, title: str,
              names: tuple[str, str] = (BASELINE, TTR)) -> None:
    y = np.arange(len(labels))[::-1]
    for yi, b, a in zip(y, before, after):
        if np.isfinite(b) and np.isfinite(a):
            ax.annotate("", xy=(a, yi), xytext=(b, yi), arrowprops={"arrowstyle": "->", "color": "0.55", "lw": 1.2})
    ax.scatter(before, y, s=34, color=COLOURS[BASELINE], label=names[0], zorder=3)
    ax.scatter(after, y, s=34, color=COLOURS[TTR], label=names[1], zorder=3)
    ax.set_yticks(y, labels, fontsize=8.5)
    ax.set_ylim(-0.7, len(labels) - 0.3)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.tick_params(axis="x", labelsize=8.5)


def calibration_figure(table: pd.DataFrame):
    """ECE and Brier score per (cell, comparison), no-ttr -> ttr."""
    plt = _plt()
    pairs = []
    for (cell, kind), part in table.groupby(["cell", "comparison"], sort=False):
        modes = part.set_index("mode")
        base, mode = [m for k, m0, m1 in COMPARISONS if k == kind for m in (m0, m1)]
        if base in modes.index and mode in modes.index:
            pairs.append((_entry_label(cell, kind), modes.loc[base], modes.loc[mode]))
    labels = [p[0] for p in pairs]
    fig, axes = plt.subplots(1, 2, figsize=(9.5 + 0.07 * max(map(len, labels)), 1.9 + 0.34 * len(pairs)),
                             sharey=True)
    _dumbbell(axes[0], labels, np.array([p[1]["ece"] for p in pairs]), np.array([p[2]["ece"] for p in pairs]),
              f"expected calibration error ({ECE_BINS} equal-width bins on top-class probability; 0 = calibrated)",
              "ECE (lower is better)")
    _dumbbell(axes[1], labels, np.array([p[1]["brier"] for p in pairs]), np.array([p[2]["brier"] for p in pairs]),
              "multi-class Brier score (0 = perfect, 2 = worst)", "Brier score (lower is better)")
    axes[1].tick_params(axis="y", labelleft=False)
    axes[0].legend(fontsize=8.5, loc="best")
    for ax in axes:
        ax.xaxis.label.set_wrap(True)
    fig.suptitle("Calibration of the seed ensembles on the test split, no-ttr → ttr", fontsize=11)
    fig.tight_layout()
    return fig


def outliers_figure(table: pd.DataFrame):
    """Share of image patches above the threshold and the largest patch norm, no-ttr -> ttr, per cell
    (the threshold and the ttr register's norm marked)."""
    plt = _plt()
    labels = list(table["cell"])
    fig, axes = plt.subplots(1, 2, figsize=(10.5 + 0.07 * max(map(len, labels)), 1.9 + 0.36 * len(labels)),
                             sharey=True)
    share = "patch_share_above_threshold"
    _dumbbell(axes[0], labels, 100 * table[f"{share}_no_ttr"].to_numpy(float),
              100 * table[f"{share}_ttr"].to_numpy(float), "image patches with norm > threshold at the detect "
              "layer (%)", "Outlier patches")
    _dumbbell(axes[1], labels, table["mean_max_patch_norm_no_ttr"].to_numpy(float),
              table["mean_max_patch_norm_ttr"].to_numpy(float),
              "token L2 norm at the detect layer",
              "Largest image-patch norm (mean over images)")
    y = np.arange(len(labels))[::-1]
    # drawn a little above its row: the register takes over the outlier norm, so it would hide no-ttr's point
    axes[1].scatter(table["register_norm_ttr"].to_numpy(float), y + 0.22, marker="D", s=22, facecolor="white",
                    edgecolor="tab:green", linewidth=1.4, label="ttr register token", zorder=4)
    axes[1].scatter(table["threshold"].to_numpy(float), y, marker="|", s=260, color="black",
                    label="threshold", zorder=4)
    axes[1].tick_params(axis="y", labelleft=False)
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=len(handles), fontsize=8.5, frameon=False)
    fig.suptitle("High-norm outlier tokens per cell, no-ttr → ttr (analysis images of the test split)",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.35 / fig.get_figheight(), 1, 1))
    return fig


def scores_figure(members: list[Ranking]):
    """Register-neuron scores by layer on one backbone: per dataset the top scores of every layer,
    the selected neurons ringed, the strong neurons above ``highest_layer`` starred and named."""
    plt = _plt()
    colours = plt.get_cmap("tab10")
    highest = members[0].highest_layer
    top_k = max(m.top_k for m in members)
    deepest = int(np.nanmax([np.nanmax(m.ranked[:, 0]) for m in members])) + 1
    recorded = members[0].identity[2] if members[0].identity and members[0].identity[2] else 0
    layers = max(deepest, int(recorded))      # the model's depth, so the last layers show even if empty
    labelled: list[tuple[float, float]] = []  # (x, log10 score) of the names drawn, to keep them apart
    fig, ax = plt.subplots(figsize=(max(9.0, 0.42 * layers + 3.5), 6.4))
    width = 0.6 / max(len(members), 1)
    shown = []   # the scores drawn (the y range follows them, not the long tail of the ranking)
    for d, member in enumerate(members):
        colour = colours(d % 10)
        offset = (d - (len(members) - 1) / 2) * width
        ranked = member.ranked[np.isfinite(member.ranked[:, 2]) & (member.ranked[:, 2] > 0)]
        best_x, best_y = [], []
        for layer in range(layers):
            scores = ranked[ranked[:, 0] == layer, 2]     # best first already
            if len(scores):
                top = scores[:TOP_PER_LAYER]
                shown.append(top)
                ax.scatter(np.full(len(top), layer + offset), top, s=12, color=colour, alpha=0.55, linewidths=0)
                best_x.append(layer + offset)
                best_y.append(top[0])
        ax.plot(best_x, best_y, color=colour, lw=1.3, label=f"{member.dataset}: best score per layer")
        chosen = np.array([row for row in ranked if (int(row[0]), int(row[1])) in member.selected])
        if len(chosen):
            ax.scatter(chosen[:, 0] + offset, chosen[:, 2], s=46, facecolor="none", edgecolor=colour, linewidth=1.4,
                       label=f"{member.dataset}: selected ({len(member.selected)})")
        whole_top = member.ranked[:member.top_k]
        above = whole_top[whole_top[:, 0] > member.highest_layer]
        if len(above):
            ax.scatter(above[:, 0] + offset, above[:, 2], marker="*", s=120, color=colour, edgecolor="black",
                       linewidth=0.6, zorder=4, label=f"{member.dataset}: in top {member.top_k} but above the cut "
                                                      f"({len(above)})")
            for layer, neuron, score in above[:ANNOTATE_ABOVE]:
                # the neuron's index right of its layer's column of stars (the x axis gives the layer);
                # skipped where a name is drawn already at about that height (the CSV lists them all)
                spot = (layer, math.log10(score) if score > 0 else -99.0)
                if any(x == spot[0] and abs(spot[1] - y) < 0.09 for x, y in labelled):
                    continue
                labelled.append(spot)
                ax.annotate(f"n{int(neuron)}", (layer + 0.34, score), va="center", ha="left", fontsize=8,
                            color=colour)
    values = np.concatenate(shown) if shown else np.array([])
    if len(values) and values.max() / values.min() > 20:
        ax.set_yscale("log")
        ax.set_ylim(values.min() / 1.5, values.max() * 3)   # headroom for the labels
    elif len(values):
        ax.set_ylim(0, values.max() * 1.25)
    ax.axvline(highest + 0.5, color="black", ls="--", lw=1.2)
    ax.axvspan(highest + 0.5, layers - 0.5, color="0.88", zorder=0)
    ax.text(highest + 0.5, 1.005, f"highest_layer = {highest}", transform=ax.get_xaxis_transform(),
            va="bottom", ha="center", fontsize=8.5)
    ax.text((highest + layers) / 2, 0.03, "above the cut:\nnot selected", transform=ax.get_xaxis_transform(),
            va="bottom", ha="center", fontsize=8.5, color="0.25")
    ax.set_xlim(-0.6, layers - 0.4)
    ax.set_xticks(range(layers))
    ax.tick_params(labelsize=8.5)
    ax.set_xlabel("layer (0-based transformer block)", fontsize=9.5)
    ax.set_ylabel("register-neuron score\n(mean |activation| at outlier tokens)", fontsize=9.5)
    ax.set_title(f"Register-neuron scores by layer: {members[0].backbone}\n(dots: top {TOP_PER_LAYER} per layer "
                 f"and dataset; selection: top_k = {top_k} among layers ≤ {highest})", fontsize=10, pad=16)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=min(3, len(members)),
              frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Markdown


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _f(value, digits: int = 3) -> str:
    return "–" if _missing(value) else f"{value:.{digits}f}"


def _s(value, digits: int = 3) -> str:
    return "–" if _missing(value) else f"{value:+.{digits}f}"


def _p(value) -> str:
    if _missing(value):
        return "–"
    if value == 0:
        return "0 (<2/B)"
    return "<0.0001" if value < 1e-4 else f"{value:.4f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def _entries(table: pd.DataFrame) -> list[tuple[str, str]]:
    return list(dict.fromkeys(zip(table["cell"], table["comparison"])))


def _paper_section(paper: pd.DataFrame, mcnemar: pd.DataFrame) -> list[str]:
    if paper.empty:
        return ["## 1. The paper table", "", "No finished cell."]
    metrics = [m for m in METRIC_LABELS if m in set(paper["metric"])]
    indexed = paper.set_index(["cell", "comparison", "metric"])
    probe_n = paper.loc[paper["comparison"] == "probe", "cell"].nunique()
    zero_n = paper.loc[paper["comparison"] == "zero-shot", "cell"].nunique()
    lines = ["## 1. The paper table: ttr − no-ttr per cell", "",
             "Each cell's difference of the seed ensembles (ttr − no-ttr) on the same test images with its 95% "
             "paired-bootstrap interval, as the cell's metrics.csv holds them. **Bold**: Holm-adjusted p < 0.05. "
             "Rates are fractions; kappa is in [-1, 1].", ""]
    rows = []
    for cell, kind in _entries(paper):
        cells = []
        for m in metrics:
            if (cell, kind, m) not in indexed.index:
                cells.append("–")
                continue
            r = indexed.loc[(cell, kind, m)]
            text = f"{_s(r['diff'])} [{_s(r['diff_lo'])}, {_s(r['diff_hi'])}]"
            cells.append(f"**{text}**" if not _missing(r["p_holm"]) and r["p_holm"] < ALPHA else text)
        rows.append([_entry_label(cell, kind), *cells])
    lines += _table(["cell", *(METRIC_LABELS[m] for m in metrics)], rows)
    lines += ["", "Paired-bootstrap p-value and, in brackets, the Holm-adjusted p-value:", ""]
    rows = []
    for cell, kind in _entries(paper):
        rows.append([_entry_label(cell, kind), *(
            f"{_p(indexed.loc[(cell, kind, m), 'p'])} ({_p(indexed.loc[(cell, kind, m), 'p_holm'])})"
            if (cell, kind, m) in indexed.index else "–" for m in metrics)])
    lines += _table(["cell", *(METRIC_LABELS[m] for m in metrics)], rows)
    lines += ["", f"**Multiplicity (Holm 1979, family-wise error rate).** For each metric, the family is the "
              f"{probe_n} probe comparisons of the grid (one per finished cell that reports the metric: qwk exists "
              "for APTOS cells only, manufacturer top-1 for Pacemaker cells only)"
              + (f"; the {zero_n} CLIP zero-shot comparisons form a separate family per metric" if zero_n else "")
              + "; McNemar on top-1 is its own family. A comparison without that p-value is left out of its "
              "family (paper_table.csv gives each family's size). A difference is established across the grid "
              "only where its "
              "Holm-adjusted p is below 0.05. A bootstrap p of 0 means no resample of the difference reached 0 "
              "(p < 2/B for B resamples).", "",
              "![ttr minus no-ttr per cell, headline metrics](paper_table.png)", "",
              "Exact McNemar test on top-1 correctness:", ""]
    rows = [[_entry_label(r["cell"], r["comparison"]), _f(r["only_ttr_right"], 0), _f(r["only_no_ttr_right"], 0),
             _p(r["p"]), _p(r["p_holm"])] for _, r in mcnemar.iterrows()]
    lines += _table(["cell", "only ttr right", "only no-ttr right", "p", "p Holm"], rows)
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
    lines = ["## 2. Per-class deltas: which classes gain, which lose", "",
             "Per class of the test split, recall (and F1) of ttr minus no-ttr, from the cells' predictions files "
             "(per_class.csv has every class). Below, per cell, the largest recall gains and losses (class, "
             "change in percentage points, test images of the class).", ""]
    if per_class.empty:
        return lines + ["No predictions files."]
    rows = []
    for (cell, kind), part in per_class.groupby(["cell", "comparison"], sort=False):
        part = part[np.isfinite(part["recall_delta"])]
        gains = part[part["recall_delta"] > 0].nlargest(top, "recall_delta")
        losses = part[part["recall_delta"] < 0].nsmallest(top, "recall_delta")
        same = int((part["recall_delta"] == 0).sum())

        def listing(frame: pd.DataFrame) -> str:
            return "; ".join(f"{r['class']} {100 * r['recall_delta']:+.0f} (n={int(r['support'])})"
                             for _, r in frame.iterrows()) or "none"

        rows.append([_entry_label(cell, kind), listing(gains), listing(losses),
                     f"{int((part['recall_delta'] > 0).sum())} / {int((part['recall_delta'] < 0).sum())} / {same}",
                     _s(part["f1_delta"].mean())])
    lines += _table(["cell", "top gains (recall, pp)", "top losses (recall, pp)", "classes up / down / same",
                     "mean F1 change"], rows)
    for dataset in datasets:
        if (per_class["dataset"] == dataset).any():
            lines += ["", f"![{dataset}: per-class recall change](per_class_{dataset}.png)"]
    return lines


def _calibration_section(calibration: pd.DataFrame) -> list[str]:
    lines = ["## 3. Calibration per mode", "",
             f"From each mode's predictions file (the seed ensemble's probabilities on the test split). **ECE**: "
             f"{ECE_BINS} equal-width bins on the top-class probability (bin m holds confidences in (m/{ECE_BINS}, "
             f"(m+1)/{ECE_BINS}]); ECE = Σ (images in bin / N) · |accuracy − mean confidence| over the bins. "
             "**Brier**: multi-class, mean over images of Σ_c (p_c − 1[c = true])², in [0, 2]. Lower is better "
             "for both.", ""]
    if calibration.empty:
        return lines + ["No predictions files."]
    rows = []
    for (cell, kind), part in calibration.groupby(["cell", "comparison"], sort=False):
        modes = part.set_index("mode")
        base, mode = [m for k, m0, m1 in COMPARISONS if k == kind for m in (m0, m1)]
        if base not in modes.index or mode not in modes.index:
            continue
        b, a = modes.loc[base], modes.loc[mode]
        rows.append([_entry_label(cell, kind), str(int(b["n"])), f"{_f(b['ece'])} → {_f(a['ece'])}",
                     _s(a["ece"] - b["ece"]), f"{_f(b['brier'])} → {_f(a['brier'])}", _s(a["brier"] - b["brier"]),
                     f"{_f(b['mean_confidence'])} → {_f(a['mean_confidence'])}"])
    lines += _table(["cell", "test images", "ECE no-ttr → ttr", "ΔECE", "Brier no-ttr → ttr", "ΔBrier",
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
                 f"{int(r['shared'])} of {int(r['selected_a'])} / {int(r['selected_b'])}", _f(r["jaccard"]),
                 _f(r["spearman_rho"]) + (f" (n={int(r['spearman_n'])})" if r["spearman_n"] else ""),
                 _f(r["paper_median_rank"], 0)] for _, r in overlap.iterrows()]
        lines += _table(["backbone", "highest_layer / top_k", "A", "B", "shared of selected A / B", "Jaccard",
                         "Spearman ρ of scores", "published neurons' median rank in A"], rows)
    has_paper = (overlap["set_b"] == PAPER_LABEL).any() if not overlap.empty else False
    lines += ["", f"The published set: the {len(_paper_set())} register neurons of DINOv2 ViT-L/14 found on "
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
    lines = ["## 6. Outlier tokens per cell", "",
             "From each cell's outliers.csv (the analysis images of its test split, at the detect layer): the share "
             "of image patches whose norm exceeds the threshold, the mean over images of the largest image-patch "
             "norm, the test-time register's norm, and the last layer's share of CLS attention on the register.", ""]
    if outliers.empty:
        return lines + ["No outliers.csv."]
    share = "patch_share_above_threshold"
    rows = [[r["cell"], _f(r["threshold"], 1),
             f"{_f(100 * r[f'{share}_no_ttr'], 2)}% → {_f(100 * r[f'{share}_ttr'], 2)}%",
             f"{_f(r['mean_max_patch_norm_no_ttr'], 1)} → {_f(r['mean_max_patch_norm_ttr'], 1)}",
             _f(r["register_norm_ttr"], 1), _f(r["cls_attention_on_register_ttr"]),
             f"{_f(r['cls_attention_entropy_no_ttr'])} → {_f(r['cls_attention_entropy_ttr'])}"]
            for _, r in outliers.iterrows()]
    lines += _table(["cell", "threshold", "patches above threshold no-ttr → ttr", "max patch norm no-ttr → ttr",
                     "register norm (ttr)", "CLS attention on register (ttr)", "CLS attention entropy (nats)"], rows)
    return lines + ["", "![outlier tokens per cell](outliers.png)"]


def _cells_section(study: dict, notes: list[str]) -> list[str]:
    root = study.get("root", ".")
    lines = ["## 7. Cells", "",
             f"Each cell is an ordinary run folder; re-run one alone with its command from the repository root "
             f"(`cd {root}`). A cell is resumed when its config.json says done and records this same command.", ""]
    rows = [[c["name"], c["status"], "–" if c["exit_code"] is None else str(c["exit_code"]),
             "–" if c["seconds"] is None else f"{c['seconds']:.0f}", c["error"] or "",
             f"`{c['command']}`"] for c in study["cells"]]
    lines += _table(["cell", "status", "exit", "seconds", "error", "command"], rows)
    if notes:
        lines += ["", "Finished cells that could not be read: " + "; ".join(notes)]
    lines += ["", "## 8. Combinations not run", ""]
    if study["skipped"]:
        lines += _table(["dataset", "model", "combination", "reason"],
                        [[s["dataset"], s["model"], s["combination"], s["reason"]] for s in study["skipped"]])
    else:
        lines += ["None: every combination of the grid applies."]
    return lines


def _header(study: dict, paper: pd.DataFrame, runs: list[CellRun]) -> list[str]:
    cells = study["cells"]
    counts = {s: sum(c["status"] == s for c in cells) for s in ("done", "resumed", "failed", "interrupted", "pending")}
    axes = study["axes"]
    run_seconds = sum(_float((r.info.get("stage_seconds") or {}).get("total")) for r in runs
                      if math.isfinite(_float((r.info.get("stage_seconds") or {}).get("total"))))
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
              + (f" This invocation took {study['wall_seconds']:.0f} s" if study.get("wall_seconds") else "")
              + (f"; the finished cells' runs took {run_seconds:.0f} s in all (their config.json)."
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
            lines.append(f"- {METRIC_LABELS[metric]}: ttr is better in {up}, worse in {down}, and not detectably "
                         f"different in {len(part) - up - down} of {len(part)} cells (Holm-adjusted p < 0.05 over "
                         "the grid).")
        lines.append("")
    return lines


# --------------------------------------------------------------------------------------------


def write_report(study: dict, out: str | Path) -> Path:
    """Write the report of ``study`` (the study record) under ``out``; returns ``out/report.md``."""
    out = Path(out)
    axes = list(study["axes"])
    runs, notes = read_cells(study)
    datasets = list(study["datasets"])
    paper = paper_table(runs, axes)
    mcnemar = mcnemar_table(runs, axes)
    per_class = per_class_table(runs, axes)
    calibration = calibration_table(runs, axes)
    outliers = outliers_table(runs, axes)
    rankings = detected_rankings(runs)
    overlap = neuron_overlap(rankings)
    cells = pd.DataFrame([{k: c[k] for k in ("name", "dataset", "model", "status", "exit_code", "error", "seconds",
                                             "folder", "command")} | {a: c["settings"].get(a, "n/a") for a in axes}
                          for c in study["cells"]])
    for name, frame in (("paper_table", paper), ("mcnemar", mcnemar), ("per_class", per_class),
                        ("calibration", calibration), ("outliers", outliers), ("neuron_overlap", overlap),
                        ("cells", cells), ("skipped", pd.DataFrame(study["skipped"],
                                                                   columns=["dataset", "model", "combination",
                                                                            "reason"]))):
        write_csv(out / f"{name}.csv", frame)

    figure_args = {"dpi": DPI, "facecolor": "white"}
    if not paper.empty:
        save_figure(forest_figure(paper), out / "paper_table.png", **figure_args)
    for dataset in datasets:
        if (per_class["dataset"] == dataset).any():
            save_figure(per_class_figure(per_class, dataset), out / f"per_class_{dataset}.png", **figure_args)
    if not calibration.empty:
        save_figure(calibration_figure(calibration), out / "calibration.png", **figure_args)
    if not outliers.empty:
        save_figure(outliers_figure(outliers), out / "outliers.png", **figure_args)
    score_figures = []
    groups: dict[tuple, list[Ranking]] = {}
    for ranking in rankings:
        groups.setdefault(ranking.identity, []).append(ranking)
    for members in groups.values():
        # one curve per dataset: the widest selection of each (top_k may be an axis)
        per_dataset: dict[str, Ranking] = {}
        for member in members:
            if member.dataset not in per_dataset or member.top_k > per_dataset[member.dataset].top_k:
                per_dataset[member.dataset] = member
        name = f"scores_by_layer_{_slug(members[0].backbone)}.png"
        save_figure(scores_figure(list(per_dataset.values())), out / name, **figure_args)
        score_figures.append((name, f"register-neuron scores by layer, {members[0].backbone}"))

    paper_cells = [r.name for r in runs if (r.neurons or {}).get("source") == "paper"]
    lines = _header(study, paper, runs)
    lines += _paper_section(paper, mcnemar) + _other_rows(runs) + [""]
    lines += _per_class_section(per_class, datasets) + [""]
    lines += _calibration_section(calibration) + [""]
    lines += _neurons_section(overlap, rankings, score_figures, paper_cells) + [""]
    lines += _outliers_section(outliers) + [""]
    lines += _cells_section(study, notes) + [""]
    lines += ["## Files", "", "paper_table.csv (every metric, p and Holm p), mcnemar.csv, per_class.csv, "
              "calibration.csv, neuron_overlap.csv, outliers.csv, cells.csv, skipped.csv and the figures above; "
              "the study record is ../study.json, each cell's output tail ../logs/<cell>.log.", ""]
    return write_text(out / "report.md", "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.studyreport",
                                     description="Write a study's report again from STUDY_DIR/study.json.")
    parser.add_argument("study_dir", help="the --out folder of python -m common.study")
    args = parser.parse_args(argv)
    path = Path(args.study_dir) / "study.json"

    def body() -> int:
        try:
            study = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{path}: cannot be read ({error}); pass the --out folder of a study") from None
        print(f"report: {write_report(study, Path(args.study_dir) / 'report')}")
        return 0

    return run_entry(body, interrupted="run the same command again to write the report")
