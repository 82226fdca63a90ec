"""A physical CPU: one OS process; #MC delivery and MCIP as silicon does them.

Modelled: the CPU process boots (Xen's ``intel_init_mce`` runs in it), then idles
or runs its softirq work. A machine check is delivered as a signal, so it
preempts whatever the process is doing — idling, the softirq, even an earlier
#MC handler whose MCIP is already clear — and the handler runs nested on top, as
an exception does. Delivery (:func:`deliver_mc`) is the hardware side: it sets
MCG_STATUS (with MCIP) and raises the signal; a #MC that finds MCIP already set
shuts the machine down instead (the SDM's rule, any #MC), and the bank is left as
it is.

The CPU sets a parent-death signal, so it cannot outlive the coordinator.
Not modelled: CR4.MCE (always set), parked/offline CPUs, NMI.
"""
from __future__ import annotations

import ctypes
import os
import signal
import time

from emu.hw import msr
from emu.hw.platform import TRACE_RING
from emu.hw.yieldpoint import YieldPoints
from emu.xen.versions import handler_class

SIG_MC = signal.SIGUSR1
IDLE_POLL_START_NS = 200_000   # cpuidle-haltpoll's default window
IDLE_POLL_MIN_NS = 50_000
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def set_pdeathsig(parent_pid: int) -> None:
    """Die with the parent; if it is already gone, die now."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)


def child_signals() -> None:
    """A forked child starts with default dispositions (pytest's included)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1, signal.SIGUSR2,
              signal.SIGCHLD):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C goes to the front end only


def fork_child(body) -> int:
    """Fork an emulator process running ``body()``: it dies with its parent, starts
    with default signal dispositions and never returns into the parent's stack."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        set_pdeathsig(parent)
        child_signals()
        body()
    except BaseException:  # noqa: BLE001
        code = 70   # first: printing may fail too (e.g. a closed stderr)
        import traceback
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def pin_to_host_core(cpu: int, shift: int = 0) -> None:
    """Run emulated CPU ``cpu`` on host core ``(cpu + shift) % cores`` only.

    Why: with more emulated CPUs than cores, a process the scheduler migrates pays a
    cold cache and a remote wake-up; pinned, a wake-up and a ``sched_yield`` hand-over
    stay on one core (measured 12-25 % lower handler latency at 4 and 16 CPUs). The
    cost: two emulated CPUs on the same host core never run at the same instant, so
    their races happen by preemption only; ``pin_cpus=False`` (``--no-pin``) lets the
    host scheduler place them freely. The machine's seed is the ``shift``: which
    emulated CPUs share a core (and so which tend to win a shared bank's race, seen
    skewed 239:95:45:21 over 400 trials) changes with the seed of a campaign.
    """
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[(cpu + shift) % len(cores)]})


def cpu_process(R, cpu: int, hooks: dict, pgid: int = 0) -> None:
    """Body of a CPU process (run through :func:`fork_child`; never returns)."""
    os.setpgid(0, pgid)   # the CPUs' process group (also set by the parent)
    if R.cfg.pin_cpus:
        pin_to_host_core(cpu, R.cfg.seed)
    X, L = R.X, R.L
    R.ev.doorbell = L.pc(cpu, L.P_DOORBELL)
    R.ev.sleep_reg = L.pc(cpu, L.P_SLEEP_OFF)
    if cpu in (hooks.get("sleep_masked_cpus") or ()):
        R.ev.sleep_masked = {SIG_MC}   # test hook: see Events.sleep_masked
    trace = (X, L.trace_n, L.trace, TRACE_RING) if R.cfg.trace else None
    yps = YieldPoints(cpu, R.cfg.chaos, None, trace)
    x = handler_class(R.cfg.handler)(R, cpu, yps, hooks)
    X.store(L.pc(cpu, L.P_PID), os.getpid())
    signal.signal(SIG_MC, x.do_machine_check)
    x.boot()
    soft = L.pc(cpu, L.P_SOFTIRQ)
    kick = L.pc(cpu, L.P_KICK)
    t_enter = L.pc(cpu, L.P_T_ENTER)
    poll_word = L.pc(cpu, L.P_IDLE_POLL)
    cap = R.cfg.idle_poll_us * 1000
    poll = min(IDLE_POLL_START_NS, cap)
    X.store(poll_word, poll)
    while True:
        # xchg, not load+store: a #MC between the two would lose its raise.
        if X.xchg(soft, 0):
            x.mce_softirq()
            continue
        # Idle: poll (yielding) before sleeping, as halt polling does, for a window
        # that adapts to how soon the machine checks come (idle_poll_window).
        t = time.monotonic_ns()
        R.ev.wait(kick, lambda: X.load(soft) != 0, slice_s=1.0, spin_ns=poll)
        entered = X.load(t_enter)        # the #MC that ended this idle period
        poll = idle_poll_window(poll, (entered if entered > t else time.monotonic_ns()) - t,
                                cap)
        X.store(poll_word, poll)


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


def deliver_mc(R, banks, targets: list[int], mcg_status: dict[int, int], pids: dict[int, int],
               pgid: int | None = None) -> tuple[int | None, int]:
    """Raise #MC on ``targets``. Returns the CPU that shut down (or None) and the
    ``time.monotonic_ns()`` of the raise, taken just before the signal is sent.

    For each CPU: if MCIP is already set the processor shuts down (the caller
    resets the machine); else MCG_STATUS takes the event's value with MCIP. Then
    the signal: a broadcast to every CPU is one ``killpg`` to the CPUs' process
    group, so they are woken together as by a hardware broadcast. The doorbells of
    CPUs that did not enter are rung by the caller, a little later
    (``Coordinator._ring_late``).
    """
    L, X = R.L, R.X
    for cpu in targets:
        new = mcg_status[cpu] | msr.MCG_STATUS_MCIP
        while True:
            old = banks.mcg(cpu)
            if old & msr.MCG_STATUS_MCIP:
                return cpu, time.monotonic_ns()
            if banks.cmpxchg_mcg(cpu, old, new) == old:
                break
        X.fetch_add(L.pc(cpu, L.P_DOORBELL), 1)
    t = time.monotonic_ns()
    if pgid is not None and len(targets) == len(pids):
        os.killpg(pgid, SIG_MC)
    else:
        for cpu in targets:
            os.kill(pids[cpu], SIG_MC)
    return None, t
