"""The polling timer (intel-nonfatal.c, mce.c's ``set_poll_bankmask``), as a mixin of
:class:`emu.xen.mce.XenCpu`.

Modelled (xen-mca.md §4.3, §1.3 item 3, §10.1 item 4): ``set_poll_bankmask`` (with
CMCI, the banks in ``no_cmci_banks``, a copy taken once at init as Xen does; without
it, every bank), ``mce_checkregs`` (``mcheck_mca_logout(MCA_POLLER, poll_bankmask)``,
which clears what it logs; a NONURGENT commit and VIRQ_MCA; ``adjust++``, a racy
global), and ``mce_work_fn``: the timer on CPU 0 runs ``on_each_cpu(mce_checkregs,
wait=1)``, then adapts the period (errors: ``period /= adjust + 1``; none:
``period *= 2``; clamped) and re-arms. Polling takes no lock: two sharers of a
non-CMCI bank can read it before either clears it (duplicate records, hazard H).

The period is scaled: Xen starts at 8 s and clamps to 2-16 s; here it starts at
``poll_period_s`` and clamps to a quarter and twice that. Off unless asked for; a
trial can also ask for one round at once (the coordinator's ``poll``).

Not modelled: the console dump after ten records without Dom0, the bank-0 quirk of
old P6 parts (``mce_firstbank``), AMD's poller.
"""
from __future__ import annotations

import time

from emu.xen import severity as sev


class IntelNonfatal:
    """Mixin: needs XenCpu's X, L, pc(), mcheck_mca_logout and IntelCmci's helpers."""

    def set_poll_bankmask(self) -> None:
        if self.cmci_support:
            mask = self._mask(self.L.P_NO_CMCI)
        else:
            mask = self.mca_allbanks
        self.X.store(self.pc(self.L.P_POLL_MASK), mask)

    def mce_checkregs(self) -> None:
        X, L = self.X, self.L
        slot, bs = self.mcheck_mca_logout(sev.MCA_POLLER, self._mask(L.P_POLL_MASK), None)
        if bs.errcnt and slot is not None:
            a = X.load(L.poll_adjust)   # adjust++: not atomic in Xen
            self.yp("atomic", L.poll_adjust, a + 1)
            X.store(L.poll_adjust, a + 1)
        self._commit_nonurgent(slot, bs)
        X.fetch_add(self.pc(L.P_POLL_N), 1)

    def on_each_cpu(self, fn_bit: int, local, wait: bool = True) -> None:
        """Run ``local`` here and the call-function ``fn_bit`` on every other online
        CPU; with ``wait``, until they all have (no timeout, as in Xen)."""
        X, L = self.X, self.L
        others = [c for c in self.online_cpus() if c != self.cpu]
        X.store(L.call_pending, len(others))
        self.send_ipi(others, fn_bit)
        self.local_irq_save()     # on_selected_cpus runs the local call with IRQs off
        try:
            local()
        finally:
            self.local_irq_restore()
        if wait:
            self.ev.wait(L.call_ev, lambda: X.load(L.call_pending) == 0, check=self.check)

    def mce_work_fn(self) -> None:
        """The poll timer's function (on CPU 0)."""
        from emu.xen.mce_intel import FN_POLL
        X, L = self.X, self.L
        gen = X.load(L.poll_req)
        X.store(L.poll_started, gen)
        self.on_each_cpu(FN_POLL, self.mce_checkregs, wait=True)
        base = int(self.R.cfg.poll_period_s * 1e9)
        if base:
            period = X.load(L.poll_period_ns) or base
            adjust = X.load(L.poll_adjust)
            period = period // (adjust + 1) if adjust else period * 2
            period = max(base // 4, min(base * 2, period))
            X.store(L.poll_period_ns, period)
        X.store(L.poll_adjust, 0)
        X.fetch_add(L.poll_rounds, 1)
        X.store(L.poll_done, gen)
        self.notify_coordinator()

    def poll_due(self, now_ns: int) -> bool:
        return now_ns >= self._next_poll_ns

    def poll_rearm(self) -> None:
        p = self.X.load(self.L.poll_period_ns)
        self._next_poll_ns = time.monotonic_ns() + p if p else 1 << 62
