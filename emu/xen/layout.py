"""The Xen region's layout: byte offsets of Xen's memory (what mce.c, barrier.c,
mctelem.c, page_alloc.c and vmce.c keep) plus each CPU's per_cpu area and the
emulator's per-trial records (logout ring, deferred-action log, yield-point trace).
Pure arithmetic.

The region is re-initialised at every boot, as Xen's memory is by a reset.
"""
from __future__ import annotations

from emu.hw.region import Alloc
from emu.hw.yieldpoint import TRACE_WORDS
from emu.xen import mctelem, page_alloc, vmce

LOGOUT_RING = 40        # logout entries kept per CPU per trial
ACTION_RING = 256       # deferred-action entries per trial
TRACE_RING = 4096       # yield-point trace entries at the least (TRACE_WORDS words each)
TRACE_PER_CPU = 256     # and at least this many per CPU
PANIC_BYTES = 8192      # mc_panic's text: "Fatal error happened on CPUs ..." names up to 1024

# The trial control block (XenLayout.ctl), word indices.
(CTL_FLAGS, CTL_SEED, CTL_TRIAL, CTL_CHAOS, CTL_STARVE_CPU, CTL_STARVE_K, CTL_STARVE_NS,
 CTL_FAULT, CTL_FAULT_CPU, CTL_FAULT_PHASE, CTL_FAULT_NS) = range(11)
CTL_WORDS = 11
CTL_F_PERTURB, CTL_F_FAULT = 1, 2          # CTL_FLAGS bits
FAULT_NONE, FAULT_KILL_CPU, FAULT_STALL_CPU = 0, 1, 2   # CTL_FAULT
# Rendezvous whose arrival order each CPU records (P_ARRIVE + index): the trap
# barrier's three uses, then the softirq's two barriers.
ARRIVALS = ("barrier_a", "barrier_b", "barrier_c", "softirq_inside", "softirq_severity")


class XenLayout:
    def __init__(self, ncpus: int, memory_pages: int, trace: bool = False,
                 sched_words: int = 0):
        n = self.ncpus = ncpus
        x = Alloc()
        w = x.words
        self.online = w()
        self.trial_gen = w()
        self.reset_req = w()                 # reason code (see mce.RESET_*)
        self.reset_cpu = w()
        self.panic_msg = w(PANIC_BYTES // 8)  # mc_panic's text (NUL-padded)
        self.boot_token = w()
        self.boot_ev = w(2)
        self.is_mc_panic = w()
        self.halt_ev = w(2)
        # The trial's perturbation and fault (emulator control, not Xen): written by
        # the coordinator before the raise; a CPU reads the block at #MC entry when
        # ctl_gen moved (XenCpu._trial_ctl). ctl_gen moves only for a trial with
        # chaos, starvation or a fault, and for the first trial after one.
        self.ctl_gen = w()
        self.ctl = w(CTL_WORDS)
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
        self.mce_enter_lock = w(3)           # xen-2009-03 mce_enter_lock (lock, event)
        self.impact_map = w(self.mcefatal_words)
        self.mc_local = w(1 + n)             # xen-2009-03 mc_local: in_use, mctc[cpu]+1
        self.mask_waiting = w(4)             # xen-2009-03: CPUs spinning on each cpumask
        self.mask_ev = w(2)                  # xen-2009-03: cpumask change event
        self.online_map = w(self.mcefatal_words)   # cpu_online_map
        # mce_intel.c / intel-nonfatal.c (CMCI and the poller)
        self.cmci_discover_lock = w(3)
        self.call_pending = w()              # on_each_cpu(..., wait=1): CPUs still to run
        self.call_ev = w(2)
        self.poll_period_ns = w()            # intel-nonfatal.c's period (0: no timer)
        self.poll_adjust = w()               # its racy `adjust` count
        self.poll_req = w()                  # a poll asked for now (gen); CPU 0 runs it
        self.poll_done = w()                 # the gen of the last poll round completed
        self.poll_started = w()              # the gen of the last poll round begun
        self.poll_rounds = w()
        # deferred-action log (for the trial result)
        self.action_n = w()
        self.action_log = w(ACTION_RING * 32)   # 256-byte msgpack slots
        # per CPU
        self.PCPU_WORDS = self.P_LOGOUT + LOGOUT_RING * 6
        self.pcpu = w(n * self.PCPU_WORDS)
        # trace ring
        # (only on a machine that traces: untraced, the region stays as it was)
        self.trace_ring = max(TRACE_RING, TRACE_PER_CPU * n) if trace else 0
        self.trace_n = w()
        self.trace = w(max(1, self.trace_ring * TRACE_WORDS))
        # telemetry, page table and vMCE state come from their modules
        self.tele = mctelem.Layout(x, n)
        self.pages = page_alloc.Layout(x, memory_pages)
        self.vm = vmce.Layout(x)
        # the controlled scheduler's section (emu.machine.sched), sized by the config
        self.sched = x.words(sched_words) if sched_words else 0
        x.page_align()
        self.size = x.size

    # per-CPU word offsets
    (P_PHASE, P_REACHED, P_T_ENTER, P_T_LOGOUT, P_T_EXIT, P_T_SOFTIRQ, P_MC_GEN, P_DONE_GEN,
     P_SOFTIRQ, P_NEST, P_CLEAR_BANKS, P_CURRENT_DOM, P_CURRENT_VCPU, P_PENDING,
     P_LMCE_PENDING, P_HALTED, P_LOGOUT_N, P_PID, P_INTERRUPTED, P_T_SOFTIRQ_START,
     P_KICK, _P_KICK_SLEEPERS, P_T_BARRIER_A, P_SIRQ_ROLE, P_PROGRESS, P_IDLE_POLL,
     P_T_FATAL, P_T_MCIP, P_BANKS_OWNED, P_NO_CMCI, P_POLL_MASK, P_CMCI_N, P_CALL_FN,
     P_CALL_N, P_OFFLINE, P_T_CMCI, P_DISCOVER_N, P_POLL_N, P_PERTURB, P_STARVED) = range(40)
    # P_PERTURB: perturbations << 32 | yield points of this trial; P_STARVED: the site
    # (index + 1) where this CPU was starved. P_ARRIVE..+4: 1 + the barrier's val when
    # this CPU arrived, per ARRIVALS entry (0: did not arrive).
    P_ARRIVE = 40
    P_LOGOUT = P_ARRIVE + len(ARRIVALS)

    def pc(self, cpu: int, word: int) -> int:
        return self.pcpu + 8 * (cpu * self.PCPU_WORDS + word)
