"""``emu bench``: handler latency by phase, CPU count and handler version, beside two
baselines measured in the same run, with results that can be compared and plotted.

Never timing assertions in tests: the suite's tests check its shape and its verdicts
on deliberately different variants, not its figures.

For each topology (``--cpus`` counts, or ``--topology`` list), one machine per
handler version (``--handler``), all booted together, plus the naive peer design
(``bench/naive_peer.py``: ``multiprocess.Barrier`` and ``Lock`` over a shared bank
array, one process per CPU); then ``--injections`` machine checks per handler, in
blocks of ``--block``, the handlers, the naive peer and the futex floor taking turns
block by block (the first of each turn rotating), so that this VM's drift (tens of
percent within a minute) falls on all alike. Each #MC is a broadcast SRAO in a
package-scoped bank (bank 9) on a free page; every ``--guest-every``-th hits a
fresh page of guest 1 instead (its figures count only for ``guest_handled``, the
guest kernel's own handler done, since the guest's work competes with the rest).

Per phase, latency from the raise, the slowest CPU (:data:`PHASES`): all CPUs
entered, logout done, leaving the first rendezvous, leaving the fatal check's
rendezvous, MCIP cleared, handler exit, softirq done, the record durable in Dom0's
log (fetched, written, fsync'd, acked), the guest's handler done. p50, p90, p99,
max and n. The floor: the one-way futex wake-up of a sleeping process by one on
another core (DESIGN.md). Ratios: each phase's p50 to the floor's p50, and to the
naive peer's p50 of the same phase (entered, logout, first rendezvous, exit).
Besides: boot time (``--boots`` fresh boots), USS per CPU process, stress
throughput (trials/s, from ``bench/stress.py`` when it is there).

The injections are shared among ``--instances`` machine instances per variant,
booted one after the other: on this VM two instances of the same machine differ by
up to a third (where the host puts their processes), more than the samples of one
instance spread. Variants in ``--handler``: ``VERSION+trace`` runs that version on
a tracing machine, beside the untraced one (what the trace ring costs);
``VERSION+nofsync`` with Dom0's fsync off (what durability costs).

Results: one JSON object per (topology, handler) with ``schema`` :data:`SCHEMA`,
its samples included (per instance), so that ``--compare OLD NEW`` can bootstrap
each figure's ratio (as ``pyperf compare_to`` does over its worker processes; here a
two-level bootstrap, instances then samples, of the ratio of medians instead of a
t-test).
"""
from __future__ import annotations

import importlib.util
import json
import mmap
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from emu.errors import UsageError
from emu.hw.atomic import atomics
from emu.hw.futex import futex_wait, futex_wake
from emu.hw.topology import MAX_CPUS, parse_topology

SCHEMA = "emu.bench/1"
TOPOLOGY = {1: "1x1x1", 2: "1x2x1", 4: "1x2x2", 8: "1x4x2", 16: "1x8x2", 32: "2x8x2",
            64: "2x16x2", 128: "4x16x2", 256: "4x32x2"}
PHASES = ("all_entered", "logout_done", "barrier_a", "fatal_check_done", "mcip_cleared",
          "handler_exit", "softirq_done", "dom0_logged", "guest_handled")
PHASE_LABEL = {"all_entered": "all CPUs entered", "logout_done": "logout done",
               "barrier_a": "left 1st rendezvous", "fatal_check_done": "fatal check done",
               "mcip_cleared": "MCIP cleared", "handler_exit": "handler exit",
               "softirq_done": "softirq done", "dom0_logged": "Dom0 record durable",
               "guest_handled": "guest handler done"}
# The naive peer's stamps, by the emu phase they match (its first rendezvous comes
# before its logout, so it has no counterpart of emu's barrier_a: shown, not a ratio)
NAIVE_PHASE = {"all_entered": "entered", "logout_done": "logout_done",
               "handler_exit": "handler_exit"}
NAIVE_STAMPS = ("entered", "barrier_a", "logout_done", "handler_exit")
GUEST_PAGES = 0xF00   # a guest page takes one error: a second would crash the guest
ROOT = Path(__file__).resolve().parents[1]


