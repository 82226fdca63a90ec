"""A machine that takes a machine check: real CPU processes over shared banks."""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from conftest import FATAL, SRAO_MEM, UCNA

from emu.machine import MachineConfig


def _banks(m, cpu, bank):
    """(CTL, STATUS, ADDR, MISC, CTL2) of a bank as CPU ``cpu`` sees it."""
    return m._call("banks", {})[cpu * m.config.nbanks + bank]


def test_demo_srao_on_free_page_is_offlined_and_recovered(emu_machine):
    m = emu_machine()
    assert m.boot_info["cpus"] == 4
    r = m.inject(SRAO_MEM)
    assert r["schema"] == "emu.trial/1"
    assert r["outcome"] == "recovered"
    e = r["errors"][0]
    assert e["class"] == "srao" and e["action"] == "recovered"
    assert e["page_offline"]["mfn"] == 0x180 and "OFFLINED" in e["page_offline"]["status"]
    assert e["cleared"] and len(e["owners"]) == 1
    assert all(not c["mcip_after"] for c in r["cpus"])
    assert sum(c["softirq_worker"] for c in r["cpus"]) == 1
    for k in ("all_entered", "logout_done", "handler_exit", "softirq_done"):
        assert r["latency_us"][k] > 0
    assert r["violations"] == []
    assert _banks(m, 0, 8)[1] == 0   # the owner cleared the shared bank


def test_timing_fields_follow_the_handler_order(emu_machine):
    """Each CPU's own stamps are in handler order, and the trial's latencies are
    their maxima, all counted from the raise (after the MCG_STATUS writes)."""
    m = emu_machine()
    t_before = time.monotonic_ns()
    r = m.inject(SRAO_MEM)
    lat = r["latency_us"]
    assert t_before < r["t_inject_ns"] and lat["raise"] >= 0
    order = ("entered", "logout_done", "barrier_a", "fatal_check_done", "mcip_cleared",
             "handler_exit", "softirq_done")
    for c in r["cpus"]:
        t = [c["t_us"][k] for k in order]
        assert all(x is not None and x > 0 for x in t), c
        assert t == sorted(t), c
    for k, field in (("entered", "all_entered"), ("logout_done", "logout_done"),
                     ("barrier_a", "barrier_a"), ("fatal_check_done", "fatal_check_done"),
                     ("mcip_cleared", "mcip_cleared"),
                     ("handler_exit", "handler_exit"), ("softirq_done", "softirq_done")):
        assert lat[field] == max(c["t_us"][k] for c in r["cpus"])
    # A CPU that took no #MC (LMCE elsewhere) has no stamps of this trial.
    r = m.inject(SRAO_MEM.replace("cpu=0", "cpu=1").replace("addr=0x180020", "addr=0x181020"),
                 local=True)
    others = [c for c in r["cpus"] if c["cpu"] != 1]
    assert all(c["t_us"]["entered"] is None for c in others), others


def test_shared_clearable_bank_has_exactly_one_owner_and_owners_vary(emu_machine):
    m = emu_machine()
    owners = []
    for i in range(1000):
        r = m.inject(f"cpu={i % 4} bank=8 status=0xBD000000004000CF addr=0x181000 misc=0x86 "
                     "mcg=0x5")
        e = r["errors"][0]
        assert e["clearable"] and e["cleared"] and len(e["owners"]) == 1, (i, e)
        assert r["violations"] == [], (i, r["violations"])
        owners.append(e["owners"][0])
        # Dom0 fetches and acks every record, so the pool never runs dry.
        assert r["outcome"] == "recovered", (i, r)
        assert [d["count"] for d in e["dom0_log"]] == [1], (i, e["dom0_log"])
    assert r["telemetry"]["drops"] == 0
    assert len(set(owners)) > 1, f"the same CPU won all 1000 races: {set(owners)}"


