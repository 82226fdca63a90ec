"""Error specifications: parsing and validating what a person asks to inject.

Forms accepted: ``key=value`` strings (``--error "cpu=0 bank=8 status=0xBD... addr=
0x180020 misc=0x86 mcg=0x5"``; numbers in hex or decimal) and dicts with the same
keys. ``via`` says how the error arrives: ``mce`` (default: written as given, then a
#MC), ``cmci`` (reported by silicon, which raises a CMCI if the bank's CTL2 asks for
one) or ``poll`` (reported by silicon, then a poll round at once). Every problem is
a :class:`~emu.errors.UsageError` naming the field and the fix, raised before
anything runs.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

from emu.errors import UsageError
from emu.hw import msr
from emu.xen.page_alloc import DOM_PAGES

KEYS = ("cpu", "bank", "status", "addr", "misc", "mcg", "domain", "via")
VIAS = ("mce", "cmci", "poll")
REQUIRED = ("cpu", "bank", "status")


@dataclass(frozen=True)
class ErrorSpec:
    cpu: int
    bank: int
    status: int
    addr: int = 0
    misc: int = 0
    mcg: int | None = None       # MCG_STATUS for this CPU (MCIP is added by delivery)
    domain: int | None = None    # addr is this domain's guest-physical address
    via: str = "mce"             # how it arrives: mce, cmci or poll

    def to_dict(self) -> dict:
        return asdict(self)


def parse_number(field: str, text) -> int:
    if isinstance(text, bool):
        raise UsageError(field, f"{text!r} is not a number")
    if isinstance(text, int):
        v = text
    else:
        t = str(text).strip().replace("_", "")
        if not t.isascii():   # int() takes any Unicode digit ("٠"): not a register value
            raise UsageError(field, f"{text!r} is not a number; write hex as 0x... or "
                             "decimal, in ASCII digits")
        try:
            v = int(t, 16) if t.lower().startswith("0x") else int(t, 10)
        except ValueError:
            raise UsageError(field, f"{text!r} is not a number; write hex as 0x... or "
                             "decimal") from None
    if not 0 <= v <= msr.U64:
        raise UsageError(field, f"{text!r} does not fit in 64 bits (0..0xFFFFFFFFFFFFFFFF)")
    return v


def parse_error(spec, index: int = 0) -> dict:
    """``"cpu=0 bank=8 ..."`` or a dict → a dict of ints (not yet range-checked)."""
    if isinstance(spec, str):
        # a campaign parses each generated string on both sides of the pipe: once
        return dict(_parse_str(spec, index))
    return _parse(spec, index)


@functools.lru_cache(maxsize=4096)
def _parse_str(spec: str, index: int) -> dict:
    return _parse(spec, index)


def _parse(spec, index: int) -> dict:
    where = f"error[{index}]"
    if isinstance(spec, dict):
        items = list(spec.items())
    else:
        items = []
        for tok in str(spec).replace(",", " ").split():
            if "=" not in tok:
                raise UsageError(f"{where}", f"{tok!r} is not key=value; keys are "
                                 f"{', '.join(KEYS)}")
            k, _, v = tok.partition("=")
            items.append((k.strip().lower(), v))
    out: dict = {}
    for k, v in items:
        if k not in KEYS:
            raise UsageError(f"{where}.{k}", f"unknown key {k!r}; use {', '.join(KEYS)}")
        if k in out:
            raise UsageError(f"{where}.{k}", "given twice; give each key once")
        if v is None and k in ("mcg", "domain", "via"):
            continue
        if k == "via":
            v = str(v).strip().lower()
            if v not in VIAS:
                raise UsageError(f"{where}.via", f"{v!r}: use one of {', '.join(VIAS)}")
            out[k] = v
            continue
        out[k] = parse_number(f"{where}.{k}", v)
    for k in REQUIRED:
        if k not in out:
            raise UsageError(f"{where}.{k}", f"missing; an error needs {', '.join(REQUIRED)}")
    return out


def validate_errors(specs, ncpus: int, nbanks: int, domids=None,
                    ser: bool = True) -> list[ErrorSpec]:
    """Parse and range-check ``specs``. ``ser``: MCG_SER_P, which decides which errors
    can arrive without a #MC (``via=cmci``/``poll``: corrected and UCNA only)."""
    from emu.xen import severity as sev
    errs = []
    for i, spec in enumerate(specs):
        d = parse_error(spec, i)
        where = f"error[{i}]"
        if d["cpu"] >= ncpus:
            raise UsageError(f"{where}.cpu", f"CPU {d['cpu']} does not exist; this machine has "
                             f"CPUs 0..{ncpus - 1}")
        if d["bank"] >= nbanks:
            raise UsageError(f"{where}.bank", f"bank {d['bank']} does not exist; MCG_CAP.COUNT "
                             f"is {nbanks} (banks 0..{nbanks - 1})")
        if not d["status"] & msr.MCi_STATUS_VAL:
            raise UsageError(f"{where}.status", f"{d['status']:#x} has VAL (bit 63) clear; "
                             "a reported error must set it")
        if "mcg" in d and d["mcg"] & ~0xF:
            raise UsageError(f"{where}.mcg", f"{d['mcg']:#x} sets reserved MCG_STATUS bits; "
                             "use RIPV 0x1, EIPV 0x2, MCIP 0x4, LMCE_S 0x8")
        if "domain" in d and domids is not None and d["domain"] not in domids:
            raise UsageError(f"{where}.domain", f"domain {d['domain']} does not exist; "
                             f"domains are {', '.join(map(str, domids))}")
        if "domain" in d and d.get("addr", 0) >> 12 >= DOM_PAGES:
            raise UsageError(f"{where}.addr", f"{d['addr']:#x} is beyond the domain's memory; "
                             f"a guest-physical address is below {DOM_PAGES << 12:#x}")
        via = d.get("via", "mce")
        if via != "mce":
            cls = sev.intel_check_mce_type(d["status"], ser)
            if cls not in (sev.CORRECTED, sev.UCNA):
                raise UsageError(f"{where}.via", f"{d['status']:#x} is {cls}: silicon signals "
                                 f"it by #MC, not by {'CMCI' if via == 'cmci' else 'polling'}; "
                                 "use via=mce (only corrected and UCNA errors arrive this way)")
        errs.append(ErrorSpec(**d))
    vias = sorted({e.via for e in errs})
    if len(vias) > 1:
        raise UsageError("error.via", f"{', '.join(vias)}: one trial's errors arrive one way; "
                         "give every error the same via")
    if not errs:
        raise UsageError("error", "no error given")
    return errs


# The built-in demonstration: Xen's own srao_mem case on a free page.
DEMO = ["cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5"]
