"""CMCI with bank ownership, the polling timer, CPU offline/online and LMCE's hazards
A and C (xen-mca.md §1.3, §4.3, §4.4, §10.1 items 1 and 4, §10.2): real processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from emu.domains.dom0 import render_log
from emu.errors import UsageError
from emu.hw import msr
from emu.trial.scenarios import SCENARIOS

# xen-mceinj type 2, CMCI_UCNA_LLC (xen-mca.md §8.2): bank 9, MCG_STATUS 0, MISC 0x86,
# at the tool's default address 0x180020.
UCNA_LLC = "cpu={cpu} bank=9 status=0xBC20000080000136 addr=0x180020 misc=0x86 mcg=0x0 via=cmci"
CE = "cpu={cpu} bank={bank} status=0x9000000000000134 via={via}"
SCOPES_PRIVATE = "0-1:thread,2-3:core,4-8:package,9:thread"


def _status(m, cpu, bank):
    return m._call("banks", {})[cpu * m.config.nbanks + bank][msr.REG_STATUS]


def _dom0_lines(r):
    with open(r["dom0_log_path"], encoding="utf-8") as f:
        return [json.loads(x) for x in f]


def _one_owner_each(own):
    for o in own:
        assert len(o["owners"]) == 1, o
        assert int(o["ctl2"], 16) & msr.CMCI_EN, o


def test_ucna_and_ce_via_cmci_on_a_shared_bank_are_logged_once_by_the_owner(emu_machine):
    m = emu_machine()
    r = m.inject(UCNA_LLC.format(cpu=1))
    assert (r["outcome"], r["resets"], r["violations"]) == ("continued", 0, [])
    e = r["errors"][0]
    assert e["class"] == "ucna" and e["cmci"]["raised"] and e["cmci"]["cpus"] == [0, 1, 2, 3]
    owner = e["cmci_owner"]
    assert owner is not None and owner in e["sharers"]
    assert [(x["cpu"], x["source"]) for x in e["logged_by"]] == [(owner, "cmci")]
    assert e["cleared"] and _status(m, 1, 9) == 0
    assert [d["count"] for d in e["dom0_log"]] == [1] and e["dom0_log"][0]["source"] == "cmci"
    assert e["terminal"] == "logged once by Dom0 as a cmci record"
    assert "vmce" not in e and e["action"] is None          # no recovery action, no vMCE
    assert all(d["state"] == "running" for d in r["domains"])
    line = [x for x in _dom0_lines(r) if x["id"] == e["dom0_log"][0]["id"]]
    assert len(line) == 1 and line[0]["source"] == "cmci" and line[0]["cls"] == "nonurgent"
    assert line[0]["global"]["mc_flags"] & 0x20          # MC_FLAG_CMCI
    assert int(line[0]["banks"][0]["ctrl2"], 16) & msr.CMCI_EN and line[0]["banks"][0]["tsc"]

    # A corrected error counts: one is below the threshold (2), and stays in the bank.
    r = m.inject(CE.format(cpu=3, bank=9, via="cmci"))
    e = r["errors"][0]
    assert not e["cmci"]["raised"] and "threshold 2" in e["cmci"]["why"]
    assert e["logs"] == 0 and e["terminal"].startswith("left in the bank")
    assert r["violations"] == [] and msr.cec(_status(m, 3, 9)) == 1
    # The second one crosses it: logged once, by the owner, with both counted.
    r = m.inject(CE.format(cpu=2, bank=9, via="cmci"))
    e = r["errors"][0]
    assert e["cmci"]["raised"] and r["violations"] == [] and r["resets"] == 0
    assert [x["cpu"] for x in e["logged_by"]] == [owner]
    assert msr.cec(int(e["bank_status"], 16)) == 2 and _status(m, 3, 9) == 0
    assert [d["count"] for d in e["dom0_log"]] == [1]


def test_a_cmci_on_a_thread_private_bank_is_logged_by_that_cpu(emu_machine):
    m = emu_machine(bank_scopes=SCOPES_PRIVATE)
    for cpu in (1, 3):
        r = m.inject(f"cpu={cpu} bank=0 status=0xBC20000080000136 addr=0x180040 misc=0x86 "
                     "via=cmci")
        e = r["errors"][0]
        assert r["violations"] == [] and r["cmci_targets"] == [cpu]
        assert e["cmci_owner"] == cpu and [x["cpu"] for x in e["logged_by"]] == [cpu]
        assert [d["count"] for d in e["dom0_log"]] == [1]
    # A UCNA on a core bank whose owner is the sibling: seen by the owner (§8.3 caveat:
    # never by a CPU that owns nothing).
    own = {o["instance"]: o for o in m.ownership()["ownership"] if o["bank"] == 2}
    sib = next(o for o in own.values() if o["sharers"] == [2, 3])
    r = m.inject("cpu=3 bank=2 status=0xBC20000080000136 addr=0x180080 misc=0x86 via=cmci")
    e = r["errors"][0]
    assert [x["cpu"] for x in e["logged_by"]] == sib["owners"] and r["violations"] == []


@pytest.mark.parametrize("case", ["dom0", "guest", "xen"])
def test_xen_mceinj_type2_ucna_llc_cases_pass(emu_machine, case):
    """Xen's ucna_llc cases (§9.2/§9.3): via CMCI, logged once (NONURGENT) with
    mc_domid the page owner, bank cleared, no recovery action; mcelog decodes it."""
    m = emu_machine()
    where = {"dom0": " domain=0", "guest": " domain=1", "xen": ""}[case]
    r = m.inject(UCNA_LLC.format(cpu=0) + where)
    assert r["violations"] == [] and r["resets"] == 0 and r["outcome"] == "continued"
    e = r["errors"][0]
    assert e["logs"] == 1 and e["cleared"] and [d["count"] for d in e["dom0_log"]] == [1]
    line = next(x for x in _dom0_lines(r) if x["id"] == e["dom0_log"][0]["id"])
    want = {"dom0": 0, "guest": 1}.get(case)
    if want is not None:
        assert line["banks"][0]["domid"] == want
    # mce-test's mcelog_verify string, "Data CACHE Level-2 Data-Read Error", is older
    # mcelog's 0-based level; this mcelog names the same MCACOD 0x136 Level-3.
    assert "Data CACHE Level-3 Data-Read Error" in render_log(r["dom0_log_path"])
    assert "vmce" not in e


def test_every_cmci_bank_has_exactly_one_owner_over_boots_and_rediscoveries_with_chaos(
        emu_machine):
    """Boots bring CPUs up one at a time; CPU_DEAD's rediscovery runs on every CPU at
    once (chaos perturbs the yield points once their stream is seeded per trial)."""
    for seed in range(4):
        m = emu_machine(topology="1x2x2", bank_scopes=SCOPES_PRIVATE, cmci_banks="0-7",
                        chaos=0.5, seed=seed)
        own = m.boot_info["ownership"]
        assert {o["bank"] for o in own} == set(range(8))
        _one_owner_each(own)
        for c in m.ownership()["online"]:
            cpu = m.inject(CE.format(cpu=c, bank=8, via="poll"))["cpus"][c]
            assert set(cpu["no_cmci_banks"]) >= {8, 9} and set(cpu["poll_banks"]) == {8, 9}
        # CPU_DEAD: every CPU rediscovers at once, under cmci_discover_lock.
        r = m.cpu_offline(1 + seed % 3)
        _one_owner_each(o for o in r["ownership"] if set(o["sharers"]) & set(r["online"]))
        r = m.cpu_online(1 + seed % 3)
        _one_owner_each(r["ownership"])
        m.reset()
        _one_owner_each(m.ownership()["ownership"])
        m.close()


def test_taking_the_owner_offline_moves_ownership_and_loses_no_pending_error(emu_machine):
    m = emu_machine()
    core1 = [o for o in m.boot_info["ownership"] if o["sharers"] == [2, 3]]
    owner = core1[0]["owners"][0]
    other = 5 - owner
    assert all(o["owners"] == [owner] for o in core1)
    # The error lands while the owner is going: nobody owns the bank, no CMCI.
    ucna = f"cpu={other} bank=1 status=0xBC20000080000136 addr=0x180100 misc=0x86"
    r = m.cpu_offline(owner, [ucna])
    assert r["online"] == sorted({0, 1, 2, 3} - {owner})
    e = r["errors"][0]
    assert not e["cmci"]["raised"] and "CMCI_EN clear" in e["cmci"]["why"]
    # CPU_DEAD: the sibling claims the bank and logs what it held (cfbcb394f9).
    assert [(x["cpu"], x["source"]) for x in e["logged_by"]] == [(other, "cmci")]
    assert [d["count"] for d in e["dom0_log"]] == [1]
    moved = [o for o in r["ownership"] if o["sharers"] == [2, 3]]
    assert moved and all(o["owners"] == [other] for o in moved)
    assert r["cpus"][owner]["banks_owned"] == [] and not r["cpus"][owner]["online"]
    # The new owner takes the next CMCI; a #MC goes to the online CPUs only.
    r = m.inject(f"cpu={owner} bank=1 status=0xBC20000080000136 addr=0x180140 misc=0x86 "
                 "via=cmci")
    assert [x["cpu"] for x in r["errors"][0]["logged_by"]] == [other]
    assert r["errors"][0]["cmci"]["cpus"] == [other] and r["violations"] == []
    r = m.inject("cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5")
    assert r["outcome"] == "recovered" and owner not in r["targets"] and r["violations"] == []
    # Back online: it claims nothing the sibling holds; every bank keeps one owner.
    r = m.cpu_online(owner)
    assert owner in r["online"]
    _one_owner_each(r["ownership"])
    assert all(o["owners"] == [other] for o in r["ownership"] if o["sharers"] == [2, 3])
    r = m.inject("cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5")
    assert owner in r["targets"] and r["outcome"] == "recovered"
    with pytest.raises(UsageError, match="boot CPU"):
        m.cpu_offline(0)
    with pytest.raises(UsageError, match="already online"):
        m.cpu_online(owner)


def test_the_poller_logs_a_corrected_error_in_a_non_cmci_bank_once(emu_machine):
    m = emu_machine(bank_scopes=SCOPES_PRIVATE, cmci_banks="0-8")
    r = m.inject(CE.format(cpu=2, bank=9, via="poll"))
    e = r["errors"][0]
    assert not e["cmci"]["raised"] and e["polled_by"] == [2]
    assert [(x["cpu"], x["source"]) for x in e["logged_by"]] == [(2, "poll")]
    assert e["terminal"] == "logged once by Dom0 as a poll record" and r["violations"] == []
    assert _status(m, 2, 9) == 0
    # A CMCI bank is not polled (3e15c37e68): a CE below the threshold waits there.
    r = m.inject(CE.format(cpu=2, bank=4, via="poll"))
    e = r["errors"][0]
    assert e["logs"] == 0 and "3e15c37e68" in e["terminal"] and r["violations"] == []
    assert m.poll()["logouts"] == []
    r = m.inject("cpu=3 bank=9 status=0x9000000000000134", via="poll")   # the keyword form
    assert r["errors"][0]["via"] == "poll" and r["errors"][0]["polled_by"] == [3]


def test_the_polling_timer_finds_what_no_cmci_reports(emu_machine):
    m = emu_machine(bank_scopes=SCOPES_PRIVATE, cmci_banks="0-8", poll_period_s=0.02)
    r = m.inject(CE.format(cpu=1, bank=9, via="cmci"))   # no CMCI: the bank cannot
    assert not r["errors"][0]["cmci"]["raised"]
    before = m.dom0_status()["logged"]
    deadline = time.monotonic() + 10
    while _status(m, 1, 9) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _status(m, 1, 9) == 0                          # a timer round cleared it
    st = m.dom0_drain()
    assert st["drained"] and st["logged"] == before + 1 and not st["logged_more_than_once"]


def test_without_3e15c37e68_mixing_cmci_and_polling_finds_the_double_log(emu_machine):
    """A campaign (a loop of trials for now): two corrected errors cross the threshold
    of a CMCI core bank while a poll round runs."""
    trial = [CE.format(cpu=1, bank=2, via="poll")] * 2
    found = []
    m = emu_machine(handler="no-3e15c37e68", chaos=0.2, seed=7)
    for _ in range(300):
        r = m.inject(trial)
        if any("logged 2 times" in v for v in r["violations"]):
            found.append(r)
            break
    assert found, "the variant's double log was not found in 300 trials"
    e = found[0]["errors"][0]
    assert e["logs"] == 2 and e["terminal"].startswith("logged 2 times")
    assert sum(d["count"] for d in e["dom0_log"]) == 2     # two records of one error
    seed = emu_machine(chaos=0.2, seed=7)
    for _ in range(20):
        r = seed.inject(trial)
        assert r["violations"] == [] and r["errors"][0]["logs"] == 1


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_lmce_hazards_are_reached_and_reported(emu_machine, name):
    sc = SCENARIOS[name]
    m = emu_machine(**sc["config"])
    r = m.inject(**sc["inject"])
    kinds = [h["kind"] for h in r["hazards"]]
    assert kinds == [sc["hazard"]], r["hazards"]
    if sc["hazard"] == "A":
        assert r["outcome"] == "reset" and r["panic"].startswith("MCE: No CPU found valid MCE")
        h = r["hazards"][0]
        assert h["cpu"] == 2 and 2 in r["errors"][1]["owners"]   # it had found one
    else:
        assert r["outcome"] == "hang" and r["hazards"][0]["cpus"] == sc["stuck"]
        assert r["hazards"][0]["mirror"] == (name == "lmce_pending_then_broadcast")
    # The machine is usable after the reset.
    r = m.inject("cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5")
    assert r["outcome"] == "recovered" and r["hazards"] == []


def test_via_usage_errors_start_nothing(emu_machine):
    m = emu_machine()
    with pytest.raises(UsageError, match="via=mce"):
        m.inject("cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 via=cmci")
    with pytest.raises(UsageError, match="same via"):
        m.inject([CE.format(cpu=0, bank=9, via="cmci"), CE.format(cpu=0, bank=9, via="poll")])
    with pytest.raises(UsageError, match="via"):
        m.inject(CE.format(cpu=0, bank=9, via="cmci"), local=True)
    with pytest.raises(UsageError, match="via"):
        m.inject(CE.format(cpu=0, bank=9, via="smoke"))
    assert _status(m, 0, 9) == 0 and _status(m, 0, 8) == 0
    assert m.inject(UCNA_LLC.format(cpu=2))["violations"] == []


def _emu(*args):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_via_cmci_and_offline(tmp_path):
    p = _emu("run", "--error", UCNA_LLC.format(cpu=3), "--offline", "2", "--json",
             "--log-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["errors"][0]["terminal"] == "logged once by Dom0 as a cmci record"
    assert r["offline"][0]["online"] == [0, 1, 3] and r["errors"][0]["cmci"]["cpus"] == [0, 1, 3]
    p = _emu("run", "--offline", "0", "--log-dir", str(tmp_path))
    assert p.returncode == 2 and "offline" in p.stderr
    p = _emu("run", "--error", "cpu=0 bank=1 status=0xBD000000004000CF via=poll",
             "--log-dir", str(tmp_path))
    assert p.returncode == 2 and "via" in p.stderr


def test_cmci_bench_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    p = subprocess.run([sys.executable, "bench/cmci.py", "--cpus", "4", "--injections", "2",
                        "--json", "--log-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    (r,) = json.loads(p.stdout)
    assert r["violations"] == 0 and r["cmci_dom0_logged"]["n"] == 2
    assert r["mce_dom0_logged"]["p50_us"] > 0


def test_the_injectors_front_ends_reach_cmci_and_the_poller(emu_machine):
    """xen-mceinj -t 2 (CMCI_UCNA_LLC) runs as via=cmci; mce-inject's POLL as via=poll."""
    from emu.formats import mce_inject as mi, xen_mceinj as xm
    plan = xm.parse(["-t", "2", "-c", "1"])
    assert plan.runnable and plan.expected.path == "CMCI" and plan.expected.outcome == "logged"
    m = emu_machine(bank_scopes="0-3:core,4-7:package,8:thread,9:package", cmci_banks="0-7,9")
    r = m.inject(plan.spec, local=plan.emu_local)
    e = r["errors"][0]
    assert r["violations"] == [] and e["logs"] == 1 and e["cleared"] == plan.expected.bank_cleared
    assert [d["count"] for d in e["dom0_log"]] == [1]
    (inj,) = mi.plan(mi.parse("CPU 3 BANK 8 STATUS CORRECTED 0x134 POLL"))
    assert inj.runnable and inj.emu_local is False
    r = m.inject(list(inj.specs), local=inj.emu_local)
    e = r["errors"][0]
    assert (e["via"], e["polled_by"], r["violations"]) == ("poll", [3], [])
    assert e["terminal"] == "logged once by Dom0 as a poll record"


