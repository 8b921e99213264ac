"""Checks for chapter 1's exercises: async correctness and concurrency.

Each check asserts the mechanism, not the clock: on which thread (or in which process) the work
ran, whether calls overlapped, and whether a heartbeat task on the loop kept waking on time while the
work ran (so that waiting for a thread on the loop's thread does not pass for offloading). Where
time is the point (Exercise 1.2, the loop-lag probe), the effects are ten to a hundred times larger
than scheduler noise, judged as shares of the time rather than against the clock where they can be,
and measured again when the heartbeat shows the machine itself was busy. No verdict depends on the
number of CPUs: Exercise 1.3 shows the learner's code one CPU and many.

The learner's coroutines run on a fresh event loop in a thread of the check's own, so a check works
the same from a notebook (whose kernel already runs a loop), from pytest and from a terminal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures.thread
import contextlib
import hashlib
import inspect
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import CodeType, FrameType, TracebackType
from typing import Any

import httpx

from support.checks import Mismatch, exercise, expect
from support.checks.running import NoReturn, joins_new_threads, run_in_fresh_loop, short
from support.loadgen import load
from support.server import Server, serve
from support.workloads import LegacyPriceClient, count_primes, on_event_loop_thread, price_of, where

__all__ = ["check_loop_lag_probe", "check_offload", "check_offload_choice"]

SOLUTION = "solutions/01_async_correctness_exercises.ipynb"


# ---------------------------------------------------------------------------------------------------
# Exercise 1.1: fix a blocking endpoint
# ---------------------------------------------------------------------------------------------------

_SYMBOL = "ACME"
_PATH = "/price/{symbol}"
_OTHER = "acme"  # the same price (the client upper-cases), its own symbol in the answer
_CONCURRENT = 20
_MIN_OVERLAP = 2
_HEARTBEAT = 0.01
_HELD = 0.02  # a heartbeat this late was held up by something on the loop
_HELD_FOR = 0.15  # held up this long in all (three 50 ms calls' worth) …
_HELD_SHARE = 0.25  # … and for this share of the load's time: the loop was blocked
_BLOCKED_SHARE = 0.6  # held up for this share of the load's time: blocked, whatever the machine
_LOAD_ATTEMPTS = 3

_OFFLOAD_HINT = (
    "Offload the call: `price = await anyio.to_thread.run_sync(client.get_price, symbol)`, "
    "or make the endpoint a plain `def` so FastAPI runs it in its thread pool."
)
_ON_LOOP: dict[str, tuple[str, tuple[str, ...]]] = {
    "direct": (
        "called straight from your `async def` endpoint",
        (
            "Inside `async def`, a synchronous call runs on the event loop's thread: "
            "every other request waits until it returns.",
            _OFFLOAD_HINT,
        ),
    ),
    "async-helper": (
        "called from an `async def` helper that your endpoint awaited: "
        "wrapping a blocking call in `async def` does not make it non-blocking",
        (
            "`await helper()` runs the helper's code on the same thread, straight away; "
            "only a worker thread (or process) takes a blocking call off the loop.",
            "In the helper or the endpoint: `await anyio.to_thread.run_sync(client.get_price, symbol)`.",
        ),
    ),
    "other-task": (
        "called from a task of its own (`asyncio.create_task`, `gather`, `call_soon` …): "
        "a task is another coroutine on the same loop thread, not a thread",
        (
            "Tasks let coroutines that `await` take turns; a blocking call inside any of them "
            "still stops the whole loop.",
            "Drop the task and offload the call: "
            "`price = await anyio.to_thread.run_sync(client.get_price, symbol)`.",
        ),
    ),
}
_ON_LOOP_UNKNOWN = (
    "called on the loop's thread",
    ("A synchronous call made on the event loop's thread stops every other request.", _OFFLOAD_HINT),
)


def _price_route(app: Any) -> Any:
    """The endpoint function of ``GET /price/{symbol}``; a ``Mismatch`` if there is none."""
    routes = getattr(app, "routes", None)
    expect(
        routes is not None,
        "a FastAPI app",
        f"{type(app).__name__} (no routes)",
        "Pass the `app = FastAPI()` your endpoint is registered on.",
    )
    paths = []
    for route in routes:
        path = getattr(route, "path", None)
        paths.append(path)
        if path == _PATH and "GET" in (getattr(route, "methods", None) or ()):
            return route.endpoint
    raise Mismatch(
        f"a GET {_PATH} endpoint",
        f"routes {sorted(p for p in paths if p)}",
        [f'Keep the decorator `@app.get("{_PATH}")` above your endpoint.'],
    )


@dataclass
class _CallTracker:
    """Wraps ``client.get_price`` to note, for calls made on an event loop, who made them.

    The client itself records whether each call ran on a loop's thread; the tracker adds *how*
    it got there (straight from the endpoint, from an awaited ``async def`` helper, or from a task
    of its own), so the check can name the mistake.
    """

    client: LegacyPriceClient
    endpoint_code: CodeType | None
    on_loop_kinds: list[str] = field(default_factory=list)

    def install(self) -> None:
        original = LegacyPriceClient.get_price

        def get_price(*args: Any, **kwargs: Any) -> Any:
            if on_event_loop_thread():
                self.on_loop_kinds.append(self._how_called(sys._getframe(1)))
            return original(self.client, *args, **kwargs)

        self.client.get_price = get_price  # type: ignore[method-assign]

    def uninstall(self) -> None:
        vars(self.client).pop("get_price", None)

    def _how_called(self, frame: FrameType | None) -> str:
        async_between = False
        while frame is not None:
            code = frame.f_code
            if code is self.endpoint_code:
                return "async-helper" if async_between else "direct"
            if code.co_flags & inspect.CO_COROUTINE:
                async_between = True
            frame = frame.f_back
        return "other-task" if self.endpoint_code is not None else "unknown"


def _unawaited_coroutine(exc: BaseException) -> Any:
    """A never-awaited coroutine object found among the locals of the frames that raised ``exc``."""

    def search(value: Any, depth: int) -> Any:
        if inspect.iscoroutine(value) and inspect.getcoroutinestate(value) == inspect.CORO_CREATED:
            return value
        if depth > 0 and isinstance(value, dict):
            value = list(value.values())
        if depth > 0 and isinstance(value, list | tuple):
            for item in value:
                found = search(item, depth - 1)
                if found is not None:
                    return found
        return None

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb: TracebackType | None = current.__traceback__
        while tb is not None:
            for value in tb.tb_frame.f_locals.values():
                found = search(value, 2)
                if found is not None:
                    return found
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return None


@dataclass
class _Answer:
    status: int = 0


def _check_answer(server: Server, answer: _Answer) -> None:
    with httpx.Client(base_url=server.url, timeout=15, trust_env=False) as http:
        for symbol in (_SYMBOL, _OTHER):
            response = http.get(f"/price/{symbol}")
            answer.status = response.status_code
            _judge_answer(server, response, symbol)


def _judge_answer(server: Server, response: httpx.Response, symbol: str) -> None:
    expected = {"symbol": symbol, "price": price_of(symbol)}
    if response.status_code >= 500:
        raised = server.wait_for_exception()
        if raised is None:
            raise Mismatch("status 200", f"status {response.status_code}: {response.text[:80]}")
        coroutine = _unawaited_coroutine(raised)
        if coroutine is not None:
            name = getattr(coroutine, "__qualname__", "a coroutine")
            coroutine.close()  # closed, it will not warn "never awaited" later
            raise Mismatch(
                f"the price, a number, in {expected}",
                f"a coroutine object ({name}) in place of the price: it was never awaited, "
                "so the call never ran (FastAPI could not turn it into JSON: status 500)",
                [
                    "Calling an `async def` function only creates a coroutine; "
                    "nothing runs until it is awaited.",
                    "Put `await` in front: "
                    "`price = await anyio.to_thread.run_sync(client.get_price, symbol)`.",
                ],
            )
        raise raised  # the placeholder ("not started") or the learner's own error, as one line
    expect(
        response.status_code == 200,
        f"status 200 from GET /price/{symbol}",
        f"status {response.status_code}: {response.text[:80]}",
        f"Keep the route `{_PATH}` and the parameter `symbol: str`.",
    )
    try:
        body = response.json()
    except ValueError:
        body = response.text
    price = body.get("price") if isinstance(body, dict) else None
    shaped = (
        isinstance(body, dict)
        and set(body) == {"symbol", "price"}
        and isinstance(price, int | float)
        and not isinstance(price, bool)
        and math.isclose(price, expected["price"])
    )
    if shaped and body["symbol"] != symbol:
        raise Mismatch(
            f"the JSON body {expected} for GET /price/{symbol}",
            f"{short(body)}: the symbol is not the one requested",
            [
                "Return the path's `symbol` as it came in: the caller matches answers to the "
                "symbols it asked for.",
                'Return `{"symbol": symbol, "price": price}`, with `symbol` unchanged.',
            ],
        )
    expect(
        shaped,
        f"the JSON body {expected}",
        short(body),
        "The body is JSON: return a dict with exactly the keys `symbol` and `price`; FastAPI serialises it.",
        'Return `{"symbol": symbol, "price": price}`, where `price` is what `client.get_price(symbol)` '
        "returned.",
    )


def _check_off_loop(client: LegacyPriceClient, tracker: _CallTracker) -> None:
    calls = list(client.calls)
    expect(
        calls,
        "one call of `client.get_price` per request",
        "no call reached `client.get_price` of the client passed to the check",
        "The endpoint must get the price from the legacy client, `client`, defined in the exercise cell.",
    )
    on_loop = [c for c in calls if c.on_event_loop]
    if on_loop:
        kinds = tracker.on_loop_kinds or ["unknown"]
        how, hints = _ON_LOOP.get(kinds[0], _ON_LOOP_UNKNOWN)
        raise Mismatch(
            "every call of `client.get_price` made off the event loop's thread (in a worker thread)",
            f"{len(on_loop)} of {len(calls)} calls ran on the event loop's thread ({on_loop[0].thread!r}), "
            f"{how}",
            hints,
        )


class _LoopWatch:
    """A heartbeat on the server's own event loop: how long the loop was held up during the load.

    The learner's app is served through a thin ASGI wrapper that notes the server's loop when the
    first event (the lifespan's start-up) reaches it; ``watch()`` then runs a heartbeat task on that
    loop: a 10 ms sleep, over and over, noting each wake-up that came later than ``_HELD``.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lags: list[float] = []
        self._beating = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)

    async def _heartbeat(self) -> None:
        loop = asyncio.get_running_loop()
        expected = loop.time() + _HEARTBEAT
        while self._beating:
            await asyncio.sleep(_HEARTBEAT)
            now = loop.time()
            self.lags.append(max(0.0, now - expected))
            expected = now + _HEARTBEAT

    def start(self) -> Any:
        self.lags, self._beating = [], True
        if self.loop is None:
            return None
        return asyncio.run_coroutine_threadsafe(self._heartbeat(), self.loop)

    def stop(self, beat: Any) -> None:
        self._beating = False
        if beat is not None:
            with contextlib.suppress(Exception):
                beat.result(timeout=5)

    @property
    def held_up(self) -> float:
        return sum(lag for lag in self.lags if lag > _HELD)

    @property
    def worst(self) -> float:
        return max(self.lags, default=0.0)


