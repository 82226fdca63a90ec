"""Handler versions and broken variants (issue 11): each reaches its defect in a fixed
scenario (a stall hook where the defect needs an interleaving), the oracle reports
the version's finding, and the same scenario on ``seed`` reports nothing.

Real processes throughout, except the two telemetry races, which only a unit test
reaches (labelled below).
"""
from __future__ import annotations

import io
import json
from contextlib import redirect_stdout

import pytest

from emu import cli
from emu.machine import MachineConfig
from emu.machine.regions import Regions
from emu.xen.history import MctelemFreelistAba, MctelemXchgHeadReread
from emu.xen.mctelem import H_NEXT, MC_NONURGENT, MC_URGENT, Mctelem, MctelemBug
from emu.xen.versions import HANDLERS, version_info

SRAO_PKG = "cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5"
SRAO_CORE = "cpu=0 bank=1 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5"
SRAO_CPU3 = "cpu=3 bank=1 status=0xBD000000004000CF addr=0x182000 misc=0x86 mcg=0x5"
SRAR_RIPV0 = "cpu=0 bank=1 status=0xBD80000000100134 addr=0x180020 misc=0x86 mcg=0x6"
SRAR_OVER = "cpu=0 bank=5 status=0xFD80000000100134 addr=0x180020 misc=0x86 mcg=0x7"
FATAL_PCC = "cpu=0 bank=5 status=0xB200000000000000 mcg=0x5"
PCC_EN0 = "cpu=0 bank=5 status=0xA200000000000000 mcg=0x5"
THREAD = "0-9:thread"


def _has(r, text):
    return [v for v in r["violations"] if text in v]


# -- each version against seed, same scenario -----------------------------------------
@pytest.mark.parametrize("handler", ["xen-2009-03", "no-barrier-mcip-sync", "mcip-one-cpu"])
def test_mcip_left_set_then_shutdown(emu_machine, handler):
    """MCIP left set on the CPUs that did not clear it; the next #MC shuts down."""
    kw = dict(bank_scopes=THREAD, vmce_policy="dom0") if handler == "xen-2009-03" else {}
    for h, bad in ((handler, True), ("seed", False)):
        m = emu_machine(handler=h, **kw)
        r1 = m.inject(SRAO_PKG)
        r2 = m.inject(SRAO_PKG)
        if not bad:
            assert r1["outcome"] == r2["outcome"] == "recovered"
            assert r1["violations"] == r2["violations"] == []
            continue
        assert r1["outcome"] in ("recovered", "continued")
        stuck = [c["cpu"] for c in r1["cpus"] if c["mcip_after"]]
        assert len(stuck) == 3 and len(_has(r1, "MCIP still set after the handler")) == 3
        assert r2["outcome"] == "shutdown" and r2["shutdown"]["cpu"] in stuck
        assert _has(r2, "found MCIP still set from an earlier #MC")


@pytest.mark.parametrize("phase,stalled", [("exit", "mced_wait"),           # H1
                                           ("softirq_finish", "softirq_finish")])  # H2
def test_xen_2009_03_lost_wakeup_hangs(emu_machine, phase, stalled):
    """A CPU that reaches a cpumask after it was cleared spins forever."""
    hooks = {"stall_phase": phase, "stall_cpus": [2], "stall_s": 0.2}
    for h in ("xen-2009-03", "seed"):
        m = emu_machine(handler=h, bank_scopes=THREAD, vmce_policy="dom0", watchdog_s=0.5,
                        extra={"hooks": hooks})
        r = m.inject(SRAO_PKG)
        if h == "seed":
            assert r["outcome"] == "recovered" and r["violations"] == []
            continue
        assert r["outcome"] == "hang"
        assert {s["cpu"]: s["phase"] for s in r["snapshot"]}[2] == stalled
        assert _has(r, "hang: the handler stopped making progress")


