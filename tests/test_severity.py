"""emu.xen.severity against xen-mca.md §3.1–§3.5 (Intel)."""
from __future__ import annotations

from functools import reduce
from itertools import product

import pytest

from emu.hw.msr import (
    MCi_STATUS_AR as AR,
    MCi_STATUS_EN as E,
    MCi_STATUS_OVER as O,
    MCi_STATUS_PCC as P,
    MCi_STATUS_S as S,
    MCi_STATUS_UC as U,
    MCi_STATUS_VAL as V,
)
from emu.xen.severity import (
    MCA_CMCI_HANDLER,
    MCA_MCE_SCAN,
    MCA_POLLER,
    MCA_RESET,
    MCER_CONTINUE,
    MCER_NOERROR,
    MCER_RECOVERED,
    MCER_RESET,
    deferred_preset,
    intel_check_mce_type,
    intel_need_clearbank_scan,
    intel_recoverable_scan,
    intel_srao_check,
    intel_srar_check,
    is_memerr_srao_code,
    is_memerr_srar_code,
    mcer_name,
    urgent_default_action,
    worst,
)

CE = V | E | 0x9F
UCNA = V | U | E | 0x136
SRAO = V | U | E | S | 0xC0
SRAR = V | U | E | S | AR | 0x134
PCC = V | U | E | P
SPUR = V | U            # UC, EN=0, OVER=0: "spurious"/disabled


# --- §3.1 intel_check_mce_type, each step in order ------------------------------

@pytest.mark.parametrize("status,ser,want", [
    # 1. VAL=0 → invalid, before anything else
    (0, True, "invalid"), (U | P | E | S | AR | O, True, "invalid"), (U | P, False, "invalid"),
    # 2. PCC=1 → fatal (before the UC test: PCC with UC=0 is fatal too)
    (PCC, True, "fatal"), (V | P, True, "fatal"), (V | E | P, False, "fatal"),
    (PCC | S, True, "fatal"), (V | U | P | S | AR, True, "fatal"),
    # 3. UC=0 → corrected, SER or not, whatever S/AR/OVER say
    (CE, True, "corrected"), (CE, False, "corrected"), (V | E | S | AR | O, True, "corrected"),
    (V, True, "corrected"),
    # 4. no SER → every UC is fatal
    (UCNA, False, "fatal"), (SRAO, False, "fatal"), (SRAR, False, "fatal"), (SPUR, False, "fatal"),
    # 5. S=1, AR=1: OVER=1 → fatal, else SRAR
    (SRAR, True, "srar"), (SRAR | O, True, "fatal"), (V | U | S | AR, True, "srar"),
    # 6. S=1, AR=0 → SRAO, OVER ignored
    (SRAO, True, "srao"), (SRAO | O, True, "srao"), (V | U | S, True, "srao"),
    # 7. S=0 → UCNA; OVER, EN and AR ignored (AR=1 with S=0 is UCNA)
    (UCNA, True, "ucna"), (UCNA | O, True, "ucna"), (SPUR, True, "ucna"),
    (V | U | E | AR, True, "ucna"), (V | U | AR | O, True, "ucna"),
])
def test_intel_check_mce_type(status, ser, want):
    assert intel_check_mce_type(status, ser) == want


# --- §3.2 intel_recoverable_scan --------------------------------------------------

@pytest.mark.parametrize("status,ser,want", [
    # UC=0 (even with PCC/OVER, even without SER)
    (CE, True, True), (CE, False, True), (V | E | P | O, True, True),
    # ser, EN=0, OVER=0 ("spurious"), PCC not looked at
    (SPUR, True, True), (SPUR | P, True, True), (SPUR | S | AR, True, True),
    (SPUR | O, True, False), (SPUR, False, False),
    # SRAR: ser, OVER=0, PCC=0, S=1, AR=1, EN=1
    (SRAR, True, True), (SRAR | O, True, False), (SRAR | P, True, False), (SRAR, False, False),
    # SRAO: ser, PCC=0, S=1, AR=0, EN=1 (OVER allowed)
    (SRAO, True, True), (SRAO | O, True, True), (SRAO | P, True, False), (SRAO, False, False),
    # UCNA: ser, OVER=0, EN=1, PCC=0, S=0, AR=0
    (UCNA, True, True), (UCNA | O, True, False), (UCNA | P, True, False), (UCNA, False, False),
    # listed unrecoverable examples: UC EN=1 without SER; S=0 with AR=1; PCC UC
    (V | U | E, False, False), (V | U | E | AR, True, False), (PCC, True, False),
])
def test_intel_recoverable_scan(status, ser, want):
    assert intel_recoverable_scan(status, ser) is want


# --- §3.4 intel_need_clearbank_scan --------------------------------------------------

