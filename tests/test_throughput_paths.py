"""The paths a campaign's throughput rests on: the pipelined worker loop, the
front end's asynchronous trial, the machine's CPU accounting and the boot-time page
table (each fast path shown equal to the plain one)."""
from __future__ import annotations

import mmap

import pytest
from conftest import FATAL, SRAO_MEM

from emu.campaign import stress as S
from emu.errors import UsageError
from emu.hw.atomic import atomics
from emu.xen import page_alloc as P


def test_page_table_image_equals_the_word_by_word_layout():
    """init_default copies one image; it must equal the map laid out a word at a time
    (and hold for a second boot, from the cached image)."""
    class _L:
        table, npages = 64, 16384

    class _R:
        pass
    _R.xen_map = mmap.mmap(-1, 8 * _L.npages + 64, flags=mmap.MAP_SHARED)
    _R.X = atomics(_R.xen_map, None)
    _R.L = type("RL", (), {"pages": _L})
    pt = P.PageTable(_R)
    doms = [0, 1, 2]
    for _ in range(2):
        _R.xen_map[:] = bytes(len(_R.xen_map))
        pt.init_default(doms)
        fast = bytes(_R.xen_map)
        _R.xen_map[:] = bytes(len(_R.xen_map))
        for mfn in range(pt.npages):
            pt.set(mfn, P.DOMID_NONE, P.PGC_FREE)
        for mfn in P.XEN_FIXED:
            pt.set(mfn, P.DOMID_XEN, P.PGC_XEN_FIXED | P.PGC_ALLOCATED)
        for mfn in P.XEN_HEAP:
            pt.set(mfn, P.DOMID_XEN, P.PGC_XEN_HEAP | P.PGC_ALLOCATED)
        for k, d in enumerate(doms):
            r = P.domain_range(k)
            for mfn in r:
                pt.set(mfn, d, P.PGC_ALLOCATED, mfn - r.start)
        assert fast == bytes(_R.xen_map)
    assert pt.owner(P.domain_range(1).start + 5) == 1
    assert pt.gfn_to_mfn(2, 7) == P.domain_range(2).start + 7


def test_inject_async_gives_what_inject_gives_and_keeps_calls_in_order(emu_machine):
    m = emu_machine()
    p = m.inject_async([SRAO_MEM], wait_dom0=False)
    # another call while it is in flight waits for it first; its result is kept
    st = m.dom0_status()
    assert "pool" in st
    r1 = p.result()
    assert r1["outcome"] == "recovered" and r1["errors"][0]["owners"]
    assert p.result() is r1
    r2 = m.inject([SRAO_MEM.replace("0x180020", "0x181020")])
    assert r2["trial"] == r1["trial"] + 1 and r2["outcome"] == "recovered"
    # checked before anything is sent: the machine is unharmed
    with pytest.raises(UsageError) as ei:
        m.inject_async(["cpu=9 bank=1 status=0x8000000000000000"])
    assert ei.value.field == "error[0].cpu"
    assert m.inject([FATAL])["outcome"] == "reset"


def test_cpu_times_count_the_processes_a_reset_replaced(emu_machine):
    """Machine.cpu_times adds the time of CPU processes a reset replaced; a warm reset
    replaces only the CPUs that cannot be held in reset (here: a killed one)."""
    m = emu_machine()
    a = m.cpu_times()
    assert set(a) == {"coordinator", "cpus", "dom0", "guests"}
    # /proc counts in clock ticks (10 ms): inject until the live processes' times move
    for _ in range(20):
        for _ in range(20):
            m.inject([SRAO_MEM], wait_dom0=False)
        b = m.cpu_times()
        if b["cpus"] > a["cpus"] and b["coordinator"] > a["coordinator"]:
            break
    assert b["cpus"] > a["cpus"] and b["coordinator"] > a["coordinator"], (a, b)
    old = dict(m.cpu_pids)
    boot = m.reset()
    # a warm reset holds the CPU processes in reset and releases them: none replaced
    assert m.cpu_pids == old and boot["reset_in_place"] == [0, 1, 2, 3]
    # ... but a dead one is: a kill_cpu fault ends in a reset that forks CPU 1 anew
    r = m.inject([SRAO_MEM], fault={"kind": "kill_cpu", "cpu": 1, "phase": "logout"})
    assert r["outcome"] == "cpu_died", r["outcome"]
    new = dict(m.cpu_pids)
    assert new[1] != old[1] and all(new[c] == old[c] for c in (0, 2, 3)), (old, new)
    c = m.cpu_times()
    # the replaced CPU's time is kept (taken at its reaping), not lost with it
    assert c["cpus"] >= b["cpus"] and c["dom0"] >= b["dom0"]


