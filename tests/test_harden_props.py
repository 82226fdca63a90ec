"""Property-based (Hypothesis): whatever ``--error`` strings, machine options and
``emu log`` lines are given, emu answers with success or exit 2 (a finding, exit 1,
is a legitimate answer of a run) -- never a traceback, exit 3, a hang or a leak.

The default runs keep few examples (a few seconds; a valid machine boots); the
``slow`` variants run many more.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from emu.pytest_plugin import wait_no_children

FAST = settings(max_examples=12, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
MANY = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))

# -- strategies --------------------------------------------------------------------------
_NUM_TEXT = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.integers(min_value=0, max_value=1 << 70).map(hex),
    st.sampled_from(["", "0x", "0x-1", "1e3", "nan", "inf", "-0", "+5", "1_0", "٠", "٤",
                     "１", "0xBD000000004000CF", "9" * 5000, "True", "None", "0b1",
                     "18446744073709551616", "18446744073709551615", "-1"]),
    st.text(max_size=8),
)
_KEY = st.one_of(st.sampled_from(["cpu", "bank", "status", "addr", "misc", "mcg", "domain"]),
                 st.text(max_size=5))


@st.composite
def error_strings(draw):
    if draw(st.booleans()):   # near-valid: the required keys, values varied
        parts = [f"cpu={draw(st.sampled_from(['0', '1', '3', '4', draw(_NUM_TEXT)]))}",
                 f"bank={draw(st.sampled_from(['1', '8', '9', '10', draw(_NUM_TEXT)]))}",
                 "status=" + draw(st.sampled_from(["0xBD000000004000CF", "0x9C000000000000CF",
                                                   "0x1000000000000000", draw(_NUM_TEXT)]))]
        extra = draw(st.lists(st.tuples(_KEY, _NUM_TEXT), max_size=3))
        parts += [f"{k}={v}" for k, v in extra]
        return " ".join(draw(st.permutations(parts)))
    return draw(st.one_of(
        st.text(max_size=40),
        st.lists(st.tuples(_KEY, _NUM_TEXT), max_size=5).map(
            lambda kv: " ".join(f"{k}={v}" for k, v in kv))))


_OPTIONS = {
    "--topology": st.one_of(st.sampled_from(["1x1x1", "1x2x1", "1x2x2", "0x1x1", "1x1",
                                             "2x2x2x2", "9999x9999x9999", "１x2x2"]),
                            st.text(max_size=8)),
    "--banks": st.one_of(st.sampled_from(["1", "4", "10", "33", "0", "-1"]), _NUM_TEXT),
    "--bank-scopes": st.one_of(st.sampled_from(["0-3:core", "0-9:thread", "5-2:core",
                                                "0-40:package", "x"]), st.text(max_size=8)),
    "--seed": _NUM_TEXT,
    "--chaos": st.one_of(st.sampled_from(["0", "0.5", "1", "1.5", "-0.1"]), _NUM_TEXT),
    "--watchdog": st.one_of(st.sampled_from(["0.5", "2", "0", "4000"]), _NUM_TEXT),
    "--guests": st.one_of(st.sampled_from(["0", "1", "2", "7", "8"]), _NUM_TEXT),
    "--memory-pages": st.one_of(st.sampled_from(["1024", "4608", "8704", "16384",
                                                 "4194305"]), _NUM_TEXT),
    "--guest-vcpus": st.one_of(st.sampled_from(["1", "2", "0", "99"]), _NUM_TEXT),
    "--idle-poll-us": st.one_of(st.sampled_from(["0", "1000", "100001"]), _NUM_TEXT),
    "--vmce-policy": st.one_of(st.sampled_from(["owner", "dom0", "x"]), st.text(max_size=5)),
    "--handler": st.one_of(st.sampled_from(["seed", "nope"]), st.text(max_size=5)),
}


@st.composite
def machine_argv(draw):
    names = draw(st.lists(st.sampled_from(sorted(_OPTIONS)), max_size=4, unique=True))
    argv = []
    for n in names:
        v = draw(_OPTIONS[n])
        if v.startswith("-") or "\0" in v:
            v = " " + v.replace("\0", "")   # argparse would read it as an option
        argv += [n, v]
    return argv


def _main(argv) -> tuple[int, str, str]:
    from emu.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _check_run(argv) -> None:
    with tempfile.TemporaryDirectory() as d:
        code, out, err = _main(["run", "--json", "--log-dir", os.path.join(d, "run"), *argv])
        assert code in (0, 1, 2), (argv, code, err)
        assert "Traceback" not in err, (argv, err)
        if code == 2:
            assert out == "" and err.startswith("emu: error: "), (argv, out, err)
        else:
            assert json.loads(out)["schema"] == "emu.trial/1"
        assert wait_no_children(5.0) == [], argv


# -- the properties -----------------------------------------------------------------------
def _run_property(errors, argv):
    args = list(argv)
    for e in errors:
        if "\0" in e:
            e = e.replace("\0", "")
        args += ["--error", e if not e.startswith("-") else " " + e]
    _check_run(args)


@FAST
@given(errors=st.lists(error_strings(), min_size=1, max_size=3), argv=machine_argv())
def test_run_never_crashes_on_any_errors_and_options(errors, argv):
    _run_property(errors, argv)


@pytest.mark.slow
@MANY
@given(errors=st.lists(error_strings(), min_size=1, max_size=3), argv=machine_argv())
def test_run_never_crashes_many(errors, argv):
    _run_property(errors, argv)


_JSON = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                               st.text(max_size=10)),
                     lambda kids: st.one_of(st.lists(kids, max_size=4),
                                            st.dictionaries(st.text(max_size=6), kids,
                                                            max_size=4)),
                     max_leaves=20)
_FIELDS = st.dictionaries(
    st.sampled_from(["cpu", "banks", "global", "cpuid", "cpuvendor", "id", "schema", "who"]),
    st.one_of(_JSON, st.lists(st.dictionaries(
        st.sampled_from(["bank", "status", "addr", "misc"]),
        st.one_of(st.integers(min_value=-5, max_value=1 << 66), st.text(max_size=20),
                  st.sampled_from(["0xBD000000004000CF", "0x86"]), _JSON)), max_size=3)),
    max_size=5)


@st.composite
def log_lines(draw):
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=60)).replace(b"\n", b"")
    base = {"schema": "emu.mcelog/1", "id": draw(st.integers(0, 1 << 40)),
            "banks": [{"bank": 8, "status": "0xBD000000004000CF", "addr": "0x180020",
                       "misc": "0x86"}], "global": {"mc_gstatus": "0x5"}, "cpu": 0}
    base.update(draw(_FIELDS))
    return json.dumps(base, allow_nan=True).encode()


def _log_property(lines, torn):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "dom0.jsonl")
        with open(path, "wb") as f:
            f.write(b"".join(x + b"\n" for x in lines) + (b'{"schema":' if torn else b""))
        for extra in ([], ["--json"]):
            code, out, err = _main(["log", *extra, path])
            assert code in (0, 2), (lines, code, err)
            assert "Traceback" not in err
            if code == 2:
                assert "line " in err and err.startswith("emu: error: ")


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(lines=st.lists(log_lines(), max_size=6), torn=st.booleans())
def test_emu_log_never_crashes_on_any_lines(lines, torn):
    _log_property(lines, torn)


@pytest.mark.slow
@settings(max_examples=800, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(lines=st.lists(log_lines(), max_size=10), torn=st.booleans())
def test_emu_log_never_crashes_many(lines, torn):
    _log_property(lines, torn)
