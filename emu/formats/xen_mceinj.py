"""xen-mceinj, Xen's own injector (xen-mca.md §8, §9): its error table and options.

:func:`parse` turns an argv-like list (``["-t", "1", "-c", "2", "-d", "0"]``) into a
frozen :class:`Plan`: what the tool would stage and trigger (bank, MCi_STATUS,
MCG_STATUS with LMCE_S for ``-l``, MCi_MISC 0x86, the address and whether it is a
guest-physical one), the delivery (``mce``, ``cmci`` for the UCNA type, ``lmce``), the
emu spec string (with ``domain=D`` when ``-d`` names a real domain) and the outcome
Xen's code leads to (:class:`Expected`, from §3, §6, §8.2 and §9.3), including what
Xen's mce-test suite checked and whether that check can pass.

Two numberings of the table (``numbering=``):

- ``"current"`` (the default): ``tools/misc/xen-mceinj.c`` since the 2014 refactor
  ``cc31ff7b4c``: 0 "MCE_SRAO_MEM" bank 7 MCACOD 0x17A, 1 "MCE_SRAO_LLC" bank 8 0xCF,
  2 "CMCI_UCNA_LLC", 3 "AMD L1 icache parity", 4 "MCE_SRAO_MEM (Fatal)" (3 and 4 from
  ``4b3b9d3e19``), and ``-l`` (LMCE, ``b9cd216f74``, 2017).
- ``"2010"``: the first tool (``b6982669e8``, ``tools/tests/mce-test/tools``): types 0-2
  only, with 0 and 1 the other way round (0 "MCE_SRAO_MEM" bank 8 0xCF, 1
  "MCE_SRAO_LLC" bank 7 0x17A), so names and payloads agree; no ``-l``. The mce-test
  cases and their mcelog checks were written against this numbering.

Modelled: the options ``-t -c -d -p -l -D -h`` with the tool's number bases (``-c``
and ``-d`` decimal, ``-p`` and ``-t`` C style), its checks (type in the table, ``-l``
not with the CMCI type, the address below the domain's memory, ``-c`` below the CPU
count), the MSR batches it stages (:attr:`Plan.hypercalls`) and the trigger it uses.
Refused with a :class:`~emu.errors.UsageError` naming the option: unknown options,
missing or malformed values (where the tool would ignore trailing characters of
``-t`` or read ``-c 0x1`` as garbage), negative values, reserved domain ids other than
DOMID_XEN, ``--cpu``/``--domain``/``--page`` (declared without an argument, so the
tool crashes on them), ``--type`` (not declared), stray arguments (ignored by the tool).

The CMCI type (2) runs as ``via=cmci``: silicon reports the UCNA and raises the CMCI
on the CPUs sharing the bank; the owner logs it (xen-mceinj's software CMCI to every
CPU reaches the same handler; the CPUs that own nothing scan nothing).

Not modelled, and said so in :attr:`Plan.refusal` or :attr:`Plan.notes`: MSR
interposition (the
tool's values are seen only by the target CPU, which reads them through
``mca_rdmsr``; emu writes the bank itself, so siblings sharing it see it too - make
the bank thread-scoped to keep it private), the 2010 tool's own GPA→MFN translation
(emu translates ``domain=`` addresses itself), AMD (type 3's payload is graded by
emu's Intel handler, as a corrected error).

:class:`Expected` assumes what the mce-test cases assumed: Intel with MCG_SER_P, a
broadcast platform, Dom0 with VIRQ_MCA bound and a debug hypervisor (the
"Error is successfully recovered" line is a ``dprintk``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from emu.errors import UsageError
from emu.hw import msr

__all__ = [
    "ErrorType", "Expected", "MceTestCheck", "Plan", "TABLES", "NUMBERINGS",
    "MCE_TEST_CASES", "MCE_TEST_GREP", "DOMID_XEN", "DEFAULT_ADDR", "table", "parse", "expected",
    "mce_test_case",
]

DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_XEN = 0x7FF2
DEFAULT_ADDR = 0x180020
MC_MSRINJ_F_INTERPOSE = 0x1
MC_MSRINJ_F_GPADDR = 0x2
MC_MSRINJ_MAXMSRS = 8

NUMBERINGS = ("current", "2010")


@dataclass(frozen=True)
class ErrorType:
    """One row of xen-mceinj's table (§8.2)."""
    index: int
    description: str        # the tool's name for it
    mcg_status: int
    bank: int
    status: int
    misc: int
    cmci: bool              # delivered by CMCI (XEN_MC_inject_v2, CPU broadcast)
    comment: str            # the source comment above the row: what the payload is
    payload: str            # "llc_ewb_srao", "mem_scrub_srao", "llc_ewb_ucna", ...
    name_matches_payload: bool

    @property
    def mcacod(self) -> int:
        return msr.mcacod(self.status)


