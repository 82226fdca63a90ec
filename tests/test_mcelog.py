"""emu.domains.mcelog against real mcelog output (tests/data/mcelog_output.json) and p4.c rules."""
from __future__ import annotations

import json

import pytest
from conftest import VECTORS

from emu.domains.mcelog import (
    DISCLAIMER,
    decode_mca,
    format_log,
    format_raw,
    format_record,
    parse_ascii,
    parse_cpuid,
)
from emu.hw.msr import MCG_SER_P, MCG_TES_P, MCi_STATUS_FWST

DATA = json.loads((VECTORS / "mcelog_output.json").read_text(encoding="utf-8"))
EXAMPLES = [pytest.param(e, id=e["id"]) for e in DATA["examples"]]

# Lines printed by mcelog's *model-specific* decoders, which emu.domains.mcelog does not implement
# (architectural decode only). Each entry: (line mcelog printed, line we print instead or
# None if we print nothing there). Every other line of these examples must match exactly.
MODEL_SPECIFIC = {
    # nehalem.c nehalem_decode_model() memory-controller detail (family 6 model 26)
    "input/dimm0": [("Memory corrected error count (CORE_ERR_CNT): 0", None),
                    ("Memory transaction Tracker ID (RTId): 0", None),
                    ("Memory DIMM ID of error: 0", None),
                    ("Memory channel ID of error: 0", None),
                    ("Memory ECC syndrome: 0", None)],
    # skylake_xeon.c: mirror-CE wording (check_for_mirror) and the "M2M: " prefix its
    # decoder prints without a newline (family 6 model 85)
    "input/skx_mirror1": [("Corrected error by mirroring with channel failover", "Corrected error"),
                          ("M2M: STATUS 8800000000000080 MCGSTATUS 0",
                           "STATUS 8800000000000080 MCGSTATUS 0")],
    # sapphire.c sapphire_decode_model() memory-controller detail (family 6 model 143)
    "input/spr_uc_patscrub": [("MemCtrl: UC_PATSCRUB_MIRR2ND_ERR", None),
                              ("bank: 0x0 bankgroup: 0x0 row: 0x0 column: 0x0", None),
                              ("failed device: 0x0", None),
                              ("rank: 0x0 subrank: 0x0", None),
                              ("ecc mode: SDDC 2LM memory mode", None)],
    # core2.c core2_decode_model(): bus-queue fields of MSCOD for bus errors (model 15)
    "bus_error_timeout": [("BQ_DCU_READ_TYPE BQ_ERR_HARD_TYPE BQ_ERR_HARD_TYPE", None)],
}


def render(example: dict) -> list[str]:
    records = parse_ascii(example["input_lines"])
    return format_log(records, raw="--raw" in example["mcelog_args"]).splitlines()


@pytest.mark.parametrize("example", EXAMPLES)
def test_vector(example):
    # only the options emu.domains.mcelog emulates were used to make the vector
    assert set(example["mcelog_args"]) <= {"--no-dmi", "--ascii", "--raw"}
    assert example["stderr"] == []
    expected = list(example["output_lines"])
    for theirs, ours in MODEL_SPECIFIC.get(example["id"], []):
        assert theirs in expected, "stale MODEL_SPECIFIC entry"
        i = expected.index(theirs)
        if ours is None:
            del expected[i]
        else:
            expected[i] = ours
    assert render(example) == expected


def test_model_specific_list_names_real_examples():
    ids = {e["id"] for e in DATA["examples"]}
    assert set(MODEL_SPECIFIC) <= ids
    fully = ids - set(MODEL_SPECIFIC)
    assert len(fully) == len(ids) - 4


# --- decode_mca: codes of Xen's test cases ---------------------------------------------------
def test_xen_memory_scrub_0x00cf():
    assert decode_mca(0x00CF) == ["MCA: MEMORY CONTROLLER MS_CHANNELunspecified_ERR",
                                  "Transaction: Memory scrubbing error"]


def test_xen_l3_eviction_0x017a_uses_post_2021_levels():
    # Xen's xen-mceinj documents 0x017A as "Generic CACHE Level-2 Eviction Error": that is
    # mcelog before commit 570893f (2021), which printed LL as is. Current mcelog (and the
    # srao_l3_writeback vector) prints LL+1, the SDM's L1..L3 numbering.
    [line] = decode_mca(0x017A)
    assert line == "MCA: Generic CACHE Level-3 Eviction Error"
    assert "Level-2" not in line


