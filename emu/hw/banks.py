"""MSR banks in the hardware region: the only code that indexes the bank array.

Modelled: one register set (CTL, STATUS, ADDR, MISC, CTL2) per bank *instance*;
a bank's scope (thread, core, package) decides which CPUs see the same instance
(``Topology.inst``). Per-CPU MCG_STATUS/CTL/CAP/EXT_CTL. Hardware writes of an
error follow the SDM overwrite rules (:mod:`emu.hw.overwrite`) and MCi_CTL /
MCG_CTL gating. The registers survive a warm reset (the coordinator keeps the
mapping); power-off zeroes them.

CMCI (with MCG_CMCI_P): MCi_CTL2 is one register per bank instance (shared by
the CPUs the bank's scope gives); on a bank that cannot signal CMCI the CMCI_EN
bit does not stick, and the threshold field holds at most the part's maximum
(:meth:`Banks.wrmsr_ctl2`, what ``do_cmci_discover`` probes). A corrected error
reported by silicon (``hw_report(..., count=True)``) counts in STATUS bits 52:38;
:meth:`Banks.cmci_signal` says whether the report raises a CMCI: CMCI_EN set and
a corrected count that crosses the threshold, or a UCNA (UC, no PCC, S=0, AR=0,
with MCG_SER_P; the threshold does not apply to it).

Not modelled: interposed (software-injected) MSR values; writes of non-zero
MCi_STATUS raising #GP on the host (Xen only ever writes 0).
"""
from __future__ import annotations

from emu.hw import msr
from emu.hw.overwrite import bank_write, ctl_gates
from emu.hw.region import MCG_K_CAP, MCG_K_CTL, MCG_K_EXT_CTL, MCG_K_STATUS

ALL_ONES = msr.U64


