"""The coordinator's paths that raise no #MC: CMCI and poll trials, CPU offline and
online, CMCI bank ownership, and the LMCE hazards read from a trial's result.

A mixin of :class:`emu.machine.coordinator.Coordinator` (it uses the coordinator's
regions, banks, telemetry, ``_poll``, ``_logouts`` and ``_dom0_entry``).

- **CMCI trial** (``via=cmci``): the errors are reported by silicon (corrected errors
  counted in STATUS 52:38), then every CMCI that silicon raises goes, as an interrupt,
  to the online CPUs sharing the bank instance (all of them at once, after the
  writes). Xen's ``cmci_interrupt`` on each logs and clears the banks it owns.
- **Poll trial** (``via=poll``, or :meth:`poll` with no error): the same writes, then
  one round of Xen's polling timer at once; a CMCI bank still raises its CMCI, sent
  once the round has begun (the error landed while the poller runs).
- **CPU offline** (``cpu_down``): CPU_DYING on the CPU (it releases its banks), the
  errors given are reported meanwhile (nobody owns the bank: no CMCI), then CPU_DEAD
  (every online CPU rediscovers and logs what its new banks hold). **Online**: the
  CPU runs ``mcheck_init`` again. A warm reset brings every CPU back online.
"""
from __future__ import annotations

import time

from emu.errors import UsageError
from emu.hw import msr
from emu.hw.cpu import VEC_CALL, VEC_CMCI, deliver_interrupt
from emu.xen import severity as sev
from emu.xen.mce_intel import FN_DISCOVER, FN_DYING, FN_UP

_SOURCE = {"MCA_CMCI_HANDLER": "cmci", "MCA_POLLER": "poll", "MCA_RESET": "boot",
           "MCA_MCE_SCAN": "mce"}


