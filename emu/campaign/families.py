"""Scenario families for stress campaigns.

A *family* is a small named generator ``family(rng, topo, machine_opts) -> Scenario``
that draws one trial's worth of errors from a :class:`numpy.random.Generator`:

- ``errors``: error specs in exactly the ``emu run --error`` syntax
  (``cpu=N bank=N status=0x.. addr=0x.. misc=0x.. mcg=0x.. [domain=D]``);
- ``local``: deliver the #MC as an LMCE to the first error's CPU;
- ``then``: an optional second wave, as :meth:`emu.machine.Machine.inject`'s ``then=``
  argument (``{"errors": [...], "after_phase": "...", "local": bool}``);
- Dom0 wishes: ``dom0_pause`` (pause Dom0's logger before the trial), ``prefill``
  (trials to inject first while it is paused, to use up the telemetry pool) and
  ``dom0_resume`` (resume it after the trial, then drain).

``topo`` is duck-typed (``.ncpus``, ``.nbanks``, ``.scopes``, ``.sharers(cpu, bank)``,
``.inst``); ``machine_opts`` is a dict of machine options the families read:
``guests`` (1), ``memory_pages`` (16384), ``hazard_c`` (0.0: the probability that
the lmce family raises an LMCE that defers nothing, which hangs the softirq,
xen-mca.md §10.2 C, and costs a watchdog period).

:func:`scenario_for` rebuilds trial ``i`` of a campaign from ``(seed, i)`` alone:
``numpy.random.SeedSequence([seed, i])`` spawns three independent child streams,
one for the scenario, one for the schedule perturbation (chaos) and one for fault
injection, so changing how perturbation draws never changes which errors a trial
injects (DESIGN.md §5).

A campaign runner should expect banks left valid (UCNA and CE are not cleared in the
#MC handler; an LMCE leaves other CPUs' banks alone) and pages broken by earlier
trials; :mod:`emu.trial.model` predicts both (``left_valid``, ``broken_after``), and
the simplest policy is a warm reset when a trial left a bank valid or crashed a
domain.

Pure: imports only the standard library, numpy, :mod:`emu.errors` and
:mod:`emu.hw.msr`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from emu.errors import UsageError
from emu.hw import msr

# --- the memory map (xen-mca.md §6, the default page table) ------------------------------
XEN_TEXT = (0x000, 0x100)
XEN_HEAP = (0x100, 0x180)
LOW_FREE = (0x180, 0x200)
DOM_BASE = 0x200
DOM_PAGES = 0x1000

# --- MCi_STATUS building blocks ---------------------------------------------------------
_V, _O, _UC, _EN = msr.MCi_STATUS_VAL, msr.MCi_STATUS_OVER, msr.MCi_STATUS_UC, msr.MCi_STATUS_EN
_MV, _AV, _PCC = msr.MCi_STATUS_MISCV, msr.MCi_STATUS_ADDRV, msr.MCi_STATUS_PCC
_S, _AR = msr.MCi_STATUS_S, msr.MCi_STATUS_AR
UCR_MEM = _V | _UC | _EN | _MV | _AV                 # an uncorrected error with an address
SRAO_CODES = tuple(range(0xC0, 0xD0)) + (0x17A,)      # memory scrub, L3 explicit writeback
SRAR_CODES = (0x134, 0x150)                           # data load, instruction fetch
UCNA_CODES = (0x136, 0x135, 0x17A, 0x9F)
CE_CODES = (0x151, 0x9F, 0x136, 0x10A)
MISC_PHYS = 0x86                                      # LSB 6, address mode 2 (physical)

# The two hazard-K vectors of xen-mca.md §10.2 K.
K_SRAO = 0xB500000000000000
K_SRAR = 0xBD80000000100134

MCG_OK = msr.MCG_STATUS_MCIP | msr.MCG_STATUS_RIPV                         # 0x5
MCG_RIPV_EIPV = MCG_OK | msr.MCG_STATUS_EIPV                               # 0x7
MCG_NO_RESTART = msr.MCG_STATUS_MCIP                                       # 0x4
MCG_EIPV_ONLY = msr.MCG_STATUS_MCIP | msr.MCG_STATUS_EIPV                  # 0x6

NESTED_PHASES = ("exit", "softirq", "softirq_worker")   # all after every CPU cleared MCIP
POOL_SLOTS = 30


@dataclass
class Scenario:
    """One trial: what to inject and how. ``to_dict`` is JSON-able and complete."""
    family: str
    errors: tuple = ()
    local: bool = False
    then: dict | None = None
    dom0_pause: bool = False
    prefill: tuple = ()          # error lists injected first, while Dom0 is paused
    dom0_resume: bool = False
    note: str = ""
    seed: int | None = None
    trial: int | None = None
    streams: dict = field(default_factory=dict)   # perturbation / fault seeds (uint64)

    def inject_args(self) -> dict:
        """Keyword arguments for :meth:`emu.machine.Machine.inject`."""
        return {"errors": list(self.errors), "local": self.local,
                "then": dict(self.then, errors=list(self.then["errors"])) if self.then
                else None}

    def all_errors(self) -> list[str]:
        """Every spec string the scenario injects (prefill, first wave, second wave)."""
        out = [s for p in self.prefill for s in p] + list(self.errors)
        if self.then:
            out += list(self.then["errors"])
        return out

    def to_dict(self) -> dict:
        return {"family": self.family, "errors": list(self.errors), "local": self.local,
                "then": (dict(self.then, errors=list(self.then["errors"]))
                         if self.then else None),
                "dom0_pause": self.dom0_pause, "prefill": [list(p) for p in self.prefill],
                "dom0_resume": self.dom0_resume, "note": self.note, "seed": self.seed,
                "trial": self.trial, "streams": dict(self.streams)}


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def spec(cpu: int, bank: int, status: int, addr: int | None = None, misc: int | None = None,
         mcg: int | None = None, domain: int | None = None) -> str:
    """One error in ``emu run --error`` syntax."""
    s = f"cpu={cpu} bank={bank} status=0x{status:016X}"
    if addr is not None:
        s += f" addr={addr:#x}"
    if misc is not None:
        s += f" misc={misc:#x}"
    if mcg is not None:
        s += f" mcg={mcg:#x}"
    if domain is not None:
        s += f" domain={domain}"
    return s


def _pick(rng: np.random.Generator, seq):
    seq = list(seq)
    return seq[int(rng.integers(len(seq)))]


def _coin(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _mscod(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 0x100)) << 16


def _banks(topo, *scopes: str) -> list[int]:
    """Banks of the given scopes that more than one CPU shares (any, if none)."""
    shared = [b for b in range(topo.nbanks) if topo.scopes[b] in scopes
              and len(topo.sharers(0, b)) > 1]
    return shared


def _any_shared_bank(topo) -> list[int]:
    return _banks(topo, "core", "package") or list(range(topo.nbanks))


def _opts(opts) -> tuple[int, int]:
    o = opts or {}
    return int(o.get("guests", 1)), int(o.get("memory_pages", 16384))


def _free_mfn(rng, opts) -> int:
    """A free page: the low free range or the memory above the last domain."""
    guests, pages = _opts(opts)
    hi = DOM_BASE + (guests + 1) * DOM_PAGES
    if hi < pages and _coin(rng, 0.7):
        return int(rng.integers(hi, pages))
    return int(rng.integers(*LOW_FREE))


def _offset(rng) -> int:
    return int(rng.integers(0, 0x200)) * 8


def _free_addr(rng, opts) -> int:
    return _free_mfn(rng, opts) << 12 | _offset(rng)


def _target(rng, opts, kinds=("free", "heap", "text", "dom0", "guest")):
    """(addr, domain) of a page of the given kind: machine addresses for Xen's and free
    pages, guest-physical addresses with ``domain=`` for Dom0's and the guests'."""
    guests, _ = _opts(opts)
    kinds = [k for k in kinds if k != "guest" or guests > 0]
    kind = _pick(rng, kinds)
    if kind == "free":
        return _free_addr(rng, opts), None
    if kind == "heap":
        return int(rng.integers(*XEN_HEAP)) << 12 | _offset(rng), None
    if kind == "text":
        return int(rng.integers(*XEN_TEXT)) << 12 | _offset(rng), None
    dom = 0 if kind == "dom0" else int(rng.integers(1, guests + 1))
    return int(rng.integers(0, DOM_PAGES)) << 12 | _offset(rng), dom


def _srao(rng) -> int:
    return UCR_MEM | _S | _mscod(rng) | _pick(rng, SRAO_CODES)


def _srar(rng) -> int:
    return UCR_MEM | _S | _AR | _mscod(rng) | _pick(rng, SRAR_CODES)


def _ucna(rng) -> int:
    return UCR_MEM | _mscod(rng) | _pick(rng, UCNA_CODES)


def _ce(rng) -> int:
    return _V | _EN | _AV | _pick(rng, CE_CODES)


def _fatal(rng) -> int:
    """An error Xen cannot recover: PCC, or a UCR the recoverable scan rejects."""
    return _pick(rng, (
        _V | _UC | _EN | _PCC,                                   # PCC (0xB2...)
        UCR_MEM | _PCC | _S | 0x17A,                             # SRAO with PCC
        UCR_MEM | _S | _AR | _O | 0x134,                         # SRAR with OVER
        UCR_MEM | _O | 0x136,                                    # UCNA with OVER
        UCR_MEM | _AR | 0x136,                                   # S=0 with AR=1
    )) | _mscod(rng)


def _cpu_of(rng, topo, bank: int | None = None) -> int:
    return int(rng.integers(topo.ncpus))


# ---------------------------------------------------------------------------------------
# the families
# ---------------------------------------------------------------------------------------
def owner_race(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """Clearable errors in core/package-scoped banks, injected on a random sharer: the
    first CPU into ``mce_logout_lock`` owns and clears each (hazard I). One error, or
    two in different banks. Classes: SRAO on a free page (recovered), SRAO without an
    action (continued), SRAR with RIPV=1 on a free page (recovered), a disabled UC
    (EN=0, continued)."""
    errs = []
    banks = _any_shared_bank(topo)
    n = 1 if len(banks) < 2 or _coin(rng, 0.6) else 2
    for b in rng.choice(banks, size=n, replace=False):
        b = int(b)
        cpu = _cpu_of(rng, topo, b)
        kind = _pick(rng, ("srao", "srao", "srao_noaction", "srar", "spurious"))
        if kind == "srao":
            errs.append(spec(cpu, b, _srao(rng), _free_addr(rng, machine_opts), MISC_PHYS,
                             MCG_OK))
        elif kind == "srao_noaction":
            errs.append(spec(cpu, b, UCR_MEM | _S | _mscod(rng) | 0x9F,
                             _free_addr(rng, machine_opts), MISC_PHYS, MCG_OK))
        elif kind == "srar":
            errs.append(spec(cpu, b, _srar(rng), _free_addr(rng, machine_opts), MISC_PHYS,
                             _pick(rng, (MCG_OK, MCG_RIPV_EIPV))))
        else:
            errs.append(spec(cpu, b, _V | _UC | _pick(rng, (0, _S)) | 0x9F, mcg=MCG_OK))
    return Scenario("owner_race", tuple(errs), note=f"{n} clearable error(s) in shared banks")


def multi(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """Several banks and CPUs, mixed classes (CE, UCNA, SRAO, SRAR, now and then a fatal
    one): the per-CPU record grouping decides the outcome (a CE or UCNA bank in the
    same record as an SRAO makes it CONTINUE); errors in one bank instance merge by
    the overwrite rules."""
    n = int(rng.integers(2, 5))
    errs = []
    mcg_given: set = set()
    for _ in range(n):
        b = int(rng.integers(topo.nbanks))
        cpu = _cpu_of(rng, topo, b)
        kind = _pick(rng, ("ce", "ucna", "srao", "srao", "srar")) if not _coin(rng, 0.08) \
            else "fatal"
        mcg = None
        if cpu not in mcg_given:
            mcg = _pick(rng, (MCG_OK, MCG_RIPV_EIPV))
            mcg_given.add(cpu)
        if kind == "ce":
            errs.append(spec(cpu, b, _ce(rng), mcg=mcg))
        elif kind == "ucna":
            errs.append(spec(cpu, b, _ucna(rng), _free_addr(rng, machine_opts), MISC_PHYS, mcg))
        elif kind == "srao":
            errs.append(spec(cpu, b, _srao(rng), _free_addr(rng, machine_opts), MISC_PHYS, mcg))
        elif kind == "srar":
            errs.append(spec(cpu, b, _srar(rng), _free_addr(rng, machine_opts), MISC_PHYS, mcg))
        else:
            errs.append(spec(cpu, b, _fatal(rng), mcg=mcg))
    return Scenario("multi", tuple(errs), note=f"{n} errors, mixed classes")


def fatal(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """PCC or unrecoverable errors (SRAR or UCNA with OVER, S=0 with AR=1): Xen resets
    without clearing the bank and boot-time logout logs it once after the reset. Now
    and then a clearable SRAO beside it, whose record the reset loses."""
    b = int(rng.integers(topo.nbanks))
    cpu = _cpu_of(rng, topo, b)
    errs = [spec(cpu, b, _fatal(rng), mcg=MCG_OK)]
    if _coin(rng, 0.3):
        # in another bank instance: merged into the fatal one by the overwrite rules,
        # it could make it recoverable (a UCNA with OVER hit by an SRAO becomes an
        # SRAO with OVER)
        others = [(c, b2) for c in range(topo.ncpus) for b2 in range(topo.nbanks)
                  if topo.inst[c][b2] != topo.inst[cpu][b]]
        if others:
            c2, b2 = others[int(rng.integers(len(others)))]
            errs.append(spec(c2, b2, _srao(rng), _free_addr(rng, machine_opts), MISC_PHYS))
    return Scenario("fatal", tuple(errs), note="unrecoverable: reset, boot-time logout")


def memory(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """SRAO / SRAR memory errors on pages of free memory (offlined: recovered), the Xen
    heap (pending: SRAO continues, SRAR resets), Xen text (offline fails), Dom0 and
    the guests (``domain=``: the page owner gets a broadcast vMCE, §6, §9.3). Rarely a
    second one in another domain's page in the same #MC."""
    def one(kinds=("free", "heap", "text", "dom0", "guest", "guest")):
        addr, dom = _target(rng, machine_opts, kinds)
        b = int(rng.integers(topo.nbanks))
        srar = _coin(rng, 0.35)
        status = _srar(rng) if srar else _srao(rng)
        mcg = _pick(rng, (MCG_OK, MCG_RIPV_EIPV))
        return spec(_cpu_of(rng, topo, b), b, status, addr, MISC_PHYS, mcg, dom), dom
    first, dom = one()
    errs = [first]
    if _coin(rng, 0.15):
        kinds = [k for k in ("free", "heap", "dom0", "guest")
                 if not (dom == 0 and k == "dom0") and not (dom and dom > 0 and k == "guest")]
        errs.append(one(tuple(kinds))[0])
    return Scenario("memory", tuple(errs), note="memory error(s) by page kind")


