"""support.workloads: the legacy client records where each call ran, and how many overlapped; the
probe from another process records each request like ``load`` does."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import support
from support.workloads import (
    GeoClient,
    LegacyPriceClient,
    count_primes,
    hash_buffer,
    price_of,
    probe_from_another_process,
)


def test_calls_from_a_pool_record_each_thread_and_the_overlap() -> None:
    client = LegacyPriceClient(delay=0.05)
    with ThreadPoolExecutor(max_workers=3) as pool:
        prices = list(pool.map(client.get_price, ["ACME"] * 6))
    assert prices == [price_of("ACME")] * 6
    assert len(client.calls) == 6
    assert not any(call.on_event_loop for call in client.calls)
    assert 1 < len({call.thread_id for call in client.calls}) <= 3  # the pool's threads, told apart by id
    assert 1 < client.max_in_flight <= 3
    client.reset()
    assert (client.calls, client.max_in_flight) == ([], 0)


def test_a_call_on_an_event_loop_is_recorded_as_such() -> None:
    client = LegacyPriceClient(delay=0.01)

    async def call() -> float:
        return client.get_price("ACME")

    asyncio.run(call())
    (record,) = client.calls
    assert record.on_event_loop
    assert record.thread_id == threading.get_ident()
    assert record.end - record.start >= 0.01


def test_the_other_workloads_compute_what_they_say() -> None:
    assert count_primes(100) == 25
    assert hash_buffer(1) == "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58"
    assert asyncio.run(GeoClient(delay=0).lookup("10.0.0.1")) == "NL"


def test_the_geo_client_counts_the_reads_that_overlap() -> None:
    geo = GeoClient(delay=0.05)

    async def lookups(offloaded: bool) -> None:
        if offloaded:
            await asyncio.gather(*(asyncio.to_thread(geo._read_database, "10.0.0.1") for _ in range(4)))
        else:
            await asyncio.gather(*(geo.lookup("10.0.0.1") for _ in range(4)))

    asyncio.run(lookups(offloaded=False))
    assert geo.max_in_flight == 1  # each lookup blocks the loop: one at a time
    geo.reset()
    asyncio.run(lookups(offloaded=True))
    assert geo.max_in_flight == 4


def test_the_probe_from_another_process_paces_and_records_each_request(server: support.Server) -> None:
    result = asyncio.run(probe_from_another_process(server, "/status/200", requests=5, interval=0.02))
    assert (result.concurrency, len(result.records), result.ok) == (1, 5, 5)
    assert [r.index for r in result.records] == list(range(5))
    assert all(b - a >= 0.019 for a, b in zip(result.starts, result.starts[1:], strict=False))  # paced
    assert all(0 <= r.start <= r.end <= result.wall for r in result.records)


def test_the_probe_from_another_process_says_when_it_cannot_connect() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago, and has no server now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionError, match="the probe's process failed"):
        asyncio.run(probe_from_another_process(f"http://127.0.0.1:{port}"))
