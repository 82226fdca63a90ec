"""The Dom0 logger process (Linux ``drivers/xen/mcelog.c`` + a durable mcelog).

Modelled (xen-mca.md §5.3, §5.4): woken by VIRQ_MCA (and once at start), Dom0 drains
telemetry the way ``mc_queue_handle`` does -- "fetch; if NODATA stop; log; fetch with
ACK" for the urgent class first, then the non-urgent one. Each record is written to an
append-only JSON Lines file and ``fsync``'d *before* it is acknowledged, so nothing
acknowledged is ever lost; a record whose id is already in the log (Xen hands the same
head out again after a crash between write and ack) is acknowledged without being
written again, so nothing is logged twice. A torn last line (a crash mid-write) is cut
off at the next start. VIRQs that arrive during a drain coalesce into one more drain.
Dom0 is domain 0: a ``vmce`` notification runs the native #MC handler of
:class:`emu.domains.guest.GuestKernel` (between records, never in the middle of a request).

Channel protocol (msgpack arrays ``[1, cmd, args]``; replies ``[ok, value]``):

* requests: ``fetch {"cls"}`` → ``[True, None]`` (NODATA) or ``[True, {"id", "cls",
  "source", "record"}]``; ``ack {"cls", "id"}`` → ``[True, bool]``; ``rdmsr``/``wrmsr``
  (the #MC handler, see :mod:`emu.domains.guest`); ``logged {"ids", "dup"?, "yp"?}``
  (``dup``: the record was already in the log, acked only), ``handled {...}``,
  ``perturbed {"gen", "n", "points", "starved"}`` (this trial's perturbation counts,
  after a drain) and ``paused {}`` (the answer to a ``pause`` notification) (no reply).
* notifications: ``virq``, ``vmce {"vcpus"}``, ``quit``, ``pause``, ``resume``; any may
  carry the trial's control, ``"ctl": {"gen", "seed", "chaos", "starve"?, "die"?}``
  (``die: [point, n]``: a per-trial kill_dom0 fault), applied once per trial.

:func:`render_log` is ``emu log FILE``: mcelog ``--ascii`` text per bank record
(:func:`emu.domains.mcelog.format_record`), or the JSON lines with ``--json``.

Not modelled: XEN_MC_physcpuinfo (the CPU vendor/signature mcelog needs for its Intel
decode is a parameter, :data:`DEFAULT_CPUID`), Linux's /dev/mcelog ring and its
overflow, mcelog's triggers and page-error counting.
"""
from __future__ import annotations

import json
import os
import sys
import time

from emu.domains.guest import Channel, ChannelClosed, GuestKernel
from emu.domains.mcelog import format_record
from emu.errors import ChannelError, EmulatorInternalError, UsageError
from emu.hw.msr import hexs, status_flags

SCHEMA = "emu.mcelog/1"
CLASSES = ("urgent", "nonurgent")
DIE_POINTS = ("before_write", "mid_write", "after_write", "after_ack")
# CPUID.1:EAX Dom0 puts in every record (Linux takes it from XEN_MC_physcpuinfo):
# Intel family 6 model 0x55 stepping 4 (Skylake-SP), so mcelog does its Intel decode.
DEFAULT_CPUID = 0x00050654
CPUVENDOR_INTEL = 0
_GLOBAL_HEX = ("mc_gstatus", "mcgcap")


