"""Command line: ``emu run|trace|replay|inject|xen-mceinj|case|log|bench|stress|merge``
(also ``python -m emu``)."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from emu.errors import EmuError, UsageError
from emu.hw.msr import hexs

EXIT_NOT_DURABLE = 4   # a record of the run could not be made durable (the log's disk)


def _int(field: str):
    """An option's integer: ASCII digits only (int() takes any Unicode digit)."""
    def conv(text: str) -> int:
        t = text.strip()
        if not t.isascii() or not t.lstrip("+-").isdigit():
            raise UsageError(field, f"{text!r} is not a decimal integer (ASCII digits)")
        if len(t) > 40:
            raise UsageError(field, f"{text[:20]!r}...: too many digits")
        return int(t)
    return conv


def _float(field: str):
    """An option's finite number, ASCII only (float() takes Unicode digits, nan, inf)."""
    def conv(text: str) -> float:
        t = text.strip()
        try:
            if not t.isascii() or len(t) > 40:
                raise ValueError
            v = float(t)
        except ValueError:
            raise UsageError(field, f"{text!r} is not a number") from None
        if not math.isfinite(v):
            raise UsageError(field, f"{text!r}: give a finite number")
        return v
    return conv


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: exit 2 with our format
        raise UsageError("arguments", message)


def _machine_args(p):
    p.add_argument("--topology", default="1x2x2", help="SxCxT (default 1x2x2: 4 CPUs)")
    p.add_argument("--banks", type=_int("banks"), default=10, help="MCG_CAP.COUNT (default 10)")
    p.add_argument("--bank-scopes", default=None,
                   help="BANK[-BANK]:thread|core|package,... (default 0-3:core,4-9:package, "
                        "clipped to --banks)")
    p.add_argument("--handler", default="seed", help="handler version (default seed)")
    p.add_argument("--seed", type=_int("seed"), default=0, help="0..2**64-1 (default 0)")
    p.add_argument("--chaos", type=_float("chaos"), default=0.0,
                   help="perturbation probability per yield point (each trial reseeds from "
                        "its trial seed (--seed, trial))")
    p.add_argument("--starve", type=_float("starve"), default=0.05,
                   help="with chaos on: probability per trial that one seeded process is "
                        "starved 10 µs-100 ms at a seeded yield point (default 0.05)")
    p.add_argument("--watchdog", type=_float("watchdog"), default=2.0,
                   help="hang bound in seconds (default 2)")
    p.add_argument("--no-ser", action="store_true", help="clear MCG_CAP.SER_P")
    p.add_argument("--no-pin", action="store_true",
                   help="let the host scheduler move CPU processes between cores")
    p.add_argument("--guests", type=_int("guests"), default=1,
                   help="HVM guests besides Dom0 (default 1)")
    p.add_argument("--memory-pages", type=_int("memory-pages"), default=16384,
                   help="machine pages of 4 KiB (default 16384): Xen's 512 and 4096 per "
                        "domain, so at least 512 + 4096 x (guests + 1): 8704 with one guest")
    p.add_argument("--guest-vcpus", type=_int("guest-vcpus"), default=2,
                   help="vCPUs per guest (default 2)")
    p.add_argument("--vmce-policy", default="owner",
                   help="owner: vMCE to the impacted domain (default); dom0: to Dom0 only")
    p.add_argument("--no-cmci", action="store_true", help="clear MCG_CAP.CMCI_P")
    p.add_argument("--cmci-banks", default="all",
                   help="banks that can signal CMCI: all, none or BANK[-BANK],... (default all)")
    p.add_argument("--cmci-threshold", type=_int("cmci-threshold"), default=2,
                   help="Xen's cmci-threshold boot option (default 2)")
    p.add_argument("--poll-period", type=_float("poll-period"), default=0.0,
                   help="start Xen's polling timer with this first period in seconds "
                        "(adapts between a quarter and twice it; default 0: no timer)")
    p.add_argument("--idle-poll-us", type=_int("idle-poll-us"), default=1000,
                   help="the most an idle CPU polls before sleeping; the window adapts "
                        "to how soon machine checks come (default 1000; 0: sleep at once)")
    p.add_argument("--sched", default="os", help="os: the host schedules the CPU processes "
                   "(default); controlled: one runs at a time, chosen by --strategy")
    p.add_argument("--strategy", default=None,
                   help="under --sched controlled: random (default), pct:D, replay:TOKEN, "
                        "dfs:P (every schedule with at most P preemptions)")
    p.add_argument("--trials", type=_int("trials"), default=1,
                   help="under --sched controlled with random or pct:D: run up to N trials, "
                        "each seeded from --seed and its index, stopping at the first finding")


def _config(a):
    from emu.machine.config import MachineConfig
    extra = {"log_dir": a.log_dir} if getattr(a, "log_dir", None) is not None else {}
    return MachineConfig(topology=a.topology, nbanks=a.banks, bank_scopes=a.bank_scopes,
                         handler=a.handler, seed=a.seed, chaos=a.chaos, starve=a.starve,
                         watchdog_s=a.watchdog,
                         ser=not a.no_ser, pin_cpus=not a.no_pin, guests=a.guests,
                         memory_pages=a.memory_pages, guest_vcpus=a.guest_vcpus,
                         vmce_policy=a.vmce_policy, idle_poll_us=a.idle_poll_us,
                         cmci=not a.no_cmci, cmci_banks=a.cmci_banks,
                         cmci_threshold=a.cmci_threshold, poll_period_s=a.poll_period,
                         sched=a.sched, extra=extra).validate()


