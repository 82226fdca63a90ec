"""Per-trial perturbation, starvation, faults, a #MC with no valid bank, rendezvous
arrival order and trials that do not wait for Dom0 (emu.machine.chaos). Real
processes throughout, except the pure plan functions."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SRAO_MEM

from emu.errors import UsageError
from emu.hw import msr, yieldpoint as ypm
from emu.machine import chaos as ch

ROOT = Path(__file__).resolve().parents[1]


def _srao(cpu: int, k: int, bank: int = 8) -> str:
    """An SRAO memory error on a fresh free page (so every trial offlines a new one;
    free, so no domain gets a vMCE)."""
    return (f"cpu={cpu} bank={bank} status=0xBD000000004000CF addr={0x3000000 + (k << 12):#x} "
            "misc=0x86 mcg=0x5")


def _counts(r) -> dict:
    return r["perturbation"]["counts"]


# -- perturbation counts ----------------------------------------------------------------------
def test_perturbation_counts_zero_without_chaos_and_positive_with_it(emu_machine):
    m = emu_machine(guests=1, seed=0)   # the default trial seed is (machine seed, trial)
    off = m.inject(_srao(0, 0))
    assert off["outcome"] == "recovered" and off["violations"] == []
    assert set(_counts(off)) == {"cpu0", "cpu1", "cpu2", "cpu3", "dom0", "dom1"}
    assert set(_counts(off).values()) == {0}
    assert off["perturbation"]["chaos"] == 0.0 and off["perturbation"]["seed"] == [0, off["trial"]]
    assert off["trial_seed"] == [0, off["trial"]]
    dom0 = 0
    for k in range(1, 6):
        r = m.inject(_srao(k % 4, k), chaos=0.5, seed=(3, k), starve=0.0)
        assert r["outcome"] == "recovered" and r["violations"] == [], r
        assert r["trial_seed"] == [3, k] and r["perturbation"]["seed"] == [3, k]
        c = _counts(r)
        # ~40 yield points per CPU at p=0.5: every CPU perturbs in every trial
        assert all(c[f"cpu{i}"] > 0 for i in range(4)), c
        assert all(r["perturbation"]["points"][f"cpu{i}"] >= c[f"cpu{i}"] for i in range(4))
        dom0 += c["dom0"]
    assert dom0 > 0      # Dom0 perturbs at its channel requests too (3-5 per record)
    # Chaos off again: every process is told to stop, and nothing perturbs.
    for k in range(6, 9):
        r = m.inject(_srao(0, k))
        assert set(_counts(r).values()) == {0}, _counts(r)


def test_machine_chaos_perturbs_every_trial_without_a_per_trial_argument(emu_machine):
    """Machine(chaos=p) (as the campaigns use it) really perturbs: each trial is
    reseeded from (machine seed, trial)."""
    m = emu_machine(chaos=0.3, seed=4, starve=0.0)
    for k in range(3):
        r = m.inject(_srao(k, k))
        assert r["trial_seed"] == [4, r["trial"]]
        assert sum(_counts(r)[f"cpu{i}"] for i in range(4)) > 0, r["perturbation"]
    r = m.inject(_srao(0, 9), chaos=0.0)
    assert set(_counts(r).values()) == {0}


def _stall_first(seed: int, trial: int, n: int = 4):
    """With chaos 1.0, every yield point perturbs, and a CPU's first yield point of a
    trial is ``yp("lock")`` just before it tries ``mce_logout_lock``. Returns the one
    CPU whose first draw there is the 2 ms stall while every other CPU only yields,
    or None."""
    kinds = []
    for c in range(n):
        y = ypm.YieldPoints(c, 1.0, ypm.process_seed(seed, trial, ypm.cpu_key(c)))
        v = y.draws(1)[0][1]
        kinds.append("stall" if v >= ypm._SHORT_SLEEP else "yield" if v < ypm._YIELD else "sleep")
    if kinds.count("stall") == 1 and kinds.count("yield") == n - 1:
        return kinds.index("stall")
    return None


# Trial indices i of seed 7 where exactly one CPU stalls first and the others yield,
# the stalled CPU going 0, 1, 2, 3, 0, ... (found by _stall_first over i = 0..9792;
# the test re-derives the stalled CPU from the streams, so a change in seeding shows).
STALL_FIRST_7 = [103, 134, 146, 344, 396, 445, 463, 524, 924, 1151, 1206, 1224, 1292, 1356, 1595,
                 1624, 1673, 1879, 1896, 1915, 2174, 2210, 2297, 2305, 2356, 2454, 2524, 2530,
                 2563, 2596, 2907, 2974, 2999, 3207, 3405, 3504, 3572, 3585, 3775, 3787, 3842,
                 3894, 3954, 4169, 4273, 4402, 4574, 4602, 4654, 4743, 4893, 4901, 4909, 4963,
                 4965, 5047, 5122, 5374, 5389, 5452, 5577, 5670, 5684, 5723, 5924, 5933, 6026,
                 6084, 6271, 6331, 6561, 6601, 6656, 6725, 7040, 7115, 7202, 7264, 7427, 7436,
                 7517, 7603, 7642, 8226, 8256, 8452, 8590, 8658, 8709, 8775, 8871, 8912, 9138,
                 9183, 9375, 9400, 9437, 9698, 9731, 9792]


def _fisher_less(a: int, b: int, n: int) -> float:
    """One-sided Fisher exact p-value that a/n (arm 1) is below b/n (arm 2)."""
    tot = a + b
    den = math.comb(2 * n, tot)
    return sum(math.comb(n, k) * math.comb(n, tot - k) for k in range(0, a + 1)) / den


def test_shared_bank_owner_distribution_changes_with_chaos(emu_machine):
    """A package-scoped bank all four CPUs race for. The trial seeds are chosen so
    that, with chaos on, one CPU (balanced over the four) stalls 2 ms just before it
    tries the logout lock while the others only yield: that CPU should almost never
    own the error. Without chaos the same CPU owns it about a quarter of the time,
    whatever the machine's natural skew (the stalled CPUs are balanced). Off and on
    trials alternate, so host load hits both arms alike."""
    stalled = [_stall_first(7, i) for i in STALL_FIRST_7]
    assert stalled == [k % 4 for k in range(len(STALL_FIRST_7))]
    m = emu_machine(seed=0)
    won = {0.0: 0, 1.0: 0}
    for k, (i, c) in enumerate(zip(STALL_FIRST_7, stalled, strict=True)):
        for chaos in (0.0, 1.0):
            r = m.inject(f"cpu={k % 4} bank=8 status=0xBD000000004000CF addr=0x181000 "
                         "misc=0x86 mcg=0x5", chaos=chaos, seed=(7, i), starve=0.0)
            assert r["outcome"] == "recovered" and len(r["errors"][0]["owners"]) == 1, r
            won[chaos] += r["errors"][0]["owners"] == [c]
    n = len(STALL_FIRST_7)
    p = _fisher_less(won[1.0], won[0.0], n)
    # One-sided Fisher exact test. With chaos inert both arms are alike and this fails
    # 99 times in 100; measured: p ~1e-6 on an idle host, 0.003 with both host cores
    # kept busy besides (31 vs 14 of 100).
    assert p < 1e-2, (won, p)


# -- starvation -------------------------------------------------------------------------------
def test_starvation_plan_is_a_function_of_the_trial_seed():
    names = ch.process_names(4, [0, 1])
    a = ch.starvation_plan(5, 9, names, 1.0, 2.0)
    assert a == ch.starvation_plan(5, 9, names, 1.0, 2.0)
    # starve only arms it: victim, point and time do not depend on it
    b = ch.starvation_plan(5, 9, names, 0.0, 2.0)
    assert not b["armed"] and {k: b[k] for k in ("victim", "point", "s")} == \
        {k: a[k] for k in ("victim", "point", "s")}
    plans = [ch.starvation_plan(5, i, names, 1.0, 2.0) for i in range(400)]
    assert {p["victim"] for p in plans} == set(names)
    assert all(ch.STARVE_MIN_S <= p["s_drawn"] <= ch.STARVE_MAX_S for p in plans)
    # the cap: a tenth of the trial's bound
    capped = [ch.starvation_plan(5, i, names, 1.0, 0.05) for i in range(400)]
    assert max(p["s"] for p in capped) <= ch.STARVE_CAP * 0.05 + 1e-12
    assert any(p["s_drawn"] > p["s"] for p in capped)


def _seed_with_victim(prefix: str, max_point: int) -> int:
    names = ch.process_names(4, [0, 1])
    for i in range(10_000):
        p = ch.starvation_plan(21, i, names, 1.0, 2.0)
        if p["victim"].startswith(prefix) and p["point"] < max_point and p["s"] < 0.02:
            return i
    raise AssertionError("no such seed")


def test_same_trial_seed_gives_the_same_starvation_in_a_real_machine(emu_machine):
    m = emu_machine()
    i = _seed_with_victim("cpu", 30)     # a CPU, at a point it reaches (it passes ~40)
    a = m.inject(_srao(0, 1), chaos=0.05, starve=1.0, seed=(21, i))
    b = m.inject(_srao(0, 2), chaos=0.05, starve=1.0, seed=(21, i))
    sa, sb = a["perturbation"]["starvation"], b["perturbation"]["starvation"]
    assert a["outcome"] == b["outcome"] == "recovered"
    assert sa["armed"] and {k: sa[k] for k in ("victim", "point", "s")} == \
        {k: sb[k] for k in ("victim", "point", "s")}
    assert sa["happened"] and sb["happened"] and sa["site"] in ypm.SITES, sa
    j = _seed_with_victim("dom0", 2)     # Dom0, at its first or second request
    c = m.inject(_srao(1, 3), chaos=0.05, starve=1.0, seed=(21, j))
    sc = c["perturbation"]["starvation"]
    assert sc["victim"] == "dom0" and sc["happened"] and sc["site"] in ("channel", "log"), sc
    assert c["errors"][0]["dom0_log"][0]["count"] == 1
    # not armed: nothing starves
    d = m.inject(_srao(2, 4), chaos=0.05, starve=0.0, seed=(21, i))
    assert d["perturbation"]["starvation"] == {"p": 0.0, "armed": False, "happened": False}


# -- faults -------------------------------------------------------------------------------------
def test_fault_kill_cpu_mid_handler_is_cpu_died_once(emu_machine):
    m = emu_machine(watchdog_s=1.0)
    r = m.inject(_srao(0, 1), fault={"kind": "kill_cpu", "cpu": 1, "phase": "barrier_b"})
    assert r["outcome"] == "cpu_died" and r["dead_cpus"] == [1] and r["resets"] == 1
    assert len(r["cpus"]) == 4   # issue 16: the per-CPU list is kept
    assert r["fault"] == {"kind": "kill_cpu", "cpu": 1, "phase": "barrier_b",
                          "expected": "cpu_died", "happened": True, "held": True}
    # per trial: the next trial runs without it
    r2 = m.inject(_srao(0, 2))
    assert r2["outcome"] == "recovered" and r2["fault"] is None and r2["violations"] == []


def test_fault_kill_cpu_at_a_phase_it_never_reaches_does_not_happen(emu_machine):
    m = emu_machine()
    # an LMCE on CPU 2: CPU 3 takes no #MC at all
    r = m.inject(_srao(2, 1), local=True, fault={"kind": "kill_cpu", "cpu": 3, "phase": "logout"})
    assert r["outcome"] == "recovered"
    assert r["fault"]["happened"] is False and r["fault"]["held"] is None


def test_fault_stall_cpu_past_the_watchdog_is_a_hang(emu_machine):
    m = emu_machine(watchdog_s=0.3)
    r = m.inject(_srao(0, 1), fault={"kind": "stall_cpu", "cpu": 2, "phase": "barrier_a",
                                     "s": 30.0})
    assert r["outcome"] == "hang" and r["resets"] == 1
    assert {s["cpu"]: s["phase"] for s in r["snapshot"]}[2] == "barrier_a"
    assert r["fault"]["expected"] == "hang" and r["fault"]["happened"] and r["fault"]["held"]
    r2 = m.inject(_srao(0, 2))
    assert r2["outcome"] == "recovered" and r2["fault"] is None


def test_fault_stall_cpu_within_the_watchdog_leaves_the_outcome(emu_machine):
    m = emu_machine(watchdog_s=2.0)
    r = m.inject(_srao(0, 1), fault={"kind": "stall_cpu", "cpu": 3, "phase": "softirq",
                                     "s": 0.02})
    assert r["outcome"] == "recovered" and r["violations"] == []
    assert r["fault"]["expected"] == "unchanged" and r["fault"]["happened"]
    assert r["fault"]["held"] is True


@pytest.mark.parametrize("point", ["before_write", "mid_write", "after_write", "after_ack"])
def test_fault_kill_dom0_then_logged_exactly_once_after_its_restart(emu_machine, point):
    m = emu_machine()
    before = m.inject(_srao(1, 1))
    r = m.inject(_srao(2, 2), fault={"kind": "kill_dom0", "point": point})
    assert r["outcome"] == "recovered" and r["violations"] == []
    assert r["dom0"]["restarts"] == before["dom0"]["restarts"] + 1
    assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1]
    assert r["fault"] == {"kind": "kill_dom0", "point": point, "count": 1,
                          "expected": "logged_once", "happened": True, "held": True}
    after = m.inject(_srao(3, 3))            # the restarted Dom0 does not die again
    assert after["dom0"]["restarts"] == r["dom0"]["restarts"]
    assert m.dom0_drain()["drained"]
    counts = m.dom0_log_counts()
    ids = [d["id"] for x in (before, r, after) for d in x["errors"][0]["dom0_log"]]
    assert [counts.get(i) for i in ids] == [1, 1, 1], (ids, counts)


def test_fault_pause_dom0_then_logged_once_after_the_resume(emu_machine):
    m = emu_machine()
    r = m.inject(_srao(0, 1), fault={"kind": "pause_dom0", "s": 0.05})
    assert r["outcome"] == "recovered"
    assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1]
    assert r["fault"]["expected"] == "logged_once" and r["fault"]["happened"] and r["fault"]["held"]
    assert m.dom0_status()["paused"] is False
    # an operator's pause is not undone by a fault's
    m.dom0_pause()
    r2 = m.inject(_srao(0, 2), fault={"kind": "pause_dom0", "s": 0.01})
    assert r2["fault"]["happened"] is False and "pending" in r2["errors"][0]["dom0_log"][0]
    assert m.dom0_status()["paused"] is True
    m.dom0_resume()
    assert m.dom0_drain()["drained"]


@pytest.mark.parametrize("fault,field", [
    ({"kind": "explode"}, "fault.kind"),
    ({"kind": "kill_cpu", "cpu": 9, "phase": "logout"}, "fault.cpu"),
    ({"kind": "kill_cpu", "cpu": 1, "phase": "boot"}, "fault.phase"),
    ({"kind": "stall_cpu", "cpu": 1, "phase": "logout"}, "fault.s"),
    ({"kind": "kill_dom0", "point": "later"}, "fault.point"),
    ({"kind": "pause_dom0", "s": -1}, "fault.s"),
    ({"kind": "pause_dom0", "s": 1, "cpu": 0}, "fault.cpu"),
    ("kill_cpu", "fault"),
])
def test_bad_fault_is_a_usage_error_and_nothing_runs(fault, field):
    with pytest.raises(UsageError) as ei:
        ch.validate_fault(fault, 4, 2.0)
    assert ei.value.field == field


def test_bad_per_trial_arguments_leave_the_machine_unharmed(emu_machine):
    m = emu_machine()
    for kw, field in (({"seed": 5}, "seed"), ({"seed": (1, -1)}, "seed"),
                      ({"chaos": 1.5}, "chaos"), ({"starve": -0.1}, "starve"),
                      ({"fault": {"kind": "kill_cpu", "cpu": 0, "phase": "nowhere"}},
                       "fault.phase"), ({"raise_cpu": 4}, "raise_cpu")):
        with pytest.raises(UsageError) as ei:
            m.inject(_srao(0, 1), **kw)
        assert ei.value.field == field
    with pytest.raises(UsageError) as ei:
        m.inject([])
    assert ei.value.field == "error" and "raise_cpu" in str(ei.value)
    r = m.inject(_srao(0, 1))
    assert r["outcome"] == "recovered" and r["trial"] == 1


# -- a #MC with no valid bank (hazard B) ----------------------------------------------------------
def test_broadcast_mc_with_no_valid_bank_does_not_panic(emu_machine):
    m = emu_machine()
    m.inject(_srao(0, 1))
    assert m.dom0_drain()["drained"]
    r = m.inject([], raise_cpu=2)
    assert r["errors"] == [] and r["raise_cpu"] == 2 and r["targets"] == [0, 1, 2, 3]
    # severity_cpu stays -1: nobody runs the fatal check (xen-mca.md §10.2, hazard B)
    assert r["outcome"] == "continued" and r["resets"] == 0 and "panic" not in r
    assert [h["kind"] for h in r["hazards"]] == ["B"] and r["violations"] == []
    assert all("fatal_check" not in c["phases"] and "softirq_done" in c["phases"]
               for c in r["cpus"])
    assert all(b[msr.REG_STATUS] == 0 for b in m._call("banks", {}))   # no bank written
    assert r["telemetry"]["free"] == 30 and r["telemetry"]["drops"] == 0   # nothing reserved


def test_broadcast_mc_with_no_valid_bank_on_a_fresh_machine(emu_machine):
    """severity_cpu starts at -1 (Xen's ATOMIC_INIT(-1)), not 0: the very first #MC of
    a machine, with no valid bank, does not make CPU 0 panic."""
    m = emu_machine()
    r = m.inject([], raise_cpu=0)
    assert r["outcome"] == "continued" and "panic" not in r


def test_lmce_with_no_valid_bank_panics(emu_machine):
    m = emu_machine()
    r = m.inject([], raise_cpu=3, local=True)
    assert r["targets"] == [3] and r["outcome"] == "reset" and r["resets"] == 1
    assert r["panic"] == "MCE: No CPU found valid MCE, need reset"
    assert r["hazards"] == []          # the panic is Xen's answer here, not a hazard
    assert r["boot_log"] == [] and r["violations"] == []
    assert m.inject(_srao(0, 1))["outcome"] == "recovered"


def _emu(*args):
    return subprocess.run([sys.executable, "-m", "emu", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})


def test_cli_raise_without_error(tmp_path):
    p = _emu("run", "--raise", "1", "--json", "--log-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["errors"] == [] and r["raise_cpu"] == 1 and r["outcome"] == "continued"
    p = _emu("run", "--raise", "1", "--local", "--log-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "#MC raised on cpu1 (LMCE) with no valid bank" in p.stdout
    assert "No CPU found valid MCE" in p.stdout
    p = _emu("run", "--raise", "7")
    assert p.returncode == 2 and "raise" in p.stderr


# -- rendezvous arrival order --------------------------------------------------------------------
def test_arrival_order_of_every_rendezvous(emu_machine):
    m = emu_machine(topology="1x3x2")
    r = m.inject(_srao(4, 1))
    arr = r["arrivals"]
    assert list(arr) == ["barrier_a", "barrier_b", "barrier_c", "softirq_inside",
                         "softirq_severity"]
    for name, order in arr.items():
        assert sorted(order) == list(range(6)), (name, order)
    orders = {tuple(o) for k in range(6) for o in m.inject(_srao(1, 2 + k))["arrivals"].values()}
    assert len(orders) > 1            # not a fixed order
    lm = m.inject(_srao(2, 9), local=True)     # an LMCE: no rendezvous at all
    assert all(o == [] for o in lm["arrivals"].values()), lm["arrivals"]


# -- not waiting for Dom0 ------------------------------------------------------------------------
def test_trials_without_waiting_for_dom0_then_drain_and_count(emu_machine):
    m = emu_machine()
    rs = [m.inject(_srao(k % 4, k), wait_dom0=False) for k in range(6)]
    ids = []
    for r in rs:
        assert r["outcome"] == "recovered" and r["violations"] == []
        [d] = r["errors"][0]["dom0_log"]
        assert d["count"] == 1 or "wait_dom0=False" in d["pending"], d
        assert "lost" not in r["errors"][0]
        ids.append(d["id"])
    assert any("pending" in r["errors"][0]["dom0_log"][0] for r in rs)
    assert m.dom0_drain()["drained"]
    counts = m.dom0_log_counts()
    assert [counts.get(i) for i in ids] == [1] * 6
    # and a trial that waits still waits
    r = m.inject(_srao(0, 7))
    assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1]


def test_dom0_log_counts_on_a_fresh_machine_is_empty(emu_machine):
    m = emu_machine()
    assert m.dom0_log_counts() == {}
    r = m.inject(SRAO_MEM)
    assert m.dom0_log_counts() == {r["errors"][0]["dom0_log"][0]["id"]: 1}


def test_raise_cpu_with_an_error_raises_the_lmce_on_that_cpu(emu_machine):
    m = emu_machine()
    # bank 1 is core-scoped: CPUs 0 and 1 share it, so CPU 1's LMCE finds CPU 0's error
    r = m.inject("cpu=0 bank=1 status=0xBD000000004000CF addr=0x3001000 misc=0x86 mcg=0x5",
                 local=True, raise_cpu=1)
    assert r["targets"] == [1] and r["raise_cpu"] == 1
    assert r["outcome"] == "recovered" and r["errors"][0]["owners"] == [1]


def test_per_trial_arguments_are_refused_for_cmci_trials(emu_machine):
    m = emu_machine()
    with pytest.raises(UsageError) as ei:
        m.inject("cpu=0 bank=1 status=0x9000000000000136 via=cmci", chaos=0.5)
    assert ei.value.field == "chaos"
    assert m.inject(_srao(0, 1))["outcome"] == "recovered"
