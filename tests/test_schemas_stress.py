"""The stress schemas under emu/schemas validate real outputs of tiny campaigns run
through the CLI: every ``emu.stress.trial/1`` line of ``--out``, the
``emu.stress.summary/1`` that ``--json`` prints (and ``emu merge``'s), the
``emu.stress.failure/1`` lines of a failure database (a trial made to violate an
invariant by the ``--test-violate`` hook, then replayed first by the next campaign)
and what ``emu replay --seed S --trial I --json`` prints; and broken objects are
rejected, naming the path."""
from __future__ import annotations

import configparser
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emu import schemas

pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
MIX = "owner_race,memory,ripv,fatal"
STRESS = ("emu.stress.trial/1", "emu.stress.summary/1", "emu.stress.failure/1",
          "emu.stress.replay/1")


def emu(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "emu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def validate_all(objs) -> None:
    for k, o in enumerate(objs):
        try:
            schemas.validate(o)
        except schemas.SchemaMismatch as exc:
            raise AssertionError(f"object {k} ({o.get('schema')}): {exc}") from None


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """``emu stress --seed 3 --trials 20 --scenario MIX --out F --json``."""
    out = tmp_path_factory.mktemp("campaign") / "out.jsonl"
    p = emu("stress", "--seed", "3", "--trials", "20", "--scenario", MIX, "--out", str(out),
            "--json", "--no-db")
    assert p.returncode == 0, p.stderr
    return out, json.loads(p.stdout)


@pytest.fixture(scope="module")
def violation(tmp_path_factory):
    """Trial 2 of seed 5 violates on purpose (the test hook); its failure database line;
    and a second campaign on that database, which replays it first."""
    d = tmp_path_factory.mktemp("violation")
    db, out1, out2 = d / "db.jsonl", d / "out1.jsonl", d / "out2.jsonl"
    common = ("stress", "--seed", "5", "--scenario", MIX, "--test-violate", "5:2",
              "--db", str(db), "--json")
    p1 = emu(*common, "--trials", "4", "--out", str(out1))
    assert p1.returncode == 1, p1.stderr
    p2 = emu(*common, "--trials", "1", "--out", str(out2))
    assert p2.returncode == 1, p2.stderr
    return db, out1, out2, json.loads(p1.stdout), json.loads(p2.stdout)


def test_the_stress_schemas_are_installed_with_the_package():
    assert set(STRESS) <= set(schemas.names())
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    globs = cfg["options.package_data"]["emu.schemas"].split()
    for n in STRESS:
        doc = schemas.load(n)
        assert doc["$schema"].endswith("2020-12/schema")
        assert doc["$id"].endswith(schemas.file_name(n)) and doc["properties"]["schema"] == {
            "const": n}
        assert any(fnmatch.fnmatch(schemas.file_name(n), g) for g in globs), globs


def test_every_line_of_a_campaign_and_its_summary_validate(campaign):
    out, summary = campaign
    objs = lines(out)
    validate_all(objs)
    trials = [o for o in objs if o["schema"] == "emu.stress.trial/1"]
    assert len(trials) == 20 and objs[-1]["schema"] == "emu.stress.summary/1"
    assert {t["family"] for t in trials} <= set(MIX.split(",")) and any(
        t["findings"] for t in trials)
    schemas.validate(summary)
    assert summary["trials"] == 20 and summary == objs[-1]
    assert summary["coverage"]["rendezvous"] and summary["findings"]


def test_a_merged_summary_validates(campaign, tmp_path):
    out, summary = campaign
    p = emu("merge", str(out), "--json")
    assert p.returncode in (0, 1), p.stderr
    merged = json.loads(p.stdout)
    schemas.validate(merged)
    assert merged["trials"] == 20 and merged["outcomes"] == summary["outcomes"]


def test_a_campaign_with_chaos_starvation_and_faults_validates(tmp_path):
    out = tmp_path / "out.jsonl"
    p = emu("stress", "--seed", "4", "--trials", "4", "--scenario", "memory,ripv",
            "--chaos", "0.3", "--starve", "0.5", "--faults", "kill_dom0,pause_dom0",
            "--fault-rate", "0.9", "--out", str(out), "--json", "--no-db")
    assert p.returncode in (0, 1), p.stderr
    objs = lines(out)
    validate_all(objs)
    schemas.validate(json.loads(p.stdout))
    trials = objs[:-1]
    assert any(t["fault"] and "happened" in t["fault"] for t in trials), trials
    assert any(sum(t["perturbation"]["counts"].values()) for t in trials)


def test_failure_database_lines_and_a_campaign_replaying_them_validate(violation):
    db, out1, out2, s1, s2 = violation
    entries = lines(db)
    assert [(e["seed"], e["trial"]) for e in entries] == [(5, 2)]
    validate_all(entries)
    assert entries[0]["finding"]["kind"] == "violation"
    validate_all(lines(out1) + [s1, s2])
    second = lines(out2)
    validate_all(second)
    assert second[0].get("from_db") is True and second[0]["trial"] == 2
    assert s2["replayed_from_db"] == 1 and s2["violations"] >= 1


def test_what_emu_replay_json_prints_validates(violation):
    _db, out1, *_ = violation
    p = emu("replay", "--seed", "5", "--trial", "2", "--scenario", MIX, "--test-violate",
            "5:2", "--json", "--repeat", "2")
    assert p.returncode == 1, p.stderr
    r = json.loads(p.stdout)
    schemas.validate(r)
    assert r["repeat"] == 2 and r["reproduced"] == 2 and r["findings"]["violation"] == 2
    # with its records (the Python result's field): the trial schema through its $ref
    rec = next(o for o in lines(out1) if o.get("trial") == 2 and "family" in o)
    schemas.validate(dict(r, records=[rec, rec]))


def test_broken_stress_objects_are_rejected_naming_the_path(campaign, violation):
    out, summary = campaign
    trial = lines(out)[0]
    entry = lines(violation[0])[0]

    def broken(obj, change, where):
        o = json.loads(json.dumps(obj))
        change(o)
        with pytest.raises(schemas.SchemaMismatch, match=where):
            schemas.validate(o)

    # counts and indices are integers: not hex strings, not booleans, not fractions
    broken(trial, lambda o: o.__setitem__("trial", "0x0"), r"at \.trial:")
    broken(trial, lambda o: o["owners"][0].__setitem__("cpu", hex(o["owners"][0]["cpu"])),
           r"at \.owners\[0\]\.cpu")
    broken(summary, lambda o: o.__setitem__("violations", True), r"at \.violations")
    broken(summary, lambda o: o["outcomes"].__setitem__("reset", 1.5), r"at \.outcomes\.reset")
    # kinds are the known ones; required fields are there
    broken(entry, lambda o: o["finding"].__setitem__("kind", "oops"), r"at \.finding\.kind")
    broken(entry, lambda o: o.pop("replay"), "'replay' is a required property")
    broken(trial, lambda o: o.__setitem__("outcome", "exploded"), r"at \.outcome")


def test_the_other_families_trial_lines_validate(tmp_path):
    # second waves (nested), prefills (pool_pressure), LMCEs and #MCs with no bank
    out = tmp_path / "out.jsonl"
    fams = ("lmce", "nested", "pool_pressure", "no_bank")
    p = emu("stress", "--seed", "9", "--trials", "10", "--scenario", ",".join(fams),
            "--out", str(out), "--json", "--no-db")
    assert p.returncode in (0, 1), p.stderr
    objs = lines(out)
    validate_all(objs)
    trials = objs[:-1]
    assert any(t["specs"]["then"] for t in trials) and any(t["specs"]["prefill"]
                                                          for t in trials)
    assert {t["family"] for t in trials} <= set(fams)