def test_unlocked_polling_of_a_shared_non_cmci_bank_is_hazard_h(emu_machine):
    """The seed too: every sharer polls a package bank without CMCI at once, with no
    lock, and can log one corrected error twice (xen-mca.md §10.2 H)."""
    m = emu_machine(cmci_banks="0-8", chaos=0.2, seed=3)
    hit = None
    for _ in range(300):
        r = m.inject(CE.format(cpu=1, bank=9, via="poll"))
        assert r["errors"][0]["polled_by"] == [0, 1, 2, 3]
        if r["hazards"]:
            hit = r
            break
    assert hit is not None, "no double log by concurrent pollers in 300 trials"
    (h,) = hit["hazards"]
    assert h["kind"] == "H" and h["bank"] == 9 and len(h["cpus"]) >= 2
    assert {x["source"] for x in hit["errors"][0]["logged_by"]} == {"poll"}
    # today's Xen behaves so: a hazard, not a violation of the seed's invariants
    assert hit["violations"] == []


def test_a_cmci_trial_is_traced(emu_machine):
    m = emu_machine(trace=True)
    r = m.inject(UCNA_LLC.format(cpu=2))
    tr = m.trace()
    owner = r["errors"][0]["cmci_owner"]
    sites = tr["sites"]
    # the owner's logout read bank 9's STATUS (a yield point with its bank as detail)
    assert any(e[1] == owner and sites[e[2]] == "rdmsr" and e[4] == 9 for e in tr["entries"])
    assert tr["trial"] == r["trial"]
