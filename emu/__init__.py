"""emu: a concurrency-faithful emulator of Xen's x86 machine-check handling.

Public API (kept small): :class:`Machine`, :class:`MachineConfig`, the error types.
``Machine`` and ``MachineConfig`` load on first use, so importing a pure part
(``emu.trial``, ``emu.formats``, ``emu.hw``) does not load the machine.
"""
from emu.errors import EmulatorInternalError, Finding, UsageError

__all__ = ["Machine", "MachineConfig", "UsageError", "Finding", "EmulatorInternalError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("Machine", "MachineConfig"):
        import emu.machine
        return getattr(emu.machine, name)
    raise AttributeError(f"module 'emu' has no attribute {name!r}")
