"""The expected-outcome model: what Xen's #MC handling must do with a set of errors.

Written from ``reference/xen-mca.md`` alone (§2 the handler sequence, §3 the
classification and clear rules, §5.6 telemetry exhaustion, §6 ``mc_memerr_dhandler``
and ``offline_page``, §9.3, §10.2 hazards), and **independently of** :mod:`emu.xen`:
nothing here imports or calls the emulated handler. That independence is the point:
when :func:`compare` finds a disagreement between this model and a real trial, one
of the two read the reference differently, and either way it is a finding.

Pure: no process, no shared memory, no I/O. Imports only the standard library,
:mod:`emu.errors` and :mod:`emu.hw.msr` (bit names).

What the model knows about the platform (DESIGN.md §1 and the default machine):

- the bank instance a CPU sees (``topo.inst``) and who shares it (``topo.sharers``);
- the SDM overwrite rules for a second error into a valid bank (peers.md §7), with
  the tie "disabled UC against enabled CE" resolved as uncorrected-over-corrected;
- the default memory map: MFNs 0x0-0xFF Xen text (fixed), 0x100-0x17F Xen heap,
  0x180-0x1FF free, then 0x1000 pages per domain from 0x200 (Dom0 first, then
  guests 1..G, gfn = mfn - start), the rest free, none at or above ``memory_pages``;
- the interrupted context of every CPU is Xen (idle), never a guest, so RIPV=0
  makes the urgent check fatal whatever EIPV says (§2.3 step 8);
- Dom0 is PV and trusted (unmap always succeeds), guests are HVM with HAP, every
  vCPU is initialised and no vCPU enables guest LMCE, so a vMCE is a broadcast to
  all of the target's vCPUs (§6 step 4, §6.1);
- a domain whose vCPU0 already holds an unhandled vMCE from the same #MC fails
  ``fill_vmsr_data`` ("guest has not handled previous vMCE yet", §7.3): its kernel
  runs only after Xen's part of the #MC, so a second vMCE to the same domain in one
  #MC crashes it (and crashing Dom0 resets the host).

Nondeterminism is explicit. The owner of a shared clearable bank is whichever CPU
wins ``mce_logout_lock`` (hazard I): pass the observed ``owners`` (:func:`owners_of`)
to get one prediction; without them the model enumerates every owner assignment and
returns the set of possible outcomes, marking each field that differs between them
as uncertain (``compare`` skips uncertain fields). The timing of a second wave
(``then``) is enumerated the same way: before MCIP is cleared it shuts the machine
down, after it it is handled, and between the CPUs' starts of ``mce_softirq`` it
leaves their softirq rounds uneven, which hangs ``mce_inside_bar``.
"""
from __future__ import annotations

import functools
import itertools
from collections import Counter

from emu.errors import UsageError
from emu.hw import msr

CLASSES = ("fatal", "srar", "srao", "ucna", "ce")
# The trial result names a corrected error "corrected"; the model says "ce".
RESULT_CLASS_ALIASES = {"corrected": "ce"}

# mce_action results, in order of badness (§3.3: the worst wins, stop at RESET)
NOERROR, RECOVERED, CONTINUE, RESET = range(4)
ACTION_NAMES = ("noerror", "recovered", "continue", "reset")

OUTCOMES = ("recovered", "continued", "reset", "shutdown", "hang")
RESET_OUTCOMES = ("reset", "shutdown", "hang")

PANIC_FATAL = "MCE: Fatal error happened on CPUs "
PANIC_NO_ERROR = "MCE: No CPU found valid MCE, need reset"
PANIC_UCR = "MCE: Software recovery failed for the UCR"
PANIC_HWDOM = "hardware domain crashed"

# The default memory map (page_alloc's table, restated from the brief).
XEN_TEXT_END = 0x100
XEN_HEAP_END = 0x180
DOM_BASE = 0x200
DOM_PAGES = 0x1000
DEFAULT_MEMORY_PAGES = 16384
DOMID_XEN = 0x7FF2
EINVAL, EPERM = 22, 1

# Handler phases (the names a ``then`` wave's ``after_phase`` uses).
PRE_CLEAR_PHASES = ("entered", "logout", "barrier_a", "barrier_b", "fatal_check")
RACY_PHASES = ("barrier_c",)          # some CPUs may have cleared MCIP, others not
POST_CLEAR_PHASES = ("exit", "softirq", "softirq_worker", "softirq_done")
# After one of these, some CPUs may have started mce_softirq and others not: a CPU
# inside it runs it again after the nested #MC (its pending bit was raised while it
# ran), a CPU that had not started runs it once for both, and the second round waits
# in mce_inside_bar for CPUs that never come (a variant of hazard D).
UNEVEN_SOFTIRQ_PHASES = ("exit", "softirq")

_MAX_COMBOS = 1024
_KEYS = ("cpu", "bank", "status", "addr", "misc", "mcg", "domain")

VAL, OVER, UC, EN = msr.MCi_STATUS_VAL, msr.MCi_STATUS_OVER, msr.MCi_STATUS_UC, msr.MCi_STATUS_EN
MISCV, ADDRV, PCC = msr.MCi_STATUS_MISCV, msr.MCi_STATUS_ADDRV, msr.MCi_STATUS_PCC
S, AR = msr.MCi_STATUS_S, msr.MCi_STATUS_AR
RIPV, EIPV, MCIP, LMCE = (msr.MCG_STATUS_RIPV, msr.MCG_STATUS_EIPV, msr.MCG_STATUS_MCIP,
                          msr.MCG_STATUS_LMCE)


# ---------------------------------------------------------------------------------------
# §3: classification, recoverability, clear decision, handler tables
# ---------------------------------------------------------------------------------------
def classify(status: int, ser: bool = True) -> str | None:
    """§3.1 ``intel_check_mce_type``: fatal / srar / srao / ucna / ce, None if VAL=0."""
    if not status & VAL:
        return None
    if status & PCC:
        return "fatal"
    if not status & UC:
        return "ce"
    if not ser:
        return "fatal"
    if status & S and status & AR:
        return "fatal" if status & OVER else "srar"
    if status & S:
        return "srao"
    return "ucna"


