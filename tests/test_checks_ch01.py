"""support.checks.ch01: chapter 1's checks pass right answers and name each plausible wrong one.

Every answer here is written the way a learner would write it in the exercise cell.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import multiprocessing
import os
import re
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import nbformat
import pytest
from fastapi import FastAPI

from support.checks import ch01, forget_answers, placeholder_message
from support.checks.ch01 import (
    check_blocking_sdk,
    check_loop_lag_probe,
    check_offload,
    check_offload_choice,
)
from support.workloads import LegacyPriceClient
from tests.checking import fresh_and_leaves_nothing_running, rejected


@pytest.fixture(autouse=True)
def _fresh_and_leaves_nothing_running() -> Iterator[None]:
    with fresh_and_leaves_nothing_running():
        yield


# ---------------------------------------------------------------------------------------------------
# Exercise 1.1: fix a blocking endpoint
# ---------------------------------------------------------------------------------------------------

SHAPE = '{"symbol": "ACME", "price": 127.8}'


def price_app(variant: str) -> tuple[FastAPI, LegacyPriceClient]:
    """The exercise cell, answered one way or another."""
    client = LegacyPriceClient(delay=0.05)
    app = FastAPI()

    async def fetch(symbol: str) -> float:  # an async def helper around the blocking call
        return client.get_price(symbol)

    if variant == "def":

        @app.get("/price/{symbol}")
        def price_def(symbol: str):
            return {"symbol": symbol, "price": client.get_price(symbol)}

        return app, client

    one_at_a_time = anyio.CapacityLimiter(1)
    two_threads = app.state.pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)  # see shut_down
    lock = threading.Lock()

    def locked_price(symbol: str) -> float:
        with lock:
            return client.get_price(symbol)

    @app.get("/price/{symbol}")
    async def price(symbol: str):
        if variant == "to_thread":
            value = await anyio.to_thread.run_sync(client.get_price, symbol)
        elif variant == "blocking":
            value = client.get_price(symbol)
        elif variant == "async-helper":
            value = await fetch(symbol)
        elif variant == "create_task":
            value = await asyncio.create_task(fetch(symbol))
        elif variant == "gather":
            (value,) = await asyncio.gather(fetch(symbol))
        elif variant == "no-await":
            value = anyio.to_thread.run_sync(client.get_price, symbol)
        elif variant == "bare-price":
            return await anyio.to_thread.run_sync(client.get_price, symbol)
        elif variant == "one-thread":
            value = await anyio.to_thread.run_sync(client.get_price, symbol, limiter=one_at_a_time)
        elif variant == "asyncio.to_thread":  # asyncio's default executor: min(32, CPUs + 4) threads
            value = await asyncio.to_thread(client.get_price, symbol)
        elif variant == "two-threads":
            value = await asyncio.get_running_loop().run_in_executor(two_threads, client.get_price, symbol)
        elif variant == "result":  # off the loop, but the loop waits for it
            value = two_threads.submit(client.get_price, symbol).result()
        elif variant == "join":
            box: dict[str, float] = {}
            worker = threading.Thread(target=lambda: box.update(price=client.get_price(symbol)))
            worker.start()
            worker.join()
            value = box["price"]
        elif variant == "and-sleep":  # the call offloaded, another blocking call left on the loop
            value = await anyio.to_thread.run_sync(client.get_price, symbol)
            time.sleep(0.02)
        elif variant == "lock":
            value = await anyio.to_thread.run_sync(locked_price, symbol)
        elif variant == "upper":
            value = await anyio.to_thread.run_sync(client.get_price, symbol)
            symbol = symbol.upper()
        elif variant == "placeholder":
            raise NotImplementedError(placeholder_message("1.1"))
        elif variant == "error":
            value = {"AAPL": 1.0}[symbol]
        return {"symbol": symbol, "price": value}

    return app, client


@contextmanager
def shut_down(app: FastAPI, client: LegacyPriceClient) -> Iterator[tuple[FastAPI, LegacyPriceClient]]:
    """The answer, its thread pool (which an app keeps for its next requests) shut down afterwards."""
    try:
        yield app, client
    finally:
        pool = getattr(app.state, "pool", None)
        if pool is not None:
            pool.shutdown()


@pytest.mark.parametrize("variant", ["to_thread", "def", "asyncio.to_thread", "two-threads"])
def test_1_1_offloaded_endpoint_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Any pool takes the call off the loop: asyncio's default executor (6 threads on 2 CPUs, 5 on
    one) and a pool of two threads pass as AnyIO's 40 tokens do, on any machine."""
    with shut_down(*price_app(variant)) as answer:
        check_offload(*answer)
    out = capsys.readouterr().out
    assert out.startswith("Exercise 1.1 · Fix a blocking endpoint\n")
    assert f"  ✅ passed: GET /price/ACME answers {SHAPE} (and /price/acme, its own symbol)\n" in out
    assert "  ✅ passed: no call of `client.get_price` ran on the event loop's thread\n" in out
    assert "  ✅ passed: the event loop stays free while 20 concurrent requests run\n" in out
    assert out.endswith("Exercise 1.1: passed ✅ (5 of 5 checks)\n")


def test_1_1_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app("placeholder"))
    assert "⬜ not started: Exercise 1.1's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 1.1: not started")


def test_1_1_blocking_call_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app("blocking"))
    assert "❌ not yet: no call of `client.get_price` ran on the event loop's thread" in out
    assert "called straight from your `async def` endpoint" in out
    assert "❌ not yet: the event loop stays free while 20 concurrent requests run" in out
    assert "the calls above blocked it" in out
    assert "at most 1 at once: the calls ran one after another" in out
    assert out.endswith("Exercise 1.1: not yet — 2 of 5 checks pass")


def test_1_1_awaited_async_helper_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app("async-helper"))
    assert "called from an `async def` helper that your endpoint awaited" in out


@pytest.mark.parametrize("variant", ["create_task", "gather"])
def test_1_1_task_on_the_loop_is_rejected(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app(variant))
    assert "called from a task of its own" in out
    assert "a task is another coroutine on the same loop thread" in out


def test_1_1_forgotten_await_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app("no-await"))
    assert "a coroutine object (run_sync) in place of the price: it was never awaited" in out
    assert "your code raised" not in out
    assert out.endswith("Exercise 1.1: not yet — 1 of 2 checks pass")


def test_1_1_wrong_shape_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app("bare-price"))
    assert "expected: the JSON body {'symbol': 'ACME', 'price': 127.8}\n       seen:     127.8\n" in out
    assert "✅ passed: no call of `client.get_price` ran on the event loop's thread" in out


