"""Shared fixtures: the test app served for a test, and clean state between tests; ``--quick``.

The suite's markers: ``notebooks`` (runs whole notebooks in a kernel), ``backends`` (real Redis and
PostgreSQL), ``performance`` (the instruments' own speed). ``--quick`` leaves all three out, for the
edit-test loop of day-to-day work; ``python course.py test`` with no options runs everything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import matplotlib
import pytest

import support
from support.checks import reset_hints
from tests.apps import make_app

matplotlib.use("Agg")


SLOW_MARKERS = ("notebooks", "backends", "performance")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        help="leave out the notebooks, the real backends and the performance tests "
        "(about 2 minutes on 2 cores)",
    )
    parser.addoption(
        "--shard",
        default=None,
        metavar="I/N",
        help="run the I-th of N shares of the collected tests (every N-th test, from the I-th; I from 0): "
        "the real-backend runs split a check file into shares that run on several workers at once",
    )


def _shard(config: pytest.Config, items: list[pytest.Item]) -> None:
    option = config.getoption("--shard")
    if option is None:
        return
    try:
        index, count = (int(n) for n in option.split("/"))
    except ValueError:
        raise pytest.UsageError(f"--shard {option}: expected I/N, two whole numbers, e.g. 0/4") from None
    if not 0 <= index < count:
        raise pytest.UsageError(f"--shard {option}: I must be from 0 to N - 1")
    left_out = [item for n, item in enumerate(items) if n % count != index]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
    items[:] = [item for n, item in enumerate(items) if n % count == index]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (the workers then end together, quick tests filling the gaps), or none."""
    _shard(config, items)
    slow = [item for item in items if any(item.get_closest_marker(m) for m in SLOW_MARKERS)]
    rest = [item for item in items if not any(item.get_closest_marker(m) for m in SLOW_MARKERS)]
    if config.getoption("--quick"):
        if slow:
            config.hook.pytest_deselected(items=slow)
        items[:] = rest
    else:
        longest = ("test_real_", "test_notebooks_rerun")  # whole chapters, 10-50 s each
        slow.sort(key=lambda item: not any(name in item.nodeid for name in longest))
        items[:] = _spread_one_system(slow) + rest


def _spread_one_system(items: list[pytest.Item]) -> list[pytest.Item]:
    """The tests that take chapter 7's lock spaced out among the others: handed out together, they
    would hold several workers waiting for the one that has the lock. Each worker holds a test running
    and up to two queued, so they are at least twice the workers apart; fewer wait, not none."""
    serial = [item for item in items if item.get_closest_marker("one_system")]
    others = [item for item in items if not item.get_closest_marker("one_system")]
    if not serial:
        return items
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    gap = max(1, len(others) // len(serial), 2 * workers)
    spread: list[pytest.Item] = []
    for n, item in enumerate(others):
        if n % gap == 0 and serial:
            spread.append(serial.pop(0))
        spread.append(item)
    return spread + serial


@pytest.fixture
def server() -> Iterator[support.Server]:
    with support.serve(make_app(), name="test-server") as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    reset_hints()
    yield
    support.stop_all()
