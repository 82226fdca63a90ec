"""The expected-outcome model (emu.trial.model): tables from xen-mca.md §3 and §6, the
predicted outcomes and hazards, and agreement with real trials on a real machine."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FATAL, SRAO_MEM, UCNA, VECTORS

from emu.hw.topology import Topology
from emu.machine.config import MachineConfig
from emu.trial import model as M
from emu.trial.model import compare, expected, owners_of

TOPO = Topology(MachineConfig().validate())          # 1x2x2, 0-3:core, 4-9:package

# Statuses, named by what they are (xen-mca.md §1.2 bit layout).
SRAO_CF = 0xBD000000004000CF       # SRAO, memory scrub: memerr
SRAO_17A = 0xBD2000008000017A      # SRAO, L3 explicit writeback: memerr
SRAO_9F = 0xBD0000000000009F       # SRAO, other code: no action
SRAO_NOADDR = 0xB500000000000000   # SRAO without MISCV, code 0 (hazard K's vector)
SRAR_134 = 0xBD80000000100134      # SRAR data load
SRAR_150 = 0xBD80000000000150      # SRAR instruction fetch
SRAR_9F = 0xBD8000000000009F       # SRAR, other code
SRAR_OVER = 0xFD80000000000134
UCNA_136 = 0xBC00000000000136
UCNA_OVER = 0xFC00000000000136
UC_S0_AR1 = 0xB080000000000136     # S=0, AR=1: UCNA by type, unrecoverable
SPURIOUS = 0xA000000000000000      # UC, EN=0, OVER=0
CE = 0x9400000000000151
PCC = 0xB200000000000000


# ---------------------------------------------------------------------------------------
# §3 tables
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("status, ser, cls", [
    (0x0, True, None),
    (PCC, True, "fatal"), (PCC & ~M.UC, True, "fatal"),     # PCC before UC (§3.1 step 2)
    (CE, True, "ce"), (CE, False, "ce"),
    (SRAO_CF, False, "fatal"), (UCNA_136, False, "fatal"),   # no SER_P: every UC is fatal
    (SRAR_134, True, "srar"), (SRAR_9F, True, "srar"), (SRAR_OVER, True, "fatal"),
    (SRAO_CF, True, "srao"), (SRAO_CF | M.OVER, True, "srao"),   # OVER ignored for SRAO
    (SRAO_NOADDR, True, "srao"),
    (UCNA_136, True, "ucna"), (UCNA_OVER, True, "ucna"), (UC_S0_AR1, True, "ucna"),
    (SPURIOUS, True, "ucna"),
])
def test_classify(status, ser, cls):
    assert M.classify(status, ser) == cls


@pytest.mark.parametrize("status, ser, rec", [
    (CE, True, True), (CE, False, True),
    (SPURIOUS, True, True), (SPURIOUS | M.OVER, True, False), (SPURIOUS, False, False),
    (SRAR_134, True, True), (SRAR_OVER, True, False), (SRAR_134 | M.PCC, True, False),
    (SRAR_134 & ~M.EN, True, True),                    # EN=0, OVER=0: spurious clause
    (SRAO_CF, True, True), (SRAO_CF | M.OVER, True, True), (SRAO_CF | M.PCC, True, False),
    (UCNA_136, True, True), (UCNA_OVER, True, False), (UC_S0_AR1, True, False),
    (SRAO_CF, False, False), (PCC, True, False),
])
def test_recoverable_scan(status, ser, rec):
    assert M.recoverable(status, ser) is rec


@pytest.mark.parametrize("status, ser, clear", [
    (SRAO_CF, False, False),                          # without ser: never
    (PCC, True, False), (SRAO_CF | M.PCC, True, False),   # UC and PCC: never
    (SPURIOUS, True, True), (SPURIOUS | M.OVER, True, False),
    (SRAR_134, True, True), (SRAR_OVER, True, False),
    (SRAO_CF, True, True), (SRAO_CF | M.OVER, True, True), (SRAO_NOADDR, True, True),
    (UCNA_136, True, False), (UCNA_OVER, True, False), (CE, True, False),
    (UC_S0_AR1, True, False),
])
def test_clear_in_mce_scan(status, ser, clear):
    assert M.clearable(status, ser) is clear


@pytest.mark.parametrize("status, preset, memerr", [
    (SRAO_CF, M.CONTINUE, True), (SRAO_17A, M.CONTINUE, True),
    (0xBD000000000000C0, M.CONTINUE, True), (0xBD000000000000D0, M.CONTINUE, False),
    (SRAO_9F, M.CONTINUE, False), (SRAO_NOADDR, M.CONTINUE, False),
    (SRAR_134, M.RESET, True), (SRAR_150, M.RESET, True), (SRAR_9F, M.RESET, False),
    (0xBD80000000000135, M.RESET, False),             # exact MCACOD match only
    (PCC, M.RESET, False), (UCNA_136, M.CONTINUE, False), (CE, M.CONTINUE, False),
])
def test_deferred_handler_table(status, preset, memerr):
    assert M.deferred_preset(status) == (preset, memerr)


@pytest.mark.parametrize("mcg, fatal", [(0x5, False), (0x7, False), (0x4, True), (0x6, True),
                                        (0x1, False)])
def test_urgent_ripv_rule_in_xen_context(mcg, fatal):
    assert M.urgent_fatal(mcg) is fatal
    assert M.urgent_fatal(0x6, in_guest=True) is False   # RIPV=0, EIPV=1 in a guest


def _vectors(name: str) -> list:
    """The reference vectors, copied into tests/data (see conftest)."""
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))["vectors"]


CONSOLIDATED = _vectors("consolidated_bank_overwrite.json")


@pytest.mark.parametrize("vec", CONSOLIDATED, ids=[v["id"] for v in CONSOLIDATED])
def test_bank_write_follows_the_sdm_vectors(vec):
    first, second = int(vec["first"]["status"], 16), int(vec["second"]["status"], 16)
    (st, addr, misc), kept = M.bank_write((first, 0x1000, 0x86), (second, 0x2000, 0x8C))
    want = vec["sdm"]
    assert bool(st & M.OVER) == bool(want["OVER"])
    if want["kept"] in ("first", "second"):
        assert kept == want["kept"]
    assert (addr, misc) == ((0x1000, 0x86) if kept == "first" else (0x2000, 0x8C))
    if want["sticky_flags"] is not None:
        assert (bool(st & M.S), bool(st & M.AR)) == (bool(want["sticky_flags"]["S"]),
                                                     bool(want["sticky_flags"]["AR"]))
    assert M.bank_write((0, 0, 0), (second, 1, 2)) == ((second, 1, 2), "new")


@pytest.mark.parametrize("mfn, kind, dom, ret, names", [
    (0x010, "xen_text", M.DOMID_XEN, -M.EPERM, {"XENPAGE", "FAILED"}),
    (0x100, "xen_heap", M.DOMID_XEN, 0, {"PENDING", "XENPAGE"}),
    (0x17F, "xen_heap", M.DOMID_XEN, 0, {"PENDING", "XENPAGE"}),
    (0x180, "free", None, 0, {"OFFLINED"}),
    (0x200, "domain", 0, 0, {"PENDING", "OWNED"}),
    (0x11FF, "domain", 0, 0, {"PENDING", "OWNED"}),
    (0x1200, "domain", 1, 0, {"PENDING", "OWNED"}),
    (0x2200, "free", None, 0, {"OFFLINED"}),          # beyond the last domain (guests=1)
    (0x4000, "invalid", None, -M.EINVAL, set()),      # beyond memory_pages
])
def test_memory_map_and_offline_page(mfn, kind, dom, ret, names):
    assert M.page_kind(mfn, guests=1) == (kind, dom)
    r, got, crash = M.offline_page(kind, dom, False)
    assert (r, set(got), crash) == (ret, names, None)
    if kind == "domain":   # already broken and still owned: AGAIN, the owner crashed
        assert M.offline_page(kind, dom, True) == (0, frozenset({"AGAIN"}), dom)


# ---------------------------------------------------------------------------------------
# predictions (pure)
# ---------------------------------------------------------------------------------------
def err(cpu, bank, status, addr=None, misc=None, mcg=None, domain=None) -> str:
    s = f"cpu={cpu} bank={bank} status={status:#x}"
    for k, v in (("addr", addr), ("misc", misc), ("mcg", mcg), ("domain", domain)):
        if v is not None:
            s += f" {k}={v:#x}"
    return s


def mem(cpu, bank, status, addr, mcg=0x5, domain=None) -> str:
    return err(cpu, bank, status, addr, 0x86, mcg, domain)


OUTCOME_TABLE = [
    # (specs, kwargs, outcome, panic prefix, first error's action, terminal)
    ([SRAO_MEM], {}, "recovered", None, "recovered", "dom0"),
    ([mem(0, 8, SRAO_CF, 0x100020)], {}, "continued", None, "continue", "dom0"),   # heap
    ([mem(0, 8, SRAO_CF, 0x010020)], {}, "continued", None, "continue", "dom0"),   # text
    ([mem(0, 8, SRAO_CF, 0x4000020)], {}, "continued", None, "continue", "dom0"),  # no RAM
    ([mem(0, 7, SRAO_17A, 0x5020, domain=1)], {}, "recovered", None, "recovered", "vmce"),
    ([mem(0, 7, SRAO_17A, 0x5020, domain=0)], {}, "recovered", None, "recovered", "vmce"),
    ([err(0, 8, SRAO_CF, 0x180020, 0x46, 0x5)], {}, "continued", None, "continue", "dom0"),
    ([err(0, 8, SRAO_9F, 0x180020, 0x86, 0x5)], {}, "continued", None, "continue", "dom0"),
    ([mem(0, 8, SRAR_134, 0x181000)], {}, "recovered", None, "recovered", "dom0"),
    ([mem(0, 8, SRAR_150, 0x6000, domain=1)], {}, "recovered", None, "recovered", "vmce"),
    ([mem(0, 8, SRAR_134, 0x100020)], {}, "reset", M.PANIC_UCR, "reset", "lost"),
    ([mem(0, 8, SRAR_134, 0x010020)], {}, "reset", M.PANIC_UCR, "reset", "lost"),
    ([mem(0, 1, SRAR_9F, 0x185000, mcg=0x7)], {}, "reset", M.PANIC_UCR, "reset", "lost"),
    ([mem(0, 8, SRAR_OVER, 0x181000)], {}, "reset", M.PANIC_FATAL + "0,1,2,3", None, "boot"),
    ([err(0, 0, UCNA_OVER, mcg=0x5)], {}, "reset", M.PANIC_FATAL + "0,1", None, "boot"),
    ([err(0, 0, UC_S0_AR1, mcg=0x5)], {}, "reset", M.PANIC_FATAL + "0,1", None, "boot"),
    ([FATAL], {}, "reset", M.PANIC_FATAL + "0,1,2,3", None, "boot"),
    ([UCNA], {}, "continued", None, "continue", "dom0"),
    ([err(0, 4, SPURIOUS, mcg=0x5)], {}, "continued", None, "continue", "dom0"),
    ([err(3, 2, CE)], {}, "continued", None, None, "dom0"),
    ([SRAO_MEM], {"ser": False}, "reset", M.PANIC_FATAL + "0,1,2,3", None, "boot"),
    ([SRAO_MEM.replace("mcg=0x5", "mcg=0x4")], {"local": True}, "reset",
     M.PANIC_FATAL + "0", None, "lost"),
    ([mem(2, 1, SRAO_CF, 0x183000)], {"local": True}, "recovered", None, "recovered", "dom0"),
    ([err(1, 2, CE, mcg=0x5)], {"local": True}, "hang", None, None, "boot"),     # hazard C
    ([mem(1, 2, SRAO_CF, 0x183000)], {"local": True, "broadcast": False}, "recovered", None,
     "recovered", "dom0"),
    # two vMCEs to one domain in one #MC: the second finds vCPU0's MCIP still set
    ([mem(0, 8, SRAO_CF, 0x3000, domain=0), mem(0, 9, SRAR_134, 0x4000, domain=0)], {},
     "reset", M.PANIC_UCR, "recovered", "lost"),
    ([mem(0, 8, SRAO_CF, 0x3000, domain=1), mem(0, 9, SRAO_CF, 0x4000, domain=1)], {},
     "continued", None, "recovered", "vmce"),
    ([mem(0, 8, SRAO_CF, 0x3000, domain=0), mem(0, 9, SRAO_CF, 0x4000, domain=0)], {},
     "reset", M.PANIC_HWDOM, "recovered", "lost"),
    # policy dom0: the vMCE goes to Dom0 with the machine address
    ([mem(0, 8, SRAO_CF, 0x5020, domain=1)], {"vmce_policy": "dom0"}, "recovered", None,
     "recovered", "vmce"),
    # a fatal error next to a clearable one: the clearable one's record dies in the reset
    ([FATAL, mem(2, 8, SRAO_CF, 0x183000)], {}, "reset", M.PANIC_FATAL, None, "boot"),
    # the pool is empty: no telemetry, no action, the banks still cleared
    ([SRAO_MEM], {"pool_exhausted": True}, "continued", None, None, "lost"),
    ([FATAL], {"pool_exhausted": True}, "reset", M.PANIC_FATAL + "0,1,2,3", None, "boot"),
]


@pytest.mark.parametrize("specs, kw, outcome, panic, action, terminal", OUTCOME_TABLE)
def test_predicted_outcomes(specs, kw, outcome, panic, action, terminal):
    kw = dict(kw)
    kw.setdefault("owners", [[0]] * len(specs))
    if kw.get("local") or kw.get("broadcast") is False:
        kw["owners"] = [[int(specs[0].split()[0][4:])]] * len(specs)
    exp = expected(specs, TOPO, **kw)
    assert exp["outcome"] == outcome, exp
    assert exp["outcomes"] == [outcome]
    if panic is None:
        assert exp["panic"] is None
    else:
        assert exp["panic"].startswith(panic), exp["panic"]
    e = exp["errors"][0]
    assert e["action"] == action and e["terminal"] == terminal, e
    assert exp["resets"] == (1 if outcome in M.RESET_OUTCOMES else 0)


def test_page_offline_and_vmce_details():
    exp = expected([mem(0, 7, SRAO_17A, 0x5020, domain=1)], TOPO, owners=[[2]])
    e = exp["errors"][0]
    assert e["addr"] == "0x0000000001205020"                  # 0x1200 + 5, offset 0x20
    assert e["page_offline"] == {"mfn": 0x1205, "ret": 0, "status": ["OWNED", "PENDING"]}
    assert e["impacted_domain"] == 1 and e["vmce_target"] == 1
    assert e["vmce"] == {"domain": 1, "broadcast": True, "vcpus": [0, 1],
                         "gaddr": "0x0000000000005020"}
    assert exp["broken_after"] == [0x1205]
    exp = expected([mem(0, 7, SRAO_17A, 0x5020, domain=1)], TOPO, owners=[[2]],
                   vmce_policy="dom0")
    assert exp["errors"][0]["vmce"]["gaddr"] == "0x0000000001205020"   # a machine address
    assert exp["errors"][0]["vmce"]["domain"] == 0
    # the same guest page again: AGAIN, the guest crashed, Xen continues
    exp = expected([mem(0, 7, SRAO_17A, 0x5040, domain=1)], TOPO, owners=[[2]],
                   broken_mfns=[0x1205])
    assert exp["outcome"] == "continued" and exp["crashed"] == [1]
    assert exp["errors"][0]["page_offline"]["status"] == ["AGAIN"]


def test_non_clearable_is_logged_by_every_target_sharer_and_stays():
    exp = expected([UCNA], TOPO)
    e = exp["errors"][0]
    assert e["owners"] == [0, 1, 2, 3] and not e["cleared"] and not e["clearable"]
    assert [h["id"] for h in exp["hazards"]] == ["H"]
    assert [(x["bank"], x["status"]) for x in exp["left_valid"]] == [(6, 0xBC20000080000136)]
    # left in the bank, it is logged again by the next #MC and merges with a new UCR
    nxt = expected([mem(1, 6, SRAR_134, 0x181000)], TOPO, stale=exp["left_valid"])
    assert nxt["errors"][0]["kept"] == "first" and nxt["outcome"] == "reset"
    assert nxt["boot_log"] == [{"cpu": 0, "bank": 6, "status": "0xFDA0000080000136"}]
    # core-scoped: the two threads of the core
    assert expected([err(2, 1, UCNA_136, mcg=0x5)], TOPO)["errors"][0]["owners"] == [2, 3]


def test_hazard_k_the_outcome_follows_the_owner():
    spec = [err(0, 1, SRAO_NOADDR, mcg=0x4)]            # core bank, RIPV=0 on CPU 0 only
    both = expected(spec, TOPO)                        # owner unknown: either way
    assert both["outcome"] is None and both["outcomes"] == ["continued", "reset"]
    assert both["owner_dependent"] and {"I", "K"} <= {h["id"] for h in both["hazards"]}
    sib = expected(spec, TOPO, owners=[[1]])
    assert sib["outcome"] == "continued"
    [k] = [h for h in sib["hazards"] if h["id"] == "K"]
    assert k["text"].startswith("today's Xen continues; hazard K") and "cpu1" in k["text"]
    own = expected(spec, TOPO, owners=[[0]])
    assert own["outcome"] == "reset" and own["panic"] == M.PANIC_FATAL + "0"
    assert not any(h["id"] == "K" for h in own["hazards"])
    srar = expected([mem(0, 1, SRAR_134, 0x181000, mcg=0x6)], TOPO, owners=[[1]])
    assert srar["outcome"] == "recovered" and any(h["id"] == "K" for h in srar["hazards"])
    # a thread-private bank always resets
    topo = Topology(MachineConfig(bank_scopes="0-3:thread,4-9:package").validate())
    assert expected(spec, topo)["outcomes"] == ["reset"]


def test_hazard_b_no_valid_bank_anywhere():
    exp = expected([], TOPO)
    assert exp["outcome"] == "continued" and exp["panic"] is None
    assert [h["id"] for h in exp["hazards"]] == ["B"]
    lm = expected([], TOPO, local=True)                 # LMCE: the CPU checks itself
    assert lm["outcome"] == "reset" and lm["panic"] == M.PANIC_NO_ERROR


def test_hazard_e_no_telemetry_skips_the_ripv_check():
    exp = expected([err(0, 1, SRAO_NOADDR, mcg=0x4)], TOPO, owners=[[0]],
                   pool_exhausted=True)
    assert exp["outcome"] == "continued"
    assert any(h["id"] == "E" for h in exp["hazards"])
    assert exp["errors"][0]["terminal"] == "lost" and exp["errors"][0]["cleared"]


def test_owner_dependent_record_grouping_changes_the_outcome():
    # A CE in core 0's bank and an SRAO in a package bank: whoever owns the SRAO also
    # carries the CE in its record when it is a CPU of core 0 (default: CONTINUE).
    specs = [err(0, 0, CE), mem(3, 8, SRAO_CF, 0x188000)]
    assert expected(specs, TOPO)["outcomes"] == ["recovered", "continued"]
    assert expected(specs, TOPO, owners=[None, [2]])["outcome"] == "recovered"
    assert expected(specs, TOPO, owners=[None, [1]])["outcome"] == "continued"


def test_nested_second_mc():
    first, second = mem(0, 8, SRAO_CF, 0x190000), mem(1, 9, SRAO_CF, 0x191000)
    post = expected([first], TOPO, then={"errors": [second],
                                         "after_phase": "softirq_worker"}, owners=[[0], [1]])
    assert post["outcome"] == "recovered" and len(post["errors"]) == 2
    assert [e["action"] for e in post["errors"]] == ["recovered", "recovered"]
    # Some CPUs may be in mce_softirq and others not yet: uneven rounds can hang.
    uneven = expected([first], TOPO, then={"errors": [second], "after_phase": "softirq"},
                      owners=[[0], [1]])
    assert uneven["outcomes"] == ["recovered", "hang"]
    assert any(h["id"] == "D" for h in uneven["hazards"])
    assert uneven["errors"][1]["owners"] == [1] and "owners" not in uneven["errors"][1][
        "uncertain"] and "action" in uneven["errors"][1]["uncertain"]
    pre = expected([first], TOPO, then={"errors": [second], "after_phase": "barrier_b"},
                   owners=[[0], []])
    assert pre["outcomes"] == ["recovered", "shutdown", "hang"]
    fatal = expected([FATAL], TOPO, then={"errors": [second], "after_phase": "softirq"})
    assert fatal["outcome"] == "shutdown"                # MCIP still set after the panic
    assert {b["bank"] for b in fatal["boot_log"]} == {5, 9}


def test_spec_forms_and_bad_input():
    as_dict = {"cpu": 0, "bank": 8, "status": SRAO_CF, "addr": 0x180020, "misc": 0x86,
               "mcg": 5}
    assert expected([as_dict], TOPO, owners=[[1]]) == expected([SRAO_MEM], TOPO, owners=[[1]])
    from emu.errors import UsageError
    with pytest.raises(UsageError) as ei:
        expected(["cpu=9 bank=1 status=0x8000000000000000"], TOPO)
    assert ei.value.field == "error[0].cpu"
    with pytest.raises(UsageError):
        expected([SRAO_MEM], TOPO, vmce_policy="guest")
    with pytest.raises(UsageError):
        expected(["cpu=0 bank=1"], TOPO)


# ---------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------
def _fake_result(exp: dict) -> dict:
    """A trial result that says exactly what the prediction says."""
    errs = []
    for e in exp["errors"]:
        r = {k: e[k] for k in ("cpu", "bank", "bank_status", "kept", "clearable", "owners",
                               "cleared", "action", "impacted_domain")}
        r["class"] = "corrected" if e["class"] == "ce" else e["class"]
        if e["page_offline"]:
            r["page_offline"] = dict(e["page_offline"],
                                     status=e["page_offline"]["status"] + ["BROKEN"])
        if e["vmce"]:
            r["vmce"] = dict(e["vmce"])
        r["dom0_log"] = ({"dom0": [{"count": 1, "source": "mce"}],
                          "vmce": [{"count": 1, "source": "mce"}],
                          "boot": [{"count": 1, "source": "boot"}]}.get(e["terminal"], []))
        if e["terminal"] in ("lost", "unseen"):
            r["lost"] = "reason"
        errs.append(r)
    return {"outcome": exp["outcome"], "resets": exp["resets"], "panic": exp["panic"],
            "targets": exp["targets"], "boot_log": exp["boot_log"], "errors": errs,
            "domains": [{"domid": 0, "state": "running"}, {"domid": 1, "state": "running"}]}


def test_compare_finds_each_kind_of_disagreement():
    exp = expected([mem(0, 7, SRAO_17A, 0x5020, domain=1), UCNA], TOPO, owners=[[2], None])
    good = _fake_result(exp)
    assert compare(exp, good) == []
    muts = {
        "outcome": lambda r: r.update(outcome="reset"),
        "class": lambda r: r["errors"][1].update({"class": "srao"}),
        "owners": lambda r: r["errors"][1].update(owners=[1]),
        "cleared": lambda r: r["errors"][0].update(cleared=False),
        "action": lambda r: r["errors"][0].update(action="continue"),
        "page_offline": lambda r: r["errors"][0]["page_offline"].update(mfn=0x1206),
        "vmce": lambda r: r["errors"][0]["vmce"].update(domain=0),
        "terminal": lambda r: r["errors"][1].update(dom0_log=[], lost="pool"),
        "targets": lambda r: r.update(targets=[0]),
        "DOM1": lambda r: r["domains"][1].update(state="crashed"),
    }
    for what, mut in muts.items():
        bad = copy.deepcopy(good)
        mut(bad)
        found = compare(exp, bad)
        assert found and any(what in f for f in found), (what, found)


def test_compare_skips_what_the_owner_decides_when_owners_are_unknown():
    exp = expected([err(0, 1, SRAO_NOADDR, mcg=0x4)], TOPO)
    r = _fake_result(expected([err(0, 1, SRAO_NOADDR, mcg=0x4)], TOPO, owners=[[1]]))
    assert compare(exp, r) == []
    r["outcome"] = "recovered"
    assert compare(exp, r)[0].startswith("outcome")


# ---------------------------------------------------------------------------------------
# agreement with real trials
# ---------------------------------------------------------------------------------------
REAL = [
    ([SRAO_MEM], {}),
    ([mem(1, 9, SRAO_CF, 0x181020)], {}),
    ([err(0, 1, SRAO_NOADDR, mcg=0x4)], {}),
    ([err(0, 1, SRAO_NOADDR, mcg=0x4)], {}),
    ([err(2, 3, SRAO_NOADDR, mcg=0x4)], {}),
    ([mem(0, 1, SRAR_134, 0x182000, mcg=0x6)], {}),
    ([mem(3, 2, SRAR_134, 0x183000, mcg=0x6)], {}),
    ([mem(0, 7, SRAO_17A, 0x5020, domain=1)], {}),
    ([mem(1, 8, SRAO_CF, 0x6020, domain=0)], {}),
    ([mem(2, 8, SRAR_134, 0x7020, domain=1)], {}),
    ([mem(0, 8, SRAO_CF, 0x100020)], {}),
    ([mem(0, 7, SRAO_17A, 0x010020)], {}),
    ([mem(0, 8, SRAR_134, 0x101020)], {}),
    ([mem(0, 8, SRAO_CF, 0x4000020)], {}),
    ([err(0, 8, SRAO_CF, 0x184000, 0x46, 0x5)], {}),
    ([mem(0, 1, SRAR_9F, 0x185000, mcg=0x7)], {}),
    ([FATAL], {}),
    ([err(1, 2, PCC, mcg=0x5)], {}),
    ([UCNA], {}),
    ([err(2, 1, UCNA_136, mcg=0x5)], {}),
    ([err(0, 0, UCNA_OVER, mcg=0x5)], {}),
    ([err(0, 4, SPURIOUS, mcg=0x5)], {}),
    ([err(3, 2, CE)], {}),
    ([err(0, 0, CE), mem(3, 8, SRAO_CF, 0x186000)], {}),
    ([FATAL, mem(2, 8, SRAO_CF, 0x187000)], {}),
    ([err(0, 1, UCNA_136, mcg=0x5), mem(1, 1, SRAR_134, 0x188000)], {}),
    ([mem(0, 8, SRAO_CF, 0x8000, domain=1), mem(1, 9, SRAO_CF, 0x9000, domain=1)], {}),
    ([mem(2, 1, SRAO_CF, 0x189000)], {"local": True}),
    ([mem(0, 8, SRAO_CF, 0x18A000, mcg=0x4)], {"local": True}),
    ([mem(1, 8, SRAO_CF, 0x18B000), mem(3, 2, SRAO_CF, 0x18C000)], {"local": True}),
    ([err(1, 2, CE, mcg=0x5)], {"local": True, "timeout_s": 0.3}),          # hazard C
    ([mem(0, 8, SRAO_CF, 0x190000)],
     {"then": {"errors": [mem(1, 9, SRAO_CF, 0x191000)], "after_phase": "softirq_worker"}}),
    ([mem(0, 8, SRAO_CF, 0x192000)],
     {"then": {"errors": [mem(1, 9, SRAO_CF, 0x193000)], "after_phase": "exit"}}),
]


def test_the_model_agrees_with_real_trials(emu_machine):
    m = emu_machine(topology="1x2x2")
    cfg = m.config
    stale, broken, found, seen = [], set(), [], set()
    for i, (specs, kw) in enumerate(REAL):
        r = m.inject(specs, **kw)
        exp = expected(specs, TOPO, owners=owners_of(r), stale=stale, broken_mfns=broken,
                       local=kw.get("local", False), then=kw.get("then"), ser=cfg.ser,
                       broadcast=cfg.mce_broadcast, vmce_policy=cfg.vmce_policy,
                       guests=cfg.guests, guest_vcpus=cfg.guest_vcpus)
        found += [f"trial {i} {specs}: {d}" for d in compare(exp, r)]
        seen.add(r["outcome"])
        stale, broken = exp["left_valid"], set(exp["broken_after"])
        if stale or exp["crashed"]:      # leave the next trial a clean machine
            m.reset()
            stale, broken = [], set()
    assert found == []
    assert {"recovered", "continued", "reset"} <= seen


def test_model_imports_nothing_of_the_handler():
    """Independence: the model's own imports are the standard library, emu.errors and
    emu.hw.msr, and importing it loads nothing of emu.xen."""
    import ast
    src = Path(M.__file__).read_text(encoding="utf-8")
    mods = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            mods |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mods.add(node.module + "".join(f".{a.name}" for a in node.names
                                           if node.module == "emu.hw"))
    ours = {m for m in mods if m.split(".")[0] == "emu"}
    assert ours <= {"emu.errors", "emu.hw.msr"}, ours
    assert all(m.split(".")[0] in sys.stdlib_module_names | {"emu", "__future__"}
               for m in mods), mods
    code = ("import json, sys, emu.trial.model; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('emu.xen'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, cwd=Path(M.__file__).resolve().parents[2]).stdout
    assert json.loads(out) == []
