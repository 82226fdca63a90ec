"""Formats: the inputs the field already writes (mce-inject files, xen-mceinj
options, Xen's mce-test cases by name) and exports (trace events).

Above :mod:`emu.machine`, beside :mod:`emu.campaign` (the two do not know each other).
"""
