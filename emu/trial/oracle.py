"""Invariants checked after every trial (DESIGN.md §6). Pure: reads a trial result.

A violation is a *finding* about the emulated handler, never an emu bug.
"""
from __future__ import annotations


def check_trial(res: dict, topo) -> list[str]:
    v: list[str] = []
    outcome = res["outcome"]
    broadcast = not res.get("local")
    completed = outcome in ("recovered", "continued")
    # the last error written into each bank instance: an earlier one was merged into
    # it by the overwrite rules, and the bank's content decides who logs it
    last = {topo.inst[e["cpu"]][e["bank"]]: i for i, e in enumerate(res["errors"])
            if e["written"]}
    for i, e in enumerate(res["errors"]):
        if not e["written"]:
            continue
        tag = f"error[{i}] cpu{e['cpu']}/bank{e['bank']}"
        if completed or outcome == "reset":
            took = [c for c in e["sharers"] if c in res["targets"]]
            if e["clearable"]:
                if len(e["owners"]) != 1 and completed:
                    v.append(f"{tag}: clearable error owned by {len(e['owners'])} CPUs "
                             f"{e['owners']} (expected exactly one)")
            elif broadcast and completed and sorted(e["owners"]) != sorted(took) \
                    and last.get(topo.inst[e["cpu"]][e["bank"]]) == i:
                v.append(f"{tag}: non-clearable error logged by {e['owners']}, "
                         f"expected every sharer {took}")
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
            if vm["domain"] != want:
                v.append(f"{tag}: vMCE went to DOM{vm['domain']}, expected DOM{want}")
            gr = vm.get("guest_read")
            if gr and gr.get("bank") is not None:
                if int(gr["status"], 16) & 0xFFFF0000:
                    v.append(f"{tag}: the guest read STATUS {gr['status']} with MSCOD set")
                if int(gr["addr"], 16) != int(vm["gaddr"], 16):
                    v.append(f"{tag}: the guest read ADDR {gr['addr']}, Xen filled "
                             f"{vm['gaddr']}")
    if completed:
        for c in res["cpus"]:
            if c["mcip_after"]:
                v.append(f"cpu{c['cpu']}: MCIP still set after the handler")
            if c["cpu"] in res["targets"] and "softirq_done" not in c["phases"]:
                v.append(f"cpu{c['cpu']}: did not finish the softirq")
    return v
