"""Xen's Intel machine-check severity classification (xen-mca.md §3).

Modelled, with Xen's names (``mce_intel.c``, ``mcaction.c``, ``mce.c``):

- ``intel_check_mce_type`` (§3.1), ``intel_recoverable_scan`` (§3.2),
  ``intel_need_clearbank_scan`` (§3.4, every ``mca_source``);
- the ``owned_error`` predicates of the deferred handler table and the presets of
  ``intel_srao_dhandler`` / ``intel_srar_dhandler`` / the default handlers (§3.3);
- the ``mce_action`` result codes (MCER_*) and their "worst wins" combination.

``ser`` stands for Xen's global ``ser_support`` (MCG_CAP.MCG_SER_P); both SER on and
off are modelled. Not modelled: AMD (no urgent/deferred handlers, its own
recoverable/clearbank rules), the RIPV/EIPV part of ``mce_urgent_action`` (§2.3
step 8: the caller checks MCG_STATUS), and the memory-error handler itself (§6: the
caller runs it when :func:`deferred_preset` returns ``'memerr'``).

Pure functions: no process, no I/O, no shared memory.
"""
from __future__ import annotations

from enum import IntEnum

from emu.hw.msr import (
    MCi_STATUS_AR,
    MCi_STATUS_EN,
    MCi_STATUS_OVER,
    MCi_STATUS_PCC,
    MCi_STATUS_S,
    MCi_STATUS_UC,
    MCi_STATUS_VAL,
    mcacod,
)


class mca_source(IntEnum):
    """``enum mca_source`` (values in Xen's declaration order)."""
    MCA_POLLER = 0
    MCA_CMCI_HANDLER = 1
    MCA_RESET = 2
    MCA_MCE_SCAN = 3


MCA_POLLER = mca_source.MCA_POLLER
MCA_CMCI_HANDLER = mca_source.MCA_CMCI_HANDLER
MCA_RESET = mca_source.MCA_RESET
MCA_MCE_SCAN = mca_source.MCA_MCE_SCAN

# mce_action results; a larger value is worse (§3.3).
MCER_NOERROR = 0
MCER_RECOVERED = 1
MCER_CONTINUE = 2
MCER_RESET = 3
_MCER_NAMES = ("noerror", "recovered", "continue", "reset")

# intel_check_mce_type results (Xen: intel_mce_invalid, _fatal, _corrected,
# _ucr_srar, _ucr_srao, _ucr_ucna).
INVALID, FATAL, CORRECTED, SRAR, SRAO, UCNA = (
    "invalid", "fatal", "corrected", "srar", "srao", "ucna")

# MCACODs with a memory-error handler (§3.3). Matched on the exact 16 bits.
INTEL_SRAO_MEM_SCRUB = range(0x00C0, 0x00D0)   # channel in the low nibble
INTEL_SRAO_L3_EWB = 0x017A
INTEL_SRAR_DATA_LOAD = 0x0134
INTEL_SRAR_INSTR_FETCH = 0x0150


def mcer_name(r: int) -> str:
    return _MCER_NAMES[r]


def worst(a: int, b: int) -> int:
    """Combination of two mce_action results: the worse one (NOERROR < ... < RESET)."""
    return max(a, b)


def intel_check_mce_type(status: int, ser: bool) -> str:
    """§3.1, in Xen's order. EIPV/RIPV are not looked at."""
    if not status & MCi_STATUS_VAL:
        return INVALID
    if status & MCi_STATUS_PCC:
        return FATAL
    if not status & MCi_STATUS_UC:
        return CORRECTED
    if not ser:                       # every UC is fatal without MCG_SER_P
        return FATAL
    if status & MCi_STATUS_S:
        if status & MCi_STATUS_AR:
            return FATAL if status & MCi_STATUS_OVER else SRAR
        return SRAO                   # OVER ignored
    return UCNA                       # S=0: OVER, EN and even AR=1 ignored