def test_xen_2009_03_mced_cleared_under_a_trap_spinner_hangs(emu_machine):
    """H3: an error CPU delayed before its mced_cpus spin in #MC context finds the mask
    already cleared by the worker's softirq, and spins with MCIP set."""
    hooks = {"stall_phase": "mced_wait", "stall_cpus": [1], "stall_s": 0.2}
    errs = ["cpu=0 bank=1 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5",
            "cpu=1 bank=2 status=0x9400000000000151"]
    for h in ("xen-2009-03", "seed"):
        m = emu_machine(handler=h, bank_scopes=THREAD, vmce_policy="dom0", watchdog_s=0.5,
                        extra={"hooks": hooks})
        r = m.inject(errs)
        if h == "seed":
            assert r["outcome"] == "recovered" and r["violations"] == []
            continue
        assert r["outcome"] == "hang"
        snap = {s["cpu"]: s["phase"] for s in r["snapshot"]}
        assert snap[1] == "mced_wait" and snap[0] == "softirq_finish"
        assert _has(r, "hang: the handler stopped making progress")


def test_xen_2009_03_second_mc_while_the_buffer_is_in_use_panics(emu_machine):
    """One CPU (no MCIP left set): a #MC during mce_actions finds mc_local.in_use."""
    hooks = {"stall_phase": "softirq_actions", "stall_s": 0.3}
    then = {"errors": ["cpu=0 bank=2 status=0xBD000000004000CF addr=0x182000 misc=0x86"],
            "after_phase": "softirq_actions"}
    r = emu_machine(handler="xen-2009-03", topology="1x1x1", vmce_policy="dom0",
                    extra={"hooks": hooks}).inject(SRAO_CORE, then=then)
    assert r["outcome"] == "reset" and "Local buffer is being processed" in r["panic"]


def test_xen_2009_03_second_mc_before_mce_actions_loses_a_record_and_hangs(emu_machine):
    """One CPU: a #MC after the worker test, before mce_actions, overwrites
    mc_local.mctc (the first record stays uncommitted), leaves MCIP set (the process
    lock is still held) and its softirq spins on the mced_cpus the cleanup cleared."""
    hooks = {"stall_phase": "softirq_worker", "stall_s": 0.3}
    then = {"errors": ["cpu=0 bank=2 status=0xBD000000004000CF addr=0x182000 misc=0x86"],
            "after_phase": "softirq_worker"}
    for h in ("xen-2009-03", "seed"):
        m = emu_machine(handler=h, topology="1x1x1", vmce_policy="dom0", watchdog_s=0.5,
                        extra={"hooks": hooks})
        r = m.inject(SRAO_CORE, then=then)
        if h == "seed":
            assert r["outcome"] == "recovered" and r["violations"] == []
            continue
        assert r["outcome"] == "hang" and r["snapshot"][0]["phase"] == "mced_wait"
        assert r["snapshot"][0]["mcg_status"].endswith("5")          # MCIP still set
        assert [(x["state"], x["bank"]) for x in r["lost_at_reset"]] == [("uncommitted", 1)]
        assert _has(r, "hang: the handler stopped making progress")


def test_xen_2009_03_mc_with_no_error_panics_and_vmce_goes_to_dom0(emu_machine):
    m = emu_machine(handler="xen-2009-03", bank_scopes=THREAD, vmce_policy="owner")
    r = m.inject("cpu=0 bank=1 status=0xBD000000004000CF addr=0x1000 misc=0x86 mcg=0x5 "
                 "domain=1")
    assert r["errors"][0]["vmce"]["domain"] == 0   # 2009: Dom0 only, whoever owns the page
    assert _has(r, "vMCE went to DOM0, expected DOM1")
    assert m.inject([], raise_cpu=0)["outcome"] == "shutdown"   # MCIP left set by trial 1
    r = m.inject([], raise_cpu=0)
    assert r["outcome"] == "reset" and "not found severity_cpu" in r["panic"]


def test_xen_2009_03_fatal_log_lost(emu_machine):
    """PCC with EN=0 passes round 1, round 2 clears it, then "worst=3" panics: the
    bank is empty at reboot; a UC+EN+PCC bank stays, but its boot record is dismissed."""
    m = emu_machine(handler="xen-2009-03", bank_scopes=THREAD, vmce_policy="dom0")
    r = m.inject(PCC_EN0)
    assert r["outcome"] == "reset" and "worst=3" in r["panic"]
    assert _has(r, "fatal bank cleared before the reset")
    assert _has(r, "logged 0 times by boot-time logout")
    r = m.inject(FATAL_PCC)
    assert r["outcome"] == "reset" and "pcc = 1" in r["panic"]
    assert _has(r, "dismissed and never reaches Dom0's log")
    s = emu_machine(bank_scopes=THREAD, vmce_policy="dom0")
    for spec in (PCC_EN0, FATAL_PCC):
        r = s.inject(spec)
        assert r["outcome"] == "reset" and r["violations"] == [], r["violations"]


