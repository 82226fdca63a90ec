"""Guests and vMCE (issue 4): real guest processes over their channels.

Xen's own mce-test cases (xen-mca.md §9.2), the policies, every failure path of §6,
#GP on MSR writes (§7.2) and the isolation of domain processes.
"""
from __future__ import annotations

import json
import os

import pytest
from conftest import SRAO_MEM

from emu.hw import msr

SRAO_MEM_ERR = ("bank=8 status=0xBD000000004000CF misc=0x86 mcg=0x5", 0xBD000000000000CF)
SRAO_LLC_ERR = ("bank=7 status=0xBD2000008000017A misc=0x86 mcg=0x5", 0xBD2000000000017A)
SRAR_DATA = "bank=8 status=0xBD80000000000134 misc=0x86 mcg=0x5"
MC1_STATUS = msr.MSR_IA32_MCx_STATUS(1)


def _err(body: str, addr: int, domain: int | None = None, cpu: int = 0) -> str:
    return f"cpu={cpu} {body} addr={addr:#x}" + (f" domain={domain}" if domain is not None else "")


def _guest_console(path) -> list[str]:
    lines = []
    if not os.path.exists(path):
        return lines
    with open(path) as f:
        for raw in f:
            lines += json.loads(raw).get("console", [])
    return lines


def _domain(r, d):
    return next(x for x in r["domains"] if x["domid"] == d)


def _vmce_left_unhandled(emu_machine, **kw):
    """A machine whose guest 1 never runs its handler, after one SRAO in its memory:
    vCPU0 keeps MCIP and the bank. Returns (machine, that trial's result)."""
    m = emu_machine(extra={"guest_hooks": {1: {"ignore_vmce": True}}}, **kw)
    return m, m.inject(_err(SRAO_MEM_ERR[0], 0x180020, 1), timeout_s=0.5)


@pytest.mark.parametrize("kind", ["mem", "llc"])
@pytest.mark.parametrize("target", [0, 1])
def test_xen_srao_case_on_a_domain_page_reaches_its_own_handler(emu_machine, kind, target):
    """srao_mem/srao_llc × dom0/guest: recovered, the vMCE in the owning domain,
    whose handler read STATUS with MSCOD cleared, the guest-physical address, MISC."""
    body, seen = SRAO_MEM_ERR if kind == "mem" else SRAO_LLC_ERR
    m = emu_machine()
    gpa = 0x180020
    r = m.inject(_err(body, gpa, target))
    e = r["errors"][0]
    assert r["outcome"] == "recovered", r
    assert e["class"] == "srao" and e["action"] == "recovered"
    assert e["impacted_domain"] == target
    assert {"PENDING", "OWNED"} <= set(e["page_offline"]["status"])
    v = e["vmce"]
    assert v["domain"] == target and v["broadcast"] and v["vcpus"] == [0, 1]
    assert v["delivered"] == [0, 1] and v["guest_handled"]
    gr = v["guest_read"]
    assert gr["vcpu"] == 0 and gr["bank"] == 1
    assert int(gr["status"], 16) == seen                  # MSCOD (bits 31:16) cleared
    assert int(gr["addr"], 16) == gpa                     # the guest-physical address
    assert int(gr["misc"], 16) == 0x86 and int(gr["mcg_status"], 16) == 0x5
    # the other vCPU got MCIP|RIPV and an empty bank, and cleared MCIP too
    assert all(a["cleared_mcip"] for a in v["guest_actions"])
    assert [a["poisoned_pfn"] for a in v["guest_actions"]] == [gpa >> 12, None]
    assert [(a["vcpu"], a["mcg_status"], a["banks"]) for a in v["guest_actions"]] == [
        (0, msr.hexs(0x5), 1), (1, msr.hexs(0x5), 0)]   # vCPU1: MCIP|RIPV, empty bank
    assert r["latency_us"]["guest_handled"] > 0
    assert [d["count"] for d in e["dom0_log"]] == [1]    # and Dom0's mcelog has it once
    klog = r["dom0_log_path"] + ".kernel" if target == 0 else _domain(r, target)["log"]
    assert any("kernel page recovery" in ln for ln in _guest_console(klog))
    assert all(d["state"] == "running" for d in r["domains"])
    assert r["violations"] == []


