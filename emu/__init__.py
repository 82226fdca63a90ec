"""emu: a concurrency-faithful emulator of Xen's x86 machine-check handling.

Public API (kept small): :class:`Machine`, :class:`MachineConfig`, :func:`stress` (a
seeded campaign, returning its summary), the error types. ``Machine``,
``MachineConfig`` and ``stress`` load on first use, so importing a pure part
(``emu.trial``, ``emu.formats``, ``emu.hw``) does not load the machine.
"""
from emu.errors import EmulatorInternalError, Finding, UsageError

__all__ = ["Machine", "MachineConfig", "stress", "UsageError", "Finding", "EmulatorInternalError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Machine", "MachineConfig"):
        import emu.machine
        return getattr(emu.machine, name)
    if name == "stress":
        # by name, not an import statement: the package root is imported from below
        # (emu.machine), and the campaign room sits above the machine
        import importlib
        return importlib.import_module("emu.campaign.stress").stress
    raise AttributeError(f"module 'emu' has no attribute {name!r}")