_P = {
    "llc_ewb_srao": dict(mcg_status=0x5, bank=7, status=0xBD2000008000017A, misc=0x86,
                         cmci=False, comment="LLC (Last Level Cache) EWB (Explicit Write "
                         "Back) SRAO MCE"),
    "mem_scrub_srao": dict(mcg_status=0x5, bank=8, status=0xBD000000004000CF, misc=0x86,
                           cmci=False, comment="Memory Patrol Scrub SRAO MCE"),
    "llc_ewb_ucna": dict(mcg_status=0x0, bank=9, status=0xBC20000080000136, misc=0x86,
                         cmci=True, comment="LLC EWB UCNA Error"),
    "amd_icache_ce": dict(mcg_status=0x5, bank=1, status=0x9400000000000151, misc=0x86,
                          cmci=False, comment="AMD L1 instruction cache data or tag parity."),
    "llc_ewb_fatal": dict(mcg_status=0x5, bank=7, status=0xBF2000008000017A, misc=0x86,
                          cmci=False, comment="LLC (Last Level Cache) EWB (Explicit Write "
                          "Back) SRAO MCE, with PCC"),
}


def _row(index: int, description: str, payload: str, matches: bool) -> ErrorType:
    return ErrorType(index=index, description=description, payload=payload,
                     name_matches_payload=matches, **_P[payload])


#: The table in both numberings.
TABLES: dict[str, tuple[ErrorType, ...]] = {
    "2010": (
        _row(0, "MCE_SRAO_MEM", "mem_scrub_srao", True),
        _row(1, "MCE_SRAO_LLC", "llc_ewb_srao", True),
        _row(2, "CMCI_UCNA_LLC", "llc_ewb_ucna", True),
    ),
    "current": (
        _row(0, "MCE_SRAO_MEM", "llc_ewb_srao", False),    # cc31ff7b4c swapped 0 and 1
        _row(1, "MCE_SRAO_LLC", "mem_scrub_srao", False),
        _row(2, "CMCI_UCNA_LLC", "llc_ewb_ucna", True),
        _row(3, "AMD L1 icache parity", "amd_icache_ce", True),
        _row(4, "MCE_SRAO_MEM (Fatal)", "llc_ewb_fatal", False),
    ),
}


def table(numbering: str = "current") -> tuple[ErrorType, ...]:
    """The error table of a numbering ("current" or "2010")."""
    if numbering not in TABLES:
        raise UsageError("numbering", f"{numbering!r} is not a numbering of xen-mceinj's "
                         f"table; use {' or '.join(repr(n) for n in NUMBERINGS)}")
    return TABLES[numbering]


# --- expected outcome (§3, §6, §8.3, §9.3) ------------------------------------------------
# What mcelog prints for each payload's MCACOD: before mcelog 570893f (2021) cache
# levels were printed as LL (Level-0..2), since then as LL+1.
_MCELOG = {
    "llc_ewb_srao": ("Generic CACHE Level-2 Eviction Error",
                     "Generic CACHE Level-3 Eviction Error"),
    "mem_scrub_srao": ("MEMORY CONTROLLER MS_CHANNELunspecified_ERR",
                       "MEMORY CONTROLLER MS_CHANNELunspecified_ERR"),
    "llc_ewb_ucna": ("Data CACHE Level-2 Data-Read Error", "Data CACHE Level-3 Data-Read Error"),
    "amd_icache_ce": ("Instruction CACHE Level-1 Instruction-Fetch Error",
                      "Instruction CACHE Level-2 Instruction-Fetch Error"),
    "llc_ewb_fatal": ("Generic CACHE Level-2 Eviction Error",
                      "Generic CACHE Level-3 Eviction Error"),
}
#: What mce-test's ``mcelog_verify TYPE`` greps for, keyed by the *type number* it passes.
MCE_TEST_GREP = {0: "MEMORY CONTROLLER MS_CHANNELunspecified_ERR",
                 1: "Generic CACHE Level-2 Eviction Error",
                 2: "Data CACHE Level-2 Data-Read Error"}