def test_shared_severity_cpu_loses_the_record(emu_machine):
    """011899a2e0's case: an LMCE during the softirq, after the election, resets the
    shared severity_cpu: no CPU works, and the first record is never committed."""
    hooks = {"stall_phase": "softirq_elected", "stall_s": 0.3}
    then = {"errors": [SRAO_CPU3], "local": True, "after_phase": "softirq_elected"}
    for h in ("shared-severity-cpu", "seed"):
        m = emu_machine(handler=h, extra={"hooks": hooks})
        r = m.inject(SRAO_CORE, then=then)
        assert r["outcome"] == "recovered", r
        if h == "seed":
            assert r["violations"] == [] and r["errors"][0]["action"] == "recovered"
            continue
        assert r["errors"][0]["action"] is None
        assert r["errors"][0]["lost"] == "record reserved but never committed"
        assert _has(r, "error[0] cpu0/bank1: record reserved but never committed")


def test_shared_severity_cpu_skips_the_fatal_check(emu_machine):
    """011899a2e0's other case (non-broadcast, two stalls at once): a softirq's write
    of the shared severity_cpu lands between a trap handler's write and its test, and
    the unrecoverable UCNA (OVER=1) continues instead of resetting."""
    hooks = {"stalls": [{"phase": "softirq", "cpus": [1], "s": 0.2},
                        {"phase": "barrier_b", "cpus": [0], "s": 0.4}]}
    then = {"errors": ["cpu=0 bank=2 status=0xFC20000080000136 addr=0x180020 misc=0x86"],
            "after_phase": "softirq"}
    for h in ("shared-severity-cpu", "seed"):
        m = emu_machine(handler=h, mce_broadcast=False, bank_scopes=THREAD,
                        extra={"hooks": hooks})
        r = m.inject("cpu=1 bank=2 status=0x9400000000000151", then=then)
        if h == "seed":
            assert r["outcome"] == "reset" and "Fatal error happened on CPUs 0" in r["panic"]
            assert r["violations"] == []
            continue
        assert r["outcome"] == "continued"
        assert _has(r, "error[1] cpu0/bank2: unrecoverable ucna error logged in #MC")


def test_stale_severity_cpu_panics_on_a_mc_with_no_error(emu_machine):
    """6a2c6a6842's case: the previous round's severity_cpu runs the fatal check of a
    #MC in which nobody found an error."""
    for h in ("stale-severity-cpu", "seed"):
        m = emu_machine(handler=h, bank_scopes=THREAD)
        assert m.inject(SRAO_CORE)["violations"] == []
        r = m.inject([], raise_cpu=1)
        if h == "seed":
            assert r["outcome"] == "continued" and r["violations"] == []
            continue
        assert r["outcome"] == "reset" and "No CPU found valid MCE" in r["panic"]
        assert _has(r, "cpu0: ran the fatal check (severity_cpu) but found no error")


@pytest.mark.parametrize("handler,spec,hooks", [
    ("ripv0-continue", SRAR_RIPV0, {}),
    ("no-eipv-check", "cpu=0 bank=1 status=0xBD80000000100134 addr=0x1000 misc=0x86 "
                      "mcg=0x4 domain=1", {"current": {0: [1, 0]}}),
])
def test_ripv0_continued(emu_machine, handler, spec, hooks):
    """89a4be6901 / 1cf8a44e39: RIPV=0 (EIPV=0 in a guest) must reset."""
    for h in (handler, "seed"):
        m = emu_machine(handler=h, bank_scopes=THREAD, extra={"hooks": hooks})
        r = m.inject(spec)
        if h == "seed":
            assert r["outcome"] == "reset" and r["violations"] == []
            continue
        assert r["outcome"] in ("recovered", "continued")
        assert _has(r, "cpu0: continued after a #MC with RIPV=0")