def ucna(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """UCNA seen in #MC: logged but not cleared, so every sharer logs it again (hazard
    H) and it stays in the bank (Xen continues). Variants: with or without an address,
    disabled (EN=0, cleared), and now and then with OVER (unrecoverable: reset)."""
    b = int(rng.integers(topo.nbanks))
    cpu = _cpu_of(rng, topo, b)
    r = rng.random()
    if r < 0.1:
        st = UCR_MEM | _O | _mscod(rng) | _pick(rng, UCNA_CODES)
        return Scenario("ucna", (spec(cpu, b, st, _free_addr(rng, machine_opts), MISC_PHYS,
                                      MCG_OK),), note="UCNA with OVER: unrecoverable")
    if r < 0.25:
        return Scenario("ucna", (spec(cpu, b, _V | _UC | _mscod(rng) | 0x136, mcg=MCG_OK),),
                        note="disabled UC (EN=0): cleared")
    if r < 0.45:
        return Scenario("ucna", (spec(cpu, b, _V | _UC | _EN | _mscod(rng) | 0x136,
                                      mcg=MCG_OK),), note="UCNA without an address")
    return Scenario("ucna", (spec(cpu, b, _ucna(rng), _free_addr(rng, machine_opts),
                                  MISC_PHYS, MCG_OK),), note="UCNA with an address")


def ripv(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """RIPV/EIPV combinations. Half the time the hazard-K pattern (§10.2 K): status
    0xB500000000000000 or 0xBD80000000100134 in a core-scoped bank with MCG_STATUS 0x4
    (0x6 for the SRAR now and then) on one sibling: Xen resets when that sibling owns
    the bank and continues (SRAO) or recovers (SRAR) when the other one does. Otherwise
    a clearable error anywhere with MCG_STATUS 0x4, 0x5, 0x6 or 0x7."""
    core = _banks(topo, "core")
    if core and _coin(rng, 0.5):
        b = _pick(rng, core)
        cpu = _pick(rng, topo.sharers(int(rng.integers(topo.ncpus)), b))
        if _coin(rng, 0.5):
            return Scenario("ripv", (spec(cpu, b, K_SRAO, mcg=MCG_NO_RESTART),),
                            note="hazard K: SRAO, RIPV=0 on one sibling")
        mcg = _pick(rng, (MCG_NO_RESTART, MCG_EIPV_ONLY))
        return Scenario("ripv", (spec(cpu, b, K_SRAR, _free_addr(rng, machine_opts),
                                      MISC_PHYS, mcg),),
                        note="hazard K: SRAR, RIPV=0 on one sibling")
    b = int(rng.integers(topo.nbanks))
    cpu = _cpu_of(rng, topo, b)
    mcg = _pick(rng, (MCG_NO_RESTART, MCG_OK, MCG_EIPV_ONLY, MCG_RIPV_EIPV))
    status = _pick(rng, (_srao(rng), _srar(rng), K_SRAO))
    return Scenario("ripv", (spec(cpu, b, status, _free_addr(rng, machine_opts), MISC_PHYS,
                                  mcg),), note=f"MCG_STATUS {mcg:#x}")


def lmce(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """Local machine checks (LMCE_S): one CPU, no rendezvous, the CPU runs the fatal
    check itself and its softirq handles only its own LMCE list. Errors in banks the
    CPU sees: SRAO / SRAR on a free page, UCNA, now and then a fatal one or RIPV=0.
    With probability ``machine_opts["hazard_c"]`` (default 0) only a CE: the LMCE
    defers nothing and the softirq waits for CPUs that never come (hazard C: hang)."""
    cpu = int(rng.integers(topo.ncpus))
    b = int(rng.integers(topo.nbanks))
    if _coin(rng, float((machine_opts or {}).get("hazard_c", 0.0))):
        return Scenario("lmce", (spec(cpu, b, _ce(rng), mcg=MCG_OK),), local=True,
                        note="hazard C: an LMCE with only a CE")
    kind = _pick(rng, ("srao", "srao", "srar", "ucna", "fatal", "ripv0"))
    addr = _free_addr(rng, machine_opts)
    if kind == "srao":
        s = spec(cpu, b, _srao(rng), addr, MISC_PHYS, MCG_OK)
    elif kind == "srar":
        s = spec(cpu, b, _srar(rng), addr, MISC_PHYS, MCG_RIPV_EIPV)
    elif kind == "ucna":
        s = spec(cpu, b, _ucna(rng), addr, MISC_PHYS, MCG_OK)
    elif kind == "fatal":
        s = spec(cpu, b, _fatal(rng), mcg=MCG_OK)
    else:
        s = spec(cpu, b, _srao(rng), addr, MISC_PHYS, MCG_NO_RESTART)
    return Scenario("lmce", (s,), local=True, note=f"LMCE, {kind}")


def nested(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """A second #MC during the softirq or after MCIP was cleared (``then`` with
    after_phase exit, softirq or softirq_worker): it must preempt the deferred work
    and nothing may be lost (xen-mca.md §2.5, per-CPU deferred lists). Both waves are
    clearable memory errors on free pages (sometimes a guest page in the second)."""
    banks = list(range(topo.nbanks))
    b1, b2 = (int(x) for x in rng.choice(banks, size=2, replace=len(banks) < 2))
    first = spec(_cpu_of(rng, topo, b1), b1, _srao(rng), _free_addr(rng, machine_opts),
                 MISC_PHYS, MCG_OK)
    if _coin(rng, 0.25) and _opts(machine_opts)[0] > 0:
        addr, dom = _target(rng, machine_opts, ("guest",))
    else:
        addr, dom = _free_addr(rng, machine_opts), None
    status = _srar(rng) if _coin(rng, 0.3) else _srao(rng)
    second = spec(_cpu_of(rng, topo, b2), b2, status, addr, MISC_PHYS, MCG_OK, dom)
    phase = _pick(rng, NESTED_PHASES)
    return Scenario("nested", (first,), then={"errors": [second], "after_phase": phase,
                                              "local": False},
                    note=f"second #MC after {phase}")


def _record_groups(topo) -> tuple[list[int], list[list[int]]]:
    """The banks and CPU groups that guarantee one telemetry record per group and
    #MC: a thread-scoped bank per CPU, else a core-scoped bank per core, else one
    group (whoever wins the logout lock takes every shared bank it sees)."""
    for scope in ("thread", "core"):
        banks = [b for b in range(topo.nbanks) if topo.scopes[b] == scope]
        if banks:
            groups = {}
            for c in range(topo.ncpus):
                groups.setdefault(topo.inst[c][banks[0]], []).append(c)
            return banks, list(groups.values())
    return list(range(topo.nbanks)), [list(range(topo.ncpus))]


def pool_pressure(rng: np.random.Generator, topo, machine_opts) -> Scenario:
    """Dom0 paused for a stretch: prefill trials (a clearable SRAO in a thread- or
    core-scoped bank of every CPU or core, so that each group owns one record) fill
    the 30-slot telemetry pool with committed records nobody fetches, then the trial
    itself: an SRAO or SRAR on a free page, or the hazard-K SRAR. Around the pool's
    end some CPUs get no entry; once it is empty Xen still clears the banks but defers
    nothing: no page offline, no vMCE, and the RIPV check is skipped (§5.6, hazard E).
    Dom0 resumes afterwards and must drain everything."""
    banks, groups = _record_groups(topo)
    k = max(1, math.ceil(POOL_SLOTS / len(groups)) + int(rng.integers(-2, 4)))
    prefill = []
    for _ in range(k):
        prefill.append(tuple(spec(_pick(rng, g), _pick(rng, banks), _srao(rng),
                                  _free_addr(rng, machine_opts), MISC_PHYS) for g in groups))
    b = int(rng.integers(topo.nbanks))
    kind = _pick(rng, ("srao", "srar", "k"))
    if kind == "k" and _banks(topo, "core"):
        cb = _pick(rng, _banks(topo, "core"))
        main = spec(int(rng.integers(topo.ncpus)), cb, K_SRAR, _free_addr(rng, machine_opts),
                    MISC_PHYS, MCG_EIPV_ONLY)
    elif kind == "srar":
        main = spec(_cpu_of(rng, topo, b), b, _srar(rng), _free_addr(rng, machine_opts),
                    MISC_PHYS, MCG_RIPV_EIPV)
    else:
        main = spec(_cpu_of(rng, topo, b), b, _srao(rng), _free_addr(rng, machine_opts),
                    MISC_PHYS, MCG_OK)
    return Scenario("pool_pressure", (main,), dom0_pause=True, prefill=tuple(prefill),
                    dom0_resume=True, note=f"{len(prefill)} prefill trials, then {kind}")


FAMILIES = {f.__name__: f for f in (owner_race, multi, fatal, memory, ucna, ripv, lmce, nested,
                                    pool_pressure)}


# ---------------------------------------------------------------------------------------
# mixes and trials
# ---------------------------------------------------------------------------------------
def parse_mix(text) -> dict[str, float]:
    """``"owner_race:3,memory:1"`` → ``{"owner_race": 3.0, "memory": 1.0}``. A family
    without a weight weighs 1; ``all`` stands for every family. A dict is checked the
    same way. Raises :class:`UsageError` (field ``scenario``) on an unknown family or
    a weight that is not a positive number."""
    if isinstance(text, dict):
        items = [(str(k), v) for k, v in text.items()]
    else:
        items = []
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            name, colon, w = part.partition(":")
            items.append((name.strip(), w.strip() if colon else "1"))
    if not items:
        raise UsageError("scenario", f"empty mix {text!r}; write FAMILY[:WEIGHT],... with "
                         f"families {', '.join(FAMILIES)}")
    mix: dict[str, float] = {}
    for name, w in items:
        names = list(FAMILIES) if name == "all" else [name]
        if name != "all" and name not in FAMILIES:
            raise UsageError("scenario", f"unknown family {name!r}; choose from "
                             f"{', '.join(FAMILIES)} (or all)")
        try:
            weight = float(w)
        except (TypeError, ValueError):
            raise UsageError("scenario", f"{name}:{w}: the weight must be a positive "
                             "number") from None
        if isinstance(w, bool) or not math.isfinite(weight) or weight <= 0:
            raise UsageError("scenario", f"{name}:{w}: the weight must be a positive number")
        for n in names:
            if n in mix:
                raise UsageError("scenario", f"family {n!r} given twice; give each once")
            mix[n] = weight
    return mix


def streams(seed: int, i: int) -> tuple:
    """The three independent child SeedSequences of trial ``i``: scenario,
    perturbation, fault."""
    for what, v in (("seed", seed), ("trial", i)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise UsageError(what, f"{v!r}: give a non-negative integer")
    return tuple(np.random.SeedSequence([int(seed), int(i)]).spawn(3))


def scenario_for(seed: int, i: int, mix, topo, opts=None) -> Scenario:
    """Trial ``i`` of the campaign with ``seed``, rebuilt from (seed, i) alone: the
    family is drawn by weight from ``mix`` (a string for :func:`parse_mix` or its
    dict), then generated from the scenario stream. The perturbation and fault
    streams are handed on as seeds in ``Scenario.streams``."""
    mix = parse_mix(mix)
    s_scn, s_pert, s_fault = streams(seed, i)
    rng = np.random.default_rng(s_scn)
    names = list(mix)
    w = np.array([mix[n] for n in names], dtype=float)
    name = names[int(rng.choice(len(names), p=w / w.sum()))]
    scn = FAMILIES[name](rng, topo, dict(opts or {}))
    scn.seed, scn.trial = int(seed), int(i)
    scn.streams = {"perturbation": int(s_pert.generate_state(1, np.uint64)[0]),
                   "fault": int(s_fault.generate_state(1, np.uint64)[0])}
    return scn