@dataclass
class _Load:
    ok: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    wall: float = 0.0
    held_up: float = 0.0
    worst: float = 0.0
    overlap: int = 0
    calls: int = 0


def _run_load(server: Server, client: LegacyPriceClient, watch: _LoopWatch) -> _Load:
    client.reset()
    beat = watch.start()
    start = time.perf_counter()
    try:
        result = run_in_fresh_loop(
            lambda: load(server, f"/price/{_SYMBOL}", requests=_CONCURRENT, concurrency=_CONCURRENT),
            timeout=60,
            name="check-1.1-load",
        )
    finally:
        wall = time.perf_counter() - start
        time.sleep(3 * _HEARTBEAT)  # the heartbeat notes a gap that lasts until the load's end
        watch.stop(beat)
    return _Load(
        ok=result.ok,
        statuses=dict(result.statuses),
        wall=wall,
        held_up=watch.held_up,
        worst=watch.worst,
        overlap=client.max_in_flight,
        calls=len(client.calls),
    )


def _load_once(server: Server, client: LegacyPriceClient, watch: _LoopWatch, loads: list[_Load]) -> _Load:
    """The load of 20 concurrent requests, run again (up to 3 times in all) while the loop looks held
    up for part of the time only: a busy machine, not the answer, may have held it up once."""
    if not loads:
        for _ in range(_LOAD_ATTEMPTS):
            loads.append(run := _run_load(server, client, watch))
            if not _loop_held_up(run) or run.held_up >= _BLOCKED_SHARE * run.wall:
                break
    return loads[-1]


def _loop_held_up(run: _Load) -> bool:
    """The loop was held up for a good part of the load: much more than a busy machine does."""
    return run.held_up >= max(_HELD_FOR, _HELD_SHARE * run.wall)


def _check_loop_free(
    server: Server, client: LegacyPriceClient, watch: _LoopWatch, loads: list[_Load]
) -> None:
    run = _load_once(server, client, watch, loads)
    expect(
        run.ok == _CONCURRENT,
        f"{_CONCURRENT} responses with status 200",
        f"statuses {run.statuses}",
        "Run the cell above again, then this check: every request should succeed.",
    )
    on_loop = any(c.on_event_loop for c in client.calls)
    expect(
        not _loop_held_up(run),
        "the event loop free while the calls run: a heartbeat task on the server's loop wakes on time",
        f"the heartbeat was held up {run.held_up:.2f} s of the {run.wall:.2f} s the {_CONCURRENT} requests "
        f"took (once for {run.worst * 1000:.0f} ms): "
        + (
            "the calls above blocked it"
            if on_loop
            else "though `client.get_price` ran in worker threads, your endpoint blocked the loop: it "
            "waited for the thread on the loop's thread (`future.result()`, `thread.join()`, a lock) "
            "or made another blocking call"
        ),
        (
            "That follows from the step above: a call on the loop's thread holds it up."
            if on_loop
            else "Starting the call in a thread is half of it; the endpoint must also *await* its result, "
            "so that the loop serves other requests meanwhile. Anything that waits synchronously "
            "(`.result()`, `.join()`, `time.sleep`, `lock.acquire()`) blocks the loop as much as the "
            "call did."
        ),
        _OFFLOAD_HINT,
    )


