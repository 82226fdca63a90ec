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
  after a drain), ``paused {}`` (the answer to a ``pause`` notification) and, under
  controlled scheduling only, ``idle {"seen"}`` (about to sleep, having handled
  ``seen`` virq/pause/resume notifications) (no reply).
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

import errno
import hashlib
import json
import os
import stat
import sys
import time
from collections import deque

from emu.domains.guest import Channel, ChannelClosed, GuestKernel
from emu.domains.mcelog import format_record
from emu.errors import ChannelError, EmulatorInternalError, UsageError
from emu.hw.msr import hexs, status_flags

SCHEMA = "emu.mcelog/1"
CLASSES = ("urgent", "nonurgent")
DIE_POINTS = ("before_write", "mid_write", "after_write", "after_ack")
# Test hooks only (not a fault a campaign draws): "ack_sent" sends the ack, closes the
# channel and dies before the reply, so the machine's reply finds no reader.
TEST_DIE_POINTS = ("ack_sent",)
# CPUID.1:EAX Dom0 puts in every record (Linux takes it from XEN_MC_physcpuinfo):
# Intel family 6 model 0x55 stepping 4 (Skylake-SP), so mcelog does its Intel decode.
DEFAULT_CPUID = 0x00050654
CPUVENDOR_INTEL = 0
_GLOBAL_HEX = ("mc_gstatus", "mcgcap")


# --- the durable log --------------------------------------------------------------------
IDX_SCHEMA = "emu.mcelog.idx/1"
MAX_LINE = 1 << 20            # a record line is a few hundred bytes; longer is corruption
RECENT_IDS = 256              # ids kept for the dedup (Xen's pool holds 30 records)
RECENT_BYTES = 128 << 10      # where those ids are looked for before a checkpoint
CHECKPOINT_BYTES = 256 << 10  # appended bytes between two checkpoints
IDX_TAIL = 4096               # bytes before the checkpointed size, hashed into it
_CHUNK = 1 << 20


class DurableLog:
    """Append-only JSON Lines file; a line is on disk (fsync) before :meth:`append` returns.

    :meth:`open` repairs a torn end: a last segment without its newline (a crash in the
    middle of a write) -- or a last line that is not JSON (garbage a power loss left) --
    is truncated away and the byte count kept in :attr:`dropped`. Those lines were never
    acknowledged (the ack follows the fsync), so Xen still holds them. Any other
    unreadable line is corruption, not a crash: :class:`UsageError`.

    A restart costs the same at 1k records as at 1M: a checkpoint beside the log
    (``<log>.idx``: size, line count, largest id, and a hash of the 4 KiB before that
    size) lets :meth:`open` check only what was appended after it, plus the last
    ``RECENT_BYTES`` before it for the ids the dedup needs. Only the last
    :data:`RECENT_IDS` ids are kept: Xen hands out again only records still in its
    pool (30 entries), which Dom0 wrote last. A checkpoint whose size, file or hash
    does not match the log is ignored (the whole log is checked, in bounded memory,
    and a new checkpoint written); it is a cache, never fsync'd.
    """

    def __init__(self, path, fsync: bool = True):
        self.path = os.fspath(path)
        self.idx_path = self.path + ".idx"
        self.fsync = fsync
        self.dropped = 0
        self.scanned = 0                  # bytes open() parsed (the restart's cost)
        self.lines = 0
        self.max_id = -1
        self._ids: set[int] = set()
        self._recent: deque = deque()
        self._fd: int | None = None
        self._size = 0
        self._tail = b""                  # the last IDX_TAIL bytes of the log
        self._ckpt_size = 0

    def open(self) -> int:
        """Open (creating if needed), repair a torn end; return the bytes dropped."""
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UsageError("log-dir", f"{self.path}: not a regular file; Dom0's log must "
                                 "be one (give a --log-dir of its own)")
            scan = scan_log(fd, self.path, st)
            if scan.good < st.st_size:
                os.ftruncate(fd, scan.good)
                os.fsync(fd)
            self.dropped = st.st_size - scan.good
            self.scanned = scan.scanned
            self.lines, self.max_id, self._size = scan.lines, scan.max_id, scan.good
            for rid in scan.recent:
                self._remember(rid)
            self._tail = os.pread(fd, IDX_TAIL, max(0, scan.good - IDX_TAIL)) \
                if scan.good else b""
            self._ckpt_size = scan.start
            os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        if created:
            _fsync_dir(self.path)
        self._fd = fd
        if self._size - self._ckpt_size >= CHECKPOINT_BYTES:
            self._checkpoint(st)
        return self.dropped

    def _remember(self, rid: int) -> None:
        self._recent.append(rid)
        self._ids.add(rid)
        if len(self._recent) > RECENT_IDS:
            old = self._recent.popleft()
            if old not in self._recent:
                self._ids.discard(old)

    def append(self, records: list[dict]) -> None:
        """Write one line per record; fsync (unless ``fsync=False``) before returning."""
        if self._fd is None:
            raise EmulatorInternalError("DurableLog.append before open()")
        data = b"".join(_dump(r) for r in records)
        self._write_all(data)
        if self.fsync:
            os.fsync(self._fd)
        for r in records:
            self._remember(r["id"])
            self.max_id = max(self.max_id, r["id"])
        self.lines += len(records)
        self._size += len(data)
        self._tail = (self._tail + data)[-IDX_TAIL:]
        if self._size - self._ckpt_size >= CHECKPOINT_BYTES:
            self._checkpoint()

    def _checkpoint(self, st=None) -> None:
        """Write ``<log>.idx`` (atomically: a temporary file renamed); best effort."""
        st = st or os.fstat(self._fd)
        idx = {"schema": IDX_SCHEMA, "dev": st.st_dev, "ino": st.st_ino, "size": self._size,
               "lines": self.lines, "max_id": self.max_id,
               "tail": hashlib.sha256(self._tail).hexdigest()}
        tmp = f"{self.idx_path}.{os.getpid()}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                data = json.dumps(idx).encode()
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
            finally:
                os.close(fd)
            os.replace(tmp, self.idx_path)
            self._ckpt_size = self._size
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def ids(self) -> set[int]:
        """Ids of the last :data:`RECENT_IDS` records in the log."""
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


