"""emu.hw.overwrite against the SDM columns of the shared overwrite vectors."""
from __future__ import annotations

import pytest
from conftest import load_vectors

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
from emu.hw.overwrite import (
    PRIO_CE,
    PRIO_CE_DISABLED,
    PRIO_CE_YELLOW,
    PRIO_EMPTY,
    PRIO_UC_DISABLED,
    PRIO_UC_PCC,
    PRIO_UCR,
    BankWrite,
    bank_write,
    ctl_gates,
    priority_class,
)

CONSOLIDATED = load_vectors("consolidated_bank_overwrite.json")["vectors"]
SDM_RULES = load_vectors("sdm_overwrite_rules.json")["vectors"]

# Distinct ADDR/MISC per record so that "ADDR/MISC of the kept record" is observable.
A1, M1, A2, M2 = 0x1111_0000, 0x86, 0x2222_0000, 0x8C
STICKY = MCi_STATUS_S | MCi_STATUS_AR

# Named statuses, taken from the consolidated vectors themselves.
NAMED = {}
for _v in CONSOLIDATED:
    for _side in ("first", "second"):
        NAMED[_v[_side]["name"]] = int(_v[_side]["status"], 16)


def _bit(status: int, mask: int) -> int:
    return int(bool(status & mask))


def _reset_required(status: int) -> bool:
    # R8: after an overflow, a reset is required only if AR or PCC ends up set.
    return bool(status & (MCi_STATUS_AR | MCi_STATUS_PCC))


# --- consolidated_bank_overwrite.json, sdm column ------------------------------

@pytest.mark.parametrize("vec", CONSOLIDATED, ids=[v["id"] for v in CONSOLIDATED])
def test_consolidated_sdm(vec):
    first, second = int(vec["first"]["status"], 16), int(vec["second"]["status"], 16)
    exp = vec["sdm"]
    r = bank_write(first, A1, M1, second, A2, M2)
    assert isinstance(r, BankWrite)
    assert _bit(r.status, MCi_STATUS_OVER) == exp["OVER"]
    if exp["kept"] in ("first", "second"):
        assert r.kept == exp["kept"]
    else:
        assert exp["kept"] in ("ambiguous", "either"), exp["kept"]
        assert r.kept in ("first", "second")
    src, addr, misc = (first, A1, M1) if r.kept == "first" else (second, A2, M2)
    assert (r.addr, r.misc) == (addr, misc)
    sticky = exp["sticky_flags"]
    if sticky is not None:
        assert _bit(r.status, MCi_STATUS_S) == sticky["S"]
        assert _bit(r.status, MCi_STATUS_AR) == sticky["AR"]
        assert not r.status & MCi_STATUS_PCC           # the note: PCC=0, OVER=1
        assert r.status & ~STICKY == (src | MCi_STATUS_OVER) & ~STICKY
    else:
        # Apart from OVER, the kept record is unchanged.
        assert r.status == src | MCi_STATUS_OVER


def test_consolidated_ids_unique_and_nonempty():
    ids = [v["id"] for v in CONSOLIDATED]
    assert ids and len(ids) == len(set(ids))


# --- sdm_overwrite_rules.json (Table 15-7 and 15-2) ----------------------------

_SDM_NAMES = {
    "CE": ["CE"], "UCNA": ["UCNA"], "SRAO": ["SRAO"], "SRAR": ["SRAR"],
    "UC(PCC=1)": ["UC_PCC"], "CE 00/green": ["CE"], "CE yellow": ["CE_yellow"],
    "CE any colour": ["CE", "CE_yellow"], "UC": ["UCNA", "SRAO", "SRAR", "UC_PCC"],
}
SDM_CASES = [
    pytest.param(v, f, s, id=f"{v['table']}:{v['first']}>{v['second']}[{f}>{s}]")
    for v in SDM_RULES for f in _SDM_NAMES[v["first"]] for s in _SDM_NAMES[v["second"]]
]


