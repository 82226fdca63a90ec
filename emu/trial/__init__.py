"""The pure parts of a trial: error specs, the oracle, the expected-outcome model.

No processes here: everything is a function of its inputs, unit-tested in
microseconds. Above :mod:`emu.xen` and :mod:`emu.domains`, below :mod:`emu.machine`.
"""
