"""Recording a trial's trace (``MachineConfig.trace``): the coordinator's side.

Modelled: nothing of Xen; this is the emulator's own instrument. The CPUs append
their yield points and phase changes to the trace ring in the Xen region
(:mod:`emu.hw.yieldpoint`); the coordinator clears the ring before each trial,
reads it right after (before a reset could wipe Xen memory) and keeps its own
events of the trial: the raise, late doorbells, resets, the VIRQ it forwards,
Dom0's fetch, write (its ``logged``: durable) and ack, each guest's vMCE, trapped
MSR accesses and handler report. :mod:`emu.formats.trace` exports the result.
"""
from __future__ import annotations

from emu.errors import UsageError
from emu.hw.yieldpoint import SITES, TRACE_WORDS
from emu.xen.mce import PHASES

TRACE_SCHEMA = "emu.trace/1"


def _trace_names(L) -> dict:
    """Xen words the trace's detail words point at, by offset."""
    return {L.mce_logout_lock: "mce_logout_lock", L.process_lock: "mce_process_lock",
            L.mce_trap_bar: "mce_trap_bar", L.mce_inside_bar: "mce_inside_bar",
            L.mce_severity_bar: "mce_severity_bar", L.found_error: "found_error",
            L.severity_cpu: "severity_cpu", L.sirq_severity_cpu: "sirq_severity_cpu",
            L.cmci_discover_lock: "cmci_discover_lock", L.poll_adjust: "poll_adjust"}


class TraceRecorder:
    """The coordinator's side of tracing (a mixin: it uses the coordinator's regions
    and ``tev``, its events)."""

    def _trace_reset(self) -> None:
        """A new trial: an empty ring (entries of the last one unmarked) and no events."""
        X, L = self.R.X, self.R.L
        for k in range(self._trace_used):
            X.store(L.trace + 8 * TRACE_WORDS * k, 0)
        X.store(L.trace_n, 0)
        self.tev.clear()
        self._trace_ring = None

    def _read_trace_ring(self) -> dict:
        X, L = self.R.X, self.R.L
        count = X.load(L.trace_n)
        n = self._trace_used = min(count, L.trace_ring)
        out = []
        for k in range(n):
            base = L.trace + 8 * TRACE_WORDS * k
            e = [X.load(base + 8 * j) for j in range(TRACE_WORDS)]
            if e[0] == k + 1:   # whole (a CPU killed mid-entry leaves it unmarked)
                e[0] = k
                out.append(e)
        return {"entries": out, "dropped": max(0, count - L.trace_ring)}

    def _trace_payload(self) -> dict:
        """The last trial's trace: the CPUs' ring (seq, cpu, site, t_ns, d0, d1) and
        the coordinator's events, with what is needed to read them."""
        if self.tev is None:
            raise UsageError("trace", "this machine does not trace; boot it with trace=True "
                             "(emu run --trace FILE)")
        if self._trace_ring is None:
            raise UsageError("trace", "no trial has run yet")
        return {"schema": TRACE_SCHEMA, "trial": self._trace_ring["trial"],
                "t0": self._trace_ring["t0"], "ncpus": self.n, "domids": self.domids,
                "handler": self.cfg.handler, "topology": self.cfg.topology,
                "sites": list(SITES), "phases": list(PHASES),
                "names": {str(k): v for k, v in _trace_names(self.R.L).items()},
                "entries": self._trace_ring["entries"], "dropped": self._trace_ring["dropped"],
                "events": list(self.tev)}
