"""Xen's mce-test cases by name (xen-mca.md §9): ``srao_mem/dom0`` ... ``ucna_llc/xen``.

Each case is the xen-mceinj command its ``cases.sh`` runs (:func:`emu.formats.xen_mceinj.
mce_test_case`), run on a freshly booted machine, and then the checks of the case
table (§9.2), made on emu's outputs the way the framework (``lib/xen-mceinj-tool.sh``)
made them on a real host:

- ``xen_verify``: Xen's console must contain "Error is successfully recovered". emu
  has no console; the line is the ``dprintk`` Xen prints when ``mce_softirq``'s
  action for the error is RECOVERED (a debug build, as the tests assumed), so the
  check reads the action emu's handler took (``errors[].action``) and the trial's
  outcome. Any other action gives Xen's "Error can't be recovered, system is
  tainted" or a panic, and the check fails.
- ``guest_verify``: the guest's log (``dom<D>.guest.jsonl``, its console lines)
  must contain "kernel page recovery" (Linux HWPoison output of the guest's handler).
- ``xen_behaviour`` (emu's, not mce-test's): what xen-mca.md §9.3 says Xen does behind
  the PASS, read from the trial result and Dom0's log (:func:`behaviour_check`).
- ``mcelog_verify``: Dom0's log records of this trial, decoded by emu's mcelog
  ``--ascii`` (:func:`emu.domains.mcelog.format_record`), must contain the string
  the framework greps for the type number (``MCE_TEST_GREP``). By default the decode
  is that of mcelog before 570893f (2021), the mcelog of the tests' time; with
  ``mcelog="current"`` the newer cache-level numbering, where the type 1 string
  ("Level-2") is no longer printed.

The case table's type numbers are the 2010 tool's (the numbering the cases were
written against, the default here); with ``numbering="current"`` srao_mem and
srao_llc inject each other's payload and their mcelog checks fail, as on a current
Xen (§8.2). The ``ucna_llc`` cases take Xen's CMCI path (``via=cmci``). A case whose
path emu does not model would be skipped with the reason.

Machine: the one the cases assumed (Intel, SER_P, broadcast, 10 banks, Dom0 plus one
HVM guest, domid 1); the address is xen-mceinj's default 0x180020 (a GPA for the
domain cases, a free machine page for the Xen cases: offlined at once).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from emu.errors import UsageError
from emu.formats.xen_mceinj import MCE_TEST_CASES, MCE_TEST_GREP, RECOVERED, TAINTED, mce_test_case
from emu.xen.page_alloc import DOM_PAGES

__all__ = ["CaseResult", "case_names", "plan_case", "run_case", "check_case",
           "console_lines", "mcelog_text", "guest_console", "behaviour_check", "PASSED", "FAILED",
           "SKIPPED"]

PASSED, FAILED, SKIPPED = "PASSED", "FAILED", "SKIPPED"
GUEST_DOMID = 1
MCELOG_ERAS = ("old", "current")


def case_names() -> list[str]:
    """Every case of §9.2, in the table's order (srao_mem, srao_llc, ucna_llc)."""
    return list(MCE_TEST_CASES)


@dataclass
class CaseResult:
    """One case's result: ``verdict`` PASSED, FAILED or SKIPPED; ``checks`` (name,
    passed, what was found); the trial result when it ran."""
    name: str
    verdict: str
    argv: tuple[str, ...]
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    reason: str | None = None
    trial: dict | None = None
    expected_outcome: str | None = None
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        return {"case": self.name, "verdict": self.verdict, "argv": list(self.argv),
                "checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in self.checks],
                "reason": self.reason, "expected_outcome": self.expected_outcome,
                "trial": self.trial}


def _resolve(name: str) -> list[str]:
    if name == "all":
        return case_names()
    if name in MCE_TEST_CASES:
        return [name]
    # "srao_mem" alone: its three targets
    hits = [c for c in MCE_TEST_CASES if c.split("/")[0] == name]
    if hits:
        return hits
    raise UsageError("case", f"unknown mce-test case {name!r}; cases are "
                     f"{', '.join(case_names())} (or 'all', or a group such as srao_mem)")


def resolve(names) -> list[str]:
    """Case names from ``NAME|GROUP|all`` arguments, each once, in table order."""
    want = {c for n in names for c in _resolve(n)}
    return [c for c in case_names() if c in want]


def plan_case(name: str, *, numbering: str = "2010", ncpus: int = 4, nbanks: int = 10,
              domids=(0, 1)):
    """The xen-mceinj plan of case ``name`` on a machine of that shape (the UCNA type's
    spec has ``via=cmci``: Xen's CMCI path)."""
    plan = mce_test_case(name, numbering=numbering, guest_domid=GUEST_DOMID, ncpus=ncpus,
                         nbanks=nbanks, domids=list(domids), max_gpa=DOM_PAGES << 12)
    return plan


