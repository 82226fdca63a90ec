#!/usr/bin/env python3
"""Dom0 restart time and memory against the size of its log (issue 16, item 3).

    python bench/dom0_restart.py [--sizes 1000,10000,100000,1000000] [--repeat 5] [--json]

For each size, a Dom0 log of that many records is written (as Dom0 writes it, with
its checkpoints; fsync off, not timed), then what a Dom0 restart costs is timed,
``--repeat`` times, median: Dom0's ``DurableLog.open`` (check the log from its
checkpoint on, repair a torn end, the dedup's recent ids) and the coordinator's
side (``last_boot`` and the tail it reconciles from). ``restart_scanned_bytes`` is
what the restart parsed after the checkpoint and ``restart_peak_kib`` the peak of
Python allocations during it (tracemalloc); both should stay flat as the log
grows. ``full_check_s`` (with ``--full``) is one open without the checkpoint:
what every restart used to cost.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from emu.domains import dom0 as d0  # noqa: E402

REC = {"cpu": 0, "who": 1, "flags": 0, "g": {"mc_gstatus": 5, "mcgcap": 0x1000C0A},
       "b": [[8, 0xBD000000004000CF, 0x180020, 0x86, 0]], "r": [[8, 1, 1, 0x180, 0]]}


def build(path: str, n: int) -> None:
    with d0.DurableLog(path, fsync=False) as log:
        for k in range(n):
            log.append([d0.log_line({"id": 1 << 32 | k + 1, "cls": "urgent",
                                     "source": "mce", "record": REC}, now=0.0)])


def _restart(path: str) -> int:
    log = d0.DurableLog(path, fsync=False)
    log.open()
    d0.last_boot(path)
    d0.tail_records(path)
    log.close()
    return log.scanned


def restart(path: str) -> tuple[float, int, int]:
    """(seconds, bytes scanned, peak KiB): timed without tracemalloc, which slows
    Python down several times; the memory in a second, traced run."""
    t0 = time.perf_counter()
    scanned = _restart(path)
    dt = time.perf_counter() - t0
    tracemalloc.start()
    _restart(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return dt, scanned, peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,10000,100000,1000000")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--dir", default=None, help="where the logs go (default: a temporary one)")
    p.add_argument("--full", action="store_true", help="also time a check without checkpoint")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    base = a.dir or tempfile.mkdtemp(prefix="emu-dom0-restart-")
    for n in sizes:
        path = os.path.join(base, f"dom0-{n}.jsonl")
        for f in (path, path + ".idx"):
            if os.path.exists(f):
                os.unlink(f)
        build(path, n)
        runs = [restart(path) for _ in range(a.repeat)]
        row = {"records": n, "log_bytes": os.path.getsize(path),
               "restart_s": statistics.median(r[0] for r in runs),
               "restart_scanned_bytes": max(r[1] for r in runs),
               "restart_peak_kib": round(max(r[2] for r in runs) / 1024, 1)}
        if a.full:
            if os.path.exists(path + ".idx"):
                os.unlink(path + ".idx")
            t0 = time.perf_counter()
            with d0.DurableLog(path, fsync=False):
                pass
            row["full_check_s"] = time.perf_counter() - t0
        if a.json:
            print(json.dumps(row), flush=True)
        else:
            print(f"{n:>9} records {row['log_bytes'] / 1e6:9.1f} MB  restart "
                  f"{row['restart_s'] * 1e3:8.2f} ms  scanned {row['restart_scanned_bytes']:>8} B"
                  f"  peak {row['restart_peak_kib']:8.1f} KiB"
                  + (f"  full check {row['full_check_s']:.2f} s" if a.full else ""), flush=True)
        os.unlink(path)
        if os.path.exists(path + ".idx"):
            os.unlink(path + ".idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
