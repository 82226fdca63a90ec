"""Invariants checked after every trial (DESIGN.md §6). Pure: reads a trial result.

A violation is a *finding* about the emulated handler, never an emu bug.

Besides the per-error checks (now also: an unrecoverable error logged in #MC on a
completed trial): a record reserved and never committed on a completed
trial (lost until some later #MC), a hang the test hooks do not explain, a #MC that
shuts the processor down because an earlier handler left MCIP set, the fatal check
run by a CPU that found no error in this #MC (a stale ``severity_cpu``), more or
less than one softirq worker for one broadcast #MC, a CPU that held an error's
record and continued with RIPV=0 in Xen context (or EIPV=0), and a boot-time logout
record that never reaches Dom0 (dismissed).
"""
from __future__ import annotations

_MCG_RIPV, _MCG_EIPV = 0x1, 0x2
_NEVER_COMMITTED = "record reserved but never committed"


def check_trial(res: dict, topo) -> list[str]:
    v: list[str] = []
    outcome = res["outcome"]
    broadcast = not res.get("local")
    completed = outcome in ("recovered", "continued")
    for i, e in enumerate(res["errors"]):
        if not e["written"]:
            continue
        tag = f"error[{i}] cpu{e['cpu']}/bank{e['bank']}"
        if e.get("via", "mce") != "mce":
            v += _check_irq_error(tag, e, completed)
            continue
        if completed or outcome == "reset":
            took = [c for c in e["sharers"] if c in res["targets"]]
            if e["clearable"]:
                if len(e["owners"]) != 1 and completed:
                    v.append(f"{tag}: clearable error owned by {len(e['owners'])} CPUs "
                             f"{e['owners']} (expected exactly one)")
            elif broadcast and completed and sorted(e["owners"]) != sorted(took):
                v.append(f"{tag}: non-clearable error logged by {e['owners']}, "
                         f"expected every sharer {took}")
        if completed and e["owners"] and e.get("recoverable") is False \
                and e["class"] != "fatal":
            v.append(f"{tag}: unrecoverable {e['class']} error logged in #MC but outcome "
                     f"{outcome!r}: the fatal check did not run (expected reset)")
        if e["class"] == "fatal" and e["clearable"] is False:
            if outcome not in ("reset", "shutdown", "hang", "cpu_died"):
                v.append(f"{tag}: fatal error but outcome {outcome!r} (expected reset)")
            if outcome == "reset":
                if e["cleared"]:
                    v.append(f"{tag}: fatal bank cleared before the reset")
                n = sum(1 for b in res["boot_log"]
                        if topo.inst[b["cpu"]][b["bank"]] == topo.inst[e["cpu"]][e["bank"]])
                if n != 1:
                    v.append(f"{tag}: logged {n} times by boot-time logout (expected once)")
        vm = e.get("vmce")
        if vm and completed:
            # §6: the owner (policy owner) or the hardware domain (policy dom0) gets it
            want = 0 if res.get("vmce_policy") == "dom0" else e.get("impacted_domain")
            if want is not None and vm["domain"] != want:
                v.append(f"{tag}: vMCE went to DOM{vm['domain']}, expected DOM{want}")
            gr = vm.get("guest_read")
            if gr and gr.get("bank") is not None:
                if int(gr["status"], 16) & 0xFFFF0000:
                    v.append(f"{tag}: the guest read STATUS {gr['status']} with MSCOD set")
                if int(gr["addr"], 16) != int(vm["gaddr"], 16):
                    v.append(f"{tag}: the guest read ADDR {gr['addr']}, Xen filled "
                             f"{vm['gaddr']}")
        if completed and e.get("lost") == _NEVER_COMMITTED:
            v.append(f"{tag}: {_NEVER_COMMITTED}: neither logged nor recovered")
    for b in res.get("boot_log", []):
        d = b.get("dom0_log") or {}
        if d.get("dismissed"):
            v.append(f"boot-time logout cpu{b['cpu']}/bank{b['bank']} {b['status']}: "
                     "its record was dismissed and never reaches Dom0's log")
    if res.get("xen_bug"):
        v.append(f"Xen BUG (a hypervisor crash) while Dom0 fetched telemetry: "
                 f"{res['xen_bug']}")
    if outcome == "hang" and not res.get("hang_expected") and not _hazard_c(res):
        where = ", ".join(f"cpu{s['cpu']} in {s['phase']}" for s in res.get("snapshot", []))
        v.append(f"hang: the handler stopped making progress ({where})")
    sd = res.get("shutdown")
    if outcome == "shutdown" and sd and sd.get("left_handler"):
        v.append(f"cpu{sd['cpu']}: #MC found MCIP still set from an earlier #MC whose "
                 "handler had left: processor shutdown")
    # (a cpu_died result's "cpus" lists the dead CPUs, not per-CPU records)
    cpus = [c for c in res["cpus"] if isinstance(c, dict)]
    if broadcast:
        for c in cpus:
            if "fatal_check" in c["phases"] and c.get("logged") == 0:
                v.append(f"cpu{c['cpu']}: ran the fatal check (severity_cpu) but found no "
                         "error in this #MC: stale severity_cpu")
    ncpus = len(cpus)
    if completed and broadcast and res.get("waves", 1) == 1 and \
            len(res["targets"]) == ncpus > 1 and cpus and "softirq_worker" in cpus[0]:
        workers = [c["cpu"] for c in cpus if c["softirq_worker"]]
        if len(workers) > 1:
            v.append(f"softirq workers {workers} for one broadcast #MC (expected exactly one)")
    if outcome == "deadlock":
        v.append(f"deadlock: {res['deadlock']['text']}")
    if completed:
        for c in cpus:
            g = c.get("mcg_in")
            if g is not None and c.get("records") and not g & _MCG_RIPV and (
                    not g & _MCG_EIPV or not c.get("guest_mode")):
                v.append(f"cpu{c['cpu']}: continued after a #MC with RIPV=0 "
                         f"(MCG_STATUS {g:#x}, {'guest' if c.get('guest_mode') else 'Xen'} "
                         "context): the interrupted context cannot be restarted")
    if completed:
        for c in cpus:
            if c["mcip_after"]:
                v.append(f"cpu{c['cpu']}: MCIP still set after the handler")
            if c["cpu"] in res["targets"] and "softirq_done" not in c["phases"]:
                v.append(f"cpu{c['cpu']}: did not finish the softirq")
    return v


