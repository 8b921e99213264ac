"""support.checks: the feedback a learner sees, pinned for each kind of outcome."""

from __future__ import annotations

import re

import pytest

from support.checks import ExerciseIncomplete, exercise, expect, placeholder_message

SOLUTION = "solutions/99_demo.ipynb"


def run_check(answer: int) -> None:
    with exercise("9.1", "Return the answer", SOLUTION) as ex:
        ex.step("returns an int", lambda: expect(isinstance(answer, int), "an int", type(answer).__name__))
        ex.step(
            "returns 42",
            lambda: expect(
                answer == 42, "42", repr(answer), "Think of the question.", "It is six times seven."
            ),
        )


def placeholder() -> int:
    raise NotImplementedError(placeholder_message("9.1"))


def with_learner_code(fn) -> None:  # type: ignore[no-untyped-def]
    with exercise("9.1", "Return the answer", SOLUTION) as ex:
        ex.step("returns 42", lambda: expect(fn() == 42, "42", "?"))


def test_a_right_answer_passes(capsys: pytest.CaptureFixture[str]) -> None:
    run_check(42)
    assert capsys.readouterr().out == (
        "Exercise 9.1 · Return the answer\n"
        "  ✅ returns an int\n"
        "  ✅ returns 42\n"
        "Exercise 9.1: passed ✅ (2 of 2 checks)\n"
    )


def test_a_wrong_answer_says_expected_seen_and_a_first_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete, match=re.escape("Exercise 9.1: not yet — 1 of 2 checks pass")):
        run_check(41)
    assert capsys.readouterr().out == (
        "Exercise 9.1 · Return the answer\n"
        "  ✅ returns an int\n"
        "  ❌ returns 42\n"
        "       expected: 42\n"
        "       seen:     41\n"
        "       hint:     Think of the question.\n"
        "       (run the check again after another try for a more specific hint)\n"
    )


def test_hints_come_in_tiers_then_the_solution(capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(3):
        with pytest.raises(ExerciseIncomplete):
            run_check(41)
    out = capsys.readouterr().out
    attempts = out.split("Exercise 9.1 · Return the answer\n")[1:]
    assert "six times seven" not in attempts[0] and "solution:" not in attempts[0]
    assert "six times seven" in attempts[1] and "solution:" not in attempts[1]
    assert f"solution: {SOLUTION} (Exercise 9.1)" in attempts[2]
    assert (
        "sure you are right? docs/troubleshooting.md#a-check-fails-and-you-are-sure-you-are-right"
        in attempts[2]
    )


def test_an_untouched_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete, match=re.escape("Exercise 9.1: not started")):
        with_learner_code(placeholder)
    out = capsys.readouterr().out
    assert "⬜ not started: Exercise 9.1's cell still raises the placeholder NotImplementedError" in out
    assert "❌" not in out


def test_an_exception_in_learner_code_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete, match="not yet — 0 of 1"):
        with_learner_code(lambda: {}["price"])
    out = capsys.readouterr().out
    assert "  ❌ returns 42\n       your code raised KeyError: 'price'\n" in out
    assert "Traceback" not in out


def test_an_event_loop_error_points_at_the_troubleshooting_page(capsys: pytest.CaptureFixture[str]) -> None:
    def nested_run() -> int:
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")

    with pytest.raises(ExerciseIncomplete):
        with_learner_code(nested_run)
    assert "help:     docs/troubleshooting.md#event-loop-errors\n" in capsys.readouterr().out
    with pytest.raises(ExerciseIncomplete):
        with_learner_code(lambda: {}["price"])
    assert "troubleshooting" not in capsys.readouterr().out


def test_an_error_while_setting_up_counts_as_a_failed_step(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete), exercise("9.2", "Setup", SOLUTION):
        raise TypeError("app is not an ASGI app")
    assert "❌ setting up the check with your code" in capsys.readouterr().out


def test_ipython_shows_only_the_summary_line() -> None:
    exc = ExerciseIncomplete("Exercise 9.1: not started")
    assert exc._render_traceback_() == ["\x1b[31mExercise 9.1: not started\x1b[0m"]
