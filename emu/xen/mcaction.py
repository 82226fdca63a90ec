"""Recovery action for memory errors (mcaction.c: ``mc_memerr_dhandler``).

Modelled (xen-mca.md §6): physical-address check, ``offline_page``, the recovery
record, the mapping of the offline status to a result (OFFLINED → RECOVERED,
AGAIN → CONTINUE after the owner was crashed, PENDING|OWNED → the vMCE path,
Xen heap or anonymous → the preset stays), and for an owned page
``unmmap_broken_page``, the vCPU choice (broadcast unless a vLMCE applies), the
guest-physical rewrite of MCi_ADDR, ``fill_vmsr_data``, ``inject_vmce``, and on
failure ``domain_crash`` with the preset kept (SRAO → CONTINUE, SRAR → RESET).
Policy ``owner`` (Xen since 2009-06) injects into the impacted domain; ``dom0`` (the
seed's interim, 2009-03) into the hardware domain with the machine address.

Not modelled: DOMID_COW pages, PV vMCE trap-callback registration (Dom0's handler
is always registered here).
"""
from __future__ import annotations

from emu.hw import msr
from emu.xen import severity as sev
from emu.xen.page_alloc import (
    DOMID_XEN,
    PG_OFFLINE_AGAIN,
    PG_OFFLINE_OFFLINED,
    PG_OFFLINE_OWNED,
    PG_OFFLINE_OWNER_SHIFT,
    PG_OFFLINE_PENDING,
    PG_OFFLINE_XENPAGE,
    offline_status_names,
)
from emu.xen.vmce import VMCE_INJECT_BROADCAST

MC_ACTION_PAGE_OFFLINE = 1


class McAction:
    def __init__(self, xc):
        self.xc = xc
        self.pages = xc.pages
        self.vmce = xc.vmce
        self.policy = xc.cfg.vmce_policy

    def mc_memerr_dhandler(self, rec: dict, b: list, preset: int) -> tuple[int, dict]:
        """Returns (result, info); ``b`` (the bank record) may be rewritten in place."""
        bank, status, addr, misc = b[0], b[1], b[2], b[3]
        info: dict = {}
        if not msr.addr_is_physical(status, misc):
            info["note"] = "No physical address provided for memory error"
            return preset, info
        mfn = addr >> 12
        self.xc.yp("page", mfn)
        ret, st, crash = self.pages.offline_page(mfn, True)
        info.update(mfn=mfn, offline_ret=ret, offline_status=st,
                    offline=offline_status_names(st))
        if st & PG_OFFLINE_XENPAGE:
            info["impacted_domain"] = DOMID_XEN   # for the result; Xen leaves mc_domid
        elif crash >= 0:                       # AGAIN: the owner touched it again
            info["impacted_domain"] = crash
        elif st & PG_OFFLINE_OWNED:
            info["impacted_domain"] = (st >> PG_OFFLINE_OWNER_SHIFT) & 0xFFFF
        if crash >= 0:
            self.vmce.domain_crash(crash, 3)
            info["crashed"] = crash
        if ret:
            info["note"] = "Failed to offline page"
            return preset, info
        info["recovery"] = [bank, 0, MC_ACTION_PAGE_OFFLINE, mfn, st]
        if st & PG_OFFLINE_OFFLINED:
            return sev.MCER_RECOVERED, info
        if st & PG_OFFLINE_AGAIN:
            return sev.MCER_CONTINUE, info
        if st & PG_OFFLINE_PENDING and st & PG_OFFLINE_OWNED:
            d = (st >> PG_OFFLINE_OWNER_SHIFT) & 0xFFFF
            b[4] = d
            info["impacted_domain"] = d
            if d == DOMID_XEN:
                return preset, info
            return self._vmce(rec, b, d, mfn, preset, info)
        return preset, info   # Xen heap page pending, or anonymous

    def _vmce(self, rec, b, d, mfn, preset, info):
        vm = self.vmce
        self.xc.yp("vmce", d, mfn)
        if vm.unmmap_broken_page(d) != 0:
            info["note"] = f"Unmap broken memory {mfn:#x} for DOM{d} failed"
            return self._failed(d, preset, info)
        g = rec["g"]
        # Policy "dom0" is the seed's interim behaviour (the 2009 code): the vMCE goes
        # to the hardware domain, which sees machine addresses, whoever owns the page.
        t = d if self.policy == "owner" else 0
        vcpu = VMCE_INJECT_BROADCAST
        if g["mc_vcpuid"] < 0xFFFF and g["mc_domid"] == t and g["mc_gstatus"] & msr.MCG_STATUS_LMCE:
            k = vm.slot(t)
            if k is not None and vm.vget(k, g["mc_vcpuid"], 4) & 1:   # guest LMCE_EN
                vcpu = g["mc_vcpuid"]
        if t == d:
            gfn = self.pages.get(mfn)[2]
            b[2] = gfn << 12 | (b[2] & 0xFFF)
        bank = {"status": b[1], "addr": b[2], "misc": b[3], "domid": t}
        if vm.fill_vmsr_data(bank, t, g["mc_gstatus"], vcpu) != 0:
            info["note"] = f"Fill vMCE# data for DOM{t} failed"
            return self._failed(t, preset, info)
        ret, kicked = vm.inject_vmce(t, vcpu)
        if ret != 0:
            info["note"] = f"inject vMCE to DOM{t} failed"
            return self._failed(t, preset, info)
        info["vmce"] = {"domain": t, "vcpus": kicked, "gaddr": b[2],
                        "broadcast": vcpu == VMCE_INJECT_BROADCAST}
        return sev.MCER_RECOVERED, info

    def _failed(self, d, preset, info):
        info["vmce_failed"] = True
        self.vmce.domain_crash(d, 2)
        return preset, info
