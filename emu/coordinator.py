"""The coordinator: machine lifecycle, reset controller, watchdog, trial results.

Modelled: power-on (banks zeroed), boot (Xen memory re-initialised, CPU processes
forked and brought up one at a time through boot-time logout), hardware injection
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
import resource
import select
import signal
import time
import traceback

import msgpack

from emu.errors import EmuError, EmulatorInternalError, UsageError
from emu.hw import msr
from emu.hw.banks import Banks
from emu.hw.cpu import child_signals, cpu_process, deliver_mc, fork_child, set_pdeathsig
from emu.hw.platform import ACTION_RING, LOGOUT_RING, MachineConfig, Regions
from emu.oracle import check_trial
from emu.scenario import validate_errors
from emu.xen import severity as sev
from emu.xen.mce import LOG_WORDS, PHASES, RESET_NONE, WHO_NAME
from emu.xen.mctelem import NENT, Mctelem
from emu.xen.page_alloc import PageTable
from emu.xen.versions import handler_class
from emu.xen.vmce import Vmce

PROTO = 1
SCHEMA = "emu.trial/1"
BOOT_TIMEOUT_S = 30.0
RING_LATE_S = 0.0005   # see Coordinator._ring_late
GUEST_SPIN_S = 0.0002  # see Coordinator._poll


def keep_only_fds(*keep: int) -> None:
    """In a forked domain process: close every inherited descriptor but stdio and
    ``keep`` (its own channel), so it cannot speak on Dom0's or another guest's
    channel, nor the front end's. Nothing in the child closes the stale objects
    later (it leaves with ``os._exit``)."""
    import io
    import sys
    lo = 3
    for fd in sorted(keep):
        os.closerange(lo, fd)
        lo = fd + 1
    os.closerange(lo, resource.getrlimit(resource.RLIMIT_NOFILE)[0])   # no fd is above it
    # sys.stdout/err may have been objects over other descriptors (pytest's capture
    # does that): speak to fds 1 and 2 themselves from now on.
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True)


class Coordinator:
    def __init__(self, conn, cfg: MachineConfig):
        self.conn = conn
        self.cfg = cfg
        self.R = Regions(cfg)
        self.topo = self.R.topo
        self.n = self.topo.ncpus
        self.banks = Banks(self.R)
        self.tele = Mctelem(self.R)
        self.pages = PageTable(self.R)
        self.vmce = Vmce(self.R)
        self.boots = 0
        self.trial_gen = 0
        self.cpu_pids: dict[int, int] = {}
        self.pidfds: dict[int, int] = {}
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
        # Dom0: the logger process and its channel (the hypercall and VIRQ path).
        import tempfile
        self.log_dir = cfg.extra.get("log_dir") or os.path.join(
            tempfile.gettempdir(), "emu-runs", time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
        os.makedirs(self.log_dir, exist_ok=True)
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
        self.virq_seen = 0
        self.logged: dict[int, list] = {}   # record id -> [count, t_logged_ns]
        self.refused = 0                    # forged or unprivileged hypercalls
        self.refused_by: dict[int, list] = {}   # domid -> refused privileged commands
        self.handled: list = []             # reports of guest #MC handlers
        self.last_ready: list = []

    # -- lifecycle --------------------------------------------------------------------
    def power_on(self) -> dict:
        self.R.power_off()
        self.banks.power_on(self.cfg.mcg_cap)
        return self.boot()

    def boot(self) -> dict:
        t0 = time.monotonic()
        R, X, L = self.R, self.R.X, self.R.L
        self.boots += 1
        R.reinit_xen()
        self.tele.init(self.boots)
        self.pages.init_default(self.domids)
        self.vmce.create(0, 0, hvm=False, nvcpus=min(2, self.n), hwdom=True)
        for k, d in enumerate(self.domids[1:], start=1):
            self.vmce.create(k, d, hvm=True, nvcpus=self.cfg.guest_vcpus, hwdom=False)
        X.store(L.trial_gen, self.trial_gen)
        handler_class(self.cfg.handler)   # import before forking, not in every CPU
        self.pgid = None
        for cpu in range(self.n):
            pid = fork_child(lambda: cpu_process(R, cpu, self.hooks, self.pgid or 0))
            # Both sides set the group, so it holds whichever runs first.
            try:
                os.setpgid(pid, self.pgid or pid)
            except (PermissionError, ProcessLookupError):
                pass
            self.pgid = self.pgid or pid
            self.cpu_pids[cpu] = pid
            self.pidfds[cpu] = os.pidfd_open(pid)
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
                "boot_ms": (time.monotonic() - t0) * 1e3, "boot_log": self.last_boot_log}

    # -- Dom0 ----------------------------------------------------------------------------
    def _fork_domain(self, main) -> tuple:
        """Fork a domain's process: it unmaps hardware and Xen memory, closes every
        descriptor but its channel, says ``ready``, then runs ``main(channel)``.
        Returns (pid, our end of the channel, pidfd)."""
        import multiprocess
        ours, theirs = multiprocess.Pipe(duplex=True)

        def body():
            self.R.drop_for_guest()
            keep_only_fds(theirs.fileno())
            theirs.send_bytes(msgpack.packb([PROTO, "ready", {}]))
            main(theirs)
        pid = fork_child(body)
        theirs.close()
        return pid, ours, os.pidfd_open(pid)

    def _start_dom0(self) -> None:
        """Fork Dom0's logger. Its channel is the only one that accepts privileged
        hypercalls."""
        from emu.dom0 import dom0_main
        hooks = dict(self.dom0_hooks, pause=self.dom0_paused)
        self.dom0 = self._fork_domain(
            lambda ch: dom0_main(ch, self.dom0_log_path, self.dom0_fsync, hooks))

    def _start_guest(self, d: int) -> None:
        """Fork guest domain ``d``'s kernel. The coordinator serves its channel as
        domain ``d``: the domid comes from the channel, never from the message."""
        from emu.guest import guest_main
        path = self.guest_log_path(d)
        hooks = dict(self.guest_hooks.get(d, {}))
        hooks.setdefault("reply_spin_s", self.guest_spin_s)
        self.guests[d] = self._fork_domain(lambda ch: guest_main(d, ch, path, hooks))
        self.guest_exits.pop(d, None)

    def guest_log_path(self, d: int) -> str:
        return os.path.join(self.log_dir, f"dom{d}.guest.jsonl")

    def _stop_guest(self, d: int, why: str) -> None:
        g = self.guests.pop(d, None)
        if g is None:
            return
        pid, conn, pidfd = g
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        conn.close()
        os.close(pidfd)
        self.guest_exits[d] = why

    def _stop_guests(self) -> None:
        for d in list(self.guests):
            self._stop_guest(d, "machine reset")

    def _stop_dom0(self) -> None:
        if self.dom0 is None:
            return
        pid, conn, pidfd = self.dom0
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        conn.close()
        os.close(pidfd)
        self.dom0 = None

    def _reconcile_logged(self) -> None:
        """A Dom0 that died after its write (or ack) never said ``logged``; its
        durable log is the truth, so recount from it (complete lines only)."""
        import json
        counts: dict[int, int] = {}
        try:
            with open(self.dom0_log_path, "rb") as f:
                for raw in f:
                    if raw.endswith(b"\n"):
                        try:
                            rid = int(json.loads(raw)["id"])
                        except (ValueError, KeyError, TypeError):
                            continue
                        counts[rid] = counts.get(rid, 0) + 1
        except FileNotFoundError:
            return
        now = time.monotonic_ns()
        for rid, n in counts.items():
            self.logged.setdefault(rid, [0, now])[0] = n
            self._acked_unlogged.discard(rid)
            self._rid_origin.pop(rid, None)

    def _last_boot_in_log(self) -> int:
        """Record ids are boot<<32 | seq, and Dom0 takes an id already in its log for
        one it wrote before a crash (acked, not written again). A machine appending
        to an existing log (a reused log_dir) so continues that log's boot numbering,
        or its records would be acked as logged and never written."""
        import json
        last = 0
        try:
            with open(self.dom0_log_path, "rb") as f:
                for raw in f:
                    try:
                        last = max(last, int(json.loads(raw)["id"]) >> 32)
                    except (ValueError, KeyError, TypeError):
                        continue
        except FileNotFoundError:
            pass
        return last

    def _dom0_fds(self) -> list:
        fds = [self.dom0[1].fileno(), self.dom0[2]] if self.dom0 else []
        for _, conn, pidfd in self.guests.values():
            fds += [conn.fileno(), pidfd]
        return fds

    def _service_guests(self, ready) -> None:
        """Serve guests' requests (as their own domain only); end the process of a
        crashed domain; a guest process that died on its own crashes its domain."""
        for d, (pid, conn, pidfd) in list(self.guests.items()):
            if pidfd in ready:
                self.vmce.domain_crash(d, 4)
                self._stop_guest(d, "process died")
                continue
            if not self.vmce.is_running(d):
                self._stop_guest(d, "domain crashed")
                continue
            self._serve_channel(conn, d, ready)

    def _serve_channel(self, conn, d: int, ready) -> None:
        """Serve what domain ``d`` has sent (see ``_poll`` for the short wait after).
        Readiness comes from select (``Connection.poll`` builds a selector per call:
        measured as the coordinator's largest cost while a guest handles a vMCE)."""
        fd = conn.fileno()
        if fd not in ready:
            return
        while True:
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return
            self._hypercall(conn, raw, d)
            self._served += 1
            if not select.select([fd], [], [], 0)[0]:
                return

    def _deliver_vmce(self) -> None:
        """Deliver pending vMCEs: HVM intack / PV bounce clears ``mce_pending``, and
        the domain's kernel takes the #MC (a message to its process)."""
        vc = self.R.X.load(self.R.L.vm.vmce_count)
        if vc == self.vmce_seen and not self._vmce_retry:
            return
        self.vmce_seen = vc
        self._vmce_retry = False
        for d in self.domids:
            if not self.vmce.pending_vcpus(d):
                continue
            conn = self.dom0[1] if d == 0 and self.dom0 else \
                self.guests[d][1] if d in self.guests else None
            if conn is None and d == 0 and self.vmce.is_running(0):
                self._vmce_retry = True   # Dom0's process is restarting: deliver later
                continue
            vcpus = [v for v in self.vmce.pending_vcpus(d) if self.vmce.ack_pending(d, v)]
            if conn is None or not vcpus or not self.vmce.is_running(d):
                continue
            try:
                conn.send_bytes(msgpack.packb([PROTO, "vmce", {"vcpus": vcpus}]))
            except OSError:
                continue
            self.delivered.append({"domid": d, "vcpus": vcpus, "t": time.monotonic_ns()})

    def _service(self, ready) -> None:
        """Serve Dom0's hypercalls; forward VIRQ_MCA; restart a dead Dom0."""
        if self.dom0 is None:
            return
        pid, conn, pidfd = self.dom0
        if pidfd in ready:
            # Dom0 died (e.g. SIGKILL mid-log): reap it and start it again; it
            # fetches from the head again, and its durable log dedups.
            conn.close()
            os.close(pidfd)
            how = "unknown"
            try:
                _, st = os.waitpid(pid, 0)
                how = (f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st)
                       else f"exit {os.WEXITSTATUS(st)}")
            except ChildProcessError:
                pass
            self.dom0 = None
            self.dom0_restarts += 1
            self.dom0_exits.append(how)
            self.dom0_hooks.pop("die_at", None)   # a fault hook fires once
            now = time.monotonic()
            self.dom0_deaths = [t for t in self.dom0_deaths if now - t < 1.0] + [now]
            if len(self.dom0_deaths) > 5:
                print("coordinator: Dom0 keeps dying; not restarting it", flush=True)
                return
            self._reconcile_logged()
            self._start_dom0()
            return
        self._serve_channel(conn, 0, ready)
        if self.dom0 is None:
            return
        vc = self.R.X.load(self.R.L.vm.virq_count)
        if vc != self.virq_seen:
            self.virq_seen = vc
            self._notify_dom0("virq")

    def _notify_dom0(self, name: str) -> bool:
        """Send a notification; False if Dom0 is not there to get it. One that died
        just now is reaped and restarted at the next poll (its pidfd says so), and a
        restarted Dom0 drains and knows whether it is paused anyway."""
        if self.dom0 is None:
            return False
        try:
            self.dom0[1].send_bytes(msgpack.packb([PROTO, name, {}]))
            return True
        except OSError:
            return False

    def _hypercall(self, conn, raw: bytes, domid: int = 0) -> None:
        """One request from domain ``domid``'s channel."""
        from emu.xen.mctelem import CLASS_NAMES
        try:
            ver, cmd, args = msgpack.unpackb(raw, strict_map_key=False)
            if ver != PROTO or not isinstance(args, dict):
                raise ValueError("bad message")
        except Exception:  # noqa: BLE001 - a malformed message is refused and counted
            self.refused += 1
            return
        if cmd == "ready":   # the process has dropped its view of the shared regions
            self.ready_doms.add(domid)
            return
        if cmd in ("handled", "probe_result"):
            pass
        elif domid != 0 and cmd in ("fetch", "ack", "logged", "paused"):
            # HYPERVISOR_mca is privileged (XSM): only the hardware domain may use it.
            self.refused += 1
            self.refused_by.setdefault(domid, []).append(cmd)
            if cmd in ("fetch", "ack"):
                conn.send_bytes(msgpack.packb([False, {"type": "EPERM",
                                                       "message": f"{cmd}: not privileged"}]))
            return
        if cmd in ("fetch", "ack"):
            cls = CLASS_NAMES.index(args.get("cls")) if args.get("cls") in CLASS_NAMES else None
            if cls is None:
                self.refused += 1
                conn.send_bytes(msgpack.packb([False, {"type": "EINVAL", "message": "cls"}]))
                return
            if cmd == "fetch":
                i = self.tele.consume_oldest_begin(cls)
                if i is None:
                    conn.send_bytes(msgpack.packb([True, None]))
                    return
                rec = self.tele.read(i)
                out = {"id": self.tele.record_id(i), "cls": CLASS_NAMES[cls],
                       "source": {1: "mce", 2: "poll", 3: "poll", 4: "boot"}.get(rec.get("who"), "mce"),
                       "record": rec}
                self.tele.consume_oldest_end(i)
                conn.send_bytes(msgpack.packb([True, out]))
            else:
                ok = self.tele.mctelem_ack(cls, int(args.get("id", 0)))
                if not ok:
                    self.refused += 1
                else:
                    self._acked_unlogged.add(int(args.get("id", 0)))
                conn.send_bytes(msgpack.packb([True, ok]))
        elif cmd == "logged":
            now = time.monotonic_ns()
            for rid in args.get("ids", []):
                ent = self.logged.setdefault(int(rid), [0, now])
                ent[0] += 1
                self._acked_unlogged.discard(int(rid))
                self._rid_origin.pop(int(rid), None)
        elif cmd == "paused":
            self._pause_acked = True
        elif cmd in ("rdmsr", "wrmsr"):
            from emu.xen.vmce import GeneralProtection
            try:
                if cmd == "rdmsr":
                    v = self.vmce.vmce_rdmsr(domid, int(args["vcpu"]), int(args["msr"]))
                else:
                    self.vmce.vmce_wrmsr(domid, int(args["vcpu"]), int(args["msr"]),
                                         int(args["value"]))
                    v = None
                conn.send_bytes(msgpack.packb([True, v]))
            except GeneralProtection as gp:
                conn.send_bytes(msgpack.packb([False, {"type": "GP", "message": str(gp)}]))
            except (KeyError, TypeError, ValueError):
                self.refused += 1
                conn.send_bytes(msgpack.packb([False, {"type": "EINVAL", "message": cmd}]))
        elif cmd == "handled":
            self.handled.append(dict(args, domid=domid, t=time.monotonic_ns()))
        elif cmd == "probe_result":
            self.probes[domid] = args
        else:
            self.refused += 1

    # -- Dom0 control (the front door's dom0_pause / dom0_resume / ...) ----------------
    DOM0_OPS = ("pause", "resume", "status", "drain")
    PAUSE_ACK_S = 10.0

    def dom0_command(self, args: dict) -> dict:
        op = args.get("op") if isinstance(args, dict) else None
        if op not in self.DOM0_OPS:
            raise UsageError("dom0.op", f"{op!r}: use one of {', '.join(self.DOM0_OPS)}")
        self._poll(0)   # a Dom0 death or message already pending counts in the answer
        if op == "pause":
            self._dom0_pause()
        elif op == "resume":
            self.dom0_paused = False
            self._notify_dom0("resume")   # Dom0 drains on resume: no VIRQ is lost
        elif op == "drain":
            t = args.get("timeout_s", 10.0)
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 3600:
                raise UsageError("dom0.timeout_s", f"{t!r}: give seconds, 0 < timeout_s <= 3600")
            if self.dom0_paused:
                raise UsageError("dom0", "Dom0 is paused and fetches nothing; resume it first")
            deadline = time.monotonic() + t
            while not self._dom0_drained() and time.monotonic() < deadline:
                self._poll(0.02)
        return self._dom0_status()

    def _dom0_pause(self) -> None:
        """Pause Dom0's logger and wait until it confirms: from then on it fetches
        nothing, so what stays in Xen's pool is deterministic."""
        self.dom0_paused = True
        self._pause_acked = False
        if not self._notify_dom0("pause"):
            return
        pid = self.dom0[0]
        deadline = time.monotonic() + self.PAUSE_ACK_S
        # A Dom0 that dies meanwhile is restarted paused: that is a pause too.
        while not self._pause_acked and self.dom0 is not None and self.dom0[0] == pid:
            if time.monotonic() > deadline:
                raise EmulatorInternalError(f"Dom0 did not confirm the pause in "
                                            f"{self.PAUSE_ACK_S} s")
            self._poll(0.02)

    def _dom0_drained(self) -> bool:
        """Everything Xen committed has been fetched, acked and reported logged."""
        return not self._acked_unlogged and not any(
            h["state"] in ("committed", "processing") for h in self.tele.in_use())

    def _dom0_status(self) -> dict:
        held = self.tele.in_use()
        by_state = {k: sorted(h["id"] for h in held if h["state"] == k)
                    for k in ("uncommitted", "committed", "processing")}
        return {"paused": self.dom0_paused, "pid": self.dom0[0] if self.dom0 else None,
                "restarts": self.dom0_restarts, "refused": self.refused,
                "logged": sum(1 for v in self.logged.values() if v[0] > 0),
                "logged_more_than_once": sorted(r for r, v in self.logged.items() if v[0] > 1),
                "drained": self._dom0_drained(), "lost_at_reset": self.lost_total,
                "pool": {"free": self.tele.free_count(), "drops": self.tele.drops(),
                         **by_state},
                "log_path": self.dom0_log_path}

    def _kill_cpus(self) -> None:
        for pid in self.cpu_pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.cpu_pids.values():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        for fd in self.pidfds.values():
            os.close(fd)
        self.cpu_pids.clear()
        self.pidfds.clear()

    def warm_reset(self, cause: str = "Machine.reset") -> dict:
        """Reset: every CPU restarts, Xen memory is lost, the banks are kept.
        The result's ``lost_at_reset`` lists the telemetry records the reset lost."""
        self._stop_guests()
        self._stop_dom0()
        self._kill_cpus()
        lost = self._lost_at_reset(cause)
        self.banks.warm_reset()
        boot = self.boot()
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
    def _poll(self, timeout: float, extra=()) -> list[int]:
        """Sleep until something happens (an event, a death, Dom0 or ``extra``
        readable); serve Dom0; return the CPUs that died."""
        fds = list(self.pidfds.values())
        r, _, _ = select.select(fds + [self.R.efd] + self._dom0_fds() + list(extra), [], [],
                                timeout)
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
        spin = self.guest_spin_s
        end = time.monotonic() + spin
        while self._served and time.monotonic() < end:
            self._served = 0
            rr, _, _ = select.select(self._dom0_fds(), [], [], 0)
            if not rr:
                os.sched_yield()
                self._served = 1
                continue
            self._service(rr)
            self._service_guests(rr)
            self._deliver_vmce()
            r = list(r) + rr
            end = time.monotonic() + spin
        self.last_ready = r
        return [c for c, fd in self.pidfds.items() if fd in r]

    def _logouts(self, cpu: int) -> list[dict]:
        X, L = self.R.X, self.R.L
        n = min(X.load(L.pc(cpu, L.P_LOGOUT_N)), LOGOUT_RING)
        out = []
        for k in range(n):
            base = L.pc(cpu, L.P_LOGOUT) + 8 * LOG_WORDS * k
            meta, status, addr, misc, gen, rid = (X.load(base + 8 * j) for j in range(LOG_WORDS))
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
            w, src, bank, status, r, rid, info = msgpack.unpackb(bytes(mv[base + 2:base + 2 + ln]),
                                                                 strict_map_key=False)
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
    def _reset_trial_state(self, gen: int) -> None:
        X, L = self.R.X, self.R.L
        X.store(L.trial_gen, gen)
        X.store(L.action_n, 0)
        for c in range(self.n):
            for w in (L.P_LOGOUT_N, L.P_REACHED, L.P_T_ENTER, L.P_T_LOGOUT, L.P_T_EXIT,
                      L.P_T_SOFTIRQ, L.P_SIRQ_ROLE, L.P_T_BARRIER_A):
                X.store(L.pc(c, w), 0)

    def _inject(self, errs: list, local: bool):
        """Write validated errors into their banks (mce-inject's HOLD), then compute
        who gets the #MC and with which MCG_STATUS."""
        maddrs = []
        for e in errs:   # translate every address before any bank is written
            addr = e.addr
            if e.domain is not None:
                mfn = self.pages.gfn_to_mfn(e.domain, e.addr >> 12)
                if mfn is None:
                    raise UsageError("error.addr", f"{e.addr:#x} is not a guest-physical address "
                                     f"of domain {e.domain}")
                addr = mfn << 12 | (e.addr & 0xFFF)
            maddrs.append(addr)
        written = [(e, addr, self.banks.hw_report(e.cpu, e.bank, e.status, addr, e.misc))
                   for e, addr in zip(errs, maddrs)]
        targets = [errs[0].cpu] if local or not self.cfg.mce_broadcast else list(range(self.n))
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
              then: dict | None = None) -> dict:
        """One trial. ``then`` = {"errors", "local", "after_phase"}: a second #MC
        raised once a first-wave target has reached ``after_phase``."""
        X, L = self.R.X, self.R.L
        # Validate everything before anything runs.
        first = validate_errors(errors, self.n, self.topo.nbanks, self.domids)
        second = None
        if then:
            second = validate_errors(then["errors"], self.n, self.topo.nbanks, self.domids)
            if then.get("after_phase") not in PHASES:
                raise UsageError("then.after_phase", f"use one of {', '.join(PHASES)}")
        self.trial_gen += 1
        gen = first_gen = self.trial_gen
        self._reset_trial_state(gen)
        self.handled.clear()
        self.delivered.clear()
        errs, written, targets, mcg = self._inject(first, local)
        t0 = time.monotonic_ns()
        sd = deliver_mc(self.R, self.banks, targets, mcg, self.cpu_pids, self.pgid, ring=False)
        wait_targets = {c: gen for c in targets}
        if sd is None and then:
            bit = 1 << PHASES.index(then["after_phase"])
            deadline = time.monotonic() + (timeout_s or self.cfg.watchdog_s)
            while not any(X.load(L.pc(c, L.P_REACHED)) & bit for c in targets):
                if time.monotonic() > deadline or X.load(L.reset_req) != RESET_NONE:
                    break
                time.sleep(0.0005)
            self.trial_gen += 1
            gen = self.trial_gen
            X.store(L.trial_gen, gen)
            errs2, written2, targets2, mcg2 = self._inject(second, bool(then.get("local")))
            errs, written = errs + errs2, written + written2
            sd = deliver_mc(self.R, self.banks, targets2, mcg2, self.cpu_pids, self.pgid,
                            ring=False)
            wait_targets.update({c: gen for c in targets2})
            targets = sorted(set(targets) | set(targets2))
        outcome, detail = ("shutdown", {"cpu": sd}) if sd is not None else \
            self._wait(wait_targets, timeout_s or self.cfg.watchdog_s)
        res = self._collect(first_gen, errs, written, targets, t0, outcome, detail, local)
        wd = timeout_s or self.cfg.watchdog_s
        # Guests handle their vMCE after Xen's part is over; a host reset ends them.
        self._guest_results(res, t0, wd if outcome == "done" or res["outcome"] in (
            "recovered", "continued") else 0)
        res["lost_at_reset"] = []
        if outcome in ("reset", "shutdown", "hang", "cpu_died"):
            boot = self.warm_reset(f"trial {first_gen}: {res['outcome']}")
            res["resets"] = 1
            res["boot_log"] = boot["boot_log"]
            res["boot_ms"] = boot["boot_ms"]
            res["lost_at_reset"] = boot["lost_at_reset"]
            self._await_logged({b["record_id"] for b in res["boot_log"]}, wd)
            for b in res["boot_log"]:
                b["dom0_log"] = self._dom0_entry(b["record_id"], "boot", {}, wd)
        lost = {x["record_id"]: x["reason"] for x in res["lost_at_reset"]}
        rids = {r for e in res["errors"] for r in e["_rids"]}
        self._await_logged(rids - lost.keys(), wd)
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
                       "refused": self.refused}
        res["violations"] = check_trial(res, self.topo)
        return res

    def _domain_alive(self, d: int) -> bool:
        up = self.dom0 is not None if d == 0 else d in self.guests
        return up and self.vmce.is_running(d)

    def _guest_results(self, res: dict, t0: int, timeout_s: float) -> None:
        """Wait (up to ``timeout_s``) for the kernels that got a vMCE in this trial to
        report their handler, then fill each error's ``vmce`` and the latency."""
        want = [e["vmce"] for e in res["errors"] if e.get("vmce")]

        def reports(v):
            return [h for h in self.handled
                    if h["domid"] == v["domain"] and h["t"] >= t0 and h.get("vcpu") in v["vcpus"]]

        def waiting():
            return any({h["vcpu"] for h in reports(v)} < set(v["vcpus"])
                       and self._domain_alive(v["domain"]) for v in want)
        deadline = time.monotonic() + timeout_s
        while want and waiting() and time.monotonic() < deadline:
            self._poll(0.02)
        t_done = []
        for v in want:
            rs = sorted(reports(v), key=lambda h: h["t"])
            if isinstance(v.get("gaddr"), int):
                v["gaddr"] = msr.hexs(v["gaddr"])
            v["delivered"] = sorted({c for dl in self.delivered if dl["domid"] == v["domain"]
                                     and dl["t"] >= t0 for c in dl["vcpus"]})
            v["guest_handled"] = bool(v["vcpus"]) and {h["vcpu"] for h in rs} >= set(v["vcpus"])
            # What the handler read on the vCPU that got the bank (vCPU0 on broadcast).
            first = next((h for h in rs if h["read"].get("bank") is not None), rs[0] if rs else None)
            v["guest_read"] = None if first is None else {
                "vcpu": first["vcpu"], "bank": first["read"].get("bank"),
                **{k: msr.hexs(first["read"].get(k) or 0)
                   for k in ("mcg_status", "status", "addr", "misc")}}
            v["guest_actions"] = [{"vcpu": h["vcpu"],
                                   "mcg_status": msr.hexs(h["read"].get("mcg_status") or 0),
                                   "banks": len(h.get("banks") or []),
                                   "poisoned_pfn": h.get("poisoned_pfn"),
                                   "killed": h.get("killed"), "cleared_mcip": h.get("cleared"),
                                   "gp": h.get("gp") or []} for h in rs]
            if v["guest_handled"]:
                t_done.append(rs[-1]["t"])
        res["latency_us"]["guest_handled"] = (round((max(t_done) - t0) / 1e3, 1)
                                              if want and len(t_done) == len(want) else None)
        res["domains"] = self._domains()

    def _probe(self, args: dict) -> dict:
        """Have guest ``domid``'s kernel make one access (see :func:`emu.guest._probe`)."""
        d = args.get("domid")
        if d not in self.guests:
            raise UsageError("domid", f"{d!r}: no running guest with that id; guests: "
                             f"{', '.join(map(str, sorted(self.guests))) or 'none'}")
        req = {k: v for k, v in args.items() if k != "domid"}
        self.probes.pop(d, None)
        self.guests[d][1].send_bytes(msgpack.packb([PROTO, "probe", req]))
        deadline = time.monotonic() + 10.0
        while d not in self.probes and d in self.guests and time.monotonic() < deadline:
            self._poll(0.02)
        if d not in self.probes:
            raise EmulatorInternalError(f"guest {d} did not answer the probe")
        out = self.probes.pop(d)
        out["refused"] = self.refused
        return out

    def _domains(self) -> list[dict]:
        out = self.vmce.domains()
        for d in out:
            up = self.dom0 is not None if d["domid"] == 0 else d["domid"] in self.guests
            d["process"] = "running" if up else "ended"
            if d["domid"] in self.guest_exits:
                d["process_end"] = self.guest_exits[d["domid"]]
            if d["domid"]:
                d["log"] = self.guest_log_path(d["domid"])
        return out

    def _await_logged(self, rids: set, timeout_s: float) -> None:
        # A paused (or given-up) Dom0 fetches nothing: waiting would only burn the
        # watchdog; those records are reported pending, not lost.
        if self.dom0_paused or self.dom0 is None:
            return
        deadline = time.monotonic() + timeout_s
        while any(r not in self.logged for r in rids) and time.monotonic() < deadline:
            self._poll(0.02)

    def _dom0_entry(self, rid: int, source: str, lost: dict, wd: float) -> dict:
        n = self.logged.get(rid, [0])[0]
        ent = {"id": rid, "count": n, "source": source}
        if n:
            return ent
        if rid in lost:
            ent["lost"] = lost[rid]
        elif self.dom0_paused:
            ent["pending"] = "Dom0 is paused: the record waits in Xen's telemetry pool"
        elif self.dom0 is None:
            ent["pending"] = ("Dom0 kept dying and is not restarted: the record waits in "
                              "Xen's telemetry pool")
        else:
            ent["pending"] = (f"not logged by Dom0 within {wd:g} s: the record waits in "
                              "Xen's telemetry pool")
        return ent

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

    def _wait(self, wait_targets: dict[int, int], watchdog_s: float):
        X, L = self.R.X, self.R.L
        last_progress = X.load(L.progress)
        last_t = time.monotonic()
        ring_at = last_t + RING_LATE_S
        while True:
            if X.load(L.reset_req) != RESET_NONE:
                raw = b"".join(X.load(L.panic_msg + 8 * j).to_bytes(8, "little") for j in range(8))
                return "reset", {"panic": raw.rstrip(b"\0").decode(errors="replace"),
                                 "cpu": X.load(L.reset_cpu)}
            k = self.vmce.slot(0)
            if k is not None and self.vmce.dget(k, 1) == 2:  # the hardware domain crashed
                return "reset", {"panic": "hardware domain crashed"}
            if all(X.load(L.pc(c, L.P_DONE_GEN)) >= g for c, g in wait_targets.items()):
                return "done", {}
            now = time.monotonic()
            if ring_at is not None and now >= ring_at:
                ring_at = None
                self._ring_late(wait_targets)
            dead = self._poll(0.02 if ring_at is None else max(0.0, ring_at - now))
            if dead:
                return "cpu_died", {"cpus": dead}
            p = X.load(L.progress)
            now = time.monotonic()
            if p != last_progress:
                last_progress, last_t = p, now
            elif now - last_t > watchdog_s:
                return "hang", {"snapshot": self._snapshot()}

    def _ring_late(self, wait_targets: dict[int, int]) -> None:
        """The rare #MC that lands between a CPU's last doorbell check and its futex
        system call leaves it asleep with the handler pending: wake the CPUs that
        have not entered yet. Done late, not at delivery, because at delivery the
        signal has already woken every sleeper and the wake-ups would only cost the
        machine (measured: 12 µs of the coordinator's core per 4-CPU #MC)."""
        X, L = self.R.X, self.R.L
        for c, g in wait_targets.items():
            if X.load(L.pc(c, L.P_MC_GEN)) < g:
                self.R.ev.ring_doorbell(L.pc(c, L.P_DOORBELL), L.pc(c, L.P_SLEEP_OFF))

    def _collect(self, gen, errs, written, targets, t0, outcome, detail, local) -> dict:
        X, L, topo = self.R.X, self.R.L, self.topo
        logouts = {c: [e for e in self._logouts(c) if e["who"] == "MCA_MCE_SCAN"]
                   for c in range(self.n)}
        actions = self._actions()
        self._note_origins(gen, logouts)
        if outcome == "done":
            results = [a["result"] for a in actions]
            outcome = "continued" if sev.MCER_CONTINUE in results or not results else "recovered"
        errors_out = []
        for e, maddr, w in written:
            inst = topo.inst[e.cpu][e.bank]
            logged = [x for c in range(self.n) for x in logouts[c]
                      if topo.inst[c][x["bank"]] == inst]
            acts = [a for a in actions if topo.inst[a["cpu"]][a["bank"]] == inst]
            cls = sev.intel_check_mce_type(e.status, self.cfg.ser)
            item = {"cpu": e.cpu, "bank": e.bank, "status": msr.hexs(e.status),
                    "addr": msr.hexs(maddr), "misc": msr.hexs(e.misc),
                    "class": cls,
                    "written": w["written"], "kept": w["kept"],
                    "bank_status": msr.hexs(w.get("status", 0)),
                    "owners": sorted({x["cpu"] for x in logged}),
                    "cleared": any(x["cleared"] for x in logged),
                    "clearable": sev.intel_need_clearbank_scan(
                        sev.MCA_MCE_SCAN, w.get("status", e.status), self.cfg.ser),
                    "sharers": topo.sharers(e.cpu, e.bank),
                    "action": sev.mcer_name(acts[0]["result"]) if acts else None}
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
            ts = [X.load(L.pc(c, word)) for c in targets]
            if not ts or any(t < t0 for t in ts):
                return None
            return round((max(ts) - t0) / 1e3, 1)
        cpus = []
        for c in range(self.n):
            reached = X.load(L.pc(c, L.P_REACHED))
            cpus.append({"cpu": c, "phases": [p for i, p in enumerate(PHASES) if reached >> i & 1],
                         "mcip_after": bool(self.banks.mcg(c) & msr.MCG_STATUS_MCIP),
                         "softirq_worker": bool(X.load(L.pc(c, L.P_SIRQ_ROLE)))})
        res = {"schema": SCHEMA, "trial": gen, "outcome": outcome, "resets": 0,
               "handler": self.cfg.handler, "seed": self.cfg.seed, "topology": self.cfg.topology,
               "local": local, "targets": targets, "vmce_policy": self.cfg.vmce_policy, "errors": errors_out, "boot_log": [],
               "cpus": cpus,
               "latency_us": {"all_entered": lat(L.P_T_ENTER), "logout_done": lat(L.P_T_LOGOUT),
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
            # Between requests, keep serving Dom0 (boot records, VIRQs).
            while not conn.poll(0):
                self._poll(1.0, extra=[conn.fileno()])
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return
            try:
                ver, cmd, args = msgpack.unpackb(raw, strict_map_key=False)
                if ver != PROTO:
                    raise UsageError("protocol", f"version {ver}, expected {PROTO}")
                if cmd == "quit":
                    conn.send_bytes(msgpack.packb([True, None]))
                    return
                reply = self.dispatch(cmd, args)
                conn.send_bytes(msgpack.packb([True, reply]))
            except EmuError as exc:
                conn.send_bytes(msgpack.packb([False, {"type": type(exc).__name__,
                                                       "field": getattr(exc, "field", None),
                                                       "message": str(exc)}]))
            except Exception as exc:  # noqa: BLE001 - reported as an internal error
                conn.send_bytes(msgpack.packb([False, {
                    "type": "EmulatorInternalError", "field": None,
                    "message": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}]))

    def dispatch(self, cmd: str, args: dict):
        if cmd == "boot":
            return self.power_on()
        if cmd == "trial":
            return self.trial(args["errors"], bool(args.get("local")), args.get("timeout_s"),
                              args.get("then"))
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
        if cmd == "banks":
            return [[self.banks.read(c, b, r) for r in range(5)] for c in range(self.n)
                    for b in range(self.topo.nbanks)]
        raise UsageError("command", f"unknown command {cmd!r}")


def coordinator_process(conn, cfg: MachineConfig, parent_pid: int) -> None:
    """Body of the coordinator process (never returns)."""
    code = 0
    co = None
    try:
        set_pdeathsig(parent_pid)
        child_signals()
        co = Coordinator(conn, cfg)
        co.serve()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        code = 70
    finally:
        if co is not None:
            co.shutdown()
        os._exit(code)
