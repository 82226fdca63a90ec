"""emu stress / emu replay / emu merge: seeded campaigns on real machines (issue 10).

Each test runs a small campaign (real processes) in a few seconds; the 10^5-trial
campaign is behind ``-m slow``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from emu.campaign import stress as S
from emu.campaign.shards import stable
from emu.hw.topology import Topology

ROOT = Path(__file__).resolve().parents[1]
CAPS = S.machine_caps()
FAST = "owner_race,memory,ucna,multi,ripv"      # no family that waits for a watchdog


def emu_cli(*args, timeout=120, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "emu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def popen(*args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "emu", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def records(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()
            if json.loads(x)["schema"] == "emu.stress.trial/1"]


def generated(seed, idx, mix=FAST, faults=S.FAULT_KINDS, rate=0.5, **machine):
    """What trial i must be, generated here without a machine (specs, family, streams,
    and the fault its stream draws)."""
    o = S.Options(seed=seed, scenario=mix, db=False, machine=machine)
    o.mix = S.parse_mix(mix)
    from emu.machine.config import MachineConfig
    o.config = MachineConfig(**dict(machine, seed=seed)).validate()
    topo = Topology(o.config)
    out = {}
    for i in idx:
        scn = S.scenario(seed, i, o.mix, topo, o.family_opts())
        out[i] = {"family": scn.family, "specs": scn.to_dict(), "streams": scn.streams,
                  "fault": S.fault_for(scn, faults, rate, topo, 2.0)}
    return out


def _gen_json(seed, idx):
    return json.loads(json.dumps(generated(seed, idx)))


def _stable_key(rec):
    return json.dumps(stable(rec), sort_keys=True)


# ---------------------------------------------------------------------------------------
# determinism: a fresh process, a shard, a Dask worker
# ---------------------------------------------------------------------------------------
def test_trial_is_rebuilt_from_seed_and_index_alone_in_a_fresh_process():
    here = _gen_json(11, range(40))
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_stress as T; "
            "print(json.dumps(T.generated(11, range(39, -1, -1))))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert p.returncode == 0, p.stderr
    there = json.loads(p.stdout)
    assert there == here                                   # same trials, built in reverse
    assert len({v["family"] for v in here.values()}) == 5
    assert any(v["fault"] for v in here.values()) and not all(v["fault"] for v in here.values())
    assert _gen_json(12, range(40)) != here


def test_a_shard_plays_the_trials_the_generator_gives(tmp_path):
    out = tmp_path / "s.jsonl"
    p = emu_cli("stress", "--trials", "12", "--seed", "11", "--scenario", FAST, "--shard",
                "1/3", "--no-db", "--out", str(out), "--json", "--faults", "kill_dom0,pause_dom0",
                "--fault-rate", "0.5", "--chaos", "0.02")
    assert p.returncode in (0, 1), p.stderr
    recs = records(out)
    assert [r["trial"] for r in recs] == [1, 4, 7, 10]
    want = generated(11, [1, 4, 7, 10], faults=("kill_dom0", "pause_dom0"))
    for r in recs:
        w = want[r["trial"]]
        assert (r["family"], r["streams"]) == (w["family"], w["streams"])
        assert stable(r)["fault_plan"] == w["fault"] == r["fault_plan"]
        assert r["perturbation"]["seed"] == [11, r["trial"]]
        assert r["specs"]["errors"] == w["specs"]["errors"]
        assert r["specs"]["then"] == w["specs"]["then"]
    summ = json.loads(p.stdout)                           # --json: only JSON on stdout
    assert summ["schema"] == "emu.stress.summary/1" and summ["trials"] == 4


_DASK = """
import io, json, os, sys
sys.path.insert(0, "tests")
import distributed
import test_stress as T
from emu.campaign.stress import Campaign, Options
if __name__ == "__main__":
    with distributed.LocalCluster(processes=True, n_workers=2, threads_per_worker=1,
                                  dashboard_address=None, silence_logs=40) as cl, \\
            distributed.Client(cl) as client:
        there = client.submit(T._gen_json, 11, list(range(20)), pure=False).result()
        pids = sorted(set(client.run(os.getpid).values()))
        # a running scheduler by its address: --dask tcp://host:port
        o = Options(seed=11, trials=6, scenario=T.FAST, db=False, dask=cl.scheduler_address,
                    block=2, machine={"watchdog_s": 0.5}).validate()
        tcp = Campaign(o, stderr=io.StringIO()).run()
    # the backend itself: each Dask worker keeps one machine and plays blocks
    o = Options(seed=11, trials=12, scenario=T.FAST, db=False, dask="local", jobs=2, block=3,
                out=sys.argv[1], machine={"watchdog_s": 0.5}).validate()
    s = Campaign(o, stderr=io.StringIO()).run()
    print(json.dumps({"there": there, "pids": pids, "summary": s, "tcp": tcp}))
