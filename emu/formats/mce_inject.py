"""mce-inject input files (andikleen/mce-inject, commit ca81c1d): parse, dump, plan.

mce-inject is Linux's software injector; people in the field describe machine checks
in its small language (peers.md §2). This module reads that language into frozen
:class:`Record` values, prints them back in the canonical ``--dump`` form
(:func:`dump`), and says what the records mean for emu: one emu spec string per
record (:func:`to_spec`, ``"cpu=N bank=N status=0x.. addr=0x.. misc=0x.. mcg=0x.."``)
and, per injection, how it is delivered (:func:`plan`, :class:`Injection`).

Pure code: no process, no machine, nothing imported from above :mod:`emu.hw.msr`
and :mod:`emu.errors`. Every problem is a :class:`~emu.errors.UsageError` whose
``field`` is ``FILE:LINE`` (e.g. ``"inject.txt:3"``) and whose message names the
keyword and the fix.

The language, as the tool reads it
----------------------------------
- A record starts with ``CPU n [bank]``, ``MCE`` (CPU 0), or the kernel panic line
  ``CPU n: Machine Check Exception: <mcgstatus> Bank <b>: <status>``. Fields follow,
  several to a line if wished; each ``CPU``/``MCE`` starts the next record.
- Keywords are case-insensitive, ``#`` comments to the end of the line, numbers are C
  style: ``0x`` hex (lowercase x, as the tool's scanner), leading ``0`` octal, else
  decimal.
- ``STATUS`` *replaces* the status built so far; ``ADDR``/``MISC`` OR ADDRV (bit 58)
  / MISCV (bit 59) into it. So ADDR and MISC must follow STATUS or their valid bits
  are lost - exactly as the tool does it; emu keeps that rule (the canonical dump
  relies on it: it prints MISC and ADDR before STATUS) and records a warning in
  :attr:`Record.warnings` when a STATUS drops a valid bit an earlier non-zero ADDR or
  MISC had set.
- Raise mode (peers.md §2.3): ``EXCP``/``POLL`` if given, else #MC exception when
  the status has UC and the poller otherwise. A record with ``HOLD`` is kept (one per
  CPU, a later one replaces it) and raised with the next record without HOLD, the
  *trigger*. On an exception trigger without ``NOBROADCAST`` every other CPU with no
  held record gets a synthetic record (bank 0, status = UC bit only, VAL clear;
  MCG_STATUS = the trigger's MCIP, plus RIPV if the trigger is UC), so all CPUs enter
  the handler. A poll trigger forces NOBROADCAST. Only the trigger's modifiers count.

Keyword by keyword: what emu models, carries or refuses
--------------------------------------------------------
=====================================  =====================================================
keyword                                in emu
=====================================  =====================================================
``CPU n [bank]``, ``MCE``              modelled: the spec's ``cpu=`` (and ``bank=``);
                                       ``ncpus``/``nbanks`` range-check them
panic line ``CPU n: Machine Check      modelled. Its two hex numbers must be unambiguous
Exception: M Bank B: S``               (``0x...``, or a value the same read as hex and as
                                       C, such as ``5``): the kernel prints them in hex
                                       without ``0x`` and the tool would read ``10`` as
                                       decimal. ``CPU n`` is honoured (the tool leaves
                                       ``extcpu`` at 0 in this form). Unlike the tool's
                                       grammar, no further field is needed after it.
``BANK n``                             modelled: ``bank=``
``STATUS`` words / numbers             modelled: ``status=``. Words: VAL OVER UC EN PCC S
                                       AR TES_YELLOW CORRECTED UNCORRECTED FATAL UCNA(0)
                                       SRAO(S) SRAR(S|AR); a number ORs in (MCACOD, ...);
                                       emu also takes ADDRV, MISCV and ``MCACOD=N``
                                       (16 bits), which the tool's grammar lacks
``MCGSTATUS`` words / numbers          modelled: ``mcg=`` carries RIPV EIPV MCIP LMCES
                                       (bits 0-3, all of emu's MCG_STATUS). TES_P (bit 11,
                                       really an MCG_CAP bit), SEAM_NR (bit 12) and any
                                       other bit are kept in the record and the dump but
                                       not passed to emu; :func:`plan` notes each drop
``ADDR n``, ``MISC n``                 modelled: ``addr=``, ``misc=`` and the valid bits
``RIP n | cs:ip | cs:<ip> {sym}``      carried (record, dump), not passed on: Xen takes
                                       the interrupted context from the CPU itself
                                       (emu: what the emulated CPU runs), not from an
                                       injector; the symbol is dropped, as by the tool
``TSC TIME SOCKETID APICID MCGCAP``    carried, not passed on: Xen's handler reads TSC,
``PROCESSOR v:cpuid``                  topology and MCG_CAP from the (emulated) machine
``HOLD``                               modelled: joined to the next trigger
``NOBROADCAST``                        modelled: with LMCES in the trigger's MCGSTATUS it
                                       is emu's ``local`` (LMCE) delivery; without, it
                                       raises #MC on a subset of CPUs, which emu cannot
                                       do (and which hangs Xen's rendezvous, xen-mca.md
                                       §10.2 D): :func:`to_specs` refuses it
``NMIBROADCAST``                       accepted: the tool's default kick, a no-op there
``EXCP``                               modelled: #MC delivery
``POLL`` (and the no-UC default)       modelled: ``via=poll`` (Xen's poller runs a round
                                       at once and logs it); a status silicon signals by
                                       #MC (fatal, SRAO, SRAR) is refused: add EXCP
``IRQBROADCAST``                       refused: an IRQ kick that CPUs with interrupts off
                                       take late; emu raises every target at once
``IN_IRQ``, ``IN_PROC``                refused: the Linux context the record is raised
                                       from; emu's #MC hits what the CPU is running
``CMCI``                               refused: not an mce-inject keyword (the tool has
                                       POLL and EXCP); write the spec with ``via=cmci``, or
                                       use :mod:`emu.formats.xen_mceinj` ``-t 2``
=====================================  =====================================================

Also refused, each with FILE:LINE: unknown keywords (with a close match when there
is one), bad numbers (``08``, ``0X1F``, ``0x``, ``12ab``, wider than the field: 64 bits,
or 8 for bank and cs, 32 for cpu, cpuid, socketid, apicid), a field before any
``CPU``/``MCE``, a record with no field (``CPU 0`` then ``CPU 1``, as the tool's
grammar), STATUS words after MCGSTATUS and the reverse (the repository's own
``test/uncorrected`` puts EIPV after STATUS and fails so), a HOLD record that no
trigger follows (:func:`plan`).

What a record means in emu
--------------------------
Linux's injector keeps one fake bank per CPU (every other bank reads 0). emu writes
the record into the machine's real bank instead: a bank shared by siblings (core or
package scope) is seen by them too, and the other banks hold what they hold. CPUs
without a record that take a broadcast #MC read their real banks, with MCG_STATUS
MCIP|RIPV (emu's default for them).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from emu.errors import UsageError
from emu.hw import msr
from emu.xen import severity as sev

__all__ = [
    "Record", "Injection", "STATUS_WORDS", "MCGSTATUS_WORDS", "REFUSED",
    "parse", "parse_file", "dump", "to_spec", "plan", "to_specs",
]

# --- bit values (mce.h of mce-inject; the STATUS ones are emu.hw.msr's) -------------
MCG_STATUS_TES_P = 1 << 11      # mce-inject's name; architecturally MCG_CAP.TES_P's bit
MCG_STATUS_SEAM_NR = 1 << 12    # TDX: the #MC hit SEAM non-root mode
EMU_MCG_BITS = (msr.MCG_STATUS_RIPV | msr.MCG_STATUS_EIPV | msr.MCG_STATUS_MCIP
                | msr.MCG_STATUS_LMCE)   # what emu's MCG_STATUS (and spec mcg=) holds

STATUS_WORDS: dict[str, int] = {
    "VAL": msr.MCi_STATUS_VAL, "OVER": msr.MCi_STATUS_OVER, "UC": msr.MCi_STATUS_UC,
    "EN": msr.MCi_STATUS_EN, "PCC": msr.MCi_STATUS_PCC, "S": msr.MCi_STATUS_S,
    "AR": msr.MCi_STATUS_AR, "TES_YELLOW": msr.MCi_STATUS_TES_YELLOW,
    "CORRECTED": msr.MCi_STATUS_VAL | msr.MCi_STATUS_EN,
    "UNCORRECTED": msr.MCi_STATUS_VAL | msr.MCi_STATUS_UC | msr.MCi_STATUS_EN,
    "FATAL": msr.MCi_STATUS_VAL | msr.MCi_STATUS_UC | msr.MCi_STATUS_EN | msr.MCi_STATUS_PCC,
    "UCNA": 0,                                   # a label only: combine with UNCORRECTED
    "SRAO": msr.MCi_STATUS_S,
    "SRAR": msr.MCi_STATUS_S | msr.MCi_STATUS_AR,
    # emu's additions (not in the tool's grammar, which sets them only through ADDR and
    # MISC): the valid bits by name, for a status written out in words
    "ADDRV": msr.MCi_STATUS_ADDRV, "MISCV": msr.MCi_STATUS_MISCV,
}
MCGSTATUS_WORDS: dict[str, int] = {
    "RIPV": msr.MCG_STATUS_RIPV, "EIPV": msr.MCG_STATUS_EIPV, "MCIP": msr.MCG_STATUS_MCIP,
    "LMCES": msr.MCG_STATUS_LMCE, "TES_P": MCG_STATUS_TES_P, "SEAM_NR": MCG_STATUS_SEAM_NR,
}
_MCG_NAMES = {v: k for k, v in MCGSTATUS_WORDS.items()}

#: Keywords emu recognises and refuses, with the reason and the fix.
REFUSED: dict[str, str] = {
    "IN_IRQ": "IN_IRQ picks the Linux context (an interrupt) mce-inject raises the record "
              "from; emu's #MC hits whatever the emulated CPU is running (idle, a guest or "
              "Xen), as the hardware's does: remove IN_IRQ",
    "IN_PROC": "IN_PROC picks the Linux context (a process) mce-inject raises the record "
               "from; emu's #MC hits whatever the emulated CPU is running (idle, a guest or "
               "Xen), as the hardware's does: remove IN_PROC",
    "IRQBROADCAST": "IRQBROADCAST makes mce-inject kick the other CPUs with an IRQ, which a "
                    "CPU with interrupts off takes late; emu raises every target CPU at once "
                    "(what NMIBROADCAST, the default, approximates): remove IRQBROADCAST",
    "CMCI": "CMCI is not an mce-inject keyword (the tool raises by POLL or EXCP): use EXCP "
            "for a #MC or POLL for the poller, or give emu the spec with via=cmci (or "
            "xen-mceinj -t 2, emu.formats.xen_mceinj)",
}
_PANIC_WORDS = ("MACHINE", "CHECK", "EXCEPTION")
_FIELDS = ("BANK", "STATUS", "MCGSTATUS", "ADDR", "MISC", "RIP", "TSC", "TIME", "SOCKETID",
           "APICID", "MCGCAP", "PROCESSOR", "HOLD", "NOBROADCAST", "NMIBROADCAST", "POLL",
           "EXCP")
_ALL_WORDS = ("CPU", "MCE", *_FIELDS, *REFUSED, *STATUS_WORDS, *MCGSTATUS_WORDS,
              *_PANIC_WORDS)

_U8, _U32, _U64 = (1 << 8) - 1, (1 << 32) - 1, msr.U64


# --- records ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One mce-inject record: the fields of ``struct mce`` the language sets, plus its
    modifiers. Equality covers exactly those; where it came from (``source``,
    ``line``, ``lines``) and parse ``warnings`` are metadata, not compared."""
    cpu: int = 0
    bank: int = 0
    status: int = 0
    mcgstatus: int = 0
    addr: int = 0
    misc: int = 0
    ip: int = 0
    cs: int = 0
    tsc: int = 0
    time: int = 0
    socketid: int = 0
    apicid: int = 0
    mcgcap: int = 0
    cpuvendor: int = 0
    cpuid: int = 0
    hold: bool = False
    nobroadcast: bool = False
    nmibroadcast: bool = False
    raise_mode: str | None = None          # "exception" (EXCP), "poll" (POLL), None: by UC
    source: str = field(default="<stdin>", compare=False)
    line: int = field(default=0, compare=False)            # where the record starts
    lines: tuple[tuple[str, int], ...] = field(default=(), compare=False)  # keyword, line
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def where(self) -> str:
        """``FILE:LINE`` of the record's start."""
        return f"{self.source}:{self.line}"

    def where_of(self, keyword: str) -> str:
        """``FILE:LINE`` of the last ``keyword`` in this record (else of its start)."""
        for kw, line in reversed(self.lines):
            if kw == keyword:
                return f"{self.source}:{line}"
        return self.where

    @property
    def mode(self) -> str:
        """The raise mode: EXCP/POLL if given, else exception iff the status has UC."""
        if self.raise_mode:
            return self.raise_mode
        return "exception" if self.status & msr.MCi_STATUS_UC else "poll"