class _Scan:
    __slots__ = ("start", "good", "lines", "max_id", "recent", "scanned")


def _read_checkpoint(path: str, st, fd: int):
    """(size, lines, max_id) of a checkpoint that matches the log, else None."""
    try:
        with open(path + ".idx", "rb") as f:
            idx = json.loads(f.read(4096))
        size, lines, max_id = int(idx["size"]), int(idx["lines"]), int(idx["max_id"])
        if idx.get("schema") != IDX_SCHEMA or idx.get("ino") != st.st_ino \
                or idx.get("dev") != st.st_dev or not 0 <= size <= st.st_size or lines < 0:
            return None
        tail = os.pread(fd, IDX_TAIL, max(0, size - IDX_TAIL)) if size else b""
        if hashlib.sha256(tail).hexdigest() != idx.get("tail") or (size and tail[-1:] != b"\n"):
            return None
        return size, lines, max_id
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _lines(fd: int, start: int, end: int):
    """(offset, line without its newline) of every complete line of ``fd`` in
    [start, end), read in bounded pieces; a line longer than MAX_LINE comes as
    (offset, None) and is never held whole. A last segment without newline (a torn
    write) is not yielded."""
    with os.fdopen(os.dup(fd), "rb", buffering=_CHUNK) as f:
        f.seek(start)
        off = start
        while off < end:
            raw = f.readline(min(MAX_LINE + 1, end - off))
            if not raw:
                return
            if raw.endswith(b"\n"):
                yield off, raw[:-1]
                off += len(raw)
                continue
            at = off
            off += len(raw)
            while off < end:          # an overlong line: skip to its end
                more = f.readline(min(_CHUNK, end - off))
                if not more:
                    return
                off += len(more)
                if more.endswith(b"\n"):
                    yield at, None
                    break


