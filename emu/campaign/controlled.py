"""Campaigns under controlled scheduling: bounded exhaustive search (``dfs:P``),
strategy campaigns until a first finding (``random``, ``pct:D``), and shrinking a
failing schedule.

``dfs:P`` is a stateless search in the style of CHESS (Musuvathi & Qadeer, PLDI 2007):
every schedule with at most P preemptions (a preemption: switching away from a process
that could still run) is run once. A trial runs a *prefix* of decisions, then the
default (non-preemptive: the running process if it can run, else the lowest); its
decision log gives, per step, the enabled set and who ran before; every untried
alternative at a step past the prefix, within the budget, is a new prefix. Each
schedule is reached exactly once: by its deviations from the default, in order.
For small machines (the enabled sets are kept for the first 64 CPUs).

Per handler version (:func:`first_finding`, :func:`version_table`): the version's
exposing campaign (the stress trials of its family, :data:`VERSION_CAMPAIGNS`) played
by the stress worker (:class:`emu.campaign.stress.Worker`: the oracle and the
expected-outcome model) on a controlled machine, every injection under the strategy,
until the first violation; or host-scheduled with chaos, for the column beside them.
"""
from __future__ import annotations

import time
from collections import Counter

from emu.errors import EmulatorInternalError, UsageError
from emu.machine.sched import parse_strategy

CHAOS_P = 0.2            # the chaos column's perturbation probability per yield point


def _bits(m: int) -> list[int]:
    out = []
    while m:
        b = (m & -m).bit_length() - 1
        out.append(b)
        m &= m - 1
    return out


def preemptions(choices: list[int], enabled: list[int], current: list[int]) -> int:
    """How many steps switched away from a process that could still run."""
    return sum(1 for q, m, c in zip(choices, enabled, current, strict=False)
               if c >= 0 and q != c and m >> c & 1)


def _finding(res: dict) -> bool:
    """A violation, a deadlock, or (host-scheduled) a hang: what a detection counts."""
    return bool(res["violations"]) or res["outcome"] in ("deadlock", "hang")


def _summary(res: dict) -> dict:
    return {"outcome": res["outcome"], "owners": [e["owners"] for e in res["errors"]],
            "violations": res["violations"], "steps": res["sched"]["steps"],
            "replay": res["sched"]["replay"], "token": res["sched"]["token"]}