def _print_trial(res: dict, out) -> None:
    print(f"outcome: {res['outcome']}   resets: {res['resets']}   trial {res['trial']} "
          f"({res['handler']}, {res['topology']})", file=out)
    if res.get("raise_cpu") is not None and not res["errors"]:
        print(f"  #MC raised on cpu{res['raise_cpu']} ({'LMCE' if res['local'] else 'broadcast'})"
              " with no valid bank", file=out)
    pt = res.get("perturbation") or {}
    if pt.get("chaos") or (pt.get("starvation") or {}).get("armed"):
        n = pt["counts"]
        st = pt["starvation"]
        print(f"  perturbation: trial seed {pt['seed']}, chaos {pt['chaos']:g}: "
              + ", ".join(f"{k} {v}" for k, v in n.items())
              + (f"; starved {st['victim']} {st['s'] * 1e3:.3g} ms at yield point {st['point']}"
                 f" ({'at ' + str(st.get('site')) if st['happened'] else 'not reached'})"
                 if st.get("armed") else ""), file=out)
    for e in res["errors"]:
        if e.get("via", "mce") != "mce":
            ci = e["cmci"]
            raised = f"raised on CPUs {ci['cpus']}" if ci["raised"] else "not raised"
            print(f"  cpu{e['cpu']} bank{e['bank']} {e['status']} {e['class']} via {e['via']}: "
                  f"CMCI {raised} ({ci['why']}); bank owner {e['cmci_owner']}; "
                  f"{e['terminal']}", file=out)
            continue
        line = (f"  cpu{e['cpu']} bank{e['bank']} {e['status']} {e['class']}: owners {e['owners']}"
                f"{' cleared' if e['cleared'] else ' not cleared'}, action {e['action']}")
        if "page_offline" in e:
            po = e["page_offline"]
            line += f", page {po['mfn']:#x} {'|'.join(po['status']) or po['ret']}"
        print(line, file=out)
        if e.get("note"):
            print(f"    Xen: {e['note']}", file=out)
        v = e.get("vmce")
        if v:
            gr = v.get("guest_read") or {}
            print(f"    vMCE to DOM{v['domain']} vCPUs {v['vcpus']}: "
                  f"{'handled' if v.get('guest_handled') else 'NOT handled'} by its kernel"
                  + (f"; it read STATUS {gr['status']} ADDR {gr['addr']} MISC {gr['misc']}"
                     if gr else ""), file=out)
        if e.get("lost"):
            print(f"    no Dom0 record: {e['lost']}", file=out)
    if res.get("panic"):
        print(f"  panic: {res['panic']}", file=out)
    for h in res.get("hazards", []):
        print(f"  HAZARD {h['kind']}: {h['detail']}", file=out)
    for b in res["boot_log"]:
        print(f"  boot-time logout: cpu{b['cpu']} bank{b['bank']} {b['status']}", file=out)
    for d in res.get("domains", []):
        if d["state"] != "running" or d.get("process") != "running":
            print(f"  DOM{d['domid']}: {d['state']} ({d.get('crash_reason') or ''}), process "
                  f"{d.get('process')}", file=out)
    for x in res.get("lost_at_reset", []):
        print(f"  lost at reset: record {x['record_id']:#x} (trial {x['trial']}, cpu{x['cpu']} "
              f"bank{x['bank']} {x['status']}): {x['reason']}", file=out)
    print(f"  Dom0 log: {res.get('dom0_log_path')}", file=out)
    lat = res["latency_us"]
    print("  latency µs: " + ", ".join(f"{k} {v}" for k, v in lat.items() if v is not None),
          file=out)
    for v in res["violations"]:
        print(f"  VIOLATION: {v}", file=out)


def _print_sched(sc: dict, out) -> None:
    d = f"   DIVERGED at step {sc['diverged']['step']}: {sc['diverged']['reason']}" \
        if sc.get("diverged") else ""
    print(f"  schedule: {sc['strategy']} (seed {sc.get('seed')}), {sc['steps']} steps, "
          f"{sc['spins']} spins{d}", file=out)
    if sc.get("replay_verdict"):
        print(f"  replay: {sc['replay_verdict']}", file=out)
    print(f"  replay with: {sc['replay']}", file=out)


def _controlled_args(a, cfg, errors):
    """Check --strategy before anything runs; the strategy dict (or None)."""
    from emu.machine.sched import check_token_machine, decode_token, parse_strategy
    if a.strategy is None and a.trials == 1:
        return parse_strategy("random") if cfg.sched == "controlled" else None
    if cfg.sched != "controlled":
        raise UsageError("strategy" if a.strategy else "trials",
                         "needs --sched controlled")
    st = parse_strategy(a.strategy or "random")
    if not 1 <= a.trials <= 10_000_000:
        raise UsageError("trials", f"{a.trials}: give 1..10000000")
    if a.trials > 1 and st["kind"] not in ("random", "pct"):
        raise UsageError("trials", f"--trials runs a random or pct:D campaign; "
                         f"{a.strategy} is {'exhaustive' if st['kind'] == 'dfs' else 'one run'}")
    if st["kind"] == "replay":
        header, _ = decode_token(st["token"])
        check_token_machine(header, cfg)
    if st["kind"] == "dfs" and cfg_cpus(cfg) > 64:
        raise UsageError("strategy", "dfs keeps enabled sets for 64 CPUs at most")
    return st


def cfg_cpus(cfg) -> int:
    from emu.hw.topology import Topology
    return Topology(cfg).ncpus


def _run_campaign(a, m, errors, st) -> int:
    from emu.campaign.controlled import explore, search
    if st["kind"] == "dfs":
        r = explore(m, errors, st["bound"], local=a.local)
    else:
        r = search(m, errors, a.strategy or "random", a.trials, local=a.local, seed=a.seed)
    if a.json:
        print(json.dumps(r, sort_keys=True))
    elif st["kind"] == "dfs":
        print(f"{r['strategy']}: {r['schedules']} schedules "
              f"({'all' if r['complete'] else 'stopped early'}), {r['seconds']} s; "
              f"outcomes {r['outcomes']}; owners {r['owners']}; findings {r['findings']}")
        for f in r["first_findings"]:
            print(f"  finding: {'; '.join(f['violations'])}\n    {f['replay']}")
    else:
        print(f"{r['strategy']}: {r['trials_run']} trials, {r['seconds']} s, findings "
              f"{r['findings']}; outcomes {r['outcomes']}")
        if r["first"]:
            f = r["first"]
            print(f"  first finding at trial {f['trial']} ({f['seconds']} s): "
                  f"{'; '.join(f['violations'])}\n    {f['replay']}")
    return 1 if r["findings"] else 0


