"""Run directories under the default root (``$TMPDIR/emu-runs``): old ones pruned.

Every machine booted without ``log_dir`` gets a new directory under the root; so that
long use does not fill ``/tmp``, booting one prunes the root to the newest
``EMU_KEEP_RUNS`` (default 50) run directories, the new one included. A directory
given with ``--log-dir`` (``extra={"log_dir": ...}``) is the user's and never pruned,
nor is anything in the root that is not a run directory emu made (named
``YYYYMMDD-HHMMSS-PID...``), nor a run whose machine is still up: its coordinator's
pid (in the name) is alive, or its ``.emu.lock`` is held.

Also here: the per-trial note (``trials.jsonl``, schema ``emu.trialnote/1``) that lets
``emu log`` name the CPUs that took each #MC.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile

from emu.errors import UsageError

DEFAULT_KEEP = 50
_RUN = re.compile(r"\d{8}-\d{6}-(\d+)(?:-[0-9a-f]+)?\Z")


def default_root() -> str:
    return os.path.join(tempfile.gettempdir(), "emu-runs")


def keep_runs() -> int:
    """``EMU_KEEP_RUNS`` (default 50; at least 1)."""
    raw = os.environ.get("EMU_KEEP_RUNS", "")
    if not raw.strip():
        return DEFAULT_KEEP
    try:
        n = int(raw)
    except ValueError:
        raise UsageError("EMU_KEEP_RUNS", f"{raw!r} is not a number; give how many run "
                         "directories to keep (default 50)") from None
    if n < 1:
        raise UsageError("EMU_KEEP_RUNS", f"{n}: keep at least 1 run directory")
    return n


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked(path: str) -> bool:
    lock = os.path.join(path, ".emu.lock")
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


def prune_runs(root: str | None = None, keep: int | None = None, *,
               current: str | None = None) -> list[str]:
    """Delete the oldest run directories under ``root`` beyond the newest ``keep``;
    never ``current``, a live run or anything not named as a run. Returns the removed
    paths. Best effort: a directory that cannot be removed stays."""
    root = root or default_root()
    keep = keep_runs() if keep is None else keep
    try:
        entries = list(os.scandir(root))
    except OSError:
        return []
    runs = []
    for e in entries:
        m = _RUN.match(e.name)
        if not m or not e.is_dir(follow_symlinks=False):
            continue
        try:
            mtime = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        runs.append((e.name, mtime, e.path, int(m.group(1))))
    # newest first: by name (its time stamp), then by modification time
    runs.sort(key=lambda r: (r[0][:15], r[1]), reverse=True)
    cur = os.path.abspath(current) if current else None
    removed = []
    for _, _, path, pid in runs[keep:]:
        if os.path.abspath(path) == cur or _alive(pid) or _locked(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    return removed


def note_trial(log_dir: str, res: dict) -> None:
    """Append the trial's note to ``<log_dir>/trials.jsonl``: which CPUs took the #MC,
    where each error was raised, which CPUs logged it and in which records (best
    effort, not fsync'd: it only helps ``emu log`` say who took the #MC)."""
    note = {"schema": "emu.trialnote/1", "trial": res.get("trial"),
            "outcome": res.get("outcome"), "local": res.get("local"),
            "targets": res.get("targets"),
            "errors": [{"cpu": e.get("cpu"), "bank": e.get("bank"), "status": e.get("status"),
                        "owners": e.get("owners"), "sharers": e.get("sharers"),
                        "via": e.get("via", "mce"),
                        "cmci_cpus": (e.get("cmci") or {}).get("cpus") or [],
                        "records": [d.get("id") for d in e.get("dom0_log", [])]}
                       for e in res.get("errors", [])],
            "boot_log": [{"cpu": b.get("cpu"), "bank": b.get("bank"),
                          "record_id": b.get("record_id")} for b in res.get("boot_log", [])]}
    try:
        fd = os.open(os.path.join(log_dir, "trials.jsonl"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    try:
        os.write(fd, (json.dumps(note, separators=(",", ":")) + "\n").encode())
    except OSError:
        pass
    finally:
        os.close(fd)
