"""Domain processes and their channels: Dom0's logger and the guests' kernels.

Modelled: what the hypervisor offers a domain. Each domain process (forked at boot,
with no view of hardware or Xen memory) has one channel, and the coordinator serves
it as that domain: the domid comes from the channel, never from a message. On it,
Dom0 alone makes the privileged ``HYPERVISOR_mca`` calls (fetch, ack); every domain
makes trapped MSR accesses (vmce.c's rules) and reports its #MC handler; VIRQ_MCA
and vMCE# go the other way as notifications. Also here: restarting a dead Dom0
(exactly-once logging from its durable file), Dom0 pause/resume, ending the process
of a crashed domain, and what the guests did in a trial.

Not modelled: event channels and grant tables as such; the xenstore toolstack.
"""
from __future__ import annotations

import os
import resource
import signal
import sys
import time

import msgpack

from emu.errors import EmulatorInternalError, UsageError
from emu.hw import msr
from emu.machine.config import check_log_rotation
from emu.machine.procs import fork_child, readable
from emu.xen.mctelem import MctelemBug

PROTO = 1
GUEST_SPIN_S = 0.0002  # see Coordinator._poll
DOM0_BACKOFF_MIN_S = 0.05  # a Dom0 that keeps dying is restarted after this, doubling...
DOM0_BACKOFF_MAX_S = 2.0   # ...up to this: never given up (it recovers with the disk)
LOGGED_KEEP = 4096         # record ids whose Dom0 counts the coordinator keeps


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


# CPU seconds (user + system) of the processes reaped so far, by role ("cpus",
# "dom0", "guests"): what `cpu_times` adds to the live ones (bench/stress.py).
REAPED_CPU: dict[str, float] = {}


def reap_status(pid: int, flags: int, role: str):
    """``os.wait4``: the (pid, status) of ``os.waitpid``, with the process's CPU time
    added to :data:`REAPED_CPU` under ``role``."""
    got, st, ru = os.wait4(pid, flags)
    if got:
        REAPED_CPU[role] = REAPED_CPU.get(role, 0.0) + ru.ru_utime + ru.ru_stime
    return got, st


