"""scripts/_venv.sh, the set-up behind scripts/test and scripts/demo: a failed install stops it loudly and writes no
stamp (so the next run tries again); only a complete install writes the stamp. Run on a copy of the script with a
stand-in pip (the real install is what the suite itself came from)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _project(tmp_path: Path, pip_exit: int, broken_module: str | None = None) -> Path:
    """A project folder with the real _venv.sh and pyproject.toml, and a .venv whose pip prints like a failed build
    and exits ``pip_exit``; its python is this interpreter (``broken_module``: one that fails to import there)."""
    root = tmp_path / "project"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "_venv.sh", root / "scripts")
    shutil.copy(ROOT / "pyproject.toml", root)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    if broken_module:
        (shadow / f"{broken_module}.py").write_text("raise ImportError('a broken build')\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\nPYTHONPATH="{shadow}" exec "{sys.executable}" "$@"\n')
    (bin_dir / "pip").write_text("#!/bin/sh\necho 'WARNING: Location file:///x is ignored'\n"
                                 "echo 'ERROR: Failed building wheel for llama-cpp-python' >&2\n"
                                 f"exit {pip_exit}\n")
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    return root


def _source(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", 'set -euo pipefail; source scripts/_venv.sh "[test]"; echo SET-UP-DONE'],
                          cwd=root, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def _stamps(root: Path) -> list[str]:
    return [p.name for p in (root / ".venv").glob(".installed-*")]


def test_a_failed_install_stops_the_set_up_and_writes_no_stamp(tmp_path):
    root = _project(tmp_path, pip_exit=1)
    result = _source(root)
    assert result.returncode != 0 and "SET-UP-DONE" not in result.stdout
    assert "Failed building wheel for llama-cpp-python" in result.stderr  # pip's own words, shown
    assert "set-up failed" in result.stderr
    assert _stamps(root) == []


def test_a_test_dependency_that_does_not_import_stops_the_set_up(tmp_path):
    root = _project(tmp_path, pip_exit=0, broken_module="llama_cpp")
    result = _source(root)
    assert result.returncode != 0 and "set-up failed: a test dependency" in result.stderr, result.stderr
    assert _stamps(root) == []


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_a_complete_install_writes_the_stamp_once(tmp_path):
    root = _project(tmp_path, pip_exit=0)
    result = _source(root)
    assert result.returncode == 0 and "SET-UP-DONE" in result.stdout, result.stderr
    assert len(_stamps(root)) == 1 and _stamps(root)[0].endswith("[test]")
    assert "WARNING: Location" not in result.stdout + result.stderr  # local-index chatter stays hidden