def _check_overlap(server: Server, client: LegacyPriceClient, watch: _LoopWatch, loads: list[_Load]) -> None:
    run = _load_once(server, client, watch, loads)
    blocked = any(c.on_event_loop for c in client.calls) or _loop_held_up(run)
    expect(
        run.overlap >= _MIN_OVERLAP,
        f"the {_CONCURRENT} concurrent requests' calls to overlap (more than one in flight at once)",
        f"at most {run.overlap} at once: the calls ran one after another",
        (
            "That follows from the steps above: while the loop is blocked, no other request can start."
            if blocked
            else "Something serialises the calls: a `CapacityLimiter(1)`, a lock, or a single worker?"
        ),
        "A pool of worker threads runs several calls at once; a lock, a one-token limiter or a "
        "one-thread pool lets only one through at a time, and each request waits for all before it.",
        _OFFLOAD_HINT,
    )


@contextlib.contextmanager
def _joins_new_threads_but_pools(grace: float = 3.0) -> Iterator[None]:
    """``joins_new_threads``, but not waiting for the workers of a ``ThreadPoolExecutor``: a pool the
    learner's app made (and keeps, for its next requests) never ends its threads by itself."""
    before = set(threading.enumerate())
    try:
        yield
    finally:
        pools = set(getattr(concurrent.futures.thread, "_threads_queues", {}))
        deadline = time.monotonic() + grace
        for thread in threading.enumerate():
            if thread not in before and thread not in pools and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))


def check_offload(app: Any, client: LegacyPriceClient) -> None:
    """Check Exercise 1.1: ``GET /price/{symbol}`` answers right and never blocks the event loop.

    Serves ``app`` (stopped again before returning), then checks: the response body is
    ``{"symbol": …, "price": …}`` with the symbol as requested; no call of ``client.get_price`` ran
    on the event loop's thread (the client records where each call ran); while 20 concurrent
    requests run, a heartbeat task on the server's loop is not held up (nothing else blocks the
    loop, such as waiting for the worker thread's result); and the calls overlapped
    (``client.max_in_flight`` ≥ 2: any pool size is right, one call at a time is not).
    """
    with exercise("1.1", "Fix a blocking endpoint", SOLUTION) as ex:
        found: dict[str, Any] = {}

        def route() -> None:
            expect(
                isinstance(client, LegacyPriceClient),
                "the exercise's `client` (a LegacyPriceClient)",
                type(client).__name__,
                "Call the check as `check_offload(app, client)`.",
            )
            found["endpoint"] = _price_route(app)

        if not ex.step(f"the app has a GET {_PATH} endpoint", route):
            return
        endpoint = inspect.unwrap(found["endpoint"])
        tracker = _CallTracker(client, getattr(endpoint, "__code__", None))
        watch = _LoopWatch(app)
        client.reset()
        tracker.install()
        try:
            with _joins_new_threads_but_pools(), serve(watch, name="check-1.1") as server:
                answer = _Answer()
                shown = f'{{"symbol": "{_SYMBOL}", "price": {price_of(_SYMBOL)}}}'
                described = f"GET /price/{_SYMBOL} answers {shown} (and /price/{_OTHER}, its own symbol)"
                ex.step(described, lambda: _check_answer(server, answer))
                if answer.status != 200:
                    return
                ex.step(
                    "no call of `client.get_price` ran on the event loop's thread",
                    lambda: _check_off_loop(client, tracker),
                )
                loads: list[_Load] = []
                ex.step(
                    f"the event loop stays free while {_CONCURRENT} concurrent requests run",
                    lambda: _check_loop_free(server, client, watch, loads),
                )
                ex.step(
                    f"the {_CONCURRENT} requests' calls overlap (more than one in flight at once)",
                    lambda: _check_overlap(server, client, watch, loads),
                )
        finally:
            tracker.uninstall()


# ---------------------------------------------------------------------------------------------------
# Exercise 1.2: a loop-lag probe
# ---------------------------------------------------------------------------------------------------

_INTERVAL = 0.05
_IDLE_DURATION = 0.5
_IDLE_MAX = 0.03
_STALL = 0.2
_STALLS_AT = (0.15, 0.55, 0.95)
_STALLED_DURATION = 1.3
_STALLED_RANGE = (0.14, 0.38)
_ONE_STALL_AT = 0.3
_ONE_STALL_DURATION = 0.7
_SHORT_DURATION = 0.03  # shorter than the interval: the probe must still sleep once
_SHORT_STALL_AT = 0.01
_SHORT_RANGE = (0.1, 0.3)
_OVERRUN = 0.25  # a probe may end up to one interval past `duration`, and this much more for noise
_BEAT_STALL = 0.03  # a heartbeat this late was held up by the probe (or by a busy machine: run again)
_IDLE_ATTEMPTS = 3
_BUSY = 0.3  # the loop's worker threads are all taken for this long at the start of a run
_BUSY_WORKERS = 2  # the size of the loop's default executor during that run
_SMALL_STALL = 0.04
_SMALL_INTERVAL = 0.01
_SMALL_STALL_AT = 0.1
_SMALL_DURATION = 0.3
_SMALL_RANGE = (0.02, 0.15)  # the lag is at least stall − interval (0.03 s) whatever the phase


@dataclass
class _ProbeRun:
    value: Any = None
    awaitable: bool = True
    elapsed: float = 0.0
    held_up: float = 0.0  # how long a heartbeat task on the same loop was held up (gaps > _HELD)
    worst_beat: float = 0.0  # the heartbeat's worst lag: the longest the loop was held up at once


@contextlib.contextmanager
def _worker_threads_taken(seconds: float) -> Iterator[None]:
    """For ``seconds``, every worker thread the running loop offers is taken: its default executor
    (``asyncio.to_thread``, ``run_in_executor(None, …)``), made two threads that both sleep, and
    AnyIO's default thread limiter (``anyio.to_thread.run_sync``), every token of which is borrowed.
    The loop itself stays idle."""
    import anyio.to_thread

    loop = asyncio.get_running_loop()
    executor = concurrent.futures.ThreadPoolExecutor(_BUSY_WORKERS, thread_name_prefix="check-1.2-busy")
    loop.set_default_executor(executor)  # asyncio.run shuts it down with the loop
    for _ in range(_BUSY_WORKERS):
        executor.submit(time.sleep, seconds)
    limiter = anyio.to_thread.current_default_thread_limiter()
    borrowers = [object() for _ in range(math.ceil(limiter.available_tokens))]
    for borrower in borrowers:
        limiter.acquire_on_behalf_of_nowait(borrower)

    def give_back() -> None:
        while borrowers:
            limiter.release_on_behalf_of(borrowers.pop())

    handle = loop.call_later(seconds, give_back)
    try:
        yield
    finally:
        handle.cancel()
        give_back()


async def _measure_probe(
    probe: Callable[..., Any],
    duration: float,
    interval: float,
    stalls: tuple[float, ...],
    stall: float = _STALL,
    busy: float = 0.0,
) -> _ProbeRun:
    """Run ``probe(duration, interval)`` beside a heartbeat task, with ``stalls`` (each holding the
    loop ``stall`` seconds) scheduled on the loop, and its worker threads taken for ``busy`` seconds."""
    with _worker_threads_taken(busy) if busy else contextlib.nullcontext():
        return await _measure_probe_beside_heartbeat(probe, duration, interval, stalls, stall)