def test_non_clearable_ucna_is_logged_by_every_sharer(emu_machine):
    m = emu_machine()
    r = m.inject(UCNA)           # bank 6: package-scoped, all 4 CPUs share it
    e = r["errors"][0]
    assert e["class"] == "ucna" and not e["clearable"]
    assert e["owners"] == [0, 1, 2, 3] and not e["cleared"]
    assert r["outcome"] == "continued" and r["violations"] == []
    # Core-scoped bank: only the two threads of the core log it.
    r = m.inject("cpu=2 bank=1 status=0xBC00000000000136 mcg=0x5")
    assert r["errors"][0]["owners"] == [2, 3]


def test_fatal_resets_without_clearing_and_boot_logout_logs_once(emu_machine):
    m = emu_machine()
    r = m.inject(FATAL)
    e = r["errors"][0]
    assert e["class"] == "fatal" and not e["clearable"]
    assert r["outcome"] == "reset" and r["resets"] == 1
    assert r["panic"].startswith("MCE: Fatal error happened on CPUs")
    assert e["owners"] == [0, 1, 2, 3] and not e["cleared"]   # logged, not cleared, in #MC
    boot = [b for b in r["boot_log"] if b["bank"] == 5]
    assert len(boot) == 1 and boot[0]["status"] == "0xB200000000000000"
    assert r["violations"] == []
    assert _banks(m, 0, 5)[1] == 0     # boot-time logout cleared it
    again = m.inject(SRAO_MEM)          # and the machine works after the reset
    assert again["outcome"] == "recovered" and again["boot_log"] == []


def test_banks_survive_warm_reset_but_not_power_off(emu_machine):
    m = emu_machine()
    r = m.inject(FATAL)
    assert [b["cpu"] for b in r["boot_log"]] == [0]   # BSP logs it; APs see it cleared
    m2 = emu_machine()
    assert m2.boot_info["boot_log"] == []


def test_second_mc_while_mcip_set_shuts_down(emu_machine):
    m = emu_machine(extra={"hooks": {"stall_phase": "barrier_b", "stall_s": 0.5}})
    # Raised once a CPU is in barrier B: every CPU has finished its logout (barrier
    # A needed them all), and none has cleared MCIP yet.
    r = m.inject(SRAO_MEM, then={"errors": ["cpu=1 bank=9 status=0xBD000000004000CF "
                                            "addr=0x182000 misc=0x86 mcg=0x5"],
                                 "after_phase": "barrier_b"})
    assert r["outcome"] == "shutdown" and r["resets"] == 1
    # The second error was written but never handled; boot-time logout finds it.
    assert any(b["bank"] == 9 for b in r["boot_log"])
    # The first one's record was still deferred (uncommitted) when the host reset.
    [lost] = r["lost_at_reset"]
    assert lost["state"] == "uncommitted" and lost["trial"] == r["trial"] and lost["bank"] == 8
    assert r["errors"][0]["dom0_log"] == [] and r["errors"][0]["lost"] == lost["reason"]


def test_mc_preempts_the_softirq(emu_machine):
    m = emu_machine(extra={"hooks": {"stall_phase": "softirq_worker", "stall_s": 0.4}})
    t0 = time.monotonic()
    r = m.inject(SRAO_MEM, then={"errors": ["cpu=1 bank=9 status=0xBD000000004000CF "
                                            "addr=0x182000 misc=0x86 mcg=0x5"],
                                 "after_phase": "softirq_worker"})
    assert r["outcome"] == "recovered", r
    assert [e["action"] for e in r["errors"]] == ["recovered", "recovered"]
    assert all(e["owners"] for e in r["errors"])
    assert r["violations"] == []
    # Both #MCs were handled inside one stall of the worker plus a second softirq
    # round: the second #MC did not wait for the first softirq to finish.
    assert time.monotonic() - t0 < 0.4 * 2 + 1.0


def test_lmce_goes_to_one_cpu_without_rendezvous(emu_machine):
    m = emu_machine()
    r = m.inject("cpu=2 bank=1 status=0xBD000000004000CF addr=0x183000 misc=0x86 mcg=0x5",
                 local=True)
    assert r["targets"] == [2] and r["outcome"] == "recovered"
    assert r["errors"][0]["owners"] == [2]
    assert "entered" not in r["cpus"][0]["phases"]