# -- the floor ---------------------------------------------------------------------------
def futex_floor(rounds: int = 1000, gap_s: float = 0.0002) -> dict:
    """One-way wake-up latency of a sleeping process by futex (µs), the sleeper
    asleep for ``gap_s`` before each wake-up. On this VM the figure grows with the
    gap (seen: 22 µs at 0.2 ms, 35 µs at 1 ms, 44 µs at 2 ms), as an idle vCPU
    sleeps deeper on the host, past KVM's halt polling.

    With two or more host cores, the sleeper runs on the second and the waker on the
    first: the wake-up of a process *on the other core*, as DESIGN.md defines the
    floor (left to the scheduler, the two share a core now and then, and that
    wake-up is another thing: 10-15 µs here against 19-25 µs). ``samples_us``: every
    round's figure."""
    m = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
    A = atomics(m)
    base = A.address
    cores = sorted(os.sched_getaffinity(0))
    old_affinity = set(cores)
    pid = os.fork()
    if pid == 0:   # the sleeper: wait for each round, stamp the wake time
        try:
            if len(cores) > 1:
                os.sched_setaffinity(0, {cores[1]})
            for k in range(1, rounds + 1):
                while A.load(0) < k:
                    futex_wait(base, A.load(0) & 0xFFFFFFFF, 1.0)
                A.store(16 + 8 * (k % 256), time.monotonic_ns())
                A.store(8, k)   # ack
        finally:
            os._exit(0)
    lat = []
    try:
        if len(cores) > 1:
            os.sched_setaffinity(0, {cores[0]})
        for k in range(1, rounds + 1):
            time.sleep(gap_s)   # the sleeper reaches FUTEX_WAIT and stays there
            t = time.monotonic_ns()
            A.store(0, k)
            futex_wake(base, 1)
            while A.load(8) < k:
                os.sched_yield()
            lat.append((A.load(16 + 8 * (k % 256)) - t) / 1e3)
    finally:
        os.sched_setaffinity(0, old_affinity)
        os.waitpid(pid, 0)
    a = np.array(lat)
    return {"p50_us": float(np.median(a)), "p99_us": float(np.percentile(a, 99)),
            "samples_us": [round(x, 2) for x in lat]}


# -- input -------------------------------------------------------------------------------
def topology_for(n: int) -> str:
    return TOPOLOGY.get(n) or f"1x{n}x1"


def parse_cpus(s: str) -> list[int]:
    out = []
    for x in str(s).split(","):
        x = x.strip()
        if not x:
            continue
        if not x.isdigit() or not 1 <= int(x) <= MAX_CPUS:
            raise UsageError("cpus", f"{x!r} is not a CPU count; give counts 1..{MAX_CPUS}, "
                             "e.g. --cpus 1,2,4,16")
        out.append(int(x))
    if not out:
        raise UsageError("cpus", "no CPU count given; e.g. --cpus 4,16,64")
    return out


def parse_topologies(s: str) -> list[str]:
    out = [t.strip() for t in str(s).split(",") if t.strip()]
    if not out:
        raise UsageError("topology", "no topology given; e.g. --topology 1x2x2,2x8x2")
    for t in out:
        parse_topology(t)   # raises UsageError("topology", ...)
    return out


def parse_handlers(s: str) -> list[str]:
    from emu.xen.versions import HANDLERS
    out = [h.strip() for h in str(s).split(",") if h.strip()]
    if not out:
        raise UsageError("handler", "no handler version given; e.g. --handler seed")
    for h in out:
        if variant_options(h)[0] not in HANDLERS:
            raise UsageError("handler", f"unknown handler version {h!r}; choose from "
                             f"{', '.join(sorted(HANDLERS))} (VERSION+trace: on a tracing "
                             "machine; VERSION+nofsync: Dom0's fsync off)")
    return out


VARIANT_OPTIONS = ("trace", "nofsync")


