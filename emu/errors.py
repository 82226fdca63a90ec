"""The three kinds of failure emu distinguishes (DESIGN.md §8).

- :class:`UsageError`: bad input from a person or a file (exit code 2). Names the
  field and the fix; nothing runs.
- :class:`Finding`: the emulated handler violated an invariant (exit code 1). This
  is what stress campaigns are for, not a bug of emu.
- :class:`EmulatorInternalError`: emu itself is wrong (exit code 3).
"""
from __future__ import annotations


class EmuError(Exception):
    exit_code = 3


class UsageError(EmuError):
    """Bad input. ``field`` names what was wrong; the message says how to fix it."""
    exit_code = 2

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Finding(EmuError):
    """An invariant of the emulated handler was violated."""
    exit_code = 1

    def __init__(self, violations: list[str]):
        super().__init__("; ".join(violations))
        self.violations = violations


class EmulatorInternalError(EmuError):
    """A bug in emu itself, never in the emulated Xen code."""
    exit_code = 3


class ChannelError(EmuError):
    """A malformed or forged message on a channel (rejected and counted)."""
    exit_code = 2