def scan_log(fd: int, path: str, st=None) -> _Scan:
    """Check a Dom0 log (from its checkpoint on, if one matches): the offset of the end
    of its last good line (``good``; anything after it is a torn write), its line count,
    largest id and most recent ids. A bad line that is not the last one raises
    :class:`UsageError` naming ``log-dir`` and the line number."""
    st = st or os.fstat(fd)
    size = st.st_size
    ck = _read_checkpoint(path, st, fd)
    s = _Scan()
    s.start, s.lines, s.max_id = ck if ck else (0, 0, -1)
    recent: deque = deque(maxlen=RECENT_IDS)
    if ck and s.start:
        # the ids the dedup needs: the last lines before the checkpoint
        lo = max(0, s.start - RECENT_BYTES)
        for off, raw in _lines(fd, lo, s.start):
            if lo and off == lo:
                continue      # may be the second half of a line
            obj = _parse_line(raw) if raw is not None else None
            if obj is not None:
                recent.append(obj["id"])
    good = s.start
    n = s.lines
    bad = None                # (line number, offset) of an unreadable line
    for off, raw in _lines(fd, s.start, size):
        n += 1
        obj = _parse_line(raw) if raw is not None else None
        if bad is not None:
            raise UsageError("log-dir", f"{path} line {bad[0]}: not an {SCHEMA} record; the "
                             "log is corrupt (not a torn write): move it aside")
        if obj is None:
            bad = (n, off)
            continue
        recent.append(obj["id"])
        s.max_id = max(s.max_id, obj["id"])
        good = off + len(raw) + 1
    if bad is not None:
        n -= 1               # a complete but unreadable last line: a torn write too
    s.good, s.lines, s.recent = good, n, list(recent)
    s.scanned = size - s.start
    return s


