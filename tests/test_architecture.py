"""The house keeps its shape: the import contract (pyproject.toml, import-linter)
and the lint rules (ruff) hold on the tree, and the contract really catches a lower
layer importing a higher one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    code = "import sys; from importlinter.cli import lint_imports_command; " \
           "sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def test_import_contract_holds_on_the_tree():
    p = _lint_imports(ROOT, ROOT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "3 kept, 0 broken" in p.stdout


def test_import_contract_fails_when_silicon_imports_xen(tmp_path):
    shutil.copytree(ROOT / "emu", tmp_path / "emu",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    cpu = tmp_path / "emu" / "hw" / "cpu.py"
    cpu.write_text(cpu.read_text() + "\nfrom emu.xen import mce  # noqa: E402,F401\n")
    p = _lint_imports(tmp_path, tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Layers: each room of emu imports only from the rooms below it BROKEN" in p.stdout
    assert "emu.hw.cpu -> emu.xen.mce" in p.stdout


def test_ruff_is_clean():
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
