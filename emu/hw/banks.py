"""MSR banks in the hardware region: the only code that indexes the bank array.

Modelled: one register set (CTL, STATUS, ADDR, MISC, CTL2) per bank *instance*;
a bank's scope (thread, core, package) decides which CPUs see the same instance
(``Topology.inst``). Per-CPU MCG_STATUS/CTL/CAP/EXT_CTL. Hardware writes of an
error follow the SDM overwrite rules (:mod:`emu.hw.overwrite`) and MCi_CTL /
MCG_CTL gating. The registers survive a warm reset (the coordinator keeps the
mapping); power-off zeroes them.

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
    def power_on(self, mcg_cap: int) -> None:
        """Per-CPU MCG_CAP after power-on (the rest of the region is zero)."""
        for c in range(self.topo.ncpus):
            self.HW.store(self.L.mcg_reg(c, MCG_K_CAP), mcg_cap)

    def warm_reset(self) -> None:
        """A reset clears MCG_STATUS (MCIP) on every CPU; bank contents are sticky."""
        for c in range(self.topo.ncpus):
            self.HW.store(self.L.mcg_reg(c, MCG_K_STATUS), 0)
            self.HW.store(self.L.mcg_reg(c, MCG_K_EXT_CTL), 0)

    def hw_report(self, cpu: int, bank: int, status: int, addr: int, misc: int) -> dict:
        """Silicon reporting an error into (cpu, bank): gating, then overwrite rules.

        STATUS is updated with a compare-and-swap so a concurrent clear by a
        handler is never overwritten by a stale merge.
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
            if w.kept in ("new", "second"):
                self.write(cpu, bank, msr.REG_ADDR, w.addr)
                self.write(cpu, bank, msr.REG_MISC, w.misc)
            if self.HW.cmpxchg(so, old, w.status) == old:
                return {"written": True, "kept": w.kept, "status": w.status}


_MCG_MSRS = {msr.MSR_IA32_MCG_STATUS: MCG_K_STATUS, msr.MSR_IA32_MCG_CTL: MCG_K_CTL,
             msr.MSR_IA32_MCG_CAP: MCG_K_CAP, msr.MSR_IA32_MCG_EXT_CTL: MCG_K_EXT_CTL}
