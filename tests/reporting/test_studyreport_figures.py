"""The study report's figures (common/reporting/study_figures.py), read back from matplotlib: the
forest plot's panels and rows, the per-class heat map's values, the calibration points and the
starred neurons of the score-by-layer plot, against the CSVs and the cells' files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.reporting.format import metric_label
from common.reporting.study_figures import (
    FOREST_METRICS,
    calibration_figure,
    forest_figure,
    per_class_figure,
    scores_figure,
)
from common.reporting.study_read import detected_rankings, read_cells

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_figure_files(fake_study):
    for name in ("paper_table.png", "per_class_aptos.png", "per_class_orthonet.png", "per_class_pacemaker.png",
                 "calibration.png", "outliers.png", "scores_by_layer_dinov2_vitl14.png"):
        data = (fake_study["out"] / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name


def test_forest_figure_shows_the_headline_metrics_of_every_entry(fake_study):
    paper = pd.read_csv(fake_study["out"] / "paper_table.csv")
    fig = forest_figure(paper)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    present = set(paper["metric"])
    assert [ax.get_title() for ax in panels] == [metric_label(m) for m in FOREST_METRICS if m in present]
    entries = list(dict.fromkeys(zip(paper["cell"], paper["comparison"])))
    labels = [t.get_text() for t in panels[0].get_yticklabels()]
    assert labels == [c + ("  (zero-shot)" if k == "zero-shot" else "") for c, k in entries]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["linear probe", "CLIP zero-shot"]


def test_per_class_heat_map_is_the_recall_change(fake_study):
    per_class = pd.read_csv(fake_study["out"] / "per_class.csv")
    fig = per_class_figure(per_class, "aptos")
    grid = fig.axes[0].images[0].get_array()
    part = per_class[per_class["dataset"] == "aptos"]
    expected = (part.pivot_table(index=["cell", "comparison"], columns="class", values="recall_delta", sort=False)
                .to_numpy() * 100)
    assert np.asarray(grid) == pytest.approx(expected, nan_ok=True)


def test_calibration_points_are_the_table_s(fake_study):
    calibration = pd.read_csv(fake_study["out"] / "calibration.csv")
    fig = calibration_figure(calibration)
    ece_panel = fig.axes[0]
    before, after = (np.asarray(c.get_offsets())[:, 0] for c in ece_panel.collections[:2])
    ece = calibration.set_index(["cell", "comparison", "mode"])["ece"]
    pairs = list(dict.fromkeys(zip(calibration["cell"], calibration["comparison"])))
    bases = {"probe": ("no-ttr", "ttr"), "zero-shot": ("no-ttr (zero-shot)", "ttr (zero-shot)")}
    assert before.tolist() == pytest.approx([ece[(c, k, bases[k][0])] for c, k in pairs])
    assert after.tolist() == pytest.approx([ece[(c, k, bases[k][1])] for c, k in pairs])


def test_scores_figure_stars_the_strong_neurons_above_the_cut(fake_study):
    runs, _ = read_cells(fake_study["record"])
    members = detected_rankings(runs)
    fig = scores_figure(members)
    ax = fig.axes[0]
    names = {t.get_text() for t in ax.texts}
    for member in members:
        data = json.loads((Path(next(c["folder"] for c in fake_study["cells"] if c["name"] == member.cell))
                           / "register_neurons.json").read_text())
        above = [(l, n) for l, n, _ in data["ranked"][:data["top_k"]] if l > data["highest_layer"]]
        assert above, member.dataset      # the fake detections rank layer-21 neurons high
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert f"{member.dataset}: in top {data['top_k']} but above the cut ({len(above)})" in legend
        assert f"{member.dataset}: selected ({len(member.selected)})" in legend
        assert any(f"n{n}" in names for _, n in above)
    assert "highest_layer = 19" in names
