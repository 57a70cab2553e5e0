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
from common.evaluation.compare import evaluate_modes
from common.evaluation.metrics import MetricSpec
from common.errors import UserError
from common.reporting.report import main, write_report

ROOT = Path(__file__).resolve().parents[2]
EXTRA_MODES = ["no-ttr (course probe)", "ttr (course probe)", "no-ttr-removed"]

# chosen p-values per run (ttr row): the primary metric is APTOS's qwk and OrthoNet's top1
# (configs.PRIMARY_METRIC); the Holm family (one primary test per run) is computed by hand below
P_CHOSEN = {
    "aptos_clip": {"p_top1": 0.01, "p_qwk": 0.02},
    "aptos_dinov2": {"p_top1": 0.04, "p_qwk": 0.50},
    "orthonet_dinov2": {"p_top1": 0.03},
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
    table = evaluate_modes(labels, proba, MetricSpec(n_classes=classes, qwk=qwk), n_boot=100, n_perm=50, seed=0,
                           primary="qwk" if qwk else "top1")
    ttr = table["mode"] == "ttr"
    for column, value in P_CHOSEN[folder.name].items():
        table.loc[ttr, column] = value
    if extra_rows:  # tiny p-values outside the family: they must not change the ttr rows' Holm values
        table.loc[table["mode"].isin(EXTRA_MODES), ["p_top1", "p_qwk"]] = 1e-4
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
                       f"p_{m}", f"{m}_diff_lo_refit"):
            assert column in table.columns, column
    for column in ("top1_discordant_ttr_better", "top1_discordant_ttr_worse", "primary_metric", "p_primary",
                   "p_primary_holm", "verdict", "auc_classes", "patch_share_above_threshold", "dataset", "backbone"):
        assert column in table.columns, column
    for run in runs:  # every value is the run's own, copied as written
        metrics = pd.read_csv(run / "metrics.csv").set_index("mode")
        rows = table[table["run"] == run.name].set_index("mode")
        for mode in metrics.index:
            for column in ("top1", "top1_lo", "f1_macro_seed_sd", "top1_diff", "auc_macro_diff_hi", "p_f1_macro",
                           "top1_discordant_ttr_worse"):
                assert rows.loc[mode, column] == pytest.approx(metrics.loc[mode, column], nan_ok=True), (run, mode)
    no = table[table["mode"] == "no-ttr"]
    assert no[["top1_diff", "p_top1", "p_primary", "p_primary_holm"]].isna().all().all()
    assert table.loc[table["dataset"] == "orthonet", ["qwk", "qwk_diff", "p_qwk"]].isna().all().all()
    assert table.loc[table["dataset"] == "orthonet", "patch_share_above_threshold"].isna().all()
    assert not table["recomputed"].any()


def test_holm_runs_over_the_primary_metric_of_each_run(report):
    table = pd.read_csv(report / "report.csv")
    ttr = table[table["mode"] == "ttr"].set_index("run")
    assert ttr["primary_metric"].to_dict() == {"aptos_clip": "qwk", "aptos_dinov2": "qwk", "orthonet_dinov2": "top1"}
    assert ttr["p_primary"].to_dict() == pytest.approx({"aptos_clip": 0.02, "aptos_dinov2": 0.50,
                                                        "orthonet_dinov2": 0.03})
    # (0.02, 0.50, 0.03), m = 3: 0.02 -> 3 x 0.02 = 0.06; 0.03 -> max(0.06, 2 x 0.03) = 0.06;
    # 0.50 -> max(0.06, 0.50) = 0.50.  The extra rows' 1e-4 are not in the family.
    assert ttr["p_primary_holm"].to_dict() == pytest.approx({"aptos_clip": 0.06, "aptos_dinov2": 0.50,
                                                             "orthonet_dinov2": 0.06})
    assert set(ttr["verdict"]) == {"no detectable"}          # nothing survives Holm at 5%
    others = table[~table["mode"].isin(["no-ttr", "ttr"])]
    assert len(others) == 3 and others["p_top1"].eq(1e-4).all() and others["p_primary_holm"].isna().all()