@pytest.mark.parametrize("variant", ["one-thread", "lock"])
def test_1_1_serialised_threads_are_rejected(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app(variant))
    assert "✅ passed: no call of `client.get_price` ran on the event loop's thread" in out
    assert "✅ passed: the event loop stays free while 20 concurrent requests run" in out
    assert "❌ not yet: the 20 requests' calls overlap (more than one in flight at once)" in out
    assert "at most 1 at once" in out and "Something serialises the calls" in out


@pytest.mark.parametrize("variant", ["result", "join"])
def test_1_1_waiting_on_the_loop_for_the_thread_is_rejected(
    variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The call runs in a worker thread, but the loop waits for it: the heartbeat names it."""
    with shut_down(*price_app(variant)) as answer:
        out = rejected(capsys, check_offload, *answer)
    assert "✅ passed: no call of `client.get_price` ran on the event loop's thread" in out
    assert "❌ not yet: the event loop stays free while 20 concurrent requests run" in out
    assert "though `client.get_price` ran in worker threads, your endpoint blocked the loop" in out
    assert "That follows from the steps above" in out
    assert out.endswith("Exercise 1.1: not yet — 3 of 5 checks pass")


def test_1_1_another_blocking_call_on_the_loop_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app("and-sleep"))
    assert "❌ not yet: the event loop stays free while 20 concurrent requests run" in out
    assert "or made another blocking call" in out
    assert out.endswith("Exercise 1.1: not yet — 4 of 5 checks pass")


def test_1_1_the_symbol_is_returned_as_requested(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app("upper"))
    assert "❌ not yet: GET /price/ACME answers" in out
    assert (
        "expected: the JSON body {'symbol': 'acme', 'price': 127.8} for GET /price/acme\n"
        "       seen:     {'symbol': 'ACME', 'price': 127.8}: the symbol is not the one requested\n"
    ) in out
    assert out.endswith("Exercise 1.1: not yet — 4 of 5 checks pass")


def test_1_1_an_error_in_the_endpoint_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload, *price_app("error"))
    assert "your code raised KeyError: 'ACME'" in out
    assert "Traceback" not in out


def test_1_1_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    app, client = price_app("blocking")
    first = rejected(capsys, check_offload, app, client)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_offload, app, client)
    assert "anyio.to_thread.run_sync(client.get_price, symbol)" not in first.split("20 concurrent")[0]
    assert "anyio.to_thread.run_sync(client.get_price, symbol)" in second.split("20 concurrent")[0]


# ---------------------------------------------------------------------------------------------------
# Exercise 1.2: a loop-lag probe
# ---------------------------------------------------------------------------------------------------


def _lag_probe_step(variant: str, interval: float, left: float) -> float:
    """How long ``lag_probe(variant)`` sleeps at a time, measuring the lag against that."""
    if variant == "finer":  # "finer than asked catches shorter stalls"
        return 0.01
    if variant == "fixed-step":  # 50 ms whatever it is asked, the lag measured right
        return 0.05
    if variant == "at-most-50ms":  # "longer sleeps miss short stalls"
        return min(interval, 0.05)
    if variant == "trimmed":  # right: the last sleep ends at the deadline
        return max(min(interval, left), 0.001)
    return interval


def lag_probe(variant: str) -> Any:
    """``max_loop_lag`` as a learner might write it."""

    async def max_loop_lag(duration: float, interval: float = 0.05) -> Any:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("1.2"))
        loop = asyncio.get_running_loop()
        lags: list[float] = []
        deadline = loop.time() + duration
        if variant == "calibrate":  # how late does a plain sleep wake? (blocks the loop, once)
            time.sleep(interval)
        sleeps = round(duration / interval)
        while (
            variant == "forever"
            or (variant == "count" and len(lags) < sleeps)
            or (variant == "fits" and loop.time() + interval <= deadline)
            or (variant not in ("count", "fits") and loop.time() < deadline)
        ):
            before = loop.time()
            step = _lag_probe_step(variant, interval, deadline - before)
            if variant == "time.sleep":
                time.sleep(interval)
                await asyncio.sleep(0)
            elif variant == "to_thread":  # "sleeps without blocking the loop", in a worker thread
                await asyncio.to_thread(time.sleep, interval)
            elif variant == "fixed-sleep":  # counts the sleep as lag, and sleeps 50 ms whatever it is asked
                await asyncio.sleep(0.05)
            else:
                await asyncio.sleep(step)
            lag = loop.time() - before
            if variant == "fixed-reference":  # "the interval is 0.05 s": right only at the default
                step = 0.05
            lags.append(lag if variant in ("no-subtract", "fixed-sleep") else lag - step)
            if variant == "one-sample":
                break
        if variant == "mean":
            return statistics.mean(lags)
        if variant == "sum":
            return sum(lags)
        if variant == "list":
            return lags
        if variant == "p95":
            return sorted(lags)[int(0.95 * (len(lags) - 1))] if lags else 0.0
        if variant == "ms":
            return max(lags) * 1000
        if variant == "fits":
            return max(lags, default=0.0)
        if variant == "capped":  # "a wake-up more than three intervals late is an outlier"
            return max(min(lag, 3 * interval) for lag in lags)
        if variant == "rounded":  # "sub-100 ms jitter is noise"
            return round(max(lags), 1)
        if variant == "error":
            return max(lags) / 0
        return None if variant == "none" else max(lags)

    async def never_awaits(duration: float, interval: float = 0.05) -> float:
        worst, deadline = 0.0, time.perf_counter() + duration
        while time.perf_counter() < deadline:
            before = time.perf_counter()
            time.sleep(interval)
            worst = max(worst, time.perf_counter() - before - interval)
        return worst

    def sync_probe(duration: float, interval: float = 0.05) -> float:
        return 0.0

    return {"never-awaits": never_awaits, "sync": sync_probe}.get(variant, max_loop_lag)


def test_1_2_worst_lag_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_loop_lag_probe(lag_probe("right"))
    out = capsys.readouterr().out
    assert "  ✅ passed: an idle loop shows less than 0.03 s of lag\n" in out
    assert "  ✅ passed: a loop blocked three times for 0.2 s shows a worst lag of about 0.2 s\n" in out
    assert "  ✅ passed: an idle loop whose worker threads are all busy still shows less than 0.03 s" in out
    assert "  ✅ passed: a short stall (0.04 s, with `interval=0.01`) shows too" in out
    assert out.endswith("Exercise 1.2: passed ✅ (11 of 11 checks)\n")


def test_1_2_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe("placeholder"))
    assert "⬜ not started: Exercise 1.2's cell" in out
    assert out.endswith("Exercise 1.2: not started")


@pytest.mark.parametrize(
    ("variant", "step", "message", "passing"),
    [
        (
            "mean",
            "a loop blocked three times for 0.2 s shows a worst lag of about 0.2 s",
            "far less than one stall; the stalls were averaged with the on-time wake-ups",
            8,
        ),
        (
            "sum",
            "a loop blocked three times for 0.2 s shows a worst lag of about 0.2 s",
            "more than the longest stall (0.2 s): the lags were added up",
            10,
        ),
        (
            "no-subtract",
            "an idle loop shows less than 0.03 s of lag",
            "about the interval itself (0.05 s): the sleep was counted as lag",
            8,
        ),
        (
            "ms",
            "an idle loop shows less than 0.03 s of lag",
            "a thousand times too much for an idle loop; milliseconds, not seconds?",
            4,
        ),
        (
            "one-sample",
            "it stops after `duration` (1.3 s), however late the loop wakes it",
            "it returned after 0.0",
            7,
        ),
        (
            "count",
            "it stops after `duration` (1.3 s), however late the loop wakes it",
            "it kept sleeping past `duration`, about as long as the stalls added",
            10,
        ),
        (
            "p95",
            "a loop blocked once for 0.2 s among on-time wake-ups (`interval=0.01`) shows a worst lag of "
            "about 0.2 s",
            "the single stall was dropped or cut short, though three stalls showed with 0.05 s sleeps: a "
            "percentile",
            9,
        ),
        (
            "fits",
            "a duration (0.03 s) shorter than the interval still measures: a 0.2 s stall shows",
            "it returned before `duration` had passed, so the stall went unseen",
            10,
        ),
        (
            "rounded",
            "a short stall (0.04 s, with `interval=0.01`) shows too: a worst lag of about 0.03–0.04 s",
            "s for the 0.2 s stalls: your probe rounds the lag to 1 decimal place, so a lag of tens of "
            "milliseconds reads as 0 s, or as 0.1 s, never as what it was",
            10,
        ),
        (
            "to_thread",
            "an idle loop whose worker threads are all busy still shows less than 0.03 s: the probe "
            "measures the loop, not a thread pool",
            "your probe slept in a worker thread, so it waited for a free one first: it measured the "
            "queue of the loop's thread pool, not the loop",
            9,
        ),
    ],
)
def test_1_2_wrong_measures_are_named(
    variant: str, step: str, message: str, passing: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe(variant))
    assert f"  ❌ not yet: {step}\n" in out
    assert message in out
    if variant in ("to_thread", "sum"):
        # On a busy machine these probes report an idle loop as late, each by a fault of its own seen
        # only then: worker threads that wake late (to_thread), a millisecond of lag per wake-up added
        # up over 0.5 s (sum). Each idle step that fails besides the named one is one pass fewer.
        idle_steps = ("an idle loop shows less than 0.03 s of lag", "an idle loop whose worker threads")
        passing -= sum(f"  ❌ not yet: {idle}" in out for idle in idle_steps if not step.startswith(idle))
    assert out.endswith(f"Exercise 1.2: not yet — {passing} of 11 checks pass")


@pytest.mark.parametrize(
    ("variant", "expected", "seen"),
    [
        ("finer", "max_loop_lag(0.5, 0.05) to sleep `interval` (0.05 s) each time", "sleeps of 0.01 s"),
        ("fixed-step", "max_loop_lag(0.7, 0.01) to sleep `interval` (0.01 s) each time", "sleeps of 0.05 s"),
        ("at-most-50ms", "max_loop_lag(0.5, 0.2) to sleep `interval` (0.2 s) each time", "sleeps of 0.05 s"),
        (
            "to_thread",
            "max_loop_lag(0.5, 0.05) to `await asyncio.sleep(interval)`",
            "no `asyncio.sleep` on that loop",
        ),
    ],
)
def test_1_2_a_probe_that_does_not_sleep_interval_on_the_loop_is_rejected(
    variant: str, expected: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe(variant))
    assert (
        "  ❌ not yet: it sleeps `interval` each time, with `asyncio.sleep` on the loop it measures\n" in out
    )
    assert f"expected: {expected}" in out
    assert re.search(rf"seen: +(\d+ )?{re.escape(seen)}", out), out


def test_1_2_a_lag_capped_at_a_few_intervals_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe("capped"))
    assert "  ❌ not yet: a loop blocked once for 0.2 s among on-time wake-ups (`interval=0.01`)" in out
    assert "the single stall was dropped or cut short" in out
    assert out.endswith("Exercise 1.2: not yet — 10 of 11 checks pass")


def test_1_2_a_last_sleep_cut_to_the_deadline_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_loop_lag_probe(lag_probe("trimmed"))
    assert capsys.readouterr().out.endswith("Exercise 1.2: passed ✅ (11 of 11 checks)\n")


def test_1_2_sleeps_are_seen_only_on_a_loop_whose_call_later_can_be_wrapped() -> None:
    """The check notes the probe's sleeps by wrapping the loop's ``call_later``; where it cannot (a loop
    whose attributes are read-only), the sleeps are not judged, rather than every probe rejected."""

    class Sealed:
        __slots__ = ()

        def call_later(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - never called
            raise AssertionError

    run = ch01._ProbeRun()
    with ch01._sleeps_watched(Sealed(), run, besides=None):  # type: ignore[arg-type]
        pass
    assert run.sleeps is None


@pytest.mark.parametrize("variant", ["time.sleep", "never-awaits", "calibrate"])
def test_1_2_a_probe_that_blocks_the_loop_is_rejected(
    variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe(variant))
    assert "❌ not yet: it awaits while it sleeps: other tasks on the loop keep running" in out
    assert "the probe blocks the loop it measures" in out
    assert out.endswith("Exercise 1.2: not yet — 1 of 2 checks pass")


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        # as many lags as the probe woke up in 0.5 s: ten on an idle machine (eleven if a wake-up lands a
        # hair early), fewer on a busy one
        ("list", r"seen:     a list of (1[01]|[1-9]) values"),
        ("none", re.escape("seen:     None: the function returns nothing")),
        ("sync", re.escape("expected: an awaitable: `max_loop_lag` defined with `async def`")),
        ("error", re.escape("your code raised ZeroDivisionError: float division by zero")),
    ],
)
def test_1_2_not_a_number_of_seconds(variant: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe(variant))
    assert re.search(message, out), out
    assert out.endswith("Exercise 1.2: not yet — 0 of 1 checks pass")


def test_1_2_a_probe_that_never_returns_is_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe("forever"))
    assert (
        "expected: max_loop_lag(0.5) to return after about 0.5 s\n       seen:     no return within 3.5 s\n"
        in out
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 1.3: the right offload for each kind of work
# ---------------------------------------------------------------------------------------------------


KEPT: dict[str, concurrent.futures.ProcessPoolExecutor] = {}  # a pool the learner keeps between calls


def offloader(variant: str) -> Any:
    """``run_offloaded`` as a learner might write it."""

    async def run_offloaded(kind: str, func: Any, *args: Any) -> Any:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("1.3"))
        known = kind in ("blocking_io", "python_cpu", "gil_releasing")
        validated = (
            *("right", "asyncio.to_thread", "thread-join", "callback-wait"),
            *("cores", "is", "kept-pool", "pool-per-call"),
        )
        if variant in validated and not known:
            raise ValueError(f"unknown kind of work: {kind!r}")
        if variant == "right":
            if kind == "python_cpu":
                return await anyio.to_process.run_sync(func, *args)
            return await anyio.to_thread.run_sync(func, *args)
        if variant in ("pool-per-call", "kept-pool"):
            if kind != "python_cpu":
                return await anyio.to_thread.run_sync(func, *args)
            loop = asyncio.get_running_loop()
            if variant == "kept-pool":  # one pool for all calls; fork starts both workers at once
                if "pool" not in KEPT:
                    KEPT["pool"] = concurrent.futures.ProcessPoolExecutor(
                        max_workers=2, mp_context=multiprocessing.get_context("fork")
                    )
                return await loop.run_in_executor(KEPT["pool"], func, *args)
            with concurrent.futures.ProcessPoolExecutor(max_workers=1) as pool:  # a process per call
                return await loop.run_in_executor(pool, func, *args)
        if variant == "asyncio.to_thread":
            if kind == "python_cpu":
                return await anyio.to_process.run_sync(func, *args)
            return await asyncio.to_thread(func, *args)
        if variant == "callback-wait":  # awaited, but a callback it queued waits on the loop's thread
            if kind == "python_cpu":
                return await anyio.to_process.run_sync(func, *args)
            future = concurrent.futures.ThreadPoolExecutor(1).submit(func, *args)
            asyncio.get_running_loop().call_soon(future.result)
            return await asyncio.wrap_future(future)
        if variant == "thread-join":  # a thread of its own, but the loop waits for it
            if kind == "python_cpu":
                return await anyio.to_process.run_sync(func, *args)
            if kind == "gil_releasing":
                return await anyio.to_thread.run_sync(func, *args)
            box: dict[str, Any] = {}
            worker = threading.Thread(target=lambda: box.update(result=func(*args)))
            worker.start()
            worker.join()
            return box["result"]
        if variant == "cores":  # "a process cannot run in parallel on one core anyway"
            if kind == "python_cpu" and (os.cpu_count() or 1) > 1:
                return await anyio.to_process.run_sync(func, *args)
            return await anyio.to_thread.run_sync(func, *args)
        if variant == "is":  # `kind is "python_cpu"`: true only for the very same string object
            if any(kind is literal for literal in ("python_cpu",)):
                return await anyio.to_process.run_sync(func, *args)
            return await anyio.to_thread.run_sync(func, *args)
        if variant in ("unknown-inline", "unknown-key"):
            if kind == "python_cpu":
                return await anyio.to_process.run_sync(func, *args)
            if known:
                return await anyio.to_thread.run_sync(func, *args)
            if variant == "unknown-key":
                raise KeyError(kind)
            return func(*args)
        if variant == "no-await":
            return anyio.to_thread.run_sync(func, *args)
        if variant == "all-threads":
            return await anyio.to_thread.run_sync(func, *args)
        if variant == "all-processes":
            return await anyio.to_process.run_sync(func, *args)
        if variant == "inline":
            return func(*args)
        if variant == "none":
            await anyio.to_thread.run_sync(func, *args)
            return None
        strategies = {"io": anyio.to_thread.run_sync, "cpu": anyio.to_process.run_sync}
        return await strategies[kind](func, *args)  # variant "error": the kinds misspelt

    def not_async(kind: str, func: Any, *args: Any) -> Any:
        return func(*args)

    return not_async if variant == "not-async" else run_offloaded


PYTHON_CPU_STEP = (
    '"python_cpu": pure-Python CPU work (`count_primes`) runs in another process on any machine, '
    "the loop free meanwhile"
)


@pytest.mark.parametrize("variant", ["right", "asyncio.to_thread", "kept-pool"])
def test_1_3_threads_and_a_process_pass(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    """AnyIO's worker processes and a pool kept between calls (fork: both workers started at the first
    call, so the second call may run in the other one) pass."""
    try:
        check_offload_choice(offloader(variant))
    finally:
        if "pool" in KEPT:
            KEPT.pop("pool").shutdown()
    out = capsys.readouterr().out
    assert f"  ✅ passed: {PYTHON_CPU_STEP}\n" in out
    assert '  ✅ passed: an unknown kind ("python-cpu") raises ValueError\n' in out
    assert out.endswith("Exercise 1.3: passed ✅ (4 of 4 checks)\n")


@pytest.mark.parametrize(
    ("variant", "passes"), [("asyncio.to_thread", True), ("thread-join", False), ("callback-wait", False)]
)
def test_1_3_a_busy_machine_does_not_pass_for_a_wait_on_the_loop(
    variant: str, passes: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A heartbeat held up for the whole of every call, as on a machine busy with other work: the
    loop's thread was in its selector, so the awaiting answer passes; one that joins the thread on the
    loop, and one whose queued callback (library code: `future.result`) waits there, are still named."""
    monkeypatch.setattr(ch01._Beat, "held_up", lambda self, start: 10.0)
    if passes:
        check_offload_choice(offloader(variant))
        assert capsys.readouterr().out.endswith("Exercise 1.3: passed ✅ (4 of 4 checks)\n")
    else:
        out = rejected(capsys, check_offload_choice, offloader(variant))
        assert "but the loop was held up 10.00 s" in out and "instead of awaiting it" in out


