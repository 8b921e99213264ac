"""Helpers for the tests of exercise checks."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import support
import support.checks
from support.checks import ExerciseIncomplete, reset_hints


def rejected(capsys: pytest.CaptureFixture[str], check: Any, *answer: Any) -> str:
    """Run a check that must not pass; return what it printed plus its one-line summary."""
    with pytest.raises(ExerciseIncomplete) as failure:
        check(*answer)
    return capsys.readouterr().out + str(failure.value)


def child_processes() -> set[int]:
    """Process ids whose parent is this process (Linux only; elsewhere an empty set)."""
    children: set[int] = set()
    if sys.platform != "linux":
        return children
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.add(int(entry.name))
    return children


async def _redis_keys(pattern: str, exact: Iterable[str]) -> list[str]:
    client = support.redis_client(decode_responses=True)
    try:
        found = [key async for key in client.scan_iter(match=pattern)]
        return found + [key for key in exact if await client.exists(key)]
    finally:
        await client.aclose()


@contextmanager
def fresh_and_leaves_nothing_running(
    redis_pattern: str | None = None, redis_keys: Iterable[str] = ()
) -> Iterator[None]:
    """Around one check test: fresh hints; afterwards no server, worker, tracer provider, thread or
    child process the test started, and (with ``redis_pattern``) no Redis key it wrote."""
    reset_hints()
    threads, children = set(threading.enumerate()), child_processes()
    yield
    support.checks.last_error = None
    reset_hints()
    assert support.running() == [], "a check left a server running"
    assert support.running_workers() == [], "a check left a queue worker running"
    assert support.running_tracing() == [], "a check left a tracer provider running"
    assert [t for t in threading.enumerate() if t not in threads and t.is_alive()] == []
    assert child_processes() <= children, "a check left a child process running"
    if redis_pattern is not None:
        leftover = asyncio.run(_redis_keys(redis_pattern, redis_keys))
        assert leftover == [], f"a check left keys in Redis: {leftover}"