def _reap(pid: int, conn, pidfd: int, role: str = "guests") -> str:
    """Kill (if still running) and reap a domain process, close its channel and
    pidfd; return how it ended. A zombie is still ours, so the kill cannot hit a
    recycled pid."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    how = "unknown"
    try:
        _, st = reap_status(pid, 0, role)
        how = f"signal {os.WTERMSIG(st)}" if os.WIFSIGNALED(st) else f"exit {os.WEXITSTATUS(st)}"
    except ChildProcessError:
        pass
    conn.close()
    os.close(pidfd)
    return how


def proc_cpu_s(pid: int) -> float:
    """A live process's CPU seconds (user + system) from /proc (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DomainChannels:
    """The domain side of :class:`emu.machine.coordinator.Coordinator` (a mixin: it uses the
    coordinator's regions, telemetry, vMCE table and ``_poll``)."""

    xen_bug: str | None = None   # a telemetry BUG_ON hit while serving Dom0 (see trial)
    # Controlled scheduling of Dom0 (see _dom0_step): its channel is served only in its
    # steps while _dom0_sched is on. Dom0 (told so at its start) sends ``idle {"seen"}``
    # before it sleeps, ``seen`` counting the virq/pause/resume notifications it has
    # handled; _dom0_notes counts those sent to it: equal, Dom0 makes no request until
    # the next one.
    _dom0_sched = False
    _dom0_notes = 0
    _dom0_idle_seen = -1
    _dom0_steps = 0

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
        from emu.domains.dom0 import dom0_main
        hooks = dict(self.dom0_hooks, pause=self.dom0_paused)
        if self.cfg.sched == "controlled":
            hooks["sched_idle"] = True
        self._dom0_notes, self._dom0_idle_seen = 0, -1
        rot = check_log_rotation(self.cfg.extra)
        self.dom0 = self._fork_domain(
            lambda ch: dom0_main(ch, self.dom0_log_path, self.dom0_fsync, hooks, **rot))

    def _start_guest(self, d: int) -> None:
        """Fork guest domain ``d``'s kernel. The coordinator serves its channel as
        domain ``d``: the domid comes from the channel, never from the message."""
        from emu.domains.guest import guest_main
        path = self.guest_log_path(d)
        hooks = dict(self.guest_hooks.get(d, {}))
        hooks.setdefault("reply_spin_s", self.guest_spin_s)
        self.guests[d] = self._fork_domain(lambda ch: guest_main(d, ch, path, hooks))
        self.guest_exits.pop(d, None)

    def guest_log_path(self, d: int) -> str:
        return os.path.join(self.log_dir, f"dom{d}.guest.jsonl")

    def _stop_guest(self, d: int, why: str) -> None:
        g = self.guests.pop(d, None)
        if g is not None:
            _reap(*g)
            self.guest_exits[d] = why

    def _stop_guests(self) -> None:
        for d in list(self.guests):
            self._stop_guest(d, "machine reset")

    def _stop_dom0(self) -> None:
        self._dom0_restart_at = None
        if self.dom0 is not None:
            _reap(*self.dom0, role="dom0")
            self.dom0 = None

    def _mark_logged(self, rid: int, n: int | None = None, now: int | None = None,
                     dup: bool = False) -> None:
        """Dom0 logged ``rid`` once more (or ``n`` times in all, from its durable log;
        ``dup``: it found it already there, so it counts once at least). Bounded: only
        the last LOGGED_KEEP ids are kept (a trial needs its own, a reset those still in
        Xen's pool: 30 at most); the totals stay exact."""
        ent = self.logged.get(rid)
        if ent is None:
            ent = self.logged[rid] = [0, now or time.monotonic_ns()]
            if len(self.logged) > 2 * LOGGED_KEEP:
                for old in list(self.logged)[:LOGGED_KEEP]:
                    del self.logged[old]
        before = ent[0]
        ent[0] = n if n is not None else max(ent[0], 1) if dup else ent[0] + 1
        if before == 0 and ent[0] > 0:
            self.logged_total += 1
        if ent[0] > 1:
            self.logged_multi.add(rid)
        self._acked_unlogged.discard(rid)
        self._rid_origin.pop(rid, None)

    def _log_file_counts(self) -> dict[int, int] | None:
        """Record id -> how many times it is in Dom0's durable log, its rotated parts
        included (complete lines only); None if there is no log yet. Reads every part
        (in bounded pieces, regular files only): for checks after a run, not for the
        restart path."""
        from emu.domains.dom0 import log_id_counts
        from emu.domains.logfiles import dom0_log_parts
        parts = [p for p in dom0_log_parts(self.dom0_log_path) if os.path.exists(p)]
        if not parts:
            return None
        counts: dict[int, int] = {}
        for part in parts:   # rotated parts too
            for rid, n in (log_id_counts(part) or {}).items():
                counts[rid] = counts.get(rid, 0) + n
        return counts

    def _recent_log_parts(self) -> list[str]:
        """The live log and its newest rotated part (a record written just before a
        rotation is at the end of that part): all the restart path reads."""
        from emu.domains.logfiles import rotated_parts
        return rotated_parts(self.dom0_log_path)[-1:] + [self.dom0_log_path]

    def _reconcile_logged(self) -> None:
        """A Dom0 that died after its write (or ack) never said ``logged``; its
        durable log is the truth, so recount from it (complete lines only)."""
        # Only the log's tail: a record Dom0 wrote and had not reported is one of the
        # last it wrote (Xen's pool holds 30), and the log may hold a million.
        from emu.domains.dom0 import tail_records
        counts: dict[int, int] = {}
        for part in self._recent_log_parts():
            for obj in tail_records(part):
                counts[obj["id"]] = counts.get(obj["id"], 0) + 1
        now = time.monotonic_ns()
        for rid, n in counts.items():
            if self.logged.get(rid, [0])[0] != n:
                self._mark_logged(rid, n, now)
            self._acked_unlogged.discard(rid)
            self._rid_origin.pop(rid, None)

    def _last_boot_in_log(self) -> int:
        """Record ids are boot<<32 | seq, and Dom0 takes an id already in its log for
        one it wrote before a crash (acked, not written again). A machine appending
        to an existing log (a reused log_dir) so continues that log's boot numbering,
        or its records would be acked as logged and never written."""
        from emu.domains.dom0 import last_boot
        return max(last_boot(p) for p in self._recent_log_parts())   # bounded

    def _dom0_fds(self) -> list:
        # (Dom0's channel is read only in its steps while it is scheduled)
        fds = ([self.dom0[2]] if self._dom0_sched else [self.dom0[1].fileno(), self.dom0[2]]) \
            if self.dom0 else []
        for _, conn, pidfd in self.guests.values():
            fds += [conn.fileno(), pidfd]
        return fds

    def _service_guests(self, ready) -> None:
        """Serve guests' requests (as their own domain only); end the process of a
        crashed domain; a guest process that died on its own crashes its domain."""
        for d, (_pid, conn, pidfd) in list(self.guests.items()):
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
            try:
                self._hypercall(conn, raw, d)
            except (BrokenPipeError, ConnectionResetError):
                # The domain died after its request (a dead Dom0's last words): nobody
                # takes the reply; its death is handled through its pidfd, as when it
                # dies after taking a reply.
                self.replies_lost += 1
                return
            self._served += 1
            if not readable([fd], 0):
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
            pending = self.vmce.pending_vcpus(d)
            if not pending:
                continue
            conn = self.dom0[1] if d == 0 and self.dom0 else \
                self.guests[d][1] if d in self.guests else None
            if conn is None and d == 0 and self.vmce.is_running(0):
                self._vmce_retry = True   # Dom0's process is restarting: deliver later
                continue
            vcpus = [v for v in pending if self.vmce.ack_pending(d, v)]
            if conn is None or not vcpus or not self.vmce.is_running(d):
                continue
            try:
                conn.send_bytes(msgpack.packb([PROTO, "vmce", {"vcpus": vcpus,
                                                               **self._ctl_args(d)}]))
            except OSError:
                continue
            self.delivered.append({"domid": d, "vcpus": vcpus, "t": time.monotonic_ns()})
            if self.tev is not None:
                self.tev.append([self.delivered[-1]["t"], f"dom{d}", "vmce", {"vcpus": vcpus}])

    def _dom0_restart_due(self) -> None:
        at = self._dom0_restart_at
        if at is not None and time.monotonic() >= at:
            self._dom0_restart_at = None
            self._reconcile_logged()
            self._start_dom0()

    def _dom0_restart_in(self, cap: float) -> float:
        """Seconds until a pending Dom0 restart (at most ``cap``): how long to sleep."""
        at = self._dom0_restart_at
        return cap if at is None else max(0.0, min(cap, at - time.monotonic()))

    def _service(self, ready) -> None:
        """Serve Dom0's hypercalls; forward VIRQ_MCA; restart a dead Dom0."""
        if self.dom0 is None:
            self._dom0_restart_due()
            return
        pid, conn, pidfd = self.dom0
        if self._dom0_sched:
            if pidfd not in ready:
                return    # served in its steps (_dom0_step), VIRQs forwarded there
            self._dom0_sched = False
            self.sched.dom0_off()
        if pidfd in ready:
            # Dom0 died (e.g. SIGKILL mid-log): reap it and start it again; it
            # fetches from the head again, and its durable log dedups.
            if conn.fileno() in ready:
                self._serve_channel(conn, 0, ready)   # its last words (log_failed)
            how = _reap(pid, conn, pidfd, role="dom0")
            self.dom0 = None
            self.dom0_restarts += 1
            self.dom0_exits.append(how)
            del self.dom0_exits[:-64]
            self.dom0_hooks.pop("die_at", None)   # a fault hook fires once
            if self._dom_ctl.get(0):
                self._dom_ctl[0].pop("die", None)   # so does a trial's kill_dom0
            now = time.monotonic()
            self.dom0_deaths = [t for t in self.dom0_deaths if now - t < 1.0] + [now]
            if len(self.dom0_deaths) > 5 or self.dom0_failure is not None:
                # Keeps dying: restart it with a back-off, never give up (a full disk
                # gets space back; a stopped logger would leave the pool full for good).
                self._dom0_backoff = min(DOM0_BACKOFF_MAX_S,
                                         max(DOM0_BACKOFF_MIN_S, 2 * self._dom0_backoff))
                if not self._dom0_warned:
                    self._dom0_warned = True
                    f = self.dom0_failure
                    why = f" ({f['path']}: {f['errno']}, {f['message']})" if f else ""
                    print(f"coordinator: Dom0 keeps dying ({how}){why}; restarting it with "
                          f"a back-off of up to {DOM0_BACKOFF_MAX_S:g} s",
                          file=sys.stderr, flush=True)
            else:
                self._dom0_backoff = 0.0
            self._dom0_restart_at = now + self._dom0_backoff
        if self.dom0 is None:
            self._dom0_restart_due()
            return
        self._serve_channel(conn, 0, ready)
        if self.dom0 is None:
            return
        vc = self.R.X.load(self.R.L.vm.virq_count)
        if vc != self.virq_seen:
            self.virq_seen = vc
            if self.tev is not None:
                self.tev.append([time.monotonic_ns(), "coordinator", "virq", {"to": 0}])
            self._notify_dom0("virq")

    def _notify_dom0(self, name: str) -> bool:
        """Send a notification; False if Dom0 is not there to get it. One that died
        just now is reaped and restarted at the next poll (its pidfd says so), and a
        restarted Dom0 drains and knows whether it is paused anyway."""
        if self.dom0 is None:
            return False
        try:
            self.dom0[1].send_bytes(msgpack.packb([PROTO, name, self._ctl_args(0)]))
        except OSError:
            return False
        if name in ("virq", "pause", "resume"):
            self._dom0_notes += 1
        return True

    # -- Dom0 under controlled scheduling ---------------------------------------------
    def _dom0_idle(self) -> bool:
        return self._dom0_idle_seen == self._dom0_notes

    def _dom0_quiesce(self, timeout_s: float) -> bool:
        """Serve Dom0 (outside any schedule) until it is idle: told of every VIRQ, and
        asleep after handling every notification. A scheduled trial starts from there,
        so Dom0's requests in it depend on the schedule only. False if Dom0 is paused,
        failing, gone or not idle within ``timeout_s``."""
        X, L = self.R.X, self.R.L
        deadline = time.monotonic() + timeout_s

        def idle():
            return self._dom0_idle() and X.load(L.vm.virq_count) == self.virq_seen
        while True:
            if self.dom0 is None or self.dom0_paused or self.dom0_failure is not None:
                return False
            if idle():
                return True
            if time.monotonic() > deadline:
                return False
            self._poll(0.02, done=idle)

    def _dom0_step(self, bound_s: float) -> None:
        """Controlled, Dom0's turn (the strategy picked it; the coordinator holds the
        turn): tell Dom0 of a VIRQ raised since its last step, then serve exactly one
        of its telemetry requests (a fetch or an ack, on the shared pool), or learn
        that it went idle; its other messages (``logged``, a vMCE handler's MSR
        accesses) are served on the way. Then make the next choice. Dom0's own work
        between two requests (writing its log, the fsync) touches nothing the CPUs
        see, so where it falls does not matter."""
        X, L = self.R.X, self.R.L
        vc = X.load(L.vm.virq_count)
        if vc != self.virq_seen:
            self.virq_seen = vc
            if self.tev is not None:
                self.tev.append([time.monotonic_ns(), "coordinator", "virq", {"to": 0}])
            self._notify_dom0("virq")
        busy = self._dom0_next_request(bound_s)
        self._dom0_steps += 1
        self.sched.dom0_state(bool(busy), self.virq_seen)
        if busy is None:
            # Died or silent: it leaves the schedule (and is served as on the host).
            self.sched.dom0_off()
            self._dom0_sched = False
        self.sched.choose_and_hand(after_dom0=True)

    def _dom0_next_request(self, bound_s: float) -> bool | None:
        """Wait for Dom0's next telemetry request and serve it (True), or for its idle
        mark once it has handled every notification sent (False). None: Dom0 died or
        sent neither within ``bound_s``."""
        if self.dom0 is None:
            return None
        _pid, conn, pidfd = self.dom0
        fd = conn.fileno()
        deadline = time.monotonic() + bound_s
        while True:
            r = readable([fd, pidfd], max(0.0, deadline - time.monotonic()))
            if fd not in r:
                if pidfd in r or time.monotonic() >= deadline:
                    return None
                continue
            try:
                raw = conn.recv_bytes()
            except (EOFError, OSError):
                return None
            try:
                cmd = msgpack.unpackb(raw, strict_map_key=False)[1]
            except Exception:  # noqa: BLE001 - _hypercall refuses and counts it
                cmd = None
            try:
                self._hypercall(conn, raw, 0)
            except (BrokenPipeError, ConnectionResetError):
                self.replies_lost += 1    # Dom0 died after its request (see _serve_channel)
                return None
            if cmd in ("fetch", "ack"):
                return True
            if cmd == "idle" and self._dom0_idle():
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
        if cmd in ("handled", "probe_result", "perturbed"):
            pass
        elif domid != 0 and cmd in ("fetch", "ack", "logged", "paused", "log_failed",
                                    "idle"):
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
                try:
                    i = self.tele.consume_oldest_begin(cls)
                except MctelemBug as exc:   # Xen's BUG_ON: the host crashed (the trial says)
                    self.xen_bug = self.xen_bug or str(exc)
                    i = None
                if i is None:
                    conn.send_bytes(msgpack.packb([True, None]))
                    return
                rec = self.tele.read(i)
                if self.tev is not None:
                    self.tev.append([time.monotonic_ns(), "dom0", "fetch",
                                     {"id": self.tele.record_id(i), "cls": CLASS_NAMES[cls]}])
                out = {"id": self.tele.record_id(i), "cls": CLASS_NAMES[cls],
                       "source": {1: "mce", 2: "poll", 3: "cmci", 4: "boot"}.get(rec.get("who"),
                                                                                 "mce"),
                       "record": rec}
                self.tele.consume_oldest_end(i)
                conn.send_bytes(msgpack.packb([True, out]))
            else:
                ok = self.tele.mctelem_ack(cls, int(args.get("id", 0)))
                if self.tev is not None:
                    self.tev.append([time.monotonic_ns(), "dom0", "ack",
                                     {"id": int(args.get("id", 0)), "ok": bool(ok)}])
                if not ok:
                    self.refused += 1
                else:
                    self._acked_unlogged.add(int(args.get("id", 0)))
                conn.send_bytes(msgpack.packb([True, ok]))
        elif cmd == "logged":
            if "yp" in args:
                self._note_perturb(0, args["yp"])
            now = time.monotonic_ns()
            dup = bool(args.get("dup"))
            if self.tev is not None:
                self.tev.append([now, "dom0", "write", {"ids": list(args.get("ids", []))}])
            for rid in args.get("ids", []):
                self._mark_logged(int(rid), None, now, dup=dup)
            if self.dom0_failure is not None:
                print(f"coordinator: Dom0 writes its log again ({self.dom0_failure['path']})",
                      file=sys.stderr, flush=True)
                self.dom0_failure = None
            self._dom0_backoff = 0.0
            self._dom0_warned = False
        elif cmd == "log_failed":
            f = {k: str(args.get(k))[:300] for k in ("errno", "path", "message")}
            if self.dom0_failure is None:
                print(f"coordinator: Dom0 cannot write its log: {f['path']}: {f['errno']} "
                      f"({f['message']}); records wait in Xen's telemetry pool",
                      file=sys.stderr, flush=True)
            self.dom0_failure = dict(f, trial=self.trial_gen)
        elif cmd == "paused":
            self._pause_acked = True
        elif cmd == "idle":
            seen = args.get("seen")
            self._dom0_idle_seen = seen if isinstance(seen, int) else -1
        elif cmd in ("rdmsr", "wrmsr"):
            from emu.xen.vmce import GeneralProtection
            try:
                if cmd == "rdmsr":
                    v = self.vmce.vmce_rdmsr(domid, int(args["vcpu"]), int(args["msr"]))
                else:
                    self.vmce.vmce_wrmsr(domid, int(args["vcpu"]), int(args["msr"]),
                                         int(args["value"]))
                    v = None
                if self.tev is not None:
                    self.tev.append([time.monotonic_ns(), f"dom{domid}", cmd,
                                     {"vcpu": int(args["vcpu"]), "msr": int(args["msr"]),
                                      "value": v if cmd == "rdmsr" else int(args["value"])}])
                conn.send_bytes(msgpack.packb([True, v]))
            except GeneralProtection as gp:
                conn.send_bytes(msgpack.packb([False, {"type": "GP", "message": str(gp)}]))
            except (KeyError, TypeError, ValueError):
                self.refused += 1
                conn.send_bytes(msgpack.packb([False, {"type": "EINVAL", "message": cmd}]))
        elif cmd == "handled":
            if "yp" in args:
                self._note_perturb(domid, args["yp"])
            self.handled.append(dict(args, domid=domid, t=time.monotonic_ns()))
            if self.tev is not None:
                self.tev.append([self.handled[-1]["t"], f"dom{domid}", "handled",
                                 {"vcpu": args.get("vcpu"), "killed": args.get("killed")}])
        elif cmd == "perturbed":   # a domain's own counts for the trial (any domain)
            self._note_perturb(domid, args)
        elif cmd == "probe_result":
            self.probes[domid] = args
        else:
            self.refused += 1

    # -- Dom0 control (the front door's dom0_pause / dom0_resume / ...) ----------------
    DOM0_OPS = ("pause", "resume", "status", "drain", "log_counts")
    PAUSE_ACK_S = 10.0

    def dom0_command(self, args: dict) -> dict:
        op = args.get("op") if isinstance(args, dict) else None
        if op not in self.DOM0_OPS:
            raise UsageError("dom0.op", f"{op!r}: use one of {', '.join(self.DOM0_OPS)}")
        self._poll(0)   # a Dom0 death or message already pending counts in the answer
        if op == "log_counts":
            return self._log_file_counts() or {}
        if op == "pause":
            self._resume_at = None   # the operator's pause outlasts a pause_dom0 fault's
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
                self._poll(0.02, done=self._dom0_drained)
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
                "logged": self.logged_total,
                "logged_more_than_once": sorted(self.logged_multi),
                "log_failure": self.dom0_failure,
                "drained": self._dom0_drained(), "lost_at_reset": self.lost_total,
                "pool": {"free": self.tele.free_count(), "drops": self.tele.drops(),
                         **by_state},
                "log_path": self.dom0_log_path}

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
            self._poll(0.02, done=lambda: not waiting())
        t_done = []
        for v in want:
            rs = sorted(reports(v), key=lambda h: h["t"])
            if isinstance(v.get("gaddr"), int):
                v["gaddr"] = msr.hexs(v["gaddr"])
            v["delivered"] = sorted({c for dl in self.delivered if dl["domid"] == v["domain"]
                                     and dl["t"] >= t0 for c in dl["vcpus"]})
            v["guest_handled"] = bool(v["vcpus"]) and {h["vcpu"] for h in rs} >= set(v["vcpus"])
            # What the handler read on the vCPU that got the bank (vCPU0 on broadcast).
            first = next((h for h in rs if h["read"].get("bank") is not None),
                         rs[0] if rs else None)
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
        """Have guest ``domid``'s kernel make one access (see :func:`emu.domains.guest._probe`)."""
        d = args.get("domid")
        if d not in self.guests:
            raise UsageError("domid", f"{d!r}: no running guest with that id; guests: "
                             f"{', '.join(map(str, sorted(self.guests))) or 'none'}")
        req = {k: v for k, v in args.items() if k != "domid"}
        self.probes.pop(d, None)
        self.guests[d][1].send_bytes(msgpack.packb([PROTO, "probe", req]))
        deadline = time.monotonic() + 10.0
        while d not in self.probes and d in self.guests and time.monotonic() < deadline:
            self._poll(0.02, done=lambda: d in self.probes)
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
        if self.dom0_paused or self.dom0_failure is not None or \
                (self.dom0 is None and self._dom0_restart_at is None):
            return
        deadline = time.monotonic() + timeout_s

        def done():
            return all(r in self.logged for r in rids)
        while not done() and time.monotonic() < deadline:
            self._poll(0.02, done=done)

    def _dom0_entry(self, rid: int, source: str, lost: dict, wd: float) -> dict:
        n = self.logged.get(rid, [0])[0]
        ent = {"id": rid, "count": n, "source": source}
        if n:
            return ent
        if not rid:
            ent["dismissed"] = "Xen made no record of it (dismissed, never committed)"
            return ent
        if rid in lost:
            ent["lost"] = lost[rid]
        elif self.dom0_failure is not None:
            f = self.dom0_failure
            ent["pending"] = (f"Dom0 cannot make it durable: {f['path']}: {f['errno']} "
                              f"({f['message']}); the record waits in Xen's telemetry pool and "
                              "is logged once Dom0 can write again")
            ent["not_durable"] = dict(f)
        elif self._not_awaited:
            ent["pending"] = ("not awaited (wait_dom0=False): Dom0 logs it in the background; "
                              "dom0_drain() then dom0_log_counts() checks it")
        elif self.dom0_paused:
            ent["pending"] = "Dom0 is paused: the record waits in Xen's telemetry pool"
        elif self.dom0 is None:
            ent["pending"] = ("Dom0 kept dying and is not restarted: the record waits in "
                              "Xen's telemetry pool")
        else:
            ent["pending"] = (f"not logged by Dom0 within {wd:g} s: the record waits in "
                              "Xen's telemetry pool")
        return ent
