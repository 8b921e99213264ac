"""How exercise checks report: one line per sub-check, no library tracebacks, hints in tiers.

A chapter's check functions (``support.checks.ch01`` …) are written with ``exercise()``::

    def check_something(answer):
        with exercise("1.2", "Measure loop lag", SOLUTION) as ex:
            run = ex.require("it returns a number of seconds", lambda: ...)  # stops here if not
            ex.step("an idle loop shows almost no lag", lambda: ...)
            ex.step("a 200 ms block shows up as ~200 ms of lag", lambda: ...)

A step passes when its function returns, and fails when it raises ``Mismatch`` (a wrong answer: what
was expected, what was seen, hints), the placeholder's ``NotImplementedError`` (not started), or any
other exception, ``BaseException`` included (the learner's code raised: shown as one line, pointing
at the line of their cell); only ``KeyboardInterrupt`` goes through, so the learner can stop a check.
``ex.step`` returns a ``StepResult``, true when the step passed, with what its function returned as
``.value``; ``ex.require`` returns that value, or ends the run there (summary and verdict as usual)
when the step failed, for steps the later ones cannot do without.

Hints come in tiers, one more per *changed* answer: the check's arguments are hashed (see
``support.checks.answers``), so running a check again on the same answer shows the same hints and
says to change the answer for the next. Write the tiers as: first where to look, then the idea
behind it (teach the concept; do not dictate code); the worked solution is named after the last.
Each distinct hint is printed once per run, however many steps share it. Each line says its status
in words beside the mark (``✅ passed``, ``❌ not yet``, ``⬜ not started``: readable without an emoji
font) and is wrapped at word boundaries, continuation lines indented under their label, to
``output_width()``: ``WIDTH`` columns in a notebook, the terminal's width in a terminal, unwrapped
into a pipe or pytest's capture.

Each run ends with a ``Verdict`` (exercise, title, status, steps): kept in ``results`` and
``last_verdict``, and shown in a notebook as a display output of type ``VERDICT_MIME`` beside its
one-line ``text/plain`` summary; ``python course.py progress`` reads those from the executed notebook.
A check that did not pass prints its summary as ordinary output in an interactive notebook (no red
error box, and Run All goes on to the next exercise); it raises ``ExerciseIncomplete`` where nobody is
watching: outside IPython (pytest, scripts) and in a kernel run in batch (nbclient, nbconvert, the
test suite), so a failing check still fails that run. ``COURSE_CHECKS_RAISE=1`` or ``0`` overrides.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import sys
import textwrap
import traceback
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Literal

from support.checks.answers import fingerprint, is_cell_file

__all__ = [
    "MARKS",
    "RAISE_ENV",
    "VERDICT_MIME",
    "WIDTH",
    "ExerciseIncomplete",
    "Mismatch",
    "Status",
    "Step",
    "StepResult",
    "Verdict",
    "exercise",
    "expect",
    "forget_answers",
    "output_width",
    "placeholder_message",
    "raises_on_failure",
    "reset_hints",
    "results",
    "wrap",
]

PLACEHOLDER = re.compile(r"^Exercise (?P<id>\d+\.\d+): replace this line with your code")
TROUBLESHOOTING = "docs/troubleshooting.md"
VERDICT_MIME = "application/vnd.fastapi-course.check+json"
RAISE_ENV = "COURSE_CHECKS_RAISE"
WIDTH = 96  # in a notebook: JupyterLab at 1280 px breaks lines of ~100 characters mid-word, ours end before

Status = Literal["passed", "not yet", "not started", "error"]
MARKS: dict[str, str] = {
    "passed": "✅ passed",
    "not yet": "❌ not yet",
    "not started": "⬜ not started",
    "error": "⚠️ error",
}
SETUP = "setting up the check with your code"
DETAIL = " " * 7  # where a failed step's detail labels start
LABEL = 10  # "expected: ", "seen:     ", "hint:     " …


def placeholder_message(exercise_id: str) -> str:
    """The message of the ``NotImplementedError`` that the exercise generator leaves in place."""
    return f"Exercise {exercise_id}: replace this line with your code"


class Mismatch(Exception):
    """A wrong answer: what the check expected, what it saw, and hints in tiers.

    The first hint says where to look; the second explains the idea behind the fix; a third, if
    any, may be specific. One more is shown each time the learner changes their answer.
    """

    def __init__(self, expected: str, seen: str, hints: Sequence[str] = ()) -> None:
        super().__init__(f"expected {expected}, seen {seen}")
        self.expected, self.seen, self.hints = expected, seen, tuple(hints)


def expect(condition: object, expected: str, seen: str, *hints: str) -> None:
    """Raise ``Mismatch`` unless ``condition`` holds."""
    if not condition:
        raise Mismatch(expected, seen, hints)


# ---------------------------------------------------------------------------------------------------
# Verdicts: what a check run found, as data
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One sub-check of a run: its description, status, and (if it failed) what the learner saw."""

    description: str
    status: Status
    expected: str | None = None
    seen: str | None = None
    raised: str | None = None
    hints: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "status": self.status,
            "expected": self.expected,
            "seen": self.seen,
            "raised": self.raised,
            "hints": list(self.hints),
        }