def recoverable(status: int, ser: bool = True) -> bool:
    """§3.2 ``intel_recoverable_scan``."""
    if not status & UC:
        return True
    if not ser:
        return False
    over, pcc, s, ar, en = (bool(status & b) for b in (OVER, PCC, S, AR, EN))
    if not en and not over:
        return True                                        # spurious / disabled UC
    if not over and not pcc and s and ar and en:
        return True                                        # SRAR
    if not pcc and s and not ar and en:
        return True                                        # SRAO (OVER allowed)
    return not over and en and not pcc and not s and not ar   # UCNA


def clearable(status: int, ser: bool = True) -> bool:
    """§3.4 ``intel_need_clearbank_scan(MCA_MCE_SCAN)``: cleared in the #MC handler?"""
    if not ser or not status & VAL:
        return False
    if status & UC and status & PCC:
        return False
    uc, over, en, s, ar = (bool(status & b) for b in (UC, OVER, EN, S, AR))
    if not over and uc and not en:
        return True                                        # spurious
    if uc and s and ar and not over:
        return True                                        # SRAR
    return uc and s and not ar                             # SRAO; not CE, UCNA, SRAR+OVER


def is_srao_memerr_code(status: int) -> bool:
    code = msr.mcacod(status)
    return (code & 0xFFF0) == 0x00C0 or code == 0x017A


def is_srar_memerr_code(status: int) -> bool:
    return msr.mcacod(status) in (0x0134, 0x0150)


def deferred_preset(status: int, ser: bool = True) -> tuple[int, bool]:
    """§3.3 the deferred handler table: (preset result, calls mc_memerr_dhandler)."""
    cls = classify(status, ser)
    if cls == "srao":
        return CONTINUE, is_srao_memerr_code(status)
    if cls == "srar":
        return RESET, is_srar_memerr_code(status)
    if cls == "fatal":
        return RESET, False
    return CONTINUE, False


def urgent_result(status: int, ser: bool = True) -> int:
    """§3.3 the urgent table: one default handler, RESET for fatal, else CONTINUE."""
    return RESET if classify(status, ser) == "fatal" else CONTINUE


def urgent_fatal(mcg_status: int, in_guest: bool = False) -> bool:
    """§2.3 step 8: RIPV=0 with EIPV=0, or RIPV=0 while Xen was interrupted."""
    return not mcg_status & RIPV and (not mcg_status & EIPV or not in_guest)


# ---------------------------------------------------------------------------------------
# peers.md §7: what a second error does to a valid bank
# ---------------------------------------------------------------------------------------
def _rank(status: int) -> int:
    if not status & VAL:
        return 0
    if status & UC:
        if not status & EN:
            return 4
        return 6 if status & PCC else 5
    if not status & EN:
        return 1
    if (status >> 53) & 3 == 2:      # threshold-based status: yellow
        return 3
    return 2


def bank_write(old: tuple[int, int, int], new: tuple[int, int, int]) -> tuple[tuple, str]:
    """(status, addr, misc) after ``new`` is reported into a bank holding ``old``,
    and which record was kept: 'new' (the bank was empty), 'first' or 'second'."""
    ost, oad, omi = old
    nst, nad, nmi = new
    ro = _rank(ost)
    if ro == 0:
        return (nst, nad, nmi), "new"
    rn = _rank(nst)
    if rn > ro or (rn == ro and rn in (1, 2, 3)):
        return (nst | OVER, nad, nmi), "second"
    st = ost | OVER
    if ro == 5 and rn == 5:
        st |= nst & (S | AR)         # S and AR are sticky (R7)
    return (st, oad, omi), "first"


# ---------------------------------------------------------------------------------------
# §6: the memory map and offline_page
# ---------------------------------------------------------------------------------------
def page_kind(mfn: int, guests: int = 1, memory_pages: int = DEFAULT_MEMORY_PAGES):
    """(kind, domid): kind is invalid / xen_text / xen_heap / free / domain."""
    if not 0 <= mfn < memory_pages:
        return "invalid", None
    if mfn < XEN_TEXT_END:
        return "xen_text", DOMID_XEN
    if mfn < XEN_HEAP_END:
        return "xen_heap", DOMID_XEN
    if mfn < DOM_BASE:
        return "free", None
    k = (mfn - DOM_BASE) // DOM_PAGES
    if k <= guests and DOM_BASE + (k + 1) * DOM_PAGES <= memory_pages:
        return "domain", k
    return "free", None


def offline_page(kind: str, domid, already_broken: bool) -> tuple[int, frozenset, object]:
    """§6 step 2-4 outcomes of ``offline_page(mfn, broken=1)``: (ret, status names
    without BROKEN, the domain to crash or None)."""
    if kind == "invalid":
        return -EINVAL, frozenset(), None
    if kind == "xen_text":
        return -EPERM, frozenset({"XENPAGE", "FAILED"}), None
    if kind == "free":
        return 0, frozenset({"OFFLINED"}), None
    if kind == "xen_heap":
        return 0, frozenset({"PENDING", "XENPAGE"}), None
    if already_broken:
        return 0, frozenset({"AGAIN"}), domid
    return 0, frozenset({"PENDING", "OWNED"}), None


# ---------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------
def _num(field: str, v) -> int:
    if isinstance(v, bool):
        raise UsageError(field, f"{v!r} is not a number")
    if isinstance(v, int):
        return v
    try:
        t = str(v).strip().replace("_", "")
        return int(t, 16) if t.lower().startswith("0x") else int(t, 10)
    except ValueError:
        raise UsageError(field, f"{v!r} is not a number; write hex as 0x... or decimal") from None


