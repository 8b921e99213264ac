"""support.checks.ch01: chapter 1's checks pass right answers and name each plausible wrong one.

Every answer here is written the way a learner would write it in the exercise cell.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import re
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
import pytest
from fastapi import FastAPI

from support.checks import forget_answers, placeholder_message
from support.checks.ch01 import check_loop_lag_probe, check_offload, check_offload_choice
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
            if variant == "time.sleep":
                time.sleep(interval)
                await asyncio.sleep(0)
            elif variant == "to_thread":  # "sleeps without blocking the loop", in a worker thread
                await asyncio.to_thread(time.sleep, interval)
            else:
                await asyncio.sleep(interval)
            lag = loop.time() - before
            lags.append(lag if variant == "no-subtract" else lag - interval)
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
    assert out.endswith("Exercise 1.2: passed ✅ (9 of 9 checks)\n")


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
            6,
        ),
        (
            "sum",
            "a loop blocked three times for 0.2 s shows a worst lag of about 0.2 s",
            "more than the longest stall (0.2 s): the lags were added up",
            8,
        ),
        (
            "no-subtract",
            "an idle loop shows less than 0.03 s of lag",
            "about the interval itself (0.05 s): the sleep was counted as lag",
            7,
        ),
        (
            "ms",
            "an idle loop shows less than 0.03 s of lag",
            "a thousand times too much for an idle loop; milliseconds, not seconds?",
            3,
        ),
        (
            "one-sample",
            "it stops after `duration` (1.3 s), however late the loop wakes it",
            "it returned after 0.0",
            5,
        ),
        (
            "count",
            "it stops after `duration` (1.3 s), however late the loop wakes it",
            "it kept sleeping past `duration`, about as long as the stalls added",
            8,
        ),
        (
            "p95",
            "a loop blocked once for 0.2 s among on-time wake-ups shows a worst lag of about 0.2 s",
            "the single stall was dropped, though three stalls showed: a percentile",
            7,
        ),
        (
            "fits",
            "a duration (0.03 s) shorter than the interval still measures: a 0.2 s stall shows",
            "it returned before `duration` had passed, so the stall went unseen",
            8,
        ),
        (
            "rounded",
            "a short stall (0.04 s, with `interval=0.01`) shows too: a worst lag of about 0.03–0.04 s",
            "seen:     0.000 s here, and exactly 0.2 s for the 0.2 s stalls: your probe rounds the lag "
            "to 1 decimal place, so a stall of tens of milliseconds reads as none",
            8,
        ),
        (
            "to_thread",
            "an idle loop whose worker threads are all busy still shows less than 0.03 s: the probe "
            "measures the loop, not a thread pool",
            "your probe slept in a worker thread, so it waited for a free one first: it measured the "
            "queue of the loop's thread pool, not the loop",
            8,
        ),
    ],
)
def test_1_2_wrong_measures_are_named(
    variant: str, step: str, message: str, passing: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe(variant))
    assert f"  ❌ not yet: {step}\n" in out
    assert message in out
    assert out.endswith(f"Exercise 1.2: not yet — {passing} of 9 checks pass")


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
        ("list", "seen:     a list of 10 values"),
        ("none", "seen:     None: the function returns nothing"),
        ("sync", "expected: an awaitable: `max_loop_lag` defined with `async def`"),
        ("error", "your code raised ZeroDivisionError: float division by zero"),
    ],
)
def test_1_2_not_a_number_of_seconds(variant: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_loop_lag_probe, lag_probe(variant))
    assert message in out
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
        validated = ("right", "asyncio.to_thread", "thread-join", "cores", "is", "kept-pool", "pool-per-call")
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
