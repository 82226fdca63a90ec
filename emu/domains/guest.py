"""A guest kernel's native #MC handler, run over trapped MSRs (xen-mca.md §7.4).

Modelled: what a Linux HVM guest does when Xen injects a vMCE: read IA32_MCG_CAP and
IA32_MCG_STATUS, scan banks 0..COUNT-1 (STATUS, then ADDR/MISC when ADDRV/MISCV),
"recover" a valid UC memory error with a usable physical address the HWPoison way
(mark the guest page poisoned, end the simulated task using it, print the
``memory_failure`` lines the mce-test ``guest_verify`` check greps for: "kernel page
recovery"), write 0 to the bank's STATUS/ADDR/MISC and finally write MCG_STATUS = 0,
which clears MCIP (Linux writes 0). A vMCE arriving without MCIP is what Linux panics
on ("MCIP not set in MCA handler"): the handler logs it and clears nothing. Every MSR
access is a request on the guest's channel; the hypervisor side (vmce.c rules)
answers it, so a non-zero write to MCi_STATUS comes back as #GP.

The process only has its channel (DESIGN.md §2): it imports nothing from ``emu.xen``.

Channel protocol (msgpack arrays over ``send_bytes``/``recv_bytes``):

* requests: ``[1, "rdmsr", {"vcpu", "msr"}]`` → ``[True, value]`` or
  ``[False, {"type": "GP", "message"}]``; ``[1, "wrmsr", {"vcpu", "msr", "value"}]`` →
  ``[True, None]`` or GP; ``[1, "handled", report]`` (no reply);
  ``[1, "probe_result", {...}]`` (no reply) answers a ``probe`` notification.
* notifications, at any time (also while a reply is awaited, when :class:`Channel`
  sets them aside): ``[1, "vmce", {"vcpus": [...]}]``, ``[1, "quit", {}]``,
  ``[1, "probe", {"op": "rdmsr"|"wrmsr"|"call", ...}]`` (one access made on behalf of
  a test or an operator, answered with ``probe_result``); Dom0 also
  gets ``virq``/``pause``/``resume`` (see :mod:`emu.domains.dom0`).

Not modelled: a guest kernel's rendezvous of its vCPUs (each listed vCPU runs the
handler in turn), CMCI, the poller, guest LMCE (MCG_EXT_CTL), real page tables.
"""
from __future__ import annotations

import json
import os
import select
import sys
import time
from collections import deque

import msgpack

from emu.errors import ChannelError, EmulatorInternalError
from emu.hw import msr
from emu.hw.yieldpoint import YieldPoints, domain_key, process_seed

PROTO = 1
GUEST_LOG_SCHEMA = "emu.guestlog/1"
REPLY_TIMEOUT_S = 30.0
REPLY_SPIN_S = 0.0002
NOTIFICATIONS = frozenset({"virq", "vmce", "quit", "pause", "resume", "probe"})


class ChannelClosed(Exception):
    """The other end of the channel is gone (EOF)."""


class GuestGP(Exception):
    """#GP taken by the guest on an MSR access (the trap service refused it)."""

    def __init__(self, op: str, vcpu: int, msr_no: int, value: int | None, message: str):
        what = f"{op} {msr_no:#x}" + (f" <- {value:#x}" if value is not None else "")
        super().__init__(f"#GP on vCPU{vcpu}: {what}: {message}")
        self.op, self.vcpu, self.msr, self.value, self.message = op, vcpu, msr_no, value, message

    def as_dict(self) -> dict:
        return {"op": self.op, "vcpu": self.vcpu, "msr": self.msr, "value": self.value,
                "message": self.message}