@pytest.mark.parametrize("handler,spec", [("srar-over-inverted", SRAR_OVER),
                                          ("fatal-bank-cleared", FATAL_PCC)])
def test_fatal_bank_cleared_before_reset(emu_machine, handler, spec):
    for h in (handler, "seed"):
        m = emu_machine(handler=h)
        r = m.inject(spec)
        assert r["outcome"] == "reset"
        if h == "seed":
            assert r["violations"] == [] and len(r["boot_log"]) == 1
            continue
        assert r["boot_log"] == []
        assert _has(r, "fatal bank cleared before the reset")
        assert _has(r, "logged 0 times by boot-time logout (expected once)")


def test_srar_over_inverted_leaves_a_recoverable_srar_to_every_sharer(emu_machine):
    spec = "cpu=0 bank=1 status=0xBD80000000100134 addr=0x180020 misc=0x86 mcg=0x7"
    for h in ("srar-over-inverted", "seed"):
        r = emu_machine(handler=h).inject(spec)
        if h == "seed":
            assert r["violations"] == [] and r["errors"][0]["owners"] in ([0], [1])
            continue
        assert r["errors"][0]["owners"] == [0, 1] and not r["errors"][0]["cleared"]
        assert _has(r, "clearable error owned by 2 CPUs [0, 1]")


def test_no_logout_lock_two_owners(emu_machine):
    hooks = {"stall_phase": "clearbanks", "stall_s": 0.1}
    for h in ("no-logout-lock", "seed"):
        r = emu_machine(handler=h, extra={"hooks": hooks}).inject(SRAO_PKG)
        assert r["outcome"] == "recovered"
        if h == "seed":
            assert r["violations"] == []
            continue
        assert r["errors"][0]["owners"] == [0, 1, 2, 3]
        assert _has(r, "clearable error owned by 4 CPUs")


def test_barrier_without_generations_hangs_on_reuse(emu_machine):
    hooks = {"stall_phase": "barrier_exit_wait", "stall_s": 0.1}
    for h in ("barrier-no-generation", "seed"):
        r = emu_machine(handler=h, watchdog_s=0.5, extra={"hooks": hooks}).inject(SRAO_PKG)
        if h == "seed":
            assert r["outcome"] == "recovered" and r["violations"] == []
            continue
        assert r["outcome"] == "hang"
        phases = {s["phase"] for s in r["snapshot"]}
        assert "barrier_exit_wait" in phases and phases & {"barrier_a", "barrier_b"}
        assert _has(r, "hang: the handler stopped making progress")


def test_softirq_plain_store_elects_two_workers(emu_machine):
    hooks = {"stall_phase": "softirq_elect", "stall_cpus": [1], "stall_s": 0.1}
    for h in ("softirq-plain-store", "seed"):
        r = emu_machine(handler=h, extra={"hooks": hooks}).inject(SRAO_PKG)
        assert r["outcome"] == "recovered"
        workers = [c["cpu"] for c in r["cpus"] if c["softirq_worker"]]
        if h == "seed":
            assert len(workers) == 1 and r["violations"] == []
            continue
        assert 1 in workers and len(workers) >= 2
        assert _has(r, "softirq workers")


def test_xchg_head_reread_links_an_entry_twice_at_machine_level(emu_machine):
    """e9af61b969's race in the machine (near-deterministic: up to 5 trials): Dom0
    drains four records while a second wave commits two, each push held 50 ms after
    its cmpxchg (hook commit_window_s); a fetch inside the hold moves the list, the
    push "fails", links the entry again, and a later fetch hits Xen's BUG_ON."""
    w1 = [f"cpu={c} bank=1 status=0xBD000000004000CF addr={0x180020 + 0x1000 * c:#x} "
          "misc=0x86 mcg=0x5" for c in range(4)]
    then = {"errors": ["cpu=0 bank=2 status=0x9400000000000151",
                       "cpu=1 bank=2 status=0x9400000000000151"], "after_phase": "softirq_done"}
    hooks = {"commit_window_s": 0.05}
    for h in ("xchg-head-reread", "seed"):
        m = emu_machine(handler=h, bank_scopes=THREAD, extra={"hooks": hooks})
        rs = []
        for _ in range(5 if h != "seed" else 3):
            rs.append(m.inject(w1, then=then))
            if h != "seed" and rs[-1].get("xen_bug"):
                break
        if h == "seed":
            assert all(r["violations"] == [] and "xen_bug" not in r for r in rs)
            continue
        r = rs[-1]
        assert "MCTE_TRANSITION_STATE" in r["xen_bug"] and r["resets"] == 1
        assert _has(r, "Xen BUG (a hypervisor crash) while Dom0 fetched telemetry")


