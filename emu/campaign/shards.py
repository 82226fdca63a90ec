"""Shards and ``emu merge``.

``--shard i/N`` runs the trial indices ``i, i+N, i+2N, ...`` of a campaign (below
``--trials``): shards 0/N .. N-1/N together run exactly the unsharded campaign's
trials, each rebuilt from ``(seed, index)`` alone, so trial ``i`` gets the same
scenario, perturbation seed and fault wherever it runs. What a trial *did* (owners,
outcome when it depends on them, perturbations taken, timing) is timing and may
differ between runs; :func:`stable` is the part that may not.

:func:`merge` reads the JSON Lines of several campaigns (``--out`` files, complete
lines only) and rebuilds one summary from their trial records. Pure file handling.
"""
from __future__ import annotations

import json
import os

from emu.campaign.coverage import SUMMARY_SCHEMA, TRIAL_SCHEMA, Summary
from emu.errors import UsageError

# Per-trial fields that depend only on (seed, trial) and the campaign's options.
STABLE_FIELDS = ("seed", "trial", "family", "note", "specs", "streams", "fault_plan")


def indices(shard: tuple[int, int], job: int = 0, jobs: int = 1, trials: int | None = None):
    """The trial indices of one worker: the shard's sequence ``i, i+N, ...``, dealt
    round-robin to ``jobs`` workers; endless when ``trials`` is None."""
    si, sn = shard
    k = si + sn * job
    step = sn * jobs
    while trials is None or k < trials:
        yield k
        k += step


def stable(rec: dict) -> dict:
    """What a trial record must have the same wherever and whenever it runs."""
    out = {k: rec.get(k) for k in STABLE_FIELDS}
    p = rec.get("perturbation") or {}
    out["perturbation_seed"] = p.get("seed")
    return out


def read(path: str) -> tuple[list[dict], list[dict]]:
    """(trial records, summaries) of one JSON Lines file; a last, torn line is
    ignored (a killed campaign)."""
    if not os.path.isfile(path):
        raise UsageError("files", f"{path}: no such file; give --out files of emu stress")
    trials, sums = [], []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:      # the torn last line of a killed campaign
                break
            raise UsageError("files", f"{path}:{n + 1}: not JSON; give --out files of "
                             "emu stress") from None
        if obj.get("schema") == TRIAL_SCHEMA:
            trials.append(obj)
        elif obj.get("schema") == SUMMARY_SCHEMA:
            sums.append(obj)
    return trials, sums


def merge(paths) -> dict:
    """One ``emu.stress.summary/1`` from several campaigns' JSON Lines. A trial that
    appears twice (same seed and index) counts once. ``trials_per_s`` adds the
    campaigns' rates (shards run side by side)."""
    if not paths:
        raise UsageError("files", "give at least one --out file of emu stress")
    s = Summary()
    seen = set()
    rates, elapsed = [], 0.0
    recs = []
    for p in paths:
        t, sums = read(p)
        recs += t
        for x in sums:
            if x.get("trials_per_s"):
                rates.append(x["trials_per_s"])
            elapsed = max(elapsed, float(x.get("elapsed_s") or 0.0))
    for r in sorted(recs, key=lambda r: (r["seed"], r["trial"], bool(r.get("from_db")))):
        key = (r["seed"], r["trial"], bool(r.get("from_db")))
        if key in seen:
            continue
        seen.add(key)
        s.add(r)
    out = s.to_dict(elapsed, files=list(paths))
    if rates:
        out["trials_per_s"] = round(sum(rates), 1)
    return out