# --- scanning -------------------------------------------------------------------------------
class _Tok(NamedTuple):
    kind: str       # "word", "num" or "punct"
    text: str
    line: int


_TOKEN = re.compile(r"[ \t\r\f\v]+|[:{}<>=]|[A-Za-z0-9_]+|.")


def _scan(text: str, source: str) -> list[_Tok]:
    toks = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        body = raw.split("#", 1)[0]
        for m in _TOKEN.finditer(body):
            t = m.group()
            if t[0] in " \t\r\f\v":
                continue
            if t in ":{}<>=":
                toks.append(_Tok("punct", t, lineno))
            elif t[0].isdigit():
                toks.append(_Tok("num", t, lineno))
            elif t[0].isalpha() or t[0] == "_":
                toks.append(_Tok("word", t, lineno))
            else:
                hint = (" (list STATUS and MCGSTATUS words separated by blanks: they are ORed)"
                        if t in "|+," else "")
                raise UsageError(f"{source}:{lineno}", f"unexpected character {t!r}{hint}")
    return toks


def _c_number(text: str) -> int | None:
    """The value of a C integer literal as mce-inject's scanner reads it, or None."""
    if re.fullmatch(r"0x[0-9a-fA-F]+", text):
        return int(text, 16)
    if re.fullmatch(r"0[0-7]*", text):
        return int(text, 8)
    if re.fullmatch(r"[1-9][0-9]*", text):
        return int(text, 10)
    return None


