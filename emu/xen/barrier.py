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

Emulator bookkeeping (not Xen): ``mce_barrier_enter(..., arr=off)`` stores, at word
``off``, 1 + the value ``val`` had when this CPU incremented it: the CPU's place in
the arrival order of this use of the barrier (one store; the trial result's
``arrivals``).
"""
from __future__ import annotations

import os
import time

_now = time.monotonic_ns
_sched_yield = os.sched_yield


def _nothing() -> None:
    return None


VAL, INGEN, OUTGEN, EV_IN, EV_OUT = 0, 8, 16, 24, 40
NWORDS = 7
# Trace detail (d0) of a barrier's yield points: its word | step << 32, and d1 the
# generation the step snapshot (0 before the snapshot)
STEP_ENTER_INGEN, STEP_ENTER_VAL, STEP_EXIT_OUTGEN, STEP_EXIT_VAL = 0, 1, 2, 3


class McaBarrier:
    def __init__(self, R, off: int):
        self.X = R.X
        self.ev = R.ev
        self.off = off
        self.online = R.L.online
        self.spin_ns = R.ev.spin_ns
        self._val, self._in, self._out = off + VAL, off + INGEN, off + OUTGEN
        self._ev_in, self._ev_out = off + EV_IN, off + EV_OUT
        self._tr = [off | k << 32 for k in range(4)]

    def mce_barrier_enter(self, wait: bool, yp, check, arr: int = 0) -> None:
        if not wait:
            return
        X, ev, tr = self.X, self.ev, self._tr
        yp("barrier", tr[0])
        X.fetch_add(self._in, 1)
        ev.bump(self._ev_out)
        gen = X.load(self._out)
        yp("barrier", tr[1], gen)
        v = X.fetch_add(self._val, 1) + 1
        if v == X.load(self.online):
            ev.bump(self._ev_in)
            if arr:
                X.store(arr, v)   # after the wake-up: the waiters need not wait for it
            return   # the last one in: the wait condition holds already
        if arr:
            X.store(arr, v)
        # while (val != num_online_cpus() && outgen == gen)
        self._wait(self._ev_in, self.online, self._out, gen, check)

    def mce_barrier_exit(self, wait: bool, yp, check) -> None:
        if not wait:
            return
        X, ev, tr = self.X, self.ev, self._tr
        yp("barrier", tr[2])
        X.fetch_add(self._out, 1)
        ev.bump(self._ev_in)
        gen = X.load(self._in)
        yp("barrier", tr[3], gen)
        if X.fetch_sub(self._val, 1) - 1 == 0:
            ev.bump(self._ev_out)
            return   # the last one out: the wait condition holds already
        # while (val != 0 && ingen == gen)
        self._wait(self._ev_out, None, self._in, gen, check)

    def _wait(self, ev_off: int, want_off: int | None, gen_off: int, gen: int, check) -> None:
        """Wait until ``val`` equals the word at ``want_off`` (0 if None) or the word
        at ``gen_off`` moves from ``gen``: Events.wait's spin phase, with the budget
        clock read every 8 iterations and ``check`` (mce_panic_check) in each, then its
        sleep on ``ev_off``."""
        load, val = self.X.load, self._val

        def done() -> bool:
            return load(val) == (load(want_off) if want_off is not None else 0) \
                or load(gen_off) != gen
        chk = check or _nothing
        end = _now() + self.spin_ns
        while self.spin_ns:   # 0 under controlled scheduling: every step is scheduled
            for _ in range(8):
                # done(), written out: a closure call per iteration measured +6 %
                if load(val) == (load(want_off) if want_off is not None else 0) \
                        or load(gen_off) != gen:
                    return
                chk()
                _sched_yield()
            if _now() >= end:
                break
        self.ev.wait(ev_off, done, check=check, spin_ns=0)

    def wake_all(self) -> None:
        self.ev.bump(self.off + EV_IN)
        self.ev.bump(self.off + EV_OUT)