def test_1_3_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload_choice, offloader("placeholder"))
    assert "⬜ not started: Exercise 1.3's cell" in out
    assert out.endswith("Exercise 1.3: not started")


def test_1_3_everything_in_a_thread_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload_choice, offloader("all-threads"))
    assert "it ran in a worker thread of this process: pure Python holds the GIL" in out
    assert "it ran the work in a worker thread of this process: a typo in a kind goes unnoticed" in out
    assert out.endswith("Exercise 1.3: not yet — 2 of 4 checks pass")


def test_1_3_everything_in_a_process_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload_choice, offloader("all-processes"))
    assert "it ran in another process: a process start (most of a second the first time) and pickling" in out
    assert "its 8 MB buffer was pickled through a pipe to the worker, for no gain" in out
    assert out.endswith("Exercise 1.3: not yet — 1 of 4 checks pass")


def test_1_3_everything_inline_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload_choice, offloader("inline"))
    assert out.count("it ran on the event loop's thread, inline") == 3
    assert out.endswith("Exercise 1.3: not yet — 0 of 4 checks pass")


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ("none", "expected: run_offloaded to return what `func(*args)` returned\n       seen:     None"),
        ("not-async", "'not_async' is not a coroutine function"),
        ("error", "your code raised KeyError: 'blocking_io'"),
        ("no-await", "seen:     a coroutine object (run_sync): the offload was never awaited"),
    ],
)
def test_1_3_other_mistakes_are_named(variant: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_offload_choice, offloader(variant))
    assert message in out
    assert not re.search(r"passed ✅", out)