def _expected_bit(expr, ucr_name: str):
    """Value of an S/AR/UC/PCC column: int, 'undefined' (None) or a UCR expression."""
    if isinstance(expr, int):
        return expr
    if expr == "undefined":
        return None
    table = {"0 if UCNA else 1": int(ucr_name != "UCNA"),
             "1 if SRAR else 0": int(ucr_name == "SRAR")}
    return table[expr]  # KeyError = a new expression this test does not understand


@pytest.mark.parametrize("vec,fname,sname", SDM_CASES)
def test_sdm_rules(vec, fname, sname):
    first, second = NAMED[fname], NAMED[sname]
    exp = vec["sdm"]
    r = bank_write(first, A1, M1, second, A2, M2)
    ucr = sname if fname.startswith("CE") else fname
    for col, mask in (("UC", MCi_STATUS_UC), ("PCC", MCi_STATUS_PCC),
                      ("S", MCi_STATUS_S), ("AR", MCi_STATUS_AR), ("OVER", MCi_STATUS_OVER)):
        if col in exp:
            want = _expected_bit(exp[col], ucr)
            if want is not None:
                assert _bit(r.status, mask) == want, col
    frm = exp["bank_info_from"]
    if frm == "either":
        assert r.kept in ("first", "second")
    else:
        assert r.kept == frm
    assert (r.addr, r.misc) == ((A1, M1) if r.kept == "first" else (A2, M2))
    reset = exp.get("system_reset_required")
    if reset is not None:
        want = {"yes": True, "no": False,
                "yes if AR=1": bool(r.status & MCi_STATUS_AR)}[reset]
        assert _reset_required(r.status) == want
    colour = exp.get("threshold_colour")
    if colour == "yellow":
        assert r.status & MCi_STATUS_TES == MCi_STATUS_TES_YELLOW
    elif colour == "00/green":
        assert r.status & MCi_STATUS_TES != MCi_STATUS_TES_YELLOW
    else:
        assert colour in (None, "undefined")


# --- rules not (or not fully) pinned by the vectors ----------------------------

@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("empty", [0, MCi_STATUS_UC | MCi_STATUS_OVER | 0x9F])
def test_empty_bank_written_as_is(name, empty):
    # R12: VAL=0 is empty whatever other bits linger; no OVER is added.
    r = bank_write(empty, A1, M1, NAMED[name], A2, M2)
    assert r == BankWrite(NAMED[name], A2, M2, "new")
    assert not r.status & MCi_STATUS_OVER


def test_software_clear_then_next_error_has_no_over():
    r = bank_write(0, 0, 0, NAMED["SRAO"], A1, M1)
    r = bank_write(r.status, r.addr, r.misc, NAMED["CE"], A2, M2)
    assert r.kept == "first" and r.status & MCi_STATUS_OVER
    r = bank_write(0, 0, 0, NAMED["CE"], A2, M2)       # after writing 0 to MCi_STATUS
    assert r.kept == "new" and not r.status & MCi_STATUS_OVER


def test_sticky_chain_ucna_srar_srao_ce():
    r = bank_write(0, 0, 0, NAMED["UCNA"], A1, M1)
    for nxt in ("SRAR", "SRAO", "CE", "UCNA"):
        r = bank_write(r.status, r.addr, r.misc, NAMED[nxt], A2, M2)
        assert r.kept == "first"
    assert r.status & STICKY == STICKY and r.status & MCi_STATUS_OVER
    assert (r.status & 0xFFFF, r.addr, r.misc) == (0x136, A1, M1)  # UCNA's own record


def test_retained_ucr_does_not_take_s_ar_from_disabled_uc():
    # UC_disabled (EN=0) carries S=1 but is not signalled: no merge.
    r = bank_write(NAMED["UCNA"], A1, M1, NAMED["UC_disabled"], A2, M2)
    assert r.kept == "first" and not r.status & MCi_STATUS_S


