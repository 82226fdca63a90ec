#!/usr/bin/env python3
"""How much slower the #MC logout runs cold: in a loop, after an idle sleep, after a
cache sweep. One process, no machine: a CPU's ``mcheck_mca_logout`` over real regions.

    python tools/coldstart.py [--sleep-ms 2] [--rounds 200]

Why it matters: between two machine checks every CPU process sleeps, and on a VM
whose idle vCPU halts, the next handler runs with cold caches, TLB and branch
predictors. Seen here (2026-11-26): 10 µs hot, 55 µs after a 2 ms sleep, 83 µs
after a 64 MB sweep, so a 4-CPU trial is bound by cold Python, not by the design.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from emu.hw.banks import Banks
from emu.hw.yieldpoint import YieldPoints
from emu.machine import MachineConfig
from emu.machine.regions import Regions
from emu.xen import severity as sev
from emu.xen.mce import XenCpu
from emu.xen.mctelem import Mctelem
from emu.xen.page_alloc import PageTable


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sleep-ms", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=200)
    a = p.parse_args(argv)
    cfg = MachineConfig(topology="1x1x1").validate()
    R = Regions(cfg)
    banks = Banks(R)
    banks.power_on(cfg.mcg_cap)
    Mctelem(R).init(1)
    PageTable(R).init_default([0])
    x = XenCpu(R, 0, YieldPoints(0))
    R.X.store(R.L.boot_token, 0)
    x.boot()

    def logout() -> float:
        banks.hw_report(0, 8, 0xBD000000004000CF, 0x181000, 0x86)
        clear: list = []
        t = time.perf_counter_ns()
        slot, _ = x.mcheck_mca_logout(sev.MCA_MCE_SCAN, x.mca_allbanks, clear)
        dt = (time.perf_counter_ns() - t) / 1e3
        x.mcheck_mca_clearbanks(clear)
        x.tele.mctelem_dismiss(slot)
        R.X.store(x.pc(R.L.P_LOGOUT_N), 0)
        return dt

    hot = [logout() for _ in range(a.rounds)]
    slept = []
    for _ in range(a.rounds):
        time.sleep(a.sleep_ms / 1e3)
        slept.append(logout())
    sweep = np.ones(64 * 1024 * 1024 // 8)
    swept = []
    for _ in range(a.rounds):
        sweep += 1.0
        swept.append(logout())
    os.close(R.efd)
    print(f"mcheck_mca_logout p50: hot {np.median(hot):.1f} µs, after a {a.sleep_ms} ms sleep "
          f"{np.median(slept):.1f} µs, after a 64 MB sweep {np.median(swept):.1f} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
