"""Per-trial perturbation and faults: what a trial's seed and fault spec mean. Pure.

A trial carries a *trial seed* ``(S, i)`` (default: the machine's seed and the
trial's number). From it the machine draws the trial's *plan*
(:func:`starvation_plan`, stream ``KEY_PLAN``), and every process (each CPU, Dom0,
each guest) draws its own perturbations (:func:`emu.hw.yieldpoint.process_seed`).

**Chaos** (``chaos=p``): at each yield point a process perturbs itself with
probability ``p``: 70 % a ``sched_yield``, 27 % a short sleep (20-117 µs), 3 % a 2 ms
stall (:mod:`emu.hw.yieldpoint`).

**Starvation** (rr's chaos mode): with probability ``starve`` per trial, one victim
process, drawn uniformly among the CPUs, Dom0 and the guests, is held off its core
for ``s`` seconds at its ``point``-th yield point of the trial (drawn in
``[0, K)``, K = ``STARVE_POINTS_CPU``, ``_DOM0`` or ``_GUEST``: a point the victim
may not reach, and then nothing happens: ``happened`` false). ``s`` is log-uniform in
[10 µs, 100 ms], **capped at STARVE_CAP (10 %) of the trial's time bound** (its
``timeout_s``, else the machine's watchdog), so that a starvation never trips the
watchdog by itself and a trial never loses more than a tenth of its bound to it.
The victim, point and time depend on ``(S, i)`` alone (and the process list), not on
``starve``: ``starve`` only decides whether the draw is armed.

**Faults** (:func:`validate_fault`): one per trial, each with its expected outcome:

* ``{"kind": "kill_cpu", "cpu": c, "phase": P}``: CPU ``c``'s process is SIGKILLed
  when it reaches handler phase ``P`` → ``expected: "cpu_died"`` (the machine then
  warm-resets).
* ``{"kind": "stall_cpu", "cpu": c, "phase": P, "s": t}``: CPU ``c`` sleeps ``t`` s
  at phase ``P`` → ``"hang"`` if ``t`` exceeds the trial's watchdog, else
  ``"unchanged"`` (a late but normal outcome).
* ``{"kind": "kill_dom0", "point": D, "count": n}``: Dom0 dies (``os._exit``, as if
  SIGKILLed) at point ``D`` of the ``n``-th record (default 1) it fetches after it
  is notified of this trial (``D``: before_write, mid_write, after_write,
  after_ack) → ``"logged_once"``: restarted, it logs every record exactly once.
* ``{"kind": "pause_dom0", "s": t}``: Dom0 is paused (it fetches nothing) from just
  before the raise for ``t`` s, then resumed → ``"logged_once"`` (not if the operator
  had paused it: then nothing happens).

A fault lasts one trial. **Result fields** (see :meth:`emu.machine.Machine.inject`):

* ``trial_seed``: ``[S, i]``; ``trial`` stays the machine's trial number.
* ``perturbation``: ``{"seed": [S, i], "chaos": p, "counts": {"cpu0": n, ..., "dom0":
  n, "dom1": n}, "points": {...}, "starvation": {...}}``. ``counts``: perturbations
  taken in this trial by each process (0 for one that did not run or was not
  perturbed; a domain's as it had reported them when the result was built);
  ``points``: yield points it passed (counted only when it perturbs). ``starvation``:
  ``{"p", "armed"}``, and when ``p > 0`` also ``victim`` ("cpu2", "dom0", ...),
  ``point``, ``s`` (after the cap), ``s_drawn``, ``cap_s``, ``happened`` (the victim
  reached its point) and ``site`` (the yield point's site name).
* ``fault``: None, or the normalised spec with ``expected``, ``happened`` (the CPU
  reached the phase; Dom0 died in the trial; the pause took effect) and ``held`` (the
  expected outcome was seen: outcome ``cpu_died``/``hang``/not hang, or every record
  of the trial logged exactly once; None when the fault did not happen or Dom0 was
  not waited for).
* ``arrivals``: per rendezvous (``barrier_a``, ``barrier_b``, ``barrier_c`` enter,
  ``softirq_inside``, ``softirq_severity``), the CPUs in the order they arrived (the
  last use in the trial; ``[]`` when it was not used: an LMCE).
* ``raise_cpu``: the ``raise_cpu`` given, or None.
"""
from __future__ import annotations

import math

import numpy as np

from emu.domains.dom0 import DIE_POINTS
from emu.errors import UsageError
from emu.hw.yieldpoint import KEY_PLAN, process_seed
from emu.xen.mce import PHASES

STARVE_MIN_S = 1e-5
STARVE_MAX_S = 0.1
STARVE_CAP = 0.1              # of the trial's time bound
# The victim's point is drawn in [0, K): K about what it passes in a one-error trial
# (a CPU of 1x2x2 with 10 banks: 38-46; Dom0: fetch, log, ack per record, then a
# NODATA fetch per class; a guest's vMCE handler: ~15 trapped MSR accesses).
STARVE_POINTS_CPU = 40
STARVE_POINTS_DOM0 = 4
STARVE_POINTS_GUEST = 16

