"""Shared fixtures: the test app served for a test, and clean state between tests."""

from __future__ import annotations

from collections.abc import Iterator

import matplotlib
import pytest

import support
from support.checks import reset_hints
from tests.apps import make_app

matplotlib.use("Agg")


@pytest.fixture
def server() -> Iterator[support.Server]:
    with support.serve(make_app(), name="test-server") as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    reset_hints()
    yield
    support.stop_all()