def normalize_spec(spec, index: int = 0) -> dict:
    """A spec dict (cpu, bank, status, addr, misc, mcg, domain) from a dict, an object
    with those attributes (emu.trial.spec.ErrorSpec) or an ``emu run --error`` string."""
    if isinstance(spec, str):
        return dict(_normalize_str(spec, index))   # a campaign repeats its strings
    return _normalize(spec, index)


@functools.lru_cache(maxsize=4096)
def _normalize_str(spec: str, index: int) -> dict:
    return _normalize(spec, index)


def _normalize(spec, index: int) -> dict:
    where = f"error[{index}]"
    if isinstance(spec, str):
        d = {}
        for tok in spec.replace(",", " ").split():
            k, eq, v = tok.partition("=")
            if not eq or k.strip().lower() not in _KEYS:
                raise UsageError(where, f"{tok!r} is not key=value with a key of "
                                 f"{', '.join(_KEYS)}")
            d[k.strip().lower()] = v
    elif isinstance(spec, dict):
        d = dict(spec)
    else:
        d = {k: getattr(spec, k) for k in _KEYS if hasattr(spec, k)}
    out = {}
    for k in _KEYS:
        v = d.get(k)
        if v is None:
            if k in ("cpu", "bank", "status"):
                raise UsageError(f"{where}.{k}", "missing; an error needs cpu, bank, status")
            out[k] = 0 if k in ("addr", "misc") else None
        else:
            out[k] = _num(f"{where}.{k}", v)
    return out


def owners_of(result: dict) -> list:
    """The observed owners of each error of a trial result (for ``expected``)."""
    return [list(e.get("owners") or []) for e in result.get("errors", [])]


def no_record_cpus_of(result: dict) -> list[int]:
    """CPUs whose telemetry reservation failed in a trial result (``no_record_cpus``).

    The result names only CPUs that logged one of the trial's own errors: a CPU
    that logged nothing but a bank left valid by an earlier trial is not listed.
    When the pool was already empty before the trial (``telemetry.free`` 0 with Dom0
    paused), pass ``pool_exhausted=True`` instead."""
    return sorted({c for e in result.get("errors", []) for c in e.get("no_record_cpus", [])})


# ---------------------------------------------------------------------------------------
# the simulation of one trial
# ---------------------------------------------------------------------------------------
class _Ctx:
    """Everything fixed for a trial: topology, policy, machine options."""

    def __init__(self, topo, ser, broadcast, vmce_policy, guests, guest_vcpus, memory_pages,
                 pool_exhausted):
        self.topo = topo
        self.ser = ser
        self.broadcast = broadcast
        self.policy = vmce_policy
        self.guests = guests
        self.guest_vcpus = guest_vcpus
        self.memory_pages = memory_pages
        n = topo.ncpus
        if pool_exhausted is True:
            self.no_tele = set(range(n))
        elif not pool_exhausted:
            self.no_tele = set()
        else:
            self.no_tele = set(pool_exhausted)

    def nvcpus(self, d: int) -> int:
        return min(2, self.topo.ncpus) if d == 0 else self.guest_vcpus


def _write_wave(ctx: _Ctx, banks: dict, specs: list, base: int) -> list[dict]:
    """Report each error into its bank (in order), updating ``banks``
    (inst -> [status, addr, misc, bank, last writer's cpu]). Returns per-error write
    info."""
    out = []
    topo = ctx.topo
    for k, s in enumerate(specs):
        i = base + k
        if not 0 <= s["cpu"] < topo.ncpus:
            raise UsageError(f"error[{i}].cpu", f"CPU {s['cpu']} does not exist")
        if not 0 <= s["bank"] < topo.nbanks:
            raise UsageError(f"error[{i}].bank", f"bank {s['bank']} does not exist")
        if not s["status"] & VAL:
            raise UsageError(f"error[{i}].status", "VAL (bit 63) is clear")
        addr = s["addr"]
        if s["domain"] is not None:
            d = s["domain"]
            if not 0 <= d <= ctx.guests:
                raise UsageError(f"error[{i}].domain", f"domain {d} does not exist")
            if addr >> 12 >= DOM_PAGES:
                raise UsageError(f"error[{i}].addr", "beyond the domain's memory")
            addr = (DOM_BASE + d * DOM_PAGES + (addr >> 12)) << 12 | (addr & 0xFFF)
        inst = topo.inst[s["cpu"]][s["bank"]]
        old = banks.get(inst)
        (st, ad, mi), kept = bank_write(tuple(old[:3]) if old else (0, 0, 0),
                                        (s["status"], addr, s["misc"]))
        banks[inst] = [st, ad, mi, s["bank"], s["cpu"]]
        out.append({"index": i, "spec": s, "inst": inst, "maddr": addr, "bank_status": st,
                    "kept": kept})
    for x in out:   # what the wave's handler finds: the wave's last write into the bank
        x["found"] = banks[x["inst"]][0]
    return out


def _wave_targets(ctx: _Ctx, specs: list, local: bool) -> tuple[list[int], dict]:
    n = ctx.topo.ncpus
    if not specs:
        targets = [0] if local or not ctx.broadcast else list(range(n))
    else:
        targets = [specs[0]["cpu"]] if local or not ctx.broadcast else list(range(n))
    mcg = {c: RIPV | MCIP for c in targets}
    seen = set()
    for s in specs:   # the first error of each CPU gives its MCG_STATUS
        if s["cpu"] in mcg and s["cpu"] not in seen and s["mcg"] is not None:
            mcg[s["cpu"]] = s["mcg"] | MCIP
        seen.add(s["cpu"])
    if local:
        mcg = {c: v | LMCE for c, v in mcg.items()}
    return targets, mcg


