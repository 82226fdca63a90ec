#!/usr/bin/env python3
"""How fast do campaigns find each handler version's defect? (issue 11)

For every version of :data:`emu.xen.versions.HANDLERS` but ``seed``: campaigns on
``--seeds`` campaign seeds with the scenario family that should expose it (its
``family`` metadata), each until the first finding or ``--max-trials``; reported per
version: trials and seconds to the first finding (median, max over seeds), the kind
of finding, and how often its reproduction reproduces it (of ``--repeat``). With
``--seed-trials N``, ``seed`` itself over every family, N trials per family
(violations must be 0).

The campaign engine (``emu stress``, issue 10) is not on main yet: this script runs
a small loop of its own over :meth:`emu.machine.Machine.inject` with the stress
generator's families (:func:`emu.campaign.families.scenario_for`, trial ``i`` of seed
``S`` rebuilt from ``(S, i)`` alone), one machine per campaign, unperturbed unless
``--chaos P``. Four families are defined here, for versions no stress family reaches
yet:

- ``nested_lmce``: the ``nested`` family with its second wave an LMCE, as
  ``011899a2e0``'s race needs (with every CPU held 5 ms once the softirq election is
  written, hook ``stalls``: the window a perturbing campaign would have to hit);
- ``spurious``: the ``owner_race`` family with every other trial a #MC with no valid
  bank (``raise_cpu``), as ``6a2c6a6842``'s needs;
- ``cmci``: two corrected errors in a CMCI core bank with a poll round, for
  ``no-3e15c37e68`` (as tests/test_cmci.py does);
- ``dom0_busy``: Dom0 drains a wave of records while a second wave commits two, each
  committed-list push held 50 ms (hook ``commit_window_s``), for ``xchg-head-reread``.

``no-eipv-check`` runs the ``ripv`` family with every CPU in a guest's context (hook
``current``: DOM1's vCPUs).

Reproduction: a finding at trial ``i`` is replayed on a fresh machine from the
trials since the campaign's last warm reset (a finding may depend on what earlier
trials left: MCIP set, a stale ``severity_cpu``), and counts if trial ``i`` shows a
finding of the same kind. ``freelist-aba`` is reachable at unit level only: its row
gives the unit reproduction (the test's recipe) of ``--repeat``.

    python bench/find_races.py [--versions a,b] [--seeds 5] [--max-trials 200]
                               [--repeat 20] [--seed-trials 0] [--chaos P] [--json]
                               [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

from emu.campaign.families import FAMILIES, Scenario, scenario_for
from emu.hw.topology import Topology
from emu.machine import Machine, MachineConfig
from emu.xen.versions import HANDLERS, version_info

SCHEMA = "emu.find_races/1"
UNIT_ONLY = ("freelist-aba",)
# Machine options per version (beyond the defaults), and the family actually run
MACHINE = {"xen-2009-03": {"vmce_policy": "dom0"},
           "no-eipv-check": {"extra_hooks": {"current": {c: [1, c % 2] for c in range(4)}}},
           # a fixed 5 ms hold of every CPU once the softirq election is written: the
           # starvation a perturbing campaign would have to hit by chance
           # a committed-list push held 50 ms between its cmpxchg and the re-read
           "xchg-head-reread": {"bank_scopes": "0-9:thread",
                                "extra_hooks": {"commit_window_s": 0.05}},
           "shared-severity-cpu": {"extra_hooks": {"stalls": [
               {"phase": "softirq_elected", "s": 0.005}]}}}
FAMILY = {"shared-severity-cpu": "nested_lmce", "stale-severity-cpu": "spurious",
          "xchg-head-reread": "dom0_busy", "no-3e15c37e68": "cmci"}


def _kind(v: str) -> str:
    """A violation's kind: the text with CPU, bank and error numbers taken out."""
    v = re.sub(r"^error\[\d+\] cpu\d+/bank\d+: ", "", v)
    v = re.sub(r" ?\(.*?\)", "", v)
    v = re.sub(r"0x[0-9A-Fa-f]+|\[[\d, ]*\]|\d+", "N", v)
    v = re.sub(r"cpuN(/bankN)?:? ?", "", v)
    return re.sub(r"\s+", " ", v).strip()


