"""Historical regressions: today's ``seed`` with one later Xen fix taken out.

Each class overrides only the step the fix changed (xen-mca.md §10.1; the research
notes cite the pre-fix code, ``<commit>^:xen/arch/x86/cpu/mcheck/...``). They are
history, faithfully re-opened, not new bugs: a campaign over the family named in
:data:`emu.xen.versions.HANDLERS` should find each.

The two telemetry regressions (``e9af61b969``, ``60ea3a3ac3``) change
:class:`~emu.xen.mctelem.Mctelem`; their handler classes only pick the telemetry
class (which the coordinator uses too, for Dom0's fetch and ack). Their races need a
second producer or the consumer inside one push or pop, which the emulated machine
does not give today (every #MC reservation is under ``mce_logout_lock``; CMCI and
the poller reserve without it): they are shown by unit tests with a ``window`` hook.
Xen's ``MCTE_TRANSITION_STATE`` BUG_ONs are modelled in these two classes only, as
:class:`MctelemBug`.
"""
from __future__ import annotations

import time

from emu.hw import msr
from emu.hw.atomic import signed
from emu.xen import severity as sev
from emu.xen.mce import PH_BARRIER_B, PH_FATAL_CHECK, McaSummary, XenCpu, _monotonic_ns
from emu.xen.mctelem import (
    COMMITTED,
    FREE,
    H_NEXT,
    H_STATE,
    HWORDS,
    MC_NONURGENT,
    MC_URGENT,
    MC_URGENT_NENT,
    NENT,
    STATE_NAMES,
    UNCOMMITTED,
    Mctelem,
    MctelemBug,
    _no_yp,
    _pack_hdr,
)


def _nothing() -> None:
    return None


# -- 99f7ce3614 ------------------------------------------------------------------------
class NoBarrierMcipSync(XenCpu):
    """Before ``99f7ce3614`` (2009-09-22), "Synchronization issues for clearing error
    finding flag and clearing global MCIP flag": ``found_error`` is reset only by the
    CPU ``mce_barrier_last`` elects inside barrier B (``val == 1``: the last one left
    behind, often nobody), and only CPUs whose logout found an error clear their MCIP,
    outside any rendezvous (no barrier C). ``6a2c6a6842``'s ``severity_cpu = -1``
    stays in."""

    version = "no-barrier-mcip-sync"

    def reset_found_error(self) -> None:
        pass   # not in the fatal check: mce_barrier_last's CPU does it (barrier_b_step)

    def barrier_b_step(self, lmce: bool, bcast: bool) -> None:
        X, yp, check, bar = self.X, self.yp, self.check, self.mce_trap_bar
        self._phase(PH_BARRIER_B)
        bar.mce_barrier_enter(bcast, yp, check, self._arr_b)
        if lmce or signed(X.load(self._o.severity_cpu)) == self.cpu:
            self._phase(PH_FATAL_CHECK)
            self.fatal_check()
        # mce_barrier_last: "ingen == gen" reads one word twice, so only val counts.
        yp("barrier", bar._tr[1])
        if bcast and X.load(bar._val) == 1:
            X.store(self.L.found_error, 0)   # "Choose one CPU to clear error finding flag"
        bar.mce_barrier_exit(bcast, yp, check)

    def barrier_c_step(self, bs: McaSummary, bcast: bool) -> None:
        # "There is a small chance that more than 1 CPU will end up doing this"
        self.X.store(self._o.t_fatal, _monotonic_ns())
        if bs.errcnt:
            self.clear_mcip()
        self.X.store(self._o.t_mcip, _monotonic_ns())


# -- 011899a2e0 ------------------------------------------------------------------------
class SharedSeverityCpu(XenCpu):
    """Before ``011899a2e0`` (2017-04-07): one ``severity_cpu`` for the trap handler
    and ``mce_softirq`` ("If MC# happens during mce_softirq(), the values set in
    mcheck_cmn_handler() and mce_softirq() may interfere with each other"). A #MC on
    one CPU while the others have elected a softirq worker resets the word to -1 in
    its fatal check: nobody works, and the deferred records stay on their lists."""

    version = "shared-severity-cpu"

    def __init__(self, R, cpu, yps, hooks=None):
        super().__init__(R, cpu, yps, hooks)
        self.sirq_severity_off = R.L.severity_cpu


# -- 6a2c6a6842 ------------------------------------------------------------------------
class StaleSeverityCpu(XenCpu):
    """Before ``6a2c6a6842`` (2017-04-07): ``severity_cpu`` not re-initialised after
    the fatal check ("does not always set 'severity_cpu' to override its value taken
    from previous rounds"). In a #MC where no CPU finds an error, the previous
    round's CPU runs the check and panics "No CPU found valid MCE": the panic depends
    on history."""

    version = "stale-severity-cpu"

    def reset_severity_cpu(self) -> None:
        pass   # severity_cpu keeps this round's CPU


