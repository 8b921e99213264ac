"""The course's stores: an embedded Redis (fakeredis) unless ``REDIS_URL`` names a real server.

Every chapter that uses Redis gets its client from here, so the notebook code is the same for both:

    redis = support.redis_client()          # fakeredis, or the server at $REDIS_URL
    await redis.set("ch02:greeting", "hi")

All fakeredis clients share one in-process server, whatever thread or event loop they run on, so an
app on a server thread, a worker on its own thread and the notebook see the same keys, as they would
with a real Redis. A client belongs to the event loop it is first used on: create one per loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import fakeredis
import redis.asyncio

from support.workers import on_kill

__all__ = ["delete_keys", "describe_redis", "redis_client", "redis_url"]

_fake_server: fakeredis.FakeServer | None = None
_fake_server_lock = threading.Lock()


def redis_url() -> str | None:
    """The real Redis to use (``$REDIS_URL``), or None for the embedded one."""
    return os.environ.get("REDIS_URL") or None


def _shared_fake_server() -> fakeredis.FakeServer:
    global _fake_server
    with _fake_server_lock:
        if _fake_server is None:
            _fake_server = fakeredis.FakeServer()
        return _fake_server


def redis_client(
    *, decode_responses: bool = False, latency: float = 0.0, **kwargs: Any
) -> redis.asyncio.Redis:
    """An asyncio Redis client: on ``$REDIS_URL`` if set, else on the shared embedded fakeredis.

    ``latency`` (seconds) is added before every command, as a network round trip would be. The
    embedded fakeredis answers a command without letting another task run in between, so races
    between a read and a later write (check-then-set), which a real network exposes, never show
    without it. It applies to every round trip: each command, each script (``EVAL``/``EVALSHA``,
    which go through ``execute_command``), and each pipeline's ``execute()`` (one round trip for the
    whole batch, as on a real connection). It is an ``asyncio.sleep``, so the loop's timer resolution
    applies: under uvloop (what ``serve()`` uses) a delay under 0.5 ms rounds to none at all, and on
    asyncio's selector loop any delay waits about 1 ms or more (epoll's timeout is in whole
    milliseconds, rounded up). Measure the round trip you got rather than trusting a sub-millisecond value.
    ``kwargs`` go to the client (for example ``max_connections``). Close it with ``await
    client.aclose()`` when done; the embedded server itself lives as long as the kernel.
    """
    url = redis_url()
    if url:
        client = redis.asyncio.Redis.from_url(url, decode_responses=decode_responses, **kwargs)
    else:
        client = fakeredis.FakeAsyncRedis(
            server=_shared_fake_server(), decode_responses=decode_responses, **kwargs
        )
    if latency > 0:
        _add_round_trip(client, latency)
    return client


def _add_round_trip(client: redis.asyncio.Redis, latency: float) -> None:
    execute = client.execute_command

    async def execute_after_a_round_trip(*args: Any, **options: Any) -> Any:
        await asyncio.sleep(latency)
        return await execute(*args, **options)

    client.execute_command = execute_after_a_round_trip  # type: ignore[method-assign]

    # A pipeline writes its batch to the connection directly, not through execute_command.
    make_pipeline = client.pipeline

    def pipeline_after_a_round_trip(*args: Any, **options: Any) -> Any:
        pipe = make_pipeline(*args, **options)
        run = pipe.execute

        async def execute(*run_args: Any, **run_options: Any) -> Any:
            await asyncio.sleep(latency)
            return await run(*run_args, **run_options)

        pipe.execute = execute
        return pipe

    client.pipeline = pipeline_after_a_round_trip  # type: ignore[method-assign]


def _forget_clients_of(loop: asyncio.AbstractEventLoop) -> None:
    """Drop the embedded server's wake-up callbacks for commands blocked on a killed worker's loop.

    A worker waiting for a job is blocked in a command (``BRPOPLPUSH``). When a real worker process
    dies, its connection closes and Redis forgets the command; here the blocked command's callback
    would stay registered and raise "Event loop is closed" in whichever client next changes a key.
    """
    if _fake_server is None:
        return
    with _fake_server.lock:
        for db in list(_fake_server.dbs.values()):
            callbacks = db._change_callbacks  # fakeredis internals, pinned version
            for callback in list(callbacks):
                cells = callback.__closure__ or ()
                if any(_cell_holds(cell, loop) for cell in cells):
                    callbacks.discard(callback)


def _cell_holds(cell: Any, value: object) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell
        return False


on_kill(_forget_clients_of)


def describe_redis() -> str:
    """One line for a notebook: which Redis this kernel is using."""
    url = redis_url()
    if url:
        return f"Redis at {url.split('@')[-1]} (from REDIS_URL)"
    return "embedded fakeredis (in this kernel; set REDIS_URL to use a real server)"


async def delete_keys(client: redis.asyncio.Redis, pattern: str) -> int:
    """Delete the keys matching ``pattern`` (e.g. ``"ch02:*"``); returns how many were deleted.

    Chapters call this at their start so that running a notebook twice, or against a Redis that
    outlives the kernel, begins from the same empty state. It never touches keys outside the pattern.
    """
    if not pattern or pattern in ("*", "**"):
        raise ValueError("delete_keys needs a namespaced pattern such as 'ch02:*', not every key")
    deleted = 0
    batch: list[Any] = []
    async for key in client.scan_iter(match=pattern, count=500):
        batch.append(key)
        if len(batch) >= 500:
            deleted += await client.delete(*batch)
            batch.clear()
    if batch:
        deleted += await client.delete(*batch)
    return deleted
