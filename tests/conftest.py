"""Shared fixtures: the test app served for a test, and clean state between tests; ``--quick``.

The suite's markers: ``notebooks`` (runs whole notebooks in a kernel), ``backends`` (real Redis and
PostgreSQL), ``performance`` (the instruments' own speed). ``--quick`` leaves all three out, for the
edit-test loop of day-to-day work; ``python course.py test`` with no options runs everything.
Tests marked ``whole_notebook`` (a lesson or solved notebook, start to end) run at most three at once
across the workers, and are spread out in the order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import matplotlib
import pytest

import support
from support.checks import reset_hints
from tests import locks
from tests.apps import make_app
from tests.backends import (  # noqa: F401 (the fixtures, for every test module)
    database_backend,
    missing_stores,
    postgres_url,
    real_redis_url,
    redis_backend,
    stores_of,
)

matplotlib.use("Agg")


SLOW_MARKERS = ("notebooks", "backends", "performance")
# whole lessons and solved notebooks running at once across the workers: their timing cells (chapter
# 1's GIL medians, chapter 4's pool sizes) need a share of the CPU, and the workers beside them mostly
# wait on sleeps and sockets. On 2 cores with eight workers the run was CPU-bound either way: four
# slots took 317 s where three took 323 s, so the lessons get the quieter machine.
NOTEBOOK_SLOTS = 3


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick",
        action="store_true",
        help="leave out the notebooks, the real backends and the performance tests "
        "(about 2 minutes on 2 cores)",
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    names = {"redis": "Redis", "postgresql": "PostgreSQL"}
    return [f"real {names[store]}: {why}; its tests are left out" for store, why in missing_stores().items()]


def _leave_out_missing_stores(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests whose real stores are all missing (tests/backends.py), left out rather than skipped one
    by one (a run without redis-server would list some two hundred skips)."""
    missing = missing_stores()
    left_out = [item for item in items if (stores := stores_of(item)) and stores <= set(missing)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if item not in left_out]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first (the workers then end together, quick tests filling the gaps), or none."""
    _leave_out_missing_stores(config, items)
    slow = [item for item in items if any(item.get_closest_marker(m) for m in SLOW_MARKERS)]
    rest = [item for item in items if not any(item.get_closest_marker(m) for m in SLOW_MARKERS)]
    if config.getoption("--quick"):
        if slow:
            config.hook.pytest_deselected(items=slow)
        items[:] = rest
    else:
        longest = ("test_real_", "test_notebooks_rerun")  # whole chapters, 10-100 s each
        slow.sort(key=lambda item: not any(name in item.nodeid for name in longest))
        whole = sorted(
            (item for item in slow if item.get_closest_marker("whole_notebook")), key=_longest_first
        )
        slow = [item for item in slow if not item.get_closest_marker("whole_notebook")]
        items[:] = _spread(whole, _spread_one_system(slow) + rest, over=0.6)


def _longest_first(item: pytest.Item) -> tuple[bool, bool, int]:
    """The solved drill (eight whole systems a run, about 50 s), then the other notebooks by the size of
    their file (a rough guide: the lessons are the biggest); the runs on the real stores (one run each)
    after the runs twice in one kernel."""
    name = item.nodeid.split("[")[-1].rstrip("]")
    path = Path(__file__).resolve().parent.parent / name
    size = path.stat().st_size if path.is_file() else 0
    return "test_real_" in item.nodeid, "07_incident_drill_exercises" not in name, -size


def _spread(spaced: list[pytest.Item], others: list[pytest.Item], over: float) -> list[pytest.Item]:
    """``spaced`` (in their order) evenly among the first ``over`` of ``others``: the whole notebooks
    take one of a few slots (``pytest_runtest_protocol`` below), so handed out together they would
    keep most workers waiting; spaced out, the quick tests run beside them. The last starts well
    before the end, so that the run does not end on one notebook with the other workers idle."""
    if not spaced:
        return others
    return _interleave(spaced, others, gap=int(len(others) * over) // len(spaced))


def _interleave(spaced: list[pytest.Item], others: list[pytest.Item], gap: int) -> list[pytest.Item]:
    """One of ``spaced`` before every ``gap`` of ``others``; what is left of ``spaced`` at the end."""
    spaced, gap = list(spaced), max(1, gap)
    spread: list[pytest.Item] = []
    for n, item in enumerate(others):
        if n % gap == 0 and spaced:
            spread.append(spaced.pop(0))
        spread.append(item)
    return spread + spaced


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """A whole notebook holds one of a few slots (tests/locks.py) while it runs. It waits for the slot
    before pytest-timeout starts its clock (this wrapper is outside pytest-timeout's own), so that the
    wait is not counted against the notebook's 300 s: with few other tests to space them out
    (``-m notebooks``), whole notebooks queue for minutes."""
    if item.get_closest_marker("whole_notebook") is None:
        yield
        return
    with locks.held("notebook", slots=NOTEBOOK_SLOTS):
        yield


def _spread_one_system(items: list[pytest.Item]) -> list[pytest.Item]:
    """The tests that take chapter 7's lock spaced out among the others: handed out together, they
    would hold several workers waiting for the one that has the lock. Each worker holds a test running
    and up to two queued, so they are at least twice the workers apart; fewer wait, not none."""
    serial = [item for item in items if item.get_closest_marker("one_system")]
    others = [item for item in items if not item.get_closest_marker("one_system")]
    if not serial:
        return items
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return _interleave(serial, others, gap=max(len(others) // len(serial), 2 * workers))


@pytest.fixture
def server() -> Iterator[support.Server]:
    with support.serve(make_app(), name="test-server") as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    reset_hints()
    yield
    support.stop_all()
