"""Render machine-check records the way mcelog (andikleen/mcelog) prints them.

Pure functions, no I/O. Mirrors mcelog commit 2965a54 as captured in
``shared/vectors/mcelog_output.json`` (``mcelog --no-dmi --ascii [--raw]``):

* :func:`parse_ascii`   -- the ``--ascii`` input parser (``decodefatal`` in mcelog.c)
* :func:`format_record` -- ``dump_mce`` plus the architectural Intel decode of p4.c
* :func:`format_raw`    -- ``dump_mce_raw_ascii`` (``--raw``)
* :func:`decode_mca`    -- the compound MCA error-code decode (p4.c ``decode_mca``)
* :func:`format_log`    -- a whole run, records back to back

A record is a dict of ints named after ``struct mce`` (missing key = 0): ``cpu, extcpu,
bank, tsc, ip, cs, mcgstatus, status, addr, misc, time, mcgcap, apicid, socketid, cpuid,
cpuvendor`` (0 Intel, 2 AMD, ...), ``ppin, microcode``. Optional parser metadata:
``recordlen`` (bytes of struct mce the input supplied; default: a full kernel record),
``symbol`` (str, from ``RIP ... {sym}``), ``incomplete`` (count of unparsable fields),
``disclaimer_seen`` (input had "HARDWARE ERROR"). ``{"text": line}`` items are input lines
mcelog echoes verbatim; they keep their place in the output.

Deliberate limits:

* Only the architectural Intel decode is done. mcelog's model-specific add-ons (Core2 bus
  queue, Nehalem/Skylake/Sapphire Rapids memory detail, Skylake mirror-CE wording, P4
  ``Model:`` lines, KNL channel renumbering) and the AMD K8 decoder (incl. the names of
  K8 threshold banks 129-183) are not reproduced.
* Lines are right-stripped: mcelog writes ``"RIPV "``, ``"MISC %llx "``, ``"CPU %d %s "``
  with a trailing blank; the reference vectors (and so this module) drop it.
* TIME is rendered as ctime() in UTC (the vectors' environment). TSC is never turned into
  a wall time: mcelog needs the host's CPU MHz for that and printed nothing in the vectors.
"""
from __future__ import annotations

import fnmatch
import re
import time as _time
from collections.abc import Iterable

from emu.hw.msr import (
    MCG_SER_P,
    MCG_STATUS_BITS,
    MCG_STATUS_EIPV,
    MCG_TES_P,
    MCi_STATUS_ADDRV,
    MCi_STATUS_AR,
    MCi_STATUS_EN,
    MCi_STATUS_FWST,
    MCi_STATUS_MCA,
    MCi_STATUS_MISCV,
    MCi_STATUS_OVER,
    MCi_STATUS_PCC,
    MCi_STATUS_S,
    MCi_STATUS_UC,
    MCi_STATUS_VAL,
)

DISCLAIMER = "Hardware event. This is not a software error."
THERMAL_BANK = 128                       # Linux software banks (MCE_EXTENDED_BANK + n)
_EXT_BANKS = {THERMAL_BANK: "THERMAL EVENT",
              218: "Timeout waiting for exception on other CPUs",
              255: "ACPI/APEI reported error"}

# struct mce (mcelog.h): field -> (offset, size). mcelog prints some fields only if the
# record reaches them ("recordlen"); in --ascii mode that is the end of the furthest field
# the input set, so e.g. a lone SOCKETID (ends at 76) shows SOCKETID but not APICID (> 76).
_LAYOUT = dict(status=(0, 8), misc=(8, 8), addr=(16, 8), mcgstatus=(24, 8), ip=(32, 8),
               tsc=(40, 8), time=(48, 8), cpuvendor=(56, 1), cpuid=(60, 4), cs=(64, 1),
               bank=(65, 1), cpu=(66, 1), extcpu=(68, 4), socketid=(72, 4), apicid=(76, 4),
               mcgcap=(80, 8), ppin=(104, 8), microcode=(112, 4))