def explore(m, errors, bound: int, local: bool = False, limit: int | None = None,
            keep: int = 3, progress=None, stop_at_first: bool = False) -> dict:
    """Every schedule of ``errors`` on controlled machine ``m`` with at most ``bound``
    preemptions. Returns ``schedules`` (the count), ``outcomes`` and ``owners``
    (histograms over all schedules), ``findings`` (how many) and the first ``keep`` of
    them with their replay commands, ``first_finding_schedule`` (1-based), ``complete``
    (False if ``limit`` or ``stop_at_first`` stopped it)."""
    if m.config.sched != "controlled":
        raise UsageError("sched", "dfs needs a controlled machine (sched='controlled')")
    if m.config.topology and _ncpus(m) > 64:
        raise UsageError("strategy", "dfs keeps enabled sets for 64 CPUs at most: use a "
                         "smaller machine, or pct:D")
    t0 = time.monotonic()
    stack: list[list[int]] = [[]]
    n = 0
    outcomes: Counter = Counter()
    owners: Counter = Counter()
    found: list[dict] = []
    nfound = 0
    longest = 0
    first_at = None
    banks = None      # every schedule starts from the banks the first one found
    while stack:
        if limit is not None and n >= limit:
            break
        prefix = stack.pop()
        res = m.inject(errors, local=local, schedule={"kind": "prefix", "plan": prefix,
                                                       "name": f"dfs:{bound}", "seed": 0,
                                                       "banks": banks})
        if banks is None:
            banks = res["sched"]["banks_before"]
        n += 1
        sc = res["sched"]
        if sc["diverged"]:
            raise EmulatorInternalError(f"dfs: a prefix of {len(prefix)} decisions did not "
                                        f"replay ({sc['diverged']}): the run is not "
                                        "deterministic under its schedule")
        if sc["log_full"]:
            raise UsageError("sched-steps", f"a trial took {sc['steps']} steps, more than "
                             "the decision log holds: raise sched_steps")
        outcomes[res["outcome"]] += 1
        owners[repr([e["owners"] for e in res["errors"]])] += 1
        longest = max(longest, sc["steps"])
        if _finding(res):
            nfound += 1
            first_at = first_at or n
            if len(found) < keep:
                found.append(_summary(res))
            if stop_at_first:
                break
        ch, en, cur = sc["choices"], sc["enabled"], sc["current"]
        used = preemptions(ch[:len(prefix)], en, cur)
        kids = []
        for i in range(len(prefix), len(ch)):
            E, c = _bits(en[i]), cur[i]
            for alt in E:
                if alt != ch[i] and used + (c >= 0 and alt != c and c in E) <= bound:
                    kids.append(ch[:i] + [alt])
            used += c >= 0 and ch[i] != c and c in E
        stack.extend(reversed(kids))   # depth first, earliest deviation first
        if progress is not None:
            progress(n, len(stack))
    return {"strategy": f"dfs:{bound}", "schedules": n, "complete": not stack,
            "outcomes": dict(outcomes), "owners": dict(owners), "findings": nfound,
            "first_findings": found, "first_finding_schedule": first_at,
            "longest_steps": longest,
            "seconds": round(time.monotonic() - t0, 3)}


def _ncpus(m) -> int:
    from emu.machine.sched import cfg_ncpus
    return cfg_ncpus(m.config)


def search(m, errors, strategy: str, trials: int, local: bool = False, seed: int = 0,
           stop_at_first: bool = True) -> dict:
    """Trials of ``random`` or ``pct:D`` (trial i seeded splitmix(seed, i)) until the
    first finding (or all ``trials``): ``trials_run``, ``first_finding_trial`` (1-based),
    ``seconds_to_first``, its summary and replay command."""
    from emu.machine.sched import splitmix64
    st = parse_strategy(strategy)
    if st["kind"] not in ("random", "pct"):
        raise UsageError("strategy", f"{strategy!r}: a campaign takes random or pct:D "
                         "(dfs:P enumerates; replay:TOKEN is one trial)")
    t0 = time.monotonic()
    first = None
    nfound = 0
    i = 0
    outcomes: Counter = Counter()
    for i in range(1, trials + 1):
        res = m.inject(errors, local=local, schedule=strategy,
                       schedule_seed=splitmix64(seed * 1_000_003 + i))
        outcomes[res["outcome"]] += 1
        if _finding(res):
            nfound += 1
            if first is None:
                first = dict(_summary(res), trial=i,
                             seconds=round(time.monotonic() - t0, 3))
            if stop_at_first:
                break
    return {"strategy": strategy, "trials_run": i, "findings": nfound,
            "first_finding_trial": first and first["trial"],
            "seconds_to_first": first and first["seconds"], "first": first,
            "outcomes": dict(outcomes), "seconds": round(time.monotonic() - t0, 3)}


