"""pytest plugin (entry point ``pytest11``): fixtures that boot machines, run trials and
prove nothing leaks, and a report that says how to reproduce a failure.

Options (command line, or the ini key in brackets), the defaults of every machine the
fixtures boot:

- ``--emu-seed N`` (``emu_seed``, default 0): the base of the seed stream;
- ``--emu-handler NAME`` (``emu_handler``, default ``seed``);
- ``--emu-topology SxCxT`` (``emu_topology``, default ``1x2x2``);
- ``--emu-chaos P`` (``emu_chaos``, default 0).

A test can set its own with the marker ``@pytest.mark.emu(topology=..., handler=...,
chaos=..., seed=...)`` (any MachineConfig field); arguments given to the fixtures win
over the marker, the marker over the options.

Seeds: each process running tests (one, or each pytest-xdist worker) has its own
stream: the k-th machine booted by worker w of W gets ``seed + k*W + w`` (without xdist
W=1, w=0: the first machine gets the base seed). Streams of different workers never
share a seed. A seed given explicitly (marker or fixture argument) is used as is.

Run directories: each machine's logs go to a directory of its own under
``<pytest basetemp>/emu-runs-<worker>`` (pytest-xdist gives each worker its own
basetemp, so workers never share one), never under ``$TMPDIR/emu-runs``.

Fixtures:

- ``emu_machine``: a factory; ``m = emu_machine(topology="1x2x2")`` boots a machine,
  shut down after the test.
- ``emu_trial``: one injection: ``r = emu_trial("cpu=0 bank=8 status=0x...")`` boots
  (once per test, per set of machine options) and returns the trial result.
- ``emu_leak_check``: after the test, no emulator process survives and nothing new is
  left in ``/dev/shm``.

Report: the header names emu's version, the handler and the seed; a failing test that
booted a machine gets an ``emu`` section with the machine options, the seed, the last
trial's summary and the line that reproduces that trial: ``emu run ...``, or under
controlled scheduling (``sched="controlled"``) the ``emu replay --schedule TOKEN`` line
of its schedule.
"""
from __future__ import annotations

import os
import shlex
import time

import psutil
import pytest

DEFAULTS = {"seed": 0, "handler": "seed", "topology": "1x2x2", "chaos": 0.0}
_OPTS = {"seed": int, "handler": str, "topology": str, "chaos": float}
_STATE = pytest.StashKey[dict]()
_CLI_FLAGS = (("topology", "--topology", "1x2x2"), ("nbanks", "--banks", 10),
              ("bank_scopes", "--bank-scopes", "0-3:core,4-9:package"),
              ("handler", "--handler", "seed"), ("seed", "--seed", None),
              ("chaos", "--chaos", 0.0), ("watchdog_s", "--watchdog", 2.0),
              ("guests", "--guests", 1), ("memory_pages", "--memory-pages", 16384),
              ("guest_vcpus", "--guest-vcpus", 2), ("vmce_policy", "--vmce-policy", "owner"),
              ("idle_poll_us", "--idle-poll-us", 1000), ("cmci_banks", "--cmci-banks", "all"),
              ("cmci_threshold", "--cmci-threshold", 2), ("poll_period_s", "--poll-period", 0.0))


# --- options, marker, header -------------------------------------------------------------
def pytest_addoption(parser):
    g = parser.getgroup("emu", "emu machines (defaults of the emu_* fixtures)")
    g.addoption("--emu-seed", type=int, default=None,
                help="base of the seed stream of booted machines (ini emu_seed; default 0)")
    g.addoption("--emu-handler", default=None,
                help="handler version of booted machines (ini emu_handler; default seed)")
    g.addoption("--emu-topology", default=None,
                help="SxCxT of booted machines (ini emu_topology; default 1x2x2)")
    g.addoption("--emu-chaos", type=float, default=None,
                help="perturbation probability per yield point (ini emu_chaos; default 0)")
    for name in _OPTS:
        parser.addini(f"emu_{name}", f"default of --emu-{name}", default=None)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "emu(topology=..., handler=..., chaos=..., seed=..., **config): machine "
        "options for the emu_machine/emu_trial fixtures of this test")


def settings(config) -> dict:
    """The session's machine defaults: command line, else ini, else :data:`DEFAULTS`."""
    from emu.errors import UsageError
    out = {}
    for name, conv in _OPTS.items():
        v = config.getoption(f"--emu-{name}")
        if v is None:
            raw = config.getini(f"emu_{name}")
            if raw not in (None, "", []):
                try:
                    v = conv(raw)
                except ValueError:
                    raise UsageError(f"emu_{name}", f"{raw!r} in the ini file is not "
                                     f"a {conv.__name__}") from None
        out[name] = DEFAULTS[name] if v is None else v
    return out


