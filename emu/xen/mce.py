"""The common #MC handler, logout, softirq and panic (mce.c), version ``seed``.

Modelled (xen-mca.md §2): ``mcheck_cmn_handler`` step by step — logout under
``mce_logout_lock`` where the first reader of a shared clearable bank clears it
(``mcheck_mca_clearbanks`` while still holding the lock), ``found_error``,
``severity_cpu`` by plain last-writer store, ``mce_fatal_cpus``, three rendezvous
on one reused generation barrier, the urgent action, the fatal check on
``severity_cpu`` (or the LMCE CPU), per-CPU MCIP clear, ``raise_softirq``.
``mce_softirq``: the two-barrier worker election with its private
``severity_cpu``, ``mctelem_process_deferred`` over every CPU's list,
``mce_delayed_action`` and VIRQ_MCA. ``mc_panic``: one CPU panics and asks the
reset controller for a warm reset without touching the banks; every spinner halts
in ``mce_panic_check``. Boot-time logout (``MCA_RESET``) after a reset, then the
bank initialisation of ``intel_init_mce``.

Steps a handler version (:mod:`emu.xen.versions`) overrides: ``barrier_b_step``,
``barrier_c_step``, ``set_severity_cpu``, ``fatal_check``, ``clear_mcip``,
``need_clearbank_scan``, ``mcheck_mca_clearbanks``, ``mce_urgent_action``,
``softirq_elect`` (and ``sirq_severity_off``), ``boot_logout``, ``telemetry_class``;
each costs the seed one method call at most.

CMCI, bank ownership, interrupts and CPU offline/online are in
:mod:`emu.xen.mce_intel`, the polling timer in :mod:`emu.xen.intel_nonfatal` (mixins
of :class:`XenCpu`).

Not modelled: interposed MSRs, the extended (P4) MSR record, AMD, console output
(the trial result carries what Xen would have printed).
"""
from __future__ import annotations

import os
import struct
import time
from types import SimpleNamespace
from typing import NamedTuple

import msgpack

from emu.hw import msr
from emu.hw.atomic import signed
from emu.hw.banks import Banks
from emu.hw.region import MCG_K_CAP, MCG_K_STATUS
from emu.hw.yieldpoint import cpu_key, process_seed
from emu.xen import layout as xl, mcaction, severity as sev, vmce
from emu.xen.barrier import McaBarrier
from emu.xen.intel_nonfatal import IntelNonfatal
from emu.xen.layout import ACTION_RING, LOGOUT_RING
from emu.xen.mce_intel import IntelCmci
from emu.xen.mctelem import (
    MC_FLAG_CMCI,
    MC_FLAG_CORRECTABLE,
    MC_FLAG_MCE,
    MC_FLAG_POLLED,
    MC_FLAG_RECOVERABLE,
    MC_FLAG_UNCORRECTABLE,
    MC_NONURGENT,
    MC_URGENT,
    MCINFO_FLAGS_UNCOMPLETE,
    Mctelem,
    mcinfo_fits,
)
from emu.xen.page_alloc import DOMID_INVALID, PageTable
from emu.xen.spinlock import SpinLock

# Phases a CPU reports (for the trial result and the watchdog's snapshot).
PHASES = ("idle", "boot", "entered", "logout", "barrier_a", "barrier_b", "fatal_check",
          "barrier_c", "exit", "softirq", "softirq_worker", "softirq_done", "halted",
          "panic", "offline",
          # Appended (P_REACHED is a bitmask by index). ``softirq_elected`` is a seed
          # phase reported only on a machine with test hooks (it costs the hot path
          # nothing otherwise); the others belong to handler versions (versions.py).
          "softirq_elected", "round1_wait", "mced_wait", "softirq_actions",
          "softirq_finish", "clearbanks", "barrier_exit_wait", "softirq_elect")
PH = {n: i for i, n in enumerate(PHASES)}
(PH_ENTERED, PH_LOGOUT, PH_BARRIER_A, PH_BARRIER_B, PH_FATAL_CHECK, PH_BARRIER_C,
 PH_EXIT) = (PH[n] for n in ("entered", "logout", "barrier_a", "barrier_b", "fatal_check",
                            "barrier_c", "exit"))

# Reset requests to the coordinator (the reset controller).
RESET_NONE, RESET_PANIC = 0, 1

# Logout ring entry: meta(who | bank<<8 | cleared<<16), status, addr, misc, gen, record id
LOG_WORDS = 6
WHO_CODE = {sev.MCA_MCE_SCAN: 1, sev.MCA_POLLER: 2, sev.MCA_CMCI_HANDLER: 3, sev.MCA_RESET: 4}
WHO_NAME = {v: k for k, v in WHO_CODE.items()}

DOMID_IDLE = 0x7FFF   # the idle vCPU: Xen context


class McaSummary(NamedTuple):
    errcnt: int
    ripv: bool
    eipv: bool
    lmce: bool
    uc: bool
    pcc: bool
    recoverable: bool


