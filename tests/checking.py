"""Helpers for the tests of exercise checks."""

from __future__ import annotations

from typing import Any

import pytest

from support.checks import ExerciseIncomplete


def rejected(capsys: pytest.CaptureFixture[str], check: Any, *answer: Any) -> str:
    """Run a check that must not pass; return what it printed plus its one-line summary."""
    with pytest.raises(ExerciseIncomplete) as failure:
        check(*answer)
    return capsys.readouterr().out + str(failure.value)
