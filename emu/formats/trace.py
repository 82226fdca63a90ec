"""A trial's trace (``Machine.trace()``, ``emu run --trace``) as Chrome Trace Event
JSON, a PNG swimlane picture, and a few lines of prose (``emu run --explain``).

The trace (:mod:`emu.machine.tracing`): every yield point of every CPU with what it
was about to touch (bank and register, lock, barrier step and generation, Xen word),
each CPU's phase changes and VIRQ, all stamped with ``time.monotonic_ns()`` and
ordered by one shared sequence counter; and the coordinator's events (the raise,
late doorbells, resets, the VIRQ it forwards, Dom0's fetch, write and ack, each
guest's vMCE, trapped MSR accesses and handler report).

The Trace Event export (the format Perfetto's UI and ``chrome://tracing`` open):
one process track per CPU, the coordinator, Dom0 and each guest; phases as complete
slices (``X``), bank reads and clears, lock attempts, acquisitions and releases,
barrier steps and the rest as instants (``i``); flow arrows (``s``/``f``) from the
raise to each CPU's entry and from the softirq worker's VIRQ to Dom0's fetch.
Timestamps are µs from the trace's first event; every track is in time order.

Not shown: the value a read returned (the trial result's owners say who found an
error: :func:`explain` combines the two), Dom0's and guests' own clocks (their
requests are stamped when the coordinator serves them).
"""
from __future__ import annotations

import json

from emu.hw import msr

REG_NAMES = ("CTL", "STATUS", "ADDR", "MISC", "CTL2")
MCG_NAMES = ("MCG_STATUS", "MCG_CTL", "MCG_CAP", "MCG_EXT_CTL")
MCG_BANK = 0xFF
BARRIER_STEPS = ("enter: ingen++", "enter: val++", "exit: outgen++", "exit: val--")
PH_VALUES = {"B", "E", "X", "i", "I", "s", "t", "f", "M", "C", "b", "n", "e"}
ORDINAL = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")

# JSON Schema of what this module writes (the Trace Event format's required keys).
TRACE_EVENT_SCHEMA = {
    "type": "object",
    "required": ["traceEvents"],
    "properties": {
        "traceEvents": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "ph", "pid", "tid"],
                "properties": {
                    "name": {"type": "string"},
                    "ph": {"enum": sorted(PH_VALUES)},
                    "pid": {"type": "integer"},
                    "tid": {"type": "integer"},
                    "ts": {"type": "number"},
                    "dur": {"type": "number", "minimum": 0},
                    "s": {"enum": ["g", "p", "t"]},
                    "cat": {"type": "string"},
                    "id": {"type": ["integer", "string"]},
                    "args": {"type": "object"},
                },
                "allOf": [
                    {"if": {"properties": {"ph": {"not": {"const": "M"}}}},
                     "then": {"required": ["ts"]}},
                    {"if": {"properties": {"ph": {"const": "X"}}}, "then": {"required": ["dur"]}},
                    {"if": {"properties": {"ph": {"enum": ["s", "t", "f"]}}},
                     "then": {"required": ["id", "cat"]}},
                ],
            },
        },
        "displayTimeUnit": {"enum": ["ms", "ns"]},
    },
}


# -- decoding ----------------------------------------------------------------------------
def msr_name(bank: int | None, reg: int) -> str:
    if bank is None:
        return MCG_NAMES[reg] if reg < len(MCG_NAMES) else f"MCG_{reg}"
    return f"MC{bank}_{REG_NAMES[reg] if reg < len(REG_NAMES) else reg}"