def shrink(m, token: str, max_trials: int = 500) -> dict:
    """Remove preemptions from a failing schedule while the finding persists: try
    dropping each preemption (the prefix up to it, then the default) and keep the
    first that still fails; repeat until none can go. Returns the shortest failing
    schedule found (its preemptions, steps, token)."""
    from emu.machine.sched import decode_token
    header, plan = decode_token(token)
    sc = header.get("scenario") or {}
    errors, local = sc.get("errors") or [], bool(sc.get("local"))
    base = m.replay(token)
    if not _finding(base):
        raise UsageError("schedule", "the token's run shows no finding here: nothing to "
                         "shrink")
    want = {"outcome": base["outcome"], "violations": bool(base["violations"])}
    banks = header.get("banks") or []
    best = base
    trials = 1
    improved = True
    while improved and trials < max_trials:
        improved = False
        s = best["sched"]
        ch, en, cur = s["choices"], s["enabled"], s["current"]
        points = [i for i in range(len(ch)) if cur[i] >= 0 and ch[i] != cur[i]
                  and en[i] >> cur[i] & 1]
        for i in reversed(points):
            # keep everything before i, then let the default run: preemption i and all
            # later deviations go
            res = m.inject(errors, local=local, schedule={
                "kind": "prefix", "plan": ch[:i], "name": "shrink", "seed": 0,
                "banks": banks})
            trials += 1
            if _finding(res) and res["outcome"] == want["outcome"]:
                best, improved = res, True
                break
            # or drop only this one preemption: the prefix with the default choice at i
            alt = ch[:i] + [cur[i]]
            res = m.inject(errors, local=local, schedule={
                "kind": "prefix", "plan": alt + ch[i + 1:], "name": "shrink", "seed": 0,
                "banks": banks})
            trials += 1
            if not res["sched"]["diverged"] and _finding(res) and \
                    res["outcome"] == want["outcome"]:
                best, improved = res, True
                break
            if trials >= max_trials:
                break
    s = best["sched"]
    return {"trials": trials, "preemptions_before": preemptions(
                base["sched"]["choices"], base["sched"]["enabled"], base["sched"]["current"]),
            "preemptions": preemptions(s["choices"], s["enabled"], s["current"]),
            "steps": s["steps"], "token": s["token"], "replay": s["replay"],
            "outcome": best["outcome"], "violations": best["violations"]}


# -- from chaos to controlled ---------------------------------------------------------------
RECORD_SITES = ("phase", "virq", "acquired")   # trace records that are not yield points


def schedule_from_trace(trace: dict) -> list[int]:
    """A traced trial's (``Machine.trace()``) observed order of yield-point passages:
    one CPU per passage, in ring order."""
    sites = trace["sites"]
    skip = {sites.index(s) for s in RECORD_SITES if s in sites}
    return [e[1] for e in sorted(trace["entries"]) if e[2] not in skip]


def from_trace(m, trace: dict, errors, local: bool = False) -> dict:
    """Run ``errors`` on controlled machine ``m`` following a traced trial's observed
    order (strategy ``follow``); the result's ``sched.follow`` says how much of the
    order it could follow (``misses``: entries whose CPU was waiting when they came).
    Its token replays the controlled run exactly."""
    plan = schedule_from_trace(trace)
    return m.inject(errors, local=local, schedule={"kind": "follow", "plan": plan,
                                                   "name": "from-trace", "seed": 0})


def chaos_to_controlled(config: dict, errors, trials: int, local: bool = False) -> dict:
    """Run ``trials`` traced trials with the host scheduling (``config``: MachineConfig
    fields, e.g. ``chaos``), and every finding's observed order under controlled
    scheduling on the same machine: how often the controlled run shows the same
    violations (``reproduced``), with the tokens of those that did."""
    from emu.machine import Machine
    chaos_cfg = dict(config, sched="os", trace=True)
    ctl_cfg = {k: v for k, v in config.items() if k not in ("chaos", "trace")}
    ctl_cfg["sched"] = "controlled"
    found = []
    with Machine(**chaos_cfg) as m:
        for _ in range(trials):
            res = m.inject(errors, local=local)
            if _finding(res):
                found.append((res["violations"], res["outcome"], m.trace()))
    rep = []
    with Machine(**ctl_cfg) as m:
        for viol, outcome, tr in found:
            r = from_trace(m, tr, errors, local)
            rep.append({"chaos": viol, "controlled": r["violations"],
                        "reproduced": r["violations"] == viol and r["outcome"] == outcome,
                        "misses": r["sched"]["follow"]["misses"], "token": r["sched"]["token"]})
    n = sum(x["reproduced"] for x in rep)
    return {"chaos_trials": trials, "chaos_findings": len(found), "reproduced": n,
            "rate": round(n / len(found), 3) if found else None, "runs": rep}


