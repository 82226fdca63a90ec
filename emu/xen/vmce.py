"""Virtual machine checks (vmce.c) and the domain table, in Xen memory.

Modelled (xen-mca.md §6.1, §7): domains (Dom0 = the hardware domain, PV; guests
HVM with HAP by default) with vCPUs; per-vCPU vMCE state: MCG_CAP 0x01000C02 (two
banks), MCG_STATUS, MCG_EXT_CTL, banks 0 and 1 {STATUS, ADDR, MISC, CTL2}; errors
always go to bank 1 with MSCOD cleared. ``fill_vmsr_data`` (broadcast: vCPU0 gets
the bank, every other vCPU MCIP|RIPV; LMCE: the given vCPU), ``vcpu_fill_mc_msrs``
failing with -EBUSY while the vCPU's MCIP is set (checked before the lock, as in
Xen), ``inject_vmce`` (skip uninitialised vCPUs, -EBUSY on a pending vMCE),
``vmce_rdmsr``/``vmce_wrmsr`` with the §7.2 rules (non-zero STATUS/ADDR/MISC
writes raise #GP; banks beyond the count read 0 and ignore writes),
``domain_crash``, and VIRQ_MCA as a counter the coordinator turns into a message.

Not modelled: vLMCE enabling by the toolstack (MCG_EXT_CTL is #GP without LMCE_P,
which guests do not get here), AMD's MCG_CAP, save/restore.
"""
from __future__ import annotations

from emu.hw import msr

MAX_DOMS = 8
MAX_VCPUS = 8
GUEST_MCG_CAP = msr.MCG_SER_P | msr.MCG_TES_P | msr.MCG_CMCI_P | 2   # 0x01000C02
GUEST_NBANKS = 2
EBUSY, EINVAL, EOPNOTSUPP = 16, 22, 95
VMCE_INJECT_BROADCAST = -1

# domain states
DOM_NONE, DOM_RUNNING, DOM_CRASHED = 0, 1, 2
DOM_STATE_NAMES = {DOM_NONE: "none", DOM_RUNNING: "running", DOM_CRASHED: "crashed"}
# domain words
(D_ID, D_STATE, D_HVM, D_NVCPUS, D_HWDOM, D_VIRQ_BOUND, D_EV, _D_EV_SL, D_NMCE,
 D_CRASH_WHY) = range(10)
DWORDS = 10
# vCPU words
(V_INIT, V_PENDING, V_CAP, V_STATUS, V_EXT_CTL, V_LOCK,
 V_B0S, V_B0A, V_B0M, V_B0C2, V_B1S, V_B1A, V_B1M, V_B1C2) = range(14)
VWORDS = 16


class GeneralProtection(Exception):
    """#GP raised in the guest by an MSR access."""


class Layout:
    def __init__(self, alloc):
        self.virq_count = alloc.words()
        self.vmce_count = alloc.words()
        self.doms = alloc.words(MAX_DOMS * DWORDS)
        self.vcpus = alloc.words(MAX_DOMS * MAX_VCPUS * VWORDS)


def send_global_virq(R) -> None:
    """VIRQ_MCA: a notification only; the coordinator passes it to Dom0."""
    R.X.fetch_add(R.L.vm.virq_count, 1)
    R.notify()


