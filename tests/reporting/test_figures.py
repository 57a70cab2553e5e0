"""The one forest plot (common/reporting/figures.py), read back from the matplotlib figure: its
panels, rows, filled and open markers, interval ends and "not reported" notes against the table
it was given; and the PNG writer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import PIL.Image
from matplotlib.colors import to_rgba

from common.reporting.figures import forest_plot, save_png

ENTRIES = ["run one", "run two\nsecond line", "run three"]


def _table() -> pd.DataFrame:
    rows = []
    rng = np.random.default_rng(0)
    for i, entry in enumerate(ENTRIES):
        for metric, p_holm in (("top1", [0.01, 0.2, 0.04][i]), ("qwk", [0.5, math.nan, 0.001][i])):
            d = rng.normal(0, 0.05)
            missing = metric == "qwk" and i == 1         # a run without the metric
            rows.append({"entry": entry, "group": "probe" if i < 2 else "zero-shot", "metric": metric,
                         "diff": math.nan if missing else d, "diff_lo": d - 0.03, "diff_hi": d + 0.02,
                         "p_holm": p_holm})
    return pd.DataFrame(rows)


def _markers(ax) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(filled, open) marker positions of a panel: open markers have a white face."""
    filled, hollow = [], []
    for collection in ax.collections:
        offsets, faces = collection.get_offsets(), collection.get_facecolors()
        if len(offsets) == 0 or len(faces) == 0 or not hasattr(collection, "get_sizes") or not len(
                collection.get_sizes()):
            continue
        white = np.allclose(faces[0], to_rgba("white"))
        (hollow if white else filled).extend(map(tuple, np.asarray(offsets)))
    return filled, hollow


def test_forest_plot_draws_every_entry_as_the_table_says():
    table = _table()
    fig = forest_plot(table, ["top1", "f1_macro", "qwk"], "title", groups={"probe": "probe", "zero-shot": "zs"})
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["top-1 accuracy", "quadratic weighted kappa"]  # f1 absent
    y_of = {label.get_text(): y for label, y in zip(panels[0].get_yticklabels(), panels[0].get_yticks())}
    assert sorted(y_of, key=lambda k: -y_of[k]) == ENTRIES                    # first entry on top
    for ax, metric in zip(panels, ["top1", "qwk"]):
        part = table[table["metric"] == metric]
        filled, hollow = _markers(ax)
        expected_filled = {(round(r["diff"], 9), y_of[r["entry"]]) for _, r in part.iterrows()
                           if np.isfinite(r["diff"]) and r["p_holm"] < 0.05}
        expected_open = {(round(r["diff"], 9), y_of[r["entry"]]) for _, r in part.iterrows()
                         if np.isfinite(r["diff"]) and not r["p_holm"] < 0.05}
        assert {(round(x, 9), y) for x, y in filled} == expected_filled, metric
        assert {(round(x, 9), y) for x, y in hollow} == expected_open, metric
        notes = [t for t in ax.texts if t.get_text() == "not reported"]
        assert [t.get_position()[1] for t in notes] == [y_of[e] for e in part.loc[part["diff"].isna(), "entry"]]
        # the axis is symmetric about 0 and holds every interval
        lo, hi = ax.get_xlim()
        assert lo == -hi and hi >= np.nanmax(np.abs(part[["diff_lo", "diff_hi"]].to_numpy()))
    assert [ax.get_xlabel() for ax in panels] == ["ttr − no-ttr (fraction)", "ttr − no-ttr (kappa)"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["probe", "zs", "filled: Holm-adjusted p < 0.05", "open: Holm-adjusted p ≥ 0.05, or outside the Holm family"]


def test_one_group_has_no_colour_legend(tmp_path):
    table = _table().assign(group="probe")
    fig = forest_plot(table, ["top1"], "title", groups={"probe": "probe", "zero-shot": "zs"})
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["filled: Holm-adjusted p < 0.05",
                                                                  "open: Holm-adjusted p ≥ 0.05, or outside the Holm family"]
    save_png(fig, tmp_path / "forest.png")
    with PIL.Image.open(tmp_path / "forest.png") as image:
        assert image.format == "PNG" and image.width > 400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["forest.png"]