def detection_table(handlers: list[str] | None, errors=None, config: dict | None = None,
                    trials: int = 200, strategies=("random", "pct:2", "pct:3", "dfs:1"),
                    local: bool = False, seed: int = 1, chaos: float = CHAOS_P) -> list[dict]:
    """Per handler: trials (schedules, for dfs) and seconds to the first finding, for
    host scheduling (``os``; with ``config["chaos"]`` when the chaos issue's per-trial
    perturbation is in) and each controlled strategy. None: nothing found within
    ``trials``.

    With ``errors=None``: each handler version's own campaign instead (its exposing
    family's seeded trials, checked as ``emu stress`` checks them), with a ``chaos``
    column (host scheduling, perturbation ``chaos``) beside one per strategy
    (``random`` and ``pct:D``; see :func:`version_table`)."""
    if errors is None:
        return version_table(handlers, ("chaos",) + tuple(
            s for s in strategies if not s.startswith("dfs:") and s != "chaos"),
            trials=trials, seed=seed, machine=config, chaos=chaos)
    from emu.machine import Machine
    config = dict(config or {})
    rows = []
    for h in handlers:
        row = {"handler": h}
        t0 = time.monotonic()
        with Machine(**dict(config, handler=h, sched="os")) as m:
            first = None
            for i in range(1, trials + 1):
                if _finding(m.inject(errors, local=local)):
                    first = i
                    break
        row["os"] = {"trials": first, "seconds": round(time.monotonic() - t0, 3)}
        ctl = {k: v for k, v in config.items() if k != "chaos"}
        with Machine(**dict(ctl, handler=h, sched="controlled")) as m:
            for st in strategies:
                t0 = time.monotonic()
                if st.startswith("dfs:"):
                    r = explore(m, errors, int(st[4:]), local=local, limit=trials, keep=0,
                                stop_at_first=True)
                    row[st] = {"trials": r["first_finding_schedule"],
                               "seconds": round(time.monotonic() - t0, 3)
                               if r["first_finding_schedule"] else None}
                    continue
                r = search(m, errors, st, trials, local=local, seed=seed)
                row[st] = {"trials": r["first_finding_trial"], "seconds": r["seconds_to_first"]}
        rows.append(row)
    return rows


# -- every handler version's exposing campaign, per strategy (issue 12) ---------------------
# Per version: the scenario mix a campaign runs (default: the family its metadata names,
# emu.xen.versions) and machine options beyond the stress defaults. ``level``: "machine"
# (a campaign finds it), "unit" (only a unit test reaches it).
VERSION_CAMPAIGNS: dict[str, dict] = {
    "xen-2009-03": {"machine": {"vmce_policy": "dom0"}},
    # 6a2c6a6842: a #MC with no valid bank after a round with an error
    "stale-severity-cpu": {"scenario": "owner_race,no_bank"},
    # 1cf8a44e39: RIPV=EIPV=0 in a guest's context (every CPU runs a DOM1 vCPU)
    "no-eipv-check": {"machine": {"extra": {"hooks": {"current": {
        c: [1, c % 2] for c in range(64)}}}}},
    # 011899a2e0: an LMCE during the softirq, after the worker election
    "shared-severity-cpu": {"scenario": "nested_lmce"},
    "no-3e15c37e68": {"scenario": "cmci"},
    # e9af61b969: Dom0's fetch (a scheduled step) inside a softirq worker's committed-list
    # push, between its cmpxchg and the re-read, while a record is still committed
    # (thread-scoped banks: one record per CPU and wave)
    "xchg-head-reread": {"scenario": "dom0_busy",
                         "machine": {"bank_scopes": "0-3:thread,4-9:package"}},
    "freelist-aba": {"level": "unit"},
}


