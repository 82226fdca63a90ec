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

VAL, INGEN, OUTGEN, EV_IN, EV_OUT = 0, 8, 16, 24, 40
NWORDS = 7


class McaBarrier:
    def __init__(self, R, off: int):
        self.X = R.X
        self.ev = R.ev
        self.off = off
        self.online = R.L.online

    def mce_barrier_enter(self, wait: bool, yp, check) -> None:
        if not wait:
            return
        X, o, ev, online = self.X, self.off, self.ev, self.online
        load = X.load
        yp("barrier")
        X.fetch_add(o + INGEN, 1)
        ev.bump(o + EV_OUT)
        gen = load(o + OUTGEN)
        yp("barrier")
        n = load(online)
        if X.fetch_add(o + VAL, 1) + 1 == n:
            ev.bump(o + EV_IN)
            return   # the last one in: the wait condition holds already
        ev.wait(o + EV_IN, lambda: load(o + VAL) == load(online)
                or load(o + OUTGEN) != gen, check=check)

    def mce_barrier_exit(self, wait: bool, yp, check) -> None:
        if not wait:
            return
        X, o, ev = self.X, self.off, self.ev
        load = X.load
        yp("barrier")
        X.fetch_add(o + OUTGEN, 1)
        ev.bump(o + EV_IN)
        gen = load(o + INGEN)
        yp("barrier")
        if X.fetch_sub(o + VAL, 1) - 1 == 0:
            ev.bump(o + EV_OUT)
            return   # the last one out: the wait condition holds already
        ev.wait(o + EV_OUT, lambda: load(o + VAL) == 0 or load(o + INGEN) != gen,
                check=check)

    def wake_all(self) -> None:
        self.ev.bump(self.off + EV_IN)
        self.ev.bump(self.off + EV_OUT)