@pytest.mark.parametrize("kind", ["mem", "llc"])
@pytest.mark.parametrize("mfn, outcome, offline", [
    (0x180, "recovered", "OFFLINED"),   # a free page: offlined at once
    (0x100, "continued", "PENDING"),    # Xen heap: offline pending, preset CONTINUE
    (0x010, "continued", "FAILED"),     # Xen text/data: offlining fails
])
def test_xen_srao_case_on_a_xen_address_follows_the_page_state(emu_machine, kind, mfn, outcome,
                                                               offline):
    body, _ = SRAO_MEM_ERR if kind == "mem" else SRAO_LLC_ERR
    m = emu_machine()
    r = m.inject(_err(body, mfn << 12 | 0x20))
    e = r["errors"][0]
    assert r["outcome"] == outcome, r
    assert offline in e["page_offline"]["status"]
    assert "vmce" not in e
    assert all(d["state"] == "running" for d in r["domains"])
    assert [d["count"] for d in e["dom0_log"]] == [1]


@pytest.mark.parametrize("kind", ["mem", "llc"])
def test_dom0_policy_sends_the_vmce_to_dom0_only(emu_machine, kind):
    body, _ = SRAO_MEM_ERR if kind == "mem" else SRAO_LLC_ERR
    m = emu_machine(vmce_policy="dom0")
    r = m.inject(_err(body, 0x180020, 1))
    e = r["errors"][0]
    assert r["outcome"] == "recovered"
    assert e["impacted_domain"] == 1              # still the page's owner
    v = e["vmce"]
    assert v["domain"] == 0 and v["guest_handled"]
    maddr = int(e["addr"], 16)
    assert maddr != 0x180020 and int(v["guest_read"]["addr"], 16) == maddr  # machine address
    assert _guest_console(_domain(r, 1)["log"]) == []   # the guest saw nothing
    kernel_log = _guest_console(r["dom0_log_path"] + ".kernel")
    assert any("kernel page recovery" in ln for ln in kernel_log)


def test_guest_that_never_clears_mcip_is_crashed_at_the_next_vmce(emu_machine):
    m, r = _vmce_left_unhandled(emu_machine)
    v = r["errors"][0]["vmce"]
    assert r["outcome"] == "recovered" and v["delivered"] == [0, 1] and not v["guest_handled"]
    r = m.inject(_err(SRAO_MEM_ERR[0], 0x181020, 1))
    e = r["errors"][0]
    assert r["outcome"] == "continued" and e["action"] == "continue"   # SRAO preset
    assert "Fill vMCE# data for DOM1 failed" in e["note"]
    d1 = _domain(r, 1)
    assert d1["state"] == "crashed" and d1["crash_reason"] == "vmce_failed"
    assert d1["process"] == "ended"
    # the rest of the machine keeps running
    r = m.inject(SRAO_MEM)
    assert r["outcome"] == "recovered" and _domain(r, 0)["state"] == "running"


def test_srar_whose_vmce_cannot_be_filled_resets_the_host(emu_machine):
    m, _ = _vmce_left_unhandled(emu_machine)
    r = m.inject(_err(SRAR_DATA, 0x181020, 1))
    e = r["errors"][0]
    assert e["class"] == "srar"
    assert r["outcome"] == "reset" and r["resets"] == 1
    assert "Software recovery failed" in r["panic"]
    # after the reset every domain is back (the guest still ignores vMCEs) and
    # a following injection on a free page recovers
    r = m.inject(SRAO_MEM)
    assert r["outcome"] == "recovered"
    assert [d["state"] for d in r["domains"]] == ["running", "running"]


def test_srar_on_a_guest_page_is_recovered_by_the_guest(emu_machine):
    m = emu_machine()
    r = m.inject(_err(SRAR_DATA, 0x180020, 1))
    e = r["errors"][0]
    assert e["class"] == "srar" and r["outcome"] == "recovered"
    assert e["vmce"]["guest_handled"] and e["vmce"]["domain"] == 1


@pytest.mark.parametrize("body, outcome", [(SRAO_MEM_ERR[0], "continued"), (SRAR_DATA, "reset")])
def test_xen_heap_page_srao_continues_srar_resets(emu_machine, body, outcome):
    m = emu_machine()
    r = m.inject(_err(body, 0x100020))
    assert r["outcome"] == outcome
    assert r["errors"][0]["impacted_domain"] == 0x7FF2   # DOMID_XEN
    r = m.inject(SRAO_MEM)
    assert r["outcome"] == "recovered"


