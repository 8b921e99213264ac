"""course.py, the one entry point: its help, its reading of the pins, and its set-up errors."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path
from unittest import mock

import pytest

import course


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert course.main([]) == 0
    out = capsys.readouterr().out
    for command in ("lab", "test", "progress", "reset", "generate", "bench"):
        assert f"python course.py {command}" in out
    assert course.main(["nonsense"]) == 2


def test_pins_follow_platform_markers() -> None:
    pins = course._pins()
    assert pins["fastapi"] and pins["sqlalchemy"]  # extras are dropped from the name
    assert ("uvloop" in pins) == (sys.platform != "win32")


def test_this_environment_is_used_as_it_is() -> None:
    assert course._current_python_has_everything()


def test_a_missing_venv_module_gets_an_actionable_message(tmp_path: Path) -> None:
    failing = mock.patch.object(venv, "create", side_effect=subprocess.CalledProcessError(1, ["ensurepip"]))
    with (
        mock.patch.object(course, "VENV", tmp_path / ".venv"),
        mock.patch.object(course, "_current_python_has_everything", return_value=False),
        failing,
        pytest.raises(SystemExit, match="sudo apt install python3-venv"),
    ):
        course.ensure_environment()