RECOVERED = "MCE: Error is successfully recovered"
TAINTED = "MCE: Error can't be recovered, system is tainted"
FATAL_PANIC = "MCE: Fatal error happened on CPUs"


@dataclass(frozen=True)
class MceTestCheck:
    """What Xen's mce-test checked for a case run with this type number (§9.1)."""
    requires: tuple[str, ...]       # "xen_verify", "guest_verify", "mcelog_verify"
    grep: str                       # mcelog_verify's string for this type number
    found_old_mcelog: bool          # in this payload's decode by pre-2021 mcelog
    found_new_mcelog: bool          # ... by mcelog since 570893f (2021)
    verdict: str                    # with the mcelog of the tests' time (pre-2021): "pass",
    #                                 "fail", or "depends" (on the page, for Xen's cases)


@dataclass(frozen=True)
class Expected:
    """The outcome Xen's code leads to for one injection (Intel, SER_P, broadcast)."""
    xen_class: str                  # §3.1: "SRAO", "UCNA", "CE", "FATAL"
    path: str                       # "#MC", "LMCE" or "CMCI"
    target: str                     # the address owner: "xen", "dom0" or "guest"
    bank_cleared: bool              # by the handler that sees it (§3.4)
    fatal: bool                     # mc_panic from the #MC handler
    action: str                     # what Xen does after the scan
    outcome: str                    # "recovered", "recovered_or_continue", "logged",
    #                                 "panic", "hang"
    telemetry: str                  # "URGENT" or "NONURGENT"
    xen_log: tuple[str, ...]        # console lines (debug builds for MCE: lines)
    guest_log: str | None           # what the impacted guest's kernel prints
    mcelog_old: str                 # Dom0 mcelog's decode, pre-2021 cache numbering
    mcelog_new: str                 # ... since mcelog 570893f (2021)
    mce_test: MceTestCheck | None   # for the types mce-test had (0-2), else None
    notes: tuple[str, ...]


_REQUIRES = {  # §9.2: which checks a case of a payload and target has to pass
    ("srao", "xen"): ("xen_verify", "mcelog_verify"),
    ("srao", "dom0"): ("xen_verify", "mcelog_verify"),
    ("srao", "guest"): ("xen_verify", "guest_verify", "mcelog_verify"),
    ("ucna", "xen"): ("mcelog_verify",),
    ("ucna", "dom0"): ("mcelog_verify",),
    ("ucna", "guest"): ("mcelog_verify",),
}