def worker() -> tuple[str, int, int]:
    """(worker id, its index, the worker count): ("master", 0, 1) without xdist."""
    wid = os.environ.get("PYTEST_XDIST_WORKER", "master")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    idx = int(wid[2:]) if wid.startswith("gw") and wid[2:].isdigit() else 0
    return wid, idx, max(1, count)


def pytest_report_header(config):
    import emu
    s = settings(config)
    return [f"emu {emu.__version__}: handler {s['handler']}, seed {s['seed']} (a stream per "
            f"worker), topology {s['topology']}, chaos {s['chaos']}"]


class _Seeds:
    """This process's seed stream (see the module)."""

    def __init__(self, base: int):
        self.base = base
        self.k = 0
        self.worker, self.w, self.n = worker()

    def next(self) -> int:
        s = self.base + self.k * self.n + self.w
        self.k += 1
        return s


@pytest.fixture(scope="session")
def _emu_session(pytestconfig, tmp_path_factory):
    s = settings(pytestconfig)
    wid = worker()[0]
    root = tmp_path_factory.getbasetemp() / f"emu-runs-{wid}"
    root.mkdir(exist_ok=True)
    return {"settings": s, "seeds": _Seeds(s["seed"]), "root": root, "n": 0}


# --- leak check ---------------------------------------------------------------------------
def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def _orphans(since: float, cmdline: list[str]) -> list[int]:
    out = []
    for p in psutil.process_iter(["pid", "ppid", "create_time", "cmdline"]):
        try:
            if p.info["ppid"] == 1 and p.info["create_time"] >= since - 1 \
                    and p.info["cmdline"] == cmdline:
                out.append(p.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def wait_no_children(timeout: float = 5.0) -> list[int]:
    """Wait (on a condition, with a bound) until this process has no children."""
    me = psutil.Process()
    deadline = time.monotonic() + timeout
    while True:
        kids = [c.pid for c in me.children(recursive=True)
                if c.status() != psutil.STATUS_ZOMBIE]
        if not kids or time.monotonic() > deadline:
            return kids
        time.sleep(0.01)


@pytest.fixture
def emu_leak_check():
    """After the test: no emulator process survives (children of this process, or
    orphans re-parented to init that were forked from it) and nothing new is left in
    ``/dev/shm``; fails the test otherwise."""
    me = psutil.Process()
    before_shm = _shm()
    start = time.time()
    cmd = me.cmdline()
    yield
    kids = wait_no_children()
    assert not kids, f"emulator processes survived the test: {kids}"
    orphans = _orphans(start, cmd)
    assert not orphans, f"orphaned emulator processes (re-parented to init): {orphans}"
    leaked = _shm_leaked(before_shm)
    assert not leaked, f"left in /dev/shm: {sorted(leaked)}"


def _shm_in_use_elsewhere(names: set[str]) -> set[str]:
    """Of ``names`` (files in /dev/shm), those another live process holds open or
    mapped: not this test's (e.g. a concurrent run's multiprocessing semaphores)."""
    me = os.getpid()
    paths = {f"/dev/shm/{n}": n for n in names}
    used = set()
    for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)   # address perms offset dev inode path
                    if len(parts) == 6 and parts[5].strip() in paths:
                        used.add(paths[parts[5].strip()])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target in paths:
                    used.add(paths[target])
        except OSError:
            continue
    return used


def _shm_leaked(before: set[str], settle_s: float = 1.0) -> set[str]:
    """New files in /dev/shm that stay (a transient one, created and unlinked by
    someone else meanwhile, is given ``settle_s`` to go) and that no other live
    process holds: this test's leaks."""
    deadline = time.monotonic() + settle_s
    while True:
        new = _shm() - before
        if not new or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    return new - _shm_in_use_elsewhere(new) if new else new


# --- machines and trials ---------------------------------------------------------------------
def _state(node) -> dict:
    st = node.stash.get(_STATE, None)
    if st is None:
        st = node.stash[_STATE] = {"machines": [], "last": None}
    return st


def _spec_text(e) -> str:
    if isinstance(e, dict):
        return " ".join(f"{k}={v:#x}" if isinstance(v, int) and k in ("status", "addr", "misc",
                                                                       "mcg") else f"{k}={v}"
                        for k, v in e.items() if v is not None)
    return str(e)


def reproduce_line(cfg, errors, local: bool, then=None, via: str | None = None) -> str:
    """The ``emu run ...`` command that runs this trial on a machine like ``cfg``
    (``via``: the inject argument, given to every error without its own)."""
    args = ["emu", "run"]
    for attr, flag, default in _CLI_FLAGS:
        v = getattr(cfg, attr, default)
        if v != default:
            args += [flag, str(v)]
    if not cfg.ser:
        args.append("--no-ser")
    if not getattr(cfg, "cmci", True):
        args.append("--no-cmci")
    if not cfg.pin_cpus:
        args.append("--no-pin")
    for e in errors if isinstance(errors, (list, tuple)) else [errors]:
        text = _spec_text(e)
        if via and "via=" not in text.lower():
            text += f" via={via}"
        args += ["--error", text]
    if local:
        args.append("--local")
    line = shlex.join(args)
    if then:
        line += "   # and a second #MC (then=...): not expressible on emu run's command line"
    return line


