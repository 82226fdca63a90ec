"""Futex wait/wake on shared anonymous memory, and the spin-then-sleep wait.

Emulated Xen code spins (``while (...) cpu_relax();``). With more emulated CPUs than
real cores, pure spinning costs milliseconds per round, so a wait here spins with
``sched_yield`` for a short budget, then sleeps in ``FUTEX_WAIT`` on a 32-bit *event
word* that whoever changes the awaited state bumps and wakes (DESIGN.md §3). Which
interleavings are possible is unchanged; only how a CPU burns its time is.

The futex is the shared (not ``_PRIVATE``) kind, because the words live in a
``MAP_SHARED`` mapping seen by several processes. Every sleep has a timeout, so a
waiter re-checks its condition (and panic flags) even if a waker died.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time

_SYS_futex = 202  # x86_64
_FUTEX_WAIT = 0
_FUTEX_WAKE = 1
INT_MAX = 0x7FFFFFFF

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def futex_wait(addr: int, expected: int, timeout_s: float | None) -> None:
    """Sleep while the 32-bit word at ``addr`` equals ``expected``.

    Returns on wake, timeout, signal (EINTR) or if the word already differs; the
    caller always re-checks its condition.
    """
    if timeout_s is None:
        _syscall(_SYS_futex, ctypes.c_void_p(addr), _FUTEX_WAIT,
                 ctypes.c_uint32(expected & 0xFFFFFFFF), None, None, 0)
        return
    sec = int(timeout_s)
    ts = _Timespec(sec, int((timeout_s - sec) * 1e9))
    _syscall(_SYS_futex, ctypes.c_void_p(addr), _FUTEX_WAIT,
             ctypes.c_uint32(expected & 0xFFFFFFFF), ctypes.byref(ts), None, 0)


def futex_wake(addr: int, n: int = INT_MAX) -> int:
    return _syscall(_SYS_futex, ctypes.c_void_p(addr), _FUTEX_WAKE, n, None, None, 0)


# Spin budget before sleeping. DESIGN.md §3 says ~50 µs; measured here (interleaved
# A/B runs on 2 cores), longer is better inside the handler: 2 ms vs 200 µs gave 4 CPUs
# about the same p50, 16 CPUs -4 % p50 and -30 % p99, 64 CPUs -12 % p50. With more
# processes than cores, a sched_yield spin hands the core to whoever has work without
# a sleep/wake-up pair. The idle loop uses its own, shorter budget (emu.machine.cpu_process).
SPIN_NS = 2_000_000
_sched_yield = os.sched_yield
_now = time.monotonic_ns


def _nothing() -> None:
    return None


class Events:
    """Event channels in one shared region: ``bump`` after a change, ``wait`` for one.

    A channel is two u64 words at ``off``: the event counter (its low 32 bits are
    the futex word; x86 is little-endian) and a count of sleepers, so that a bump
    with nobody asleep costs no system call. The protocol is the usual one: a
    sleeper registers, re-checks its condition, then sleeps only if the counter has
    not moved; a waker changes the state, bumps the counter, then wakes if anyone
    is registered. Sequential consistency makes one of the two see the other.

    **Signals.** A #MC is a signal, and Python runs a signal's handler only between
    bytecodes: a signal that lands just before the futex system call would wait for
    the timeout. So a CPU process sets ``doorbell`` (a word that delivery bumps
    before signalling) and ``sleep_reg`` (where it publishes the channel it is about
    to sleep on): it publishes, re-reads the doorbell, and sleeps only if no #MC
    came; delivery bumps the doorbell, signals, then bumps the published channel.
    Both words are in ``bells`` (the hardware region: the doorbell is the CPU's
    interrupt line); the channels are in ``A``.
    """

    def __init__(self, A, spin_ns: int = SPIN_NS, bells=None):
        self.A = A
        self.B = bells if bells is not None else A   # where doorbell and sleep_reg live
        self.base = A.address
        self.spin_ns = spin_ns
        self.doorbell = None
        self.sleep_reg = None
        # Test hook: signals held blocked during the futex call only, which is what
        # the race the late doorbell ring covers does to a #MC (its handler cannot
        # run until the sleep ends).
        self.sleep_masked: set | None = None

    def bump(self, off: int, n: int = INT_MAX) -> None:
        self.A.fetch_add(off, 1)
        if self.A.load(off + 8):
            futex_wake(self.base + off, n)

    def wait(self, off: int, cond, timeout_s: float | None = None,
             slice_s: float = 0.05, check=None, spin_ns: int | None = None) -> bool:
        """Wait until ``cond()`` is true; False on timeout.

        ``check`` runs between sleeps (e.g. ``mce_panic_check``); it may not return.
        ``spin_ns`` overrides the spin budget (the idle loop spins less than the handler).
        """
        A = self.A
        load = A.load
        bload = self.B.load
        if cond():
            return True
        t0 = _now()
        spin_end = t0 + (self.spin_ns if spin_ns is None else spin_ns)
        deadline = None if timeout_s is None else t0 + int(timeout_s * 1e9)
        addr = self.base + off
        db, reg = self.doorbell, self.sleep_reg
        if spin_end > t0:
            # The spin phase, lean: with more processes than cores, every waiter runs
            # this between two context switches, so its cost multiplies.
            chk = check if check is not None else _nothing
            stop = spin_end if deadline is None else min(spin_end, deadline)
            while True:
                for _ in range(8):
                    if cond():
                        return True
                    chk()
                    _sched_yield()
                if _now() >= stop:
                    break
        while True:
            ring = bload(db) if db is not None else 0
            seen = load(off)
            if cond():
                return True
            now = _now()
            if deadline is not None and now >= deadline:
                return False
            if check is not None:
                check()
            s = slice_s
            if deadline is not None:
                s = min(s, (deadline - now) / 1e9)
            A.fetch_add(off + 8, 1)
            if reg is not None:
                self.B.store(reg, off)
            try:
                if cond() or (db is not None and bload(db) != ring):
                    continue   # an #MC is pending: let its handler run first
                if self.sleep_masked:
                    signal.pthread_sigmask(signal.SIG_BLOCK, self.sleep_masked)
                    try:
                        futex_wait(addr, seen, s)
                    finally:
                        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.sleep_masked)
                else:
                    futex_wait(addr, seen, s)
            finally:
                if reg is not None:
                    self.B.store(reg, 0)
                A.fetch_sub(off + 8, 1)

    def ring_doorbell(self, db_off: int, reg_off: int) -> bool:
        """Delivery side: call after signalling the CPU. True if the CPU was registered
        asleep on a channel (it was rung)."""
        A = self.A
        off = self.B.load(reg_off)
        if off:
            A.fetch_add(off, 1)
            futex_wake(self.base + off, INT_MAX)
        return bool(off)
