"""``emu log``: every log a run writes, each in its own rendering.

- Dom0's records (``dom0.jsonl`` and its rotated parts, ``emu.mcelog/1``): a line
  naming the record (id, boot and sequence, class, source), the CPU whose handler
  logged it and - from the run's ``trials.jsonl`` - the CPUs that took the #MC and the
  CPU the error was raised on (for a shared bank these differ: Xen's first scanner
  logs it); then mcelog ``--ascii`` text per bank (:func:`emu.domains.mcelog.
  format_record`, as Linux's ``convert_log`` hands it to mcelog: with the logging CPU).
- Dom0's kernel log (``dom0.jsonl.kernel``) and the guests' logs
  (``dom<D>.guest.jsonl``, ``emu.guestlog/1``): the kernel's console lines, prefixed
  ``[domD vCPUv time]``, and the probes made through it.
- ``raw=True``: the lines as stored, each file under a ``==> path <==`` header when a
  run directory is given (as ``tail`` prints several files).
- :func:`follow`: the same, for what a running machine appends (rotation-aware).
- :func:`mcelog_ascii`: mcelog's own text input decoded as ``mcelog --ascii`` does.

Only regular files are read, and only complete lines (a torn last line - a writer
that died mid-line, or one still writing - is left for later and said so).
"""
from __future__ import annotations

import json
import os
import stat
import sys
import time

from emu.domains.dom0 import SCHEMA as MCELOG_SCHEMA, mcelog_records
from emu.domains.guest import GUEST_LOG_SCHEMA
from emu.domains.logfiles import (
    DOM0_LOG,
    KERNEL_SUFFIX,
    TRIALNOTE_SCHEMA,
    TRIALS,
    dom0_log_parts,
    guest_logs,
    rotated_parts,
)
from emu.domains.mcelog import format_log, format_record, parse_ascii
from emu.errors import UsageError

__all__ = ["run_logs", "render", "render_file", "follow", "mcelog_ascii", "kind_of"]

MAX_LINE = 1 << 20


def kind_of(path: str) -> str:
    """"dom0", "kernel", "guest" or "trials", by the file's name."""
    name = os.path.basename(path)
    if name.endswith(KERNEL_SUFFIX):
        return "kernel"
    if name.endswith(".guest.jsonl"):
        return "guest"
    if name.startswith(TRIALS):
        return "trials"
    return "dom0"


def run_logs(path: str) -> list[tuple[str, str]]:
    """(kind, path) of every log of a run directory (or the one file given), in the
    order rendered: Dom0's records (oldest part first), Dom0's kernel log, the guests."""
    if os.path.isdir(path):
        dom0 = os.path.join(path, DOM0_LOG)
        out = [("dom0", p) for p in dom0_log_parts(dom0) if os.path.exists(p)]
        if os.path.exists(dom0 + KERNEL_SUFFIX):
            out.append(("kernel", dom0 + KERNEL_SUFFIX))
        out += [("guest", p) for p in guest_logs(path)]
        if not out:
            raise UsageError("file", f"{path}: no emu log in this directory (dom0.jsonl, "
                             "dom0.jsonl.kernel, domN.guest.jsonl); give a run directory")
        return out
    if not os.path.exists(path):
        raise UsageError("file", f"{path}: no such log; give the dom0_log_path of a run, one "
                         "of its logs, or its directory")
    return [(kind_of(path), path)]