_new_tuple = tuple.__new__
_monotonic_ns = time.monotonic_ns
_pack_log = struct.Struct(f"<{LOG_WORDS}Q").pack_into
VAL = msr.MCi_STATUS_VAL
# Yield-point details (the trace's d0, d1): bank and register; MCG registers as bank
# MCG_BANK with their MCG_K_* index.
MCG_BANK = 0xFF
R_STATUS, R_ADDR, R_MISC = msr.REG_STATUS, msr.REG_ADDR, msr.REG_MISC


class XenCpu(IntelCmci, IntelNonfatal):
    """Xen's machine-check code as it runs on one physical CPU (one process)."""

    version = "seed"
    # The telemetry implementation this version runs on; the coordinator (Dom0's
    # fetch and ack) uses the same class, so a version's freelist is the one that frees.
    telemetry_class = Mctelem

    def __init__(self, R, cpu: int, yps, hooks=None):
        self.R, self.cpu = R, cpu
        self.X, self.L, self.ev = R.X, R.L, R.ev
        self.cfg = R.cfg
        self.topo = R.topo
        self.banks = Banks(R)
        self.tele = self.telemetry_class(R)
        self.pages = PageTable(R)
        self.yp = self.tele.yp = yps.yp
        self.yps = yps
        self.ser = bool(R.cfg.ser)
        self.mce_broadcast = bool(R.cfg.mce_broadcast)
        self.nbanks = R.topo.nbanks
        self.mca_allbanks = (1 << self.nbanks) - 1
        self.mce_logout_lock = SpinLock(R, R.L.mce_logout_lock)
        if yps.trace is not None:
            self.mce_logout_lock.trace = yps.record
        self.mce_trap_bar = McaBarrier(R, R.L.mce_trap_bar)
        self.mce_inside_bar = McaBarrier(R, R.L.mce_inside_bar)
        self.mce_severity_bar = McaBarrier(R, R.L.mce_severity_bar)
        self.check = self.mce_panic_check
        self.hooks = hooks or {}
        self.stall_phase = self.hooks.get("stall_phase")
        self.stall_s = float(self.hooks.get("stall_s", 0.0))
        self.stall_cpus = set(self.hooks.get("stall_cpus") or range(R.topo.ncpus))
        self.kill_phase = self.hooks.get("kill_phase")
        self.kill_cpus = set(self.hooks.get("kill_cpus") or range(R.topo.ncpus))
        # Several stalls at once: [{"phase": P, "cpus": [..], "s": S}, ...]
        self._stalls = [(st["phase"], set(st.get("cpus") or range(R.topo.ncpus)),
                         float(st.get("s", 0.0))) for st in self.hooks.get("stalls") or ()]
        # mce_softirq's severity_cpu word (a version may share the trap handler's)
        self.sirq_severity_off = R.L.sirq_severity_cpu
        # The boot's test hooks, which a trial without a fault of its own restores.
        self._boot_hooks = (self.kill_phase, self.kill_cpus, self.stall_phase, self.stall_s,
                            self.stall_cpus)
        self._ctl_seen = 0   # the trial control generation this CPU last applied
        # Precomputed offsets: the #MC path runs in Python, so every lookup counts.
        self._pc0 = R.L.pc(cpu, 0)
        self._boff = [[self.banks.off(cpu, i, r) for r in range(msr.NREGS)]
                      for i in range(self.nbanks)]
        self._HW = R.HW
        self._xmv = memoryview(R.xen_map)
        self._status_offs = [(i, self._boff[i][msr.REG_STATUS]) for i in range(self.nbanks)]
        self._mcg_status_off = R.HL.mcg_reg(cpu, MCG_K_STATUS)
        self._coords = R.topo.coords(cpu)
        # This logout's ring entries (who, bank, status, addr, misc, record id), and the
        # banks cleared since it began: written out by _flush_logout.
        self._pending_log: list[tuple] = []
        self._cleared: set[int] = set()
        self._ph_off = self.pc(R.L.P_PHASE)
        self._reached_off = self.pc(R.L.P_REACHED)
        self._progress_off = self.pc(R.L.P_PROGRESS)
        # Test hook: busy work (µs) in the handler before the last rendezvous, a
        # deliberately slowed variant for the bench's --compare.
        self.extra_work_ns = int(float(self.hooks.get("handler_extra_work_us", 0)) * 1000)
        # Tracing: every phase change is also a trace entry (through the hook branch
        # the untraced path already takes, so it costs nothing there).
        self._tracing = yps.trace is not None
        self._hooked = bool(self.kill_phase or self.stall_phase or self.extra_work_ns
                            or self._tracing or self._stalls)
        # Test hooks (not tracing): the seed reports its hook-only phases
        self._seams = bool(self.kill_phase or self.stall_phase or self._stalls)
        L = R.L
        # This CPU's words on the #MC path, computed once: the path runs in Python,
        # with more CPUs than cores, so every call and lookup here is paid per CPU.
        self._o = SimpleNamespace(
            t_enter=self.pc(L.P_T_ENTER), t_logout=self.pc(L.P_T_LOGOUT),
            t_barrier_a=self.pc(L.P_T_BARRIER_A), t_exit=self.pc(L.P_T_EXIT),
            t_fatal=self.pc(L.P_T_FATAL), t_mcip=self.pc(L.P_T_MCIP),
            nest=self.pc(L.P_NEST), mc_gen=self.pc(L.P_MC_GEN), trial_gen=L.trial_gen,
            softirq=self.pc(L.P_SOFTIRQ), kick=self.pc(L.P_KICK),
            logout_n=self.pc(L.P_LOGOUT_N), logout=self.pc(L.P_LOGOUT),
            cur_dom=self.pc(L.P_CURRENT_DOM), cur_vcpu=self.pc(L.P_CURRENT_VCPU),
            mcg_cap=R.HL.mcg_reg(cpu, MCG_K_CAP), found_error=L.found_error,
            severity_cpu=L.severity_cpu, ctl_gen=L.ctl_gen)
        # Arrival-order words (emulator bookkeeping), per xl.ARRIVALS entry.
        (self._arr_a, self._arr_b, self._arr_c, self._arr_inside,
         self._arr_severity) = (self.pc(L.P_ARRIVE + k) for k in range(len(xl.ARRIVALS)))
        self._urgent = (None, None)  # (slot, record) kept from logout for the urgent action
        self.vmce = vmce.Vmce(R)
        self.mcaction = mcaction.McAction(self)
        self.HW = R.HW
        self._cmci_init()
        self._next_poll_ns = 1 << 62

    # -- per-CPU bookkeeping (what the trial result reads) --------------------------
    def pc(self, word: int) -> int:
        return self._pc0 + 8 * word

    def set_phase(self, name: str) -> None:
        self._phase(PH[name])

    def _phase(self, p: int, stamp_off: int = 0) -> None:
        """set_phase by number, after a latency stamp at ``stamp_off`` if given: the
        #MC path's bookkeeping in one call."""
        X = self.X
        if stamp_off:
            X.store(stamp_off, _monotonic_ns())
        X.store(self._ph_off, p)
        X.fetch_or(self._reached_off, 1 << p)
        X.fetch_add(self._progress_off, 1)   # this CPU's own word: no shared line
        if self._hooked:
            self._phase_hooks(PHASES[p])

    def _phase_hooks(self, name: str) -> None:
        if self._tracing:
            self.yps.record("phase", PH[name])
        if self.extra_work_ns and name == "barrier_c":
            end = _monotonic_ns() + self.extra_work_ns
            while _monotonic_ns() < end:
                pass
        if self.kill_phase == name and self.cpu in self.kill_cpus:
            import signal
            os.kill(os.getpid(), signal.SIGKILL)   # test hook: die mid-handler
        if self.stall_phase == name and self.cpu in self.stall_cpus:
            # Test hook: hold this CPU here (interruptibly: a #MC still preempts it).
            self.R.notify()
            time.sleep(self.stall_s)
        for phase, cpus, s in self._stalls:
            if phase == name and self.cpu in cpus:
                self.R.notify()
                time.sleep(s)

    def stamp(self, word: int) -> None:
        self.X.store(self.pc(word), time.monotonic_ns())

    def notify_coordinator(self) -> None:
        self.R.notify()

    def _flush_logout(self, pend: list, cleared: set) -> None:
        """Write a logout's entries into the CPU's logout ring (what the trial result
        reads), with whether the bank was cleared. Emulator bookkeeping, not Xen: the
        #MC path calls it once the logout lock is dropped, since only this CPU writes
        its ring and the coordinator reads it after the trial. The lists are passed,
        not read from ``self``: a nested #MC (once MCIP is clear) has its own."""
        X, o = self.X, self._o
        if not pend:
            return
        k0 = X.fetch_add(o.logout_n, len(pend))
        gen = X.load(o.trial_gen)
        ring = o.logout
        for k, (who, bank, status, addr, misc, rec_id) in enumerate(pend, k0):
            if k >= LOGOUT_RING:
                return
            meta = WHO_CODE[who] | bank << 8 | (bank in cleared) << 16
            _pack_log(self._xmv, ring + 8 * LOG_WORDS * k, meta, status, addr, misc, gen, rec_id)

    # -- MSR access (every one is a yield point) ---------------------------------------
    def rd_mcg_status(self) -> int:
        """Xen's ``mca_rdmsr(MSR_IA32_MCG_STATUS)``, by offset."""
        self.yp("rdmsr", MCG_BANK, MCG_K_STATUS)
        return self._HW.load(self._mcg_status_off)

    def rd_bank(self, i: int, reg: int) -> int:
        """Xen's ``mca_rdmsr(MSR_IA32_MCx_<reg>(i))``, by offset."""
        self.yp("rdmsr", i, reg)
        return self._HW.load(self._boff[i][reg])

    def wr_bank(self, i: int, reg: int, value: int) -> None:
        self.yp("wrmsr", i, reg)
        self._HW.store(self._boff[i][reg], value)

    # -- panic -------------------------------------------------------------------------
    def mce_panic_check(self) -> None:
        if self.X.load(self.L.is_mc_panic):
            self.halt()

    def halt(self) -> None:
        """A CPU spinning when another panicked: interrupts on, ``hlt`` forever."""
        X, L = self.X, self.L
        self.set_phase("halted")
        X.store(self.pc(L.P_HALTED), 1)
        self.notify_coordinator()
        while True:  # until the reset controller kills this CPU
            self.ev.wait(L.halt_ev, lambda: False, timeout_s=3600)

    def mc_panic(self, msg: str) -> None:
        X, L = self.X, self.L
        if X.cmpxchg(L.is_mc_panic, 0, self.cpu + 1) != 0:
            self.halt()  # another CPU is already panicking
        self.set_phase("panic")
        # Only the CPU that won is_mc_panic writes the text; the coordinator reads it
        # after reset_req (stored below, sequentially consistent).
        raw = msg.encode()[:xl.PANIC_BYTES - 1]
        self._xmv[L.panic_msg:L.panic_msg + len(raw)] = raw
        X.store(L.reset_cpu, self.cpu)
        X.store(L.reset_req, RESET_PANIC)
        # Spinners notice is_mc_panic in mce_panic_check; wake the sleepers.
        for bar in (self.mce_trap_bar, self.mce_inside_bar, self.mce_severity_bar):
            bar.wake_all()
        self.ev.bump(L.mce_logout_lock + 8)
        self.notify_coordinator()
        X.store(self.pc(L.P_HALTED), 1)
        while True:
            self.ev.wait(L.halt_ev, lambda: False, timeout_s=3600)

    # -- logout (§2.6) -------------------------------------------------------------------
    def current_domain(self) -> tuple[int, int]:
        load = self.X.load
        return load(self._o.cur_dom), load(self._o.cur_vcpu)

    def mcheck_mca_logout(self, who, bankmask: int, clear_bank: list | None,
                          write_later: bool = False):
        """Scan and log the banks (§2.6). ``write_later``: the #MC path, under
        ``mce_logout_lock``; the caller builds and writes the telemetry payload
        (:meth:`mctelem_payload`) and the logout ring (:meth:`_flush_logout`) once the
        lock is dropped, so only Xen's own steps are serialised."""
        gstatus = self.rd_mcg_status()
        self._pending_log = pend = []
        self._cleared = set()
        cls = MC_URGENT if who == sev.MCA_MCE_SCAN else MC_NONURGENT
        recover = True   # Intel registers a recoverable_scan callback
        slot = None
        rid = 0
        errcnt, uc, pcc = 0, False, False
        banks_rec: list[list[int]] = []
        flags = 0
        ser = self.ser
        need_clearbank_scan = self.need_clearbank_scan
        yp, load, boff = self.yp, self._HW.load, self._boff
        scan = self._status_offs if bankmask == self.mca_allbanks else \
            [(i, off) for i, off in self._status_offs if bankmask >> i & 1]
        for i, status_off in scan:
            yp("rdmsr", i, R_STATUS)
            status = load(status_off)
            if not status & VAL:
                continue
            need_clear = need_clearbank_scan(who, status)
            if errcnt == 0:
                slot = self.tele.mctelem_reserve(cls, self.cpu)
                if slot is not None:
                    rid = self.tele.record_id(slot)
            errcnt += 1
            uc |= bool(status & msr.MCi_STATUS_UC)
            pcc |= bool(status & msr.MCi_STATUS_PCC)
            if recover and uc:
                recover = sev.intel_recoverable_scan(status, ser)
            addr = misc = 0
            if status & msr.MCi_STATUS_ADDRV:
                yp("rdmsr", i, R_ADDR)
                addr = load(boff[i][msr.REG_ADDR])
            if status & msr.MCi_STATUS_MISCV:
                yp("rdmsr", i, R_MISC)
                misc = load(boff[i][msr.REG_MISC])
            domid = DOMID_INVALID
            if who in (sev.MCA_POLLER, sev.MCA_CMCI_HANDLER) and msr.addr_is_physical(status, misc):
                domid = self.pages.owner(addr >> 12)
            if slot is not None:
                if mcinfo_fits(len(banks_rec) + 1):
                    if who == sev.MCA_CMCI_HANDLER:   # mc_ctrl2 and mc_tsc, CMCI only
                        banks_rec.append([i, status, addr, misc, domid,
                                          load(boff[i][msr.REG_CTL2]), _monotonic_ns()])
                    else:
                        banks_rec.append([i, status, addr, misc, domid])
                else:
                    flags |= MCINFO_FLAGS_UNCOMPLETE
            pend.append((who, i, status, addr, misc, rid))
            if need_clear:
                if who == sev.MCA_MCE_SCAN:
                    clear_bank.append(i)  # cleared by the caller, under the lock
                else:
                    self.mcabank_clear(i)
        # tuple.__new__: a NamedTuple's own constructor costs more than the rest here
        summary = _new_tuple(McaSummary, (errcnt, bool(gstatus & msr.MCG_STATUS_RIPV),
                                          bool(gstatus & msr.MCG_STATUS_EIPV),
                                          bool(gstatus & msr.MCG_STATUS_LMCE), uc, pcc,
                                          recover))
        # The urgent action reads the entry this CPU writes, which nobody else touches
        # before the softirq: it gets the decoded copy instead of re-reading it.
        self._urgent = (slot, (who, flags, gstatus, banks_rec, summary))
        if not write_later:
            if slot is not None:
                self.tele.write(slot, self.mctelem_payload())
            self._flush_logout(pend, self._cleared)
        return slot, summary

    def need_clearbank_scan(self, who, status: int) -> bool:
        """Does a logout from ``who`` clear this bank (the clear rule of this version)?"""
        return sev.intel_need_clearbank_scan(who, status, self.ser)

    def mctelem_payload(self) -> list:
        """The telemetry entry of the last logout (Xen's mc_info: the global record,
        then one per bank), in the positional form ``Mctelem.write`` takes."""
        _, (who, flags, gstatus, banks_rec, bs) = self._urgent
        flag = MC_FLAG_MCE if who == sev.MCA_MCE_SCAN else \
            MC_FLAG_CMCI if who == sev.MCA_CMCI_HANDLER else MC_FLAG_POLLED
        if bs.pcc:
            flag |= MC_FLAG_UNCORRECTABLE
        elif bs.uc:
            flag |= MC_FLAG_RECOVERABLE
        else:
            flag |= MC_FLAG_CORRECTABLE
        s, c, t = self._coords
        load, o = self.X.load, self._o
        return [WHO_CODE[who], flags, self.cpu,
                [flag, gstatus, load(o.cur_dom), load(o.cur_vcpu), s, c, t, self.cpu,
                 self._HW.load(o.mcg_cap)],
                banks_rec, []]

    def mcabank_clear(self, i: int) -> None:
        status = self.rd_bank(i, msr.REG_STATUS)
        if status & msr.MCi_STATUS_ADDRV:
            self.wr_bank(i, msr.REG_ADDR, 0)
        if status & msr.MCi_STATUS_MISCV:
            self.wr_bank(i, msr.REG_MISC, 0)
        self.wr_bank(i, msr.REG_STATUS, 0)
        self._cleared.add(i)

    def mcheck_mca_clearbanks(self, clear_bank: list) -> None:
        # mcabank_clear for each, written out: this runs under mce_logout_lock.
        yp, load, store, boff, cleared = self.yp, self._HW.load, self._HW.store, self._boff, \
            self._cleared
        for i in clear_bank:
            off = boff[i]
            yp("rdmsr", i, R_STATUS)
            status = load(off[msr.REG_STATUS])
            if status & msr.MCi_STATUS_ADDRV:
                yp("wrmsr", i, R_ADDR)
                store(off[msr.REG_ADDR], 0)
            if status & msr.MCi_STATUS_MISCV:
                yp("wrmsr", i, R_MISC)
                store(off[msr.REG_MISC], 0)
            yp("wrmsr", i, R_STATUS)
            store(off[msr.REG_STATUS], 0)
            cleared.add(i)

    # -- fatal set helpers -------------------------------------------------------------
    def fatal_set(self, cpu: int) -> None:
        self.X.fetch_or(self.L.mce_fatal_cpus + 8 * (cpu // 64), 1 << (cpu % 64))

    def fatal_cpus(self) -> list[int]:
        out = []
        for w in range(self.L.mcefatal_words):
            v = self.X.load(self.L.mce_fatal_cpus + 8 * w)
            while v:   # lowest set bit first
                b = (v & -v).bit_length() - 1
                out.append(w * 64 + b)
                v &= v - 1
        return out

    def severity_cpu_get(self, off: int) -> int:
        return signed(self.X.load(off))

    # -- the handler (§2.3) ---------------------------------------------------------------
    def do_machine_check(self, *_sig) -> None:
        """Vector 18: mce_enter, the vendor handler, mce_exit."""
        X, o = self.X, self._o
        X.fetch_add(o.nest, 1)
        X.store(o.mc_gen, X.load(o.trial_gen))
        g = X.load(o.ctl_gen)   # the trial's perturbation and fault: moved rarely
        if g != self._ctl_seen:
            self._trial_ctl(g)
        self._phase(PH_ENTERED, o.t_enter)
        try:
            self.mcheck_cmn_handler()
        finally:
            X.fetch_sub(o.nest, 1)
            if self._irq_pending and not self._irq_off:
                self.do_interrupt()   # interrupts were off in the handler

    def _trial_ctl(self, g: int) -> None:
        """Emulator control, not Xen: apply the trial's perturbation and fault that the
        coordinator wrote in the control block (:mod:`emu.machine.chaos`). Reseeds this
        CPU's yield points from ``SeedSequence([S, i], spawn_key=cpu_key(cpu))``,
        arms its starvation point if it is the victim, and its per-trial fault hooks
        (a trial without a fault gets the boot's hooks back)."""
        self._ctl_seen = g
        load, c, cpu = self.X.load, self.L.ctl, self.cpu
        flags = load(c + 8 * xl.CTL_FLAGS)
        yps = self.yps
        if flags & xl.CTL_F_PERTURB:
            chaos = struct.unpack("<d", load(c + 8 * xl.CTL_CHAOS).to_bytes(8, "little"))[0]
            seed, trial = load(c + 8 * xl.CTL_SEED), load(c + 8 * xl.CTL_TRIAL)
            starve = load(c + 8 * xl.CTL_STARVE_K) - 1 \
                if load(c + 8 * xl.CTL_STARVE_CPU) == cpu + 1 else -1
            yps.configure(chaos, process_seed(seed, trial, cpu_key(cpu)) if chaos > 0
                          else None, starve, load(c + 8 * xl.CTL_STARVE_NS) / 1e9)
        elif yps.active or yps.count or yps.points:
            yps.configure(0.0, None)
        self.yp = self.tele.yp = yps.yp
        (self.kill_phase, self.kill_cpus, self.stall_phase, self.stall_s,
         self.stall_cpus) = self._boot_hooks
        if flags & xl.CTL_F_FAULT and load(c + 8 * xl.CTL_FAULT_CPU) == cpu:
            kind = load(c + 8 * xl.CTL_FAULT)
            phase = PHASES[load(c + 8 * xl.CTL_FAULT_PHASE)]
            if kind == xl.FAULT_KILL_CPU:
                self.kill_phase, self.kill_cpus = phase, {cpu}
            elif kind == xl.FAULT_STALL_CPU:
                self.stall_phase, self.stall_cpus = phase, {cpu}
                self.stall_s = load(c + 8 * xl.CTL_FAULT_NS) / 1e9
        self._hooked = bool(self.kill_phase or self.stall_phase or self.extra_work_ns
                            or self._tracing or self._stalls)
        self._seams = bool(self.kill_phase or self.stall_phase or self._stalls)

    def mcheck_cmn_handler(self) -> None:
        X, cpu, yp, check, o, phase = self.X, self.cpu, self.yp, self.check, self._o, self._phase
        bar = self.mce_trap_bar
        self.mce_logout_lock.mce_spin_lock(cpu, yp, check)
        phase(PH_LOGOUT)
        clear_bank: list[int] = []
        slot, bs = self.mcheck_mca_logout(sev.MCA_MCE_SCAN, self.mca_allbanks, clear_bank,
                                          write_later=True)
        logged, cleared = self._pending_log, self._cleared
        lmce = bs.lmce
        bcast = self.mce_broadcast and not lmce
        if bs.errcnt:
            if bs.pcc or (bs.uc and not bs.recoverable):
                self.fatal_set(cpu)
            yp("atomic", o.found_error, 1)
            X.store(o.found_error, 1)
            yp("atomic", o.severity_cpu, cpu)
            self.set_severity_cpu(bs)
            self.mcheck_mca_clearbanks(clear_bank)
        elif slot is not None:
            self.tele.mctelem_dismiss(slot)
        self.mce_logout_lock.spin_unlock(yp)
        self._flush_logout(logged, cleared)
        if bs.errcnt and slot is not None:
            # Xen fills the entry and defers/commits it under the lock. The entry is
            # this CPU's alone until then (its pending list is read by the softirq
            # worker after two more rendezvous), so doing it after the unlock changes
            # nothing another CPU can see, and keeps the serialised section short.
            self.tele.write(slot, self.mctelem_payload())
            yp("telem", slot)
            if bs.uc or bs.pcc:
                self.tele.mctelem_defer(slot, cpu, lmce)
            else:
                self.tele.mctelem_commit(slot)

        phase(PH_BARRIER_A, o.t_logout)
        bar.mce_barrier_enter(bcast, yp, check, self._arr_a)
        X.store(o.t_barrier_a, _monotonic_ns())
        if slot is not None and self.mce_urgent_action(slot) < 0:
            self.fatal_set(cpu)
        bar.mce_barrier_exit(bcast, yp, check)

        self.barrier_b_step(lmce, bcast)
        self.barrier_c_step(bs, bcast)
        phase(PH_EXIT, o.t_exit)
        self.raise_softirq()

    def barrier_b_step(self, lmce: bool, bcast: bool) -> None:
        """The second rendezvous: the fatal check on ``severity_cpu`` (or the LMCE CPU)."""
        yp, check, bar = self.yp, self.check, self.mce_trap_bar
        self._phase(PH_BARRIER_B)
        bar.mce_barrier_enter(bcast, yp, check, self._arr_b)
        if lmce or signed(self.X.load(self._o.severity_cpu)) == self.cpu:
            self._phase(PH_FATAL_CHECK)
            self.fatal_check()
        bar.mce_barrier_exit(bcast, yp, check)

    def barrier_c_step(self, bs: McaSummary, bcast: bool) -> None:
        """The third rendezvous: every CPU clears its own MCIP inside it."""
        X, yp, check, bar = self.X, self.yp, self.check, self.mce_trap_bar
        # fatal_check_done: this CPU has left the rendezvous that closes the fatal check
        self._phase(PH_BARRIER_C, self._o.t_fatal)
        bar.mce_barrier_enter(bcast, yp, check, self._arr_c)
        self.clear_mcip()
        X.store(self._o.t_mcip, _monotonic_ns())
        bar.mce_barrier_exit(bcast, yp, check)

    # Steps the handler versions and broken variants override ------------------------------
    def set_severity_cpu(self, bs: McaSummary) -> None:
        self.X.store(self.L.severity_cpu, self.cpu)  # plain atomic_set: last writer wins

    def fatal_check(self) -> None:
        """Barrier B's check on ``severity_cpu`` (or the LMCE CPU): panic, or reset
        the per-event state for the next round."""
        X, L = self.X, self.L
        self.yp("atomic", L.found_error)
        if not X.load(L.found_error):
            self.mc_panic("MCE: No CPU found valid MCE, need reset")
        fatal = self.fatal_cpus()
        if fatal:
            self.mc_panic("MCE: Fatal error happened on CPUs " + ",".join(map(str, fatal)))
        self.reset_found_error()
        self.reset_severity_cpu()

    def reset_found_error(self) -> None:
        self.X.store(self.L.found_error, 0)

    def reset_severity_cpu(self) -> None:
        self.X.store(self.L.severity_cpu, -1 & msr.U64)   # since 6a2c6a6842

    def clear_mcip(self) -> None:
        gstatus = self.rd_mcg_status()
        if gstatus & msr.MCG_STATUS_MCIP:
            self.yp("wrmsr", MCG_BANK, MCG_K_STATUS)
            self._HW.store(self._mcg_status_off, 0)

    def raise_softirq(self) -> None:
        self.X.store(self._o.softirq, 1)
        # The idle loop sleeps on the kick channel; if the #MC interrupted it,
        # the interrupted wait re-checks on return anyway.
        self.ev.bump(self._o.kick)

    def guest_mode(self) -> bool:
        dom, _ = self.current_domain()
        return dom != DOMID_IDLE

    def mce_urgent_action(self, slot: int) -> int:
        kept, rec = self._urgent
        if kept == slot:
            # The entry this CPU just wrote, which nobody else touches before the
            # softirq: its decoded copy from the logout, not a re-read.
            _, _, gstatus, banks_rec, _ = rec
            rec = {"b": banks_rec}
        else:
            rec = self.tele.read(slot)
            gstatus = rec["g"]["mc_gstatus"]
        if not gstatus & msr.MCG_STATUS_RIPV and (
                not gstatus & msr.MCG_STATUS_EIPV or not self.guest_mode()):
            return -1
        return -1 if self.mce_action(rec, urgent=True) == sev.MCER_RESET else 0

    def mce_action(self, rec: dict, urgent: bool, worker_log=None) -> int:
        """Walk the bank records with the urgent or deferred handler table (§3.3)."""
        worst = sev.MCER_NOERROR
        for b in rec["b"]:
            status = b[1]
            if urgent:
                r = sev.urgent_default_action(status, self.ser)
                info = None
            else:
                preset, kind = sev.deferred_preset(status, self.ser)
                r, info = preset, None
                if kind == "memerr":
                    r, info = self.mcaction.mc_memerr_dhandler(rec, b, preset)
                if worker_log is not None:
                    worker_log.append((b, r, info))
            worst = sev.worst(worst, r)
            if worst == sev.MCER_RESET:
                break
        return worst

    # -- deferred work (§2.5) --------------------------------------------------------------
    def mce_softirq(self) -> None:
        X, L, cpu, yp, check = self.X, self.L, self.cpu, self.yp, self.check
        gen = X.load(self.pc(L.P_MC_GEN))
        self.stamp(L.P_T_SOFTIRQ_START)
        self.set_phase("softirq")
        lmce = self.tele.mctelem_has_deferred_lmce(cpu)
        bcast = self.mce_broadcast and not lmce
        self.mce_inside_bar.mce_barrier_enter(bcast, yp, check, self._arr_inside)
        sev_off = self.sirq_severity_off
        if not lmce:
            self.softirq_elect(bcast)
            if self._seams:   # test seam: the election is written, not yet read
                self.set_phase("softirq_elected")
        if lmce or self.severity_cpu_get(sev_off) == cpu:
            self.set_phase("softirq_worker")
            X.store(self.pc(L.P_SIRQ_ROLE), 1)
            if lmce:
                self.tele.mctelem_process_deferred(cpu, self.mce_delayed_action, True)
            else:
                for w in self.online_cpus():
                    yp("softirq", w)
                    self.tele.mctelem_process_deferred(w, self.mce_delayed_action, False)
            self.send_global_virq()
        self.mce_inside_bar.mce_barrier_exit(bcast, yp, check)
        self.stamp(L.P_T_SOFTIRQ)
        self.set_phase("softirq_done")
        self.set_phase("idle")
        X.store(self.pc(L.P_DONE_GEN), gen)   # last: the coordinator collects after this
        self.notify_coordinator()

    def softirq_elect(self, bcast: bool) -> None:
        """The worker election: every CPU writes ``severity_cpu``; after a rendezvous
        the CPUs without deferred telemetry write it again; the last writer works."""
        X, cpu, yp, check, off = self.X, self.cpu, self.yp, self.check, self.sirq_severity_off
        yp("atomic", off, cpu)
        X.store(off, cpu)
        self.mce_severity_bar.mce_barrier_enter(bcast, yp, check, self._arr_severity)
        if not self.tele.mctelem_has_deferred(cpu):
            yp("atomic", off, cpu)
            X.store(off, cpu)
        self.mce_severity_bar.mce_barrier_exit(bcast, yp, check)

    def send_global_virq(self) -> None:
        if self._tracing:
            self.yps.record("virq")
        vmce.send_global_virq(self.R)

    def mce_delayed_action(self, slot: int) -> bool:
        rec = self.tele.read(slot)
        log: list = []
        result = self.mce_action(rec, urgent=False, worker_log=log)
        if any(info and info.get("recovery") for _, _, info in log):
            rec["r"] = [info["recovery"] for _, _, info in log if info and info.get("recovery")]
        self.tele.write(slot, rec)
        self._log_actions(slot, rec, log, result)
        if result == sev.MCER_RESET:
            # Xen: is_mc_panic = true; panic("MCE: Software recovery failed for the UCR")
            self.mc_panic("MCE: Software recovery failed for the UCR")
        return result != sev.MCER_NOERROR

    def _log_actions(self, slot, rec, log, result) -> None:
        X, L = self.X, self.L
        rid = self.tele.record_id(slot)
        for b, r, info in log:
            k = X.fetch_add(L.action_n, 1)
            if k >= ACTION_RING:
                return
            data = msgpack.packb([self.cpu, rec["cpu"], b[0], b[1], r, rid, info or {}])
            base = L.action_log + 256 * k
            # Length 0, the data, then its length: a reader that comes early (a trial
            # ended by a reset while this worker still logs) sees 0, not a torn entry.
            self.tele.mv[base:base + 2] = b"\0\0"
            self.tele.mv[base + 2:base + 2 + len(data)] = data
            self.tele.mv[base:base + 2] = len(data).to_bytes(2, "little")

    # -- boot (§4.2) ------------------------------------------------------------------------
    def boot_logout(self) -> None:
        """intel_mce_post_reset: the MCA_RESET logout, committed without VIRQ."""
        slot, bs = self.mcheck_mca_logout(sev.MCA_RESET, self.mca_allbanks, None)
        if slot is not None:
            if bs.errcnt:
                self.tele.mctelem_commit(slot)   # non-urgent; Dom0 fetches it later
            else:
                self.tele.mctelem_dismiss(slot)

    def intel_init_mce(self) -> None:
        """intel_mce_post_reset (:meth:`boot_logout`), then the banks nobody
        initialised yet (CTL 0), MCG_CTL."""
        cpu = self.cpu
        self.boot_logout()
        for i in range(self.nbanks):
            if self.banks.read(cpu, i, msr.REG_CTL) == 0:
                self.banks.write(cpu, i, msr.REG_CTL, msr.U64)
                self.banks.write(cpu, i, msr.REG_STATUS, 0)
        if self.banks.mcg(cpu, 2) & msr.MCG_CTL_P:
            self.banks.set_mcg(cpu, msr.U64, 1)

    def boot(self) -> None:
        """intel_init_mce: post-reset logout, bank init; APs come up one at a time."""
        X, L, cpu = self.X, self.L, self.cpu
        self.set_phase("boot")
        self.ev.wait(L.boot_ev, lambda: X.load(L.boot_token) == cpu, slice_s=0.2)
        self._booting = True
        self.intel_init_mce()
        self.intel_init_cmci()
        self.set_poll_bankmask()
        self._booting = False
        # Test hook "current": {cpu: [domid, vcpu]}, the context this CPU runs (a
        # guest's vCPU) when a #MC comes; otherwise the idle vCPU (Xen context).
        cur = (self.hooks.get("current") or {}).get(cpu) or \
            (self.hooks.get("current") or {}).get(str(cpu))
        X.store(self.pc(L.P_CURRENT_DOM), cur[0] if cur else DOMID_IDLE)
        if cur:
            X.store(self.pc(L.P_CURRENT_VCPU), cur[1])
        X.fetch_or(L.online_map + 8 * (cpu // 64), 1 << (cpu % 64))
        X.fetch_add(L.online, 1)
        X.store(L.boot_token, cpu + 1)
        self.ev.bump(L.boot_ev)
        self.set_phase("idle")
        self.notify_coordinator()