def version_campaign(handler: str) -> dict:
    """``{"scenario", "machine", "level"}`` for ``handler``'s exposing campaign."""
    from emu.xen.versions import HANDLERS, version_info
    if handler not in HANDLERS:
        raise UsageError("handler", f"unknown handler {handler!r}; choose from "
                         f"{', '.join(HANDLERS)}")
    c = VERSION_CAMPAIGNS.get(handler, {})
    fam = (version_info(handler).get("family") or "").strip() or "all"
    return {"scenario": c.get("scenario", fam), "machine": dict(c.get("machine", {})),
            "level": c.get("level", "machine")}


class _Scheduled:
    """A controlled machine whose ``inject`` runs every trial under ``strategy``, seeded
    from the trial's seed ``(S, i)`` (the stress worker's) or, for a prefill injection,
    from a count: the stress worker drives it unchanged."""

    def __init__(self, m, strategy: str, seed: int):
        from emu.machine.sched import splitmix64
        self._m, self._st, self._seed, self._mix = m, strategy, seed, splitmix64
        self._k = 0
        self.last = None

    def inject(self, errors, *a, seed=None, chaos=None, starve=None, **kw):
        self._k += 1
        s = (seed[0] * 1_000_003 + seed[1]) if seed is not None else \
            (self._seed * 1_000_003 + (1 << 40) + self._k)
        r = self._m.inject(errors, *a, seed=seed, schedule=self._st,
                           schedule_seed=self._mix(s), **kw)
        self.last = r
        return r

    def __getattr__(self, name):
        if name == "inject_async":
            # (no pipelining: a trial under the scheduler is sent with its schedule)
            raise AttributeError(name)
        return getattr(self._m, name)


def _first_violation(rec: dict):
    return next((f for f in rec["findings"] if f["kind"] == "violation"), None)