def test_cpu_sigkilled_mid_handler_ends_trial_and_machine_recovers(emu_machine):
    m = emu_machine(extra={"hooks": {"kill_phase": "barrier_a", "kill_cpus": [1]}},
                    watchdog_s=1.0)
    t0 = time.monotonic()
    r = m.inject(SRAO_MEM)
    assert r["outcome"] in ("cpu_died", "hang")
    assert r["resets"] == 1
    assert time.monotonic() - t0 < 5
    m.set_hooks(kill_phase=None)
    m.reset()
    assert m.inject(SRAO_MEM)["outcome"] == "recovered"


def test_stuck_cpu_is_reported_as_hang_with_a_snapshot(emu_machine):
    m = emu_machine(extra={"hooks": {"stall_phase": "barrier_a", "stall_s": 30,
                                     "stall_cpus": [3]}}, watchdog_s=0.5)
    r = m.inject(SRAO_MEM)
    assert r["outcome"] == "hang" and r["resets"] == 1
    snap = {s["cpu"]: s["phase"] for s in r["snapshot"]}
    assert snap[3] == "barrier_a"
    m.set_hooks(stall_phase=None)
    m.reset()
    assert m.inject(SRAO_MEM)["outcome"] == "recovered"


def test_sigkill_of_coordinator_leaves_no_process_and_no_shm(emu_machine):
    before = set(os.listdir("/dev/shm"))
    m = emu_machine(topology="1x4x2")
    pids = list(m.cpu_pids.values())
    assert len(pids) == 8
    procs = [psutil.Process(p) for p in pids]
    os.kill(m.pid, signal.SIGKILL)
    gone, alive = psutil.wait_procs(procs, timeout=5)
    assert not alive, f"CPU processes survived their coordinator: {[p.pid for p in alive]}"
    assert set(os.listdir("/dev/shm")) - before == set()


def test_unrecoverable_without_ser_is_fatal(emu_machine):
    m = emu_machine(ser=False)
    r = m.inject(SRAO_MEM)
    assert r["errors"][0]["class"] == "fatal"
    assert r["outcome"] == "reset" and not r["errors"][0]["cleared"]


def test_ripv_clear_in_xen_context_is_fatal(emu_machine):
    m = emu_machine()
    # LMCE, so that CPU 0 owns the error: the urgent check reads the owner's
    # MCG_STATUS (in a broadcast, whichever CPU won the bank would decide).
    r = m.inject("cpu=0 bank=8 status=0xBD000000004000CF addr=0x184000 misc=0x86 mcg=0x4",
                 local=True)
    assert r["outcome"] == "reset"   # mce_urgent_action: RIPV=0, interrupted Xen
    assert r["panic"].startswith("MCE: Fatal error happened on CPUs 0")


def test_srar_with_unknown_code_panics_in_softirq(emu_machine):
    m = emu_machine()
    r = m.inject("cpu=0 bank=1 status=0xBD8000000000009F addr=0x185000 misc=0x86 mcg=0x7")
    assert r["errors"][0]["class"] == "srar" and r["errors"][0]["cleared"]
    assert r["outcome"] == "reset"
    assert r["panic"] == "MCE: Software recovery failed for the UCR"


def test_overwrite_rules_apply_to_injected_errors(emu_machine):
    m = emu_machine()
    r = m.inject(["cpu=0 bank=1 status=0xBC00000000000136 mcg=0x5",      # UCNA first
                  "cpu=1 bank=1 status=0xBD80000000000134 addr=0x186000 misc=0x86"])
    # bank 1 is core-scoped: CPUs 0 and 1 share it; the first UCR is kept and
    # S/AR merge, so the result is SRAR with OVER (fatal for Xen's handler).
    assert r["errors"][1]["kept"] == "first"
    assert int(r["errors"][1]["bank_status"], 16) >> 62 & 1 == 1
    assert r["outcome"] == "reset"


