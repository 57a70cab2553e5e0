"""What the terminal shows (docs/run.md): log lines never glued onto a progress bar, a crash line
that points at a traceback printed before it (also in a study cell's log), and a run that ends
with the answer's headline; a demo that calls its settings demo settings and says whether it
shows what a correct demo shows."""

from __future__ import annotations

import json
import logging
import re

import pytest
from tqdm.auto import tqdm

import common.app.cli as cli
from badinput import FAST, SPECS, _offline, trees  # noqa: F401  (fixtures, picked up by name)
from common.app import study
from common.app.grid import Cell


def _glued(stderr: str) -> list[str]:
    """Log lines that do not start a line of their own (something was written before them)."""
    return [m.group(0) for m in re.finditer(r"(?<![\r\n])(INFO|WARNING|ERROR) common[.\w]*:", stderr)
            if m.start() > 0]


def test_a_log_line_during_a_progress_bar_is_never_glued_onto_it(monkeypatch, capsys):
    log = logging.getLogger("common.app.run")

    def run_with_a_bar(spec, args, parser) -> int:
        with tqdm(total=3, desc="features no-ttr train", unit="img") as bar:
            bar.update(1)
            log.info("a line in the middle of the bar")
            bar.update(2)
        return 0

    monkeypatch.setattr(cli, "_run", run_with_a_bar)
    assert cli.main(SPECS["pacemaker"], ["--model", "clip", "--demo"]) == 0
    err = capsys.readouterr().err
    assert "INFO common.app.run: a line in the middle of the bar" in err
    assert not _glued(err), err


def test_a_crash_line_comes_after_its_traceback_also_in_a_study_cells_log(monkeypatch, trees, tmp_path, capsys):
    import common.app.run as run

    def crash(*args, **kwargs):
        raise RuntimeError("boom in a stage")

    monkeypatch.setattr(run, "execute", crash)
    argv = ["--model", "clip", "--demo", "--image_path", str(trees["pacemaker"]), "--out", str(tmp_path / "a"),
            "--cache_dir", str(tmp_path / "cache")]
    assert cli.main(SPECS["pacemaker"], argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    traceback = lines.index("Traceback (most recent call last):")
    assert "RuntimeError: boom in a stage" in lines[traceback:]
    assert lines[-1] == "error: unexpected failure (traceback above); please report it with that traceback"
    cell = Cell("pacemaker_clip", "pacemaker", "clip", {}, argv[:-4] + ["--out", str(tmp_path / "b"), "--cache_dir",
                                                                         str(tmp_path / "cache")], str(tmp_path / "b"))
    code, output = study.run_cell(cell, SPECS["pacemaker"], True)
    assert code == 1
    log = output.strip().splitlines()
    assert log.index("Traceback (most recent call last):") < log.index(
        "error: unexpected failure (traceback above); please report it with that traceback") == len(log) - 1
    assert study.last_error_line(output) == "RuntimeError: boom in a stage"


@pytest.mark.slow
def test_a_demo_ends_with_its_answer_and_says_what_it_shows(trees, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--model", "clip", "--demo", "--image_path", str(trees["pacemaker"]), *FAST, "--out", str(out),
            "--cache_dir", str(tmp_path / "cache")]
    capsys.readouterr()
    assert cli.main(SPECS["pacemaker"], argv) == 0
    stdout, stderr = capsys.readouterr()
    summary = (out / "summary.md").read_text()
    last = stdout.strip().splitlines()
    assert last[-2] == f"done: {out / 'summary.md'}"
    answer = summary.split("## The answer", 1)[1].split("\n## ", 1)[0]
    verdict = re.search(r"^\*\*(.+)\*\*$", answer, re.M).group(1)   # the answer's first line, as summary.md says it
    assert last[-1] == f"answer (demo: synthetic data, planted model): {verdict}"
    assert "(primary metric)" in verdict
    assert not _glued(stderr), stderr[-3000:]
    # the demo's settings are called so, and its verdict on itself is computed from the run
    assert "(demo setting)" in summary and "(configured)" not in summary
    assert json.loads((out / "config.json").read_text())["threshold_reason"] == "demo setting"
    check = summary.split("**What a correct demo shows, and this run:**", 1)[1].split("## The answer", 1)[0]
    assert check.count(": yes (") == 3 and "This run shows what a correct demo shows." in check
    # the same key from the command line is said to be so
    again = tmp_path / "again"
    assert cli.main(SPECS["pacemaker"], [*argv[:-4], "--set", "register_norm_threshold=60", "--out", str(again),
                                         "--cache_dir", str(tmp_path / "cache")]) == 0
    assert "(set on the command line)" in (again / "summary.md").read_text()