# -- 89a4be6901, 1cf8a44e39 ------------------------------------------------------------
class Ripv0Continue(XenCpu):
    """Before ``89a4be6901`` (2011-05-12): ``if (!(gstatus & RIPV) && !guest_mode(regs))
    return 0;`` — an #MC with RIPV=0 in Xen context is "continue", without even
    ``mce_action``: the CPU returns into a context it cannot restart."""

    version = "ripv0-continue"

    def mce_urgent_action(self, slot: int) -> int:
        gstatus, rec = self._urgent_record(slot)
        if not gstatus & msr.MCG_STATUS_RIPV and not self.guest_mode():
            return 0
        return -1 if self.mce_action(rec, urgent=True) == sev.MCER_RESET else 0

    def _urgent_record(self, slot: int):
        kept, rec = self._urgent
        if kept == slot:
            _, _, gstatus, banks_rec, _ = rec
            return gstatus, {"b": banks_rec}
        rec = self.tele.read(slot)
        return rec["g"]["mc_gstatus"], rec


class NoEipvCheck(Ripv0Continue):
    """Before ``1cf8a44e39`` (2011-12-15): RIPV=0 is fatal only in Xen context; with
    RIPV=EIPV=0 in a guest's context (nothing says the interrupted instruction was the
    guest's), ``mce_action`` decides, and an SRAR/SRAO/UCNA continues."""

    version = "no-eipv-check"

    def mce_urgent_action(self, slot: int) -> int:
        gstatus, rec = self._urgent_record(slot)
        if not gstatus & msr.MCG_STATUS_RIPV and not self.guest_mode():
            return -1
        return -1 if self.mce_action(rec, urgent=True) == sev.MCER_RESET else 0


# -- d6c52e8a40 ------------------------------------------------------------------------
class SrarOverInverted(XenCpu):
    """Before ``d6c52e8a40`` (2011-05-12): the SRAR clause of the #MC clear rule tested
    ``OVER`` instead of ``!OVER``, and no clause excluded UC+PCC (the rule dates from
    ``e966818264``). A fatal SRAR (OVER=1) and a UC+PCC bank matching the SRAO or the
    spurious clause are cleared before the reset (their log is lost); a recoverable
    SRAR is left in a shared bank, logged by every sharer."""

    version = "srar-over-inverted"

    def need_clearbank_scan(self, who, status: int) -> bool:
        if who != sev.MCA_MCE_SCAN:
            return super().need_clearbank_scan(who, status)
        if not self.ser:
            return False
        uc, en = status & msr.MCi_STATUS_UC, status & msr.MCi_STATUS_EN
        over, s, ar = status & msr.MCi_STATUS_OVER, status & msr.MCi_STATUS_S, \
            status & msr.MCi_STATUS_AR
        if not over and uc and not en:          # spurious
            return True
        if uc and s and ar and over:            # "SRAR OVER=0 clear bank" (inverted)
            return True
        return bool(uc and s and not ar)        # SRAO


# -- e9af61b969 ------------------------------------------------------------------------
class MctelemXchgHeadReread(Mctelem):
    """``mctelem_xchg_head`` before ``e9af61b969`` (2014-01-17): ``*old = *headp;
    wmb(); if (cmpxchgptr(headp, *old, new) == *old) break;`` — after a successful
    cmpxchg, ``*old`` (the new entry's link) is read again; if a consumer moved the
    list in between and rewrote the link, the push "failed" and is done again: the
    entry is linked twice. ``window`` (a test hook) runs between the cmpxchg and the
    re-read. Consuming an entry that is not COMMITTED is Xen's BUG_ON."""

    window = staticmethod(_nothing)

    def _xchg_head(self, head_off: int, i: int, yp=_no_yp) -> None:
        X = self.X
        committed = head_off in (self.T.committed, self.T.committed + 8)
        while True:
            self._hset(i, H_NEXT, X.load(head_off))                 # *old = *headp
            yp("telem", head_off, i)
            ret = X.cmpxchg(head_off, self.hget(i, H_NEXT), i + 1)  # cmpxchgptr(.., *old, new)
            if committed:
                self.window()   # (the test hook: on committed-list pushes only)
            # The re-read of *old is a read of the entry's link, which a consumer that
            # moved the list meanwhile has rewritten: a yield point (committed pushes).
            yp("telem", i, ret)
            if ret == self.hget(i, H_NEXT):                         # "== *old": re-read
                return

    def consume_oldest_begin(self, cls: int):
        # MCTE_TRANSITION_STATE(tep, COMMITTED, PROCESSING), checked before the move
        ref, seen = self.X.load(self.T.committed + 8 * cls), set()
        while ref and ref not in seen:
            seen.add(ref)
            st = self.hget(ref - 1, H_STATE)
            if st != COMMITTED:
                raise MctelemBug(f"MCTE_TRANSITION_STATE: entry {ref - 1} is "
                                 f"{STATE_NAMES[st]}, expected committed")
            ref = self.hget(ref - 1, H_NEXT)
        if ref:
            raise MctelemBug(f"committed list has a cycle through entry {ref - 1}")
        return super().consume_oldest_begin(cls)


