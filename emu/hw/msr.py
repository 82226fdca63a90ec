"""MSR numbers and bit fields of x86 machine-check architecture (Intel view).

Modelled: IA32_MCG_CAP/STATUS/CTL, MCi_CTL/STATUS/ADDR/MISC/CTL2 addresses and the
bit layout of xen-mca.md §1. Pure constants and decoders: no process, no memory.
The layout of the bank array in shared memory lives in :mod:`emu.hw.banks`, which
is the only code that indexes it.
"""
from __future__ import annotations

# --- global MSRs (§1.1) -----------------------------------------------------
MSR_IA32_MCG_CAP = 0x179
MSR_IA32_MCG_STATUS = 0x17A
MSR_IA32_MCG_CTL = 0x17B
MSR_IA32_MCG_EXT_CTL = 0x4D0
MSR_IA32_P5_MC_ADDR = 0x0
MSR_IA32_P5_MC_TYPE = 0x1

MSR_IA32_MC0_CTL = 0x400
MSR_IA32_MC0_CTL2 = 0x280


def MSR_IA32_MCx_CTL(i: int) -> int:
    return MSR_IA32_MC0_CTL + 4 * i


def MSR_IA32_MCx_STATUS(i: int) -> int:
    return MSR_IA32_MC0_CTL + 4 * i + 1


def MSR_IA32_MCx_ADDR(i: int) -> int:
    return MSR_IA32_MC0_CTL + 4 * i + 2


def MSR_IA32_MCx_MISC(i: int) -> int:
    return MSR_IA32_MC0_CTL + 4 * i + 3


def MSR_IA32_MCx_CTL2(i: int) -> int:
    return MSR_IA32_MC0_CTL2 + i


# Register index of a bank instance in the shared array (see banks.py).
REG_CTL, REG_STATUS, REG_ADDR, REG_MISC, REG_CTL2 = range(5)
NREGS = 5


def decode_bank_msr(msr: int) -> tuple[int, int] | None:
    """Map a bank MSR address to (bank, REG_*), or None if it is not one."""
    if 0x400 <= msr < 0x480:
        bank, off = divmod(msr - 0x400, 4)
        return bank, (REG_CTL, REG_STATUS, REG_ADDR, REG_MISC)[off]
    if 0x280 <= msr < 0x2A0:
        return msr - 0x280, REG_CTL2
    return None


# --- IA32_MCG_CAP ------------------------------------------------------------
MCG_CAP_COUNT = 0xFF
MCG_CTL_P = 1 << 8
MCG_EXT_P = 1 << 9
MCG_CMCI_P = 1 << 10
MCG_TES_P = 1 << 11
MCG_SER_P = 1 << 24
MCG_LMCE_P = 1 << 27

# --- IA32_MCG_STATUS ---------------------------------------------------------
MCG_STATUS_RIPV = 1 << 0
MCG_STATUS_EIPV = 1 << 1
MCG_STATUS_MCIP = 1 << 2
MCG_STATUS_LMCE = 1 << 3

# --- MCi_STATUS ----------------------------------------------------------------
MCi_STATUS_VAL = 1 << 63
MCi_STATUS_OVER = 1 << 62
MCi_STATUS_UC = 1 << 61
MCi_STATUS_EN = 1 << 60
MCi_STATUS_MISCV = 1 << 59
MCi_STATUS_ADDRV = 1 << 58
MCi_STATUS_PCC = 1 << 57
MCi_STATUS_S = 1 << 56
MCi_STATUS_AR = 1 << 55
MCi_STATUS_TES = 3 << 53          # threshold-based status (00 none, 01 green, 10 yellow)
MCi_STATUS_TES_YELLOW = 2 << 53
MCi_STATUS_MCA = 0xFFFF           # MCACOD
MCi_STATUS_MSEC = 0xFFFF0000      # MSCOD
MCi_STATUS_OTHER = 0x01FFFFFF00000000
MCi_STATUS_FWST = 1 << 37         # firmware updated this error (meaningful with MCG_SER_P)

# Corrected-error count, bits 52:38, when MCG_CMCI_P (§1.2)
MCi_STATUS_CEC_SHIFT = 38
MCi_STATUS_CEC_MAX = 0x7FFF
MCi_STATUS_CEC = MCi_STATUS_CEC_MAX << MCi_STATUS_CEC_SHIFT

# --- MCi_CTL2 (Intel, with MCG_CMCI_P; §1.2): shared by a core's threads ---------------
CMCI_EN = 1 << 30
CMCI_THRESHOLD_MASK = 0x7FFF


def cec(status: int) -> int:
    """The corrected-error count of an MCi_STATUS value."""
    return (status & MCi_STATUS_CEC) >> MCi_STATUS_CEC_SHIFT


def with_cec(status: int, count: int) -> int:
    return (status & ~MCi_STATUS_CEC) | (min(count, MCi_STATUS_CEC_MAX) << MCi_STATUS_CEC_SHIFT)


# MCi_MISC: address mode bits 8:6, LSB bits 5:0 (§1.2)
MCi_MISC_ADDRMOD_MASK = 0x7 << 6
MCi_MISC_PHYSMOD = 0x2 << 6
MCi_MISC_LSB_MASK = 0x3F

U64 = (1 << 64) - 1

STATUS_BITS = (
    ("VAL", MCi_STATUS_VAL), ("OVER", MCi_STATUS_OVER), ("UC", MCi_STATUS_UC),
    ("EN", MCi_STATUS_EN), ("MISCV", MCi_STATUS_MISCV), ("ADDRV", MCi_STATUS_ADDRV),
    ("PCC", MCi_STATUS_PCC), ("S", MCi_STATUS_S), ("AR", MCi_STATUS_AR),
)
MCG_STATUS_BITS = (
    ("RIPV", MCG_STATUS_RIPV), ("EIPV", MCG_STATUS_EIPV),
    ("MCIP", MCG_STATUS_MCIP), ("LMCE", MCG_STATUS_LMCE),
)


def status_flags(status: int) -> list[str]:
    """Names of the architectural flag bits set in an MCi_STATUS value."""
    return [name for name, bit in STATUS_BITS if status & bit]


def mcacod(status: int) -> int:
    return status & MCi_STATUS_MCA


def mscod(status: int) -> int:
    return (status & MCi_STATUS_MSEC) >> 16


def addr_is_physical(status: int, misc: int) -> bool:
    """Intel's `intel_checkaddr`: ADDRV, MISCV and MISC[8:6] == physical."""
    return bool(status & MCi_STATUS_ADDRV and status & MCi_STATUS_MISCV
                and (misc & MCi_MISC_ADDRMOD_MASK) == MCi_MISC_PHYSMOD)


def hexs(v: int) -> str:
    """Canonical hex rendering used in every JSON output."""
    return f"0x{v:016X}"
