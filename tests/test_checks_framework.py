"""support.checks: the feedback a learner sees, pinned for each kind of outcome."""

from __future__ import annotations

import asyncio
import copy
import io
import linecache
import os
import re
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from fastapi import FastAPI

import support.checks
from support import progress
from support.checks import (
    MARKS,
    RAISE_ENV,
    VERDICT_MIME,
    ExerciseIncomplete,
    Verdict,
    exercise,
    expect,
    forget_answers,
    placeholder_message,
    wrap,
)
from support.checks.answers import fingerprint
from support.checks.running import run_in_fresh_loop
from support.kernels import notebook_client

SOLUTION = "solutions/99_demo.ipynb"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _raising(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in pytest by default, whatever the environment the suite runs in."""
    monkeypatch.delenv(RAISE_ENV, raising=False)


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


def with_learner_code(fn: Callable[[], Any]) -> None:
    with exercise("9.1", "Return the answer", SOLUTION) as ex:
        ex.step("returns 42", lambda: expect(fn() == 42, "42", "?"))


def failing(capsys: pytest.CaptureFixture[str], check: Callable[..., None], *answer: Any) -> str:
    with pytest.raises(ExerciseIncomplete):
        check(*answer)
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Each kind of outcome, and the words beside the marks (3)
# ---------------------------------------------------------------------------------------------------


def test_a_right_answer_passes(capsys: pytest.CaptureFixture[str]) -> None:
    run_check(42)
    assert capsys.readouterr().out == (
        "Exercise 9.1 · Return the answer\n"
        "  ✅ passed: returns an int\n"
        "  ✅ passed: returns 42\n"
        "Exercise 9.1: passed ✅ (2 of 2 checks)\n"
    )


def test_a_wrong_answer_says_expected_seen_and_a_first_hint(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete, match=re.escape("Exercise 9.1: not yet — 1 of 2 checks pass")):
        run_check(41)
    assert capsys.readouterr().out == (
        "Exercise 9.1 · Return the answer\n"
        "  ✅ passed: returns an int\n"
        "  ❌ not yet: returns 42\n"
        "       expected: 42\n"
        "       seen:     41\n"
        "       hint:     Think of the question.\n"
        "  Change your answer and run this check again for the next hint.\n"
        "Exercise 9.1: not yet — 1 of 2 checks pass\n"
    )


def test_every_status_is_a_word_beside_its_mark(capsys: pytest.CaptureFixture[str]) -> None:
    assert MARKS == {
        "passed": "✅ passed",
        "not yet": "❌ not yet",
        "not started": "⬜ not started",
        "error": "⚠️ error",
    }
    run_check(42)
    with pytest.raises(ExerciseIncomplete):
        run_check(41)
    with pytest.raises(ExerciseIncomplete):
        with_learner_code(placeholder)
    lines = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("  ") and line[2] in "✅❌⬜"
    ]
    assert lines and all(re.match(r"  (✅ passed|❌ not yet|⬜ not started): \S", line) for line in lines), (
        lines
    )


def run_required(answer: Any) -> list[str]:
    """A check whose later steps need the first one's value (``ex.require``)."""
    later: list[str] = []
    with exercise("9.1", "Return the answer", SOLUTION) as ex:
        number = ex.require(
            "returns an int", lambda: expect(isinstance(answer, int), "an int", "?") or answer
        )
        result = ex.step("returns 42", lambda: expect(number == 42, "42", repr(number)) or number * 2)
        later.append(f"doubled {result.value}" if result else "not doubled")
    return later


def test_step_returns_its_value_and_require_stops_the_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_required(42) == ["doubled 84"]
    assert capsys.readouterr().out.endswith("Exercise 9.1: passed ✅ (2 of 2 checks)\n")
    with pytest.raises(ExerciseIncomplete, match="1 of 2 checks pass"):
        run_required(41)
    assert "❌ not yet: returns 42" in capsys.readouterr().out
    later: list[str] = []
    with pytest.raises(ExerciseIncomplete, match="0 of 1 checks pass"):
        later = run_required("42")
    out = capsys.readouterr().out
    assert "❌ not yet: returns an int" in out and "returns 42" not in out, (
        "the run ended at the failed require"
    )
    assert later == []
    assert support.checks.last_verdict is not None and support.checks.last_verdict.status == "not yet"


def test_an_untouched_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete, match=re.escape("Exercise 9.1: not started")):
        with_learner_code(placeholder)
    out = capsys.readouterr().out
    assert "  ⬜ not started: Exercise 9.1's cell still raises the placeholder NotImplementedError" in out
    assert "❌" not in out