async def _measure_probe_beside_heartbeat(
    probe: Callable[..., Any], duration: float, interval: float, stalls: tuple[float, ...], stall: float
) -> _ProbeRun:
    loop = asyncio.get_running_loop()
    run = _ProbeRun()
    lags: list[float] = []
    beating = True

    async def heartbeat() -> None:
        expected = loop.time() + _HEARTBEAT
        while beating:
            await asyncio.sleep(_HEARTBEAT)
            now = loop.time()
            lags.append(max(0.0, now - expected))
            expected = now + _HEARTBEAT

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0)  # the heartbeat starts its first sleep
    handles = [loop.call_later(at, time.sleep, stall) for at in stalls]
    start = time.perf_counter()
    try:
        result = probe(duration, interval)
        run.awaitable = inspect.isawaitable(result)
        run.value = await result if run.awaitable else result
        run.elapsed = time.perf_counter() - start
        await asyncio.sleep(3 * _HEARTBEAT)  # the heartbeat notes the gap that ends with the probe
    finally:
        for handle in handles:
            handle.cancel()
        beating = False
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
    run.held_up = sum(lag for lag in lags if lag > _HELD)
    run.worst_beat = max(lags, default=0.0)
    return run


def _run_probe(
    probe: Callable[..., Any],
    duration: float,
    stalls: tuple[float, ...] = (),
    interval: float = _INTERVAL,
    stall: float = _STALL,
    busy: float = 0.0,
) -> _ProbeRun:
    try:
        with joins_new_threads():
            return run_in_fresh_loop(
                lambda: _measure_probe(probe, duration, interval, stalls, stall, busy),
                timeout=duration + 3,
                name="check-1.2-loop",
            )
    except NoReturn as late:
        raise Mismatch(
            f"max_loop_lag({duration}) to return after about {duration} s",
            f"no return within {late.seconds:g} s"
            + (" (and it still holds its thread: restart the kernel)" if late.stuck else ""),
            [
                "Loop only until `duration` seconds have passed since the start.",
                "Note the deadline first (`deadline = loop.time() + duration`), then "
                "`while loop.time() < deadline: …`.",
            ],
        ) from None


def _blocks(run: _ProbeRun) -> bool:
    """A heartbeat on the probe's loop was held up at least once (by the probe, or by a busy machine)."""
    return run.worst_beat >= _BEAT_STALL


def _check_probe_returns(probe: Callable[..., Any], runs: dict[str, _ProbeRun]) -> None:
    for _ in range(_IDLE_ATTEMPTS):
        run = runs["idle"] = _run_probe(probe, _IDLE_DURATION)
        if run.held_up >= 0.5 * max(run.elapsed, _IDLE_DURATION):
            break  # the probe blocks the loop: no point measuring again
        if not _blocks(run) and not _noisy(run):
            break
    value = run.value
    expect(
        run.awaitable,
        "an awaitable: `max_loop_lag` defined with `async def`",
        f"a plain function that returned {short(value)} without awaiting",
        "The probe must run on the loop it measures, taking turns with the other tasks: "
        "`async def max_loop_lag(…)`.",
    )
    if value is None:
        raise Mismatch(
            "a number of seconds",
            "None: the function returns nothing",
            ["End the function with `return worst` (the worst lag, in seconds)."],
        )
    if isinstance(value, list | tuple):
        raise Mismatch(
            "one number of seconds (the worst lag)",
            f"a {type(value).__name__} of {len(value)} values",
            [
                "Return one number: the largest of the lags.",
                "`return max(lags)`, or keep `worst = max(worst, lag)` as you go.",
            ],
        )
    expect(
        isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        "a number of seconds (a float)",
        f"{type(value).__name__}: {short(value)}",
        "Return the worst lag as a float, in seconds.",
    )
    expect(
        value >= -0.001,
        "a lag ≥ 0 (a wake-up is never early)",
        f"{value:.3f} s",
        "Lag is (when you woke up) − (when you asked to wake up), not the other way round.",
    )


def _noisy(run: _ProbeRun) -> bool:
    """The probe saw lag on an idle loop, and so did the heartbeat, though the probe did not block.

    Then the machine, not the probe, made the loop late (a busy CI runner): measure again.
    """
    value = run.value
    return isinstance(value, int | float) and value >= _IDLE_MAX and run.worst_beat > _HELD


def _check_probe_awaits(runs: dict[str, _ProbeRun]) -> None:
    run = runs["idle"]
    expect(
        not _blocks(run),
        f"other tasks keep running while the probe runs: a heartbeat task on the same loop is never "
        f"held up ({_BEAT_STALL * 1000:.0f} ms or more)",
        f"the heartbeat was held up {run.held_up:.2f} s in all of the {run.elapsed:.2f} s your probe ran, "
        f"once for {run.worst_beat * 1000:.0f} ms: the probe blocks the loop it measures",
        "An `async def` lets other tasks run only where it `await`s: any synchronous wait inside it "
        "(`time.sleep`, even once, to calibrate) blocks the loop it measures.",
        "Sleep only with `await asyncio.sleep(interval)`; `time.sleep` blocks the loop.",
    )


def _check_probe_idle(runs: dict[str, _ProbeRun]) -> None:
    run = runs["idle"]
    value = run.value
    if 0.8 * _INTERVAL <= value <= _INTERVAL + 0.04:
        raise Mismatch(
            f"less than {_IDLE_MAX} s on an idle loop",
            f"{value:.3f} s, about the interval itself ({_INTERVAL} s): the sleep was counted as lag",
            [
                "Lag is how much *later* than asked the loop woke you, not how long the sleep took.",
                "Subtract what you asked for: `lag = (time after the sleep) − (time before) − interval`.",
            ],
        )
    if value >= max(_IDLE_MAX, 10 * run.worst_beat) and value / 1000 < _IDLE_MAX:  # the loop was not late
        raise Mismatch(
            f"less than {_IDLE_MAX} s on an idle loop",
            f"{value:.3f}: a thousand times too much for an idle loop; milliseconds, not seconds?",
            [
                "The probe returns seconds, the unit of `loop.time()` and `asyncio.sleep`; a caller "
                "that wants milliseconds multiplies.",
                "Return the worst lag as it came out of the subtraction, without `* 1000`.",
            ],
        )
    expect(
        value < _IDLE_MAX,
        f"less than {_IDLE_MAX} s on an idle loop",
        f"{value:.3f} s",
        "On an idle loop every wake-up comes within a millisecond or two of the time asked.",
        "Measure each wake-up: `lag = loop.time() - asked`, where `asked = loop.time() + interval` "
        "was noted just before `await asyncio.sleep(interval)`.",
    )


def _check_probe_busy_threads(probe: Callable[..., Any], runs: dict[str, _ProbeRun]) -> None:
    for _ in range(_IDLE_ATTEMPTS):
        run = _run_probe(probe, _IDLE_DURATION, busy=_BUSY)
        if not _noisy(run):
            break
    value = run.value
    _expect_seconds(value)
    expected = (
        f"less than {_IDLE_MAX} s on an idle loop whose worker threads are all busy for its first "
        f"{_BUSY} s (those of its default executor and of AnyIO)"
    )
    idle = runs["idle"].value  # measured by the steps above, the worker threads free
    idle_passed = isinstance(idle, int | float) and idle < _IDLE_MAX
    if value >= _IDLE_MAX and idle_passed and run.worst_beat < _HELD:
        raise Mismatch(
            expected,
            f"{value:.3f} s, though a heartbeat task on the same loop was never more than "
            f"{run.worst_beat * 1000:.0f} ms late: your probe slept in a worker thread, so it waited for "
            "a free one first: it measured the queue of the loop's thread pool, not the loop",
            [
                "Loop lag is how late the loop's own timer wakes a task. A sleep in a worker thread "
                "(`asyncio.to_thread(time.sleep, …)`) waits for a free thread before it even starts, "
                "so a busy pool reads as lag though the loop is idle.",
                "Sleep on the loop itself: `await asyncio.sleep(interval)`; it sets a timer on the loop "
                "and never blocks it.",
            ],
        )
    expect(
        value < _IDLE_MAX,
        expected,
        f"{value:.3f} s",
        "On an idle loop every wake-up comes within a millisecond or two of the time asked, "
        "whatever its worker threads are doing."
        if idle_passed
        else "That follows from the step above: this loop is idle too.",
    )