def _check_writable(path: str, field: str) -> None:
    import os
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UsageError(field, f"{path}: cannot write there; give a file in a writable "
                         "directory")


def cmd_run(a) -> int:
    import dataclasses

    from emu.machine import Machine
    from emu.trial.spec import DEMO, validate_errors
    cfg = _config(a)
    from emu.hw.topology import Topology
    topo = Topology(cfg)
    if a.raise_cpu is not None and not 0 <= a.raise_cpu < topo.ncpus:
        raise UsageError("raise", f"{a.raise_cpu}: give a CPU 0..{topo.ncpus - 1}")
    # --raise without --error: a #MC with no valid bank (nothing is written)
    errors = a.error or ([] if a.raise_cpu is not None else DEMO)
    if errors:
        validate_errors(errors, topo.ncpus, topo.nbanks, cfg.domids, cfg.ser)   # before anything
    for c in a.offline or []:
        if not 1 <= c < topo.ncpus:
            raise UsageError("offline", f"CPU {c}: give 1..{topo.ncpus - 1} (CPU 0, the boot "
                             "CPU, cannot go offline)")
    st = _controlled_args(a, cfg, errors)
    if st is not None and (st["kind"] == "dfs" or a.trials > 1):
        with Machine(cfg) as m:
            return _run_campaign(a, m, errors, st)
    tracing = bool(a.trace or a.trace_png or a.explain)
    for path, field in ((a.trace, "trace"), (a.trace_png, "trace-png")):
        if path:
            _check_writable(path, field)
    if a.trace_png:
        import importlib.util
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("trace-png", "needs matplotlib: pip install 'emu-mca[plot]'")
    if tracing:
        cfg = dataclasses.replace(cfg, trace=True)
    with Machine(cfg) as m:
        offline = [m.cpu_offline(c) for c in dict.fromkeys(a.offline or [])]
        res = m.inject(errors, local=a.local, raise_cpu=a.raise_cpu,
                       schedule=a.strategy if st else None)
        tr = m.trace() if tracing else None
    if offline:
        res["offline"] = offline
    if tr is not None:
        from emu.formats import trace as T
        if a.trace:
            T.write_chrome_trace(tr, a.trace, res)
        if a.trace_png:
            T.swimlane_png(tr, a.trace_png, res)
    out = sys.stderr if a.json else sys.stdout
    if a.json:
        print(json.dumps(res, sort_keys=True))
    else:
        if not a.error and a.raise_cpu is None:
            print("demonstration: Xen's srao_mem case (bank 8, 0xBD000000004000CF) "
                  "on a free page", file=sys.stdout)
        _print_trial(res, sys.stdout)
        if "sched" in res:
            _print_sched(res["sched"], sys.stdout)
    if a.explain:
        print("\n".join(T.explain(tr, res)), file=out)
    for path, what in ((a.trace, "trace (Chrome Trace Event JSON; open in Perfetto's UI or "
                        "chrome://tracing)"), (a.trace_png, "swimlane picture")):
        if path:
            print(f"{what}: {path}", file=out)
    nd = not_durable(res)
    if nd:
        f = nd[0]["not_durable"]
        print(f"emu: error: log-dir: {len(nd)} record{'s' if len(nd) > 1 else ''} could not be "
              f"made durable: {f['path']}: {f['errno']} ({f['message']}); they wait in Xen's "
              "telemetry pool: free space or give another --log-dir", file=sys.stderr)
        return EXIT_NOT_DURABLE
    return 1 if res["violations"] else 0


def cmd_detect(a) -> int:
    """``emu versions --detect``: each version's campaign until its first finding, per
    strategy (the detection table)."""
    from emu.campaign.controlled import format_version_table, version_table
    from emu.machine.sched import parse_strategy
    from emu.xen.versions import HANDLERS
    names = list(HANDLERS) if a.handlers in (None, "", "all") else \
        [n.strip() for n in a.handlers.split(",") if n.strip()]
    bad = [n for n in names if n not in HANDLERS]
    if bad:
        raise UsageError("handlers", f"unknown handler(s) {', '.join(bad)}; choose from "
                         f"{', '.join(HANDLERS)} (or all)")
    strategies = [x.strip() for x in a.strategies.split(",") if x.strip()]
    for st in strategies:
        if st != "chaos" and parse_strategy(st)["kind"] not in ("random", "pct"):
            raise UsageError("strategies", f"{st!r}: give chaos, random or pct:D")
    if not 1 <= a.trials <= 1_000_000:
        raise UsageError("trials", f"{a.trials}: give 1..1000000")

    def progress(h, st, r):
        if not a.json and r.get("level") == "machine":
            print(f"  {h} {st}: " + (f"found at trial {r['trials']} ({r['seconds']} s)"
                                     if r.get("trials") else
                                     f"nothing in {r.get('trials_run')} trials"),
                  file=sys.stderr, flush=True)
    rows = version_table(names, strategies, trials=a.trials, seed=a.seed, chaos=a.chaos,
                         progress=progress)
    if a.json:
        print(json.dumps({"strategies": strategies, "trials": a.trials, "seed": a.seed,
                          "chaos": a.chaos, "rows": rows}, sort_keys=True))
    else:
        print(format_version_table(rows, strategies, a.chaos))
    missed = [r["handler"] for r in rows if r["level"] == "machine" and r["handler"] != "seed"
              and any(not (r[s] or {}).get("trials") for s in strategies)]
    seed_found = any((r[s] or {}).get("trials") for r in rows if r["handler"] == "seed"
                     for s in strategies)
    return 1 if missed or seed_found else 0


def cmd_versions(a) -> int:
    if a.detect:
        return cmd_detect(a)
    from emu.xen.versions import HANDLERS, version_info
    infos = [version_info(n) for n in HANDLERS]
    if a.json:
        print(json.dumps({"versions": infos}, sort_keys=True))
        return 0
    for i in infos:
        print(f"{i['name']:<22} {i['description']}")
        if i["stands_for"]:
            print(f"{'':<22}   stands for: {i['stands_for']}")
        if i["finding"]:
            print(f"{'':<22}   finding:    {i['finding']}")
        if i["family"]:
            print(f"{'':<22}   family:     {i['family']}")
    return 0


