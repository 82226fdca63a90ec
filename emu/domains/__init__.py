"""The domains: Dom0 (the logger and its durable log), the guest kernels' native
#MC handler, and mcelog's text. A domain process sees only its channel to the
hypervisor, so nothing here knows Xen's memory (:mod:`emu.xen`).
"""