def _check_regular(path: str) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise UsageError("file", f"{path}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError("file", f"{path}: not a regular file; give a log a run wrote")


def _lines(path: str, offset: int = 0) -> tuple[list[tuple[int, bytes]], int, bool]:
    """Complete lines from ``offset``: ([(line number from offset, raw)], the offset
    after the last complete line, whether a partial line follows)."""
    _check_regular(path)
    out = []
    with open(path, "rb") as f:
        f.seek(offset)
        n = 0
        while True:
            raw = f.readline(MAX_LINE + 1)
            if not raw:
                return out, offset, False
            if not raw.endswith(b"\n"):
                if len(raw) > MAX_LINE:
                    raise UsageError("file", f"{path}: a line longer than {MAX_LINE} bytes: "
                                     "not an emu log")
                return out, offset, True
            n += 1
            offset += len(raw)
            out.append((n, raw[:-1]))


def _trials(run_dir: str) -> dict[int, dict]:
    """record id -> what the run's trials.jsonl says about it."""
    path = os.path.join(run_dir, TRIALS)
    out: dict[int, dict] = {}
    if not os.path.isfile(path):
        return out
    for _, raw in _lines(path)[0]:
        try:
            t = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(t, dict) or t.get("schema") != TRIALNOTE_SCHEMA:
            continue
        for e in t.get("errors") or []:
            for rid in e.get("records") or []:
                out.setdefault(rid, {"trial": t, "error": e})
        for b in t.get("boot_log") or []:
            if b.get("record_id"):
                out.setdefault(b["record_id"], {"trial": t, "boot": b})
    return out


def _cpus(cpus) -> str:
    cpus = sorted(cpus or [])
    if len(cpus) > 2 and cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"CPUs {cpus[0]}-{cpus[-1]}"
    return ("CPU " if len(cpus) == 1 else "CPUs ") + ", ".join(map(str, cpus))


def dom0_header(obj: dict, trials: dict[int, dict]) -> str:
    """The line before a record's mcelog text: which CPU logged it, which took the #MC."""
    rid = obj.get("id", 0)
    banks = ", ".join(str(b.get("bank")) for b in obj.get("banks") or [])
    src = "boot-time logout" if obj.get("source") == "boot" else obj.get("source") or "?"
    head = (f"emu: record {rid:#x} (boot {obj.get('boot')}, seq {obj.get('seq')}, "
            f"{obj.get('cls')}, {src}): bank {banks or '-'} logged by CPU {obj.get('cpu')}")
    t = trials.get(rid)
    if t is None:
        return head + "; which CPU took the #MC is not known (no trials.jsonl entry)"
    tr = t["trial"]
    if "boot" in t:
        return head + (f" at boot after trial {tr.get('trial')}'s reset "
                       f"({tr.get('outcome')})")
    e = t["error"]
    via = e.get("via") or "mce"
    if via == "cmci":
        head += (f"; trial {tr.get('trial')}: CMCI taken by {_cpus(e.get('cmci_cpus'))}, "
                 f"error reported on CPU {e.get('cpu')} bank {e.get('bank')} (the bank's "
                 "CMCI owner logs it)")
        return head
    if via == "poll" or obj.get("source") == "poll":
        return head + (f"; trial {tr.get('trial')}: found by Xen's poller, error reported on "
                       f"CPU {e.get('cpu')} bank {e.get('bank')}")
    how = "LMCE" if tr.get("local") else "broadcast"
    head += (f"; trial {tr.get('trial')}: #MC taken by {_cpus(tr.get('targets'))} ({how}), "
             f"error raised on CPU {e.get('cpu')} bank {e.get('bank')}")
    sharers = e.get("sharers") or []
    if len(sharers) > 1:
        head += f" (a bank shared by {_cpus(sharers)}: the first to scan it logs it)"
    return head


def _dom0_text(obj: dict, trials: dict[int, dict], where: str) -> list[str]:
    try:
        recs = mcelog_records(obj)
    except (ValueError, TypeError, AttributeError) as exc:
        raise UsageError("file", f"{where}: bad field ({exc})") from None
    out = [dom0_header(obj, trials)]
    for m in recs:
        out += format_record(m)
    return out


def _when(t) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}"


def _guest_text(obj: dict) -> list[str]:
    d = obj.get("domid")
    v = obj.get("vcpu")
    pre = f"[dom{d}{'' if v is None else f' vCPU{v}'} {_when(obj.get('t'))}]"
    out = [f"{pre} {line}" for line in obj.get("console") or []]
    if "probe" in obj:
        p = obj["probe"] if isinstance(obj["probe"], dict) else {}
        req = p.get("probe") or {}
        out.append(f"{pre} probe {json.dumps(req, sort_keys=True)} -> "
                   + json.dumps({k: v for k, v in p.items() if k != "probe"}, sort_keys=True))
    return out


