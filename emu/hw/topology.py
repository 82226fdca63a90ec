"""Topology: sockets × cores × threads, and which CPUs see the same bank.

Modelled: CPU numbering as APIC-like ``cpu = (socket * cores + core) * threads +
thread``; every bank has a *scope* (``thread``, ``core`` or ``package``) that decides
which CPUs see one register set (a bank *instance*).

Not modelled: NUMA, per-CPU bank counts. (CPU offline/online is Xen's, at the MCA
level: :mod:`emu.xen.mce_intel`.)
"""
from __future__ import annotations

import re

from emu.errors import UsageError

SCOPES = ("thread", "core", "package")
MAX_CPUS = 1024
MAX_BANKS = 32


def parse_topology(s: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", str(s))
    if not m:
        raise UsageError("topology", f"{s!r} is not SxCxT (sockets x cores x threads), e.g. 1x2x2")
    S, C, T = (int(g) for g in m.groups())
    if min(S, C, T) < 1:
        raise UsageError("topology", f"{s!r}: every factor must be at least 1")
    if S * C * T > MAX_CPUS:
        raise UsageError("topology", f"{s!r} has {S * C * T} CPUs; at most {MAX_CPUS} are "
                         "supported")
    return S, C, T


def parse_scopes(s: str, nbanks: int) -> tuple[str, ...]:
    """``"0-3:core,4-9:package"`` → a scope per bank (unlisted banks: package)."""
    scopes = ["package"] * nbanks
    for part in filter(None, (p.strip() for p in s.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?:(\w+)", part)
        if not m or m.group(3) not in SCOPES:
            raise UsageError("bank-scopes", f"{part!r}: write BANK[-BANK]:SCOPE with SCOPE one of "
                             f"{', '.join(SCOPES)}, e.g. 0-3:core,4-9:package")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not (0 <= lo <= hi < nbanks):
            raise UsageError("bank-scopes", f"{part!r}: banks must lie in 0..{nbanks - 1}")
        for b in range(lo, hi + 1):
            scopes[b] = m.group(3)
    return tuple(scopes)


def parse_bank_set(field: str, s: str, nbanks: int) -> int:
    """``"all"``, ``"none"`` or ``"0-3,5"`` → a bank mask (e.g. the banks that can
    signal CMCI)."""
    t = str(s).strip().lower()
    if t == "all":
        return (1 << nbanks) - 1
    if t in ("none", ""):
        return 0
    mask = 0
    for part in filter(None, (p.strip() for p in t.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UsageError(field, f"{part!r}: write all, none or BANK[-BANK],..., e.g. 0-8")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if not (0 <= lo <= hi < nbanks):
            raise UsageError(field, f"{part!r}: banks must lie in 0..{nbanks - 1}")
        for b in range(lo, hi + 1):
            mask |= 1 << b
    return mask


class Topology:
    """CPU numbering: cpu = (socket * cores + core) * threads + thread (APIC-like).

    Built from anything with ``topology`` (``"SxCxT"``), ``nbanks`` and
    ``bank_scopes`` (a machine's configuration)."""

    def __init__(self, cfg):
        self.sockets, self.cores, self.threads = parse_topology(cfg.topology)
        self.ncpus = self.sockets * self.cores * self.threads
        self.nbanks = cfg.nbanks
        self.scopes = parse_scopes(cfg.bank_scopes, cfg.nbanks)
        # Bank instance of (cpu, bank): banks are laid out bank-major, each bank
        # having as many instances as its scope has members.
        self.inst = [[0] * self.nbanks for _ in range(self.ncpus)]
        base = 0
        for b, scope in enumerate(self.scopes):
            n = {"thread": self.ncpus, "core": self.sockets * self.cores,
                 "package": self.sockets}[scope]
            for c in range(self.ncpus):
                s, co, t = self.coords(c)
                k = {"thread": c, "core": s * self.cores + co, "package": s}[scope]
                self.inst[c][b] = base + k
            base += n
        self.ninst = base

    def coords(self, cpu: int) -> tuple[int, int, int]:
        t = cpu % self.threads
        co = (cpu // self.threads) % self.cores
        s = cpu // (self.threads * self.cores)
        return s, co, t

    def sharers(self, cpu: int, bank: int) -> list[int]:
        i = self.inst[cpu][bank]
        return [c for c in range(self.ncpus) if self.inst[c][bank] == i]
