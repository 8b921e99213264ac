"""support.waiting: wait for a condition, sample a value over time."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from support.waiting import sample, until


def test_until_returns_how_long_it_waited() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        return await until(lambda: loop.time() - start > 0.05)

    assert 0.04 < asyncio.run(scenario()) < 1.0


def test_until_raises_after_the_timeout() -> None:
    with pytest.raises(TimeoutError, match=r"still waiting after 0\.05 s"):
        asyncio.run(until(lambda: False, timeout=0.05))


def test_sample_reads_at_intervals() -> None:
    counter = itertools.count()
    times, values = asyncio.run(sample(lambda: next(counter), seconds=0.1, every=0.01))
    assert 3 <= len(times) == len(values) <= 11
    assert values == list(range(len(values)))
    assert times == sorted(times) and times[-1] < 0.1