def _check_probe_small_stall(probe: Callable[..., Any], runs: dict[str, _ProbeRun]) -> None:
    low, high = _SMALL_RANGE
    for _ in range(_IDLE_ATTEMPTS):
        run = _run_probe(
            probe, _SMALL_DURATION, (_SMALL_STALL_AT,), interval=_SMALL_INTERVAL, stall=_SMALL_STALL
        )
        if not (isinstance(run.value, int | float) and run.value > high and run.worst_beat > high):
            break  # else the machine, not the stall, held the loop that long: measure again
    value = run.value
    _expect_seconds(value)
    if low <= value <= high:
        return
    call = f"max_loop_lag({_SMALL_DURATION}, {_SMALL_INTERVAL})"
    expected = (
        f"{call} to report the {_SMALL_STALL} s stall {_SMALL_STALL_AT} s in: a worst lag between {low} "
        f"and {high} s (a wake-up comes at least {_SMALL_STALL - _SMALL_INTERVAL:.2f} s late)"
    )
    stalled = _stalled_run(probe, runs).value
    rounded = isinstance(stalled, int | float) and stalled > 0  # a measured lag is never a round number
    digits = next(
        (d for d in (0, 1, 2) if rounded and round(stalled, d) == stalled and round(value, d) == value), None
    )
    if value < low and digits is not None:
        raise Mismatch(
            expected,
            f"{value:.3f} s here, and exactly {stalled:g} s for the {_STALL} s stalls: your probe rounds "
            f"the lag to {digits} decimal place{'' if digits == 1 else 's'}, so a stall of tens of "
            "milliseconds reads as none",
            [
                f"Tens of milliseconds are lag that matters: a {_SMALL_STALL} s stall delays every request "
                "waiting on the loop by as much. The probe returns the lag as measured, in seconds.",
                "Return the worst lag unrounded (`return worst`); round only where you display it, "
                'as in `f"{lag:.3f} s"`.',
            ],
        )
    stalls_seen = isinstance(stalled, int | float) and _STALLED_RANGE[0] <= stalled <= _STALLED_RANGE[1]
    expect(
        False,
        expected,
        f"{value:.3f} s",
        "Measure every wake-up, for the whole `duration`, whatever the interval: each lag is (when you "
        "woke) − (when you asked to wake), and the worst of them is the answer."
        if stalls_seen
        else f"That follows from the steps above: the {_STALL} s stalls did not read right either.",
        "In a loop: note `asked = loop.time() + interval`, `await asyncio.sleep(interval)`, "
        "then `lag = loop.time() - asked`; keep the largest.",
    )


def _stalled_run(probe: Callable[..., Any], runs: dict[str, _ProbeRun]) -> _ProbeRun:
    if "stalled" not in runs:
        runs["stalled"] = _run_probe(probe, _STALLED_DURATION, _STALLS_AT)
    return runs["stalled"]


def _expect_seconds(value: Any) -> None:
    """The probe returned a number (of seconds), not None, a list or a bool."""
    expect(
        isinstance(value, int | float) and not isinstance(value, bool),
        "a number of seconds",
        short(value),
        "Return the worst lag as a float, in seconds.",
    )


def _check_probe_duration(probe: Callable[..., Any], runs: dict[str, _ProbeRun]) -> None:
    run = _stalled_run(probe, runs)
    _expect_seconds(run.value)
    expect(
        run.elapsed >= _STALLED_DURATION - 2 * _INTERVAL,
        f"max_loop_lag({_STALLED_DURATION}) to keep measuring for about {_STALLED_DURATION} s",
        f"it returned after {run.elapsed:.2f} s",
        "Keep sleeping and measuring until `duration` seconds have passed.",
    )
    noise = max(0.0, run.held_up - len(_STALLS_AT) * _STALL)  # the loop was late for other reasons too
    latest = _STALLED_DURATION + _INTERVAL + _OVERRUN + noise
    expect(
        run.elapsed <= latest,
        f"max_loop_lag({_STALLED_DURATION}) to return about {_STALLED_DURATION} s after it started "
        f"(at most {latest:.2f} s), however late the loop wakes it",
        f"it returned after {run.elapsed:.2f} s: it kept sleeping past `duration`, about as long as the "
        "stalls added; a fixed number of sleeps lasts longer when the loop is late",
        "Watch the clock, not a count: a loop that is late makes every stalled sleep longer, so "
        "`duration / interval` sleeps take more than `duration` exactly when the loop is in trouble.",
        "Note the deadline first (`deadline = loop.time() + duration`), then "
        "`while loop.time() < deadline: …`.",
    )


def _check_probe_stalled(probe: Callable[..., Any], runs: dict[str, _ProbeRun]) -> None:
    value = _stalled_run(probe, runs).value
    _expect_seconds(value)
    low, high = _STALLED_RANGE
    if low <= value <= high:
        return
    expected = f"a worst lag between {low} and {high} s (each stall holds the loop {_STALL} s)"
    if value > high:
        raise Mismatch(
            expected,
            f"{value:.3f} s: more than the longest stall ({_STALL} s): the lags were added up, or each "
            "wake-up was compared with a fixed schedule, so the lateness of one carried into the next",
            [
                "Lags of separate wake-ups do not add up to one worse lag; and after a late wake-up, "
                "the next sleep's deadline is counted from *that* wake-up, not from a fixed timetable.",
                "Keep the maximum (`max`), not the sum, and note `asked = loop.time() + interval` afresh "
                "before each sleep.",
            ],
        )
    if value > 0.005:
        raise Mismatch(
            expected,
            f"{value:.3f} s: far less than one stall; the stalls were averaged with the on-time wake-ups",
            [
                "One long stall is what hurts a request; an average hides it among many on-time wake-ups.",
                "Keep the maximum: `worst = max(worst, lag)`, not the mean.",
            ],
        )
    raise Mismatch(
        expected,
        f"{value:.3f} s: the stalls did not show at all",
        [
            "Measure every wake-up, for the whole `duration`, on the loop that runs the probe: one long "
            "sleep feels only a stall still going on at its end, a loop in another thread feels none.",
            "A lag is (when you woke) − (when you asked to wake); the other way round it is never positive.",
            "In a loop: note `asked = loop.time() + interval`, `await asyncio.sleep(interval)`, "
            "then `lag = loop.time() - asked`; keep the largest.",
        ],
    )


def _check_probe_one_stall(probe: Callable[..., Any], runs: dict[str, _ProbeRun]) -> None:
    run = _run_probe(probe, _ONE_STALL_DURATION, (_ONE_STALL_AT,))
    value = run.value
    _expect_seconds(value)
    low, high = _STALLED_RANGE
    three = runs["stalled"].value if "stalled" in runs else None
    three_seen = isinstance(three, int | float) and low <= three <= high
    expect(
        low <= value <= high,
        f"a worst lag between {low} and {high} s (the stall holds the loop {_STALL} s)",
        f"{value:.3f} s"
        + (
            ": the single stall was dropped, though three stalls showed: a percentile, a median or "
            "a trimmed maximum treats one bad wake-up as noise"
            if three_seen and value < low
            else ""
        ),
        "One stall is enough to hurt every request that waited through it: the probe reports the very "
        "worst wake-up, however rare.",
        "Keep the maximum of all the lags (`max(lags)`), not a percentile.",
    )