@pytest.mark.parametrize(
    ("variant", "step", "message"),
    [
        (
            "thread-join",
            '"blocking_io": blocking I/O (`LegacyPriceClient.get_price`) runs in a worker thread of this '
            "process on any machine, the loop free meanwhile",
            "but the loop was held up",
        ),
        (
            "cores",
            PYTHON_CPU_STEP,
            "as if on a machine with 1 CPU (what `os.cpu_count()` and `os.sched_getaffinity` told your "
            "code) it ran in a worker thread of this process; with 64 it ran in another process",
        ),
        ("is", PYTHON_CPU_STEP, "the kind was compared with `is`"),
        (
            "pool-per-call",
            PYTHON_CPU_STEP,
            "each call started a process of its own: the first ran in process ",
        ),
    ],
)
def test_1_3_a_choice_that_fails_somewhere_is_named(
    variant: str, step: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Waiting on the loop for the thread, a choice by the CPU count, `kind is "…"`, a new process for
    every call (a `ProcessPoolExecutor` opened in a `with` block per call): each rejected on any
    machine, and named."""
    out = rejected(capsys, check_offload_choice, offloader(variant))
    assert f"  ❌ not yet: {step}\n" in out
    assert message in out
    assert out.endswith("Exercise 1.3: not yet — 3 of 4 checks pass")


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (
            "unknown-inline",
            "seen:     it ran the work on the event loop's thread: a typo in a kind goes unnoticed, "
            "and blocks the loop",
        ),
        ("unknown-key", "seen:     KeyError: 'python-cpu'"),
    ],
)
def test_1_3_an_unknown_kind_must_raise_value_error(
    variant: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_offload_choice, offloader(variant))
    assert '  ❌ not yet: an unknown kind ("python-cpu") raises ValueError\n' in out
    assert message in out
    assert out.endswith("Exercise 1.3: not yet — 3 of 4 checks pass")


# ---------------------------------------------------------------------------------------------------
# Exercise 1.4: find the blocking call in an SDK you did not write
# ---------------------------------------------------------------------------------------------------

SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions" / "01_async_correctness_exercises.ipynb"


def _given_cells() -> dict[str, Any]:
    """The notebook's setup and given cells, run: ``ShippingClient``, ``make_shop_app``, ``StallCounter``."""
    cells = {cell.get("id"): cell.source for cell in nbformat.read(SOLUTIONS, as_version=4).cells}
    namespace: dict[str, Any] = {}
    for cell_id in ("setup", "ex4-given"):
        exec(compile(cells[cell_id], f"<{cell_id}>", "exec"), namespace)
    return namespace


GIVEN = _given_cells()
ShippingClient = GIVEN["ShippingClient"]
StallCounter = GIVEN["StallCounter"]
make_shop_app = GIVEN["make_shop_app"]
shipping = GIVEN["shipping"]  # the notebook's own client, for trying things
POOLS: list[concurrent.futures.ThreadPoolExecutor] = []  # pools an answer's app keeps (shut down after)
PLACEHOLDER_1_4 = placeholder_message("1.4")


def finder(variant: str) -> Any:
    """``find_blocking_method`` as a learner might write it."""

    def calls(client: Any) -> dict[str, Any]:
        return {
            "quote": lambda: client.quote("LS1 4AP", "EH1 1YZ", 2.5),
            "track": lambda: client.track("PX-1001"),
            "label": lambda: client.label("PX-1001"),
        }

    async def max_loop_lag(duration: float, interval: float = 0.01) -> float:  # Exercise 1.2's probe
        loop = asyncio.get_running_loop()
        worst, deadline = 0.0, loop.time() + duration
        while loop.time() < deadline:
            asked = loop.time() + interval
            await asyncio.sleep(interval)
            worst = max(worst, loop.time() - asked)
        return worst

    async def find_blocking_method(client: Any) -> str:
        if variant == "placeholder":
            raise NotImplementedError(PLACEHOLDER_1_4)
        if variant == "hard-coded":  # "I read the SDK: it's quote"
            return "quote"
        if variant == "path":
            return "/quote"
        if variant == "private":  # reads which method reaches the SDK's synchronous HTTP client
            fetched = []
            fetch = client._auth.rates_key
            client._auth.rates_key = lambda: fetched.append(1) or fetch()
            await client.quote("LS1 4AP", "EH1 1YZ", 2.5)
            return "quote" if fetched else "track"
        if variant == "sleep-spy":  # which method calls time.sleep? (the SDK's blocking call, here)
            real_sleep = time.sleep

            def spy(slept: list[float], seconds: float) -> None:
                slept.append(seconds)
                real_sleep(seconds)

            for name, call in calls(client).items():
                slept: list[float] = []
                time.sleep = functools.partial(spy, slept)  # type: ignore[misc]
                try:
                    await call()
                finally:
                    time.sleep = real_sleep  # type: ignore[misc]
                if slept:
                    return name
            raise LookupError("no method of the SDK calls time.sleep")
        measured: dict[str, float] = {}
        for name, call in calls(client).items():
            if variant in ("right", "min"):
                async with StallCounter() as counter:
                    for _ in range(3):
                        await call()
                measured[name] = counter.count
            elif variant == "gather":  # two at a time: their blocks run back to back, one stall a pair
                async with StallCounter() as counter:
                    for _ in range(3):
                        await asyncio.gather(call(), call())
                measured[name] = counter.count
            elif variant == "max_loop_lag":
                lag, *_ = await asyncio.gather(max_loop_lag(0.25), *(call() for _ in range(3)))
                measured[name] = lag
            elif variant == "concurrent-time":  # "calls that block cannot overlap": five at once, timed
                start = time.perf_counter()
                await asyncio.gather(*(call() for _ in range(5)))
                measured[name] = time.perf_counter() - start
            elif variant == "slowdown":  # five at once against one alone: which calls overlap least?
                start = time.perf_counter()
                await call()
                alone = time.perf_counter() - start
                start = time.perf_counter()
                await asyncio.gather(*(call() for _ in range(5)))
                measured[name] = (time.perf_counter() - start) / alone
            elif variant == "slowest":  # the time of one call: awaiting counts as much as blocking
                start = time.perf_counter()
                await call()
                measured[name] = time.perf_counter() - start
            elif variant == "before":  # the heartbeat measured first, the calls made after it
                async with StallCounter() as counter:
                    pass
                for _ in range(3):
                    await call()
                measured[name] = counter.count
        pick = min if variant == "min" else max
        return pick(measured, key=measured.__getitem__)

    def not_async(client: Any) -> str:
        return "quote"

    return not_async if variant == "sync" else find_blocking_method


def fixed_app(variant: str) -> Any:
    """``make_app`` as a learner might write it."""

    def make_app(client: Any) -> FastAPI:
        if variant == "placeholder":
            raise NotImplementedError(PLACEHOLDER_1_4)
        if variant == "unchanged":
            return make_shop_app(client)
        sdk = shipping if variant == "global" else client
        app = FastAPI()
        one_at_a_time = anyio.CapacityLimiter(1)
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)
        POOLS.append(pool)

        async def build_in_loop(*args: Any) -> Any:  # an async def helper: runs on the loop all the same
            return sdk._quote_request(*args)

        if variant in ("def-from-thread", "from-thread-quote", "all-def"):

            @app.get("/quote")
            def quote_def(origin: str, destination: str, weight_kg: float):
                if variant == "from-thread-quote":  # the whole coroutine, back on the loop
                    return anyio.from_thread.run(sdk.quote, origin, destination, weight_kg)
                request = sdk._quote_request(origin, destination, weight_kg)  # in FastAPI's worker thread
                return anyio.from_thread.run(sdk._send, request)  # the send, on the loop

        else:

            @app.get("/quote")
            async def quote(origin: str, destination: str, weight_kg: float):
                args = (origin, destination, weight_kg)
                if variant in ("wrong-endpoint",):
                    return await sdk.quote(*args)
                if variant == "asyncio.run":  # the whole method in a thread, on a new loop per call
                    return await anyio.to_thread.run_sync(asyncio.run, sdk.quote(*args))
                if variant == "asyncio.to_thread":
                    request = await asyncio.to_thread(sdk._quote_request, *args)
                elif variant == "result":  # built in a thread, but the loop waits for it
                    request = pool.submit(sdk._quote_request, *args).result()
                elif variant == "one-token":
                    request = await anyio.to_thread.run_sync(sdk._quote_request, *args, limiter=one_at_a_time)
                elif variant == "async-helper":
                    request = await build_in_loop(*args)
                elif variant == "no-await":
                    request = anyio.to_thread.run_sync(sdk._quote_request, *args)
                else:
                    request = await anyio.to_thread.run_sync(sdk._quote_request, *args)
                return await sdk._send(request)

        offload_all = variant in ("wrong-endpoint", "all-three")
        if variant == "all-def":

            @app.get("/track/{parcel_id}")
            def track_def(parcel_id: str):
                return anyio.from_thread.run(sdk.track, parcel_id)

            @app.get("/label/{parcel_id}")
            def label_def(parcel_id: str, size: str = "4x6"):
                return anyio.from_thread.run(sdk.label, parcel_id, size)

            return app

        @app.get("/track/{parcel_id}")
        async def track(parcel_id: str):
            if variant == "all-three":  # "to be safe"
                request = await anyio.to_thread.run_sync(sdk._request, "GET", f"/parcels/{parcel_id}/events")
                return (await sdk._send(request))[-1]
            return await sdk.track(parcel_id)

        @app.get("/label/{parcel_id}")
        async def label(parcel_id: str, size: str = "4x6"):
            if offload_all:  # the wrong endpoint fixed: label is signed too, so it looked guilty
                build = functools.partial(sdk._request, signed=True)
                request = await anyio.to_thread.run_sync(
                    build, "POST", f"/parcels/{parcel_id}/label", {"size": size}
                )
                return await sdk._send(request)
            return await sdk.label(parcel_id, size)

        return app

    return make_app


