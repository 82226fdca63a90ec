"""emu: a concurrency-faithful emulator of Xen's x86 machine-check handling.

Public API (kept small): :class:`Machine`, :class:`MachineConfig`, the error types.
"""
from emu.errors import EmulatorInternalError, Finding, UsageError
from emu.machine import Machine, MachineConfig

__all__ = ["Machine", "MachineConfig", "UsageError", "Finding", "EmulatorInternalError"]
__version__ = "0.1.0"