# --- the durable log --------------------------------------------------------------------
class DurableLog:
    """Append-only JSON Lines file; a line is on disk (fsync) before :meth:`append` returns.

    :meth:`open` repairs a torn end: a last segment without its newline (a crash in the
    middle of a write) -- or a last line that is not JSON (garbage a power loss left) --
    is truncated away and the byte count kept in :attr:`dropped`. Those lines were never
    acknowledged (the ack follows the fsync), so Xen still holds them. Any other
    unreadable line is corruption, not a crash: :class:`UsageError`.
    """

    def __init__(self, path, fsync: bool = True):
        self.path = os.fspath(path)
        self.fsync = fsync
        self.dropped = 0
        self._ids: set[int] = set()
        self._fd: int | None = None

    def open(self) -> int:
        """Open (creating if needed), repair a torn end; return the bytes dropped."""
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0) if size else b""
            good = data.rfind(b"\n") + 1           # keep everything up to the last newline
            lines = data[:good].split(b"\n")[:-1]
            if lines and _parse_line(lines[-1]) is None:
                good -= len(lines[-1]) + 1         # a complete but unreadable last line
                lines.pop()
            ids = set()
            for n, raw in enumerate(lines, 1):
                obj = _parse_line(raw)
                if obj is None:
                    raise UsageError("log", f"{self.path} line {n}: not an {SCHEMA} record; "
                                     "the log is corrupt (not a torn write): move it aside")
                ids.add(obj["id"])
            if good < size:
                os.ftruncate(fd, good)
                os.fsync(fd)
            self.dropped = size - good
            self._ids = ids
            os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        if created:
            _fsync_dir(self.path)
        self._fd = fd
        return self.dropped

    def append(self, records: list[dict]) -> None:
        """Write one line per record; fsync (unless ``fsync=False``) before returning."""
        if self._fd is None:
            raise EmulatorInternalError("DurableLog.append before open()")
        data = b"".join(_dump(r) for r in records)
        self._write_all(data)
        if self.fsync:
            os.fsync(self._fd)
        self._ids.update(r["id"] for r in records)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def ids(self) -> set[int]:
        """Ids of the records in the log."""
        return set(self._ids)

    def __contains__(self, record_id: int) -> bool:
        return record_id in self._ids

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DurableLog":
        if self._fd is None:
            self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _parse_line(raw: bytes) -> dict | None:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA \
            or not isinstance(obj.get("id"), int):
        return None
    return obj


def _fsync_dir(path: str) -> None:
    try:
        dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


# --- record conversion ------------------------------------------------------------------
def log_line(fetched: dict, cpuid: int = DEFAULT_CPUID, now: float | None = None) -> dict:
    """The JSON object Dom0 logs for one fetched record (``{"id","cls","source","record"}``).

    Register values are canonical hex strings (:func:`emu.hw.msr.hexs`); ``boot`` is the
    boot counter in the id's upper 32 bits.
    """
    rid = fetched["id"]
    rec = fetched.get("record") or {}
    g = dict(rec.get("g") or {})
    for k in _GLOBAL_HEX:
        if isinstance(g.get(k), int):
            g[k] = hexs(g[k])
    banks = []
    for b in rec.get("b") or []:
        bank, status, addr, misc, domid = (list(b) + [0] * 5)[:5]
        banks.append({"bank": bank, "status": hexs(status), "addr": hexs(addr),
                      "misc": hexs(misc), "domid": domid, "flags": status_flags(status)})
        if len(b) >= 7:   # a CMCI record's mc_ctrl2 and mc_tsc
            banks[-1].update(ctrl2=hexs(b[5]), tsc=b[6])
    recovery = []
    for r in rec.get("r") or []:
        if isinstance(r, (list, tuple)) and len(r) == 5:
            bank, aflags, atypes, mfn, st = r
            recovery.append({"bank": bank, "action_flags": aflags, "action_types": atypes,
                             "mfn": mfn, "status": st})
        else:
            recovery.append(r)
    return {"schema": SCHEMA, "id": rid, "cls": fetched.get("cls"),
            "source": fetched.get("source"), "boot": rid >> 32, "seq": rid & 0xFFFFFFFF,
            "cpu": rec.get("cpu"), "who": rec.get("who"),
            "uncomplete": bool((rec.get("flags") or 0) & 1),
            "cpuvendor": CPUVENDOR_INTEL, "cpuid": cpuid,
            "banks": banks, "global": g, "recovery": recovery,
            "logged_at": time.time() if now is None else now}


def _hexint(v) -> int:
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return int(v, 16)
    return 0


def mcelog_records(line: dict) -> list[dict]:
    """One :mod:`emu.domains.mcelog` record per bank of a logged line (Linux ``convert_log``)."""
    g = line.get("global") or {}
    cpu = line.get("cpu") or 0
    out = []
    for b in line.get("banks") or []:
        m = {"cpu": cpu, "extcpu": cpu, "bank": b.get("bank", 0),
             "status": _hexint(b.get("status")),
             "addr": _hexint(b.get("addr")), "misc": _hexint(b.get("misc")),
             "mcgstatus": _hexint(g.get("mc_gstatus")), "mcgcap": _hexint(g.get("mcgcap")),
             "apicid": g.get("mc_apicid", 0) or 0, "socketid": g.get("mc_socketid", 0) or 0}
        if line.get("cpuid"):
            m["cpuvendor"] = line.get("cpuvendor", 0) or 0
            m["cpuid"] = line["cpuid"]
        out.append(m)
    return out