@pytest.fixture
def pools_shut_down() -> Iterator[None]:
    try:
        yield
    finally:
        while POOLS:
            POOLS.pop().shutdown()


class _QuietAuth:
    """The SDK edited: the rates key comes without a blocking call."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key

    def rates_key(self) -> bytes:
        return b"rates-key"


class EditedShippingClient(ShippingClient):  # type: ignore[misc, valid-type]
    def __init__(self, api_key: str = "pk_test_51Hx") -> None:
        super().__init__(api_key)
        self._auth = _QuietAuth(api_key)


ALL_PASS_1_4 = "Exercise 1.4: passed ✅ (10 of 10 checks)\n"
FOUND_STEP = "`await find_blocking_method(ShippingClient())` names the method that blocks the event loop"
VERSIONS_STEP = "it names the blocking method in two other versions of the SDK"
OFF_LOOP_STEP = "the SDK's blocking call runs in a worker thread, never on the server loop's thread"
FREE_STEP = "the server's loop stays free while 10 concurrent requests run at each endpoint"
OVERLAP_STEP = "the blocking calls of 10 concurrent requests overlap (more than one in flight at once)"
OTHERS_STEP = (
    "the two endpoints whose calls never block still run on the event loop (not offloaded for nothing)"
)
SESSION_STEP = "every request goes out from the server's loop, through the SDK's session for it"


@pytest.mark.usefixtures("pools_shut_down")
@pytest.mark.parametrize(
    ("find", "fix"),
    [
        ("right", "right"),
        ("gather", "def-from-thread"),
        ("max_loop_lag", "asyncio.to_thread"),
    ],
)
def test_1_4_measured_finder_and_one_offloaded_endpoint_pass(
    find: str, fix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Stalls counted around calls one after another, or around pairs of calls at once (one stall a
    pair), or the worst lag of 1.2's probe; the request built in a thread and sent on the loop, from
    `async def` or from a `def` endpoint that hands the send back to the loop (`anyio.from_thread.run`)."""
    check_blocking_sdk(finder(find), fixed_app(fix), ShippingClient)
    out = capsys.readouterr().out
    assert out.startswith("Exercise 1.4 · Find the blocking call in an SDK you did not write\n")
    assert f"  ✅ passed: {FOUND_STEP}\n" in out
    assert f"  ✅ passed: {OFF_LOOP_STEP}\n" in out
    assert f"  ✅ passed: {OTHERS_STEP}\n" in out
    assert out.endswith(ALL_PASS_1_4)


