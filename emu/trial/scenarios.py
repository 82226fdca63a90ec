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
    },
}
