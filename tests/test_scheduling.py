"""How the suite shares a small machine: at most a few whole notebooks at once, spaced out in the order."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import conftest, locks


def test_a_notebook_waits_while_every_slot_is_taken(tmp_path: Path) -> None:
    release, holding, entered = threading.Event(), threading.Barrier(3), []

    def hold() -> None:
        with locks.held("notebook", slots=2, directory=tmp_path):
            holding.wait(timeout=5)
            release.wait(timeout=10)

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
    holding.wait(timeout=5)  # both slots taken

    def third() -> None:
        with locks.held("notebook", slots=2, directory=tmp_path):
            entered.append(time.monotonic())

    waiter = threading.Thread(target=third)
    waiter.start()
    time.sleep(0.5)
    assert entered == [], "a third notebook ran while both slots were held"
    released = time.monotonic()
    release.set()
    for thread in [*holders, waiter]:
        thread.join(timeout=10)
    assert len(entered) == 1 and entered[0] >= released, "the third notebook runs once a slot is free"


def test_the_whole_notebook_tests_take_a_slot() -> None:
    from tests import test_notebooks_rerun, test_real_backends

    marked = {
        "rerun": [m.name for m in test_notebooks_rerun.pytestmark],
        "real stores": [m.name for m in test_real_backends.test_notebook_runs_on_the_real_stores.pytestmark],
    }
    assert all("whole_notebook" in names for names in marked.values()), marked


def _item(name: str, *markers: str) -> SimpleNamespace:
    return SimpleNamespace(
        nodeid=name, get_closest_marker=lambda marker: marker if marker in markers else None
    )


def test_whole_notebooks_are_spread_over_the_first_part_of_the_run() -> None:
    notebooks = [_item(f"nb{n}", "whole_notebook") for n in range(4)]
    others = [_item(f"t{n}") for n in range(100)]
    order = [item.nodeid for item in conftest._spread(notebooks, others, over=0.6)]
    at = [order.index(f"nb{n}") for n in range(4)]
    assert at == sorted(at), "the notebooks keep their order (the longest first)"
    assert all(b - a >= 15 for a, b in itertools.pairwise(at)), f"notebooks next to each other: {at}"
    assert at[-1] < 0.65 * len(order), f"the last notebook starts too late: position {at[-1]}"
    assert sorted(order) == sorted(item.nodeid for item in [*notebooks, *others]), "no test lost or repeated"


def test_a_test_that_raises_frees_its_slot(tmp_path: Path) -> None:
    with pytest.raises(ValueError), locks.held("notebook", slots=1, directory=tmp_path):
        raise ValueError("the notebook failed")
    taken = []

    def take() -> None:
        with locks.held("notebook", slots=1, directory=tmp_path):
            taken.append(time.monotonic())

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.join(timeout=2)
    assert taken, "the slot of a test that raised was never freed"
