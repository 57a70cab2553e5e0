"""The study report's figures: the forest plot of the paper table, per-class recall changes,
calibration and outlier tokens per cell (no-ttr -> ttr), register-neuron scores by layer."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from common.evaluation.calibration import ECE_BINS
from common.registers.modes import BASELINE, TTR
from common.reporting.figures import COLOURS, forest_plot, plt
from common.reporting.study_read import Ranking, entry_label
from common.reporting.study_tables import calibration_pairs

# The forest plot shows these (and qwk / manufacturer top-1 where a dataset has them); the CSV has all.
FOREST_METRICS = ("top1", "f1_macro", "balanced_accuracy", "auc_macro", "qwk", "manufacturer_top1")
TOP_PER_LAYER = 5       # scores drawn per layer and dataset in the score-by-layer plot
ANNOTATE_ABOVE = 4      # strong neurons above highest_layer named per dataset


def slug(text: str) -> str:
    """``text`` as a file-name part: letters and digits, the rest one underscore."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "backbone"


def forest_figure(paper: pd.DataFrame):
    """The paper table's headline metrics (:data:`FOREST_METRICS`) as a forest plot: per (cell,
    comparison) the ttr - no-ttr difference with its 95% interval, filled for the primary metric of
    a main cell with Holm-adjusted p < 0.05 (every other entry is exploratory: open)."""
    differences = paper.assign(entry=[entry_label(c, k) for c, k in zip(paper["cell"], paper["comparison"])],
                               group=paper["comparison"])
    return forest_plot(differences, list(FOREST_METRICS),
                       f"{TTR} minus {BASELINE} per cell: difference of the seed ensembles with its 95% interval "
                       "(conditional on the fitted probes)\nfilled: primary metric of a main cell, Holm-adjusted "
                       "p < 0.05; open: not significant or exploratory", groups={"probe": "linear probe", "zero-shot": "CLIP zero-shot"})


def per_class_figure(table: pd.DataFrame, dataset: str):
    """Heat map: rows (cell, comparison) of ``dataset``, columns its classes, colour the recall
    change ttr - no-ttr in percentage points."""
    part = table[table["dataset"] == dataset]
    entries = list(dict.fromkeys(zip(part["cell"], part["comparison"])))
    classes = list(dict.fromkeys(part["class"]))
    grid = np.full((len(entries), len(classes)), np.nan)
    for _, row in part.iterrows():
        grid[entries.index((row["cell"], row["comparison"])), classes.index(row["class"])] = 100 * row["recall_delta"]
    labels = [entry_label(*e) for e in entries]
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
    """Per label a no-ttr point and a ttr point joined by an arrow (no-ttr -> ttr)."""
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
    pairs = [(entry_label(cell, kind), base, mode) for cell, kind, base, mode in calibration_pairs(table)]
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
                    edgecolor=COLOURS["register"], linewidth=1.4, label="ttr register token", zorder=4)
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
