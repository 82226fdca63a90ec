"""Handler versions (DESIGN.md §1): which Xen code each CPU process runs.

``seed`` is the seed design as Xen carries it today, with every later race fix.
Historical versions and deliberately broken variants subclass it and override only
the step they change (:mod:`emu.xen.history`, :mod:`emu.xen.broken`,
:mod:`emu.xen.xen_2009_03`).

An entry of :data:`HANDLERS` is ``"module:Class"`` or a :class:`Version` (the same
path with metadata: what the version is, the commit or hazard it stands for, the
finding a campaign should report, and the scenario family that should expose it).
"""
from __future__ import annotations

import importlib
from typing import NamedTuple


class Version(NamedTuple):
    path: str                 # "module:Class"
    description: str          # one line
    stands_for: str           # the Xen commit (the fix it lacks) or the hazard
    finding: str              # what the oracle reports
    family: str               # the scenario family that should expose it
    kind: str = "history"     # seed | history | broken


HANDLERS: dict[str, str | Version] = {
    "seed": Version(
        "emu.xen.mce:XenCpu", "today's Xen: the seed design with every later race fix",
        "c447b7308b (xen-project/xen, 2026-08)", "none (violations must be 0)", "all",
        "seed"),
    "xen-2009-03": Version(
        "emu.xen.xen_2009_03:Xen200903",
        "the Intel #MC series as first merged: cpumask rendezvous, one CPU clears MCIP",
        "32e8dd573b (2009-03-20)",
        "MCIP still set after the handler; shutdown at the next #MC; hang (a cpumask "
        "cleared while others spin); boot record dismissed",
        "multi"),
    "no-barrier-mcip-sync": Version(
        "emu.xen.history:NoBarrierMcipSync",
        "racy mce_barrier_last election of the found_error reset; MCIP cleared only by "
        "CPUs with errors, outside a rendezvous",
        "before 99f7ce3614 (2009-09-22)",
        "MCIP still set after the handler; shutdown at the next #MC", "owner_race"),
    "shared-severity-cpu": Version(
        "emu.xen.history:SharedSeverityCpu",
        "one severity_cpu for the trap handler and mce_softirq",
        "before 011899a2e0 (2017-04-07)",
        "record reserved but never committed (an LMCE during the softirq wiped the "
        "worker election); non-broadcast: an unrecoverable error continued (the "
        "trap's fatal check skipped)", "nested_lmce"),
    "stale-severity-cpu": Version(
        "emu.xen.history:StaleSeverityCpu",
        "severity_cpu not reset after the fatal check",
        "before 6a2c6a6842 (2017-04-07)",
        "a CPU that found no error ran the fatal check (stale severity_cpu) and panicked "
        "(needs a #MC with no valid bank after an error: raise_cpu)", "owner_race"),
    "xchg-head-reread": Version(
        "emu.xen.history:XchgHeadReread",
        "mctelem_xchg_head re-reads the link after a successful cmpxchg",
        "before e9af61b969 (2014-01-17)",
        "Xen BUG (MCTE_TRANSITION_STATE): a telemetry entry linked twice, when Dom0's "
        "fetch lands inside a commit (two waves, Dom0 busy)", "dom0_busy"),
    "freelist-aba": Version(
        "emu.xen.history:FreelistAba",
        "lock-free telemetry free lists with the ABA race",
        "before 60ea3a3ac3 (2014-02-24)",
        "slot reserved twice (Xen BUG_ON), slots leaked; unit level only (every "
        "reservation in the emulated machine is serialised)", "pool_pressure"),
    "ripv0-continue": Version(
        "emu.xen.history:Ripv0Continue",
        "RIPV=0 in Xen context treated as continue (mce_action skipped)",
        "before 89a4be6901 (2011-05-12)",
        "continued after a #MC with RIPV=0 in Xen context", "ripv"),
    "no-eipv-check": Version(
        "emu.xen.history:NoEipvCheck",
        "RIPV=EIPV=0 in a guest's context left to mce_action",
        "before 1cf8a44e39 (2011-12-15)",
        "continued after a #MC with RIPV=0 and EIPV=0 (guest context)", "ripv"),
    "srar-over-inverted": Version(
        "emu.xen.history:SrarOverInverted",
        "SRAR clear rule tests OVER instead of !OVER; UC+PCC not excluded",
        "before d6c52e8a40 (2011-05-12)",
        "fatal bank cleared before the reset, logged 0 times by boot-time logout; "
        "a clearable SRAR owned by 2 CPUs", "fatal"),
    "no-logout-lock": Version(
        "emu.xen.broken:NoLogoutLock", "logout without mce_logout_lock",
        "broken variant (the lock of xen-mca.md §2.6)",
        "clearable error owned by 2 CPUs", "owner_race", "broken"),
    "barrier-no-generation": Version(
        "emu.xen.broken:BarrierNoGenerations",
        "the trap rendezvous on a barrier without generations",
        "broken variant (the generations of xen-mca.md §2.4)",
        "hang: a CPU late to see val == 0 waits forever on the reused barrier", "multi",
        "broken"),
    "mcip-one-cpu": Version(
        "emu.xen.broken:McipOneCpu", "MCIP cleared by one CPU only",
        "broken variant (per-CPU MCIP, xen-mca.md §2.3)",
        "MCIP still set after the handler; shutdown at the next #MC", "multi", "broken"),
    "fatal-bank-cleared": Version(
        "emu.xen.broken:FatalBankCleared", "a fatal (UC+PCC) bank cleared before the reset",
        "broken variant (the sticky-bank rule of xen-mca.md §3.4)",
        "fatal bank cleared before the reset; logged 0 times by boot-time logout", "fatal",
        "broken"),
    "softirq-plain-store": Version(
        "emu.xen.broken:SoftirqPlainStore",
        "softirq worker elected by a plain store without mce_severity_bar",
        "broken variant (the election of xen-mca.md §2.5)",
        "several softirq workers for one broadcast #MC", "memory", "broken"),
    # (emu/xen/no_3e15c37e68.py, with the CMCI model: xen-mca.md §10.1 item 4)
    "no-3e15c37e68": Version(
        "emu.xen.no_3e15c37e68:XenCpuNo3e15c37e68",
        "CMCI banks still polled: the poller and the CMCI owner cross",
        "before 3e15c37e68 (2009-04-06)",
        "a CMCI bank's corrected error logged twice (CMCI and poll records)", "cmci"),
}


def _path(entry) -> str:
    return entry.path if isinstance(entry, Version) else entry


def version_info(name: str) -> dict:
    """A version's metadata (an entry without metadata: its class docstring)."""
    entry = HANDLERS[name]
    if isinstance(entry, Version):
        return dict(entry._asdict(), name=name)
    doc = (handler_class(name).__doc__ or "").strip().splitlines()
    return {"name": name, "path": entry, "description": doc[0] if doc else "",
            "stands_for": "", "finding": "", "family": "", "kind": ""}


def handler_class(name: str):
    """Resolve a handler name. The coordinator calls this before forking CPUs,
    so the modules are imported once, not in every CPU process."""
    mod, _, cls = _path(HANDLERS[name]).partition(":")
    return getattr(importlib.import_module(mod), cls)