def not_durable(res: dict) -> list[dict]:
    """The Dom0 log entries of a trial result that Dom0 could not write."""
    ents = [d for e in res.get("errors", []) for d in e.get("dom0_log", [])]
    ents += [b["dom0_log"] for b in res.get("boot_log", []) if b.get("dom0_log")]
    return [d for d in ents if d.get("not_durable")]


# --- inputs people already write: mce-inject files, xen-mceinj, mce-test cases ----------
def _topo(cfg):
    from emu.hw.topology import Topology
    return Topology(cfg)


def _read_inject(path: str, topo):
    """Records of an mce-inject file (``-`` for stdin), planned; every injection checked
    runnable before anything boots (the first refusal is a UsageError naming FILE:LINE)."""
    from emu.formats import mce_inject
    if path == "-":
        recs = mce_inject.parse(sys.stdin.read(), "<stdin>", ncpus=topo.ncpus,
                                nbanks=topo.nbanks)
    else:
        if os.path.isdir(path):
            raise UsageError(path, "is a directory; give an mce-inject input file (or -)")
        recs = mce_inject.parse_file(path, ncpus=topo.ncpus, nbanks=topo.nbanks)
    if not recs:
        raise UsageError(path if path != "-" else "<stdin>", "no record: an mce-inject file "
                         "starts a record with CPU n (or MCE)")
    return recs


def _injections(recs, topo):
    from emu.formats import mce_inject
    plans = mce_inject.plan(recs, ncpus=topo.ncpus)
    for inj in plans:
        if inj.refusal is not None:
            raise UsageError(*inj.refusal)
    return [(inj, list(inj.specs), bool(inj.emu_local)) for inj in plans]


def run_injections(a, path: str) -> int:
    """``emu inject FILE`` / ``emu run --inject FILE``: each planned injection on one
    booted machine, one result (one JSON object with --json) per injection."""
    from emu.machine import Machine
    from emu.trial.spec import validate_errors
    cfg = _config(a)
    topo = _topo(cfg)
    recs = _read_inject(path, topo)
    if getattr(a, "dump", False):
        from emu.formats.mce_inject import dump
        print(dump(recs), end="")
        return 0
    plans = _injections(recs, topo)
    for inj, specs, _ in plans:   # nothing runs on bad input
        try:
            validate_errors(specs, topo.ncpus, topo.nbanks, cfg.domids)
        except UsageError as exc:
            raise UsageError(inj.trigger.where, f"{exc.field}: {exc.message}") from None
    worst = 0
    with Machine(cfg) as m:
        for inj, specs, local in plans:
            res = m.inject(specs, local=local)
            res["injection"] = {"index": inj.index, "source": inj.trigger.where,
                                "records": [r.where for r in inj.records],
                                "specs": specs, "notes": list(inj.notes)}
            if a.json:
                print(json.dumps(res, sort_keys=True), flush=True)
            else:
                how = ("poller" if specs[0].endswith("via=poll") else
                       "LMCE" if local else "#MC broadcast")
                print(f"injection {inj.index + 1} ({inj.trigger.where}, {how}):")
                for n in inj.notes:
                    print(f"  note: {n}")
                _print_trial(res, sys.stdout)
            worst = max(worst, 1 if res["violations"] else 0)
    return worst


def _xen_mceinj_plan(a, tool_args, cfg):
    from emu.formats import xen_mceinj
    from emu.xen.page_alloc import DOM_PAGES
    topo = _topo(cfg)
    return xen_mceinj.parse(tool_args, numbering=a.numbering, ncpus=topo.ncpus,
                            nbanks=topo.nbanks, domids=cfg.domids, max_gpa=DOM_PAGES << 12)


def translate(cfg, domain: int | None, addr: int) -> dict:
    """xen-mceinj -D's translation, GPA -> machine address, computed from emu's static
    memory map (:func:`emu.xen.page_alloc.domain_range`, the layout ``init_default``
    writes into the page table at boot, which ``gfn_to_mfn`` reads), not from a booted
    machine: until a page is offlined the two agree (a test shows it)."""
    from emu.xen.page_alloc import domain_range
    if domain is None:
        return {"domain": None, "gaddr": addr, "maddr": addr, "mfn": addr >> 12}
    r = domain_range(cfg.domids.index(domain))
    mfn = r.start + (addr >> 12)
    return {"domain": domain, "gaddr": addr, "maddr": mfn << 12 | (addr & 0xFFF), "mfn": mfn}


def cmd_xen_mceinj(a, tool_args) -> int:
    from emu.machine import Machine
    cfg = _config(a)
    plan = _xen_mceinj_plan(a, tool_args, cfg)
    if plan.action == "help":
        print("\n".join(plan.output))
        return 0
    if plan.action == "dump":
        t = translate(cfg, plan.domain, plan.addr)
        if a.json:
            print(json.dumps({"schema": "emu.xen-mceinj-dump/1", "argv": list(plan.argv),
                              "numbering": plan.numbering, "domain": t["domain"],
                              "gaddr": hexs(t["gaddr"]), "maddr": hexs(t["maddr"]),
                              "mfn": t["mfn"]}, sort_keys=True))
            return 0
        where = "Xen" if plan.domain is None else f"Dom{plan.domain}"
        for line in plan.output:     # the tool's own gaddr line gets the translation
            if not line.startswith(f"{where}: gaddr="):
                print(line)
        print(f"{where}: gaddr={t['gaddr']:#x} maddr={t['maddr']:#x} (mfn {t['mfn']:#x}, "
              "emu's memory map)")
        return 0
    if not plan.runnable:
        raise UsageError(*plan.refusal)
    spec, local = plan.spec, bool(plan.emu_local)
    from emu.trial.spec import validate_errors
    topo = _topo(cfg)
    validate_errors([spec], topo.ncpus, topo.nbanks, cfg.domids)
    with Machine(cfg) as m:
        res = m.inject([spec], local=local)
    exp = plan.expected
    res["xen_mceinj"] = {"argv": list(plan.argv), "numbering": plan.numbering,
                         "type": plan.type, "description": plan.error.description,
                         "spec": spec, "expected_outcome": exp.outcome,
                         "expected_class": exp.xen_class}
    if a.json:
        print(json.dumps(res, sort_keys=True))
    else:
        for line in plan.output:
            print(line)
        print(f"xen-mceinj -t {plan.type} ({plan.error.description}): {spec}")
        print(f"  Xen's code leads to: {exp.outcome} ({exp.xen_class}); {exp.action}")
        _print_trial(res, sys.stdout)
    return 1 if res["violations"] else 0


