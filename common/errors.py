"""Errors a user can fix themselves, and how every entry point turns a failure into an exit code.

A :class:`UserError` carries a one-line message that names the file, value or flag at fault
and says what to do.  :func:`run_entry` is the one wrapper of the four entry points
(``test_<dataset>.py``, ``python -m common.study``, ``python -m common.report``,
``python -m common.studyreport``): a user's mistake or a fault of the user's disk is one line and
exit code 2, Ctrl-C is exit code 130, anything else is a traceback, then one line, and exit 1.
"""

from __future__ import annotations

import errno
import sys
import traceback
from typing import Callable

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# OS errors that mean "this path of yours cannot be used": the user can act on them.
_ADVICE = {
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space or choose another folder",
    errno.EACCES: "check its permissions or choose another folder",
    errno.EPERM: "check its permissions or choose another folder",
    errno.EROFS: "the file system is read-only; choose another folder",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a part of it is a file, not a folder",
    errno.EISDIR: "check the path: it is a folder, not a file",
    errno.EEXIST: "choose another path",
    errno.ELOOP: "check the path: it is a loop of symbolic links",
}


class UserError(Exception):
    """Bad input or usage; the message is shown to the user as is (exit code 2)."""

    exit_code = EXIT_USAGE


def os_error_line(error: OSError) -> str | None:
    """One line for an OS error on a path the user can act on (``None`` for any other)."""
    advice = _ADVICE.get(error.errno)
    if advice is None:
        return None
    where = error.filename if error.filename is not None else "a file being written"
    return f"{where}: {error.strerror or error}; {advice}"


def run_entry(body: Callable[[], int], *, interrupted: str) -> int:
    """``body()``'s exit code, with every failure turned into one line on stderr.

    ``interrupted`` is the line printed on Ctrl-C (what was kept, how to resume).
    """
    try:
        return body()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
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
    traceback.print_exc(file=sys.stderr)
    print("error: unexpected failure (traceback above); please report it with that traceback",
          file=sys.stderr, flush=True)
    return EXIT_FAILURE