@pytest.mark.parametrize("topology", ["2x4x2", "4x32x2"])
def test_larger_topologies(emu_machine, topology):
    m = emu_machine(topology=topology)
    n = MachineConfig(topology=topology).validate()
    r = m.inject("cpu=3 bank=9 status=0xBD000000004000CF addr=0x187000 misc=0x86 mcg=0x5")
    assert r["outcome"] == "recovered" and r["violations"] == []
    assert len(r["targets"]) == m.boot_info["cpus"]
    assert n.topology == topology


def test_recoverable_and_fatal_each_logged_once_by_dom0(emu_machine, tmp_path):
    import json
    m = emu_machine(extra={"log_dir": str(tmp_path)})
    r1 = m.inject(SRAO_MEM)
    assert r1["errors"][0]["dom0_log"][0]["count"] == 1
    assert r1["errors"][0]["dom0_log"][0]["source"] == "mce"
    assert r1["latency_us"]["dom0_logged"] > 0
    r2 = m.inject(FATAL)
    assert r2["outcome"] == "reset"
    assert [d["source"] for d in r2["errors"][0]["dom0_log"]] == ["boot"]
    m.close()
    with open(r1["dom0_log_path"]) as f:
        lines = [json.loads(x) for x in f]
    ids = [x["id"] for x in lines]
    assert len(ids) == len(set(ids)) == 2
    assert {x["source"] for x in lines} == {"mce", "boot"}


@pytest.mark.parametrize("die_at", ["before_write", "mid_write", "after_write", "after_ack"])
def test_dom0_killed_mid_log_still_logs_exactly_once(emu_machine, tmp_path, die_at):
    import json
    m = emu_machine(extra={"log_dir": str(tmp_path),
                           "dom0_hooks": {"die_at": die_at, "die_count": 1}})
    rs = [m.inject(f"cpu={i} bank=8 status=0xBD000000004000CF addr={0x190000 + i * 0x1000:#x} "
                   "misc=0x86 mcg=0x5") for i in range(3)]
    assert all(r["outcome"] == "recovered" for r in rs)
    assert rs[-1]["dom0"]["restarts"] == 1, rs[-1]["dom0"]
    for r in rs:
        assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1], r["errors"][0]
    m.close()
    with open(rs[0]["dom0_log_path"]) as f:
        ids = [json.loads(x)["id"] for x in f]
    assert len(ids) == len(set(ids)) == 3


def test_a_reply_to_a_dom0_that_died_after_its_request_is_dropped(emu_machine, tmp_path):
    """Dom0 sends its ack, closes its channel and dies: the machine serves the ack
    (the record leaves Xen's pool), its reply finds no reader (counted, not an
    emulator error), and the record is in the durable log exactly once."""
    import json
    m = emu_machine(extra={"log_dir": str(tmp_path),
                           "dom0_hooks": {"die_at": "ack_sent", "die_count": 1}})
    rs = [m.inject(f"cpu={i} bank=8 status=0xBD000000004000CF addr={0x190000 + i * 0x1000:#x} "
                   "misc=0x86 mcg=0x5") for i in range(3)]
    assert all(r["outcome"] == "recovered" and r["violations"] == [] for r in rs)
    assert rs[-1]["dom0"]["restarts"] == 1 and rs[-1]["dom0"]["replies_lost"] == 1, \
        rs[-1]["dom0"]
    for r in rs:
        assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1], r["errors"][0]
    m.close()
    with open(rs[0]["dom0_log_path"]) as f:
        ids = [json.loads(x)["id"] for x in f]
    assert len(ids) == len(set(ids)) == 3


