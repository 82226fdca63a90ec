"""Handler version ``xen-2009-03``: the Intel #MC series as first merged,
``32e8dd573b`` (2009-03-20, "x86: Core support for Intel MCA support";
xen-mca.md §10.1 item 2, §4.1): ``intel_machine_check`` and its ``mce_softirq``.

Modelled (``32e8dd573b:xen/arch/x86/cpu/mcheck/mce_intel.c``, ``mce.c``):

- round 1, ``severity_scan``: raw reads; UC+EN+PCC panics "pcc = 1, cpu unable to
  continue"; then the ``scanned_cpus`` rendezvous;
- "a second #MC while the softirq buffer is in use panics" (``mc_local.in_use``);
- round 2 under ``mce_enter_lock``: the logout clears **every** valid bank (STATUS
  only; ADDR and MISC stay); CPUs with no error set their ``mced_cpus`` bit and leave
  at once, MCIP not cleared; the others take part in the worst-severity election
  (3 PCC, 2 UC, 1 else; strict ``>``: the first in lock order wins ties) and wait
  for ``mced_cpus`` to fill; a CPU without a telemetry entry dereferences NULL in
  ``x86_mcinfo_dump`` (a page fault in #MC: modelled as a panic, and named so);
- only the CPU that wins ``mce_process_lock`` clears its own MCIP, then panics if
  the worst severity is 3 ("worst=3 should have caused RESET");
- ``mce_softirq``: the ``mced_cpus`` spin (shared with the trap), ``severity_cpu ==
  -1`` panics "not found severity_cpu!", the worker runs ``mce_actions`` (every bank
  of every impacted CPU filled as a vMCE for **Dom0**, vCPU0, no page offline, the
  records committed), VIRQ_MCA, one vMCE kick, then "Clean Data": it clears the
  process lock, ``impact_map``, ``scanned_cpus``, ``worst`` and ``mced_cpus`` while
  other CPUs may still be spinning on it; every CPU then meets in
  ``finished_cpus``, which every leaver clears, and writes ``severity_cpu = -1``;
- boot: the leftover banks are logged and the record **dismissed** (never Dom0's).

The cpumask spins re-read the live mask in every iteration (no generation, nothing
latched), so a CPU that arrives after a mask was cleared spins forever (the
lost-wakeup hangs). One emulation choice, documented: a CPU about to clear a mask
first lets the CPUs spinning on it (from their ``cpu_set``, which Xen follows with
the spin at once) see its last value, for at most ``CLEAR_GRACE_S``. On silicon every
spinner re-reads within nanoseconds; here a spinner is a process that may be
descheduled. A CPU held longer than that (a stall hook, an SMI, a long console
write) or not yet spinning (H1: its softirq has not started) misses it: the race.

Not modelled: the raw-vs-interposed MSR difference, ``add_taint``, the console
dump, Dom0's vMCE re-injection on ``iret`` (one bank reaches Dom0's vCPU0: the last
one filled), ``get_domain_by_id``'s reference leak. The action log gives each bank
``continue`` ("no recovery action"), and the ``vmce`` of the bank Dom0 reads.
"""
from __future__ import annotations

import os
import time

from emu.hw import msr
from emu.hw.atomic import signed
from emu.xen import severity as sev
from emu.xen.mce import PH, PH_EXIT, PH_LOGOUT, McaSummary, XenCpu, _monotonic_ns
from emu.xen.spinlock import SpinLock

CLEAR_GRACE_S = 0.05
PH_ROUND1_WAIT, PH_MCED_WAIT, PH_SOFTIRQ_ACTIONS, PH_SOFTIRQ_FINISH = (
    PH[n] for n in ("round1_wait", "mced_wait", "softirq_actions", "softirq_finish"))
_popcount = int.bit_count