@pytest.mark.parametrize(("find", "fix"), [("placeholder", "placeholder"), ("right", "placeholder")])
def test_1_4_placeholder_is_not_started(find: str, fix: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_blocking_sdk, finder(find), fixed_app(fix), ShippingClient)
    assert "⬜ not started: Exercise 1.4's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 1.4: not started")


@pytest.mark.parametrize(
    ("find", "step", "message", "passing"),
    [
        (  # read from the source: right for the given SDK, wrong for a version
            "hard-coded",
            VERSIONS_STEP,
            "seen:     'quote' again, as for the given SDK, though here 'quote' never holds the loop: the "
            "name does not come from a measurement",
            9,
        ),
        (  # the heartbeat measured before the calls: no stall anywhere, the first name wins
            "before",
            VERSIONS_STEP,
            "or your measurements all came out equal, and the first name won",
            9,
        ),
        (  # the time of one call: the slowest awaits all its time
            "slowest",
            FOUND_STEP,
            "seen:     'track': the slowest call to return, but it spends that time awaiting",
            8,
        ),
        (  # the fewest stalls: here the first method whose calls never block
            "min",
            FOUND_STEP,
            "expected: 'quote', the method that blocks the event loop in the given SDK",
            8,
        ),
        (
            "path",
            FOUND_STEP,
            "seen:     '/quote': an endpoint's path; the function names the client's method",
            8,
        ),
        ("sync", FOUND_STEP, "expected: `find_blocking_method` defined with `async def`", 8),
        (  # reaches into the given SDK's insides
            "private",
            VERSIONS_STEP,
            "your function reached into the given SDK's insides, which this version does not have",
            9,
        ),
        (  # a spy on time.sleep: right for the given SDK, blind to a version that blocks otherwise
            "sleep-spy",
            VERSIONS_STEP,
            "seen:     LookupError raised: your function replaced `time.sleep` to see which method calls it, "
            "and here "
            "'track' holds the loop with a blocking wait (`threading.Event().wait`, as a socket read "
            "waits), never calling `time.sleep`",
            9,
        ),
        (  # five calls at once timed against one alone: the serialised method, not the blocking one
            "slowdown",
            VERSIONS_STEP,
            "seen:     'quote': this version lets its calls through one at a time (as an SDK's lock or its "
            "one connection does), so calls made together wait for one another; but each waits by "
            "awaiting, the loop free meanwhile",
            9,
        ),
        (  # five calls at once, timed: the same, in total
            "concurrent-time",
            VERSIONS_STEP,
            "in a version of the SDK in which 'label' blocks\n       seen:     'quote': this version lets "
            "its calls through one at a time",
            9,
        ),
    ],
)
def test_1_4_a_finder_that_does_not_measure_the_loop_is_rejected(
    find: str, step: str, message: str, passing: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_blocking_sdk, finder(find), fixed_app("right"), ShippingClient)
    assert f"  ❌ not yet: {step}" in out
    assert message in out
    assert f"  ✅ passed: {OFF_LOOP_STEP}\n" in out
    assert out.endswith(f"Exercise 1.4: not yet — {passing} of 10 checks pass")