RECORD_LEN = 128                         # sizeof(struct mce) of a current kernel
_VENDORS = ("Intel", "Cyrix", "AMD", "UMC", "vendor 4", "Centaur", "vendor 6", "Transmeta", "NSC")

# --- compound MCA error code (p4.c) -----------------------------------------------------
_SIMPLE = ("No Error", "Unclassified", "Microcode ROM parity error", "External error",
           "FRC error", "Internal parity error", "SMM Handler Code Access Violation")
_TT = ("Instruction", "Data", "Generic", "Unknown")
_LL = ("Level-0", "Level-1", "Level-2", "Level-3")
_RRRR = ("Generic", "Read", "Write", "Data-Read", "Data-Write", "Instruction-Fetch",
         "Prefetch", "Eviction", "Snoop")
_PP = ("Local-CPU-originated-request", "Responed-to-request",  # sic, as mcelog prints it
       "Observed-error-as-third-party", "Generic")
_II = ("Memory-access", "Reserved", "IO", "Other-transaction")
_T = ("Request-did-not-timeout", "Request-timed-out")
_MMM = ("GEN", "RD", "WR", "AC", "MS", "RES5", "RES6", "RES7")
_MMM_DESC = ("Generic undefined request", "Memory read error", "Memory write error",
             "Address/Command error", "Memory scrubbing error", "Reserved 5", "Reserved 6",
             "Reserved 7")
_TRACK = {1: "green", 2: "yellow\nLarge number of corrected cache errors. System operating, "
          "but might lead\nto uncorrected errors soon", 3: "res3"}


def _pick(table: tuple[str, ...], i: int) -> str:
    return table[i] if i < len(table) else "UNKNOWN"


def _memory_controller(mca: int) -> list[str]:
    ch = "unspecified" if mca & 0xF == 0xF else str(mca & 0xF)
    mmm = (mca >> 4) & 7
    return [f"MEMORY CONTROLLER {_MMM[mmm]}_CHANNEL{ch}_ERR", f"Transaction: {_MMM_DESC[mmm]}"]


def decode_mca(mcacod: int, misc: int = 0, *, cpu: int = 0, socket: int = -1,
               pre2021: bool = False) -> list[str]:
    """The ``MCA: ...`` lines mcelog prints for an MCA error code.

    ``mcacod`` may be a whole MCi_STATUS: only bits 15:0 are decoded, but MISCV (bit 59)
    and ``misc`` are needed for the IO-MCA root-port line of bus errors. ``cpu``/``socket``
    appear in the bus-error line (socket -1 = unknown, as mcelog prints it).

    Cache errors (``0000 0001 RRRR TTLL``) print level LL+1 (Level-1..3, SDM numbering):
    mcelog commit 570893f (2021) changed this from LL (Level-0..2), so 0x017A is now
    "Generic CACHE Level-3 Eviction Error" where older mcelog (and Xen's docs) say Level-2.
    TLB, generic-hierarchy and bus errors still print LL unchanged (Level-0..3).
    ``pre2021``: decode as mcelog before 570893f (cache levels LL), the mcelog Xen's
    mce-test cases grep.
    """
    status, mca = mcacod, mcacod & MCi_STATUS_MCA
    out = []
    if mca & 0x1000:
        out.append("corrected filtering (some unreported errors in same region)")
        mca &= ~0x1000
    if mca < len(_SIMPLE):
        out.append(_SIMPLE[mca])
    elif mca >> 2 == 3:
        out.append(f"{_LL[mca & 3]} Generic cache hierarchy error")
    elif mca >> 4 == 1:
        out.append(f"{_TT[(mca >> 2) & 3]} TLB {_LL[mca & 3]} Error")
    elif mca >> 8 == 1:
        out.append(f"{_TT[(mca >> 2) & 3]} CACHE {_pick(_LL, (mca & 3) + (not pre2021))} "
                   f"{_pick(_RRRR, (mca >> 4) & 0xF)} Error")
    elif mca >> 9 == 1 and (mca >> 7) & 3 == 1:
        first, *rest = _memory_controller(mca)
        out += ["Memory as cache: " + first, *rest]
    elif mca >> 10 == 1:
        out.append("Internal Timer error" if mca == 0x400
                   else f"Internal unclassified error: {mca:x}")
    elif mca >> 11 == 1:
        out.append(f"BUS error: {socket} {cpu} {_LL[mca & 3]} {_PP[(mca >> 9) & 3]} "
                   f"{_pick(_RRRR, (mca >> 4) & 0xF)} {_II[(mca >> 2) & 3]} {_T[(mca >> 8) & 1]}")
        if status & MCi_STATUS_MISCV and status & 0xEFFF == 0x0E0B:
            out.append("IO MCA reported by root port %x:%02x:%02x.%x" % (
                (misc >> 32) & 0xFF, (misc >> 24) & 0xFF, (misc >> 19) & 0x1F, (misc >> 16) & 7))
    elif mca >> 7 == 1:
        out += _memory_controller(mca)
    else:
        out.append(f"Unknown Error {mca:x}")
    out[0] = "MCA: " + out[0]
    return out


