"""Yield points: the one choke point before every access to shared emulated state.

Modelled (DESIGN.md §5): in *chaos* mode, with seeded probabilities, a yield point
yields the core, sleeps briefly or stalls the CPU, so that narrow windows (a shared
bank read and its clear are two steps) are hit often. With ``trace`` on, each yield
point appends an entry to a ring in shared memory (:data:`TRACE_WORDS` words:
sequence, cpu, site, ``time.monotonic_ns()``, and two detail words the call site
passes: what it is about to touch, e.g. bank and register, a lock's or barrier's
word and the generation), so the observed order of a trial can be exported;
:meth:`YieldPoints.record` appends an entry without being a yield point (phase
changes, VIRQ). With trace and chaos off, ``yp`` is a no-op function.

Seeds: trial ``i`` of a campaign seeded ``s`` uses ``SeedSequence([s, i])``,
spawning one stream per process.

Not modelled yet: controlled mode (one process at a time under a scheduler).
"""
from __future__ import annotations

import os
import time

import numpy as np

# Site names; their index is what the trace stores.
SITES = ("rdmsr", "wrmsr", "lock", "unlock", "barrier", "atomic", "telem", "page", "vmce",
         "softirq", "phase", "virq", "acquired")
SITE = {n: i for i, n in enumerate(SITES)}
TRACE_WORDS = 6      # seq, cpu, site, t_ns, d0, d1

_BLOCK = 4096


class YieldPoints:
    def __init__(self, cpu: int, chaos: float = 0.0, seed_seq=None,
                 trace=None):
        self.cpu = cpu
        self.chaos = chaos
        self.trace = trace          # (atomics, count_off, ring_off, ring_len) or None
        self._rng = np.random.default_rng(seed_seq) if seed_seq is not None else None
        self._u = None
        self._k = _BLOCK
        if chaos <= 0 and trace is None:
            self.yp = _noop       # the hot path pays one call only

    def reseed(self, seed_seq) -> None:
        self._rng = np.random.default_rng(seed_seq)
        self._k = _BLOCK

    def record(self, site: str, d0: int = 0, d1: int = 0) -> None:
        """Append a trace entry (no-op without trace)."""
        if self.trace is None:
            return
        A, cnt, ring, n = self.trace
        k = A.fetch_add(cnt, 1)
        if k < n:
            base = ring + 8 * TRACE_WORDS * k
            A.store(base + 8, self.cpu)
            A.store(base + 16, SITE.get(site, 255))
            A.store(base + 24, time.monotonic_ns())
            A.store(base + 32, d0 & 0xFFFFFFFFFFFFFFFF)
            A.store(base + 40, d1 & 0xFFFFFFFFFFFFFFFF)
            A.store(base, k + 1)   # last: a reader sees whole entries (0: not written)

    def yp(self, site: str, d0: int = 0, d1: int = 0) -> None:
        if self.trace is not None:
            self.record(site, d0, d1)
        if self.chaos > 0 and self._rng is not None:
            if self._k >= _BLOCK:
                self._u = self._rng.random((_BLOCK, 2))
                self._k = 0
            u, v = self._u[self._k]
            self._k += 1
            if u < self.chaos:
                # Mostly yield; sometimes a short sleep; rarely a stall.
                if v < 0.7:
                    os.sched_yield()
                elif v < 0.97:
                    time.sleep(2e-5 + v * 1e-4)
                else:
                    time.sleep(0.002)


def _noop(site: str, d0: int = 0, d1: int = 0) -> None:
    return None


def trial_seed(seed: int, trial: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, trial])
