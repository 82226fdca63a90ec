"""The telemetry pool (xen-mca.md §5.1-§5.3), in one process over a real Xen region."""
from __future__ import annotations

import os

import pytest

from emu.machine import MachineConfig
from emu.machine.regions import Regions
from emu.xen.mctelem import MC_NONURGENT, MC_URGENT, NENT, Mctelem


@pytest.fixture
def tele():
    R = Regions(MachineConfig().validate())
    t = Mctelem(R)
    t.init(boot=7)
    yield t
    os.close(R.efd)


def test_urgent_raids_nonurgent_slots_and_exhaustion_counts_drops(tele):
    got = [tele.mctelem_reserve(MC_URGENT, 0) for _ in range(NENT)]
    assert None not in got and len(set(got)) == NENT == 30
    assert tele.mctelem_reserve(MC_URGENT, 0) is None
    assert tele.mctelem_reserve(MC_NONURGENT, 0) is None
    assert tele.drops() == 2 and tele.free_count() == 0
    tele.mctelem_dismiss(got[3])
    assert tele.mctelem_reserve(MC_URGENT, 1) == got[3]


def test_nonurgent_never_takes_urgent_slots(tele):
    got = [tele.mctelem_reserve(MC_NONURGENT, 0) for _ in range(20)]
    assert all(i >= 10 for i in got)
    assert tele.mctelem_reserve(MC_NONURGENT, 0) is None and tele.drops() == 1
    assert tele.mctelem_reserve(MC_URGENT, 0) is not None   # the urgent ones are left


def test_fetch_is_oldest_first_and_ack_works_only_on_the_head(tele):
    ids = []
    for k in range(3):
        i = tele.mctelem_reserve(MC_URGENT, 0)
        tele.write(i, {"k": k})
        tele.mctelem_commit(i)
        ids.append(tele.record_id(i))
    assert len(set(ids)) == 3 and all(r >> 32 == 7 for r in ids)   # boot in the id
    head = tele.consume_oldest_begin(MC_URGENT)
    assert tele.read(head) == {"k": 0}
    tele.consume_oldest_end(head)
    # fetching again without an ack gives the same head
    assert tele.consume_oldest_begin(MC_URGENT) == head
    tele.consume_oldest_end(head)
    assert not tele.mctelem_ack(MC_URGENT, ids[1])        # not the head: refused
    assert not tele.mctelem_ack(MC_NONURGENT, ids[0])     # wrong class: refused
    assert tele.mctelem_ack(MC_URGENT, ids[0])
    nxt = tele.consume_oldest_begin(MC_URGENT)
    assert tele.read(nxt) == {"k": 1}
    tele.consume_oldest_end(nxt)
    assert tele.free_count() == NENT - 2


def test_deferred_records_are_replayed_oldest_first(tele):
    order = []
    for k in range(3):
        i = tele.mctelem_reserve(MC_URGENT, 2)
        tele.write(i, {"k": k})
        tele.mctelem_defer(i, 2, lmce=False)
    assert tele.mctelem_has_deferred(2) and not tele.mctelem_has_deferred(1)

    def action(i):
        order.append(tele.read(i)["k"])
        return order[-1] != 1          # the second needs no logging: dismissed
    assert tele.mctelem_process_deferred(2, action, False) == 3
    assert order == [0, 1, 2] and not tele.mctelem_has_deferred(2)
    assert tele.free_count() == NENT - 2   # two committed, one dismissed