# --- record output (mcelog.c dump_mce, p4.c decode_intel_mc) -----------------------------
def parse_cpuid(cpuid: int) -> tuple[int, int, int]:
    """(family, model, stepping) exactly as mcelog derives them from CPUID.1:EAX."""
    family, model = (cpuid >> 8) & 0xF, (cpuid >> 4) & 0xF
    if family == 0xF:
        family += (cpuid >> 20) & 0xFF
    if family in (6, 0xF):               # mcelog tests the *extended* family here
        model += ((cpuid >> 16) & 0xF) << 4
    return family, model, cpuid & 0xF


def _intel(cpu: tuple[int, int] | None) -> bool:
    """Whether mcelog picks an Intel cputype (and so decodes) for (vendor, cpuid).

    select_intel_cputype() yields an Intel type for every family >= 6 and CPU_GENERIC
    below; any other vendor is CPU_GENERIC or K8 (AMD decoding is out of scope).
    """
    return cpu is not None and cpu[0] == 0 and parse_cpuid(cpu[1])[0] >= 6


def _intel_decode(m: dict, cpu: int, socket: int, pre2021: bool = False) -> list[str]:
    g = lambda k: m.get(k, 0)  # noqa: E731
    status, mcgcap = g("status"), g("mcgcap")
    if g("bank") == THERMAL_BANK:
        if status & 1:
            return [f"Processor {cpu} heated above trip temperature. Throttling enabled.",
                    "Please check your system cooling. Performance will be impacted"]
        return [f"Processor {cpu} below trip temperature. Throttling disabled"]
    out = ["MCG status:" + " ".join(n for n, bit in MCG_STATUS_BITS if g("mcgstatus") & bit),
           "MCi status:"]
    if not status & MCi_STATUS_VAL:
        out.append("Machine check not valid")
    if status & MCi_STATUS_OVER:
        out.append("Error overflow")
    out.append("Uncorrected error" if status & MCi_STATUS_UC else "Corrected error")
    for bit, text in ((MCi_STATUS_EN, "Error enabled"),
                      (MCi_STATUS_MISCV, "MCi_MISC register valid"),
                      (MCi_STATUS_ADDRV, "MCi_ADDR register valid"),
                      (MCi_STATUS_PCC, "Processor context corrupt")):
        if status & bit:
            out.append(text)
    if status & (MCi_STATUS_S | MCi_STATUS_AR):  # so "UCNA" (S=AR=0) is never printed
        out.append(("UCNA", "AR", "SRAO", "SRAR")[(status >> 55) & 3])
    if mcgcap & MCG_SER_P and status & MCi_STATUS_FWST:
        out.append("Firmware may have updated this error")
    if (mcgcap == 0 or mcgcap & MCG_TES_P) and not status & MCi_STATUS_UC and (status >> 53) & 3:
        out += f"Threshold based error status: {_TRACK[(status >> 53) & 3]}".split("\n")
    return out + decode_mca(status, g("misc"), cpu=cpu, socket=socket, pre2021=pre2021)


