"""A machine's configuration: everything that defines one, validated.

Topology and banks are silicon (:mod:`emu.hw.topology`); the handler version, the
domains and the vMCE policy are the hypervisor's (:mod:`emu.xen`); chaos, pinning
and idle polling are how the emulator runs the processes.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from emu.errors import UsageError
from emu.hw import msr
from emu.hw.atomic import BACKENDS
from emu.hw.topology import MAX_BANKS, parse_bank_set, parse_scopes, parse_topology
from emu.xen.page_alloc import DOM_BASE, DOM_PAGES
from emu.xen.versions import HANDLERS
from emu.xen.vmce import MAX_DOMS, MAX_VCPUS

VMCE_POLICIES = ("owner", "dom0")
SCHEDS = ("os", "controlled")
MAX_SEED = (1 << 64) - 1        # a seed travels as msgpack's uint64
MAX_MEMORY_PAGES = 1 << 22
DEFAULT_SCOPES = ((0, 3, "core"), (4, 9, "package"))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def default_scopes(nbanks: int) -> str:
    """The default bank scopes (0-3 core, 4-9 package), clipped to ``nbanks``."""
    parts = [f"{lo}-{min(hi, nbanks - 1)}:{scope}" for lo, hi, scope in DEFAULT_SCOPES
             if lo < nbanks]
    return ",".join(parts)


def min_memory_pages(guests: int) -> int:
    """The least machine memory that holds Xen's pages and every domain's (Dom0 too)."""
    return DOM_BASE + (guests + 1) * DOM_PAGES


EXTRA_DICTS = ("hooks", "guest_hooks", "dom0_hooks")


def _check_extra(extra) -> None:
    if not isinstance(extra, dict):
        raise UsageError("extra", f"{extra!r}: give a dict (e.g. {{'log_dir': PATH}})")
    ld = extra.get("log_dir")
    if ld is not None and not isinstance(ld, (str, os.PathLike)):
        raise UsageError("log-dir", f"{ld!r}: give a directory path")
    for k in EXTRA_DICTS:
        if k in extra and not isinstance(extra[k], dict):
            raise UsageError(f"extra.{k}", f"{extra[k]!r}: give a dict")
    if "fsync" in extra and not isinstance(extra["fsync"], bool):
        raise UsageError("extra.fsync", f"{extra['fsync']!r}: give True or False")
    if "sched_dom0" in extra and not isinstance(extra["sched_dom0"], bool):
        raise UsageError("extra.sched_dom0", f"{extra['sched_dom0']!r}: give True or False")
    spin = extra.get("guest_spin_s")
    if spin is not None and (not _is_real(spin) or not 0 <= spin <= 1):
        raise UsageError("extra.guest_spin_s", f"{spin!r}: give seconds in [0, 1]")


def check_log_rotation(extra: dict) -> dict:
    """Dom0 log rotation from ``extra``: ``log_rotate_mb`` (MiB; 0, the default: never)
    and ``log_rotate_keep`` (rotated parts kept, default 8), checked; as
    ``dom0_main``'s ``rotate_bytes``/``rotate_keep``."""
    mb = extra.get("log_rotate_mb", 0) or 0
    keep = extra.get("log_rotate_keep", 8)
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not 0 <= mb <= 1 << 20:
        raise UsageError("log_rotate_mb", f"{mb!r}: give a size in MiB (0: no rotation)")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= 10_000:
        raise UsageError("log_rotate_keep", f"{keep!r}: give 1..10000 rotated parts")
    return {"rotate_bytes": int(mb * (1 << 20)), "rotate_keep": keep}


