"""Machine-check telemetry (xen/arch/x86/cpu/mcheck/mctelem.c), in Xen memory.

Modelled (xen-mca.md §5): a pool of 30 entries, 0–9 urgent and 10–29 non-urgent,
free slots in an atomic bitmap (the 2014 fix); an urgent reservation may raid the
non-urgent slots; a failed reservation counts a drop. Entry states FREE →
UNCOMMITTED → COMMITTED → PROCESSING → FREE, or UNCOMMITTED → FREE (dismiss).
Per-CPU ``pending``/``lmce_pending`` lists (newest first, pushed with the fixed
``mctelem_xchg_head``: link written before the cmpxchg), per-class committed LIFO,
per-class processing FIFO under ``processing_lock``; fetch returns the oldest entry
of a class until it is acked, and an ack works only on the head.

The payload is the ``mc_info`` content, msgpack'ed as a positional array (the
#MC path builds no map; :meth:`Mctelem.read` gives the named form); its *capacity* follows
Xen's accounting (760 data bytes: global 32 B, bank 48 B, recovery 24 B, with the
UNCOMPLETE flag when a record does not fit), not msgpack's byte count.
"""
from __future__ import annotations

import os
import struct

import msgpack

MC_URGENT, MC_NONURGENT = 0, 1
CLASS_NAMES = ("urgent", "nonurgent")
MC_URGENT_NENT, MC_NONURGENT_NENT = 10, 20
NENT = MC_URGENT_NENT + MC_NONURGENT_NENT

FREE, UNCOMMITTED, COMMITTED, PROCESSING = range(4)
STATE_NAMES = ("free", "uncommitted", "committed", "processing")

# header words of an entry
H_STATE, H_CLASS, H_REF, H_NEXT, H_PREV, H_ID, H_LEN, H_CPU = range(8)
HWORDS = 8
PAYLOAD = 2048

# mc_info accounting (§5.5)
MCINFO_DATA = 760
SZ_GLOBAL, SZ_BANK, SZ_EXTENDED, SZ_RECOVERY = 32, 48, 520, 24
MCINFO_FLAGS_UNCOMPLETE = 1

# The global record's fields, in the payload's positional order.
GLOBAL_FIELDS = ("mc_flags", "mc_gstatus", "mc_domid", "mc_vcpuid", "mc_socketid",
                 "mc_coreid", "mc_core_threadid", "mc_apicid", "mcgcap")

# mc_flags of mcinfo_global
MC_FLAG_CORRECTABLE, MC_FLAG_UNCORRECTABLE, MC_FLAG_RECOVERABLE = 1, 2, 4
MC_FLAG_POLLED, MC_FLAG_RESET, MC_FLAG_CMCI, MC_FLAG_MCE = 8, 0x10, 0x20, 0x40


class MctelemBug(Exception):
    """Xen's ``BUG_ON`` in ``MCTE_TRANSITION_STATE``: a hypervisor crash. Raised only by
    the telemetry of handler versions that model the check (:mod:`emu.xen.history`)."""


class Layout:
    def __init__(self, alloc, ncpus: int):
        w = alloc.words
        self.freemap = w()
        self.drop_count = w()
        self.seq = w()
        self.boot = w()
        self.committed = w(2)
        self.proc_head = w(2)
        self.proc_tail = w(2)
        self.processing_lock = w(2)
        self.dangling = w(2)
        self.free_head = w(2)     # the pre-60ea3a3ac3 free lists (emu.xen.history)
        self.hdr = w(NENT * HWORDS)
        self.payload = alloc.size
        alloc.size += NENT * PAYLOAD


def bit_range(cls: int) -> range:
    # An urgent request searches from bit 0 and so may take any free slot.
    return range(0, NENT) if cls == MC_URGENT else range(MC_URGENT_NENT, NENT)


_pack_hdr = struct.Struct(f"<{HWORDS - 1}Q").pack_into   # H_CLASS .. H_CPU
CLASS_MASK = tuple(sum(1 << b for b in bit_range(c)) for c in (MC_URGENT, MC_NONURGENT))
U64 = (1 << 64) - 1
_pack = msgpack.Packer().pack   # one packer, reused: packb makes one per call


def _no_yp(site: str, d0: int = 0, d1: int = 0) -> None:
    pass