def intel_recoverable_scan(status: int, ser: bool) -> bool:
    """§3.2: may this bank be recovered (feeds the logout summary's ``recoverable``)?

    VAL is not checked (logout only calls it on valid banks); note the spurious
    clause does not look at PCC, as in Xen.
    """
    uc, en, over = status & MCi_STATUS_UC, status & MCi_STATUS_EN, status & MCi_STATUS_OVER
    pcc, s, ar = status & MCi_STATUS_PCC, status & MCi_STATUS_S, status & MCi_STATUS_AR
    if not uc:
        return True
    if not ser:
        return False
    if not en and not over:                          # spurious / disabled UC
        return True
    if not over and not pcc and s and ar and en:     # SRAR
        return True
    if not pcc and s and not ar and en:              # SRAO, OVER allowed
        return True
    return bool(not over and en and not pcc and not s and not ar)   # UCNA


def intel_need_clearbank_scan(who: int, status: int, ser: bool) -> bool:
    """§3.4: does a logout from source ``who`` clear this bank?"""
    uc, en, over = status & MCi_STATUS_UC, status & MCi_STATUS_EN, status & MCi_STATUS_OVER
    pcc, s, ar = status & MCi_STATUS_PCC, status & MCi_STATUS_S, status & MCi_STATUS_AR
    if who == MCA_CMCI_HANDLER:
        if not uc:
            return True
        if ser and not over and not en:              # spurious
            return True
        return bool(ser and not over and not pcc and not s and not ar)   # UCNA
    if who == MCA_MCE_SCAN:
        if not ser:
            return False
        if uc and pcc:        # keep the sticky bank for logging after the reboot
            return False
        if not over and uc and not en:               # spurious
            return True
        if uc and s and ar and not over:             # SRAR (OVER=1 has caused a reset)
            return True
        # SRAO; everything else (CE, UCNA, SRAR+OVER) is logged, not cleared.
        return bool(uc and s and not ar)
    if who in (MCA_POLLER, MCA_RESET):
        return True
    raise ValueError(f"unknown mca_source {who!r}")


def is_memerr_srao_code(status: int) -> bool:
    c = mcacod(status)
    return c in INTEL_SRAO_MEM_SCRUB or c == INTEL_SRAO_L3_EWB


def is_memerr_srar_code(status: int) -> bool:
    return mcacod(status) in (INTEL_SRAR_DATA_LOAD, INTEL_SRAR_INSTR_FETCH)


def intel_srao_check(status: int, ser: bool) -> bool:
    """owned_error of intel_srao_dhandler."""
    return intel_check_mce_type(status, ser) == SRAO


def intel_srar_check(status: int, ser: bool) -> bool:
    """owned_error of intel_srar_dhandler."""
    return intel_check_mce_type(status, ser) == SRAR


def urgent_default_action(status: int, ser: bool) -> int:
    """intel_default_mce_uhandler, the only urgent handler: fatal → RESET, else CONTINUE."""
    return MCER_RESET if intel_check_mce_type(status, ser) == FATAL else MCER_CONTINUE


def deferred_preset(status: int, ser: bool) -> tuple[int, str | None]:
    """Deferred-table walk for one bank record (§3.3): (preset result, 'memerr' | None).

    'memerr' means the owning handler calls the memory-error handler (§6), which may
    improve the result; if it fails the preset stands (SRAO: CONTINUE, SRAR: RESET).
    An SRAO/SRAR with another code (e.g. 0x009F) gets no action: the preset only.
    """
    if intel_srao_check(status, ser):
        return MCER_CONTINUE, "memerr" if is_memerr_srao_code(status) else None
    if intel_srar_check(status, ser):
        return MCER_RESET, "memerr" if is_memerr_srar_code(status) else None
    # intel_default_mce_dhandler
    return (MCER_RESET if intel_check_mce_type(status, ser) == FATAL else MCER_CONTINUE), None