def first_finding(handler: str, strategy: str, trials: int, seed: int = 0,
                  machine: dict | None = None, chaos: float = CHAOS_P,
                  watchdog_s: float = 2.0) -> dict:
    """Trials of ``handler``'s exposing campaign (:func:`version_campaign`; the stress
    campaign's trials ``(seed, i)``) until the first finding, checked as ``emu stress``
    checks them (the oracle, the expected-outcome model; a deadlock is a finding
    unless the model predicts that hang): under ``controlled`` with ``strategy``
    (``random``, ``pct:D``), or host-scheduled with ``strategy="chaos"`` (perturbation
    ``chaos`` per yield point) or ``"os"``. Returns ``{"strategy", "trials"`` (1-based
    index of the first finding, None: none within ``trials``), ``"seconds"`` (to it,
    or the whole budget), ``"trials_run", "finding", "outcome", "replay"}``."""
    c = version_campaign(handler)
    if c["level"] != "machine":
        return {"strategy": strategy, "trials": None, "seconds": None, "trials_run": 0,
                "finding": None, "level": c["level"]}
    host = strategy in ("chaos", "os")
    if not host:
        parse_strategy(strategy)
    mopts = dict(c["machine"], **(machine or {}))
    mopts.update(handler=handler, watchdog_s=watchdog_s,
                 sched="os" if host else "controlled")
    if c["scenario"] == "cmci":
        return _first_finding_cmci(handler, strategy, trials, seed, mopts, chaos)
    from emu.campaign.stress import Options, Worker
    o = Options(seed=seed, trials=trials, scenario=c["scenario"],
                chaos=chaos if strategy == "chaos" else 0.0, db=False, progress=False,
                machine=mopts).validate()
    w = Worker(o).start()
    t0 = time.monotonic()
    out = {"strategy": strategy, "trials": None, "trials_run": 0, "finding": None,
           "level": "machine"}
    try:
        if not host:
            w.m = _Scheduled(w.m, strategy, seed)
        for i in range(trials):
            rec = w.play(seed, i)
            out["trials_run"] = i + 1
            f = _first_violation(rec)
            if f is not None:
                last = getattr(w.m, "last", None) or {}
                out.update(trials=i + 1, finding=f["text"], outcome=rec["outcome"],
                           family=rec["family"], replay=(last.get("sched") or {}).get(
                               "replay") if not host else rec.get("replay"))
                break
        else:
            fin = w.finish()
            if fin:
                out.update(trials=trials, finding=fin[0]["text"], outcome=None)
    finally:
        w.close()
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def _first_finding_cmci(handler, strategy, trials, seed, mopts, chaos) -> dict:
    """no-3e15c37e68's campaign: two corrected errors in a CMCI core bank with a poll
    round (the poller and the CMCI owner cross), a CPU per trial; findings are the
    oracle's (the expected-outcome model covers #MC trials only)."""
    from emu.machine import Machine
    t0 = time.monotonic()
    out = {"strategy": strategy, "trials": None, "trials_run": 0, "finding": None,
           "level": "machine"}
    cfg = dict(mopts, seed=seed)
    if strategy == "chaos":
        cfg["chaos"] = chaos
    from emu.machine.sched import splitmix64
    with Machine(**cfg) as m:
        n = _ncpus(m)
        for i in range(trials):
            ce = f"cpu={(seed + i) % n} bank=2 status=0x9000000000000134 via=poll"
            kw = {"schedule": strategy, "schedule_seed": splitmix64(seed * 1_000_003 + i)} \
                if cfg["sched"] == "controlled" else {}
            r = m.inject([ce, ce], **kw)
            out["trials_run"] = i + 1
            if r["violations"] or r["outcome"] in ("deadlock", "hang"):
                out.update(trials=i + 1, finding=(r["violations"] or [r["outcome"]])[0],
                           outcome=r["outcome"], family="cmci",
                           replay=(r.get("sched") or {}).get("replay"))
                break
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def version_table(handlers=None, strategies=("chaos", "random", "pct:2", "pct:3"),
                  trials: int = 200, seed: int = 0, machine: dict | None = None,
                  chaos: float = CHAOS_P, progress=None) -> list[dict]:
    """The detection table over handler versions: per version (default: every
    registered one), its campaign's scenario and, per strategy, trials and seconds
    to the first finding (:func:`first_finding`)."""
    from emu.xen.versions import HANDLERS
    rows = []
    for h in handlers or list(HANDLERS):
        c = version_campaign(h)
        row = {"handler": h, "scenario": c["scenario"], "level": c["level"]}
        for st in strategies:
            r = first_finding(h, st, trials, seed=seed, machine=machine, chaos=chaos)
            row[st] = {k: r.get(k) for k in ("trials", "seconds", "trials_run", "finding",
                                             "outcome", "replay")}
            if progress is not None:
                progress(h, st, r)
        rows.append(row)
    return rows


def format_version_table(rows: list[dict], strategies, chaos: float = CHAOS_P) -> str:
    """The table as text: trials (seconds) to the first finding, ``-`` for none."""
    head = ["handler", "scenario"] + [(f"chaos {chaos:g}" if s == "chaos" else s)
                                      for s in strategies]
    lines = [head]
    for r in rows:
        cells = [r["handler"], r["scenario"]]
        for s in strategies:
            x = r.get(s) or {}
            if r["level"] != "machine":
                cells.append(f"({r['level']})")
            elif x.get("trials"):
                cells.append(f"{x['trials']} ({x['seconds']:.2f} s)")
            else:
                cells.append(f"- ({x.get('trials_run')} in {x.get('seconds') or 0:.1f} s)")
        lines.append(cells)
    w = [max(len(str(line[k])) for line in lines) for k in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w[k]) for k, c in enumerate(line)).rstrip()
                     for line in lines)