def variant_options(h: str) -> tuple[str, set]:
    """``seed+trace+nofsync`` -> ("seed", {"trace", "nofsync"})."""
    name, *opts = h.split("+")
    bad = set(opts) - set(VARIANT_OPTIONS)
    if bad:
        raise UsageError("handler", f"{h!r}: unknown variant option(s) {', '.join(sorted(bad))}; "
                         f"use +{' +'.join(VARIANT_OPTIONS)}")
    return name, set(opts)


def variant_labels(handlers: list[str]) -> list[str]:
    """A version named twice runs twice, interleaved (an A/A pair in one run):
    ``seed``, ``seed#2``."""
    seen: dict = {}
    out = []
    for h in handlers:
        seen[h] = seen.get(h, 0) + 1
        out.append(h if seen[h] == 1 else f"{h}#{seen[h]}")
    return out


def check_out_path(path: str, field: str) -> None:
    """A file we will write at the end: fail now, before hours of measuring."""
    d = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path) or not os.path.isdir(d) or not os.access(d, os.W_OK) or \
            (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(field, f"{path}: cannot write there; give a file in a writable "
                         "directory")


# -- statistics --------------------------------------------------------------------------
def summary(xs) -> dict | None:
    if not len(xs):
        return None
    a = np.asarray(xs, dtype=float)
    return {"p50": round(float(np.median(a)), 1), "p90": round(float(np.percentile(a, 90)), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "max": round(float(a.max()), 1),
            "n": int(a.size)}


def _resampled_medians(groups: list, rounds: int, rng) -> np.ndarray:
    """Medians of ``rounds`` two-level bootstrap resamples: instances drawn with
    replacement, then samples within each drawn instance (one group: the plain
    bootstrap)."""
    groups = [np.asarray(g, float) for g in groups if len(g)]
    out = np.empty(rounds)
    for k in range(rounds):
        pick = rng.integers(0, len(groups), len(groups)) if len(groups) > 1 else [0]
        parts = [groups[i][rng.integers(0, groups[i].size, groups[i].size)] for i in pick]
        out[k] = np.median(np.concatenate(parts))
    return out


def bootstrap_ratio(old, new, rounds: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of medians new/old and its 95 % bootstrap interval (percentile).
    ``old``/``new``: a list of samples, or a list of per-instance lists (then the
    bootstrap resamples instances too, so the spread between machine instances is
    in the interval)."""
    def groups(x):
        return x if len(x) and isinstance(x[0], (list, tuple, np.ndarray)) else [x]
    ga, gb = groups(old), groups(new)
    rng = np.random.default_rng(seed)
    r = _resampled_medians(gb, rounds, rng) / _resampled_medians(ga, rounds, rng)
    flat_a = np.concatenate([np.asarray(g, float) for g in ga])
    flat_b = np.concatenate([np.asarray(g, float) for g in gb])
    return (float(np.median(flat_b) / np.median(flat_a)), float(np.percentile(r, 2.5)),
            float(np.percentile(r, 97.5)))


def verdict(lo: float, hi: float, ratio: float, min_change: float) -> str:
    """Lower is better (latencies): the interval must exclude 1 and the change be at
    least ``min_change``."""
    if hi < 1.0 and ratio <= 1.0 - min_change:
        return "faster"
    if lo > 1.0 and ratio >= 1.0 + min_change:
        return "slower"
    return "within noise"


# -- measuring ---------------------------------------------------------------------------
def log_fs(path: str) -> str:
    """Filesystem type and mount point holding ``path`` (from /proc/mounts)."""
    path = os.path.realpath(path)
    best = ("?", "")
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                _, mnt, fstype = line.split()[:3]
                under = path == mnt or path.startswith(mnt.rstrip("/") + "/")
                if under and len(mnt) > len(best[1]):
                    best = (fstype, mnt)
    except OSError:
        pass
    return f"{best[0]} {best[1]}"


def _naive_class():
    path = ROOT / "bench" / "naive_peer.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("emu_bench_naive_peer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.NaivePeer


def stress_throughput(cpus: int, timeout_s: float = 300.0) -> dict:
    """Trials/s from ``bench/stress.py`` (the stress issue's benchmark), if present:
    run as ``stress.py --cpus N --json``, the first ``*trials_per_s`` figure of its
    output. Absent or failing: None and why."""
    path = ROOT / "bench" / "stress.py"
    if not path.exists():
        return {"trials_per_s": None, "note": "bench/stress.py absent"}
    try:
        p = subprocess.run([sys.executable, str(path), "--cpus", str(cpus), "--json"],
                           capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"trials_per_s": None, "note": f"bench/stress.py took over {timeout_s:g} s"}
    for line in p.stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        for k, v in (obj.items() if isinstance(obj, dict) else ()):
            if k.endswith("trials_per_s") and isinstance(v, (int, float)):
                return {"trials_per_s": round(float(v), 1), "note": None}
    return {"trials_per_s": None,
            "note": f"bench/stress.py gave no trials_per_s (exit {p.returncode})"}


def _error(i: int, n: int, guest_k: int | None) -> str:
    if guest_k is not None:
        where = f"addr={(0x100 + guest_k) << 12 | 0x20:#x} domain=1"
    else:
        where = "addr=0x181000"
    return f"cpu={i % n} bank=9 status=0xBD000000004000CF {where} misc=0x86 mcg=0x5"


def _boot(topo: str, handler: str, log_dir: str, hooks: dict, opts: set):
    from emu.machine import Machine
    from emu.machine.config import MachineConfig
    cfg = MachineConfig(topology=topo, handler=handler, trace="trace" in opts,
                        extra={"log_dir": log_dir, "hooks": hooks,
                               "fsync": "nofsync" not in opts})
    return Machine(cfg).start()


def measure_topology(topo: str, handlers: list[str], injections: int, block: int = 20,
                     guest_every: int = 8, boots: int = 5, hooks: dict | None = None,
                     naive: bool = True, stress: bool = True, floor_gap_s: float = 0.0002,
                     settle_s: float = 0.003, instances: int = 3, warmup: int = 5,
                     log=None) -> list[dict]:
    """One topology: every handler's machine, the naive peer and the floor, taking
    turns block by block. Returns one result object per handler (a version named
    twice: per label, see :func:`variant_labels`; ``VERSION+trace``,
    ``VERSION+nofsync``: see :func:`variant_options`).

    ``instances``: the injections are shared among this many machine instances of
    each variant, booted one after the other (all variants side by side each time):
    two instances of the same machine differ here by up to a third (where the host
    puts their processes), so a comparison has to see that spread, as pyperf's
    worker processes let it see a benchmark's (see :func:`compare`). ``warmup``: the
    first machine checks of each fresh machine (and naive peer) are not counted: the
    first after a boot run cold."""
    from emu.machine import Machine
    S, C, T = parse_topology(topo)
    n = S * C * T
    hooks = hooks or {}
    labels = variant_labels(handlers)
    opts = {lab: variant_options(h) for lab, h in zip(labels, handlers, strict=True)}
    version = {lab: o[0] for lab, o in opts.items()}
    opts = {lab: o[1] for lab, o in opts.items()}
    instances = max(1, min(instances, injections))
    res = {h: {"samples": {p: [[] for _ in range(instances)] for p in PHASES},
               "outcomes": {}, "boot_ms": [], "uss": []} for h in labels}
    naive_samples = {k: [[] for _ in range(instances)] for k in NAIVE_STAMPS}
    naive_info: dict = {}
    floor: list[list[float]] = [[] for _ in range(instances)]
    NaivePeer = _naive_class() if naive else None
    if naive and NaivePeer is None:
        naive_info["note"] = "bench/naive_peer.py absent"
    done = {h: 0 for h in labels}
    guest_k = {h: 0 for h in labels}
    fs = "?"
    for inst in range(instances):
        share = injections // instances + (inst < injections % instances)
        machines: dict = {}
        peer = None
        with tempfile.TemporaryDirectory(prefix="emu-bench-") as d:
            try:
                for h in labels:
                    t0 = time.monotonic()
                    m = machines[h] = _boot(topo, version[h], os.path.join(d, h), hooks,
                                            opts[h])
                    res[h]["boot_ms"].append(round(m.boot_info["boot_ms"], 1))
                    res[h].setdefault("start_ms", round((time.monotonic() - t0) * 1e3, 1))
                    res[h]["uss"] += [psutil.Process(p).memory_full_info().uss
                                      for p in m.cpu_pids.values()]
                    for w in range(warmup):
                        m.inject(_error(w, n, None))
                if NaivePeer is not None:
                    peer = NaivePeer(n).start()
                    for _ in range(warmup):
                        peer.round()
                    naive_info.setdefault("uss_mb_per_cpu", round(float(np.median(
                        [psutil.Process(p.pid).memory_full_info().uss for p in peer.procs]))
                        / 2**20, 2))
                turns = [("emu", h) for h in labels] + \
                    ([("naive", None)] if peer is not None else []) + [("floor", None)]
                nblocks = -(-share // block)
                for b in range(nblocks):
                    k = min(block, share - b * block)
                    for j in range(len(turns)):
                        kind, h = turns[(b + inst + j) % len(turns)]
                        # Let the last turn's CPUs finish their idle poll and sleep, so
                        # that every turn starts alike: its own CPUs asleep, nobody
                        # else polling.
                        time.sleep(settle_s)
                        if kind == "floor":
                            floor[inst] += futex_floor(k, floor_gap_s)["samples_us"]
                        elif kind == "naive":
                            for _ in range(k):
                                r = peer.round()
                                for s in naive_samples:
                                    naive_samples[s][inst].append(r[s])
                        else:
                            _inject_block(machines[h], res[h], k, n, inst, done, guest_k, h,
                                          guest_every)
                    if log:
                        log(f"  {topo}: instance {inst + 1}/{instances}, block {b + 1}/{nblocks}")
                fs = log_fs(d)
            finally:
                for m in machines.values():
                    m.close()
                if peer is not None:
                    peer.close()
    # Fresh boots (the suite's own machines count first).
    for h in labels:
        for _ in range(max(0, boots - instances)):
            with tempfile.TemporaryDirectory(prefix="emu-bench-") as d2, \
                    Machine(topology=topo, handler=version[h], extra={"log_dir": d2}) as m:
                res[h]["boot_ms"].append(round(m.boot_info["boot_ms"], 1))
    st = stress_throughput(n) if stress else {"trials_per_s": None, "note": "--no-stress"}
    flat = lambda xs: [x for part in xs for x in part]   # noqa: E731
    fl = summary(flat(floor))
    nv = {s: summary(flat(v)) for s, v in naive_samples.items()} if NaivePeer else None
    out = []
    for h in labels:
        r = res[h]
        phases = {p: summary(flat(v)) for p, v in r["samples"].items()}
        obj = {"schema": SCHEMA, "cpus": n, "topology": topo, "handler": version[h],
               "label": h, "trace": "trace" in opts[h], "dom0_fsync": "nofsync" not in opts[h],
               "injections": injections, "block": block, "guest_every": guest_every,
               "warmup": warmup,
               "instances": instances, "hooks": hooks, "phases": phases,
               "samples": {p: flat(v) for p, v in r["samples"].items()},
               "samples_by_instance": r["samples"],
               "floor": fl, "floor_samples": flat(floor), "floor_by_instance": floor,
               "naive": nv,
               "naive_samples": {s: flat(v) for s, v in naive_samples.items()} if nv else None,
               "naive_by_instance": naive_samples if nv else None,
               "naive_note": naive_info.get("note"),
               "naive_uss_mb_per_cpu": naive_info.get("uss_mb_per_cpu"),
               "ratio_to_floor": {p: round(s["p50"] / fl["p50"], 2) for p, s in phases.items()
                                  if s and fl},
               "ratio_to_naive": {p: round(phases[p]["p50"] / nv[q]["p50"], 2)
                                  for p, q in NAIVE_PHASE.items()
                                  if nv and phases.get(p) and nv.get(q)},
               "boot_ms": {"p50": round(float(np.median(r["boot_ms"])), 1),
                           "max": round(max(r["boot_ms"]), 1), "n": len(r["boot_ms"])},
               "start_ms": r["start_ms"],
               "uss_mb_per_cpu": round(float(np.median(r["uss"])) / 2**20, 2),
               "outcomes": r["outcomes"], "dom0_log_fs": fs,
               "stress_trials_per_s": st["trials_per_s"], "stress_note": st["note"],
               "host": {"cores": len(os.sched_getaffinity(0)), "machine": platform.machine(),
                        "python": platform.python_version(), "node": platform.node()},
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        out.append(obj)
    return out


def _inject_block(m, out: dict, k: int, n: int, inst: int, done: dict, guest_k: dict, h: str,
                  guest_every: int) -> None:
    for _ in range(k):
        i = done[h]
        done[h] += 1
        g = guest_every and i % guest_every == guest_every - 1 and guest_k[h] < GUEST_PAGES
        r = m.inject(_error(i, n, guest_k[h] if g else None))
        out["outcomes"][r["outcome"]] = out["outcomes"].get(r["outcome"], 0) + 1
        lat = r["latency_us"]
        if g:
            guest_k[h] += 1
            if lat.get("guest_handled") is not None:
                out["samples"]["guest_handled"][inst].append(lat["guest_handled"])
            continue
        for p in PHASES[:-1]:
            if lat.get(p) is not None:
                out["samples"][p][inst].append(lat[p])


# -- output ------------------------------------------------------------------------------
def _cell(x) -> str:
    return f"{x:9.1f}" if isinstance(x, (int, float)) else "      n/a"


def render(r: dict) -> str:
    lines = [f"{r['cpus']:4d} CPUs ({r['topology']}), handler {r['label']}: "
             f"{r['injections']} injections, outcomes {r['outcomes']}",
             f"     {'phase (µs from the raise)':<26}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}"
             f"{'n':>6}{'x floor':>9}{'x naive':>9}"]
    for p in PHASES:
        s = r["phases"].get(p)
        if not s:
            lines.append(f"     {PHASE_LABEL[p]:<26}{'(none)':>9}")
            continue
        lines.append(f"     {PHASE_LABEL[p]:<26}{_cell(s['p50'])}{_cell(s['p90'])}"
                     f"{_cell(s['p99'])}{_cell(s['max'])}{s['n']:6d}"
                     f"{_cell(r['ratio_to_floor'].get(p))}{_cell(r['ratio_to_naive'].get(p))}")
    fl = r["floor"]
    lines.append(f"     {'floor (futex wake-up)':<26}{_cell(fl['p50'])}{_cell(fl['p90'])}"
                 f"{_cell(fl['p99'])}{_cell(fl['max'])}{fl['n']:6d}")
    if r["naive"]:
        for q in NAIVE_STAMPS:
            s = r["naive"][q]
            label = {"entered": "all CPUs entered", "barrier_a": "left 1st rendezvous",
                     "logout_done": "logout done", "handler_exit": "handler exit"}[q]
            lines.append(f"     {'naive: ' + label:<26}{_cell(s['p50'])}"
                         f"{_cell(s['p90'])}{_cell(s['p99'])}{_cell(s['max'])}{s['n']:6d}")
    elif r.get("naive_note"):
        lines.append(f"     naive peer: {r['naive_note']}")
    st = (f"{r['stress_trials_per_s']} trials/s" if r["stress_trials_per_s"] is not None
          else f"n/a ({r['stress_note']})")
    lines.append(f"     boot p50 {r['boot_ms']['p50']} ms (max {r['boot_ms']['max']}, "
                 f"n={r['boot_ms']['n']}), USS {r['uss_mb_per_cpu']} MB/CPU process"
                 f" (naive peer {r['naive_uss_mb_per_cpu']}), stress {st}, "
                 f"Dom0 log on {r['dom0_log_fs']}")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Latency p50 by CPU count, a line per phase and handler, the baselines as
    lines; below, the ratio of each handler's handler exit (and the naive peer's)
    to the floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    handlers = list(dict.fromkeys(r["label"] for r in results))
    styles = ["-", "--", "-.", ":"]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 10), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.4]})
    cmap = plt.get_cmap("tab10")
    for hi, h in enumerate(handlers):
        rs = sorted((r for r in results if r["label"] == h), key=lambda r: r["cpus"])
        xs = [r["cpus"] for r in rs]
        for pi, p in enumerate(PHASES):
            ys = [(r["phases"].get(p) or {}).get("p50") for r in rs]
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
            if pts:
                ax.plot(*zip(*pts, strict=True), styles[hi % 4], marker="o", ms=3,
                        color=cmap(pi % 10), label=f"{h}: {PHASE_LABEL[p]}")
        rt = [(r["cpus"], r["ratio_to_floor"].get("handler_exit")) for r in rs]
        rt = [t for t in rt if t[1]]
        if rt:
            ax2.plot(*zip(*rt, strict=True), styles[hi % 4], marker="o", color="C0",
                     label=f"{h}: handler exit / floor")
    by_cpus = {r["cpus"]: r for r in results}
    xs = sorted(by_cpus)
    fl = [(x, by_cpus[x]["floor"]["p50"]) for x in xs if by_cpus[x]["floor"]]
    if fl:
        ax.plot(*zip(*fl, strict=True), "k--", marker="s", ms=3, label="floor (futex wake-up)")
    nv = [(x, by_cpus[x]["naive"]["handler_exit"]["p50"]) for x in xs if by_cpus[x]["naive"]]
    if nv:
        ax.plot(*zip(*nv, strict=True), color="black", ls=":", marker="^", ms=4,
                label="naive peer: handler exit")
        ax2.plot([x for x, _ in nv], [y / by_cpus[x]["floor"]["p50"] for x, y in nv],
                 color="black", ls=":", marker="^", label="naive peer handler exit / floor")
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.grid(True, which="both", alpha=0.3)
    ax2.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylabel("p50 latency from the raise (µs)")
    ax.set_title("emu bench: machine-check latency by CPU count")
    ax.legend(fontsize=6, ncol=2)
    ax2.set_ylabel("ratio to the floor (p50)")
    ax2.set_xlabel("emulated CPUs")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- compare -----------------------------------------------------------------------------
def load_results(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise UsageError("compare", f"{path}: {exc.strerror}; give a file --out wrote") from None
    try:
        objs = [json.loads(x) for x in text.splitlines() if x.strip()]
    except ValueError:
        try:
            objs = json.loads(text)
        except ValueError:
            raise UsageError("compare", f"{path}: not JSON lines from `emu bench --json`") \
                from None
    if isinstance(objs, dict):
        objs = [objs]
    objs = [o for o in objs if isinstance(o, dict)]
    if not objs or any(o.get("schema") != SCHEMA for o in objs):
        raise UsageError("compare", f"{path}: not results of `emu bench` (schema {SCHEMA})")
    return objs


def compare(old: list[dict], new: list[dict], min_change: float = 0.02) -> list[dict]:
    """Per configuration present in both, per figure (each phase's p50, the floor's,
    the naive peer's): ratio new/old of the medians, 95 % bootstrap interval,
    verdict."""
    key = lambda r: (r["topology"], r.get("label", r["handler"]))   # noqa: E731
    olds = {key(r): r for r in old}
    out = []
    for r in new:
        o = olds.get(key(r))
        if o is None:
            continue
        def by_inst(x, flat_key, inst_key, sub=None):
            v = x.get(inst_key)
            v = (v or {}).get(sub) if sub is not None and v is not None else v
            if v:
                return [g for g in v if g]
            f = x.get(flat_key)
            f = (f or {}).get(sub) if sub is not None and f is not None else f
            return [f] if f else []
        figs = [(f"{p} p50", by_inst(o, "samples", "samples_by_instance", p),
                 by_inst(r, "samples", "samples_by_instance", p)) for p in PHASES]
        figs.append(("floor p50", by_inst(o, "floor_samples", "floor_by_instance"),
                     by_inst(r, "floor_samples", "floor_by_instance")))
        for q in NAIVE_PHASE.values():
            figs.append((f"naive {q} p50", by_inst(o, "naive_samples", "naive_by_instance", q),
                         by_inst(r, "naive_samples", "naive_by_instance", q)))
        for name, a, b in figs:
            na, nb = sum(map(len, a)), sum(map(len, b))
            if na < 2 or nb < 2:
                continue
            ratio, lo, hi = bootstrap_ratio(a, b)
            out.append({"cpus": r["cpus"], "topology": r["topology"], "handler": key(r)[1],
                        "figure": name, "old": round(float(np.median(np.concatenate(a))), 1),
                        "new": round(float(np.median(np.concatenate(b))), 1),
                        "ratio": round(ratio, 3), "ci95": [round(lo, 3), round(hi, 3)],
                        "n": [na, nb], "instances": [len(a), len(b)],
                        "verdict": verdict(lo, hi, ratio, min_change)})
    return out


def render_compare(rows: list[dict]) -> str:
    lines = []
    for c in rows:
        lines.append(f"{c['cpus']:4d} CPUs {c['handler']:<12} {c['figure']:<24} "
                     f"{c['old']:9.1f} -> {c['new']:9.1f} µs  x{c['ratio']:.3f} "
                     f"(95 % {c['ci95'][0]:.3f}-{c['ci95'][1]:.3f}): {c['verdict']}")
    return "\n".join(lines) if lines else "no configuration in common"


# -- the command -------------------------------------------------------------------------
def main(a) -> int:
    if getattr(a, "compare", None):
        old, new = (load_results(p) for p in a.compare)
        rows = compare(old, new, getattr(a, "min_change", 0.02))
        if a.json:
            print(json.dumps(rows), flush=True)
        else:
            print(render_compare(rows), flush=True)
        return 0
    topos = parse_topologies(a.topology) if getattr(a, "topology", None) else \
        [topology_for(n) for n in parse_cpus(a.cpus)]
    handlers = parse_handlers(getattr(a, "handler", None) or "seed")
    if not isinstance(getattr(a, "instances", 3), int) or getattr(a, "instances", 3) < 1:
        raise UsageError("instances", f"{a.instances!r}: give at least 1")
    if not isinstance(a.injections, int) or a.injections < 1:
        raise UsageError("injections", f"{a.injections!r}: give at least 1")
    block = getattr(a, "block", 20)
    if not isinstance(block, int) or block < 1:
        raise UsageError("block", f"{block!r}: give at least 1")
    hooks = {}
    for kv in getattr(a, "hook", None) or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise UsageError("hook", f"{kv!r}: write NAME=VALUE, e.g. handler_extra_work_us=50")
        try:
            hooks[k] = json.loads(v)
        except ValueError:
            hooks[k] = v
    if getattr(a, "plot", None):
        check_out_path(a.plot, "plot")
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("plot", "needs matplotlib: pip install 'emu-mca[plot]'")
    if getattr(a, "out", None):
        check_out_path(a.out, "out")
    results = []
    out_f = open(a.out, "w", encoding="utf-8") if getattr(a, "out", None) else None  # noqa: SIM115
    try:
        for topo in topos:
            rs = measure_topology(topo, handlers, a.injections, block=block,
                                  instances=getattr(a, "instances", 3),
                                  warmup=getattr(a, "warmup", 5),
                                  guest_every=getattr(a, "guest_every", 8),
                                  boots=getattr(a, "boots", 5), hooks=hooks,
                                  naive=not getattr(a, "no_naive", False),
                                  stress=not getattr(a, "no_stress", False))
            for r in rs:
                results.append(r)
                if out_f:
                    out_f.write(json.dumps(r, sort_keys=True) + "\n")
                    out_f.flush()
                if a.json:
                    print(json.dumps(r, sort_keys=True), flush=True)
                else:
                    print(render(r), flush=True)
    finally:
        if out_f:
            out_f.close()
    if getattr(a, "plot", None):
        plot(results, a.plot)
        if not a.json:
            print(f"plot: {a.plot}", flush=True)
    return 0