def expected(error: ErrorType, target: str, *, lmce: bool = False) -> Expected:
    """What Xen does with ``error`` when its address belongs to ``target`` ("xen":
    DOMID_XEN, a machine address; "dom0"; "guest": an HVM/HAP domU), as xen-mca.md
    §3.5, §6, §8.3 and §9.3 derive it from the code; ``lmce`` for ``-l``."""
    if target not in ("xen", "dom0", "guest"):
        raise UsageError("target", f"{target!r}: use xen, dom0 or guest")
    old, new = _MCELOG[error.payload]
    notes: list[str] = []
    guest_log = None
    path = "CMCI" if error.cmci else ("LMCE" if lmce else "#MC")
    if error.payload in ("llc_ewb_srao", "mem_scrub_srao"):
        xen_class, cleared, fatal, telemetry = "SRAO", True, False, "URGENT"
        if target == "xen":
            action = ("offline_page on the machine page: OFFLINED if it is free -> RECOVERED; "
                      "a Xen heap page (PENDING|XENPAGE) or a fixed Xen page (offline fails) "
                      "-> CONTINUE: logged and tainted")
            outcome, xen_log = "recovered_or_continue", (RECOVERED,)
            notes.append(f"only a free page gives '{RECOVERED}'; otherwise Xen prints "
                         f"'{TAINTED}' and the mce-test xen case fails")
        else:
            owner = "DOM0" if target == "dom0" else "the guest"
            vmce = ("broadcast to Dom0's vCPUs (Dom0 is trusted: no unmap)" if target == "dom0"
                    else "bank 1 with the guest-physical address, after its p2m entry became "
                    "p2m_ram_broken")
            if lmce:
                vmce += ("; with LMCE, to the interrupted vCPU alone if it enabled vLMCE and "
                         "was running that domain, else broadcast")
            action = (f"offline_page: PENDING|OWNED({owner}), the page is offlined when "
                      f"{owner} frees it; vMCE {vmce} -> RECOVERED; record committed, "
                      "VIRQ_MCA to Dom0")
            outcome, xen_log = "recovered", (RECOVERED,)
            if target == "guest":
                guest_log = "kernel page recovery"
    elif error.payload == "llc_ewb_ucna":
        xen_class, cleared, fatal, telemetry = "UCNA", True, False, "NONURGENT"
        action = ("the CMCI handler logs it with mc_domid = the page's owner and clears the "
                  "bank; no recovery action (Dom0 may ask for a page offline)")
        outcome, xen_log = "logged", ()
        notes.append("the CMCI handler scans only the banks its CPU owns: when a sibling owns "
                     "bank 9, the value interposed on the target CPU is never read (§8.3)")
    elif error.payload == "amd_icache_ce":
        xen_class, cleared, fatal, telemetry = "CE", False, False, "URGENT"
        action = ("logged by the #MC scan and committed at once; the bank is not cleared "
                  "(a CE in #MC is left for the poller or CMCI)")
        outcome, xen_log = "logged", ()
        notes.append("an AMD payload graded by the Intel handler (emu's); Xen's AMD path "
                     "registers no recovery handlers and is not modelled")
        if lmce:
            outcome = "hang"
            notes.append("LMCE that defers nothing: the CPU's softirq sees no LMCE work, "
                         "waits in mce_inside_bar for every online CPU and spins forever "
                         "(xen-mca.md §10.2 C)")
    else:  # llc_ewb_fatal
        xen_class, cleared, fatal, telemetry = "FATAL", False, True, "URGENT"
        action = ("PCC: the CPU joins mce_fatal_cpus; after barrier B mc_panic, HARDWARE "
                  "ERROR, reset; the bank stays for the boot-time logout")
        outcome, xen_log = "panic", (f"{FATAL_PANIC} <mask>", "HARDWARE ERROR")
        notes.append("with Xen's interposition nothing survives the reboot (§4.2); emu's "
                     "banks are sticky, so its boot-time logout logs the bank")
    check = None
    if error.index in MCE_TEST_GREP:
        kind = "ucna" if error.cmci else "srao"
        requires = _REQUIRES[(kind, target)]
        grep = MCE_TEST_GREP[error.index]
        found_old, found_new = grep in old, grep in new
        if not found_old:
            verdict = "fail"
        elif target == "xen" and "xen_verify" in requires:
            verdict = "depends"
        else:
            verdict = "pass"
        check = MceTestCheck(requires=requires, grep=grep, found_old_mcelog=found_old,
                             found_new_mcelog=found_new, verdict=verdict)
        if not found_old:
            notes.append(f"mce-test's mcelog_verify {error.index} greps '{grep}', but this "
                         f"type's payload (MCACOD {error.mcacod:#x}) decodes as '{old}': the "
                         "table swap of cc31ff7b4c makes the case fail")
        elif not found_new:
            notes.append(f"mcelog since 2021 prints '{new}', so mcelog_verify's '{grep}' is "
                         "found only with an older mcelog")
    return Expected(xen_class=xen_class, path=path, target=target, bank_cleared=cleared,
                    fatal=fatal, action=action, outcome=outcome, telemetry=telemetry,
                    xen_log=xen_log, guest_log=guest_log, mcelog_old=old, mcelog_new=new,
                    mce_test=check, notes=tuple(notes))