def _has(m: dict, field: str) -> bool:
    return m.get("recordlen", RECORD_LEN) > _LAYOUT[field][0]


def _ctime(t: int) -> str:
    try:
        return _time.asctime(_time.gmtime(t))
    except (OverflowError, OSError, ValueError):
        return "(null)"                  # glibc ctime() fails -> printf("%s", NULL)


def format_record(m: dict, cputype_cpuid: tuple[int, int] | None = None, *,
                  pre2021: bool = False) -> list[str]:
    """Lines ``mcelog --ascii`` prints for one record (or the echoed line of a text item).

    The decode follows the record's own (cpuvendor, cpuid); when cpuid is 0, mcelog keeps
    the CPU type of the previous record that had one -- pass it as ``cputype_cpuid`` (this
    is what :func:`format_log` does). With neither, mcelog --ascii stays CPU_GENERIC and
    prints no MCG/MCi/MCA decode at all, as the vectors without PROCESSOR show.
    ``pre2021``: cache levels as mcelog printed them before 570893f (see
    :func:`decode_mca`).
    """
    if "text" in m:
        return [m["text"]]
    g = lambda k: m.get(k, 0)  # noqa: E731
    status, mcgstatus, bank = g("status"), g("mcgstatus"), g("bank")
    cpu = g("extcpu") or g("cpu")
    out = [] if m.get("disclaimer_seen") else [DISCLAIMER]
    head = f"CPU {cpu} " + (_EXT_BANKS.get(bank, f"Undecoded extended event {bank:x}")
                            if bank >= 128 else f"BANK {bank}")
    out.append(head + (f" TSC {g('tsc'):x}" if g("tsc") else ""))
    if g("ip"):
        inexact = "" if mcgstatus & MCG_STATUS_EIPV else " !INEXACT!"
        out.append(f"RIP{inexact} {g('cs'):02x}:{g('ip'):x}")
    regs = [f"{name} {g(name.lower()):x}" for name, bit in
            (("MISC", MCi_STATUS_MISCV), ("ADDR", MCi_STATUS_ADDRV)) if status & bit]
    if regs:
        out.append(" ".join(regs))
    if g("time"):
        out.append(f"TIME {g('time')} {_ctime(g('time'))}")
    if _intel((g("cpuvendor"), g("cpuid")) if g("cpuid") else cputype_cpuid):
        out += _intel_decode(m, cpu, g("socketid") if _has(m, "socketid") else -1, pre2021)
    out.append(f"STATUS {status:x} MCGSTATUS {mcgstatus:x}")
    ids = [f"MCGCAP {g('mcgcap'):x}"] if _has(m, "cpuid") and g("mcgcap") else []
    ids += [f"{k.upper()} {g(k):x}" for k in ("apicid", "socketid") if _has(m, k)]
    if ids:
        out.append(" ".join(ids))
    out += [f"{k.upper()} {g(k):x}" for k in ("ppin", "microcode") if _has(m, k) and g(k)]
    if _has(m, "cpuid") and g("cpuid"):
        vendor = _VENDORS[g("cpuvendor")] if g("cpuvendor") < len(_VENDORS) else "Unknown vendor"
        family, model, step = parse_cpuid(g("cpuid"))
        out.append(f"CPUID Vendor {vendor} Family {family} Model {model} Step {step}")
    if m.get("symbol"):
        out.append(f"RIP: {m['symbol']}")
    if m.get("incomplete"):
        out.append("(Fields were incomplete)")
    return out


def _chex(v: int) -> str:
    return f"{v:#x}" if v else "0"      # C "%#x" prints a bare 0 without the 0x prefix


