"""support.backends: one embedded Redis shared across threads and loops, or the server at REDIS_URL."""

from __future__ import annotations

import asyncio
import threading

import pytest

import support
from support.backends import delete_keys, describe_redis, redis_client, redis_url


def test_clients_on_different_threads_and_loops_share_the_embedded_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)

    async def write() -> None:
        client = redis_client()
        await client.set("tests:shared", "from another thread")
        await client.aclose()

    thread = threading.Thread(target=lambda: asyncio.run(write()))
    thread.start()
    thread.join()

    async def read() -> bytes | None:
        client = redis_client()
        try:
            return await client.get("tests:shared")
        finally:
            await client.delete("tests:shared")
            await client.aclose()

    assert asyncio.run(read()) == b"from another thread"


def test_delete_keys_deletes_only_the_pattern() -> None:
    async def scenario() -> tuple[int, list[bytes]]:
        client = redis_client()
        for i in range(1200):  # more than one batch
            await client.set(f"tests:ns:{i}", i)
        await client.set("tests:other", 1)
        deleted = await delete_keys(client, "tests:ns:*")
        left = sorted([key async for key in client.scan_iter(match="tests:*")])
        await delete_keys(client, "tests:*")
        await client.aclose()
        return deleted, left

    deleted, left = asyncio.run(scenario())
    assert deleted == 1200
    assert left == [b"tests:other"]


@pytest.mark.parametrize("pattern", ["", "*", "**"])
def test_delete_keys_refuses_to_delete_everything(pattern: str) -> None:
    async def scenario() -> None:
        client = redis_client()
        try:
            await delete_keys(client, pattern)
        finally:
            await client.aclose()

    with pytest.raises(ValueError, match="namespaced pattern"):
        asyncio.run(scenario())


def test_redis_url_selects_a_real_server_and_hides_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert redis_url() is None
    assert "fakeredis" in describe_redis()
    monkeypatch.setenv("REDIS_URL", "redis://user:secret@db.example:6380/2")
    assert redis_url() == "redis://user:secret@db.example:6380/2"
    assert describe_redis() == "Redis at db.example:6380/2 (from REDIS_URL)"
    client = redis_client()  # no connection is made until a command runs
    assert type(client).__name__ == "Redis"
    assert client.connection_pool.connection_kwargs["host"] == "db.example"
    asyncio.run(client.aclose())


def test_support_exports_the_backends() -> None:
    assert support.redis_client is redis_client
    assert support.delete_keys is delete_keys


def test_latency_lets_a_check_then_set_race_show_as_on_a_network() -> None:
    async def check_then_set(client) -> bool:
        if await client.get("tests:claim") is None:
            await client.set("tests:claim", 1)
            return True
        return False

    async def winners(latency: float) -> int:
        client = redis_client(latency=latency)
        await client.delete("tests:claim")
        won = await asyncio.gather(*(check_then_set(client) for _ in range(10)))
        await client.delete("tests:claim")
        await client.aclose()
        return sum(won)

    assert asyncio.run(winners(0.0)) == 1  # fakeredis never interleaves the GET and the SET
    assert asyncio.run(winners(0.001)) == 10  # with a round trip, every copy looks before any sets


def test_latency_applies_to_pipelines_and_scripts_as_one_round_trip_each() -> None:
    """A pipeline writes to the connection directly and a script is one command: both pay one trip."""

    async def round_trips(latency: float) -> tuple[int, int]:
        client = redis_client(latency=latency)
        slept: list[float] = []
        real_sleep = asyncio.sleep

        async def counting_sleep(delay: float, *args: object) -> object:
            if delay == latency:
                slept.append(delay)
            return await real_sleep(delay, *args)

        asyncio.sleep = counting_sleep  # type: ignore[assignment]
        try:
            async with client.pipeline(transaction=True) as pipe:
                pipe.incr("tests:pipelined").expire("tests:pipelined", 5)
                await pipe.execute()
            after_pipeline = len(slept)
            await client.eval("return redis.call('INCR', KEYS[1])", 1, "tests:scripted")
            after_script = len(slept) - after_pipeline
        finally:
            asyncio.sleep = real_sleep  # type: ignore[assignment]
            await client.delete("tests:pipelined", "tests:scripted")
            await client.aclose()
        return after_pipeline, after_script

    assert asyncio.run(round_trips(0.002)) == (1, 1)
