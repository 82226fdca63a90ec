"""A machine's log directory: checked, created and locked before anything forks.

One directory has one writer: the front end takes an exclusive ``flock`` on
``<log-dir>/.emu.lock`` at boot and holds it (with the coordinator, which inherits
the descriptor) until the machine is closed, so a second machine on the same
directory gets exit 2 naming ``log-dir`` instead of interleaving its records (and
reusing record ids) in one Dom0 log. The lock goes with the processes: a killed
machine leaves no stale lock.

Also refused, before booting, with ``log-dir`` named: a path that is not a
directory (a file, ``/dev/null``, a path under a file), too long, not writable (a
read-only mount), or holding a Dom0 log that is not a regular file (e.g. a link to
``/dev/full``) or is corrupt before its last line (the line number is given; a torn
last line is fine: Dom0 repairs it).
"""
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from emu.errors import UsageError

LOCK_NAME = ".emu.lock"
LOG_NAMES = ("dom0.jsonl", "dom0.jsonl.kernel", "dom0.jsonl.idx") + tuple(
    f"dom{d}.guest.jsonl" for d in range(1, 8))


def default_log_dir() -> str:
    """A new run directory under ``$TMPDIR/emu-runs`` (:mod:`emu.machine.runs`)."""
    from emu.machine.runs import default_root
    return os.path.join(default_root(),
                        time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{os.urandom(3).hex()}")


_HELD: set[int] = set()   # lock descriptors of the machines this process runs


class LogDir:
    """A claimed log directory: ``path`` (absolute) and the lock's descriptor."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        _HELD.add(fd)

    def release(self) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)   # closes our reference; the lock goes with the last one
            self.fd = None


def close_others(own: int | None) -> None:
    """In a freshly forked coordinator: drop the locks of the *other* machines of the
    front end's process, or they would stay held as long as this machine runs."""
    for fd in list(_HELD):
        if fd != own:
            _HELD.discard(fd)
            try:
                os.close(fd)
            except OSError:
                pass


def _bad(path, why: str) -> UsageError:
    return UsageError("log-dir", f"{path}: {why}; give a writable directory of this machine's "
                      "own (or none: a new one under $TMPDIR/emu-runs)")


def claim(path=None) -> LogDir:
    """Check, create and lock the log directory ``path`` (None: a new default one)."""
    from emu.domains.dom0 import check_log
    default = path is None
    if default:
        path = default_log_dir()
    if not isinstance(path, (str, os.PathLike)):
        raise UsageError("log-dir", f"{path!r}: give a directory path")
    path = os.fspath(path)
    if not path or "\0" in path:
        raise _bad(repr(path), "not a usable path")
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise _bad(path, exc.strerror or "cannot be examined") from None
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise _bad(path, "not a directory")
    try:
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise _bad(path, f"cannot create it or write in it ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise _bad(path, f"cannot lock it ({exc.strerror})") from None
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise UsageError("log-dir", f"{path} is in use by another machine (pid {holder}); "
                             "one log directory has one writer: give each machine its own "
                             "--log-dir") from None
        try:    # who holds it, for the message above; best effort (a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        if not os.access(path, os.W_OK | os.X_OK):
            raise _bad(path, "not writable")
        for name in LOG_NAMES:
            p = os.path.join(path, name)
            try:
                pst = os.stat(p)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _bad(p, exc.strerror or "cannot be examined") from None
            if not stat.S_ISREG(pst.st_mode):
                raise _bad(p, "not a regular file (Dom0's logs must be)")
            if not os.access(p, os.R_OK | os.W_OK):
                raise _bad(p, "not readable and writable")
        check_log(os.path.join(path, "dom0.jsonl"))
        if default:   # keep the newest EMU_KEEP_RUNS default run directories
            from emu.machine.runs import prune_runs
            prune_runs(os.path.dirname(path), current=path)
    except BaseException:
        os.close(fd)
        raise
    return LogDir(path, fd)
