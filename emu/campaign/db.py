"""The failure database: JSON Lines of the trials that found something.

Each campaign appends one ``emu.stress.failure/1`` line per trial with a finding
(violations; hazards too with ``--fail-on hazard``): the seed, the trial, the mix,
the family, the machine's flags, the chaos and fault options, the first finding and
the replay line. The next campaign with the same database plays those trials first,
before its own (as Hypothesis replays its examples database): a failure found once
is checked again on every run until it is gone. Entries for another machine (other
flags) are kept and skipped. Pure file handling.
"""
from __future__ import annotations

import json
import os

from emu.errors import UsageError

FAILURE_SCHEMA = "emu.stress.failure/1"


def check_db(path: str) -> None:
    """Usable as a database: absent (it will be created in a writable directory) or a
    readable, writable file of JSON Lines. UsageError (field ``db``) otherwise."""
    if os.path.isdir(path):
        raise UsageError("db", f"{path}: is a directory; give a file")
    if os.path.exists(path):
        if not os.access(path, os.R_OK) or not os.access(path, os.W_OK):
            raise UsageError("db", f"{path}: cannot read or write it; give a readable, "
                             "writable file (or --no-db)")
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError("db", f"{path}: unreadable ({exc}); give another --db") from None
        for n, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                ok = json.loads(line).get("schema") == FAILURE_SCHEMA
            except (ValueError, AttributeError):
                ok = n == len(lines) - 1          # a torn last line: a killed campaign
            if not ok:
                raise UsageError("db", f"{path}:{n + 1}: not a failure database line "
                                 f"({FAILURE_SCHEMA}); give another --db")
        return
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
    except OSError:
        pass
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UsageError("db", f"{path}: cannot create it there; give a file in a writable "
                         "directory")


def load(path: str) -> list[dict]:
    """The entries, oldest first, one per (seed, trial, scenario, machine); a torn or
    foreign line is skipped."""
    if not path or not os.path.exists(path):
        return []
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if not isinstance(e, dict) or e.get("schema") != FAILURE_SCHEMA:
                continue
            key = (e.get("seed"), e.get("trial"), e.get("scenario"), tuple(e.get("machine", ())))
            if key not in seen:
                seen.add(key)
                out.append(e)
    return out


def entry(opts, rec: dict) -> dict:
    first = rec["findings"][0]
    return {"schema": FAILURE_SCHEMA, "seed": rec["seed"], "trial": rec["trial"],
            "scenario": opts.mix_text, "family": rec["family"],
            "machine": opts.machine_flags(), "chaos": float(opts.chaos),
            "starve": opts.starve, "faults": list(opts.faults),
            "fault_rate": float(opts.fault_rate),
            "finding": {"kind": first["kind"], "id": first.get("id"), "text": first["text"]},
            "replay": rec.get("replay")}


def append(path: str, entries: list[dict]) -> None:
    if not path or not entries:
        return
    with open(path, "a", encoding="utf-8") as f:
        for e in entries:
            f.write(json.dumps(e, sort_keys=True) + "\n")
        f.flush()
