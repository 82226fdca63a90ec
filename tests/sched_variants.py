"""Two broken variants for the controlled-scheduling tests (test-only: the versions
issue's HANDLERS registry is not on main yet). Registered by the tests themselves.

- ``unlocked_logout``: the #MC logout without ``mce_logout_lock`` (every CPU may read a
  shared bank before its first reader clears it: two owners).
- ``barrier_nogen``: ``mce_barrier_enter/exit`` without the generation counters
  (a CPU that leaves an exit and enters the next use of the reused barrier before a
  slower one saw ``val == 0`` strands it: a deadlock).
"""
from __future__ import annotations

from emu.xen.barrier import McaBarrier
from emu.xen.mce import XenCpu


class _NoLock:
    def mce_spin_lock(self, cpu, yp, check) -> None:
        yp("lock")

    def spin_unlock(self, yp) -> None:
        yp("unlock")


class UnlockedLogout(XenCpu):
    version = "unlocked_logout"

    def __init__(self, R, cpu, yps, hooks=None):
        super().__init__(R, cpu, yps, hooks)
        self.mce_logout_lock = _NoLock()


class NoGenBarrier(McaBarrier):
    def mce_barrier_enter(self, wait, yp, check, arr=0) -> None:
        if not wait:
            return
        X = self.X
        yp("barrier")
        if X.fetch_add(self._val, 1) + 1 == X.load(self.online):
            self.ev.bump(self._ev_in)
            return
        self.ev.wait(self._ev_in, lambda: X.load(self._val) == X.load(self.online),
                     check=check)

    def mce_barrier_exit(self, wait, yp, check) -> None:
        if not wait:
            return
        X = self.X
        yp("barrier")
        if X.fetch_sub(self._val, 1) - 1 == 0:
            self.ev.bump(self._ev_out)
            return
        self.ev.wait(self._ev_out, lambda: X.load(self._val) == 0, check=check)


class BarrierNoGen(XenCpu):
    version = "barrier_nogen"

    def __init__(self, R, cpu, yps, hooks=None):
        super().__init__(R, cpu, yps, hooks)
        L = R.L
        self.mce_trap_bar = NoGenBarrier(R, L.mce_trap_bar)
        self.mce_inside_bar = NoGenBarrier(R, L.mce_inside_bar)
        self.mce_severity_bar = NoGenBarrier(R, L.mce_severity_bar)


VARIANTS = {"unlocked_logout": f"{__name__}:UnlockedLogout",
            "barrier_nogen": f"{__name__}:BarrierNoGen"}


def register() -> None:
    from emu.xen.versions import HANDLERS
    HANDLERS.update(VARIANTS)


def unregister() -> None:
    from emu.xen.versions import HANDLERS
    for k in VARIANTS:
        HANDLERS.pop(k, None)
