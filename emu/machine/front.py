"""The front door to a running machine: :class:`Machine`.

``Machine`` forks the coordinator process (which forks the CPUs), talks to it over
one pipe with msgpack, and tears everything down on :meth:`close` — or when this
process dies, through the parent-death signal every emulator process sets.
"""
from __future__ import annotations

import os
import select
import signal
import time

import msgpack
import multiprocess

from emu.errors import EmulatorInternalError, Finding, UsageError
from emu.machine.config import MachineConfig

_ERRORS = {"UsageError": UsageError, "EmulatorInternalError": EmulatorInternalError}


class Machine:
    """A booted emulated machine. Use as a context manager.

    >>> with Machine(topology="1x2x2") as m:
    ...     r = m.inject(["cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86"])
    """

    def __init__(self, config: MachineConfig | None = None, **kw):
        self.config = (config or MachineConfig(**kw)).validate()
        self.pid = None
        self._conn = None
        self.boot_info = None
        self.sched_k: int | None = None   # controlled: PCT's k, from the first run

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> "Machine":
        from emu.machine.coordinator import coordinator_process
        ours, theirs = multiprocess.Pipe(duplex=True)
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            coordinator_process(theirs, self.config, me)
        theirs.close()
        self.pid, self._conn = pid, ours
        self.boot_info = self._call("boot", {})
        return self

    def close(self) -> None:
        if self.pid is None:
            return
        try:
            self._conn.send_bytes(msgpack.packb([1, "quit", {}]))
            if self._conn.poll(10):
                self._conn.recv_bytes()
        except (OSError, EOFError):
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

    def __enter__(self) -> "Machine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------
    def _call(self, cmd: str, args: dict, timeout: float = 120.0):
        if self.pid is None:
            raise UsageError("machine", "not started; use `with Machine(...) as m:` or m.start()")
        try:
            self._conn.send_bytes(msgpack.packb([1, cmd, args]))
            # select, not Connection.poll: that builds a selector per call
            if not select.select([self._conn.fileno()], [], [], timeout)[0]:
                raise EmulatorInternalError(f"coordinator did not answer {cmd!r} in {timeout} s")
            ok, payload = msgpack.unpackb(self._conn.recv_bytes(), strict_map_key=False)
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
        """
        if isinstance(errors, (str, dict)):
            errors = [errors]
        if via is not None:
            errors = [dict(e, via=e.get("via", via)) if isinstance(e, dict) else
                      e if "via=" in str(e).lower() else f"{e} via={via}" for e in errors]
        if then and isinstance(then.get("errors"), (str, dict)):
            then = dict(then, errors=[then["errors"]])
        spec = None
        if self.config.sched == "controlled" or schedule is not None:
            from emu.machine.sched import resolve
            spec = resolve(self.config, schedule, schedule_seed, self.sched_k, errors, local)
        args = {"errors": list(errors), "local": local, "timeout_s": timeout_s, "then": then,
                "schedule": spec}
        # Only what was given travels (the default trial costs no more than before).
        for k, v in (("seed", seed), ("chaos", chaos), ("starve", starve), ("fault", fault),
                     ("raise_cpu", raise_cpu)):
            if v is not None:
                args[k] = list(v) if k == "seed" and isinstance(v, tuple) else v
        if not wait_dom0:
            args["wait_dom0"] = False
        res = self._call("trial", args)
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
                           schedule="replay:" + token)

    def poll(self, timeout_s: float | None = None) -> dict:
        """One round of Xen's polling timer now (``mce_checkregs`` on every online CPU,
        from CPU 0's timer); the result lists what it logged (``logouts``)."""
        return self._call("poll", {"timeout_s": timeout_s})

    def cpu_offline(self, cpu: int, errors=None) -> dict:
        """Xen's ``cpu_down(cpu)`` for MCA: CPU_DYING (the CPU releases its CMCI banks),
        ``errors`` reported by silicon meanwhile (nobody owns those banks), then
        CPU_DEAD (every online CPU rediscovers and logs what its new banks hold).
        The result has ``ownership_before``, ``ownership``, ``log`` and ``errors``."""
        if isinstance(errors, (str, dict)):
            errors = [errors]
        return self._call("cpu_offline", {"cpu": cpu, "errors": list(errors or [])})

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

    def set_hooks(self, **hooks) -> None:
        """Test hooks for CPUs booted from now on (e.g. ``softirq_stall_s``)."""
        self._call("hooks", hooks)

    def guest_probe(self, domid: int, op: str, **kw) -> dict:
        """Have guest ``domid``'s kernel make one access through its channel:
        ``op="rdmsr", vcpu=, msr=`` / ``op="wrmsr", vcpu=, msr=, value=`` (a #GP comes
        back as ``{"ok": False, "gp": {...}}``) / ``op="call", cmd=, args=`` (a raw
        hypercall, e.g. a privileged one a guest may not make)."""
        return self._call("probe", dict(kw, domid=domid, op=op))

    def domains(self) -> list[dict]:
        """Domains with their state and whether their process runs."""
        return self._call("domains", {})

    @property
    def cpu_pids(self) -> dict[int, int]:
        return {int(k): v for k, v in self.snapshot()["pids"].items()}
