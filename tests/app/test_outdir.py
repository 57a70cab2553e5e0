"""The output folder of a run and the cache folder (common.app.outdir): what a run may write
into, checked before any work; nothing a user gave is changed."""

from __future__ import annotations

import json

import pytest

from common.app.outdir import MARKER, check_cache_dir, finished_run, prepare_out
from common.errors import UserError


def _finished(folder, dataset="aptos", model="clip", status="done"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"status": status, "dataset": dataset, "model": model}))


def test_a_new_folder_is_created_and_marked(tmp_path):
    out = prepare_out(tmp_path / "a" / "b", dataset="aptos", model="clip")
    assert out.is_dir() and (out / MARKER).is_file()
    # a run folder (marked) may be written again, whatever it holds
    (out / "metrics.csv").write_text("x\n")
    assert prepare_out(out, dataset="aptos", model="clip") == out


def test_finished_run(tmp_path):
    assert finished_run(tmp_path) is None
    _finished(tmp_path, status="running")
    assert finished_run(tmp_path) is None
    _finished(tmp_path)
    assert finished_run(tmp_path)["model"] == "clip"
    (tmp_path / "config.json").write_text("[1, 2")
    assert finished_run(tmp_path) is None


@pytest.mark.parametrize("case, needle", [
    ("file", "is a file, not a folder"),
    ("inside the data", "inside the dataset folder"),
    ("foreign files", "already holds files that are not a run's (notes.txt)"),
    ("another run", "holds a finished run of orthonet with dinov2"),
])
def test_refused_folders_are_left_as_they_are(tmp_path, case, needle):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "out"
    if case == "file":
        out.write_text("mine\n")
    elif case == "inside the data":
        out = data / "results"
    elif case == "foreign files":
        out.mkdir()
        (out / "notes.txt").write_text("mine\n")
    else:
        _finished(out, dataset="orthonet", model="dinov2")
    before = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError) as caught:
        prepare_out(out, dataset="aptos", model="clip", image_path=str(data))
    assert needle in str(caught.value) and str(out) in str(caught.value)
    after = sorted((p.relative_to(tmp_path), p.read_bytes() if p.is_file() else None) for p in tmp_path.rglob("*"))
    assert after == before


def test_check_data_refuses_any_finished_run_and_a_run_resumes_its_own(tmp_path):
    _finished(tmp_path / "run")
    with pytest.raises(UserError, match="--check_data never overwrites"):
        prepare_out(tmp_path / "run", dataset="aptos", model="clip", check_data=True)
    assert prepare_out(tmp_path / "run", dataset="aptos", model="clip") == tmp_path / "run"


def test_cache_dir(tmp_path):
    check_cache_dir(tmp_path / "cache" / "deep")
    assert (tmp_path / "cache" / "deep").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--cache_dir .*file is a file, not a folder"):
        check_cache_dir(tmp_path / "file")


@pytest.mark.parametrize("source, named", [
    ("TTR_CACHE_DIR", "the cache folder {} (from $TTR_CACHE_DIR) is a file"),
    ("XDG_CACHE_HOME", "the cache folder {} (from $XDG_CACHE_HOME) is a file"),
    ("the default", "the default cache folder {} is a file"),
])
def test_a_default_cache_is_named_as_what_it_is_never_as_cache_dir(tmp_path, source, named):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError) as caught:
        check_cache_dir(tmp_path / "file", source)
    message = str(caught.value)
    assert message.startswith(named.format(tmp_path / "file")) and not message.startswith("--cache_dir")
    assert message.endswith("pass --cache_dir DIR (a writable folder), or --no_cache to run without a cache")


def test_a_folder_too_deep_for_the_files_written_in_it_is_refused_up_front(tmp_path):
    deep = tmp_path
    while len(str(deep)) < 4096 - 100:
        deep = deep / ("d" * min(200, 4096 - 100 - len(str(deep))))
    deep.mkdir(parents=True)
    with pytest.raises(UserError, match=r"--out .*too little room .*use a shorter path"):
        prepare_out(deep, dataset="aptos", model="clip")
    with pytest.raises(UserError, match=r"--cache_dir .*too little room"):
        check_cache_dir(deep)
