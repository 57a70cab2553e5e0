"""The study (issue 15): ``python -m common.study`` and its report.

Fast: ECE and Brier against plain loops; the grid (which axis applies where, what is skipped and
why, the exact arguments of each cell); bad study arguments (exit 2, one line, nothing run); the
resume rule; the report over hand-made run folders (Holm by hand, overlap with the published set).

Slow (end to end, the demo fixture): a reduced demo study (APTOS and OrthoNet x CLIP x
normal_values zero/mean) interrupted after its first cell and run again: the finished cell is
resumed untouched, the others run, and the report's numbers are checked against the cells' own
files, read here independently of the report code.  A cell whose run fails is reported with its
exit code and error line while the others run (exit 1).  And the study under torchrun with 2 gloo
ranks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, recall_score

from common.app import study
from common.evaluation.calibration import brier_score, expected_calibration_error
from common.registers.neurons import PAPER_IDENTITY, PAPER_NEURONS_DINOV2_VITL14
from common.reporting import studyreport

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------
# plain, obviously correct versions of what the report computes


def ece_loop(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    rows = [list(map(float, row)) for row in p]
    total = 0.0
    for m in range(bins):
        lo, hi = m / bins, (m + 1) / bins
        members = [i for i, row in enumerate(rows) if lo < max(row) <= hi or (m == 0 and max(row) == 0)]
        if not members:
            continue
        accuracy = sum(1.0 for i in members if rows[i].index(max(rows[i])) == y[i]) / len(members)
        confidence = sum(max(rows[i]) for i in members) / len(members)
        total += len(members) / len(rows) * abs(accuracy - confidence)
    return total


def brier_loop(p: np.ndarray, y: np.ndarray) -> float:
    total = 0.0
    for i, row in enumerate(p):
        for c, value in enumerate(row):
            total += (value - (1.0 if c == y[i] else 0.0)) ** 2
    return total / len(p)


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


# ------------------------------------------------------------------------------------------
# calibration


def test_ece_and_brier_match_plain_loops():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(5, 0.6), size=300)
    # confidences on bin edges (k/15 exactly), a certain row and a uniform row
    edges = np.array([[0.2] * 5, [1.0, 0, 0, 0, 0], [0.4, 0.6, 0, 0, 0], [1 / 3, 1 / 3, 1 / 3, 0, 0]])
    # confidences on an edge beside ones just inside the two neighbouring bins, right and wrong
    # mixed, so that putting an edge into the wrong bin changes the ECE
    near = np.array([[c] + [(1 - c) / 4] * 4 for c in (0.4, 0.39, 0.41, 0.6, 0.59, 0.61, 0.8, 0.79, 0.81)])
    p = np.vstack([p, edges, near, near])
    y = np.concatenate([rng.integers(0, 5, len(p) - 2 * len(near)), np.tile([0, 1, 1], 3), np.tile([0, 1, 1], 3)])
    assert expected_calibration_error(p, y) == pytest.approx(ece_loop(p, y), abs=1e-12)
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(ece_loop(p, y, 10), abs=1e-12)
    assert brier_score(p, y) == pytest.approx(brier_loop(p, y), abs=1e-12)
    # alone, where neighbouring bins err in opposite directions (pooled with many overconfident rows
    # a row moved between two overconfident bins leaves the sum of |gaps| unchanged)
    y_near = np.tile([0, 1, 1], 3)
    assert expected_calibration_error(near, y_near) == pytest.approx(ece_loop(near, y_near), abs=1e-12)


def test_ece_and_brier_known_values():
    # four rows at confidence 0.9, three right: |0.75 - 0.9| = 0.15
    p = np.array([[0.9, 0.1]] * 4)
    y = np.array([0, 0, 0, 1])
    assert expected_calibration_error(p, y) == pytest.approx(0.15)
    # Brier: three rows (0.1^2 + 0.1^2), one row (0.9^2 + 0.9^2)
    assert brier_score(p, y) == pytest.approx((3 * 0.02 + 1.62) / 4)
    certain = np.eye(3)
    assert expected_calibration_error(certain, np.arange(3)) == 0.0
    assert brier_score(certain, np.arange(3)) == 0.0
    assert brier_score(certain, np.array([1, 2, 0])) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------
# the study's arguments (the grid they plan: tests/app/test_grid.py)


OUT = "OUT"   # replaced by the test's output folder; "@" by an existing dataset folder
BAD_ARGUMENTS = [
    (["--data", "mnist=DIR", "--out", OUT], "mnist"),
    (["--data", "aptos=/no/such/folder", "--out", OUT], "/no/such/folder"),
    (["--data", "aptos=@"], "--out"),
    (["--out", OUT], "--data"),
    (["--data", "aptos=@", "--out", OUT, "--axes", "colour=red"], "colour"),
    (["--data", "aptos=@", "--out", OUT, "--axes", "normal_values=zero,median"], "median"),
    (["--data", "aptos=@", "--out", OUT, "--axes", "top_k=0"], "top_k"),
    (["--data", "aptos=@", "--out", OUT, "--axes", "backbone_size=vitl15"], "vitl15"),
    (["--data", "aptos=@", "--out", OUT, "--models", "resnet"], "resnet"),
    (["--data", "aptos=@", "--out", OUT, "--set", "nonsense=1"], "nonsense"),
    (["--data", "aptos=@", "--out", OUT, "--set", "top_k=5", "--axes", "top_k=10,20"], "top_k"),
    (["--data", "aptos=@", "--out", OUT, "--weights", "clip=/no/such.bin"], "/no/such.bin"),
    (["--demo", "--data", "aptos=@", "--out", OUT], "--demo"),
    (["--data", "aptos=@", "--out", OUT, "--frobnicate"], "--frobnicate"),
]


@pytest.mark.parametrize("argv, named", BAD_ARGUMENTS)
def test_bad_study_arguments_exit_2_with_one_line(tmp_path, capsys, argv, named):
    folder = tmp_path / "aptos"
    folder.mkdir()
    out = tmp_path / "out"
    argv = [str(out) if a == OUT else a.replace("@", str(folder)) for a in argv]
    code = study.main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("error:") and named in lines[0], lines[0]
    assert not out.exists()        # nothing ran, nothing was written


def test_resume_rule(tmp_path):
    cell = study.Cell("aptos_clip", "aptos", "clip", {}, ["--model", "clip", "--out", str(tmp_path)], str(tmp_path))
    assert not study.finished(cell)
    record = {"status": "done", "command_line": ["test_aptos.py", *cell.argv]}
    (tmp_path / "config.json").write_text(json.dumps(record))
    assert study.finished(cell)
    (tmp_path / "config.json").write_text(json.dumps({**record, "command_line": ["/x/test_aptos.py", *cell.argv]}))
    assert study.finished(cell)   # the script's folder does not matter
    for changed in ({"status": "failed"}, {"status": "running"},
                    {"command_line": ["test_aptos.py", "--model", "dinov2"]},
                    {"command_line": ["test_orthonet.py", *cell.argv]}):
        (tmp_path / "config.json").write_text(json.dumps({**record, **changed}))
        assert not study.finished(cell), changed


def test_last_error_line():
    assert study.last_error_line("INFO a\nerror: --weights x: no such file\n") == "error: --weights x: no such file"
    traceback = ("Traceback (most recent call last):\n  File x\nValueError: bad\n"
                 "error: unexpected failure (traceback above); please report it with that traceback\n")
    assert study.last_error_line(traceback) == "ValueError: bad"


# ------------------------------------------------------------------------------------------
# the report over hand-made run folders (fast)


METRICS = ("top1", "f1_macro")
CLASSES = ["a - one", "b - two", "c - three"]


def _fake_cell(folder: Path, rng: np.random.Generator, p_top1: float, p_zero: float | None, dataset: str,
               ranking: list[list], selected: dict, identity: dict) -> None:
    folder.mkdir(parents=True)
    rows = []
    modes = ["no-ttr", "ttr"] + (["no-ttr (zero-shot)", "ttr (zero-shot)"] if p_zero is not None else [])
    for mode in modes:
        row = {"mode": mode}
        for m in METRICS:
            row.update({m: rng.uniform(0.5, 0.9), f"{m}_lo": 0.4, f"{m}_hi": 0.95, f"{m}_seed_sd": 0.0})
        if mode.startswith("ttr"):
            p = p_top1 if mode == "ttr" else p_zero
            for m in METRICS:
                row.update({f"{m}_diff": rng.normal(0, 0.05), f"{m}_diff_lo": -0.1, f"{m}_diff_hi": 0.1,
                            f"p_{m}": p if m == "top1" else float(rng.uniform())})
            row.update({"p_mcnemar_top1": float(rng.uniform()), "mcnemar_b": 3, "mcnemar_c": 5})
        rows.append(row)
    pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
    for mode in modes:
        name = f"zero-shot_{mode.split(' ')[0]}" if "zero-shot" in mode else mode
        p = rng.dirichlet(np.ones(3), size=20)
        true = rng.integers(0, 3, 20)
        frame = pd.DataFrame({"path": [f"img{i}.png" for i in range(20)], "true": [CLASSES[t] for t in true],
                              "predicted": [CLASSES[k] for k in p.argmax(1)]})
        for k, c in enumerate(CLASSES):
            frame[f"p[{c}]"] = p[:, k]
        frame.to_csv(folder / f"predictions_{name}.csv", index=False)
    pd.DataFrame({"mode": ["no-ttr", "ttr"], "patch_share_above_threshold": [0.2, 0.01],
                  "mean_max_patch_norm": [300.0, 90.0], "register_norm": [math.nan, 310.0],
                  "cls_attention_entropy": [3.0, 4.0], "cls_attention_on_register": [math.nan, 0.3]}
                 ).to_csv(folder / "outliers.csv", index=False)
    (folder / "register_neurons.json").write_text(json.dumps({
        "source": "detected", "model": identity, "highest_layer": 19, "top_k": len(sum(selected.values(), [])),
        "selected": selected, "ranked": ranking}))
    (folder / "config.json").write_text(json.dumps({
        "status": "done", "dataset": dataset, "model": "dinov2", "demo": False, "backbone": "DINOv2 vitl14",
        "register_norm_threshold_used": 150, "stage_seconds": {"total": 12.5}}))


@pytest.fixture(scope="module")
def fake_study(tmp_path_factory) -> dict:
    """Four DINOv2 ViT-L/14 cells made by hand, their study record and its report."""
    base = tmp_path_factory.mktemp("fake_study")
    rng = np.random.default_rng(0)
    identity = PAPER_IDENTITY.as_dict()
    p_top1 = [0.01, 0.04, 0.03, 0.005]
    p_zero = [0.2, None, 0.01, math.nan]
    cells = []
    for i, dataset in enumerate(("aptos", "orthonet", "pacemaker", "aptos")):
        # every (layer, neuron) of 3 layers x 8 neurons scored; some strong ones above highest_layer = 19
        pairs = [(layer, n) for layer in (14, 17, 21) for n in range(8)] + [(13, 2400), (14, 2110)]
        scores = rng.gamma(1.0, 1.0, len(pairs)) * np.where(np.array([l for l, _ in pairs]) == 21, 30, 1)
        ranked = sorted(([l, n, float(s)] for (l, n), s in zip(pairs, scores)), key=lambda r: -r[2])
        kept = [r for r in ranked if r[0] <= 19][:6]
        selected: dict[str, list[int]] = {}
        for layer, n, _ in kept:
            selected.setdefault(str(layer), []).append(n)
        name = f"{dataset}_dinov2_{i}"
        folder = base / "cells" / name
        _fake_cell(folder, rng, p_top1[i], p_zero[i], dataset, ranked, selected, identity)
        cells.append({"name": name, "dataset": dataset, "model": "dinov2", "settings": {"top_k": str(i)},
                      "argv": [], "folder": str(folder), "status": "done", "exit_code": 0, "error": "",
                      "seconds": 1.0, "command": f"python test_{dataset}.py ...", "script": f"test_{dataset}.py"})
    cells.append({"name": "aptos_clip", "dataset": "aptos", "model": "clip", "settings": {}, "argv": [],
                  "folder": str(base / "cells" / "aptos_clip"), "status": "failed", "exit_code": 2,
                  "error": "error: no weights", "seconds": 0.5, "command": "python test_aptos.py ...",
                  "script": "test_aptos.py"})
    record = {"cells": cells, "skipped": [{"dataset": "aptos", "model": "clip", "combination": "neurons=paper",
                                           "reason": "no published neurons"}],
              "axes": {"top_k": ["0", "1", "2", "3"]}, "datasets": {"aptos": "x", "orthonet": "x", "pacemaker": "x"},
              "models": ["dinov2", "clip"], "demo": False, "wall_seconds": 3.0, "command_line": ["python", "-m", "x"],
              "root": str(ROOT)}
    report = studyreport.write_report(record, base / "report")
    return {"base": base, "report": report, "cells": cells, "p_top1": p_top1, "p_zero": p_zero}


def test_report_holm_matches_hand_computation(fake_study):
    table = pd.read_csv(fake_study["base"] / "report" / "paper_table.csv")
    probe = table[(table["comparison"] == "probe") & (table["metric"] == "top1")]
    assert list(probe["p"]) == fake_study["p_top1"]
    # by hand: 0.005*4 = 0.02; 0.01*3 = 0.03; 0.03*2 = 0.06; 0.04*1 = 0.04 -> running max 0.06
    assert list(probe["p_holm"]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert set(probe["family_size"]) == {4}
    zero = table[(table["comparison"] == "zero-shot") & (table["metric"] == "top1")]
    # the zero-shot rows are their own family: two cells have a p-value (one NaN, one without rows)
    assert list(zero["cell"]) == ["aptos_dinov2_0", "pacemaker_dinov2_2", "aptos_dinov2_3"]
    assert list(zero["p_holm"].iloc[:2]) == pytest.approx(holm_by_hand([0.2, 0.01]))
    assert math.isnan(zero["p_holm"].iloc[2]) and set(zero["family_size"]) == {2}
    f1 = table[(table["comparison"] == "probe") & (table["metric"] == "f1_macro")]
    assert list(f1["p_holm"]) == pytest.approx(holm_by_hand(list(f1["p"])))
    mcnemar = pd.read_csv(fake_study["base"] / "report" / "mcnemar.csv")
    for kind, part in mcnemar.groupby("comparison"):
        assert list(part["p_holm"]) == pytest.approx(holm_by_hand(list(part["p"])))
    text = fake_study["report"].read_text()
    assert "the family is the 4 probe comparisons" in text and "3 CLIP zero-shot comparisons" in text
    assert "aptos_clip: exit 2: error: no weights" in text
    assert "no published neurons" in text


def test_report_overlap_with_the_published_set(fake_study):
    overlap = pd.read_csv(fake_study["base"] / "report" / "neuron_overlap.csv")
    paper = {(l, n) for l, ids in PAPER_NEURONS_DINOV2_VITL14.items() for n in ids}
    cells = {c["name"]: json.loads((Path(c["folder"]) / "register_neurons.json").read_text())
             for c in fake_study["cells"] if c["status"] == "done"}
    # the two aptos cells share one detection each; only the first of a (backbone, dataset, top_k) counts
    first = cells["aptos_dinov2_0"]
    chosen = {(int(l), n) for l, ids in first["selected"].items() for n in ids}
    row = overlap[(overlap["set_a"] == "aptos") & (overlap["set_b"] == studyreport.PAPER_LABEL)].iloc[0]
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
    figure = fake_study["base"] / "report" / "scores_by_layer_dinov2_vitl14.png"
    assert figure.read_bytes()[:8] == PNG_MAGIC


# ------------------------------------------------------------------------------------------
# end to end (slow): a reduced demo study, interrupted and resumed


DEMO_ARGS = ["--demo", "--data", "aptos", "orthonet", "--models", "clip"]


@pytest.fixture(scope="module")
def demo_study(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("demo_study")
    argv = [*DEMO_ARGS, "--out", str(base / "study"), "--cache_dir", str(base / "cache")]
    real = study.invoke
    calls: list[list[str]] = []

    def interrupted_at_the_second_cell(spec, args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt   # as Ctrl-C in the middle of the second cell
        return real(spec, args)

    result: dict = {"base": base, "out": base / "study"}
    first_err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(first_err):
        patch.setattr(study, "invoke", interrupted_at_the_second_cell)
        result["first_code"] = study.main(argv)
    result["first_err"] = first_err.getvalue()
    first_config = result["out"] / "cells" / "aptos_clip_normal_values-zero" / "config.json"
    result["first_bytes"] = first_config.read_bytes() if first_config.is_file() else b""
    result["first_mtime"] = first_config.stat().st_mtime_ns if first_config.is_file() else None
    result["first_study"] = json.loads((result["out"] / "study.json").read_text())

    again: list[list[str]] = []

    def counted(spec, args):
        again.append(args)
        return real(spec, args)

    second_err = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(second_err):
        patch.setattr(study, "invoke", counted)
        result["second_code"] = study.main(argv)
    result["second_err"] = second_err.getvalue()
    result["second_calls"] = again
    result["study"] = json.loads((result["out"] / "study.json").read_text())
    return result


@pytest.mark.slow
def test_killed_study_resumes_without_redoing_finished_cells(demo_study):
    assert demo_study["first_code"] == 130, demo_study["first_err"][-2000:]
    assert "interrupted" in demo_study["first_err"]
    statuses = [c["status"] for c in demo_study["first_study"]["cells"]]
    assert statuses == ["done", "interrupted", "pending", "pending"]
    assert demo_study["first_study"]["status"] == "interrupted"
    assert demo_study["first_bytes"] and b'"status": "done"' in demo_study["first_bytes"]

    assert demo_study["second_code"] == 0, demo_study["second_err"][-3000:]
    err = demo_study["second_err"]
    assert "cell 1/4 aptos_clip_normal_values-zero: resumed" in err
    for index, name in enumerate(["aptos_clip_normal_values-mean", "orthonet_clip_normal_values-zero",
                                  "orthonet_clip_normal_values-mean"], start=2):
        assert f"cell {index}/4 {name}: done in" in err
    assert "ETA" in err
    # the finished cell was not run again: never invoked, its config.json untouched
    first_folder = str(demo_study["out"].resolve() / "cells" / "aptos_clip_normal_values-zero")
    assert len(demo_study["second_calls"]) == 3
    assert all(args[args.index("--out") + 1] != first_folder for args in demo_study["second_calls"])
    config = demo_study["out"] / "cells" / "aptos_clip_normal_values-zero" / "config.json"
    assert config.read_bytes() == demo_study["first_bytes"]
    assert config.stat().st_mtime_ns == demo_study["first_mtime"]
    assert [c["status"] for c in demo_study["study"]["cells"]] == ["resumed", "done", "done", "done"]


@pytest.mark.slow
def test_cells_share_the_cache_and_are_ordinary_runs(demo_study):
    out = demo_study["out"]
    for cell in demo_study["study"]["cells"]:
        folder = Path(cell["folder"])
        info = json.loads((folder / "config.json").read_text())
        assert info["status"] == "done" and info["demo"] is True
        # the command in the report is exactly the run's recorded command line
        words = shlex.split(cell["command"])
        assert words[:2] == ["python", f"test_{cell['dataset']}.py"]
        assert Path(info["command_line"][0]).name == words[1] and info["command_line"][1:] == words[2:]
        assert (out / "logs" / f"{cell['name']}.log").is_file()
    # the second cell of a dataset found the first one's no-ttr features in the shared cache
    for dataset in ("aptos", "orthonet"):
        hits = json.loads((out / "cells" / f"{dataset}_clip_normal_values-mean" / "config.json").read_text())
        assert all(hits["feature_cache_hits"][f"no-ttr/{split}"] == 1 for split in ("train", "val", "test"))
        assert all(hits["feature_cache_hits"][f"ttr/{split}"] == 0 for split in ("train", "val", "test"))


def _cells(demo_study) -> list[tuple[str, Path]]:
    return [(c["name"], Path(c["folder"])) for c in demo_study["study"]["cells"]]


@pytest.mark.slow
def test_report_paper_table_matches_the_cells(demo_study):
    report = demo_study["out"] / "report"
    table = pd.read_csv(report / "paper_table.csv")
    p_values: dict[tuple[str, str], list[float]] = {}
    names = []
    for name, folder in _cells(demo_study):
        metrics = pd.read_csv(folder / "metrics.csv").set_index("mode")
        names.append(name)
        for kind, base, mode in (("probe", "no-ttr", "ttr"), ("zero-shot", "no-ttr (zero-shot)", "ttr (zero-shot)")):
            assert mode in metrics.index       # clip demo cells have zero-shot rows
            for metric in ("top1", "f1_macro", "balanced_accuracy", "auc_macro", "top3"):
                row = table[(table["cell"] == name) & (table["comparison"] == kind) & (table["metric"] == metric)]
                assert len(row) == 1
                row = row.iloc[0]
                assert row["no_ttr"] == pytest.approx(metrics.loc[base, metric])
                assert row["ttr"] == pytest.approx(metrics.loc[mode, metric])
                for ours, theirs in (("diff", f"{metric}_diff"), ("diff_lo", f"{metric}_diff_lo"),
                                     ("diff_hi", f"{metric}_diff_hi"), ("p", f"p_{metric}")):
                    assert row[ours] == pytest.approx(metrics.loc[mode, theirs]), (name, metric, ours)
                p_values.setdefault((kind, metric), []).append(float(metrics.loc[mode, f"p_{metric}"]))
        # qwk only on APTOS
        assert ("qwk" in set(table[table["cell"] == name]["metric"])) == name.startswith("aptos")
    for (kind, metric), values in p_values.items():
        rows = table[(table["comparison"] == kind) & (table["metric"] == metric)].set_index("cell").loc[names]
        assert list(rows["p_holm"]) == pytest.approx(holm_by_hand(values)), (kind, metric)
        assert set(rows["family_size"]) == {4}
    text = (report / "report.md").read_text()
    head = "\n".join(text.splitlines()[:4])
    assert "synthetic data" in head and "planted" in head
    assert "the family is the 4 probe comparisons" in text


@pytest.mark.slow
def test_report_per_class_calibration_outliers_and_neurons_match_the_cells(demo_study):
    report = demo_study["out"] / "report"
    per_class = pd.read_csv(report / "per_class.csv")
    calibration = pd.read_csv(report / "calibration.csv")
    outliers = pd.read_csv(report / "outliers.csv").set_index("cell")
    for name, folder in _cells(demo_study):
        recalls, f1s = {}, {}
        for mode, file in (("no-ttr", "predictions_no-ttr.csv"), ("ttr", "predictions_ttr.csv"),
                           ("no-ttr (zero-shot)", "predictions_zero-shot_no-ttr.csv"),
                           ("ttr (zero-shot)", "predictions_zero-shot_ttr.csv")):
            frame = pd.read_csv(folder / file)
            classes = [c[2:-1] for c in frame.columns if c.startswith("p[")]
            y = np.array([classes.index(t) for t in frame["true"]])
            predicted = np.array([classes.index(t) for t in frame["predicted"]])
            p = frame[[f"p[{c}]" for c in classes]].to_numpy()
            labels = list(range(len(classes)))
            recalls[mode] = recall_score(y, predicted, labels=labels, average=None, zero_division=0)
            f1s[mode] = f1_score(y, predicted, labels=labels, average=None, zero_division=0)
            row = calibration[(calibration["cell"] == name) & (calibration["mode"] == mode)].iloc[0]
            assert row["ece"] == pytest.approx(ece_loop(p, y), abs=1e-12)
            assert row["brier"] == pytest.approx(brier_loop(p, y), abs=1e-12)
            assert row["accuracy"] == pytest.approx(np.mean(y == predicted))
        for kind, base, mode in (("probe", "no-ttr", "ttr"), ("zero-shot", "no-ttr (zero-shot)", "ttr (zero-shot)")):
            rows = per_class[(per_class["cell"] == name) & (per_class["comparison"] == kind)]
            assert list(rows["class"]) == classes
            assert rows["recall_delta"].to_numpy() == pytest.approx(recalls[mode] - recalls[base])
            assert rows["f1_delta"].to_numpy() == pytest.approx(f1s[mode] - f1s[base])
        cell_outliers = pd.read_csv(folder / "outliers.csv").set_index("mode")
        for stat in ("patch_share_above_threshold", "mean_max_patch_norm", "register_norm",
                     "cls_attention_on_register"):
            for mode, suffix in (("no-ttr", "no_ttr"), ("ttr", "ttr")):
                expected = cell_outliers.loc[mode, stat]
                got = outliers.loc[name, f"{stat}_{suffix}"]
                assert (math.isnan(expected) and math.isnan(got)) or got == pytest.approx(expected)
    # neuron overlap between the two datasets on the one planted CLIP backbone
    overlap = pd.read_csv(report / "neuron_overlap.csv")
    assert len(overlap) == 1
    runs = {d: json.loads((demo_study["out"] / "cells" / f"{d}_clip_normal_values-zero" / "register_neurons.json")
                          .read_text()) for d in ("aptos", "orthonet")}
    chosen = {d: {(int(l), n) for l, ids in r["selected"].items() for n in ids} for d, r in runs.items()}
    assert overlap["jaccard"].iloc[0] == pytest.approx(
        len(chosen["aptos"] & chosen["orthonet"]) / len(chosen["aptos"] | chosen["orthonet"]))
    a = pd.Series({(l, n): s for l, n, s in runs["aptos"]["ranked"]})
    b = pd.Series({(l, n): s for l, n, s in runs["orthonet"]["ranked"]})
    assert overlap["spearman_rho"].iloc[0] == pytest.approx(a.corr(b[a.index], method="spearman"))
    for figure in ("paper_table.png", "per_class_aptos.png", "per_class_orthonet.png", "calibration.png",
                   "outliers.png", "scores_by_layer_planted_clip_fixture_seed_0.png"):
        data = (report / figure).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, figure


# ------------------------------------------------------------------------------------------
# torchrun (slow): every rank runs every cell, rank 0 writes the report


@pytest.mark.slow
def test_study_under_torchrun_with_two_ranks(tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
               "-m", "common.study", "--demo", "--data", "orthonet", "--models", "dinov2", "--axes",
               "--out", str(out), "--cache_dir", str(tmp_path / "cache")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("cell 1/1 orthonet_dinov2: done in") == 1    # only rank 0 reports
    info = json.loads((out / "cells" / "orthonet_dinov2" / "config.json").read_text())
    assert info["status"] == "done" and info["processes"] == 2
    assert (out / "report" / "report.md").is_file()
    assert pd.read_csv(out / "report" / "paper_table.csv")["cell"].unique().tolist() == ["orthonet_dinov2"]


# ------------------------------------------------------------------------------------------
# a failing cell (slow): reported with its exit code and error line; the study goes on, exits 1


@pytest.mark.slow
def test_failing_cell_is_reported_and_the_study_goes_on(tmp_path, capsys):
    out = tmp_path / "study"
    real = study.invoke

    def broken_data_for_the_first_cell(spec, args):
        args = list(args)
        if "normal_values=zero" in args:   # the cell's images are gone: the run itself stops with exit 2
            args[args.index("--image_path") + 1] = str(tmp_path / "gone")
        return real(spec, args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "invoke", broken_data_for_the_first_cell)
        code = study.main(["--demo", "--data", "aptos", "--models", "clip", "--out", str(out),
                           "--cache_dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 1
    assert "cell 1/2 aptos_clip_normal_values-zero: FAILED (exit 2)" in err
    assert "cell 2/2 aptos_clip_normal_values-mean: done in" in err
    record = json.loads((out / "study.json").read_text())
    failed = record["cells"][0]
    assert failed["status"] == "failed" and failed["exit_code"] == 2
    assert failed["error"].startswith("error:") and "gone" in failed["error"]
    text = (out / "report" / "report.md").read_text()
    assert f"aptos_clip_normal_values-zero: exit 2: {failed['error']}" in text
    paper = pd.read_csv(out / "report" / "paper_table.csv")
    assert paper["cell"].unique().tolist() == ["aptos_clip_normal_values-mean"]
    assert set(paper["family_size"]) == {1}
    assert (out / "logs" / "aptos_clip_normal_values-zero.log").read_text().count("gone") >= 1
