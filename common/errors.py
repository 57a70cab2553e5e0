"""Errors a user can fix themselves, and how every entry point turns a failure into an exit code.

A :class:`UserError` carries a one-line message that names the file, value or flag at fault
and says what to do.  :func:`run_entry` is the one wrapper of the four entry points
(``test_<dataset>.py``, ``python -m common.study``, ``python -m common.report``,
``python -m common.studyreport``): a user's mistake or a fault of the user's disk (no space, a
path too long, no permission) is one line and exit code 2, Ctrl-C is exit code 130, SIGTERM (a
scheduler's or ``timeout``'s stop) is exit code 143, anything else is a traceback, then one
line that points at it, and exit 1.

SIGTERM is raised in the main thread as :class:`Terminated`, a ``KeyboardInterrupt``, so every
cleanup written for Ctrl-C (temporary files removed, ``config.json`` saying why the run
stopped, locks released) runs for it too.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + signal.SIGTERM      # 143, what a shell reports for a process SIGTERM ended

# OS errors that mean "this path of yours cannot be used": the user can act on them.
_ADVICE = {
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space (the disk quota is reached) or choose another folder",
    errno.EACCES: "check its permissions or choose another folder",
    errno.EPERM: "check its permissions or choose another folder",
    errno.EROFS: "the file system is read-only; choose another folder",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a part of it is a file, not a folder",
    errno.EISDIR: "check the path: it is a folder, not a file",
    errno.EEXIST: "choose another path",
    errno.ELOOP: "check the path: it is a loop of symbolic links",
    errno.EMFILE: "raise the limit of open files (ulimit -n) or lower num_workers",
}
# A path longer than this is shortened in a message (its start and its end are what tell it apart).
_SHOWN_PATH = 160


class UserError(Exception):
    """Bad input or usage; the message is shown to the user as is (exit code 2)."""

    exit_code = EXIT_USAGE


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C would raise KeyboardInterrupt."""


def shown_path(path: str | os.PathLike | bytes) -> str:
    """``path`` as a message shows it: whole when short, else its start and end with its length."""
    text = os.fsdecode(path)
    if len(text) <= _SHOWN_PATH:
        return text
    return f"{text[:60]}...{text[-90:]} (a path of {len(text)} characters)"


def os_error_line(error: OSError) -> str | None:
    """One line for an OS error on a path the user can act on (``None`` for any other)."""
    advice = _ADVICE.get(error.errno)
    if advice is None:
        return None
    where = shown_path(error.filename) if error.filename is not None else "a file being written"
    return f"{where}: {error.strerror or error}; {advice}"


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`Terminated` in the main thread (once: a second SIGTERM
    during the cleanup is ignored); the previous handler is restored on the way out.  Elsewhere
    than in the main thread (signals cannot be handled there) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_entry(body: Callable[[], int], *, interrupted: str) -> int:
    """``body()``'s exit code, with every failure turned into one line on stderr.

    ``interrupted`` is what the line says on Ctrl-C and on SIGTERM (what was kept, how to resume).
    """
    with sigterm_raises():
        try:
            return body()
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
        except Terminated:
            print(f"terminated (SIGTERM): {interrupted}", file=sys.stderr)
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            print(f"interrupted: {interrupted}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except OSError as error:
            line = os_error_line(error)
            if line is None:
                return _unexpected()
            print(f"error: {line}", file=sys.stderr)
            return EXIT_USAGE
        except Exception:  # noqa: BLE001 - an unexpected failure: the traceback, then one line about it
            return _unexpected()


def _unexpected() -> int:
    sys.stdout.flush()
    traceback.print_exc(file=sys.stderr)
    print("error: unexpected failure (traceback above); please report it with that traceback",
          file=sys.stderr, flush=True)
    return EXIT_FAILURE
