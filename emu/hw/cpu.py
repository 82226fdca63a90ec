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

The reset line (:func:`assert_reset`, :func:`hold_in_reset`, :func:`release_reset`):
a warm reset stops every CPU where it is, whatever it runs (the idle loop, a handler
waiting in a barrier for ever, a panic), holds it until the platform releases the
line, and the CPU then boots afresh: nothing of its earlier boot survives but the
hardware region. In a CPU process the line is ``SIG_RESET``, whose handler raises
:class:`CpuReset` to unwind the process's stack to its outer loop; pending #MC and
interrupt signals of the earlier boot run nothing. A CPU that cannot take the
signal (stopped, dead) is the caller's to replace.

Not modelled: CR4.MCE (always set), an offline CPU's #MC (delivery goes to online
CPUs only), NMI, interrupt priorities (all pending vectors are taken in one go).
"""
from __future__ import annotations

import os
import signal
import time

from emu.hw import msr
from emu.hw.futex import futex_wait, futex_wake

SIG_MC = signal.SIGUSR1
SIG_INTR = signal.SIGUSR2
# The reset line. Its number is below SIG_MC's and SIG_INTR's because CPython runs the
# Python handlers of signals pending together in increasing order: the reset must
# run before an #MC of the earlier boot could (and so disarm it).
SIG_RESET = signal.SIGHUP
assert SIG_RESET < SIG_MC and SIG_RESET < SIG_INTR
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


# -- the reset line ---------------------------------------------------------------------
class CpuReset(BaseException):
    """The reset line was asserted: raised in a CPU process by ``SIG_RESET``'s handler,
    caught by the process's outer loop. A BaseException, so no ``except Exception`` of
    emulated code can swallow it."""


_held = False     # this process is held in reset (a second assertion raises nothing)


def _nothing(signum, frame) -> None:
    return None


def on_reset_line(signum, frame) -> None:
    """``SIG_RESET``'s handler in a CPU process: disarm the earlier boot's #MC and
    interrupt handlers (a signal pending with this one then runs nothing), then
    unwind."""
    if _held:
        return
    signal.signal(SIG_MC, _nothing)
    signal.signal(SIG_INTR, _nothing)
    raise CpuReset


def hold_in_reset(HW, HL, cpu: int, notify) -> None:
    """A CPU process held in reset: acknowledge the assertion (``init_ack``, then
    ``notify()`` wakes the platform) and sleep until it is released."""
    global _held
    _held = True
    try:
        gen = HW.load(HL.reset_gen)
        HW.store(HL.init_ack_word(cpu), gen)
        notify()
        rel = HL.reset_release
        addr = HW.address + rel
        while True:
            r = HW.load(rel)
            if r >= gen:
                return
            futex_wait(addr, r, 0.05)
    finally:
        _held = False


def assert_reset(HW, HL, pids: dict[int, int]) -> int:
    """Assert the reset line on the CPU processes ``pids`` (cpu -> pid): a new
    generation, then ``SIG_RESET`` (and SIGCONT: a stopped CPU is reset too). Returns
    the generation; a CPU has taken it when its ``init_ack`` word holds it."""
    gen = HW.fetch_add(HL.reset_gen, 1) + 1
    for pid in pids.values():
        for sig in (SIG_RESET, signal.SIGCONT):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    return gen


def held(HW, HL, cpu: int, gen: int) -> bool:
    return HW.load(HL.init_ack_word(cpu)) == gen


def release_reset(HW, HL, gen: int) -> None:
    """Release the reset line: every CPU held in generation ``gen`` boots."""
    HW.store(HL.reset_release, gen)
    futex_wake(HW.address + HL.reset_release)