def test_a_page_already_broken_crashes_its_owner(emu_machine):
    m = emu_machine()
    r = m.inject(_err(SRAO_MEM_ERR[0], 0x180020, 1))
    assert r["outcome"] == "recovered"
    r = m.inject(_err(SRAO_MEM_ERR[0], 0x180040, 1))    # the same page again
    e = r["errors"][0]
    assert r["outcome"] == "continued" and "AGAIN" in e["page_offline"]["status"]
    d1 = _domain(r, 1)
    assert d1["state"] == "crashed" and d1["process"] == "ended"
    assert d1["crash_reason"] == "touched a broken page again"
    r = m.inject(SRAO_MEM)
    assert r["outcome"] == "recovered" and _domain(r, 0)["state"] == "running"


def test_dom0_page_broken_twice_crashes_dom0_and_resets_the_host(emu_machine):
    m = emu_machine()
    assert m.inject(_err(SRAO_MEM_ERR[0], 0x180020, 0))["outcome"] == "recovered"
    r = m.inject(_err(SRAO_MEM_ERR[0], 0x180020, 0))
    assert r["outcome"] == "reset" and r["panic"] == "hardware domain crashed"
    assert m.inject(SRAO_MEM)["outcome"] == "recovered"


def test_guest_gets_gp_on_nonzero_status_write_and_zero_clears(emu_machine):
    m, _ = _vmce_left_unhandled(emu_machine)
    rd = m.guest_probe(1, "rdmsr", vcpu=0, msr=MC1_STATUS)
    assert rd["ok"] and rd["value"] == SRAO_MEM_ERR[1]
    wr = m.guest_probe(1, "wrmsr", vcpu=0, msr=MC1_STATUS, value=0x1234)
    assert not wr["ok"] and wr["gp"]["msr"] == MC1_STATUS
    assert m.guest_probe(1, "rdmsr", vcpu=0, msr=MC1_STATUS)["value"] == SRAO_MEM_ERR[1]
    assert m.guest_probe(1, "wrmsr", vcpu=0, msr=MC1_STATUS, value=0)["ok"]
    assert m.guest_probe(1, "rdmsr", vcpu=0, msr=MC1_STATUS)["value"] == 0
    # MCG_STATUS is writable (how a guest clears MCIP); banks past COUNT are RAZ/WI
    assert m.guest_probe(1, "wrmsr", vcpu=0, msr=msr.MSR_IA32_MCG_STATUS, value=0)["ok"]
    assert m.guest_probe(1, "rdmsr", vcpu=0, msr=msr.MSR_IA32_MCG_STATUS)["value"] == 0
    far = msr.MSR_IA32_MCx_STATUS(5)
    assert m.guest_probe(1, "wrmsr", vcpu=0, msr=far, value=7)["ok"]
    assert m.guest_probe(1, "rdmsr", vcpu=0, msr=far)["value"] == 0
    assert m.guest_probe(1, "rdmsr", vcpu=0, msr=msr.MSR_IA32_MCG_CAP)["value"] == 0x01000C02


def _shared_maps(pid: int) -> list[tuple[int, int]]:
    """Anonymous shared mappings (how the hardware and Xen regions are mapped)."""
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for ln in f:
            parts = ln.split()
            rng, perms, path = parts[0], parts[1], " ".join(parts[5:])
            if "s" in perms and (not path or "/dev/zero" in path or "anon_shmem" in path):
                lo, hi = (int(x, 16) for x in rng.split("-"))
                out.append((lo, hi))
    return out


def test_domain_processes_map_neither_hardware_nor_xen_memory(emu_machine):
    m = emu_machine(guests=2)
    snap = m.snapshot()
    cpu_shared = _shared_maps(next(iter(snap["pids"].values())))
    assert cpu_shared, "a CPU process maps the shared regions"
    dom_pids = {int(k): v for k, v in snap["dom_pids"].items()}
    assert sorted(dom_pids) == [0, 1, 2]
    for d, pid in dom_pids.items():
        theirs = _shared_maps(pid)
        overlap = [(a, b) for a, b in theirs for c, e in cpu_shared if a < e and c < b]
        assert overlap == [], f"domain {d} maps {overlap}"
        # and its only channel: one socket (its own), nothing of Dom0's or the front end's
        fds = [os.readlink(f"/proc/{pid}/fd/{x}") for x in os.listdir(f"/proc/{pid}/fd")]
        assert sum(t.startswith("socket:") for t in fds) == 1, (d, fds)


