"""Issue 16: exactly-once under shared log directories and full disks, bounded Dom0
restarts, a front door that cannot get out of step, and input that can never crash
the emulator. One test (at least) per item, each failing on the code before it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import SRAO_MEM

from emu.domains import dom0 as d0
from emu.errors import EmulatorInternalError, UsageError
from emu.machine import Machine
from emu.machine.config import MachineConfig
from emu.pytest_plugin import wait_no_children


def srao(cpu: int, mfn: int) -> str:
    return f"cpu={cpu} bank=8 status=0xBD000000004000CF addr={mfn << 12:#x} misc=0x86 mcg=0x5"


def emu(*args, timeout=60, **kw):
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True,
                          timeout=timeout, **kw)


def cli(capsys, *argv):
    """emu's main in this process: (exit code, stdout, stderr)."""
    from emu.cli import main
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def log_lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- 1. one writer per log directory ----------------------------------------------------------
def test_1_a_second_machine_on_a_log_dir_is_refused_naming_log_dir(emu_machine, tmp_path):
    m = emu_machine(extra={"log_dir": str(tmp_path)})
    with pytest.raises(UsageError) as ei:
        Machine(extra={"log_dir": str(tmp_path)}).start()
    assert ei.value.field == "log-dir" and "in use by another machine" in str(ei.value)
    r = m.inject(SRAO_MEM)                 # the first machine is unharmed
    assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1]
    m.close()
    m2 = emu_machine(extra={"log_dir": str(tmp_path)})   # released at close
    r2 = m2.inject(SRAO_MEM)
    ids = [x["id"] for x in log_lines(r["dom0_log_path"])]
    assert ids == [r["errors"][0]["dom0_log"][0]["id"], r2["errors"][0]["dom0_log"][0]["id"]]
    assert len(set(ids)) == 2


def test_1_a_machine_closed_releases_its_dir_while_another_runs(emu_machine, tmp_path):
    a = emu_machine(extra={"log_dir": str(tmp_path / "a")})
    emu_machine(extra={"log_dir": str(tmp_path / "b")})   # forked while a's lock is held
    a.close()
    again = emu_machine(extra={"log_dir": str(tmp_path / "a")})
    assert again.inject(SRAO_MEM)["outcome"] == "recovered"


def test_1_concurrent_cli_runs_on_one_log_dir_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-m", "emu", "run", "--json", "--log-dir",
                               str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [(p.communicate(timeout=120), p.returncode) for p in procs]
    ok = []
    for (out, err), rc in outs:
        assert rc in (0, 2), err
        if rc == 2:
            assert "log-dir" in err and out == ""
        else:
            ok.append(json.loads(out))
    assert ok
    lines = log_lines(tmp_path / "dom0.jsonl")
    ids = [x["id"] for x in lines]
    assert len(ids) == len(set(ids)) == len(ok)
    assert sorted(r["errors"][0]["dom0_log"][0]["id"] for r in ok) == sorted(ids)


# -- 2. a full or failing disk -----------------------------------------------------------------
def test_2_dom0_write_failure_is_named_restarted_with_backoff_and_recovers(emu_machine, tmp_path,
                                                                          capfd):
    flag = tmp_path / "disk-full"
    flag.write_text("")
    m = emu_machine(extra={"log_dir": str(tmp_path / "run"),
                           "dom0_hooks": {"fail_write": str(flag)}})
    r = m.inject(SRAO_MEM)
    ent = r["errors"][0]["dom0_log"][0]
    assert ent["count"] == 0 and ent["not_durable"]["errno"] == "ENOSPC"
    assert ent["not_durable"]["path"].endswith("dom0.jsonl") and "ENOSPC" in ent["pending"]
    assert r["dom0"]["log_failure"]["errno"] == "ENOSPC"
    wait_for(lambda: m.dom0_status()["restarts"] >= 3, what="Dom0 restarts with a back-off")
    flag.unlink()                          # space comes back
    st = m.dom0_drain(10)
    assert st["drained"] and st["log_failure"] is None and st["logged"] >= 1
    assert ent["id"] in {x["id"] for x in log_lines(r["dom0_log_path"])}
    err = capfd.readouterr().err
    assert "ENOSPC" in err and str(tmp_path / "run" / "dom0.jsonl") in err


