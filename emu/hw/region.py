"""The hardware region's layout: byte offsets of the MSR banks, the per-CPU MCG
registers and each CPU's #MC doorbell. Pure arithmetic.

The region itself is an anonymous ``MAP_SHARED`` mapping (``emu.machine.regions``)
that survives a warm reset and is zeroed at power-off. The doorbell models an
interrupt line: delivery bumps it before the signal, so a CPU about to halt (sleep)
sees the pending #MC and does not (see :class:`emu.hw.futex.Events`).

The *reset line* (the platform's RESET#/INIT): ``reset_gen`` counts its assertions
and ``reset_release`` its releases; a CPU held in reset stores the generation it saw
in its ``init_ack`` word and sleeps on ``reset_release`` (:mod:`emu.hw.cpu`). Both
are hardware, so they survive the wipe of Xen memory the reset causes.

Interrupts (a CMCI, an IPI) share that line: each CPU also has an *IRR* word, the
local APIC's pending vectors (``VEC_*`` in :mod:`emu.hw.cpu`), set by the sender
before the doorbell and the signal. Silicon-wide words: the banks that can signal
CMCI (their CTL2.CMCI_EN sticks) and the largest CMCI threshold CTL2 holds.
"""
from __future__ import annotations

from emu.hw import msr

MCG_K_STATUS, MCG_K_CTL, MCG_K_CAP, MCG_K_EXT_CTL = range(4)
MCG_WORDS = 4
CPU_WORDS = 3     # per CPU: the doorbell, the channel it sleeps on (0: awake), the IRR


class Alloc:
    """Hands out 8-byte words of a region, in order."""

    def __init__(self):
        self.size = 0

    def words(self, n: int = 1) -> int:
        off = self.size
        self.size += 8 * n
        return off

    def page_align(self):
        self.size = (self.size + 4095) & ~4095


class HwLayout:
    def __init__(self, topo):
        n = topo.ncpus
        h = Alloc()
        self.banks = h.words(topo.ninst * msr.NREGS)
        self.mcg = h.words(n * MCG_WORDS)     # per CPU: STATUS, CTL, CAP, EXT_CTL
        self.cpu_words = h.words(n * CPU_WORDS)
        self.cmci_cap = h.words()            # bit i: bank i can signal CMCI
        self.cmci_max_threshold = h.words()  # what CTL2's threshold field holds at most
        self.reset_gen = h.words()           # the reset line: assertions so far
        self.reset_release = h.words()       # ... and releases (the generation released)
        self.init_ack = h.words(n)           # per CPU: the assertion it is held in
        h.page_align()
        self.size = h.size

    def mcg_reg(self, cpu: int, k: int) -> int:
        return self.mcg + 8 * (cpu * MCG_WORDS + k)

    def doorbell(self, cpu: int) -> int:
        return self.cpu_words + 8 * (cpu * CPU_WORDS)

    def sleep_reg(self, cpu: int) -> int:
        return self.cpu_words + 8 * (cpu * CPU_WORDS + 1)

    def init_ack_word(self, cpu: int) -> int:
        return self.init_ack + 8 * cpu

    def irr(self, cpu: int) -> int:
        return self.cpu_words + 8 * (cpu * CPU_WORDS + 2)
