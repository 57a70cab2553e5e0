"""``python -m common.report``: one table and one figure over several runs (SPEC §7).

The run folders are built the way a run writes them (``metrics_table`` of the real metrics code
on seeded predictions, a ``config.json`` with the keys a run records, an ``outliers.csv``), which
is far cheaper than running two demos."""

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

from common.analysis import OUTLIER_COLUMNS
from common.metrics import MetricSpec, evaluate_mode, metrics_table, paired_tests
from common.report import holm, main, write_report

ROOT = Path(__file__).resolve().parents[1]


def _probabilities(labels: np.ndarray, classes: int, skill: float, seed: int) -> np.ndarray:
    """``[seeds=3, n, C]`` probabilities that favour the true class by ``skill``."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(3, len(labels), classes))
    logits[:, np.arange(len(labels)), labels] += skill
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def make_run(folder: Path, dataset: str, model: str, *, qwk: bool, seed: int, outliers: bool = True) -> Path:
    folder.mkdir(parents=True)
    classes = 5
    labels = np.random.default_rng(seed).integers(0, classes, size=40)
    spec = MetricSpec(n_classes=classes, qwk=qwk)
    proba = {"no-ttr": _probabilities(labels, classes, 1.5, seed), "ttr": _probabilities(labels, classes, 2.0, seed + 1)}
    results = {mode: evaluate_mode(labels, p, spec, n_boot=100, seed=0) for mode, p in proba.items()}
    tests = paired_tests(labels, proba["no-ttr"], proba["ttr"], spec, n_boot=100, seed=0)
    metrics_table(results, tests).to_csv(folder / "metrics.csv", index=False)
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
            make_run(root / "orthonet_dinov2", "orthonet", "dinov2", qwk=False, seed=2, outliers=False)]


def test_holm():
    adjusted = holm([0.01, 0.04, float("nan"), 0.03])
    # sorted 0.01, 0.03, 0.04 with m = 3: 0.03, max(0.03, 0.06), max(0.06, 0.04) -> 0.03, 0.06, 0.06
    assert adjusted[0] == pytest.approx(0.03)
    assert adjusted[3] == pytest.approx(0.06)
    assert adjusted[1] == pytest.approx(0.06)
    assert math.isnan(adjusted[2])
    assert holm([0.5, 0.9]).tolist() == [1.0, 1.0]


def test_report_over_two_runs(runs, tmp_path):
    out = tmp_path / "report"
    assert main([str(r) for r in runs] + ["--out", str(out)]) == 0
    table = pd.read_csv(out / "report.csv")
    assert len(table) == 4
    assert table[["run", "mode"]].values.tolist() == [
        ["aptos_clip", "no-ttr"], ["aptos_clip", "ttr"], ["orthonet_dinov2", "no-ttr"], ["orthonet_dinov2", "ttr"]]
    for column in ("dataset", "backbone", "top1", "top1_lo", "top1_hi", "f1_macro_lo", "delta_top1",
                   "p_mcnemar_top1", "p_mcnemar_top1_holm", "p_bootstrap_f1_macro_holm",
                   "patch_share_above_threshold", "qwk"):
        assert column in table.columns, column
    for run in ("aptos_clip", "orthonet_dinov2"):
        metrics = pd.read_csv(runs[0].parent / run / "metrics.csv").set_index("mode")
        ttr = table[(table["run"] == run) & (table["mode"] == "ttr")].iloc[0]
        assert ttr["delta_top1"] == pytest.approx(metrics.loc["ttr", "top1"] - metrics.loc["no-ttr", "top1"])
        assert ttr["p_mcnemar_top1"] == pytest.approx(metrics.loc["ttr", "p_mcnemar_top1"])
        assert ttr["p_mcnemar_top1_holm"] >= ttr["p_mcnemar_top1"]
    no = table[table["mode"] == "no-ttr"]
    assert no["delta_top1"].isna().all() and no["p_mcnemar_top1"].isna().all()
    assert table.loc[table["dataset"] == "orthonet", "qwk"].isna().all()   # not an APTOS run
    assert table.loc[table["dataset"] == "orthonet", "patch_share_above_threshold"].isna().all()

    text = (out / "report.md").read_text()
    assert "| aptos_clip | aptos |" in text and "| orthonet_dinov2 | orthonet |" in text
    assert "Holm" in text and "demo" in text and "report.png" in text
    with PIL.Image.open(out / "report.png") as image:
        assert image.format == "PNG" and image.width > 400
    assert (out / "report.png").stat().st_size > 10_000


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
    assert len(written) == 4 and (tmp_path / "ok" / "report.csv").is_file()