@pytest.mark.parametrize("status,ser,want", [
    # clear if UC=0
    (CE, True, True), (CE, False, True), (CE | O, True, True),
    # ser, OVER=0, EN=0 (spurious), even with PCC
    (SPUR, True, True), (SPUR | P, True, True), (SPUR, False, False), (SPUR | O, True, False),
    # ser, OVER=0, PCC=0, S=0, AR=0 (UCNA)
    (UCNA, True, True), (UCNA, False, False), (UCNA | O, True, False),
    # otherwise log only
    (SRAO, True, False), (SRAR, True, False), (PCC, True, False), (V | U | E | AR, True, False),
])
def test_clearbank_cmci(status, ser, want):
    assert intel_need_clearbank_scan(MCA_CMCI_HANDLER, status, ser) is want


@pytest.mark.parametrize("status,ser,want", [
    # without ser: never clear
    (CE, False, False), (SPUR, False, False), (SRAO, False, False), (SRAR, False, False),
    # UC with PCC: never clear (sticky bank for post-reboot logging)
    (PCC, True, False), (SPUR | P, True, False), (PCC | S, True, False),
    (PCC | S | AR, True, False),
    # spurious: OVER=0, UC=1, EN=0
    (SPUR, True, True), (SPUR | S | AR, True, True), (SPUR | O, True, False),
    # SRAR with OVER=0; SRAR with OVER=1 logged, not cleared
    (SRAR, True, True), (SRAR | O, True, False),
    # SRAO, OVER allowed
    (SRAO, True, True), (SRAO | O, True, True),
    # CE, UCNA logged not cleared; PCC without UC is not the UC&PCC guard but still CE
    (CE, True, False), (UCNA, True, False), (UCNA | O, True, False), (V | E | P, True, False),
    (V | U | E | AR, True, False),
])
def test_clearbank_mce_scan(status, ser, want):
    assert intel_need_clearbank_scan(MCA_MCE_SCAN, status, ser) is want


@pytest.mark.parametrize("who", [MCA_POLLER, MCA_RESET])
@pytest.mark.parametrize("status,ser", list(product(
    [CE, UCNA, SRAO, SRAR, SRAR | O, PCC, SPUR, 0], [True, False])))
def test_clearbank_poller_reset_always(who, status, ser):
    assert intel_need_clearbank_scan(who, status, ser) is True


def test_clearbank_unknown_source():
    with pytest.raises(ValueError):
        intel_need_clearbank_scan(99, CE, True)


def test_sources_distinct():
    assert len({MCA_MCE_SCAN, MCA_POLLER, MCA_CMCI_HANDLER, MCA_RESET}) == 4


# --- §3.3 handler tables ---------------------------------------------------------------

@pytest.mark.parametrize("status,ser,want", [
    (PCC, True, MCER_RESET), (SRAR | O, True, MCER_RESET), (UCNA, False, MCER_RESET),
    (SRAR, True, MCER_CONTINUE), (SRAO, True, MCER_CONTINUE), (UCNA, True, MCER_CONTINUE),
    (UCNA | O, True, MCER_CONTINUE), (CE, True, MCER_CONTINUE), (0, True, MCER_CONTINUE),
])
def test_urgent_default_action(status, ser, want):
    assert urgent_default_action(status, ser) == want


SRAO_B, SRAR_B = SRAO & ~0xFFFF, SRAR & ~0xFFFF


@pytest.mark.parametrize("status,ser,want", [
    # 1. SRAO: preset CONTINUE; memerr for 0xC0–0xCF and 0x17A only (exact 16 bits)
    *[(SRAO_B | c, True, (MCER_CONTINUE, "memerr")) for c in range(0xC0, 0xD0)],
    (SRAO_B | 0x17A, True, (MCER_CONTINUE, "memerr")),
    (SRAO_B | 0x009F, True, (MCER_CONTINUE, None)),       # generic memory code: no action
    (SRAO_B | 0x00BF, True, (MCER_CONTINUE, None)), (SRAO_B | 0x00D0, True, (MCER_CONTINUE, None)),
    (SRAO_B | 0x10C0, True, (MCER_CONTINUE, None)), (SRAO_B | 0x0134, True, (MCER_CONTINUE, None)),
    (SRAO_B | (0x1234 << 16) | 0xC3, True, (MCER_CONTINUE, "memerr")),   # MSCOD ignored
    (SRAO | O, True, (MCER_CONTINUE, "memerr")),
    # 2. SRAR: preset RESET; memerr for 0x134 / 0x150 only
    (SRAR_B | 0x134, True, (MCER_RESET, "memerr")), (SRAR_B | 0x150, True, (MCER_RESET, "memerr")),
    (SRAR_B | 0x0C0, True, (MCER_RESET, None)), (SRAR_B | 0x17A, True, (MCER_RESET, None)),
    (SRAR_B | 0x1134, True, (MCER_RESET, None)),
    # 3. default: fatal → RESET, else CONTINUE
    (SRAR | O, True, (MCER_RESET, None)), (PCC | 0xC0, True, (MCER_RESET, None)),
    (SRAO, False, (MCER_RESET, None)), (SRAR, False, (MCER_RESET, None)),
    (CE, True, (MCER_CONTINUE, None)), (UCNA, True, (MCER_CONTINUE, None)),
    (V | U | E | AR | 0x134, True, (MCER_CONTINUE, None)),   # S=0 AR=1: UCNA, not SRAR
])
def test_deferred_preset(status, ser, want):
    assert deferred_preset(status, ser) == want