@pytest.mark.parametrize("code, text", [
    (0x0136, "MCA: Data CACHE Level-3 Data-Read Error"),
    (0x0134, "MCA: Data CACHE Level-1 Data-Read Error"),
    (0x0150, "MCA: Instruction CACHE Level-1 Instruction-Fetch Error"),
])
def test_xen_cache_codes(code, text):
    assert decode_mca(code) == [text]


@pytest.mark.parametrize("code, lines", [
    (0x0000, ["MCA: No Error"]),
    (0x0006, ["MCA: SMM Handler Code Access Violation"]),
    (0x0007, ["MCA: Unknown Error 7"]),
    (0x000E, ["MCA: Level-2 Generic cache hierarchy error"]),            # 0-based, unchanged
    (0x0014, ["MCA: Data TLB Level-0 Error"]),                           # 0-based, unchanged
    (0x0193, ["MCA: Instruction CACHE UNKNOWN UNKNOWN Error"]),          # LL=3 -> level 4
    (0x0280, ["MCA: Memory as cache: MEMORY CONTROLLER GEN_CHANNEL0_ERR",
              "Transaction: Generic undefined request"]),
    (0x0300, ["MCA: Unknown Error 300"]),
    (0x0400, ["MCA: Internal Timer error"]),
    (0x0401, ["MCA: Internal unclassified error: 401"]),
    (0x1400, ["MCA: corrected filtering (some unreported errors in same region)",
              "Internal Timer error"]),
    (0x0B31, ["MCA: BUS error: -1 0 Level-1 Responed-to-request Data-Read Memory-access "
              "Request-timed-out"]),
    (0x2000, ["MCA: Unknown Error 2000"]),                               # bits 15:13 unknown
])
def test_decode_mca_classes(code, lines):
    assert decode_mca(code) == lines


def test_io_mca_root_port_needs_miscv():
    misc = 1 << 32 | 0x3A << 24 | 2 << 19 | 1 << 16
    bus = "MCA: BUS error: 1 3 Level-3 Generic Generic IO Request-did-not-timeout"
    assert decode_mca(0x8800000000000E0B, misc, cpu=3, socket=1) == [
        bus, "IO MCA reported by root port 1:3a:02.1"]
    assert decode_mca(0x0E0B, misc, cpu=3, socket=1) == [bus]


def genmca_expect(code: int) -> str:
    """mcelog's own oracle (input/GENMCA, used by tests/mcaerr_test), ported; its
    "complain" ranges are what p4.c prints as "Unknown Error"."""
    ll = ("Level-0", "Level-1", "Level-2", "Level-3", "UNKNOWN")
    tt = ("Instruction", "Data", "Generic", "Unknown")
    rrrr = ("Generic", "Read", "Write", "Data-Read", "Data-Write", "Instruction-Fetch",
            "Prefetch", "Eviction", "Snoop") + ("UNKNOWN",) * 7
    simple = ("No Error", "Unclassified", "Microcode ROM parity error", "External error",
              "FRC error", "Internal parity error", "SMM Handler Code Access Violation")
    e = code & ~0x1000
    if e < 0x7:
        return simple[e]
    if 0xC <= e < 0x10:
        return f"{ll[e & 3]} Generic cache hierarchy error"
    if 0x10 <= e < 0x20:
        return f"{tt[e >> 2 & 3]} TLB {ll[e & 3]} Error"
    if 0x80 <= e < 0x100 or 0x280 <= e < 0x300:
        chan = "unspecified" if e & 0xF == 0xF else str(e & 0xF)
        mmm = ("GEN", "RD", "WR", "AC", "MS", "RES5", "RES6", "RES7")[e >> 4 & 7]
        return ("Memory as cache: " if e >> 9 & 1 else "") + \
            f"MEMORY CONTROLLER {mmm}_CHANNEL{chan}_ERR"
    if 0x100 <= e < 0x200:
        return f"{tt[e >> 2 & 3]} CACHE {ll[(e & 3) + 1]} {rrrr[e >> 4 & 0xF]} Error"
    if 0x400 <= e < 0x800:
        return "Internal Timer error" if e == 0x400 else f"Internal unclassified error: {e:x}"
    if 0x800 <= e < 0x1000:
        pp = ("Local-CPU-originated-request", "Responed-to-request",
              "Observed-error-as-third-party", "Generic")[e >> 9 & 3]
        ii = ("Memory-access", "Reserved", "IO", "Other-transaction")[e >> 2 & 3]
        t = ("Request-did-not-timeout", "Request-timed-out")[e >> 8 & 1]
        return f"{ll[e & 3]} {pp} {rrrr[e >> 4 & 0xF]} {ii} {t}"
    return f"Unknown Error {e:x}"