# --- the plan -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What one xen-mceinj command line asks for, and what it means for emu."""
    argv: tuple[str, ...]
    numbering: str
    action: str                 # "inject", "dump" (-D: print the address only), "help"
    type: int
    error: ErrorType
    cpu: int
    domid: int                  # DOMID_XEN unless -d
    domain: int | None          # the real domain whose GPA the address is, else None
    addr: int
    lmce: bool
    mcg_status: int             # as staged: the row's, plus LMCE_S (0x8) for -l
    delivery: str               # "mce", "cmci" or "lmce"
    gpaddr: bool                # MCi_ADDR staged with MC_MSRINJ_F_GPADDR
    hypercalls: tuple[str, ...]
    output: tuple[str, ...]     # what the tool prints (its log lines, or the help)
    spec: str | None            # the emu spec string (None for -D and -h)
    emu_local: bool | None      # emu's ``local`` (LMCE); None: emu cannot run it
    refusal: tuple[str, str] | None   # (option, why) when emu cannot run it
    expected: Expected
    notes: tuple[str, ...]

    @property
    def bank(self) -> int:
        return self.error.bank

    @property
    def status(self) -> int:
        return self.error.status

    @property
    def misc(self) -> int:
        return self.error.misc

    @property
    def target(self) -> str:
        return self.expected.target

    @property
    def runnable(self) -> bool:
        return self.refusal is None


_LONG = {  # long options as declared (all with no argument)
    "current": {"--dump": "D", "--help": "h", "--lmce": "l"},
    "2010": {"--dump": "D", "--help": "h"},
}
_LONG_BROKEN = {"--cpu": "-c CPU", "--domain": "-d DOMID", "--page": "-p ADDR"}
_WITH_ARG = {"c", "d", "p", "t"}


def _decimal(opt: str, text: str, what: str) -> int:
    if not re.fullmatch(r"[0-9]+", text):
        hint = " (a negative one, too)" if text.startswith("-") else ""
        raise UsageError(opt, f"{text!r} is not a {what}{hint}: xen-mceinj reads {opt} in "
                         "decimal digits only")
    return int(text, 10)


def _c_style(opt: str, text: str, what: str) -> int:
    """strtol(..., 0) as xen-mceinj uses it for -p and -t, without its leniencies."""
    if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]*", text):
        return int(text, 8)
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text, 10)
    if text.startswith("-"):
        raise UsageError(opt, f"{text!r}: {what} cannot be negative")
    raise UsageError(opt, f"{text!r} is not {what}: write 0x... (hex), 0... (octal) or "
                     "decimal")


def _split(argv, numbering: str) -> list[tuple[str, str | None]]:
    """getopt_long over ``c:Dd:t:hp:l`` (2010: without ``l``), strictly."""
    args = list(argv)
    if args and args[0].rsplit("/", 1)[-1] == "xen-mceinj":
        args = args[1:]
    optstring = {"c", "D", "d", "t", "h", "p"} | ({"l"} if numbering == "current" else set())
    out: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        a = str(args[i])
        i += 1
        if a == "--":
            if i < len(args):
                raise UsageError(args[i], f"unexpected argument {args[i]!r}: xen-mceinj "
                                 "takes options only")
            break
        if a.startswith("--"):
            name = a.split("=", 1)[0]
            if name in _LONG_BROKEN:
                raise UsageError(name, f"xen-mceinj declares {name} without an argument (it "
                                 f"crashes reading one): write {_LONG_BROKEN[name]}")
            if name == "--type":
                raise UsageError(name, "xen-mceinj has no --type (its help lists one, its "
                                 "option table does not): write -t N")
            if name == "--lmce" and numbering == "2010":
                raise UsageError(name, "the 2010 xen-mceinj has no LMCE option: -l came with "
                                 "b9cd216f74 (2017); use numbering 'current'")
            if name not in _LONG[numbering]:
                raise UsageError(name, f"unknown option {name}; xen-mceinj knows -t N -c CPU "
                                 "-d DOMID -p ADDR" + (" -l" if numbering == "current" else "")
                                 + " -D -h")
            if "=" in a:
                raise UsageError(name, f"{name} takes no value")
            out.append((_LONG[numbering][name], None))
            continue
        if not a.startswith("-") or a == "-":
            raise UsageError(a, f"unexpected argument {a!r}: xen-mceinj takes options only "
                             "(it ignores other words); did you mean -t, -c, -d or -p before "
                             "it?")
        j = 1
        while j < len(a):
            ch = a[j]
            j += 1
            opt = f"-{ch}"
            if ch == "l" and numbering == "2010":
                raise UsageError(opt, "the 2010 xen-mceinj has no -l: LMCE injection came "
                                 "with b9cd216f74 (2017); use numbering 'current'")
            if ch not in optstring:
                raise UsageError(opt, f"unknown option {opt}; xen-mceinj knows -t N -c CPU "
                                 "-d DOMID -p ADDR" + (" -l" if numbering == "current" else "")
                                 + " -D -h")
            if ch in _WITH_ARG:
                if j < len(a):
                    val, j = a[j:], len(a)
                elif i < len(args):
                    val = str(args[i])
                    i += 1
                else:
                    what = {"c": "a CPU number", "d": "a domain id", "p": "an address",
                            "t": "an error type"}[ch]
                    raise UsageError(opt, f"{opt} needs {what}")
                out.append((ch, val))
            else:
                out.append((ch, None))
    return out


