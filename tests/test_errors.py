"""How every entry point turns a failure into an exit code and one line (common.errors)."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

from common.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Terminated,
    UserError,
    os_error_line,
    run_entry,
    shown_path,
    sigterm_raises,
)


def _run(body, capsys) -> tuple[int, list[str]]:
    code = run_entry(body, interrupted="run it again")
    return code, capsys.readouterr().err.splitlines()


def _raise(error: BaseException):
    def body() -> int:
        raise error
    return body


def test_each_failure_is_its_exit_code_and_one_line(capsys):
    assert _run(lambda: 0, capsys) == (0, [])
    assert _run(_raise(UserError("--out x: is a file; pass a folder")), capsys) == \
        (EXIT_USAGE, ["error: --out x: is a file; pass a folder"])
    assert _run(_raise(KeyboardInterrupt()), capsys) == (EXIT_INTERRUPTED, ["interrupted: run it again"])
    assert _run(_raise(Terminated()), capsys) == (EXIT_TERMINATED, ["terminated (SIGTERM): run it again"])
    assert EXIT_TERMINATED == 143     # what a shell reports for a process that SIGTERM ended
    code, lines = _run(_raise(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.csv")), capsys)
    assert (code, lines) == (EXIT_USAGE, ["error: /runs/x/metrics.csv: No space left on device; free some space or "
                                          "choose another folder"])


def test_an_unexpected_failure_prints_its_traceback_then_the_line_that_points_at_it(capsys):
    code, lines = _run(_raise(RuntimeError("boom")), capsys)
    assert code == EXIT_FAILURE
    assert lines[0] == "Traceback (most recent call last):" and "RuntimeError: boom" in lines
    assert lines[-1].startswith("error: unexpected failure (traceback above)")
    # an OS error the user cannot act on is unexpected too
    code, lines = _run(_raise(OSError(errno.EIO, "Input/output error", "/x")), capsys)
    assert code == EXIT_FAILURE and lines[0].startswith("Traceback") and lines[-1].startswith("error: unexpected")


def test_os_error_lines():
    assert os_error_line(OSError(errno.EDQUOT, "Disk quota exceeded", "/a/b.csv")) == \
        "/a/b.csv: Disk quota exceeded; free some space (the disk quota is reached) or choose another folder"
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device")).startswith("a file being written:")
    assert os_error_line(OSError(errno.EIO, "Input/output error")) is None
    long = "/" + "d" * 300 + "/" + "e" * 300
    line = os_error_line(OSError(errno.ENAMETOOLONG, "File name too long", long))
    assert "(a path of 602 characters)" in line and line.endswith("use a shorter path") and len(line) < 300


def test_shown_path_keeps_both_ends_of_a_long_path():
    assert shown_path("/runs/x") == "/runs/x"
    text = "/start/" + "m" * 500 + "/the_end.csv"
    shown = shown_path(text)
    assert shown.startswith("/start/") and "the_end.csv" in shown and f"{len(text)} characters" in shown
    assert shown_path(b"/bytes/path") == "/bytes/path"


def test_sigterm_is_terminated_in_the_main_thread_and_the_old_handler_comes_back(capsys):
    before = signal.getsignal(signal.SIGTERM)

    def body() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)              # the handler raises long before this ends
        return 0

    code, lines = _run(body, capsys)
    assert code == EXIT_TERMINATED and lines == ["terminated (SIGTERM): run it again"]
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(Terminated), sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert issubclass(Terminated, KeyboardInterrupt)   # every Ctrl-C cleanup runs for it too