def decode(tr: dict) -> list[dict]:
    """The CPUs' entries as dicts, in sequence order: ``seq, cpu, site, t_ns`` and
    per site: rdmsr/wrmsr ``bank`` (None: an MCG register), ``reg``, ``msr``;
    lock/unlock ``lock``; barrier ``barrier``, ``step``, ``gen``; atomic ``word``,
    ``value``; phase ``phase``; telem ``slot``; page ``mfn``; vmce ``domain``,
    ``mfn``; softirq ``of_cpu``."""
    sites, phases = tr["sites"], tr["phases"]
    names = {int(k): v for k, v in tr["names"].items()}
    out = []
    for seq, cpu, site_i, t, d0, d1 in sorted(tr["entries"]):
        site = sites[site_i] if site_i < len(sites) else f"site{site_i}"
        e = {"seq": seq, "cpu": cpu, "site": site, "t_ns": t}
        if site in ("rdmsr", "wrmsr"):
            bank = None if d0 == MCG_BANK else d0
            e.update(bank=bank, reg=d1, msr=msr_name(bank, d1))
        elif site in ("lock", "unlock", "acquired"):
            e["lock"] = names.get(d0, f"lock@{d0:#x}")
        elif site == "barrier":
            off, step = d0 & 0xFFFFFFFF, d0 >> 32
            e.update(barrier=names.get(off, f"barrier@{off:#x}"),
                     step=BARRIER_STEPS[step] if step < 4 else str(step), gen=d1)
        elif site == "atomic":
            e.update(word=names.get(d0, f"word@{d0:#x}"), value=d1)
        elif site == "phase":
            e["phase"] = phases[d0] if d0 < len(phases) else str(d0)
        elif site == "telem":
            e["slot"] = d0
        elif site == "page":
            e["mfn"] = d0
        elif site == "vmce":
            e.update(domain=d0, mfn=d1)
        elif site == "softirq":
            e["of_cpu"] = d0
        out.append(e)
    return out


def lock_acquisitions(entries: list[dict], lock: str = "mce_logout_lock") -> list[dict]:
    """Each time a CPU held ``lock``, in order: its acquisition (the entry recorded
    after its cmpxchg succeeded) and its release. ``attempts``: how many tries."""
    last: dict[int, dict] = {}
    tries: dict[int, int] = {}
    out = []
    for e in entries:
        if e.get("lock") != lock:
            continue
        c = e["cpu"]
        if e["site"] == "lock":
            tries[c] = tries.get(c, 0) + 1
        elif e["site"] == "acquired":
            last[c] = e
        elif e["site"] == "unlock" and c in last:
            a = last.pop(c)
            out.append({"cpu": c, "acquire": a, "release": e, "attempts": tries.pop(c)})
    return out


def phase_runs(entries: list[dict]) -> dict[int, list[tuple[str, int, int]]]:
    """Per CPU, its phases as (name, start_ns, end_ns), the last one ending at the
    CPU's last entry; ``idle`` (after softirq_done) left out."""
    by: dict[int, list] = {}
    last_t: dict[int, int] = {}
    for e in entries:
        last_t[e["cpu"]] = e["t_ns"]
        if e["site"] == "phase":
            by.setdefault(e["cpu"], []).append((e["phase"], e["t_ns"]))
    out = {}
    for c, ps in by.items():
        runs = []
        for k, (name, t) in enumerate(ps):
            end = ps[k + 1][1] if k + 1 < len(ps) else max(last_t[c], t)
            if name != "idle":
                runs.append((name, t, end))
        out[c] = runs
    return out


# -- Chrome Trace Event JSON -------------------------------------------------------------
def _tracks(tr: dict) -> dict[str, int]:
    n = tr["ncpus"]
    t = {"coordinator": 0}
    t.update({f"cpu{c}": c + 1 for c in range(n)})
    t.update({f"dom{d}": n + 1 + d for d in tr["domids"]})
    return t


def _instant_name(e: dict) -> str:
    s = e["site"]
    if s == "rdmsr":
        return f"rdmsr {e['msr']}"
    if s == "wrmsr":
        clear = e["bank"] is not None and e["reg"] == msr.REG_STATUS
        return f"wrmsr {e['msr']}" + (" (clear)" if clear else "")
    if s == "lock":
        return f"try {e['lock']}"
    if s == "acquired":
        return f"acquire {e['lock']}"
    if s == "unlock":
        return f"release {e['lock']}"
    if s == "barrier":
        return f"{e['barrier']} {e['step']}"
    if s == "atomic":
        return f"atomic {e['word']}"
    if s == "virq":
        return "send VIRQ_MCA"
    return s


