"""Yield points: the one choke point before every access to shared emulated state.

Modelled (DESIGN.md §5): in *chaos* mode, with seeded probabilities, a yield point
yields the core, sleeps briefly or stalls the process, so that narrow windows (a
shared bank read and its clear are two steps) are hit often. On top of that, a trial
may *starve* one process, as rr's chaos mode does: at its k-th yield point of the
trial it sleeps for a drawn time (the plan is drawn by the machine, see
:mod:`emu.machine.chaos`). With ``trace`` on, each yield point appends an entry to a
ring in shared memory (:data:`TRACE_WORDS` words: sequence, cpu, site,
``time.monotonic_ns()``, and two detail words the call site passes: what it is about
to touch, e.g. bank and register, a lock's or barrier's word and the generation), so
the observed order of a trial can be exported; :meth:`YieldPoints.record` appends an
entry without being a yield point (phase changes, VIRQ).

Seeds: trial ``i`` of a campaign seeded ``S`` has the trial seed ``(S, i)``; every
process draws from its own stream, ``SeedSequence([S, i], spawn_key=key)``
(:func:`process_seed`): the child a ``spawn()`` would make, built directly so no
process needs its siblings' state. The keys live under the trial's *perturbation*
child ``(1,)`` (``SeedSequence([S, i]).spawn(3)`` gives scenario ``(0,)``,
perturbation ``(1,)``, fault ``(2,)``, as :mod:`emu.campaign.families` uses them):
``KEY_PLAN = (1, 0)`` for the machine's per-trial plan (starvation),
:func:`cpu_key` ``(1, 1, c)`` for CPU ``c``, :func:`domain_key` ``(1, 2, d)`` for
domain ``d`` (Dom0 is 0).

A process reconfigures its yield points at the start of each trial
(:meth:`YieldPoints.configure`): chaos intensity, its stream, its starvation point.
With chaos off, no starvation and no trace, ``yp`` is a no-op function (the hot
path pays one call). Otherwise it counts the yield points passed and the
perturbations taken (:attr:`points`, :attr:`count`) and, if given a ``counter``
word, publishes ``count << 32 | points`` there at every yield point (one store), so
the machine can read them for the trial result.

Not modelled yet: controlled mode (one process at a time under a scheduler).
"""
from __future__ import annotations

import ctypes
import os
import struct
import time

import numpy as np

# Site names; their index is what the trace (and a starvation record) stores.
SITES = ("rdmsr", "wrmsr", "lock", "unlock", "barrier", "atomic", "telem", "page", "vmce",
         "softirq", "phase", "virq", "acquired", "channel", "log")
SITE = {n: i for i, n in enumerate(SITES)}
TRACE_WORDS = 6      # seq, cpu, site, t_ns, d0, d1
_pack_entry = struct.Struct("<5Q").pack_into   # cpu, site, t_ns, d0, d1
_U64 = 0xFFFFFFFFFFFFFFFF

# Spawn keys of the per-process streams of a trial seed (see the module docstring).
SPAWN_PERTURB = 1
KEY_PLAN = (SPAWN_PERTURB, 0)


def cpu_key(cpu: int) -> tuple:
    return (SPAWN_PERTURB, 1, cpu)


def domain_key(domid: int) -> tuple:
    return (SPAWN_PERTURB, 2, domid)


_BLOCK = 256          # (u, v) pairs drawn at a time
_SHORT_SLEEP = 0.97   # v below: a short sleep; above: a stall
_YIELD = 0.7          # v below: sched_yield
STALL_S = 0.002       # the rare stall


def process_seed(seed: int, trial: int, key: tuple) -> np.random.SeedSequence:
    """The stream of one process (or of the plan) for trial seed ``(seed, trial)``."""
    return np.random.SeedSequence([int(seed), int(trial)], spawn_key=tuple(key))


def trial_seed(seed: int, trial: int) -> np.random.SeedSequence:
    """The trial's root sequence, ``SeedSequence([seed, trial])``."""
    return np.random.SeedSequence([seed, trial])