"""


def test_a_dask_worker_plays_the_same_trials(tmp_path):
    pytest.importorskip("distributed")
    script = tmp_path / "dask_check.py"
    script.write_text(_DASK)
    out = tmp_path / "d.jsonl"
    p = subprocess.run([sys.executable, str(script), str(out)], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = json.loads(p.stdout.splitlines()[-1])
    assert got["there"] == _gen_json(11, range(20))     # generated in a Dask worker
    assert len(got["pids"]) == 2
    s = got["summary"]
    assert s["trials"] == 12 and s["violations"] == 0, s
    assert got["tcp"]["trials"] == 6 and got["tcp"]["exit_code"] == 0, got["tcp"]
    recs = records(out)
    assert sorted(r["trial"] for r in recs) == list(range(12))
    assert len({r["worker"] for r in recs}) >= 1
    want = generated(11, range(12))
    for r in recs:
        assert r["specs"]["errors"] == want[r["trial"]]["specs"]["errors"]
        assert r["streams"] == want[r["trial"]]["streams"]


# ---------------------------------------------------------------------------------------
# a violation: exit 1, the replay line, the failure database
# ---------------------------------------------------------------------------------------
def test_a_violation_exits_1_prints_a_replay_line_that_reproduces_it_and_is_replayed_first(
        tmp_path):
    db, out = tmp_path / "db.jsonl", tmp_path / "out.jsonl"
    p = emu_cli("stress", "--trials", "6", "--seed", "5", "--scenario", FAST,
                "--test-violate", "5:3", "--db", str(db), "--out", str(out))
    assert p.returncode == 1, p.stderr
    assert "VIOLATION in trial 3" in p.stderr and "test hook violate_trial" in p.stderr
    line = next(x.strip() for x in p.stderr.splitlines() if x.strip().startswith("emu replay")
                and "--trial 3 " in x)
    assert "--seed 5" in line and "--test-violate 5:3" in line and "--family" in line
    bad = [r for r in records(out) if any(f["kind"] == "violation" for f in r["findings"])]
    assert [r["trial"] for r in bad] == [3] and bad[0]["replay"] == line
    # the line reproduces it
    import shlex
    words = shlex.split(line)
    assert words[:2] == ["emu", "replay"]
    r = emu_cli(*words[1:], "--repeat", "2")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2/2 repeats reproduced" in r.stdout
    # the database holds it, and the next campaign plays it first
    entries = [json.loads(x) for x in db.read_text().splitlines()]
    assert [(e["seed"], e["trial"]) for e in entries] == [(5, 3)]
    out2 = tmp_path / "out2.jsonl"
    p2 = emu_cli("stress", "--trials", "2", "--seed", "9", "--scenario", FAST,
                 "--test-violate", "5:3", "--db", str(db), "--out", str(out2))
    assert p2.returncode == 1, p2.stderr
    recs = records(out2)
    assert (recs[0]["seed"], recs[0]["trial"], recs[0].get("from_db")) == (5, 3, True)
    assert any(f["kind"] == "violation" for f in recs[0]["findings"])
    assert [(r["seed"], r["trial"]) for r in recs[1:]] == [(9, 0), (9, 1)]
    assert len(db.read_text().splitlines()) == 1          # not saved twice


# ---------------------------------------------------------------------------------------
# hazards
# ---------------------------------------------------------------------------------------
def test_hazard_k_over_the_ripv_family_on_shared_core_banks_not_on_thread_private_ones():
    import emu
    # Hazard K needs the sibling to win the shared bank: enough trials that it does
    # (it failed once in a full run at 40 and 10)
    s = emu.stress(80, seed=1, scenario="ripv", watchdog_s=0.5)
    assert s["violations"] == 0, s["findings"].get("violation")
    k = s["findings"]["hazard K"]
    assert k["count"] >= 1 and "RIPV=0" in k["first"]["text"]
    assert k["first"]["replay"].startswith("emu replay --seed 1 --trial ")
    assert s["exit_code"] == 0                            # hazards alone: exit 0
    thread = emu.stress(40, seed=1, scenario="ripv", watchdog_s=0.5,
                        bank_scopes="0-9:thread")
    assert thread["violations"] == 0, thread["findings"]
    assert "hazard K" not in thread["findings"]
    assert thread["outcomes"].get("reset", 0) > 0       # RIPV=0 on a private bank resets
    hz = emu.stress(40, seed=1, scenario="ripv", watchdog_s=0.5, fail_on="hazard")
    assert hz["exit_code"] == 1 and hz["hazards"] > 0


@pytest.mark.skipif("raise_cpu" not in CAPS, reason="needs Machine.inject(raise_cpu=)")
def test_hazard_b_a_campaign_raising_a_machine_check_with_no_valid_bank():
    import emu
    s = emu.stress(6, seed=2, scenario="no_bank", watchdog_s=0.5)
    assert s["violations"] == 0, s["findings"].get("violation")
    assert s["findings"]["hazard B"]["count"] == 6
    assert s["outcomes"] == {"continued": 6}


@pytest.mark.skipif("wait_dom0" not in CAPS, reason="needs Machine.inject(wait_dom0=)")
def test_not_waiting_for_dom0_every_record_is_logged_exactly_once(tmp_path):
    import emu
    s = emu.stress(30, seed=3, scenario="owner_race,memory,multi", chaos=0.05,
                   watchdog_s=0.5, extra={"log_dir": str(tmp_path)})
    assert s["violations"] == 0, s["findings"].get("violation")
    assert s["perturbations"] > 0


# ---------------------------------------------------------------------------------------
# shards and merge
# ---------------------------------------------------------------------------------------
def test_shards_merged_equal_the_unsharded_campaign(tmp_path):
    common = ["--trials", "15", "--seed", "21", "--scenario", FAST, "--no-db",
              "--watchdog", "0.5", "--chaos", "0.02", "--faults", "all", "--fault-rate", "0.2"]
    whole = tmp_path / "whole.jsonl"
    p = emu_cli("stress", *common, "--jobs", "2", "--out", str(whole))
    assert p.returncode in (0, 1), p.stderr
    parts = []
    for k in range(3):
        f = tmp_path / f"shard{k}.jsonl"
        q = emu_cli("stress", *common, "--shard", f"{k}/3", "--out", str(f))
        assert q.returncode in (0, 1), q.stderr
        parts.append(f)
    merged = sorted((r for f in parts for r in records(f)), key=lambda r: r["trial"])
    base = sorted(records(whole), key=lambda r: r["trial"])
    assert [r["trial"] for r in merged] == list(range(15))
    assert [_stable_key(r) for r in merged] == [_stable_key(r) for r in base]
    m = emu_cli("merge", *map(str, parts), "--json")
    assert m.returncode in (0, 1), m.stderr
    summ = json.loads(m.stdout)
    assert summ["trials"] == 15
    assert sum(sum(v.values()) for v in summ["coverage"]["families"].values()) == 15
    assert summ["outcomes"] == json.loads(whole.read_text().splitlines()[-1])["outcomes"] or \
        sum(summ["outcomes"].values()) == 15


# ---------------------------------------------------------------------------------------
# signals
# ---------------------------------------------------------------------------------------
def _wait_lines(path: Path, n: int, proc, timeout=60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {n} lines")


def test_sigint_prints_the_summary(tmp_path):
    out = tmp_path / "o.jsonl"
    p = popen("stress", "--duration", "120s", "--scenario", "owner_race", "--no-db",
              "--out", str(out))
    try:
        _wait_lines(out, 5, p)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err
    assert "emu stress:" in err and "[interrupted]" in err and "outcomes:" in err
    last = json.loads(out.read_text().splitlines()[-1])
    assert last["schema"] == "emu.stress.summary/1" and last["interrupted"] is True
    assert last["trials"] >= 5


def test_sigkill_leaves_no_process_and_a_valid_jsonl(tmp_path, emu_leak_check):
    out = tmp_path / "o.jsonl"
    p = popen("stress", "--duration", "120s", "--scenario", "owner_race,memory", "--no-db",
              "--jobs", "2", "--out", str(out))
    try:
        _wait_lines(out, 8, p)
        family = psutil.Process(p.pid).children(recursive=True)
        assert len(family) >= 2 * 7                  # 2 workers, each a machine
        p.kill()
        p.communicate()
        gone, alive = psutil.wait_procs(family, timeout=20)
        assert not alive, alive
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    text = out.read_text()
    lines = text.split("\n")
    complete = lines[:-1]                     # the last piece may be torn
    assert len(complete) >= 8
    for x in complete:
        assert json.loads(x)["schema"] == "emu.stress.trial/1"
    from emu.campaign.shards import read
    assert len(read(str(out))[0]) == len(complete)


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, field", [
    (["--scenario", "owner_race,nosuch"], "scenario"),
    (["--scenario", "ripv:-1"], "scenario"),
    (["--scenario", "ripv:x"], "scenario"),
    (["--shard", "3/3"], "shard"),
    (["--shard", "1of3"], "shard"),
    (["--duration=-5s"], "duration"),
    (["--duration", "soon"], "duration"),
    (["--jobs", "0"], "jobs"),
    (["--faults", "kill_everything"], "faults"),
    (["--db", "GARBAGE"], "db"),
    (["--db", "DIR"], "db"),
    (["--trials", "-3"], "trials"),
    (["--fail-on", "everything"], "fail-on"),
])
def test_bad_input_exits_2_naming_the_option_with_nothing_started(tmp_path, args, field):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("this is not a failure database\n{}\n")
    args = [str(garbage) if a == "GARBAGE" else str(tmp_path) if a == "DIR" else a
            for a in args]
    out = tmp_path / "never.jsonl"
    p = emu_cli("stress", *args, "--out", str(out), timeout=60)
    assert p.returncode == 2, p.stderr
    assert f"emu: error: {field}:" in p.stderr, p.stderr
    assert "emu stress:" not in p.stderr and not out.exists()


def test_replay_of_a_trial_of_another_family_is_refused():
    gen = generated(4, [0])[0]
    other = next(f for f in FAST.split(",") if f != gen["family"])
    p = emu_cli("replay", "--seed", "4", "--trial", "0", "--scenario", FAST, "--family", other)
    assert p.returncode == 2 and "emu: error: family:" in p.stderr


# ---------------------------------------------------------------------------------------
# the long campaign
# ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)
def test_a_long_campaign_of_the_seed_handler_over_every_family_with_chaos():
    import emu
    chaos = 0.05 if "chaos" in CAPS else 0.0
    # Every family, weighted towards the cheap owner races so that 10^5 trials fit the
    # slow suite's budget on 2 cores: a reset costs a boot, a hang the 0.25 s watchdog
    # (measured with owner_race at 60: 851 s, 118 trials/s, 0 violations).
    mix = ("owner_race:120,multi:3,memory:3,ucna:3,ripv:3,lmce:2,nested:1,pool_pressure:1,"
           "fatal:1") + (",no_bank:1" if "raise_cpu" in CAPS else "")
    s = emu.stress(100_000, seed=2026, scenario=mix, chaos=chaos, jobs=2, watchdog_s=0.25)
    assert s["trials"] == 100_000
    assert s["violations"] == 0, s["findings"].get("violation")
    assert set(s["coverage"]["families"]) >= set(S.F.FAMILIES)
    if chaos:
        assert s["perturbations"] > 0


def test_bench_stress_smoke():
    """bench/stress.py runs (tiny sizes only) and its first key is trials_per_s."""
    p = subprocess.run([sys.executable, "bench/stress.py", "--cpus", "4", "--trials", "3",
                        "--variants", "plain", "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.splitlines()[0])
    assert next(iter(r)) == "trials_per_s" and r["trials_per_s"] > 0
    assert {"coordinator", "cpus", "dom0", "front", "front_model"} <= set(r["cpu_us_per_trial"])
    assert r["violations"] == 0


def test_replay_lists_who_owned_each_error_and_calls_a_split_hazard_i():
    from emu.campaign.replay import replay
    o = S.Options(seed=1, scenario="owner_race", db=False,
                  machine={"watchdog_s": 0.5}).validate()
    idx = next(i for i in range(50) if generated(1, [i], mix="owner_race")[i]["specs"]
               ["errors"][0].split()[1] in ("bank=4", "bank=5", "bank=6", "bank=7"))
    r = replay(o, 1, idx, "owner_race", repeat=12)
    assert r["reproduced"] == 0 and r["family"] == "owner_race"
    assert set(r["attribution"]) >= {0}
    assert all(len(x) == 1 for x in r["attribution"][0])       # one owner each time
    if len(r["attribution"][0]) > 1:                           # a race: owners differ
        assert r["findings"]["hazard I"] == 1 and 0 in r["hazard_i"]
    else:
        assert "hazard I" not in r["findings"]
