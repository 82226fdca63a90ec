"""The body of a CPU process: Xen boots on it, then it idles or runs its softirq.

Modelled: the CPU process boots (Xen's ``intel_init_mce`` runs in it, through the
handler it is handed), then idles or runs its softirq work; the #MC is a signal
whose handler is the handler version's ``do_machine_check`` (see :mod:`emu.hw.cpu`).
An idle CPU polls before it sleeps, as halt polling does (:func:`idle_poll_window`).
Interrupts (CMCI, IPIs) are a second signal, handled by ``do_interrupt``. CPU 0
also runs Xen's polling timer (``mce_work_fn``) in its idle loop: when the period
is due, or at once when the coordinator asks (``L.poll_req``).

A warm reset does not replace the process: the reset line (:mod:`emu.hw.cpu`)
unwinds whatever it runs, holds it, and on release it boots again with everything
built anew (the handler object, its yield points, the scheduler's view); only the
hardware region and the process itself carry over. Why: a fork costs 2-4 ms of CPU
here, and a warm reset forked every CPU (24 ms a reset at 4 CPUs, 58 at 16).
"""
from __future__ import annotations

import os
import signal
import time

from emu.hw.cpu import SIG_INTR, SIG_MC, SIG_RESET, CpuReset, hold_in_reset, on_reset_line
from emu.hw.yieldpoint import YieldPoints
from emu.machine.procs import pin_to_host_core
from emu.machine.sched import Sched

IDLE_POLL_START_NS = 200_000   # cpuidle-haltpoll's default window
IDLE_POLL_MIN_NS = 50_000


def cpu_process(R, cpu: int, handler, hooks: dict, pgid: int = 0) -> None:
    """Body of a CPU process (run through :func:`~emu.machine.procs.fork_child`;
    never returns). ``handler``: the handler version's class (:mod:`emu.xen.versions`).
    Each boot runs until the reset line stops it; the process is then held in reset
    and boots again when the line is released."""
    os.setpgid(0, pgid)   # the CPUs' process group (also set by the parent)
    if R.cfg.pin_cpus:
        # Controlled: one process runs at a time, so all share one host core, where a
        # hand-over is a wake-up on the same run queue (no cross-core IPI).
        pin_to_host_core(0 if R.S is not None else cpu, R.cfg.seed)
    signal.signal(SIG_RESET, on_reset_line)
    if cpu in (hooks.get("reset_deaf_cpus") or ()):
        signal.signal(SIG_RESET, signal.SIG_IGN)   # test hook: a CPU the line cannot stop
    while True:
        try:
            _boot_and_run(R, cpu, handler, hooks)
        except CpuReset:
            pass
        hold_in_reset(R.HW, R.HL, cpu, R.notify)