def cmd_case(a) -> int:
    from emu.formats import cases
    if a.case_cmd == "list":
        rows = []
        for name in cases.case_names():
            plan = cases.plan_case(name, numbering=a.numbering)
            chk = plan.expected.mce_test
            why = "" if plan.runnable else f"   [skipped: {plan.refusal[1]}]"
            rows.append(f"{name:16} xen-mceinj {' '.join(plan.argv):10} requires "
                        f"{'+'.join(chk.requires)}{why}")
        print("\n".join(rows))
        return 0
    names = cases.resolve(a.names)
    cfg = _config(a)
    import dataclasses
    kw = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    failed = 0
    counts = {cases.PASSED: 0, cases.FAILED: 0, cases.SKIPPED: 0}
    for name in names:
        r = cases.run_case(name, numbering=a.numbering, mcelog=a.mcelog, **kw)
        counts[r.verdict] += 1
        failed += r.verdict == cases.FAILED
        if a.json:
            print(json.dumps(dict(r.as_dict(), schema="emu.case/1"), sort_keys=True),
                  flush=True)
            continue
        head = f"{name}: {r.verdict}"
        if r.verdict == cases.SKIPPED:
            head += f" ({r.reason})"
        print(head, flush=True)
        for check, ok, detail in r.checks:
            print(f"  {check}: {'PASS' if ok else 'FAIL'}: {detail}")
    if not a.json:
        print(f"{counts[cases.PASSED]} passed, {counts[cases.FAILED]} failed, "
              f"{counts[cases.SKIPPED]} skipped")
    return 1 if failed else 0


def cmd_log(a) -> int:
    """``emu log``: every log of a run (a directory) or one log, each in its rendering;
    ``--raw`` as stored; ``--follow`` keeps reading; ``--mcelog-ascii FILE`` decodes
    mcelog's own text input."""
    from emu.domains import logview
    if a.mcelog_ascii:
        if a.file or a.follow:
            raise UsageError("mcelog-ascii", "decodes one mcelog text file on its own: give no "
                             "run log and no --follow with it")
        print(logview.mcelog_ascii(a.mcelog_ascii), end="")
        return 0
    if not a.file:
        raise UsageError("file", "give a run directory or one of its logs (the dom0_log_path "
                         "of a run), or --mcelog-ascii FILE")
    if a.follow:
        return logview.follow(a.file, raw=a.raw or a.json, out=sys.stdout)
    sys.stdout.write(logview.render(a.file, raw=a.raw or a.json, headers=not a.json))
    return 0


def _version() -> str:
    import emu
    return f"emu {emu.__version__}"


_REPLAY_MACHINE = {"topology": "topology", "banks": "nbanks", "bank_scopes": "bank_scopes",
                   "handler": "handler", "guests": "guests", "memory_pages": "memory_pages",
                   "guest_vcpus": "guest_vcpus", "vmce_policy": "vmce_policy"}


def cmd_replay(a) -> int:
    """Replay a schedule token on the machine its header names (options given here
    must agree with it: exit 2 naming the difference)."""
    from emu.machine import Machine, MachineConfig
    from emu.machine.sched import MACHINE_KEYS, check_token_machine, decode_token
    if not a.schedule:
        raise UsageError("schedule", "give --schedule TOKEN (printed by a controlled run)")
    header, _ = decode_token(a.schedule)
    mh = header.get("machine") or {}
    kw = {k: mh[k] for k in MACHINE_KEYS if k in mh}
    kw["handler"] = header.get("handler", "seed")
    given = {f: getattr(a, opt) for opt, f in _REPLAY_MACHINE.items()
             if getattr(a, opt) is not None}
    cfg = MachineConfig(**dict(kw, **given), sched="controlled", seed=a.seed or 0,
                        extra={"log_dir": a.log_dir} if a.log_dir else {})
    check_token_machine(header, cfg)          # before validate: an unknown handler too
    cfg.validate()
    if not 1 <= a.repeat <= 100_000:
        raise UsageError("repeat", f"{a.repeat}: give 1..100000")
    with Machine(cfg) as m:
        if a.shrink:
            from emu.campaign.controlled import shrink
            r = shrink(m, a.schedule)
            if a.json:
                print(json.dumps(r, sort_keys=True))
            else:
                print(f"shrunk in {r['trials']} trials: {r['preemptions_before']} -> "
                      f"{r['preemptions']} preemptions, {r['steps']} steps; {r['outcome']}: "
                      f"{'; '.join(r['violations'])}\n  {r['replay']}")
            return 1
        verdicts: dict[str, int] = {}
        res = None
        for _ in range(a.repeat):
            res = m.replay(a.schedule)
            v = res["sched"]["replay_verdict"]
            verdicts[v] = verdicts.get(v, 0) + 1
    if a.json:
        print(json.dumps({"verdicts": verdicts, "last": res}, sort_keys=True))
    else:
        _print_trial(res, sys.stdout)
        _print_sched(res["sched"], sys.stdout)
        print(f"replayed {a.repeat}: " + ", ".join(f"{k} {v}" for k, v in sorted(
            verdicts.items())), file=sys.stdout)
    if verdicts.get("diverged"):
        return 3     # the run left its schedule: something outside the scheduler's control
    return 1 if res["violations"] else 0