def _help(rows: tuple[ErrorType, ...], numbering: str) -> tuple[str, ...]:
    lines = ["Usage: xen-mceinj [OPTION]...", "",
             "  -D, --dump           dump addr info without error injection",
             "  -c, --cpu=CPU        target CPU",
             "  -d, --domain=DOMID   target domain, the default is Xen itself",
             "  -h, --help           print this page",
             "  -p, --page=ADDR      physical address to report"]
    if numbering == "current":
        lines.append("  -l, --lmce           inject as LMCE (Intel only)")
    lines.append("  -t, --type=ERROR     error type")
    lines += [f"                       {r.index:2d} : {r.description}" for r in rows]
    return tuple(lines)


def parse(argv, *, numbering: str = "current", ncpus: int | None = None,
          nbanks: int | None = None, domids=None, max_gpa: int | None = None) -> Plan:
    """Parse xen-mceinj's arguments (without the program name, or with it first).

    With ``ncpus``, ``nbanks``, ``domids`` (the machine's domain ids) and ``max_gpa``
    (a domain's memory size in bytes, xenstore's ``memory/target``), ``-c``, the
    type's bank, ``-d`` and ``-p`` are checked against the machine. Raises
    :class:`UsageError` with the option as its field.
    """
    rows = table(numbering)
    argv = tuple(str(a) for a in argv)
    opts = _split(argv, numbering)
    type_, cpu, domid, addr, lmce, dump = 0, 0, DOMID_XEN, DEFAULT_ADDR, False, False
    action = "inject"
    for ch, val in opts:
        if ch == "h":
            action = "help"
            break
        if ch == "D":
            dump = True
        elif ch == "l":
            lmce = True
        elif ch == "c":
            cpu = _decimal("-c", val, "CPU number")
        elif ch == "d":
            domid = _decimal("-d", val, "domain id")
        elif ch == "p":
            addr = _c_style("-p", val, "an address")
        elif ch == "t":
            type_ = _c_style("-t", val, "an error type")
    if action != "help":
        action = "dump" if dump else "inject"
        if type_ >= len(rows):
            more = (" (types 3 and 4 came with 4b3b9d3e19 in 2014; use numbering 'current')"
                    if numbering == "2010" and type_ < len(TABLES["current"]) else "")
            raise UsageError("-t", f"type {type_} is not in the {numbering} table{more}; "
                             "types are " + ", ".join(f"{r.index} {r.description}"
                                                      for r in rows))
    error = rows[type_ if action != "help" else 0]
    if action == "help":
        return _plan_help(argv, numbering, rows, error)

    if domid > 0xFFFF:
        raise UsageError("-d", f"{domid} is not a domain id (they are 16-bit)")
    if domid >= DOMID_FIRST_RESERVED and domid != DOMID_XEN:
        raise UsageError("-d", f"{domid} ({domid:#x}) is a reserved domain id; give a real "
                         f"domain (0 for Dom0) or leave -d out for Xen itself (DOMID_XEN, "
                         f"{DOMID_XEN})")
    domain = None if domid == DOMID_XEN else domid
    if domain is not None and domids is not None and domain not in domids:
        raise UsageError("-d", f"domain {domain} does not exist; domains are "
                         f"{', '.join(map(str, domids))}")
    if addr > (1 << 63) - 1:
        raise UsageError("-p", f"{addr:#x} does not fit in xen-mceinj's long")
    if domain is not None and max_gpa is not None and addr >= max_gpa:
        raise UsageError("-p", f"{addr:#x} is not below domain {domain}'s memory ({max_gpa:#x}"
                         " bytes): xen-mceinj fails with 'gaddr exceeds max_gpa'; give a "
                         "guest-physical address below it")
    if lmce and error.cmci:
        raise UsageError("-l", f"type {type_} ({error.description}) is delivered by CMCI: "
                         "xen-mceinj has 'No support to inject CMCI as LMCE'; drop -l")
    if ncpus is not None and cpu >= ncpus:
        raise UsageError("-c", f"CPU {cpu} does not exist: -c {cpu} is larger than "
                         f"{ncpus - 1}")
    if nbanks is not None and error.bank >= nbanks:
        raise UsageError("-t", f"type {type_} writes bank {error.bank}, but MCG_CAP.COUNT is "
                         f"{nbanks} (banks 0..{nbanks - 1}): Xen refuses the MSR; give the "
                         f"machine at least {error.bank + 1} banks")

    mcg = error.mcg_status | (msr.MCG_STATUS_LMCE if lmce else 0)
    delivery = "cmci" if error.cmci else ("lmce" if lmce else "mce")
    target = "xen" if domain is None else ("dom0" if domain == 0 else "guest")
    exp = expected(error, target, lmce=lmce)
    gpaddr = numbering == "current" and domain is not None
    hyper = _hypercalls(numbering, error, cpu, domid, domain, addr, mcg, delivery)
    output = [f"get domain {domid} max gpa is: {max_gpa:#x}"] if (
        domain is not None and max_gpa is not None) else []
    output.append(f"get gaddr of error inject is: {addr:#x}")
    if action == "dump":
        output.append(f"Xen: gaddr={addr:#x}" if domain is None
                      else f"Dom{domain}: gaddr={addr:#x}")
    notes: list[str] = []
    if not error.name_matches_payload:
        why = ("cc31ff7b4c swapped the payloads of types 0 and 1 and kept the names"
               if type_ in (0, 1) else "it copies type 0, name and payload, and adds PCC")
        notes.append(f"type {type_} is named {error.description!r} but carries "
                     f"{error.comment!r} (MCACOD {error.mcacod:#x}): {why}")
    notes.append(f"xen-mceinj interposes the values for CPU {cpu} only (the other CPUs read "
                 f"their real banks); emu writes bank {error.bank} itself, so CPUs sharing it "
                 "(core or package scope) see it too: make it thread-scoped to keep it "
                 "private")
    if delivery == "mce":
        notes.append(f"XEN_MC_mceinject raises int $0x12 on every online CPU of a broadcast "
                     f"platform (on CPU {cpu} alone elsewhere), as emu's #MC delivery does "
                     "with local=False")
    spec = (f"cpu={cpu} bank={error.bank} status={msr.hexs(error.status)} "
            f"addr={msr.hexs(addr)} misc={msr.hexs(error.misc)} mcg={mcg:#x}"
            + (f" domain={domain}" if domain is not None else "")
            + (" via=cmci" if delivery == "cmci" else ""))
    emu_local: bool | None = delivery == "lmce"
    refusal = None
    if action == "dump":
        spec, emu_local = None, None
        refusal = ("-D", "-D only prints the address: xen-mceinj injects nothing")
    elif delivery == "cmci":
        emu_local = False
        notes.append("XEN_MC_inject_v2 sends the CMCI vector to every CPU; emu's silicon "
                     "raises it on the CPUs sharing the bank (via=cmci): either way only the "
                     "bank's CMCI owner logs it")
    return Plan(argv=argv, numbering=numbering, action=action, type=type_, error=error,
                cpu=cpu, domid=domid, domain=domain, addr=addr, lmce=lmce, mcg_status=mcg,
                delivery=delivery, gpaddr=gpaddr, hypercalls=hyper, output=tuple(output),
                spec=spec, emu_local=emu_local, refusal=refusal, expected=exp,
                notes=tuple(notes) + exp.notes)


