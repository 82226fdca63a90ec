"""Handler versions (DESIGN.md §1): which Xen code each CPU process runs.

``seed`` is the seed design as Xen carries it today, with every later race fix.
Historical versions and deliberately broken variants subclass it and override only
the step they change.
"""
from __future__ import annotations

import importlib

HANDLERS = {
    "seed": "emu.xen.mce:XenCpu",
    # The seed without 3e15c37e68: CMCI banks still polled (xen-mca.md §10.1 item 4).
    "no-3e15c37e68": "emu.xen.no_3e15c37e68:XenCpuNo3e15c37e68",
}


def handler_class(name: str):
    """Resolve a handler name. The coordinator calls this before forking CPUs,
    so the modules are imported once, not in every CPU process."""
    mod, _, cls = HANDLERS[name].partition(":")
    return getattr(importlib.import_module(mod), cls)