def console_lines(trial: dict) -> list[str]:
    """The console lines Xen (a debug build) prints for a trial's errors, as far as
    the mce-test checks read them: one per deferred action, or the panic."""
    out = []
    for e in trial.get("errors", []):
        act = e.get("action")
        if act == "recovered":
            out.append(RECOVERED)
        elif act in ("continue", "continued"):
            out.append(TAINTED)
    if trial.get("panic"):
        out.append(f"MCE: {trial['panic']}")
    return out


def _json_objects(path: str):
    """The JSON objects of a JSON Lines log, one per line (a torn or foreign line is
    skipped; a missing file has none)."""
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(obj, dict):
                    yield obj
    except OSError:
        return


def _records(path: str, ids: set[int]) -> list[dict]:
    return [obj for obj in _json_objects(path) if obj.get("id") in ids]


def mcelog_text(trial: dict, *, mcelog: str = "old") -> str:
    """Dom0's mcelog --ascii output for the records this trial logged (read back from
    the Dom0 log the trial names)."""
    from emu.domains.dom0 import mcelog_records
    from emu.domains.mcelog import format_record
    ids = {d["id"] for e in trial.get("errors", []) for d in e.get("dom0_log", [])
           if d.get("count")}
    lines: list[str] = []
    path = trial.get("dom0_log_path")
    if not path:
        return ""
    for obj in _records(path, ids):
        for m in mcelog_records(obj):
            lines += format_record(m, pre2021=mcelog == "old")
    return "".join(x + "\n" for x in lines)


def guest_console(trial: dict, domid: int, since: float) -> list[str]:
    """Console lines of guest ``domid``'s kernel logged at or after ``since`` (epoch s)."""
    path = next((d.get("log") for d in trial.get("domains", []) if d.get("domid") == domid),
                None)
    out: list[str] = []
    if not path:
        return out
    for obj in _json_objects(path):
        if obj.get("t", 0) >= since:
            out += [str(x) for x in obj.get("console") or []]
    return out


def check_case(name: str, plan, trial: dict, *, mcelog: str = "old",
               since: float = 0.0) -> list[tuple[str, bool, str]]:
    """The checks case ``name`` requires (§9.2), made on ``trial`` and its logs."""
    t = MCE_TEST_CASES[name][0]
    checks = []
    for req in plan.expected.mce_test.requires:
        if req == "xen_verify":
            lines = console_lines(trial)
            ok = RECOVERED in lines
            checks.append((req, ok, f"Xen console: {lines or ['(nothing)']}; outcome "
                           f"{trial.get('outcome')}"))
        elif req == "guest_verify":
            lines = guest_console(trial, GUEST_DOMID, since)
            hit = [x for x in lines if "kernel page recovery" in x]
            checks.append((req, bool(hit), hit[0] if hit else
                           f"no 'kernel page recovery' in DOM{GUEST_DOMID}'s console "
                           f"({len(lines)} lines)"))
        elif req == "mcelog_verify":
            text = mcelog_text(trial, mcelog=mcelog)
            grep = MCE_TEST_GREP[t]
            ok = grep in text
            mca = [x for x in text.splitlines() if x.startswith("MCA: ")]
            checks.append((req, ok, f"grep '{grep}' in Dom0's mcelog ({mcelog} decode): "
                           + ("found" if ok else f"not found; it printed {mca or 'no record'}")))
    return checks


def _log_records(trial: dict) -> dict[int, dict]:
    ids = {d["id"] for e in trial.get("errors", []) for d in e.get("dom0_log", [])}
    path = trial.get("dom0_log_path")
    return {r["id"]: r for r in _records(path, ids)} if path else {}