def _plan_help(argv, numbering, rows, error) -> Plan:
    return Plan(argv=argv, numbering=numbering, action="help", type=0, error=error, cpu=0,
                domid=DOMID_XEN, domain=None, addr=DEFAULT_ADDR, lmce=False,
                mcg_status=error.mcg_status, delivery="cmci" if error.cmci else "mce",
                gpaddr=False, hypercalls=(), output=_help(rows, numbering), spec=None,
                emu_local=None, refusal=("-h", "-h only prints the help"),
                expected=expected(error, "xen"), notes=())


def _hypercalls(numbering, error, cpu, domid, domain, addr, mcg, delivery) -> tuple[str, ...]:
    """The MSR batches the tool stages (same cpu, flags and domid per batch) and its
    trigger, as text."""
    b = error.bank
    regs = (f"MCG_STATUS={mcg:#x}", f"MC{b}_STATUS={error.status:#018x}",
            f"MC{b}_MISC={error.misc:#x}")
    if numbering == "2010":
        where = "" if domain is None else f" (the machine address of DOM{domain}'s GPA, " \
                                           "translated by the tool through the M2P)"
        calls = [f"XEN_MC_msrinject cpu={cpu} flags=INTERPOSE: {' '.join(regs)} "
                 f"MC{b}_ADDR={addr:#x}{where}"]
    elif domain is None:
        calls = [f"XEN_MC_msrinject cpu={cpu} flags=INTERPOSE domid={domid:#x}: "
                 f"{' '.join(regs)} MC{b}_ADDR={addr:#x}"]
    else:
        calls = [f"XEN_MC_msrinject cpu={cpu} flags=INTERPOSE domid={domid}: {' '.join(regs)}",
                 f"XEN_MC_msrinject cpu={cpu} flags=INTERPOSE|GPADDR domid={domid}: "
                 f"MC{b}_ADDR={addr:#x} (Xen translates it through DOM{domid}'s p2m)"]
    calls.append({"mce": f"XEN_MC_mceinject cpu={cpu}",
                  "cmci": "XEN_MC_inject_v2 flags=TYPE_CMCI|CPU_BROADCAST",
                  "lmce": f"XEN_MC_inject_v2 flags=TYPE_LMCE cpumap={{{cpu}}}"}[delivery])
    return tuple(calls)