def _scenario(family: str, seed: int, i: int, topo) -> tuple[Scenario, dict]:
    """Trial i of (seed, family): the scenario and extra inject() arguments."""
    if family == "nested_lmce":
        scn = scenario_for(seed, i, "nested", topo)
        scn.then = dict(scn.then, local=True, after_phase="softirq")
        return scn, {}
    if family == "dom0_busy":   # Dom0 drains wave 1 while wave 2 commits
        c0 = (seed + i) % topo.ncpus
        w1 = tuple(f"cpu={c} bank=1 status=0xBD000000004000CF addr={0x180020 + 0x1000 * c:#x}"
                   " misc=0x86 mcg=0x5" for c in range(topo.ncpus))
        w2 = [f"cpu={c} bank=2 status=0x9400000000000151"
              for c in (c0, (c0 + 1) % topo.ncpus)]
        return Scenario("dom0_busy", w1, then={"errors": w2, "after_phase": "softirq_done",
                                               "local": False}), {}
    if family == "cmci":   # two CEs cross a CMCI core bank's threshold in a poll round
        ce = f"cpu={(seed + i) % topo.ncpus} bank=2 status=0x9000000000000134 via=poll"
        return Scenario("cmci", (ce, ce), note="CMCI and poll cross"), {}
    if family == "spurious":
        if i % 2:
            return Scenario("spurious", (), note="a #MC with no valid bank"), {
                "raise_cpu": (seed + i) % topo.ncpus}
        return scenario_for(seed, i, "owner_race", topo), {}
    return scenario_for(seed, i, family, topo), {}


CHAOS = 0.0   # --chaos: the machines' perturbation probability per yield point


def _machine(handler: str, seed: int, log_dir: str, watchdog_s: float) -> Machine:
    opts = dict(MACHINE.get(handler, {}))
    hooks = opts.pop("extra_hooks", {})
    return Machine(MachineConfig(handler=handler, seed=seed, watchdog_s=watchdog_s,
                                 chaos=CHAOS, extra={"log_dir": log_dir, "hooks": hooks},
                                 **opts)).start()


def _trial(m: Machine, scn: Scenario, kw: dict) -> dict:
    if scn.dom0_pause:
        m.dom0_pause()
        for p in scn.prefill:
            m.inject(list(p))
    try:
        return m.inject(**scn.inject_args(), **kw)
    finally:
        if scn.dom0_resume:
            m.dom0_resume()
            m.dom0_drain(10.0)


def campaign(handler: str, family: str, seed: int, max_trials: int, log_dir: str,
             watchdog_s: float) -> dict:
    topo = Topology(MachineConfig(handler=handler).validate())
    m = _machine(handler, seed, log_dir, watchdog_s)
    since_reset = 0
    try:
        t0 = time.monotonic()
        for i in range(max_trials):
            scn, kw = _scenario(family, seed, i, topo)
            r = _trial(m, scn, kw)
            if r["violations"]:
                return {"seed": seed, "found": True, "trials": i + 1,
                        "seconds": round(time.monotonic() - t0, 3),
                        "kind": _kind(r["violations"][0]), "violation": r["violations"][0],
                        "kinds": sorted({_kind(x) for x in r["violations"]}),
                        "outcome": r["outcome"], "trial": i, "replay_from": since_reset,
                        "scenario": scn.to_dict(), "inject": kw}
            if r.get("resets"):
                since_reset = i + 1
        return {"seed": seed, "found": False, "trials": max_trials,
                "seconds": round(time.monotonic() - t0, 3)}
    finally:
        m.close()


