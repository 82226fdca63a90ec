"""The project stands alone: no test reads the shared reference beside the repository
(the vectors are copies in tests/data), the license file matches setup.cfg, the
schemas ship as package data, and the docs the README points to exist."""
from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_test_reads_the_shared_reference():
    for f in sorted((ROOT / "tests").rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        # the names built here, so that this file does not spell them itself
        sh = "SHARED".lower()
        for bad in (f"../{sh}", f"work/{sh}", f"{sh}/vectors", f"{sh}/reference"):
            assert bad not in text, (f, bad)


def test_license_matches_setup_cfg_and_schemas_are_package_data():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["metadata"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "*.json" in cfg["options.package_data"]["emu.schemas"]
    urls = cfg["metadata"]["project_urls"]
    assert "Source" in urls and "Documentation" in urls
    assert "pytest-xdist" in cfg["options.extras_require"]["test"]
    assert "jsonschema" in cfg["options.extras_require"]["test"]


def test_the_shipped_docs_exist():
    for name in ("xen-behaviour.rst", "inputs.rst", "outputs.rst"):
        assert (ROOT / "docs" / name).stat().st_size > 1000