class Mctelem:
    """The telemetry pool, as seen by one process (a CPU or the coordinator).

    ``yp``: the owning CPU's yield point (:class:`emu.xen.mce.XenCpu` sets it; the
    coordinator's copy, which serves Dom0, has none). A committed-list push passes it
    inside ``mctelem_xchg_head``'s loop, where Dom0's fetch (or another CPU's push) can
    come between the read of the head and the cmpxchg."""

    yp = staticmethod(_no_yp)

    def __init__(self, R):
        self.X = R.X
        self.mv = memoryview(R.xen_map)
        self.T = R.L.tele
        self.L = R.L

    # -- helpers ----------------------------------------------------------------
    def _h(self, i: int, k: int) -> int:
        return self.T.hdr + 8 * (i * HWORDS + k)

    def hget(self, i: int, k: int) -> int:
        return self.X.load(self._h(i, k))

    def _hset(self, i: int, k: int, v: int) -> None:
        self.X.store(self._h(i, k), v)

    def init(self, boot: int) -> None:
        """Boot: every slot free (the Xen region was zeroed)."""
        self.X.store(self.T.freemap, (1 << NENT) - 1)
        self.X.store(self.T.boot, boot)

    # -- life cycle ---------------------------------------------------------------
    def mctelem_reserve(self, cls: int, cpu: int) -> int | None:
        X, T = self.X, self.T
        fm, mask = T.freemap, CLASS_MASK[cls]
        while True:
            free = X.load(fm) & mask
            if not free:
                X.fetch_add(T.drop_count, 1)
                return None
            i = (free & -free).bit_length() - 1
            if X.fetch_and(fm, ~(1 << i) & U64) & (1 << i):
                break  # won the test-and-clear
        seq = X.fetch_add(T.seq, 1) + 1
        h = T.hdr + 8 * HWORDS * i
        # The won slot is ours alone: one copy of the header words after STATE, then
        # STATE, so an inspector never sees UNCOMMITTED with a stale header.
        _pack_hdr(self.mv, h + 8 * H_CLASS, cls, 1, 0, 0, (X.load(T.boot) << 32) | seq, 0, cpu)
        X.store(h + 8 * H_STATE, UNCOMMITTED)
        return i

    def mctelem_dismiss(self, i: int) -> None:
        self._hset(i, H_STATE, FREE)
        self.X.fetch_or(self.T.freemap, 1 << i)

    def mctelem_commit(self, i: int) -> None:
        self._hset(i, H_STATE, COMMITTED)
        self._xchg_head(self.T.committed + 8 * self.hget(i, H_CLASS), i, self.yp)

    def _xchg_head(self, head_off: int, i: int, yp=_no_yp) -> None:
        # The fixed mctelem_xchg_head (e9af61b969): link first, then cmpxchg. ``yp``:
        # committed-list pushes only (a per-CPU pending list has no other writer but
        # its own CPU's softirq, which cannot run inside the push).
        X = self.X
        while True:
            old = X.load(head_off)
            self._hset(i, H_NEXT, old)
            yp("telem", head_off, i)
            if X.cmpxchg(head_off, old, i + 1) == old:
                return

    def mctelem_defer(self, i: int, cpu: int, lmce: bool) -> None:
        L, X = self.L, self.X
        pend, lpend = L.pc(cpu, L.P_PENDING), L.pc(cpu, L.P_LMCE_PENDING)
        if X.load(pend):
            self._xchg_head(pend, i)
        elif lmce:
            self._xchg_head(lpend, i)
        else:
            # Keep pending and lmce_pending exclusive: move the LMCE list over.
            if X.load(lpend):
                X.store(pend, X.xchg(lpend, 0))
            self._xchg_head(pend, i)

    def mctelem_has_deferred(self, cpu: int) -> bool:
        return bool(self.X.load(self.L.pc(cpu, self.L.P_PENDING)))

    def mctelem_has_deferred_lmce(self, cpu: int) -> bool:
        return bool(self.X.load(self.L.pc(cpu, self.L.P_LMCE_PENDING)))

    def mctelem_process_deferred(self, cpu: int, fn, lmce: bool) -> int:
        """Detach the CPU's list, replay it oldest first; fn(i) true → commit."""
        head_off = self.L.pc(cpu, self.L.P_LMCE_PENDING if lmce else self.L.P_PENDING)
        ref = self.X.xchg(head_off, 0)
        chain = []
        while ref:
            chain.append(ref - 1)
            ref = self.hget(ref - 1, H_NEXT)
        for i in reversed(chain):
            if fn(i):
                self.mctelem_commit(i)
            else:
                self.mctelem_dismiss(i)
        return len(chain)

    # -- payload --------------------------------------------------------------------
    def write(self, i: int, rec) -> None:
        """Store entry ``i``'s payload: a record as :meth:`read` gives it, or the
        positional form ``[who, flags, cpu, [GLOBAL_FIELDS...], banks, recovery]``."""
        if isinstance(rec, dict) and "g" in rec:
            g = rec["g"]
            rec = [rec["who"], rec["flags"], rec["cpu"], [g[k] for k in GLOBAL_FIELDS],
                   rec["b"], rec["r"]]
        data = _pack(rec)
        if len(data) > PAYLOAD:
            from emu.errors import EmulatorInternalError
            raise EmulatorInternalError(f"telemetry record of {len(data)} bytes exceeds the slot")
        base = self.T.payload + i * PAYLOAD
        self.mv[base:base + len(data)] = data
        self._hset(i, H_LEN, len(data))

    def read(self, i: int) -> dict:
        n = self.hget(i, H_LEN)
        base = self.T.payload + i * PAYLOAD
        if not n:
            return {}
        rec = msgpack.unpackb(bytes(self.mv[base:base + n]), strict_map_key=False)
        if not isinstance(rec, list):
            return rec    # not an mc_info record (tests store other maps)
        who, flags, cpu, g, b, r = rec
        return {"who": who, "flags": flags, "cpu": cpu,
                "g": dict(zip(GLOBAL_FIELDS, g, strict=False)), "b": b, "r": r}

    def record_id(self, i: int) -> int:
        return self.hget(i, H_ID)

    # -- consumer side (the hypercall service) ---------------------------------------
    def _lock(self) -> None:
        off = self.T.processing_lock
        while self.X.cmpxchg(off, 0, 1) != 0:
            os.sched_yield()

    def _unlock(self) -> None:
        self.X.store(self.T.processing_lock, 0)

    def consume_oldest_begin(self, cls: int) -> int | None:
        """Move the committed LIFO to the processing FIFO; return its head."""
        X, T = self.X, self.T
        self._lock()
        try:
            ref = X.xchg(T.committed + 8 * cls, 0)
            X.store(T.dangling + 8 * cls, ref)  # a panic mid-move can still find it
            chain = []
            while ref:
                chain.append(ref - 1)
                ref = self.hget(ref - 1, H_NEXT)
            for i in reversed(chain):  # oldest first onto the tail
                self._hset(i, H_STATE, PROCESSING)
                self._hset(i, H_NEXT, 0)
                tail = X.load(T.proc_tail + 8 * cls)
                self._hset(i, H_PREV, tail)
                if tail:
                    self._hset(tail - 1, H_NEXT, i + 1)
                else:
                    X.store(T.proc_head + 8 * cls, i + 1)
                X.store(T.proc_tail + 8 * cls, i + 1)
            X.store(T.dangling + 8 * cls, 0)
            head = X.load(T.proc_head + 8 * cls)
            if not head:
                return None
            self._hset(head - 1, H_REF, 2)
            return head - 1
        finally:
            self._unlock()

    def consume_oldest_end(self, i: int) -> None:
        self._hset(i, H_REF, 1)

    def mctelem_ack(self, cls: int, record_id: int) -> bool:
        """Free the head of the class if ``record_id`` is it; anything else is ignored."""
        X, T = self.X, self.T
        self._lock()
        try:
            head = X.load(T.proc_head + 8 * cls)
            if not head or self.hget(head - 1, H_ID) != record_id:
                return False
            i = head - 1
            nxt = self.hget(i, H_NEXT)
            X.store(T.proc_head + 8 * cls, nxt)
            if nxt:
                self._hset(nxt - 1, H_PREV, 0)
            else:
                X.store(T.proc_tail + 8 * cls, 0)
            self._hset(i, H_REF, 0)
            self.mctelem_dismiss(i)
            return True
        finally:
            self._unlock()

    # -- inspection ----------------------------------------------------------------
    def free_count(self) -> int:
        return bin(self.X.load(self.T.freemap)).count("1")

    def drops(self) -> int:
        return self.X.load(self.T.drop_count)

    def states(self) -> list[int]:
        return [self.hget(i, H_STATE) for i in range(NENT)]

    def in_use(self) -> list[dict]:
        """Every slot not FREE: what Xen still holds (and would lose at a reset)."""
        out = []
        for i in range(NENT):
            st = self.hget(i, H_STATE)
            if st != FREE:
                out.append({"slot": i, "state": STATE_NAMES[st],
                            "cls": CLASS_NAMES[self.hget(i, H_CLASS)],
                            "id": self.hget(i, H_ID), "cpu": self.hget(i, H_CPU)})
        return out


def mcinfo_fits(nbanks: int, nrecovery: int = 0, extended: bool = False) -> bool:
    """Would an mc_info with these records fit (Xen's reservation arithmetic)?"""
    used = SZ_GLOBAL + nbanks * SZ_BANK + nrecovery * SZ_RECOVERY + (SZ_EXTENDED if extended else 0)
    return used <= MCINFO_DATA + 8  # the last record may run 8 bytes into padding