def _check_probe_short(probe: Callable[..., Any]) -> None:
    run = _run_probe(probe, _SHORT_DURATION, (_SHORT_STALL_AT,), interval=_INTERVAL)
    value = run.value
    _expect_seconds(value)
    low, high = _SHORT_RANGE
    call = f"max_loop_lag({_SHORT_DURATION}, {_INTERVAL})"
    if run.elapsed < _SHORT_DURATION:
        raise Mismatch(
            f"{call} to sleep at least once and report the {_STALL} s stall that starts "
            f"{_SHORT_STALL_AT} s in (a worst lag between {low} and {high} s)",
            f"{short(value)} after {run.elapsed:.3f} s: it returned before `duration` had passed, so the "
            "stall went unseen: it stops when a whole interval no longer fits before the deadline",
            [
                "The probe watches until `duration` has passed; its last sleep may end after the deadline.",
                "Test the clock against the deadline (`while loop.time() < deadline:`), not whether a "
                "whole interval still fits before it.",
            ],
        )
    expect(
        low <= value <= high,
        f"{call} to report the {_STALL} s stall that starts {_SHORT_STALL_AT} s in "
        f"(a worst lag between {low} and {high} s)",
        f"{value:.3f} s after {run.elapsed:.3f} s",
        "Measure every wake-up, however short `duration` is: at least one sleep.",
    )


