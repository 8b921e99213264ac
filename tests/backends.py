"""Helpers for the tests that run chapters again on real backends (Redis, PostgreSQL)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import site

ROOT = Path(__file__).resolve().parent.parent


def run_notebook(path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    """Run a notebook top to bottom in a kernel that inherits ``env``; return everything it printed."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = site.execute(path)  # raises CellExecutionError on the first failing cell
    return "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))


def run_tests(*tests: str, shard: str | None = None, **env: str) -> None:
    """Run test files in a pytest of their own, with ``env`` added to the environment; ``shard="I/N"``
    runs every N-th of their tests only (tests/conftest.py), so N such runs can share the workers."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "0", *tests, *(["--shard", shard] if shard else [])],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