def format_raw(m: dict) -> list[str]:
    """Lines of ``mcelog --ascii --raw`` (dump_mce_raw_ascii) for one record, with its
    trailing blank line. Text items print nothing in raw mode."""
    if "text" in m:
        return []
    g = lambda k: m.get(k, 0)  # noqa: E731
    out = [f"CPU {g('extcpu') or g('cpu')}", f"BANK {g('bank')}", f"TSC {_chex(g('tsc'))}",
           f"RIP {_chex(g('cs')) if g('cs') else '00'}:{_chex(g('ip'))}",  # "%#02x" of 0 is "00"
           f"MISC {_chex(g('misc'))}", f"ADDR {_chex(g('addr'))}",
           f"STATUS {_chex(g('status'))}", f"MCGSTATUS {_chex(g('mcgstatus'))}"]
    if _has(m, "cpuid"):
        out.append(f"PROCESSOR {g('cpuvendor')}:{_chex(g('cpuid'))}")
    for key, text in (("time", f"TIME {g('time')}"), ("socketid", f"SOCKETID {g('socketid')}"),
                      ("apicid", f"APICID {g('apicid')}"),
                      ("mcgcap", f"MCGCAP {_chex(g('mcgcap'))}")):
        if _has(m, key):
            out.append(text)
    return out + [""]


def format_log(records: Iterable[dict], raw: bool = False) -> str:
    """A whole ``mcelog --ascii`` run over ``records`` (as from :func:`parse_ascii`).

    mcelog writes records back to back -- each starts with the disclaimer line, with no
    blank line in between (dump_mce/Wprintf never emit one); only ``--raw`` ends every
    record with a blank line. The CPU type carries over to records without a cpuid.
    """
    lines: list[str] = []
    cputype_cpuid = None
    for m in records:
        lines += format_raw(m) if raw else format_record(m, cputype_cpuid)
        if m.get("cpuid"):
            cputype_cpuid = (m.get("cpuvendor", 0), m["cpuid"])
    return "".join(line + "\n" for line in lines)


# --- ASCII input (mcelog.c decodefatal) ---------------------------------------------------
_WS = " \t\n\v\f\r"
_CONV = re.compile(r"%(\*?)(\d*)(?:ll|L)?([udxsn]|\[[^\]]+\])")
_TOKEN = {"u": r"\d+", "d": r"[+-]?\d+", "x": r"(?:0[xX](?=[0-9a-fA-F]))?[0-9a-fA-F]+", "s": r"\S+"}
_SKIP_PATTERNS = ("MCA:*", "MCi_MISC register valid*", "MC? status*", "Unsupported new Family*",
                  "Kernel does not support page offline interface")
# keyword prefix (as strncmp'd by mcelog) -> sscanf format of a one-number keyword. The
# prefixes exclude each other, so checking them before RIP/PROCESSOR/... changes nothing.
_SIMPLE_FIELDS = {"STATUS": "STATUS %llx%n", "MCGSTA": "MCGSTATUS %llx%n", "TSC": "TSC %llx%n",
                  "ADDR": "ADDR %llx%n", "MISC": "MISC %llx%n", "TIME": "TIME %llu%n",
                  "MCGCAP": "MCGCAP %llx%n", "APICID": "APICID %x%n", "SOCKETID": "SOCKETID %u%n"}


def _scanf(fmt: str, s: str) -> tuple[list, int]:
    """The subset of C sscanf() mcelog's parser uses.

    Returns the values converted before the first mismatch and the offset stored by a
    trailing ``%n`` (0 when it was not reached, like mcelog's ``next``). The counts matter:
    mcelog falls back to other line formats and flags missing fields from them.
    """
    vals: list = []
    i = f = 0
    while f < len(fmt):
        c = fmt[f]
        if c in _WS:                      # format blank: any amount of input blanks
            while i < len(s) and s[i] in _WS:
                i += 1
            f += 1
            continue
        if c != "%":
            if i >= len(s) or s[i] != c:
                break
            i, f = i + 1, f + 1
            continue
        conv = _CONV.match(fmt, f)
        f = conv.end()
        suppress, width, kind = conv.groups()
        if kind == "n":
            return vals, i
        if kind[0] != "[":                # every conversion but %[ skips leading blanks
            while i < len(s) and s[i] in _WS:
                i += 1
        # %[set] is greedy without backtracking in C; a regex class + '+' behaves the same here
        tok = re.match(kind + "+" if kind[0] == "[" else _TOKEN[kind],
                       s[i:i + int(width)] if width else s[i:])
        if not tok:
            break
        i += tok.end()
        if not suppress:
            vals.append(tok.group() if kind == "s" else int(tok.group(), 16 if kind == "x" else 10))
    return vals, 0


