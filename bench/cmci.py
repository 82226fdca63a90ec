#!/usr/bin/env python3
"""CMCI benchmark: CMCI raised -> the record is durable in Dom0's log.

    python bench/cmci.py [--cpus 4,16] [--injections 500] [--json]

For each CPU count: boot a machine, then alternate, round by round, a UCNA on a
package-scoped bank delivered by CMCI (xen-mceinj's type 2 payload, bank 9: the
owner logs and clears it, commits a NONURGENT record, VIRQ_MCA, Dom0 fetches,
writes, fsyncs, acks) and, beside it in the same run, the #MC path's figure for the
same bank delivered by broadcast #MC (emu.bench's SRAO on bank 9:
``latency_us.dom0_logged``). Reports p50/p99 (µs, from the raise) of
``cmci_dom0_logged`` and ``mce_dom0_logged``, and of ``cmci_done`` (the owner's
handler has committed the record). Latencies count from the raise; never a timing
assertion in tests (tests run this with tiny sizes only).
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from emu.bench import TOPOLOGY
from emu.machine import Machine

# The same bank and page as emu.bench's #MC figure (bank 9, package-scoped).
UCNA_CMCI = "cpu={cpu} bank=9 status=0xBC20000080000136 addr=0x181000 misc=0x86 via=cmci"
SRAO_MCE = "cpu={cpu} bank=9 status=0xBD000000004000CF addr=0x181000 misc=0x86 mcg=0x5"


def _stats(xs) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"p50_us": None, "p99_us": None, "n": 0}
    a = np.array(xs)
    return {"p50_us": round(float(np.median(a)), 1),
            "p99_us": round(float(np.percentile(a, 99)), 1), "n": len(xs)}


def run(ncpus: int, n: int, log_dir: str | None = None) -> dict:
    topo = TOPOLOGY.get(ncpus)
    if topo is None:
        raise SystemExit(f"--cpus: {ncpus} is not one of {sorted(TOPOLOGY)}")
    extra = {"log_dir": log_dir} if log_dir else {}
    cmci_logged, cmci_done, mce_logged, bad = [], [], [], 0
    with Machine(topology=topo, guests=0, extra=extra) as m:
        for k in range(n):
            r = m.inject(UCNA_CMCI.format(cpu=k % ncpus))
            bad += bool(r["violations"])
            cmci_logged.append(r["latency_us"]["dom0_logged"])
            cmci_done.append(r["latency_us"]["cmci_done"])
            r = m.inject(SRAO_MCE.format(cpu=k % ncpus))
            mce_logged.append(r["latency_us"]["dom0_logged"])
    return {"cpus": ncpus, "topology": topo, "injections": n, "violations": bad,
            "cmci_dom0_logged": _stats(cmci_logged), "cmci_done": _stats(cmci_done),
            "mce_dom0_logged": _stats(mce_logged)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpus", default="4,16")
    p.add_argument("--injections", type=int, default=500)
    p.add_argument("--log-dir", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    out = [run(int(c), a.injections, a.log_dir) for c in a.cpus.split(",")]
    if a.json:
        print(json.dumps(out))
    else:
        for r in out:
            print(f"{r['cpus']:>4} CPUs ({r['topology']}), {r['injections']} rounds: "
                  f"CMCI->Dom0 p50 {r['cmci_dom0_logged']['p50_us']} µs "
                  f"p99 {r['cmci_dom0_logged']['p99_us']} µs; "
                  f"CMCI handled p50 {r['cmci_done']['p50_us']} µs; "
                  f"#MC->Dom0 p50 {r['mce_dom0_logged']['p50_us']} µs "
                  f"p99 {r['mce_dom0_logged']['p99_us']} µs; violations {r['violations']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