# Handler phases a per-trial CPU fault may name (those a CPU passes in a trial).
FAULT_PHASES = ("entered", "logout", "barrier_a", "barrier_b", "fatal_check", "barrier_c",
                "exit", "softirq", "softirq_worker", "softirq_done")
FAULT_KINDS = ("kill_cpu", "stall_cpu", "kill_dom0", "pause_dom0")
MAX_SEED = (1 << 64) - 1


def process_names(ncpus: int, domids) -> list[str]:
    """The processes of a machine, in plan order: cpu0.., dom0, dom1.."""
    return [f"cpu{c}" for c in range(ncpus)] + [f"dom{d}" for d in domids]


def validate_seed(seed) -> tuple[int, int]:
    """A trial seed: a pair ``(S, i)`` of integers in 0..2**64-1."""
    if isinstance(seed, (list, tuple)) and len(seed) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_SEED for x in seed):
        return int(seed[0]), int(seed[1])
    raise UsageError("seed", f"{seed!r}: give the trial seed as a pair [S, i] of integers "
                     "0..2**64-1")


def validate_probability(field: str, p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise UsageError(field, f"{p!r}: give a probability in [0, 1]")
    return float(p)


def starvation_plan(seed: int, trial: int, names: list[str], p: float,
                    bound_s: float) -> dict:
    """The trial's starvation: ``{"p", "armed", "victim", "point", "s", "s_drawn",
    "cap_s"}`` (victim, point and times are drawn whether or not it is armed)."""
    rng = np.random.Generator(np.random.PCG64(process_seed(seed, trial, KEY_PLAN)))
    armed_u, victim_u, point_u, s_u = rng.random(4).tolist()
    victim = names[min(int(victim_u * len(names)), len(names) - 1)]
    k = STARVE_POINTS_CPU if victim.startswith("cpu") else \
        STARVE_POINTS_DOM0 if victim == "dom0" else STARVE_POINTS_GUEST
    point = min(int(point_u * k), k - 1)
    lo, hi = math.log(STARVE_MIN_S), math.log(STARVE_MAX_S)
    drawn = math.exp(lo + s_u * (hi - lo))
    cap = STARVE_CAP * bound_s
    return {"p": p, "armed": armed_u < p, "victim": victim, "point": point,
            "s": min(drawn, cap), "s_drawn": drawn, "cap_s": cap}


def validate_fault(fault, ncpus: int, bound_s: float) -> dict | None:
    """Check a fault spec (raising :class:`UsageError` naming the field) and return
    it normalised, with ``expected`` added (see the module docstring)."""
    if fault is None:
        return None
    if not isinstance(fault, dict):
        raise UsageError("fault", f"{fault!r}: give a dict with a kind: "
                         f"{', '.join(FAULT_KINDS)}")
    kind = fault.get("kind")
    if kind not in FAULT_KINDS:
        raise UsageError("fault.kind", f"{kind!r}: choose one of {', '.join(FAULT_KINDS)}")
    allowed = {"kill_cpu": {"cpu", "phase"}, "stall_cpu": {"cpu", "phase", "s"},
               "kill_dom0": {"point", "count"}, "pause_dom0": {"s"}}[kind] | {"kind"}
    extra = sorted(set(fault) - allowed)
    if extra:
        raise UsageError(f"fault.{extra[0]}", f"not a key of a {kind} fault; its keys: "
                         f"{', '.join(sorted(allowed))}")
    out = {"kind": kind}
    if kind in ("kill_cpu", "stall_cpu"):
        c = fault.get("cpu")
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < ncpus:
            raise UsageError("fault.cpu", f"{c!r}: give a CPU 0..{ncpus - 1}")
        ph = fault.get("phase")
        if ph not in FAULT_PHASES:
            raise UsageError("fault.phase", f"{ph!r}: choose one of {', '.join(FAULT_PHASES)}")
        out.update(cpu=c, phase=ph)
    if kind in ("stall_cpu", "pause_dom0"):
        s = fault.get("s")
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 3600:
            raise UsageError("fault.s", f"{s!r}: give seconds, 0 < s <= 3600")
        out["s"] = float(s)
    if kind == "kill_dom0":
        pt = fault.get("point")
        if pt not in DIE_POINTS:
            raise UsageError("fault.point", f"{pt!r}: choose one of {', '.join(DIE_POINTS)}")
        n = fault.get("count", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1000:
            raise UsageError("fault.count", f"{n!r}: give the n-th record fetched, 1..1000")
        out.update(point=pt, count=n)
    if kind == "kill_cpu":
        out["expected"] = "cpu_died"
    elif kind == "stall_cpu":
        out["expected"] = "hang" if out["s"] > bound_s else "unchanged"
    else:
        out["expected"] = "logged_once"
    return out


PHASE_INDEX = {p: PHASES.index(p) for p in FAULT_PHASES}
