"""``--shard I/N`` (tests/conftest.py): N shares that together run every test once."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import _shard


class Config:
    """The two things of pytest's config that ``_shard`` uses."""

    def __init__(self, option: str | None) -> None:
        self.option = option
        self.deselected: list[Any] = []
        self.hook = self

    def getoption(self, name: str) -> str | None:
        assert name == "--shard"
        return self.option

    def pytest_deselected(self, items: list[Any]) -> None:
        self.deselected += items


def share(option: str | None, items: list[str]) -> tuple[list[str], list[str]]:
    config = Config(option)
    kept = list(items)
    _shard(config, kept)  # type: ignore[arg-type]
    return kept, config.deselected


def test_the_shares_run_every_test_once() -> None:
    tests = [f"test_{n}" for n in range(10)]
    shares = [share(f"{i}/3", tests) for i in range(3)]
    assert [len(kept) for kept, _ in shares] == [4, 3, 3]
    assert sorted(t for kept, _ in shares for t in kept) == sorted(tests)
    for kept, deselected in shares:
        assert sorted(kept + deselected) == sorted(tests), "what a share leaves out is reported deselected"


def test_no_option_runs_everything() -> None:
    assert share(None, ["a", "b"]) == (["a", "b"], [])


@pytest.mark.parametrize("option", ["3/3", "-1/2"])
def test_a_share_out_of_range_is_refused(option: str) -> None:
    with pytest.raises(pytest.UsageError, match="I must be from 0 to N - 1"):
        share(option, ["a"])


@pytest.mark.parametrize("option", ["1/2/3", "a/2", "2"])
def test_a_malformed_share_is_refused(option: str) -> None:
    with pytest.raises(pytest.UsageError, match="expected I/N, two whole numbers"):
        share(option, ["a"])
