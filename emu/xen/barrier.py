"""Xen's machine-check rendezvous barrier (barrier.c), algorithm unchanged since 2009.

Modelled (xen-mca.md §2.4): three atomics ``val``, ``ingen``, ``outgen``; enter
bumps ``ingen``, snapshots ``outgen``, bumps ``val`` and waits while
``val != num_online_cpus() && outgen == gen``; exit mirrors it with ``outgen``,
``ingen`` and ``val == 0``. No timeout (the coordinator's watchdog notices a
hang); ``mce_panic_check`` runs in every wait iteration; ``wait=False`` (LMCE,
non-broadcast) returns at once.

How a CPU waits is the only change: the CPU whose step makes the condition true
(``val`` reaches N on enter, 0 on exit) bumps the barrier's event word and wakes
the sleepers, and so does every step that moves a generation (``outgen`` for
enter-waiters, ``ingen`` for exit-waiters), since a late waiter may leave through
the generation test, exactly as a slow spinner does in Xen. Enter- and exit-waiters
sleep on separate event channels, so one phase's steps never wake the other's
sleepers.
"""
from __future__ import annotations

import os
import time

from emu.hw.futex import futex_wake

_now = time.monotonic_ns
_sched_yield = os.sched_yield


def _nothing() -> None:
    return None

VAL, INGEN, OUTGEN, EV_IN, EV_OUT = 0, 8, 16, 24, 40
NWORDS = 7


class McaBarrier:
    def __init__(self, R, off: int):
        self.X = R.X
        self.ev = R.ev
        self.off = off
        self.online = R.L.online
        self.spin_ns = R.ev.spin_ns
        self._val, self._in, self._out = off + VAL, off + INGEN, off + OUTGEN
        self._ev_in, self._ev_out = off + EV_IN, off + EV_OUT
        self._addr_in, self._addr_out = R.ev.base + off + EV_IN, R.ev.base + off + EV_OUT

    # The #MC path runs these on every CPU, twice per rendezvous: the event bumps and
    # the first stretch of the wait are written out inline (Events.bump and the spin
    # phase of Events.wait, unchanged), since with more CPUs than cores every call
    # here is paid once per CPU on a core between two context switches.
    def mce_barrier_enter(self, wait: bool, yp, check) -> None:
        if not wait:
            return
        X = self.X
        load, fetch_add = X.load, X.fetch_add
        yp("barrier")
        fetch_add(self._in, 1)
        fetch_add(self._ev_out, 1)
        if load(self._ev_out + 8):
            futex_wake(self._addr_out)
        gen = load(self._out)
        yp("barrier")
        online = self.online
        val, out = self._val, self._out
        if fetch_add(val, 1) + 1 == load(online):
            fetch_add(self._ev_in, 1)
            if load(self._ev_in + 8):
                futex_wake(self._addr_in)
            return   # the last one in: the wait condition holds already
        chk = check or _nothing
        end = _now() + self.spin_ns
        while True:
            for _ in range(8):
                if load(val) == load(online) or load(out) != gen:
                    return
                chk()
                _sched_yield()
            if _now() >= end:
                break
        self.ev.wait(self._ev_in, lambda: load(val) == load(online) or load(out) != gen,
                     check=check, spin_ns=0)

    def mce_barrier_exit(self, wait: bool, yp, check) -> None:
        if not wait:
            return
        X = self.X
        load, fetch_add = X.load, X.fetch_add
        yp("barrier")
        fetch_add(self._out, 1)
        fetch_add(self._ev_in, 1)
        if load(self._ev_in + 8):
            futex_wake(self._addr_in)
        gen = load(self._in)
        yp("barrier")
        val, in_ = self._val, self._in
        if X.fetch_sub(val, 1) - 1 == 0:
            fetch_add(self._ev_out, 1)
            if load(self._ev_out + 8):
                futex_wake(self._addr_out)
            return   # the last one out: the wait condition holds already
        chk = check or _nothing
        end = _now() + self.spin_ns
        while True:
            for _ in range(8):
                if load(val) == 0 or load(in_) != gen:
                    return
                chk()
                _sched_yield()
            if _now() >= end:
                break
        self.ev.wait(self._ev_out, lambda: load(val) == 0 or load(in_) != gen,
                     check=check, spin_ns=0)

    def wake_all(self) -> None:
        self.ev.bump(self.off + EV_IN)
        self.ev.bump(self.off + EV_OUT)