def test_decode_mca_matches_mcelog_genmca_for_all_codes():
    for code in range(0x2000):
        lines = decode_mca(0x8000000000000000 | code)
        assert lines[0].startswith("MCA: ")
        assert genmca_expect(code) in "\n".join(lines), hex(code)
        assert (code >= 0x1000) == lines[0].startswith("MCA: corrected filtering"), hex(code)


# --- format_record beyond the vectors -----------------------------------------------------
def rec(**kw) -> dict:
    return {"cpuid": 0x6F6, **kw}                     # Intel family 6 model 15 (Core 2)


def test_kernel_record_defaults_print_ids_and_socket():
    # without "recordlen" the record is a full kernel struct mce: APICID/SOCKETID printed,
    # the socket known to the bus decode
    out = format_record(rec(cpu=2, bank=0, status=0xB200000000000E0F, socketid=1, apicid=4))
    assert ("MCA: BUS error: 1 2 Level-3 Generic Generic Other-transaction "
            "Request-did-not-timeout") in out
    assert out[-2:] == ["APICID 4 SOCKETID 1", "CPUID Vendor Intel Family 6 Model 15 Step 6"]
    assert out[0] == DISCLAIMER and out[1] == "CPU 2 BANK 0"


def test_extcpu_ppin_microcode_and_extended_banks():
    out = format_record(rec(cpu=1, extcpu=300, bank=255, ppin=0xABC, microcode=0x2F))
    assert out[1] == "CPU 300 ACPI/APEI reported error"
    assert {"PPIN abc", "MICROCODE 2f"} <= set(out)
    assert format_record(rec(bank=200))[1] == "CPU 0 Undecoded extended event c8"


def test_thermal_event_heated():
    out = format_record(rec(cpu=3, bank=128, status=1))
    assert out[1:4] == ["CPU 3 THERMAL EVENT",
                        "Processor 3 heated above trip temperature. Throttling enabled.",
                        "Please check your system cooling. Performance will be impacted"]
    assert not any(line.startswith("MCA:") for line in out)


def test_threshold_yellow_and_firmware_lines():
    status = 0x9000000000000134 | 2 << 53 | MCi_STATUS_FWST
    out = format_record(rec(status=status, mcgcap=MCG_TES_P | MCG_SER_P))
    i = out.index("Firmware may have updated this error")
    assert out[i + 1:i + 5] == [
        "Threshold based error status: yellow",
        "Large number of corrected cache errors. System operating, but might lead",
        "to uncorrected errors soon", "MCA: Data CACHE Level-1 Data-Read Error"]
    # no TES_P (and mcgcap != 0): no threshold line; no SER_P: no firmware line
    plain = format_record(rec(status=status, mcgcap=0x809 & ~MCG_TES_P))
    assert not any(line.startswith(("Threshold", "Firmware")) for line in plain)


@pytest.mark.parametrize("bits, state", [(1 << 56, "SRAO"), (3 << 55, "SRAR"),
                                         (1 << 55, "AR"), (0, None)])
def test_ar_state_only_when_s_or_ar(bits, state):
    out = format_record(rec(status=0xB000000000000134 | bits))
    states = [line for line in out if line in ("UCNA", "AR", "SRAO", "SRAR")]
    assert states == ([state] if state else [])


