"""The two anonymous shared mappings of a machine and their atomics shims.

Modelled (DESIGN.md §2): a *hardware* region (MSR banks, per-CPU MCG registers,
#MC doorbells; :class:`emu.hw.region.HwLayout`) that survives a warm reset and is
zeroed at power-off, and a *xen* region (:class:`emu.xen.layout.XenLayout`) that is
re-initialised at every boot. Both are anonymous ``MAP_SHARED`` mmaps created before
any fork: they have no name, so nothing can leak in ``/dev/shm``.
"""
from __future__ import annotations

import mmap
import os

from emu.hw.atomic import atomics
from emu.hw.futex import SPIN_NS, Events
from emu.hw.region import HwLayout
from emu.hw.topology import Topology
from emu.machine.sched import SchedLayout
from emu.xen.layout import XenLayout


class Regions:
    """The two anonymous shared mappings and their atomics shims: ``HW``/``HL``
    (hardware atomics and layout), ``X``/``L`` (Xen's), ``ev`` (event channels in
    Xen memory; a CPU's doorbell is in the hardware region)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.topo = Topology(cfg)
        self.HL = HwLayout(self.topo)
        n = self.topo.ncpus
        controlled = cfg.sched == "controlled"
        self.L = XenLayout(n, cfg.memory_pages, bool(cfg.trace),
                           SchedLayout.nwords(n, cfg.sched_steps) if controlled else 0)
        # The controlled scheduler's words (None: the OS schedules the processes).
        self.S = SchedLayout(self.L.sched, n, cfg.sched_steps) if controlled else None
        self.hw_map = mmap.mmap(-1, self.HL.size, flags=mmap.MAP_SHARED)
        self.xen_map = mmap.mmap(-1, self.L.size, flags=mmap.MAP_SHARED)
        self.HW = atomics(self.hw_map, cfg.atomic_backend)
        self.X = atomics(self.xen_map, cfg.atomic_backend)
        spin = cfg.extra.get("spin_ns", SPIN_NS)   # a knob for wait-strategy experiments
        self.ev = Events(self.X, spin, bells=self.HW)
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
        for A, size in ((self.HW, self.HL.size), (self.X, self.L.size)):
            if libc.munmap(ctypes.c_void_p(A.address), size) != 0:
                raise OSError(ctypes.get_errno(), "munmap of a shared region failed")
        self.HW = self.X = self.ev = None
        os.close(self.efd)