def summary(res: dict) -> list[str]:
    """A few lines saying what a trial did."""
    out = [f"trial {res.get('trial')}: outcome {res.get('outcome')}, resets "
           f"{res.get('resets')}, targets {res.get('targets')}, local {res.get('local')}"]
    for e in res.get("errors", []):
        out.append(f"  cpu{e.get('cpu')} bank{e.get('bank')} {e.get('status')} "
                   f"{e.get('class')}: owners {e.get('owners')}, action {e.get('action')}")
    if res.get("panic"):
        out.append(f"  panic: {res['panic']}")
    for v in res.get("violations", []):
        out.append(f"  VIOLATION: {v}")
    return out


def _options(node, kw: dict, session: dict) -> dict:
    opts = {k: v for k, v in session["settings"].items() if k != "seed"}
    m = node.get_closest_marker("emu")
    explicit_seed = None
    if m is not None:
        if m.args:
            raise pytest.UsageError("@pytest.mark.emu takes keyword arguments only "
                                    "(topology=..., handler=..., chaos=...)")
        mk = dict(m.kwargs)
        explicit_seed = mk.pop("seed", None)
        opts.update(mk)
    if "seed" in kw:
        explicit_seed = kw.pop("seed")
    opts.update(kw)
    opts["seed"] = session["seeds"].next() if explicit_seed is None else explicit_seed
    return opts


@pytest.fixture
def emu_machine(request, emu_leak_check, _emu_session):
    """A factory of booted machines: ``m = emu_machine(topology="1x2x2", guests=0)``
    (MachineConfig fields; defaults from the marker, then --emu-* options). Each
    machine's logs go to its own run directory; all are shut down after the test."""
    from emu.machine import Machine
    machines = []
    st = _state(request.node)

    def boot(**kw) -> Machine:
        opts = _options(request.node, dict(kw), _emu_session)
        extra = dict(opts.pop("extra", {}) or {})
        _emu_session["n"] += 1
        if "log_dir" not in extra:
            d = _emu_session["root"] / f"m{_emu_session['n']:04d}"
            d.mkdir()
            extra["log_dir"] = str(d)
        m = Machine(extra=extra, **opts)
        st["machines"].append({"config": m.config, "log_dir": extra["log_dir"]})
        orig = m.inject

        def inject(errors, local=False, timeout_s=None, then=None, **kw):
            res = orig(errors, local=local, timeout_s=timeout_s, then=then, **kw)
            st["last"] = {"config": m.config, "errors": errors, "local": local, "then": then,
                          "via": kw.get("via"), "result": res, "log_dir": extra["log_dir"]}
            return res
        m.inject = inject
        m.start()
        machines.append(m)
        return m
    yield boot
    for m in machines:
        m.close()


@pytest.fixture
def emu_trial(emu_machine):
    """One injection: ``r = emu_trial(errors, local=False, **machine_options)`` boots
    a machine (one per test and set of options, reused) and returns the trial result
    (``emu.trial/1``)."""
    booted: dict = {}

    def trial(errors, local: bool = False, **kw):
        key = repr(sorted(kw.items()))
        if key not in booted:
            booted[key] = emu_machine(**kw)
        return booted[key].inject(errors, local=local)
    return trial


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed:
        return
    st = item.stash.get(_STATE, None)
    if not st or not st["machines"]:
        return
    lines = []
    for k, m in enumerate(st["machines"]):
        c = m["config"]
        lines.append(f"machine {k}: topology {c.topology}, banks {c.nbanks} "
                     f"({c.bank_scopes}), handler {c.handler}, seed {c.seed}, chaos {c.chaos}, "
                     f"guests {c.guests}, vmce_policy {c.vmce_policy}, watchdog "
                     f"{c.watchdog_s} s; logs {m['log_dir']}")
    last = st["last"]
    if last is None:
        lines.append("no trial ran")
    else:
        lines.append(f"seed {last['config'].seed}; last trial:")
        lines += summary(last["result"])
        sched = last["result"].get("sched") or {}
        if sched.get("replay"):     # controlled scheduling: the schedule token replays it
            lines.append(f"reproduce: {sched['replay']}")
        else:
            lines.append("reproduce: " + reproduce_line(last["config"], last["errors"],
                                                        last["local"], last["then"],
                                                        last["via"]))
    rep.sections.append(("emu", "\n".join(lines)))