@dataclass(frozen=True)
class Verdict:
    """The outcome of one run of an exercise's check, as ``course.py progress`` reads it.

    ``status`` is "passed", "not yet" or "not started"; "error" is what progress reports for a check
    cell that showed no verdict at all (it raised before its check ran, say).
    """

    exercise: str
    title: str
    status: Status
    steps: tuple[Step, ...] = ()

    @property
    def passed(self) -> int:
        return sum(step.status == "passed" for step in self.steps)

    @property
    def total(self) -> int:
        return sum(step.status in ("passed", "not yet") for step in self.steps)

    @property
    def summary(self) -> str:
        """The one line a learner reads, e.g. ``Exercise 1.1: not yet — 2 of 4 checks pass``."""
        if self.status == "not started":
            return f"Exercise {self.exercise}: not started"
        if self.status == "passed":
            return f"Exercise {self.exercise}: passed ✅ ({self.passed} of {self.total} checks)"
        if self.status == "error":
            return f"Exercise {self.exercise}: error"
        return f"Exercise {self.exercise}: not yet — {self.passed} of {self.total} checks pass"

    def to_json(self) -> dict[str, Any]:
        return {
            "exercise": self.exercise,
            "title": self.title,
            "status": self.status,
            "passed": self.passed,
            "total": self.total,
            "summary": self.summary,
            "steps": [step.to_json() for step in self.steps],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Verdict:
        steps = tuple(
            Step(
                description=str(s.get("description", "")),
                status=s.get("status", "not yet"),
                expected=s.get("expected"),
                seen=s.get("seen"),
                raised=s.get("raised"),
                hints=tuple(s.get("hints") or ()),
            )
            for s in data.get("steps", [])
        )
        return cls(str(data["exercise"]), str(data.get("title", "")), data["status"], steps)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {VERDICT_MIME: self.to_json(), "text/plain": self.summary}


@dataclass(frozen=True)
class StepResult:
    """What ``ex.step`` returns: true when the step passed, with its function's return value."""

    passed: bool
    value: Any = None

    def __bool__(self) -> bool:
        return self.passed


class _StopRun(Exception):
    """Raised by ``ex.require`` when its step failed: the ``with`` block ends, the verdict stands."""


class ExerciseIncomplete(AssertionError):
    """Raised by a check that did not pass, where a failure must fail the run (see the module's doc).

    ``verdict`` is the run's ``Verdict``; IPython shows only the one-line summary, not a traceback.
    """

    def __init__(self, summary: str, verdict: Verdict | None = None) -> None:
        super().__init__(summary)
        self.verdict = verdict

    def _render_traceback_(self) -> list[str]:
        return [f"\x1b[31m{self}\x1b[0m"]


results: dict[str, Verdict] = {}
"""The latest verdict of each exercise checked in this process, by exercise id."""
last_verdict: Verdict | None = None
last_error: BaseException | None = None
"""The exception the learner's code raised in the latest failed step (``raise`` it to see the traceback)."""


# ---------------------------------------------------------------------------------------------------
# Output: words beside the marks, wrapped at word boundaries
# ---------------------------------------------------------------------------------------------------


def _columns(text: str) -> int:
    """How many columns ``text`` takes in a monospace font (emoji take two)."""
    width = 0
    for char in text:
        if unicodedata.combining(char) or char == "\ufe0f":
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def output_width() -> int | None:
    """How many columns check output is wrapped to, by where it goes: ``WIDTH`` in IPython (a
    notebook, whose page is about that wide), the terminal's width in a terminal, and no wrapping
    when it goes to a file, a pipe or pytest's capture (no width there, and a reader of the text
    gets the lines whole)."""
    if _ipython() is not None:
        return WIDTH
    stream = sys.stdout
    try:
        if stream is not None and stream.isatty():
            return max(40, shutil.get_terminal_size().columns - 1)
    except (AttributeError, ValueError, OSError):  # a replaced or closed stdout
        pass
    return None


def wrap(prefix: str, text: str, width: int | None = None) -> str:
    """``prefix + text``, wrapped at word boundaries to ``width`` columns (default: ``output_width()``;
    none: only the text's own line breaks), continuation lines indented to where the text starts."""
    width = output_width() if width is None else width
    hang = " " * _columns(prefix)
    paragraphs = str(text).split("\n")
    if width is None:
        lines = [hang + paragraph for paragraph in paragraphs]
    else:
        wrapper = textwrap.TextWrapper(
            width=width, initial_indent=hang, subsequent_indent=hang, break_on_hyphens=False
        )
        lines = [line for paragraph in paragraphs for line in wrapper.wrap(paragraph) or [hang]]
    lines[0] = prefix + lines[0][len(hang) :]
    return "\n".join(line.rstrip() for line in lines)


def _detail(label: str, text: str) -> str:
    return wrap(f"{DETAIL}{label + ':':<{LABEL}}", text)


def _ipython() -> Any:
    ipython = sys.modules.get("IPython")
    return ipython.get_ipython() if ipython is not None else None


def raises_on_failure() -> bool:
    """Whether a check that did not pass raises ``ExerciseIncomplete`` here (see the module's doc).

    ``COURSE_CHECKS_RAISE=1`` (or ``0``) decides; otherwise: outside IPython yes, in a kernel whose
    frontend takes input (JupyterLab, VS Code) no, in a kernel run in batch (nbclient, whose
    requests do not allow input) yes.
    """
    setting = os.environ.get(RAISE_ENV, "").strip().lower()
    if setting in ("1", "true", "yes", "on"):
        return True
    if setting in ("0", "false", "no", "off"):
        return False
    shell = _ipython()
    if shell is None:
        return True
    kernel = getattr(shell, "kernel", None)
    return kernel is not None and not getattr(kernel, "_allow_stdin", True)


def _show(verdict: Verdict) -> None:
    """The summary line, printed (tools read a check's printed output), and in IPython the verdict.

    The verdict goes out as a display output of ``VERDICT_MIME`` alone: no text/plain, so the learner
    sees the summary once, and JupyterLab, which has no renderer for that type, shows nothing more.
    """
    print(verdict.summary)
    sys.stdout.flush()
    if _ipython() is None:
        return
    from IPython.display import display

    display({VERDICT_MIME: verdict.to_json()}, raw=True)


# ---------------------------------------------------------------------------------------------------
# Hint tiers, one per changed answer
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Tier:
    tier: int
    answer: str | None


_tiers: dict[tuple[str, str], _Tier] = {}


def reset_hints() -> None:
    """Forget every step's hint tier (hints start again from the first)."""
    _tiers.clear()


def forget_answers() -> None:
    """Count the next run of each check as a changed answer (tests walk the hint tiers with it)."""
    for state in _tiers.values():
        state.answer = None


def _next_tier(key: tuple[str, str], answer: str) -> tuple[int, bool]:
    """The hint tier for a failed step, and whether the answer is the one that last failed it."""
    state = _tiers.get(key)
    if state is None:
        _tiers[key] = _Tier(1, answer)
        return 1, False
    if state.answer == answer:
        return state.tier, True
    state.tier, state.answer = state.tier + 1, answer
    return state.tier, False


def _answer_arguments(frame: FrameType | None) -> list[Any]:
    """The arguments of the check function that entered ``exercise()``: the learner's answer."""
    while frame is not None and frame.f_code.co_filename in (__file__, contextlib.__file__):
        frame = frame.f_back
    if frame is None:
        return []
    code = frame.f_code
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(code.co_flags & inspect.CO_VARARGS) + bool(code.co_flags & inspect.CO_VARKEYWORDS)
    local = frame.f_locals
    return [local[name] for name in code.co_varnames[:count] if name in local]


# ---------------------------------------------------------------------------------------------------
# Exceptions raised by the learner's code
# ---------------------------------------------------------------------------------------------------


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _propagates(exc: BaseException) -> bool:
    """Only a ``KeyboardInterrupt`` (the learner stopping the cell) goes through a check."""
    return any(isinstance(leaf, KeyboardInterrupt) for leaf in _leaves(exc))


def _is_placeholder(exc: BaseException) -> bool:
    return any(
        isinstance(leaf, NotImplementedError) and bool(PLACEHOLDER.match(str(leaf))) for leaf in _leaves(exc)
    )


def _describe(exc: BaseException) -> str:
    text = str(exc)
    detail = text.splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}{': ' + detail if detail else ''}"