class Channel:
    """One process's end of its channel: requests with replies, notifications set aside.

    Replies are ``[bool, x]`` (two items, a bool first); notifications are
    ``[1, name, args]``. A notification that arrives while :meth:`request` waits for
    its reply is queued and handed out later by :meth:`next_notification` /
    :meth:`ready_notifications`, in arrival order. Malformed messages are dropped and
    counted in :attr:`rejected` (DESIGN.md §8).

    Every request is a yield point (``channel``), this process's
    (:attr:`yps`): a notification may carry the trial's control (``"ctl"``), which
    :meth:`apply_ctl` applies once per trial.
    """

    def __init__(self, conn, reply_timeout_s: float = REPLY_TIMEOUT_S):
        self.conn = conn
        self.reply_timeout_s = reply_timeout_s
        self.reply_spin_s = REPLY_SPIN_S
        self.pending: deque = deque()
        self.rejected = 0
        self.yps = YieldPoints(-1)   # reconfigured per trial by apply_ctl
        self.yp = self.yps.yp
        self.ctl_gen = 0

    def apply_ctl(self, ctl, domid: int) -> bool:
        """Apply a trial's control ``{"gen", "seed": [S, i], "chaos", "starve": [k, s]}``
        (sent by the machine with a notification) if its ``gen`` is new: this
        domain's yield points are reseeded from ``SeedSequence([S, i],
        spawn_key=domain_key(domid))``, with its starvation point if it is the
        trial's victim. A control with only ``gen`` turns perturbation off. Returns
        whether it was new."""
        if not isinstance(ctl, dict):
            return False
        g = ctl.get("gen")
        if not isinstance(g, int) or g == self.ctl_gen:
            return False
        self.ctl_gen = g
        try:
            chaos = float(ctl.get("chaos") or 0.0)
            seed = ctl.get("seed")
            k, s = ctl.get("starve") or (-1, 0.0)
            ss = process_seed(seed[0], seed[1], domain_key(domid)) \
                if chaos > 0 and seed else None
            self.yps.configure(chaos, ss, int(k), float(s))
        except (TypeError, ValueError, IndexError):
            self.rejected += 1
            self.yps.configure(0.0, None)
        self.yp = self.yps.yp
        return True

    def perturb_report(self) -> dict | None:
        """This trial's counts (``{"gen", "n", "points", "starved"}``), or None
        when nothing perturbs this process."""
        y = self.yps
        if not (y.active or y.count or y.starved):
            return None
        return dict(y.report(), gen=self.ctl_gen)

    def send(self, cmd: str, args) -> None:
        self.conn.send_bytes(msgpack.packb([PROTO, cmd, args]))

    def _recv(self, timeout: float | None, spin_s: float = 0.0):
        """One decoded message: ("reply", ok, value) or ("note", name, args); None on timeout.

        ``spin_s``: poll without sleeping that long first (a reply to a trapped MSR
        access comes within tens of µs; a sleep/wake-up pair costs about as much)."""
        # select, not Connection.poll: that builds a selector object per call.
        fd = self.conn.fileno()
        ready = False
        if spin_s > 0:
            end = time.monotonic() + spin_s
            while not (ready := bool(select.select([fd], [], [], 0)[0])) \
                    and time.monotonic() < end:
                os.sched_yield()
        if not ready and not select.select([fd], [], [], timeout)[0]:
            return None
        try:
            raw = self.conn.recv_bytes()
        except (EOFError, OSError) as exc:
            raise ChannelClosed(str(exc) or "EOF") from None
        try:
            msg = msgpack.unpackb(raw, strict_map_key=False)
        except Exception:  # noqa: BLE001 - any undecodable bytes are a rejected message
            self.rejected += 1
            return ("bad", None, None)
        if isinstance(msg, list) and len(msg) == 2 and isinstance(msg[0], bool):
            return ("reply", msg[0], msg[1])
        if (isinstance(msg, list) and len(msg) == 3 and msg[0] == PROTO
                and not isinstance(msg[0], bool) and msg[1] in NOTIFICATIONS
                and isinstance(msg[2], dict)):
            return ("note", msg[1], msg[2])
        self.rejected += 1
        return ("bad", None, None)

    def request(self, cmd: str, args) -> tuple[bool, object]:
        """Send a request and wait for its reply: (ok, value)."""
        self.yp("channel")
        self.send(cmd, args)
        deadline = time.monotonic() + self.reply_timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EmulatorInternalError(f"no reply to {cmd!r} within {self.reply_timeout_s} s")
            m = self._recv(left, self.reply_spin_s)
            if m is None or m[0] == "bad":
                continue
            if m[0] == "note":
                self.pending.append((m[1], m[2]))
                continue
            return m[1], m[2]

    def next_notification(self, timeout: float | None = None) -> tuple[str, dict] | None:
        """The oldest notification, waiting up to ``timeout`` (None = forever)."""
        if self.pending:
            return self.pending.popleft()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            m = self._recv(left)
            if m is None:
                return None
            if m[0] == "note":
                return m[1], m[2]
            if m[0] == "reply":          # a reply nobody asked for
                self.rejected += 1
            if deadline is not None and time.monotonic() >= deadline:
                return None

    def ready_notifications(self) -> list[tuple[str, dict]]:
        """Every notification already queued or readable now, without blocking."""
        out = list(self.pending)
        self.pending.clear()
        while True:
            m = self._recv(0)
            if m is None:
                return out
            if m[0] == "note":
                out.append((m[1], m[2]))
            elif m[0] == "reply":
                self.rejected += 1