def test_1_4_the_timed_finder_is_told_apart_in_a_version(capsys: pytest.CaptureFixture[str]) -> None:
    """Timing one call names the slowest in the given SDK, and in the versions too (never the blocker)."""
    out = rejected(capsys, check_blocking_sdk, finder("slowest"), fixed_app("right"), ShippingClient)
    assert (
        "expected: 'track', the method that blocks the event loop in a version of the SDK in which "
        "'track' blocks\n       seen:     'label': the slowest call to return"
    ) in out


@pytest.mark.usefixtures("pools_shut_down")
@pytest.mark.parametrize(
    ("fix", "failed", "message", "passing"),
    [
        (  # make_shop_app itself
            "unchanged",
            [OFF_LOOP_STEP, FREE_STEP, OVERLAP_STEP],
            "calls ran on the server loop's thread: /quote still builds its request, and so fetches the "
            "key, on the loop's thread",
            7,
        ),
        (  # /label is signed too, so it looked guilty: the wrong endpoint offloaded
            "wrong-endpoint",
            [OFF_LOOP_STEP, FREE_STEP, OVERLAP_STEP, OTHERS_STEP],
            "while /label/{parcel_id}, whose calls never block, went to worker threads",
            6,
        ),
        (  # all three endpoints offloaded "to be safe"
            "all-three",
            [OTHERS_STEP],
            "requests were built in a worker thread: offloaded, though `client.track` never blocks",
            9,
        ),
        (  # plain def endpoints everywhere
            "all-def",
            [OTHERS_STEP],
            "a plain `def` endpoint: FastAPI runs it in a worker thread, a thread per request",
            9,
        ),
        (  # the whole coroutine in a worker thread: asyncio.run, a new loop per call
            "asyncio.run",
            [SESSION_STEP],
            "each with a session of its own: `asyncio.run` in a worker thread starts an event loop per call",
            9,
        ),
        (  # a def endpoint that hands the whole quote back to the loop
            "from-thread-quote",
            [OFF_LOOP_STEP, FREE_STEP, OVERLAP_STEP],
            "your `def` endpoint handed `client.quote` back to the loop (`anyio.from_thread.run`)",
            7,
        ),
        (  # built in a worker thread, but the loop waits for it (so one request at a time)
            "result",
            [FREE_STEP, OVERLAP_STEP],
            "though the SDK's blocking call ran in worker threads, the endpoint waited for it on the loop's "
            "thread",
            8,
        ),
        (  # a one-token limiter: off the loop, one at a time
            "one-token",
            [OVERLAP_STEP],
            "at most 1 at once: the calls ran one after another",
            9,
        ),
        (  # an async def helper around the synchronous part
            "async-helper",
            [OFF_LOOP_STEP, FREE_STEP, OVERLAP_STEP],
            "/quote still builds its request, and so fetches the key, on the loop's thread",
            7,
        ),
    ],
)
def test_1_4_a_fix_in_the_wrong_place_is_rejected(
    fix: str, failed: list[str], message: str, passing: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_blocking_sdk, finder("right"), fixed_app(fix), ShippingClient)
    for step in failed:
        assert f"  ❌ not yet: {step}" in out
    assert message in out
    assert out.endswith(f"Exercise 1.4: not yet — {passing} of 10 checks pass")


