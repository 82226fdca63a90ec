"""The pytest plugin as a pytest user meets it (run through ``pytester`` in a
subprocess, with this tree's emu first on the path): options and ini defaults, the
marker, the header line, the failure section with the reproduce line, and xdist
workers with their own seed streams and run directories."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRAO = "cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5"


@pytest.fixture
def tester(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    return pytester


def test_failing_test_shows_the_emu_section_and_the_header(tester):
    tester.makeini("[pytest]\nemu_handler = seed\nemu_seed = 7\n")
    tester.makepyfile(test_one=f'''
import pytest

@pytest.mark.emu(topology="1x1x2", guests=0)
def test_fails(emu_trial):
    r = emu_trial("{SRAO}")
    assert r["outcome"] == "reset", "expected a reset"

def test_marker_and_options(emu_machine):
    m = emu_machine()
    assert (m.config.topology, m.config.chaos, m.config.seed) == ("1x2x2", 0.25, 8)

@pytest.mark.emu(sched="controlled", chaos=0.0, guests=0)
def test_controlled_fails(emu_trial):
    assert emu_trial("{SRAO}")["outcome"] == "hang"
''')
    res = tester.runpytest_subprocess("--emu-chaos", "0.25", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=1, failed=2)
    out = res.stdout.str()
    assert "emu 0.1.0: handler seed, seed 7 (a stream per worker)" in out
    assert "chaos 0.25" in out
    # the failing test's section: the machine, the seed, the trial, the reproduce line
    assert "- emu -" in out
    assert "machine 0: topology 1x1x2, banks 10" in out and "seed 7, chaos 0.25" in out
    assert "seed 7; last trial:" in out
    assert "trial 1: outcome recovered, resets 0, targets [0, 1]" in out
    assert "cpu0 bank8 0xBD000000004000CF srao" in out
    assert (f"reproduce: emu run --topology 1x1x2 --seed 7 --chaos 0.25 --guests 0 "
            f"--error '{SRAO}'") in out
    # under controlled scheduling the schedule token reproduces the trial
    assert "reproduce: emu replay --schedule emu1." in out
    # the passing test has no section
    assert out.count("- emu -") == 2


def test_xdist_workers_have_their_own_seed_streams_and_run_directories(tester, monkeypatch):
    pytest.importorskip("xdist")
    tester.makepyfile(test_many='''
import json, os
import pytest

@pytest.mark.parametrize("k", range(4))
def test_boot(emu_machine, k, tmp_path_factory):
    m = emu_machine(guests=0)
    out = os.environ["EMU_TEST_OUT"]
    with open(os.path.join(out, f"{os.environ.get('PYTEST_XDIST_WORKER')}-{k}.json"), "w") as f:
        json.dump({"seed": m.config.seed, "log_dir": m.config.extra["log_dir"]}, f)
''')
    out = tester.path / "out"
    out.mkdir()
    monkeypatch.setenv("EMU_TEST_OUT", str(out))
    res = tester.runpytest_subprocess("-n", "2", "--emu-seed", "100", "-p", "no:cacheprovider")
    res.assert_outcomes(passed=4)
    got = {}
    for f in out.iterdir():
        got.setdefault(f.name.split("-")[0], []).append(json.loads(f.read_text()))
    assert set(got) == {"gw0", "gw1"}, got          # both workers ran tests
    seeds = {w: sorted(x["seed"] for x in v) for w, v in got.items()}
    assert all(s % 2 == 0 for s in seeds["gw0"]) and all(s % 2 == 1 for s in seeds["gw1"])
    assert min(seeds["gw0"]) == 100 and min(seeds["gw1"]) == 101
    dirs = {w: {str(Path(x["log_dir"]).parent) for x in v} for w, v in got.items()}
    assert len(dirs["gw0"]) == len(dirs["gw1"]) == 1 and dirs["gw0"] != dirs["gw1"]
    assert next(iter(dirs["gw0"])).endswith("emu-runs-gw0")
    all_dirs = [x["log_dir"] for v in got.values() for x in v]
    assert len(set(all_dirs)) == 4


def test_marker_is_registered_and_fixtures_documented(tester):
    res = tester.runpytest_subprocess("--markers")
    assert "@pytest.mark.emu(topology=..., handler=..., chaos=..., seed=..., **config)" \
        in res.stdout.str()
    res = tester.runpytest_subprocess("--fixtures")
    out = res.stdout.str()
    for name, words in (("emu_machine", "A factory of booted machines"),
                        ("emu_trial", "One injection"), ("emu_leak_check", "no emulator")):
        assert name in out and words in out, name
    res = tester.runpytest_subprocess("--help")
    assert "--emu-topology" in res.stdout.str() and "emu_seed" in res.stdout.str()


def test_leak_check_blames_a_new_shm_file_but_not_one_another_process_holds():
    """The /dev/shm check counts what this test left, not what a concurrent run (its
    multiprocessing semaphores, say) holds open or mapped meanwhile."""
    import subprocess
    import sys

    from emu import pytest_plugin as P
    before = P._shm()
    foreign, ours = "/dev/shm/emu-test-foreign-%d" % os.getpid(), \
        "/dev/shm/emu-test-ours-%d" % os.getpid()
    code = ("import mmap, os, sys\n"
            f"fd = os.open({foreign!r}, os.O_CREAT | os.O_RDWR); os.ftruncate(fd, 4096)\n"
            "m = mmap.mmap(fd, 4096); os.close(fd); print('ok', flush=True)\n"
            "sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stdin=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ok"
        open(ours, "w").close()
        assert P._shm_leaked(before, settle_s=0.1) == {os.path.basename(ours)}
    finally:
        p.stdin.close()
        p.wait(timeout=10)
        p.stdout.close()
        for f in (foreign, ours):
            os.unlink(f)
    assert P._shm_leaked(before, settle_s=0.1) == set()
