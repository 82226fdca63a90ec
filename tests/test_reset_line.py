"""The reset line: a warm reset holds every CPU process where it is and releases it to
boot again, instead of forking a new one; a CPU that cannot be held is replaced."""
from __future__ import annotations

import os
import signal
import time

from conftest import SRAO_MEM

from emu.hw.cpu import SIG_INTR, SIG_MC, SIG_RESET
from emu.machine.coordinator import RESET_HOLD_S


def _recovers(m) -> None:
    r = m.inject(SRAO_MEM)
    assert r["outcome"] == "recovered" and r["violations"] == [], r["outcome"]


def test_a_warm_reset_keeps_every_cpu_process_and_the_machine_works(emu_machine):
    m = emu_machine()
    old = m.cpu_pids
    for _ in range(3):
        boot = m.reset()
        assert boot["reset_in_place"] == [0, 1, 2, 3]
        assert m.cpu_pids == old
        _recovers(m)


def test_a_cpu_stalled_in_a_handler_wait_is_held_too(emu_machine):
    """A hang: CPU 2 sleeps 30 s at barrier A, the others wait for it; the reset that
    ends the trial stops all four where they are, none is replaced."""
    m = emu_machine(watchdog_s=0.3)
    old = m.cpu_pids
    t0 = time.monotonic()
    r = m.inject(SRAO_MEM, fault={"kind": "stall_cpu", "cpu": 2, "phase": "barrier_a",
                                  "s": 30.0})
    assert r["outcome"] == "hang" and r["resets"] == 1
    assert time.monotonic() - t0 < 10
    assert m.cpu_pids == old
    _recovers(m)


def test_a_stopped_cpu_process_is_continued_and_held(emu_machine):
    m = emu_machine()
    old = m.cpu_pids
    os.kill(old[2], signal.SIGSTOP)
    boot = m.reset()
    assert boot["reset_in_place"] == [0, 1, 2, 3] and m.cpu_pids == old
    _recovers(m)


def test_a_cpu_the_line_cannot_stop_is_replaced(emu_machine):
    m = emu_machine(extra={"hooks": {"reset_deaf_cpus": [1]}})
    old = m.cpu_pids
    t0 = time.monotonic()
    boot = m.reset()
    assert time.monotonic() - t0 >= RESET_HOLD_S
    assert boot["reset_in_place"] == [0, 2, 3]
    new = m.cpu_pids
    assert new[1] != old[1] and all(new[c] == old[c] for c in (0, 2, 3))
    _recovers(m)


def test_changed_hooks_boot_new_cpu_processes(emu_machine):
    """Hooks reach a CPU process when it is forked: after set_hooks a reset forks."""
    m = emu_machine()
    old = m.cpu_pids
    m.set_hooks(softirq_stall_s=0.0)
    boot = m.reset()
    assert boot["reset_in_place"] == []
    assert not set(old.values()) & set(m.cpu_pids.values())
    _recovers(m)
    assert m.reset()["reset_in_place"] == [0, 1, 2, 3]   # the new ones are kept


def test_an_mc_pending_with_the_reset_runs_nothing_of_the_old_boot(tmp_path):
    """The ordering the reset line rests on: with an #MC, an interrupt and the reset
    pending together, CPython runs the reset's handler first (the lowest signal
    number), which disarms the other two; only the unwinding is seen."""
    from emu.hw import cpu as hc
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            seen = []
            signal.signal(SIG_MC, lambda *a: seen.append("mc"))
            signal.signal(SIG_INTR, lambda *a: seen.append("intr"))
            signal.signal(SIG_RESET, hc.on_reset_line)
            signal.pthread_sigmask(signal.SIG_BLOCK, {SIG_MC, SIG_INTR, SIG_RESET})
            for s in (SIG_MC, SIG_INTR, SIG_RESET):
                os.kill(os.getpid(), s)
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {SIG_MC, SIG_INTR, SIG_RESET})
                for _ in range(1000):
                    pass
                seen.append("not unwound")
            except hc.CpuReset:
                seen.append("reset")
            for _ in range(1000):   # the disarmed handlers may still be called: no-ops
                pass
            os.write(w, ",".join(seen).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read().decode()
    _, st = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(st) == 0
    assert got == "reset", got


def test_bench_reset_smoke():
    """bench/reset.py runs (tiny sizes), first key reset_ms_p50, both ways measured."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "bench/reset.py", "--cpus", "4", "--resets", "2",
                        "--refork", "--json"], cwd=root, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, PYTHONPATH=str(root)))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.splitlines()[0])
    assert next(iter(r)) == "reset_ms_p50" and r["reset_ms_p50"] > 0
    assert r["refork_ms_p50"] > 0 and r["cpus"] == 4