@pytest.mark.parametrize("cpu", [None, (2, 0x00F50), (0, 0x00543)])   # none, AMD, Pentium
def test_no_architectural_decode_without_intel_family_6_plus(cpu):
    m = {"status": 0xBD80000000000134, "cpuvendor": cpu[0], "cpuid": cpu[1]} if cpu else \
        {"status": 0xBD80000000000134}
    assert not any(line.startswith(("MCG status", "MCA:")) for line in format_record(m))


def test_parse_cpuid_extended_fields():
    assert parse_cpuid(0x50654) == (6, 85, 4)
    assert parse_cpuid(0x00F41) == (15, 4, 1)
    assert parse_cpuid(0xA20F10) == (25, 1, 0)   # ext. model ignored unless family 6 or 15


def test_time_is_ctime_utc():
    assert "TIME 1000 Thu Jan  1 00:16:40 1970" in format_record({"time": 1000})


def test_raw_format():
    m = parse_ascii(["CPU 1 BANK 3", "RIP 10:<ffffffff81000000>", "SOCKETID 2", "STATUS 0x0"])[0]
    assert format_raw(m) == ["CPU 1", "BANK 3", "TSC 0", "RIP 0x10:0xffffffff81000000",
                             "MISC 0", "ADDR 0", "STATUS 0", "MCGSTATUS 0",
                             "PROCESSOR 0:0", "TIME 0", "SOCKETID 2", ""]


# --- parse_ascii beyond the vectors -------------------------------------------------------
def test_parse_gunk_prefixes_and_cpuid_line():
    [m] = parse_ascii(["<4>[  12.5] mce: [Hardware Error]: CPU 4 BANK 6",
                       "Jan 1 host mcelog: STATUS 0x9c00000000000150",
                       "CPUID Vendor Intel Family 6 Model 85"])
    assert (m["cpu"], m["bank"], m["status"]) == (4, 6, 0x9C00000000000150)
    assert (m["cpuvendor"], m["cpuid"]) == (0, 0x50650)
    assert format_record(m)[-1] == "CPUID Vendor Intel Family 6 Model 85 Step 0"


def test_hardware_error_line_suppresses_disclaimer():
    [m] = parse_ascii(["HARDWARE ERROR", "CPU 0 BANK 1", "STATUS 0x1"])
    assert m["disclaimer_seen"] and format_record(m)[0] == "CPU 0 BANK 1"


def test_incomplete_fields_are_flagged():
    [m] = parse_ascii(["CPU 0 BANK 1", "STATUS zz", "ADDR"])
    assert m["incomplete"] == 2
    assert format_record(m)[-1] == "(Fields were incomplete)"


def test_skip_patterns_are_silent_but_exact_pattern_never_matches():
    items = parse_ascii(["CPU 0 BANK 1", "MCA: Data CACHE Level-1 Data-Read Error",
                         "MCi status:", "Kernel does not support page offline interface"])
    # the first two are skipped; the exact pattern fails on the newline, so it is free text
    assert [sorted(i) == ["text"] for i in items] == [False, True]
    assert items[1]["text"] == "Kernel does not support page offline interface"


def test_free_text_splits_records_and_log_is_back_to_back():
    items = parse_ascii(["CPU 0 BANK 1", "PROCESSOR 0:0x6f6", "STATUS 0x9000000000000134",
                         "--- next ---",
                         "CPU 1 BANK 2", "STATUS 0x9000000000000150"])
    assert [i.get("text") for i in items] == [None, "--- next ---", None]
    lines = format_log(items).splitlines()
    assert "" not in lines                               # mcelog prints no separator
    assert lines.count(DISCLAIMER) == 2
    # the second record has no cpuid: mcelog keeps decoding with the previous CPU type
    assert "MCA: Instruction CACHE Level-1 Instruction-Fetch Error" in lines
    assert lines.count("CPUID Vendor Intel Family 6 Model 15 Step 6") == 1
    # alone, the same record is not decoded (mcelog --ascii starts as a generic CPU)
    assert not any(line.startswith("MCA:") for line in format_record(items[2]))


def test_raw_log_ends_each_record_with_blank_line():
    items = parse_ascii(["CPU 0 BANK 1", "# comment", "CPU 1 BANK 2"])
    assert format_log(items, raw=True).count("\n\n") == 2
    assert "# comment" not in format_log(items, raw=True)
    assert "# comment" in format_log(items)
