"""The JSON Schema documents under emu/schemas validate real outputs: trials printed by
``emu run --json`` (a recovery, a reset with a lost record, a guest vMCE, a vMCE to
Dom0), the logs of those runs (Dom0's records, its kernel log, a guest's log, the trial
notes), ``emu case run --json`` and ``xen-mceinj -D --json``; and one number encoding
holds across them (hex strings for register values, integers for counts)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from emu import schemas

pytest.importorskip("jsonschema")

RUNS = {
    "srao": "cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5",
    "reset_lost": "cpu=0 bank=1 status=0xBD8000000000009F addr=0x185000 misc=0x86 mcg=0x7",
    "guest": "cpu=1 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5 domain=1",
    "dom0": "cpu=0 bank=8 status=0xBD000000004000CF addr=0x181020 misc=0x86 mcg=0x5 domain=0",
    "fatal": "cpu=0 bank=5 status=0xB200000000000000 mcg=0x5",
    "cmci": "cpu=1 bank=9 status=0xBC20000080000136 addr=0x180040 misc=0x86 mcg=0 via=cmci",
    "poll": "cpu=0 bank=6 status=0x9400000000000151 addr=0x180040 misc=0x86 via=poll",
}
REGISTER_KEYS = {"status", "addr", "misc", "mcg_status", "bank_status", "mc_gstatus", "mcgcap",
                 "mcg_cap", "gaddr", "maddr", "ctl2", "value"}
COUNT_KEYS = {"cpu", "bank", "trial", "resets", "domid", "vcpu", "id", "record_id", "free",
              "drops", "count", "mfn", "seq", "boot", "restarts", "refused"}


def emu(*args):
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True,
                          timeout=90)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, spec in RUNS.items():
        d = tmp_path_factory.mktemp(name)
        p = emu("run", "--json", "--log-dir", str(d), "--error", spec)
        assert p.returncode == 0, p.stderr
        out[name] = (d, json.loads(p.stdout))
    return out


def _walk(obj, path=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(v, f"{path}.{k}")
            yield path, k, v
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, f"{path}[{i}]")


def _one_encoding(obj) -> None:
    for path, k, v in _walk(obj):
        if path.startswith(".recovery["):   # Xen's raw flag words, integers (the rule)
            continue
        if k in REGISTER_KEYS and v is not None and not isinstance(v, (dict, list)):
            assert isinstance(v, str) and v.startswith("0x") and len(v) == 18, (path, k, v)
        if k in COUNT_KEYS and v is not None and not isinstance(v, (dict, list)):
            assert isinstance(v, int) and not isinstance(v, bool), (path, k, v)


def test_the_schemas_are_installed_and_load():
    assert {"emu.trial/1", "emu.mcelog/1", "emu.guestlog/1", "emu.trialnote/1",
            "emu.case/1", "emu.xen-mceinj-dump/1"} <= set(schemas.names())
    for n in schemas.names():
        doc = schemas.load(n)
        assert doc["$schema"].endswith("2020-12/schema") and doc["$id"].endswith(
            schemas.file_name(n))


def test_real_trials_validate(runs):
    assert runs["reset_lost"][1]["resets"] == 1 and runs["reset_lost"][1]["lost_at_reset"]
    assert runs["guest"][1]["errors"][0]["vmce"]["guest_handled"] is True
    assert runs["fatal"][1]["boot_log"]
    assert [d["source"] for d in runs["cmci"][1]["errors"][0]["dom0_log"]] == ["cmci"]
    for _, r in runs.values():
        schemas.validate(r)
        _one_encoding(r)


def test_real_log_lines_validate(runs):
    seen = set()
    for d, _ in runs.values():
        for f in sorted(d.iterdir()):
            if f.name.startswith(".") or f.suffix == ".idx":
                continue
            for line in f.read_text().splitlines():
                obj = json.loads(line)
                schemas.validate(obj)
                _one_encoding(obj)
                seen.add((f.name, obj["schema"]))
    assert ("dom0.jsonl", "emu.mcelog/1") in seen
    assert ("dom0.jsonl.kernel", "emu.guestlog/1") in seen       # the vMCE to Dom0
    assert ("dom1.guest.jsonl", "emu.guestlog/1") in seen
    assert ("trials.jsonl", "emu.trialnote/1") in seen


def test_a_probe_in_a_guest_log_validates(emu_machine):
    m = emu_machine(guests=1)
    m.guest_probe(1, "rdmsr", vcpu=0, msr=0x179)          # IA32_MCG_CAP
    path = [d for d in m.domains() if d["domid"] == 1][0]["log"]
    m.close()
    with open(path) as f:
        (line,) = [json.loads(x) for x in f]
    schemas.validate(line)
    _one_encoding(line)
    assert line["probe"]["value"].startswith("0x") and line["probe"]["probe"]["msr"] == 0x179


def test_case_and_dump_outputs_validate(tmp_path):
    p = emu("case", "run", "srao_mem/guest", "ucna_llc/xen", "--json", "--log-dir",
            str(tmp_path))
    assert p.returncode == 0, p.stderr
    objs = [json.loads(x) for x in p.stdout.splitlines()]
    assert [o["verdict"] for o in objs][0] == "PASSED"
    for o in objs:
        schemas.validate(o)
    p = emu("xen-mceinj", "-D", "-d", "1", "-p", "0x1000", "--json")
    schemas.validate(json.loads(p.stdout))


def test_a_mismatch_names_its_path(runs):
    r = json.loads(json.dumps(runs["srao"][1]))
    r["errors"][0]["status"] = int(r["errors"][0]["status"], 16)
    with pytest.raises(schemas.SchemaMismatch, match=r"at \.errors\[0\]\.status"):
        schemas.validate(r)


def test_a_tiny_bench_result_validates(tmp_path):
    # smoke size only: the schema, not the figures
    out = tmp_path / "b.jsonl"
    p = emu("bench", "--cpus", "4", "--injections", "2", "--boots", "1", "--instances", "1",
            "--warmup", "0", "--no-stress", "--no-naive", "--guest-every", "0", "--json",
            "--out", str(out))
    assert p.returncode == 0, p.stderr
    objs = [json.loads(x) for x in p.stdout.splitlines()]
    assert objs and all(o["schema"] == "emu.bench/1" for o in objs)
    for o in objs:
        schemas.validate(o)
