"""The study report's CSVs (common/reporting/study_tables.py) against the cells' own files, read
here independently of the report code: Holm by hand, per-class recall and F1 with scikit-learn,
ECE and Brier by plain computations, the outliers copied, the neuron overlap with pandas' rank
correlation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, recall_score

from common.registers.neurons import PAPER_NEURONS_DINOV2_VITL14
from common.reporting.study_tables import PAPER_LABEL, per_class_scores

COMPARISONS = (("probe", "no-ttr", "ttr"), ("zero-shot", "no-ttr (zero-shot)", "ttr (zero-shot)"))
FILES = {"no-ttr": "predictions_no-ttr.csv", "ttr": "predictions_ttr.csv",
         "no-ttr (zero-shot)": "predictions_zero-shot_no-ttr.csv", "ttr (zero-shot)": "predictions_zero-shot_ttr.csv"}


def holm_by_hand(p_values: list[float]) -> list[float]:
    """Holm step-down: sort, multiply the i-th smallest (0-based) by m - i, running maximum, cap at 1."""
    valid = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    m = len(valid)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(sorted(valid)):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _done(fake_study) -> list[tuple[str, Path]]:
    return [(c["name"], Path(c["folder"])) for c in fake_study["cells"] if c["status"] == "done"]


def _predictions(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    frame = pd.read_csv(path)
    classes = [c[2:-1] for c in frame.columns if c.startswith("p[")]
    y = np.array([classes.index(t) for t in frame["true"]])
    predicted = np.array([classes.index(t) for t in frame["predicted"]])
    return classes, y, predicted, frame[[f"p[{c}]" for c in classes]].to_numpy()


def test_holm_over_the_grid_by_hand(fake_study):
    table = pd.read_csv(fake_study["out"] / "paper_table.csv")
    probe = table[(table["comparison"] == "probe") & (table["metric"] == "top1")]
    assert list(probe["p"]) == [0.01, 0.04, 0.03, 0.005]     # the chosen p-values
    # by hand: 0.005*4 = 0.02; 0.01*3 = 0.03; 0.03*2 = 0.06; 0.04*1 = 0.04 -> running max 0.06
    assert list(probe["p_holm"]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert set(probe["family_size"]) == {4}
    zero = table[(table["comparison"] == "zero-shot") & (table["metric"] == "top1")]
    # the zero-shot rows are their own family: two cells have a p-value (one NaN, one without rows)
    assert list(zero["cell"]) == ["aptos_dinov2_0", "pacemaker_dinov2_2", "aptos_dinov2_3"]
    assert list(zero["p_holm"].iloc[:2]) == pytest.approx(holm_by_hand([0.2, 0.01]))
    assert math.isnan(zero["p_holm"].iloc[2]) and set(zero["family_size"]) == {2}
    for (kind, metric), part in table.groupby(["comparison", "metric"]):
        assert list(part["p_holm"]) == pytest.approx(holm_by_hand(list(part["p"])), nan_ok=True), (kind, metric)
    # qwk only on the two APTOS cells, manufacturer top-1 only on the Pacemaker cell
    assert set(table.loc[table["metric"] == "qwk", "dataset"]) == {"aptos"}
    assert set(table.loc[(table["metric"] == "qwk") & (table["comparison"] == "probe"), "family_size"]) == {2}
    assert set(table.loc[table["metric"] == "manufacturer_top1", "cell"]) == {"pacemaker_dinov2_2"}
    mcnemar = pd.read_csv(fake_study["out"] / "mcnemar.csv")
    for kind, part in mcnemar.groupby("comparison"):
        assert list(part["p_holm"]) == pytest.approx(holm_by_hand(list(part["p"])))


def test_paper_table_and_mcnemar_are_the_cells_metrics(fake_study):
    table = pd.read_csv(fake_study["out"] / "paper_table.csv")
    mcnemar = pd.read_csv(fake_study["out"] / "mcnemar.csv")
    assert list(table["top_k"].drop_duplicates()) == [0, 1, 2, 3]   # the axis setting of each cell
    for name, folder in _done(fake_study):
        metrics = pd.read_csv(folder / "metrics.csv").set_index("mode")
        for kind, base, mode in COMPARISONS:
            rows = table[(table["cell"] == name) & (table["comparison"] == kind)].set_index("metric")
            if mode not in metrics.index:
                assert rows.empty
                continue
            names = [c[:-len("_diff")] for c in metrics.columns if c.endswith("_diff")]
            assert sorted(rows.index) == sorted(names)
            for metric in names:
                assert rows.loc[metric, "no_ttr"] == pytest.approx(metrics.loc[base, metric])
                assert rows.loc[metric, "ttr"] == pytest.approx(metrics.loc[mode, metric])
                for ours, theirs in (("diff", f"{metric}_diff"), ("diff_lo", f"{metric}_diff_lo"),
                                     ("diff_hi", f"{metric}_diff_hi"), ("p", f"p_{metric}")):
                    assert rows.loc[metric, ours] == pytest.approx(metrics.loc[mode, theirs], nan_ok=True)
            row = mcnemar[(mcnemar["cell"] == name) & (mcnemar["comparison"] == kind)].iloc[0]
            assert (row["only_ttr_right"], row["only_no_ttr_right"]) == (metrics.loc[mode, "mcnemar_c"],
                                                                         metrics.loc[mode, "mcnemar_b"])
            assert row["p"] == pytest.approx(metrics.loc[mode, "p_mcnemar_top1"])


def test_per_class_and_calibration_from_the_predictions_files(fake_study):
    per_class = pd.read_csv(fake_study["out"] / "per_class.csv")
    calibration = pd.read_csv(fake_study["out"] / "calibration.csv")
    for name, folder in _done(fake_study):
        recalls, f1s = {}, {}
        for mode, file in FILES.items():
            if not (folder / file).is_file():
                continue
            classes, y, predicted, p = _predictions(folder / file)
            labels = list(range(len(classes)))
            recalls[mode] = recall_score(y, predicted, labels=labels, average=None, zero_division=0)
            f1s[mode] = f1_score(y, predicted, labels=labels, average=None, zero_division=0)
            row = calibration[(calibration["cell"] == name) & (calibration["mode"] == mode)].iloc[0]
            confidence, correct = p.max(axis=1), (p.argmax(axis=1) == y)
            bins = np.clip(np.ceil(confidence * 15).astype(int) - 1, 0, 14)   # (m/15, (m+1)/15]
            ece = sum(abs(correct[bins == m].mean() - confidence[bins == m].mean()) * (bins == m).mean()
                      for m in set(bins))
            assert row["ece"] == pytest.approx(ece, abs=1e-12)
            assert row["brier"] == pytest.approx(((p - np.eye(len(classes))[y]) ** 2).sum(axis=1).mean())
            assert row["accuracy"] == pytest.approx(np.mean(y == predicted)) and row["n"] == len(y)
        for kind, base, mode in COMPARISONS:
            rows = per_class[(per_class["cell"] == name) & (per_class["comparison"] == kind)]
            if mode not in recalls:
                assert rows.empty
                continue
            assert list(rows["class"]) == classes
            assert rows["recall_delta"].to_numpy() == pytest.approx(recalls[mode] - recalls[base])
            assert rows["f1_delta"].to_numpy() == pytest.approx(f1s[mode] - f1s[base])


def test_per_class_scores_of_absent_classes():
    true, predicted = np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1])
    scores = per_class_scores(true, predicted, 4)
    assert scores["support"].tolist() == [2, 2, 0, 0]
    # recall = tp / support: NaN for a class without test images
    assert scores["recall"].tolist()[:2] == [0.5, 1.0]
    assert math.isnan(scores["recall"][2]) and math.isnan(scores["recall"][3])
    # F1 = 2 tp / (2 tp + fp + fn): class 0: 2/3; class 1: 1; class 2 predicted once, never true: 0; class 3: NaN
    assert scores["f1"].tolist()[:3] == pytest.approx([2 / 3, 1.0, 0.0]) and math.isnan(scores["f1"][3])


def test_outliers_are_the_cells_own(fake_study):
    outliers = pd.read_csv(fake_study["out"] / "outliers.csv").set_index("cell")
    for name, folder in _done(fake_study):
        cell = pd.read_csv(folder / "outliers.csv").set_index("mode")
        for stat in cell.columns:
            for mode, suffix in (("no-ttr", "no_ttr"), ("ttr", "ttr")):
                expected, got = cell.loc[mode, stat], outliers.loc[name, f"{stat}_{suffix}"]
                assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected)
        assert outliers.loc[name, "threshold"] == 150


def test_neuron_overlap_between_datasets_and_with_the_published_set(fake_study):
    overlap = pd.read_csv(fake_study["out"] / "neuron_overlap.csv")
    paper = {(l, n) for l, ids in PAPER_NEURONS_DINOV2_VITL14.items() for n in ids}
    cells = {name: json.loads((folder / "register_neurons.json").read_text()) for name, folder in _done(fake_study)}
    # the two aptos cells differ only in their axis: one detection, the first one's; three datasets give
    # three pairs and three rows against the published set
    assert len(overlap) == 6 and (overlap["set_b"] == PAPER_LABEL).sum() == 3
    first = cells["aptos_dinov2_0"]
    chosen = {(int(l), n) for l, ids in first["selected"].items() for n in ids}
    row = overlap[(overlap["set_a"] == "aptos") & (overlap["set_b"] == PAPER_LABEL)].iloc[0]
    assert row["shared"] == len(chosen & paper)
    assert row["jaccard"] == pytest.approx(len(chosen & paper) / len(chosen | paper))
    rank = {(l, n): i + 1 for i, (l, n, _) in enumerate(first["ranked"])}
    assert row["paper_median_rank"] == pytest.approx(np.median([rank[k] for k in paper if k in rank]))
    # between datasets: Jaccard of the selections and Spearman of the full score vectors (pandas' own rank
    # correlation, not the report's scipy call)
    other = cells["orthonet_dinov2_1"]
    pair = overlap[(overlap["set_a"] == "aptos") & (overlap["set_b"] == "orthonet")].iloc[0]
    chosen_b = {(int(l), n) for l, ids in other["selected"].items() for n in ids}
    assert pair["jaccard"] == pytest.approx(len(chosen & chosen_b) / len(chosen | chosen_b))
    a = pd.Series({(l, n): s for l, n, s in first["ranked"]})
    b = pd.Series({(l, n): s for l, n, s in other["ranked"]})
    assert pair["spearman_rho"] == pytest.approx(a.corr(b[a.index], method="spearman"))
    assert pair["spearman_n"] == len(a)
