"""``python -m common.report``: one table and one figure over several runs (docs/run.md).

The run folders are written here the way a run writes them (``evaluate_modes`` of the real
metrics code on seeded predictions, a ``config.json`` with the keys a run records, an
``outliers.csv``), which is far cheaper than running demos; the p-values that the Holm
adjustment combines are then set to chosen numbers so the adjustment can be checked by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image
import pytest

from common.evaluation.analysis import OUTLIER_COLUMNS
from common.evaluation.metrics import MetricSpec, evaluate_modes
from common.evaluation.stats import holm
from common.reporting.report import main, write_report

ROOT = Path(__file__).resolve().parents[2]
EXTRA_MODES = ["no-ttr (course probe)", "ttr (course probe)", "no-ttr-removed"]

# chosen p-values per run (ttr row): the Holm families are computed by hand in the tests below
P_CHOSEN = {
    "aptos_clip": {"p_top1": 0.01, "p_mcnemar_top1": 0.20, "p_qwk": 0.02},
    "aptos_dinov2": {"p_top1": 0.04, "p_mcnemar_top1": 0.01, "p_qwk": 0.50},
    "orthonet_dinov2": {"p_top1": 0.03, "p_mcnemar_top1": 0.03},
}


def _probabilities(labels: np.ndarray, classes: int, skill: float, seed: int, seeds: int = 3) -> np.ndarray:
    """``[seeds, n, C]`` probabilities that favour the true class by ``skill``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(seeds, len(labels), classes))
    logits[:, np.arange(len(labels)), labels] += skill
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def make_run(folder: Path, dataset: str, model: str, *, qwk: bool, seed: int, outliers: bool = True,
             extra_rows: bool = False) -> Path:
    folder.mkdir(parents=True)
    classes = 5
    labels = np.random.default_rng(seed).integers(0, classes, size=40)
    proba = {"no-ttr": _probabilities(labels, classes, 1.5, seed),
             "ttr": _probabilities(labels, classes, 2.0, seed + 1)}
    if extra_rows:  # rows a run may add: saved course probes (one "seed") and the removal experiment
        proba.update({mode: _probabilities(labels, classes, 1.0, seed + 2 + k, seeds=1)
                      for k, mode in enumerate(EXTRA_MODES)})
    table = evaluate_modes(labels, proba, MetricSpec(n_classes=classes, qwk=qwk), n_boot=100, seed=0)
    ttr = table["mode"] == "ttr"
    for column, value in P_CHOSEN[folder.name].items():
        table.loc[ttr, column] = value
    if extra_rows:  # tiny p-values outside the family: they must not change the ttr rows' Holm values
        table.loc[table["mode"].isin(EXTRA_MODES), ["p_top1", "p_mcnemar_top1"]] = 1e-4
    table.to_csv(folder / "metrics.csv", index=False)
    config = {"dataset": dataset, "model": model, "demo": True, "status": "done",
              "backbone": f"planted {model} fixture (seed 0)", "config": {"seed": 0}, "planted": [[2, 7]]}
    (folder / "config.json").write_text(json.dumps(config))
    if outliers:
        pd.DataFrame([["no-ttr", 0.23, 250.0, math.nan, 4.1, math.nan], ["ttr", 0.0, 40.0, 251.0, 4.1, 0.02]],
                     columns=list(OUTLIER_COLUMNS)).to_csv(folder / "outliers.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [make_run(root / "aptos_clip", "aptos", "clip", qwk=True, seed=1),
            make_run(root / "aptos_dinov2", "aptos", "dinov2", qwk=True, seed=3, extra_rows=True),
            make_run(root / "orthonet_dinov2", "orthonet", "dinov2", qwk=False, seed=2, outliers=False)]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert main([str(r) for r in runs] + ["--out", str(out)]) == 0
    return out


def test_report_rows_columns_and_values(runs, report):
    assert sorted(p.name for p in report.iterdir()) == ["report.csv", "report.md", "report.png"]  # no temporaries
    table = pd.read_csv(report / "report.csv")
    assert table[["run", "mode"]].values.tolist() == [
        ["aptos_clip", "no-ttr"], ["aptos_clip", "ttr"],
        ["aptos_dinov2", "no-ttr"], ["aptos_dinov2", "ttr"], *[["aptos_dinov2", m] for m in EXTRA_MODES],
        ["orthonet_dinov2", "no-ttr"], ["orthonet_dinov2", "ttr"]]
    for m in ("top1", "f1_macro", "auc_macro", "qwk"):
        for column in (m, f"{m}_lo", f"{m}_hi", f"{m}_seed_sd", f"{m}_diff", f"{m}_diff_lo", f"{m}_diff_hi",
                       f"p_{m}", f"p_{m}_holm"):
            assert column in table.columns, column
    for column in ("p_mcnemar_top1", "p_mcnemar_top1_holm", "mcnemar_b", "mcnemar_c", "auc_classes",
                   "patch_share_above_threshold", "dataset", "backbone"):
        assert column in table.columns, column
    for run in runs:  # every value is the run's own, copied as written
        metrics = pd.read_csv(run / "metrics.csv").set_index("mode")
        rows = table[table["run"] == run.name].set_index("mode")
        for mode in metrics.index:
            for column in ("top1", "top1_lo", "f1_macro_seed_sd", "top1_diff", "auc_macro_diff_hi", "p_f1_macro"):
                assert rows.loc[mode, column] == pytest.approx(metrics.loc[mode, column], nan_ok=True), (run, mode)
    no = table[table["mode"] == "no-ttr"]
    assert no[["top1_diff", "p_top1", "p_top1_holm", "p_mcnemar_top1"]].isna().all().all()
    assert table.loc[table["dataset"] == "orthonet", ["qwk", "qwk_diff", "p_qwk"]].isna().all().all()
    assert table.loc[table["dataset"] == "orthonet", "patch_share_above_threshold"].isna().all()


