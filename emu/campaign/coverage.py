"""What a campaign explored, and its summary, built from its trial records alone.

:class:`Summary` takes ``emu.stress.trial/1`` records one by one (:meth:`Summary.add`)
and gives the ``emu.stress.summary/1`` object (:meth:`Summary.to_dict`): trial count,
trials/s, outcomes, findings by kind with their first example, and coverage:

- ``banks``: per shared bank instance (``"bank B inst N"``), how often each sharer won
  the race for a clearable error there (the CPU that logged and cleared it);
- ``rendezvous``: per rendezvous (``barrier_a``, ...), in how many trials it was used
  and how many distinct CPU arrival orders were seen (needs the machine's
  ``arrivals``; empty otherwise);
- ``families``: per family, the outcomes reached.

Because it is built from records only, ``emu merge`` rebuilds the same summary from
the JSON Lines of several shards. Pure.
"""
from __future__ import annotations

from collections import Counter

TRIAL_SCHEMA = "emu.stress.trial/1"
SUMMARY_SCHEMA = "emu.stress.summary/1"


class Summary:
    def __init__(self):
        self.trials = 0
        self.replayed = 0
        self.outcomes: Counter = Counter()
        self.findings: dict[str, dict] = {}
        self.banks: dict[str, Counter] = {}
        self.orders: dict[str, set] = {}
        self.used: Counter = Counter()
        self.families: dict[str, Counter] = {}
        self.perturbations = 0
        self.faults: Counter = Counter()
        self.elapsed_s = 0.0

    def add(self, rec: dict) -> None:
        if rec.get("from_db"):
            self.replayed += 1
        self.trials += 1
        out = rec.get("outcome")
        self.outcomes[out] += 1
        self.families.setdefault(rec.get("family"), Counter())[out] += 1
        for f in rec.get("findings", ()):
            key = f["kind"] if f["kind"] == "violation" else f"hazard {f.get('id')}"
            slot = self.findings.setdefault(key, {"count": 0, "trials": 0, "first": None})
            slot["count"] += 1
            if slot["first"] is None or (rec["seed"], rec["trial"]) < (
                    slot["first"]["seed"], slot["first"]["trial"]):
                slot["first"] = {"seed": rec["seed"], "trial": rec["trial"],
                                 "family": rec.get("family"), "text": f["text"],
                                 "replay": rec.get("replay")}
        for key in {f["kind"] if f["kind"] == "violation" else f"hazard {f.get('id')}"
                    for f in rec.get("findings", ())}:
            self.findings[key]["trials"] += 1
        for o in rec.get("owners", ()):
            if o.get("race") and len(o["owners"]) == 1:
                self.banks.setdefault(f"bank {o['bank']} inst {o['inst']}", Counter())[
                    str(o["owners"][0])] += 1
        for name, order in (rec.get("arrivals") or {}).items():
            if order:
                self.used[name] += 1
                self.orders.setdefault(name, set()).add(tuple(order))
        p = rec.get("perturbation") or {}
        self.perturbations += sum((p.get("counts") or {}).values())
        fl = rec.get("fault")
        if fl:
            self.faults[f"{fl.get('kind')} {'happened' if fl.get('happened') else 'planned'}"] \
                += 1

    def violations(self) -> int:
        return self.findings.get("violation", {}).get("count", 0)

    def hazards(self) -> int:
        return sum(v["count"] for k, v in self.findings.items() if k.startswith("hazard"))

    def to_dict(self, elapsed_s: float | None = None, **extra) -> dict:
        el = self.elapsed_s if elapsed_s is None else elapsed_s
        return dict({
            "schema": SUMMARY_SCHEMA, "trials": self.trials, "replayed_from_db": self.replayed,
            "elapsed_s": round(el, 3),
            "trials_per_s": round(self.trials / el, 1) if el > 0 else None,
            "outcomes": dict(sorted(self.outcomes.items(), key=lambda kv: str(kv[0]))),
            "findings": {k: self.findings[k] for k in sorted(self.findings)},
            "violations": self.violations(), "hazards": self.hazards(),
            "perturbations": self.perturbations, "faults": dict(sorted(self.faults.items())),
            "coverage": {
                "banks": {k: dict(sorted(v.items())) for k, v in sorted(self.banks.items())},
                "rendezvous": {k: {"trials": self.used[k], "distinct_orders":
                                   len(self.orders[k])} for k in sorted(self.orders)},
                "families": {str(k): dict(v) for k, v in sorted(self.families.items(),
                                                                key=lambda kv: str(kv[0]))},
            }}, **extra)


def table(s: dict) -> str:
    """The summary as a few lines of text (stderr, at the end and on Ctrl-C)."""
    rate = s.get("trials_per_s")
    lines = [f"emu stress: {s['trials']} trials in {s['elapsed_s']:.1f} s"
             + (f" ({rate:.0f} trials/s)" if rate else "")
             + (f", {s['replayed_from_db']} replayed from the failure database"
                if s.get("replayed_from_db") else "")
             + ("  [interrupted]" if s.get("interrupted") else "")]
    lines.append("  outcomes: " + (", ".join(f"{k} {v}" for k, v in s["outcomes"].items())
                                   or "none"))
    lines.append(f"  violations: {s['violations']}   hazards: {s['hazards']}   "
                 f"perturbations taken: {s.get('perturbations', 0)}")
    for k, v in s["findings"].items():
        f = v["first"]
        lines.append(f"  {k}: {v['count']} in {v['trials']} trial(s); first: trial "
                     f"{f['trial']} ({f['family']}): {f['text'][:160]}")
        if f.get("replay"):
            lines.append(f"      {f['replay']}")
    cov = s["coverage"]
    for k, v in cov["banks"].items():
        lines.append(f"  race winners, {k}: " + ", ".join(f"cpu{c} {n}" for c, n in v.items()))
    for k, v in cov["rendezvous"].items():
        lines.append(f"  {k}: {v['distinct_orders']} distinct arrival orders in "
                     f"{v['trials']} trials")
    for k, v in cov["families"].items():
        lines.append(f"  {k}: " + ", ".join(f"{o} {n}" for o, n in sorted(
            v.items(), key=lambda kv: str(kv[0]))))
    return "\n".join(lines)
