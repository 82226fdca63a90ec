#!/usr/bin/env python3
"""Warm reset time: ``Machine.reset()`` on N CPUs, p50 and p99 over ``--resets``.

    python bench/reset.py [--cpus 4,16] [--resets 30] [--refork] [--json]

A warm reset stops Dom0 and the guests (their processes killed, then reaped), holds
every CPU process on the reset line, re-initialises Xen memory, releases the CPUs to
boot (boot-time logout included) and starts Dom0 and the guests anew: the price a
campaign pays after each trial that ends in ``reset``, ``shutdown``, ``hang`` or
``cpu_died``. ``--refork`` measures the older way beside it (``extra={"reset_refork":
True}``: every CPU process killed and forked again), in the same run, the two
alternated a block at a time. A benchmark, not a test: on a shared machine run it
alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TOPOLOGY = {1: "1x1x1", 2: "1x1x2", 4: "1x2x2", 8: "1x4x2", 16: "2x4x2", 32: "2x8x2",
            64: "4x8x2"}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def measure(cpus: int, resets: int, refork: bool) -> dict:
    from emu.machine import Machine
    ways = {"reset_line": {}} | ({"refork": {"reset_refork": True}} if refork else {})
    ms = {k: Machine(topology=TOPOLOGY.get(cpus, f"1x{cpus}x1"), extra=dict(x))
          for k, x in ways.items()}
    times: dict[str, list[float]] = {k: [] for k in ways}
    try:
        for m in ms.values():
            m.start()
            m.reset()                       # warm-up, not counted
        block = 5
        for r in range(0, resets, block):
            order = list(ways) if (r // block) % 2 == 0 else list(ways)[::-1]
            for k in order:
                for _ in range(min(block, resets - r)):
                    t = time.perf_counter()
                    boot = ms[k].reset()
                    times[k].append((time.perf_counter() - t) * 1e3)
                kept = len(boot["reset_in_place"])
                assert (kept == cpus) == (k == "reset_line"), (k, kept)
    finally:
        for m in ms.values():
            m.close()
    out = {"reset_ms_p50": round(_pct(times["reset_line"], 0.5), 2), "cpus": cpus,
           "resets": resets,
           "reset_ms_p99": round(_pct(times["reset_line"], 0.99), 2)}
    if refork:
        out["refork_ms_p50"] = round(_pct(times["refork"], 0.5), 2)
        out["refork_ms_p99"] = round(_pct(times["refork"], 0.99), 2)
        out["ratio_p50"] = round(out["reset_ms_p50"] / out["refork_ms_p50"], 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", default="4,16")
    p.add_argument("--resets", type=int, default=30)
    p.add_argument("--refork", action="store_true", help="measure the re-forking reset beside")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        cpus = [int(x) for x in a.cpus.split(",") if x.strip()]
    except ValueError:
        print(f"reset.py: error: --cpus: {a.cpus!r}: give CPU counts, e.g. 4,16",
              file=sys.stderr)
        return 2
    if a.resets < 1 or not cpus or min(cpus) < 1:
        print("reset.py: error: --resets and --cpus: give at least one", file=sys.stderr)
        return 2
    for n in cpus:
        r = measure(n, a.resets, a.refork)
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            line = f"{n:4d} CPUs  reset p50 {r['reset_ms_p50']} ms  p99 {r['reset_ms_p99']} ms"
            if a.refork:
                line += (f"   re-forking: p50 {r['refork_ms_p50']} ms  p99 {r['refork_ms_p99']}"
                         f" ms  (ratio {r['ratio_p50']})")
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
