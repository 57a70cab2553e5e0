"""One process per folder (common.runtime.locks): the lock a run, --check_data, a study and the study
report take.  The other processes are real processes."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from badinput import ended_pid, lock_holder
from common.errors import UserError
from common.runtime.locks import LOCK, FolderLock

ROOT = Path(__file__).resolve().parents[1]


def _write_lock(folder: Path, host: str, pid: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01 10:00:00"}))


def test_taken_recorded_and_removed(tmp_path):
    with FolderLock(tmp_path / "run") as lock:
        holder = json.loads((tmp_path / "run" / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert lock.path == tmp_path / "run" / LOCK
    assert not (tmp_path / "run" / LOCK).exists()
    with FolderLock(tmp_path / "run"):     # and can be taken again
        pass


def test_a_live_holder_in_another_process_is_named(tmp_path):
    holder = lock_holder(tmp_path / "run")
    try:
        with pytest.raises(UserError) as caught, FolderLock(tmp_path / "run", "--out"):
            pass
        assert f"host {socket.gethostname()}, pid {holder.pid}, started " in str(caught.value)
        assert "wait for it to finish or pass another --out" in str(caught.value)
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == holder.pid   # left as it was
    finally:
        holder.kill()
        holder.wait()
    # killed (SIGKILL): its OS lock went with it, the file stays and is taken over
    with FolderLock(tmp_path / "run"):
        assert json.loads((tmp_path / "run" / LOCK).read_text())["pid"] == os.getpid()


def test_a_stale_lock_on_this_host_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = ended_pid()
    _write_lock(tmp_path / "run", socket.gethostname(), dead)
    with caplog.at_level(logging.WARNING, logger="common.runtime.locks"), FolderLock(tmp_path / "run"):
        pass
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "taking over the lock" in warnings[0] and f"pid {dead}" in warnings[0]


def test_a_lock_of_another_host_is_refused_and_left(tmp_path):
    _write_lock(tmp_path / "run", "node-7", 1234)
    before = (tmp_path / "run" / LOCK).read_bytes()
    with pytest.raises(UserError) as caught, FolderLock(tmp_path / "run"):
        pass
    assert "another host (host node-7, pid 1234" in str(caught.value)
    assert f"remove {tmp_path / 'run' / LOCK}" in str(caught.value)
    assert (tmp_path / "run" / LOCK).read_bytes() == before


def test_a_release_never_removes_a_lock_that_is_not_its_own(tmp_path):
    lock = FolderLock(tmp_path / "run")
    lock.acquire()
    (tmp_path / "run" / LOCK).write_text(json.dumps({"host": "x", "pid": 1}))   # someone rewrote it
    lock.release()
    assert (tmp_path / "run" / LOCK).exists()


def test_of_many_processes_starting_at_once_exactly_one_holds_it(tmp_path):
    """Four processes, each released by the same file once all have imported, race for the lock;
    the holder keeps it until every answer is in (files, not the clock, order the steps)."""
    folder, go, release = tmp_path / "run", tmp_path / "go", tmp_path / "release"
    code = (f"import pathlib, sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
            "from common.runtime.locks import FolderLock\nfrom common.errors import UserError\n"
            f"go, release = pathlib.Path({str(go)!r}), pathlib.Path({str(release)!r})\n"
            "print('ready', flush=True)\n"
            "while not go.exists():\n    time.sleep(0.01)\n"
            f"try:\n    lock = FolderLock({str(folder)!r}); lock.acquire()\n"
            "except UserError:\n    print('refused', flush=True); sys.exit(0)\n"
            "print('held', flush=True)\n"
            "while not release.exists():\n    time.sleep(0.01)\n"
            "lock.release()")
    processes = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
                 for _ in range(4)]
    try:
        assert [p.stdout.readline().strip() for p in processes] == ["ready"] * 4
        go.touch()
        answers = sorted(p.stdout.readline().strip() for p in processes)
    finally:
        release.touch()
        codes = [p.wait(timeout=120) for p in processes]
    assert answers == ["held", "refused", "refused", "refused"], answers
    assert codes == [0] * 4
    assert not (folder / LOCK).exists()
