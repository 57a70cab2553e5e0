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


def test_holm_runs_over_the_primary_metric_of_the_main_cells(fake_study):
    table = pd.read_csv(fake_study["out"] / "paper_table.csv")
    family = table[table["family"] == "primary, main cells"]
    # the three main cells' primary metrics: aptos qwk, orthonet top-1, pacemaker top-1
    assert list(zip(family["cell"], family["metric"])) == [("aptos_dinov2_0", "qwk"), ("orthonet_dinov2_1", "top1"),
                                                           ("pacemaker_dinov2_2", "top1")]
    assert list(family["p"]) == [0.004, 0.04, 0.03]             # the chosen p-values
    # by hand: 0.004*3 = 0.012; 0.03*2 = 0.06; 0.04*1 = 0.04 -> running max 0.06
    assert list(family["p_holm"]) == pytest.approx([0.012, 0.06, 0.06])
    assert list(family["p_holm"]) == pytest.approx(holm_by_hand(list(family["p"])))
    assert set(family["family_size"]) == {3} and family["main"].all() and family["primary"].all()
    # the verdict on the Holm-adjusted p: the first is significant, in the direction of its difference
    first = family.iloc[0]
    assert first["verdict"] == ("better" if first["diff"] > 0 else "worse")
    assert set(family["verdict"].iloc[1:]) == {"no detectable"}
    # everything else is exploratory and unadjusted: the sensitivity cell's primary metric (p = 0.005),
    # the secondary metrics, the zero-shot comparisons
    others = table[table["family"] != "primary, main cells"]
    assert set(others["family"]) == {"exploratory"}
    assert others["p_holm"].isna().all() and (others["family_size"] == 0).all()
    sensitivity = others[(others["cell"] == "aptos_dinov2_3") & (others["metric"] == "qwk") &
                         (others["comparison"] == "probe")].iloc[0]
    assert sensitivity["p"] == 0.005 and not sensitivity["main"] and sensitivity["primary"]
    assert set(table.loc[table["metric"] == "qwk", "dataset"]) == {"aptos"}
    assert set(table.loc[table["metric"] == "manufacturer_top1", "cell"]) == {"pacemaker_dinov2_2"}


def test_paper_table_holds_the_cells_metrics(fake_study):
    table = pd.read_csv(fake_study["out"] / "paper_table.csv")
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
                assert rows.loc[metric, "test"] == ("exact McNemar" if metric in ("top1", "manufacturer_top1")
                                                    else "permutation")
            assert rows.loc["top1", "discordant_ttr_better"] == metrics.loc[mode, "top1_discordant_ttr_better"]
            assert rows.loc["top1", "discordant_ttr_worse"] == metrics.loc[mode, "top1_discordant_ttr_worse"]
            assert math.isnan(rows.loc["f1_macro", "discordant_ttr_better"])


def test_per_class_and_calibration_from_the_predictions_files(fake_study):
    per_class = pd.read_csv(fake_study["out"] / "per_class.csv")
    calibration = pd.read_csv(fake_study["out"] / "calibration.csv")
    for index, (name, folder) in enumerate(_done(fake_study)):
        recalls, f1s, probabilities, labels_of = {}, {}, {}, {}
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
            probabilities[mode], labels_of[mode] = p, y
        for kind, base, mode in COMPARISONS:
            rows = per_class[(per_class["cell"] == name) & (per_class["comparison"] == kind)]
            if mode not in recalls:
                assert rows.empty
                continue
            assert list(rows["class"]) == classes
            assert rows["recall_delta"].to_numpy() == pytest.approx(recalls[mode] - recalls[base])
            assert rows["f1_delta"].to_numpy() == pytest.approx(f1s[mode] - f1s[base])
            # the change of the Brier score with its paired bootstrap interval, by a loop over the
            # documented resamples (the cell's seed and bootstrap_resamples = 100)
            y = labels_of[base]
            per_row = {m: ((probabilities[m] - np.eye(probabilities[m].shape[1])[y]) ** 2).sum(axis=1)
                       for m in (base, mode)}
            idx = np.random.default_rng(index).integers(0, len(y), size=(100, len(y)))
            diffs = np.sort([per_row[mode][r].mean() - per_row[base][r].mean() for r in idx])
            row = calibration[(calibration["cell"] == name) & (calibration["mode"] == mode)].iloc[0]
            assert row["brier_diff"] == pytest.approx(per_row[mode].mean() - per_row[base].mean())
            assert (row["brier_diff_lo"], row["brier_diff_hi"]) == pytest.approx((diffs[2], diffs[-3]))  # j = 3 of 100
            assert row["ece_diff_lo"] <= row["ece_diff"] <= row["ece_diff_hi"]


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
    # between datasets: Jaccard of the selections and Spearman of the scores over the union of the two
    # selections (pandas' own rank correlation, not the report's scipy call)
    other = cells["orthonet_dinov2_1"]
    pair = overlap[(overlap["set_a"] == "aptos") & (overlap["set_b"] == "orthonet")].iloc[0]
    chosen_b = {(int(l), n) for l, ids in other["selected"].items() for n in ids}
    assert pair["jaccard"] == pytest.approx(len(chosen & chosen_b) / len(chosen | chosen_b))
    union = sorted(chosen | chosen_b)
    a = pd.Series({(l, n): s for l, n, s in first["ranked"]})[union]
    b = pd.Series({(l, n): s for l, n, s in other["ranked"]})[union]
    assert pair["spearman_rho"] == pytest.approx(a.corr(b, method="spearman"))
    assert pair["spearman_n"] == len(union) < len(first["ranked"])
