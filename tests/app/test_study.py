"""The study (issue 15): ``python -m common.study`` runs the grid.

Fast: the grid (which axis applies where, what is skipped and why, the exact arguments of each
cell); bad study arguments (exit 2, one line, nothing run); the resume rule.

Slow (end to end, the demo fixture): a reduced demo study (APTOS and OrthoNet x CLIP x
normal_values zero/mean) interrupted after its first cell and run again: the finished cell is
resumed untouched, the others run, and the cells share the cache and are ordinary runs.  A cell
whose run fails is reported with its exit code and error line while the others run (exit 1).  The
study under torchrun with 2 gloo ranks.  The study as a job array: its shards and
``--report_only`` give the report of the unsharded study.  The report's tables, figures and text are tested in
``tests/reporting/test_studyreport_*.py``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from common.app import study

ROOT = Path(__file__).resolve().parents[2]


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
    (["--data", "aptos=@", "--out", OUT, "--models", "timm:not_a_model"], "not_a_model"),
    (["--data", "aptos=@", "--out", OUT, "--axes", "highest_layer=-1"], "highest_layer"),
    (["--data", "aptos=@", "--out", OUT, "--shard", "0/4"], "--shard 0/4"),
    (["--data", "aptos=@", "--out", OUT, "--shard", "5/4"], "--shard 5/4"),
    (["--data", "aptos=@", "--out", OUT, "--shard", "1/2", "--report_only"], "--report_only"),
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


def test_a_shard_of_another_grid_is_refused_by_the_report(tmp_path, capsys):
    folder = tmp_path / "aptos"
    folder.mkdir()
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "shard-1-of-2.json").write_text(json.dumps({"grid_id": "another", "cells": []}))
    code = study.main(["--data", f"aptos={folder}", "--out", str(out), "--report_only"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "shard-1-of-2.json" in lines[0] and "another grid" in lines[0]
    assert not (out / "study.json").exists() and not (out / "report").exists()


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
# end to end (slow): a reduced demo study, interrupted and resumed


# The demo study's grid, with the probe grid cut to one member and fewer resamples: the study's
# tests are about cells, resuming and reports, not about the statistics inside a cell.
TRIM = ["--set", "probe_lr_grid=(0.01,)", "probe_weight_decay_grid=(0.0001,)", "bootstrap_resamples=50",
        "permutations=50", "probe_refits=1"]
DEMO_ARGS = ["--demo", "--data", "aptos", "orthonet", "--models", "clip", *TRIM]


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


# ------------------------------------------------------------------------------------------
# torchrun (slow): every rank runs every cell, rank 0 writes the report


@pytest.mark.slow
def test_study_under_torchrun_with_two_ranks(tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
               "-m", "common.study", "--demo", "--data", "orthonet", "--models", "dinov2", "--axes",
               "--out", str(out), "--cache_dir", str(tmp_path / "cache"), *TRIM]
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
                           "--cache_dir", str(tmp_path / "cache"), *TRIM])
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
    # the main cell (normal_values=zero, the configured value) failed: the finished one is a
    # sensitivity cell, exploratory, and the Holm family is empty
    assert [c["main"] for c in record["cells"]] == [True, False]
    assert set(paper["family"]) == {"exploratory"} and set(paper["family_size"]) == {0}
    assert "No main cell finished." in text
    assert (out / "logs" / "aptos_clip_normal_values-zero.log").read_text().count("gone") >= 1


# ------------------------------------------------------------------------------------------
# a job array (slow): --shard I/N slices, --report_only merges; the report of the unsharded study


def _comparable(report: Path) -> dict[str, object]:
    """The report's files, with what differs between any two runs of one grid taken out: the wall
    time and each cell's seconds (report.md's header and cells table, cells.csv)."""
    import re

    files: dict[str, object] = {}
    for path in sorted(report.iterdir()):
        if path.name == "cells.csv":
            files[path.name] = pd.read_csv(path).drop(columns=["seconds"]).to_csv(index=False)
        elif path.suffix == ".md":
            text = path.read_text()
            text = re.sub(r"(?m)^(Grid: .*\(section 9\)\.).*$", r"\1", text)
            text = re.sub(r"(?m)^(\| \S+ \| (?:done|resumed) \| 0 \|) [^|]* \|", r"\1 - |", text)
            files[path.name] = text
        else:
            files[path.name] = path.read_bytes()
    return files


@pytest.mark.slow
def test_sharded_study_reports_what_the_unsharded_study_reports(tmp_path, capsys):
    out, cache = tmp_path / "study", tmp_path / "cache"
    args = ["--demo", "--data", "orthonet", "--models", "dinov2", "--axes", "normal_values=zero,mean,same",
            "--out", str(out), "--cache_dir", str(cache), *TRIM, "probe_max_epochs=100",
            "detect_images=20"]
    assert study.main(args) == 0, capsys.readouterr().err[-3000:]
    unsharded = _comparable(out / "report")
    record = json.loads((out / "study.json").read_text())
    names = [cell["name"] for cell in record["cells"]]
    for leftover in ("cells", "logs", "report", "study.json"):          # the same grid again, as shards
        path = out / leftover
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    assert study.main([*args, "--shard", "1/2"]) == 0, capsys.readouterr().err[-3000:]
    err = capsys.readouterr().err
    assert "--report_only" in err and "--shard" not in err.split("once every shard has finished:")[-1]
    assert not (out / "study.json").exists()                           # a shard writes its own state only
    first = json.loads((out / "shards" / "shard-1-of-2.json").read_text())
    assert [cell["name"] for cell in first["cells"]] == names[0::2]
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(names[0::2])
    assert all(cell["status"] == "done" for cell in first["cells"])

    # the report before every shard has finished: from the cells found, the others not run
    assert study.main([*args, "--report_only"]) == 1
    assert "not run yet: " + names[1] in capsys.readouterr().err
    partial = json.loads((out / "study.json").read_text())
    assert [cell["status"] for cell in partial["cells"]] == ["done", "pending", "done"]
    assert pd.read_csv(out / "report" / "paper_table.csv")["cell"].unique().tolist() == names[0::2]

    assert study.main([*args, "--shard", "2/2"]) == 0
    assert sorted(p.name for p in (out / "cells").iterdir()) == sorted(names)
    assert study.main([*args, "--report_only"]) == 0
    merged = json.loads((out / "study.json").read_text())
    assert [cell["status"] for cell in merged["cells"]] == ["done"] * 3
    assert merged["command_line"] == record["command_line"]          # no --shard, no --report_only
    sharded = _comparable(out / "report")
    assert sharded.keys() == unsharded.keys()
    for name in unsharded:
        assert sharded[name] == unsharded[name], name


# ------------------------------------------------------------------------------------------
# SIGTERM (a scheduler's stop) during a cell: the study stops like on Ctrl-C, with 143


def test_sigterm_during_a_cell_stops_the_study_with_143(tmp_path, capsys):
    import signal
    import time

    out = tmp_path / "study"

    def terminated_in_the_first_cell(spec, args):
        os.kill(os.getpid(), signal.SIGTERM)     # what `timeout` or a scheduler sends
        time.sleep(10)
        return 0

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study, "invoke", terminated_in_the_first_cell)
        code = study.main(["--demo", "--data", "aptos", "--models", "clip", "--out", str(out),
                           "--cache_dir", str(tmp_path / "cache"), *TRIM])
    err = capsys.readouterr().err
    assert code == 143, err[-2000:]
    record = json.loads((out / "study.json").read_text())
    assert record["status"] == "terminated"
    assert [c["status"] for c in record["cells"]] == ["terminated", "pending"]
    assert "terminated: finished cells are kept; run the same command again to resume" in err
    assert "Traceback" not in err and not (out / ".ttr-medical-lock").exists()


def test_the_shards_of_a_job_array_share_the_study_folder(tmp_path, monkeypatch, capsys):
    """A SLURM array runs its shards at once in one --out: each shard locks only its own slice, so a
    running shard 1 does not stop shard 2, while a second shard 1 is refused naming the first."""
    from badinput import lock_holder
    from common.runtime.locks import LOCK

    out = tmp_path / "study"
    seen = []
    monkeypatch.setattr(study, "run_study", lambda request, *a, **k: seen.append(
        sorted(p.name for p in request.out.iterdir() if p.name.startswith(LOCK))) or 0)
    args = ["--demo", "--data", "aptos", "--models", "clip", "--out", str(out)]
    holder = lock_holder(out, f"{LOCK}-shard-1-of-2")
    try:
        assert study.main([*args, "--shard", "2/2"]) == 0, capsys.readouterr().err
        assert seen == [[f"{LOCK}-shard-1-of-2", f"{LOCK}-shard-2-of-2"]]
        assert study.main([*args, "--shard", "1/2"]) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