def _run_args(r) -> None:
    r.add_argument("--error", action="append",
                   help='"cpu=N bank=N status=0x.. [addr= misc= mcg= via=mce|cmci|poll]"')
    r.add_argument("--local", action="store_true",
                   help="deliver as LMCE to the first error's CPU (or the --raise CPU)")
    r.add_argument("--raise", dest="raise_cpu", type=_int("raise"), metavar="CPU",
                   help="raise the #MC on CPU (broadcast unless --local); without --error, no "
                        "bank is written: a #MC with no valid bank")
    r.add_argument("--offline", type=_int("offline"), action="append",
                   help="take this CPU offline (Xen's cpu_down) before injecting; repeatable")
    r.add_argument("--json", action="store_true", help="print one JSON object")
    _log_dir_arg(r)
    r.add_argument("--trace-png", help="trace the trial and draw it as a PNG swimlane picture")
    r.add_argument("--explain", action="store_true",
                   help="trace the trial and tell it in a few lines")


def _machine_dict(a) -> dict:
    """MachineConfig fields from the machine options, as ``_config`` reads them (the
    campaign's chaos and starvation are per trial, not the machine's)."""
    if getattr(a, "sched", "os") != "os":
        raise UsageError("sched", "emu stress and its replay run under the host scheduler; "
                         "for controlled scheduling use emu run --sched controlled --trials N")
    extra = {"log_dir": a.log_dir} if getattr(a, "log_dir", None) else {}
    return {"topology": a.topology, "nbanks": a.banks, "bank_scopes": a.bank_scopes,
            "handler": a.handler, "seed": a.seed, "watchdog_s": a.watchdog,
            "ser": not a.no_ser, "pin_cpus": not a.no_pin, "guests": a.guests,
            "memory_pages": a.memory_pages, "guest_vcpus": a.guest_vcpus,
            "vmce_policy": a.vmce_policy, "idle_poll_us": a.idle_poll_us,
            "cmci": not a.no_cmci, "cmci_banks": a.cmci_banks,
            "cmci_threshold": a.cmci_threshold, "poll_period_s": a.poll_period,
            "extra": extra}


def _arg(p, flag: str, **kw) -> None:
    """Add an option, or re-purpose one ``_machine_args`` already defines (its default
    and help) for this subcommand."""
    act = p._option_string_actions.get(flag)
    if act is None:
        p.add_argument(flag, **kw)
        return
    if "default" in kw:
        p.set_defaults(**{act.dest: kw["default"]})
    if "help" in kw:
        act.help = kw["help"]


def _machine_defaults() -> dict:
    tmp = argparse.ArgumentParser(add_help=False)
    _machine_args(tmp)
    return {x.dest: x.default for x in tmp._actions}


