"""Lint and types are part of the test suite: ruff on everything, mypy --strict on the package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_is_clean():
    result = run("ruff", "check", "asyncquota", "benchmarks", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean():
    result = run("mypy", "asyncquota")
    assert result.returncode == 0, result.stdout + result.stderr
