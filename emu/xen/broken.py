"""Broken variants: not Xen's history, one deliberate defect each, to prove that a
campaign finds what it should (and the oracle reports it).

Each overrides one step of ``seed``. Where a defect needs a precise interleaving to
show deterministically, the variant marks a phase of its own at the defect's window
(``clearbanks``, ``barrier_exit_wait``, ``softirq_elect``: appended to
:data:`emu.xen.mce.PHASES`), reported like any other phase, so a stall hook can hold
a CPU there; ``seed`` never reaches those phases.
"""
from __future__ import annotations

from emu.hw import msr
from emu.xen import severity as sev
from emu.xen.barrier import McaBarrier
from emu.xen.mce import PH, PH_BARRIER_C, McaSummary, XenCpu, _monotonic_ns

PH_CLEARBANKS, PH_BARRIER_EXIT_WAIT, PH_SOFTIRQ_ELECT = (
    PH[n] for n in ("clearbanks", "barrier_exit_wait", "softirq_elect"))


class _NoLock:
    """A lock that is not taken."""

    def mce_spin_lock(self, cpu, yp, check) -> None:
        yp("lock")   # (the yield point stays: only the lock is gone)

    def spin_unlock(self, yp) -> None:
        yp("unlock")

    def holder(self) -> int:
        return -1


class NoLogoutLock(XenCpu):
    """The logout without ``mce_logout_lock``: two sharers of a clearable bank both
    read it before either clears it, and both log it (two owners, two records)."""

    version = "no-logout-lock"

    def __init__(self, R, cpu, yps, hooks=None):
        super().__init__(R, cpu, yps, hooks)
        self.mce_logout_lock = _NoLock()

    def mcheck_mca_clearbanks(self, clear_bank: list) -> None:
        self._phase(PH_CLEARBANKS)   # the window: read, not yet cleared
        super().mcheck_mca_clearbanks(clear_bank)


class BarrierNoGeneration(McaBarrier):
    """The rendezvous without ``ingen``/``outgen``: enter waits for ``val == N``, exit
    for ``val == 0``, nothing else. A CPU slow to see ``val == 0`` in an exit, while
    the others have entered the next rendezvous on the same barrier, waits forever,
    and so do they (a hang on reuse). ``on_exit_wait``: called after the decrement,
    before the wait (the variant's phase mark)."""

    def __init__(self, R, off: int, on_exit_wait):
        super().__init__(R, off)
        self.on_exit_wait = on_exit_wait

    def mce_barrier_enter(self, wait: bool, yp, check, arr: int = 0) -> None:
        if not wait:
            return
        X, load, online = self.X, self.X.load, self.online
        yp("barrier", self._tr[1])
        v = X.fetch_add(self._val, 1) + 1
        if arr:
            X.store(arr, v)   # (the arrival order, emulator bookkeeping)
        if v == load(online):
            self.ev.bump(self._ev_in)
            return
        self.ev.wait(self._ev_in, lambda: load(self._val) == load(online), check=check)

    def mce_barrier_exit(self, wait: bool, yp, check) -> None:
        if not wait:
            return
        X, load = self.X, self.X.load
        yp("barrier", self._tr[3])
        if X.fetch_sub(self._val, 1) - 1 == 0:
            self.ev.bump(self._ev_out)
            return
        self.on_exit_wait()
        self.ev.wait(self._ev_out, lambda: load(self._val) == 0, check=check)


class BarrierNoGenerations(XenCpu):
    """The trap handler's three rendezvous on a barrier without generations
    (:class:`BarrierNoGeneration`): barrier A's exit and barrier B's enter reuse one
    ``val``, so a CPU that sees ``val == 0`` late hangs the machine."""

    version = "barrier-no-generation"

    def __init__(self, R, cpu, yps, hooks=None):
        super().__init__(R, cpu, yps, hooks)
        self.mce_trap_bar = BarrierNoGeneration(
            R, R.L.mce_trap_bar, lambda: self._phase(PH_BARRIER_EXIT_WAIT))


class McipOneCpu(XenCpu):
    """MCIP cleared by one CPU only (the one that ran the fatal check), as if MCIP
    were one global flag: every other CPU leaves the handler with MCIP set, and the
    next #MC on it shuts the processor down."""

    version = "mcip-one-cpu"
    _checker = False

    def fatal_check(self) -> None:
        self._checker = True
        super().fatal_check()

    def barrier_c_step(self, bs: McaSummary, bcast: bool) -> None:
        yp, check, bar = self.yp, self.check, self.mce_trap_bar
        self._phase(PH_BARRIER_C, self._o.t_fatal)
        bar.mce_barrier_enter(bcast, yp, check, self._arr_c)
        if self._checker:
            self._checker = False
            self.clear_mcip()
        self.X.store(self._o.t_mcip, _monotonic_ns())
        bar.mce_barrier_exit(bcast, yp, check)


class FatalBankCleared(XenCpu):
    """A fatal (UC+PCC) bank cleared in #MC like a recoverable one: the reset comes
    after, and boot-time logout finds nothing (the sticky log is lost)."""

    version = "fatal-bank-cleared"

    def need_clearbank_scan(self, who, status: int) -> bool:
        if who == sev.MCA_MCE_SCAN and status & msr.MCi_STATUS_UC \
                and status & msr.MCi_STATUS_PCC:
            return True
        return super().need_clearbank_scan(who, status)


class SoftirqPlainStore(XenCpu):
    """The softirq worker elected by a plain store without ``mce_severity_bar``:
    each CPU writes ``severity_cpu`` and reads it back at once, so a CPU that reads
    before a later one writes is a worker too (two workers for one #MC)."""

    version = "softirq-plain-store"

    def softirq_elect(self, bcast: bool) -> None:
        X, cpu, yp, off = self.X, self.cpu, self.yp, self.sirq_severity_off
        self._phase(PH_SOFTIRQ_ELECT)
        yp("atomic", off, cpu)
        X.store(off, cpu)
        if not self.tele.mctelem_has_deferred(cpu):
            yp("atomic", off, cpu)
            X.store(off, cpu)