def _number_problem(text: str) -> str:
    if re.fullmatch(r"0X[0-9a-fA-F]+", text):
        return f"write hex with a lowercase 0x ({'0x' + text[2:]}): mce-inject's scanner " \
               "knows no 0X"
    if re.fullmatch(r"0[0-9]+", text):
        return "a leading 0 makes it octal (digits 0-7): drop the 0 for decimal, or write " \
               "0x for hex"
    return "write a C number: 0x... (hex), 0... (octal) or decimal"


# --- parsing --------------------------------------------------------------------------------
class _Draft:
    """The record being built (mutable), with what the warnings need."""

    def __init__(self, start: _Tok):
        self.v: dict = {"line": start.line}
        self.status = 0
        self.lines: list[tuple[str, int]] = [(start.text.upper(), start.line)]
        self.terms = 0
        self.panic_line = False
        self.seen: set[str] = set()
        self.warnings: list[str] = []


class _Parser:
    def __init__(self, text: str, source: str, ncpus: int | None, nbanks: int | None):
        self.source, self.ncpus, self.nbanks = source, ncpus, nbanks
        self.toks = _scan(text, source)
        self.i = 0

    # -- token helpers --------------------------------------------------------------------
    def at(self, tok: _Tok) -> str:
        return f"{self.source}:{tok.line}"

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok | None:
        tok = self.peek()
        self.i += tok is not None
        return tok

    def number(self, kw: _Tok, what: str, width: int = _U64) -> int:
        tok = self.take()
        if tok is None or tok.kind != "num":
            got = "the end of the file" if tok is None else repr(tok.text)
            raise UsageError(self.at(tok or kw), f"{kw.text.upper()} needs {what} (a number), "
                             f"found {got}")
        return self.value(kw, tok, width)

    def value(self, kw: _Tok, tok: _Tok, width: int = _U64) -> int:
        v = _c_number(tok.text)
        if v is None:
            raise UsageError(self.at(tok), f"{kw.text.upper()}: {tok.text!r} is not a number; "
                             f"{_number_problem(tok.text)}")
        if v > width:
            bits = width.bit_length()
            raise UsageError(self.at(tok), f"{kw.text.upper()}: {tok.text} does not fit in "
                             f"{bits} bits (at most {width:#x})")
        return v

    def punct(self, kw: _Tok, ch: str, form: str) -> None:
        tok = self.take()
        if tok is None or tok.text != ch:
            got = "the end of the file" if tok is None else repr(tok.text)
            raise UsageError(self.at(tok or kw), f"{kw.text.upper()}: expected {ch!r}, found "
                             f"{got}; the form is {form}")

    # -- range checks ------------------------------------------------------------------------
    def check_cpu(self, tok: _Tok, cpu: int) -> None:
        if self.ncpus is not None and cpu >= self.ncpus:
            raise UsageError(self.at(tok), f"CPU {cpu} does not exist: this machine has CPUs "
                             f"0..{self.ncpus - 1}")

    def check_bank(self, tok: _Tok, bank: int) -> None:
        if bank > _U8:
            raise UsageError(self.at(tok), f"BANK {bank} does not fit in struct mce's 8-bit "
                             "bank field (at most 255)")
        if self.nbanks is not None and bank >= self.nbanks:
            raise UsageError(self.at(tok), f"BANK {bank} does not exist: MCG_CAP.COUNT is "
                             f"{self.nbanks} (banks 0..{self.nbanks - 1}); pick a bank below "
                             f"{self.nbanks} or give the machine more banks")

    # -- the grammar -------------------------------------------------------------------------
    def run(self) -> list[Record]:
        records: list[Record] = []
        cur: _Draft | None = None
        while (tok := self.take()) is not None:
            if tok.kind != "word":
                what = "number" if tok.kind == "num" else "character"
                raise UsageError(self.at(tok), f"unexpected {what} {tok.text!r}: a keyword "
                                 "(CPU, MCE, BANK, STATUS, ...) was expected; a number belongs "
                                 "after its keyword, one per keyword except in STATUS and "
                                 "MCGSTATUS lists")
            kw = tok.text.upper()
            if kw in ("CPU", "MCE"):
                if cur is not None:
                    records.append(self.finish(cur))
                cur = self.start(tok)
            elif kw in REFUSED:
                raise UsageError(self.at(tok), REFUSED[kw])
            elif kw in _FIELDS:
                if cur is None:
                    raise UsageError(self.at(tok), f"{kw} before any CPU or MCE: a record "
                                     "starts with CPU n [bank] or MCE; put CPU n first")
                self.term(cur, tok, kw)
                cur.terms += 1
                cur.lines.append((kw, tok.line))
            else:
                raise UsageError(self.at(tok), self.stray(tok, kw, cur))
        if cur is not None:
            records.append(self.finish(cur))
        return records

    def stray(self, tok: _Tok, kw: str, cur: _Draft | None) -> str:
        if kw in MCGSTATUS_WORDS:
            after = " after STATUS" if cur is not None and "STATUS" in cur.seen else ""
            return (f"{tok.text} is an MCGSTATUS bit, not a STATUS word{after}: write it in "
                    f"an MCGSTATUS list (mce-inject rejects it here too)")
        if kw in STATUS_WORDS:
            return (f"{tok.text} is a STATUS word: write it in a STATUS list (right after "
                    "STATUS), not after MCGSTATUS or another field")
        if kw in _PANIC_WORDS:
            return (f"{tok.text} belongs only to the kernel panic line "
                    "'CPU n: Machine Check Exception: <mcgstatus> Bank <b>: <status>'")
        hint = ""
        if kw in ("LMCE", "LMCE_S"):
            hint = "; the MCGSTATUS word is LMCES"
        elif close := difflib.get_close_matches(kw, _ALL_WORDS, n=1, cutoff=0.75):
            hint = f"; did you mean {close[0]}?"
        return (f"unknown keyword {tok.text!r}{hint} (records use CPU MCE BANK STATUS "
                "MCGSTATUS ADDR MISC RIP TSC TIME SOCKETID APICID MCGCAP PROCESSOR HOLD "
                "NOBROADCAST NMIBROADCAST POLL EXCP)")

    def start(self, tok: _Tok) -> _Draft:
        d = _Draft(tok)
        if tok.text.upper() == "MCE":
            d.v["cpu"] = 0
            return d
        cpu = self.number(tok, "a CPU number", _U32)
        self.check_cpu(tok, cpu)
        d.v["cpu"] = cpu
        nxt = self.peek()
        if nxt is not None and nxt.kind == "num":
            self.take()
            bank = self.value(_Tok("word", "CPU", nxt.line), nxt)
            self.check_bank(nxt, bank)
            d.v["bank"] = bank
        elif nxt is not None and nxt.text == ":":
            self.panic_line(tok, d)
        return d

    def panic_line(self, cpu_tok: _Tok, d: _Draft) -> None:
        form = "'CPU n: Machine Check Exception: <mcgstatus> Bank <b>: <status>'"
        self.punct(cpu_tok, ":", form)
        for word in _PANIC_WORDS:
            tok = self.take()
            if tok is None or tok.text.upper() != word:
                got = "the end of the file" if tok is None else repr(tok.text)
                raise UsageError(self.at(tok or cpu_tok), f"CPU n: expected {word.title()}, "
                                 f"found {got}; the kernel panic line is {form}")
        self.punct(cpu_tok, ":", form)
        d.v["mcgstatus"] = self.panic_hex(cpu_tok, "MCG_STATUS")
        bank_tok = self.take()
        if bank_tok is None or bank_tok.text.upper() != "BANK":
            raise UsageError(self.at(bank_tok or cpu_tok), f"the kernel panic line is {form}: "
                             "Bank must follow the MCG_STATUS")
        bank = self.number(bank_tok, "a bank number")
        self.check_bank(bank_tok, bank)
        d.v["bank"] = bank
        self.punct(bank_tok, ":", form)
        d.status = self.panic_hex(cpu_tok, "STATUS")
        d.panic_line = True
        d.seen.add("STATUS")

    def panic_hex(self, cpu_tok: _Tok, what: str) -> int:
        """A number of the panic line: the kernel prints it in hex without 0x."""
        tok = self.take()
        if tok is None or tok.kind == "punct":
            raise UsageError(self.at(tok or cpu_tok), f"the kernel panic line needs its "
                             f"{what} here (a number)")
        text = tok.text
        as_c = _c_number(text)
        try:
            as_hex = int(text[2:] if text[:2].lower() == "0x" else text, 16)
        except ValueError:
            as_hex = None
        if as_c is not None and (text.startswith("0x") or as_c == as_hex):
            if as_c > _U64:
                raise UsageError(self.at(tok), f"{what} {text} does not fit in 64 bits")
            return as_c
        if as_hex is not None:
            raise UsageError(self.at(tok), f"{what} {text!r} in the kernel panic line is "
                             "ambiguous: the kernel prints it in hex without 0x, mce-inject "
                             "reads C numbers (0x hex, 0 octal, else decimal); write "
                             f"0x{text.lower().removeprefix('0x')} for the hex value")
        raise UsageError(self.at(tok), f"{what} {text!r} in the kernel panic line is not a "
                         "number; write it as 0x...")

    def term(self, d: _Draft, tok: _Tok, kw: str) -> None:
        v = d.v
        if kw == "BANK":
            bank = self.number(tok, "a bank number")
            self.check_bank(tok, bank)
            v["bank"] = bank
        elif kw == "STATUS":
            new = self.bit_list(tok, STATUS_WORDS)
            for bit, name, src in ((msr.MCi_STATUS_ADDRV, "ADDRV", "addr"),
                                   (msr.MCi_STATUS_MISCV, "MISCV", "misc")):
                if src.upper() in d.seen and v.get(src) and d.status & bit and not new & bit:
                    d.warnings.append(
                        f"{self.at(tok)}: STATUS replaces the status, so {name} that "
                        f"{src.upper()} set earlier is lost ({src.upper()} {v[src]:#x} is kept "
                        f"but not valid); put {src.upper()} after STATUS if it should be valid")
            d.status = new
        elif kw == "MCGSTATUS":
            v["mcgstatus"] = self.bit_list(tok, MCGSTATUS_WORDS)
        elif kw == "ADDR":
            v["addr"] = self.number(tok, "an address")
            d.status |= msr.MCi_STATUS_ADDRV
        elif kw == "MISC":
            v["misc"] = self.number(tok, "the MCi_MISC value")
            d.status |= msr.MCi_STATUS_MISCV
        elif kw == "RIP":
            self.rip(tok, v)
        elif kw in ("TSC", "TIME", "MCGCAP"):
            v[kw.lower()] = self.number(tok, "a value")
        elif kw in ("SOCKETID", "APICID"):
            v[kw.lower()] = self.number(tok, "an id", _U32)
        elif kw == "PROCESSOR":
            v["cpuvendor"] = self.number(tok, "the vendor (0 Intel, 2 AMD, ...)", _U8)
            self.punct(tok, ":", "PROCESSOR vendor:cpuid")
            v["cpuid"] = self.number(tok, "the CPUID.1:EAX value", _U32)
        elif kw == "HOLD":
            v["hold"] = True
        elif kw == "NOBROADCAST":
            v["nobroadcast"] = True
        elif kw == "NMIBROADCAST":
            v["nmibroadcast"] = True
        elif kw == "POLL":
            v["raise_mode"] = "poll"
        elif kw == "EXCP":
            v["raise_mode"] = "exception"
        d.seen.add(kw)

    def bit_list(self, kw: _Tok, words: dict[str, int]) -> int:
        """``STATUS``/``MCGSTATUS`` lists: words and numbers ORed (an empty list is 0)."""
        val = 0
        while (tok := self.peek()) is not None:
            if tok.kind == "num":
                val |= self.value(kw, tok)
            elif words is STATUS_WORDS and tok.kind == "word" and tok.text.upper() == "MCACOD":
                # emu's addition: MCACOD=N, the architectural error code (bits 15:0)
                self.take()
                self.punct(tok, "=", "MCACOD=N")
                num = self.take()
                if num is None or num.kind != "num":
                    raise UsageError(self.at(num or tok), "MCACOD= takes a number, e.g. "
                                     "MCACOD=0x134")
                code = self.value(kw, num)
                if code > 0xFFFF:
                    raise UsageError(self.at(num), f"MCACOD={code:#x}: the code is 16 bits "
                                     "(0..0xFFFF)")
                val |= code
                continue
            elif tok.kind == "word" and tok.text.upper() in words:
                val |= words[tok.text.upper()]
            else:
                break
            self.take()
        return val

    def rip(self, tok: _Tok, v: dict) -> None:
        first = self.number(tok, "an instruction pointer")
        if (nxt := self.peek()) is None or nxt.text != ":":
            v["ip"] = first
            return
        self.take()
        if first > _U8:
            raise UsageError(self.at(tok), f"RIP: the code segment {first:#x} does not fit in "
                             "struct mce's 8-bit cs")
        v["cs"] = first
        if (nxt := self.peek()) is not None and nxt.text == "<":
            self.take()
            v["ip"] = self.number(tok, "an instruction pointer")
            form = "RIP cs:<ip> {symbol}"
            self.punct(tok, ">", form)
            self.punct(tok, "{", form + " (mce-inject's grammar needs the symbol after <ip>)")
            sym = self.take()
            if sym is None or sym.kind != "word":
                raise UsageError(self.at(sym or tok), f"RIP: a symbol name belongs in the "
                                 f"braces of {form}")
            self.punct(tok, "}", form)
        else:
            v["ip"] = self.number(tok, "an instruction pointer after cs:")

    def finish(self, d: _Draft) -> Record:
        if d.terms == 0 and not d.panic_line:
            start = d.lines[0]
            raise UsageError(f"{self.source}:{start[1]}", f"{start[0]} starts a record with "
                             "no field: mce-inject's grammar needs at least one (e.g. STATUS "
                             "...) before the next record or the end")
        return Record(**d.v, status=d.status, source=self.source, lines=tuple(d.lines),
                      warnings=tuple(d.warnings))


