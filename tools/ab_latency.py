#!/usr/bin/env python3
"""Interleaved A/B of machine configurations: handler latency, drift cancelled.

    python tools/ab_latency.py --topology 1x8x2 --injections 300 \\
        base='{}' nopin='{"pin_cpus": false}' spin50='{"extra": {"spin_ns": 50000}}'

Boots one machine per variant (``MachineConfig`` keyword arguments as JSON) and
injects into them in turn, alternating the order every round, so that this VM's
drift (tens of percent within a minute) falls on every variant alike. Prints p50 and
p99 of ``latency_us`` fields per variant. Use it to decide a wait-strategy or
scheduling change; ``bench/latency.py`` gives the absolute figures.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from emu.machine import Machine


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="1x2x2")
    p.add_argument("--injections", type=int, default=300)
    p.add_argument("--field", default="handler_exit", help="a latency_us field")
    p.add_argument("--error", default="bank=9 status=0xBD000000004000CF addr=0x181000 "
                   "misc=0x86 mcg=0x5", help="the error, without cpu= (it rotates)")
    p.add_argument("variants", nargs="+", help="name='{json MachineConfig kwargs}'")
    a = p.parse_args(argv)
    variants = {}
    for v in a.variants:
        name, _, js = v.partition("=")
        variants[name] = json.loads(js or "{}")
    machines = {k: Machine(topology=a.topology, **kw).start() for k, kw in variants.items()}
    names = list(machines)
    res: dict = {k: [] for k in names}
    try:
        ncpu = len(next(iter(machines.values())).cpu_pids)
        for i in range(a.injections):
            for k in (names if i % 2 else names[::-1]):
                r = machines[k].inject(f"cpu={i % ncpu} {a.error}")
                if r["latency_us"].get(a.field) is not None:
                    res[k].append(r["latency_us"][a.field])
    finally:
        for m in machines.values():
            m.close()
    for k, v in res.items():
        print(f"{a.topology} {k:12s} {a.field} p50 {np.median(v):8.1f} µs  "
              f"p99 {np.percentile(v, 99):8.1f} µs  (n={len(v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
