"""A machine's configuration: everything that defines one, validated.

Topology and banks are silicon (:mod:`emu.hw.topology`); the handler version, the
domains and the vMCE policy are the hypervisor's (:mod:`emu.xen`); chaos, pinning
and idle polling are how the emulator runs the processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from emu.errors import UsageError
from emu.hw import msr
from emu.hw.topology import MAX_BANKS, parse_bank_set, parse_scopes, parse_topology
from emu.xen.page_alloc import DOM_BASE, DOM_PAGES
from emu.xen.versions import HANDLERS
from emu.xen.vmce import MAX_DOMS, MAX_VCPUS

VMCE_POLICIES = ("owner", "dom0")
SCHEDS = ("os", "controlled")


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
    bank_scopes: str = "0-3:core,4-9:package"
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

    def validate(self) -> "MachineConfig":
        parse_topology(self.topology)
        if not isinstance(self.nbanks, int) or not 1 <= self.nbanks <= MAX_BANKS:
            raise UsageError("banks", f"{self.nbanks!r}: the bank count must be 1..{MAX_BANKS}")
        parse_scopes(self.bank_scopes, self.nbanks)
        if self.handler not in HANDLERS:
            raise UsageError("handler", f"unknown handler {self.handler!r}; choose one of "
                             f"{', '.join(sorted(HANDLERS))}")
        if not (0 < float(self.watchdog_s) <= 3600):
            raise UsageError("watchdog", f"{self.watchdog_s!r}: give seconds in (0, 3600]")
        if not (0.0 <= float(self.chaos) <= 1.0):
            raise UsageError("chaos", f"{self.chaos!r}: give a probability in [0, 1]")
        if self.sched not in SCHEDS:
            raise UsageError("sched", f"{self.sched!r}: choose os (the host schedules the "
                             "processes) or controlled (one at a time, by a strategy)")
        if self.sched == "controlled" and float(self.chaos) > 0:
            raise UsageError("chaos", "chaos perturbs the host's scheduling; under --sched "
                             "controlled the strategy decides every step: drop --chaos")
        if isinstance(self.sched_steps, bool) or not isinstance(self.sched_steps, int) \
                or not 64 <= self.sched_steps <= 1 << 20:
            raise UsageError("sched-steps", f"{self.sched_steps!r}: give 64..1048576")
        if isinstance(self.starve, bool) or not isinstance(self.starve, (int, float)) \
                or not 0.0 <= float(self.starve) <= 1.0:
            raise UsageError("starve", f"{self.starve!r}: give a probability in [0, 1]")
        if not 1024 <= self.memory_pages <= 1 << 22:
            raise UsageError("memory-pages", f"{self.memory_pages!r}: give 1024..4194304 pages")
        room = min(MAX_DOMS, (self.memory_pages - DOM_BASE) // DOM_PAGES) - 1
        if not isinstance(self.guests, int) or not 0 <= self.guests <= room:
            raise UsageError("guests", f"{self.guests!r}: give 0..{room} guests (each owns "
                             f"{DOM_PAGES} pages; raise --memory-pages for more)")
        if not isinstance(self.guest_vcpus, int) or not 1 <= self.guest_vcpus <= MAX_VCPUS:
            raise UsageError("guest-vcpus", f"{self.guest_vcpus!r}: give 1..{MAX_VCPUS}")
        if isinstance(self.idle_poll_us, bool) or not isinstance(self.idle_poll_us, int) \
                or not 0 <= self.idle_poll_us <= 100_000:
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
        if self.vmce_policy not in VMCE_POLICIES:
            raise UsageError("vmce-policy", f"{self.vmce_policy!r}: choose owner or dom0")
        if self.sched == "controlled" and self.poll_period_s:
            raise UsageError("poll-period", "the polling timer fires on the host's clock, "
                             "not at a scheduled step: give 0 under --sched controlled "
                             "(Machine.poll() between trials still works)")
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