def test_an_exception_in_learner_code_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete, match="not yet — 0 of 1"):
        with_learner_code(lambda: {}["price"])
    out = capsys.readouterr().out
    assert "  ❌ not yet: returns 42\n       your code raised KeyError: 'price'\n" in out
    assert "Traceback" not in out
    assert isinstance(support.checks.last_error, KeyError)


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
    assert "❌ not yet: setting up the check with your code" in capsys.readouterr().out


def test_ipython_shows_only_the_summary_line() -> None:
    exc = ExerciseIncomplete("Exercise 9.1: not started")
    assert exc._render_traceback_() == ["\x1b[31mExercise 9.1: not started\x1b[0m"]


# ---------------------------------------------------------------------------------------------------
# Hints move on per changed answer, and the second tier teaches (1)
# ---------------------------------------------------------------------------------------------------


def test_running_an_unchanged_answer_again_shows_the_same_hints(capsys: pytest.CaptureFixture[str]) -> None:
    first = failing(capsys, run_check, 41)
    again = failing(capsys, run_check, 41)
    for _ in range(3):
        again += failing(capsys, run_check, 41)
    assert "six times seven" not in again and "solution:" not in again
    assert again.count("hint:     Think of the question.") == 4
    assert again.count("so the hints are the same: change your answer for the next hint.") == 4
    assert "is the same as at the last run" not in first
    changed = failing(capsys, run_check, 40)
    assert "hint:     It is six times seven." in changed
    assert "is the same as at the last run" not in changed


def test_hints_come_in_tiers_then_the_solution(capsys: pytest.CaptureFixture[str]) -> None:
    attempts = [failing(capsys, run_check, answer) for answer in (41, 40, 39)]
    assert "six times seven" not in attempts[0] and "solution:" not in attempts[0]
    assert "six times seven" in attempts[1] and "solution:" not in attempts[1]
    assert f"solution: {SOLUTION} (Exercise 9.1)" in attempts[2]
    assert (
        "sure you are right? docs/troubleshooting.md#a-check-fails-and-you-are-sure-you-are-right"
        in attempts[2]
    )
    assert "for the next hint" not in attempts[2], "no next hint after the last"


def test_forget_answers_counts_the_next_run_as_changed(capsys: pytest.CaptureFixture[str]) -> None:
    failing(capsys, run_check, 41)
    forget_answers()
    assert "six times seven" in failing(capsys, run_check, 41)


