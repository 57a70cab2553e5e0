"""Reading a study's cells (common/reporting/study_read.py): which cells count, what an unreadable
one becomes, the predictions files' class order, and one detected ranking per detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.errors import UserError
from common.evaluation.compare import evaluate_modes
from common.evaluation.metrics import MetricSpec
from common.reporting.study_read import detected_rankings, main_cells, read_cells, read_predictions


def test_only_finished_cells_are_read(fake_study):
    runs, notes = read_cells(fake_study["record"])
    assert [r.name for r in runs] == [c["name"] for c in fake_study["cells"] if c["status"] == "done"]
    assert notes == []
    first = runs[0]
    assert first.dataset == "aptos" and first.settings == {"top_k": "0"} and first.backbone == "DINOv2 vitl14"
    metrics = pd.read_csv(Path(fake_study["cells"][0]["folder"]) / "metrics.csv").set_index("mode")
    assert list(first.metrics.index) == list(metrics.index)
    assert first.metrics.loc["ttr", "top1"] == pytest.approx(metrics.loc["ttr", "top1"])
    assert first.neurons["source"] == "detected" and first.outliers.loc["ttr", "register_norm"] == 310.0


def test_unreadable_cells_become_notes(fake_study, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(fake_study["cells"][0]["folder"], broken)
    (broken / "register_neurons.json").write_text("{not json")
    gone = tmp_path / "gone"
    record = {"cells": [
        {**fake_study["cells"][0], "name": "broken", "folder": str(broken)},
        {**fake_study["cells"][1], "name": "gone", "folder": str(gone), "status": "resumed"},
        {**fake_study["cells"][2], "name": "pending", "status": "pending"}]}
    runs, notes = read_cells(record)
    assert [r.name for r in runs] == ["broken"] and runs[0].neurons is None
    assert len(notes) == 2
    assert notes[0].startswith("broken: register_neurons.json cannot be read")
    assert notes[1].startswith("gone: ") and str(gone) in notes[1]


def test_predictions_in_the_files_class_order(tmp_path):
    path = tmp_path / "predictions_ttr.csv"
    pd.DataFrame({"path": ["a.png", "b.png", "c.png"], "true": ["z", "a", "z"], "predicted": ["a", "a", "m"],
                  "p[z]": [0.2, 0.1, 0.3], "p[a]": [0.7, 0.8, 0.3], "p[m]": [0.1, 0.1, 0.4]}).to_csv(path, index=False)
    names, true, predicted, proba = read_predictions(path)
    assert names == ["z", "a", "m"]
    assert true.tolist() == [0, 1, 0] and predicted.tolist() == [1, 1, 2]
    assert proba.tolist() == [[0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]]
    pd.DataFrame({"path": ["a.png"], "true": ["q"], "predicted": ["a"], "p[a]": [1.0]}).to_csv(path, index=False)
    with pytest.raises(UserError, match="predictions_ttr.csv: a true or predicted class"):
        read_predictions(path)


def test_one_ranking_per_detection(fake_study):
    runs, _ = read_cells(fake_study["record"])
    rankings = detected_rankings(runs)
    # the two aptos cells differ only in their axis setting: one detection, the first cell's
    assert [(r.dataset, r.cell) for r in rankings] == [("aptos", "aptos_dinov2_0"), ("orthonet", "orthonet_dinov2_1"),
                                                       ("pacemaker", "pacemaker_dinov2_2")]
    data = json.loads((Path(fake_study["cells"][0]["folder"]) / "register_neurons.json").read_text())
    first = rankings[0]
    assert first.highest_layer == 19 and first.top_k == data["top_k"]
    assert first.selected == {(int(l), n) for l, ids in data["selected"].items() for n in ids}
    assert np.array_equal(first.ranked, np.array(data["ranked"], dtype=float))
    # cells run with the published neurons have no ranking of their own
    runs[1].neurons = {**runs[1].neurons, "source": "paper"}
    assert [r.dataset for r in detected_rankings(runs)] == ["aptos", "pacemaker"]


def test_main_cells_and_primary_metrics(fake_study):
    runs, _ = read_cells(fake_study["record"])
    assert [(r.name, r.main, r.primary) for r in runs] == [
        ("aptos_dinov2_0", True, "qwk"), ("orthonet_dinov2_1", True, "top1"), ("pacemaker_dinov2_2", True, "top1"),
        ("aptos_dinov2_3", False, "qwk")]
    # a study record written before cells were marked: per (dataset, model) the cell without settings,
    # else its first cell
    cells = [{"name": n, "dataset": d, "model": "clip", "settings": s} for n, d, s in
             (("a1", "aptos", {"top_k": "5"}), ("a0", "aptos", {}), ("o1", "orthonet", {"top_k": "5"}),
              ("o2", "orthonet", {"top_k": "9"}))]
    assert main_cells(cells) == {"a0", "o1"}


def test_a_cell_of_an_older_schema_is_recomputed_from_its_predictions(fake_study, tmp_path):
    """The first cell's metrics.csv as an older version wrote it (no schema_version, a bootstrap p of
    0): read back, its statistics are evaluate_modes' on its predictions files, seed spread kept."""
    source = Path(fake_study["cells"][0]["folder"])
    folder = tmp_path / "old_cell"
    shutil.copytree(source, folder)
    old = pd.read_csv(source / "metrics.csv").drop(columns=["schema_version"])
    old.loc[old["mode"] == "ttr", "p_f1_macro"] = 0.0
    old.to_csv(folder / "metrics.csv", index=False)
    record = {**fake_study["record"], "cells": [{**fake_study["cells"][0], "folder": str(folder)}]}
    (run,), notes = read_cells(record)
    assert notes == [] and run.recomputed
    labels, proba = {}, {}
    for mode in ("no-ttr", "ttr"):
        names, true, _, p = read_predictions(folder / f"predictions_{mode}.csv")
        labels[mode], proba[mode] = true, p[None]
    expected = evaluate_modes(labels["ttr"], proba, MetricSpec(len(names), qwk=True), n_boot=100, n_perm=50, seed=0,
                              primary="qwk").set_index("mode")
    for column in ("qwk_diff_lo", "p_qwk", "p_f1_macro", "top1_lo", "p_top1", "mde_qwk"):
        assert run.metrics.loc["ttr", column] == pytest.approx(expected.loc["ttr", column]), column
    assert run.metrics.loc["ttr", "p_f1_macro"] > 0                         # the old 0 is gone
    assert run.metrics.loc["ttr", "top1_seed_sd"] == pytest.approx(old.set_index("mode").loc["ttr", "top1_seed_sd"])
    assert (run.metrics["schema_version"] == 2).all()