def test_pcc_not_merged_into_retained_pcc():
    r = bank_write(NAMED["UC_PCC"], A1, M1, NAMED["SRAR"], A2, M2)
    assert r.status == NAMED["UC_PCC"] | MCi_STATUS_OVER


@pytest.mark.parametrize("ce", ["CE", "CE_yellow"])
def test_ambiguous_tiebreak_uncorrected_beats_corrected(ce):
    # Documented tie-break: a disabled UC is kept over an enabled CE, both orders.
    assert bank_write(NAMED[ce], A1, M1, NAMED["UC_disabled"], A2, M2).kept == "second"
    assert bank_write(NAMED["UC_disabled"], A1, M1, NAMED[ce], A2, M2).kept == "first"


def test_enabled_ucr_beats_disabled_pcc():
    disabled_pcc = MCi_STATUS_VAL | MCi_STATUS_UC | MCi_STATUS_PCC
    assert bank_write(disabled_pcc, A1, M1, NAMED["UCNA"], A2, M2).kept == "second"
    assert bank_write(NAMED["UCNA"], A1, M1, disabled_pcc, A2, M2).kept == "first"


def test_same_class_newest_only_for_corrected():
    assert bank_write(NAMED["CE_disabled"], A1, M1, NAMED["CE_disabled"], A2, M2).kept == "second"
    assert bank_write(NAMED["UC_disabled"], A1, M1, NAMED["UC_disabled"], A2, M2).kept == "first"
    # yellow + yellow is "either" in the SDM: we keep the second.
    assert bank_write(NAMED["CE_yellow"], A1, M1, NAMED["CE_yellow"], A2, M2).kept == "second"


def test_new_without_val_rejected():
    with pytest.raises(ValueError):
        bank_write(NAMED["CE"], A1, M1, NAMED["CE"] & ~MCi_STATUS_VAL, A2, M2)


def test_priority_class_ranks():
    order = [0, NAMED["CE_disabled"], NAMED["CE"], NAMED["CE_yellow"], NAMED["UC_disabled"],
             NAMED["UCNA"], NAMED["UC_PCC"]]
    ranks = [PRIO_EMPTY, PRIO_CE_DISABLED, PRIO_CE, PRIO_CE_YELLOW, PRIO_UC_DISABLED,
             PRIO_UCR, PRIO_UC_PCC]
    assert [priority_class(s) for s in order] == ranks == sorted(set(ranks))
    assert priority_class(NAMED["SRAO"]) == priority_class(NAMED["SRAR"]) == PRIO_UCR
    green = MCi_STATUS_VAL | MCi_STATUS_EN | (1 << 53)
    assert priority_class(green) == PRIO_CE
    assert priority_class(MCi_STATUS_VAL | MCi_STATUS_EN | MCi_STATUS_TES) == PRIO_CE


# --- MCi_CTL / MCG_CTL gating --------------------------------------------------

@pytest.mark.parametrize("status,mci_ctl,mcg_ctl,reported", [
    (NAMED["SRAR"], U64, None, True),
    (NAMED["SRAR"], U64, U64, True),
    (NAMED["SRAR"], 0, None, False),
    (NAMED["SRAR"], U64 >> 1, U64, False),
    (NAMED["UC_PCC"], U64, 0, False),
    (NAMED["UCNA"], U64, 0xFFFF, False),
    (NAMED["UC_disabled"], 0, None, False),
    (NAMED["CE"], 0, 0, True),               # CE is not gated in this model
    (NAMED["CE_yellow"], 0, None, True),
])
def test_ctl_gates(status, mci_ctl, mcg_ctl, reported):
    assert ctl_gates(status, mci_ctl, mcg_ctl) is reported


def test_mcg_ctl_absent_differs_from_zero():
    assert ctl_gates(NAMED["UCNA"], U64, None) and not ctl_gates(NAMED["UCNA"], U64, 0)