class Banks:
    def __init__(self, R):
        self.HW = R.HW
        self.L = R.HL
        self.topo = R.topo
        self._inst = R.topo.inst
        self._base = R.HL.banks

    def off(self, cpu: int, bank: int, reg: int) -> int:
        return self._base + 8 * (self._inst[cpu][bank] * msr.NREGS + reg)

    def instance(self, cpu: int, bank: int) -> int:
        return self._inst[cpu][bank]

    # -- register access as a CPU sees it (rdmsr/wrmsr) ----------------------
    def read(self, cpu: int, bank: int, reg: int) -> int:
        return self.HW.load(self.off(cpu, bank, reg))

    def write(self, cpu: int, bank: int, reg: int, value: int) -> None:
        self.HW.store(self.off(cpu, bank, reg), value & ALL_ONES)

    def rdmsr(self, cpu: int, addr: int) -> int:
        k = _MCG_MSRS.get(addr)
        if k is not None:
            return self.HW.load(self.L.mcg_reg(cpu, k))
        d = msr.decode_bank_msr(addr)
        if d is None or d[0] >= self.topo.nbanks:
            raise KeyError(f"rdmsr {addr:#x}: not a machine-check MSR of this CPU")
        return self.read(cpu, d[0], d[1])

    def wrmsr(self, cpu: int, addr: int, value: int) -> None:
        k = _MCG_MSRS.get(addr)
        if k is not None:
            if k == MCG_K_CAP:
                return  # read-only
            self.HW.store(self.L.mcg_reg(cpu, k), value & ALL_ONES)
            return
        d = msr.decode_bank_msr(addr)
        if d is None or d[0] >= self.topo.nbanks:
            raise KeyError(f"wrmsr {addr:#x}: not a machine-check MSR of this CPU")
        self.write(cpu, d[0], d[1], value)

    def mcg(self, cpu: int, k: int = MCG_K_STATUS) -> int:
        return self.HW.load(self.L.mcg_reg(cpu, k))

    def set_mcg(self, cpu: int, value: int, k: int = MCG_K_STATUS) -> None:
        self.HW.store(self.L.mcg_reg(cpu, k), value & ALL_ONES)

    def cmpxchg_mcg(self, cpu: int, old: int, new: int) -> int:
        return self.HW.cmpxchg(self.L.mcg_reg(cpu, MCG_K_STATUS), old, new)

    # -- what silicon does ----------------------------------------------------
    def power_on(self, mcg_cap: int, cmci_cap: int = 0,
                 cmci_max_threshold: int = msr.CMCI_THRESHOLD_MASK) -> None:
        """Per-CPU MCG_CAP after power-on (the rest of the region is zero), and which
        banks can signal CMCI (a bank mask) with the largest threshold CTL2 holds."""
        for c in range(self.topo.ncpus):
            self.HW.store(self.L.mcg_reg(c, MCG_K_CAP), mcg_cap)
        self.HW.store(self.L.cmci_cap, cmci_cap if mcg_cap & msr.MCG_CMCI_P else 0)
        self.HW.store(self.L.cmci_max_threshold, cmci_max_threshold)

    # -- CMCI (MCi_CTL2) ------------------------------------------------------------------
    def wrmsr_ctl2(self, cpu: int, bank: int, value: int) -> None:
        """wrmsr(MCi_CTL2): CMCI_EN sticks only on a bank that can signal CMCI, and the
        threshold field keeps at most the part's maximum (the SDM's discovery rule:
        write the field all-ones, read back the maximum)."""
        cap = self.HW.load(self.L.cmci_cap)
        if not cap >> bank & 1:
            value &= ~(msr.CMCI_EN | msr.CMCI_THRESHOLD_MASK)
        else:
            thr = min(value & msr.CMCI_THRESHOLD_MASK, self.HW.load(self.L.cmci_max_threshold))
            value = (value & ~msr.CMCI_THRESHOLD_MASK) | thr
        self.write(cpu, bank, msr.REG_CTL2, value)

    def cmci_signal(self, cpu: int, bank: int, old_status: int, new_status: int,
                    ser: bool) -> tuple[bool, str]:
        """Does silicon raise a CMCI for a report into (cpu, bank) that turned STATUS
        from ``old_status`` into ``new_status``? (raised, why)."""
        ctl2 = self.read(cpu, bank, msr.REG_CTL2)
        if not ctl2 & msr.CMCI_EN:
            return False, "CTL2.CMCI_EN clear: no CMCI from this bank (polled, or no owner)"
        uc = new_status & msr.MCi_STATUS_UC
        if uc:
            if ser and not new_status & (msr.MCi_STATUS_PCC | msr.MCi_STATUS_S
                                         | msr.MCi_STATUS_AR):
                return True, "UCNA: signalled by CMCI (the threshold does not apply)"
            return False, "an uncorrected error that is not UCNA is signalled by #MC"
        thr = ctl2 & msr.CMCI_THRESHOLD_MASK
        before = msr.cec(old_status) if old_status & msr.MCi_STATUS_VAL and \
            not old_status & msr.MCi_STATUS_UC else 0
        after = msr.cec(new_status)
        if thr and before < thr <= after:
            return True, f"corrected-error count {after} reached the threshold {thr}"
        return False, f"corrected-error count {after} does not cross the threshold {thr}"

    def warm_reset(self) -> None:
        """A reset clears MCG_STATUS (MCIP) on every CPU and every MCi_CTL2 (§1.2:
        zero after reset, so the CMCI owners are chosen anew); the error registers
        (STATUS, ADDR, MISC) are sticky."""
        for c in range(self.topo.ncpus):
            self.HW.store(self.L.mcg_reg(c, MCG_K_STATUS), 0)
            self.HW.store(self.L.mcg_reg(c, MCG_K_EXT_CTL), 0)
        for k in range(self.topo.ninst):
            self.HW.store(self._base + 8 * (k * msr.NREGS + msr.REG_CTL2), 0)

    def hw_report(self, cpu: int, bank: int, status: int, addr: int, misc: int,
                  count: bool = False) -> dict:
        """Silicon reporting an error into (cpu, bank): gating, then overwrite rules.

        STATUS is updated with a compare-and-swap so a concurrent clear by a
        handler is never overwritten by a stale merge. ``count``: a corrected error
        kept in the bank counts in bits 52:38 (one more than the corrected error it
        replaced, or the count it came with if that is more); without it the status
        is written as given, as an injector writes it. The result has ``old``, the
        STATUS before.
        """
        cap = self.mcg(cpu, MCG_K_CAP)
        mcg_ctl = self.mcg(cpu, MCG_K_CTL) if cap & msr.MCG_CTL_P else None
        if not ctl_gates(status, self.read(cpu, bank, msr.REG_CTL), mcg_ctl):
            return {"written": False, "kept": None, "reason": "gated by MCi_CTL/MCG_CTL"}
        so = self.off(cpu, bank, msr.REG_STATUS)
        while True:
            old = self.HW.load(so)
            w = bank_write(old, self.read(cpu, bank, msr.REG_ADDR),
                           self.read(cpu, bank, msr.REG_MISC), status, addr, misc)
            # ADDR/MISC first: a reader that sees the new STATUS sees them too.
            new = w.status
            if count and not new & msr.MCi_STATUS_UC:
                prev = msr.cec(old) if old & msr.MCi_STATUS_VAL and \
                    not old & msr.MCi_STATUS_UC else 0
                new = msr.with_cec(new, max(msr.cec(new), prev + 1))
            if w.kept in ("new", "second"):
                self.write(cpu, bank, msr.REG_ADDR, w.addr)
                self.write(cpu, bank, msr.REG_MISC, w.misc)
            if self.HW.cmpxchg(so, old, new) == old:
                return {"written": True, "kept": w.kept, "status": new, "old": old}


_MCG_MSRS = {msr.MSR_IA32_MCG_STATUS: MCG_K_STATUS, msr.MSR_IA32_MCG_CTL: MCG_K_CTL,
             msr.MSR_IA32_MCG_CAP: MCG_K_CAP, msr.MSR_IA32_MCG_EXT_CTL: MCG_K_EXT_CTL}