def check_log(path: str) -> None:
    """Refuse (:class:`UsageError` naming ``log-dir``) a Dom0 log that is not a regular
    file or is corrupt before its last line; a torn end is fine (Dom0 repairs it).
    Nothing is written."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError("log-dir", f"{path}: cannot open Dom0's log ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError("log-dir", f"{path}: not a regular file (Dom0's log must be one); "
                             "give a --log-dir of its own")
        scan_log(fd, path, st)
    finally:
        os.close(fd)


TAIL_BYTES = 64 << 10   # the coordinator's reconcile: Xen's pool holds 30 records


def tail_records(path: str, max_bytes: int = TAIL_BYTES) -> list[dict]:
    """The valid records among the complete lines of the last ``max_bytes`` of the log
    (bounded, whatever the log's size; a regular file only)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return []
        lo = max(0, st.st_size - max_bytes)
        out = []
        for off, raw in _lines(fd, lo, st.st_size):
            if lo and off == lo:
                continue
            obj = _parse_line(raw) if raw is not None else None
            if obj is not None:
                out.append(obj)
        return out
    finally:
        os.close(fd)


def log_id_counts(path: str) -> dict[int, int] | None:
    """Record id -> how many times it is in the log (complete, valid lines); None if
    there is no log. The whole log, read in bounded pieces; a regular file only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return {}
        counts: dict[int, int] = {}
        for _off, raw in _lines(fd, 0, st.st_size):
            obj = _parse_line(raw) if raw is not None else None
            if obj is not None:
                counts[obj["id"]] = counts.get(obj["id"], 0) + 1
        return counts
    finally:
        os.close(fd)


def last_boot(path: str) -> int:
    """The boot number (id >> 32) of the log's newest record (0 for none): ids grow
    with the boots, so the checkpoint and the log's tail suffice."""
    best = -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError:
        return 0
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            ck = _read_checkpoint(path, st, fd)
            if ck:
                best = ck[2]
    finally:
        os.close(fd)
    for obj in tail_records(path):
        best = max(best, obj["id"])
    return max(0, best) >> 32


def _dump(obj: dict) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _parse_line(raw: bytes) -> dict | None:
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA \
            or not isinstance(obj.get("id"), int) or isinstance(obj.get("id"), bool) \
            or not 0 <= obj["id"] < 1 << 64:
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


class _BadField(ValueError):
    def __init__(self, name: str, value):
        super().__init__(f"{name}: {str(value)[:60]!r} is not a 64-bit number")
        self.name = name


def _hexint(v, name: str = "value") -> int:
    """A register of a logged line: an int or a hex string, 0..2**64-1 (None: 0)."""
    if v is None:
        return 0
    if isinstance(v, bool):
        raise _BadField(name, v)
    if isinstance(v, str):
        t = v.strip()
        if not t.isascii() or len(t) > 20:
            raise _BadField(name, v)
        try:
            v = int(t, 16)
        except ValueError:
            raise _BadField(name, v) from None
    if not isinstance(v, int) or not 0 <= v < 1 << 64:
        raise _BadField(name, v)
    return v


def _small(v, name: str, hi: int = 1 << 32) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < hi:
        raise _BadField(name, v)
    return v


def mcelog_records(line: dict) -> list[dict]:
    """One :mod:`emu.domains.mcelog` record per bank of a logged line (Linux ``convert_log``).

    Every field is type-checked: a wrong one raises ``ValueError`` naming it."""
    g = line.get("global") or {}
    if not isinstance(g, dict):
        raise _BadField("global", g)
    banks = line.get("banks") or []
    if not isinstance(banks, list):
        raise _BadField("banks", banks)
    cpu = _small(line.get("cpu"), "cpu")
    out = []
    for k, b in enumerate(banks):
        if not isinstance(b, dict):
            raise _BadField(f"banks[{k}]", b)
        m = {"cpu": cpu, "extcpu": cpu, "bank": _small(b.get("bank", 0), f"banks[{k}].bank", 256),
             "status": _hexint(b.get("status"), f"banks[{k}].status"),
             "addr": _hexint(b.get("addr"), f"banks[{k}].addr"),
             "misc": _hexint(b.get("misc"), f"banks[{k}].misc"),
             "mcgstatus": _hexint(g.get("mc_gstatus"), "global.mc_gstatus"),
             "mcgcap": _hexint(g.get("mcgcap"), "global.mcgcap"),
             "apicid": _small(g.get("mc_apicid", 0), "global.mc_apicid"),
             "socketid": _small(g.get("mc_socketid", 0), "global.mc_socketid")}
        if line.get("cpuid"):
            m["cpuvendor"] = _small(line.get("cpuvendor", 0), "cpuvendor", 256)
            m["cpuid"] = _small(line["cpuid"], "cpuid")
        out.append(m)
    return out


def render_log(path, json_out: bool = False) -> str:
    """``emu log FILE``: mcelog --ascii text of every bank record, or the JSON lines.

    Only a regular file is read (a FIFO or a device is refused, never waited on), in
    bounded pieces: a line longer than MAX_LINE is refused. A torn, unreadable or
    wrong-typed line is a :class:`UsageError` naming its line number.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise UsageError("log", f"{path}: cannot read the log ({why}); give the "
                         "path of a Dom0 log (JSON Lines)") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UsageError("log", f"{path}: not a regular file (a FIFO, device or "
                             "directory); give the path of a Dom0 log (JSON Lines)")
        return _render(fd, path, st.st_size, json_out)
    finally:
        os.close(fd)


def _render(fd: int, path: str, size: int, json_out: bool) -> str:
    out: list[str] = []
    n = 0
    end = 0
    for off, raw in _lines(fd, 0, size):
        n += 1
        end = off + (len(raw) + 1 if raw is not None else 0)
        if raw is None:
            raise UsageError("log", f"{path} line {n}: longer than {MAX_LINE} bytes: not an "
                             f"{SCHEMA} record; the log is corrupt: move the line aside")
        obj = _parse_line(raw)
        if obj is None:
            raise UsageError("log", f"{path} line {n}: not a valid {SCHEMA} JSON record; the "
                             "log is corrupt: move the line aside")
        try:
            recs = mcelog_records(obj)
            text = [] if json_out else [x + "\n" for m in recs for x in format_record(m)]
        except _BadField as exc:
            raise UsageError("log", f"{path} line {n}: bad field {exc}") from None
        except (ValueError, TypeError, AttributeError, KeyError, IndexError,
                OverflowError, RecursionError) as exc:
            raise UsageError("log", f"{path} line {n}: bad field ({type(exc).__name__}: "
                             f"{str(exc)[:80]})") from None
        out.append(raw.decode() + "\n" if json_out else "".join(text))
    if end < size:
        raise UsageError("log", f"{path} line {n + 1}: torn line (no newline at the end: Dom0 "
                         "died while writing it); Dom0 repairs it at its next start, or "
                         "delete that partial line")
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
        # Under controlled scheduling (hook sched_idle), Dom0 says "idle" before it
        # sleeps, with the number of virq/pause/resume notifications it has handled, so
        # the machine knows when no request is to come (emu.machine.channels._dom0_step).
        self.sched_idle = bool(self.hooks.get("sched_idle"))
        self.notes = 0
        self._idle_said: int | None = None
        self.quit = False
        self.fetched = 0                 # records fetched by this process (die_count)
        self.drains = 0
        self.duplicates = 0
        self.ack_failures = 0
        die_at = self.hooks.get("die_at")
        if die_at is not None and die_at not in DIE_POINTS + TEST_DIE_POINTS:
            raise UsageError("hooks.die_at", f"{die_at!r}: choose one of "
                             f"{', '.join(DIE_POINTS + TEST_DIE_POINTS)}")
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
        if name in ("virq", "pause", "resume"):
            self.notes += 1
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
            _maybe_fail_write(self.hooks, self.log.path)
            self.log.append([line])
        self._maybe_die("after_write")
        if self.hooks.get("forge_ack") and self.fetched == 1:
            # Test hook: a buggy or hostile logger acks an id that is not the head.
            ok, acked = self.ch.request("ack", {"cls": item.get("cls", cls), "id": rid + 1})
            self.forged = {"ok": ok, "acked": acked}
        if self.die_at == "ack_sent" and self.fetched == self.die_count:
            self.ch.send("ack", {"cls": item.get("cls", cls), "id": rid})
            self.ch.conn.close()
            os._exit(9)
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
                self._idle_said = None
                self.drain()
                # everything that arrived meanwhile, before deciding on another drain
                self._service_between_records()
                continue
            if self.sched_idle and self._idle_said != self.notes and not self.ch.pending:
                self._idle_said = self.notes
                self.ch.send("idle", {"seen": self.notes})
            note = self.ch.next_notification()
            if note is not None:
                self.handle(*note)


def dom0_main(conn, log_path, fsync: bool = True, hooks: dict | None = None, *,
              kernel_log_path=None, cpuid: int = DEFAULT_CPUID, rotate_bytes: int = 0,
              rotate_keep: int = 8) -> int:
    """Body of the Dom0 process: log telemetry durably, run Dom0's #MC handler.

    ``hooks``: ``{"die_at": "before_write"|"mid_write"|"after_write"|"after_ack"|"ack_sent",
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
    kernel = None
    try:
        _maybe_fail_write(hooks, log.path)
        dropped = log.open()
        if dropped:
            print(f"dom0: {log.path}: torn last line repaired, {dropped} bytes dropped",
                  file=sys.stderr, flush=True)
        klog = kernel_log_path if kernel_log_path is not None \
            else f"{os.fspath(log_path)}.kernel"
        kernel = GuestKernel(0, ch, klog, fsync=fsync)
        Dom0Logger(ch, log, kernel, hooks, cpuid).run()
    except ChannelClosed:
        pass
    except (OSError, UsageError) as exc:
        # The log cannot be written (ENOSPC, EIO, EROFS, /dev/full, corrupt): nothing
        # unwritten was acked, so Xen keeps the record; say why, then exit (the
        # coordinator restarts Dom0 with a back-off, so it recovers with the disk).
        _report_log_failure(ch, log.path, exc)
        if kernel is not None:
            kernel.close()
        log.close()
        os._exit(EXIT_LOG_FAILED)
    finally:
        if kernel is not None:
            kernel.close()
        log.close()
    return ch.rejected


EXIT_LOG_FAILED = 74   # EX_IOERR


def log_failure(path: str, exc: BaseException) -> dict:
    """What the result and stderr say about a log Dom0 could not write."""
    if isinstance(exc, OSError):
        name = errno.errorcode.get(exc.errno or 0, "EIO")
        path = exc.filename or path
        return {"errno": name, "path": os.fspath(path), "message": exc.strerror or str(exc)}
    return {"errno": "ECORRUPT", "path": path, "message": str(exc)}


def _report_log_failure(ch: Channel, path: str, exc: BaseException) -> None:
    f = log_failure(path, exc)
    try:
        print(f"dom0: cannot write {f['path']}: {f['errno']} ({f['message']}); the record "
              "stays in Xen's telemetry pool", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
    try:
        ch.send("log_failed", f)
    except (OSError, ValueError):
        pass


def _maybe_fail_write(hooks: dict | None, path: str) -> None:
    """Test hook ``fail_write``: the path of a file; while it exists, writing the
    log fails with ENOSPC (a full disk that space can come back to)."""
    flag = (hooks or {}).get("fail_write")
    if flag and os.path.exists(flag):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
