"""JSON Schema documents of every object emu prints or writes, installed with the package.

One file per schema name: ``emu.trial/1`` is ``emu.trial-1.json`` (the name's ``/``
becomes ``-``). Others join by adding their file here (``emu.bench-1.json``, ...):
:func:`names` lists what is installed. Documents use draft 2020-12 and refer to each
other by file name (``{"$ref": "emu.trial-1.json"}``).

The number encoding every schema follows (one rule across outputs):

- register values (MCi_STATUS/ADDR/MISC, MCG_STATUS, MCG_CAP, addresses in a bank or
  a vMCE) are strings, ``0x`` and 16 upper-case hex digits (:func:`emu.hw.msr.hexs`);
- counts, indices and identifiers (CPU, bank, domid, vCPU, trial, record ids, MFNs and
  PFNs, seeds, CPUID signatures, return codes) are JSON integers;
- flag words are lists of their names where emu decodes them (``flags``,
  ``page_offline.status``); the raw words Xen passes in a telemetry record
  (``mc_flags``, ``recovery[].action_flags``/``status``) stay integers, as Xen's;
- times and latencies are numbers (``_us``, ``_ms``, ``_ns``, ``t``, ``logged_at``);
  a latency that did not happen is ``null``.

:func:`validate` uses ``jsonschema`` when it is installed (the ``test`` extra); without
it, only the schema name and the top-level required fields are checked.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

from emu.errors import EmulatorInternalError, UsageError

__all__ = ["names", "load", "validate", "file_name", "SchemaMismatch"]


class SchemaMismatch(EmulatorInternalError):
    """An object emu produced does not match its own schema (an emu bug)."""


def file_name(name: str) -> str:
    """``emu.trial/1`` -> ``emu.trial-1.json``."""
    return name.replace("/", "-") + ".json"


def names() -> list[str]:
    """The schema names installed (``emu.trial/1``, ...)."""
    out = []
    for f in resources.files(__name__).iterdir():
        n = f.name
        if n.endswith(".json") and "-" in n:
            stem = n[:-5]
            base, _, ver = stem.rpartition("-")
            out.append(f"{base}/{ver}")
    return sorted(out)


@lru_cache(maxsize=None)
def _text(fname: str) -> str:
    try:
        return resources.files(__name__).joinpath(fname).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("schema", f"no schema {fname!r}; installed: "
                         f"{', '.join(names())}") from None


def load(name: str) -> dict:
    """The schema document of ``name`` (``emu.trial/1``, or its file name)."""
    fname = name if name.endswith(".json") else file_name(name)
    return json.loads(_text(fname))


@lru_cache(maxsize=None)
def _validator(name: str):
    import jsonschema
    from referencing import Registry, Resource

    def retrieve(uri: str):
        return Resource.from_contents(load(uri.rsplit("/", 1)[-1]))
    doc = load(name)
    cls = jsonschema.validators.validator_for(doc)
    return cls(doc, registry=Registry(retrieve=retrieve))


def validate(obj, name: str | None = None) -> None:
    """Check ``obj`` against the schema ``name`` (default: its own ``schema`` field);
    raise :class:`SchemaMismatch` naming the first mismatch's path."""
    if name is None:
        name = obj.get("schema") if isinstance(obj, dict) else None
        if not isinstance(name, str):
            raise SchemaMismatch("the object names no schema (no 'schema' field)")
    try:
        v = _validator(name)
    except ImportError:
        doc = load(name)
        missing = [k for k in doc.get("required", []) if k not in obj]
        if missing:
            raise SchemaMismatch(f"{name}: missing {', '.join(missing)}") from None
        return
    err = next(iter(sorted(v.iter_errors(obj), key=lambda e: list(e.absolute_path))), None)
    if err is not None:
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        raise SchemaMismatch(f"{name}: at {path or '(top)'}: {err.message}")