class _Run:
    """One assignment of owners and timing choices, simulated through every wave."""

    def __init__(self, ctx: _Ctx, broken: set):
        self.ctx = ctx
        self.broken = set(broken)       # MFNs already broken (a domain page: AGAIN)
        self.crashed: list[int] = []
        self.loggers: dict = {}         # inst -> CPUs that logged it (any wave)
        self.cleared: set = set()       # insts some CPU cleared
        self.actions: list = []         # (wave, cpu, inst, result, info), worker order
        self.hazards: list = []
        self.outcome = None
        self.panic = None
        self.fatal_cpus: list[int] = []
        self.uncertain_all = False      # only the outcome can be predicted
        self.uncertain_top: set = set()
        self.uncertain_insts: set = set()
        self.vmce_busy: set = set()     # domains whose vCPU0 holds an unhandled vMCE
        self.committed: set = set()     # insts with a committed record
        self.no_record: set = set()     # insts logged only by CPUs without telemetry
        self.records: list = []         # this wave's deferred records: (cpu, entries)
        self.uneven = False             # a nested #MC left the CPUs' softirq rounds uneven

    def hazard(self, hid: str, text: str) -> None:
        h = {"id": hid, "text": text}
        if h not in self.hazards:
            self.hazards.append(h)

    def _panic(self, text: str) -> None:
        if self.outcome is None:
            self.outcome, self.panic = "reset", text

    # -- the #MC handler (§2.3, §2.6) -------------------------------------------------------
    def mc(self, wave: int, banks: dict, targets: list, mcg: dict, local: bool,
           owner_of: dict) -> bool:
        """Logout under the lock, urgent checks (barrier A), the fatal check (barrier B).
        Returns True if the machine panicked."""
        ctx, topo = self.ctx, self.ctx.topo
        logged = {c: [] for c in targets}
        seen_by = {}
        to_clear = []
        for inst in sorted(banks, key=lambda x: (banks[x][3], x)):
            st, ad, mi, bank, _ = banks[inst]
            if not st & VAL:
                continue
            seers = [c for c in targets if topo.inst[c][bank] == inst]
            if not seers:
                continue
            seen_by[inst] = seers
            if clearable(st, ctx.ser):
                who = [owner_of[(wave, inst)]]     # first reader owns, and clears
                to_clear.append(inst)
            else:
                who = seers                        # every sharer logs it again
            for c in who:
                logged[c].append((bank, inst, st, ad, mi))
            self.loggers.setdefault(inst, set()).update(who)
        for inst in to_clear:
            self.cleared.add(inst)
            del banks[inst]
        fatal = set()
        self.records = []
        found = False
        for c in targets:
            ents = sorted(logged[c])
            if not ents:
                continue
            found = True                           # errcnt counts without telemetry too
            uc = any(e[2] & UC for e in ents)
            pcc = any(e[2] & PCC for e in ents)
            rec = all(recoverable(e[2], ctx.ser) for e in ents if e[2] & UC)
            cookie = c not in ctx.no_tele
            if uc or pcc:
                if pcc or not rec:
                    fatal.add(c)
                if cookie:
                    self.records.append((c, ents))         # mctelem_defer
            elif cookie:
                self.committed.update(e[1] for e in ents)  # CE only: committed at once
            if not cookie:
                self.no_record.update(e[1] for e in ents)
                if not mcg[c] & RIPV:
                    self.hazard("E", f"cpu{c}: RIPV=0 (MCG_STATUS {mcg[c]:#x}) but no telemetry "
                                     "entry, so mce_urgent_action is skipped (hazard E)")
                continue
            if urgent_fatal(mcg[c]) or any(urgent_result(e[2], ctx.ser) == RESET for e in ents):
                fatal.add(c)
        # Hazard K: a CPU whose own MCG_STATUS says its context cannot restart logged
        # nothing, because a sibling owned the shared bank it reported into.
        for c in targets:
            if mcg[c] & RIPV or logged[c] or c in ctx.no_tele:
                continue
            owned = sorted({owner_of[(wave, i)] for i, seers in seen_by.items()
                            if c in seers and (wave, i) in owner_of})
            if owned:
                self.hazard("K", f"today's Xen continues; hazard K: cpu{c} has RIPV=0 "
                                 f"(MCG_STATUS {mcg[c]:#x}) but cpu{','.join(map(str, owned))} "
                                 f"owned the shared bank, so cpu{c} held no telemetry and its "
                                 "urgent RIPV/EIPV check never ran")
        if not found:
            if local:
                self._panic(PANIC_NO_ERROR)        # the LMCE CPU runs the check itself
                return True
            self.hazard("B", "a #MC with no valid bank on any CPU: severity_cpu stays -1, "
                             "nobody runs the fatal check, no panic (hazard B)")
            return False
        if fatal:
            self.fatal_cpus = sorted(fatal)
            self._panic(PANIC_FATAL + ",".join(map(str, sorted(fatal))))
            return True
        return False

    # -- mce_softirq (§2.5) and mc_memerr_dhandler (§6) ----------------------------------------
    def softirq(self, wave: int, local: bool) -> bool:
        """The worker processes every deferred record, CPU by CPU. Returns True if the
        machine resets (or hangs)."""
        ctx = self.ctx
        if local and not self.records and ctx.broadcast:
            self.hazard("C", "an LMCE that deferred nothing: mce_softirq runs as a broadcast "
                             "and waits in mce_inside_bar for CPUs that never come (hazard C)")
            self.outcome = "hang"
            return True
        for k, (c, ents) in enumerate(sorted(self.records)):
            worst = NOERROR
            for _bank, inst, st, ad, mi in ents:
                preset, mem = deferred_preset(st, ctx.ser)
                r, info = preset, {}
                if mem:
                    r, info = self._memerr(st, ad, mi, preset)
                self.actions.append((wave, c, inst, r, info))
                worst = max(worst, r)
                if worst == RESET:
                    break
            if worst == RESET:
                self._panic(PANIC_UCR)
                return True
            if worst != NOERROR:
                self.committed.update(e[1] for e in ents)
            if 0 in self.crashed:
                # Dom0 crashed: the host resets, but the worker does not stop, so what
                # it does with the records after this one races with the reset.
                later = [e[1] for _, es in sorted(self.records)[k + 1:] for e in es]
                if later:
                    self.uncertain_insts.update(later)
                    self.uncertain_top.add("panic")
                self._panic(PANIC_HWDOM)
                return True
        return False

    def _memerr(self, st: int, ad: int, mi: int, preset: int) -> tuple[int, dict]:
        ctx = self.ctx
        info: dict = {}
        if not msr.addr_is_physical(st, mi):
            info["note"] = "No physical address provided for memory error"
            return preset, info
        mfn = ad >> 12
        kind, dom = page_kind(mfn, ctx.guests, ctx.memory_pages)
        ret, names, crash = offline_page(kind, dom, mfn in self.broken)
        info["page_offline"] = {"mfn": mfn, "ret": ret, "status": sorted(names)}
        if kind in ("xen_text", "xen_heap"):
            info["impacted_domain"] = DOMID_XEN
        elif kind == "domain":
            info["impacted_domain"] = dom
        if crash is not None:
            self._crash(crash)                     # AGAIN: the owner touched it again
        if ret:
            info["note"] = "Failed to offline page"
            return preset, info
        if kind != "xen_text":
            self.broken.add(mfn)
        if "OFFLINED" in names:
            return RECOVERED, info
        if "AGAIN" in names:
            return CONTINUE, info
        if kind != "domain":
            return preset, info                    # Xen heap, offline pending
        t = dom if ctx.policy == "owner" else 0
        if t in self.vmce_busy or t in self.crashed:
            info["note"] = f"Fill vMCE# data for DOM{t} failed"
            self._crash(t)                         # vmce_failed: domain_crash
            return preset, info
        gaddr = (mfn - DOM_BASE - dom * DOM_PAGES) << 12 | (ad & 0xFFF) if t == dom else ad
        info["vmce"] = {"domain": t, "broadcast": True, "vcpus": list(range(ctx.nvcpus(t))),
                        "gaddr": msr.hexs(gaddr)}
        self.vmce_busy.add(t)
        return RECOVERED, info

    def _crash(self, d: int) -> None:
        if d not in self.crashed:
            self.crashed.append(d)