def _gp_message(value) -> str:
    if isinstance(value, dict):
        return str(value.get("message", value))
    return str(value)


def _is_gp(value) -> bool:
    return isinstance(value, dict) and value.get("type") == "GP"


class GuestKernel:
    """A guest kernel (domain ``domid``) with a native #MC handler over trapped MSRs.

    ``conn`` is a channel connection or a :class:`Channel` (Dom0 shares its channel
    with the logger). State: :attr:`poisoned` (guest pfns), :attr:`killed` (simulated
    tasks ended), :attr:`console` (every line printed), :attr:`reports`.
    """

    def __init__(self, domid: int, conn, log_path, fsync: bool = True, echo: bool = False):
        self.domid = domid
        self.ch = conn if isinstance(conn, Channel) else Channel(conn)
        self.log_path = os.fspath(log_path) if log_path is not None else None
        self.fsync = fsync
        self.echo = echo
        self.poisoned: set[int] = set()
        self.killed: list[dict] = []
        self.console: list[str] = []
        self.reports: list[dict] = []
        self._ntask = 0
        self._fd = None
        if self.log_path is not None:
            self._fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # -- trapped MSR access ------------------------------------------------------------
    def rdmsr(self, vcpu: int, msr_no: int) -> int:
        ok, value = self.ch.request("rdmsr", {"vcpu": vcpu, "msr": msr_no})
        if not ok:
            if _is_gp(value):
                raise GuestGP("rdmsr", vcpu, msr_no, None, _gp_message(value))
            raise ChannelError(f"rdmsr {msr_no:#x} refused: {_gp_message(value)}")
        return int(value)

    def wrmsr(self, vcpu: int, msr_no: int, value: int) -> None:
        ok, err = self.ch.request("wrmsr", {"vcpu": vcpu, "msr": msr_no, "value": value})
        if not ok:
            if _is_gp(err):
                raise GuestGP("wrmsr", vcpu, msr_no, value, _gp_message(err))
            raise ChannelError(f"wrmsr {msr_no:#x} refused: {_gp_message(err)}")

    def probe(self, args: dict) -> dict:
        """Run one access on behalf of a test or an operator (``emu`` probes):
        ``{"op": "rdmsr"|"wrmsr"|"call", ...}``; the result goes back as
        ``probe_result`` and into the guest log."""
        out = _probe(self, args if isinstance(args, dict) else {})
        out["probe"] = args
        self._append_log({"schema": GUEST_LOG_SCHEMA, "domid": self.domid, "t": time.time(),
                          "probe": log_probe(out)})
        self.ch.send("probe_result", out)
        return out

    def attempt_write(self, vcpu: int, msr_no: int, value: int) -> None:
        """A bare WRMSR from guest code; raises :class:`GuestGP` if the trap refuses it."""
        self.wrmsr(vcpu, msr_no, value)

    # -- console and log -------------------------------------------------------------------
    def printk(self, line: str) -> None:
        self.console.append(line)
        if self.echo:
            print(f"[dom{self.domid}] {line}", file=sys.stderr, flush=True)

    def _append_log(self, entry: dict) -> None:
        if self._fd is None:
            return
        data = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
        if self.fsync:
            os.fsync(self._fd)

    # -- the handler -------------------------------------------------------------------------
    def _rd(self, vcpu: int, msr_no: int, gp: list) -> int:
        try:
            return self.rdmsr(vcpu, msr_no)
        except GuestGP as exc:      # Linux: "unchecked MSR access error", reads as 0
            gp.append(exc.as_dict())
            return 0

    def _wr(self, vcpu: int, msr_no: int, value: int, gp: list) -> bool:
        try:
            self.wrmsr(vcpu, msr_no, value)
            return True
        except GuestGP as exc:
            gp.append(exc.as_dict())
            return False

    def _memory_failure(self, pfn: int, bank: int) -> dict:
        """HWPoison: poison the page, end the task using it (simulated)."""
        self.poisoned.add(pfn)
        self._ntask += 1
        task = {"comm": f"guest-task{self._ntask}", "pid": 1000 + self._ntask, "pfn": pfn}
        self.killed.append(task)
        self.printk(f"Memory failure: {pfn:#x}: Sending SIGBUS to {task['comm']}:{task['pid']} "
                    "due to hardware memory corruption")
        self.printk(f"Memory failure: {pfn:#x}: recovery action for kernel page: Recovered")
        # 2.6.32's action_result() wording, which mce-test's guest_verify greps for
        self.printk(f"MCE {pfn:#x}: kernel page recovery: Recovered")
        return task

    def machine_check(self, vcpu: int) -> dict:
        """Run the #MC handler on ``vcpu``; append to the guest log, send ``handled``."""
        t0 = time.monotonic()
        first_line = len(self.console)
        gp: list = []
        cap = self._rd(vcpu, msr.MSR_IA32_MCG_CAP, gp)
        gstatus = self._rd(vcpu, msr.MSR_IA32_MCG_STATUS, gp)
        read = {"mcg_cap": cap, "mcg_status": gstatus, "bank": None, "status": 0, "addr": 0,
                "misc": 0}
        banks: list[dict] = []
        poisoned_pfn = None
        cleared = False
        killed = None
        self.printk(f"mce: vCPU{vcpu}: machine check, MCG_STATUS {gstatus:#x}")
        if not gstatus & msr.MCG_STATUS_MCIP:
            # Linux: mce_panic("MCIP not set in MCA handler") -- nothing is cleared.
            self.printk("mce: MCIP not set in MCA handler")
            self.printk("Kernel panic - not syncing: MCIP not set in MCA handler")
        else:
            for i in range(cap & msr.MCG_CAP_COUNT):
                status = self._rd(vcpu, msr.MSR_IA32_MCx_STATUS(i), gp)
                if not status & msr.MCi_STATUS_VAL:
                    continue
                addr = self._rd(vcpu, msr.MSR_IA32_MCx_ADDR(i), gp) \
                    if status & msr.MCi_STATUS_ADDRV else 0
                misc = self._rd(vcpu, msr.MSR_IA32_MCx_MISC(i), gp) \
                    if status & msr.MCi_STATUS_MISCV else 0
                b = {"bank": i, "status": status, "addr": addr, "misc": misc}
                banks.append(b)
                if read["bank"] is None:
                    read.update(b)
                self.printk(f"mce: [Hardware Error]: CPU {vcpu}: Machine Check: 0 Bank {i}: "
                            f"{status:016x}")
                self.printk(f"mce: [Hardware Error]: ADDR {addr:x} MISC {misc:x}")
                if status & msr.MCi_STATUS_UC and msr.addr_is_physical(status, misc):
                    pfn = addr >> 12
                    task = self._memory_failure(pfn, i)
                    if poisoned_pfn is None:
                        poisoned_pfn, killed = pfn, task
                elif status & msr.MCi_STATUS_UC:
                    self.printk("mce: no usable physical address: nothing to recover")
                for reg in (msr.MSR_IA32_MCx_STATUS(i), msr.MSR_IA32_MCx_ADDR(i),
                            msr.MSR_IA32_MCx_MISC(i)):
                    self._wr(vcpu, reg, 0, gp)
            if not banks:
                self.printk("mce: no valid bank on this vCPU (broadcast vMCE)")
            # Linux's exit: mce_wrmsrl(MSR_IA32_MCG_STATUS, 0) -- MCIP cleared
            cleared = self._wr(vcpu, msr.MSR_IA32_MCG_STATUS, 0, gp)
        report = {"domid": self.domid, "vcpu": vcpu, "read": read, "banks": banks,
                  "poisoned_pfn": poisoned_pfn, "killed": killed, "cleared": cleared,
                  "mcg_status_written": 0 if cleared else None, "gp": gp,
                  "handler_us": (time.monotonic() - t0) * 1e6}
        yp = self.ch.perturb_report()
        if yp is not None:
            report["yp"] = yp
        self._append_log({"schema": GUEST_LOG_SCHEMA, "domid": self.domid, "vcpu": vcpu,
                          "t": time.time(), "console": self.console[first_line:],
                          "report": log_report(report)})
        self.reports.append(report)
        self.ch.send("handled", report)
        return report