def test_the_second_tier_of_an_error_explains_rather_than_repeats(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> int:
        return {}["price"]  # type: ignore[no-any-return]

    def still_broken() -> int:
        return {}["prize"]  # type: ignore[no-any-return]

    first = failing(capsys, with_learner_code, broken)
    same = failing(capsys, with_learner_code, broken)
    changed = failing(capsys, with_learner_code, still_broken)
    assert "hint:     Fix the error first" in first and "from the bottom up" not in first
    assert "from the bottom up" not in same
    assert "A traceback reads from the bottom up" in changed


def cell_function(source: str, filename: str) -> Callable[..., Any]:
    """``answer`` defined in a notebook cell (as ipykernel does: the cell's text is in linecache)."""
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["answer"]  # type: ignore[no-any-return]


def test_the_answer_is_the_code_of_what_the_check_is_given() -> None:
    def answer_a() -> int:
        return 41

    def answer_b() -> int:
        return 42

    assert fingerprint([answer_a]) == fingerprint([answer_a])
    assert fingerprint([answer_a]) != fingerprint([answer_b])
    assert fingerprint([answer_a, 5]) != fingerprint([answer_a, 6]), "numbers passed count"
    # In a notebook, the whole cell counts: a constant beside an unchanged function is a change.
    cell = "TTL = {}\ndef answer():\n    return TTL\n"
    one = cell_function(cell.format(30), "/tmp/ipykernel_1/aaaa.py")
    same = cell_function(cell.format(30), "/tmp/ipykernel_1/bbbb.py")
    other = cell_function(cell.format(60), "/tmp/ipykernel_1/cccc.py")
    assert fingerprint([one]) == fingerprint([same])
    assert fingerprint([one]) != fingerprint([other])


def test_what_a_check_run_changes_is_not_a_changed_answer() -> None:
    app = FastAPI()
    processed: list[str] = []

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        processed.append(item_id)
        return {"id": item_id}

    before = fingerprint([app, processed, 5])
    processed.extend(f"job-{i}" for i in range(50))
    app.middleware_stack = app.build_middleware_stack()  # what serving the app does
    assert fingerprint([app, processed, 5]) == before

    other = FastAPI()

    @other.get("/items/{item_id}")
    async def item_changed(item_id: str) -> dict[str, str]:
        return {"id": item_id.upper()}

    assert fingerprint([other, processed, 5]) != before, "an endpoint's code is part of the answer"


# ---------------------------------------------------------------------------------------------------
# Each distinct hint once per run (2)
# ---------------------------------------------------------------------------------------------------


def shared_hint_check(answer: int) -> None:
    with exercise("9.3", "Shared hints", SOLUTION) as ex:
        for what in ("is 42", "is even", "is positive and 42"):
            ex.step(what, lambda: expect(answer == 42, "42", repr(answer), "Count the towels."))


def test_a_hint_shared_by_several_steps_is_printed_once(capsys: pytest.CaptureFixture[str]) -> None:
    out = failing(capsys, shared_hint_check, 7)
    assert out.count("Count the towels.") == 1
    assert out.count("       hint:     as above\n") == 2
    assert out.count("❌ not yet:") == 3
    solution = failing(capsys, shared_hint_check, 8)  # the hints ran out: the solution is named, once
    assert solution.count(f"solution: {SOLUTION} (Exercise 9.3)") == 1
    assert solution.count("sure you are right?") == 1


# ---------------------------------------------------------------------------------------------------
# Wrapped at word boundaries, indented under the label (5)
# ---------------------------------------------------------------------------------------------------


def columns(line: str) -> int:
    return sum(2 if char in "✅❌⬜" else 1 for char in line)


def long_check(answer: int) -> None:
    with exercise("9.4", "Long lines", SOLUTION) as ex:
        ex.step(
            "a step whose description goes on for rather longer than one narrow line of output can hold",
            lambda: expect(
                answer == 42,
                "the answer to the ultimate question of life, the universe and everything, computed",
                f"{answer}: a number that a very large computer would never have come up with",
                "Deep Thought took seven and a half million years; a dictionary of the words is faster.",
            ),
        )


def test_long_lines_wrap_at_words_under_their_label(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(support.checks, "output_width", lambda: 60)
    out = failing(capsys, long_check, 41)
    lines = out.splitlines()
    assert max(columns(line) for line in lines) <= 60, out
    assert "  ❌ not yet: a step whose description goes on for rather\n              longer than" in out
    assert (
        "       expected: the answer to the ultimate question of\n                 life, the universe" in out
    )
    # Every continuation line is indented under the text of its label, and no word is broken.
    for line in lines:
        if line.startswith(" " * 17):
            assert line[17] != " "
    said = "the answer to the ultimate question of life, the universe and everything, computed"
    assert said in " ".join(out.split()), "the words, in order, none of them broken"


def test_wrap_keeps_the_texts_own_line_breaks_under_the_label() -> None:
    text = "first line of a body\nsecond line that is long enough to need wrapping somewhere"
    assert wrap("       seen:     ", text, width=50) == (
        "       seen:     first line of a body\n"
        "                 second line that is long enough\n"
        "                 to need wrapping somewhere"
    )
    assert wrap("  ❌ not yet: ", "a b", width=50) == "  ❌ not yet: a b"
    assert wrap("  ❌ not yet: ", "word " * 12, width=40).splitlines()[1].startswith(" " * 14 + "word")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_output_width_follows_where_the_output_goes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert support.checks.output_width() is None, "a pipe or pytest's capture: lines stay whole"
    monkeypatch.setattr(sys, "stdout", Terminal())
    monkeypatch.setattr(shutil, "get_terminal_size", lambda *args: os.terminal_size((120, 40)))
    assert support.checks.output_width() == 119
    monkeypatch.setattr(support.checks, "_ipython", lambda: object())
    assert support.checks.output_width() == support.checks.WIDTH <= 100, "a notebook"


# ---------------------------------------------------------------------------------------------------
# A failing check in a notebook: ordinary output, a verdict as data (4, 6)
# ---------------------------------------------------------------------------------------------------


class FakeShell:
    def __init__(self, allow_stdin: bool) -> None:
        self.kernel = types.SimpleNamespace(_allow_stdin=allow_stdin)


@pytest.fixture
def displayed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    import IPython.display

    shown: list[dict[str, Any]] = []
    monkeypatch.setattr(IPython.display, "display", lambda bundle, raw=False: shown.append(bundle))
    yield shown


def test_in_jupyterlab_a_failing_check_prints_and_does_not_raise(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, displayed: list[dict[str, Any]]
) -> None:
    monkeypatch.setattr(support.checks, "_ipython", lambda: FakeShell(allow_stdin=True))
    run_check(41)  # no ExerciseIncomplete
    out = capsys.readouterr().out
    assert "❌ not yet: returns 42" in out
    assert out.rstrip().endswith("Exercise 9.1: not yet — 1 of 2 checks pass"), "the summary is printed"
    (bundle,) = displayed
    assert set(bundle) == {VERDICT_MIME}, "the verdict only: the learner sees the summary once"
    assert bundle[VERDICT_MIME]["status"] == "not yet"


def test_in_a_batch_run_of_a_kernel_a_failing_check_raises(
    monkeypatch: pytest.MonkeyPatch, displayed: list[dict[str, Any]]
) -> None:
    monkeypatch.setattr(support.checks, "_ipython", lambda: FakeShell(allow_stdin=False))
    with pytest.raises(ExerciseIncomplete) as failure:
        run_check(41)
    assert failure.value.verdict is not None and failure.value.verdict.status == "not yet"
    assert len(displayed) == 1, "the verdict is shown before the raise"


def test_the_environment_decides_when_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RAISE_ENV, "0")
    run_check(41)  # no ExerciseIncomplete, even outside IPython
    monkeypatch.setenv(RAISE_ENV, "1")
    monkeypatch.setattr(support.checks, "_ipython", lambda: FakeShell(allow_stdin=True))
    with pytest.raises(ExerciseIncomplete):
        run_check(41)


def test_each_run_records_its_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete) as failure:
        run_check(41)
    verdict = support.checks.results["9.1"]
    assert verdict is support.checks.last_verdict is failure.value.verdict
    assert (verdict.exercise, verdict.title, verdict.status) == ("9.1", "Return the answer", "not yet")
    assert [(s.description, s.status) for s in verdict.steps] == [
        ("returns an int", "passed"),
        ("returns 42", "not yet"),
    ]
    assert (verdict.steps[1].expected, verdict.steps[1].seen) == ("42", "41")
    assert verdict.steps[1].hints == ("Think of the question.",)
    assert Verdict.from_json(verdict.to_json()) == verdict
    bundle = verdict._repr_mimebundle_()
    assert bundle["text/plain"] == verdict.summary and bundle[VERDICT_MIME]["passed"] == 1
    with pytest.raises(ExerciseIncomplete):
        with_learner_code(placeholder)
    assert support.checks.results["9.1"].status == "not started"
    run_check(42)
    assert support.checks.results["9.1"].status == "passed"