EARLY_PHASES = ("entered", "logout", "barrier_a")   # not every CPU has logged yet


def _predict(ctx: _Ctx, waves: list, owner_of: dict, choices: dict, broken: set,
             stale: dict) -> dict:
    """Simulate every wave for one assignment of owners and timing choices."""
    run = _Run(ctx, broken)
    banks = {k: list(v) for k, v in stale.items()}
    writes: list = []
    targets_all: set = set()
    shutdown = False
    for w, wv in enumerate(waves):
        specs = wv["specs"]
        if w == 1:
            if run.outcome is not None:
                # The first wave already ended the machine. After a fatal panic in
                # barrier B MCIP is still set, so the second #MC shuts it down.
                mode = "shutdown" if run.panic and run.panic.startswith(PANIC_FATAL) else "late"
            else:
                mode = choices.get("nested", "merged")
            if mode == "hang":
                run.uneven = True
            elif mode != "merged":
                writes += _write_wave(ctx, banks, specs, len(writes))
                targets_all |= set(_wave_targets(ctx, specs, wv["local"])[0])
                if mode == "shutdown":
                    shutdown = True
                    run.outcome, run.panic = "shutdown", None
                    if wv.get("after_phase") in EARLY_PHASES:
                        run.uncertain_all = True
                else:
                    run.uncertain_all = True
                break
            if choices.get("cross_busy") is False:
                run.vmce_busy = set()      # the guests handled the first vMCEs in between
        writes += _write_wave(ctx, banks, specs, len(writes))
        targets, mcg = _wave_targets(ctx, specs, wv["local"])
        targets_all |= set(targets)
        if run.outcome is None and (run.mc(w, banks, targets, mcg, wv["local"], owner_of)
                                    or run.softirq(w, wv["local"])):
            if w + 1 < len(waves):
                continue
            break
    outcome = run.outcome
    if run.uneven:
        run.hazard("D", "a #MC nested between the CPUs' starts of mce_softirq: the CPUs "
                        "already in it run it twice, the others once, and the second round "
                        "waits in mce_inside_bar forever (a variant of hazard D, no barrier "
                        "timeout; not listed in xen-mca.md §10.2)")
        if outcome is None:
            outcome = run.outcome = "hang"
            # both handlers ran (the banks are as predicted); what the deferred work
            # did before the hang is not predictable
            run.uncertain_insts.update(x["inst"] for x in writes)
        else:
            run.uncertain_all = True
    if outcome is None:
        results = [a[3] for a in run.actions]
        outcome = "continued" if CONTINUE in results or not results else "recovered"
    reset = outcome in RESET_OUTCOMES
    first_action: dict = {}
    for a in run.actions:
        first_action.setdefault(a[2], a)
    errors = []
    for x in writes:
        s, inst = x["spec"], x["inst"]
        act = first_action.get(inst)
        info = act[4] if act else {}
        e = {"cpu": s["cpu"], "bank": s["bank"], "inst": inst,
             "class": classify(s["status"], ctx.ser),
             "bank_status": msr.hexs(x["bank_status"]), "kept": x["kept"],
             "clearable": clearable(x["found"], ctx.ser),
             "addr": msr.hexs(x["maddr"]),
             "owners": sorted(run.loggers.get(inst, ())),
             "cleared": inst in run.cleared,
             "action": ACTION_NAMES[act[3]] if act else None,
             "page_offline": info.get("page_offline"),
             "impacted_domain": info.get("impacted_domain"),
             "vmce": info.get("vmce"),
             "note": info.get("note")}
        e["vmce_target"] = e["vmce"]["domain"] if e["vmce"] else None
        valid = inst in banks and banks[inst][0] & VAL
        if reset:
            e["terminal"] = "boot" if valid else "lost"
        elif not run.loggers.get(inst):
            e["terminal"] = "unseen"
        elif inst not in run.committed:
            e["terminal"] = "lost"             # no CPU that logged it had telemetry
        elif e["vmce"] is not None:
            e["terminal"] = "vmce"
        else:
            e["terminal"] = "dom0"
        e["uncertain"] = (["action", "impacted_domain", "note", "page_offline", "terminal",
                           "vmce", "vmce_target"] if inst in run.uncertain_insts else [])
        errors.append(e)
    boot_log, left = [], []
    for _inst, v in sorted(banks.items(), key=lambda kv: (kv[1][3], kv[0])):
        if not v[0] & VAL:
            continue
        if reset:
            # boot-time logout: the BSP first, then each AP; the first sharer logs it
            boot_log.append({"cpu": min(ctx.topo.sharers(v[4], v[3])), "bank": v[3],
                             "status": msr.hexs(v[0])})
        else:
            left.append({"cpu": v[4], "bank": v[3], "status": v[0], "addr": v[1],
                         "misc": v[2]})
    for e in {e["inst"]: e for e in errors}.values():
        if not e["clearable"] and len(e["owners"]) > 1:
            run.hazard("H", f"cpu{e['cpu']}/bank{e['bank']}: a non-clearable {e['class']} is "
                            f"logged by every sharer {e['owners']} (duplicate records, hazard H)")
        if e["class"] in ("srao", "srar") and e["terminal"] == "lost" and not reset:
            run.hazard("E", f"cpu{e['cpu']}/bank{e['bank']}: no telemetry entry, so no page "
                            "offline and no vMCE (hazard E)")
    return {"outcome": outcome, "panic": run.panic if outcome == "reset" else None,
            "resets": 1 if reset else 0, "targets": sorted(targets_all),
            "fatal_cpus": run.fatal_cpus, "errors": errors, "boot_log": boot_log,
            "left_valid": left, "broken_after": [] if reset else sorted(run.broken),
            "crashed": [] if reset else sorted(run.crashed), "hazards": run.hazards,
            "uncertain_all": run.uncertain_all, "uncertain_top": sorted(run.uncertain_top),
            "shutdown": shutdown}