# -- telemetry races: unit level ---------------------------------------------------------
# (unit level, deterministic. The free-list ABA has no machine recipe: every #MC
# reservation in the emulated machine is serialised by mce_logout_lock; Xen reaches it
# with the poller/CMCI and recursion. The xchg_head race also has the machine recipe
# above.)
@pytest.fixture
def region():
    import os
    R = Regions(MachineConfig().validate())
    yield R
    os.close(R.efd)


def _chain(t, ref):
    out = []
    while ref and len(out) < 40:
        out.append(ref - 1)
        ref = t.hget(ref - 1, H_NEXT)
    return out


@pytest.mark.parametrize("cls", [MctelemXchgHeadReread, Mctelem])
def test_unit_xchg_head_reread_links_an_entry_twice(region, cls):
    t = cls(region)
    t.init(boot=1)
    b = t.mctelem_reserve(MC_URGENT, 0)
    t.mctelem_commit(b)
    a = t.mctelem_reserve(MC_URGENT, 0)
    fired = []

    def consumer():   # Dom0's fetch inside the push, once
        if not fired:
            fired.append(t.consume_oldest_begin(MC_URGENT))
    if cls is Mctelem:
        t.mctelem_commit(a)
        consumer()    # the fixed push has no window: the consumer comes after it
    else:
        t.window = consumer
        t.mctelem_commit(a)
    assert fired == [b]
    committed = t.X.load(t.T.committed)
    processing = _chain(t, t.X.load(t.T.proc_head))
    assert processing == [b, a]
    if cls is Mctelem:
        assert committed == 0
        return
    assert committed == a + 1          # a is on the committed list too: linked twice
    with pytest.raises(MctelemBug, match="processing, expected committed"):
        t.consume_oldest_begin(MC_URGENT)


@pytest.mark.parametrize("cls", [MctelemFreelistAba, Mctelem])
def test_unit_freelist_aba_reserves_a_slot_twice(region, cls):
    t = cls(region)
    t.init(boot=1)
    held = []

    def others():   # another flow pops two and frees the first, inside T1's pop, once
        if not held:
            held.append("in")
            r1 = t.mctelem_reserve(MC_NONURGENT, 1)
            r2 = t.mctelem_reserve(MC_NONURGENT, 1)
            t.mctelem_dismiss(r1)
            held[:] = [r1, r2]
    if cls is Mctelem:
        mine = t.mctelem_reserve(MC_NONURGENT, 0)
        others()
    else:
        t.window = others
        mine = t.mctelem_reserve(MC_NONURGENT, 0)
    r1, r2 = held
    if cls is Mctelem:
        assert len({mine, r1, r2}) == 3 and t.free_count() == 30 - 2
        assert t.mctelem_reserve(MC_NONURGENT, 0) not in (mine, r2)
        return
    assert mine == r1                 # T1 got the freed one back ...
    # ... and the non-urgent head is r2, in use: the 18 free entries behind it leaked
    assert t.free_list(MC_NONURGENT) == [r2] and t.free_count() == 10 + 1
    with pytest.raises(MctelemBug, match="reserved twice"):
        t.mctelem_reserve(MC_NONURGENT, 0)


# -- the front door ----------------------------------------------------------------------
def _cli(argv):
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(argv)
    return rc, out.getvalue()


def test_versions_listed_with_metadata():
    rc, out = _cli(["versions", "--json"])
    assert rc == 0
    got = {v["name"]: v for v in json.loads(out)["versions"]}
    assert set(got) == set(HANDLERS)
    for name, v in got.items():
        assert v["description"], name
        if v["kind"] in ("history", "broken"):
            assert v["stands_for"] and v["finding"] and v["family"], name
    assert "before 99f7ce3614" in version_info("no-barrier-mcip-sync")["stands_for"]
    rc, out = _cli(["versions"])
    assert rc == 0 and all(n in out for n in HANDLERS)


