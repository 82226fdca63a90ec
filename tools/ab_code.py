#!/usr/bin/env python3
"""Interleaved A/B of two source trees (e.g. a checkout of main and a work tree):
handler latency, the VM's drift cancelled.

    git worktree add /tmp/base HEAD
    python tools/ab_code.py base=/tmp/base new=. --topology 1x2x2 --rounds 20

Each tree gets a worker process (``PYTHONPATH`` = the tree) that boots one machine
and injects on request, a block at a time; blocks alternate between the trees and
the order flips every round, so drift falls on both alike and only one machine is
busy at any moment. Prints p50 and p99 of each ``latency_us`` field per tree, the
ratio of p50s to the first tree, and the median of the per-round ratios (each round's
two blocks ran back to back, so slow drift cancels) with a bootstrap 95 % interval;
``trial_wall`` is one ``Machine.inject`` as the caller sees it. ``tools/ab_latency.py`` compares
configurations of one tree instead.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

WORKER = r"""
import json, os, sys, time
from emu.machine import Machine
topo, err = sys.argv[1], sys.argv[2]
with Machine(topology=topo, **json.loads(os.environ.get("AB_MACHINE", "{}"))) as m:
    n = len(m.cpu_pids)
    print(json.dumps({"ready": True}), flush=True)
    i = 0
    for line in sys.stdin:
        k = int(line)
        out = []
        for _ in range(k):
            t = time.monotonic_ns()
            r = m.inject(f"cpu={i % n} {err}")
            wall = (time.monotonic_ns() - t) / 1e3
            i += 1
            out.append({f: v for f, v in r["latency_us"].items() if v is not None})
            out[-1]["trial_wall"] = wall
        print(json.dumps(out), flush=True)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", nargs=2, help="name=path of a source tree (holding emu/), then "
                   "optionally :VAR=value;VAR=value for its worker's environment "
                   "(AB_MACHINE='{json}': MachineConfig keywords)")
    p.add_argument("--topology", default="1x2x2")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--block", type=int, default=50, help="injections per turn")
    p.add_argument("--warmup", type=int, default=3, help="injections dropped per turn")
    p.add_argument("--error", default="bank=9 status=0xBD000000004000CF addr=0x181000 "
                   "misc=0x86 mcg=0x5", help="the error, without cpu= (it rotates)")
    a = p.parse_args(argv)
    workers = {}
    for t in a.trees:
        name, _, path = t.partition("=")
        path, _, envs = path.partition(":")
        path = os.path.abspath(path)
        if not os.path.isdir(os.path.join(path, "emu")):
            p.error(f"{t}: no emu/ under {path}")
        env = dict(os.environ, PYTHONPATH=path)
        env.update(dict(kv.split("=", 1) for kv in envs.split(";") if kv))
        w = subprocess.Popen([sys.executable, "-c", WORKER, a.topology, a.error], cwd=path,
                             env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        json.loads(w.stdout.readline())
        workers[name] = w
    names = list(workers)
    res: dict = {k: {} for k in names}
    paired: dict = {}    # field -> per-round p50 ratio (second tree / first)
    try:
        for rnd in range(a.rounds):
            block = {}
            for k in (names if rnd % 2 else names[::-1]):
                w = workers[k]
                w.stdin.write(f"{a.block}\n")
                w.stdin.flush()
                block[k] = {}
                for lat in json.loads(w.stdout.readline())[a.warmup:]:
                    for f, v in lat.items():
                        res[k].setdefault(f, []).append(v)
                        block[k].setdefault(f, []).append(v)
            for f, v in block[names[0]].items():
                if block[names[1]].get(f):
                    paired.setdefault(f, []).append(np.median(block[names[1]][f]) / np.median(v))
    finally:
        for w in workers.values():
            w.stdin.close()
            w.wait()
    base = res[names[0]]
    rng = np.random.default_rng(0)
    for f in base:
        pr = np.array(paired.get(f) or [np.nan])
        boot = [np.median(rng.choice(pr, len(pr))) for _ in range(1000)]
        print(f"{f:14s} paired p50 ratio {names[1]}/{names[0]}: {np.median(pr):.3f} "
              f"(95 % {np.percentile(boot, 2.5):.3f}-{np.percentile(boot, 97.5):.3f}, "
              f"{len(pr)} rounds)")
        for k in names:
            v = res[k].get(f)
            if not v:
                continue
            ratio = np.median(v) / np.median(base[f])
            print(f"{f:14s} {k:8s} p50 {np.median(v):8.1f} µs  p99 {np.percentile(v, 99):8.1f} µs"
                  f"  ×{ratio:.3f}  (n={len(v)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
