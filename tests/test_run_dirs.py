"""Run directories: old runs under the default root pruned to EMU_KEEP_RUNS; Dom0's log
rotated by size (MachineConfig extra log_rotate_mb), with the exactly-once recount
(a Dom0 killed around a rotation, reused log directories) reading the rotated parts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from emu.domains import logfiles
from emu.errors import UsageError
from emu.machine import MachineConfig
from emu.machine.runs import prune_runs

TINY = 300 / (1 << 20)    # MiB: a record line is larger, so every record rotates


def srao(cpu: int, mfn: int) -> str:
    return f"cpu={cpu} bank=8 status=0xBD000000004000CF addr={mfn << 12:#x} misc=0x86 mcg=0x5"


def all_ids(path) -> list[int]:
    return [i for part in logfiles.dom0_log_parts(path) for i in logfiles.read_ids(part)]


@pytest.mark.parametrize("die_at", ["after_write", "after_ack"])
def test_rotated_log_still_logs_each_record_exactly_once(emu_machine, tmp_path, die_at):
    # Dom0 dies right after the write that rotated its log (or after the ack): the
    # restarted Dom0 must find the id in the rotated part (Xen hands the record out
    # again), and the coordinator's recount must read the parts.
    m = emu_machine(guests=0, extra={"log_dir": str(tmp_path), "log_rotate_mb": TINY,
                                     "dom0_hooks": {"die_at": die_at, "die_count": 2}})
    rs = [m.inject(srao(i % 4, 0x190 + i)) for i in range(4)]
    assert rs[-1]["dom0"]["restarts"] == 1
    for r in rs:
        assert [d["count"] for d in r["errors"][0]["dom0_log"]] == [1], r["errors"][0]
    m.close()
    path = tmp_path / "dom0.jsonl"
    parts = logfiles.rotated_parts(path)
    assert len(parts) >= 3
    ids = all_ids(path)
    want = {d["id"] for r in rs for d in r["errors"][0]["dom0_log"]}
    assert sorted(ids) == sorted(want) and len(ids) == len(set(ids)) == 4
    # a new machine on the same directory continues the boot numbering from the parts
    m2 = emu_machine(guests=0, extra={"log_dir": str(tmp_path), "log_rotate_mb": TINY})
    r = m2.inject(srao(0, 0x1A0))
    assert r["errors"][0]["dom0_log"][0]["id"] >> 32 > max(want) >> 32


def test_rotation_keeps_the_newest_parts_and_emu_log_reads_them(emu_machine, tmp_path):
    m = emu_machine(guests=0, extra={"log_dir": str(tmp_path), "log_rotate_mb": TINY,
                                     "log_rotate_keep": 2})
    rs = [m.inject(srao(0, 0x190 + i)) for i in range(4)]
    m.close()
    path = tmp_path / "dom0.jsonl"
    assert [os.path.basename(p) for p in logfiles.rotated_parts(path)] == \
        ["dom0.jsonl.2", "dom0.jsonl.1"]
    p = subprocess.run([sys.executable, "-m", "emu", "log", str(tmp_path)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    shown = [line for line in p.stdout.splitlines() if line.startswith("emu: record ")]
    kept = all_ids(path)
    assert len(shown) == len(kept) == 2
    assert [int(s.split()[2], 16) for s in shown] == kept
    assert kept == [r["errors"][0]["dom0_log"][0]["id"] for r in rs[-2:]]


@pytest.mark.parametrize("extra, field", [({"log_rotate_mb": -1}, "log_rotate_mb"),
                                          ({"log_rotate_mb": "big"}, "log_rotate_mb"),
                                          ({"log_rotate_keep": 0}, "log_rotate_keep")])
def test_bad_rotation_settings_are_usage_errors(extra, field):
    with pytest.raises(UsageError) as e:
        MachineConfig(extra=extra).validate()
    assert e.value.field == field


def _fake_run(root, name: str) -> str:
    p = os.path.join(root, name)
    os.makedirs(p)
    with open(os.path.join(p, "dom0.jsonl"), "w") as f:
        f.write("")
    return p


def test_prune_keeps_the_newest_and_spares_live_runs_and_foreign_entries(tmp_path):
    dead = 2 ** 22 + 12345          # above pid_max's default: no such process
    old = [_fake_run(tmp_path, f"20260101-0000{i:02d}-{dead}") for i in range(6)]
    live = _fake_run(tmp_path, f"20250101-000000-{os.getpid()}")   # oldest, but alive
    mine = _fake_run(tmp_path, "my-notes")                        # not a run directory
    removed = prune_runs(str(tmp_path), keep=3)
    assert sorted(removed) == sorted(old[:3])
    left = sorted(os.listdir(tmp_path))
    assert left == sorted([os.path.basename(p) for p in old[3:]] + [os.path.basename(live),
                                                                    os.path.basename(mine)])


def test_default_run_directories_are_pruned_to_emu_keep_runs(tmp_path):
    root = tmp_path / "emu-runs"
    root.mkdir()
    dead = 2 ** 22 + 12345
    for i in range(4):
        _fake_run(root, f"20260101-0000{i:02d}-{dead}")
    env = dict(os.environ, TMPDIR=str(tmp_path), EMU_KEEP_RUNS="2")
    p = subprocess.run([sys.executable, "-m", "emu", "run", "--json", "--guests", "0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    new = os.path.basename(os.path.dirname(r["dom0_log_path"]))
    assert sorted(os.listdir(root)) == sorted([f"20260101-000003-{dead}", new])
    p = subprocess.run([sys.executable, "-m", "emu", "run", "--guests", "0"],
                       capture_output=True, text=True, timeout=60,
                       env=dict(env, EMU_KEEP_RUNS="0"))
    assert p.returncode == 2 and "EMU_KEEP_RUNS" in p.stderr