def test_guest_cannot_make_privileged_hypercalls(emu_machine):
    m = emu_machine()
    r0 = m.guest_probe(1, "call", cmd="fetch", args={"cls": "urgent"})
    assert not r0["ok"] and r0["value"]["type"] == "EPERM"
    r1 = m.guest_probe(1, "call", cmd="ack", args={"cls": "urgent", "id": 1})
    assert not r1["ok"] and r1["value"]["type"] == "EPERM"
    m.guest_probe(1, "call", cmd="logged", args={"ids": [1]})
    assert r1["refused"] == r0["refused"] + 1
    # the coordinator keeps running, and Dom0 still logs (exactly once)
    r = m.inject(SRAO_MEM)
    assert r["outcome"] == "recovered"
    assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1]
    assert r["dom0"]["refused"] >= 3


def test_guest_cannot_read_another_domains_vmce_state(emu_machine):
    m, _ = _vmce_left_unhandled(emu_machine, guests=2)
    assert m.guest_probe(1, "rdmsr", vcpu=0, msr=MC1_STATUS)["value"] == SRAO_MEM_ERR[1]
    # guest 2 names domain 1 in its request: the channel decides, not the message
    r = m.guest_probe(2, "call", cmd="rdmsr", args={"domid": 1, "vcpu": 0, "msr": MC1_STATUS})
    assert r["ok"] and r["value"] == 0


def test_errors_name_a_domain_address(emu_machine):
    from emu.errors import UsageError
    m = emu_machine()
    with pytest.raises(UsageError) as ei:
        m.inject(_err(SRAO_MEM_ERR[0], 0x180020, 7))
    assert ei.value.field == "error[0].domain"
    with pytest.raises(UsageError) as ei:
        m.inject(_err(SRAO_MEM_ERR[0], 0x2000000, 1))
    assert ei.value.field == "error[0].addr"
    assert m.inject(SRAO_MEM)["outcome"] == "recovered"   # the machine is unharmed


def test_oracle_flags_a_vmce_to_the_wrong_domain_or_with_mscod():
    from emu.hw.topology import Topology
    from emu.machine.config import MachineConfig
    from emu.trial.oracle import check_trial
    topo = Topology(MachineConfig().validate())
    e = {"cpu": 0, "bank": 8, "written": True, "class": "srao", "clearable": True,
         "owners": [1], "cleared": True, "sharers": [0, 1, 2, 3], "impacted_domain": 1,
         "vmce": {"domain": 1, "gaddr": "0x180020",
                  "guest_read": {"bank": 1, "status": "0xBD000000000000CF", "addr": "0x180020"}}}
    res = {"outcome": "recovered", "errors": [e], "targets": [0, 1, 2, 3], "boot_log": [],
           "cpus": [], "vmce_policy": "owner"}
    assert check_trial(res, topo) == []
    e["vmce"]["guest_read"]["status"] = "0xBD000000004000CF"
    e["vmce"]["domain"] = 0
    found = check_trial(res, topo)
    assert any("MSCOD" in f for f in found) and any("expected DOM1" in f for f in found)
    res["vmce_policy"] = "dom0"
    assert not any("expected DOM" in f for f in check_trial(res, topo))


def test_a_guest_process_sigkilled_crashes_only_its_domain(emu_machine):
    import signal
    m = emu_machine()
    os.kill(m.snapshot()["dom_pids"][1], signal.SIGKILL)
    r = m.inject(SRAO_MEM)                       # the machine keeps running
    assert r["outcome"] == "recovered"
    d1 = _domain(r, 1)
    assert d1["state"] == "crashed" and d1["crash_reason"] == "killed"
    assert d1["process"] == "ended" and d1["process_end"] == "process died"
    # an error in its memory: Xen still injects (the p2m is HAP), nobody takes it
    r = m.inject(_err(SRAO_MEM_ERR[0], 0x181020, 1))
    v = r["errors"][0]["vmce"]
    assert r["outcome"] == "recovered" and v["delivered"] == [] and not v["guest_handled"]
    assert m.reset()["boot"] >= 2
    assert [d["state"] for d in m.domains()] == ["running", "running"]   # a reset restarts it