def reproduce(handler: str, family: str, hit: dict, repeat: int, log_dir: str,
              watchdog_s: float) -> int:
    topo = Topology(MachineConfig(handler=handler).validate())
    n = 0
    for _ in range(repeat):
        m = _machine(handler, hit["seed"], log_dir, watchdog_s)
        try:
            for i in range(hit["replay_from"], hit["trial"] + 1):
                scn, kw = _scenario(family, hit["seed"], i, topo)
                r = _trial(m, scn, kw)
            n += any(_kind(v) == hit["kind"] for v in r["violations"])
        finally:
            m.close()
    return n


def _unit_once(handler: str) -> bool:
    """The unit recipe of tests/test_versions.py once: did Xen's BUG_ON fire?"""
    from emu.machine.regions import Regions
    from emu.xen.history import MctelemBug, MctelemFreelistAba, MctelemXchgHeadReread
    from emu.xen.mctelem import MC_NONURGENT, MC_URGENT
    R = Regions(MachineConfig().validate())
    try:
        once: list = []
        if handler == "xchg-head-reread":
            t = MctelemXchgHeadReread(R)
            t.init(1)
            t.mctelem_commit(t.mctelem_reserve(MC_URGENT, 0))
            a = t.mctelem_reserve(MC_URGENT, 0)
            t.window = lambda: once or once.append(t.consume_oldest_begin(MC_URGENT))
            t.mctelem_commit(a)
            again = (t.consume_oldest_begin, MC_URGENT)
        else:
            t = MctelemFreelistAba(R)
            t.init(1)

            def others():
                if not once:
                    once.append(0)
                    r1 = t.mctelem_reserve(MC_NONURGENT, 1)
                    t.mctelem_reserve(MC_NONURGENT, 1)
                    t.mctelem_dismiss(r1)
            t.window = others
            t.mctelem_reserve(MC_NONURGENT, 0)
            again = (lambda c: t.mctelem_reserve(c, 0), MC_NONURGENT)
        try:
            again[0](again[1])
        except MctelemBug:
            return True
        return False
    finally:
        os.close(R.efd)


def unit_reproduce(handler: str, repeat: int) -> dict:
    t0 = time.monotonic()
    n = sum(_unit_once(handler) for _ in range(repeat))
    return {"reproduced": n, "seconds": round(time.monotonic() - t0, 3)}


def baseline(n: int, log_dir: str, watchdog_s: float, log=sys.stderr) -> dict:
    """``seed`` over every family, ``n`` trials each (campaign seed 0): violations
    (must be 0) and hazards (today's Xen, counted apart), with an example of each."""
    out = {"trials": 0, "violations": 0, "hazards": {}, "outcomes": {}, "examples": []}
    for fam in FAMILIES:
        topo = Topology(MachineConfig().validate())
        m = _machine("seed", 0, log_dir, watchdog_s)
        try:
            for i in range(n):
                scn, kw = _scenario(fam, 0, i, topo)
                r = _trial(m, scn, kw)
                out["trials"] += 1
                out["outcomes"][r["outcome"]] = out["outcomes"].get(r["outcome"], 0) + 1
                for h in r.get("hazards") or []:
                    k = h.get("kind", "?")
                    out["hazards"][k] = out["hazards"].get(k, 0) + 1
                if r["violations"]:
                    out["violations"] += len(r["violations"])
                    if len(out["examples"]) < 20:
                        out["examples"].append({"family": fam, "trial": i,
                                                "violations": r["violations"]})
        finally:
            m.close()
        print(f"seed/{fam}: {n} trials, {out['violations']} violations so far", file=log)
    return out


