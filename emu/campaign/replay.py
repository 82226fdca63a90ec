"""``emu replay``: rebuild trial ``i`` of seed ``S`` and run it again, ``repeat`` times.

The trial is rebuilt from ``(S, i)`` and the campaign's options alone (the line a
campaign prints for every finding carries them all): the same scenario, the same
perturbation seed, the same fault. Its timing is not replayed (the perturbation is
real preemption), so a race-dependent finding comes back in some of the repeats:
the result says how often. The owners each error had in each repeat are listed
(``attribution``): one error logged by different CPUs across the repeats is hazard
I of xen-mca.md §10.2, reported as ``hazard I`` (once, over all repeats). Each repeat
starts from a freshly warm-reset machine (in the campaign the trial may have followed
others: pages broken earlier stay broken there, not here).
"""
from __future__ import annotations

from collections import Counter

from emu.errors import UsageError


def replay(opts, seed: int, trial: int, family: str | None = None, repeat: int = 20) -> dict:
    """Run trial ``trial`` of ``seed`` ``repeat`` times on one machine; returns
    ``emu.stress.replay/1``: the family, how many repeats had each finding
    (``findings``), ``reproduced`` (repeats with a violation, or with any finding
    when the campaign fails on hazards) and the records."""
    from emu.campaign.stress import Worker, _fails, scenario
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise UsageError("repeat", f"{repeat!r}: give a positive number of repeats")
    for name, v in (("seed", seed), ("trial", trial)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise UsageError(name, f"{v!r}: give a non-negative integer")
    w = Worker(opts)
    scn = scenario(seed, trial, opts.mix, w.topo, opts.family_opts())
    if family is not None and scn.family != family:
        raise UsageError("family", f"trial {trial} of seed {seed} with --scenario "
                         f"{opts.mix_text} is {scn.family}, not {family}: give the "
                         "--scenario the campaign ran")
    w.start()
    recs, found, reproduced = [], Counter(), 0
    try:
        for k in range(repeat):
            if k:
                w.reset()
            rec = w.play(seed, trial)
            recs.append(rec)
            for key in {f["kind"] if f["kind"] == "violation" else f"hazard {f['id']}"
                        for f in rec["findings"]}:
                found[key] += 1
            reproduced += _fails(opts, rec) or (opts.fail_on == "hazard" and
                                                bool(rec["findings"]))
        extra = w.finish()
    finally:
        w.close()
    # hazard I across the repeats: the same error attributed to different CPUs
    owners: dict = {}
    for rec in recs:
        for o in rec["owners"]:
            owners.setdefault(o["error"], set()).add(tuple(o["owners"]))
    attribution = {k: sorted(list(x) for x in v) for k, v in sorted(owners.items())}
    split = {k: v for k, v in attribution.items() if len(v) > 1}
    if split:
        found["hazard I"] += 1
    return {"schema": "emu.stress.replay/1", "seed": seed, "trial": trial,
            "attribution": attribution, "hazard_i": split,
            "family": scn.family, "specs": recs[0]["specs"], "repeat": repeat,
            "reproduced": int(reproduced), "findings": dict(sorted(found.items())),
            "outcomes": dict(Counter(r["outcome"] for r in recs)),
            "end_findings": extra, "records": recs}
