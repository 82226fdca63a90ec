"""Dom0 logger and guest #MC handler, each in a real forked child, with the test
playing the hypervisor side of the channel (a fake telemetry queue with Xen's
fetch/ack semantics and a small vMCE MSR-trap fake)."""
from __future__ import annotations

import json
import os
import select
import signal
import time
import traceback
from collections import deque

import msgpack
import multiprocess
import pytest

from emu.domains import dom0 as d0, guest as gk
from emu.domains.mcelog import DISCLAIMER
from emu.errors import UsageError
from emu.hw import msr

TIMEOUT = 5.0
GUEST_CAP = 0x01000C02
SRAO_STATUS = 0xBD000000004000CF           # xen-mceinj type 1, as the host bank holds it
SRAO_GUEST = 0xBD000000000000CF            # what the guest sees (MSCOD cleared)


# --- children ------------------------------------------------------------------------------
class Kids:
    """Forked children of one test; all reaped (SIGKILL if needed) at teardown."""

    def __init__(self):
        self.pids: dict[int, int] = {}

    def spawn(self, body, *args, **kw):
        parent_end, child_end = multiprocess.Pipe()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                parent_end.close()
                body(child_end, *args, **kw)
            except BaseException:  # noqa: BLE001
                traceback.print_exc()
                code = 70
            finally:
                os._exit(code)
        child_end.close()
        self.pids[pid] = os.pidfd_open(pid)
        return pid, parent_end

    def wait(self, pid: int, timeout: float = TIMEOUT) -> int:
        fd = self.pids[pid]
        r, _, _ = select.select([fd], [], [], timeout)
        assert r, f"child {pid} did not exit within {timeout} s"
        _, st = os.waitpid(pid, 0)
        os.close(self.pids.pop(pid))
        return os.waitstatus_to_exitcode(st)

    def reap(self):
        for pid, fd in list(self.pids.items()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            os.close(fd)
        self.pids.clear()


@pytest.fixture
def kids():
    k = Kids()
    yield k
    left = list(k.pids)
    k.reap()
    assert not left, f"children not reaped by the test: {left}"


# --- the hypervisor side ---------------------------------------------------------------------
def rec(cpu=0, bank=8, status=SRAO_STATUS, addr=0x180020, misc=0x86, gstatus=0x5):
    return {"who": 1, "flags": 0, "cpu": cpu,
            "g": {"mc_flags": 0x44, "mc_gstatus": gstatus, "mc_domid": 0, "mc_vcpuid": 0,
                  "mc_socketid": 0, "mc_coreid": cpu // 2, "mc_core_threadid": cpu % 2,
                  "mc_apicid": cpu, "mcgcap": 0x0900010A},
            "b": [[bank, status, addr, misc, 0]], "r": [[bank, 0, 1, addr >> 12, 0x11]]}


class FakeXen:
    """Telemetry queues (fetch returns the head until acked; ack only on the head) and
    per-vCPU vMCE state with vmce.c's write rules."""

    def __init__(self, nvcpus=2):
        self.q = {"urgent": deque(), "nonurgent": deque()}
        self.seq = 0
        self.requests: list = []
        self.logged: list[int] = []
        self.handled: list[dict] = []
        self.acked: list[int] = []
        self.paused = 0             # "paused" answers to pause notifications
        self.v = {i: {"cap": GUEST_CAP, "mcg_status": 0,
                      "banks": [[0, 0, 0], [0, 0, 0]]} for i in range(nvcpus)}
        self.on_request = None      # callback(msg, conn) before the reply is sent

    def add(self, cls="urgent", source="mce", **kw) -> int:
        self.seq += 1
        rid = (1 << 32) | self.seq
        self.q[cls].append({"id": rid, "cls": cls, "source": source, "record": rec(**kw)})
        return rid

    def vmce_fill(self, vcpu, gstatus=0x5, status=SRAO_GUEST, addr=0x180020, misc=0x86):
        self.v[vcpu]["mcg_status"] = gstatus
        self.v[vcpu]["banks"][1] = [status, addr, misc]

    def fetches(self):
        return [m for m in self.requests if m[1] == "fetch"]

    # -- MSR trap (vmce.c §7.2) --
    def rdmsr(self, vcpu, m):
        st = self.v[vcpu]
        if m == msr.MSR_IA32_MCG_CAP:
            return st["cap"]
        if m == msr.MSR_IA32_MCG_STATUS:
            return st["mcg_status"]
        if m == msr.MSR_IA32_MCG_CTL:
            return 0
        dec = msr.decode_bank_msr(m)
        if dec and dec[0] < (st["cap"] & 0xFF):
            bank, reg = dec
            if reg == msr.REG_CTL:
                return msr.U64
            if reg in (msr.REG_STATUS, msr.REG_ADDR, msr.REG_MISC):
                return st["banks"][bank][reg - msr.REG_STATUS]
            return 0
        if dec:
            return 0
        raise LookupError(f"rdmsr {m:#x} is not a vMCE MSR")

    def wrmsr(self, vcpu, m, value):
        st = self.v[vcpu]
        if m == msr.MSR_IA32_MCG_STATUS:
            st["mcg_status"] = value
            return
        dec = msr.decode_bank_msr(m)
        if dec and dec[0] < (st["cap"] & 0xFF) and dec[1] in (msr.REG_STATUS, msr.REG_ADDR,
                                                               msr.REG_MISC):
            if value != 0:
                raise LookupError(f"non-zero write {value:#x} to {m:#x}")
            st["banks"][dec[0]][dec[1] - msr.REG_STATUS] = 0

    def reply(self, msg):
        _, cmd, a = msg
        if cmd == "fetch":
            q = self.q[a["cls"]]
            return [True, dict(q[0]) if q else None]
        if cmd == "ack":
            q = self.q[a["cls"]]
            if q and q[0]["id"] == a["id"]:
                q.popleft()
                self.acked.append(a["id"])
                return [True, True]
            return [True, False]
        if cmd == "rdmsr":
            try:
                return [True, self.rdmsr(a["vcpu"], a["msr"])]
            except LookupError as e:
                return [False, {"type": "GP", "message": str(e)}]
        if cmd == "wrmsr":
            try:
                self.wrmsr(a["vcpu"], a["msr"], a["value"])
                return [True, None]
            except LookupError as e:
                return [False, {"type": "GP", "message": str(e)}]
        if cmd == "logged":
            self.logged += a["ids"]
            return None
        if cmd == "handled":
            self.handled.append(a)
            return None
        if cmd == "paused":
            self.paused += 1
            return None
        raise AssertionError(f"unexpected request {msg!r}")

    def serve(self, conn, until, timeout=TIMEOUT):
        """Answer requests until ``until()`` holds (checked after each message) or EOF.
        Returns True if the condition held, False on EOF."""
        deadline = time.monotonic() + timeout
        while not until():
            left = deadline - time.monotonic()
            assert left > 0, f"condition not reached; requests so far: {self.requests[-6:]}"
            if not conn.poll(left):
                continue
            try:
                raw = conn.recv_bytes()
            except EOFError:
                return False
            msg = msgpack.unpackb(raw, strict_map_key=False)
            self.requests.append(msg)
            if self.on_request:
                self.on_request(msg, conn)
            r = self.reply(msg)
            if r is not None:
                conn.send_bytes(msgpack.packb(r))
        return True

    def serve_to_eof(self, conn, timeout=TIMEOUT):
        assert self.serve(conn, lambda: False, timeout) is False


def note(conn, name, args=None):
    conn.send_bytes(msgpack.packb([1, name, args or {}]))


def log_ids(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data.endswith(b"\n") or not data
    return [json.loads(line)["id"] for line in data.splitlines()]


# --- Dom0 --------------------------------------------------------------------------------------
def test_records_logged_once_urgent_first(kids, tmp_path):
    x = FakeXen()
    nonurg = [x.add("nonurgent", source="poll") for _ in range(2)]
    urg = [x.add("urgent") for _ in range(3)]
    path = tmp_path / "dom0.jsonl"
    pid, conn = kids.spawn(d0.dom0_main, str(path))
    # 3 urgent + NODATA, then 2 non-urgent + NODATA
    assert x.serve(conn, lambda: len(x.fetches()) == 7)
    note(conn, "quit")
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 0
    assert x.logged == urg + nonurg
    assert log_ids(path) == urg + nonurg
    assert x.acked == urg + nonurg
    # every write/ack pair: fetch, ack, fetch ... then NODATA per class
    cmds = [m[1] + ":" + m[2]["cls"][0] for m in x.requests if m[1] in ("fetch", "ack")]
    assert cmds == ["fetch:u", "ack:u"] * 3 + ["fetch:u"] + ["fetch:n", "ack:n"] * 2 + ["fetch:n"]
    assert [m[1] for m in x.requests].count("logged") == 5
    line = json.loads(path.read_text().splitlines()[0])
    assert line["schema"] == "emu.mcelog/1"
    assert line["boot"] == 1 and line["cls"] == "urgent"
    assert line["banks"][0]["status"] == msr.hexs(SRAO_STATUS)
    assert line["global"]["mc_gstatus"] == msr.hexs(5)
    assert line["recovery"][0]["mfn"] == 0x180


@pytest.mark.parametrize("point", ["before_write", "mid_write", "after_write", "after_ack"])
def test_die_and_restart_logs_each_record_once(kids, tmp_path, point):
    x = FakeXen()
    ids = [x.add("urgent"), x.add("urgent"), x.add("nonurgent")]
    path = tmp_path / "dom0.jsonl"
    pid, conn = kids.spawn(d0.dom0_main, str(path), hooks={"die_at": point, "die_count": 2})
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 9
    assert x.logged == ids[:1]
    on_disk = path.read_bytes().split(b"\n")
    if point == "mid_write":
        assert on_disk[-1]                           # a torn line is there
    else:
        assert on_disk[-1] == b""
    written = [json.loads(line)["id"] for line in on_disk[:-1]]
    assert written == (ids[:1] if point in ("before_write", "mid_write") else ids[:2])
    expect_dup = point == "after_write"
    # restart on the same log: Xen hands out the same head again (not acked), or the next
    pid, conn = kids.spawn(d0.dom0_main, str(path))
    assert x.serve(conn, lambda: not x.q["urgent"] and not x.q["nonurgent"]
                   and len(x.logged) >= 2)
    note(conn, "quit")
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 0
    assert log_ids(path) == ids                      # each exactly once, in order
    assert x.acked == ids
    if point == "after_ack":
        assert x.logged == [ids[0], ids[2]]          # id 2 was acked, `logged` never sent
    else:
        assert x.logged == ids
    if expect_dup:
        assert sum(1 for m in x.requests if m[1] == "ack" and m[2]["id"] == ids[1]) == 1


def test_torn_line_repair(tmp_path):
    path = tmp_path / "dom0.jsonl"
    x = FakeXen()
    for _ in range(2):
        x.add()
    items = list(x.q["urgent"])
    log = d0.DurableLog(path)
    assert log.open() == 0
    log.append([d0.log_line(it) for it in items])
    log.close()
    partial = d0._dump(d0.log_line({"id": (1 << 32) | 99, "cls": "urgent", "source": "mce",
                                    "record": rec()}))[:40]
    with open(path, "ab") as f:
        f.write(partial)
    with pytest.raises(UsageError) as ei:
        d0.render_log(path)
    assert "line 3" in str(ei.value) and "torn" in str(ei.value)
    log = d0.DurableLog(path)
    assert log.open() == len(partial)
    assert log.ids() == {it["id"] for it in items}
    log.close()
    assert path.read_bytes().endswith(b"\n")
    assert log_ids(path) == [it["id"] for it in items]
    # a corrupt line that is not the last one is not a torn write
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"{not json\n" + lines[1])
    with pytest.raises(UsageError) as ei:
        d0.DurableLog(path).open()
    assert "line 1" in str(ei.value)
    with pytest.raises(UsageError) as ei:
        d0.render_log(path)
    assert "line 1" in str(ei.value)


def test_virq_coalescing_and_vmce_between_records(kids, tmp_path):
    x = FakeXen()
    x.vmce_fill(0)
    path = tmp_path / "dom0.jsonl"
    pid, conn = kids.spawn(d0.dom0_main, str(path))
    # initial drain: both classes empty
    assert x.serve(conn, lambda: len(x.fetches()) == 2)
    rid = x.add("urgent")
    sent = []

    def during_fetch(msg, c):
        # notifications arrive while Dom0 waits for its reply: it must set them aside
        if msg[1] == "fetch" and not sent:
            sent.append(1)
            for _ in range(3):
                note(c, "virq")
            note(c, "vmce", {"vcpus": [0]})
    x.on_request = during_fetch
    note(conn, "virq")
    # 2 (start) + fetch rid + urgent NODATA + nonurgent NODATA + ONE coalesced drain (2)
    assert x.serve(conn, lambda: len(x.handled) == 1 and len(x.fetches()) == 7)
    x.on_request = None
    # the #MC handler ran right after the record, before any further fetch
    after_logged = x.requests[[m[1] for m in x.requests].index("logged") + 1]
    assert after_logged[1] == "rdmsr"
    # idle now: a marker #MC is handled with no further drain before it or after it
    x.vmce_fill(0)
    note(conn, "vmce", {"vcpus": [0]})
    assert x.serve(conn, lambda: len(x.handled) == 2)
    note(conn, "quit")
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 0
    assert x.logged == [rid]
    assert len(x.fetches()) == 7
    assert x.handled[0]["cleared"] and x.v[0]["mcg_status"] == 0


def _resume_logs_and_quits(x, conn, kids, pid, path, rid) -> None:
    """Resume a paused Dom0: it logs ``rid`` (and nothing else), then quits cleanly."""
    note(conn, "resume")
    assert x.serve(conn, lambda: x.logged == [rid])
    note(conn, "quit")
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 0
    assert log_ids(path) == [rid]


def test_pause_resume(kids, tmp_path):
    x = FakeXen()
    rid = x.add("urgent")
    x.vmce_fill(0)
    path = tmp_path / "dom0.jsonl"
    pid, conn = kids.spawn(d0.dom0_main, str(path), hooks={"pause": True})
    note(conn, "virq")
    note(conn, "vmce", {"vcpus": [0]})      # a marker: its rdmsr must come before any fetch
    assert x.serve(conn, lambda: len(x.handled) == 1)
    assert x.fetches() == [] and x.logged == []
    _resume_logs_and_quits(x, conn, kids, pid, path, rid)


def test_pause_notification_is_confirmed_and_stops_fetching(kids, tmp_path):
    x = FakeXen()
    x.vmce_fill(0)
    path = tmp_path / "dom0.jsonl"
    pid, conn = kids.spawn(d0.dom0_main, str(path))
    assert x.serve(conn, lambda: len(x.fetches()) == 2)     # the start-up drain: NODATA
    note(conn, "pause")
    assert x.serve(conn, lambda: x.paused == 1)
    rid = x.add("urgent")
    note(conn, "virq")
    note(conn, "vmce", {"vcpus": [0]})      # a marker: handled after the virq
    assert x.serve(conn, lambda: len(x.handled) == 1)
    assert len(x.fetches()) == 2 and x.logged == []
    _resume_logs_and_quits(x, conn, kids, pid, path, rid)


def test_malformed_messages_are_dropped(kids, tmp_path):
    x = FakeXen()
    pid, conn = kids.spawn(d0.dom0_main, str(tmp_path / "l.jsonl"))
    assert x.serve(conn, lambda: len(x.fetches()) == 2)
    conn.send_bytes(b"\xc1garbage")
    conn.send_bytes(msgpack.packb([1, "bogus", {}]))
    conn.send_bytes(msgpack.packb([True, 5]))      # a reply nobody asked for
    rid = x.add()
    note(conn, "virq")
    assert x.serve(conn, lambda: x.logged == [rid])
    note(conn, "quit")
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 0


def test_render_log(tmp_path):
    path = tmp_path / "dom0.jsonl"
    with d0.DurableLog(path, fsync=False) as log:
        log.append([d0.log_line({"id": (3 << 32) | 7, "cls": "urgent", "source": "mce",
                                 "record": rec(cpu=2)}, now=0.0)])
    text = d0.render_log(path)
    assert text.startswith(DISCLAIMER + "\n")
    assert "CPU 2 BANK 8\n" in text
    assert "STATUS bd000000004000cf MCGSTATUS 5\n" in text
    assert "MISC 86 ADDR 180020\n" in text
    assert "MCA: MEMORY CONTROLLER MS_CHANNELunspecified_ERR" in text   # mce-test's string
    assert "SRAO" in text
    js = d0.render_log(path, json_out=True)
    assert json.loads(js)["id"] == (3 << 32) | 7 and json.loads(js)["boot"] == 3
    with pytest.raises(UsageError):
        d0.render_log(tmp_path / "missing.jsonl")


# --- guests ------------------------------------------------------------------------------------
def test_guest_handler_reads_clears_reports(kids, tmp_path):
    x = FakeXen(nvcpus=2)
    x.vmce_fill(0)
    x.v[1]["mcg_status"] = msr.MCG_STATUS_MCIP | msr.MCG_STATUS_RIPV   # broadcast dummy
    glog = tmp_path / "guest1.jsonl"
    pid, conn = kids.spawn(lambda c: gk.guest_main(1, c, str(glog)))
    note(conn, "vmce", {"vcpus": [0, 1]})
    assert x.serve(conn, lambda: len(x.handled) == 2)
    note(conn, "quit")
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 0
    r0, r1 = x.handled
    assert r0["domid"] == 1 and r0["vcpu"] == 0
    assert r0["read"] == {"mcg_cap": GUEST_CAP, "mcg_status": 5, "bank": 1,
                          "status": SRAO_GUEST, "addr": 0x180020, "misc": 0x86}
    assert r0["poisoned_pfn"] == 0x180 and r0["cleared"] and r0["gp"] == []
    assert r1["vcpu"] == 1 and r1["cleared"] and r1["poisoned_pfn"] is None
    assert r1["read"]["bank"] is None
    for v in (0, 1):
        assert x.v[v]["mcg_status"] & msr.MCG_STATUS_MCIP == 0
        assert x.v[v]["banks"][1] == [0, 0, 0]
    # the guest's own log, durably written, has the HWPoison lines
    entries = [json.loads(s) for s in glog.read_text().splitlines()]
    assert [e["vcpu"] for e in entries] == [0, 1]
    console = entries[0]["console"]
    assert any("kernel page recovery" in s for s in console)
    assert any(s.startswith("Memory failure: 0x180: recovery action for") and
               s.endswith("Recovered") for s in console)


def test_guest_mcip_not_set_clears_nothing(kids, tmp_path):
    x = FakeXen(nvcpus=1)
    x.vmce_fill(0, gstatus=0)
    glog = tmp_path / "g.jsonl"
    pid, conn = kids.spawn(lambda c: gk.guest_main(2, c, str(glog)))
    note(conn, "vmce", {"vcpus": [0]})
    assert x.serve(conn, lambda: len(x.handled) == 1)
    note(conn, "quit")
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 0
    r = x.handled[0]
    assert r["cleared"] is False and r["poisoned_pfn"] is None
    assert x.v[0]["banks"][1] == [SRAO_GUEST, 0x180020, 0x86]
    assert not any(m[1] == "wrmsr" for m in x.requests)
    assert "MCIP not set in MCA handler" in glog.read_text()


def test_guest_ignoring_vmce_leaves_mcip(kids, tmp_path):
    x = FakeXen(nvcpus=1)
    x.vmce_fill(0)
    pid, conn = kids.spawn(lambda c: gk.guest_main(1, c, str(tmp_path / "g.jsonl"),
                                                   hooks={"ignore_vmce": True}))
    note(conn, "vmce", {"vcpus": [0]})
    note(conn, "quit")
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 0
    assert x.requests == [] and x.v[0]["mcg_status"] == 5


def _attempt_writes(conn, path):
    k = gk.GuestKernel(1, conn, path)
    k.attempt_write(0, msr.MSR_IA32_MCx_STATUS(1), 0)         # 0 is accepted
    try:
        k.attempt_write(0, msr.MSR_IA32_MCx_STATUS(1), 0x1)
    except gk.GuestGP as e:
        assert e.msr == 0x405 and e.value == 1 and "non-zero" in e.message
        os._exit(42)
    os._exit(1)


def test_nonzero_status_write_raises_gp(kids, tmp_path):
    x = FakeXen(nvcpus=1)
    x.vmce_fill(0)
    pid, conn = kids.spawn(_attempt_writes, str(tmp_path / "g.jsonl"))
    x.serve_to_eof(conn)
    assert kids.wait(pid) == 42
    assert x.v[0]["banks"][1][0] == 0                         # only the 0 write took effect
    assert [m[2]["value"] for m in x.requests] == [0, 1]