def check_cell(outputs: list[dict[str, Any]]) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell("check(answer)", metadata={"tags": ["check"]})
    cell.outputs = [nbformat.from_dict(o) for o in outputs]
    return cell


def verdict_output(status: str, exercise: str = "9.1") -> dict[str, Any]:
    steps = {
        "passed": [{"description": "returns 42", "status": "passed"}],
        "not yet": [
            {"description": "returns an int", "status": "passed"},
            {"description": "returns 42", "status": "not yet"},
        ],
        "not started": [{"description": "returns 42", "status": "not started"}],
    }[status]
    data = Verdict.from_json({"exercise": exercise, "title": "T", "status": status, "steps": steps})
    return {"output_type": "display_data", "data": data._repr_mimebundle_(), "metadata": {}}


def test_progress_reads_the_verdicts_not_the_printed_text() -> None:
    nb = nbformat.v4.new_notebook()
    misleading = {
        "output_type": "stream",
        "name": "stdout",
        "text": "Exercise 9.9: passed ✅ (1 of 1 checks)\n",
    }
    nb.cells = [
        check_cell([misleading, verdict_output("not yet")]),
        check_cell([verdict_output("not started", "9.2")]),
        check_cell([verdict_output("passed", "9.3")]),
        check_cell(
            [
                {
                    "output_type": "error",
                    "ename": "NameError",
                    "evalue": "name 'app' is not defined",
                    "traceback": [],
                }
            ]
        ),
        check_cell([misleading]),
    ]
    rows = progress.read_checks(nb, "99")
    assert [(r.exercise, r.status) for r in rows] == [
        ("9.1", "not yet"),
        ("9.2", "not started"),
        ("9.3", "passed"),
        ("check 4", "error"),
        ("check 5", "error"),
    ]
    assert rows[0].detail == "failing: returns 42"
    assert (
        rows[3].detail
        == "no verdict: the check cell raised NameError: name 'app' is not defined before its check ran"
    )
    assert "no verdict" in rows[4].detail and "run it in the notebook" in rows[4].detail
    assert "⚠️ error" in progress.table(rows)