class Vmce:
    def __init__(self, R):
        self.R = R
        self.X = R.X
        self.V = R.L.vm
        self._slots: dict[int, int] = {}

    # -- table access --------------------------------------------------------------
    def _d(self, k: int, w: int) -> int:
        return self.V.doms + 8 * (k * DWORDS + w)

    def _v(self, k: int, v: int, w: int) -> int:
        return self.V.vcpus + 8 * ((k * MAX_VCPUS + v) * VWORDS + w)

    def dget(self, k, w):
        return self.X.load(self._d(k, w))

    def vget(self, k, v, w):
        return self.X.load(self._v(k, v, w))

    def vset(self, k, v, w, val):
        self.X.store(self._v(k, v, w), val & msr.U64)

    def slot(self, domid: int) -> int | None:
        # The slot a domain was last found in, checked again (two loads instead of a
        # scan of every slot: the coordinator asks ~10 times a trial).
        hint = self._slots.get(domid)
        if hint is not None and self.dget(hint, D_STATE) != DOM_NONE and \
                self.dget(hint, D_ID) == domid:
            return hint
        for k in range(MAX_DOMS):
            if self.dget(k, D_STATE) != DOM_NONE and self.dget(k, D_ID) == domid:
                self._slots[domid] = k
                return k
        return None

    def create(self, k: int, domid: int, hvm: bool, nvcpus: int, hwdom: bool,
               init_vcpus: int | None = None) -> None:
        X = self.X
        for w, val in ((D_ID, domid), (D_HVM, int(hvm)), (D_NVCPUS, nvcpus),
                       (D_HWDOM, int(hwdom)), (D_VIRQ_BOUND, int(hwdom)), (D_NMCE, 0),
                       (D_CRASH_WHY, 0)):
            X.store(self._d(k, w), val)
        init = nvcpus if init_vcpus is None else init_vcpus
        for v in range(nvcpus):
            for w in range(VWORDS):
                self.vset(k, v, w, 0)
            self.vset(k, v, V_INIT, int(v < init))
            self.vset(k, v, V_CAP, GUEST_MCG_CAP)
        X.store(self._d(k, D_STATE), DOM_RUNNING)

    def domains(self) -> list[dict]:
        # The table in one slice (a report, read twice a trial by the coordinator: one
        # load per word was most of its reads); aligned 8-byte words read whole.
        base = self._d(0, 0) >> 3
        t = memoryview(self.R.xen_map).cast("Q")[base:base + MAX_DOMS * DWORDS].tolist()
        out = []
        for k in range(MAX_DOMS):
            d = t[k * DWORDS:(k + 1) * DWORDS]
            st = d[D_STATE]
            if st == DOM_NONE:
                continue
            out.append({"domid": d[D_ID], "state": DOM_STATE_NAMES[st],
                        "type": "hvm" if d[D_HVM] else "pv",
                        "vcpus": d[D_NVCPUS],
                        "crash_reason": CRASH_REASONS.get(d[D_CRASH_WHY])})
        return out

    def is_running(self, domid: int) -> bool:
        k = self.slot(domid)
        return k is not None and self.dget(k, D_STATE) == DOM_RUNNING

    # -- Xen operations ----------------------------------------------------------------
    def domain_crash(self, domid: int, why: int = 1) -> None:
        k = self.slot(domid)
        if k is None:
            return
        if self.X.cmpxchg(self._d(k, D_STATE), DOM_RUNNING, DOM_CRASHED) == DOM_RUNNING:
            self.X.store(self._d(k, D_CRASH_WHY), why)
            self.R.notify()

    def unmmap_broken_page(self, domid: int) -> int:
        """Dom0 is trusted; a PV domU cannot be unmapped; HVM/HAP p2m → broken
        (the page's PGC_BROKEN bit, set by offline_page, is the p2m_ram_broken)."""
        k = self.slot(domid)
        if k is None:
            return -EINVAL
        if self.dget(k, D_HWDOM) or self.dget(k, D_HVM):
            return 0
        return -EOPNOTSUPP

    def vcpu_fill_mc_msrs(self, k, v, mcg_status, status, addr, misc) -> int:
        # MCIP is checked before taking the vmce lock (hazard F: TOCTOU with the guest).
        if self.vget(k, v, V_STATUS) & msr.MCG_STATUS_MCIP:
            return -EBUSY
        lock = self._v(k, v, V_LOCK)
        while self.X.cmpxchg(lock, 0, 1) != 0:
            pass
        try:
            self.vset(k, v, V_STATUS, mcg_status)
            self.vset(k, v, V_B1S, status)
            self.vset(k, v, V_B1A, addr)
            self.vset(k, v, V_B1M, misc)
        finally:
            self.X.store(lock, 0)
        return 0

    def fill_vmsr_data(self, bank: dict, domid: int, gstatus: int, vcpu: int) -> int:
        k = self.slot(domid)
        if k is None or bank["domid"] >= 0x7FF0:
            return -EINVAL
        status = bank["status"] & ~msr.MCi_STATUS_MSEC   # MSCOD cleared
        ret = 0
        if vcpu == VMCE_INJECT_BROADCAST:
            gstatus &= ~msr.MCG_STATUS_LMCE
            target = 0
        else:
            target = vcpu
        ret = self.vcpu_fill_mc_msrs(k, target, gstatus, status, bank["addr"], bank["misc"])
        if vcpu == VMCE_INJECT_BROADCAST:
            # Every other vCPU sees MCIP|RIPV and an empty bank (795b988e7c); note
            # that uninitialised vCPUs are filled too (hazard G).
            for v in range(1, self.dget(k, D_NVCPUS)):
                r = self.vcpu_fill_mc_msrs(k, v, msr.MCG_STATUS_MCIP | msr.MCG_STATUS_RIPV, 0, 0, 0)
                ret = ret or r
        return ret

    def inject_vmce(self, domid: int, vcpu: int) -> tuple[int, list[int]]:
        """Set mce_pending on the target vCPU(s) and kick; returns (ret, kicked)."""
        k = self.slot(domid)
        if k is None:
            return -EINVAL, []
        kicked = []
        for v in range(self.dget(k, D_NVCPUS)):
            if vcpu != VMCE_INJECT_BROADCAST and v != vcpu:
                continue
            if not self.vget(k, v, V_INIT):
                continue
            if self.X.cmpxchg(self._v(k, v, V_PENDING), 0, 1) != 0:
                return -EBUSY, kicked
            kicked.append(v)
        self.X.fetch_add(self._d(k, D_NMCE), 1)
        self.X.fetch_add(self.V.vmce_count, 1)
        self.R.notify()
        return 0, kicked

    def pending_vcpus(self, domid: int) -> list[int]:
        k = self.slot(domid)
        if k is None:
            return []
        return [v for v in range(self.dget(k, D_NVCPUS)) if self.vget(k, v, V_PENDING)]

    def ack_pending(self, domid: int, v: int) -> bool:
        """Delivery acknowledged the vMCE (HVM intack / PV bounce): clear mce_pending."""
        k = self.slot(domid)
        return k is not None and self.X.cmpxchg(self._v(k, v, V_PENDING), 1, 0) == 1

    # -- guest MSR traps (§7.2) ----------------------------------------------------------
    def vmce_rdmsr(self, domid: int, v: int, addr: int) -> int:
        k = self.slot(domid)
        if k is None or v >= self.dget(k, D_NVCPUS):
            raise GeneralProtection(f"rdmsr {addr:#x}: no such vCPU")
        cap = self.vget(k, v, V_CAP)
        count = cap & msr.MCG_CAP_COUNT
        if addr == msr.MSR_IA32_MCG_CAP:
            return cap
        if addr == msr.MSR_IA32_MCG_STATUS:
            return self.vget(k, v, V_STATUS)
        if addr == msr.MSR_IA32_MCG_CTL:
            return 0   # no MCG_CTL_P
        if addr == msr.MSR_IA32_MCG_EXT_CTL:
            if not cap & msr.MCG_LMCE_P:
                raise GeneralProtection("rdmsr MCG_EXT_CTL without LMCE_P")
            return self.vget(k, v, V_EXT_CTL)
        if addr in (msr.MSR_IA32_P5_MC_ADDR, msr.MSR_IA32_P5_MC_TYPE):
            return self.vget(k, v, V_B1A if addr == msr.MSR_IA32_P5_MC_ADDR else V_B1S)
        d = msr.decode_bank_msr(addr)
        if d is None:
            return 0   # not a vMCE MSR
        bank, reg = d
        if bank >= count:
            return 0
        if reg == msr.REG_CTL:
            return msr.U64
        w = (V_B0S, V_B0A, V_B0M, V_B0C2) if bank == 0 else (V_B1S, V_B1A, V_B1M, V_B1C2)
        return self.vget(k, v, w[{msr.REG_STATUS: 0, msr.REG_ADDR: 1, msr.REG_MISC: 2,
                                   msr.REG_CTL2: 3}[reg]])

    def vmce_wrmsr(self, domid: int, v: int, addr: int, val: int) -> None:
        k = self.slot(domid)
        if k is None or v >= self.dget(k, D_NVCPUS):
            raise GeneralProtection(f"wrmsr {addr:#x}: no such vCPU")
        cap = self.vget(k, v, V_CAP)
        count = cap & msr.MCG_CAP_COUNT
        if addr in (msr.MSR_IA32_MCG_CAP, msr.MSR_IA32_MCG_CTL):
            return   # ignored
        if addr == msr.MSR_IA32_MCG_STATUS:
            self.vset(k, v, V_STATUS, val)
            return
        if addr == msr.MSR_IA32_MCG_EXT_CTL:
            if not cap & msr.MCG_LMCE_P or val & ~1:
                raise GeneralProtection("wrmsr MCG_EXT_CTL")
            self.vset(k, v, V_EXT_CTL, val)
            return
        d = msr.decode_bank_msr(addr)
        if d is None:
            return
        bank, reg = d
        if bank >= count or reg == msr.REG_CTL:
            return
        w = (V_B0S, V_B0A, V_B0M, V_B0C2) if bank == 0 else (V_B1S, V_B1A, V_B1M, V_B1C2)
        if reg == msr.REG_CTL2:
            self.vset(k, v, w[3], val)
            return
        if val != 0:
            raise GeneralProtection(f"wrmsr {addr:#x} <- {val:#x}: only 0 may be written")
        self.vset(k, v, w[{msr.REG_STATUS: 0, msr.REG_ADDR: 1, msr.REG_MISC: 2}[reg]], 0)

    def vcpu_state(self, domid: int, v: int) -> dict:
        k = self.slot(domid)
        g = lambda w: self.vget(k, v, w)   # noqa: E731
        return {"initialised": bool(g(V_INIT)), "mce_pending": bool(g(V_PENDING)),
                "mcg_status": g(V_STATUS), "bank1": [g(V_B1S), g(V_B1A), g(V_B1M)]}


CRASH_REASONS = {0: None, 1: "crashed", 2: "vmce_failed", 3: "touched a broken page again",
                 4: "killed"}