def test_holm_values_by_hand(report):
    table = pd.read_csv(report / "report.csv")
    ttr = table[table["mode"] == "ttr"].set_index("run")
    # p_top1 (0.01, 0.04, 0.03), m = 3: sorted 0.01 -> 3 x 0.01 = 0.03; 0.03 -> max(0.03, 2 x 0.03) = 0.06;
    # 0.04 -> max(0.06, 1 x 0.04) = 0.06.  The extra rows' 1e-4 are not in the family.
    assert ttr["p_top1_holm"].to_dict() == pytest.approx({"aptos_clip": 0.03, "aptos_dinov2": 0.06,
                                                          "orthonet_dinov2": 0.06})
    # McNemar (0.20, 0.01, 0.03): 0.01 -> 0.03; 0.03 -> 0.06; 0.20 -> max(0.06, 0.20) = 0.20
    assert ttr["p_mcnemar_top1_holm"].to_dict() == pytest.approx({"aptos_clip": 0.20, "aptos_dinov2": 0.03,
                                                                  "orthonet_dinov2": 0.06})
    # QWK only on the two APTOS runs (0.02, 0.50), m = 2: 0.04 and max(0.04, 0.50) = 0.50
    assert ttr.loc["aptos_clip", "p_qwk_holm"] == pytest.approx(0.04)
    assert ttr.loc["aptos_dinov2", "p_qwk_holm"] == pytest.approx(0.50)
    assert math.isnan(ttr.loc["orthonet_dinov2", "p_qwk_holm"])
    # every metric's family separately: the adjusted value is holm() over the three ttr rows
    for m in ("f1_macro", "auc_macro", "top3"):
        assert ttr[f"p_{m}_holm"].to_numpy() == pytest.approx(holm(ttr[f"p_{m}"].to_numpy()), nan_ok=True)
    others = table[~table["mode"].isin(["no-ttr", "ttr"])]
    assert len(others) == 3 and others["p_top1"].eq(1e-4).all() and others["p_top1_holm"].isna().all()


def test_markdown_and_figure(report):
    text = (report / "report.md").read_text()
    assert "| aptos_clip | aptos |" in text and "| orthonet_dinov2 | orthonet |" in text
    # the long table: one line per (run, metric) with difference, interval, p and Holm p
    ttr_clip = pd.read_csv(report / "report.csv").query("run == 'aptos_clip' and mode == 'ttr'").iloc[0]
    line = [ln for ln in text.splitlines() if ln.startswith("| aptos_clip |") and "| top-1 accuracy |" in ln]
    assert len(line) == 1
    assert f"{ttr_clip['top1_diff']:+.3f} [{ttr_clip['top1_diff_lo']:+.3f}, {ttr_clip['top1_diff_hi']:+.3f}]" in line[0]
    assert line[0].endswith("| 0.010 | 0.030 |")  # the chosen p and its Holm value by hand (below)
    assert "quadratic weighted kappa" in text and "Exact McNemar" in text
    assert "Holm" in text and "the family is all runs given here, separately for each test" in text
    assert "`no-ttr (course probe)`" in text and "not part of the tables below" in text
    assert "demo" in text and "report.png" in text
    with PIL.Image.open(report / "report.png") as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 400


def test_metrics_csv_without_paired_columns_still_reports(tmp_path):
    """A metrics.csv written before the paired columns existed: listed, differences left empty."""
    folder = tmp_path / "old"
    folder.mkdir()
    pd.DataFrame({"mode": ["no-ttr", "ttr"], "top1": [0.7, 0.8], "top1_lo": [0.6, 0.7], "top1_hi": [0.8, 0.9],
                  "top1_std": [0.01, 0.02], "auc_classes": [5, 5], "p_mcnemar_top1": [math.nan, 0.2]}
                 ).to_csv(folder / "metrics.csv", index=False)
    (folder / "config.json").write_text(json.dumps({"dataset": "aptos", "model": "clip"}))
    table = write_report([folder], tmp_path / "out")
    assert table["top1"].tolist() == [0.7, 0.8] and table["top1_diff"].isna().all()
    assert table.loc[1, "p_mcnemar_top1_holm"] == pytest.approx(0.2)
    assert (tmp_path / "out" / "report.png").is_file()


def test_bad_run_dir_exits_2(runs, tmp_path, capsys):
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main([str(runs[0]), str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(empty) in err[0]
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "missing" in capsys.readouterr().err


def test_command_line(runs, tmp_path):
    """As a user calls it: ``python -m common.report``; a bad folder exits 2 with one line."""
    bad = tmp_path / "bad"
    bad.mkdir()
    result = subprocess.run([sys.executable, "-m", "common.report", str(bad), "--out", str(tmp_path / "r")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and str(bad) in result.stderr
    written = write_report(runs, tmp_path / "ok")
    assert len(written) == 9 and (tmp_path / "ok" / "report.csv").is_file()