def chrome_trace(tr: dict, result: dict | None = None) -> dict:
    """The Trace Event document (a dict; ``json.dump`` it)."""
    entries = decode(tr)
    tracks = _tracks(tr)
    times = [e["t_ns"] for e in entries] + [ev[0] for ev in tr["events"]]
    base = min(times) if times else tr["t0"]

    def ts(t):
        return round((t - base) / 1e3, 3)
    evs: list[dict] = []
    meta: list[dict] = []
    for name, pid in tracks.items():
        label = {"coordinator": "coordinator (reset controller, VIRQ channel)",
                 "dom0": "Dom0 (logger)"}.get(name, name if name.startswith("cpu")
                                               else f"DOM{name[3:]} (guest)")
        meta += [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                  "args": {"name": label}},
                 {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
                  "args": {"sort_index": pid}},
                 {"name": "thread_name", "ph": "M", "pid": pid, "tid": 0,
                  "args": {"name": name}}]
    # phases as slices
    runs = phase_runs(entries)
    entered: dict[int, int] = {}
    for c, rs in runs.items():
        for name, t, end in rs:
            evs.append({"name": name, "cat": "phase", "ph": "X", "pid": c + 1, "tid": 0,
                        "ts": ts(t), "dur": round(max(0, end - t) / 1e3, 3)})
            if name == "entered" and c not in entered:
                entered[c] = t
    # lock attempts, acquisitions and releases, bank reads and clears, ... as instants
    for e in entries:
        if e["site"] == "phase":
            continue
        args = {k: v for k, v in e.items() if k not in ("cpu", "site", "t_ns")}
        name = _instant_name(e)
        evs.append({"name": name, "cat": e["site"], "ph": "i", "s": "t", "pid": e["cpu"] + 1,
                    "tid": 0, "ts": ts(e["t_ns"]), "args": args})
    # the coordinator's events
    fetch_slices = []
    acks = {ev[3].get("id"): ev[0] for ev in tr["events"] if ev[2] == "ack"}
    flow = 0
    for t, track, name, args in tr["events"]:
        pid = tracks.get(track, 0)
        if name == "raise":
            evs.append({"name": "raise #MC", "cat": "coordinator", "ph": "X", "pid": pid,
                        "tid": 0, "ts": ts(t), "dur": 1.0, "args": args})
            for c in args.get("targets", []):
                if c in entered:
                    flow += 1
                    evs.append({"name": "#MC", "cat": "mc", "ph": "s", "id": flow, "pid": pid,
                                "tid": 0, "ts": ts(t)})
                    evs.append({"name": "#MC", "cat": "mc", "ph": "f", "bp": "e", "id": flow,
                                "pid": c + 1, "tid": 0, "ts": ts(entered[c])})
        elif name == "fetch":
            end = acks.get(args.get("id"), t + 1000)
            evs.append({"name": f"record {args.get('id', 0):#x}", "cat": "dom0", "ph": "X",
                        "pid": pid, "tid": 0, "ts": ts(t),
                        "dur": round(max(1, end - t) / 1e3, 3), "args": args})
            fetch_slices.append(t)
            evs.append({"name": "fetch", "cat": "dom0", "ph": "i", "s": "t", "pid": pid,
                        "tid": 0, "ts": ts(t), "args": args})
        else:
            evs.append({"name": name, "cat": track if track != "coordinator" else "coordinator",
                        "ph": "i", "s": "t", "pid": pid, "tid": 0, "ts": ts(t), "args": args})
    # VIRQ: the worker's send -> Dom0's next fetch
    for e in entries:
        if e["site"] != "virq":
            continue
        nxt = [t for t in fetch_slices if t >= e["t_ns"]]
        if nxt:
            flow += 1
            evs.append({"name": "VIRQ_MCA", "cat": "virq", "ph": "s", "id": flow,
                        "pid": e["cpu"] + 1, "tid": 0, "ts": ts(e["t_ns"])})
            evs.append({"name": "VIRQ_MCA", "cat": "virq", "ph": "f", "bp": "e", "id": flow,
                        "pid": tracks["dom0"], "tid": 0, "ts": ts(min(nxt))})
    order = {"X": 0, "s": 1, "f": 1, "i": 2}
    evs.sort(key=lambda x: (x["pid"], x["ts"], order.get(x["ph"], 3)))
    other = {"schema": tr.get("schema"), "trial": tr.get("trial"), "handler": tr.get("handler"),
             "topology": tr.get("topology"), "dropped": tr.get("dropped", 0),
             "raise_ts_us": ts(tr["t0"])}
    if result is not None:
        other["outcome"] = result.get("outcome")
    return {"traceEvents": meta + evs, "displayTimeUnit": "ns", "otherData": other}


