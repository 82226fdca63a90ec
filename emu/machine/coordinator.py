"""The coordinator: machine lifecycle, reset controller, watchdog, trial results.

Modelled: power-on (banks zeroed), boot (Xen memory re-initialised, CPU processes
forked, or released from reset, and brought up through boot-time logout), hardware injection
(errors written into banks with the overwrite rules, then one #MC raised), the
reset controller (``mc_panic``, processor shutdown, hangs and dead CPUs all end in
a warm reset that keeps the banks), and a watchdog: a trial whose handler makes no
progress for ``watchdog_s`` ends as ``hang`` with a snapshot of every CPU.

It runs as its own process, forked by the front end (:class:`emu.machine.Machine`),
and dies with it (parent-death signal); every process it forks dies with it.
Requests arrive as msgpack arrays ``[1, command, args]`` on one pipe.
"""
from __future__ import annotations

import os
import signal
import struct
import time
import traceback
from collections import deque

import msgpack

from emu.errors import EmuError, EmulatorInternalError, UsageError
from emu.hw import msr
from emu.hw.banks import Banks
from emu.hw.cpu import assert_reset, deliver_mc, held, release_reset
from emu.hw.yieldpoint import SITES
from emu.machine import chaos as ch
from emu.machine.channels import (
    GUEST_SPIN_S,
    PROTO,
    REAPED_CPU,
    DomainChannels,
    proc_cpu_s,
    reap_status,
)
from emu.machine.checks import check_timeout
from emu.machine.config import MachineConfig
from emu.machine.cpu_process import cpu_process
from emu.machine.interrupts import IrqPaths
from emu.machine.procs import child_signals, fork_child, readable, set_pdeathsig
from emu.machine.regions import Regions
from emu.machine.runs import note_trial
from emu.machine.sched import OVER_DEADLOCK, OVER_DONE, SchedControl, controlled_record
from emu.machine.tracing import TraceRecorder
from emu.trial.oracle import check_trial
from emu.trial.spec import validate_errors
from emu.xen import layout as xl, severity as sev
from emu.xen.layout import ACTION_RING, ARRIVALS, LOGOUT_RING, PANIC_BYTES
from emu.xen.mce import DOMID_IDLE, LOG_WORDS, PH, PHASES, RESET_NONE, WHO_NAME
from emu.xen.mctelem import NENT, Mctelem
from emu.xen.page_alloc import PageTable
from emu.xen.versions import handler_class
from emu.xen.vmce import Vmce

SCHEMA = "emu.trial/1"
BOOT_TIMEOUT_S = 30.0
RING_LATE_S = 0.0005   # at the earliest; see Coordinator._ring_late
RING_LATE_MAX_S = 0.02
HANG_QUIET_S = 0.15    # see Coordinator._parked: 3 of the CPUs' 50 ms sleep slices
# How long a CPU process may take to stop for the reset line before it is replaced
# (killed, and a new one forked): a running or sleeping CPU takes it in well under a
# millisecond; one that cannot (stopped past SIGCONT, wedged) costs this once.
RESET_HOLD_S = 0.5


