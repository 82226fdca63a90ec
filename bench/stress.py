"""Stress-campaign throughput: trials/s on N CPUs, unperturbed, with chaos, with faults,
beside the handler latency of the same run, and where each trial's CPU time goes.

    python bench/stress.py --cpus 4,16,64 --trials 2000 [--json]

One campaign worker (one booted machine, the campaign engine of
:mod:`emu.campaign.stress` in this process: scenario generation, the oracle, the
expected-outcome model) plays ``--trials`` trial indices per variant:

- ``plain``: no perturbation;
- ``chaos``: ``--chaos`` per yield point (default 0.05) and starvation;
- ``faults``: chaos plus a fault in ``--fault-rate`` of the trials (kill_dom0,
  pause_dom0, kill_cpu; a killed CPU costs a warm reset).

The default mix (``owner_race,memory``) has no family that ends in a reset or waits
for a watchdog, so the figure is the engine's and the machine's rate, not the price
of warm resets and hangs; give ``--scenario all`` for the full mix.

CPU time (user + system) per trial in µs, by role: the machine's processes from
``Machine.cpu_times`` (the coordinator adds the time of every CPU and domain process
it reaped, so the processes a warm reset replaced count too), this front end from
``getrusage``, of which the model and the checks (``expected`` and ``compare``) are
timed apart (``front_model``, wall time). The machine is CPU-bound on 2 cores:
``cores_busy`` is total CPU over wall time, and ``cpu_bound_trials_per_s`` the rate
the total CPU a trial takes would allow with every core busy.

With ``--json``: one JSON object per (CPU count, variant), the first key
``trials_per_s`` (``emu bench`` reads the first key ending in ``trials_per_s``).
A benchmark, not a test: on a shared machine run it alone.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emu.errors import UsageError  # noqa: E402

TOPOLOGY = {1: "1x1x1", 2: "1x1x2", 4: "1x2x2", 8: "1x4x2", 16: "2x4x2", 32: "2x8x2",
            64: "4x8x2", 128: "4x16x2", 256: "8x16x2"}


class _Timed:
    """Wraps a function of emu.trial.model and adds up its wall time (in the front)."""

    def __init__(self, fn):
        self.fn, self.s = fn, 0.0

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.s += time.perf_counter() - t


def _cpu(w) -> dict:
    """CPU seconds so far: the machine's processes by role (Machine.cpu_times: the
    coordinator adds the time of every process it reaped, so CPUs and domains a warm
    reset replaced are counted) and this front end."""
    import resource
    out = dict(w.m.cpu_times())
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out["front"] = ru.ru_utime + ru.ru_stime
    return out


def run_variant(cpus: int, variant: str, trials: int, scenario: str, chaos: float,
                fault_rate: float, seed: int, extra: dict | None = None,
                machine: dict | None = None) -> dict:
    import numpy as np

    from emu.campaign import stress as S
    from emu.trial import model
    kw = {"chaos": chaos} if variant in ("chaos", "faults") else {}
    if variant == "faults":
        kw.update(faults="kill_dom0,pause_dom0,kill_cpu", fault_rate=fault_rate)
    o = S.Options(seed=seed, trials=trials, scenario=scenario, db=False,
                  machine={"topology": TOPOLOGY.get(cpus, f"1x{cpus}x1"), "watchdog_s": 0.5,
                           **({"extra": extra} if extra else {}), **(machine or {})},
                  **kw).validate()
    exp, cmp_ = _Timed(model.expected), _Timed(model.compare)
    model.expected, model.compare = exp, cmp_
    w = S.Worker(o).start()
    try:
        for i in range(5):                     # warm-up, not counted
            w.play(seed + 1, i)
        exp.s = cmp_.s = 0.0
        c0 = _cpu(w)
        t0 = time.perf_counter()
        lat, viol, outcomes = [], 0, {}
        def emit(rec):
            nonlocal viol
            h = rec["timing"]["handler_exit_us"]
            if h is not None:
                lat.append(h)
            viol += any(f["kind"] == "violation" for f in rec["findings"])
            outcomes[rec["outcome"]] = outcomes.get(rec["outcome"], 0) + 1
        # the campaign's own loop (pipelined where it can be, as emu stress plays)
        S.play_items(w, o, [("trial", i) for i in range(trials)], emit)
        end = w.finish()
        el = time.perf_counter() - t0
        c1 = _cpu(w)
        resets = w.warm_resets
    finally:
        w.close()
        model.expected, model.compare = exp.fn, cmp_.fn
    us = {k: round((c1[k] - c0[k]) / trials * 1e6, 1) for k in sorted(c1)}
    us["total"] = round(sum(c1[k] - c0[k] for k in c1) / trials * 1e6, 1)
    us["front_model"] = round((exp.s + cmp_.s) / trials * 1e6, 1)
    return {"trials_per_s": round(trials / el, 1), "cpus": cpus, "variant": variant,
            "trials": trials, "elapsed_s": round(el, 3), "scenario": scenario,
            "wait_dom0": w.wait, "warm_resets": resets, "violations": viol + len(end),
            "outcomes": outcomes,
            "handler_exit_us_p50": round(float(np.percentile(lat, 50)), 1) if lat else None,
            "handler_exit_us_p90": round(float(np.percentile(lat, 90)), 1) if lat else None,
            "cpu_us_per_trial": us,
            # on 2 cores, CPU-bound: trials/s can be at most cores / total CPU a trial
            "cpu_bound_trials_per_s": round(os.cpu_count() * 1e6 / us["total"], 1),
            "cores_busy": round(us["total"] / (el / trials * 1e6), 2),
            "wall_us_per_trial": round(el / trials * 1e6, 1)}


def _json_object(option: str, text: str) -> dict | None:
    """``text`` as a JSON object (None if empty); UsageError naming ``option``."""
    if not text:
        return None
    try:
        d = json.loads(text)
    except ValueError as exc:
        raise UsageError(option, f"{text!r}: not JSON ({exc})") from None
    if not isinstance(d, dict):
        raise UsageError(option, f"{text!r}: give a JSON object")
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpus", default="4,16,64")
    p.add_argument("--trials", type=int, default=2000)
    p.add_argument("--scenario", default="owner_race,memory")
    p.add_argument("--variants", default="plain,chaos,faults")
    p.add_argument("--chaos", type=float, default=0.05)
    p.add_argument("--fault-rate", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--extra", default="",
                   help="the machine's extra options as JSON, for wait-strategy A/B runs "
                        "(e.g. '{\"spin_ns\": 0}')")
    p.add_argument("--machine", default="",
                   help="more machine options (MachineConfig fields) as JSON, e.g. "
                        "'{\"idle_poll_us\": 0}'")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        cpus = [int(x) for x in a.cpus.split(",") if x.strip()]
        extra, mach = _json_object("--extra", a.extra), _json_object("--machine", a.machine)
        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        bad = [v for v in variants if v not in ("plain", "chaos", "faults")]
        if bad:
            raise UsageError("variants", f"{bad}: choose from plain, chaos, faults")
        if a.trials < 1:
            raise UsageError("trials", "give at least one trial")
        from emu.campaign.stress import machine_caps
        if "chaos" not in machine_caps():
            variants = [v for v in variants if v == "plain"]    # no per-trial chaos here
        for n in cpus:
            for v in variants:
                r = run_variant(n, v, a.trials, a.scenario, a.chaos, a.fault_rate, a.seed,
                                extra, mach)
                if a.json:
                    print(json.dumps(r), flush=True)
                else:
                    print(f"{n:4d} CPUs {v:7s} {r['trials_per_s']:8.1f} trials/s  handler "
                          f"p50 {r['handler_exit_us_p50']} µs  CPU µs/trial "
                          + ", ".join(f"{k} {x}" for k, x in r["cpu_us_per_trial"].items())
                          + f"  (wall {r['wall_us_per_trial']}, {r['cores_busy']} cores busy,"
                          f" CPU bound {r['cpu_bound_trials_per_s']}/s)", flush=True)
    except UsageError as exc:
        print(f"stress.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