class YieldPoints:
    """One process's yield points. ``trace``: ``(atomics, count_off, ring_off,
    ring_len)`` or None. ``counter``: ``(atomics, counts_off, starved_off)`` or None;
    at each yield point ``count << 32 | points`` is stored at ``counts_off``, and the
    site of a starvation (its index + 1) at ``starved_off``."""

    def __init__(self, cpu: int, chaos: float = 0.0, seed_seq=None, trace=None,
                 counter=None):
        self.cpu = cpu
        self.trace = trace
        self._tbuf = None           # the trace ring as a buffer (built at first use)
        self.counter = counter
        self.count = 0              # perturbations taken since configure
        self.points = 0             # yield points passed since configure
        self.starved: str | None = None   # the site where this process was starved
        self._starve_at = -1
        self._starve_s = 0.0
        self.chaos = float(chaos)
        self._rng = np.random.Generator(np.random.PCG64(seed_seq)) \
            if seed_seq is not None else None
        self._u: list = []
        self._k = 0
        self._set_mode()

    def configure(self, chaos: float, seed_seq, starve_at: int = -1,
                  starve_s: float = 0.0) -> None:
        """Start a trial: intensity ``chaos``, stream ``seed_seq`` (None: no
        perturbation), and a starvation of ``starve_s`` seconds at this process's
        ``starve_at``-th yield point of the trial (-1: none). Counts restart at 0."""
        self.chaos = float(chaos)
        self._rng = np.random.Generator(np.random.PCG64(seed_seq)) \
            if seed_seq is not None and self.chaos > 0 else None
        self._u, self._k = [], 0
        self._starve_at = int(starve_at)
        self._starve_s = float(starve_s)
        self.count = self.points = 0
        self.starved = None
        if self.counter is not None:
            A, off, soff = self.counter
            A.store(off, 0)
            A.store(soff, 0)
        self._set_mode()

    def reseed(self, seed_seq) -> None:
        self._rng = np.random.Generator(np.random.PCG64(seed_seq))
        self._u, self._k = [], 0

    @property
    def active(self) -> bool:
        """Whether ``yp`` does anything (chaos, starvation or trace)."""
        return self.yp is not _noop

    def _set_mode(self) -> None:
        if (self.chaos <= 0 or self._rng is None) and self.trace is None \
                and self._starve_at < 0:
            self.yp = _noop       # the hot path pays one call only
        else:
            self.yp = self._yp

    def draws(self, n: int) -> list:
        """The next ``n`` (u, v) pairs of this stream (for tests: seeded streams)."""
        out = []
        for _ in range(n):
            out.append(self._draw())
        return out

    def _draw(self):
        if self._k >= len(self._u):
            self._u = self._rng.random((_BLOCK, 2)).tolist()
            self._k = 0
        uv = self._u[self._k]
        self._k += 1
        return uv

    def record(self, site: str, d0: int = 0, d1: int = 0) -> None:
        """Append a trace entry (no-op without trace)."""
        if self.trace is None:
            return
        A, cnt, ring, n = self.trace
        k = A.fetch_add(cnt, 1)
        if k < n:
            buf = self._tbuf
            if buf is None:
                buf = self._tbuf = (ctypes.c_char * (ring + 8 * TRACE_WORDS * n)).from_address(
                    A.address)
            base = ring + 8 * TRACE_WORDS * k
            # The entry's five words in one write, then its sequence word (atomic, last):
            # x86 keeps stores in order, so a reader that sees the sequence sees the entry.
            _pack_entry(buf, base + 8, self.cpu, SITE.get(site, 255), time.monotonic_ns(),
                        d0 & _U64, d1 & _U64)
            A.store(base, k + 1)   # last: a reader sees whole entries (0: not written)

    def _yp(self, site: str, d0: int = 0, d1: int = 0) -> None:
        if self.trace is not None:
            self.record(site, d0, d1)
        p = self.points
        self.points = p + 1
        if p == self._starve_at:
            # Starvation (rr's chaos mode): this process is held off its core here.
            self.starved = site
            if self.counter is not None:
                A, _, soff = self.counter
                A.store(soff, SITE.get(site, 254) + 1)
            time.sleep(self._starve_s)
        if self._rng is not None:
            u, v = self._draw()
            if u < self.chaos:
                self.count += 1
                # Mostly yield; sometimes a short sleep; rarely a stall.
                if v < _YIELD:
                    os.sched_yield()
                elif v < _SHORT_SLEEP:
                    time.sleep(2e-5 + v * 1e-4)
                else:
                    time.sleep(STALL_S)
        if self.counter is not None:
            A, off, _ = self.counter
            A.store(off, self.count << 32 | self.points)

    def report(self) -> dict:
        """This process's counts since :meth:`configure` (domain processes send it)."""
        return {"n": self.count, "points": self.points, "starved": self.starved}


def _noop(site: str, d0: int = 0, d1: int = 0) -> None:
    return None
