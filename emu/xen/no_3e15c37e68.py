"""Handler variant ``no-3e15c37e68``: the seed without Xen commit ``3e15c37e68``
("x86 mce: Small fix for polling/CMCI race conditions", 2009-04-06; xen-mca.md
§10.1 item 4).

Before that commit the poller scanned every bank (``bankmask`` = ``mca_allbanks``),
CMCI banks included, so "when CMCI happens very quickly, polling/CMCI processing
path might cross": the CMCI owner and a poller (on the owner or on a sharer) both
read a corrected error before either clears it, and Dom0 gets two records of one
error. Everything else is the seed's; only ``set_poll_bankmask`` changes.
"""
from __future__ import annotations

from emu.xen.mce import XenCpu


class XenCpuNo3e15c37e68(XenCpu):
    """The seed, polling every bank as before 3e15c37e68."""

    version = "no-3e15c37e68"

    def set_poll_bankmask(self) -> None:
        # Before 3e15c37e68: non-fatal.c's static bankmask was mca_allbanks.
        self.X.store(self.pc(self.L.P_POLL_MASK), self.mca_allbanks)