class Coordinator(DomainChannels, IrqPaths, TraceRecorder):
    def __init__(self, conn, cfg: MachineConfig):
        self.conn = conn
        self.cfg = cfg
        self.R = Regions(cfg)
        self.topo = self.R.topo
        self.n = self.topo.ncpus
        self.banks = Banks(self.R)
        # The handler version's telemetry class: Dom0's fetch and ack free through it.
        self.tele = getattr(handler_class(cfg.handler), "telemetry_class", Mctelem)(self.R)
        self.pages = PageTable(self.R)
        self.vmce = Vmce(self.R)
        # Xen memory as u64 words, for reading the per-CPU areas in one slice each
        # once a trial is over (its writers are done; aligned 8-byte loads on x86 are
        # whole). One load_u64 per word cost ~25% of the coordinator's time per trial.
        self._q = memoryview(self.R.xen_map).cast("Q")
        self.boots = 0
        self.trial_gen = 0
        self._spec_cache: dict = {}       # error strings -> validated specs
        self._trial_words = None          # per-CPU words cleared before each trial
        self._handler_us: deque = deque(maxlen=32)   # recent handler_exit latencies
        # CPUs the late ring found asleep and not entered (this trial): one that missed
        # its signal, or one the signal woke that has not run yet (a slow trial)
        self.rung_late: list[int] = []
        self.cpu_pids: dict[int, int] = {}
        self.pidfds: dict[int, int] = {}
        self._cpu_hooks: dict[int, dict] = {}   # cpu -> the hooks its process was forked with
        _raise_nofile(2 * self.n + 256)   # a pidfd per CPU, a channel and a pidfd per domain
        self.hooks: dict = dict(cfg.extra.get("hooks", {}))
        self.last_boot_log: list = []
        self.domids = cfg.domids
        # Guests: one process per guest domain, with its own channel (and Dom0's
        # process also runs a native #MC handler for vMCEs sent to Dom0).
        self.guests: dict[int, tuple] = {}            # domid -> (pid, conn, pidfd)
        self.guest_hooks: dict = dict(cfg.extra.get("guest_hooks", {}))
        self.guest_exits: dict[int, str] = {}         # domid -> why its process ended
        self.vmce_seen = 0
        self._vmce_retry = False
        self.delivered: list[dict] = []               # vMCEs passed to domain processes
        self.probes: dict[int, dict] = {}             # domid -> last probe result
        self.ready_doms: set[int] = set()
        self._served = 0
        self.guest_spin_s = float(cfg.extra.get("guest_spin_s", GUEST_SPIN_S))
        # How long a trial whose CPUs all sleep in handler waits may go without
        # progress before it is a hang (_parked), and the phases that do not count.
        self.hang_quiet_s = float(cfg.extra.get("hang_quiet_s", HANG_QUIET_S))
        self._unparked_phases = {PH[p] for p in ("idle", "boot", "halted", "panic", "offline")
                                 if p in PH}
        self._fault_active = False
        # Tracing (cfg.trace): what the coordinator sees of the last trial, as
        # [t_ns, track, name, args] (track: "coordinator", "dom0", "dom1", ...), and
        # the CPUs' ring, read before a reset could wipe it.
        self.tev: list | None = [] if cfg.trace else None
        self._trace_ring: dict | None = None
        self._trace_used = 0
        # Dom0: the logger process and its channel (the hypercall and VIRQ path).
        import tempfile
        self.log_dir = cfg.extra.get("log_dir") or os.path.join(
            tempfile.gettempdir(), "emu-runs", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
        os.makedirs(self.log_dir, exist_ok=True)
        if not cfg.extra.get("log_dir"):
            from emu.machine.runs import prune_runs  # keep the newest EMU_KEEP_RUNS
            prune_runs(os.path.dirname(self.log_dir), current=self.log_dir)
        self.dom0_log_path = os.path.join(self.log_dir, "dom0.jsonl")
        self.boots = self._last_boot_in_log()
        self.dom0_hooks = dict(cfg.extra.get("dom0_hooks", {}))
        # Paused by the operator (the hook or dom0_pause): kept across Dom0 restarts
        # and warm resets until resumed, like a stopped mcelog daemon.
        self.dom0_paused = bool(self.dom0_hooks.pop("pause", False))
        self._pause_acked = False
        self._acked_unlogged: set[int] = set()   # acked, "logged" not yet received
        self._rid_origin: dict[int, dict] = {}    # record id -> trial, cpu, banks
        self.lost_total = 0                       # records lost at warm resets
        self.dom0_fsync = bool(cfg.extra.get("fsync", True))
        self.dom0 = None                    # (pid, conn, pidfd)
        self.dom0_restarts = 0
        self.dom0_exits: list[str] = []     # how each Dom0 that had to be restarted ended
        self.dom0_deaths: list[float] = []
        self.dom0_failure: dict | None = None   # why Dom0 could not write its log (last)
        self._dom0_restart_at: float | None = None
        self._dom0_backoff = 0.0
        self._dom0_warned = False
        self.logged_total = 0               # record ids Dom0 logged (at least once)
        self.logged_multi: set[int] = set()  # ... more than once
        self.virq_seen = 0
        self.logged: dict[int, list] = {}   # record id -> [count, t_logged_ns]
        self.refused = 0                    # forged or unprivileged hypercalls
        self.replies_lost = 0               # hypercall replies to a domain already dead
        self.refused_by: dict[int, list] = {}   # domid -> refused privileged commands
        self.handled: list = []             # reports of guest #MC handlers
        self.last_ready: list = []
        self.parent_pidfd: int | None = None   # see coordinator_process
        self.died_between: list[dict] = []     # CPUs that died between trials (not yet told)
        # Controlled scheduling (emu.machine.sched): None when the OS schedules.
        self.sched = SchedControl(self.R, self.R.S) if self.R.S is not None else None
        # Per-trial perturbation and faults (emu.machine.chaos).
        self._names = ch.process_names(self.n, self.domids)
        self._ctl_active = False        # the CPUs' control block says perturb or fault
        self._dom_ctl: dict = {}        # domid -> the control its notifications carry
        self._dom_armed: set = set()    # domains told to perturb, not yet told to stop
        self.dom_perturb: dict = {}     # domid -> its last report {"gen", "n", ...}
        self._resume_at = None          # a pause_dom0 fault's resume time (monotonic)
        self._not_awaited = False       # this trial does not wait for Dom0

    # -- lifecycle --------------------------------------------------------------------
    def power_on(self) -> dict:
        if self.cpu_pids:
            self._kill_cpus()   # power off: nothing is held in reset
        self.R.power_off()
        self.banks.power_on(self.cfg.mcg_cap, self.cfg.cmci_cap, self.cfg.cmci_max_threshold)
        return self.boot()

    def boot(self, held_gen: int = 0) -> dict:
        """Boot: Xen memory anew, then the CPUs: those held in reset generation
        ``held_gen`` (still in ``cpu_pids``) are released, the others forked."""
        t0 = time.monotonic()
        R, X, L = self.R, self.R.X, self.R.L
        self.boots += 1
        R.reinit_xen()
        # mce.c: static atomic_t severity_cpu = ATOMIC_INIT(-1). Zeroed memory would make
        # CPU 0 the trap handler's severity_cpu until the first fatal check resets it
        # (a broadcast #MC with no valid bank then panicked on a fresh machine).
        X.store(L.severity_cpu, -1 & msr.U64)
        # Xen memory (the control block) is new, and so are the CPU and domain
        # processes: nothing is armed; a fault or plan of the trial does not carry over.
        self._ctl_active = False
        self._dom_ctl, self._dom_armed = {}, set()
        self.tele.init(self.boots)
        self.pages.init_default(self.domids)
        self.vmce.create(0, 0, hvm=False, nvcpus=min(2, self.n), hwdom=True)
        for k, d in enumerate(self.domids[1:], start=1):
            self.vmce.create(k, d, hvm=True, nvcpus=self.cfg.guest_vcpus, hwdom=False)
        X.store(L.trial_gen, self.trial_gen)
        X.store(L.poll_period_ns, int(self.cfg.poll_period_s * 1e9))
        self.poll_k = 0
        handler = handler_class(self.cfg.handler)   # imported before forking, not in every CPU
        kept = sorted(self.cpu_pids) if held_gen else []
        if not self.cpu_pids:
            self.pgid = None   # a new group (a kept CPU keeps the old one alive)
        for cpu in range(self.n):
            if cpu in self.cpu_pids:
                continue       # held in reset: released below
            self._cpu_hooks[cpu] = dict(self.hooks)
            pid = fork_child(lambda c=cpu: cpu_process(R, c, handler, self.hooks,
                                                             self.pgid or 0))
            # Both sides set the group, so it holds whichever runs first.
            try:
                os.setpgid(pid, self.pgid or pid)
            except (PermissionError, ProcessLookupError):
                pass
            self.pgid = self.pgid or pid
            self.cpu_pids[cpu] = pid
            self.pidfds[cpu] = os.pidfd_open(pid)
        if held_gen:
            release_reset(R.HW, R.HL, held_gen)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while X.load(L.online) < self.n:
            dead = self._poll(0.05)
            if dead or time.monotonic() > deadline:
                raise EmulatorInternalError(f"boot failed: CPUs {dead or 'timed out'} "
                                            f"({X.load(L.online)}/{self.n} online)")
        self.last_boot_log = self._boot_log()
        self.virq_seen = 0
        self.vmce_seen = X.load(L.vm.vmce_count)
        self.ready_doms.clear()
        self._start_dom0()
        for d in self.domids[1:]:
            self._start_guest(d)
        # Boot is over when every domain process runs with only its channel.
        while not self.ready_doms >= set(self.domids):
            self._poll(0.05)
            if time.monotonic() > deadline:
                raise EmulatorInternalError(f"boot failed: domains "
                                            f"{sorted(set(self.domids) - self.ready_doms)} not up")
        return {"boot": self.boots, "cpus": self.n, "pids": dict(self.cpu_pids),
                "reset_in_place": kept,
                "boot_ms": (time.monotonic() - t0) * 1e3, "boot_log": self.last_boot_log,
                "ownership": self._ownership()}

    def _reset_cpus(self, meanwhile=None) -> int:
        """The reset line: every live CPU process whose hooks are still the machine's
        is stopped and held (:func:`emu.hw.cpu.assert_reset`); the others, and any
        that does not take the line within RESET_HOLD_S, are killed (boot forks new
        ones). ``meanwhile()`` runs once the line is asserted, while the CPUs unwind
        (the domains' teardown). Returns the generation the kept CPUs are held in
        (0: none kept)."""
        meanwhile = meanwhile or (lambda: None)
        # extra={"reset_refork": True}: fork every CPU anew, as before the reset line
        # (an A/B knob: bench/stress.py --extra)
        if not self.cpu_pids or self.cfg.extra.get("reset_refork"):
            self._kill_cpus()
            meanwhile()
            return 0
        stale = [c for c in self.cpu_pids if self._cpu_hooks.get(c) != self.hooks]
        for c in stale:
            self._drop_cpu(c)
        if not self.cpu_pids:
            meanwhile()
            return 0
        HW, HL = self.R.HW, self.R.HL
        gen = assert_reset(HW, HL, self.cpu_pids)
        meanwhile()
        deadline = time.monotonic() + RESET_HOLD_S
        waiting = set(self.cpu_pids)
        while waiting:
            waiting = {c for c in waiting if not held(HW, HL, c, gen)}
            left = deadline - time.monotonic()
            if not waiting or left <= 0:
                break
            r = readable([self.R.efd] + [self.pidfds[c] for c in waiting], min(left, 0.05))
            try:
                os.eventfd_read(self.R.efd)
            except BlockingIOError:
                pass
            for c in [c for c in waiting if self.pidfds[c] in r]:
                self._drop_cpu(c)     # died (killed by a fault, or by a hook)
                waiting.discard(c)
        for c in waiting:
            self._drop_cpu(c)         # did not stop: replaced
        return gen if self.cpu_pids else 0

    def _drop_cpu(self, cpu: int) -> None:
        """Kill and reap one CPU process (boot forks its replacement)."""
        pid = self.cpu_pids.pop(cpu)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            reap_status(pid, 0, "cpus")
        except ChildProcessError:
            pass
        os.close(self.pidfds.pop(cpu))

    def _kill_cpus(self) -> None:
        for pid in self.cpu_pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.cpu_pids.values():
            try:
                reap_status(pid, 0, "cpus")
            except ChildProcessError:
                pass
        for fd in self.pidfds.values():
            os.close(fd)
        self.cpu_pids.clear()
        self.pidfds.clear()

    def warm_reset(self, cause: str = "Machine.reset") -> dict:
        """Reset: every CPU restarts, Xen memory is lost, the banks are kept.
        The result's ``lost_at_reset`` lists the telemetry records the reset lost."""
        if self.tev is not None:
            self.tev.append([time.monotonic_ns(), "coordinator", "reset", {"cause": cause}])
        # Every domain process is killed first, then reaped: their teardowns (about
        # 1.2 ms each here) overlap each other and the CPUs' unwinding.
        for dom in [self.dom0] + list(self.guests.values()):
            if dom is not None:
                try:
                    os.kill(dom[0], signal.SIGKILL)
                except ProcessLookupError:
                    pass

        def stop_domains():
            self._stop_guests()
            self._stop_dom0()
        gen = self._reset_cpus(stop_domains)
        lost = self._lost_at_reset(cause)
        self.banks.warm_reset()
        boot = self.boot(gen)
        inst = self.topo.inst
        for x in lost:
            # A bank the #MC left valid (fatal) is logged again by boot-time logout:
            # the record is lost, the error is not.
            x["relogged_at_boot"] = next(
                (b["record_id"] for b in boot["boot_log"] if x["bank"] is not None
                 and b["status"] == x["status"]
                 and inst[b["cpu"]][b["bank"]] == inst[x["cpu"]][x["bank"]]), None)
            if x["relogged_at_boot"]:
                x["reason"] += (f"; the bank kept the error, so boot-time logout logged it "
                                f"again (record {x['relogged_at_boot']})")
        boot["lost_at_reset"] = lost
        return boot

    def shutdown(self) -> None:
        self._stop_guests()
        self._stop_dom0()
        self._kill_cpus()

    # -- helpers --------------------------------------------------------------------------
    def _poll_fds(self, extra=()) -> list:
        return list(self.pidfds.values()) + [self.R.efd] + self._dom0_fds() + list(extra)

    def _poll(self, timeout: float, extra=(), ready=None, done=None) -> list[int]:
        """Sleep until something happens (an event, a death, Dom0 or ``extra``
        readable); serve Dom0; return the CPUs that died. ``ready``: the caller
        has slept already, and this is what select returned. ``done``: what the
        caller waits for; once true, no more polling of the domains' channels."""
        if self._resume_at is not None:   # a pause_dom0 fault ends on time
            left = self._resume_at - time.monotonic()
            if left <= 0:
                self._fault_resume()
            else:
                timeout = min(timeout, left)
        r = ready if ready is not None else readable(self._poll_fds(extra), timeout)
        try:
            os.eventfd_read(self.R.efd)
        except BlockingIOError:
            pass
        self._served = 0
        self._service(r)
        self._service_guests(r)
        self._deliver_vmce()
        # A kernel's #MC handler (or Dom0's fetch/ack loop) makes its requests back to
        # back: after serving some, poll the domains' channels a little longer rather
        # than pay a sleep/wake-up pair for each request (GUEST_SPIN_S).
        end = time.monotonic() + self.guest_spin_s
        extra = list(extra)
        while self._served and time.monotonic() < end:
            if done is not None and done():
                break
            rr = readable(self._dom0_fds() + extra, 0)
            if any(fd in rr for fd in extra):
                r = list(r) + rr   # what the caller waits for (e.g. the next request)
                break
            if not rr:
                os.sched_yield()
                continue
            self._service(rr)
            self._service_guests(rr)
            self._deliver_vmce()
            r = list(r) + rr
            end = time.monotonic() + self.guest_spin_s
        self.last_ready = r
        return [c for c, fd in self.pidfds.items() if fd in r]

    def _pcpu(self, cpu: int) -> list[int]:
        """CPU ``cpu``'s per-CPU words (``L.P_*`` indexes them), read in one slice."""
        L = self.R.L
        base = L.pc(cpu, 0) >> 3
        return self._q[base:base + L.PCPU_WORDS].tolist()

    def _logouts(self, cpu: int, words: list[int] | None = None) -> list[dict]:
        L = self.R.L
        w = self._pcpu(cpu) if words is None else words
        n = min(w[L.P_LOGOUT_N], LOGOUT_RING)
        out = []
        for k in range(n):
            b = L.P_LOGOUT + LOG_WORDS * k
            meta, status, addr, misc, gen, rid = w[b:b + LOG_WORDS]
            out.append({"cpu": cpu, "who": WHO_NAME[meta & 0xFF].name, "bank": (meta >> 8) & 0xFF,
                        "cleared": bool(meta >> 16 & 1), "status": status, "addr": addr,
                        "misc": misc, "gen": gen, "record_id": rid})
        return out

    def _boot_log(self) -> list[dict]:
        log = []
        for c in range(self.n):
            for e in self._logouts(c):
                if e["who"] == "MCA_RESET":
                    log.append({"cpu": c, "bank": e["bank"], "status": msr.hexs(e["status"]),
                                "addr": msr.hexs(e["addr"]), "misc": msr.hexs(e["misc"]),
                                "record_id": e["record_id"]})
        return log

    def _actions(self) -> list[dict]:
        X, L = self.R.X, self.R.L
        mv = self.tele.mv
        out = []
        for k in range(min(X.load(L.action_n), ACTION_RING)):
            base = L.action_log + 256 * k
            ln = int.from_bytes(mv[base:base + 2], "little")
            if not ln:
                continue   # reserved, still being written (a reset ended the trial first)
            try:
                w, src, bank, status, r, rid, info = msgpack.unpackb(
                    bytes(mv[base + 2:base + 2 + ln]), strict_map_key=False)
            except (ValueError, msgpack.ExtraData):
                continue   # torn the same way: its writer was still at it
            out.append({"worker": w, "cpu": src, "bank": bank, "status": status, "result": r,
                        "record_id": rid, "info": info})
        return out

    def _snapshot(self) -> list[dict]:
        X, L = self.R.X, self.R.L
        snap = []
        for c in range(self.n):
            snap.append({"cpu": c, "phase": PHASES[X.load(L.pc(c, L.P_PHASE))],
                         "halted": bool(X.load(L.pc(c, L.P_HALTED))),
                         "mcg_status": msr.hexs(self.banks.mcg(c))})
        return snap

    # -- a trial -------------------------------------------------------------------------
    def _validated(self, errors) -> list:
        """validate_errors, remembered for error strings already seen on this machine
        (a campaign repeats them; the parsed specs are immutable)."""
        key = tuple(errors) if isinstance(errors, (list, tuple)) and all(
            isinstance(e, str) for e in errors) else None
        hit = self._spec_cache.get(key) if key is not None else None
        if hit is None:
            hit = validate_errors(errors, self.n, self.topo.nbanks, self.domids, self.cfg.ser)
            if key is not None:
                if len(self._spec_cache) >= 4096:
                    self._spec_cache.clear()
                self._spec_cache[key] = hit
        return list(hit)

    def _reset_trial_state(self, gen: int) -> None:
        X, L = self.R.X, self.R.L
        X.store(L.trial_gen, gen)
        X.store(L.action_n, 0)
        offs = self._trial_words
        if offs is None:
            offs = self._trial_words = [
                L.pc(c, w) for c in range(self.n)
                for w in (L.P_LOGOUT_N, L.P_REACHED, L.P_T_ENTER, L.P_T_LOGOUT, L.P_T_EXIT,
                          L.P_T_SOFTIRQ, L.P_SIRQ_ROLE, L.P_T_BARRIER_A, L.P_T_FATAL,
                          L.P_T_MCIP, *range(L.P_ARRIVE, L.P_ARRIVE + len(ARRIVALS)))]
        store = X.store
        for off in offs:
            store(off, 0)

    def _machine_addrs(self, errs: list) -> list[int]:
        """Each error's machine address: a ``domain=`` address is that domain's
        guest-physical one, translated through its p2m (as ``xen-mceinj -d``). Every
        address is translated before any bank is written."""
        maddrs = []
        for e in errs:
            addr = e.addr
            if e.domain is not None:
                mfn = self.pages.gfn_to_mfn(e.domain, e.addr >> 12)
                if mfn is None:
                    raise UsageError("error.addr", f"{e.addr:#x} is not a guest-physical address "
                                     f"of domain {e.domain}")
                addr = mfn << 12 | (e.addr & 0xFFF)
            maddrs.append(addr)
        return maddrs

    def _inject(self, errs: list, local: bool, raise_cpu: int | None = None):
        """Write validated errors into their banks (mce-inject's HOLD), then compute
        who gets the #MC and with which MCG_STATUS. ``raise_cpu``: the CPU the #MC
        is raised on (default: the first error's); with no error, no bank is
        written at all."""
        maddrs = self._machine_addrs(errs)
        online = self._online()
        cpu0 = raise_cpu if raise_cpu is not None else errs[0].cpu
        if local and cpu0 not in online:   # refused before any bank is written
            raise UsageError("raise_cpu" if raise_cpu is not None else "error.cpu",
                             f"CPU {cpu0} is offline: an LMCE needs an online CPU (bring it "
                             "up with cpu_online)")
        written = [(e, addr, self.banks.hw_report(e.cpu, e.bank, e.status, addr, e.misc))
                   for e, addr in zip(errs, maddrs, strict=True)]
        # What the #MC's handler finds in each bank instance: the wave's last write
        # into it (a later error in the same bank merges with an earlier one).
        found = {self.topo.inst[e.cpu][e.bank]: w["status"] for e, _, w in written
                 if w["written"]}
        for e, _, w in written:
            w["found"] = found.get(self.topo.inst[e.cpu][e.bank], e.status)
        targets = [cpu0] if local or not self.cfg.mce_broadcast else online
        dflt = msr.MCG_STATUS_MCIP | msr.MCG_STATUS_RIPV
        mcg = {c: dflt for c in targets}
        seen = set()
        for e in errs:
            if e.cpu in mcg and e.cpu not in seen and e.mcg is not None:
                mcg[e.cpu] = e.mcg
            seen.add(e.cpu)
        if local:
            mcg = {c: v | msr.MCG_STATUS_LMCE for c, v in mcg.items()}
        return errs, written, targets, mcg

    def trial(self, errors: list[dict], local: bool = False, timeout_s: float | None = None,
              then: dict | None = None, schedule: dict | None = None, seed=None, chaos=None,
              starve=None, fault=None, raise_cpu=None, wait_dom0: bool = True) -> dict:
        """One trial. ``then`` = {"errors", "local", "after_phase"}: a second #MC
        raised once a first-wave target has reached ``after_phase``. ``seed``,
        ``chaos``, ``starve``, ``fault``, ``raise_cpu``, ``wait_dom0``: see
        :meth:`emu.machine.Machine.inject`."""
        X, L = self.R.X, self.R.L
        # Validate everything before anything runs.
        check_timeout("timeout_s", timeout_s)
        if then is not None and not isinstance(then, dict):
            raise UsageError("then", f"{then!r}: give a dict")
        if raise_cpu is not None and (isinstance(raise_cpu, bool) or not isinstance(
                raise_cpu, int) or not 0 <= raise_cpu < self.n):
            raise UsageError("raise_cpu", f"{raise_cpu!r}: give a CPU 0..{self.n - 1}")
        if not errors and raise_cpu is None:
            raise UsageError("error", "no error given; give at least one, or raise_cpu=N "
                             "to raise a #MC on CPU N without writing any bank")
        first = self._validated(errors) if errors else []
        self._check_cpus()
        vias = {e.via for e in first} | ({e.via for e in self._validated(then["errors"])}
                                         if then else set())
        if vias and vias != {"mce"}:
            if len(vias) > 1:
                raise UsageError("error.via", f"{', '.join(sorted(vias))}: one trial's errors "
                                 "arrive one way; give every error the same via")
            if local or then:
                raise UsageError("error.via", "--local and then= raise a #MC; with via=cmci "
                                 "or via=poll give neither")
            per_trial = [k for k, v in (("seed", seed), ("chaos", chaos), ("starve", starve),
                                        ("fault", fault), ("raise_cpu", raise_cpu))
                         if v is not None] + ([] if wait_dom0 else ["wait_dom0"])
            if per_trial:
                raise UsageError(per_trial[0], "per-trial perturbation, faults, raise_cpu and "
                                 "wait_dom0 apply to #MC trials; not with via=cmci or via=poll")
            if self.sched is not None and schedule is None:
                schedule = {"kind": "random", "seed": self.cfg.seed, "name": "random"}
            res = self._trial_irq(first, vias.pop(), timeout_s, schedule, errors)
            note_trial(self.log_dir, res)
            return res
        second = None
        if self.sched is None and schedule:
            raise UsageError("schedule", "this machine is not controlled: boot it with "
                             "sched='controlled' (--sched controlled)")
        if then:
            second = self._validated(then["errors"])
            if then.get("after_phase") not in PHASES:
                raise UsageError("then.after_phase", f"use one of {', '.join(PHASES)}")
        bound = timeout_s or self.cfg.watchdog_s
        chaos = float(self.cfg.chaos) if chaos is None else ch.validate_probability("chaos",
                                                                                     chaos)
        if starve is None:
            starve = float(self.cfg.starve) if chaos > 0 else 0.0
        else:
            starve = ch.validate_probability("starve", starve)
        if self.sched is not None and (chaos > 0 or starve > 0):
            raise UsageError("chaos" if chaos > 0 else "starve", "chaos perturbs the host's "
                             "scheduling; under controlled scheduling the strategy decides "
                             "every step: give chaos=0 and starve=0")
        fault = ch.validate_fault(fault, self.n, bound)
        tseed = ch.validate_seed(seed) if seed is not None else None
        self.trial_gen += 1
        gen = first_gen = self.trial_gen
        if tseed is None:
            tseed = (int(self.cfg.seed), gen)
        self._reset_trial_state(gen)
        self.handled.clear()
        self.delivered.clear()
        self.rung_late: list[int] = []
        if self.tev is not None:
            self._trace_reset()
        banks_before = None
        dom0_vseen = None
        if self.sched is not None:
            # Dom0 takes part in the schedule if it is idle when the trial starts (its
            # requests then depend on the schedule only); not with a fault (a Dom0 kill
            # or pause acts on the host's clock), nor with extra={"sched_dom0": False}.
            if fault is None and self.cfg.extra.get("sched_dom0", True) and \
                    self._dom0_quiesce(min(bound, 5.0)):
                dom0_vseen = self.virq_seen
            self._dom0_sched, self._dom0_steps = dom0_vseen is not None, 0
            if schedule and schedule.get("banks") is not None:
                self.sched.restore_banks(schedule["banks"])   # a replay: the recorded input
            banks_before = self.sched.bank_state()
        self._not_awaited = not wait_dom0
        plan = self._trial_control(gen, tseed, chaos, starve, fault, bound)
        fstate = self._fault_begin(fault)
        self._fault_active = fault is not None or bool(plan["starvation"].get("armed"))
        errs, written, targets, mcg = self._inject(first, local, raise_cpu)
        mcg_in = dict(mcg)
        fds = self._poll_fds()
        if self.sched is not None:
            # Under controlled, a second wave is a step the strategy picks (the raise),
            # enabled once a first-wave target has reached then["after_phase"].
            self.sched.start(targets, schedule or {"kind": "random", "seed": self.cfg.seed,
                                                   "name": "random"},
                             raise_phase_bit=1 << PHASES.index(then["after_phase"])
                             if then else 0, others=self._online() if then else None,
                             dom0_vseen=dom0_vseen)
        t_inject = time.monotonic_ns()
        # Latencies count from t0, the raise: MCG_STATUS is written (by the emulator,
        # where silicon takes no time) and the signal is about to go.
        sd, t0 = deliver_mc(self.banks, targets, mcg, self.cpu_pids, self.pgid)
        if self.tev is not None:
            self.tev.append([t0, "coordinator", "raise", {"targets": targets, "trial": gen,
                                                          "local": local}])
        # Straight to sleep: the signal woke CPUs on this core, and every microsecond
        # of Python here before the coordinator blocks is taken from their handler.
        ring_late_s = self._ring_late_s()
        ready = readable(fds, ring_late_s) if sd is None and not then else None
        wait_targets = {c: gen for c in targets}
        shutdown_wave, left = (1 if sd is not None else None), True
        second_wave = sd is None and then is not None
        if second_wave and self.sched is not None:
            second_wave = self._await_raise(timeout_s or self.cfg.watchdog_s)
        elif second_wave:
            bit = 1 << PHASES.index(then["after_phase"])
            # The watchdog's rule: give up on the phase only when the first wave made
            # no progress for the watchdog period (a slow wave on a loaded host still
            # gets its second #MC where it was asked for; seen: a fixed deadline raised
            # it while the first wave's CPUs were in the handler, a shutdown), or when
            # the wave ended without reaching it.
            wd, last_p, last_t = timeout_s or self.cfg.watchdog_s, self._progress(), \
                time.monotonic()
            while not any(X.load(L.pc(c, L.P_REACHED)) & bit for c in targets):
                if X.load(L.reset_req) != RESET_NONE or all(
                        X.load(L.pc(c, L.P_DONE_GEN)) >= gen for c in targets):
                    break
                p, now = self._progress(), time.monotonic()
                if p != last_p:
                    last_p, last_t = p, now
                elif now - last_t > wd:
                    # The first wave is stuck (the watchdog's rule): a hang. A second
                    # #MC raised into CPUs still inside their handler would turn it into
                    # a shutdown no model of the scenario predicts (seen once in 10^5
                    # trials: a CPU that had not entered for 0.25 s under two workers).
                    second_wave = False
                    break
                time.sleep(0.0005)
        if second_wave:
            self.trial_gen += 1
            gen = self.trial_gen
            X.store(L.trial_gen, gen)
            errs2, written2, targets2, mcg2 = self._inject(second, bool(then.get("local")))
            errs, written = errs + errs2, written + written2
            if self.sched is not None:
                self.sched.mark(targets2)     # they join at their handler's first step
            sd, _ = deliver_mc(self.banks, targets2, mcg2, self.cpu_pids, self.pgid)
            if self.sched is not None and sd is None:
                self._raised_controlled(targets2)
            if sd is not None:
                shutdown_wave = 2
                # Had that CPU left its #MC handler (phase "exit") with MCIP still set?
                left = bool(X.load(L.pc(sd, L.P_REACHED)) >> PH["exit"] & 1)
            mcg_in.update(mcg2)
            wait_targets.update({c: gen for c in targets2})
            targets = sorted(set(targets) | set(targets2))
        outcome, detail = ("shutdown", {"cpu": sd}) if sd is not None else \
            self._wait(wait_targets, timeout_s or self.cfg.watchdog_s, ready, t0 / 1e9,
                       ring_late_s)
        dom0_scheduled, self._dom0_sched = self._dom0_sched, False   # Dom0 goes on freely
        res = self._collect(first_gen, errs, written, targets, t0, outcome, detail, local)
        if self.tev is not None:
            self._trace_ring = self._read_trace_ring()   # before a reset wipes it
            self._trace_ring.update(t0=t0, trial=first_gen)
        res["rung_late"] = sorted(set(self.rung_late))
        res["waves"] = 2 if then and (second_wave or self.sched is None) else 1
        for c in res["cpus"]:
            if isinstance(c, dict):   # (a cpu_died result's "cpus" lists the dead ones)
                c["mcg_in"] = mcg_in.get(c["cpu"])
        if shutdown_wave is not None:
            # A #MC that finds MCIP set on a CPU no longer in its handler: the earlier
            # #MC's handler left MCIP set (the oracle's finding). Inside the handler
            # (a nested #MC before the MCIP clear) it is the SDM's rule, not a finding.
            res["shutdown"] = {"wave": shutdown_wave, "cpu": sd, "left_handler": left}
        if self.sched is not None:
            res["sched"] = self.sched.result()
            res["sched"]["banks_before"] = banks_before
            res["sched"]["dom0"] = {"scheduled": dom0_vseen is not None,
                                    "left": dom0_vseen is not None and not dom0_scheduled,
                                    "steps": self._dom0_steps}
        res["trial_seed"] = list(tseed)
        res["raise_cpu"] = raise_cpu
        res["arrivals"] = self._arrivals(self._words)
        perturb = self._cpu_perturbation(plan, tseed, chaos)   # before a reset wipes it
        # The ring's timing follows handler times that did not need it.
        if res["latency_us"]["handler_exit"] is not None and not self.rung_late:
            self._handler_us.append(res["latency_us"]["handler_exit"])
        res["t_inject_ns"] = t_inject
        res["latency_us"]["raise"] = round((t0 - t_inject) / 1e3, 1)
        wd = bound
        # Guests handle their vMCE after Xen's part is over; a host reset ends them.
        self._guest_results(res, t0, wd if outcome == "done" or res["outcome"] in (
            "recovered", "continued") else 0)
        res["lost_at_reset"] = []
        if outcome in ("reset", "shutdown", "hang", "cpu_died", "deadlock"):
            boot = self.warm_reset(f"trial {first_gen}: {res['outcome']}")
            res["resets"] = 1
            res["boot_log"] = boot["boot_log"]
            res["boot_ms"] = boot["boot_ms"]
            res["lost_at_reset"] = boot["lost_at_reset"]
            if wait_dom0:
                self._await_pause_fault()
                self._await_logged({b["record_id"] for b in res["boot_log"]
                                    if b["record_id"]}, wd)
            for b in res["boot_log"]:
                b["dom0_log"] = self._dom0_entry(b["record_id"], "boot", {}, wd)
        lost = {x["record_id"]: x["reason"] for x in res["lost_at_reset"]}
        rids = {r for e in res["errors"] for r in e["_rids"]}
        if wait_dom0:
            self._await_pause_fault()
            self._await_logged(rids - lost.keys(), wd)
            if dom0_vseen is not None and not res["resets"]:
                # Dom0 ends the drain it had under way in the trial: a BUG_ON its last
                # fetch hits belongs to this trial (and the next one starts from idle).
                self._dom0_quiesce(min(wd, 5.0))
        t_logged = [self.logged[r][1] for r in rids if r in self.logged]
        res["latency_us"]["dom0_logged"] = (round((max(t_logged) - t0) / 1e3, 1)
                                            if t_logged and len(t_logged) == len(rids) else None)
        for e in res["errors"]:
            e["dom0_log"] = [self._dom0_entry(r, "mce", lost, wd) for r in e.pop("_rids")]
            boot = [b["dom0_log"] for b in res["boot_log"]
                    if self.topo.inst[b["cpu"]][b["bank"]] == self.topo.inst[e["cpu"]][e["bank"]]]
            e["dom0_log"] += boot
            recs = e.pop("_recs")
            if e["written"] and not any(d["count"] or "pending" in d for d in e["dom0_log"]):
                e["lost"] = self._lost_reason(res, e, recs, lost)
        res["dom0_log_path"] = self.dom0_log_path
        res["dom0"] = {"restarts": self.dom0_restarts, "exits": list(self.dom0_exits),
                       "refused": self.refused, "log_failure": self.dom0_failure,
                       "replies_lost": self.replies_lost}
        res["perturbation"] = self._domain_perturbation(perturb, gen=first_gen)
        res["fault"] = self._fault_result(fault, fstate, res, detail, wait_dom0)
        if res["outcome"] == "hang":
            res["hang_expected"] = self._hang_expected(res["fault"])
        if self.xen_bug:
            # Xen's BUG_ON in the telemetry (a version's model of MCTE_TRANSITION_STATE),
            # hit while serving Dom0's fetch: the host crashed; reset it.
            res["xen_bug"], self.xen_bug = self.xen_bug, None
            if not res["resets"]:
                boot = self.warm_reset(f"trial {first_gen}: Xen BUG")
                res["resets"] = 1
                res["boot_log"] = boot["boot_log"]
                res["lost_at_reset"] = boot["lost_at_reset"]
        self._not_awaited = False
        res["hazards"] = self._hazards(res, local or bool(then and then.get("local")))
        if self.died_between:
            res["died_between_trials"], self.died_between = self.died_between, []
        res["violations"] = check_trial(res, self.topo)
        if self.sched is not None:
            controlled_record(res, self.cfg, errors, local, then)
        note_trial(self.log_dir, res)
        return res

    def clear_banks(self, banks) -> list[int]:
        """Write 0 to MCi_STATUS of each ``[cpu, bank]`` between trials (what a test
        harness does with wrmsr between cases); the bank instances cleared. Refused
        while a CPU is in a handler or its softirq (UsageError)."""
        if not isinstance(banks, list) or not all(
                isinstance(b, (list, tuple)) and len(b) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in b)
                for b in banks):
            raise UsageError("banks", f"{banks!r}: give a list of [cpu, bank] pairs")
        for c, b in banks:
            if not 0 <= c < self.n or not 0 <= b < self.topo.nbanks:
                raise UsageError("banks", f"[{c}, {b}]: CPUs are 0..{self.n - 1}, banks "
                                 f"0..{self.topo.nbanks - 1}")
        X, L = self.R.X, self.R.L
        busy = [c for c in range(self.n) if PHASES[X.load(L.pc(c, L.P_PHASE))] not in
                ("idle", "halted", "offline")]
        if busy:
            raise UsageError("banks", f"CPUs {busy} are not idle: clear banks between trials")
        done = set()
        for c, b in banks:
            self.banks.write(c, b, msr.REG_STATUS, 0)
            done.add(self.topo.inst[c][b])
        return sorted(done)

    def cpu_times(self) -> dict:
        """CPU seconds (user + system) used so far by this machine's processes, by
        role: ``coordinator``, ``cpus``, ``dom0``, ``guests`` (processes a warm reset or
        a restart replaced included: their time is taken when they are reaped)."""
        import resource
        ru = resource.getrusage(resource.RUSAGE_SELF)
        out = {"coordinator": ru.ru_utime + ru.ru_stime}
        for role in ("cpus", "dom0", "guests"):
            out[role] = REAPED_CPU.get(role, 0.0)
        out["cpus"] += sum(proc_cpu_s(p) for p in self.cpu_pids.values())
        if self.dom0 is not None:
            out["dom0"] += proc_cpu_s(self.dom0[0])
        out["guests"] += sum(proc_cpu_s(g[0]) for g in self.guests.values())
        return out

    def _await_raise(self, bound: float) -> bool:
        """Controlled, with a second wave: wait until the strategy picks the raise (the
        coordinator's turn), serving Dom0 meanwhile. False if the schedule ended
        first (a deadlock, or nothing moved for ``bound`` seconds): no second wave.
        After a panic the wave is raised all the same, as on the OS path."""
        X, L, sched = self.R.X, self.R.L, self.sched
        last, t_last = self._progress(), time.monotonic()
        while not sched.turn_is_raise():
            if X.load(L.reset_req) != RESET_NONE:
                return True
            if sched.over() == OVER_DEADLOCK:
                return False
            if sched.turn_is_dom0():
                self._dom0_step(bound)
                continue
            if self._poll(0.02, done=lambda: sched.turn_is_raise() or sched.turn_is_dom0()):
                return False             # a CPU died: _wait reports it
            p = self._progress()
            if p != last:
                last, t_last = p, time.monotonic()
            elif time.monotonic() - t_last > bound:
                return False
        return True

    def _raised_controlled(self, targets2: list[int]) -> None:
        """The second wave's #MC is out: wake the targets (idle or waiting for their
        turn), then, once each has arrived at its handler's first step, make the next
        choice (the coordinator holds the turn since the raise)."""
        HL, ev = self.R.HL, self.R.ev
        for c in targets2:
            ev.ring_doorbell(HL.doorbell(c), HL.sleep_reg(c))
        self.sched.ring(targets2)
        if self.R.X.load(self.R.L.reset_req) == RESET_NONE:
            self.sched.choose_and_hand()

    def _check_cpus(self) -> None:
        """Before an injection: has a CPU died since the last trial? (One waitid
        when none has; the serve loop usually noticed it already, through its pidfd.)"""
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        r = readable(list(self.pidfds.values()), 0)
        dead = [c for c, fd in self.pidfds.items() if fd in r]
        if dead:
            self._cpus_died_between(dead)

    def _cpus_died_between(self, dead: list[int]) -> None:
        """CPUs died between trials (outside any #MC): warm-reset now, so the next
        trial runs on a whole machine and is not blamed; the next trial's result
        reports it under ``died_between_trials`` with the trial it followed."""
        how = []
        for c in dead:
            ent = {"cpu": c, "exit": "unknown"}
            try:
                pid, st = reap_status(self.cpu_pids[c], os.WNOHANG, "cpus")
                if pid:
                    ent["exit"] = (f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st)
                                   else f"exit {os.WEXITSTATUS(st)}")
            except ChildProcessError:
                pass
            how.append(ent)
        after = self.trial_gen
        boot = self.warm_reset(f"CPUs {dead} died after trial {after}")
        self.died_between.append({"cpus": dead, "after_trial": after, "exits": how,
                                  "lost_at_reset": boot["lost_at_reset"],
                                  "boot_log": boot["boot_log"]})
        del self.died_between[:-16]

    # -- per-trial perturbation and faults (emu.machine.chaos) --------------------------
    def _trial_control(self, gen: int, tseed: tuple, chaos: float, starve: float,
                       fault: dict | None, bound: float) -> dict:
        """Draw the trial's starvation plan and tell the processes: the CPUs through
        the control block in Xen memory (read at #MC entry when ``ctl_gen`` moved),
        the domains through the control their notifications carry. A trial with
        nothing to perturb after one with nothing either costs nothing here."""
        X, L = self.R.X, self.R.L
        st = ch.starvation_plan(tseed[0], tseed[1], self._names, starve,
                                bound) if starve > 0 else {"p": starve, "armed": False}
        st["happened"] = False
        victim = st.get("victim") if st["armed"] else None
        perturb = chaos > 0 or victim is not None
        cpu_fault = fault is not None and fault["kind"] in ("kill_cpu", "stall_cpu")
        if perturb or cpu_fault or self._ctl_active:
            c, store = L.ctl, X.store
            store(c + 8 * xl.CTL_FLAGS, (xl.CTL_F_PERTURB if perturb else 0)
                  | (xl.CTL_F_FAULT if cpu_fault else 0))
            if perturb:
                store(c + 8 * xl.CTL_SEED, tseed[0])
                store(c + 8 * xl.CTL_TRIAL, tseed[1])
                store(c + 8 * xl.CTL_CHAOS, int.from_bytes(struct.pack("<d", chaos), "little"))
                vcpu = int(victim[3:]) + 1 if victim and victim.startswith("cpu") else 0
                store(c + 8 * xl.CTL_STARVE_CPU, vcpu)
                store(c + 8 * xl.CTL_STARVE_K, st["point"] + 1 if vcpu else 0)
                store(c + 8 * xl.CTL_STARVE_NS, int(st["s"] * 1e9) if vcpu else 0)
                for cpu in range(self.n):
                    store(L.pc(cpu, L.P_PERTURB), 0)
                    store(L.pc(cpu, L.P_STARVED), 0)
            if cpu_fault:
                store(c + 8 * xl.CTL_FAULT, xl.FAULT_KILL_CPU if fault["kind"] == "kill_cpu"
                      else xl.FAULT_STALL_CPU)
                store(c + 8 * xl.CTL_FAULT_CPU, fault["cpu"])
                store(c + 8 * xl.CTL_FAULT_PHASE, ch.PHASE_INDEX[fault["phase"]])
                store(c + 8 * xl.CTL_FAULT_NS, int(fault.get("s", 0) * 1e9))
            store(L.ctl_gen, gen)
            self._ctl_active = perturb or cpu_fault
        die = fault is not None and fault["kind"] == "kill_dom0"
        if perturb or die:
            base = {"gen": gen, "seed": list(tseed), "chaos": chaos}
            self._dom_ctl = {d: dict(base) for d in self.domids}
            if victim is not None and victim.startswith("dom"):
                self._dom_ctl[int(victim[3:])]["starve"] = [st["point"], st["s"]]
            if die:
                self._dom_ctl[0]["die"] = [fault["point"], fault["count"]]
            self._dom_armed = set(self.domids)
        elif self._dom_armed:
            self._dom_ctl = {d: {"gen": gen} for d in self._dom_armed}
        elif self._dom_ctl:
            self._dom_ctl = {}
        return {"starvation": st, "perturb": perturb}

    def _ctl_args(self, d: int) -> dict:
        """What a notification to domain ``d`` carries of the trial's control."""
        ctl = self._dom_ctl.get(d)
        if ctl is None:
            return {}
        if len(ctl) == 1:
            self._dom_armed.discard(d)   # told to stop perturbing
        return {"ctl": ctl}

    def _note_perturb(self, domid: int, rep) -> None:
        if isinstance(rep, dict) and isinstance(rep.get("gen"), int):
            self.dom_perturb[domid] = rep

    def _cpu_perturbation(self, plan: dict, tseed: tuple, chaos: float) -> dict:
        X, L = self.R.X, self.R.L
        st = plan["starvation"]
        counts, points = {}, {}
        for cpu in range(self.n):
            w = X.load(L.pc(cpu, L.P_PERTURB)) if plan["perturb"] else 0
            counts[f"cpu{cpu}"], points[f"cpu{cpu}"] = w >> 32, w & 0xFFFFFFFF
        v = st.get("victim") if st["armed"] else None
        if v is not None and v.startswith("cpu"):
            site = X.load(L.pc(int(v[3:]), L.P_STARVED))
            st["happened"] = site != 0
            st["site"] = SITES[site - 1] if 0 < site <= len(SITES) else None
        return {"seed": list(tseed), "chaos": chaos, "counts": counts, "points": points,
                "starvation": st, "_perturb": plan["perturb"]}

    def _domain_perturbation(self, p: dict, gen: int) -> dict:
        st = p["starvation"]
        active = p.pop("_perturb")
        for d in self.domids:
            rep = self.dom_perturb.get(d) if active else None
            ok = rep is not None and rep.get("gen") == gen
            p["counts"][f"dom{d}"] = int(rep.get("n") or 0) if ok else 0
            p["points"][f"dom{d}"] = int(rep.get("points") or 0) if ok else 0
            if st.get("armed") and st.get("victim") == f"dom{d}":
                st["happened"] = bool(ok and rep.get("starved"))
                st["site"] = rep.get("starved") if ok else None
        return p

    def _arrivals(self, words: list[list[int]] | None = None) -> dict:
        """Per rendezvous use, the CPUs in the order they arrived (entered it)."""
        L = self.R.L
        words = words or [self._pcpu(c) for c in range(self.n)]
        out = {}
        for k, name in enumerate(ARRIVALS):
            got = sorted((w[L.P_ARRIVE + k], c) for c, w in enumerate(words))
            out[name] = [c for v, c in got if v]
        return out

    def _fault_begin(self, fault: dict | None) -> dict:
        """What a fault needs before the raise: a pause_dom0 pauses Dom0 now (and
        :meth:`_poll` resumes it ``s`` later)."""
        st = {"restarts": self.dom0_restarts, "paused": False}
        if fault is not None and fault["kind"] == "pause_dom0" and not self.dom0_paused:
            self._dom0_pause()
            self._resume_at = time.monotonic() + fault["s"]
            st["paused"] = True
        return st

    def _fault_resume(self) -> None:
        self._resume_at = None
        self.dom0_paused = False
        self._notify_dom0("resume")   # Dom0 drains on resume

    def _await_pause_fault(self) -> None:
        """Wait out a pause_dom0 fault's pause (``_poll`` resumes Dom0 on time)."""
        while self._resume_at is not None:
            self._poll(max(0.0, self._resume_at - time.monotonic()))

    def _fault_result(self, fault, fst: dict, res: dict, detail: dict, waited: bool):
        """``{...spec, "expected", "happened", "held"}`` (see emu.machine.chaos);
        ``held``: the expected outcome held (None: not known, the fault did not happen
        or Dom0 was not waited for)."""
        if fault is None:
            return None
        out = dict(fault)
        kind, exp = fault["kind"], fault["expected"]
        if kind == "kill_cpu":
            happened = res["outcome"] == "cpu_died" and fault["cpu"] in detail.get("dead_cpus", ())
            held = True if happened else None
        elif kind == "stall_cpu":
            happened = fault["phase"] in res["cpus"][fault["cpu"]]["phases"]
            held = (res["outcome"] == "hang") == (exp == "hang") if happened else None
        else:
            happened = self.dom0_restarts > fst["restarts"] if kind == "kill_dom0" \
                else fst["paused"]
            ents = [d for e in res["errors"] for d in e["dom0_log"]] + \
                [b["dom0_log"] for b in res["boot_log"]]
            held = all(d["count"] == 1 for d in ents) if happened and waited else None
        out.update(happened=bool(happened), held=held)
        return out

    def _hang_expected(self, fault) -> bool:
        """Do the test hooks or the trial's fault alone explain a hang (a stall at
        least the watchdog, a killed CPU, a CPU that sleeps with #MC masked)?
        Otherwise the oracle reports it."""
        h, wd = self.hooks, self.cfg.watchdog_s
        stalls = [float(h.get("stall_s", 0.0))] if h.get("stall_phase") else []
        stalls += [float(st.get("s", 0.0)) for st in h.get("stalls") or ()]
        return bool(h.get("kill_phase") or h.get("sleep_masked_cpus")
                    or any(s >= wd for s in stalls)
                    or (fault and (fault.get("expected") == "hang"
                                   or fault.get("kind") == "kill_cpu")))

    @staticmethod
    def _lost_reason(res: dict, e: dict, recs: list, lost: dict) -> str:
        """Why an error has no record in Dom0's log. ``recs``: the record ids of the
        CPUs that logged it (0: that CPU's reservation failed)."""
        for rid in recs:
            if rid in lost:
                return lost[rid]
        if not e["owners"]:
            return f"no CPU logged it before the trial ended ({res['outcome']})"
        if not any(recs):
            what = ", so nothing to defer: no page offline, no vMCE" \
                if e["class"] in ("srao", "srar") else ""
            return ("telemetry pool exhausted: mctelem_reserve failed (a drop) and Xen made "
                    f"no record{what} (xen-mca.md §5.6)")
        if e["action"] == sev.mcer_name(sev.MCER_NOERROR):
            return "the deferred action found nothing to do (NOERROR): Xen dismissed the record"
        return "record reserved but never committed"

    def _note_origins(self, trial: int, logouts: dict) -> None:
        """Remember which trial, CPU and banks each record came from, so a record
        lost at a later reset can be named (pruned to what the pool still holds)."""
        for c, ents in logouts.items():
            for x in ents:
                if x["record_id"] and x["record_id"] not in self.logged:
                    o = self._rid_origin.setdefault(
                        x["record_id"], {"trial": trial, "cpu": c, "source": "mce", "banks": []})
                    o["banks"].append((x["bank"], x["status"]))
        if len(self._rid_origin) > 4 * NENT:
            held = {r["id"] for r in self.tele.in_use()}
            self._rid_origin = {k: v for k, v in self._rid_origin.items() if k in held}

    def _lost_at_reset(self, cause: str) -> list[dict]:
        """Records in Xen's telemetry pool that are not in Dom0's durable log when
        the reset wipes Xen memory: Xen loses them; report each, nothing silent."""
        held = self.tele.in_use()
        if any(h["id"] not in self.logged for h in held) or self._acked_unlogged:
            self._reconcile_logged()   # a killed Dom0 may have written more than it said
        out = []
        why = {"uncommitted": "reserved in #MC, not committed (its deferred action had not "
                              "completed)",
               "committed": ("committed, not yet fetched by Dom0"
                             + (" (Dom0 paused)" if self.dom0_paused else "")),
               "processing": "fetched by Dom0 but not yet in its log"}
        for h in sorted(held, key=lambda h: h["id"]):   # reservation order
            rid = h["id"]
            if self.logged.get(rid, [0])[0]:
                continue   # durable in Dom0's log: the pool copy does not matter
            o = self._rid_origin.get(rid)
            if o is None:
                rec = self.tele.read(h["slot"])
                o = {"trial": None, "cpu": h["cpu"],
                     "source": "boot" if rec.get("who") == 4 else "mce",
                     "banks": [(b[0], b[1]) for b in rec.get("b") or []]}
            reason = (f"{why[h['state']]} when the host reset ({cause}): the telemetry pool "
                      "is in Xen memory, which the reset wiped (as on real Xen)")
            for bank, status in o["banks"] or [(None, None)]:
                out.append({"trial": o["trial"], "cpu": o["cpu"], "bank": bank,
                            "status": msr.hexs(status) if status is not None else None,
                            "record_id": rid, "source": o["source"], "state": h["state"],
                            "telemetry_class": h["cls"], "reason": reason})
        self.lost_total += len({x["record_id"] for x in out})
        self._rid_origin.clear()
        self._acked_unlogged.clear()
        return out

    def _wait(self, wait_targets: dict[int, int], watchdog_s: float, ready=None,
              t_deliver: float | None = None, ring_late_s: float = RING_LATE_S):
        """Wait for the trial's end. ``ready``: the caller slept in select right after
        the delivery (for up to ``ring_late_s``), and this is what it returned."""
        X, L = self.R.X, self.R.L
        last_progress = self._progress()
        last_t = time.monotonic()
        ring_at = (t_deliver or last_t) + ring_late_s

        sched = self.sched
        # A hang is known before the watchdog when nobody can move: see _parked. Not
        # with faults, test hooks or controlled scheduling (its deadlock is exact).
        quiet_s = self.hang_quiet_s if sched is None and not self.hooks \
            and not self._fault_active else watchdog_s

        def done():
            return (all(X.load(L.pc(c, L.P_DONE_GEN)) >= g for c, g in wait_targets.items())
                    and (sched is None or sched.over() == OVER_DONE)
                    or X.load(L.reset_req) != RESET_NONE
                    or sched is not None and (sched.over() == OVER_DEADLOCK
                                              or sched.turn_is_dom0()))
        if ready is not None:
            dead = self._poll(0, ready=ready, done=done)
            if dead:
                return "cpu_died", {"dead_cpus": dead}
        while True:
            if X.load(L.reset_req) != RESET_NONE:
                raw = bytes(self.R.xen_map[L.panic_msg:L.panic_msg + PANIC_BYTES])
                return "reset", {"panic": raw.split(b"\0")[0].decode(errors="replace"),
                                 "cpu": X.load(L.reset_cpu)}
            k = self.vmce.slot(0)
            if k is not None and self.vmce.dget(k, 1) == 2:  # the hardware domain crashed
                return "reset", {"panic": "hardware domain crashed"}
            if sched is not None and sched.over() == OVER_DEADLOCK:
                return "deadlock", {"deadlock": sched.deadlock(
                    lambda c: PHASES[X.load(L.pc(c, L.P_PHASE))])}
            if all(X.load(L.pc(c, L.P_DONE_GEN)) >= g for c, g in wait_targets.items()) \
                    and (sched is None or sched.over() == OVER_DONE):
                return "done", {}
            if sched is not None and sched.turn_is_dom0():
                self._dom0_step(watchdog_s)
                last_progress, last_t = self._progress(), time.monotonic()
                continue
            now = time.monotonic()
            if ring_at is not None and now >= ring_at:
                ring_at = None
                self._ring_late(wait_targets)
            dead = self._poll(0.02 if ring_at is None else max(0.0, ring_at - now), done=done)
            if dead:
                return "cpu_died", {"dead_cpus": dead}
            p = self._progress()
            now = time.monotonic()
            if p != last_progress:
                last_progress, last_t = p, now
            elif now - last_t > watchdog_s:
                return "hang", {"snapshot": self._snapshot()}
            elif quiet_s < watchdog_s and now - last_t > quiet_s and ring_at is None \
                    and self._parked(wait_targets):
                return "hang", {"snapshot": self._snapshot(), "hang_detected": (
                    f"early: every CPU still in the trial asleep in a handler wait and no "
                    f"progress for {quiet_s:g} s (the watchdog is {watchdog_s:g} s)")}

    def _parked(self, wait_targets: dict[int, int]) -> bool:
        """Is every CPU the trial still waits for asleep on a channel in its #MC
        handler or softirq (not idle: an idle CPU with the #MC pending is the late
        ring's case)? Nobody else writes what they wait for (the coordinator does
        not, Dom0 and the guests cannot), so with no progress they wait forever: the
        hang of hazards C and D, known without waiting out the watchdog."""
        X, L, HW, HL = self.R.X, self.R.L, self.R.HW, self.R.HL
        left = [c for c, g in wait_targets.items() if X.load(L.pc(c, L.P_DONE_GEN)) < g]
        if not left:
            return False
        for c in left:
            if X.load(L.pc(c, L.P_PHASE)) in self._unparked_phases or \
                    not HW.load(HL.sleep_reg(c)) or X.load(L.pc(c, L.P_MC_GEN)) < \
                    wait_targets[c]:
                return False
        return True

    def _progress(self) -> int:
        """The watchdog's view: every CPU counts its own phase changes."""
        X, L = self.R.X, self.R.L
        return sum(X.load(L.pc(c, L.P_PROGRESS)) for c in range(self.n))

    def _ring_late_s(self) -> float:
        """When to ring the doorbells late: twice this machine's recent median handler
        time, and not before RING_LATE_S. Ringing means waking the coordinator, which
        then takes a core from the CPUs: at 16 CPUs a fixed 0.5 ms fell in the middle of
        the handler (seen: 50-90 µs of one core's time)."""
        h = self._handler_us
        if not h:
            return RING_LATE_S
        return min(RING_LATE_MAX_S, max(RING_LATE_S, 2e-6 * sorted(h)[len(h) // 2]))

    def _ring_late(self, wait_targets: dict[int, int]) -> None:
        """The rare #MC that lands between a CPU's last doorbell check and its futex
        system call leaves it asleep with the handler pending: wake the CPUs that
        have not entered yet. Done late, not at delivery, because at delivery the
        signal has already woken every sleeper and the wake-ups would only cost the
        machine (measured: 12 µs of the coordinator's core per 4-CPU #MC)."""
        X, L = self.R.X, self.R.L
        for c, g in wait_targets.items():
            if X.load(L.pc(c, L.P_MC_GEN)) < g and \
                    self.R.ev.ring_doorbell(self.R.HL.doorbell(c), self.R.HL.sleep_reg(c)):
                self.rung_late.append(c)
                if self.tev is not None:
                    self.tev.append([time.monotonic_ns(), "coordinator", "doorbell",
                                     {"cpu": c}])

    def _collect(self, gen, errs, written, targets, t0, outcome, detail, local) -> dict:
        L, topo = self.R.L, self.topo
        words = self._words = [self._pcpu(c) for c in range(self.n)]
        logouts = {c: [e for e in self._logouts(c, words[c]) if e["who"] == "MCA_MCE_SCAN"]
                   for c in range(self.n)}
        actions = self._actions()
        self._note_origins(gen, logouts)
        if outcome == "done":
            results = [a["result"] for a in actions]
            outcome = "continued" if sev.MCER_CONTINUE in results or not results else "recovered"
        by_inst: dict = {}
        for c in range(self.n):
            for x in logouts[c]:
                by_inst.setdefault(topo.inst[c][x["bank"]], []).append(x)
        acts_by: dict = {}
        for a in actions:
            acts_by.setdefault(topo.inst[a["cpu"]][a["bank"]], []).append(a)
        errors_out = []
        for e, maddr, w in written:
            inst = topo.inst[e.cpu][e.bank]
            logged = by_inst.get(inst, ())
            acts = acts_by.get(inst, ())
            cls = sev.intel_check_mce_type(e.status, self.cfg.ser)
            found = w.get("found", e.status)
            item = {"cpu": e.cpu, "bank": e.bank, "status": msr.hexs(e.status),
                    "addr": msr.hexs(maddr), "misc": msr.hexs(e.misc), "via": "mce",
                    "class": cls,
                    "written": w["written"], "kept": w["kept"],
                    "bank_status": msr.hexs(w.get("status", 0)),
                    "owners": sorted({x["cpu"] for x in logged}),
                    "cleared": any(x["cleared"] for x in logged),
                    "clearable": sev.intel_need_clearbank_scan(
                        sev.MCA_MCE_SCAN, found, self.cfg.ser),
                    "sharers": topo.sharers(e.cpu, e.bank),
                    "action": sev.mcer_name(acts[0]["result"]) if acts else None}
            item["recoverable"] = not found & msr.MCi_STATUS_UC or \
                sev.intel_recoverable_scan(found, self.cfg.ser)
            if acts:
                info = acts[0]["info"]
                if "mfn" in info:
                    item["page_offline"] = {"mfn": info["mfn"], "ret": info["offline_ret"],
                                            "status": info["offline"]}
                if "impacted_domain" in info:
                    item["impacted_domain"] = info["impacted_domain"]
                if "vmce" in info:
                    item["vmce"] = info["vmce"]
                if "note" in info:
                    item["note"] = info["note"]
            # Records Xen committed for this error (Dom0 should log each once):
            # deferred ones whose action was neither NOERROR (dismissed) nor RESET
            # (mc_panic before the commit), and corrected ones, committed at once.
            item["_rids"] = sorted({a["record_id"] for a in acts
                                    if a["result"] not in (sev.MCER_NOERROR, sev.MCER_RESET)}
                                   | {x["record_id"] for x in logged if x["record_id"]
                                      and not x["status"] & msr.MCi_STATUS_UC})
            item["_recs"] = sorted({x["record_id"] for x in logged})
            if 0 in item["_recs"]:   # mctelem_reserve failed on these CPUs (drops)
                item["no_record_cpus"] = sorted({x["cpu"] for x in logged if not x["record_id"]})
            errors_out.append(item)

        def lat(word):
            ts = [words[c][word] for c in targets]
            if not ts or any(t < t0 for t in ts):
                return None
            return round((max(ts) - t0) / 1e3, 1)
        stamp_words = (("entered", L.P_T_ENTER), ("logout_done", L.P_T_LOGOUT),
                       ("barrier_a", L.P_T_BARRIER_A), ("fatal_check_done", L.P_T_FATAL),
                       ("mcip_cleared", L.P_T_MCIP), ("handler_exit", L.P_T_EXIT),
                       ("softirq_done", L.P_T_SOFTIRQ))
        cpus = []
        for c in range(self.n):
            w = words[c]
            reached = w[L.P_REACHED]
            cpus.append({"cpu": c, "phases": [p for i, p in enumerate(PHASES) if reached >> i & 1],
                         "mcip_after": bool(self.banks.mcg(c) & msr.MCG_STATUS_MCIP),
                         "softirq_worker": bool(w[L.P_SIRQ_ROLE]),
                         "logged": len(logouts[c]),
                         "records": sum(1 for x in logouts[c] if x["record_id"]),
                         "guest_mode": w[L.P_CURRENT_DOM] != DOMID_IDLE,
                         "t_us": {name: round((w[k] - t0) / 1e3, 1) if w[k] >= t0 else None
                                  for name, k in stamp_words},
                         "idle_poll_us": round(w[L.P_IDLE_POLL] / 1e3, 1)})
        res = {"schema": SCHEMA, "trial": gen, "outcome": outcome, "resets": 0,
               "handler": self.cfg.handler, "seed": self.cfg.seed, "topology": self.cfg.topology,
               "local": local, "targets": targets, "vmce_policy": self.cfg.vmce_policy,
               "errors": errors_out, "boot_log": [],
               "cpus": cpus,
               "latency_us": {"all_entered": lat(L.P_T_ENTER), "logout_done": lat(L.P_T_LOGOUT),
                              "barrier_a": lat(L.P_T_BARRIER_A),
                              "fatal_check_done": lat(L.P_T_FATAL),
                              "mcip_cleared": lat(L.P_T_MCIP),
                              "handler_exit": lat(L.P_T_EXIT),
                              "softirq_done": lat(L.P_T_SOFTIRQ)},
               "telemetry": {"free": self.tele.free_count(), "drops": self.tele.drops()},
               "domains": self._domains()}
        res.update({k: v for k, v in detail.items()})
        return res

    # -- request loop -----------------------------------------------------------------------
    def serve(self) -> None:
        conn = self.conn
        while True:
            # Between requests, keep serving Dom0 (boot records, VIRQs), outside any
            # schedule (also after a trial that stopped on an error).
            self._dom0_sched = False
            fd = conn.fileno()
            # select, not Connection.poll: that builds a selector per call (5 µs here)
            watch = [fd] if self.parent_pidfd is None else [fd, self.parent_pidfd]
            while not readable(watch, 0):
                dead = self._poll(self._dom0_restart_in(1.0), extra=watch)
                if dead:
                    self._cpus_died_between(dead)
            if self.parent_pidfd is not None and readable([self.parent_pidfd], 0):
                return    # the front end's process is gone (see coordinator_process)
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return
            rid = None   # the request's id, echoed in its reply (Machine._call)
            try:
                msg = msgpack.unpackb(raw, strict_map_key=False)
                if not isinstance(msg, list) or len(msg) not in (3, 4):
                    raise UsageError("protocol", "a request is [version, command, args, id]")
                ver, cmd, args = msg[:3]
                rid = msg[3] if len(msg) == 4 else None
                if ver != PROTO:
                    raise UsageError("protocol", f"version {ver}, expected {PROTO}")
                if cmd == "quit":
                    conn.send_bytes(msgpack.packb([True, None]))
                    return
                reply = self.dispatch(cmd, args)
                out = [True, reply]
            except EmuError as exc:
                out = [False, {"type": type(exc).__name__, "field": getattr(exc, "field", None),
                               "message": str(exc)}]
            except Exception as exc:  # noqa: BLE001 - reported as an internal error
                out = [False, {"type": "EmulatorInternalError", "field": None,
                               "message": f"{type(exc).__name__}: {exc}\n"
                                          f"{traceback.format_exc()}"}]
            if rid is not None:
                out.append(rid)
            try:
                data = msgpack.packb(out)
            except (TypeError, ValueError, OverflowError) as exc:
                data = msgpack.packb([False, {"type": "EmulatorInternalError", "field": None,
                                              "message": f"reply not packable: {exc}"}, rid])
            conn.send_bytes(data)

    def dispatch(self, cmd: str, args: dict):
        if cmd == "boot":
            return self.power_on()
        if cmd == "trial":
            return self.trial(args["errors"], bool(args.get("local")), args.get("timeout_s"),
                              args.get("then"), args.get("schedule"), seed=args.get("seed"),
                              chaos=args.get("chaos"), starve=args.get("starve"),
                              fault=args.get("fault"), raise_cpu=args.get("raise_cpu"),
                              wait_dom0=bool(args.get("wait_dom0", True)))
        if cmd == "reset":
            return self.warm_reset()
        if cmd == "dom0":
            return self.dom0_command(args)
        if cmd == "snapshot":
            return {"cpus": self._snapshot(), "pids": self.cpu_pids,
                    "dom_pids": ({0: self.dom0[0]} if self.dom0 else {})
                    | {d: g[0] for d, g in self.guests.items()}}
        if cmd == "domains":
            self._poll(0)
            return self._domains()
        if cmd == "hooks":
            self.hooks.update(args)
            return None
        if cmd == "probe":
            return self._probe(args)
        if cmd == "poll":
            return self._trial_irq([], "poll", args.get("timeout_s"))
        if cmd == "cpu_offline":
            return self.cpu_offline(args.get("cpu"), args.get("errors") or [])
        if cmd == "cpu_online":
            return self.cpu_online(args.get("cpu"))
        if cmd == "ownership":
            return {"ownership": self._ownership(), "online": self._online()}
        if cmd == "trace":
            return self._trace_payload()
        if cmd == "cpu_times":
            return self.cpu_times()
        if cmd == "clear_banks":
            return self.clear_banks(args.get("banks"))
        if cmd == "banks":
            return [[self.banks.read(c, b, r) for r in range(5)] for c in range(self.n)
                    for b in range(self.topo.nbanks)]
        raise UsageError("command", f"unknown command {cmd!r}")


def _raise_nofile(need: int) -> None:
    """Raise the soft descriptor limit towards ``need`` (at most the hard limit): a
    1024-CPU machine holds over 1024 descriptors, a common default soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        want = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


def coordinator_process(conn, cfg: MachineConfig, parent_pid: int,
                        watch_parent: bool = False) -> None:
    """Body of the coordinator process (never returns).

    ``watch_parent``: forked from a thread other than the front end's main thread,
    whose exit would fire a parent-death signal though the front end lives on; the
    coordinator then watches a pidfd on the front end's process (readable when the
    whole process has exited) between requests instead."""
    code = 0
    co = None
    try:
        ppfd = None
        if watch_parent:
            ppfd = os.pidfd_open(parent_pid)
            if os.getppid() != parent_pid:
                os._exit(0)
        else:
            set_pdeathsig(parent_pid)
        child_signals()
        co = Coordinator(conn, cfg)
        co.parent_pidfd = ppfd
        co.serve()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 70
    finally:
        if co is not None:
            co.shutdown()
        os._exit(code)