def _where_in_learner_code(exc: BaseException) -> str | None:
    """``line 3 of your cell: return fetch(x)`` for the innermost frame from a notebook cell."""
    for raised in (*_leaves(exc), exc):
        frames = traceback.extract_tb(raised.__traceback__)
        for frame in reversed(frames):
            if is_cell_file(frame.filename):
                return f"line {frame.lineno} of your cell: {(frame.line or '').strip()}"
    return None


_READ_THE_TRACEBACK = (
    "Fix the error first: the check cannot judge an answer that raises. "
    "`raise support.checks.last_error` in a new cell shows the whole traceback.",
    "A traceback reads from the bottom up: the last line names the exception and its message, the "
    "frames just above it show where it was raised, and those above them how the check's call "
    "reached your code. The first frame that is yours is usually where to look.",
)


def _error_hints(exc: BaseException) -> tuple[str, ...]:
    """Hints for an exception from the learner's code: where to look, then what it means."""
    leaves = _leaves(exc)
    if any(type(leaf).__name__ == "CancelledError" for leaf in leaves):
        return (
            "A CancelledError is how asyncio stops a task: something cancelled the task your code "
            "ran in, such as `task.cancel()`, a timeout (`asyncio.timeout`, `asyncio.wait_for`) or a "
            "TaskGroup one of whose other tasks failed.",
            "Cancellation is delivered as a CancelledError raised at an `await`, and travels up like "
            "any exception, so a function cancelled midway never returns its result. Cancel only the "
            "tasks your code started, and await them where you expect their CancelledError, so that "
            "it ends those tasks and not your function.",
        )
    if isinstance(exc, BaseExceptionGroup):
        return (
            "The errors listed under `inside:` are the real ones: fix those first.",
            "A TaskGroup gathers the exceptions of its failed tasks into one ExceptionGroup (and "
            "cancels its other tasks). `except* KeyError:` handles one kind of error inside a group; "
            "a plain `except KeyError:` does not match the group.",
        )
    if isinstance(exc, SystemExit):
        return (
            "Something in your code called `sys.exit()` (or `exit()`, `quit()`): in a notebook that "
            "ends the whole cell, not only your function.",
            "A function tells its caller that something went wrong by raising an exception, which the "
            "caller can handle, or by returning a value; `sys.exit` is for ending a program.",
        )
    return _READ_THE_TRACEBACK


