"""Dom0 paused from the front door: the telemetry pool fills and runs dry (xen-mca.md
§5.1, §5.6), drains once Dom0 resumes, and what a warm reset loses is reported."""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter

import pytest
from conftest import FATAL

from emu.errors import UsageError

NENT = 30          # 10 urgent + 20 non-urgent slots; a #MC's urgent record may take any


def srao(cpu: int, mfn: int) -> str:
    """xen-mceinj's SRAO (bank 8, package scope) into the free page ``mfn``."""
    return f"cpu={cpu} bank=8 status=0xBD000000004000CF addr={mfn << 12:#x} misc=0x86 mcg=0x5"


def log_ids(path) -> Counter:
    with open(path, encoding="utf-8") as f:
        return Counter(json.loads(line)["id"] for line in f)


def log_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_pool_runs_dry_while_dom0_is_paused_then_drains_each_record_once(emu_machine):
    m = emu_machine()
    st = m.dom0_pause()
    assert st["paused"] and st["pool"]["free"] == NENT
    ids = []
    for k in range(NENT + 5):
        r = m.inject(srao(k % 4, 0x181 + k))
        e = r["errors"][0]
        if k < NENT:
            # Deferred, recovered, committed -- and left in the pool: nobody fetches.
            assert r["outcome"] == "recovered" and e["action"] == "recovered", (k, e)
            assert e["page_offline"]["mfn"] == 0x181 + k
            [d] = e["dom0_log"]
            assert d["count"] == 0 and "paused" in d["pending"] and "lost" not in e, (k, d)
            assert "no_record_cpus" not in e
            assert r["telemetry"] == {"free": NENT - 1 - k, "drops": 0}
            assert r["latency_us"]["dom0_logged"] is None
            ids.append(d["id"])
        else:
            # mctelem_reserve failed: no record, so nothing deferred, no page offline.
            assert r["telemetry"] == {"free": 0, "drops": k - NENT + 1}, (k, r["telemetry"])
            assert e["owners"] and e["cleared"]          # the bank was still cleared
            assert e["no_record_cpus"] == e["owners"]
            assert e["action"] is None and "page_offline" not in e, (k, e)
            assert r["outcome"] == "continued"
            assert e["dom0_log"] == [] and "pool exhausted" in e["lost"], (k, e)
        assert r["violations"] == []
    st = m.dom0_status()
    assert st["pool"]["committed"] == sorted(ids) and st["logged"] == 0 and not st["drained"]

    m.dom0_resume()
    st = m.dom0_drain(timeout_s=30)
    assert st["drained"] and not st["paused"], st
    assert st["pool"]["free"] == NENT and st["pool"]["committed"] == []
    assert st["pool"]["processing"] == [] and st["pool"]["drops"] == 5
    assert st["logged"] == NENT and st["logged_more_than_once"] == []
    lines = log_lines(st["log_path"])
    assert Counter(x["id"] for x in lines) == Counter(ids)   # each exactly once
    # Urgent records raided the 20 non-urgent slots: all 30 are of the urgent class.
    assert {x["cls"] for x in lines} == {"urgent"}
    assert [x["banks"][0]["addr"] for x in lines] == \
        [f"0x{(0x181 + k) << 12:016X}" for k in range(NENT)]   # oldest first

    # The page whose error got no record was never offlined: it still is free now.
    r = m.inject(srao(1, 0x181 + NENT))
    e = r["errors"][0]
    assert r["outcome"] == "recovered" and "OFFLINED" in e["page_offline"]["status"]
    assert [d["count"] for d in e["dom0_log"]] == [1] and r["telemetry"]["drops"] == 5
    assert log_ids(st["log_path"])[e["dom0_log"][0]["id"]] == 1