def _skipgunk(s: str) -> str:
    """Drop syslog / printk prefixes ("mcelog: ", "<4>", "[ 12.34]", "mce: [Hardware Error]:")."""
    p = s.find("mcelog: ")
    if p >= 0:
        s = s[p + 8:]
    for opener, closer in (("<", ">"), ("[", "]")):
        s = s.lstrip(_WS)
        if s.startswith(opener):
            end = s.find(closer)
            s = s[end + 1:] if end >= 0 else ""
    s = s.lstrip(_WS)
    if s.startswith("mce: [Hardware Error]:"):
        s = s[22:]
    return s.lstrip(_WS)


def _skip_date(s: str) -> int:
    """Length of a ctime() date after "TIME n", or 0."""
    vals, end = _scanf("%10s %10s %u %u:%u:%u %u%n", s)
    if len(vals) != 7:
        return 0
    day_name, month, day, hour, minute, sec, year = vals
    short = lambda w: len(w) == 3 and w[0].isupper() and w[1:].islower()  # noqa: E731
    ok = (short(day_name) and short(month) and 1 <= day <= 31 and hour <= 24 and minute <= 59
          and sec <= 59 and year >= 1900)
    return end if ok else 0


def _unparse_cpuid(family: int, model: int) -> int:
    """CPUID.1:EAX from "CPUID Vendor V Family F Model M" (stepping is lost, as in mcelog)."""
    v = (min(family, 0xF) << 8) | (model & 0xF) << 4
    if family >= 0xF:
        v |= ((family - 0xF) & 0xFF) << 20
    if family in (6, 0xF):
        v |= ((model >> 4) & 0xF) << 16
    return v