def _play(pipelined: bool, trials: int = 60):
    o = S.Options(seed=7, trials=trials, scenario="memory,fatal,ucna,owner_race", db=False,
                  machine={"topology": "1x2x2", "watchdog_s": 0.5}).validate()
    w = S.Worker(o).start()
    recs, sent = [], []
    try:
        if not pipelined:
            w.can_pipeline = lambda plan: False
        else:
            send, check = w.send, w.check_plan
            w.send = lambda plan: (sent.append(("send", plan["i"])), send(plan))[1]
            w.check_plan = lambda plan, *a, **k: (sent.append(("checked", plan["i"])),
                                                 check(plan, *a, **k))[1]
        S.play_items(w, o, [("trial", i) for i in range(trials)], recs.append)
        end = w.finish()
    finally:
        w.close()
    return recs, end, sent


def test_the_pipelined_loop_plays_what_the_plain_loop_plays():
    """Pipelined (trial i+1 sent before trial i is checked) and plain: the same trials
    in order, the same deterministic fields, no violation in either; the pipeline is
    used, and never after a trial that left the machine dirty."""
    a, end_a, sent = _play(True)
    b, end_b, _ = _play(False)
    assert [r["trial"] for r in a] == list(range(60)) == [r["trial"] for r in b]
    early = [i for k, (what, i) in enumerate(sent)     # sent before i-1 was checked
             if what == "send" and ("checked", i - 1) in sent[k:]]
    assert len(early) > 20, "the pipeline was not used"
    for x, y in zip(a, b, strict=True):
        assert (x["family"], x["specs"], x["streams"]) == (y["family"], y["specs"], y["streams"])
        if x["family"] in ("memory", "fatal"):       # no race: the outcome is fixed
            assert x["outcome"] == y["outcome"], (x["trial"], x["outcome"], y["outcome"])
    for recs, end in ((a, end_a), (b, end_b)):
        assert not [f for r in recs for f in r["findings"] if f["kind"] == "violation"]
        assert end == []
    by = {r["trial"]: r for r in a}
    for i in early:
        assert not by[i - 1]["warm_reset"], f"trial {i} was sent before {i - 1}'s reset"
        assert by[i - 1]["outcome"] not in S.RESET_OUTCOMES


def test_a_hang_where_every_cpu_sleeps_in_a_handler_wait_is_known_before_the_watchdog(
        emu_machine):
    """barrier-no-generation's lost wake-up parks every CPU in a barrier: the trial is a
    hang as soon as nobody has moved for hang_quiet_s, not after the watchdog. A
    stalled CPU (a fault: it sleeps outside any wait) still takes the watchdog."""
    import time
    m = emu_machine(handler="barrier-no-generation", watchdog_s=5.0)
    errs = ["cpu=0 bank=0 status=0x9C00000000010151 mcg=0x5",
            "cpu=2 bank=4 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5"]
    hangs = []
    for _ in range(8):
        t = time.monotonic()
        r = m.inject(errs)
        if r["outcome"] == "hang":
            hangs.append((time.monotonic() - t, r))
    assert hangs, "barrier-no-generation did not hang in 8 trials"
    for took, r in hangs:
        assert took < 2.5, took
        assert r["hang_detected"].startswith("early")
        assert r["snapshot"] and r["resets"] == 1
    m2 = emu_machine(watchdog_s=0.5)
    t = time.monotonic()
    r = m2.inject([SRAO_MEM], fault={"kind": "stall_cpu", "cpu": 1, "phase": "logout",
                                     "s": 0.75})
    assert r["outcome"] == "hang" and "hang_detected" not in r
    assert time.monotonic() - t >= 0.5


def test_a_bank_left_valid_is_cleared_by_the_harness_not_by_a_warm_reset(emu_machine):
    """UCNA is not cleared in #MC: the campaign writes 0 to that bank (Machine.
    clear_banks, as a harness's wrmsr) and goes on without a boot; bad arguments are
    usage errors naming ``banks``."""
    from conftest import UCNA
    m = emu_machine()
    r = m.inject([UCNA])
    assert not r["errors"][0]["cleared"]
    assert m._call("banks", {})[1 * m.config.nbanks + 6][1] != 0   # still valid
    boots = m.boot_info["boot"]
    assert m.clear_banks([(1, 6)]) == [m._topo.inst[1][6]]
    assert m._call("banks", {})[1 * m.config.nbanks + 6][1] == 0
    assert m.snapshot()["pids"] and m.inject([SRAO_MEM])["outcome"] == "recovered"
    assert m.boot_info["boot"] == boots
    for bad in ([(9, 0)], [("x", 1)], "nope"):
        with pytest.raises(UsageError) as ei:
            m.clear_banks(bad)
        assert ei.value.field == "banks"

    o = S.Options(seed=3, trials=40, scenario="ucna", db=False,
                  machine={"topology": "1x2x2", "watchdog_s": 0.5}).validate()
    recs = []
    w = S.Worker(o).start()
    try:
        S.play_items(w, o, [("trial", i) for i in range(40)], recs.append)
        assert w.finish() == []
        assert w.warm_resets == 0
    finally:
        w.close()
    assert sum(bool(r["banks_cleared"]) for r in recs) >= 20
    assert not [f for r in recs for f in r["findings"] if f["kind"] == "violation"]