def test_run_every_handler_and_a_bad_name(capsys):
    for name in HANDLERS:
        rc, out = _cli(["run", "--handler", name, "--json", "--watchdog", "1"])
        res = json.loads(out)
        assert res["handler"] == name and rc == (1 if res["violations"] else 0), name
    rc = cli.main(["run", "--handler", "no-such-version"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown handler 'no-such-version'" in err
    assert all(n in err for n in HANDLERS)


def test_find_races_smoke(tmp_path):
    """bench/find_races.py at tiny sizes: a JSON report with a row per version asked."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "races.json"
    p = subprocess.run(
        [sys.executable, str(root / "bench" / "find_races.py"), "--versions",
         "mcip-one-cpu,freelist-aba", "--seeds", "1", "--max-trials", "2", "--repeat", "1",
         "--out", str(out)], capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    rows = {r["version"]: r for r in res["versions"]}
    assert rows["mcip-one-cpu"]["found_seeds"] == 1 and rows["mcip-one-cpu"]["trials_max"] == 1
    assert rows["mcip-one-cpu"]["reproduced"] == 1
    assert rows["freelist-aba"]["level"] == "unit" and rows["freelist-aba"]["reproduced"] == 1
    assert "mcip-one-cpu | multi | 1/1" in p.stdout


# -- the oracle's new checks, on synthetic results (pure) -------------------------------
def _res(outcome, **kw):
    cpu = {"cpu": 0, "phases": ["entered", "softirq_done"], "mcip_after": False,
           "softirq_worker": False, "logged": 1, "records": 1, "guest_mode": False,
           "mcg_in": 0x5}
    r = {"outcome": outcome, "local": False, "targets": [0, 1], "errors": [], "boot_log": [],
         "cpus": [dict(cpu), dict(cpu, cpu=1)], "waves": 1}
    r.update(kw)
    return r


def test_oracle_hang_shutdown_and_hazard_c():
    from emu.trial.oracle import check_trial
    snap = [{"cpu": 0, "phase": "softirq_finish"}, {"cpu": 1, "phase": "idle"}]
    assert check_trial(_res("hang", snapshot=snap), None)
    assert check_trial(_res("hang", snapshot=snap, hang_expected=True), None) == []
    lmce = [{"cpu": 0, "phase": "softirq"}, {"cpu": 1, "phase": "idle"}]   # hazard C
    assert check_trial(_res("hang", snapshot=lmce, local=True, hazards=[{"kind": "C"}]),
                       None) == []
    assert check_trial(_res("hang", snapshot=lmce), None)
    inside = {"wave": 2, "cpu": 1, "left_handler": False}   # the SDM's nested shutdown
    assert check_trial(_res("shutdown", shutdown=inside), None) == []
    left = dict(inside, left_handler=True)
    assert check_trial(_res("shutdown", shutdown=left), None)


def test_oracle_workers_stale_check_and_ripv():
    from emu.trial.oracle import check_trial
    r = _res("recovered")
    assert check_trial(r, None) == []
    r["cpus"][0]["softirq_worker"] = r["cpus"][1]["softirq_worker"] = True
    assert check_trial(r, None) == ["softirq workers [0, 1] for one broadcast #MC "
                                    "(expected exactly one)"]
    assert check_trial(dict(r, waves=2), None) == []   # one per wave
    r = _res("reset")
    r["cpus"][1].update(phases=["entered", "fatal_check"], logged=0)
    assert [v for v in check_trial(r, None) if "stale severity_cpu" in v]
    assert check_trial(dict(r, local=True), None) == []   # the LMCE CPU checks itself
    r = _res("continued")
    r["cpus"][0]["mcg_in"] = 0x4
    assert [v for v in check_trial(r, None) if "RIPV=0" in v]
    r["cpus"][0]["records"] = 0        # no record, no urgent check: hazard K, not this
    assert check_trial(r, None) == []
    r["cpus"][0].update(records=1, mcg_in=0x6, guest_mode=True)   # EIPV in a guest
    assert check_trial(r, None) == []
