"""The front door to a running machine: :class:`Machine`.

``Machine`` forks the coordinator process (which forks the CPUs), talks to it over
one pipe with msgpack, and tears everything down on :meth:`close` — or when this
process dies: started from the main thread, through the parent-death signal every
emulator process sets; started from another thread (whose exit would fire that
signal), through a pidfd on this process that the coordinator watches instead.

Requests carry an id and replies echo it: a reply to a call that failed after its
request went out (a timeout, ^C) is recognised and dropped by the next call, so
requests and replies never get out of step. Every argument is checked here first
(:mod:`emu.machine.checks`), before anything is sent.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import msgpack
import multiprocess

from emu.errors import EmulatorInternalError, Finding, UsageError
from emu.machine import checks
from emu.machine.config import MachineConfig
from emu.machine.procs import readable

_ERRORS = {"UsageError": UsageError, "EmulatorInternalError": EmulatorInternalError}


class Machine:
    """A booted emulated machine. Use as a context manager.

    >>> with Machine(topology="1x2x2") as m:
    ...     r = m.inject(["cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86"])
    """

    def __init__(self, config: MachineConfig | None = None, **kw):
        if config is not None and not isinstance(config, MachineConfig):
            raise UsageError("config", f"{type(config).__name__}: give a MachineConfig or "
                             "keyword options")
        if config is None:
            try:
                config = MachineConfig(**kw)
            except TypeError as exc:
                raise UsageError("machine", f"{exc}; see MachineConfig for the options") \
                    from None
        elif kw:
            raise UsageError("machine", "give a MachineConfig or keyword options, not both")
        self.config = config.validate()
        from emu.hw.topology import Topology
        self._topo = Topology(self.config)
        self.pid = None
        self._conn = None
        self._logdir = None
        self._seq = 0
        self._broken: str | None = None
        self._seen: set = set()          # error lists already validated (checks.py)
        self.boot_info = None
        self.log_dir: str | None = None
        self.sched_k: int | None = None   # controlled: PCT's k, from the first run
        self._inflight: PendingTrial | None = None   # inject_async's, not yet received

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "Machine":
        from emu.machine.coordinator import coordinator_process
        from emu.machine.logdir import claim, close_others
        if self.pid is not None:
            raise UsageError("machine", "already started")
        from emu.hw.topology import Topology
        self._topo = Topology(self.config.validate())   # changed since __init__?
        self._seen = set()
        self._logdir = claim(self.config.extra.get("log_dir"))
        self.log_dir = self._logdir.path
        cfg = dataclasses.replace(self.config, extra=dict(self.config.extra,
                                                          log_dir=self._logdir.path))
        # A parent-death signal follows the forking *thread*: from any other thread
        # than the main one, the coordinator watches this process instead.
        watch = threading.current_thread() is not threading.main_thread()
        try:
            ours, theirs = multiprocess.Pipe(duplex=True)
        except OSError:
            self._release()
            raise
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            close_others(self._logdir.fd)
            coordinator_process(theirs, cfg, me, watch_parent=watch)
        theirs.close()
        self.pid, self._conn = pid, ours
        self._seq, self._broken = 0, None
        try:
            self.boot_info = self._call("boot", {})
        except BaseException:
            self.close()   # a failed boot leaves nothing running
            raise
        return self

    def _release(self) -> None:
        if self._logdir is not None:
            self._logdir.release()
            self._logdir = None

    def close(self) -> None:
        self._inflight = None   # its reply, if any, is dropped with the rest
        if self.pid is None:
            self._release()
            return
        if self._broken:   # the pipe is out of step: nothing said on it can be trusted
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            if not self._broken:
                self._conn.send_bytes(msgpack.packb([1, "quit", {}]))
                deadline = time.monotonic() + 10
                while readable([self._conn.fileno()], max(0.0, deadline - time.monotonic())):
                    msg = msgpack.unpackb(self._conn.recv_bytes(), strict_map_key=False)
                    if len(msg) < 3:   # quit's reply has no id; older replies do
                        break
        except (OSError, EOFError, ValueError, msgpack.UnpackException):
            pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self._conn.close()
        self.pid = None
        self._release()

    def __enter__(self) -> "Machine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------
    def _call(self, cmd: str, args: dict, timeout: float = 120.0):
        return self._recv(cmd, self._send(cmd, args), timeout)

    def _send(self, cmd: str, args: dict) -> int:
        """Send one request; its id. A request still in flight (:meth:`inject_async`)
        is received first: the pipe carries one at a time."""
        if self.pid is None:
            raise UsageError("machine", "not started; use `with Machine(...) as m:` or m.start()")
        if self._broken:
            raise EmulatorInternalError(f"this Machine is unusable ({self._broken}); close it "
                                        "and start a new one")
        if self._inflight is not None:
            self._inflight.wait()
        self._seq += 1
        rid = self._seq
        try:
            data = msgpack.packb([1, cmd, args, rid])
        except (TypeError, ValueError, OverflowError) as exc:
            raise UsageError(cmd, f"an argument cannot be sent ({exc}); give numbers of at "
                             "most 64 bits, strings, lists and dicts") from None
        try:
            self._conn.send_bytes(data)
        except BaseException as exc:
            if not isinstance(exc, (OSError, EOFError)):
                self._broken = f"{type(exc).__name__} while sending {cmd!r}"
            if isinstance(exc, (OSError, EOFError)):
                raise EmulatorInternalError(f"coordinator is gone ({exc})") from None
            raise
        return rid

    def _recv(self, cmd: str, rid: int, timeout: float = 120.0):
        fd = self._conn.fileno()
        try:
            deadline = time.monotonic() + timeout
            while True:
                # select/poll, not Connection.poll: that builds a selector per call
                left = deadline - time.monotonic()
                if left <= 0 or not readable([fd], left):
                    # its reply, if it comes, is dropped by the next call (by its id)
                    raise EmulatorInternalError(f"coordinator did not answer {cmd!r} in "
                                                f"{timeout} s")
                try:
                    raw = self._conn.recv_bytes()
                except BaseException as exc:
                    if not isinstance(exc, (OSError, EOFError)):
                        self._broken = f"{type(exc).__name__} while reading a reply"
                    raise
                msg = msgpack.unpackb(raw, strict_map_key=False)
                if len(msg) == 3 and msg[2] == rid:
                    ok, payload = msg[0], msg[1]
                    break
                # a stale reply: to a call that timed out or was interrupted
        except (EOFError, OSError) as exc:
            raise EmulatorInternalError(f"coordinator is gone ({exc})") from None
        if ok:
            return payload
        cls = _ERRORS.get(payload["type"], EmulatorInternalError)
        if cls is UsageError:
            field, _, msg = payload["message"].partition(": ")
            raise UsageError(payload.get("field") or field, msg)
        raise cls(payload["message"])

    def inject(self, errors, local: bool = False, timeout_s: float | None = None,
               then: dict | None = None, via: str | None = None, schedule=None,
               schedule_seed: int | None = None, *, seed=None,
               chaos: float | None = None, starve: float | None = None,
               fault: dict | None = None, raise_cpu: int | None = None,
               wait_dom0: bool = True) -> dict:
        """Write ``errors`` into their banks, raise one #MC, return the trial result.

        Errors with ``via=cmci`` are reported by silicon and raise the CMCIs their banks
        ask for; ``via=poll`` adds one poll round at once (see :meth:`poll`). ``via``
        here gives that key to every error that has none.

        ``then={"errors": [...], "after_phase": "barrier_b", "local": False}`` raises
        a second #MC once a first-wave CPU has reached that handler phase.

        On a controlled machine (``sched="controlled"``), ``schedule`` is the trial's
        strategy: ``"random"`` (default), ``"pct:D"`` or ``"replay:TOKEN"``, seeded by
        ``schedule_seed`` (default: the machine's seed). PCT's k is the step count of
        this machine's first controlled trial (before it, an estimate). The result's
        ``sched`` holds the steps, the trace, the token and its replay command.

        Per trial (see :mod:`emu.machine.chaos`):

        * ``seed=(S, i)``: the trial seed every process's perturbation (and the
          starvation plan) is drawn from; default ``(machine seed, trial number)``.
          In the result as ``trial_seed`` and ``perturbation.seed``.
        * ``chaos=p``: perturbation probability per yield point (default the
          machine's ``chaos``).
        * ``starve=q``: probability that one seeded victim process is starved
          (default the machine's ``starve`` when chaos is on, else 0).
        * ``fault={...}``: one fault (kill_cpu, stall_cpu, kill_dom0, pause_dom0)
          with its expected outcome, reported as ``result["fault"]``.
        * ``raise_cpu=N``: raise the #MC on CPU N (broadcast unless ``local``); with
          ``errors=[]`` no bank is written at all (a #MC with no valid bank).
        * ``wait_dom0=False``: return once Xen's part and the guests are done, without
          waiting for Dom0 to log the records (their ``dom0_log`` shows
          ``pending``); see :meth:`dom0_drain` and :meth:`dom0_log_counts`.

        Every argument is checked before anything is sent (UsageError, field named).
        """
        args, spec = self._trial_args(errors, local, timeout_s, then, via, schedule,
                                      schedule_seed, seed, chaos, starve, fault, raise_cpu,
                                      wait_dom0)
        return self._trial_done(self._call("trial", args), spec)

    def inject_async(self, errors, local: bool = False, timeout_s: float | None = None,
                     then: dict | None = None, *, seed=None, chaos: float | None = None,
                     starve: float | None = None, fault: dict | None = None,
                     raise_cpu: int | None = None, wait_dom0: bool = True) -> "PendingTrial":
        """:meth:`inject`, sent now and received later: returns at once with a
        :class:`PendingTrial` whose ``result()`` is what :meth:`inject` would have
        returned. The caller works while the trial runs (a campaign checks the last
        trial meanwhile). One trial in flight at a time: any other call first waits
        for it (its result is kept for ``result()``). Arguments are checked before
        anything is sent, as for :meth:`inject`; not with controlled scheduling."""
        if self.config.sched == "controlled":
            raise UsageError("sched", "inject_async is for host scheduling; under "
                             "controlled scheduling use inject")
        args, spec = self._trial_args(errors, local, timeout_s, then, None, None, None,
                                      seed, chaos, starve, fault, raise_cpu, wait_dom0)
        rid = self._send("trial", args)
        self._inflight = PendingTrial(self, rid, spec)
        return self._inflight

    def _trial_args(self, errors, local, timeout_s, then, via, schedule, schedule_seed,
                    seed, chaos, starve, fault, raise_cpu, wait_dom0):
        errors = checks.error_list("errors", errors)
        if via is not None:
            if not isinstance(via, str):
                raise UsageError("via", f"{via!r}: give mce, cmci or poll")
            errors = [dict(e, via=e.get("via", via)) if isinstance(e, dict) else
                      e if "via=" in str(e).lower() else f"{e} via={via}" for e in errors]
        errors, local, timeout_s, then = checks.check_inject(
            errors, local, timeout_s, then, self._topo.ncpus, self._topo.nbanks,
            self.config.domids, self._seen, allow_empty=raise_cpu is not None,
            ser=self.config.ser)
        checks.check_per_trial(seed, chaos, starve, fault, raise_cpu, wait_dom0,
                               self._topo.ncpus)
        spec = None
        if self.config.sched == "controlled" or schedule is not None:
            from emu.machine.sched import resolve
            spec = resolve(self.config, schedule, schedule_seed, self.sched_k, errors, local,
                           then)
        args = {"errors": errors, "local": local, "timeout_s": timeout_s, "then": then,
                "schedule": spec}
        # Only what was given travels (the default trial costs no more than before).
        for k, v in (("seed", seed), ("chaos", chaos), ("starve", starve), ("fault", fault),
                     ("raise_cpu", raise_cpu)):
            if v is not None:
                args[k] = list(v) if k == "seed" and isinstance(v, tuple) else v
        if not wait_dom0:
            args["wait_dom0"] = False
        return args, spec

    def _trial_done(self, res: dict, spec) -> dict:
        if "sched" in res:
            if self.sched_k is None and res["sched"]["over"] == "done":
                self.sched_k = res["sched"]["steps"]   # PCT's k, learned from a first run
            if spec and spec.get("kind") == "replay":
                from emu.machine.sched import replay_verdict
                res["sched"]["replay_verdict"] = replay_verdict(res, spec.get("expect"))
        return res

    def replay(self, token: str) -> dict:
        """Run the scenario a schedule token names, under its schedule; the result's
        ``sched.replay_verdict`` is ``reproduced`` or ``diverged``. UsageError if the
        token was recorded on another machine or handler."""
        from emu.machine.sched import decode_token
        header, _ = decode_token(token)
        sc = header.get("scenario") or {}
        return self.inject(sc.get("errors") or [], local=bool(sc.get("local")),
                           then=sc.get("then"), schedule="replay:" + token)

    def poll(self, timeout_s: float | None = None) -> dict:
        """One round of Xen's polling timer now (``mce_checkregs`` on every online CPU,
        from CPU 0's timer); the result lists what it logged (``logouts``)."""
        checks.check_timeout("timeout_s", timeout_s)
        return self._call("poll", {"timeout_s": timeout_s})

    def cpu_offline(self, cpu: int, errors=None) -> dict:
        """Xen's ``cpu_down(cpu)`` for MCA: CPU_DYING (the CPU releases its CMCI banks),
        ``errors`` reported by silicon meanwhile (nobody owns those banks), then
        CPU_DEAD (every online CPU rediscovers and logs what its new banks hold).
        The result has ``ownership_before``, ``ownership``, ``log`` and ``errors``."""
        if isinstance(cpu, bool) or not isinstance(cpu, int):
            raise UsageError("cpu", f"{cpu!r}: give a CPU number")
        errors = checks.error_list("errors", errors) if errors is not None else []
        return self._call("cpu_offline", {"cpu": cpu, "errors": errors})

    def cpu_online(self, cpu: int) -> dict:
        """Bring ``cpu`` back: it runs mcheck_init again (post-reset logout, CMCI
        ownership of what nobody owns)."""
        return self._call("cpu_online", {"cpu": cpu})

    def ownership(self) -> dict:
        """CMCI bank ownership now: ``ownership`` (one entry per bank instance that can
        signal CMCI: ``sharers``, ``owners``, ``ctl2``) and ``online``."""
        return self._call("ownership", {})

    def check(self, result: dict) -> dict:
        """Raise :class:`Finding` if the trial violated an invariant."""
        if result.get("violations"):
            raise Finding(result["violations"])
        return result

    def reset(self) -> dict:
        """Warm reset. ``lost_at_reset`` in the result lists the telemetry records
        the reset lost (still in Xen's pool, not in Dom0's log), with their trial."""
        return self._call("reset", {})

    # -- Dom0's logger -------------------------------------------------------------------
    def dom0_pause(self) -> dict:
        """Stop Dom0 fetching telemetry (like stopping mcelog): records stay in Xen's
        pool. Returns once Dom0 has confirmed; holds across Dom0 restarts and warm
        resets until :meth:`dom0_resume`. Trials then do not wait for Dom0: their
        records show ``count`` 0 and ``pending``."""
        return self._call("dom0", {"op": "pause"})

    def dom0_resume(self) -> dict:
        """Let Dom0 fetch again; it drains at once. Returns without waiting for the
        drain (see :meth:`dom0_drain`)."""
        return self._call("dom0", {"op": "resume"})

    def dom0_status(self) -> dict:
        """Dom0 and the telemetry pool now: ``paused``, ``logged`` (records logged),
        ``drained``, ``pool`` (``free``, ``drops``, record ids by state), ..."""
        return self._call("dom0", {"op": "status"})

    def dom0_drain(self, timeout_s: float = 10.0) -> dict:
        """Wait (at most ``timeout_s``) until Dom0 has logged and acked everything
        Xen committed; the status, with ``drained`` true if it did."""
        checks.check_timeout("timeout_s", timeout_s, optional=False)
        return self._call("dom0", {"op": "drain", "timeout_s": timeout_s},
                          timeout=timeout_s + 120.0)

    def dom0_log_counts(self) -> dict[int, int]:
        """Record id -> how many times it is in Dom0's durable log (complete lines),
        read from the log file itself: after :meth:`dom0_drain`, a campaign that did
        not wait for Dom0 checks exactly-once logging with it (every count 1)."""
        return {int(k): int(v) for k, v in self._call("dom0", {"op": "log_counts"}).items()}

    def trace(self) -> dict:
        """The last trial's trace (a machine booted with ``trace=True``): the CPUs'
        yield points and phase changes and the coordinator's events; export it with
        :mod:`emu.formats.trace`."""
        return self._call("trace", {})

    def snapshot(self) -> dict:
        return self._call("snapshot", {})

    def clear_banks(self, banks) -> list[int]:
        """Write 0 to MCi_STATUS of each ``(cpu, bank)`` between trials, as a test
        harness does with wrmsr between cases: a campaign's cheaper way than a warm
        reset to start the next trial without the errors a trial left valid (UCNA and
        corrected errors are not cleared in #MC). Returns the bank instances cleared."""
        try:
            pairs = [[int(c), int(b)] for c, b in banks]
        except (TypeError, ValueError):
            raise UsageError("banks", f"{banks!r}: give (cpu, bank) pairs") from None
        return self._call("clear_banks", {"banks": pairs})

    def cpu_times(self) -> dict[str, float]:
        """CPU seconds used so far by the machine's processes, by role
        (``coordinator``, ``cpus``, ``dom0``, ``guests``), replaced processes included."""
        return self._call("cpu_times", {})

    def set_hooks(self, **hooks) -> None:
        """Test hooks for CPUs booted from now on (e.g. ``softirq_stall_s``)."""
        self._call("hooks", hooks)

    def guest_probe(self, domid: int, op: str, **kw) -> dict:
        """Have guest ``domid``'s kernel make one access through its channel:
        ``op="rdmsr", vcpu=, msr=`` / ``op="wrmsr", vcpu=, msr=, value=`` (a #GP comes
        back as ``{"ok": False, "gp": {...}}``) / ``op="call", cmd=, args=`` (a raw
        hypercall, e.g. a privileged one a guest may not make)."""
        if isinstance(domid, bool) or not isinstance(domid, int):
            raise UsageError("domid", f"{domid!r}: give a guest's domain id (an integer)")
        if not isinstance(op, str):
            raise UsageError("op", f"{op!r}: give rdmsr, wrmsr or call")
        return self._call("probe", dict(kw, domid=domid, op=op))

    def domains(self) -> list[dict]:
        """Domains with their state and whether their process runs."""
        return self._call("domains", {})

    @property
    def cpu_pids(self) -> dict[int, int]:
        return {int(k): v for k, v in self.snapshot()["pids"].items()}


class PendingTrial:
    """A trial sent by :meth:`Machine.inject_async`; :meth:`result` receives it (once;
    later calls return the same result or raise the same error)."""

    def __init__(self, m: Machine, rid: int, spec):
        self._m, self._rid, self._spec = m, rid, spec
        self._res = self._exc = None
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        m = self._m
        self._done = True
        if m._inflight is self:
            m._inflight = None
        try:
            self._res = m._trial_done(m._recv("trial", self._rid), self._spec)
        except BaseException as exc:
            self._exc = exc
            if not isinstance(exc, Exception):
                raise   # ^C: now, not at result()

    def result(self) -> dict:
        self.wait()
        if self._exc is not None:
            raise self._exc
        return self._res
