"""pytest plugin (entry point ``pytest11``): fixtures that boot machines and prove
nothing leaks.

- ``emu_machine``: a factory; ``m = emu_machine(topology="1x2x2")`` boots a machine
  that is shut down after the test.
- ``emu_leak_check``: after the test, no emulator process survives (children of
  this process, or orphans re-parented to init that were forked from it) and
  nothing new is left in ``/dev/shm``.
"""
from __future__ import annotations

import os
import time

import psutil
import pytest


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def _orphans(since: float, cmdline: list[str]) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid", "ppid", "create_time", "cmdline"]):
        try:
            if p.info["ppid"] == 1 and p.info["create_time"] >= since - 1 \
                    and p.info["cmdline"] == cmdline:
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def wait_no_children(timeout: float = 5.0) -> list[int]:
    """Wait (on a condition, with a bound) until this process has no children."""
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while True:
        kids = [c.pid for c in me.children(recursive=True)
                if c.status() != psutil.STATUS_ZOMBIE]
        if not kids or time.monotonic() > deadline:
            return kids
        time.sleep(0.01)


@pytest.fixture
def emu_leak_check():
    me = psutil.Process()
    before_shm = _shm()
    start = time.time()
    cmd = me.cmdline()
    yield
    kids = wait_no_children()
    assert not kids, f"emulator processes survived the test: {kids}"
    orphans = _orphans(start, cmd)
    assert not orphans, f"orphaned emulator processes (re-parented to init): {orphans}"
    leaked = _shm() - before_shm
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"


@pytest.fixture
def emu_machine(emu_leak_check, tmp_path_factory):
    from emu.machine import Machine
    machines = []

    def boot(**kw) -> Machine:
        # Dom0's log goes under pytest's temporary directories unless a test says.
        extra = dict(kw.pop("extra", {}))
        extra.setdefault("log_dir", str(tmp_path_factory.mktemp("emu-run")))
        m = Machine(extra=extra, **kw).start()
        machines.append(m)
        return m
    yield boot
    for m in machines:
        m.close()
