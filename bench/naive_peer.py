"""The naive peer design: the #MC round written the way most people would.

One process per emulated CPU, a ``multiprocess.Barrier`` for the rendezvous, a
``multiprocess.Lock`` over a shared bank array (``multiprocess.Array``, raw, the
lock guards it). The #MC is a signal, as in emu (taken with ``sigwait``), and the
handler does the same round as Xen's: rendezvous, logout under the lock (the first
CPU to find a shared bank's error clears it: the owner), rendezvous, exit. No yield points, no
telemetry, no severity, no softirq, no domains: the baseline of what a textbook
design costs on this machine, next to emu in the same ``emu bench`` run.

Each CPU sees ``nbanks`` banks: banks 0-3 its own (one slot per CPU, as emu's
core-scoped banks on a one-thread core), 4 and up shared by every CPU (package
scope). Each CPU reads every bank's status under the lock, and ADDR and MISC of a
valid one, as emu's logout does.

    with NaivePeer(4) as p:
        r = p.round()          # latencies (µs from the raise) and the owner
"""
from __future__ import annotations

import os
import signal
import time

import multiprocess

VAL = 1 << 63
NPRIV = 4              # banks 0..3 per CPU, the rest shared
STAMPS = ("entered", "barrier_a", "logout_done", "handler_exit")


class NaivePeer:
    def __init__(self, ncpus: int, nbanks: int = 10, pin: bool = True, shared_bank: int = 8):
        self.n, self.nbanks, self.pin = ncpus, nbanks, pin
        self.shared_bank = shared_bank
        ctx = multiprocess.get_context("fork")
        self.ctx = ctx
        self.bar = ctx.Barrier(ncpus)
        self.lock = ctx.Lock()
        nslots = ncpus * NPRIV + (nbanks - NPRIV)
        # status, addr, misc per slot
        self.bank = ctx.Array("Q", 3 * nslots, lock=False)
        self.stamps = ctx.Array("q", ncpus * len(STAMPS), lock=False)
        self.owner = ctx.Array("q", 1, lock=False)
        self.done = ctx.Semaphore(0)
        self.procs: list = []

    def _slot(self, cpu: int, bank: int) -> int:
        return cpu * NPRIV + bank if bank < NPRIV else self.n * NPRIV + bank - NPRIV

    # -- a CPU process -------------------------------------------------------------------
    def _cpu(self, cpu: int, parent: int) -> None:
        from emu.machine.procs import pin_to_host_core, set_pdeathsig
        set_pdeathsig(parent)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if self.pin:
            pin_to_host_core(cpu)
        slots = [self._slot(cpu, b) for b in range(self.nbanks)]
        bank, st, bar, lock, done, owner = (self.bank, self.stamps, self.bar, self.lock,
                                            self.done, self.owner)
        k = len(STAMPS) * cpu
        now = time.monotonic_ns

        def on_mc(*_):
            st[k] = now()
            bar.wait()
            st[k + 1] = now()
            with lock:
                for s in slots:
                    status = bank[3 * s]
                    if status & VAL:
                        _addr, _misc = bank[3 * s + 1], bank[3 * s + 2]
                        bank[3 * s] = bank[3 * s + 1] = bank[3 * s + 2] = 0   # the owner clears
                        owner[0] = cpu
            st[k + 2] = now()
            bar.wait()
            st[k + 3] = now()
            done.release()

        # The #MC is SIGUSR1, taken with sigwait (blocked, so none is lost between two
        # rounds: signal.pause() would miss one that lands just before it).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        done.release()   # up
        while True:
            signal.sigwait({signal.SIGUSR1})
            on_mc()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "NaivePeer":
        me = os.getpid()
        for c in range(self.n):
            p = self.ctx.Process(target=self._cpu, args=(c, me), daemon=True)
            p.start()
            self.procs.append(p)
        for _ in range(self.n):
            if not self.done.acquire(timeout=30):
                self.close()
                raise RuntimeError("naive peer: a CPU process did not come up")
        return self

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(5)
        self.procs = []

    def __enter__(self) -> "NaivePeer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one #MC -------------------------------------------------------------------------
    def round(self, timeout_s: float = 10.0) -> dict:
        """Write one error into the shared bank, signal every CPU, wait for every
        CPU's exit; return each stamp's latency (µs from the raise, the slowest CPU)
        and the owner."""
        s = self._slot(0, self.shared_bank)
        self.owner[0] = -1
        self.bank[3 * s + 1], self.bank[3 * s + 2] = 0x181000, 0x86
        self.bank[3 * s] = 0xBD000000004000CF
        t0 = time.monotonic_ns()
        for p in self.procs:
            os.kill(p.pid, signal.SIGUSR1)
        for _ in range(self.n):
            if not self.done.acquire(timeout=timeout_s):
                raise RuntimeError("naive peer: a CPU did not leave the handler")
        st = self.stamps[:]
        m = len(STAMPS)
        out = {name: round((max(st[c * m + j] for c in range(self.n)) - t0) / 1e3, 1)
               for j, name in enumerate(STAMPS)}
        out["owner"] = int(self.owner[0])
        out["cleared"] = self.bank[3 * s] == 0
        return out
