"""Long campaigns (``-m slow``): many trials under seeded chaos, invariants every time."""
from __future__ import annotations

from collections import Counter

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_chaos_campaign_on_a_shared_bank(emu_machine, seed):
    m = emu_machine(chaos=0.2, seed=seed)
    owners = Counter()
    for i in range(2500):
        r = m.inject(f"cpu={i % 4} bank=8 status=0xBD000000004000CF addr=0x181000 "
                     "misc=0x86 mcg=0x5")
        e = r["errors"][0]
        assert r["outcome"] == "recovered" and r["violations"] == [], (i, r)
        assert len(e["owners"]) == 1 and [d["count"] for d in e["dom0_log"]] == [1], (i, e)
        owners[e["owners"][0]] += 1
    assert len(owners) > 1, owners


@pytest.mark.timeout(600)
def test_guest_campaign_every_vmce_handled_and_logged_once(emu_machine):
    m = emu_machine(chaos=0.05, seed=9)
    for i in range(1500):
        d = i % 2                                   # Dom0's pages, then guest 1's
        gpa = (0x100 + i // 2) << 12 | 0x20         # a fresh page each time
        r = m.inject(f"cpu={i % 4} bank={7 + i % 2} status=0xBD000000004000CF "
                     f"addr={gpa:#x} misc=0x86 mcg=0x5 domain={d}")
        e = r["errors"][0]
        assert r["outcome"] == "recovered" and r["violations"] == [], (i, r)
        assert e["vmce"]["domain"] == d and e["vmce"]["guest_handled"], (i, e)
        assert [x["count"] for x in e["dom0_log"]] == [1], (i, e)
    assert [x["state"] for x in r["domains"]] == ["running", "running"]
