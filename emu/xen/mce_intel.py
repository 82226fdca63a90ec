"""CMCI, bank ownership, interrupts and CPU offline/online (mce_intel.c), as a mixin
of :class:`emu.xen.mce.XenCpu`.

Modelled (xen-mca.md §1.3 item 2, §4.4, §10.1 item 1):

- ``cmci_discover`` under ``cmci_discover_lock``: for each bank this CPU does not
  own, ``do_cmci_discover`` reads MCi_CTL2; CMCI_EN already set means a sharer owns
  it; else it writes CMCI_EN with the threshold field all-ones and reads back: if
  CMCI_EN stuck the CPU owns the bank (``mce_banks_owned``) with the
  ``cmci-threshold`` boot option (default 2) clamped to what the field held; if not,
  the bank goes to ``no_cmci_banks`` (polled). Then, unlocked, it logs and clears
  its owned banks once (``cfbcb394f9``): a count left pending would block every later
  CMCI.
- ``cmci_interrupt``: ``mcheck_mca_logout(MCA_CMCI_HANDLER, owned banks)``, then a
  NONURGENT commit and VIRQ_MCA (or a dismiss). No recovery action.
- CPU offline/online: CPU_DYING (``cpu_mcheck_disable`` → ``clear_cmci``: the dying
  CPU releases its banks, CMCI_EN and threshold cleared), CPU_DEAD
  (``cpu_mcheck_distribute_cmci``: every online CPU rediscovers, ``on_each_cpu``
  without waiting); a CPU brought up runs ``intel_init_mce`` again (post-reset
  logout, bank init) and ``intel_init_cmci`` (claims what nobody owns).
- Interrupt delivery as the local APIC gives it: ``SIG_INTR`` carries the vectors in
  the IRR word; interrupts are off in the #MC handler and in an interrupt handler
  (the vectors wait in the IRR), and in ``spin_lock_irqsave`` sections.

``dom0_vmce_enabled()`` is true once Dom0 runs (it always binds VIRQ_MCA); during
boot it is false and a record is dismissed, as Xen does ("dump and dismiss").
A CMCI record's bank entries carry ``mc_ctrl2`` and ``mc_tsc`` (the TSC as the
host's monotonic clock). Not modelled: the CMCI LVT itself (vector allocation,
masking), CMCI storms, the threshold printk.
"""
from __future__ import annotations

import os

from emu.hw import msr
from emu.hw.cpu import SIG_INTR, VEC_CALL, VEC_CMCI
from emu.xen import severity as sev
from emu.xen.spinlock import SpinLock
from emu.xen.vmce import send_global_virq

# Functions a call-function IPI runs (bits of the per-CPU mailbox word P_CALL_FN).
FN_POLL, FN_DISCOVER, FN_DYING, FN_UP = 1, 2, 4, 8