def render_log(path, json_out: bool = False) -> str:
    """``emu log FILE``: mcelog --ascii text of every bank record, or the JSON lines.

    A torn or unreadable line is a :class:`UsageError` naming its line number.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise UsageError("log", f"{path}: cannot read the log ({exc.strerror}); give the "
                         "path of a Dom0 log (JSON Lines)") from None
    if not data:
        return ""
    raw_lines = data.split(b"\n")
    torn = raw_lines[-1] != b""
    if not torn:
        raw_lines.pop()
    out: list[str] = []
    for n, raw in enumerate(raw_lines, 1):
        if torn and n == len(raw_lines):
            raise UsageError("log", f"{path} line {n}: torn line (no newline at the end: Dom0 "
                             "died while writing it); Dom0 repairs it at its next start, or "
                             "delete that partial line")
        obj = _parse_line(raw)
        if obj is None:
            raise UsageError("log", f"{path} line {n}: not a valid {SCHEMA} JSON record; the "
                             "log is corrupt: move the line aside")
        if json_out:
            out.append(raw.decode() + "\n")
        else:
            try:
                recs = mcelog_records(obj)
            except (ValueError, TypeError, AttributeError) as exc:
                raise UsageError("log", f"{path} line {n}: bad field ({exc})") from None
            for m in recs:
                out.extend(line + "\n" for line in format_record(m))
    return "".join(out)


# --- the process --------------------------------------------------------------------------
class _Die(Exception):
    pass


class Dom0Logger:
    """The logger's state; :func:`dom0_main` is its process body."""

    def __init__(self, ch: Channel, log: DurableLog, kernel: GuestKernel | None,
                 hooks: dict | None = None, cpuid: int = DEFAULT_CPUID):
        self.ch = ch
        self.log = log
        self.kernel = kernel
        self.hooks = hooks or {}
        self.cpuid = cpuid
        self.paused = bool(self.hooks.get("pause"))
        self.need_drain = True           # drain once at start
        self.quit = False
        self.fetched = 0                 # records fetched by this process (die_count)
        self.drains = 0
        self.duplicates = 0
        self.ack_failures = 0
        die_at = self.hooks.get("die_at")
        if die_at is not None and die_at not in DIE_POINTS:
            raise UsageError("hooks.die_at", f"{die_at!r}: choose one of {', '.join(DIE_POINTS)}")
        self.die_at = die_at
        self.die_count = int(self.hooks.get("die_count", 1))
        self._boot_die = (self.die_at, self.die_count)

    def _maybe_die(self, point: str) -> None:
        if self.die_at == point and self.fetched == self.die_count:
            os._exit(9)                  # as if SIGKILLed: no flush, no cleanup

    def _trial_ctl(self, ctl: dict) -> None:
        """A notification carried a trial's control: reseed this process's yield
        points (:meth:`Channel.apply_ctl`) and arm the trial's fault, ``"die": [point,
        n]``: die at ``point`` of the n-th record fetched from now on (a trial without
        one gets the boot's die hook back)."""
        if not self.ch.apply_ctl(ctl, 0):
            return
        die = ctl.get("die")
        if isinstance(die, (list, tuple)) and len(die) == 2 and die[0] in DIE_POINTS \
                and isinstance(die[1], int):
            self.die_at, self.die_count = die[0], self.fetched + die[1]
        else:
            self.die_at, self.die_count = self._boot_die

    def handle(self, name: str, args: dict) -> None:
        if "ctl" in args:
            self._trial_ctl(args["ctl"])
        if name == "virq":
            self.need_drain = True
        elif name == "vmce":
            if self.kernel is not None:
                vcpus = args.get("vcpus", [])
                for v in vcpus if isinstance(vcpus, list) else []:
                    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                        self.kernel.machine_check(v)
        elif name == "pause":
            self.paused = True
            # Tell Xen's side we stopped: nothing is fetched from here on, so a
            # pause that returns is a pause in effect (no fetch still in flight).
            self.ch.send("paused", {})
        elif name == "resume":
            if self.paused:
                self.paused = False
                self.need_drain = True   # VIRQs seen while paused are not lost
        elif name == "quit":
            self.quit = True

    def _service_between_records(self) -> None:
        """Notifications that came in during a request: #MC now, VIRQs coalesce."""
        for name, args in self.ch.ready_notifications():
            self.handle(name, args)

    def drain(self) -> None:
        """mc_queue_handle: urgent until NODATA, then non-urgent."""
        self.drains += 1
        for cls in CLASSES:
            while not self.quit and not self.paused:
                ok, item = self.ch.request("fetch", {"cls": cls})
                if not ok:
                    raise ChannelError(f"fetch refused: {item}")
                if item is None:
                    break
                if not self._log_one(cls, item):
                    break
                self._service_between_records()
        report = self.ch.perturb_report()
        if report is not None:
            self.ch.send("perturbed", report)   # this trial's counts, after the drain

    def _log_one(self, cls: str, item: dict) -> bool:
        rid = item["id"]
        self.fetched += 1
        self._maybe_die("before_write")
        dup = rid in self.log
        if dup:
            self.duplicates += 1         # written before a crash, never acked: ack only
        else:
            self.ch.yp("log")
            line = log_line(item, self.cpuid)
            if self.die_at == "mid_write" and self.fetched == self.die_count:
                data = _dump(line)
                self.log._write_all(data[:max(1, len(data) // 2)])
                os.fsync(self.log._fd)
                os._exit(9)
            self.log.append([line])
        self._maybe_die("after_write")
        if self.hooks.get("forge_ack") and self.fetched == 1:
            # Test hook: a buggy or hostile logger acks an id that is not the head.
            ok, acked = self.ch.request("ack", {"cls": item.get("cls", cls), "id": rid + 1})
            self.forged = {"ok": ok, "acked": acked}
        ok, acked = self.ch.request("ack", {"cls": item.get("cls", cls), "id": rid})
        if not ok or not acked:
            # Not the head any more (someone else acked it?): stop this class rather
            # than spin on a head we cannot retire.
            self.ack_failures += 1
            return False
        self._maybe_die("after_ack")
        # "dup": it was already in the log (the machine counted it from the file when
        # the Dom0 that wrote it died): acked now, not logged a second time.
        msg = {"ids": [rid], "dup": True} if dup else {"ids": [rid]}
        report = self.ch.perturb_report()
        if report is not None:
            msg["yp"] = report
        self.ch.send("logged", msg)
        return True

    def run(self) -> None:
        while not self.quit:
            if self.need_drain and not self.paused:
                self.need_drain = False
                self.drain()
                # everything that arrived meanwhile, before deciding on another drain
                self._service_between_records()
                continue
            note = self.ch.next_notification()
            if note is not None:
                self.handle(*note)


def dom0_main(conn, log_path, fsync: bool = True, hooks: dict | None = None, *,
              kernel_log_path=None, cpuid: int = DEFAULT_CPUID, rotate_bytes: int = 0,
              rotate_keep: int = 8) -> int:
    """Body of the Dom0 process: log telemetry durably, run Dom0's #MC handler.

    ``hooks``: ``{"die_at": "before_write"|"mid_write"|"after_write"|"after_ack",
    "die_count": n}`` → ``os._exit(9)`` at that point of the n-th fetched record
    (``mid_write`` leaves half a line: a torn write); ``{"forge_ack": True}`` → before
    acking the first record, ack a non-head id; ``{"pause": True}`` → no fetch
    until a ``resume`` notification. ``kernel_log_path``: Dom0 kernel's own #MC log
    (default ``<log_path>.kernel``). ``rotate_bytes``: rotate the log by size, keeping
    ``rotate_keep`` parts (:mod:`emu.domains.logfiles`). Returns on ``quit`` or when the
    channel closes;
    the return value is the number of malformed messages dropped.
    """
    from emu.domains.logfiles import open_dom0_log
    ch = Channel(conn)
    log = open_dom0_log(log_path, fsync=fsync, rotate_bytes=rotate_bytes, keep=rotate_keep)
    dropped = log.open()
    if dropped:
        print(f"dom0: {log.path}: torn last line repaired, {dropped} bytes dropped",
              file=sys.stderr, flush=True)
    klog = kernel_log_path if kernel_log_path is not None else f"{os.fspath(log_path)}.kernel"
    kernel = GuestKernel(0, ch, klog, fsync=fsync)
    try:
        Dom0Logger(ch, log, kernel, hooks, cpuid).run()
    except ChannelClosed:
        pass
    finally:
        kernel.close()
        log.close()
    return ch.rejected