# --- Xen's mce-test cases (§9.2) ------------------------------------------------------------
#: case name -> (the -t its script passes, the address owner). The type numbers are the
#: 2010 ones: run with the current table, srao_mem and srao_llc inject each other's payload.
MCE_TEST_CASES: dict[str, tuple[int, str]] = {
    f"{name}/{target}": (t, target)
    for name, t in (("srao_mem", 0), ("srao_llc", 1), ("ucna_llc", 2))
    for target in ("dom0", "guest", "xen")
}


def mce_test_case(name: str, *, numbering: str = "current", guest_domid: int = 1,
                  cpu: int | None = None, addr: int | None = None, **machine) -> Plan:
    """The plan of the xen-mceinj command an mce-test case runs (``srao_mem/dom0``, ...).

    The script passes ``-t`` with the 2010 type number and ``-d 0`` (dom0), ``-d`` the
    new guest's id (guest, ``guest_domid``) or nothing (xen); ``numbering`` picks the
    tool it runs against. ``machine`` goes to :func:`parse` (``ncpus``, ``domids``, ...).
    ``plan.expected.mce_test`` says what the case checks and whether it can pass.
    """
    if name not in MCE_TEST_CASES:
        raise UsageError("case", f"unknown mce-test case {name!r}; cases are "
                         f"{', '.join(sorted(MCE_TEST_CASES))}")
    t, target = MCE_TEST_CASES[name]
    argv = ["-t", str(t)]
    if target != "xen":
        argv += ["-d", "0" if target == "dom0" else str(guest_domid)]
    if cpu is not None:
        argv += ["-c", str(cpu)]
    if addr is not None:
        argv += ["-p", hex(addr)]
    return parse(argv, numbering=numbering, **machine)