def expected(specs, topo, *, ser=True, broadcast=True, local=False, vmce_policy="owner",
             guests=1, owners=None, pool_exhausted=False, then=None, stale=None,
             broken_mfns=(), guest_vcpus=2, memory_pages=DEFAULT_MEMORY_PAGES) -> dict:
    """What Xen's outcome must be for these injected errors.

    ``specs``: the errors (dicts with cpu, bank, status, addr, misc, mcg, domain,
    ``emu run --error`` strings, or ErrorSpec objects), written in order into their
    banks, then one #MC: broadcast to every CPU, or to the first error's CPU only when
    ``local`` (LMCE) or not ``broadcast`` (mce_broadcast off). ``topo``: ``.ncpus``,
    ``.nbanks``, ``.scopes``, ``.sharers(cpu, bank)``, ``.inst``. ``ser``: MCG_SER_P.
    ``vmce_policy``: owner / dom0. ``guests``: HVM guests besides Dom0. ``owners``:
    per error (the first wave's, then ``then``'s), the observed owner CPUs (a list,
    an int or None; :func:`owners_of`), which decide who logged each shared clearable
    bank. ``pool_exhausted``: True (no telemetry entry for anyone) or the CPUs whose
    reservation failed (:func:`no_record_cpus_of`).

    Extensions: ``then``: a second wave, as ``Machine.inject``'s ``then=``;
    ``stale``: errors still in the banks before the trial (an earlier prediction's
    ``left_valid``); ``broken_mfns``: pages broken since the last boot (an earlier
    ``broken_after``); ``guest_vcpus``, ``memory_pages``: machine options.

    Returns a dict: ``outcome`` (None when it depends on something unobserved),
    ``outcomes`` (every possible one), ``panic``, ``resets``, ``targets``,
    ``fatal_cpus``, ``errors`` (per error: class, bank_status, kept, clearable,
    owners, cleared, action, page_offline {mfn, ret, status}, impacted_domain, vmce
    {domain, broadcast, vcpus, gaddr}, vmce_target, note, terminal = vmce / dom0 /
    boot / lost / unseen, uncertain: the fields not predictable), ``boot_log``,
    ``left_valid``, ``broken_after``, ``crashed``, ``hazards`` ({id, text}: B, C, D,
    E, H, I, K of xen-mca.md §10.2; D here is the uneven-softirq variant after a nested
    #MC), ``owner_dependent``, ``uncertain``, ``notes``.
    """
    if vmce_policy not in ("owner", "dom0"):
        raise UsageError("vmce_policy", f"{vmce_policy!r}: choose owner or dom0")
    ctx = _Ctx(topo, ser, broadcast, vmce_policy, guests, guest_vcpus, memory_pages,
               pool_exhausted)
    w1 = [normalize_spec(s, i) for i, s in enumerate(specs or [])]
    waves = [{"specs": w1, "local": bool(local)}]
    phase = None
    if then:
        t_err = then.get("errors") or []
        if isinstance(t_err, (str, dict)):
            t_err = [t_err]
        phase = then.get("after_phase")
        waves.append({"specs": [normalize_spec(s, len(w1) + i) for i, s in enumerate(t_err)],
                      "local": bool(then.get("local")), "after_phase": phase})
    notes: list[str] = []
    stale_banks = {}
    for k, s in enumerate(stale or []):
        s = normalize_spec(s, k)
        stale_banks[topo.inst[s["cpu"]][s["bank"]]] = [s["status"], s["addr"], s["misc"],
                                                       s["bank"], s["cpu"]]
    ow = list(owners) if owners is not None else []

    # The candidates for the owner of each clearable bank, wave by wave. Bank contents
    # do not depend on who owns what (a clearable bank is cleared whoever reads it).
    banks = {k: list(v) for k, v in stale_banks.items()}
    observed: dict = {}
    per_wave = []
    idx = 0
    for wv in waves:
        wi = _write_wave(ctx, banks, wv["specs"], idx)
        idx += len(wv["specs"])
        for x in wi:
            o = ow[x["index"]] if x["index"] < len(ow) else None
            o = [o] if isinstance(o, int) else list(o or [])
            observed.setdefault(x["inst"], set()).update(o)
        targets, _ = _wave_targets(ctx, wv["specs"], wv["local"])
        pts = {}
        for inst, v in sorted(banks.items()):
            if not v[0] & VAL or not clearable(v[0], ser):
                continue
            seers = [c for c in targets if topo.inst[c][v[3]] == inst]
            if seers:
                pts[inst] = (seers, v[3])
        for inst in pts:
            del banks[inst]
        per_wave.append(pts)
    choice_points: dict = {}
    for w, pts in enumerate(per_wave):
        for inst, (seers, bank) in pts.items():
            obs = observed.get(inst) or set()
            waves_in = sum(inst in p for p in per_wave)
            if len(obs) > waves_in:
                notes.append(f"bank {bank}: a clearable error logged by {sorted(obs)} "
                             "(expected exactly one owner)")
            cands = [c for c in seers if c in obs]
            bad = sorted(c for c in obs if all(c not in p[inst][0] for p in per_wave
                                                if inst in p))
            if bad:
                notes.append(f"bank {bank}: observed owner(s) {bad} are not among the CPUs "
                             f"that took the #MC and share the bank {seers}")
            choice_points[(w, inst)] = cands if obs and cands and waves_in == 1 else \
                (cands or seers)
    extra = {}
    if len(waves) > 1:
        if phase in UNEVEN_SOFTIRQ_PHASES:
            extra["nested"] = ["merged", "hang"]
        elif phase in POST_CLEAR_PHASES:
            extra["nested"] = ["merged"]
        else:
            extra["nested"] = ["shutdown", "merged", "hang"]
            if phase not in PRE_CLEAR_PHASES + RACY_PHASES:
                notes.append(f"after_phase {phase!r}: when the second #MC lands is not "
                             "predictable")
        extra["cross_busy"] = [True, False]
    keys = sorted(choice_points)
    xkeys = sorted(extra)
    dims = [choice_points[k] for k in keys] + [extra[k] for k in xkeys]
    n_combos = 1
    for dm in dims:
        n_combos *= len(dm)
    if n_combos > _MAX_COMBOS:
        notes.append(f"{n_combos} owner/timing combinations; only the first {_MAX_COMBOS} "
                     "were enumerated")
    preds = []
    by_timing: dict = {}
    for combo in itertools.islice(itertools.product(*dims), _MAX_COMBOS):
        p = _predict(ctx, waves, dict(zip(keys, combo[:len(keys)], strict=True)),
                     dict(zip(xkeys, combo[len(keys):], strict=True)), set(broken_mfns),
                     stale_banks)
        preds.append(p)
        by_timing.setdefault(combo[len(keys):], set()).add(p["outcome"])
    exp = _merge(preds)
    exp["owner_dependent"] = any(len(choice_points[k]) > 1 for k in keys)
    split = sorted({o for outs in by_timing.values() if len(outs) > 1 for o in outs},
                   key=OUTCOMES.index)
    if split:
        exp["hazards"].append({"id": "I", "text": "the outcome follows which CPU wins the "
                               f"logout lock: {' or '.join(split)} (hazard I)"})
    exp["notes"] = notes
    exp["specs"] = [s for wv in waves for s in wv["specs"]]
    exp["policy"] = {"ser": ser, "broadcast": broadcast, "local": bool(local),
                     "vmce_policy": vmce_policy, "guests": guests}
    return exp


