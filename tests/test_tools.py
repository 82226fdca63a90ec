"""The diagnostic tools in tools/ still run (they are not imported by emu)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def run(*args):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def test_coldstart_reports_three_medians():
    p = run(TOOLS / "coldstart.py", "--rounds", "5", "--sleep-ms", "0.1")
    assert p.returncode == 0, p.stderr
    assert len(re.findall(r"\d+\.\d µs", p.stdout)) == 3


def test_ab_latency_reports_each_variant():
    p = run(TOOLS / "ab_latency.py", "--injections", "3", "a={}", 'b={"pin_cpus": false}')
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [ln.split()[1] for ln in lines] == ["a", "b"] and all("(n=3)" in ln for ln in lines)


def test_ab_code_compares_two_trees(tmp_path):
    tree = TOOLS.parent
    p = run(TOOLS / "ab_code.py", f"a={tree}", f"b={tree}", "--rounds", "2", "--block", "4",
            "--warmup", "1")
    assert p.returncode == 0, p.stderr
    assert re.search(r"handler_exit +paired p50 ratio b/a: \d+\.\d{3} \(95 % ", p.stdout), p.stdout
    assert re.search(r"handler_exit +b +p50 +\d+\.\d µs .*\(n=6\)", p.stdout), p.stdout
    bad = run(TOOLS / "ab_code.py", f"a={tmp_path}", f"b={tree}")
    assert bad.returncode == 2 and "no emu/" in bad.stderr
