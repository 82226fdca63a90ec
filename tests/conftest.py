"""Shared test helpers.

The reference vectors the tests use are copied into ``tests/data/`` (their source:
the project's shared reference, ``vectors/``; each file names its own origin in its
``comment``), so a fresh clone tests on its own. Test modules import :data:`VECTORS` /
:func:`load_vectors` from here (collection-time parametrization cannot use fixtures).
"""
from __future__ import annotations

import json
from pathlib import Path

VECTORS = Path(__file__).resolve().parent / "data"


def load_vectors(name: str) -> dict:
    """Parsed JSON of ``VECTORS / name`` (e.g. "consolidated_bank_overwrite.json")."""
    with open(VECTORS / name, encoding="utf-8") as f:
        return json.load(f)


import pytest  # noqa: E402

# pytester: the emu plugin is tested by running pytest on small test files
pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True)
def _no_leaks(emu_leak_check):
    """Every test, whatever it does, leaves no process and nothing in /dev/shm."""
    yield


SRAO_MEM = "cpu=0 bank=8 status=0xBD000000004000CF addr=0x180020 misc=0x86 mcg=0x5"
FATAL = "cpu=0 bank=5 status=0xB200000000000000 mcg=0x5"
UCNA = "cpu=1 bank=6 status=0xBC20000080000136 addr=0x180040 misc=0x86 mcg=0x5"