@pytest.mark.parametrize("status,ser,srao,srar", [
    (SRAO, True, True, False), (SRAO | O, True, True, False), (SRAR, True, False, True),
    (SRAR | O, True, False, False), (SRAO, False, False, False), (SRAR, False, False, False),
    (UCNA, True, False, False), (CE, True, False, False), (PCC | S, True, False, False),
    (SRAO & ~V, True, False, False),
])
def test_owned_error_predicates(status, ser, srao, srar):
    assert intel_srao_check(status, ser) is srao
    assert intel_srar_check(status, ser) is srar


def test_memerr_codes():
    assert [c for c in range(0x10000) if is_memerr_srao_code(c)] == [*range(0xC0, 0xD0), 0x17A]
    assert [c for c in range(0x10000) if is_memerr_srar_code(c)] == [0x134, 0x150]
    assert is_memerr_srar_code(SRAR) and not is_memerr_srar_code(SRAR_B | 0x135)


def test_mcer_order_names_worst():
    order = [MCER_NOERROR, MCER_RECOVERED, MCER_CONTINUE, MCER_RESET]
    assert order == [0, 1, 2, 3]
    assert [mcer_name(r) for r in order] == ["noerror", "recovered", "continue", "reset"]
    for a, b in product(order, order):
        assert worst(a, b) == worst(b, a) == order[max(order.index(a), order.index(b))]
    assert reduce(worst, [MCER_RECOVERED, MCER_NOERROR, MCER_CONTINUE], MCER_NOERROR) \
        == MCER_CONTINUE


# --- §3.5 summary table (Intel, SER present, broadcast) ---------------------------------

def fatal_in_mc(status: int, ser: bool) -> bool:
    """§2.3 steps 5 and 8 for a single bank (RIPV/EIPV not modelled here)."""
    uc, pcc = bool(status & U), bool(status & P)
    fatal_cpu = (uc or pcc) and (pcc or not intel_recoverable_scan(status, ser))
    return fatal_cpu or urgent_default_action(status, ser) == MCER_RESET


@pytest.mark.parametrize("status,ser,cleared,fatal,preset", [
    (PCC, True, False, True, (MCER_RESET, None)),                          # PCC=1 (any)
    (PCC | S | AR | 0x134, True, False, True, (MCER_RESET, None)),
    (SRAR_B | 0x134, True, True, False, (MCER_RESET, "memerr")),           # SRAR 0x134/0x150
    (SRAR_B | 0x150, True, True, False, (MCER_RESET, "memerr")),
    (SRAR_B | 0x0151, True, True, False, (MCER_RESET, None)),              # SRAR other code
    (SRAR | O, True, False, True, (MCER_RESET, None)),                     # SRAR OVER=1
    (SRAO_B | 0xC5, True, True, False, (MCER_CONTINUE, "memerr")),         # SRAO mem codes
    (SRAO_B | 0x17A, True, True, False, (MCER_CONTINUE, "memerr")),
    (SRAO_B | 0x9F, True, True, False, (MCER_CONTINUE, None)),             # SRAO other code
    (UCNA, True, False, False, (MCER_CONTINUE, None)),                     # UCNA OVER=0
    (UCNA | O, True, False, True, (MCER_CONTINUE, None)),                  # UCNA OVER=1
    (SPUR | 0x136, True, True, False, (MCER_CONTINUE, None)),              # spurious, S=0
    (SPUR | S | 0xC0, True, True, False, (MCER_CONTINUE, "memerr")),       # spurious SRAO
    (SPUR | S | 0x9F, True, True, False, (MCER_CONTINUE, None)),
    (SPUR | S | AR | 0x17A, True, True, False, (MCER_RESET, None)),        # spurious SRAR
    (SPUR | S | AR | 0x134, True, True, False, (MCER_RESET, "memerr")),
    (CE, True, False, False, (MCER_CONTINUE, None)),                       # CE only
    (UCNA, False, False, True, (MCER_RESET, None)),                        # UC without SER_P
    (SRAO, False, False, True, (MCER_RESET, None)),
])
def test_summary_table(status, ser, cleared, fatal, preset):
    assert intel_need_clearbank_scan(MCA_MCE_SCAN, status, ser) is cleared
    assert fatal_in_mc(status, ser) is fatal
    assert deferred_preset(status, ser) == preset


def test_ucna_relogged_by_cmci():
    # §3.5: a UCNA left in the bank by the #MC scan is cleared by the next CMCI logout.
    assert not intel_need_clearbank_scan(MCA_MCE_SCAN, UCNA, True)
    assert intel_need_clearbank_scan(MCA_CMCI_HANDLER, UCNA, True)
