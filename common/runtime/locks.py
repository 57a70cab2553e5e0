"""One process per folder: the lock a run, ``--check_data``, a study and the study report take on
the folder they write (docs/run.md, "Two processes, one folder").

Two processes writing one run folder would mix their files (each thinks it finished, one's
settings survive).  The lock is a file in the folder, ``.ttr-medical-lock``, holding the
holder's host, pid, start time and command, plus an OS lock (``flock``) on that file held for as
long as the process works there; the OS drops it when the process dies, however it dies.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from common.errors import UserError
from common.io import naming

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system: the lock file's content alone decides
    fcntl = None

LOCK = ".ttr-medical-lock"



def _holder_text(holder: dict) -> str:
    started = f", started {holder['started']}" if holder.get("started") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{started}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:      # someone else's process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


class FolderLock:
    """A lock on ``folder`` for one process: the file ``folder/.ttr-medical-lock`` holds the
    holder's host, pid, start time and command, and the process holds an OS lock
    (``flock``) on it for as long as it works there, which the OS drops when the process dies.

    Taking it (``with FolderLock(folder, "--out"):``) fails with a UserError naming the holder's
    host and pid when a live process holds it.  A lock left by a process that is gone (killed
    with SIGKILL, a crashed node) is taken over with a warning when that process ran on this host;
    a lock written on another host, whose process this host cannot see, is refused with the
    advice to remove the file once that run is known to be over.  Only the process that took a
    lock removes it.
    """

    def __init__(self, folder: str | Path, flag: str = "--out", busy: str | None = None, name: str = LOCK):
        self.folder = Path(folder)
        self.flag = flag
        self.busy = busy or f"wait for it to finish or pass another {flag}"   # what to do when it is taken
        self.path = self.folder / name    # the shards of a study share its folder, each with a lock of its own
        self._fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _in_use(self, holder: dict) -> UserError:
        return UserError(f"{self.flag} {self.folder} is in use by another run ({_holder_text(holder)}); {self.busy}")

    def acquire(self) -> None:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": sys.argv}
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, locked = self._open_locked()
        try:
            holder = _read_holder(fd)
            if holder and holder.get("pid") != me["pid"]:
                self._judge(holder, me, locked)
            data = (json.dumps(me) + "\n").encode()
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, data, 0)
                os.fsync(fd)
            except OSError as error:     # a full disk: the one line names the lock file
                self.path.unlink(missing_ok=True)
                raise naming(error, self.path) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _open_locked(self) -> tuple[int, bool]:
        """The lock file, open and (where the file system supports it) flock-ed by us: (fd, flocked)."""
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                return fd, False
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd, wait=True)
                os.close(fd)
                raise self._in_use(holder) from None
            except OSError as error:
                if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    return fd, False         # no locks on this file system: the content decides
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, True
            os.close(fd)   # the holder removed the file after we opened it: open the new one
        raise UserError(f"{self.flag} {self.folder}: its lock file {LOCK} keeps changing (several runs starting at "
                        f"once?); start one run per {self.flag}")

    def _judge(self, holder: dict, me: dict, locked: bool) -> None:
        """The lock file names another process, but we could take the OS lock: is that one gone?"""
        if holder.get("host") != me["host"]:
            raise UserError(f"{self.flag} {self.folder} is locked by a run on another host ({_holder_text(holder)}); "
                            f"if that run is over, remove {self.path} and start again, else pass another {self.flag}")
        pid = holder.get("pid")
        if not locked and isinstance(pid, int) and _alive(pid):
            raise self._in_use(holder)
        log.warning("%s %s: taking over the lock of a run that is no longer running (%s)", self.flag, self.folder,
                    _holder_text(holder))

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if (_read_holder(fd) or {}).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)     # before the OS lock goes: no one can take a stale file
        except OSError:
            pass
        finally:
            os.close(fd)


def _read_holder(fd: int, wait: bool = False) -> dict:
    """The lock file's content ({} when empty or unreadable); ``wait``: give a holder that just took
    the OS lock a moment to write it."""
    tries = 20 if wait else 1
    for attempt in range(tries):
        try:
            text = os.pread(fd, 65536, 0).decode("utf-8", "replace")
            holder = json.loads(text) if text.strip() else {}
            if isinstance(holder, dict) and (holder or not wait):
                return holder
        except (OSError, ValueError):
            pass
        if attempt + 1 < tries:
            time.sleep(0.05)
    return {}
