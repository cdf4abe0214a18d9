"""The code stays lint-clean and strictly typed: ruff over the tree, mypy --strict
over the packages (settings in pyproject.toml)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_ruff_is_clean() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(300)
def test_mypy_strict_is_clean(tmp_path: Path) -> None:
    # cli/ and jepsen-lite/ install as raftkv_cli and jepsen_lite; checked by
    # folder name, their imports of each other would resolve to nothing (Any)
    # and hide every error behind them. Links under the import names let mypy
    # check them as the packages they are.
    for name, folder in (("raftkv_cli", "cli"), ("jepsen_lite", "jepsen-lite")):
        (tmp_path / name).symlink_to(ROOT / folder, target_is_directory=True)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "-p", "raftkv", "-p", "shardmgr", "-p", "raftkv_cli",
         "-p", "jepsen_lite"],
        cwd=ROOT, capture_output=True, text=True, check=False,
        env={**os.environ, "MYPYPATH": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