def _merge(preds: list[dict]) -> dict:
    """One prediction from several (one per owner/timing assignment): fields that
    differ become uncertain, the outcomes are every outcome seen."""
    base = preds[0]
    out = {k: v for k, v in base.items()}
    out["outcomes"] = sorted({p["outcome"] for p in preds}, key=OUTCOMES.index)
    out["outcome"] = out["outcomes"][0] if len(out["outcomes"]) == 1 else None
    top_unc = set()
    for k in ("panic", "resets", "targets", "fatal_cpus", "boot_log", "left_valid",
              "broken_after", "crashed"):
        if any(p[k] != base[k] for p in preds):
            top_unc.add(k)
    for p in preds:
        top_unc |= set(p["uncertain_top"])
    if any(p["uncertain_all"] for p in preds):
        top_unc |= {"panic", "fatal_cpus", "boot_log", "left_valid", "broken_after",
                    "crashed", "errors"}
    out["uncertain"] = sorted(top_unc)
    hz = []
    for p in preds:
        for h in p["hazards"]:
            if h not in hz:
                hz.append(h)
    out["hazards"] = hz
    errs = []
    for k, e in enumerate(base["errors"]):
        e = dict(e)
        unc = set(e["uncertain"])
        for p in preds[1:]:
            o = p["errors"][k]
            for f in e:
                if f != "uncertain" and o[f] != e[f]:
                    unc.add(f)
            unc |= set(o["uncertain"])
        if "errors" in top_unc:
            unc |= {f for f in e if f not in ("cpu", "bank", "inst", "class", "addr")}
        e["uncertain"] = sorted(unc)
        errs.append(e)
    out["errors"] = errs
    for k in ("uncertain_all", "uncertain_top", "shutdown"):
        out.pop(k, None)
    return out


# ---------------------------------------------------------------------------------------
# comparison with a real trial result
# ---------------------------------------------------------------------------------------
def _hexint(v):
    if v is None:
        return None
    return int(v, 16) if isinstance(v, str) else int(v)


