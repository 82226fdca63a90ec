"""A physical CPU's #MC delivery and MCIP, as silicon does them.

Modelled: delivery (:func:`deliver_mc`) sets MCG_STATUS (with MCIP) and raises the
#MC, a signal, so it preempts whatever the CPU process is doing — idling, the
softirq, even an earlier #MC handler whose MCIP is already clear — and the handler
runs nested on top, as an exception does. A #MC that finds MCIP already set shuts
the machine down instead (the SDM's rule, any #MC), and the bank is left as it is.
Before the signal, delivery bumps the CPU's doorbell (its interrupt line), so a CPU
about to sleep sees the pending #MC.

Not modelled: CR4.MCE (always set), parked/offline CPUs, NMI.
"""
from __future__ import annotations

import os
import signal
import time

from emu.hw import msr

SIG_MC = signal.SIGUSR1


def deliver_mc(banks, targets: list[int], mcg_status: dict[int, int], pids: dict[int, int],
               pgid: int | None = None) -> tuple[int | None, int]:
    """Raise #MC on ``targets``. Returns the CPU that shut down (or None) and the
    ``time.monotonic_ns()`` of the raise, taken just before the signal is sent.

    For each CPU: if MCIP is already set the processor shuts down (the caller
    resets the machine); else MCG_STATUS takes the event's value with MCIP. Then
    the signal: a broadcast to every CPU is one ``killpg`` to the CPUs' process
    group, so they are woken together as by a hardware broadcast. The doorbells of
    CPUs that did not enter are rung by the caller, a little later
    (``Coordinator._ring_late``).
    """
    HW, HL = banks.HW, banks.L
    for cpu in targets:
        new = mcg_status[cpu] | msr.MCG_STATUS_MCIP
        while True:
            old = banks.mcg(cpu)
            if old & msr.MCG_STATUS_MCIP:
                return cpu, time.monotonic_ns()
            if banks.cmpxchg_mcg(cpu, old, new) == old:
                break
        HW.fetch_add(HL.doorbell(cpu), 1)
    t = time.monotonic_ns()
    if pgid is not None and len(targets) == len(pids):
        os.killpg(pgid, SIG_MC)
    else:
        for cpu in targets:
            os.kill(pids[cpu], SIG_MC)
    return None, t
