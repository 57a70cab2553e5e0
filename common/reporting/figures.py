"""What every report's figures share: matplotlib without a display, one PNG writer, one colour
per mode and per comparison, and the forest plot of ``ttr - no-ttr`` differences that both ``python -m
common.report`` (one entry per run) and the study report (one entry per cell and comparison) draw.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from common.evaluation.stats import ALPHA  # noqa: E402
from common.io import save_figure  # noqa: E402
from common.registers.modes import BASELINE, REMOVED, TTR  # noqa: E402
from common.reporting.format import metric_label  # noqa: E402

DPI = 110
COLOURS = {BASELINE: "tab:orange", TTR: "tab:blue", REMOVED: "tab:red", "register": "tab:green",
           "probe": "tab:blue", "zero-shot": "tab:purple"}
FOREST_COLUMNS = 3  # panels per row of a forest plot


def save_png(fig, path: Path) -> None:
    """Atomic PNG write (white background, tight box); the figure is always closed.  A name with
    characters the font lacks (CJK, say) is drawn with boxes for them; matplotlib's warning about
    it is not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        save_figure(fig, path, dpi=DPI, bbox_inches="tight", facecolor="white")


def forest_plot(table: pd.DataFrame, metrics: list[str], title: str, groups: dict[str, str] | None = None):
    """Forest plot of differences: one panel per metric (at most three to a row), one line per entry.

    ``table`` is long, one row per (entry, metric): ``entry`` (the y-axis label, may span lines;
    entries keep their first-appearance order, first on top), ``group`` (a key of
    :data:`COLOURS`: the marker's colour), ``metric``, ``diff``, ``diff_lo``, ``diff_hi`` (the
    difference and its 95% interval) and ``p_holm``.  A marker is filled where ``p_holm <
    ALPHA``, open otherwise (also where ``p_holm`` is missing: outside the Holm family); an entry
    without the metric says "not reported".  ``groups`` names
    each group in the legend (given when there is more than one)."""
    entries = list(dict.fromkeys(table["entry"]))
    metrics = [m for m in metrics if m in set(table["metric"])] or metrics[:1]
    columns = min(FOREST_COLUMNS, len(metrics))
    grid_rows = math.ceil(len(metrics) / columns)
    lines_per_entry = max(entry.count("\n") + 1 for entry in entries)
    widest = max(len(line) for entry in entries for line in entry.split("\n"))
    panel_height = 0.9 + (0.28 + 0.17 * lines_per_entry) * len(entries)
    fig, axes = plt.subplots(grid_rows, columns, squeeze=False, sharey=True,
                             figsize=(4.4 * columns + 0.07 * widest + 0.4, panel_height * grid_rows + 1.0))
    y = np.arange(len(entries))[::-1]
    position = dict(zip(entries, y))
    for ax, metric in zip(axes.flat, metrics):
        part = table[table["metric"] == metric]
        ax.axvline(0.0, color="0.4", lw=1.0, zorder=1)
        span = 0.01
        for group, rows in part.groupby("group", sort=False):
            ys = np.array([position[e] for e in rows["entry"]])
            d, lo, hi = (rows[c].to_numpy(float) for c in ("diff", "diff_lo", "diff_hi"))
            ok = np.isfinite(d)
            colour = COLOURS.get(group, "tab:gray")
            ax.errorbar(d[ok], ys[ok], xerr=np.clip(np.vstack([d - lo, hi - d])[:, ok], 0, None), fmt="none",
                        ecolor=colour, elinewidth=1.6, capsize=4, zorder=2)
            significant = ok & (rows["p_holm"].to_numpy(float) < ALPHA)
            ax.scatter(d[significant], ys[significant], s=42, color=colour, zorder=3)
            ax.scatter(d[ok & ~significant], ys[ok & ~significant], s=42, facecolor="white", edgecolor=colour,
                       linewidth=1.5, zorder=3)
            if ok.any():
                span = max(span, float(np.nanmax(np.abs(np.r_[lo[ok], hi[ok], d[ok]]))))
        drawn = set(part.loc[np.isfinite(part["diff"].to_numpy(float)), "entry"])
        for entry in entries:
            if entry not in drawn:
                ax.text(0.0, position[entry], "not reported", ha="center", va="center", fontsize=9, color="0.35",
                        zorder=4, bbox={"facecolor": "white", "edgecolor": "none", "pad": 1.5})
        ax.set_xlim(-1.15 * span, 1.15 * span)
        ax.set_title(metric_label(metric), fontsize=11)
        ax.set_xlabel(f"{TTR} − {BASELINE} ({'kappa' if metric == 'qwk' else 'fraction'})", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_yticks(y, entries, fontsize=9)
    axes[0, 0].set_ylim(-0.6, len(entries) - 0.4)
    handles = [Line2D([], [], marker="o", ls="", color=COLOURS.get(group, "tab:gray"), label=name)
               for group, name in (groups or {}).items() if group in set(table["group"])]
    handles = handles if len(handles) > 1 else []
    handles += [Line2D([], [], marker="o", ls="", color="0.3", label=f"filled: Holm-adjusted p < {ALPHA:g}"),
                Line2D([], [], marker="o", ls="", markerfacecolor="white", markeredgecolor="0.3",
                       label=f"open: Holm-adjusted p ≥ {ALPHA:g}, or outside the Holm family")]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))
    return fig