class Cpumask:
    """A ``cpumask_t`` in Xen memory that CPUs spin on (``cpu_set``, ``cpus_weight``,
    ``cpus_clear``); every change bumps one event word the spinners sleep on."""

    def __init__(self, R, off: int, k: int):
        """``off``: the mask's words; ``k``: its spinner count (``mask_waiting[k]``)."""
        L = R.L
        self.X, self.ev, self.online = R.X, R.ev, L.online
        self.words = L.mcefatal_words
        self.off = off
        self.waiting = L.mask_waiting + 8 * k
        self.ev_off = L.mask_ev

    def cpu_set(self, cpu: int, spin: bool = False) -> None:
        """``spin``: this CPU spins on the mask next (Xen: right after a ``wmb()``), so
        it counts as spinning from now on (see ``cpus_clear``)."""
        if spin:
            self.X.fetch_add(self.waiting, 1)
        self.X.fetch_or(self.off + 8 * (cpu // 64), 1 << (cpu % 64))
        self.ev.bump(self.ev_off)

    def will_spin(self) -> None:
        self.X.fetch_add(self.waiting, 1)

    def weight(self) -> int:
        load = self.X.load
        return sum(_popcount(load(self.off + 8 * w)) for w in range(self.words))

    def cpus(self) -> list[int]:
        load = self.X.load
        return [c for w in range(self.words) for c in range(64 * w, 64 * w + 64)
                if load(self.off + 8 * w) >> (c % 64) & 1]

    def spin_until_full(self) -> None:
        """``while (cpus_weight(mask) < num_online_cpus()) cpu_relax();`` (the caller
        has counted itself as spinning: ``cpu_set(spin=True)`` or ``will_spin``)."""
        X, load = self.X, self.X.load
        try:
            self.ev.wait(self.ev_off, lambda: self.weight() >= load(self.online))
        finally:
            X.fetch_sub(self.waiting, 1)

    def cpus_clear(self, yp) -> None:
        # The grace for CPUs already spinning (see the module docstring).
        end = time.monotonic() + CLEAR_GRACE_S
        while self.X.load(self.waiting) and time.monotonic() < end:
            os.sched_yield()
        yp("atomic")
        for w in range(self.words):
            self.X.store(self.off + 8 * w, 0)
        self.ev.bump(self.ev_off)


class Xen200903(XenCpu):
    """``intel_machine_check`` and ``mce_softirq`` of 2009-03 (see the module)."""

    version = "xen-2009-03"

    def __init__(self, R, cpu, yps, hooks=None):
        super().__init__(R, cpu, yps, hooks)
        L = R.L
        # scanned_cpus, mced_cpus, finished_cpus in L.mced_cpus's three masks
        self.scanned, self.mced, self.finished = (
            Cpumask(R, L.mced_cpus + 8 * L.mcefatal_words * k, k) for k in range(3))
        self.impact = Cpumask(R, L.impact_map, 3)   # nobody spins on it
        self.mce_enter_lock = SpinLock(R, L.mce_enter_lock)
        self._worst, self._sevcpu = L.worst, L.worst + 8
        self._in_use = L.mc_local
        self._mctc0 = L.mc_local + 8

    def _mctc(self, cpu: int) -> int:
        return self._mctc0 + 8 * cpu

    # -- the trap handler ------------------------------------------------------------
    def severity_scan(self) -> None:
        """Round 1: a UC+EN+PCC bank panics at once (raw reads, no clear)."""
        want = msr.MCi_STATUS_VAL | msr.MCi_STATUS_UC | msr.MCi_STATUS_EN
        for i in range(self.nbanks):
            status = self.rd_bank(i, msr.REG_STATUS)
            if status & want == want and status & msr.MCi_STATUS_PCC:
                self.mc_panic("pcc = 1, cpu unable to continue\n")

    def mcheck_cmn_handler(self) -> None:
        X, cpu, yp, o = self.X, self.cpu, self.yp, self._o
        self.severity_scan()
        self.scanned.cpu_set(cpu, spin=True)
        self._phase(PH_ROUND1_WAIT)
        self.scanned.spin_until_full()
        X.store(o.t_barrier_a, _monotonic_ns())   # (the bench's "left 1st rendezvous")
        if X.load(self._in_use):
            self.mc_panic("MCE: Local buffer is being processed, can't handle new MCE!\n")
        # round 2, serialised (udelay(1) between tries; no panic check)
        self.mce_enter_lock.mce_spin_lock(cpu, yp, None)
        self._phase(PH_LOGOUT)
        clear_bank: list[int] = []
        slot, bs = self.mcheck_mca_logout(sev.MCA_MCE_SCAN, self.mca_allbanks, clear_bank,
                                          write_later=True)
        self.mcheck_mca_clearbanks(clear_bank)   # 2009 clears in the logout loop
        logged, cleared = self._pending_log, self._cleared
        if not bs.errcnt:
            if slot is not None:
                self.tele.mctelem_dismiss(slot)
            X.store(self._mctc(cpu), 0)
            self.mced.cpu_set(cpu)
            self.mce_enter_lock.spin_unlock(yp)
            X.store(o.t_logout, _monotonic_ns())
            self._flush_logout(logged, cleared)
            self._phase(PH_EXIT, o.t_exit)
            self.raise_softirq()
            return                                # no wait, MCIP not cleared
        if slot is not None:
            self.tele.write(slot, self.mctelem_payload())
            X.store(self._mctc(cpu), slot + 1)
        self.set_severity_cpu(bs)
        self.mced.cpu_set(cpu, spin=True)
        self.mce_enter_lock.spin_unlock(yp)
        X.store(o.t_logout, _monotonic_ns())
        self._flush_logout(logged, cleared)
        self._phase(PH_MCED_WAIT)
        self.mced.spin_until_full()               # "Wait for all cpus Leave Critical"
        X.store(o.t_fatal, _monotonic_ns())
        if slot is None:
            # x86_mcinfo_dump(mctelem_dataptr(NULL)): a page fault in #MC context
            self.mc_panic("MCE: page fault in #MC handler (x86_mcinfo_dump of a NULL entry)")
        yp("atomic")
        if X.cmpxchg(self.L.process_lock, 0, 1) == 0:   # "Pick one CPU to clear MCIP"
            self.clear_mcip()
            X.store(o.t_mcip, _monotonic_ns())
            if X.load(self._worst) >= 3:
                self.mc_panic("worst=3 should have caused RESET")
        self._phase(PH_EXIT, o.t_exit)
        self.raise_softirq()

    def set_severity_cpu(self, bs: McaSummary) -> None:
        X = self.X
        severity = 3 if bs.pcc else 2 if bs.uc else 1
        self.impact.cpu_set(self.cpu)
        if severity > X.load(self._worst):
            X.store(self._worst, severity)
            X.store(self._sevcpu, self.cpu)

    def need_clearbank_scan(self, who, status: int) -> bool:
        return True   # 2009: "Clear status" for every valid bank, every source

    def mcheck_mca_clearbanks(self, clear_bank: list) -> None:
        for i in clear_bank:   # STATUS only
            self.wr_bank(i, msr.REG_STATUS, 0)
            self._cleared.add(i)

    # -- the softirq -----------------------------------------------------------------
    def mce_softirq(self) -> None:
        X, L, cpu, yp = self.X, self.L, self.cpu, self.yp
        gen = X.load(self.pc(L.P_MC_GEN))
        self.stamp(L.P_T_SOFTIRQ_START)
        self.mced.will_spin()
        self.set_phase("softirq")
        self._phase(PH_MCED_WAIT)   # the spin shared with the trap handler
        self.mced.spin_until_full()
        worker = signed(X.load(self._sevcpu))
        if worker == -1:
            self.mc_panic("MCE: not found severity_cpu!")
        if worker == cpu:
            self.set_phase("softirq_worker")
            X.store(self.pc(L.P_SIRQ_ROLE), 1)
            if self.mce_actions():
                self.mc_panic("MCE recovery actions or Filling vMCE MSRS virtualization "
                              "data failed!\n")
            self.send_global_virq()
            # "Clean Data"
            X.store(L.process_lock, 0)
            self.impact.cpus_clear(yp)
            self.scanned.cpus_clear(yp)
            X.store(self._worst, 0)
            self.mced.cpus_clear(yp)
            for c in range(self.topo.ncpus + 1):   # memset(&mc_local, 0, ...)
                X.store(self._in_use + 8 * c, 0)
        self.finished.cpu_set(cpu, spin=True)
        self._phase(PH_SOFTIRQ_FINISH)
        self.finished.spin_until_full()
        self.finished.cpus_clear(yp)              # every leaver
        X.store(self._sevcpu, -1 & msr.U64)       # every leaver
        self.stamp(L.P_T_SOFTIRQ)
        self.set_phase("softirq_done")
        self.set_phase("idle")
        X.store(self.pc(L.P_DONE_GEN), gen)
        self.notify_coordinator()

    def mce_actions(self) -> int:
        """Fill every bank record of every impacted CPU as a vMCE for Dom0 (vCPU0,
        machine address), commit the records, kick Dom0's vCPU0 once."""
        X = self.X
        X.store(self._in_use, 1)   # test_and_set_bool; the result is ignored
        self._phase(PH_SOFTIRQ_ACTIONS)
        ret = 0
        impacted = self.impact.cpus()
        entries, last = [], None
        for c in impacted:
            ref = X.load(self._mctc(c))
            if not ref:
                ret = -1
                break
            rec = self.tele.read(ref - 1)
            log = []
            for b in rec["b"]:
                bank = {"status": b[1], "addr": b[2], "misc": b[3], "domid": 0}
                info = {"note": "no recovery action (2009-03: vMCE to Dom0 only)"}
                if msr.addr_is_physical(b[1], b[3]):   # for the result: whose page it was
                    d = self.pages.owner(b[2] >> 12)
                    if d < 0x7FF0:
                        info["impacted_domain"] = d
                if self.vmce.fill_vmsr_data(bank, 0, rec["g"]["mc_gstatus"], 0) == 0:
                    last = (info, b)
                log.append((b, sev.MCER_CONTINUE, info))
            entries.append((ref - 1, rec, log))
        if last is not None:
            r, kicked = self.vmce.inject_vmce(0, 0)
            if r == 0:   # Dom0's vCPU0 holds the last bank filled
                last[0]["vmce"] = {"domain": 0, "vcpus": kicked, "gaddr": last[1][2],
                                   "broadcast": False}
        for slot, rec, log in entries:
            self._log_actions(slot, rec, log, sev.MCER_CONTINUE)
        for c in impacted:
            ref = X.load(self._mctc(c))
            if ref:
                self.tele.mctelem_commit(ref - 1)
        X.store(self._in_use, 0)
        return ret

    # -- boot --------------------------------------------------------------------------
    def boot_logout(self) -> None:
        """mce_init: the leftover banks are logged (and cleared), printed, and the
        record dismissed: "in the boot up stage, don't inject to DOM0"."""
        if self.cpu == 0:   # the BSP boots first: Xen's static initialisers
            self.X.store(self._sevcpu, -1 & msr.U64)
        slot, bs = self.mcheck_mca_logout(sev.MCA_RESET, self.mca_allbanks, None,
                                          write_later=True)
        if slot is not None:
            self.tele.mctelem_dismiss(slot)
        pend = [(who, i, st, a, m, 0) for who, i, st, a, m, _ in self._pending_log]
        self._flush_logout(pend, self._cleared)
