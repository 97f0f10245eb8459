# SPDX-License-Identifier: GPL-2.0-only
"""The tree's habits are checked, so they stay true: mypy for the type hints, ruff for lint and
format (both configured in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_mypy_finds_no_errors_in_the_package_or_its_tests() -> None:
    result = _run("mypy", "cusetpm", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_lint_is_clean() -> None:
    result = _run("ruff", "check", "cusetpm", "tests", "scripts", "examples")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = _run("ruff", "format", "--check", "cusetpm", "tests", "scripts", "examples")
    assert result.returncode == 0, result.stdout + result.stderr