class XchgHeadReread(XenCpu):
    """Before ``e9af61b969`` (2014-01-17): the telemetry lists pushed with the
    re-reading ``mctelem_xchg_head`` (:class:`MctelemXchgHeadReread`)."""

    version = "xchg-head-reread"
    telemetry_class = MctelemXchgHeadReread

    def __init__(self, R, cpu, yps, hooks=None):
        super().__init__(R, cpu, yps, hooks)
        # Test hook: hold a committed-list push this long between its cmpxchg and the
        # re-read, so that Dom0's fetch (in the coordinator) can land inside it.
        s = float(self.hooks.get("commit_window_s", 0.0))
        if s > 0:
            self.tele.window = lambda: time.sleep(s)


# -- 60ea3a3ac3 ------------------------------------------------------------------------
class MctelemFreelistAba(Mctelem):
    """The telemetry free lists before ``60ea3a3ac3`` (2014-02-24): two lock-free
    LIFO lists (urgent 0-9, non-urgent 10-29, built in index order so the head is the
    highest index), popped with ``newhead = oldhead->mcte_next;
    cmpxchgptr(freelp, oldhead, newhead)``. If, between reading ``newhead`` and the
    cmpxchg, others pop ``oldhead`` and ``newhead`` and push ``oldhead`` back, the
    cmpxchg succeeds and installs an entry in use as the head (ABA): the tail leaks
    and the next reservation takes that entry a second time (Xen's BUG_ON in
    ``MCTE_TRANSITION_STATE(FREE, UNCOMMITTED)``). ``window`` is the test hook in that
    gap. ``mctelem_free`` pushes with the fixed ``xchg_head`` (``e9af61b969`` came
    first). The free map of the seed is not used."""

    window = staticmethod(_nothing)

    def _free_head(self, cls: int) -> int:
        return self.T.free_head + 8 * cls

    @staticmethod
    def _home(i: int) -> int:
        return MC_URGENT if i < MC_URGENT_NENT else MC_NONURGENT

    def init(self, boot: int) -> None:
        super().init(boot)
        X = self.X
        X.store(self.T.freemap, 0)
        for cls in (MC_URGENT, MC_NONURGENT):
            X.store(self._free_head(cls), 0)
        for i in range(NENT):
            self._hset(i, H_STATE, FREE)
            self._push_free(i)

    def _push_free(self, i: int) -> None:
        X, head = self.X, self._free_head(self._home(i))
        while True:
            old = X.load(head)
            self._hset(i, H_NEXT, old)
            if X.cmpxchg(head, old, i + 1) == old:
                return

    def mctelem_reserve(self, which: int, cpu: int):
        X, T = self.X, self.T
        target = which
        while True:
            freelp = self._free_head(target)
            oldhead = X.load(freelp)
            if not oldhead:
                if which == MC_URGENT and target == MC_URGENT:
                    target = MC_NONURGENT   # raid the non-urgent freelist
                    continue
                X.fetch_add(T.drop_count, 1)
                return None
            newhead = self.hget(oldhead - 1, H_NEXT)
            self.window()
            if X.cmpxchg(freelp, oldhead, newhead) == oldhead:
                break
        i = oldhead - 1
        st = self.hget(i, H_STATE)
        if st != FREE:   # MCTE_TRANSITION_STATE(tep, FREE, UNCOMMITTED)
            raise MctelemBug(f"MCTE_TRANSITION_STATE: entry {i} is {STATE_NAMES[st]}, "
                             "expected free (reserved twice)")
        seq = X.fetch_add(T.seq, 1) + 1
        h = T.hdr + 8 * HWORDS * i
        _pack_hdr(self.mv, h + 8, which, 1, 0, 0, (X.load(T.boot) << 32) | seq, 0, cpu)
        X.store(h, UNCOMMITTED)
        return i

    def mctelem_dismiss(self, i: int) -> None:
        self._hset(i, H_STATE, FREE)
        self._push_free(i)

    def free_list(self, cls: int) -> list[int]:
        out, ref = [], self.X.load(self._free_head(cls))
        while ref and len(out) <= NENT:
            out.append(ref - 1)
            ref = self.hget(ref - 1, H_NEXT)
        return out

    def free_count(self) -> int:
        return len(set(self.free_list(MC_URGENT)) | set(self.free_list(MC_NONURGENT)))


class FreelistAba(XenCpu):
    """Before ``60ea3a3ac3`` (2014-02-24): telemetry on lock-free free lists with the
    ABA race (:class:`MctelemFreelistAba`)."""

    version = "freelist-aba"
    telemetry_class = MctelemFreelistAba