def run(versions, seeds: int, max_trials: int, repeat: int, watchdog_s: float,
        seed_trials: int, log=sys.stderr) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix="find-races-") as d:
        for v in versions:
            info = version_info(v)
            family = FAMILY.get(v, info["family"])
            row = {"version": v, "stands_for": info["stands_for"], "family": family,
                   "expected": info["finding"]}
            if not family:
                row.update(level="none", note="no family metadata in HANDLERS")
                rows.append(row)
                continue
            if v in UNIT_ONLY:
                u = unit_reproduce(v, repeat)
                row.update(level="unit", found_seeds=None, reproduced=u["reproduced"],
                           repeat=repeat, kind="MCTE_TRANSITION_STATE BUG (unit)",
                           note="not reachable in the emulated machine (see emu.xen.history)")
                rows.append(row)
                print(f"{v}: unit level, reproduced {u['reproduced']}/{repeat}", file=log)
                continue
            runs = [campaign(v, family, s, max_trials, d, watchdog_s) for s in range(seeds)]
            hits = [r for r in runs if r["found"]]
            row.update(level="machine", runs=runs, found_seeds=len(hits), seeds=seeds)
            if hits:
                tr = [h["trials"] for h in hits]
                sec = [h["seconds"] for h in hits]
                kinds = sorted({k for h in hits for k in h["kinds"]})
                row.update(trials_median=statistics.median(tr), trials_max=max(tr),
                           seconds_median=round(statistics.median(sec), 3),
                           seconds_max=max(sec), kind="; ".join(kinds),
                           reproduced=reproduce(v, family, hits[0], repeat, d, watchdog_s),
                           repeat=repeat, example=hits[0]["violation"])
            rows.append(row)
            print(f"{v}: found on {len(hits)}/{seeds} seeds", file=log)
        base = baseline(seed_trials, d, watchdog_s, log) if seed_trials else None
    return {"schema": SCHEMA, "seeds": seeds, "max_trials": max_trials, "repeat": repeat,
            "chaos": CHAOS,
            "engine": "Machine.inject loop (emu stress not on main)", "versions": rows,
            "seed_baseline": base}


def table(res: dict) -> str:
    head = ("version", "family", "found", "trials med/max", "seconds med/max", "kind",
            "reproduced")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in res["versions"]:
        if r["level"] == "none":
            lines.append(" | ".join((r["version"], "-", "-", "-", "-", r["note"], "-")))
            continue
        if r["level"] == "unit":
            lines.append(" | ".join((r["version"], "(unit)", "unit only", "-", "-", r["kind"],
                                     f"{r['reproduced']}/{r['repeat']}")))
            continue
        if not r["found_seeds"]:
            lines.append(" | ".join((r["version"], r["family"], f"0/{r['seeds']}", "-", "-",
                                     "NOT FOUND", "-")))
            continue
        lines.append(" | ".join((
            r["version"], r["family"], f"{r['found_seeds']}/{r['seeds']}",
            f"{r['trials_median']:g}/{r['trials_max']}",
            f"{r['seconds_median']:.2f}/{r['seconds_max']:.2f}", r["kind"],
            f"{r['reproduced']}/{r['repeat']}")))
    b = res.get("seed_baseline")
    if b:
        lines.append(f"\nseed: {b['trials']} trials across {len(FAMILIES)} families, "
                     f"{b['violations']} violations; hazards {b['hazards'] or 'none'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", default="all", help="comma-separated (default all but seed)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--max-trials", type=int, default=200)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--watchdog", type=float, default=0.5)
    p.add_argument("--seed-trials", type=int, default=0,
                   help="also run seed over every family, N trials each (default 0)")
    p.add_argument("--chaos", type=float, default=0.0,
                   help="perturbation probability per yield point (default 0)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out")
    a = p.parse_args(argv)
    global CHAOS
    CHAOS = a.chaos
    names = [n for n in HANDLERS if n != "seed"] if a.versions == "all" else \
        [v.strip() for v in a.versions.split(",") if v.strip()]
    bad = [n for n in names if n not in HANDLERS]
    if bad:
        print(f"find_races: unknown version(s) {bad}; choose from {', '.join(HANDLERS)}",
              file=sys.stderr)
        return 2
    res = run(names, a.seeds, a.max_trials, a.repeat, a.watchdog, a.seed_trials)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, sort_keys=True)
    print(json.dumps(res, sort_keys=True) if a.json else table(res))
    missed = [r["version"] for r in res["versions"] if r["level"] == "machine"
              and not r["found_seeds"]]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