class IntelCmci:
    """Mixin: needs XenCpu's X, L, HW, banks, cpu, yp, pc(), mcheck_mca_logout."""

    def _cmci_init(self) -> None:
        R = self.R
        self.cmci_support = bool(R.cfg.mcg_cap & msr.MCG_CMCI_P)
        self.cmci_threshold = int(getattr(R.cfg, "cmci_threshold", 2))
        self.cmci_discover_lock = SpinLock(R, R.L.cmci_discover_lock)
        self._irr_off = R.HL.irr(self.cpu)
        self._irq_off = 0          # interrupts disabled (nesting count)
        self._irq_pending = False  # a SIG_INTR arrived while they were
        self._booting = False

    # -- per-CPU bank masks (what the trial result reads) -------------------------------
    def _mask(self, word: int) -> int:
        return self.X.load(self.pc(word))

    def _mask_set(self, word: int, i: int, on: bool) -> None:
        if on:
            self.X.fetch_or(self.pc(word), 1 << i)
        else:
            self.X.fetch_and(self.pc(word), ~(1 << i) & msr.U64)

    # -- interrupts ------------------------------------------------------------------------
    def do_interrupt(self, *_sig) -> None:
        """SIG_INTR: take the pending vectors, unless interrupts are off (the #MC
        handler, another interrupt, an irqsave section): then they wait in the IRR."""
        if self._irq_off or self.X.load(self._o.nest):
            self._irq_pending = True
            return
        while True:
            self._irq_pending = False
            self._irq_off += 1
            try:
                while True:
                    irr = self.HW.xchg(self._irr_off, 0)
                    if not irr:
                        break
                    if irr & VEC_CMCI:
                        self.cmci_interrupt()
                    if irr & VEC_CALL:
                        self.smp_call_function_interrupt()
            finally:
                self._irq_off -= 1
            # A signal between the last IRR read and here found interrupts off: its
            # vector waits in the IRR, so take it now.
            if not self._irq_pending:
                return

    def local_irq_save(self) -> None:
        self._irq_off += 1

    def local_irq_restore(self) -> None:
        self._irq_off -= 1
        if not self._irq_off and self._irq_pending:
            self.do_interrupt()

    def send_ipi(self, cpus, fn: int) -> None:
        """A call-function IPI running ``fn`` on ``cpus`` (not this one)."""
        X, L, HW, HL = self.X, self.L, self.HW, self.R.HL
        for c in cpus:
            X.fetch_or(L.pc(c, L.P_CALL_FN), fn)
            HW.fetch_or(HL.irr(c), VEC_CALL)
            HW.fetch_add(HL.doorbell(c), 1)
        for c in cpus:
            os.kill(X.load(L.pc(c, L.P_PID)), SIG_INTR)
            self.ev.ring_doorbell(HL.doorbell(c), HL.sleep_reg(c))

    def smp_call_function_interrupt(self) -> None:
        fns = self.X.xchg(self.pc(self.L.P_CALL_FN), 0)
        if fns & FN_UP:
            self.cpu_up()
        if fns & FN_DYING:
            self.cpu_dying()
        if fns & FN_DISCOVER:
            self.cmci_discover()
        if fns & FN_POLL:
            self.mce_checkregs()
            self.X.fetch_sub(self.L.call_pending, 1)
            self.ev.bump(self.L.call_ev)
        self.X.fetch_add(self.pc(self.L.P_CALL_N), 1)
        self.notify_coordinator()

    def online_cpus(self) -> list[int]:
        """for_each_online_cpu: the bits of cpu_online_map."""
        out = []
        for w in range(self.L.mcefatal_words):
            v = self.X.load(self.L.online_map + 8 * w)
            while v:
                b = (v & -v).bit_length() - 1
                out.append(w * 64 + b)
                v &= v - 1
        return out

    # -- commit or dismiss (the tail of cmci_interrupt, cmci_discover, mce_checkregs) ---
    def _commit_nonurgent(self, slot, bs) -> bool:
        if bs.errcnt and slot is not None:
            if not self._booting:          # dom0_vmce_enabled()
                self.tele.mctelem_commit(slot)
                send_global_virq(self.R)
                return True
            self.tele.mctelem_dismiss(slot)   # x86_mcinfo_dump, then dismiss
        elif slot is not None:
            self.tele.mctelem_dismiss(slot)
        return False

    # -- CMCI (§4.4) -----------------------------------------------------------------------
    def cmci_interrupt(self) -> None:
        # ack_APIC_irq(): the IRR bit was taken by do_interrupt.
        slot, bs = self.mcheck_mca_logout(sev.MCA_CMCI_HANDLER, self._mask(self.L.P_BANKS_OWNED),
                                          None)
        self._commit_nonurgent(slot, bs)
        self.stamp(self.L.P_T_CMCI)
        self.X.fetch_add(self.pc(self.L.P_CMCI_N), 1)
        self.notify_coordinator()

    def do_cmci_discover(self, i: int) -> bool:
        L, yp, cpu = self.L, self.yp, self.cpu
        yp("rdmsr", i, msr.REG_CTL2)
        val = self.banks.read(cpu, i, msr.REG_CTL2)
        if val & msr.CMCI_EN:            # some other CPU already owns this bank
            self._mask_set(L.P_BANKS_OWNED, i, False)
        else:
            if self.cmci_threshold:
                yp("wrmsr", i, msr.REG_CTL2)
                self.banks.wrmsr_ctl2(cpu, i, val | msr.CMCI_EN | msr.CMCI_THRESHOLD_MASK)
                yp("rdmsr", i, msr.REG_CTL2)
                val = self.banks.read(cpu, i, msr.REG_CTL2)
            if not val & msr.CMCI_EN:
                # This bank does not support CMCI: the polling timer has to handle it.
                self._mask_set(L.P_NO_CMCI, i, True)
                yp("wrmsr", i, msr.REG_CTL2)
                self.banks.wrmsr_ctl2(cpu, i, val & ~msr.CMCI_THRESHOLD_MASK)
                return False
            threshold = min(self.cmci_threshold, val & msr.CMCI_THRESHOLD_MASK)
            yp("wrmsr", i, msr.REG_CTL2)
            self.banks.wrmsr_ctl2(cpu, i, (val & ~msr.CMCI_THRESHOLD_MASK) | msr.CMCI_EN
                                  | threshold)
            self._mask_set(L.P_BANKS_OWNED, i, True)
        self._mask_set(L.P_NO_CMCI, i, False)
        return True

    def cmci_discover(self) -> None:
        self.local_irq_save()
        try:
            self.cmci_discover_lock.mce_spin_lock(self.cpu, self.yp, self.check)
            owned = self._mask(self.L.P_BANKS_OWNED)
            for i in range(self.nbanks):
                if not owned >> i & 1:
                    self.do_cmci_discover(i)
            self.cmci_discover_lock.spin_unlock(self.yp)
        finally:
            self.local_irq_restore()
        # A CMCI that came while ownership moved left its count pending: log and clear
        # the owned banks now, or that bank never signals again (cfbcb394f9).
        slot, bs = self.mcheck_mca_logout(sev.MCA_CMCI_HANDLER, self._mask(self.L.P_BANKS_OWNED),
                                          None)
        self._commit_nonurgent(slot, bs)
        self.X.fetch_add(self.pc(self.L.P_DISCOVER_N), 1)

    def clear_cmci(self) -> None:
        L, cpu = self.L, self.cpu
        owned = self._mask(L.P_BANKS_OWNED)
        for i in range(self.nbanks):
            if not owned >> i & 1:
                continue
            self.yp("rdmsr", i, msr.REG_CTL2)
            val = self.banks.read(cpu, i, msr.REG_CTL2)
            if val & (msr.CMCI_EN | msr.CMCI_THRESHOLD_MASK):
                self.yp("wrmsr", i, msr.REG_CTL2)
                self.banks.wrmsr_ctl2(cpu, i, val & ~(msr.CMCI_EN | msr.CMCI_THRESHOLD_MASK))
            self._mask_set(L.P_BANKS_OWNED, i, False)

    def intel_init_cmci(self) -> None:
        if self.cmci_support:
            self.cmci_discover()      # mce_set_owner

    # -- CPU offline / online (the cpu_callback notifier) --------------------------------
    def cpu_dying(self) -> None:
        """CPU_DYING on this CPU (__cpu_disable, under stop_machine): release the
        owned banks, leave cpu_online_map."""
        X, L = self.X, self.L
        if self.cmci_support:
            self.clear_cmci()         # cpu_mcheck_disable
        X.fetch_and(L.online_map + 8 * (self.cpu // 64), ~(1 << (self.cpu % 64)) & msr.U64)
        X.fetch_sub(L.online, 1)
        X.store(self.pc(L.P_OFFLINE), 1)
        self.set_phase("offline")

    def cpu_up(self) -> None:
        """start_secondary on a CPU brought back: mcheck_init again (post-reset logout,
        bank init, CMCI ownership of what nobody owns, the poll mask), then online."""
        X, L = self.X, self.L
        self.set_phase("boot")
        self.intel_init_mce()
        self.intel_init_cmci()
        self.set_poll_bankmask()
        X.store(self.pc(L.P_OFFLINE), 0)
        X.fetch_or(L.online_map + 8 * (self.cpu // 64), 1 << (self.cpu % 64))
        X.fetch_add(L.online, 1)
        self.set_phase("idle")
        self.notify_coordinator()