def _campaign_args(p) -> None:
    """Options a campaign and a replay share (what rebuilds a trial)."""
    _machine_args(p)
    p.add_argument("--scenario", default="all", help="FAMILY[:WEIGHT],... (default all: the "
                   "nine families; also no_bank), or exposing: the family the --handler "
                   "version's metadata names")
    _arg(p, "--starve", type=float, default=None, help="probability per trial (with "
         "--chaos) of starving one seeded victim process (default 0.05)")
    p.add_argument("--faults", default="", help="fault kinds drawn per trial: kill_cpu, "
                   "stall_cpu, kill_dom0, pause_dom0 or all (default none)")
    p.add_argument("--fault-rate", type=float, default=0.1,
                   help="probability per trial of a fault (default 0.1)")
    p.add_argument("--fail-on", default="violation", choices=None,
                   help="violation (default) or hazard: hazards exit 1 too")
    p.add_argument("--hazard-c", type=float, default=0.0,
                   help="probability that an lmce trial is hazard C's LMCE (a hang)")
    p.add_argument("--test-violate", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--log-dir", help="run directory for Dom0's log")


def _options(a, **kw):
    from emu.campaign.stress import Options
    hooks = {}
    if a.test_violate:
        try:
            s, i = (int(x) for x in a.test_violate.split(":"))
        except ValueError:
            raise UsageError("test-violate", f"{a.test_violate!r}: write S:I") from None
        hooks["violate_trial"] = [s, i]
    return Options(seed=a.seed, scenario=a.scenario, chaos=a.chaos, starve=a.starve,
                   faults=a.faults, fault_rate=a.fault_rate, fail_on=a.fail_on,
                   hazard_c=a.hazard_c, json=a.json, hooks=hooks, machine=_machine_dict(a),
                   **kw).validate()


def cmd_stress(a) -> int:
    from emu.campaign.stress import Campaign
    db = False if a.no_db else a.db
    o = _options(a, trials=a.trials, duration=a.duration, stop_on_first=a.stop_on_first,
                 jobs=a.jobs, shard=a.shard or (0, 1), dask=a.dask, block=a.block, out=a.out,
                 db=db, progress=False if a.no_progress else None)
    return Campaign(o).run()["exit_code"]


def cmd_replay_trial(a) -> int:
    """``emu replay --seed S --trial I ...``: a stress campaign's trial, --repeat times."""
    from emu.campaign.replay import replay
    if a.trial is None:
        raise UsageError("trial", "give --trial I (with the campaign's --seed and "
                         "--scenario), or --schedule TOKEN for a controlled schedule")
    for k, v in _machine_defaults().items():     # the replay parser defaults them to None
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.repeat = 20 if a.repeat is None else a.repeat
    o = _options(a, db=False, progress=False)
    r = replay(o, a.seed, a.trial, a.family, a.repeat)
    if a.json:
        print(json.dumps({k: v for k, v in r.items() if k != "records"}, sort_keys=True))
    else:
        print(f"trial {r['trial']} of seed {r['seed']} ({r['family']}): "
              f"{r['reproduced']}/{r['repeat']} repeats reproduced a "
              f"{'finding' if a.fail_on == 'hazard' else 'violation'}")
        print("  specs: " + "; ".join(r["specs"]["errors"]) if r["specs"]["errors"]
              else f"  specs: (none; raise_cpu {r['specs'].get('raise_cpu')})")
        print("  outcomes: " + ", ".join(f"{k} {v}" for k, v in r["outcomes"].items()))
        for k, v in r["findings"].items():
            if k == "hazard I" and r["hazard_i"]:
                print("  hazard I: the same error attributed to different CPUs across the "
                      "repeats: " + "; ".join(f"error[{e}] owners {o}"
                                              for e, o in r["hazard_i"].items()))
                continue
            first = next(f for x in r["records"] for f in x["findings"]
                         if (f["kind"] if f["kind"] == "violation" else f"hazard {f['id']}")
                         == k)
            print(f"  {k}: in {v}/{r['repeat']} repeats: {first['text'][:200]}")
    return 1 if r["reproduced"] else 0


def cmd_merge(a) -> int:
    from emu.campaign.coverage import table
    from emu.campaign.shards import merge
    if a.out:
        _check_writable(a.out, "out")
    s = merge(a.files)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(json.dumps(s, sort_keys=True) + "\n")
    print(table(s), file=sys.stderr)
    if a.json:
        print(json.dumps(s, sort_keys=True))
    return 1 if s["violations"] else 0


def main(argv=None) -> int:
    p = _Parser(prog="emu", description="Concurrency-faithful emulator of Xen's x86 MCA handling")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="boot a machine, inject errors, print the outcome")
    _machine_args(r)
    _run_args(r)
    r.add_argument("--trace", help="trace the trial: Chrome Trace Event JSON to this file")
    r.add_argument("--inject", metavar="FILE",
                   help="an mce-inject input file (- for stdin) instead of --error")
    t = sub.add_parser("trace", help="run one trial traced: Chrome Trace Event JSON, "
                       "the trial explained (emu run --trace FILE --explain)")
    _machine_args(t)
    _run_args(t)
    t.add_argument("--out", dest="trace", default="emu-trace.json",
                   help="the trace file (default emu-trace.json)")
    i = sub.add_parser("inject", help="run an mce-inject input file (- for stdin): each "
                       "injection on one booted machine")
    i.add_argument("file", help="mce-inject input (several records; - reads stdin)")
    _machine_args(i)
    i.add_argument("--dump", action="store_true",
                   help="print the records in mce-inject's canonical --dump form; run nothing")
    i.add_argument("--json", action="store_true", help="one JSON object per injection")
    _log_dir_arg(i)
    x = sub.add_parser("xen-mceinj", add_help=False,
                       help="xen-mceinj's options: -t N -c CPU -d DOM -p ADDR [-l] [-D] [-h]")
    _machine_args(x)
    x.add_argument("--numbering", default="current", choices=("current", "2010"),
                   help="the tool's error table: current (default) or the 2010 one")
    x.add_argument("--json", action="store_true", help="print one JSON object")
    _log_dir_arg(x)
    c = sub.add_parser("case", help="Xen's mce-test cases by name (list, run NAME|all)")
    csub = c.add_subparsers(dest="case_cmd", required=True, parser_class=_Parser)
    cl = csub.add_parser("list", help="the cases of Xen's mce-test (xen-mca.md §9.2)")
    cl.add_argument("--numbering", default="2010", choices=("2010", "current"))
    cr = csub.add_parser("run", help="run cases and check Xen's expected behaviour; "
                         "PASSED/FAILED/SKIPPED each, exit 1 on a FAILED")
    cr.add_argument("names", nargs="+", metavar="NAME", help="srao_mem/dom0 ..., a group "
                    "(srao_mem) or all")
    _machine_args(cr)
    cr.add_argument("--numbering", default="2010", choices=("2010", "current"),
                    help="xen-mceinj's table the case's -t is read against (default 2010, "
                    "the cases' own)")
    cr.add_argument("--mcelog", default="old", choices=("old", "current"),
                    help="the mcelog decode the case greps: old (before 2021, the cases' "
                    "time; default) or current")
    cr.add_argument("--json", action="store_true", help="one JSON object per case")
    _log_dir_arg(cr)
    lg = sub.add_parser("log", help="render a run's logs: Dom0's records (mcelog text), "
                        "Dom0's kernel log, the guests' logs")
    lg.add_argument("file", nargs="?", help="a run directory, or one of its logs (a "
                    "dom0.jsonl, its .kernel, a domN.guest.jsonl)")
    lg.add_argument("--raw", action="store_true",
                    help="print the records as they are stored (a ==> file <== line before "
                    "each log of a directory)")
    lg.add_argument("--json", action="store_true",
                    help="the records as stored, JSON Lines only (no file headers)")
    lg.add_argument("--follow", "-f", action="store_true",
                    help="keep reading: print what a running machine appends")
    lg.add_argument("--mcelog-ascii", metavar="FILE",
                    help="decode mcelog's own text input (- for stdin) as mcelog --ascii does")
    v = sub.add_parser("versions", help="list the handler versions (--handler NAME); "
                       "--detect: how fast each strategy finds each version")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.add_argument("--detect", action="store_true",
                   help="run each version's campaign (its exposing family) until the first "
                   "finding, per strategy: the detection table")
    v.add_argument("--handlers", default="all", help="with --detect: versions, comma-"
                   "separated (default all)")
    v.add_argument("--strategies", default="chaos,random,pct:2,pct:3",
                   help="with --detect: chaos (host scheduling, perturbed), random, pct:D "
                   "(controlled) (default chaos,random,pct:2,pct:3)")
    v.add_argument("--trials", type=_int("trials"), default=300,
                   help="with --detect: trial budget per version and strategy (default 300)")
    v.add_argument("--seed", type=_int("seed"), default=0, help="with --detect: the "
                   "campaign seed (default 0)")
    v.add_argument("--chaos", type=_float("chaos"), default=0.2,
                   help="with --detect: the chaos column's perturbation per yield point "
                   "(default 0.2)")
    b = sub.add_parser("bench", help="latency by phase, CPU count and handler version, with "
                       "the futex floor and a naive peer design; --compare, --plot")
    b.add_argument("--cpus", default="4,16,64", help="CPU counts, e.g. 1,2,4,...,256 "
                   "(topologies chosen for each; default 4,16,64)")
    b.add_argument("--topology", help="SxCxT list instead of --cpus, e.g. 1x2x2,2x8x2")
    b.add_argument("--handler", default="seed", help="handler versions, interleaved in one "
                   "run (default seed); a version twice: an A/A pair; VERSION+trace: traced")
    b.add_argument("--injections", type=_int("injections"), default=1000, help="per configuration")
    b.add_argument("--block", type=_int("block"), default=20,
                   help="injections per turn: the versions and baselines take turns")
    b.add_argument("--guest-every", type=_int("guest-every"), default=8,
                   help="every Nth #MC hits a guest page, for guest_handled (0: none)")
    b.add_argument("--boots", type=_int("boots"), default=5, help="boots timed per configuration")
    b.add_argument("--warmup", type=_int("warmup"), default=5,
                   help="machine checks not counted after each boot (default 5)")
    b.add_argument("--instances", type=_int("instances"), default=3,
                   help="machine instances per variant, "
                   "one after the other, sharing the injections (default 3)")
    b.add_argument("--hook", action="append", help="test hook NAME=VALUE for the CPUs, e.g. "
                   "handler_extra_work_us=50 (a deliberately slowed variant)")
    b.add_argument("--no-naive", action="store_true", help="skip the naive peer baseline")
    b.add_argument("--no-stress", action="store_true", help="skip bench/stress.py")
    b.add_argument("--json", action="store_true", help="one JSON object per configuration")
    b.add_argument("--out", help="also write the JSON lines to this file")
    b.add_argument("--plot", help="write a PNG: latency by CPU count (needs the plot extra)")
    b.add_argument("--compare", nargs=2, metavar=("OLD.json", "NEW.json"),
                   help="compare two --out files: ratio, bootstrap interval, verdict")
    b.add_argument("--min-change", type=float, default=0.02,
                   help="--compare: smallest change called faster/slower (default 0.02)")
    st = sub.add_parser("stress", help="a seeded campaign: many trials, checked by the "
                        "oracle and the expected-outcome model; replay lines for findings")
    _campaign_args(st)
    _arg(st, "--trials", type=_int("trials"), default=None,
         help="trial indices 0..N-1 (default 100 "
         "without --duration)")
    st.add_argument("--duration", help="run for this long, e.g. 30s, 2m")
    st.add_argument("--stop-on-first", action="store_true", help="stop at the first failure")
    st.add_argument("--jobs", type=_int("jobs"), default=1,
                    help="workers, each with its own machine")
    st.add_argument("--shard", help="i/N: run trial indices i, i+N, ... only")
    st.add_argument("--dask", help="local or tcp://host:port: Dask workers, one machine each")
    st.add_argument("--block", type=_int("block"), default=50, help="trial indices per Dask task")
    st.add_argument("--out", help="JSON Lines: one emu.stress.trial/1 per trial, then the "
                    "emu.stress.summary/1")
    st.add_argument("--db", help="failure database (default $TMPDIR/emu-runs/"
                    "stress-failures.jsonl); its failures are replayed first")
    st.add_argument("--no-db", action="store_true", help="no failure database")
    st.add_argument("--no-progress", action="store_true", help="no progress bar")
    rp = sub.add_parser("replay", help="rebuild trial I of a stress campaign's seed S and "
                        "run it --repeat times; or replay a --schedule token (controlled)")
    _campaign_args(rp)
    # None: "not given" (a schedule token's machine is the default; a trial's are
    # filled in from the machine options' defaults)
    rp.set_defaults(**{k: None for k in _machine_defaults()})
    rp.add_argument("--trial", type=_int("trial"), help="the stress trial index (with --seed)")
    rp.add_argument("--family", help="the family the campaign drew (checked)")
    rp.add_argument("--repeat", type=_int("repeat"), default=None,
                    help="repeats (default 20 for a trial, 1 for a schedule)")
    rp.add_argument("--schedule", help="a controlled schedule token (from an `emu replay "
                    "--schedule` line): replay it; machine options must match its header")
    rp.add_argument("--shrink", action="store_true", help="with --schedule: remove "
                    "preemptions while the finding persists; print the shortest")
    mg = sub.add_parser("merge", help="one summary from several emu stress --out files")
    mg.add_argument("files", nargs="+", help="--out files of emu stress (e.g. shards)")
    mg.add_argument("--json", action="store_true", help="print the summary as JSON")
    mg.add_argument("--out", help="write the merged summary to this file")
    try:
        a, extra = p.parse_known_args(argv)
        if extra and a.cmd != "xen-mceinj":
            raise UsageError("arguments", f"unrecognized arguments: {' '.join(extra)}")
        if a.cmd == "stress":
            return cmd_stress(a)
        if a.cmd == "replay":
            if a.schedule:
                a.repeat = 1 if a.repeat is None else a.repeat
                return cmd_replay(a)
            return cmd_replay_trial(a)
        if a.cmd == "merge":
            return cmd_merge(a)
        if a.cmd == "run":
            if a.inject:
                if a.error:
                    raise UsageError("inject", "give --inject FILE or --error, not both")
                if a.local:
                    raise UsageError("local", "an mce-inject file says itself how each record "
                                     "is raised (LMCES with NOBROADCAST for an LMCE): drop --local")
                if a.trace or a.trace_png or a.explain:
                    raise UsageError("inject", "tracing takes one trial: use --error with "
                                     "--trace/--trace-png/--explain")
                return run_injections(a, a.inject)
            return cmd_run(a)
        if a.cmd == "trace":
            a.explain = True
            return cmd_run(a)
        if a.cmd == "inject":
            return run_injections(a, a.file)
        if a.cmd == "xen-mceinj":
            return cmd_xen_mceinj(a, extra)
        if a.cmd == "case":
            return cmd_case(a)
        if a.cmd == "log":
            return cmd_log(a)
        if a.cmd == "versions":
            return cmd_versions(a)
        if a.cmd == "bench":
            from emu.bench import main as bench_main
            return bench_main(a)
    except EmuError as exc:
        print(f"emu: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # e.g. `emu run | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception:  # noqa: BLE001 - a bug of emu: exit 3, the traceback on stderr only
        import traceback
        traceback.print_exc(file=sys.stderr)
        return 3
    return 0


def _log_dir_arg(p) -> None:
    p.add_argument("--log-dir", help="run directory for the logs (default: a new one under "
                   "$TMPDIR/emu-runs; the newest EMU_KEEP_RUNS, default 50, are kept)")