class IrqPaths:
    # -- state the result reads ----------------------------------------------------------
    def _online(self) -> list[int]:
        X, L = self.R.X, self.R.L
        out = []
        for w in range(L.mcefatal_words):
            v = X.load(L.online_map + 8 * w)
            out += [w * 64 + b for b in range(64) if v >> b & 1]
        return [c for c in out if c < self.n]

    def _owned(self, c: int) -> int:
        return self.R.X.load(self.R.L.pc(c, self.R.L.P_BANKS_OWNED))

    def _ownership(self) -> list[dict]:
        """Every bank instance that can signal CMCI: its sharers and which of them
        owns it (``mce_banks_owned``), with its CTL2 as the hardware holds it."""
        topo, cap = self.topo, self.R.HW.load(self.R.HL.cmci_cap)
        out, seen = [], set()
        owned = {c: self._owned(c) for c in range(self.n)}
        for b in range(topo.nbanks):
            if not cap >> b & 1:
                continue
            for c in range(self.n):
                inst = topo.inst[c][b]
                if inst in seen:
                    continue
                seen.add(inst)
                sharers = topo.sharers(c, b)
                out.append({"bank": b, "instance": inst, "sharers": sharers,
                            "owners": [s for s in sharers if owned[s] >> b & 1],
                            "ctl2": msr.hexs(self.banks.read(c, b, msr.REG_CTL2))})
        return out

    def _cpu_masks(self, c: int) -> dict:
        X, L = self.R.X, self.R.L

        def bits(v):
            return [b for b in range(self.topo.nbanks) if v >> b & 1]
        return {"online": c in self._online(), "banks_owned": bits(self._owned(c)),
                "no_cmci_banks": bits(X.load(L.pc(c, L.P_NO_CMCI))),
                "poll_banks": bits(X.load(L.pc(c, L.P_POLL_MASK)))}

    # -- writing errors as silicon reports them ---------------------------------------------
    def _report(self, errs: list) -> list:
        """Silicon reports each error (corrected ones counted); returns (spec, maddr,
        write, cmci) with ``cmci`` = {"raised", "cpus", "why"}."""
        maddrs = self._machine_addrs(errs)   # Coordinator's: all before any write
        online = set(self._online())
        out = []
        for e, addr in zip(errs, maddrs, strict=True):
            w = self.banks.hw_report(e.cpu, e.bank, e.status, addr, e.misc, count=True)
            if w["written"]:
                raised, why = self.banks.cmci_signal(e.cpu, e.bank, w["old"], w["status"],
                                                     self.cfg.ser)
            else:
                raised, why = False, w["reason"]
            cpus = [c for c in self.topo.sharers(e.cpu, e.bank) if c in online] if raised else []
            if raised and not cpus:
                raised, why = False, why + "; no sharer is online"
            out.append((e, addr, w, {"raised": raised, "cpus": cpus, "why": why}))
        return out

    def _check_irq_errors(self, errs: list, via: str) -> None:
        for i, e in enumerate(errs):
            cls = sev.intel_check_mce_type(e.status, self.cfg.ser)
            if cls not in (sev.CORRECTED, sev.UCNA):
                raise UsageError(f"error[{i}].via", f"{e.status:#x} is {cls}: silicon signals it "
                                 f"by #MC, not by {'CMCI' if via == 'cmci' else 'polling'}; "
                                 "use via=mce (only corrected and UCNA errors arrive this way)")

    def _send_interrupts(self, targets, vector: int) -> int:
        t = deliver_interrupt(self.banks, targets, vector, self.cpu_pids)
        HL = self.R.HL
        for c in targets:   # a CPU that checked its doorbell just before sleeping
            self.R.ev.ring_doorbell(HL.doorbell(c), HL.sleep_reg(c))
        return t

    def _request_poll(self) -> int:
        X, L = self.R.X, self.R.L
        self.poll_k += 1
        X.store(L.poll_req, self.poll_k)
        self.R.ev.bump(L.pc(0, L.P_KICK))     # CPU 0's timer softirq
        return self.poll_k

    def _wait_cond(self, cond, timeout_s: float, sched=None) -> bool:
        """Wait for ``cond``; with ``sched``, serve Dom0's steps (controlled) meanwhile."""
        deadline = time.monotonic() + timeout_s
        while not cond():
            if sched is not None and sched.turn_is_dom0():
                self._dom0_step(timeout_s)
                continue
            if time.monotonic() > deadline:
                return False
            self._poll(0.02, done=cond if sched is None else
                       lambda: cond() or sched.turn_is_dom0())
        return True

    # -- a CMCI or poll trial -----------------------------------------------------------------
    def _trial_irq(self, errs: list, via: str, timeout_s: float | None = None,
                   schedule: dict | None = None, raw=None) -> dict:
        """A CMCI or poll trial. ``schedule``: under controlled scheduling, the
        strategy (None: unscheduled, as ``Machine.poll`` and the hotplug paths run);
        ``raw``: the errors as given (the token's header)."""
        from emu.machine.coordinator import SCHEMA
        from emu.machine.sched import OVER_DEADLOCK, OVER_DONE, controlled_record
        from emu.trial.oracle import check_trial
        from emu.xen.mce import PHASES
        X, L, topo = self.R.X, self.R.L, self.topo
        self._check_irq_errors(errs, via)
        wd = timeout_s or self.cfg.watchdog_s
        self.trial_gen += 1
        gen = self.trial_gen
        self._reset_trial_state(gen)
        if self.tev is not None:
            self._trace_reset()
        sched = self.sched if schedule is not None else None
        banks_before = None
        dom0_vseen = None
        if sched is not None:
            # Dom0 takes part as in an #MC trial (Coordinator.trial): its fetch, served
            # concurrently, would otherwise land inside a CMCI handler's committed-list
            # push at the host's whim.
            if self.cfg.extra.get("sched_dom0", True) and self._dom0_quiesce(min(wd, 5.0)):
                dom0_vseen = self.virq_seen
            self._dom0_sched, self._dom0_steps = dom0_vseen is not None, 0
            if schedule.get("banks") is not None:
                sched.restore_banks(schedule["banks"])   # a replay: the recorded input
            banks_before = sched.bank_state()
        n0 = {c: X.load(L.pc(c, L.P_CMCI_N)) for c in range(self.n)}
        t_inject = time.monotonic_ns()
        written = self._report(errs)
        targets = sorted({c for *_, ci in written for c in ci["cpus"]})
        k = None
        if sched is not None:
            # Controlled: the CMCI handlers (and CPU 0's poll round) take turns. The
            # CMCIs go first and every handler waits at its first step; then the poll
            # is asked for, and the first choice waits for CPU 0 and the coordinator
            # (its arrival says the request is out), so the schedule starts from the
            # same state whatever the signals' timing. The strategy decides how the
            # poller and the CMCI owners cross.
            parts = sorted(set(targets) | ({0} if via == "poll" else set()))
            sched.start(parts, schedule, others=self._online(),
                        extra_arrivals=1 if via == "poll" else 0, dom0_vseen=dom0_vseen)
            t0 = self._send_interrupts(targets, VEC_CMCI) if targets else time.monotonic_ns()
            if via == "poll":
                self._wait_cond(lambda: sched.arrived(len(targets)), wd)
                k = self._request_poll()
                sched.arrive()
        else:
            if via == "poll":
                # The poll round first, the CMCIs once it runs: the two paths then cross
                # as when an error lands while the poller is at work (3e15c37e68).
                k = self._request_poll()
                self._wait_cond(lambda: X.load(L.poll_started) >= k, wd)
            t0 = self._send_interrupts(targets, VEC_CMCI) if targets else time.monotonic_ns()

        def done():
            ok = all(X.load(L.pc(c, L.P_CMCI_N)) > n0[c] for c in targets) and \
                (k is None or X.load(L.poll_done) >= k)
            if sched is None:
                return ok
            return ok and sched.over() == OVER_DONE or sched.over() == OVER_DEADLOCK
        outcome = "continued" if self._wait_cond(done, wd, sched) else "hang"
        dom0_scheduled, self._dom0_sched = self._dom0_sched, False   # Dom0 goes on freely
        deadlock = None
        if sched is not None and sched.over() == OVER_DEADLOCK:
            outcome = "deadlock"
            deadlock = sched.deadlock(lambda c: PHASES[X.load(L.pc(c, L.P_PHASE))])
        if self.tev is not None:
            self._trace_ring = self._read_trace_ring()
            self._trace_ring.update(t0=t0, trial=gen)
        logouts = [x for c in range(self.n) for x in self._logouts(c)
                   if x["who"] in ("MCA_CMCI_HANDLER", "MCA_POLLER") and x["gen"] == gen]
        rids = {x["record_id"] for x in logouts if x["record_id"]}
        self._await_logged(rids, wd)
        if dom0_vseen is not None and outcome == "continued":
            self._dom0_quiesce(min(wd, 5.0))   # (as Coordinator.trial: its drain ends)
        t_logged = [self.logged[r][1] for r in rids if r in self.logged]
        errors_out = []
        for e, maddr, w, ci in written:
            inst = topo.inst[e.cpu][e.bank]
            mine = [x for x in logouts if topo.inst[x["cpu"]][x["bank"]] == inst]
            sharers = topo.sharers(e.cpu, e.bank)
            owner = [c for c in sharers if self._owned(c) >> e.bank & 1]
            polled = [c for c in sharers if c in self._online() and
                      X.load(L.pc(c, L.P_POLL_MASK)) >> e.bank & 1]
            expected = ci["raised"] and bool(owner) or (via == "poll" and bool(polled))
            src = sorted({_SOURCE[x["who"]] for x in mine})
            item = {"cpu": e.cpu, "bank": e.bank, "status": msr.hexs(e.status),
                    "addr": msr.hexs(maddr), "misc": msr.hexs(e.misc), "via": via,
                    "class": sev.intel_check_mce_type(e.status, self.cfg.ser),
                    "written": w["written"], "kept": w["kept"],
                    "bank_status": msr.hexs(w.get("status", 0)),
                    "cmci": ci, "cmci_owner": owner[0] if owner else None,
                    "polled_by": polled if via == "poll" else [],
                    "sharers": sharers, "owners": sorted({x["cpu"] for x in mine}),
                    "logged_by": [{"cpu": x["cpu"], "source": _SOURCE[x["who"]],
                                   "record_id": x["record_id"], "cleared": x["cleared"]}
                                  for x in mine],
                    "logs": len(mine), "cleared": any(x["cleared"] for x in mine),
                    "clearable": all(sev.intel_need_clearbank_scan(
                        sev.MCA_CMCI_HANDLER if s == "cmci" else sev.MCA_POLLER,
                        w.get("status", e.status), self.cfg.ser) for s in src or ["cmci"]),
                    "expected_seen": expected, "action": None,
                    "dom0_log": [self._dom0_entry(x["record_id"], _SOURCE[x["who"]], {}, wd)
                                 for x in mine if x["record_id"]]}
            item["terminal"] = self._terminal(item, via)
            errors_out.append(item)
        res = {"schema": SCHEMA, "trial": gen, "outcome": outcome, "resets": 0, "via": via,
               "handler": self.cfg.handler, "seed": self.cfg.seed, "topology": self.cfg.topology,
               "local": False, "targets": [], "cmci_targets": targets,
               "vmce_policy": self.cfg.vmce_policy, "errors": errors_out, "boot_log": [],
               "logouts": [{"cpu": x["cpu"], "bank": x["bank"], "source": _SOURCE[x["who"]],
                            "status": msr.hexs(x["status"]), "record_id": x["record_id"],
                            "cleared": x["cleared"]} for x in logouts],
               "cpus": [{"cpu": c, **self._cpu_masks(c), "phases": [], "mcip_after": False}
                        for c in range(self.n)],
               "ownership": self._ownership(),
               "poll_period_ms": X.load(L.poll_period_ns) / 1e6,
               "latency_us": {"raise": round((t0 - t_inject) / 1e3, 1),
                              "cmci_done": self._lat_max(L.P_T_CMCI, targets, t0),
                              "dom0_logged": (round((max(t_logged) - t0) / 1e3, 1)
                                              if t_logged and len(t_logged) == len(rids)
                                              else None)},
               "t_inject_ns": t_inject,
               "telemetry": {"free": self.tele.free_count(), "drops": self.tele.drops()},
               "domains": self._domains(), "lost_at_reset": [], "hazards": [],
               "dom0_log_path": self.dom0_log_path,
               "dom0": {"restarts": self.dom0_restarts, "exits": list(self.dom0_exits),
                        "refused": self.refused, "replies_lost": self.replies_lost}}
        for e in errors_out:
            if e["logs"] > 1 and e["cmci_owner"] is None and \
                    all(x["source"] == "poll" for x in e["logged_by"]):
                res["hazards"].append({
                    "kind": "H", "cpus": e["owners"], "bank": e["bank"],
                    "detail": "pollers on every sharer read this non-CMCI bank before any "
                              "cleared it (polling takes no lock): duplicate records"})
        if outcome == "hang":
            res["snapshot"] = self._snapshot()
        if deadlock is not None:
            res["deadlock"] = deadlock
        if sched is not None:
            res["sched"] = sched.result()
            res["sched"]["banks_before"] = banks_before
            res["sched"]["dom0"] = {"scheduled": dom0_vseen is not None,
                                    "left": dom0_vseen is not None and not dom0_scheduled,
                                    "steps": self._dom0_steps}
            if outcome in ("hang", "deadlock"):
                # the CPUs wait for turns that never come: start them again
                boot = self.warm_reset(f"trial {gen}: {outcome}")
                res["resets"] = 1
                res["boot_log"] = boot["boot_log"]
                res["lost_at_reset"] = boot["lost_at_reset"]
        res["violations"] = check_trial(res, self.topo)
        if sched is not None:
            controlled_record(res, self.cfg, raw if raw is not None else [], False, None, via)
        return res

    def _lat_max(self, word: int, cpus, t0: int):
        X, L = self.R.X, self.R.L
        ts = [X.load(L.pc(c, word)) for c in cpus]
        if not ts or any(t < t0 for t in ts):
            return None
        return round((max(ts) - t0) / 1e3, 1)

    @staticmethod
    def _terminal(item: dict, via: str) -> str:
        """What became of the error, in words."""
        logged = [d for d in item["dom0_log"] if d["count"]]
        if item["logs"] == 1 and len(logged) == 1 and logged[0]["count"] == 1:
            return f"logged once by Dom0 as a {logged[0]['source']} record"
        if item["logs"] > 1:
            return (f"logged {item['logs']} times (" + ", ".join(
                f"cpu{x['cpu']} {x['source']}" for x in item["logged_by"]) + "): a double log")
        if item["logs"] == 1:
            d = item["dom0_log"][0] if item["dom0_log"] else {}
            return "logged by Xen, " + (d.get("pending") or d.get("lost")
                                        or "no record (telemetry pool exhausted)")
        if not item["written"]:
            return "not written: " + (item["cmci"]["why"])
        why = item["cmci"]["why"]
        if item["cmci"]["raised"] and item["cmci_owner"] is None:
            why = "CMCI raised, but no sharer owns the bank"
        if via == "poll" and not item["polled_by"]:
            why += "; no CPU polls this bank (a CMCI bank is not polled since 3e15c37e68)"
        return f"left in the bank: {why}"

    # -- CPU offline / online ----------------------------------------------------------------
    def _call_cpus(self, cpus, fn: int, word: int, timeout_s: float) -> bool:
        """A call-function IPI from the coordinator (standing in for the CPU that runs
        cpu_down/cpu_up): ``fn`` on ``cpus``; waits until each has bumped ``word``."""
        X, L = self.R.X, self.R.L
        n0 = {c: X.load(L.pc(c, word)) for c in cpus}
        for c in cpus:
            X.fetch_or(L.pc(c, L.P_CALL_FN), fn)
        self._send_interrupts(cpus, VEC_CALL)
        return self._wait_cond(lambda: all(X.load(L.pc(c, word)) > n0[c] for c in cpus),
                               timeout_s)

    def _cpu_arg(self, c) -> int:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < self.n:
            raise UsageError("cpu", f"{c!r}: give a CPU 0..{self.n - 1}")
        return c

    def cpu_offline(self, c, errors=()) -> dict:
        """Xen's cpu_down(c) for MCA: CPU_DYING on c, then CPU_DEAD. ``errors`` are
        reported between the two, while nobody owns c's banks."""
        X, L = self.R.X, self.R.L
        c = self._cpu_arg(c)
        if c == 0:
            raise UsageError("cpu", "CPU 0 cannot go offline (Xen's cpu_down refuses the "
                             "boot CPU); give 1.." + str(self.n - 1))
        if c not in self._online():
            raise UsageError("cpu", f"CPU {c} is already offline")
        errs = self._validated(errors) if errors else []
        self._check_irq_errors(errs, "cmci")
        wd = self.cfg.watchdog_s
        self.trial_gen += 1
        gen = self.trial_gen
        self._reset_trial_state(gen)
        before = self._ownership()
        if not self._call_cpus([c], FN_DYING, L.P_CALL_N, wd):
            raise UsageError("cpu", f"CPU {c} did not take CPU_DYING in {wd:g} s")
        written = self._report(errs)
        n0 = {x: X.load(L.pc(x, L.P_CMCI_N)) for x in range(self.n)}
        targets = sorted({x for *_, ci in written for x in ci["cpus"]})
        if targets:
            self._send_interrupts(targets, VEC_CMCI)
        online = self._online()
        # CPU_DEAD: cpu_mcheck_distribute_cmci, on_each_cpu(cmci_discover, wait=0).
        self._call_cpus(online, FN_DISCOVER, L.P_DISCOVER_N, wd)
        self._wait_cond(lambda: all(X.load(L.pc(x, L.P_CMCI_N)) > n0[x] for x in targets), wd)
        return self._hotplug_result(c, "offline", gen, before, written, wd)

    def cpu_online(self, c) -> dict:
        L = self.R.L
        c = self._cpu_arg(c)
        if c in self._online():
            raise UsageError("cpu", f"CPU {c} is already online")
        self.trial_gen += 1
        gen = self.trial_gen
        self._reset_trial_state(gen)
        before = self._ownership()
        if not self._call_cpus([c], FN_UP, L.P_CALL_N, self.cfg.watchdog_s):
            raise UsageError("cpu", f"CPU {c} did not come up in {self.cfg.watchdog_s:g} s")
        return self._hotplug_result(c, "online", gen, before, [], self.cfg.watchdog_s)

    def _hotplug_result(self, c: int, op: str, gen: int, before, written, wd) -> dict:
        topo = self.topo
        logouts = [x for cpu in range(self.n) for x in self._logouts(cpu) if x["gen"] == gen]
        rids = {x["record_id"] for x in logouts if x["record_id"]
                and x["who"] != "MCA_RESET"}   # post-reset records get no VIRQ
        self._await_logged(rids, wd)
        log = [{"cpu": x["cpu"], "bank": x["bank"], "source": _SOURCE[x["who"]],
                "status": msr.hexs(x["status"]), "record_id": x["record_id"],
                "cleared": x["cleared"],
                "dom0_log": self._dom0_entry(x["record_id"], _SOURCE[x["who"]], {}, wd)
                if x["record_id"] else None} for x in logouts]
        errors = []
        for e, _maddr, w, ci in written:
            inst = topo.inst[e.cpu][e.bank]
            mine = [x for x in log if topo.inst[x["cpu"]][x["bank"]] == inst]
            errors.append({"cpu": e.cpu, "bank": e.bank, "status": msr.hexs(e.status),
                           "bank_status": msr.hexs(w.get("status", 0)), "cmci": ci,
                           "logged_by": mine, "logs": len(mine),
                           "dom0_log": [x["dom0_log"] for x in mine if x["dom0_log"]]})
        return {"op": op, "cpu": c, "online": self._online(), "ownership_before": before,
                "ownership": self._ownership(), "log": log, "errors": errors,
                "cpus": [{"cpu": x, **self._cpu_masks(x)} for x in range(self.n)]}

    # -- hazards (xen-mca.md §10.2) ---------------------------------------------------------
    def _hazards(self, res: dict, local: bool) -> list[dict]:
        """Hazards a #MC trial reached. A: a CPU that found a valid error panics with
        "No CPU found valid MCE" (another LMCE's fatal check reset the shared
        ``found_error`` in between). B: a broadcast #MC in which no CPU found a
        valid error (e.g. ``raise_cpu`` with no bank) went on without a panic
        (``severity_cpu`` stayed -1, nobody ran the fatal check). C: a CPU's softirq
        waits in ``mce_inside_bar`` for every CPU after an LMCE that deferred nothing."""
        out = []
        if not local and res["outcome"] in ("continued", "recovered") and not any(
                e["owners"] for e in res["errors"]):
            out.append({"kind": "B", "cpus": res["targets"], "lmce": False,
                        "detail": "a broadcast #MC in which no CPU found a valid bank: "
                                  "severity_cpu stayed -1, nobody ran the fatal check, and Xen "
                                  "went on without the \"No CPU found valid MCE\" panic"})
        panic = res.get("panic") or ""
        if panic.startswith("MCE: No CPU found valid MCE") and res.get("cpu") is not None:
            cpu = res["cpu"]
            found = [e for e in res["errors"] if cpu in e["owners"]]
            if found:
                out.append({"kind": "A", "cpu": cpu, "lmce": local,
                            "errors": [f"cpu{e['cpu']}/bank{e['bank']}" for e in found],
                            "detail": f"CPU {cpu} logged a valid error, then found found_error "
                                      "0 at its fatal check: another CPU's check reset the "
                                      "shared found_error/severity_cpu in between; the host "
                                      "reset on the wrong premise"})
        if res["outcome"] == "hang" and local:
            stuck = [s["cpu"] for s in res.get("snapshot") or [] if s["phase"] == "softirq"]
            lmce_cpu = res["errors"][0]["cpu"] if res["errors"] else res.get("raise_cpu")
            if stuck and lmce_cpu in stuck:
                out.append({"kind": "C", "cpus": stuck, "lmce": True, "mirror": False,
                            "detail": "the LMCE deferred nothing (lmce_pending empty), so "
                                      "mce_softirq ran with bcast true and waits in "
                                      "mce_inside_bar for every online CPU, which never come"})
            elif stuck:
                out.append({"kind": "C", "cpus": stuck, "lmce": True, "mirror": True,
                            "lmce_cpu": lmce_cpu,
                            "detail": f"CPU {lmce_cpu} still had its LMCE in lmce_pending when a "
                                      "broadcast #MC came in which it found no error: it ran "
                                      "its softirq as LMCE and never entered mce_inside_bar, "
                                      "where the other CPUs wait for it"})
        return out