def _vendor_num(name: str) -> int:
    """cpuvendor_to_num(): a leading strtoul(.., 0) number, else a vendor name, else 0."""
    num = re.match(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*", name)
    if num:
        g = num.group()
        return int(g, 16) if g[:2] in ("0x", "0X") else int(g, 8) if g[0] == "0" else int(g)
    return _VENDORS.index(name) if name in _VENDORS else 0


class _Record(dict):
    """A record under construction, with mcelog's bookkeeping."""

    def __init__(self) -> None:
        super().__init__(dict.fromkeys(_LAYOUT, 0), recordlen=0, symbol="", incomplete=0,
                         disclaimer_seen=False)

    def put(self, key: str, value: int, *, grow: bool = True) -> None:
        off, size = _LAYOUT[key]
        self[key] = value & ((1 << 8 * size) - 1)      # C assignment truncates to the field
        if grow:                                       # mcelog's FIELD(): extend recordlen
            self["recordlen"] = max(self["recordlen"], off + size)

    def missing(self) -> None:
        self["incomplete"] += 1


def _parse_field(m: _Record, s: str) -> tuple[int, str | None] | None:
    """Apply the keyword at the start of ``s`` to ``m``, like one pass of decodefatal().

    Returns (n, rest): n > 0 when data was taken, ``rest`` the remainder of the line to
    parse next (mcelog's ``next``) or None. Returns None for free text.
    """
    if s.startswith("CPU "):
        vals, end = _scanf("CPU %u: Machine Check%*[ :Ec-x]%16Lx Bank %d: %016Lx%n", s)
        if len(vals) == 1:                             # not the kernel panic format
            vals, end = _scanf("CPU %u BANK %u%n", s)
            if len(vals) != 2:
                vals, end = _scanf("CPU %u %u%n", s)
            m.put("cpu", vals[0], grow=False)
            if len(vals) == 2:
                m.put("bank", vals[1])
            else:
                m.missing()
        elif not vals:
            m.missing()
        else:
            m.put("cpu", vals[0], grow=False)
            m.put("mcgstatus", vals[1])
            if len(vals) > 2:
                m.put("bank", vals[2])
            if len(vals) > 3:
                m.put("status", vals[3], grow=False)   # mcelog's FIELD(status) is dead code
            else:
                m.missing()
        return len(vals), (s[end:] if end else None)
    for prefix, fmt in _SIMPLE_FIELDS.items():
        if s.startswith(prefix):
            vals, end = _scanf(fmt, s)
            key = fmt.split()[0].lower()
            if vals:
                m.put(key, vals[0])
            else:
                m.missing()
            if key == "time":
                end += _skip_date(s[end:])
            return len(vals), (s[end:] if end else None)
    if s.startswith("RIP"):
        s = s[13:] if s.startswith("RIP !INEXACT!") else s[3:]
        vals, end = _scanf("%02x:<%016Lx> {%99s}%n", s)
        m.put("cs", vals[0] if vals else 0, grow=False)
        if len(vals) >= 2:
            m.put("ip", vals[1])
        else:
            m.missing()
        if len(vals) == 3:
            m["symbol"] = vals[2]                      # keeps the '}' mcelog's %s swallows
        return len(vals), (s[end:] if end else None)
    if s.startswith("PROCESSOR"):
        vals, end = _scanf("PROCESSOR %u:%x%n", s)
        if len(vals) == 2:
            m.put("cpuvendor", vals[0])
            m.put("cpuid", vals[1])
        else:
            m.missing()
        return len(vals), (s[end:] if end else None)
    if s.startswith("CPUID"):
        vals, _ = _scanf("CPUID Vendor %30s Family %u Model %u\n", s)
        if len(vals) == 3:
            m.put("cpuvendor", _vendor_num(vals[0]))
            m.put("cpuid", _unparse_cpuid(vals[1], vals[2]))
        else:
            m.missing()
        return len(vals), None
    if "HARDWARE ERROR" in s:
        m["disclaimer_seen"] = True
        return 0, None
    if s.startswith("(XEN)"):
        if "The hardware reports a non fatal, correctable incident occurred" in s:
            vals = _scanf("CPU %d", s[s.find("CPU"):])[0] if "CPU" in s else []
            if vals:
                m.put("cpu", vals[0])
            return 0, None
        vals = _scanf("(XEN) Bank %d: %llx at %llx", s)[0]
        for key, v in zip(("bank", "status", "addr"), vals, strict=False):
            m.put(key, v, grow=key == "bank")
        return int(bool(vals)), None                   # mcelog keeps `sscanf(..) >= 1`, not n
    # mcelog fnmatch()es the line *with* its newline, so the last, exact pattern never hits
    if any(fnmatch.fnmatchcase(s + "\n", p) for p in _SKIP_PATTERNS):
        return 0, None
    return None


def parse_ascii(lines: Iterable[str]) -> list[dict]:
    """Parse mcelog ``--ascii`` input into records (and ``{"text": ...}`` echo items).

    Several keywords may share a line (``TSC 12 ADDR 1234 MISC 11``). A record ends at EOF
    or at a free-text line/word arriving after some data; free text is echoed after it.
    """
    out: list[dict] = []
    m, data = _Record(), False
    for line in lines:
        rest: str | None = line.rstrip("\r\n")
        while rest is not None:
            s = _skipgunk(rest)
            res = _parse_field(m, s)
            if res is None:                            # free text
                if s and data:
                    out.append(dict(m))
                    m, data = _Record(), False
                if s:
                    out.append({"text": s.rstrip()})
                break
            n, rest = res
            data = data or n > 0
    if data:
        out.append(dict(m))
    return out
