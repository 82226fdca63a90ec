"""A physical CPU's #MC delivery and MCIP, as silicon does them.

Modelled: delivery (:func:`deliver_mc`) sets MCG_STATUS (with MCIP) and raises the
#MC, a signal, so it preempts whatever the CPU process is doing — idling, the
softirq, even an earlier #MC handler whose MCIP is already clear — and the handler
runs nested on top, as an exception does. A #MC that finds MCIP already set shuts
the machine down instead (the SDM's rule, any #MC), and the bank is left as it is.
Before the signal, delivery bumps the CPU's doorbell (its interrupt line), so a CPU
about to sleep sees the pending #MC.

Interrupts (:func:`deliver_interrupt`): a CMCI or an IPI sets its vector in the
CPU's IRR word (the local APIC's pending vectors), bumps the doorbell and sends
``SIG_INTR``, a second signal. An interrupt is not an exception: no MCG_STATUS, no
MCIP. The CPU's code decides when it takes it (interrupts are off in the #MC
handler and in another interrupt's handler: it runs after them).

Not modelled: CR4.MCE (always set), an offline CPU's #MC (delivery goes to online
CPUs only), NMI, interrupt priorities (all pending vectors are taken in one go).
"""
from __future__ import annotations

import os
import signal
import time

from emu.hw import msr

SIG_MC = signal.SIGUSR1
SIG_INTR = signal.SIGUSR2
# IRR bits (vectors): the CMCI (its LVT entry), a call-function IPI (on_each_cpu).
VEC_CMCI = 1
VEC_CALL = 2


def deliver_interrupt(banks, targets, vector: int, pids: dict[int, int]) -> int:
    """Raise interrupt ``vector`` on ``targets``: IRR, doorbell, signal. Returns the
    ``time.monotonic_ns()`` of the raise. The caller rings the doorbells after
    (``Events.ring_doorbell``): a CPU that checked its doorbell just before going to
    sleep would otherwise sleep through the signal."""
    HW, HL = banks.HW, banks.L
    for cpu in targets:
        HW.fetch_or(HL.irr(cpu), vector)
        HW.fetch_add(HL.doorbell(cpu), 1)
    t = time.monotonic_ns()
    for cpu in targets:
        os.kill(pids[cpu], SIG_INTR)
    return t


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
