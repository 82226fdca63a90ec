"""Long campaigns (``-m slow``): many trials under seeded chaos, invariants every time.

The machine's ``chaos`` reseeds every process from the trial seed (machine seed,
trial) at each trial, so these campaigns really run perturbed: the counts in each
result say so (they were inert before per-trial reseeding existed)."""
from __future__ import annotations

import os
from collections import Counter

import pytest

pytestmark = pytest.mark.slow

# EMU_CAMPAIGN_SCALE=0.1 runs a tenth of each campaign (a smoke run of the test itself).
SCALE = float(os.environ.get("EMU_CAMPAIGN_SCALE", "1"))


def _n(trials: int) -> int:
    return max(20, int(trials * SCALE))


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_chaos_campaign_on_a_shared_bank(emu_machine, seed):
    m = emu_machine(chaos=0.2, seed=seed)
    owners = Counter()
    perturbed = Counter()
    starved = 0
    for i in range(_n(2500)):
        r = m.inject(f"cpu={i % 4} bank=8 status=0xBD000000004000CF addr=0x181000 "
                     "misc=0x86 mcg=0x5")
        e = r["errors"][0]
        assert r["outcome"] == "recovered" and r["violations"] == [], (i, r)
        assert len(e["owners"]) == 1 and [d["count"] for d in e["dom0_log"]] == [1], (i, e)
        p = r["perturbation"]
        assert p["seed"] == [seed, r["trial"]] and p["chaos"] == 0.2
        # ~40 yield points per CPU at p=0.2: every trial perturbs its CPUs
        assert sum(p["counts"][f"cpu{c}"] for c in range(4)) > 0, (i, p)
        perturbed.update(p["counts"])
        starved += p["starvation"]["happened"]
        owners[e["owners"][0]] += 1
    assert len(owners) > 1, owners
    assert all(perturbed[k] > 0 for k in ("cpu0", "cpu1", "cpu2", "cpu3", "dom0")), perturbed
    assert starved > 0


@pytest.mark.timeout(600)
def test_guest_campaign_every_vmce_handled_and_logged_once(emu_machine):
    m = emu_machine(chaos=0.05, seed=9)
    perturbed = Counter()
    quiet = 0
    n = _n(1500)
    for i in range(n):
        d = i % 2                                   # Dom0's pages, then guest 1's
        gpa = (0x100 + i // 2) << 12 | 0x20         # a fresh page each time
        r = m.inject(f"cpu={i % 4} bank={7 + i % 2} status=0xBD000000004000CF "
                     f"addr={gpa:#x} misc=0x86 mcg=0x5 domain={d}")
        e = r["errors"][0]
        assert r["outcome"] == "recovered" and r["violations"] == [], (i, r)
        assert e["vmce"]["domain"] == d and e["vmce"]["guest_handled"], (i, e)
        assert [x["count"] for x in e["dom0_log"]] == [1], (i, e)
        c = r["perturbation"]["counts"]
        perturbed.update(c)
        quiet += sum(c[f"cpu{k}"] for k in range(4)) == 0
    assert [x["state"] for x in r["domains"]] == ["running", "running"]
    # p=0.05 over ~160 CPU yield points: a trial with no CPU perturbation is rare
    assert quiet <= n // 50, quiet
    assert all(perturbed[k] > 0 for k in ("cpu0", "cpu1", "cpu2", "cpu3", "dom0", "dom1")), \
        perturbed
