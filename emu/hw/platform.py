"""The emulated platform: configuration, topology and the two shared regions.

Modelled: a machine of sockets × cores × threads; a *hardware* region (MSR banks
and per-CPU MCG registers) that survives a warm reset and is zeroed at power-off;
a *xen* region (locks, barriers, atomics, telemetry pool, page table, per-CPU
state, traces) that is re-initialised at every boot. Both are anonymous
``MAP_SHARED`` mmaps created before any fork: they have no name, so nothing can
leak in ``/dev/shm`` (DESIGN.md §2).

Not modelled: NUMA, CPU hotplug, memory sizes beyond the page table.
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass, field

from emu.errors import UsageError
from emu.hw import msr

SCOPES = ("thread", "core", "package")
MAX_CPUS = 1024
MAX_BANKS = 32
LOGOUT_RING = 40        # logout entries kept per CPU per trial
ACTION_RING = 256       # deferred-action entries per trial
TRACE_RING = 4096       # yield-point trace entries


def parse_topology(s: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"\s*(\d+)x(\d+)x(\d+)\s*", str(s))
    if not m:
        raise UsageError("topology", f"{s!r} is not SxCxT (sockets x cores x threads), e.g. 1x2x2")
    S, C, T = (int(g) for g in m.groups())
    if min(S, C, T) < 1:
        raise UsageError("topology", f"{s!r}: every factor must be at least 1")
    if S * C * T > MAX_CPUS:
        raise UsageError("topology", f"{s!r} has {S * C * T} CPUs; at most {MAX_CPUS} are supported")
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


VMCE_POLICIES = ("owner", "dom0")


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
    trace: bool = False
    atomic_backend: str | None = None
    memory_pages: int = 16384     # 64 MiB of 4 KiB machine pages
    mce_broadcast: bool = True
    pin_cpus: bool = True         # emulated CPU i runs on host core i % cores only
    idle_poll_us: int = 1000      # the most an idle CPU polls before it sleeps (0: never)
    guests: int = 1               # HVM guests besides Dom0 (domids 1..guests)
    guest_vcpus: int = 2
    vmce_policy: str = "owner"    # owner: vMCE to the impacted domain; dom0: to Dom0 only
    extra: dict = field(default_factory=dict)

    def validate(self) -> "MachineConfig":
        parse_topology(self.topology)
        if not isinstance(self.nbanks, int) or not 1 <= self.nbanks <= MAX_BANKS:
            raise UsageError("banks", f"{self.nbanks!r}: the bank count must be 1..{MAX_BANKS}")
        parse_scopes(self.bank_scopes, self.nbanks)
        from emu.xen.versions import HANDLERS
        if self.handler not in HANDLERS:
            raise UsageError("handler", f"unknown handler {self.handler!r}; choose one of "
                             f"{', '.join(sorted(HANDLERS))}")
        if not (0 < float(self.watchdog_s) <= 3600):
            raise UsageError("watchdog", f"{self.watchdog_s!r}: give seconds in (0, 3600]")
        if not (0.0 <= float(self.chaos) <= 1.0):
            raise UsageError("chaos", f"{self.chaos!r}: give a probability in [0, 1]")
        if not 1024 <= self.memory_pages <= 1 << 22:
            raise UsageError("memory-pages", f"{self.memory_pages!r}: give 1024..4194304 pages")
        from emu.xen.page_alloc import DOM_BASE, DOM_PAGES
        from emu.xen.vmce import MAX_DOMS, MAX_VCPUS
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
        if self.vmce_policy not in VMCE_POLICIES:
            raise UsageError("vmce-policy", f"{self.vmce_policy!r}: choose owner or dom0")
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
        return cap


class Topology:
    """CPU numbering: cpu = (socket * cores + core) * threads + thread (APIC-like)."""

    def __init__(self, cfg: MachineConfig):
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


class _Alloc:
    def __init__(self):
        self.size = 0

    def words(self, n: int = 1) -> int:
        off = self.size
        self.size += 8 * n
        return off

    def page_align(self):
        self.size = (self.size + 4095) & ~4095


class Layout:
    """Byte offsets of everything in the two regions. Pure arithmetic."""

    def __init__(self, cfg: MachineConfig, topo: Topology):
        n = topo.ncpus
        self.ncpus = n
        # ---- hardware region ------------------------------------------------
        h = _Alloc()
        self.banks = h.words(topo.ninst * msr.NREGS)
        self.mcg = h.words(n * 4)            # per CPU: STATUS, CTL, CAP, EXT_CTL
        h.page_align()
        self.hw_size = h.size
        # ---- xen region -----------------------------------------------------
        x = _Alloc()
        w = x.words
        self.online = w()
        self.trial_gen = w()
        self.reset_req = w()                 # reason code (see cpu.RESET_*)
        self.reset_cpu = w()
        self.panic_msg = w(8)                # short panic text, 64 bytes
        self.boot_token = w()
        self.boot_ev = w(2)
        self.is_mc_panic = w()
        self.halt_ev = w(2)
        # mce.c statics
        self.mce_logout_lock = w(3)          # lock word, event channel
        self.mce_trap_bar = w(8)             # see barrier.py
        self.mce_inside_bar = w(8)
        self.mce_severity_bar = w(8)
        self.severity_cpu = w()              # trap handler's
        self.sirq_severity_cpu = w()         # mce_softirq's private one
        self.found_error = w()
        self.mcefatal_words = (n + 63) // 64
        self.mce_fatal_cpus = w(self.mcefatal_words)
        self.process_lock = w(3)             # xen-2009-03's mce_process_lock
        self.mced_cpus = w(self.mcefatal_words * 3)  # xen-2009-03 cpumasks
        self.worst = w(2)                    # xen-2009-03 worst severity, cpu
        # deferred-action log (for the trial result)
        self.action_n = w()
        self.action_log = w(ACTION_RING * 32)   # 256-byte msgpack slots
        # per CPU
        self.PCPU_WORDS = 28 + LOGOUT_RING * 6
        self.pcpu = w(n * self.PCPU_WORDS)
        # trace ring
        self.trace_n = w()
        self.trace = w(TRACE_RING * 3)
        # telemetry and page table come from their modules
        from emu.xen import mctelem, page_alloc, vmce
        self.tele = mctelem.Layout(x, n)
        self.pages = page_alloc.Layout(x, cfg.memory_pages)
        self.vm = vmce.Layout(x)
        x.page_align()
        self.xen_size = x.size

    # per-CPU word offsets
    (P_PHASE, P_REACHED, P_T_ENTER, P_T_LOGOUT, P_T_EXIT, P_T_SOFTIRQ, P_MC_GEN, P_DONE_GEN,
     P_SOFTIRQ, P_NEST, P_CLEAR_BANKS, P_CURRENT_DOM, P_CURRENT_VCPU, P_PENDING,
     P_LMCE_PENDING, P_HALTED, P_LOGOUT_N, P_PID, P_INTERRUPTED, P_T_SOFTIRQ_START,
     P_KICK, _P_KICK_SLEEPERS, P_T_BARRIER_A, P_SIRQ_ROLE, P_DOORBELL, P_SLEEP_OFF,
     P_PROGRESS, P_IDLE_POLL) = range(28)
    P_LOGOUT = 28

    def pc(self, cpu: int, word: int) -> int:
        return self.pcpu + 8 * (cpu * self.PCPU_WORDS + word)

    def mcg_reg(self, cpu: int, k: int) -> int:
        return self.mcg + 8 * (cpu * 4 + k)


MCG_K_STATUS, MCG_K_CTL, MCG_K_CAP, MCG_K_EXT_CTL = range(4)


class Regions:
    """The two anonymous shared mappings and their atomics shims."""

    def __init__(self, cfg: MachineConfig):
        from emu.hw.atomic import atomics
        from emu.hw.futex import SPIN_NS, Events
        self.cfg = cfg
        self.topo = Topology(cfg)
        self.L = Layout(cfg, self.topo)
        self.hw_map = mmap.mmap(-1, self.L.hw_size, flags=mmap.MAP_SHARED)
        self.xen_map = mmap.mmap(-1, self.L.xen_size, flags=mmap.MAP_SHARED)
        self.HW = atomics(self.hw_map, cfg.atomic_backend)
        self.X = atomics(self.xen_map, cfg.atomic_backend)
        spin = cfg.extra.get("spin_ns", SPIN_NS)   # a knob for wait-strategy experiments
        self.hw_ev = Events(self.HW, spin)
        self.ev = Events(self.X, spin)
        # The coordinator sleeps in select(); emulated CPUs and Xen code wake it
        # through this eventfd (inherited across fork, one 8-byte write, atomic).
        self.efd = os.eventfd(0, os.EFD_NONBLOCK)

    def notify(self) -> None:
        try:
            os.eventfd_write(self.efd, 1)
        except BlockingIOError:  # counter saturated: the coordinator is awake anyway
            pass

    def power_off(self):
        """Zero the hardware region: banks do not survive a power cycle."""
        self.hw_map[:] = bytes(len(self.hw_map))

    def reinit_xen(self):
        self.xen_map[:] = bytes(len(self.xen_map))

    def drop_for_guest(self):
        """A Dom0 or guest process keeps no view of hardware or Xen memory
        (DESIGN.md §2): both regions are unmapped at the OS level (``munmap``), so
        ``/proc/PID/maps`` no longer shows them. The Python objects are dropped
        without touching them again; the process leaves with ``os._exit``."""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        for A, size in ((self.HW, self.L.hw_size), (self.X, self.L.xen_size)):
            if libc.munmap(ctypes.c_void_p(A.address), size) != 0:
                raise OSError(ctypes.get_errno(), "munmap of a shared region failed")
        self.HW = self.X = self.ev = self.hw_ev = None
        os.close(self.efd)
