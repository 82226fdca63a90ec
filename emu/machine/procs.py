"""Emulator processes: forking a child that dies with its parent, its signals,
and pinning a CPU process to a host core.

Every emulator process sets a parent-death signal, so none can outlive the one
that forked it (DESIGN.md §2): a SIGKILLed front end or coordinator leaves nothing.
"""
from __future__ import annotations

import ctypes
import math
import os
import select
import signal

PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def set_pdeathsig(parent_pid: int) -> None:
    """Die with the parent; if it is already gone, die now."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


def child_signals() -> None:
    """A forked child starts with default dispositions (pytest's included)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2,
              signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C goes to the front end only


def fork_child(body) -> int:
    """Fork an emulator process running ``body()``: it dies with its parent, starts
    with default signal dispositions and never returns into the parent's stack."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        set_pdeathsig(parent)
        child_signals()
        body()
    except BaseException:  # noqa: BLE001
        code = 70   # first: printing may fail too (e.g. a closed stderr)
        import traceback
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def pin_to_host_core(cpu: int, shift: int = 0) -> None:
    """Run emulated CPU ``cpu`` on host core ``(cpu + shift) % cores`` only.

    Why: with more emulated CPUs than cores, a process the scheduler migrates pays a
    cold cache and a remote wake-up; pinned, a wake-up and a ``sched_yield`` hand-over
    stay on one core (measured 12-25 % lower handler latency at 4 and 16 CPUs). The
    cost: two emulated CPUs on the same host core never run at the same instant, so
    their races happen by preemption only; ``pin_cpus=False`` (``--no-pin``) lets the
    host scheduler place them freely. The machine's seed is the ``shift``: which
    emulated CPUs share a core (and so which tend to win a shared bank's race, seen
    skewed 239:95:45:21 over 400 trials) changes with the seed of a campaign.
    """
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[(cpu + shift) % len(cores)]})


FD_SETSIZE = 1024


def readable(fds, timeout: float | None) -> list[int]:
    """The descriptors of ``fds`` that are readable (or hung up), waiting at most
    ``timeout`` seconds (None: forever). ``select`` while every descriptor is below
    FD_SETSIZE (it takes a sub-millisecond timeout: the late doorbell ring waits
    0.5 ms), ``poll`` otherwise: ``select`` cannot take descriptors above 1023, and a
    machine of 1024 CPUs holds a pidfd per CPU."""
    fds = list(fds)
    if not fds or max(fds) < FD_SETSIZE:
        return select.select(fds, [], [], timeout)[0]
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN | select.POLLPRI)
    ms = None if timeout is None else max(0, math.ceil(timeout * 1000))
    return [fd for fd, _ev in p.poll(ms)]
