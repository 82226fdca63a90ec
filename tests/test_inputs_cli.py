"""The inputs people already write, through the CLI: mce-inject files (``emu inject``,
``emu run --inject``), xen-mceinj's options, Xen's mce-test cases by name; and
``emu log`` over every log a run writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import load_vectors

from emu.formats import mce_inject


def emu(*args, timeout=90, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "emu", *args], capture_output=True, text=True,
                          timeout=timeout, input=input, env=env)


TWO = """\
# an SRAO memory-scrub error on a free page, broadcast (mce-inject's default for UC)
CPU 0 BANK 8
STATUS VAL UC EN S 0x4000CF
MCGSTATUS RIPV MCIP
ADDR 0x180020
MISC 0x86

# an LMCE on CPU 1: NOBROADCAST with LMCES
CPU 1 BANK 2 STATUS 0xBD000000004000CF MCGSTATUS RIPV MCIP LMCES
ADDR 0x183000 MISC 0x86 NOBROADCAST
"""


def test_inject_file_runs_each_injection_one_json_object_each(tmp_path):
    f = tmp_path / "two.txt"
    f.write_text(TWO)
    p = emu("inject", str(f), "--json", "--log-dir", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    objs = [json.loads(x) for x in p.stdout.splitlines()]
    assert len(objs) == 2
    assert [o["injection"]["source"] for o in objs] == [f"{f}:2", f"{f}:9"]
    assert objs[0]["targets"] == [0, 1, 2, 3] and objs[0]["outcome"] == "recovered"
    assert objs[0]["errors"][0]["status"] == "0xBD000000004000CF"
    assert objs[1]["local"] is True and objs[1]["targets"] == [1]
    assert objs[1]["errors"][0]["addr"] == "0x0000000000183000"


def test_run_inject_from_stdin_text(tmp_path):
    p = emu("run", "--inject", "-", "--log-dir", str(tmp_path / "run"), input=TWO)
    assert p.returncode == 0, p.stderr
    assert "injection 1 (<stdin>:2, #MC broadcast):" in p.stdout
    assert "injection 2 (<stdin>:9, LMCE):" in p.stdout
    assert p.stdout.count("outcome: recovered") == 2


def test_inject_dump_round_trips_the_grammar_examples(tmp_path):
    from test_formats import EXAMPLES, _text
    assert EXAMPLES
    for k, example in enumerate(EXAMPLES):
        text = "".join(_text(rec, "compact") for rec in example["records"])
        recs = mce_inject.parse(text)
        f = tmp_path / f"ex{k}.txt"
        f.write_text(text)
        p = emu("inject", "--dump", str(f))
        assert p.returncode == 0, p.stderr
        assert p.stdout == mce_inject.dump(recs)
        assert mce_inject.parse(p.stdout) == recs


@pytest.mark.parametrize("text, line, word", [
    ("CPU 0 BANK 1\nSTATUS VAL UC\nFROB 3\n", 3, "FROB"),
    ("CPU 0 BANK 1\nSTATUS 08\n", 2, "STATUS"),
    ("CPU 0\nBANK 12 STATUS VAL UC EN\n", 2, "BANK"),
    ("BANK 1\nSTATUS VAL UC\n", 1, "BANK"),
    ("CPU 0 BANK 1 STATUS VAL UC EN\nIN_IRQ\n", 2, "IN_IRQ"),
])
def test_bad_lines_exit_2_naming_file_line_and_keyword(tmp_path, text, line, word):
    f = tmp_path / "bad.txt"
    f.write_text(text)
    for args in (["inject", str(f)], ["run", "--inject", str(f)], ["inject", "--dump", str(f)]):
        p = emu(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert f"{f}:{line}" in p.stderr and word in p.stderr, p.stderr
        assert p.stdout == ""


def test_inject_refuses_what_emu_cannot_run_before_booting(tmp_path):
    f = tmp_path / "poll.txt"
    f.write_text("CPU 0 BANK 1 STATUS SRAO 0xCF ADDR 0x180000 POLL\n")   # SRAO: a #MC error
    p = emu("inject", str(f), "--log-dir", str(tmp_path / "run"))
    assert p.returncode == 2 and f"{f}:1" in p.stderr and "poll" in p.stderr
    assert not (tmp_path / "run").exists()      # nothing booted
    f.write_text("CPU 0 BANK 1 STATUS UNCORRECTED 0xCF NOBROADCAST\n")  # #MC on one CPU
    p = emu("inject", str(f), "--log-dir", str(tmp_path / "run"))
    assert p.returncode == 2 and f"{f}:1" in p.stderr and "NOBROADCAST" in p.stderr
    assert not (tmp_path / "run").exists()


def test_inject_a_corrected_record_goes_to_the_poller(tmp_path):
    f = tmp_path / "ce.txt"
    f.write_text("CPU 1 BANK 2\nSTATUS CORRECTED 0x17A\nADDR 0x181000\n")   # no UC: POLL
    p = emu("inject", str(f), "--json", "--log-dir", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["injection"]["specs"][0].endswith("via=poll")
    e = r["errors"][0]
    # faithful to Xen since 3e15c37e68: a bank CMCI owns is not polled, so the error
    # stays in its bank (one corrected error is below the CMCI threshold, 2)
    assert e["class"] == "corrected" and e["dom0_log"] == [] and not e["cleared"]
    assert "no CPU polls this bank" in e["terminal"]


def test_run_inject_and_error_together_is_a_usage_error(tmp_path):
    p = emu("run", "--inject", "-", "--error", "cpu=0 bank=1 status=0x8000000000000000",
            input=TWO)
    assert p.returncode == 2 and "inject" in p.stderr


# --- xen-mceinj -------------------------------------------------------------------------
def test_xen_mceinj_dump_translates_a_guest_address_as_the_injection_does(tmp_path):
    p = emu("xen-mceinj", "-t", "1", "-d", "1", "-p", "0x180020", "-D")
    assert p.returncode == 0, p.stderr
    assert "get gaddr of error inject is: 0x180020" in p.stdout
    line = [x for x in p.stdout.splitlines() if x.startswith("Dom1: gaddr=")][0]
    maddr = int(line.split("maddr=")[1].split()[0], 16)
    q = emu("xen-mceinj", "-t", "1", "-d", "1", "-p", "0x180020", "--json",
            "--log-dir", str(tmp_path / "run"))
    assert q.returncode == 0, q.stderr
    r = json.loads(q.stdout)
    assert int(r["errors"][0]["addr"], 16) == maddr != 0x180020
    assert r["errors"][0]["bank"] == 8 and r["errors"][0]["vmce"]["domain"] == 1
    assert r["outcome"] == r["xen_mceinj"]["expected_outcome"] == "recovered"
    d = emu("xen-mceinj", "-t", "1", "-d", "1", "-p", "0x180020", "-D", "--json")
    assert json.loads(d.stdout)["maddr"] == f"0x{maddr:016X}"


@pytest.mark.parametrize("numbering, bank", [("current", 7), ("2010", 8)])
def test_xen_mceinj_type_0_in_both_numberings(tmp_path, numbering, bank):
    p = emu("xen-mceinj", "-t", "0", "-c", "1", "--numbering", numbering, "--json",
            "--log-dir", str(tmp_path / "run"))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert r["errors"][0]["bank"] == bank and r["errors"][0]["cpu"] == 1
    assert r["outcome"] == "recovered"      # 0x180020 is a free machine page: offlined


def test_xen_mceinj_cmci_type_takes_xens_cmci_path(tmp_path):
    p = emu("xen-mceinj", "-t", "2", "-d", "1", "--json", "--log-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    e = r["errors"][0]
    assert (e["bank"], e["class"], e["cleared"], e["action"]) == (9, "ucna", True, None)
    assert [(d["source"], d["count"]) for d in e["dom0_log"]] == [("cmci", 1)]
    assert r["xen_mceinj"]["spec"].endswith("domain=1 via=cmci")


def test_xen_mceinj_bad_options_exit_2():
    p = emu("xen-mceinj", "-t", "2", "-l")
    assert p.returncode == 2 and "-l" in p.stderr and "CMCI" in p.stderr
    p = emu("xen-mceinj", "-t", "0", "-c", "9")
    assert p.returncode == 2 and "-c" in p.stderr
    p = emu("xen-mceinj", "-l", "--numbering", "2010")
    assert p.returncode == 2 and "-l" in p.stderr
    h = emu("xen-mceinj", "-h")
    assert h.returncode == 0 and "Usage: xen-mceinj" in h.stdout


# --- mce-test cases ---------------------------------------------------------------------
def test_case_list_names_every_case():
    p = emu("case", "list")
    assert p.returncode == 0
    for c in ("srao_mem", "srao_llc", "ucna_llc"):
        for t in ("dom0", "guest", "xen"):
            assert f"{c}/{t}" in p.stdout
    assert "guest_verify" in p.stdout


def test_case_run_all_passes_every_case_emu_models(tmp_path):
    p = emu("case", "run", "all", timeout=180, env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    for c in ("srao_mem", "srao_llc"):
        for t in ("dom0", "guest", "xen"):
            assert f"{c}/{t}: PASSED" in lines
    for t in ("dom0", "guest", "xen"):
        assert f"ucna_llc/{t}: PASSED" in lines       # Xen's CMCI path
    assert "9 passed, 0 failed, 0 skipped" in lines
    assert p.stdout.count("xen_behaviour: PASS") == 9


def test_case_against_the_current_table_fails_as_on_current_xen(tmp_path):
    p = emu("case", "run", "srao_mem/dom0", "--numbering", "current", "--json",
            "--log-dir", str(tmp_path / "run"))
    assert p.returncode == 1, p.stderr
    r = json.loads(p.stdout)
    assert r["schema"] == "emu.case/1" and r["verdict"] == "FAILED"
    checks = {c["check"]: c["passed"] for c in r["checks"]}
    # the payload is still an SRAO Xen recovers; only the mcelog string is the other's
    assert checks == {"xen_verify": True, "mcelog_verify": False, "xen_behaviour": True}


def test_case_unknown_name_exits_2():
    p = emu("case", "run", "srao_cpu/dom0")
    assert p.returncode == 2 and "srao_cpu/dom0" in p.stderr


# --- emu log ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guest_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("guestrun")
    p = emu("run", "--log-dir", str(d), "--json", "--error",
            "cpu=1 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5 domain=1")
    assert p.returncode == 0, p.stderr
    return d, json.loads(p.stdout)


def test_log_of_a_run_directory_renders_every_log(guest_run):
    d, r = guest_run
    p = emu("log", str(d))
    assert p.returncode == 0, p.stderr
    out = p.stdout
    owner = r["errors"][0]["owners"][0]
    assert f"logged by CPU {owner}; trial 1: #MC taken by CPUs 0-3 (broadcast), error " \
           "raised on CPU 1 bank 8 (a bank shared by CPUs 0-3" in out
    assert f"CPU {owner} BANK 8" in out                      # mcelog's own text
    assert "MCA: MEMORY CONTROLLER MS_CHANNELunspecified_ERR" in out
    assert "==> Dom0's kernel log:" in out
    assert "[dom1 vCPU0 " in out and "kernel page recovery: Recovered" in out


def test_log_raw_prints_the_records_as_stored(guest_run):
    d, _ = guest_run
    p = emu("log", "--raw", str(d / "dom0.jsonl"))
    assert p.returncode == 0
    assert p.stdout == (d / "dom0.jsonl").read_text()
    p = emu("log", "--raw", str(d))
    assert f"==> {d / 'dom1.guest.jsonl'} <==" in p.stdout


def test_log_refuses_what_is_no_log(tmp_path):
    (tmp_path / "dom0.jsonl").write_text('{"schema":"emu.mcelog/1","id":1}\nnot json\n')
    p = emu("log", str(tmp_path / "dom0.jsonl"))
    assert p.returncode == 2 and "line 2" in p.stderr
    p = emu("log", "/dev/null")
    assert p.returncode == 2 and "regular" in p.stderr
    p = emu("log", str(tmp_path / "nothing"))
    assert p.returncode == 2


def test_log_follow_prints_what_is_appended(guest_run, tmp_path):
    d, _ = guest_run
    src = (d / "dom0.jsonl").read_text()
    f = tmp_path / "dom0.jsonl"
    f.write_text("")
    proc = subprocess.Popen([sys.executable, "-m", "emu", "log", "--follow", str(f)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with open(f, "a") as w:
            w.write(src)
        line = proc.stdout.readline()       # blocks until the follower prints
        assert line.startswith("emu: record 0x100000001")
        assert proc.stdout.readline().startswith("Hardware event.")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_log_mcelog_ascii_decodes_as_mcelog_does(tmp_path):
    ex = next(e for e in load_vectors("mcelog_output.json")["examples"]
              if e["id"] == "input/simple1")
    f = tmp_path / "in.txt"
    f.write_text("\n".join(ex["input_lines"]) + "\n")
    p = emu("log", "--mcelog-ascii", str(f))
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ex["output_lines"]


def test_version():
    import emu as pkg
    p = emu("--version")
    assert p.returncode == 0 and p.stdout.strip() == f"emu {pkg.__version__}"


def test_follow_stops_on_request(tmp_path):
    from io import StringIO

    from emu.domains.logview import follow
    f = tmp_path / "dom1.guest.jsonl"
    f.write_text(json.dumps({"schema": "emu.guestlog/1", "domid": 1, "vcpu": 0, "t": time.time(),
                             "console": ["hello"]}) + "\n")
    out = StringIO()
    assert follow(str(f), out=out, poll_s=0, stop=lambda: True) == 0
    assert "] hello" in out.getvalue()


def test_log_json_of_a_directory_is_json_lines_only(guest_run):
    d, _ = guest_run
    p = emu("log", "--json", str(d))
    assert p.returncode == 0, p.stderr
    objs = [json.loads(x) for x in p.stdout.splitlines()]
    assert {o["schema"] for o in objs} == {"emu.mcelog/1", "emu.guestlog/1"}


def test_log_names_the_cpus_a_cmci_reached_and_the_owner_that_logged(tmp_path):
    p = emu("run", "--json", "--log-dir", str(tmp_path), "--error",
            "cpu=1 bank=9 status=0xBC20000080000136 addr=0x180040 misc=0x86 mcg=0 via=cmci")
    assert p.returncode == 0, p.stderr
    e = json.loads(p.stdout)["errors"][0]
    out = emu("log", str(tmp_path / "dom0.jsonl")).stdout
    assert f"bank 9 logged by CPU {e['cmci_owner']}; trial 1: CMCI taken by CPUs 0-3, " \
           "error reported on CPU 1 bank 9 (the bank's CMCI owner logs it)" in out
