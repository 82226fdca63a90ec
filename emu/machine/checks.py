"""Checks of the front door's per-call arguments, made before anything is sent.

Every public input of :class:`emu.machine.Machine` is checked here, in the front
end, with its field named, before the request goes to the coordinator and so before
any bank is written: a value that cannot be sent (an integer above 64 bits, a type
msgpack does not know) or would fail half-way through a trial is a
:class:`~emu.errors.UsageError`, and the machine is unharmed.
"""
from __future__ import annotations

import math

from emu.errors import UsageError
from emu.trial.spec import validate_errors
from emu.xen.mce import PHASES

MAX_TIMEOUT_S = 3600.0
THEN_KEYS = ("errors", "after_phase", "local")


def check_bool(field: str, v) -> bool:
    if not isinstance(v, bool):
        raise UsageError(field, f"{v!r}: give True or False")
    return v


def check_timeout(field: str, v, optional: bool = True):
    """Seconds, 0 < v <= 3600 (a finite int or float; never a bool or a string)."""
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or not 0 < v <= MAX_TIMEOUT_S:
        raise UsageError(field, f"{v!r}: give seconds, 0 < {field} <= {MAX_TIMEOUT_S:g}"
                         + (" (or None)" if optional else ""))
    return v


def error_list(field: str, errors) -> list:
    """``errors`` as a list: one string or dict, or a list/tuple of them."""
    if isinstance(errors, (str, dict)):
        return [errors]
    if not isinstance(errors, (list, tuple)):
        raise UsageError(field, f"{type(errors).__name__}: give an error string, a dict, or "
                         "a list of them")
    for i, e in enumerate(errors):
        if not isinstance(e, (str, dict)):
            raise UsageError(f"{field}[{i}]", f"{type(e).__name__}: give an error string "
                             "(\"cpu=N bank=N status=0x...\") or a dict")
    return list(errors)


def _validate(errors: list, ncpus: int, nbanks: int, domids, seen: set | None,
              ser: bool = True) -> None:
    """validate_errors, skipped for error strings already validated on this machine
    (a campaign repeats them)."""
    key = tuple(errors) if seen is not None and all(isinstance(e, str) for e in errors) \
        else None
    if key is not None and key in seen:
        return
    validate_errors(errors, ncpus, nbanks, domids, ser)
    if key is not None:
        if len(seen) >= 4096:
            seen.clear()
        seen.add(key)


def check_inject(errors, local, timeout_s, then, ncpus: int, nbanks: int, domids,
                 seen: set | None = None, allow_empty: bool = False,
                 ser: bool = True) -> tuple:
    """Machine.inject's arguments, normalised: (errors, local, timeout_s, then).
    ``seen``: the machine's set of error lists already validated; ``allow_empty``:
    no error is fine (a #MC raised with no bank written, ``raise_cpu``)."""
    errors = error_list("errors", errors)
    if not errors and not allow_empty:
        raise UsageError("error", "no error given; give at least one, or raise_cpu=N to "
                         "raise a #MC on CPU N without writing any bank")
    if errors:
        _validate(errors, ncpus, nbanks, domids, seen, ser)
    check_bool("local", local)
    check_timeout("timeout_s", timeout_s)
    if then is not None:
        if not isinstance(then, dict):
            raise UsageError("then", f"{then!r}: give a dict {{'errors': [...], "
                             "'after_phase': PHASE, 'local': False}")
        for k in then:
            if k not in THEN_KEYS:
                raise UsageError(f"then.{k}", f"unknown key {k!r}; use {', '.join(THEN_KEYS)}")
        if "errors" not in then:
            raise UsageError("then.errors", "missing: the second #MC's errors")
        then = dict(then, errors=error_list("then.errors", then["errors"]))
        _validate(then["errors"], ncpus, nbanks, domids, seen, ser)
        if then.get("after_phase") not in PHASES:
            raise UsageError("then.after_phase", f"{then.get('after_phase')!r}: use one of "
                             f"{', '.join(PHASES)}")
        check_bool("then.local", then.get("local", False))
    return errors, local, timeout_s, then


def check_per_trial(seed, chaos, starve, fault, raise_cpu, wait_dom0, ncpus: int) -> None:
    """Machine.inject's per-trial arguments (see :mod:`emu.machine.chaos`), as far as
    they can be checked without the machine: a seed of more than 64 bits could not
    even be sent. The fault's details are checked by the coordinator, before the
    trial's banks are written."""
    from emu.machine.chaos import validate_probability, validate_seed
    if seed is not None:
        validate_seed(seed)
    for name, p in (("chaos", chaos), ("starve", starve)):
        if p is not None:
            if isinstance(p, float) and not math.isfinite(p):
                raise UsageError(name, f"{p!r}: give a probability in [0, 1]")
            validate_probability(name, p)
    if fault is not None and not isinstance(fault, dict):
        raise UsageError("fault", f"{fault!r}: give a dict with a kind")
    if raise_cpu is not None and (isinstance(raise_cpu, bool) or not isinstance(raise_cpu, int)
                                  or not 0 <= raise_cpu < ncpus):
        raise UsageError("raise_cpu", f"{raise_cpu!r}: give a CPU 0..{ncpus - 1}")
    check_bool("wait_dom0", wait_dom0)