def test_pause_holds_across_a_dom0_restart(emu_machine):
    m = emu_machine()
    m.dom0_pause()
    r1 = m.inject(srao(0, 0x1A0))
    pid = m.dom0_status()["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while (st := m.dom0_status())["restarts"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert st["restarts"] == 1 and st["pid"] not in (None, pid)
    assert st["paused"] and st["pool"]["committed"] == [r1["errors"][0]["dom0_log"][0]["id"]]
    r2 = m.inject(srao(1, 0x1A1))
    assert "pending" in r2["errors"][0]["dom0_log"][0]       # the new Dom0 is paused too
    want = {r["errors"][0]["dom0_log"][0]["id"] for r in (r1, r2)}
    st = m.dom0_status()
    assert st["logged"] == 0 and st["pool"]["committed"] == sorted(want), st
    with pytest.raises(UsageError, match="paused"):
        m.dom0_drain(timeout_s=1)
    with pytest.raises(UsageError) as ei:
        m._call("dom0", {"op": "stop"})
    assert ei.value.field == "dom0.op"
    m.dom0_resume()
    st = m.dom0_drain(timeout_s=30)
    assert st["drained"] and st["pool"]["free"] == NENT
    assert log_ids(st["log_path"]) == Counter(want)


def test_unfetched_records_are_reported_lost_by_an_unrelated_reset(emu_machine):
    m = emu_machine()
    m.dom0_pause()
    r1 = m.inject(srao(2, 0x1B0))
    [rid1] = [d["id"] for d in r1["errors"][0]["dom0_log"]]
    owner1 = r1["errors"][0]["owners"][0]
    # 1. Machine.reset(): the pool (Xen memory) goes; its result names what went.
    boot = m.reset()
    [x] = boot["lost_at_reset"]
    assert (x["trial"], x["cpu"], x["bank"], x["record_id"], x["source"], x["state"]) == \
        (r1["trial"], owner1, 8, rid1, "mce", "committed")
    assert x["status"] == "0xBD000000004000CF" and x["relogged_at_boot"] is None
    assert "Dom0 paused" in x["reason"] and "reset" in x["reason"]

    # 2. A fatal error in a later trial: its result lists the earlier trial's record,
    #    and its own deferred records, which boot-time logout logs again.
    r2 = m.inject(srao(3, 0x1B1))
    [rid2] = [d["id"] for d in r2["errors"][0]["dom0_log"]]
    r3 = m.inject(FATAL)
    assert r3["outcome"] == "reset"
    lost = r3["lost_at_reset"]
    earlier = [x for x in lost if x["trial"] == r2["trial"]]
    assert [(x["record_id"], x["bank"], x["state"]) for x in earlier] == [(rid2, 8, "committed")]
    own = [x for x in lost if x["trial"] == r3["trial"]]
    [boot_rec] = [b["record_id"] for b in r3["boot_log"] if b["bank"] == 5]
    assert own and all(x["bank"] == 5 and x["state"] == "uncommitted"
                       and x["relogged_at_boot"] == boot_rec for x in own), own
    assert len(lost) == len(earlier) + len(own)
    e = r3["errors"][0]
    assert "lost" not in e and [d["source"] for d in e["dom0_log"]] == ["boot"]
    assert e["dom0_log"][0]["count"] == 0 and "pending" in e["dom0_log"][0]
    assert m.dom0_status()["lost_at_reset"] == 2 + len(own)

    # 3. Resumed, Dom0 logs what survived (the boot record) once, and no lost record.
    m.dom0_resume()
    st = m.dom0_drain(timeout_s=30)
    assert st["drained"]
    ids = log_ids(st["log_path"])
    assert ids[boot_rec] == 1 and rid1 not in ids and rid2 not in ids
    r4 = m.inject(srao(0, 0x1B2))
    assert [d["count"] for d in r4["errors"][0]["dom0_log"]] == [1]
    assert r4["lost_at_reset"] == []


def test_machines_sharing_a_log_dir_do_not_reuse_record_ids(emu_machine, tmp_path):
    # Ids are boot<<32|seq and Dom0 acks an id already in its log without writing it
    # (a record written before a crash): a second machine on the same log must not
    # restart the numbering, or its records are acked as logged and never written.
    rs = []
    for run in range(2):
        m = emu_machine(extra={"log_dir": str(tmp_path)})
        rs.append(m.inject(srao(0, 0x1C0 + run)))
        m.close()
    ids = [r["errors"][0]["dom0_log"][0]["id"] for r in rs]
    assert ids[0] != ids[1] and all(r["errors"][0]["dom0_log"][0]["count"] == 1 for r in rs)
    lines = log_lines(rs[0]["dom0_log_path"])
    assert [x["id"] for x in lines] == ids
    assert [x["banks"][0]["addr"] for x in lines] == [f"0x{0x1C0 << 12:016X}",
                                                      f"0x{0x1C1 << 12:016X}"]


def test_records_of_a_trial_that_resets_in_its_softirq_are_lost_with_a_reason(emu_machine):
    # An SRAO and an SRAR with an unknown code in one #MC: the softirq worker replays
    # the CPUs' lists in turn; the SRAR's deferred action panics before any commit
    # of its own record, and the SRAO's record is committed or not depending on order.
    m = emu_machine()
    m.dom0_pause()      # else Dom0's start-up drain might fetch between commit and panic
    r = m.inject([srao(0, 0x1D0),
                  "cpu=2 bank=1 status=0xBD8000000000009F addr=0x185000 misc=0x86 mcg=0x7"])
    assert r["outcome"] == "reset" and r["panic"] == "MCE: Software recovery failed for the UCR"
    by_bank = {x["bank"]: x for x in r["lost_at_reset"]}
    assert sorted(by_bank) == [1, 8] and {x["trial"] for x in by_bank.values()} == {r["trial"]}
    assert by_bank[1]["state"] == "uncommitted"      # RESET: mc_panic, never committed
    for e in r["errors"]:
        x = by_bank[e["bank"]]
        assert e["lost"] == x["reason"] and "reset" in x["reason"], e
        assert all(d["count"] == 0 and "lost" in d for d in e["dom0_log"]), e
        # the SRAO's record is in dom0_log only if its deferred action committed it
        assert x["state"] == ("committed" if e["action"] == "recovered" else "uncommitted")
        assert len(e["dom0_log"]) == (x["state"] == "committed")
    assert r["latency_us"]["dom0_logged"] is None


def test_a_forged_ack_of_a_non_head_id_is_refused_and_counted(emu_machine):
    m = emu_machine(extra={"dom0_hooks": {"forge_ack": True}})
    r = m.inject(srao(0, 0x1E0))
    d = r["errors"][0]["dom0_log"]
    assert r["outcome"] == "recovered" and [x["count"] for x in d] == [1]
    assert r["dom0"]["refused"] == 1
    assert log_ids(r["dom0_log_path"]) == Counter({d[0]["id"]: 1})


def test_dom0_sigkilled_at_random_moments_logs_every_record_exactly_once(emu_machine):
    """Many real SIGKILLs of Dom0 while it logs: whatever point of fetch / write /
    ack each one hits, every record ends in the durable log exactly once."""
    import random
    import threading

    import psutil
    m = emu_machine(guests=0)
    cpus = set(m.cpu_pids.values())
    coord = psutil.Process(m.pid)
    stop = threading.Event()
    kills = []
    rng = random.Random(7)

    def killer():
        while not stop.wait(rng.uniform(0.21, 0.3)):   # the restart limit is 5 per second
            dom0 = [p.pid for p in coord.children() if p.pid not in cpus]
            if dom0:
                stop.wait(rng.uniform(0, 0.003))        # land anywhere in a drain
                try:
                    os.kill(dom0[0], signal.SIGKILL)
                    kills.append(dom0[0])
                except ProcessLookupError:
                    pass
    t = threading.Thread(target=killer)
    t.start()
    rids = []
    try:
        for k in range(2000):   # until 8 kills (about 2 s)
            r = m.inject(srao(k % 4, 0x180 + k % 0x80))
            assert r["outcome"] == "recovered", r
            rids += [x["id"] for x in r["errors"][0]["dom0_log"]]
            if len(kills) >= 8:
                break
    finally:
        stop.set()
        t.join()
    assert len(kills) >= 5
    assert m.dom0_drain(timeout_s=10)["drained"]
    counts = log_ids(r["dom0_log_path"])
    assert len(rids) == len(set(rids)) >= 20
    assert {i: counts[i] for i in rids} == {i: 1 for i in rids}
    assert all(n == 1 for n in counts.values())