_REGS = ("mcg_cap", "mcg_status", "status", "addr", "misc")


def log_report(report: dict) -> dict:
    """The handler's report as the guest log stores it: register values as canonical
    hex strings (:func:`emu.hw.msr.hexs`), as in every emu output; the ``handled``
    message on the channel keeps integers."""
    def regs(d):
        return {k: msr.hexs(v) if k in _REGS and isinstance(v, int) else v
                for k, v in d.items()}
    out = dict(report)
    out["read"] = regs(report.get("read") or {})
    out["banks"] = [regs(b) for b in report.get("banks") or []]
    return out


def log_probe(out: dict) -> dict:
    """A probe's result as the guest log stores it: an MSR value read or written as a
    hex string (the MSR's index stays an integer)."""
    out = dict(out)
    req = out.get("probe")
    if isinstance(req, dict) and req.get("op") in ("rdmsr", "wrmsr"):
        if isinstance(out.get("value"), int) and not isinstance(out["value"], bool):
            out["value"] = msr.hexs(out["value"] & msr.U64)
        if isinstance(req.get("value"), int) and not isinstance(req["value"], bool):
            out["probe"] = dict(req, value=msr.hexs(req["value"] & msr.U64))
    return out


def _probe(kernel: "GuestKernel", args: dict) -> dict:
    op = args.get("op")
    try:
        if op == "rdmsr":
            return {"ok": True, "value": kernel.rdmsr(int(args["vcpu"]), int(args["msr"]))}
        if op == "wrmsr":
            kernel.attempt_write(int(args["vcpu"]), int(args["msr"]), int(args["value"]))
            return {"ok": True}
        if op == "call":   # a raw request, as buggy or hostile guest code could send
            if args["cmd"] in ("logged", "handled"):   # one-way messages: no reply comes
                kernel.ch.send(str(args["cmd"]), args.get("args") or {})
                return {"ok": True, "sent": True}
            ok, value = kernel.ch.request(str(args["cmd"]), args.get("args") or {})
            return {"ok": bool(ok), "value": value}
    except GuestGP as gp:
        return {"ok": False, "gp": gp.as_dict()}
    except (KeyError, TypeError, ValueError) as exc:
        return {"ok": False, "error": f"bad probe: {exc}"}
    return {"ok": False, "error": f"unknown probe op {op!r}"}


