"""emu.formats: the mce-inject language and xen-mceinj's options and table.

Pure code, no machine. The vectors come from ``tests/data/`` (copies of the shared
reference ``vectors/mce-inject_grammar.json`` and ``vectors/xen_mceinj.json``; see
``tests/data/README.md``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from emu.errors import UsageError
from emu.formats import mce_inject as mi, xen_mceinj as xm
from emu.hw import msr

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str) -> dict:
    with open(DATA / name, encoding="utf-8") as f:
        return json.load(f)


GRAMMAR = _load("mce-inject_grammar.json")
XEN = _load("xen_mceinj.json")
EXAMPLES = [e for e in GRAMMAR["example_files"] if e["parse_error"] is None]
SPEC = re.compile(r"cpu=\d+ bank=\d+ status=0x[0-9A-F]{16} addr=0x[0-9A-F]{16} "
                  r"misc=0x[0-9A-F]{16} mcg=0x[0-9a-f]+( domain=\d+)?")


# --- building input text from a vector record -------------------------------------------------
def _mcg_words(value: int) -> str:
    names = [k for k, v in mi.MCGSTATUS_WORDS.items() if value & v]
    assert sum(mi.MCGSTATUS_WORDS[k] for k in names) == value
    return " ".join(names)


def _text(rec: dict, style: str) -> str:
    """One record of a grammar vector as mce-inject input. ``canonical``: a field per
    line, hex numbers; ``compact``: one line, lower case, decimal and octal numbers,
    MCGSTATUS as words, the bank after the CPU, a comment."""
    status, mcg = int(rec["status"], 16), int(rec["mcgstatus"], 16)
    addr, misc = int(rec["addr"], 16), int(rec["misc"], 16)
    cs, ip = int(rec["cs"], 16), int(rec["ip"], 16)
    words = " ".join(rec["status_words"])
    if style == "canonical":
        out = [f"CPU {rec['cpu']} BANK {rec['bank']}"]
        if mcg:
            out.append(f"MCGSTATUS {mcg:#x}")
        out += rec["flags"]
        out.append(f"STATUS {words}")
        if status & msr.MCi_STATUS_ADDRV:
            out.append(f"ADDR {addr:#x}")
        if status & msr.MCi_STATUS_MISCV:
            out.append(f"MISC {misc:#x}")
        if ip or cs:
            out.append(f"RIP {cs:#x}:{ip:#x}" if cs else f"RIP {ip:#x}")
        return "\n".join(out) + "\n"
    out = [f"cpu {rec['cpu']} {rec['bank']}"]
    if mcg:
        out.append(f"mcgstatus {_mcg_words(mcg).lower()}")
    out += [f.lower() for f in rec["flags"]]
    out.append(f"status {words.lower()}")
    if status & msr.MCi_STATUS_ADDRV:
        out.append(f"addr {addr}")
    if status & msr.MCi_STATUS_MISCV:
        out.append(f"misc 0{misc:o}")
    if ip or cs:
        out.append(f"rip {cs}:{ip}" if cs else f"rip {ip}")
    return "# from the grammar vectors\n" + " ".join(out) + "   # one line\n"


def _check(r: mi.Record, rec: dict) -> None:
    for key in ("status", "mcgstatus", "addr", "misc", "cs", "ip"):
        assert getattr(r, key) == int(rec[key], 16), key
    assert (r.cpu, r.bank) == (rec["cpu"], rec["bank"])
    assert r.nobroadcast == ("NOBROADCAST" in rec["flags"])
    assert r.hold == ("HOLD" in rec["flags"])


# --- the grammar vectors ----------------------------------------------------------------------
@pytest.mark.parametrize("style", ["canonical", "compact"])
@pytest.mark.parametrize("example", EXAMPLES, ids=[e["file"] for e in EXAMPLES])
def test_every_example_parses_dumps_and_reparses(example, style):
    text = "".join(_text(rec, style) for rec in example["records"])
    records = mi.parse(text, example["file"])
    assert len(records) == len(example["records"])
    for r, rec in zip(records, example["records"], strict=True):
        _check(r, rec)
    dumped = mi.dump(records)
    again = mi.parse(dumped, "dump")
    assert again == records
    assert mi.dump(again) == dumped


def test_all_examples_in_one_file():
    recs = [rec for e in EXAMPLES for rec in e["records"]]
    records = mi.parse("".join(_text(rec, "canonical") for rec in recs), "all.txt")
    assert len(records) == len(recs)
    for r, rec in zip(records, recs, strict=True):
        _check(r, rec)
    assert mi.parse(mi.dump(records)) == records


@pytest.mark.parametrize("kw", GRAMMAR["keywords"], ids=[k["keyword"] for k in GRAMMAR["keywords"]])
def test_every_keyword_value(kw):
    field = "STATUS" if kw["context"].startswith("STATUS") else "MCGSTATUS"
    attr = "status" if field == "STATUS" else "mcgstatus"
    for word in (kw["keyword"], kw["keyword"].lower(), kw["keyword"].title()):
        (r,) = mi.parse(f"CPU 0 {field} {word}")
        assert getattr(r, attr) == int(kw["value"], 16)


def test_the_vectors_parse_error_example_is_refused():
    (bad,) = [e for e in GRAMMAR["example_files"] if e["parse_error"]]
    assert "EIPV" in bad["parse_error"]
    text = "# as the repository's test/uncorrected\nCPU 0 BANK 1\nSTATUS uncorrected EIPV\n" \
           "ADDR 0x1234\nRIP 0xdeadbabe\n"
    with pytest.raises(UsageError) as e:
        mi.parse(text, bad["file"])
    assert e.value.field == f"{bad['file']}:3"
    assert "EIPV" in e.value.message and "MCGSTATUS" in e.value.message


# --- the language, statement by statement -----------------------------------------------------
def test_numbers_are_c_style():
    (r,) = mi.parse("CPU 0 BANK 010 ADDR 0x1F MISC 31 TSC 0 TIME 0777")
    assert (r.bank, r.addr, r.misc, r.tsc, r.time) == (8, 31, 31, 0, 0o777)


def test_keywords_case_and_comments_and_several_per_line():
    text = "cpu 2 # the CPU\n  Status Uncorrected S 0xcf   # SRAO\n\tAdDr 0x1000 misc 0x86\n#\n"
    (r,) = mi.parse(text)
    assert r.cpu == 2
    assert r.status == 0xBD000000000000CF      # VAL UC EN S, ADDRV and MISCV from ADDR/MISC
    assert (r.addr, r.misc) == (0x1000, 0x86)


def test_mce_starts_a_record_on_cpu_0_and_records_follow_each_other():
    rs = mi.parse("MCE STATUS FATAL\nCPU 3 1 STATUS CORRECTED\n"
                  "CPU 1\nBANK 2 STATUS 0x9000000000000000")
    assert [(r.cpu, r.bank) for r in rs] == [(0, 0), (3, 1), (1, 2)]
    assert [r.line for r in rs] == [1, 2, 3]


def test_status_replaces_and_addr_misc_must_follow_it():
    (after,) = mi.parse("CPU 0 STATUS UNCORRECTED ADDR 0x1234 MISC 0x86")
    assert after.status & msr.MCi_STATUS_ADDRV and after.status & msr.MCi_STATUS_MISCV
    assert after.warnings == ()
    (before,) = mi.parse("CPU 0\nADDR 0x1234\nMISC 0x86\nSTATUS UNCORRECTED\n", "t.txt")
    assert before.status == 0xB000000000000000 and before.addr == 0x1234
    assert len(before.warnings) == 2
    assert all(w.startswith("t.txt:4:") for w in before.warnings)
    assert "ADDRV" in before.warnings[0] and "MISCV" in before.warnings[1]
    (twice,) = mi.parse("CPU 0 STATUS UC STATUS EN")
    assert twice.status == msr.MCi_STATUS_EN
    assert mi.parse(mi.dump([before])) == [before]


def test_mcgstatus_carries_every_bit():
    (r,) = mi.parse("CPU 0 MCGSTATUS RIPV EIPV MCIP LMCES TES_P SEAM_NR 0x8000000000000000")
    assert r.mcgstatus == 0x800000000000180F
    assert mi.parse(mi.dump([r])) == [r]


def test_rip_forms():
    a, b, c = mi.parse("CPU 0 RIP 0x1234\nCPU 1 RIP 0x33:0x1234\n"
                       "CPU 2 RIP 0x10:<0xffffffff81000000> {do_idle}\n")
    assert (a.cs, a.ip) == (0, 0x1234)
    assert (b.cs, b.ip) == (0x33, 0x1234)
    assert (c.cs, c.ip) == (0x10, 0xFFFFFFFF81000000)


def test_the_kernel_panic_line():
    (r,) = mi.parse("CPU 3: Machine Check Exception: 5 Bank 4: 0xb200000000000175")
    assert (r.cpu, r.mcgstatus, r.bank, r.status) == (3, 5, 4, 0xB200000000000175)
    (z,) = mi.parse("CPU 1: MACHINE CHECK EXCEPTION: 0000000000000004 BANK 2: "
                    "0xbd000000000000cf\nADDR 0x180020 MISC 0x86\n")
    assert (z.cpu, z.mcgstatus, z.bank) == (1, 4, 2)
    assert z.status == 0xBD000000000000CF | msr.MCi_STATUS_ADDRV | msr.MCi_STATUS_MISCV


def test_informational_fields_and_modifiers_round_trip():
    text = ("CPU 1 BANK 5 STATUS UNCORRECTED SRAR 0x134 ADDR 0x2000 MISC 0x86\n"
            "MCGSTATUS RIPV EIPV MCIP TSC 0x123456789 TIME 1700000000 SOCKETID 1 APICID 2\n"
            "MCGCAP 0x1000c0a PROCESSOR 0:0x306f2 RIP 0x10:0xffff HOLD NMIBROADCAST EXCP\n"
            "CPU 0 STATUS CORRECTED POLL NOBROADCAST\n")
    a, b = mi.parse(text)
    assert (a.tsc, a.time, a.socketid, a.apicid, a.mcgcap) == (0x123456789, 1700000000, 1, 2,
                                                              0x1000C0A)
    assert (a.cpuvendor, a.cpuid, a.hold, a.nmibroadcast, a.raise_mode) == (0, 0x306F2, True,
                                                                             True, "exception")
    assert (b.raise_mode, b.nobroadcast) == ("poll", True)
    dumped = mi.dump([a, b])
    assert "SOCKETID 0x1\nAPICID 0x2\nMCGCAP 0x1000c0a\nHOLD\nNMIBROADCAST\nEXCP\n" in dumped
    assert mi.parse(dumped) == [a, b]


def test_dump_is_the_tools_canonical_form():
    (r,) = mi.parse("CPU 0\nSTATUS fatal\nRIP 12343434\n")
    assert mi.dump([r]) == ("CPU 0\nBANK 0\nTSC 0x0\nTIME 0\nRIP 0x00:0xbc588a\nMISC 0x0\n"
                            "ADDR 0x0\nSTATUS 0xb200000000000000\nMCGSTATUS 0x0\n"
                            "PROCESSOR 0:0x0\n\n")


def test_parse_file_names_the_file(tmp_path):
    p = tmp_path / "inject.txt"
    p.write_text("CPU 0\nSTATUS UC\nSTATUS FOO\n")
    with pytest.raises(UsageError) as e:
        mi.parse_file(p)
    assert e.value.field == f"{p}:3" and e.value.field.endswith("inject.txt:3")
    p.write_text("CPU 1 BANK 2 STATUS CORRECTED\n")
    assert mi.parse_file(p)[0].where == f"{p}:1"
    with pytest.raises(UsageError) as e:
        mi.parse_file(tmp_path / "missing.txt")
    assert e.value.field.endswith("missing.txt")


# --- bad lines: UsageError with FILE:LINE and the keyword -------------------------------------
BAD = [  # text, line, what the message must name, parse() keyword arguments
    ("CPU 0\nSTATUS UC FOO\n", 2, "FOO", {}),
    ("CPU 0 STATUSS UC", 1, "STATUS", {}),                 # unknown, with "did you mean"
    ("CPU 0 STATUS UC broadcast", 1, "broadcast", {}),
    ("CPU 0\nBANK 08\n", 2, "BANK", {}),                    # octal with an 8
    ("CPU 0 ADDR 0X1F", 1, "ADDR", {}),                     # the scanner knows only 0x
    ("CPU 0 MISC 0x", 1, "MISC", {}),
    ("CPU 0 TSC 12ab", 1, "TSC", {}),
    ("CPU 0 STATUS 0x10000000000000000", 1, "STATUS", {}),  # wider than 64 bits
    ("CPU 0 APICID 0x100000000", 1, "APICID", {}),
    ("CPU 0 RIP 0x100:0x1", 1, "RIP", {}),                  # cs is 8 bits
    ("STATUS UC\nCPU 0 STATUS UC", 1, "STATUS", {}),        # before any CPU
    ("# header\n\nADDR 0x1\n", 3, "ADDR", {}),
    ("CPU 0 BANK 10 STATUS UC", 1, "BANK 10", {"nbanks": 10}),
    ("CPU 0 12 STATUS UC", 1, "BANK 12", {"nbanks": 10}),
    ("CPU 0: Machine Check Exception: 5 Bank 10: 0xb200000000000000", 1, "BANK 10",
     {"nbanks": 10}),
    ("CPU 0 BANK 256", 1, "BANK", {}),                      # struct mce's bank is 8 bits
    ("CPU 0 STATUS UC\nCPU 4 STATUS UC", 2, "CPU 4", {"ncpus": 4}),
    ("CPU 0 STATUS UC\nIN_IRQ", 2, "IN_IRQ", {}),
    ("CPU 0 STATUS UC in_proc", 1, "IN_PROC", {}),
    ("CPU 0 STATUS UC IrqBroadcast", 1, "IRQBROADCAST", {}),
    ("CPU 0 STATUS UC CMCI", 1, "CMCI", {}),
    ("CPU 0 BANK 1\nSTATUS uncorrected EIPV", 2, "EIPV", {}),
    ("CPU 0 MCGSTATUS RIPV UC", 1, "UC", {}),
    ("CPU 0 MCGSTATUS LMCE_S", 1, "LMCES", {}),
    ("CPU 0\nCPU 1 STATUS UC", 1, "CPU", {}),              # a record with no field
    ("MCE\n", 1, "MCE", {}),
    ("CPU 0 RIP 0x10:<0x1234>", 1, "RIP", {}),              # no {symbol}
    ("CPU 0 PROCESSOR 0 0x306f2", 1, "PROCESSOR", {}),
    ("CPU 0: Machine Check Exception: 10 Bank 4: 0xb200000000000000", 1, "MCG_STATUS", {}),
    ("CPU 0: Machine Check Exception: 5 Bank 4: b200000000000175", 1, "0xb200000000000175", {}),
    ("CPU 0: Machine Check Exception: 5 Bank 4:", 1, "STATUS", {}),
    ("CPU 0: Machine Check 5", 1, "Exception", {}),
    ("CPU 0 BANK 1 2", 1, "'2'", {}),
    ("CPU 0 STATUS UC|EN", 1, "'|'", {}),
    ("CPU 0 STATUS UC\nBANK", 2, "BANK", {}),
    ("CPU 0 STATUS UC MACHINE", 1, "MACHINE", {}),
    ("CPU", 1, "CPU", {}),
    ("CPU x STATUS UC", 1, "CPU", {}),
]


@pytest.mark.parametrize("text, line, word, kw", BAD, ids=[b[0][:40] for b in BAD])
def test_bad_lines(text, line, word, kw):
    with pytest.raises(UsageError) as e:
        mi.parse(text, "bad.txt", **kw)
    assert e.value.field == f"bad.txt:{line}"
    assert word in e.value.message
    assert str(e.value).startswith(f"bad.txt:{line}: ")


def test_refused_keywords_each_say_why():
    for kw, why in mi.REFUSED.items():
        assert kw in why and "emu" in why
        with pytest.raises(UsageError) as e:
            mi.parse(f"CPU 0 STATUS UNCORRECTED {kw}", "r.txt")
        assert e.value.message == why


# --- delivery ---------------------------------------------------------------------------------
def test_default_raise_mode_and_overrides():
    ce, uc, ce_x, uc_p = mi.parse("CPU 0 STATUS CORRECTED\nCPU 0 STATUS UNCORRECTED\n"
                                  "CPU 0 STATUS CORRECTED EXCP\nCPU 0 STATUS UNCORRECTED POLL")
    assert (ce.mode, uc.mode, ce_x.mode, uc_p.mode) == ("poll", "exception", "exception", "poll")
    inj = mi.plan([uc_p])[0]
    assert not inj.broadcast and inj.targets == (0,)    # a poll trigger forces NOBROADCAST
    # UNCORRECTED without S is a UCNA: the poller logs it (via=poll)
    assert inj.refusal is None and inj.emu_local is False and inj.specs[0].endswith("via=poll")
    (fatal,) = mi.parse("CPU 0 STATUS UNCORRECTED PCC POLL")
    inj = mi.plan([fatal])[0]
    assert inj.refusal[0] == "<stdin>:1" and "EXCP" in inj.refusal[1]


def test_hold_joins_the_next_trigger():
    text = ("CPU 1 BANK 2 STATUS UNCORRECTED SRAO 0xcf ADDR 0x1000 MCGSTATUS RIPV MCIP HOLD\n"
            "CPU 2 BANK 2 STATUS CORRECTED EXCP HOLD\n"
            "CPU 0 BANK 3 STATUS UNCORRECTED SRAR 0x134 ADDR 0x2000 MCGSTATUS RIPV EIPV MCIP\n"
            "CPU 3 BANK 1 STATUS FATAL MCGSTATUS RIPV MCIP\n")
    first, second = mi.plan(mi.parse(text, "h.txt"))
    assert [r.cpu for r in first.records] == [0, 1, 2]
    assert first.trigger.line == 3 and first.mode == "exception" and first.broadcast
    assert first.emu_local is False and first.refusal is None
    assert first.synthetic_status == msr.MCi_STATUS_UC
    assert first.synthetic_mcg == msr.MCG_STATUS_MCIP | msr.MCG_STATUS_RIPV
    assert first.specs == ("cpu=0 bank=3 status=0xB580000000000134 addr=0x0000000000002000 "
                           "misc=0x0000000000000000 mcg=0x7",
                           "cpu=1 bank=2 status=0xB5000000000000CF addr=0x0000000000001000 "
                           "misc=0x0000000000000000 mcg=0x5",
                           "cpu=2 bank=2 status=0x9000000000000000 addr=0x0000000000000000 "
                           "misc=0x0000000000000000 mcg=0x0")
    assert [r.cpu for r in second.records] == [3]
    assert mi.to_specs(mi.parse(text)) == [list(first.specs), list(second.specs)]


def test_hold_replaced_and_hold_on_the_trigger_cpu():
    text = ("CPU 1 STATUS UNCORRECTED SRAO HOLD\nCPU 1 STATUS UNCORRECTED SRAR HOLD\n"
            "CPU 0 STATUS UNCORRECTED HOLD\nCPU 0 STATUS FATAL MCGSTATUS RIPV MCIP\n")
    (inj,) = mi.plan(mi.parse(text, "r.txt"))
    assert [r.line for r in inj.records] == [4, 2]
    assert sorted(r.line for r in inj.dropped) == [1, 3]
    assert any(n.startswith("r.txt:1:") and "replaced" in n for n in inj.notes)
    assert any(n.startswith("r.txt:3:") and "same CPU" in n for n in inj.notes)


def test_a_hold_no_trigger_follows_is_refused():
    with pytest.raises(UsageError) as e:
        mi.plan(mi.parse("CPU 0 STATUS FATAL\nCPU 1 STATUS UNCORRECTED HOLD\n", "h.txt"))
    assert e.value.field == "h.txt:2" and "HOLD" in e.value.message


def test_lmce_and_nobroadcast():
    (lm,) = mi.plan(mi.parse("CPU 2 BANK 1 MCGSTATUS RIPV MCIP LMCES NOBROADCAST "
                             "STATUS UNCORRECTED SRAR 0x134 ADDR 0x1000 MISC 0x86"))
    assert lm.lmce and not lm.broadcast and lm.targets == (2,) and lm.emu_local is True
    partial = mi.parse("CPU 1 STATUS FATAL MCGSTATUS RIPV MCIP\nNOBROADCAST\n", "p.txt")
    (inj,) = mi.plan(partial, ncpus=4)
    assert inj.emu_local is None and inj.refusal[0] == "p.txt:2"
    with pytest.raises(UsageError) as e:
        mi.to_specs(partial, ncpus=4)
    assert e.value.field == "p.txt:2" and "NOBROADCAST" in e.value.message
    every = mi.parse("CPU 0 STATUS FATAL HOLD\nCPU 1 STATUS FATAL NOBROADCAST\n")
    assert mi.plan(every, ncpus=2)[0].emu_local is False          # covers every CPU
    several = mi.parse("CPU 0 STATUS FATAL HOLD\nCPU 1 STATUS FATAL MCGSTATUS LMCES "
                       "NOBROADCAST\n", "s.txt")
    assert mi.plan(several, ncpus=4)[0].refusal[0] == "s.txt:2"


def test_the_seam_nr_example_runs_as_an_lmce_and_notes_what_emu_leaves_out():
    (ex,) = [e for e in EXAMPLES if e["file"] == "test/uncorrected-seam-nr"]
    recs = mi.parse(_text(ex["records"][0], "canonical"), ex["file"])
    (inj,) = mi.plan(recs)
    assert inj.emu_local is True
    (spec,) = inj.specs
    assert SPEC.fullmatch(spec) and spec.endswith("mcg=0xf")
    assert any("SEAM_NR" in n for n in inj.notes) and any("RIP" in n for n in inj.notes)


def test_records_without_val():
    (alone,) = mi.plan(mi.parse("CPU 0 STATUS UC EXCP", "v.txt"))
    assert alone.specs == () and alone.refusal[0] == "v.txt:1"
    (bc,) = mi.plan(mi.parse("CPU 1 STATUS UNCORRECTED HOLD\nCPU 0 STATUS UC\n", "v.txt"))
    assert bc.emu_local is False and len(bc.specs) == 1 and bc.specs[0].startswith("cpu=1 ")
    assert any(n.startswith("v.txt:2:") and "no VAL" in n for n in bc.notes)


def test_spec_strings():
    for e in EXAMPLES:
        for r in mi.parse("".join(_text(rec, "canonical") for rec in e["records"])):
            spec = mi.to_spec(r)
            assert SPEC.fullmatch(spec)
            got = dict(kv.split("=") for kv in spec.split())
            assert int(got["status"], 16) == r.status and int(got["addr"], 16) == r.addr
            assert int(got["mcg"], 16) == r.mcgstatus & 0xF


# --- xen-mceinj: the table in both numberings -------------------------------------------------
CLASS = {"SRAO": "SRAO", "UCNA": "UCNA", "CE": "CE", "UC_FATAL": "FATAL"}


@pytest.mark.parametrize("row", XEN["table"], ids=[str(r["type"]) for r in XEN["table"]])
def test_current_table_matches_the_vectors(row):
    t = xm.table("current")[row["type"]]
    assert (t.index, t.description, t.bank) == (row["type"], row["description"], row["bank"])
    assert t.mcg_status == int(row["mcg_status"], 16)
    assert t.status == int(row["mci_status"], 16)
    assert t.misc == int(row["mci_misc"], 16)
    assert t.mcacod == int(row["mcacod"], 16)
    assert t.misc & msr.MCi_MISC_LSB_MASK == row["misc_addr_lsb"]
    assert (t.misc & msr.MCi_MISC_ADDRMOD_MASK) >> 6 == row["misc_addr_mode"]
    assert t.cmci == ("CMCI" in row["delivery"])
    assert xm.expected(t, "dom0").xen_class == CLASS[row["sdm_class"]]
    plan = xm.parse(["-t", str(row["type"])])
    assert plan.delivery == ("cmci" if t.cmci else "mce")
    assert (plan.bank, plan.status, plan.misc, plan.mcg_status) == (t.bank, t.status, 0x86,
                                                                   t.mcg_status)


def test_2010_table_is_the_current_one_with_types_0_and_1_swapped():
    old, new = xm.table("2010"), xm.table("current")
    assert len(old) == 3 and len(new) == 5
    for a, b in ((old[0], new[1]), (old[1], new[0]), (old[2], new[2])):
        assert (a.bank, a.status, a.mcg_status, a.misc, a.cmci) == \
               (b.bank, b.status, b.mcg_status, b.misc, b.cmci)
    assert [r.description for r in old] == [r.description for r in new[:3]]
    assert all(r.name_matches_payload for r in old)
    mem = [r for r in old if r.description == "MCE_SRAO_MEM"][0]
    assert 0xC0 <= mem.mcacod <= 0xCF and mem.bank == 8               # §8.2: bank 8 / ...CF
    assert xm.parse(["-t", "0"], numbering="2010").status == 0xBD000000004000CF
    assert xm.parse(["-t", "0"]).status == 0xBD2000008000017A


def test_mce_test_grep_strings_follow_the_2010_numbering():
    exp = XEN["test_expectations"]["dom0_mcelog"]
    greps = {int(k.split()[1]): re.search(r'"(.+)"', v).group(1) for k, v in exp.items()}
    assert greps == xm.MCE_TEST_GREP
    for t in range(3):
        old = xm.expected(xm.table("2010")[t], "dom0")
        new = xm.expected(xm.table("current")[t], "dom0")
        assert old.mce_test.found_old_mcelog
        assert new.mce_test.found_old_mcelog == (t == 2)        # the swap (cc31ff7b4c)
    inconsistency = XEN["test_expectations"]["inconsistency"]
    for t in xm.table("current")[:3]:
        if t.payload != "mem_scrub_srao":
            assert xm.expected(t, "xen").mcelog_new in inconsistency


def test_expected_outcomes():
    cur = xm.table("current")
    dom0, guest, xen = (xm.expected(cur[0], t) for t in ("dom0", "guest", "xen"))
    assert dom0.outcome == guest.outcome == "recovered" and xen.outcome == "recovered_or_continue"
    assert xm.RECOVERED in dom0.xen_log and guest.guest_log == "kernel page recovery"
    assert dom0.bank_cleared and not dom0.fatal and dom0.telemetry == "URGENT"
    ucna = xm.expected(cur[2], "dom0")
    assert (ucna.path, ucna.outcome, ucna.telemetry, ucna.bank_cleared) == (
        "CMCI", "logged", "NONURGENT", True)
    ce = xm.expected(cur[3], "xen")
    assert (ce.xen_class, ce.outcome, ce.bank_cleared, ce.mce_test) == ("CE", "logged", False,
                                                                        None)
    assert xm.expected(cur[3], "xen", lmce=True).outcome == "hang"
    fatal = xm.expected(cur[4], "dom0")
    assert fatal.fatal and fatal.outcome == "panic" and not fatal.bank_cleared
    assert any(line.startswith(xm.FATAL_PANIC) for line in fatal.xen_log)


# --- xen-mceinj: options ----------------------------------------------------------------------
def test_defaults_and_options():
    p = xm.parse([])
    assert (p.action, p.type, p.cpu, p.domid, p.domain, p.addr) == (
        "inject", 0, 0, xm.DOMID_XEN, None, xm.DEFAULT_ADDR)
    assert p.spec == ("cpu=0 bank=7 status=0xBD2000008000017A addr=0x0000000000180020 "
                      "misc=0x0000000000000086 mcg=0x5")
    assert p.emu_local is False and not p.gpaddr and p.target == "xen"
    g = xm.parse(["xen-mceinj", "-t", "1", "-c", "3", "-d", "1", "-p", "0x2000"])
    assert g.spec.endswith(" domain=1") and g.spec.startswith("cpu=3 bank=8 ")
    assert g.gpaddr and g.target == "guest" and "GPADDR" in g.hypercalls[1]
    assert SPEC.fullmatch(g.spec)
    assert not xm.parse(["-t", "1", "-d", "1"], numbering="2010").gpaddr
    assert xm.parse(["-d", "0"]).target == "dom0"
    assert xm.parse(["-d", str(xm.DOMID_XEN)]).domain is None


def test_lmce_cmci_dump_help():
    lm = xm.parse(["-lt0"])
    assert lm.delivery == "lmce" and lm.mcg_status == 0x5 | msr.MCG_STATUS_LMCE
    assert lm.emu_local is True and lm.spec.endswith("mcg=0xd") and lm.expected.path == "LMCE"
    assert lm.hypercalls[-1].startswith("XEN_MC_inject_v2 flags=TYPE_LMCE")
    cm = xm.parse(["-t", "2"])
    assert cm.delivery == "cmci" and cm.refusal is None and cm.emu_local is False
    assert cm.spec.endswith("via=cmci")
    assert cm.hypercalls[-1] == "XEN_MC_inject_v2 flags=TYPE_CMCI|CPU_BROADCAST"
    d = xm.parse(["-Dc", "2", "-d", "0", "-p", "0x3000"])
    assert (d.action, d.cpu, d.spec, d.output[-1]) == ("dump", 2, None, "Dom0: gaddr=0x3000")
    h = xm.parse(["-t", "1", "-h"], numbering="2010")
    assert h.action == "help" and h.output[-1].endswith("2 : CMCI_UCNA_LLC")
    assert not any("-l" in line for line in h.output)
    assert xm.parse(["--lmce", "--dump"]).action == "dump"


BAD_OPTS = [  # argv, parse() keyword arguments, the option the error must name
    (["-x"], {}, "-x"),
    (["--cpu", "1"], {}, "--cpu"),
    (["--domain=0"], {}, "--domain"),
    (["--type=1"], {}, "--type"),
    (["--frob"], {}, "--frob"),
    (["--dump=1"], {}, "--dump"),
    (["-c", "0x1"], {}, "-c"),
    (["-c", "-1"], {}, "-c"),
    (["-c"], {}, "-c"),
    (["-d", "dom0"], {}, "-d"),
    (["-t", "5"], {}, "-t"),
    (["-t", "1x"], {}, "-t"),
    (["-t", "-1"], {}, "-t"),
    (["-t", "3"], {"numbering": "2010"}, "-t"),
    (["-l"], {"numbering": "2010"}, "-l"),
    (["--lmce"], {"numbering": "2010"}, "--lmce"),
    (["-l", "-t", "2"], {}, "-l"),
    (["-d", "32752"], {}, "-d"),                 # DOMID_SELF
    (["-d", "70000"], {}, "-d"),
    (["-p", "08"], {}, "-p"),
    (["-p", "-5"], {}, "-p"),
    (["-t", "0", "extra"], {}, "extra"),
    (["-c", "4"], {"ncpus": 4}, "-c"),
    (["-t", "1"], {"nbanks": 8}, "-t"),
    (["-d", "3"], {"domids": (0, 1)}, "-d"),
    (["-d", "1", "-p", "0x1000000"], {"max_gpa": 0x1000000}, "-p"),
    (["-t", "0"], {"numbering": "1999"}, "numbering"),
]


@pytest.mark.parametrize("argv, kw, opt", BAD_OPTS,
                         ids=[" ".join(b[0]) + str(b[1]) for b in BAD_OPTS])
def test_bad_options_name_the_option(argv, kw, opt):
    with pytest.raises(UsageError) as e:
        xm.parse(argv, **kw)
    assert e.value.field == opt
    assert e.value.message


def test_machine_checks_pass_when_in_range():
    p = xm.parse(["-t", "1", "-c", "3", "-d", "1", "-p", "0xfff000"], ncpus=4, nbanks=10,
                 domids=(0, 1), max_gpa=0x1000000)
    assert p.runnable and p.output[0] == "get domain 1 max gpa is: 0x1000000"


# --- mce-test cases ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(xm.MCE_TEST_CASES))
def test_mce_test_cases_in_both_numberings(name):
    t, target = xm.MCE_TEST_CASES[name]
    old = xm.mce_test_case(name, numbering="2010", guest_domid=2)
    new = xm.mce_test_case(name, guest_domid=2)
    assert old.type == new.type == t and old.target == new.target == target
    assert old.domain == {"dom0": 0, "guest": 2, "xen": None}[target]
    srao = name.startswith("srao")
    assert old.expected.mce_test.verdict == ("depends" if srao and target == "xen" else "pass")
    assert new.expected.mce_test.verdict == ("fail" if srao else "pass")
    assert ("guest_verify" in old.expected.mce_test.requires) == (srao and target == "guest")


def test_status_words_addrv_miscv_and_mcacod_are_emu_additions():
    """The issue's STATUS words beyond the tool's grammar: ADDRV, MISCV, MCACOD=N."""
    recs = mi.parse("CPU 0 BANK 1\nSTATUS VAL UC EN S AR ADDRV MISCV MCACOD=0x134\n")
    assert recs[0].status == 0xBD80000000000134
    assert mi.parse(mi.dump(recs)) == recs
    for text, words in (("STATUS UC MCACOD=0x12345", "16 bits"),
                        ("STATUS UC MCACOD 5", "MCACOD=N"),
                        ("STATUS UC MCACOD=", "takes a number")):
        with pytest.raises(UsageError) as ei:
            mi.parse("CPU 0 BANK 1\n" + text + "\n", "f.txt")
        assert ei.value.field == "f.txt:2" and words in ei.value.message