# ---------------------------------------------------------------------------------------------------
# One run of a check
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Exercise:
    """One run of an exercise's check: ``step`` runs and prints sub-checks; the ``with`` block's end
    prints the summary, records the verdict and (where failures must fail the run) raises."""

    id: str
    title: str
    solution: str
    passed: int = 0
    failed: int = 0
    not_started: bool = False
    steps: list[Step] = field(default_factory=list)
    verdict: Verdict | None = None
    _answer: str = ""
    _printed: set[str] = field(default_factory=set)
    _notes: set[str] = field(default_factory=set)

    def __enter__(self) -> _Exercise:
        self._answer = fingerprint(_answer_arguments(sys._getframe(1)))
        print(wrap("", f"Exercise {self.id} · {self.title}"))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if isinstance(exc, _StopRun):
            exc = None
        if exc is not None:
            if _propagates(exc):
                return False
            if isinstance(exc, Mismatch):
                self._fail(SETUP, wrong=exc)
            else:
                self._raised(SETUP, exc)
        self._finish()
        return True

    def step(self, description: str, check: Callable[[], Any]) -> StepResult:
        """Run one sub-check and print its line; true when it passed, with ``check()``'s value."""
        if self.not_started:
            return StepResult(False)
        try:
            value = check()
        except Mismatch as wrong:
            self._fail(description, wrong=wrong)
            return StepResult(False)
        except BaseException as exc:  # the learner's code raised, or a placeholder is still there
            if _propagates(exc):
                raise
            self._raised(description, exc)
            return StepResult(False)
        self.passed += 1
        self.steps.append(Step(description, "passed"))
        print(wrap(f"  {MARKS['passed']}: ", description))
        return StepResult(True, value)

    def require(self, description: str, check: Callable[[], Any]) -> Any:
        """Like ``step``, but the run ends here when it fails; returns ``check()``'s value."""
        result = self.step(description, check)
        if not result:
            raise _StopRun(description)
        return result.value

    # -- failures ------------------------------------------------------------------------------------

    def _once(self, line: str) -> bool:
        """Whether ``line`` is new in this run (and note it as printed)."""
        if line in self._printed:
            return False
        self._printed.add(line)
        return True

    def _fail(
        self,
        description: str,
        *,
        wrong: Mismatch | None = None,
        raised: BaseException | None = None,
    ) -> None:
        self.failed += 1
        tier, same_answer = _next_tier((self.id, description), self._answer)
        hints = wrong.hints if wrong is not None else _error_hints(raised) if raised is not None else ()
        shown = hints[:tier]
        lines = [wrap(f"  {MARKS['not yet']}: ", description)]
        if wrong is not None:
            lines += [_detail("expected", wrong.expected), _detail("seen", wrong.seen)]
        if raised is not None:
            lines.append(wrap(f"{DETAIL}your code raised ", _describe(raised)))
            if isinstance(raised, BaseExceptionGroup):
                lines += [_detail("inside", _describe(leaf)) for leaf in _leaves(raised)[:3]]
            where = _where_in_learner_code(raised)
            if where:
                lines.append(_detail("where", where))
            if any(isinstance(e, RuntimeError) and "loop" in str(e) for e in _leaves(raised)):
                lines.append(_detail("help", f"{TROUBLESHOOTING}#event-loop-errors"))
        repeated = [hint for hint in shown if not self._once(hint)]
        lines += [_detail("hint", hint) for hint in shown if hint not in repeated]
        if shown and len(repeated) == len(shown):
            lines.append(_detail("hint", "as above"))
        if tier > len(hints):
            ending = [
                _detail("solution", f"{self.solution} (Exercise {self.id})"),
                wrap(
                    f"{DETAIL}sure you are right? ",
                    f"{TROUBLESHOOTING}#a-check-fails-and-you-are-sure-you-are-right",
                ),
            ]
            lines += [line for line in ending if self._once(line)]
        if same_answer and tier <= len(hints):
            self._notes.add("same")
        elif tier < len(hints):
            self._notes.add("more")
        print("\n".join(lines))
        self.steps.append(
            Step(
                description,
                "not yet",
                expected=wrong.expected if wrong is not None else None,
                seen=wrong.seen if wrong is not None else None,
                raised=_describe(raised) if raised is not None else None,
                hints=tuple(shown),
            )
        )

    def _raised(self, description: str, exc: BaseException) -> None:
        if _is_placeholder(exc):
            self.not_started = True
            text = (
                f"Exercise {self.id}'s cell still raises the placeholder NotImplementedError. "
                "Replace that line with your code, run the cell, then this check."
            )
            print(wrap(f"  {MARKS['not started']}: ", text))
            self.steps.append(Step(description, "not started", seen=text))
            return
        global last_error
        last_error = exc
        self._fail(description, raised=exc)

    # -- the end of a run ----------------------------------------------------------------------------

    def _finish(self) -> None:
        if "same" in self._notes:
            print(
                wrap(
                    "  ",
                    "Your answer's code is the same as at the last run (did you run its cell after "
                    "editing it?), so the hints are the same: change your answer for the next hint.",
                )
            )
        elif "more" in self._notes:
            print(wrap("  ", "Change your answer and run this check again for the next hint."))
        if self.not_started:
            status: Status = "not started"
        else:
            status = "not yet" if self.failed else "passed"
        verdict = Verdict(self.id, self.title, status, tuple(self.steps))
        global last_verdict
        self.verdict = last_verdict = results[self.id] = verdict
        _show(verdict)
        if status != "passed" and raises_on_failure():
            raise ExerciseIncomplete(verdict.summary, verdict)

    def summary(self) -> str:
        """The run's one-line summary (its verdict's, once the run is over)."""
        status: Status = "not started" if self.not_started else "not yet" if self.failed else "passed"
        return Verdict(self.id, self.title, status, tuple(self.steps)).summary


def exercise(exercise_id: str, title: str, solution: str) -> _Exercise:
    """Run an exercise's sub-checks in a ``with`` block: their lines, a summary and a ``Verdict``.

    ``solution`` names where the worked solution is, shown only after the hints run out. An exception
    escaping the block (while setting up, say) counts as a failed step. The learner's answer, whose
    changes move the hints on, is read from the arguments of the function the block is in.
    """
    return _Exercise(exercise_id, title, solution)
