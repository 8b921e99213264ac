"""How exercise checks report: one line per sub-check, no library tracebacks, hints in tiers.

A chapter's check functions (``support.checks.ch01`` …) are written with ``exercise()``::

    def check_something(answer):
        with exercise("1.2", "Measure loop lag") as ex:
            ex.step("an idle loop shows almost no lag", lambda: ...)
            ex.step("a 200 ms block shows up as ~200 ms of lag", lambda: ...)

A step passes when its function returns, and fails when it raises ``Mismatch`` (a wrong answer: what
was expected, what was seen, hints), the placeholder's ``NotImplementedError`` (not started), or any
other exception (the learner's code raised: shown as one line, pointing at the line of their cell).
Each failed attempt at a step reveals one more hint; after the last, the worked solution is named.
"""

from __future__ import annotations

import re
import sys
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

__all__ = [
    "ExerciseIncomplete",
    "Mismatch",
    "exercise",
    "expect",
    "placeholder_message",
    "reset_hints",
]

PLACEHOLDER = re.compile(r"^Exercise (?P<id>\d+\.\d+): replace this line with your code")
TROUBLESHOOTING = "README.md#troubleshooting"


TROUBLESHOOTING = "docs/troubleshooting.md"


def placeholder_message(exercise_id: str) -> str:
    """The message of the ``NotImplementedError`` that the exercise generator leaves in place."""
    return f"Exercise {exercise_id}: replace this line with your code"


class Mismatch(Exception):
    """A wrong answer: what the check expected, what it saw, and hints from gentle to specific."""

    def __init__(self, expected: str, seen: str, hints: Sequence[str] = ()) -> None:
        super().__init__(f"expected {expected}, seen {seen}")
        self.expected, self.seen, self.hints = expected, seen, tuple(hints)


def expect(condition: object, expected: str, seen: str, *hints: str) -> None:
    """Raise ``Mismatch`` unless ``condition`` holds."""
    if not condition:
        raise Mismatch(expected, seen, hints)


class ExerciseIncomplete(AssertionError):
    """Raised by a check cell that did not pass; IPython shows its one-line summary, not a traceback."""

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31m{self}\x1b[0m"]


_attempts: defaultdict[tuple[str, str], int] = defaultdict(int)


def reset_hints() -> None:
    """Forget how many times each step failed (hints start again from the first)."""
    _attempts.clear()


def _is_placeholder(exc: BaseException) -> bool:
    return isinstance(exc, NotImplementedError) and bool(PLACEHOLDER.match(str(exc)))


def _where_in_learner_code(exc: BaseException) -> str | None:
    """``line 3 of your cell: return fetch(x)`` for the innermost frame from a notebook cell."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        name = frame.filename
        if "ipykernel_" in name or name.startswith("<ipython-input") or name.startswith("<cell"):
            return f"line {frame.lineno} of your cell: {(frame.line or '').strip()}"
    return None


class _Exercise:
    def __init__(self, exercise_id: str, title: str, solution: str) -> None:
        self.id, self.title, self.solution = exercise_id, title, solution
        self.passed = 0
        self.failed = 0
        self.not_started = False
        print(f"Exercise {exercise_id} · {title}")

    def step(self, description: str, check: Callable[[], Any]) -> bool:
        """Run one sub-check and print its line; returns whether it passed."""
        if self.not_started:
            return False
        try:
            check()
        except Mismatch as wrong:
            self._fail(description, wrong)
            return False
        except Exception as exc:  # the learner's code raised, or a placeholder is still there
            self._raised(description, exc)
            return False
        self.passed += 1
        print(f"  ✅ {description}")
        return True

    def _fail(self, description: str, wrong: Mismatch) -> None:
        self.failed += 1
        key = (self.id, description)
        _attempts[key] += 1
        shown = wrong.hints[: _attempts[key]]
        print(f"  ❌ {description}")
        print(f"       expected: {wrong.expected}")
        print(f"       seen:     {wrong.seen}")
        for hint in shown:
            print(f"       hint:     {hint}")
        if _attempts[key] > len(wrong.hints):
            print(f"       solution: {self.solution} (Exercise {self.id})")
            print(
                f"       sure you are right? {TROUBLESHOOTING}#a-check-fails-and-you-are-sure-you-are-right"
            )
        elif _attempts[key] < len(wrong.hints):
            print("       (run the check again after another try for a more specific hint)")

    def _raised(self, description: str, exc: BaseException) -> None:
        if _is_placeholder(exc):
            self.not_started = True
            print(
                f"  ⬜ not started: Exercise {self.id}'s cell still raises the placeholder "
                "NotImplementedError. Replace that line with your code, run the cell, then this check."
            )
            return
        self.failed += 1
        detail = str(exc).splitlines()[0] if str(exc) else ""
        print(f"  ❌ {description}")
        print(f"       your code raised {type(exc).__name__}{': ' + detail if detail else ''}")
        where = _where_in_learner_code(exc)
        if where:
            print(f"       where:    {where}")
        print("       hint:     fix the error first; the full traceback is in `support.checks.last_error`")
        if isinstance(exc, RuntimeError) and "loop" in str(exc):
            print(f"       help:     {TROUBLESHOOTING}#event-loop-errors")
        global last_error
        last_error = exc

    def summary(self) -> str:
        total = self.passed + self.failed
        if self.not_started:
            return f"Exercise {self.id}: not started"
        if self.failed == 0:
            return f"Exercise {self.id}: passed ✅ ({self.passed} of {total} checks)"
        return f"Exercise {self.id}: not yet — {self.passed} of {total} checks pass"


last_error: BaseException | None = None


@contextmanager
def exercise(exercise_id: str, title: str, solution: str) -> Iterator[_Exercise]:
    """Run an exercise's sub-checks, print their lines and a summary; raise if any did not pass.

    ``solution`` names where the worked solution is, shown only after the hints run out.
    An exception escaping the block (while setting up, say) counts as a failed step.
    """
    ex = _Exercise(exercise_id, title, solution)
    try:
        yield ex
    except Mismatch as wrong:
        ex._fail("setting up the check with your code", wrong)
    except Exception as exc:
        ex._raised("setting up the check with your code", exc)
    summary = ex.summary()
    sys.stdout.flush()
    if ex.not_started or ex.failed:
        raise ExerciseIncomplete(summary)
    print(summary)