def behaviour_check(name: str, plan, trial: dict) -> tuple[str, bool, str]:
    """``xen_behaviour``: what §9.3 says Xen does behind the case's PASS, read from the
    trial result and Dom0's log: for an SRAO, the page offline status, the impacted
    domain, the vMCE (broadcast to the owner's vCPUs; a guest's with bank 1 and the
    guest-physical address) and RECOVERED, an URGENT record logged once; for a UCNA
    (CMCI), the bank cleared, no recovery action, a NONURGENT record logged once whose
    bank names the page's owner."""
    from emu.hw.msr import hexs
    from emu.xen.page_alloc import DOMID_INVALID
    target = plan.target
    owner = {"dom0": 0, "guest": GUEST_DOMID, "xen": None}[target]
    bad: list[str] = []
    errs = trial.get("errors") or []
    if not errs:
        return "xen_behaviour", False, "the trial has no error"
    e = errs[0]
    logs = e.get("dom0_log") or []
    recs = _log_records(trial)
    if [d.get("count") for d in logs] != [1]:
        bad.append(f"Dom0 logged {[d.get('count') for d in logs]} records (want one, once)")
    rec = recs.get(logs[0]["id"]) if logs else None
    if plan.expected.xen_class == "SRAO":
        want_cls = "urgent"
        po = (e.get("page_offline") or {}).get("status") or []
        if target == "xen":
            if "OFFLINED" not in po:
                bad.append(f"page offline {po or 'not done'} (want OFFLINED: a free page)")
        else:
            if not {"PENDING", "OWNED"} <= set(po):
                bad.append(f"page offline {po or 'not done'} (want PENDING|OWNED)")
            if e.get("impacted_domain") != owner:
                bad.append(f"impacted domain {e.get('impacted_domain')} (want {owner})")
            v = e.get("vmce") or {}
            if v.get("domain") != owner or not v.get("broadcast") \
                    or sorted(v.get("delivered") or []) != sorted(v.get("vcpus") or [None]):
                bad.append(f"vMCE {v.get('domain')}/{v.get('vcpus')} delivered "
                           f"{v.get('delivered')} (want broadcast to every vCPU of DOM{owner})")
            if not v.get("guest_handled"):
                bad.append(f"DOM{owner}'s kernel did not handle the vMCE")
            gr = v.get("guest_read") or {}
            if target == "guest" and (gr.get("bank") != 1 or gr.get("addr") != hexs(plan.addr)):
                bad.append(f"the guest read bank {gr.get('bank')} ADDR {gr.get('addr')} (want "
                           f"bank 1 with its GPA {hexs(plan.addr)})")
        if e.get("action") != "recovered":
            bad.append(f"action {e.get('action')} (want recovered)")
    else:
        want_cls = "nonurgent"
        if not e.get("cleared"):
            bad.append("the bank was not cleared")
        if e.get("action") is not None:
            bad.append(f"a recovery action ran ({e.get('action')}): want none")
        want_dom = DOMID_INVALID if owner is None else owner
        got = [b.get("domid") for b in (rec or {}).get("banks") or []]
        if got != [want_dom]:
            bad.append(f"the record's bank names domain {got} (want {want_dom:#x}: "
                       f"{'the free page has no owner' if owner is None else 'the owner'})")
    if rec is not None and rec.get("cls") != want_cls:
        bad.append(f"record class {rec.get('cls')} (want {want_cls})")
    if bad:
        return "xen_behaviour", False, "; ".join(bad)
    return "xen_behaviour", True, f"as xen-mca.md §9.3 says ({plan.expected.xen_class}, " \
        f"{target}): " + (f"page {', '.join((e.get('page_offline') or {}).get('status') or [])}"
                         f", {e.get('action')}" if want_cls == "urgent" else
                         "bank cleared, no action") + f", one {want_cls} record"


def run_case(name: str, *, numbering: str = "2010", mcelog: str = "old", machine=None,
             **config) -> CaseResult:
    """Run case ``name`` on a new machine (``config``: MachineConfig fields; defaults
    as the cases assumed) and check it. ``machine``: a started Machine to use instead
    (its state carries over from earlier cases: offlined pages stay offlined)."""
    import time

    from emu.machine import Machine, MachineConfig
    if mcelog not in MCELOG_ERAS:
        raise UsageError("mcelog", f"{mcelog!r}: use old (before mcelog 570893f, the tests' "
                         "time) or current")
    cfg = machine.config if machine is not None else MachineConfig(**config).validate()
    from emu.hw.topology import Topology
    topo = Topology(cfg)
    plan = plan_case(name, numbering=numbering, ncpus=topo.ncpus, nbanks=topo.nbanks,
                     domids=cfg.domids)
    res = CaseResult(name=name, verdict=SKIPPED, argv=plan.argv,
                     expected_outcome=plan.expected.outcome, notes=plan.notes)
    spec, local = plan.spec, plan.emu_local
    if not plan.runnable:
        res.reason = plan.refusal[1]
        return res
    if GUEST_DOMID not in cfg.domids and plan.target == "guest":
        res.reason = f"the machine has no guest (domid {GUEST_DOMID}); give it one"
        return res
    since = time.time()
    if machine is not None:
        trial = machine.inject([spec], local=bool(local))
    else:
        with Machine(cfg) as m:
            trial = m.inject([spec], local=bool(local))
    res.trial = trial
    res.checks = check_case(name, plan, trial, mcelog=mcelog, since=since)
    res.checks.append(behaviour_check(name, plan, trial))
    res.verdict = PASSED if all(ok for _, ok, _ in res.checks) else FAILED
    return res