def _boot_and_run(R, cpu: int, handler, hooks: dict) -> None:
    """One boot of the CPU: Xen's init, then the idle loop (until a reset)."""
    sched = Sched(R, cpu, R.S) if R.S is not None else None
    X, L = R.X, R.L
    R.ev.doorbell = R.HL.doorbell(cpu)
    R.ev.sleep_reg = R.HL.sleep_reg(cpu)
    if cpu in (hooks.get("sleep_masked_cpus") or ()):
        R.ev.sleep_masked = {SIG_MC}   # test hook: see Events.sleep_masked
    trace = (X, L.trace_n, L.trace, L.trace_ring) if R.cfg.trace else None
    # No perturbation at boot: each trial configures chaos and the stream from its
    # trial seed at #MC entry (XenCpu._trial_ctl); counts are published per CPU.
    yps = YieldPoints(cpu, 0.0, None, trace,
                      counter=(X, L.pc(cpu, L.P_PERTURB), L.pc(cpu, L.P_STARVED)))
    if sched is not None:
        sched.install(yps)   # before the handler: it captures yps.yp and the barriers' spin
    x = handler(R, cpu, yps, hooks)
    X.store(L.pc(cpu, L.P_PID), os.getpid())
    if sched is not None:
        _schedule_handlers(x, sched, X, L.pc(cpu, L.P_NEST))
    else:
        signal.signal(SIG_MC, x.do_machine_check)
        signal.signal(SIG_INTR, x.do_interrupt)
    x.boot()
    soft = L.pc(cpu, L.P_SOFTIRQ)
    kick = L.pc(cpu, L.P_KICK)
    t_enter = L.pc(cpu, L.P_T_ENTER)
    poll_word = L.pc(cpu, L.P_IDLE_POLL)
    cap = R.cfg.idle_poll_us * 1000
    poll = min(IDLE_POLL_START_NS, cap)
    X.store(poll_word, poll)
    timer = cpu == 0     # the polling timer lives on CPU 0
    preq, pdone = L.poll_req, L.poll_done
    if timer:
        x.poll_rearm()

        def woken():
            return X.load(soft) != 0 or X.load(preq) > X.load(pdone)
    else:
        def woken():
            return X.load(soft) != 0
    if sched is not None:
        sched.pending = woken
    while True:
        # xchg, not load+store: a #MC between the two would lose its raise.
        if X.xchg(soft, 0):
            x.mce_softirq()
            continue
        if timer and (X.load(preq) > X.load(pdone) or x.poll_due(time.monotonic_ns())):
            x.mce_work_fn()        # TIMER_SOFTIRQ: the poll round
            x.poll_rearm()
            continue
        if sched is not None and sched.on:
            sched.leave()          # back in the idle loop: this CPU's part is over
        # Idle: poll (yielding) before sleeping, as halt polling does, for a window
        # that adapts to how soon the machine checks come (idle_poll_window).
        t = time.monotonic_ns()
        until = None
        if timer and x._next_poll_ns < 1 << 61:
            until = max(0.0, (x._next_poll_ns - t) / 1e9)   # the timer's expiry
        R.ev.wait(kick, woken, timeout_s=until, slice_s=1.0, spin_ns=poll)
        entered = X.load(t_enter)        # the #MC that ended this idle period
        poll = idle_poll_window(poll, (entered if entered > t else time.monotonic_ns()) - t,
                                cap)
        X.store(poll_word, poll)


def _schedule_handlers(x, sched, X, nest_off: int) -> None:
    """Under controlled scheduling: the #MC and interrupt handlers are counted (a
    CPU whose handler returns to its idle wait with nothing queued leaves the
    schedule), an interrupt that finds interrupts off still counts as arrived, and
    the poll round's IPIs are announced to the scheduler before they go."""
    mc, intr, ipi = x.do_machine_check, x.do_interrupt, x.send_ipi

    def counted(handler, *a):
        sched.hdepth += 1
        try:
            handler(*a)
        finally:
            sched.hdepth -= 1
            if not sched.hdepth:
                sched.handler_exit()

    def on_mc(*a):
        counted(mc, *a)

    def on_intr(*a):
        if x._irq_off or X.load(nest_off):
            sched.ack()            # deferred to the end of the running handler
        counted(intr, *a)

    def send_ipi(cpus, fn):
        cpus = list(cpus)
        sched.before_ipi(cpus)
        ipi(cpus, fn)
        sched.after_signal(cpus)

    x.send_ipi = send_ipi
    signal.signal(SIG_MC, on_mc)
    signal.signal(SIG_INTR, on_intr)


def idle_poll_window(poll: int, idle_ns: int, cap: int) -> int:
    """The next idle poll window, by KVM's halt-polling rule: an idle period that
    outlasted the window but not ``cap`` doubles it; one longer than ``cap`` halves
    it (never below IDLE_POLL_MIN_NS, never above ``cap``; ``cap`` 0: no polling).

    Why: on a VM whose idle vCPUs halt (this one: no cpuidle driver), a CPU process
    that sleeps between back-to-back machine checks lets its vCPU halt, and the next
    #MC then runs cold after a host-level wake-up (tools/coldstart.py: 5x slower);
    polling through the gap keeps it warm, and when machine checks are sparse the
    window shrinks back and idle CPUs sleep. Each poll iteration yields the core.
    """
    if cap <= 0:
        return 0
    if idle_ns <= poll:
        return poll
    if idle_ns <= cap:
        return min(cap, max(2 * poll, IDLE_POLL_MIN_NS))
    return max(min(IDLE_POLL_MIN_NS, cap), poll // 2)