@dataclass
class MachineConfig:
    """Everything that defines a machine. Validated by :meth:`validate`."""
    topology: str = "1x2x2"
    nbanks: int = 10
    bank_scopes: str | None = None  # None: 0-3:core,4-9:package clipped to nbanks
    ser: bool = True              # MCG_CAP.SER_P
    lmce: bool = True             # MCG_CAP.LMCE_P (and firmware enabled it)
    mcg_ctl_p: bool = True        # MCG_CAP.MCG_CTL_P
    handler: str = "seed"
    watchdog_s: float = 2.0
    seed: int = 0
    chaos: float = 0.0            # probability of a perturbation at a yield point
    starve: float = 0.05          # with chaos on: probability a trial starves one process
    trace: bool = False
    sched: str = "os"             # os: the host schedules the processes; controlled: emu does
    sched_steps: int = 16384      # controlled: decision-log entries kept per trial
    atomic_backend: str | None = None
    memory_pages: int = 16384     # 64 MiB of 4 KiB machine pages
    mce_broadcast: bool = True
    pin_cpus: bool = True         # emulated CPU i runs on host core i % cores only
    idle_poll_us: int = 1000      # the most an idle CPU polls before it sleeps (0: never)
    guests: int = 1               # HVM guests besides Dom0 (domids 1..guests)
    guest_vcpus: int = 2
    vmce_policy: str = "owner"    # owner: vMCE to the impacted domain; dom0: to Dom0 only
    cmci: bool = True             # MCG_CAP.CMCI_P (with a local APIC)
    cmci_banks: str = "all"       # the banks whose CTL2.CMCI_EN sticks (silicon)
    cmci_max_threshold: int = 0x7FFF   # the most CTL2's threshold field holds (silicon)
    cmci_threshold: int = 2       # Xen's cmci-threshold boot option
    poll_period_s: float = 0.0    # the polling timer's first period (0: no timer)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.bank_scopes is None and _is_int(self.nbanks):
            self.bank_scopes = default_scopes(self.nbanks)

    def validate(self) -> "MachineConfig":
        """Check every field's type and range; :class:`UsageError` names the first bad
        one (by its command-line option where it has one). Nothing has run yet."""
        if not isinstance(self.topology, str):
            raise UsageError("topology", f"{self.topology!r}: give a string SxCxT, e.g. 1x2x2")
        parse_topology(self.topology)
        if not _is_int(self.nbanks) or not 1 <= self.nbanks <= MAX_BANKS:
            raise UsageError("banks", f"{self.nbanks!r}: the bank count must be 1..{MAX_BANKS}")
        if self.bank_scopes is None:
            self.bank_scopes = default_scopes(self.nbanks)
        if not isinstance(self.bank_scopes, str):
            raise UsageError("bank-scopes", f"{self.bank_scopes!r}: give a string "
                             "BANK[-BANK]:SCOPE,..., e.g. 0-3:core,4-9:package")
        parse_scopes(self.bank_scopes, self.nbanks)
        for name in ("ser", "lmce", "mcg_ctl_p", "trace", "mce_broadcast", "pin_cpus", "cmci"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(name, f"{getattr(self, name)!r}: give True or False")
        if not isinstance(self.handler, str) or self.handler not in HANDLERS:
            raise UsageError("handler", f"unknown handler {self.handler!r}; choose one of "
                             f"{', '.join(sorted(HANDLERS))}")
        if not _is_real(self.watchdog_s) or not 0 < self.watchdog_s <= 3600:
            raise UsageError("watchdog", f"{self.watchdog_s!r}: give seconds in (0, 3600]")
        if not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED:
            raise UsageError("seed", f"{self.seed!r}: give an integer 0..{MAX_SEED} (2**64-1)")
        if not _is_real(self.chaos) or not 0.0 <= self.chaos <= 1.0:
            raise UsageError("chaos", f"{self.chaos!r}: give a probability in [0, 1]")
        if not isinstance(self.sched, str) or self.sched not in SCHEDS:
            raise UsageError("sched", f"{self.sched!r}: choose os (the host schedules the "
                             "processes) or controlled (one at a time, by a strategy)")
        if self.sched == "controlled" and self.chaos > 0:
            raise UsageError("chaos", "chaos perturbs the host's scheduling; under --sched "
                             "controlled the strategy decides every step: drop --chaos")
        if isinstance(self.sched_steps, bool) or not isinstance(self.sched_steps, int) \
                or not 64 <= self.sched_steps <= 1 << 20:
            raise UsageError("sched-steps", f"{self.sched_steps!r}: give 64..1048576")
        if not _is_real(self.starve) or not 0.0 <= self.starve <= 1.0:
            raise UsageError("starve", f"{self.starve!r}: give a probability in [0, 1]")
        if self.atomic_backend is not None and self.atomic_backend not in BACKENDS:
            raise UsageError("atomic_backend", f"{self.atomic_backend!r}: use one of "
                             f"{', '.join(BACKENDS)} (or None: $EMU_ATOMIC_BACKEND or "
                             f"{BACKENDS[0]})")
        if not _is_int(self.guests) or not 0 <= self.guests <= MAX_DOMS - 1:
            raise UsageError("guests", f"{self.guests!r}: give 0..{MAX_DOMS - 1} guests")
        need = min_memory_pages(self.guests)
        if not _is_int(self.memory_pages) or not need <= self.memory_pages <= MAX_MEMORY_PAGES:
            raise UsageError("memory-pages", f"{self.memory_pages!r}: give {need}.."
                             f"{MAX_MEMORY_PAGES} pages: Xen's {DOM_BASE} and {DOM_PAGES} per "
                             f"domain (Dom0 and {self.guests} guest"
                             f"{'' if self.guests == 1 else 's'}); fewer guests need fewer")
        if not _is_int(self.guest_vcpus) or not 1 <= self.guest_vcpus <= MAX_VCPUS:
            raise UsageError("guest-vcpus", f"{self.guest_vcpus!r}: give 1..{MAX_VCPUS}")
        if not _is_int(self.idle_poll_us) or not 0 <= self.idle_poll_us <= 100_000:
            raise UsageError("idle-poll-us", f"{self.idle_poll_us!r}: give 0..100000 µs "
                             "(0: an idle CPU sleeps at once)")
        parse_bank_set("cmci-banks", self.cmci_banks, self.nbanks)
        for name, v, hi in (("cmci-threshold", self.cmci_threshold, 0x7FFF),
                            ("cmci-max-threshold", self.cmci_max_threshold, 0x7FFF)):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
                raise UsageError(name, f"{v!r}: give 0..{hi} (CTL2's 15-bit threshold field)")
        if isinstance(self.poll_period_s, bool) or \
                not isinstance(self.poll_period_s, (int, float)) or \
                not (self.poll_period_s == 0 or 0.001 <= self.poll_period_s <= 3600):
            raise UsageError("poll-period", f"{self.poll_period_s!r}: give seconds in "
                             "[0.001, 3600], or 0 for no polling timer")
        if not isinstance(self.vmce_policy, str) or self.vmce_policy not in VMCE_POLICIES:
            raise UsageError("vmce-policy", f"{self.vmce_policy!r}: choose owner or dom0")
        if self.sched == "controlled" and self.poll_period_s:
            raise UsageError("poll-period", "the polling timer fires on the host's clock, "
                             "not at a scheduled step: give 0 under --sched controlled "
                             "(Machine.poll() between trials still works)")
        _check_extra(self.extra)
        check_log_rotation(self.extra)
        if not self.extra.get("log_dir"):
            from emu.machine.runs import keep_runs
            keep_runs()          # a bad EMU_KEEP_RUNS is refused here, before the boot
        return self

    @property
    def domids(self) -> list[int]:
        """Dom0 first, then the guests."""
        return list(range(self.guests + 1))

    @property
    def mcg_cap(self) -> int:
        cap = self.nbanks
        if self.ser:
            cap |= msr.MCG_SER_P
        if self.mcg_ctl_p:
            cap |= msr.MCG_CTL_P
        if self.lmce:
            cap |= msr.MCG_LMCE_P
        if self.cmci:
            cap |= msr.MCG_CMCI_P
        return cap

    @property
    def cmci_cap(self) -> int:
        """The banks that can signal CMCI (silicon), as a mask."""
        return parse_bank_set("cmci-banks", self.cmci_banks, self.nbanks)