@pytest.mark.usefixtures("pools_shut_down")
@pytest.mark.parametrize(
    ("fix", "message"),
    [
        (
            "no-await",
            "seen:     status 500: a coroutine object (run_sync) where a value belonged: it was never "
            "awaited",
        ),
        (
            "global",
            "the right answer, but no request went out through that client: the app used another "
            "ShippingClient (the notebook's `shipping`?)",
        ),
    ],
)
def test_1_4_an_app_that_does_not_answer_through_the_client_stops_the_check(
    fix: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_blocking_sdk, finder("right"), fixed_app(fix), ShippingClient)
    assert (
        "  ❌ not yet: each endpoint answers what the SDK answers, through the `client` passed to `make_app`"
        in out
    )
    assert message in out
    assert out.endswith("Exercise 1.4: not yet — 4 of 5 checks pass")


def test_1_4_an_edited_sdk_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_blocking_sdk, finder("right"), fixed_app("unchanged"), EditedShippingClient)
    assert "  ❌ not yet: the SDK is the exercise's `ShippingClient`, unchanged" in out
    assert "no method of this ShippingClient blocks the event loop any more: the SDK was changed" in out
    assert out.endswith("Exercise 1.4: not yet — 0 of 1 checks pass")


def test_1_4_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    for _ in range(3):
        forget_answers()
        out = rejected(capsys, check_blocking_sdk, finder("right"), fixed_app("unchanged"), ShippingClient)
    assert "client._quote_request, origin, destination, weight_kg" in out


@pytest.mark.parametrize(
    ("variant", "late"), [("right", True), ("no-subtract", False), ("fixed-sleep", False)]
)
def test_1_2_an_idle_run_as_late_as_a_counted_sleep_is_asked_again_with_longer_sleeps(
    variant: str, late: bool
) -> None:
    """A busy machine once kept the idle loop 46 ms late, beside the heartbeat: as late as a probe
    that counts its 50 ms sleeps reads. Sleeps of 0.2 s tell them apart (asked on this idle loop): such
    a probe reads 0.2 s or more, or, if it sleeps 50 ms whatever it is asked, waits too often."""
    busy_run = ch01._ProbeRun(value=0.046, worst_beat=0.045)  # what the heartbeat saw too
    verdict, note = ch01._late_by_the_machine(lag_probe(variant), busy_run)
    assert verdict is late, note
    assert "asked again with `interval=0.2`" in note


def test_1_2_an_idle_run_the_heartbeat_saw_on_time_has_no_excuse() -> None:
    quiet_run = ch01._ProbeRun(value=0.046, worst_beat=0.002)
    assert ch01._late_by_the_machine(lag_probe("right"), quiet_run) == (False, "")
    slightly_late = ch01._ProbeRun(value=0.035, worst_beat=0.03)  # under 0.8 of the interval: no new run
    assert ch01._late_by_the_machine(lag_probe("no-subtract"), slightly_late) == (True, "")


@pytest.mark.parametrize(
    "run_loop", [asyncio.run, pytest.importorskip("uvloop").run], ids=["asyncio", "uvloop"]
)
def test_1_2_the_probes_sleeps_are_seen_on_asyncio_and_uvloop_loops(run_loop: Any) -> None:
    async def main() -> list[float] | None:
        heartbeat = asyncio.create_task(asyncio.sleep(0.05))
        run = ch01._ProbeRun()
        with ch01._sleeps_watched(asyncio.get_running_loop(), run, besides=heartbeat):
            for _ in range(3):
                await asyncio.sleep(0.01)
        await heartbeat  # its sleep is not the probe's
        return run.sleeps

    assert run_loop(main()) == [0.01, 0.01, 0.01]


def test_1_2_a_lag_measured_against_a_fixed_time_shows_with_longer_sleeps(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe("fixed-reference"))
    assert "  ❌ not yet: with `interval=0.2` too, an idle loop shows less than 0.03 s of lag\n" in out
    assert "the lag depends on the interval, so it is measured against another time than the one asked" in out


@pytest.mark.parametrize(("sleeps", "fit"), [(26, False), (24, False), (18, True), (12, True)])
def test_1_2_sleeps_that_outlast_duration_beside_the_stalls_are_a_count(sleeps: int, fit: bool) -> None:
    """1.3 s with three 0.2 s stalls: a probe watching the clock sleeps 0.05 s at most 18 times (each
    stall makes one wake-up at least 0.15 s late), on any machine; a count sleeps 26 times. At most
    1.1 s of sleeps pass."""
    run = ch01._ProbeRun(value=0.2, sleeps=[0.05] * sleeps)
    if fit:
        ch01._expect_sleeps_fit(run)
    else:
        with pytest.raises(ch01.Mismatch, match=f"{sleeps} sleeps, .* it counted its sleeps"):
            ch01._expect_sleeps_fit(run)


def test_1_2_a_lag_above_the_range_is_accepted_only_as_late_as_the_heartbeat() -> None:
    assert ch01._within(ch01._ProbeRun(value=0.157, worst_beat=0.15), 0.02, 0.15)  # a busy machine
    assert not ch01._within(ch01._ProbeRun(value=0.157, worst_beat=0.04), 0.02, 0.15)  # the probe
    assert not ch01._within(ch01._ProbeRun(value=0.01, worst_beat=0.15), 0.02, 0.15)  # below: never


def test_1_2_a_sampling_task_timed_by_one_sleep_of_duration_passes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def max_loop_lag(duration: float, interval: float = 0.05) -> float:
        loop = asyncio.get_running_loop()
        worst, stop = 0.0, False

        async def sample() -> None:
            nonlocal worst
            while True:
                asked = loop.time() + interval
                await asyncio.sleep(interval)
                worst = max(worst, loop.time() - asked)
                if stop:
                    return

        sampler = asyncio.create_task(sample())
        await asyncio.sleep(duration)  # the whole run's timer, beside the samples
        stop = True
        await sampler
        return worst

    check_loop_lag_probe(max_loop_lag)
    assert capsys.readouterr().out.endswith("Exercise 1.2: passed ✅ (11 of 11 checks)\n")


def test_1_2_sleeps_are_not_judged_where_asyncio_sleep_was_never_seen() -> None:
    """A Python whose ``asyncio.sleep`` set its timer another way would show no sleep at all, the
    heartbeat's included: the sleeps are then not judged, rather than every probe rejected."""

    async def main() -> list[float] | None:
        run = ch01._ProbeRun()
        loop = asyncio.get_running_loop()
        with ch01._sleeps_watched(loop, run, besides=None):  # type: ignore[arg-type]
            waiter = loop.create_future()
            loop.call_later(0.01, waiter.set_result, None)  # a wait, not through asyncio.sleep
            await waiter
        return run.sleeps

    assert asyncio.run(main()) is None