@pytest.fixture
def tiny_fs(tmp_path):
    """A 16 KiB tmpfs (root only), filled up."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "run").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"x" * 512)
        except OSError:
            pass
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_2_full_disk_cli_run_says_enospc_and_exits_non_zero(tiny_fs):
    p = emu("run", "--json", "--log-dir", str(tiny_fs / "run"), timeout=120)
    assert p.returncode == 4, p.stderr
    r = json.loads(p.stdout)               # stdout is the JSON object only
    assert r["dom0"]["log_failure"]["errno"] == "ENOSPC"
    assert "ENOSPC" in p.stderr and str(tiny_fs / "run" / "dom0.jsonl") in p.stderr
    assert "Traceback" not in p.stderr


def test_2_log_linked_to_dev_full_fails_clearly_and_fast(tmp_path):
    os.symlink("/dev/full", tmp_path / "dom0.jsonl")
    t0 = time.monotonic()
    p = emu("run", "--json", "--log-dir", str(tmp_path), timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert "log-dir" in p.stderr and "not a regular file" in p.stderr
    assert time.monotonic() - t0 < 60


def test_2_dom0_refuses_a_log_that_is_not_a_regular_file(tmp_path):
    with pytest.raises(UsageError) as ei:
        d0.DurableLog("/dev/full").open()
    assert "not a regular file" in str(ei.value)


# -- 3. bounded restarts -----------------------------------------------------------------------
def _fill(path, n, boot=1):
    rec = {"cpu": 0, "who": 1, "flags": 0, "g": {"mc_gstatus": 5, "mcgcap": 0x1000c0a},
           "b": [[8, 0xBD000000004000CF, 0x180020, 0x86, 0]], "r": []}
    with d0.DurableLog(path, fsync=False) as log:
        for k in range(n):
            log.append([d0.log_line({"id": boot << 32 | k + 1, "cls": "urgent", "source": "mce",
                                     "record": rec}, now=0.0)])


def test_3_dom0_restart_reads_a_bounded_part_of_a_long_log(tmp_path):
    path = tmp_path / "dom0.jsonl"
    _fill(path, 3000)
    size = path.stat().st_size
    assert size > 4 * d0.CHECKPOINT_BYTES
    log = d0.DurableLog(path)
    log.open()
    # a restart checks what came after the checkpoint, not the whole log
    assert log.scanned < d0.CHECKPOINT_BYTES and log.lines == 3000
    assert (1 << 32 | 3000) in log and (1 << 32 | 2990) in log   # the dedup's recent ids
    assert len(log.ids()) <= d0.RECENT_IDS
    log.close()
    assert d0.last_boot(str(path)) == 1
    # torn-write repair is kept
    with open(path, "ab") as f:
        f.write(b'{"schema":"emu.mcelog/1","id":12')
    log = d0.DurableLog(path)
    assert log.open() > 0 and log.scanned < d0.CHECKPOINT_BYTES
    log.close()
    assert path.stat().st_size == size
    # a corrupt line after the checkpoint is found, with its line number
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]) + b"garbage\n" + lines[-1])
    with pytest.raises(UsageError) as ei:
        d0.DurableLog(path).open()
    assert "line 2999" in str(ei.value)
    # a checkpoint that does not match the log (another file) is ignored: full check
    path.write_bytes(b"".join(lines[:10]))
    log = d0.DurableLog(path)
    log.open()
    assert log.lines == 10 and log.scanned == path.stat().st_size
    log.close()


def test_3_the_coordinator_keeps_a_bounded_set_of_logged_ids():
    from emu.machine.channels import LOGGED_KEEP, DomainChannels

    class Co(DomainChannels):
        def __init__(self):
            self.logged, self.logged_total, self.logged_multi = {}, 0, set()
            self._acked_unlogged, self._rid_origin = set(), {}
    co = Co()
    for rid in range(10 * LOGGED_KEEP):
        co._mark_logged(rid)
    co._mark_logged(10 * LOGGED_KEEP - 1)
    assert len(co.logged) <= 2 * LOGGED_KEEP
    assert co.logged_total == 10 * LOGGED_KEEP and co.logged_multi == {10 * LOGGED_KEEP - 1}


def test_3_restart_benchmark_smoke(tmp_path):
    p = subprocess.run([sys.executable, "bench/dom0_restart.py", "--sizes", "200,2000",
                        "--dir", str(tmp_path), "--json", "--repeat", "1"],
                       capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["records"] for r in rows] == [200, 2000]
    assert all(r["restart_scanned_bytes"] < r["log_bytes"] or r["records"] < 1000 for r in rows)


# -- 4. nothing but JSON on stdout ---------------------------------------------------------------
def test_4_coordinator_diagnostics_go_to_stderr(emu_machine, tmp_path, capfd):
    m = emu_machine(extra={"log_dir": str(tmp_path)})
    r = m.inject(SRAO_MEM)
    path = r["dom0_log_path"]
    capfd.readouterr()
    # A log corrupted behind Dom0's back: every Dom0 start dies on it.
    data = Path(path).read_bytes()
    with open(path, "wb") as f:
        f.write(b"garbage\n" + data)
    os.kill(m.snapshot()["dom_pids"][0], signal.SIGKILL)
    wait_for(lambda: m.dom0_status()["restarts"] >= 7, what="Dom0 to keep dying")
    out, err = capfd.readouterr()
    assert "coordinator" not in out and "Dom0" not in out
    assert "Dom0 keeps dying" in err or "cannot write its log" in err
    with open(path, "wb") as f:     # repaired: Dom0 comes back (never given up)
        f.write(data)
    r = m.inject(srao(0, 0x1A3))
    st = m.dom0_drain(10)
    assert st["drained"] and st["log_failure"] is None
    rid = r["errors"][0]["dom0_log"][0]["id"]
    assert rid in {x["id"] for x in log_lines(path)}


# -- 5. requests and replies stay in step ------------------------------------------------------
def test_5_a_failed_call_does_not_put_replies_out_of_step(emu_machine):
    m = emu_machine()
    with pytest.raises(UsageError) as ei:
        m.dom0_drain(timeout_s=float("nan"))
    assert ei.value.field == "timeout_s"
    assert m.inject(SRAO_MEM)["outcome"] == "recovered"
    # A call that times out after its request went out: its late reply is dropped.
    with pytest.raises(EmulatorInternalError):
        m._call("trial", {"errors": [srao(1, 0x1A4)], "local": False, "timeout_s": None,
                          "then": None}, timeout=0.0001)
    snap = m.snapshot()
    assert set(snap) >= {"cpus", "pids"} and "outcome" not in snap
    r = m.inject(srao(2, 0x1A5))
    assert r["outcome"] == "recovered" and r["errors"][0]["cpu"] == 2


def test_5_ctrl_c_during_a_call_leaves_the_machine_usable(emu_machine):
    m = emu_machine(extra={"hooks": {"stall_phase": "barrier_a", "stall_s": 30,
                                     "stall_cpus": [3]}}, watchdog_s=0.5)

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGUSR1, interrupt)
    timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
    try:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            m.inject(SRAO_MEM)          # the trial hangs (watchdog 0.5 s): ^C meanwhile
    finally:
        timer.cancel()
        signal.signal(signal.SIGUSR1, old)
    snap = m.snapshot()                 # not the interrupted trial's late reply
    assert set(snap) >= {"cpus", "pids"} and "outcome" not in snap
    m.set_hooks(stall_phase=None)
    m.reset()
    assert m.inject(srao(1, 0x1A6))["outcome"] == "recovered"


# -- 6. a failed start leaves nothing ------------------------------------------------------------
def test_6_a_failed_start_leaves_no_coordinator(monkeypatch, tmp_path):
    from emu.machine import coordinator

    def boom(self):
        raise EmulatorInternalError("boot failed (test)")
    monkeypatch.setattr(coordinator.Coordinator, "power_on", boom)
    m = Machine(extra={"log_dir": str(tmp_path)})
    with pytest.raises(EmulatorInternalError, match="boot failed"):
        m.start()
    assert m.pid is None
    assert wait_no_children(2.0) == []
    monkeypatch.undo()
    with Machine(extra={"log_dir": str(tmp_path)}) as m2:   # the lock was released
        assert m2.boot_info["cpus"] == 4


def test_6_bad_options_start_nothing():
    with pytest.raises(UsageError) as ei:
        with Machine(seed=1.5):
            pass
    assert ei.value.field == "seed"
    assert wait_no_children(0.5) == []


# -- 7. started from a thread that exits ------------------------------------------------------
def test_7_a_machine_started_from_a_thread_outlives_the_thread(tmp_path):
    box = {}

    def start():
        box["m"] = Machine(extra={"log_dir": str(tmp_path)}).start()
    t = threading.Thread(target=start)
    t.start()
    t.join()
    m = box["m"]
    try:
        assert m.inject(SRAO_MEM)["outcome"] == "recovered"   # the coordinator lives
        assert all(not gone(p) for p in list(m.cpu_pids.values()) + [m.pid])
    finally:
        m.close()


def test_7_a_thread_started_machine_dies_with_its_process(tmp_path):
    code = ("import threading, time, json, sys\n"
            "from emu.machine import Machine\n"
            f"box = {{}}\n"
            f"t = threading.Thread(target=lambda: box.update(m=Machine(extra={{'log_dir': "
            f"{str(tmp_path)!r}}}).start()))\n"
            "t.start(); t.join(); m = box['m']\n"
            "print(json.dumps([m.pid] + list(m.cpu_pids.values())), flush=True)\n"
            "time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(p.stdout.readline())
        p.kill()
        p.wait(10)
        procs = []
        for x in pids:
            try:
                procs.append(psutil.Process(x))
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        assert not alive
    finally:
        p.kill()
        p.wait()
        p.stdout.close()


# -- 8. a CPU that dies between trials --------------------------------------------------------
def test_8_a_cpu_dying_between_trials_is_not_blamed_on_the_next(emu_machine):
    m = emu_machine()
    r1 = m.inject(SRAO_MEM)
    assert r1["outcome"] == "recovered"
    pid = m.cpu_pids[1]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), what="CPU 1 to die")
    r = m.inject(srao(0, 0x1B7))
    assert r["outcome"] == "recovered" and r["resets"] == 0
    assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1]
    assert "lost" not in r["errors"][0]
    [db] = r["died_between_trials"]
    assert db["cpus"] == [1] and db["after_trial"] == r1["trial"]
    assert db["exits"] == [{"cpu": 1, "exit": "signal 9"}]
    assert len(r["cpus"]) == 4 and all(isinstance(c, dict) for c in r["cpus"])
    assert "died_between_trials" not in m.inject(srao(3, 0x1B8))


def test_8_a_cpu_died_result_keeps_cpus_and_names_the_dead(emu_machine):
    m = emu_machine(extra={"hooks": {"kill_phase": "barrier_a", "kill_cpus": [1]}},
                    watchdog_s=1.0)
    for _ in range(3):
        r = m.inject(SRAO_MEM)
        if r["outcome"] == "cpu_died":
            break
    assert r["outcome"] == "cpu_died", r["outcome"]
    assert r["dead_cpus"] == [1]
    assert len(r["cpus"]) == 4 and all(isinstance(c, dict) and "phases" in c for c in r["cpus"])


# -- 9. every public input validated ------------------------------------------------------------
@pytest.mark.parametrize("kw, field", [
    ({"seed": 1.5}, "seed"), ({"seed": "x"}, "seed"), ({"seed": None}, "seed"),
    ({"seed": 1 << 64}, "seed"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
    ({"watchdog_s": "2"}, "watchdog"), ({"watchdog_s": float("nan")}, "watchdog"),
    ({"chaos": "0.5"}, "chaos"), ({"chaos": float("inf")}, "chaos"),
    ({"memory_pages": 16384.0}, "memory-pages"), ({"extra": None}, "extra"),
    ({"atomic_backend": "bogus"}, "atomic_backend"), ({"nbanks": True}, "banks"),
    ({"guests": True}, "guests"), ({"ser": 1}, "ser"), ({"topology": None}, "topology"),
    ({"bank_scopes": 5}, "bank-scopes"), ({"handler": ["seed"]}, "handler"),
    ({"extra": {"log_dir": 5}}, "log-dir"), ({"extra": {"hooks": None}}, "extra.hooks"),
    ({"colour": "red"}, "machine"),
])
def test_9_bad_machine_options_are_usage_errors_before_anything_forks(kw, field):
    with pytest.raises(UsageError) as ei:
        Machine(**kw)
    assert ei.value.field == field
    assert wait_no_children(0.2) == []


def test_9_bank_scopes_none_is_the_clipped_default():
    assert MachineConfig(bank_scopes=None).validate().bank_scopes == "0-3:core,4-9:package"
    assert MachineConfig(nbanks=4).validate().bank_scopes == "0-3:core"


def test_9_bad_inject_arguments_are_refused_before_any_bank_is_written(emu_machine):
    m = emu_machine()
    bad = [
        ({"errors": SRAO_MEM, "timeout_s": "x"}, "timeout_s"),
        ({"errors": SRAO_MEM, "timeout_s": -1}, "timeout_s"),
        ({"errors": SRAO_MEM, "timeout_s": float("nan")}, "timeout_s"),
        ({"errors": {"cpu": 0, "bank": 8, "status": 1 << 64}}, "error[0].status"),
        ({"errors": SRAO_MEM, "then": "x"}, "then"),
        ({"errors": SRAO_MEM, "then": {"errors": SRAO_MEM, "after_phase": "nowhere"}},
         "then.after_phase"),
        ({"errors": "cpu=\u0660 bank=8 status=0xBD000000004000CF"}, "error[0].cpu"),
        ({"errors": {"cpu": True, "bank": 8, "status": 0xBD000000004000CF}}, "error[0].cpu"),
        ({"errors": SRAO_MEM, "local": "yes"}, "local"),
        ({"errors": 5}, "errors"),
        ({"errors": [SRAO_MEM, None]}, "errors[1]"),
    ]
    for kw, field in bad:
        with pytest.raises(UsageError) as ei:
            m.inject(**kw)
        assert ei.value.field == field, (kw, ei.value)
    banks = m._call("banks", {})
    assert not any(b[1] for b in banks)    # no STATUS written by any of them
    r = m.inject(SRAO_MEM)
    assert r["outcome"] == "recovered" and r["trial"] == 1


@pytest.mark.parametrize("argv, field", [
    (["--seed", "18446744073709551616"], "seed"),
    (["--seed", "\u0661"], "seed"),
    (["--banks", "\u0664"], "banks"),
    (["--chaos", "nan"], "chaos"),
    (["--watchdog", "inf"], "watchdog"),
    (["--error", "cpu=\u0660 bank=8 status=0xBD000000004000CF"], "error[0].cpu"),
])
def test_9_cli_values_that_used_to_crash_exit_2(capsys, argv, field):
    code, out, err = cli(capsys, "run", "--json", *argv)
    assert code == 2 and out == "" and f"emu: error: {field}:" in err


# -- 10. the log directory checked before booting -------------------------------------------------
def _ro_mount(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(d)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    return d


@pytest.mark.parametrize("case", ["file", "devnull", "under_file", "too_long", "read_only",
                                  "corrupt", "empty"])
def test_10_bad_log_dirs_exit_2_naming_log_dir_before_booting(capsys, tmp_path, case):
    mounted = None
    if case == "file":
        (tmp_path / "f").write_text("x")
        ld = str(tmp_path / "f")
    elif case == "devnull":
        ld = "/dev/null"
    elif case == "under_file":
        (tmp_path / "f").write_text("x")
        ld = str(tmp_path / "f" / "run")
    elif case == "too_long":
        ld = str(tmp_path / ("a" * 300))
    elif case == "read_only":
        mounted = ld = str(_ro_mount(tmp_path))
    elif case == "empty":
        ld = ""
    else:
        ld = str(tmp_path / "run")
        os.mkdir(ld)
        line = json.dumps({"schema": d0.SCHEMA, "id": 1 << 32 | 1}) + "\n"
        with open(os.path.join(ld, "dom0.jsonl"), "w") as f:
            f.write(line + "{corrupt\n" + line)
    try:
        t0 = time.monotonic()
        code, out, err = cli(capsys, "run", "--json", "--log-dir", ld)
        assert code == 2 and out == "" and "emu: error: log-dir:" in err, err
        assert time.monotonic() - t0 < 10
        if case == "corrupt":
            assert "line 2" in err
        assert wait_no_children(0.2) == []
    finally:
        if mounted:
            subprocess.run(["umount", "-l", mounted], capture_output=True)


# -- 11. emu log: regular files, bounded, typed ---------------------------------------------------
def _rec(**kw):
    return json.dumps(dict({"schema": d0.SCHEMA, "id": 1 << 32 | 1}, **kw))


@pytest.mark.parametrize("content", [
    _rec(banks=[{"bank": "x"}]) + "\n",
    _rec(banks=[{"bank": 1, "status": "zz"}]) + "\n",
    _rec(banks="nope") + "\n",
    _rec(cpu=-3, banks=[{"bank": 1}]) + "\n",
    _rec(banks=[{"bank": 1, "status": 1 << 70}]) + "\n",
    pytest.param('{"schema": "emu.mcelog/1", "id": 1, "x": ' + "[" * 100000 + "]" * 100000
                 + "}\n", id="nested"),
], ids=["bank-x", "status-zz", "banks-str", "cpu-negative", "status-70-bits", "nested"])
def test_11_emu_log_wrong_typed_or_nested_lines_exit_2_naming_the_line(capsys, tmp_path, content):
    p = tmp_path / "dom0.jsonl"
    p.write_text(_rec() + "\n" + content)
    code, out, err = cli(capsys, "log", str(p))
    assert code == 2 and "line 2" in err and "Traceback" not in err


@pytest.mark.parametrize("what", ["/dev/zero", "fifo", "fifo-in-run-dir"])
def test_11_emu_log_refuses_what_is_not_a_regular_file(tmp_path, what):
    path = what
    if what == "fifo":
        path = str(tmp_path / "fifo")
        os.mkfifo(path)
    elif what == "fifo-in-run-dir":      # a run directory whose Dom0 log is a FIFO
        os.mkfifo(tmp_path / "dom0.jsonl")
        path = str(tmp_path)
    p = emu("log", path, timeout=30)
    assert p.returncode == 2 and "not a regular file" in p.stderr


def test_11_emu_log_refuses_an_overlong_line(capsys, tmp_path):
    p = tmp_path / "dom0.jsonl"
    with open(p, "w") as f:
        f.write(_rec() + "\n" + "x" * (d0.MAX_LINE + 10) + "\n")
    code, out, err = cli(capsys, "log", str(p))
    assert code == 2 and "line 2" in err and "longer than" in err


# -- 12. defaults that can work -------------------------------------------------------------------
def test_12_memory_pages_names_the_real_minimum(capsys):
    code, out, err = cli(capsys, "run", "--memory-pages", "1024")
    assert code == 2 and "emu: error: memory-pages:" in err and "8704" in err
    code, out, err = cli(capsys, "run", "--memory-pages", "4608", "--guests", "1")
    assert code == 2 and "memory-pages" in err


def test_12_the_minimum_memory_and_a_small_bank_count_boot(capsys, tmp_path):
    code, out, err = cli(capsys, "run", "--json", "--memory-pages", "4608", "--guests", "0",
                         "--banks", "4", "--log-dir", str(tmp_path), "--error",
                         "cpu=0 bank=2 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5")
    assert code == 0, err
    assert json.loads(out)["outcome"] == "recovered"


# -- 13. descriptors above 1023 -------------------------------------------------------------------
def test_13_a_machine_works_with_descriptors_above_1023(emu_machine):
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1400:
        pytest.skip("RLIMIT_NOFILE too low")
    if soft < 1400:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))
    null = os.open(os.devnull, os.O_RDONLY)
    held = []
    try:
        while True:
            fd = os.dup(null)
            held.append(fd)
            if fd >= 1100:
                break
        m = emu_machine()
        assert m._conn.fileno() > 1023
        assert m.inject(SRAO_MEM)["outcome"] == "recovered"
        assert m.dom0_drain(5)["drained"]
        m.close()
    finally:
        for fd in held:
            os.close(fd)
        os.close(null)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
def test_13_the_largest_allowed_machine_boots_and_takes_one_mc(emu_machine):
    m = emu_machine(topology="8x64x2", guests=0, watchdog_s=60.0)
    assert m.boot_info["cpus"] == 1024
    r = m.inject(SRAO_MEM, timeout_s=120)
    assert r["outcome"] in ("recovered", "continued"), r["outcome"]