def compare(exp: dict, result: dict) -> list[str]:
    """Disagreements between a prediction and a trial result (``emu run --json``).

    Result fields read: outcome, resets, panic, targets, boot_log[].cpu/bank/status,
    domains[].domid/state, and per error: class, bank_status, kept, clearable,
    owners, cleared, action, page_offline (mfn, ret, status), impacted_domain,
    vmce (domain, broadcast, vcpus, gaddr), dom0_log[] (count, source, pending),
    lost. Fields the prediction marks uncertain are not compared."""
    d: list[str] = []
    unc = set(exp.get("uncertain", ()))
    for n in exp.get("notes", ()):
        if "not among" in n or "expected exactly one" in n:
            d.append(f"owners: {n}")
    out = result.get("outcome")
    if out == "deadlock":
        out = "hang"    # controlled scheduling: a hang, known at once (no watchdog)
    if out not in exp["outcomes"]:
        d.append(f"outcome: result {out!r}, model {' or '.join(exp['outcomes'])}")
        return d + _hazard_hint(exp)
    if exp["outcome"] is not None or "resets" not in unc:
        want = 1 if out in RESET_OUTCOMES else 0
        if result.get("resets", 0) != want:
            d.append(f"resets: result {result.get('resets')}, model {want}")
    definite = exp["outcome"] is not None
    if definite and "panic" not in unc and exp["panic"] is not None \
            and result.get("panic") != exp["panic"]:
        d.append(f"panic: result {result.get('panic')!r}, model {exp['panic']!r}")
    if "targets" not in unc and sorted(result.get("targets", [])) != exp["targets"]:
        d.append(f"targets: result {result.get('targets')}, model {exp['targets']}")
    if definite and out in RESET_OUTCOMES and "boot_log" not in unc:
        got = Counter((b["cpu"], b["bank"], _hexint(b["status"]))
                      for b in result.get("boot_log", []))
        want = Counter((b["cpu"], b["bank"], _hexint(b["status"])) for b in exp["boot_log"])
        if got != want:
            d.append(f"boot_log: result {sorted(got.elements())}, model "
                     f"{sorted(want.elements())}")
    if definite and "crashed" not in unc and out not in RESET_OUTCOMES:
        states = {x["domid"]: x.get("state") for x in result.get("domains", [])}
        for dom in exp["crashed"]:
            if dom in states and states[dom] != "crashed":
                d.append(f"DOM{dom}: model crashed, result {states[dom]!r}")
        for dom, st in states.items():
            if st == "crashed" and dom not in exp["crashed"]:
                d.append(f"DOM{dom}: crashed in the result, not in the model")
    res_errs = result.get("errors", [])
    if len(res_errs) != len(exp["errors"]):
        d.append(f"errors: result has {len(res_errs)}, model {len(exp['errors'])}")
        return d
    for k, (e, r) in enumerate(zip(exp["errors"], res_errs, strict=True)):
        d += _compare_error(k, e, r, definite, out)
    return d


def _hazard_hint(exp: dict) -> list[str]:
    return [f"  (model hazard {h['id']}: {h['text']})" for h in exp.get("hazards", [])]


def _compare_error(k: int, e: dict, r: dict, definite: bool, out: str) -> list[str]:
    tag = f"error[{k}] cpu{e['cpu']}/bank{e['bank']}"
    d = []
    unc = set(e.get("uncertain", ()))

    def diff(field, got, want):
        if field not in unc and got != want:
            d.append(f"{tag}: {field}: result {got!r}, model {want!r}")
    rc = r.get("class")
    diff("class", RESULT_CLASS_ALIASES.get(rc, rc), e["class"])
    diff("bank_status", _hexint(r.get("bank_status")), _hexint(e["bank_status"]))
    diff("kept", r.get("kept"), e["kept"])
    diff("clearable", r.get("clearable"), e["clearable"])
    diff("owners", sorted(r.get("owners") or []), e["owners"])
    diff("cleared", r.get("cleared"), e["cleared"])
    if not definite:
        return d
    diff("action", r.get("action"), e["action"])
    po_r, po_e = r.get("page_offline"), e["page_offline"]
    if "page_offline" not in unc:
        if (po_r is None) != (po_e is None):
            d.append(f"{tag}: page_offline: result {po_r!r}, model {po_e!r}")
        elif po_r is not None:
            got = (po_r["mfn"], po_r["ret"], sorted(set(po_r["status"]) - {"BROKEN"}))
            want = (po_e["mfn"], po_e["ret"], sorted(po_e["status"]))
            if got != want:
                d.append(f"{tag}: page_offline: result {got}, model {want}")
    diff("impacted_domain", r.get("impacted_domain"), e["impacted_domain"])
    vr, ve = r.get("vmce"), e["vmce"]
    if "vmce" not in unc:
        if (vr is None) != (ve is None):
            d.append(f"{tag}: vmce: result {vr!r}, model {ve!r}")
        elif vr is not None:
            got = (vr.get("domain"), bool(vr.get("broadcast")), list(vr.get("vcpus") or []),
                   _hexint(vr.get("gaddr")))
            want = (ve["domain"], ve["broadcast"], ve["vcpus"], _hexint(ve["gaddr"]))
            if got != want:
                d.append(f"{tag}: vmce (domain, broadcast, vcpus, gaddr): result {got}, "
                         f"model {want}")
    if "terminal" not in unc:
        d += _compare_terminal(tag, e, r)
    return d


def _compare_terminal(tag: str, e: dict, r: dict) -> list[str]:
    logs = r.get("dom0_log") or []
    mce = [x for x in logs if x.get("source") == "mce"]
    boot = [x for x in logs if x.get("source") == "boot"]

    def ok(x):
        return x.get("count") == 1 or "pending" in x
    t = e["terminal"]
    if t in ("dom0", "vmce") and (not mce or not all(ok(x) for x in mce) or r.get("lost")):
        return [(f"{tag}: terminal: model logged by Dom0 once per record, result "
                 f"dom0_log {logs} lost {r.get('lost')!r}")]
    if t == "boot" and (len(boot) != 1 or not ok(boot[0])):
        return [(f"{tag}: terminal: model logged once by boot-time logout, result "
                 f"dom0_log {logs}")]
    if t in ("lost", "unseen") and not r.get("lost"):
        return [f"{tag}: terminal: model {t} (no Dom0 record), result dom0_log {logs}"]
    return []
