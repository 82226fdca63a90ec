"""The machine's processes: configuration, regions and boot, the CPU process body
(handed its handler), the coordinator, the domains' channels, and :class:`Machine`,
the front door API.
"""
from emu.machine.config import MachineConfig
from emu.machine.front import Machine

__all__ = ["Machine", "MachineConfig"]
