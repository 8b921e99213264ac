"""support.predict: a learner's guess beside the measurement, whatever form the guess takes."""

from __future__ import annotations

import pytest

from support.predict import compare, compare_choice, read_number


@pytest.mark.parametrize(
    ("guess", "number"),
    [
        (150, 150.0),
        (0.2, 0.2),
        ("150", 150.0),
        ("150 ms", 150.0),
        ("~1,200ms", 1200.0),
        (".5 s", 0.5),
        ("1e3", 1000.0),
        (None, None),
        ("", None),
        ("no idea", None),
        (True, None),
    ],
)
def test_read_number(guess: object, number: float | None) -> None:
    assert read_number(guess) == number


def test_compare_says_how_far_off_the_guess_was() -> None:
    assert compare(100, 1000, unit="ms").endswith("you predicted 100 ms: the run measured 10.0× your guess")
    assert compare(1000, 100, unit="ms").endswith("the run measured 10.0× less than your guess")
    assert compare("110ms", 100, unit="ms").endswith("close: within 25 %")
    assert compare(0, 5).endswith("off by 5")
    assert compare(10, 15.0, what="of 30").startswith("of 30: 15;"), "a count prints as a whole number"


def test_compare_without_a_usable_guess_still_gives_the_measurement() -> None:
    assert compare(None, 1012.4, unit="ms").startswith("measured: 1,012 ms (no prediction made")
    assert "is not a number" in compare("a lot", 3.0)


def test_compare_choice() -> None:
    options = {"a": "a staircase", "b": "all at once"}
    assert compare_choice("B", "b", options).endswith("b) all at once: as you predicted")
    assert compare_choice("a)", "b", options).endswith("you predicted a) a staircase")
    assert "no prediction made" in compare_choice(None, "b", options)
    assert "is not one of a, b" in compare_choice("z", "b", options)