def parse(text: str, source: str = "<stdin>", *, ncpus: int | None = None,
          nbanks: int | None = None) -> list[Record]:
    """Parse mce-inject input into records, in file order.

    ``source`` names the input in errors (``FILE:LINE``). With ``ncpus``/``nbanks``,
    CPU and BANK numbers are range-checked (mce-inject checks against the online CPUs
    and the highest ``bankN`` in sysfs). Raises :class:`UsageError` on the first problem.
    """
    return _Parser(text, source, ncpus, nbanks).run()


def parse_file(path, *, ncpus: int | None = None, nbanks: int | None = None) -> list[Record]:
    """:func:`parse` of a file; errors name it as given (``inject.txt:3``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(str(path), f"cannot read it ({exc.strerror}); give an mce-inject "
                         "input file") from None
    except UnicodeDecodeError:
        raise UsageError(str(path), "is not text (UTF-8); give an mce-inject input "
                         "file") from None
    return parse(text, str(path), ncpus=ncpus, nbanks=nbanks)


# --- dumping ----------------------------------------------------------------------------------
def dump(records) -> str:
    """The canonical form of ``mce-inject --dump``: per record CPU, BANK, TSC, TIME,
    RIP cs:ip, MISC, ADDR, STATUS, MCGSTATUS, PROCESSOR, a blank line.

    Beyond the tool's dump, so that the text parses back to equal records: SOCKETID,
    APICID and MCGCAP when non-zero (the tool's dump drops them) and the modifiers
    HOLD, NOBROADCAST, NMIBROADCAST, EXCP/POLL, one per line before the blank line.
    MISC and ADDR precede STATUS, as in the tool, so STATUS decides ADDRV and MISCV.
    """
    out = []
    for r in records:
        out += [f"CPU {r.cpu}", f"BANK {r.bank}", f"TSC {r.tsc:#x}", f"TIME {r.time}",
                f"RIP 0x{r.cs:02x}:{r.ip:#x}", f"MISC {r.misc:#x}", f"ADDR {r.addr:#x}",
                f"STATUS {r.status:#x}", f"MCGSTATUS {r.mcgstatus:#x}",
                f"PROCESSOR {r.cpuvendor}:{r.cpuid:#x}"]
        out += [f"{name} {getattr(r, name.lower()):#x}" for name in ("SOCKETID", "APICID",
                                                                       "MCGCAP")
                if getattr(r, name.lower())]
        out += [name for name, on in (("HOLD", r.hold), ("NOBROADCAST", r.nobroadcast),
                                      ("NMIBROADCAST", r.nmibroadcast),
                                      ("EXCP", r.raise_mode == "exception"),
                                      ("POLL", r.raise_mode == "poll")) if on]
        out.append("")
    return "".join(line + "\n" for line in out)


# --- what the records mean for emu -------------------------------------------------------------
def to_spec(record: Record) -> str:
    """The emu spec string of one record: ``cpu= bank= status= addr= misc= mcg=``.

    ``mcg`` carries the record's MCG_STATUS bits 0-3 (RIPV EIPV MCIP LMCES, all emu
    holds; :func:`plan` notes any other bit it leaves out). It is the record's own
    value, 0 when the file gives no MCGSTATUS (emu then raises with MCIP only, as the
    record asks: no RIPV). The spec does not say whether emu can run the record:
    see :func:`plan` (a status without VAL, for one, is no error emu injects)."""
    r = record
    return (f"cpu={r.cpu} bank={r.bank} status={msr.hexs(r.status)} addr={msr.hexs(r.addr)} "
            f"misc={msr.hexs(r.misc)} mcg={r.mcgstatus & EMU_MCG_BITS:#x}")


@dataclass(frozen=True)
class Injection:
    """One injection: a trigger (a record without HOLD) and the records held for it.

    ``records`` are raised together: the trigger first, then the held records by CPU.
    ``mode`` is the trigger's raise mode; ``broadcast`` whether every other CPU takes
    the #MC too (with mce-inject's synthetic record: ``synthetic_status``,
    ``synthetic_mcg``); ``targets`` the CPUs raised when not broadcast. ``specs`` are
    the emu spec strings of the records that have VAL. ``emu_local`` is the ``local``
    argument for emu's injection (LMCE to the trigger's CPU), or None when emu cannot
    run this injection; ``refusal`` then says why, as (FILE:LINE, message).
    ``notes`` list what emu leaves out or does differently, each with FILE:LINE.
    """
    index: int
    trigger: Record
    records: tuple[Record, ...]
    dropped: tuple[Record, ...]          # held records replaced (same CPU) and never raised
    mode: str                            # "exception" or "poll"
    broadcast: bool
    lmce: bool                           # the trigger's MCG_STATUS has LMCES
    targets: tuple[int, ...] | None      # CPUs raised; None = every CPU (broadcast)
    synthetic_status: int | None
    synthetic_mcg: int | None
    specs: tuple[str, ...]
    emu_local: bool | None
    refusal: tuple[str, str] | None
    notes: tuple[str, ...]

    @property
    def runnable(self) -> bool:
        return self.refusal is None


_INFO = (("ip", "RIP"), ("cs", "RIP"), ("tsc", "TSC"), ("time", "TIME"),
         ("socketid", "SOCKETID"), ("apicid", "APICID"), ("mcgcap", "MCGCAP"),
         ("cpuvendor", "PROCESSOR"), ("cpuid", "PROCESSOR"))


def _record_notes(r: Record, is_trigger: bool) -> list[str]:
    notes = list(r.warnings)
    extra = r.mcgstatus & ~EMU_MCG_BITS
    if extra:
        names = [_MCG_NAMES.get(1 << b, f"bit {b}") for b in range(64) if extra >> b & 1]
        notes.append(f"{r.where_of('MCGSTATUS')}: MCG_STATUS {', '.join(names)} "
                     f"({extra:#x}) not passed to emu, whose MCG_STATUS holds RIPV EIPV MCIP "
                     "LMCES only (Xen's handler reads no other bit)")
    info = sorted({kw for attr, kw in _INFO if getattr(r, attr)})
    if info:
        notes.append(f"{r.where}: {' '.join(info)} not passed on: Xen takes the interrupted "
                     "context, TSC, topology and MCG_CAP from the (emulated) machine, not "
                     "from an injector")
    if r.status & msr.MCi_STATUS_UC and not r.mcgstatus & msr.MCG_STATUS_RIPV:
        given = any(kw == "MCGSTATUS" for kw, _ in r.lines) or r.mcgstatus
        notes.append(f"{r.where_of('MCGSTATUS')}: MCG_STATUS {r.mcgstatus:#x}"
                     f"{'' if given else ' (no MCGSTATUS given)'} has no RIPV: emu raises it "
                     "as is (plus MCIP), a context Xen cannot restart unless EIPV is set and a "
                     "guest was interrupted; add MCGSTATUS RIPV MCIP for a restartable one")
    if not r.status & msr.MCi_STATUS_VAL:
        notes.append(f"{r.where_of('STATUS')}: STATUS {r.status:#x} has no VAL: emu writes no "
                     f"bank for it; CPU {r.cpu} takes the #MC"
                     + (" only if it is broadcast" if is_trigger else " with the trigger"))
    if not is_trigger and r.nobroadcast:
        notes.append(f"{r.where_of('NOBROADCAST')}: NOBROADCAST on a HOLD record has no "
                     "effect: mce-inject reads only the trigger's modifiers")
    return notes


def _injection(index: int, trigger: Record, held: dict[int, Record], replaced: list[Record],
               notes: list[str], ncpus: int | None) -> Injection:
    dropped = list(replaced)
    if trigger.cpu in held:
        h = held.pop(trigger.cpu)
        dropped.append(h)
        notes.append(f"{h.where}: HOLD record for CPU {h.cpu} is not raised: the trigger at "
                     f"{trigger.where} is on the same CPU (mce-inject raises one record per "
                     "CPU, the trigger's)")
    records = (trigger, *(held[c] for c in sorted(held)))
    mode = trigger.mode
    broadcast = mode == "exception" and not trigger.nobroadcast
    lmce = bool(trigger.mcgstatus & msr.MCG_STATUS_LMCE)
    for r in records:
        notes += _record_notes(r, r is trigger)
    syn_status = syn_mcg = None
    if broadcast:
        syn_status = trigger.status & msr.MCi_STATUS_UC
        syn_mcg = (trigger.mcgstatus & msr.MCG_STATUS_MCIP) | (
            msr.MCG_STATUS_RIPV if trigger.status & msr.MCi_STATUS_UC else 0)
        if syn_mcg | msr.MCG_STATUS_MCIP != msr.MCG_STATUS_MCIP | msr.MCG_STATUS_RIPV:
            notes.append(f"{trigger.where}: CPUs without a record get MCG_STATUS "
                         f"{syn_mcg:#x} from mce-inject (RIPV only when the trigger is UC), "
                         "MCIP|RIPV in emu")
        if lmce:
            notes.append(f"{trigger.where_of('MCGSTATUS')}: LMCES with a broadcast: every "
                         f"CPU takes the #MC but CPU {trigger.cpu}'s handler sees LMCE_S and "
                         "skips the rendezvous (add NOBROADCAST for a real LMCE)")
    via = " via=poll" if mode == "poll" else ""
    specs = tuple(to_spec(r) + via for r in records if r.status & msr.MCi_STATUS_VAL)
    targets = None if broadcast else tuple(r.cpu for r in records)
    every_cpu = ncpus is not None and targets is not None and set(targets) == set(range(ncpus))

    refusal = None
    emu_local: bool | None = None
    polled = [r for r in records if r.mode == "poll"]
    by_mc = [r for r in records if r.status & msr.MCi_STATUS_VAL and sev.intel_check_mce_type(
        r.status, True) not in (sev.CORRECTED, sev.UCNA)]
    if mode == "poll" and by_mc:
        why = ("POLL" if trigger.raise_mode == "poll" else
               f"no UC in its STATUS {trigger.status:#x}")
        refusal = (by_mc[0].where, f"the trigger (CPU {trigger.cpu}) is raised by the poller "
                   f"({why}), but STATUS {by_mc[0].status:#x} is one silicon signals by #MC "
                   "(only corrected and UCNA errors wait for the poller): add EXCP to raise it "
                   "as a #MC")
    elif mode == "poll" and specs:
        emu_local = False     # via=poll: Xen's poller, a round at once
    elif mode == "poll":
        refusal = (trigger.where, "no record of this injection has VAL in its STATUS: the "
                   "poller finds nothing (add VAL, e.g. STATUS CORRECTED ...)")
    elif polled:
        r = polled[0]
        refusal = (r.where, f"the HOLD record for CPU {r.cpu} is raised by the poller (no UC, "
                   "or POLL) while its trigger is a #MC; emu raises every record as a #MC: "
                   "add EXCP to it")
    elif not specs:
        refusal = (trigger.where, "no record of this injection has VAL in its STATUS: emu's "
                   "injection needs at least one valid bank (add VAL, e.g. STATUS "
                   "UNCORRECTED ...)")
    elif broadcast or every_cpu:
        emu_local = False
    elif lmce and len(records) == 1:
        emu_local = True
    elif lmce:
        others = ", ".join(str(r.cpu) for r in records[1:])
        refusal = (trigger.where, f"an LMCE on CPU {trigger.cpu} with records held for CPU(s) "
                   f"{others}: emu raises an LMCE on one CPU only, so those would be written "
                   "but never raised; drop their HOLD (separate injections) or NOBROADCAST")
    else:
        cpus = ", ".join(str(c) for c in targets)
        refusal = (trigger.where_of("NOBROADCAST"), f"NOBROADCAST raises the #MC on CPU(s) "
                   f"{cpus} only, which emu cannot do: it raises a #MC on every CPU, or an "
                   "LMCE on one. (On a broadcast platform Xen's rendezvous would wait for the "
                   "other CPUs forever, xen-mca.md §10.2 D.) Remove NOBROADCAST, or add LMCES "
                   "to the trigger's MCGSTATUS")
    return Injection(index=index, trigger=trigger, records=records, dropped=tuple(dropped),
                     mode=mode, broadcast=broadcast, lmce=lmce, targets=targets,
                     synthetic_status=syn_status, synthetic_mcg=syn_mcg, specs=specs,
                     emu_local=emu_local, refusal=refusal, notes=tuple(notes))


def plan(records, *, ncpus: int | None = None) -> list[Injection]:
    """Group records into injections as mce-inject raises them (peers.md §2.3).

    Each record without HOLD is a trigger and ends an injection; the HOLD records
    before it (the last one per CPU) are raised with it. With ``ncpus``, a
    NOBROADCAST injection whose records cover every CPU counts as a broadcast.
    Raises :class:`UsageError` for a HOLD record no trigger follows (mce-inject drops
    it silently at exit). Does not refuse what emu cannot run: that is each
    injection's ``refusal`` (see :func:`to_specs`).
    """
    out: list[Injection] = []
    held: dict[int, Record] = {}
    replaced: list[Record] = []
    notes: list[str] = []
    for r in records:
        if r.hold:
            if r.cpu in held:
                old = held[r.cpu]
                replaced.append(old)
                notes.append(f"{old.where}: HOLD record for CPU {r.cpu} is replaced by the one "
                             f"at {r.where} (mce-inject holds one record per CPU)")
            held[r.cpu] = r
            continue
        out.append(_injection(len(out), r, held, replaced, notes, ncpus))
        held, replaced, notes = {}, [], []
    if held:
        first = min(held.values(), key=lambda r: r.line)
        raise UsageError(first.where, f"HOLD record for CPU {first.cpu} is never raised: no "
                         "record without HOLD follows it (mce-inject drops it at the end); "
                         "remove HOLD from the last record so it triggers the injection")
    return out


def to_specs(records, *, ncpus: int | None = None) -> list[list[str]]:
    """The emu spec strings of each injection (:func:`plan`), in order.

    Raises :class:`UsageError` (FILE:LINE, why, the fix) for the first injection emu
    cannot run as written: a poll of an error silicon signals by #MC, a poll record held
    for a #MC trigger, a partial NOBROADCAST #MC, an LMCE with
    records for several CPUs, no record with VAL. Use :func:`plan` for the delivery
    (``Injection.emu_local``) and the notes.
    """
    out = []
    for inj in plan(records, ncpus=ncpus):
        if inj.refusal is not None:
            raise UsageError(*inj.refusal)
        out.append(list(inj.specs))
    return out