def guest_main(domid: int, conn, log_path, hooks: dict | None = None) -> int:
    """Body of a guest process: serve vMCEs until ``quit`` (or the channel closes).

    Hooks: ``{"ignore_vmce": True}`` makes the guest never run its handler (MCIP stays
    set, to test Xen's "guest has not handled previous vMCE yet!"). Returns the number
    of malformed messages dropped.
    """
    hooks = hooks or {}
    kernel = GuestKernel(domid, conn, log_path)
    kernel.ch.reply_spin_s = float(hooks.get("reply_spin_s", REPLY_SPIN_S))
    try:
        while True:
            try:
                note = kernel.ch.next_notification()
            except ChannelClosed:
                return kernel.ch.rejected
            if note is None:
                continue
            name, args = note
            if "ctl" in args:
                kernel.ch.apply_ctl(args["ctl"], domid)
            if name == "quit":
                return kernel.ch.rejected
            if name == "vmce" and not hooks.get("ignore_vmce"):
                for v in _vcpu_list(args):
                    kernel.machine_check(v)
            elif name == "probe":
                kernel.probe(args)
            # virq / pause / resume mean nothing to a guest
    except ChannelClosed:
        return kernel.ch.rejected
    finally:
        kernel.close()


def _vcpu_list(args: dict) -> list[int]:
    vcpus = args.get("vcpus", [])
    if not isinstance(vcpus, list):
        return []
    return [v for v in vcpus if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