# ---------------------------------------------------------------------------------------------------
# BaseExceptions from the learner's code are ❌ lines; KeyboardInterrupt goes through (7)
# ---------------------------------------------------------------------------------------------------


def raises(exc: BaseException) -> Callable[[], int]:
    def answer() -> int:
        raise exc

    return answer


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (asyncio.CancelledError(), "your code raised CancelledError\n"),
        (
            ExceptionGroup("unhandled errors in a TaskGroup", [KeyError("price")]),
            "your code raised ExceptionGroup: unhandled errors in a TaskGroup (1 sub-exception)\n"
            "       inside:   KeyError: 'price'\n",
        ),
        (
            BaseExceptionGroup("cancelled", [asyncio.CancelledError()]),
            "your code raised BaseExceptionGroup: cancelled (1 sub-exception)\n"
            "       inside:   CancelledError\n",
        ),
        (SystemExit(3), "your code raised SystemExit: 3\n"),
        (GeneratorExit(), "your code raised GeneratorExit\n"),
    ],
    ids=["CancelledError", "ExceptionGroup", "BaseExceptionGroup", "SystemExit", "GeneratorExit"],
)
def test_a_base_exception_from_learner_code_is_a_failed_line(
    exc: BaseException, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ExerciseIncomplete, match="not yet — 0 of 1"):
        with_learner_code(raises(exc))
    out = capsys.readouterr().out
    assert f"  ❌ not yet: returns 42\n       {line}" in out
    assert "Traceback" not in out
    assert support.checks.last_error is exc


def test_a_cancelled_coroutine_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    async def cancels_itself() -> int:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)
        return 42

    with pytest.raises(ExerciseIncomplete):
        with_learner_code(lambda: run_in_fresh_loop(cancels_itself, timeout=2, name="cancelled"))
    out = capsys.readouterr().out
    assert "your code raised CancelledError" in out
    assert "hint:     A CancelledError is how asyncio stops a task" in out


def test_a_base_exception_while_setting_up_is_a_failed_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExerciseIncomplete), exercise("9.2", "Setup", SOLUTION):
        raise asyncio.CancelledError()
    assert "❌ not yet: setting up the check with your code\n       your code raised CancelledError" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "exc",
    [KeyboardInterrupt(), BaseExceptionGroup("stopped", [KeyboardInterrupt()])],
    ids=["KeyboardInterrupt", "in-a-group"],
)
def test_keyboard_interrupt_goes_through(exc: BaseException) -> None:
    with pytest.raises(type(exc)):
        with_learner_code(raises(exc))
    with pytest.raises(type(exc)), exercise("9.2", "Setup", SOLUTION):
        raise exc


# ---------------------------------------------------------------------------------------------------
# In a real kernel: what JupyterLab shows, what progress reads (4, 5, 6, 1)
# ---------------------------------------------------------------------------------------------------

