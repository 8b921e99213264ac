"""support.workloads: the legacy client records where each call ran, and how many overlapped."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from support.workloads import GeoClient, LegacyPriceClient, count_primes, hash_buffer, price_of


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
