"""Shared test helpers.

The reference vectors live outside the repository, in ``../shared/vectors`` relative
to the repository root. Test modules import :data:`VECTORS` / :func:`load_vectors`
from here (collection-time parametrization cannot use fixtures).
"""
from __future__ import annotations

import json
from pathlib import Path

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors"


def load_vectors(name: str) -> dict:
    """Parsed JSON of ``VECTORS / name`` (e.g. "consolidated_bank_overwrite.json")."""
    with open(VECTORS / name, encoding="utf-8") as f:
        return json.load(f)
