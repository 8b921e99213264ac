"""Waiting for work that ends after the response, and watching a value change over time.

Background work finishes after the client has its answer, so a notebook that counts what the work
did must first wait for it: ``await until(lambda: provider.calls == 20)``. ``sample`` reads a value
at a fixed interval (emails in flight, queue depth) for a plot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

__all__ = ["sample", "until"]


async def until(condition: Callable[[], object], timeout: float = 10.0, every: float = 0.01) -> float:
    """Wait until ``condition()`` is true; returns how many seconds that took.

    Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"still waiting after {timeout} s")
        await asyncio.sleep(every)
    return time.perf_counter() - start


async def sample(
    read: Callable[[], Any], seconds: float, every: float = 0.01
) -> tuple[list[float], list[Any]]:
    """Call ``read()`` every ``every`` s for ``seconds`` s; returns (times in s, values)."""
    times: list[float] = []
    values: list[Any] = []
    start = time.perf_counter()
    while (now := time.perf_counter() - start) < seconds:
        times.append(now)
        values.append(read())
        await asyncio.sleep(every)
    return times, values