KERNEL_CELLS = [
    "from support.checks import exercise, expect\n"
    "def check(answer):\n"
    "    with exercise('9.1', 'Return the answer', 'solutions/99.ipynb') as ex:\n"
    "        ex.step('returns 42', lambda: expect(answer() == 42, '42', repr(answer()), "
    "'Think of the question, and of how long the computer that worked it out took to do it.', "
    "'It is six times seven.'))",
    "OFFSET = 1\ndef answer():\n    return 40 + OFFSET",
    "check(answer)",
    "check(answer)",
    "OFFSET = 3\ndef answer():\n    return 40 + OFFSET",
    "check(answer)",
    "print('the cell after the checks ran')",
]


def kernel_notebook() -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in KERNEL_CELLS]
    for index in (2, 3, 5):
        nb.cells[index].metadata["tags"] = ["check"]
    return nb


def kernel_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != RAISE_ENV}


def output_types(cell: nbformat.NotebookNode) -> list[str]:
    return [o.output_type for o in cell.outputs]


@pytest.mark.notebooks
def test_in_a_kernel_a_failing_check_is_ordinary_output_with_a_verdict() -> None:

    nb = kernel_notebook()
    client = notebook_client(nb, timeout=60, resources={"metadata": {"path": str(ROOT)}})
    with client.setup_kernel(env=kernel_env()):
        assert client.kc is not None
        client.kc.allow_stdin = True  # as JupyterLab sends its requests
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)  # raises CellExecutionError if any cell fails
    first, again, changed = (nb.cells[i] for i in (2, 3, 5))
    for cell in (first, again, changed):
        assert output_types(cell) == ["stream", "display_data"], cell.outputs
        assert "Exercise 9.1: not yet — 0 of 1 checks pass" in cell.outputs[0].text
        assert set(cell.outputs[1].data) == {VERDICT_MIME}
    text = first.outputs[0].text
    assert "  ❌ not yet: returns 42\n" in text
    assert (
        "       hint:     Think of the question, and of how long the computer that worked it out took to\n"
        "                 do it.\n"
    ) in text
    assert max(len(line) for line in text.splitlines()) <= support.checks.WIDTH
    assert "six times seven" not in again.outputs[0].text, "the same cell's answer: the same hint"
    assert "change your answer for the next hint" in again.outputs[0].text
    assert "It is six times seven." in changed.outputs[0].text, "the cell changed: the next hint"
    assert nb.cells[-1].outputs[0].text == "the cell after the checks ran\n"
    rows = progress.read_checks(nb, "99")
    assert [(r.exercise, r.status, r.detail) for r in rows] == [("9.1", "not yet", "failing: returns 42")] * 3


@pytest.mark.notebooks
def test_a_batch_run_fails_on_a_failing_check_and_progress_does_not(tmp_path: Path) -> None:

    batch = kernel_notebook()
    notebook_client(batch, timeout=60, allow_errors=True).execute(env=kernel_env())
    assert output_types(batch.cells[2]) == ["stream", "display_data", "error"]
    assert batch.cells[2].outputs[2].ename == "ExerciseIncomplete"
    path = tmp_path / "99_demo_exercises.ipynb"
    nbformat.write(kernel_notebook(), path)
    ran = progress.run_notebook(path)
    assert all(o.output_type != "error" for cell in ran.cells for o in cell.outputs)
    assert [r.status for r in progress.read_checks(ran, "99")] == ["not yet"] * 3
    assert [r.status for r in progress.read_checks(copy.deepcopy(batch), "99")] == ["not yet"] * 3


def test_joining_new_threads_waits_for_one_listed_but_not_yet_begun() -> None:
    """A thread pool adding a worker as the block ends: the thread is listed, not yet started, and
    ``Thread.join`` raises for it; the check waits for it to begin and then for it to end."""
    import threading
    import time

    from support.checks.running import joins_new_threads

    worker = threading.Thread(target=time.sleep, args=(0.01,), name="late-worker")
    begin = threading.Timer(0.05, lambda: (threading._limbo.pop(worker, None), worker.start()))
    begin.start()  # before the block: not one of its threads
    with joins_new_threads():
        threading._limbo[worker] = worker  # as `start()` lists it before it begins
    assert not worker.is_alive() and worker.ident is not None
    begin.join()