def validate(doc: dict) -> list[str]:
    """What is wrong with a Trace Event document (empty: nothing): required keys,
    ``ph`` values, durations, flow ids, timestamps in order on every track."""
    errs = []
    evs = doc.get("traceEvents")
    if not isinstance(evs, list):
        return ["traceEvents: missing or not a list"]
    last: dict = {}
    for k, e in enumerate(evs):
        for key in ("name", "ph", "pid", "tid"):
            if key not in e:
                errs.append(f"event {k}: no {key!r}")
        ph = e.get("ph")
        if ph not in PH_VALUES:
            errs.append(f"event {k}: ph {ph!r}")
        if ph == "M":
            continue
        if not isinstance(e.get("ts"), (int, float)):
            errs.append(f"event {k}: ts {e.get('ts')!r}")
            continue
        if ph == "X" and not (isinstance(e.get("dur"), (int, float)) and e["dur"] >= 0):
            errs.append(f"event {k}: X without a dur >= 0")
        if ph in ("s", "t", "f") and ("id" not in e or "cat" not in e):
            errs.append(f"event {k}: flow without id/cat")
        track = (e.get("pid"), e.get("tid"))
        if e["ts"] < last.get(track, float("-inf")):
            errs.append(f"event {k}: ts {e['ts']} before {last[track]} on track {track}")
        last[track] = e["ts"]
    return errs


def write_chrome_trace(tr: dict, path: str, result: dict | None = None) -> dict:
    doc = chrome_trace(tr, result)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f)
    return doc


# -- the picture -------------------------------------------------------------------------
PHASE_COLOURS = {"entered": "#1f77b4", "logout": "#ff7f0e", "barrier_a": "#2ca02c",
                 "barrier_b": "#98df8a", "fatal_check": "#d62728", "barrier_c": "#9467bd",
                 "exit": "#8c564b", "softirq": "#e377c2", "softirq_worker": "#f7b6d2",
                 "softirq_done": "#7f7f7f", "panic": "#000000", "halted": "#444444"}