def check_loop_lag_probe(max_loop_lag: Callable[..., Awaitable[float]]) -> None:
    """Check Exercise 1.2: ``await max_loop_lag(duration, interval)`` returns the worst loop lag.

    Runs the probe on a fresh event loop (in a thread of the check's own), beside a heartbeat task:
    idle for 0.5 s, where it must report < 0.03 s and must never hold up the heartbeat (30 ms or
    more at once); while the loop is blocked three times for 0.2 s (``time.sleep`` scheduled with
    ``call_later``), where it must return after about 1.3 s and report a worst lag of 0.15–0.2 s
    (accepted: 0.14–0.38 s); while it is blocked once for 0.2 s among many on-time wake-ups (the
    same); and for a duration (0.03 s) shorter than the interval, with a 0.2 s stall 0.01 s in. Two
    more runs: idle again while every worker thread of the loop is taken for 0.3 s (its default
    executor's, AnyIO's), where it must still report < 0.03 s (a probe that sleeps in a thread measures
    the pool's queue); and with ``interval=0.01`` and one 0.04 s stall, where any wake-up it delays is
    at least 0.03 s late whatever the phase, so the probe must report 0.02–0.15 s (rounding to tenths
    reports 0).
    """
    with exercise("1.2", "Write a loop-lag probe", SOLUTION) as ex:
        runs: dict[str, _ProbeRun] = {}
        if not ex.step(
            f"`await max_loop_lag({_IDLE_DURATION})` returns a number of seconds",
            lambda: _check_probe_returns(max_loop_lag, runs),
        ):
            return
        if not ex.step(
            "it awaits while it sleeps: other tasks on the loop keep running",
            lambda: _check_probe_awaits(runs),
        ):
            return
        ex.step(f"an idle loop shows less than {_IDLE_MAX} s of lag", lambda: _check_probe_idle(runs))
        ex.step(
            f"an idle loop whose worker threads are all busy still shows less than {_IDLE_MAX} s: "
            "the probe measures the loop, not a thread pool",
            lambda: _check_probe_busy_threads(max_loop_lag, runs),
        )
        ex.step(
            f"it stops after `duration` ({_STALLED_DURATION} s), however late the loop wakes it",
            lambda: _check_probe_duration(max_loop_lag, runs),
        )
        ex.step(
            f"a loop blocked three times for {_STALL} s shows a worst lag of about {_STALL} s",
            lambda: _check_probe_stalled(max_loop_lag, runs),
        )
        ex.step(
            f"a loop blocked once for {_STALL} s among on-time wake-ups shows a worst lag of "
            f"about {_STALL} s",
            lambda: _check_probe_one_stall(max_loop_lag, runs),
        )
        ex.step(
            f"a short stall ({_SMALL_STALL} s, with `interval={_SMALL_INTERVAL}`) shows too: a worst lag "
            f"of about {_SMALL_STALL - _SMALL_INTERVAL:.2f}–{_SMALL_STALL} s",
            lambda: _check_probe_small_stall(max_loop_lag, runs),
        )
        ex.step(
            f"a duration ({_SHORT_DURATION} s) shorter than the interval still measures: "
            f"a {_STALL} s stall shows",
            lambda: _check_probe_short(max_loop_lag),
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 1.3: the right offload for each kind of work
# ---------------------------------------------------------------------------------------------------

_HASH_MB = 8
_HASH_ROUNDS = 12
_PRIMES_BELOW = 100_000
_IO_CLIENT = LegacyPriceClient(delay=0.1)
_UNKNOWN_KIND = "python-cpu"  # a typo of "python_cpu"
_MANY_CPUS = 64
_WAITED_FOR = 0.05  # the loop held up this long in all during one call …
_WAITED_SHARE = 0.5  # … and for this share of the call's time: something waited on the loop's thread


@dataclass(frozen=True)
class Ran:
    """What a workload returned, and where it ran: process id, thread name, on an event loop or not."""

    result: Any
    pid: int
    thread: str
    on_event_loop: bool


def _ran(result: Any) -> Ran:
    pid, thread = where()
    return Ran(result, pid, thread, on_event_loop_thread())


def price_where(symbol: str) -> Ran:
    """``LegacyPriceClient.get_price`` (blocking I/O), reporting where it ran."""
    return _ran(_IO_CLIENT.get_price(symbol))


def primes_where(limit: int) -> Ran:
    """``count_primes`` (pure-Python CPU work, holds the GIL), reporting where it ran."""
    return _ran(count_primes(limit))


def sha256_where(data: bytes, rounds: int = 1) -> Ran:
    """SHA-256 over ``data``, ``rounds`` times (C code that releases the GIL on large buffers),
    reporting where it ran."""
    digest = hashlib.sha256()
    for _ in range(rounds):
        digest.update(data)
    return _ran(digest.hexdigest())


def _sha256_rounds(data: bytes, rounds: int) -> str:
    digest = hashlib.sha256()
    for _ in range(rounds):
        digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class _Workload:
    kind: str
    label: str
    func: Callable[..., Ran]
    args: Callable[[], tuple[Any, ...]]  # made when the check runs (the buffer is 8 MB)
    right: str  # "thread" or "process"
    expected: Callable[[], Any]  # what func(*args) returns (its ``result``)
    messages: dict[str, tuple[str, tuple[str, ...]]]


_INLINE = "it ran on the event loop's thread, inline: the loop could serve nothing else meanwhile"
_TO_THREAD = "`return await anyio.to_thread.run_sync(func, *args)`."
_TO_PROCESS = "`return await anyio.to_process.run_sync(func, *args)`."

_WORKLOADS = (
    _Workload(
        "blocking_io",
        "blocking I/O (`LegacyPriceClient.get_price`)",
        price_where,
        lambda: (_SYMBOL,),
        "thread",
        lambda: price_of(_SYMBOL),
        {
            "loop": (
                _INLINE,
                ("Blocking I/O must leave the loop's thread; waiting needs no CPU.", _TO_THREAD),
            ),
            "process": (
                "it ran in another process: a process start (most of a second the first time) and "
                "pickling both ways, to wait",
                (
                    "It works here, but a real client (sockets, locks, a session) cannot be pickled "
                    "into another process at all.",
                    "A thread that waits on I/O releases the GIL, so a worker thread is enough: "
                    + _TO_THREAD,
                ),
            ),
        },
    ),
    _Workload(
        "python_cpu",
        "pure-Python CPU work (`count_primes`)",
        primes_where,
        lambda: (_PRIMES_BELOW,),
        "process",
        lambda: count_primes(_PRIMES_BELOW),
        {
            "loop": (
                _INLINE,
                ("CPU work run inline stalls the loop for as long as it computes.", _TO_PROCESS),
            ),
            "thread": (
                "it ran in a worker thread of this process: pure Python holds the GIL, so the loop "
                "still stalls while it computes",
                (
                    "A thread helps only work that releases the GIL; `count_primes` never does.",
                    "Another process has its own GIL: " + _TO_PROCESS,
                ),
            ),
        },
    ),
    _Workload(
        "gil_releasing",
        f"GIL-releasing C code (`hashlib.sha256` over {_HASH_MB} MB)",
        sha256_where,
        lambda: (bytes(_HASH_MB * 1024 * 1024), _HASH_ROUNDS),
        "thread",
        lambda: _sha256_rounds(bytes(_HASH_MB * 1024 * 1024), _HASH_ROUNDS),
        {
            "loop": (
                _INLINE,
                ("Even fast C code stalls the loop when it runs on the loop's thread.", _TO_THREAD),
            ),
            "process": (
                f"it ran in another process: its {_HASH_MB} MB buffer was pickled through a pipe "
                "to the worker, for no gain",
                (
                    "`hashlib` releases the GIL while it hashes a large buffer, so a worker thread "
                    "runs it in parallel with the loop, sharing the buffer instead of copying it.",
                    _TO_THREAD,
                ),
            ),
        },
    ),
)
_PLACES = {
    "loop": "on the event loop's thread",
    "thread": "in a worker thread of this process",
    "process": "in another process",
}
_VIEWS = (1, _MANY_CPUS)  # the machine as the learner's code sees it: one CPU, then many


def _fresh(text: str) -> str:
    """An equal string that is not the same object (as a kind read from a file or a request is)."""
    return "".join(list(text))


@contextlib.contextmanager
def _as_if_cpus(count: int) -> Iterator[None]:
    """While the block runs, ``os.cpu_count()`` and friends report ``count`` CPUs: the learner's
    choice must be the same on any machine, so the check shows it a small and a large one."""
    patched = {"cpu_count": lambda: count}
    if hasattr(os, "process_cpu_count"):
        patched["process_cpu_count"] = lambda: count
    if hasattr(os, "sched_getaffinity"):
        patched["sched_getaffinity"] = lambda pid: set(range(count))
    saved = {name: getattr(os, name) for name in patched}
    try:
        for name, value in patched.items():
            setattr(os, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(os, name, value)


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None
    awaitable: bool = True
    elapsed: float = 0.0
    held_up: float = 0.0  # how long a heartbeat on the loop was held up during the call
    literal_place: str | None = None  # where it ran when ``kind`` was the very literal, if asked
    processes_before: frozenset[int] | None = None  # this process's descendants when the call began

    @property
    def new_process(self) -> bool:
        """It ran in another process, one that did not exist yet when the call began."""
        value = self.value
        return (
            self.place == "process"
            and self.processes_before is not None
            and isinstance(value, Ran)
            and value.pid not in self.processes_before
        )

    @property
    def place(self) -> str | None:
        value = self.value
        if self.error is not None or not isinstance(value, Ran):
            return None
        return "loop" if value.on_event_loop else ("process" if value.pid != os.getpid() else "thread")


class _Beat:
    """A heartbeat task on the running loop; ``held_up(start)`` sums its late wake-ups since ``start``."""

    def __init__(self) -> None:
        self.lags: list[tuple[float, float]] = []  # (when, how late)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        expected = loop.time() + _HEARTBEAT
        while True:
            await asyncio.sleep(_HEARTBEAT)
            now = loop.time()
            self.lags.append((now, max(0.0, now - expected)))
            expected = now + _HEARTBEAT

    async def __aenter__(self) -> _Beat:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def held_up(self, start: float) -> float:
        return sum(lag for when, lag in self.lags if when >= start and lag > _HELD)


def _descendants() -> frozenset[int] | None:
    """The ids of this process's child processes and theirs (None where psutil is missing)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - IPython installs it
        return None
    try:
        return frozenset(child.pid for child in psutil.Process().children(recursive=True))
    except psutil.Error:  # pragma: no cover
        return None


async def _call(run_offloaded: Callable[..., Any], beat: _Beat, kind: str, func: Any, args: Any) -> _Outcome:
    loop = asyncio.get_running_loop()
    outcome = _Outcome(processes_before=_descendants())
    start, began = loop.time(), time.perf_counter()
    try:
        result = run_offloaded(kind, func, *args)
        outcome.awaitable = inspect.isawaitable(result)
        outcome.value = await result if outcome.awaitable else result
    except Exception as exc:
        outcome.error = exc
    outcome.elapsed = time.perf_counter() - began
    await asyncio.sleep(3 * _HEARTBEAT)  # the heartbeat notes a gap that lasted until the call's end
    outcome.held_up = beat.held_up(start)
    return outcome


async def _offload_each(run_offloaded: Callable[..., Any]) -> dict[Any, _Outcome]:
    """Each kind of work, as if on one CPU and on many, then an unknown kind, beside a heartbeat."""
    outcomes: dict[Any, _Outcome] = {}
    async with _Beat() as beat:
        for cpus in _VIEWS:
            with _as_if_cpus(cpus):
                for work in _WORKLOADS:
                    outcome = await _call(run_offloaded, beat, _fresh(work.kind), work.func, work.args())
                    outcomes[work.kind, cpus] = outcome
                    if outcome.place not in (None, work.right):  # was it `kind is "…"`?
                        again = await _call(run_offloaded, beat, work.kind, work.func, work.args())
                        outcome.literal_place = again.place
                        if inspect.iscoroutine(again.value):
                            again.value.close()
        outcomes[_UNKNOWN_KIND] = await _call(
            run_offloaded, beat, _fresh(_UNKNOWN_KIND), price_where, (_SYMBOL,)
        )
    for outcome in outcomes.values():
        if inspect.iscoroutine(outcome.value):
            outcome.value.close()  # never awaited: closed, it will not warn about it later
    return outcomes


def _judge(work: _Workload, outcomes: dict[Any, _Outcome]) -> None:
    views = [(cpus, outcomes[work.kind, cpus]) for cpus in _VIEWS]
    for _, outcome in views:
        if outcome.error is not None:
            raise outcome.error
        value = outcome.value
        expect(
            outcome.awaitable,
            "an awaitable from `run_offloaded(…)`",
            f"it returned {short(value)} without awaiting",
            "Define it with `async def` and `await` the thread or the process.",
        )
        if inspect.iscoroutine(value):
            raise Mismatch(
                "run_offloaded to return what `func(*args)` returned",
                f"a coroutine object ({value.__qualname__}): the offload was never awaited, so the work "
                "never ran",
                [
                    "Calling an `async def` function (such as `anyio.to_thread.run_sync`) only creates a "
                    "coroutine; nothing runs until it is awaited.",
                    "`return await …` the offloaded call.",
                ],
            )
        expect(
            isinstance(value, Ran) and value.result == work.expected(),
            "run_offloaded to return what `func(*args)` returned",
            short(value),
            "`return await …` the result of the offloaded call.",
        )
    expected = f"{work.label} to run {_PLACES[work.right]}"
    for _, outcome in views:
        if outcome.place != work.right and outcome.literal_place == work.right:
            raise Mismatch(
                expected,
                f'with a kind equal to "{work.kind}" but made at run time (as one read from a request or '
                f"a file is) it ran {_PLACES[str(outcome.place)]}; only with the literal itself did it run "
                f"{_PLACES[work.right]}: the kind was compared with `is`, which asks whether two strings "
                "are the same object, not whether they are equal",
                [
                    "Compare strings with `==` (or `in`, or `match`/`case`); `is` happens to work only "
                    "for strings that Python stored once, such as two equal literals.",
                    f'`if kind == "{work.kind}": …`',
                ],
            )
    places = {cpus: outcome.place for cpus, outcome in views}
    if len(set(places.values())) > 1:
        wrong = next(cpus for cpus, place in places.items() if place != work.right)
        raise Mismatch(
            f"{expected}, on any machine",
            f"as if on a machine with {wrong} CPU{'s' if wrong > 1 else ''} (what `os.cpu_count()` and "
            f"`os.sched_getaffinity` told your code) it ran {_PLACES[str(places[wrong])]}; with "
            f"{next(c for c in _VIEWS if c != wrong)} it ran {_PLACES[work.right]}",
            [
                "Where work must run depends on the kind of work, not on the machine: the loop needs "
                "its thread and the GIL whatever the number of CPUs.",
                "Even on one CPU, a process keeps pure Python off the loop's GIL: the operating system "
                "shares the core between the two processes fairly, while a thread must wrest the GIL "
                "from the loop. Choose by `kind` alone.",
            ],
        )
    place = places[_VIEWS[0]]
    if place != work.right:
        seen, hints = work.messages[str(place)]
        raise Mismatch(expected, seen, hints)
    for _, outcome in views:
        waited = outcome.held_up >= max(_WAITED_FOR, _WAITED_SHARE * outcome.elapsed)
        expect(
            not waited,
            f"{expected}, the event loop free meanwhile (a heartbeat task on it wakes on time)",
            f"it ran {_PLACES[work.right]}, but the loop was held up {outcome.held_up:.2f} s of the "
            f"{outcome.elapsed:.2f} s the call took: your code waited for the result on the loop's "
            "thread (`Pool.apply`, `future.result()`, `thread.join()`) instead of awaiting it",
            "Handing the work to a thread or a process is half of it; the loop must also be free while "
            "it runs, so the result has to be *awaited*: a synchronous wait blocks the loop as much as "
            "the work itself.",
            f"Await it: {_TO_PROCESS if work.right == 'process' else _TO_THREAD}",
        )
    (_, first), (_, second) = views
    if work.right == "process" and second.new_process:
        raise Mismatch(
            f"{expected}, a worker process kept for the next calls",
            f"each call started a process of its own: the first ran in process {first.value.pid}, the "
            f"second in process {second.value.pid}, which did not exist yet when that call began: a "
            "process start-up (a new interpreter, its imports) on every call",
            [
                "Starting a process costs far more than the work of one call here; a pool pays it once "
                "and keeps its workers for the next calls. A pool opened in a `with` block inside the "
                "function starts a process on every call, and leaving the block waits, on the loop's "
                "thread, for that process to exit.",
                "Let AnyIO keep its worker processes between calls: " + _TO_PROCESS + " Or make one "
                "`ProcessPoolExecutor` once, outside the function, and reuse it.",
            ],
        )


def _judge_unknown(outcomes: dict[Any, _Outcome]) -> None:
    outcome = outcomes[_UNKNOWN_KIND]
    expected = f'`run_offloaded("{_UNKNOWN_KIND}", …)` to raise ValueError without running the work'
    hints = (
        "A kind it does not know is a mistake in the calling code (a typo, say): say so at once, "
        "rather than guess where the work should run.",
        'End with `raise ValueError(f"unknown kind of work: {kind!r}")`.',
    )
    if outcome.error is None:
        place = outcome.place
        raise Mismatch(
            expected,
            (f"it ran the work {_PLACES[place]}" if place else f"it returned {short(outcome.value)}")
            + ": a typo in a kind goes unnoticed"
            + (", and blocks the loop" if place == "loop" else ""),
            hints,
        )
    error = outcome.error
    expect(
        isinstance(error, ValueError),
        expected,
        f"{type(error).__name__}: {str(error)[:80]}",
        *hints,
    )


def check_offload_choice(run_offloaded: Callable[..., Awaitable[Any]]) -> None:
    """Check Exercise 1.3: ``await run_offloaded(kind, func, *args)`` runs each kind of work right.

    Calls it on a fresh event loop, beside a heartbeat task, with three importable workloads that
    report where they ran (process id, thread, on an event loop or not): ``"blocking_io"`` must run
    in a worker thread, ``"python_cpu"`` in another process, ``"gil_releasing"`` in a worker thread,
    with the loop free meanwhile (the result awaited, not waited for). Each kind is passed as a string
    made at run time, and the whole is run twice, with ``os.cpu_count()`` (and friends) reporting
    1 CPU and then 64: the choice must not depend on the machine. An unknown kind must raise
    ``ValueError`` without running the work.
    """
    with exercise("1.3", "Pick the right offload", SOLUTION) as ex:
        if not inspect.iscoroutinefunction(inspect.unwrap(run_offloaded)):
            ex.step(
                "run_offloaded is an `async def` function",
                lambda: expect(
                    False,
                    "`async def run_offloaded(kind, func, *args)`",
                    f"{getattr(run_offloaded, '__name__', run_offloaded)!r} is not a coroutine function",
                    "It awaits a thread or a process, so it must itself be awaitable: define it with "
                    "`async def`.",
                ),
            )
            return
        outcomes: dict[Any, _Outcome] = {}

        def judge(work: _Workload) -> None:
            if not outcomes:  # the first step runs them all, on one loop (one process start)
                outcomes.update(_offload_all(run_offloaded))
            _judge(work, outcomes)

        for work in _WORKLOADS:
            passed = ex.step(
                f'"{work.kind}": {work.label} runs {_PLACES[work.right]} on any machine, '
                "the loop free meanwhile",
                lambda work=work: judge(work),
            )
            if not passed and not outcomes:
                return
        ex.step(f'an unknown kind ("{_UNKNOWN_KIND}") raises ValueError', lambda: _judge_unknown(outcomes))


def _offload_all(run_offloaded: Callable[..., Any]) -> dict[Any, _Outcome]:
    try:
        with joins_new_threads():
            return run_in_fresh_loop(lambda: _offload_each(run_offloaded), timeout=60, name="check-1.3-loop")
    except NoReturn as late:
        raise Mismatch(
            "each `await run_offloaded(…)` to return within seconds",
            f"no return within {late.seconds:g} s"
            + (" (and it still holds its thread: restart the kernel)" if late.stuck else ""),
            ["Each call should start the work, await it, and return its result."],
        ) from None