def _hazard_c(res: dict) -> bool:
    """A hang that is hazard C of today's Xen (xen-mca.md §10.2 C, as the trial's
    ``hazards`` name it), not a finding about the version."""
    return any(h.get("kind") == "C" for h in res.get("hazards") or ())


def _check_irq_error(tag: str, e: dict, completed: bool) -> list[str]:
    """An error that arrived by CMCI or polling (§4.3, §4.4): one the CMCI owner or a
    poller was bound to see is logged once, by one CPU, and Dom0 logs that record once;
    Xen takes no recovery action and injects no vMCE. Pollers on every sharer of a
    non-CMCI bank logging it more than once is what today's Xen does (no lock): the
    trial reports it as hazard H, not as a violation. Dom0 logging one record twice is
    always a violation."""
    v = []
    hazard_h = e.get("cmci_owner") is None and all(
        x["source"] == "poll" for x in e.get("logged_by", []))
    if e.get("logs", 0) > 1 and hazard_h:
        pass   # today's Xen: unlocked polling of a shared non-CMCI bank (hazard H, not ours)
    elif e.get("logs", 0) > 1:
        v.append(f"{tag}: logged {e['logs']} times via " + ", ".join(
            f"cpu{x['cpu']} {x['source']}" for x in e.get("logged_by", []))
            + " (expected once)")
    elif completed and e.get("expected_seen") and e.get("logs", 0) == 0:
        v.append(f"{tag}: {e.get('via')} error never logged ({e.get('terminal')})")
    for d in e.get("dom0_log", []):
        if d.get("count", 0) > 1:
            v.append(f"{tag}: Dom0 logged record {d['id']:#x} {d['count']} times")
    if e.get("vmce") or e.get("action"):
        v.append(f"{tag}: Xen acted on a {e.get('class')} error that arrived without #MC")
    return v
