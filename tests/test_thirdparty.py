"""support.thirdparty.EmailProvider: slow, fails on a schedule, counts what it did."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from support.thirdparty import EmailProvider, ProviderError


async def send_all(provider: EmailProvider, n: int) -> list[BaseException | None]:
    results = await asyncio.gather(
        *(provider.send(f"user{i}@example.com") for i in range(n)), return_exceptions=True
    )
    return [r if isinstance(r, BaseException) else None for r in results]


def test_every_nth_call_fails_before_sending() -> None:
    provider = EmailProvider(0.01, fail_every=5)
    outcomes = asyncio.run(send_all(provider, 10))
    assert sum(isinstance(o, ProviderError) for o in outcomes) == 2
    assert (provider.calls, provider.failures, len(provider.sent)) == (10, 2, 8)
    assert provider.max_in_flight == 10
    assert provider.in_flight == 0


def test_fail_after_send_sends_and_still_raises() -> None:
    provider = EmailProvider(0, fail_every=1, fail_after_send=True)
    with pytest.raises(ProviderError, match="after accepting"):
        asyncio.run(provider.send("a@example.com"))
    assert provider.sent_to("a@example.com") == 1
    with pytest.raises(ProviderError):
        asyncio.run(provider.send("a@example.com"))
    assert provider.duplicates() == 1


def test_dedupe_honours_idempotency_keys() -> None:
    provider = EmailProvider(0, dedupe=True)

    async def scenario() -> None:
        for _ in range(3):
            await provider.send("a@example.com", idempotency_key="welcome:1")
        await provider.send("a@example.com", idempotency_key="welcome:2", subject="Again")
        await provider.send("a@example.com")

    asyncio.run(scenario())
    assert provider.calls == 5
    assert [m.idempotency_key for m in provider.sent] == ["welcome:1", "welcome:2", None]


def test_send_blocking_blocks_the_calling_thread() -> None:
    provider = EmailProvider(0.05)
    start = time.perf_counter()
    provider.send_blocking("a@example.com")
    assert time.perf_counter() - start >= 0.045
    assert provider.sent[0].to == "a@example.com"


def test_reset_and_counters_are_thread_safe() -> None:
    provider = EmailProvider(0, fail_every=3)

    def many() -> None:
        for _ in range(300):
            with contextlib.suppress(ProviderError):
                provider.send_blocking("a@example.com")

    threads = [threading.Thread(target=many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert provider.calls == 1200
    assert provider.failures == 400
    assert len(provider.sent) == 800
    provider.reset()
    assert (provider.calls, provider.failures, provider.sent) == (0, 0, [])


def test_rejects_negative_settings() -> None:
    with pytest.raises(ValueError):
        EmailProvider(-1)


def test_a_call_begun_before_a_reset_does_not_count_when_it_ends() -> None:
    provider = EmailProvider(delay=0.05)

    async def scenario() -> tuple[int, int, int]:
        first = asyncio.create_task(provider.send("a@example.com"))
        await asyncio.sleep(0.01)
        provider.reset()  # the call above is still in flight
        second = asyncio.create_task(provider.send("b@example.com"))
        await asyncio.sleep(0.01)
        during = provider.in_flight
        await first  # ends after the reset: must not take the count below the new call
        after_first = provider.in_flight
        await second
        return during, after_first, provider.in_flight

    assert asyncio.run(scenario()) == (1, 1, 0)
    assert [m.to for m in provider.sent] == ["b@example.com"], "nor is its email among those sent since"
