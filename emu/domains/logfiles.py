"""A run's log files: their names, and Dom0's log rotated by size.

A run directory holds (names fixed by the coordinator and the domains):

- ``dom0.jsonl``: Dom0's durable records (``emu.mcelog/1``), and, when rotated,
  ``dom0.jsonl.1`` (the newest rotated part) ... ``dom0.jsonl.K`` (the oldest kept);
- ``dom0.jsonl.kernel``: Dom0's kernel log (its #MC handler; ``emu.guestlog/1``);
- ``dom<D>.guest.jsonl``: guest D's kernel log (``emu.guestlog/1``);
- ``trials.jsonl``: one ``emu.trialnote/1`` line per trial (which CPUs took the #MC,
  where each error was raised, which records it left), so that ``emu log`` can say
  which CPU took the #MC beside the one whose handler logged a shared bank.

Rotation (:class:`RotatingLog`, MachineConfig ``extra={"log_rotate_mb": M}``): after
an append leaves the live log at or above M MiB, it is renamed ``.1`` (older parts
shift up; beyond ``log_rotate_keep`` parts, default 8, the oldest is deleted) and a new
live log is opened. Rotation happens only between records, after their fsync, so no
record is split. The exactly-once machinery reads the rotated parts too: a restarted
Dom0 takes the ids of the newest rotated part into its dedup set (a record written
just before a rotation and never acked is handed out again by Xen), and the
coordinator's recount (``_reconcile_logged``, ``_last_boot_in_log``) reads every part
(:func:`dom0_log_parts`). A part deleted beyond ``log_rotate_keep`` is gone: its
records were acked long ago, and the coordinator's counts for them stay as they were.
"""
from __future__ import annotations

import json
import os
import re

from emu.domains.dom0 import DurableLog

__all__ = ["DOM0_LOG", "KERNEL_SUFFIX", "TRIALS", "TRIALNOTE_SCHEMA", "rotated_parts",
           "dom0_log_parts", "guest_logs", "RotatingLog", "rotate", "open_dom0_log",
           "read_ids"]

DOM0_LOG = "dom0.jsonl"
KERNEL_SUFFIX = ".kernel"
TRIALS = "trials.jsonl"
TRIALNOTE_SCHEMA = "emu.trialnote/1"
DEFAULT_KEEP = 8
_GUEST = re.compile(r"dom(\d+)\.guest\.jsonl\Z")


def rotated_parts(path) -> list[str]:
    """The rotated parts of log ``path`` that exist, oldest first (``.K`` ... ``.1``)."""
    path = os.fspath(path)
    d, base = os.path.split(path)
    n = []
    try:
        names = os.listdir(d or ".")
    except OSError:
        return []
    for name in names:
        if name.startswith(base + ".") and name[len(base) + 1:].isdigit():
            n.append(int(name[len(base) + 1:]))
    return [f"{path}.{k}" for k in sorted(n, reverse=True)]


def dom0_log_parts(path) -> list[str]:
    """Every part of Dom0's log, oldest first: the rotated ones, then the live one."""
    return rotated_parts(path) + [os.fspath(path)]


def guest_logs(run_dir) -> list[str]:
    """The guests' logs of a run directory, by domid."""
    try:
        names = os.listdir(run_dir)
    except OSError:
        return []
    hits = sorted((int(m.group(1)), n) for n in names if (m := _GUEST.match(n)))
    return [os.path.join(run_dir, n) for _, n in hits]


def read_ids(path, max_bytes: int | None = None) -> list[int]:
    """Record ids of the complete lines of a Dom0 log part (the last ``max_bytes`` only,
    if given), in file order; unreadable lines are skipped."""
    out = []
    try:
        with open(path, "rb") as f:
            if max_bytes is not None:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    f.seek(size - max_bytes)
                    f.readline()          # the rest of a line cut in two
            for raw in f:
                if not raw.endswith(b"\n"):
                    break
                try:
                    rid = json.loads(raw)["id"]
                except (ValueError, KeyError, TypeError):
                    continue
                if isinstance(rid, int) and not isinstance(rid, bool):
                    out.append(rid)
    except OSError:
        pass
    return out


def rotate(path, keep: int = DEFAULT_KEEP) -> str:
    """Rename ``path`` to ``path.1``, shifting older parts up and deleting those beyond
    ``keep``; return the new part's name. (Renames within one directory: a crash leaves
    every record in exactly one part.)"""
    path = os.fspath(path)
    parts = rotated_parts(path)
    for p in parts:                       # oldest first: .K -> .K+1 never overwrites
        k = int(p.rsplit(".", 1)[1])
        if k >= keep:
            os.unlink(p)
        else:
            os.replace(p, f"{path}.{k + 1}")
    os.replace(path, f"{path}.1")
    for stale in (path + ".idx",):        # a checkpoint of the renamed file, if any
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    return f"{path}.1"


class RotatingLog(DurableLog):
    """Dom0's :class:`~emu.domains.dom0.DurableLog`, rotated by size (see the module)."""

    def __init__(self, path, fsync: bool = True, rotate_bytes: int = 0,
                 keep: int = DEFAULT_KEEP):
        super().__init__(path, fsync=fsync)
        self.rotate_bytes = int(rotate_bytes)
        self.keep = max(1, int(keep))
        self.rotations = 0

    def open(self) -> int:
        dropped = super().open()
        # Ids written to the newest rotated part may still be handed out by Xen (written,
        # not acked, then rotated): the dedup must know them. Xen's pool is small; the
        # part's tail holds them.
        parts = rotated_parts(self.path)
        if parts:
            self._ids.update(read_ids(parts[-1], max_bytes=1 << 20))
        return dropped

    def append(self, records: list[dict]) -> None:
        super().append(records)
        if self.rotate_bytes and os.fstat(self._fd).st_size >= self.rotate_bytes:
            ids = set(self._ids)
            self.close()
            rotate(self.path, self.keep)
            self.rotations += 1
            super().open()
            self._ids.update(ids)


def open_dom0_log(path, fsync: bool = True, rotate_bytes: int = 0,
                  keep: int = DEFAULT_KEEP) -> DurableLog:
    """Dom0's log object: rotating when ``rotate_bytes`` > 0, else the plain one."""
    if rotate_bytes:
        return RotatingLog(path, fsync=fsync, rotate_bytes=rotate_bytes, keep=keep)
    return DurableLog(path, fsync=fsync)
