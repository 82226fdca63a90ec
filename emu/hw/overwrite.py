"""What the silicon does when an error is written into a machine-check bank.

Modelled: the architectural (Intel SDM Vol.3B 15.3.2.2.1 Table 15-2 and 15.6.4
Table 15-7) overwrite rules, i.e. the ``sdm`` column of
``consolidated_bank_overwrite.json`` and peers.md §7:

- R1  a report into a bank whose VAL is set always sets OVER, whichever record is kept;
- R2  priority PCC-UC > UCR (SRAR/SRAO/UCNA) > CE yellow > CE green/00 > disabled (EN=0);
- R3  UC over UC (and UCR over UCR): the first is kept, with its ADDR/MISC;
- R4  CE then UC: the second is kept entirely; R5 UC then CE: the first is kept;
- R6  CE then CE: the newest is kept unless it would downgrade a yellow threshold;
- R7  S and AR are sticky: when a retained first UCR is hit by a second UCR, the
      result carries the OR of both S/AR (UCNA then SRAR ends S=1 AR=1);
- R12 an empty bank (VAL=0) takes the error as is, without OVER.

Not modelled here (the caller does them): MCi_CTL/MCG_CTL gating (only the
predicate :func:`ctl_gates` lives here), the MCIP/CR4.MCE shutdown, MCG_STATUS
updates, CMCI signalling, the corrected-error count field. QEMU's and KVM's
deviations (second UC always overwrites, no sticky merge) are not modelled.

Pure functions: no process, no I/O, no shared memory.
"""
from __future__ import annotations

from typing import NamedTuple

from emu.hw.msr import (
    U64,
    MCi_STATUS_AR,
    MCi_STATUS_EN,
    MCi_STATUS_OVER,
    MCi_STATUS_PCC,
    MCi_STATUS_S,
    MCi_STATUS_TES,
    MCi_STATUS_TES_YELLOW,
    MCi_STATUS_UC,
    MCi_STATUS_VAL,
)

# Priority ranks returned by priority_class(); higher wins (R2).
PRIO_EMPTY = 0         # VAL=0
PRIO_CE_DISABLED = 1   # UC=0, EN=0
PRIO_CE = 2            # UC=0, EN=1, threshold 00 or green
PRIO_CE_YELLOW = 3     # UC=0, EN=1, threshold yellow (TES bits 54:53 == 10b)
PRIO_UC_DISABLED = 4   # UC=1, EN=0 (tie-break, see priority_class)
PRIO_UCR = 5           # UC=1, EN=1, PCC=0: SRAR, SRAO, UCNA
PRIO_UC_PCC = 6        # UC=1, EN=1, PCC=1

# Classes in which equal rank means "newest wins" (R6, and yellow+yellow 'either'
# resolved to the second). For every uncorrected class equal rank keeps the first (R3).
_NEWEST_WINS = frozenset((PRIO_CE_DISABLED, PRIO_CE, PRIO_CE_YELLOW))
_STICKY = MCi_STATUS_S | MCi_STATUS_AR


class BankWrite(NamedTuple):
    status: int
    addr: int
    misc: int
    kept: str  # 'new' (bank was empty), 'first' (old record retained), 'second'


def priority_class(status: int) -> int:
    """Rank of an MCi_STATUS value for the overwrite decision (PRIO_* above).

    PRIO_UC_PCC 6 > PRIO_UCR 5 > PRIO_UC_DISABLED 4 > PRIO_CE_YELLOW 3 > PRIO_CE 2
    > PRIO_CE_DISABLED 1 > PRIO_EMPTY 0.

    Tie-break for the SDM's ambiguous pair "disabled UC vs enabled CE": the SDM says
    both "enabled errors are written over disabled errors" and "uncorrected errors
    are written over corrected errors". We let **uncorrected over corrected** win:
    a disabled UC ranks above every CE (enabled or not) but below every enabled UC.
    Enabled-over-disabled still decides among uncorrected errors, so an enabled UCR
    replaces a disabled UC even when the disabled one has PCC=1. PCC only counts with
    UC=1 (architecturally PCC implies UC); yellow requires TES == 10b exactly.
    """
    if not status & MCi_STATUS_VAL:
        return PRIO_EMPTY
    if status & MCi_STATUS_UC:
        if not status & MCi_STATUS_EN:
            return PRIO_UC_DISABLED
        return PRIO_UC_PCC if status & MCi_STATUS_PCC else PRIO_UCR
    if not status & MCi_STATUS_EN:
        return PRIO_CE_DISABLED
    if (status & MCi_STATUS_TES) == MCi_STATUS_TES_YELLOW:
        return PRIO_CE_YELLOW
    return PRIO_CE


def bank_write(old_status: int, old_addr: int, old_misc: int,
               new_status: int, new_addr: int, new_misc: int) -> BankWrite:
    """Bank contents after the hardware reports ``new_*`` into a bank holding ``old_*``.

    ``old_status`` without VAL is an empty bank: the new record is written as is,
    without OVER (R12). Otherwise OVER is set (R1) and the kept record is chosen by
    rank (priority_class): a strictly higher new rank replaces the old record; equal
    rank keeps the newest for corrected classes (R6; yellow+yellow, which the SDM
    leaves as "either", keeps the second) and the first for uncorrected ones (R3).
    The kept record brings its own ADDR/MISC. When a retained UCR is hit by another
    UCR, S/AR are OR-merged (R7); a disabled UC (EN=0) is not signalled and does not
    contribute S/AR. Raises ValueError if ``new_status`` has no VAL (nothing to write).
    """
    if not new_status & MCi_STATUS_VAL:
        raise ValueError(f"bank_write: new status 0x{new_status:016X} has VAL=0")
    old_rank = priority_class(old_status)
    if old_rank == PRIO_EMPTY:
        return BankWrite(new_status & U64, new_addr, new_misc, "new")
    new_rank = priority_class(new_status)
    if new_rank > old_rank or (new_rank == old_rank and new_rank in _NEWEST_WINS):
        return BankWrite((new_status | MCi_STATUS_OVER) & U64, new_addr, new_misc, "second")
    status = old_status | MCi_STATUS_OVER
    if old_rank == PRIO_UCR and new_rank == PRIO_UCR:
        status |= new_status & _STICKY
    return BankWrite(status & U64, old_addr, old_misc, "first")


def ctl_gates(status: int, mci_ctl: int, mcg_ctl: int | None) -> bool:
    """True when an error with ``status`` is reported given the control registers.

    A UC error is reported only if MCi_CTL is all-ones and, when MCG_CTL exists
    (MCG_CTL_P; pass None otherwise), MCG_CTL is all-ones too (peers.md §7 R9, as
    QEMU/KVM do it). Corrected errors are not gated by the CTLs in this model (real
    parts may mask them per MCi_CTL bit; Xen always writes all-ones anyway).
    """
    if not status & MCi_STATUS_UC:
        return True
    return (mci_ctl & U64) == U64 and (mcg_ctl is None or (mcg_ctl & U64) == U64)
