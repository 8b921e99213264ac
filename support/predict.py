"""Predict, then measure: a learner's guess, shown beside the number the run measured.

A lesson asks for a prediction in a cell tagged ``predict`` (``predicted_ms = None  # your guess``),
before the cell that measures; the measuring cell then calls :func:`compare`. A guess left empty is
fine (Restart & Run All must work): the line then just gives the measurement. A guess typed as text
(``"150"``, ``"150 ms"``, ``"0.2s"``) is read as a number where it can be, else said to be unreadable.
"""

from __future__ import annotations

import re

__all__ = ["compare", "compare_choice", "read_number"]

_NUMBER = re.compile(r"[-+]?(?:\d[\d,_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def read_number(guess: object) -> float | None:
    """The number in a guess: an int or float as is, else the first number written in its text."""
    if guess is None or isinstance(guess, bool):
        return None
    if isinstance(guess, int | float):
        return float(guess)
    found = _NUMBER.search(str(guess))
    if found is None:
        return None
    try:
        return float(found.group().replace(",", "").replace("_", ""))
    except ValueError:
        return None


def _figure(value: float, unit: str) -> str:
    whole = float(value).is_integer()
    digits = 0 if whole or abs(value) >= 100 else 1 if abs(value) >= 10 else 2
    return f"{value:,.{digits}f}{' ' + unit if unit else ''}"


def _how_far(guess: float, measured: float) -> str:
    if guess == measured:
        return "exactly right"
    if guess <= 0 or measured <= 0:
        return f"off by {_figure(abs(measured - guess), '')}"
    ratio = measured / guess
    if 0.8 <= ratio <= 1.25:
        return "close: within 25 %"
    if ratio > 1:
        return f"the run measured {ratio:.1f}× your guess"
    return f"the run measured {1 / ratio:.1f}× less than your guess"


def compare(guess: object, measured: float, *, unit: str = "", what: str = "measured") -> str:
    """Print (and return) one line: the learner's guess beside the measurement, and how far off it was."""
    number = read_number(guess)
    shown = f"{what}: {_figure(measured, unit)}"
    if guess is None or (isinstance(guess, str) and not guess.strip()):
        line = f"{shown} (no prediction made: set it in the predict cell above and run both again)"
    elif number is None:
        line = f"{shown}; your prediction {guess!r} is not a number, so it cannot be compared"
    else:
        line = f"{shown}; you predicted {_figure(number, unit)}: {_how_far(number, measured)}"
    print(line)
    return line


def compare_choice(guess: object, answer: str, options: dict[str, str]) -> str:
    """Print (and return) one line for a multiple-choice prediction: ``options`` maps letters to texts."""
    by_letter = {key.lower(): f"{key}) {text}" for key, text in options.items()}
    right = by_letter[answer.lower()]
    letter = str(guess).strip().strip("()").lower() if guess is not None else ""
    if not letter:
        line = f"the run says {right} (no prediction made: set it in the predict cell above)"
    elif letter not in by_letter:
        line = f"the run says {right}; your prediction {guess!r} is not one of {', '.join(options)}"
    elif letter == answer.lower():
        line = f"the run says {right}: as you predicted"
    else:
        line = f"the run says {right}; you predicted {by_letter[letter]}"
    print(line)
    return line
