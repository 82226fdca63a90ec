"""Tracing one trial: the trace agrees with the trial result, the Chrome Trace
Event export validates, the PNG and the explanation are written, and the untraced
yield point stays the no-op it was."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from conftest import SRAO_MEM

from emu.formats import trace as T
from emu.hw.yieldpoint import YieldPoints, _noop
from emu.xen.mce import PHASES

ROOT = Path(__file__).resolve().parents[1]
GUEST_SRAO = "cpu=1 bank=8 status=0xBD000000004000CF addr=0x123020 misc=0x86 mcg=0x5 domain=1"
HANDLER_ORDER = ("entered", "logout", "barrier_a", "barrier_b", "fatal_check", "barrier_c",
                 "exit", "softirq", "softirq_worker", "softirq_done", "idle")


def _check_agrees(tr: dict, r: dict) -> list[dict]:
    entries = T.decode(tr)
    assert tr["dropped"] == 0 and entries
    entered = [c for c in r["targets"] if "entered" in r["cpus"][c]["phases"]]
    # each CPU's phases in handler order, every entered CPU from entry to softirq_done
    runs = {}
    for e in entries:
        if e["site"] == "phase":
            runs.setdefault(e["cpu"], []).append(e["phase"])
    assert sorted(runs) == sorted(entered)
    for c, ps in runs.items():
        idx = [HANDLER_ORDER.index(p) for p in ps]
        assert idx == sorted(idx), (c, ps)
        assert ps[0] == "entered" and "softirq_done" in ps, (c, ps)
        assert set(ps) <= set(r["cpus"][c]["phases"]) | {"idle"}, (c, ps)
    # mce_logout_lock: one acquisition per entered CPU, never two holders at once
    acq = T.lock_acquisitions(entries)
    assert sorted(a["cpu"] for a in acq) == sorted(entered)
    for a, b in zip(acq, acq[1:], strict=False):
        assert a["acquire"]["seq"] < a["release"]["seq"] < b["acquire"]["seq"]
    # the owner's clear of a shared bank precedes every other sharer's read of it
    for e in r["errors"]:
        assert len(e["owners"]) == 1 and e["cleared"], e
        owner, bank = e["owners"][0], e["bank"]
        clears = [x["seq"] for x in entries if x["cpu"] == owner and x["site"] == "wrmsr"
                  and x["bank"] == bank and x["reg"] == 1]
        assert len(clears) == 1, clears
        reads = [x for x in entries if x["site"] == "rdmsr" and x["bank"] == bank
                 and x["reg"] == 1 and x["cpu"] in e["sharers"] and x["cpu"] != owner]
        assert len(reads) == len(set(e["sharers"]) & set(entered)) - 1
        assert all(x["seq"] > clears[0] for x in reads), (clears, reads)
        # and the owner read it before clearing it, under the lock it held
        mine = next(a for a in acq if a["cpu"] == owner)
        assert mine["acquire"]["seq"] < clears[0] < mine["release"]["seq"]
    return entries


def test_trace_agrees_with_the_trial_result(emu_machine):
    m = emu_machine(trace=True)
    for k in range(3):   # the ring is the last trial's only
        r = m.inject(SRAO_MEM.replace("0x180020", f"{0x181020 + 0x1000 * k:#x}"))
        assert r["outcome"] == "recovered" and r["violations"] == []
        tr = m.trace()
        assert tr["trial"] == r["trial"]
        entries = _check_agrees(tr, r)
        assert sum(e["site"] == "virq" for e in entries) == 1
        names = [ev[2] for ev in tr["events"]]
        assert names[0] == "raise" and {"fetch", "ack", "write"} <= set(names), names


def test_trace_of_a_guest_error_shows_the_vmce_and_trapped_msrs(emu_machine):
    m = emu_machine(trace=True)
    r = m.inject(GUEST_SRAO)
    assert r["latency_us"]["guest_handled"] is not None, r["errors"]
    tr = m.trace()
    _check_agrees(tr, r)
    dom1 = [ev for ev in tr["events"] if ev[1] == "dom1"]
    kinds = {ev[2] for ev in dom1}
    assert {"vmce", "rdmsr", "handled"} <= kinds, kinds
    lines = T.explain(tr, r)
    assert any("DOM1 got a vMCE" in x for x in lines), lines


def test_chrome_export_validates_and_has_the_tracks_and_flows(emu_machine, tmp_path):
    m = emu_machine(trace=True)
    r = m.inject(SRAO_MEM)
    tr = m.trace()
    doc = T.write_chrome_trace(tr, str(tmp_path / "t.json"), r)
    doc = json.loads((tmp_path / "t.json").read_text())
    jsonschema.validate(doc, T.TRACE_EVENT_SCHEMA)
    assert T.validate(doc) == []
    evs = doc["traceEvents"]
    names = {e["args"]["name"] for e in evs if e["name"] == "thread_name"}
    assert names == {"coordinator", "cpu0", "cpu1", "cpu2", "cpu3", "dom0", "dom1"}
    flows = [e for e in evs if e["ph"] in ("s", "f")]
    mc = [e for e in flows if e["cat"] == "mc"]
    assert sorted(e["pid"] for e in mc if e["ph"] == "f") == [1, 2, 3, 4]
    assert {e["id"] for e in mc if e["ph"] == "s"} == {e["id"] for e in mc if e["ph"] == "f"}
    virq = [e for e in flows if e["cat"] == "virq"]
    assert [e["ph"] for e in virq] == ["s", "f"] or sorted(e["ph"] for e in virq) == ["f", "s"]
    slices = [e for e in evs if e["ph"] == "X" and e["cat"] == "phase"]
    assert {e["name"] for e in slices} >= {"entered", "logout", "barrier_a", "exit", "softirq"}
    assert any(e["name"] == "acquire mce_logout_lock" for e in evs)
    assert any(e["name"] == "wrmsr MC8_STATUS (clear)" for e in evs)
    # validate() catches what it must
    bad = {"traceEvents": [{"name": "a", "ph": "i", "pid": 1, "tid": 0, "ts": 5.0, "s": "t"},
                           {"name": "b", "ph": "i", "pid": 1, "tid": 0, "ts": 4.0, "s": "t"},
                           {"name": "c", "ph": "Q", "pid": 1, "tid": 0, "ts": 6.0}]}
    errs = T.validate(bad)
    assert any("before" in e for e in errs) and any("ph 'Q'" in e for e in errs), errs


def test_cli_trace_png_and_explain(tmp_path):
    js, png = tmp_path / "t.json", tmp_path / "t.png"
    p = subprocess.run([sys.executable, "-m", "emu", "run", "--trace", str(js), "--trace-png",
                        str(png), "--explain", "--log-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "took mce_logout_lock first" in p.stdout and "cleared it: owner" in p.stdout, p.stdout
    assert "read bank 8 empty" in p.stdout
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert T.validate(json.loads(js.read_text())) == []
    out = tmp_path / "emu-trace.json"
    p = subprocess.run([sys.executable, "-m", "emu", "trace", "--out", str(out), "--log-dir",
                        str(tmp_path), "--error", SRAO_MEM], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "cleared it: owner" in p.stdout and T.validate(json.loads(out.read_text())) == []
    p = subprocess.run([sys.executable, "-m", "emu", "run", "--trace", "/nonexistent-dir/t.json"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert p.returncode == 2 and "error: trace:" in p.stderr


def test_untraced_yield_point_is_the_noop(emu_machine):
    assert YieldPoints(0).yp is _noop
    assert YieldPoints(0, trace=(None, 0, 0, 0)).yp is not _noop
    m = emu_machine()
    m.inject(SRAO_MEM)
    with pytest.raises(Exception, match="does not trace"):
        m.trace()
    assert len(PHASES) < 32   # phase numbers fit the trace's detail word