def test_idle_poll_window_follows_kvm_halt_polling():
    from emu.machine.cpu_process import IDLE_POLL_MIN_NS, idle_poll_window
    cap = 1_000_000
    assert idle_poll_window(200_000, 150_000, cap) == 200_000     # woke while polling
    assert idle_poll_window(200_000, 300_000, cap) == 400_000     # just missed: grow
    assert idle_poll_window(800_000, 900_000, cap) == cap         # never above the cap
    assert idle_poll_window(800_000, 5_000_000, cap) == 400_000   # sparse: shrink
    assert idle_poll_window(IDLE_POLL_MIN_NS, 5_000_000, cap) == IDLE_POLL_MIN_NS
    assert idle_poll_window(0, 10_000, cap) == IDLE_POLL_MIN_NS   # grows from the floor
    assert idle_poll_window(200_000, 300_000, 0) == 0             # polling off


def test_idle_poll_grows_with_back_to_back_machine_checks(emu_machine):
    """Machine checks closer together than the cap widen each CPU's idle poll (the
    window is in the trial result); with idle_poll_us=0 an idle CPU sleeps at once."""
    m = emu_machine(idle_poll_us=100_000)
    polls = []
    for i in range(8):
        r = m.inject(SRAO_MEM.replace("addr=0x180020", f"addr={0x182000 + (i << 12):#x}"))
        assert r["outcome"] == "recovered"
        polls.append([c["idle_poll_us"] for c in r["cpus"]])
    assert min(polls[-1]) > 200, polls     # it starts at 200 µs, haltpoll's default
    m0 = emu_machine(idle_poll_us=0)
    r = m0.inject(SRAO_MEM)
    assert r["outcome"] == "recovered" and [c["idle_poll_us"] for c in r["cpus"]] == [0.0] * 4


def test_a_cpu_that_sleeps_through_its_signal_is_rung_late(emu_machine):
    """The race the late doorbell ring covers: a #MC signalled just before a CPU's
    futex call cannot run its handler until the sleep ends. CPU 1 here holds SIG_MC
    blocked for every futex sleep (a test hook) and idles without polling, so only the
    late ring wakes it: the trial still recovers, CPU 1 entered after the ring
    (0.5 ms at the earliest), and the result names it in ``rung_late``."""
    m = emu_machine(idle_poll_us=0, extra={"hooks": {"sleep_masked_cpus": [1]}})
    for i in range(3):
        r = m.inject(SRAO_MEM.replace("addr=0x180020", f"addr={0x183000 + (i << 12):#x}"))
        assert r["outcome"] == "recovered" and r["violations"] == [], r
        assert 1 in r["rung_late"], r["rung_late"]
        assert r["cpus"][1]["t_us"]["entered"] >= 500, r["cpus"][1]["t_us"]
        assert all(c["t_us"]["handler_exit"] is not None for c in r["cpus"])


def test_errors_merged_into_one_bank_are_judged_by_what_the_handler_found(emu_machine):
    """A CE then an SRAO in one package bank: the overwrite rules leave the SRAO (with
    OVER), which is clearable, so both errors report one owner and no violation."""
    from emu.hw.topology import Topology
    from emu.trial import model
    specs = ["cpu=0 bank=8 status=0x9000000000000000",
             "cpu=1 bank=8 status=0xBD000000004000CF addr=0x181000 misc=0x86 mcg=0x5"]
    m = emu_machine(topology="1x2x2")
    r = m.inject(specs)
    assert r["violations"] == []
    assert [e["clearable"] for e in r["errors"]] == [True, True]
    assert len(r["errors"][0]["owners"]) == 1
    exp = model.expected(specs, Topology(m.config), owners=model.owners_of(r))
    assert model.compare(exp, r) == []


def test_a_long_panic_text_is_reported_whole(emu_machine):
    """mc_panic's text names every fatal CPU: 16 sharers of a package bank make it
    longer than 64 bytes (it was cut there, and the outcome model disagreed)."""
    m = emu_machine(topology="2x8x2", guests=0, memory_pages=8192)
    r = m.inject("cpu=0 bank=5 status=0xB200000000000000")
    assert r["outcome"] == "reset"
    assert r["panic"] == "MCE: Fatal error happened on CPUs " + ",".join(map(str, range(16)))
