"""The concurrency primitives, with real processes: atomics, futex waits, the
generation barrier, the logout lock, yield points."""
from __future__ import annotations

import mmap
import os

import pytest

from emu.hw.atomic import BACKENDS, atomics, signed
from emu.hw.futex import Events
from emu.hw.yieldpoint import YieldPoints, trial_seed


def _fork(n, body):
    pids = []
    for i in range(n):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                body(i)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    return [os.waitpid(p, 0)[1] for p in pids]


@pytest.mark.parametrize("backend", BACKENDS)
def test_atomic_ops(backend):
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
    A = atomics(m, backend)
    assert A.cmpxchg(0, 0, 5) == 0 and A.load(0) == 5
    assert A.cmpxchg(0, 0, 7) == 5 and A.load(0) == 5      # failed: returns current
    assert A.xchg(0, 9) == 5 and A.fetch_add(0, 1) == 9 and A.load(0) == 10
    A.store(8, -1 & ((1 << 64) - 1))
    assert signed(A.load(8)) == -1
    assert A.fetch_or(16, 6) == 0 and A.fetch_and(16, 2) == 6 and A.load(16) == 2
    assert A.fetch_sub(16, 2) == 2 and A.load(16) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_exactly_one_winner_per_cmpxchg_race(backend):
    rounds = 20000
    m = mmap.mmap(-1, 8 * (rounds + 2), flags=mmap.MAP_SHARED)
    A = atomics(m, backend)

    def racer(i):
        B = atomics(m, backend)
        for k in range(rounds):
            if B.cmpxchg(8 * k, 0, i + 1) == 0:
                B.fetch_add(8 * rounds, 1)
    assert _fork(2, racer) == [0, 0]
    assert A.load(8 * rounds) == rounds                      # one winner every time
    winners = {A.load(8 * k) for k in range(rounds)}
    assert winners <= {1, 2} and 0 not in winners


def test_events_wait_sleeps_and_is_woken_by_another_process():
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
    A = atomics(m)
    ev = Events(A, spin_ns=0)      # sleep at once: exercise the futex path

    def waiter(i):
        assert ev.wait(64, lambda: A.load(0) == 1, timeout_s=10)
        A.store(8, 1)
    pid = os.fork()
    if pid == 0:
        try:
            waiter(0)
        finally:
            os._exit(0)
    # Wait (bounded) until the child is asleep on the channel, then wake it.
    assert Events(A).wait(72, lambda: A.load(72) == 1, timeout_s=10)
    A.store(0, 1)
    ev.bump(64)
    os.waitpid(pid, 0)
    assert A.load(8) == 1
    assert not ev.wait(64, lambda: False, timeout_s=0.01)     # times out, returns False


def test_generation_barrier_orders_rounds_across_processes():
    """N processes pass the barrier 300 times; nobody leaves a round before all
    entered it (checked with a per-round arrival counter)."""
    from emu.machine import MachineConfig
    from emu.machine.regions import Regions
    from emu.xen.barrier import McaBarrier
    n, rounds = 6, 300
    R = Regions(MachineConfig(topology="1x3x2").validate())
    R.X.store(R.L.online, n)
    arrived = R.L.action_log      # scratch words
    bad = arrived + 8 * (rounds + 1)

    def cpu(i):
        bar = McaBarrier(R, R.L.mce_trap_bar)
        yp = YieldPoints(i, chaos=0.2, seed_seq=trial_seed(1, i)).yp
        for k in range(rounds):
            R.X.fetch_add(arrived + 8 * k, 1)
            bar.mce_barrier_enter(True, yp, None)
            if R.X.load(arrived + 8 * k) != n:
                R.X.fetch_add(bad, 1)
            bar.mce_barrier_exit(True, yp, None)
    assert _fork(n, cpu) == [0] * n
    assert R.X.load(bad) == 0
    assert R.X.load(R.L.mce_trap_bar) == 0          # val back to 0


def test_logout_lock_mutual_exclusion_and_unfair_order():
    from emu.machine import MachineConfig
    from emu.machine.regions import Regions
    from emu.xen.spinlock import SpinLock
    R = Regions(MachineConfig(topology="1x2x2").validate())
    inside, count, first = R.L.action_log, R.L.action_log + 8, R.L.action_log + 16

    def cpu(i):
        lock = SpinLock(R, R.L.mce_logout_lock)
        yp = YieldPoints(i, chaos=0.3, seed_seq=trial_seed(2, i)).yp
        for _ in range(500):
            lock.mce_spin_lock(i, yp, None)
            if R.X.fetch_add(inside, 1) != 0:
                os._exit(3)
            R.X.cmpxchg(first, 0, i + 1)
            R.X.fetch_add(count, 1)
            R.X.fetch_sub(inside, 1)
            lock.spin_unlock(yp)
    assert _fork(4, cpu) == [0] * 4
    assert R.X.load(count) == 2000 and R.X.load(R.L.mce_logout_lock) == 0


def test_yield_points_are_seeded():
    a = YieldPoints(0, chaos=1.0, seed_seq=trial_seed(7, 3))
    b = YieldPoints(0, chaos=1.0, seed_seq=trial_seed(7, 3))
    assert a.draws(50) == b.draws(50)
    c = YieldPoints(0, chaos=1.0, seed_seq=trial_seed(7, 4))
    assert a.draws(50) != c.draws(50)
