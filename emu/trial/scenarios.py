"""Fixed scenarios that reach a hazard of xen-mca.md §10.2 (pure data).

Each gives the machine configuration it needs (``config``: MachineConfig keywords,
test hooks in ``extra``) and the ``inject`` keywords of one trial. The trial result
reports the hazard in ``hazards`` (``{"kind": "A" | "C", ...}``).

- ``lmce_concurrent`` (hazard A): LMCEs on CPUs 0 and 2, both held at barrier B (the
  second raised once CPU 0 is there). CPU 0's fatal check passes and resets the shared
  ``found_error``; CPU 2, which logged a valid SRAO, then finds it 0 and panics "No
  CPU found valid MCE, need reset".
- ``lmce_defers_nothing`` (hazard C): an LMCE of a corrected error, committed at once,
  defers nothing: the softirq runs with ``bcast`` true and waits in
  ``mce_inside_bar`` for CPUs that never come (the watchdog ends it as ``hang``).
- ``lmce_pending_then_broadcast`` (hazard C, the mirror case): CPU 0's LMCE is held
  at the handler's exit, before its softirq; a broadcast #MC then comes in which CPU 0
  finds no error (the SRAO is in CPU 2's thread-private bank). CPU 0's softirq runs as
  LMCE (its ``lmce_pending`` is not empty) and never enters ``mce_inside_bar``, where
  the other CPUs wait for it.

``stuck``: the CPUs the hazard leaves waiting in their softirq (hazard C).
"""
from __future__ import annotations

SCENARIOS = {
    "lmce_concurrent": {
        "hazard": "A",
        "config": {"topology": "1x2x2",
                   "extra": {"hooks": {"stall_phase": "barrier_b", "stall_s": 0.3,
                                       "stall_cpus": [0, 2]}}},
        "inject": {
            "errors": ["cpu=0 bank=7 status=0xBD2000008000017A addr=0x180020 misc=0x86 mcg=0x5"],
            "local": True,
            "then": {"errors": ["cpu=2 bank=1 status=0xBD000000004000CF addr=0x181020 "
                                "misc=0x86 mcg=0x5"],
                     "local": True, "after_phase": "barrier_b"}},
    },
    "lmce_defers_nothing": {
        "hazard": "C",
        "config": {"topology": "1x2x2", "watchdog_s": 0.5},
        "inject": {"errors": ["cpu=1 bank=1 status=0x9000000000000134 mcg=0x5"],
                   "local": True},
        "stuck": [1],
    },
    "lmce_pending_then_broadcast": {
        "hazard": "C",
        "config": {"topology": "1x2x2", "watchdog_s": 0.5,
                   "bank_scopes": "0-3:thread,4-9:package",
                   "extra": {"hooks": {"stall_phase": "exit", "stall_s": 0.3,
                                       "stall_cpus": [0]}}},
        "inject": {
            "errors": ["cpu=0 bank=7 status=0xBD2000008000017A addr=0x180020 misc=0x86 mcg=0x5"],
            "local": True,
            "then": {"errors": ["cpu=2 bank=1 status=0xBD000000004000CF addr=0x181020 "
                                "misc=0x86 mcg=0x5"],
                     "local": False, "after_phase": "exit"}},
        "stuck": [1, 2, 3],
    },
}
