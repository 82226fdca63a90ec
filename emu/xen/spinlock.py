"""Xen's spinlock as used by the #MC path: ``spin_trylock`` loops (``mce_spin_lock``).

Modelled: a lock word taken with cmpxchg (0 → cpu+1); acquisition order among
waiters is arbitrary and unfair, as with real ``spin_trylock`` spinning. A waiter
spins briefly, then sleeps on the lock's event word; unlock wakes one sleeper, and
any CPU still spinning may take the lock first. ``check`` is ``mce_panic_check``,
run on every wait iteration as Xen does.
"""
from __future__ import annotations


class SpinLock:
    def __init__(self, R, off: int):
        self.X = R.X
        self.ev = R.ev
        self.off = off          # lock word
        self.ev_off = off + 8   # event channel (2 words)
        self.trace = None       # YieldPoints.record on a traced machine: "acquired"

    def spin_trylock(self, cpu: int) -> bool:
        return self.X.cmpxchg(self.off, 0, cpu + 1) == 0

    def mce_spin_lock(self, cpu: int, yp, check) -> None:
        while True:
            yp("lock", self.off)
            if self.spin_trylock(cpu):
                if self.trace is not None:
                    self.trace("acquired", self.off)
                return
            self.ev.wait(self.ev_off, lambda: self.X.load(self.off) == 0, check=check)

    def spin_unlock(self, yp) -> None:
        yp("unlock", self.off)
        self.X.store(self.off, 0)
        self.ev.bump(self.ev_off, 1)

    def holder(self) -> int:
        return self.X.load(self.off) - 1