def swimlane_png(tr: dict, path: str, result: dict | None = None) -> None:
    """One lane per CPU (phases as bars; bank reads, clears, lock acquire/release as
    marks), then Dom0 and the guests; arrows from the raise to each CPU's entry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    entries = decode(tr)
    t0 = tr["t0"]

    def us(t):
        return (t - t0) / 1e3
    n = tr["ncpus"]
    lanes = ["coordinator"] + [f"cpu{c}" for c in range(n)] + [f"dom{d}" for d in tr["domids"]]
    y = {name: len(lanes) - 1 - k for k, name in enumerate(lanes)}
    fig, ax = plt.subplots(figsize=(13, 1.2 + 0.45 * len(lanes)))
    runs = phase_runs(entries)
    seen = set()
    for c, rs in runs.items():
        for name, t, end in rs:
            lab = name if name not in seen else None
            seen.add(name)
            ax.broken_barh([(us(t), max(us(end) - us(t), 0.5))], (y[f"cpu{c}"] - 0.35, 0.7),
                           color=PHASE_COLOURS.get(name, "#bbbbbb"), label=lab)
    marks = {"read": ([], [], "|", "k"), "clear": ([], [], "x", "red"),
             "acquire": ([], [], "^", "green"), "release": ([], [], "v", "olive")}
    for e in entries:
        lane = y[f"cpu{e['cpu']}"]
        if e["site"] == "rdmsr" and e["bank"] is not None and e["reg"] == msr.REG_STATUS:
            k = "read"
        elif e["site"] == "wrmsr" and e["bank"] is not None and e["reg"] == msr.REG_STATUS:
            k = "clear"
        elif e["site"] == "acquired":
            k = "acquire"
        elif e["site"] == "unlock":
            k = "release"
        else:
            continue
        marks[k][0].append(us(e["t_ns"]))
        marks[k][1].append(lane)
    for k, (xs, ys, m, col) in marks.items():
        if xs:
            ax.scatter(xs, ys, marker=m, color=col, s=28, zorder=3,
                       label={"read": "bank STATUS read", "clear": "bank cleared",
                              "acquire": "mce_logout_lock acquired",
                              "release": "lock released"}[k])
    first_entry = {}
    for c, rs in runs.items():
        for name, t, _ in rs:
            if name == "entered":
                first_entry.setdefault(c, t)
    for t, track, name, args in tr["events"]:
        lane = y.get(track, y["coordinator"])
        ax.scatter([us(t)], [lane], marker="o", s=22, color="#333333", zorder=3)
        ax.annotate(name, (us(t), lane), textcoords="offset points", xytext=(2, 6), fontsize=7)
        if name == "raise":
            for c in args.get("targets", []):
                if c in first_entry:
                    ax.annotate("", xy=(us(first_entry[c]), y[f"cpu{c}"]),
                                xytext=(us(t), lane),
                                arrowprops={"arrowstyle": "->", "color": "#1f77b4", "lw": 0.8})
    ax.set_yticks([y[name] for name in lanes], lanes)
    ax.set_xlabel("µs from the raise")
    title = f"trial {tr.get('trial')}: {tr.get('handler')} on {tr.get('topology')}"
    if result is not None:
        title += f", outcome {result.get('outcome')}"
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- prose -------------------------------------------------------------------------------
def explain(tr: dict, result: dict, max_lock_lines: int = 4) -> list[str]:
    """The trial told in a few lines, from the trace and the trial result (past
    ``max_lock_lines`` lock holders, those that found nothing in one line)."""
    entries = decode(tr)
    t0 = tr["t0"]

    def us(t):
        return f"{(t - t0) / 1e3:.1f} µs"
    lines = []
    raise_ev = next((ev for ev in tr["events"] if ev[2] == "raise"), None)
    targets = raise_ev[3]["targets"] if raise_ev else result.get("targets", [])
    lines.append(f"trial {tr.get('trial')} ({tr.get('handler')}, {tr.get('topology')}): the "
                 f"coordinator raised #MC on {', '.join(f'cpu{c}' for c in targets)} "
                 "(times from the raise)")
    runs = phase_runs(entries)
    ent = sorted((t, c) for c, rs in runs.items() for name, t, _ in rs if name == "entered")
    if ent:
        lines.append("entered: " + ", ".join(f"cpu{c} at {us(t)}" for t, c in ent))
    errors = result.get("errors", [])
    acqs = lock_acquisitions(entries)
    owners = {c for e in errors for c in e.get("owners", [])}
    quiet = []   # past the first few: CPUs that found nothing, told in one line
    for k, a in enumerate(acqs):
        if k >= max_lock_lines and a["cpu"] not in owners:
            quiet.append(a)
            continue
        c = a["cpu"]
        lo, hi = a["acquire"]["seq"], a["release"]["seq"]
        held = [e for e in entries if e["cpu"] == c and lo <= e["seq"] <= hi]
        parts = []
        for e in errors:
            if c not in e.get("sharers", [c]) and c != e["cpu"]:
                continue
            b = e["bank"]
            read = any(x["site"] == "rdmsr" and x["bank"] == b and x["reg"] == msr.REG_STATUS
                       for x in held)
            if not read:
                continue
            cleared = any(x["site"] == "wrmsr" and x["bank"] == b and x["reg"] == msr.REG_STATUS
                          for x in held)
            if c in e.get("owners", []):
                parts.append(f"read bank {b}: {e['status']}" +
                             (", cleared it: owner" if cleared else ", left it (not clearable)"))
            else:
                parts.append(f"read bank {b} empty")
        o = ORDINAL[k] if k < len(ORDINAL) else f"#{k + 1}"
        tries = f" (after {a['attempts'] - 1} failed tries)" if a["attempts"] > 1 else ""
        lines.append(f"cpu{c} took mce_logout_lock {o} at {us(a['acquire']['t_ns'])}{tries}"
                     + (", " + ", ".join(parts) if parts else "")
                     + f"; released it at {us(a['release']['t_ns'])}")
    if quiet:
        who = ", ".join(f"cpu{q['cpu']}" for q in quiet)
        lines.append(f"then {len(quiet)} more took it in turn and logged nothing of these "
                     f"errors: {who} (the last released it at "
                     f"{us(quiet[-1]['release']['t_ns'])})")
    fatal = [(t, c) for c, rs in runs.items() for name, t, _ in rs if name == "fatal_check"]
    for t, c in fatal:
        sev = [e for e in entries if e.get("word") == "severity_cpu" and e["t_ns"] <= t]
        last = sev[-1]["cpu"] if sev else None
        lines.append(f"cpu{c} ran the fatal check at {us(t)}"
                     + (" (severity_cpu: the last CPU to write it)" if last == c else ""))
    for c, rs in runs.items():
        for name, t, _ in rs:
            if name == "panic":
                lines.append(f"cpu{c} panicked at {us(t)}: {result.get('panic') or '?'}; "
                             "the others halted and the reset controller reset the machine")
    ex = sorted((t, c) for c, rs in runs.items() for name, t, _ in rs if name == "exit")
    if ex:
        lines.append(f"all left the handler by {us(ex[-1][0])} (cpu{ex[-1][1]} last)")
    for e in entries:
        if e["site"] == "virq":
            lines.append(f"cpu{e['cpu']} was the softirq worker and sent VIRQ_MCA at "
                         f"{us(e['t_ns'])}")
    for t, track, name, args in tr["events"]:
        if track == "dom0" and name in ("fetch", "ack"):
            lines.append(f"Dom0 {'fetched' if name == 'fetch' else 'acked'} record "
                         f"{args.get('id', 0):#x} at {us(t)}")
        elif track == "dom0" and name == "write":
            lines.append(f"Dom0 reported record(s) {', '.join(f'{i:#x}' for i in args['ids'])} "
                         f"written to its log (durable) at {us(t)}")
        elif name == "vmce":
            lines.append(f"DOM{track[3:]} got a vMCE on vCPU(s) {args['vcpus']} at {us(t)}")
        elif name == "handled":
            lines.append(f"DOM{track[3:]}'s handler on vCPU {args.get('vcpu')} was done at "
                         f"{us(t)}")
        elif name in ("doorbell", "reset"):
            lines.append(f"coordinator: {name} {args} at {us(t)}")
    trapped = [ev for ev in tr["events"] if ev[2] in ("rdmsr", "wrmsr")]
    if trapped:
        lines.append(f"guests' trapped MSR accesses: {len(trapped)}")
    lines.append(f"outcome: {result.get('outcome')}, resets {result.get('resets')}, "
                 f"{len(entries)} trace entries"
                 + (f" ({tr['dropped']} dropped: ring full)" if tr.get("dropped") else ""))
    return lines