def test_markdown_and_figure(report):
    text = (report / "report.md").read_text()
    assert "| aptos_clip | aptos |" in text and "| orthonet_dinov2 | orthonet |" in text
    ttr = pd.read_csv(report / "report.csv").query("run == 'orthonet_dinov2' and mode == 'ttr'").iloc[0]
    line = [ln for ln in text.splitlines() if ln.startswith("| orthonet_dinov2 | orthonet |") and "| top-1" in ln]
    assert len(line) == 1 and "| top-1 accuracy |" in line[0]     # the answer's row
    assert f"{ttr['top1_diff']:+.3f} [{ttr['top1_diff_lo']:+.3f}, {ttr['top1_diff_hi']:+.3f}]" in line[0]
    assert (f"ttr right where no-ttr wrong: {int(ttr['top1_discordant_ttr_better'])}, the reverse: "
            f"{int(ttr['top1_discordant_ttr_worse'])}") in line[0]
    assert "| 0.030 | 0.060 |" in line[0]       # the chosen p and its Holm value by hand
    assert "over the 3 primary tests (one per run)" in text and "exploratory and unadjusted" in text
    assert "`no-ttr (course probe)`" in text and "not part of the tables below" in text
    assert "demo" in text and "report.png" in text
    with PIL.Image.open(report / "report.png") as image:
        assert image.format == "PNG" and image.width > 800 and image.height > 400


def test_a_run_of_an_older_schema_is_recomputed_from_its_predictions(tmp_path):
    """A metrics.csv without schema_version (percentile-bootstrap p-values): the report recomputes
    its statistics from the predictions files, so it holds one method; without them it stops."""
    folder = tmp_path / "old"
    folder.mkdir()
    classes = ["0 - No DR", "1 - Mild", "2 - Moderate"]
    y = np.arange(30) % 3
    proba = {"no-ttr": _probabilities(y, 3, 1.0, 5)[0], "ttr": _probabilities(y, 3, 2.0, 6)[0]}
    for mode, p in proba.items():
        frame = pd.DataFrame({"path": [f"{i}.png" for i in range(30)], "true": [classes[k] for k in y],
                              "predicted": [classes[k] for k in p.argmax(1)]})
        for k, name in enumerate(classes):
            frame[f"p[{name}]"] = p[:, k]
        frame.to_csv(folder / f"predictions_{mode}.csv", index=False)
    pd.DataFrame({"mode": ["no-ttr", "ttr"], "top1": [0.7, 0.8], "top1_lo": [0.6, 0.7], "top1_hi": [0.8, 0.9],
                  "top1_seed_sd": [0.01, 0.02], "qwk": [0.5, 0.6], "qwk_lo": [0.4, 0.5], "qwk_hi": [0.6, 0.7],
                  "top1_diff": [math.nan, 0.1], "p_top1": [math.nan, 0.0]}).to_csv(folder / "metrics.csv", index=False)
    (folder / "config.json").write_text(json.dumps({"dataset": "aptos", "model": "clip",
                                                    "config": {"seed": 0, "bootstrap_resamples": 50}}))
    table = write_report([folder], tmp_path / "out").set_index("mode")
    expected = evaluate_modes(y, {m: p[None] for m, p in proba.items()}, MetricSpec(3, qwk=True), n_boot=50,
                              seed=0, primary="qwk").set_index("mode")
    for column in ("top1", "top1_lo", "p_top1", "qwk_diff_lo", "p_qwk"):
        assert table.loc["ttr", column] == pytest.approx(expected.loc["ttr", column]), column
    assert table.loc["ttr", "top1_seed_sd"] == 0.02                     # kept: the files hold the ensemble only
    assert table["recomputed"].all() and table.loc["ttr", "primary_metric"] == "qwk"
    assert "recomputed here from their predictions files" in (tmp_path / "out" / "report.md").read_text()
    for mode in proba:
        (folder / f"predictions_{mode}.csv").unlink()
    with pytest.raises(UserError, match="no predictions files to recompute it from"):
        write_report([folder], tmp_path / "out2")


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