def _render_lines(kind: str, path: str, lines, trials, raw: bool) -> list[str]:
    out = []
    for n, line in lines:
        if raw:
            out.append(line.decode(errors="replace"))
            continue
        where = f"{path} line {n}"
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            obj = None
        want = {"dom0": MCELOG_SCHEMA, "kernel": GUEST_LOG_SCHEMA, "guest": GUEST_LOG_SCHEMA,
                "trials": TRIALNOTE_SCHEMA}[kind]
        if not isinstance(obj, dict) or obj.get("schema") != want:
            raise UsageError("file", f"{where}: not an {want} record; the log is corrupt: "
                             "move the line aside")
        if kind == "dom0":
            if not isinstance(obj.get("id"), int):
                raise UsageError("file", f"{where}: no record id")
            out += _dom0_text(obj, trials, where)
        elif kind == "trials":
            out.append(json.dumps(obj, sort_keys=True))
        else:
            out += _guest_text(obj)
    return out


def render_file(kind: str, path: str, *, raw: bool = False, trials=None) -> str:
    """One log in its rendering (or raw); a torn last line is noted, not fatal."""
    lines, _, torn = _lines(path)
    if trials is None:
        trials = _trials(os.path.dirname(os.path.abspath(path))) if kind == "dom0" else {}
    out = _render_lines(kind, path, lines, trials, raw)
    if torn:
        print(f"emu: {path}: its last line is incomplete (a writer died mid-line, or is "
              "still writing): not shown", file=sys.stderr)
    return "".join(x + "\n" for x in out)


def render(path: str, *, raw: bool = False, headers: bool = True) -> str:
    """``emu log PATH``: a run directory (every log, each under a header unless
    ``headers`` is false) or one log."""
    logs = run_logs(path)
    if len(logs) == 1 and not os.path.isdir(path):
        return render_file(*logs[0], raw=raw)
    run_dir = path
    trials = _trials(run_dir)
    parts = []
    for kind, p in logs:
        title = {"dom0": "Dom0's records", "kernel": "Dom0's kernel log",
                 "guest": f"guest log ({os.path.basename(p).split('.')[0]})"}[kind]
        body = render_file(kind, p, raw=raw, trials=trials)
        if not headers:
            parts.append(body)
            continue
        body = body or "(empty)\n"
        parts.append((f"==> {p} <==\n" if raw else f"==> {title}: {p} <==\n") + body)
    return ("\n" if headers else "").join(parts)


def follow(path: str, *, raw: bool = False, out=None, poll_s: float = 0.2,
           stop=None) -> int:
    """Print what is there, then what is appended, until interrupted (or ``stop()``
    is true after a round). A log replaced by a rotation is finished from its rotated
    part, then read from its start; a run directory's new logs are picked up."""
    out = out or sys.stdout
    is_dir = os.path.isdir(path)
    run_logs(path)            # a usage error now, not in the loop
    seen: dict[str, tuple[int, int]] = {}      # path -> (inode, offset read up to)
    first = True

    def emit(kind, p, lines, trials):
        if lines:
            for x in _render_lines(kind, p, lines, trials, raw):
                out.write(x + "\n")
            out.flush()
    while True:
        logs = run_logs(path) if is_dir else [(kind_of(path), path)]
        trials = _trials(path if is_dir else os.path.dirname(os.path.abspath(path)))
        for kind, p in logs:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            if kind == "dom0" and os.path.basename(p) != DOM0_LOG and is_dir:
                if first:                 # a rotated part: whole, once
                    emit(kind, p, _lines(p)[0], trials)
                continue
            prev = seen.get(p)
            off = 0
            if prev is not None and prev[0] != st.st_ino:
                for q in rotated_parts(p):   # finish the part it was rotated into
                    try:
                        if os.stat(q).st_ino == prev[0]:
                            emit(kind, q, _lines(q, prev[1])[0], trials)
                            break
                    except FileNotFoundError:
                        continue
            elif prev is not None and st.st_size >= prev[1]:
                off = prev[1]
            lines, off, _ = _lines(p, off)
            emit(kind, p, lines, trials)
            seen[p] = (st.st_ino, off)
        first = False
        if stop is not None and stop():
            return 0
        time.sleep(poll_s)


def mcelog_ascii(path: str) -> str:
    """``mcelog --ascii < FILE``: mcelog's text input (``-`` for stdin) decoded."""
    if path == "-":
        text = sys.stdin.read()
    else:
        _check_regular(path)
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read(64 << 20)
        except OSError as exc:
            raise UsageError("mcelog-ascii", f"{path}: cannot read it ({exc.strerror})") \
                from None
    return format_log(parse_ascii(text.splitlines()))
