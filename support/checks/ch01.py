"""Checks for chapter 1's exercises: async correctness and concurrency.

Each check asserts the mechanism, not the clock: on which thread (or in which process) the work
ran, and how many calls overlapped. Where time is the point (Exercise 1.2, the loop-lag probe), the
effects are a hundred times larger than scheduler noise.

The learner's coroutines run on a fresh event loop in a thread of the check's own, so a check works
the same from a notebook (whose kernel already runs a loop), from pytest and from a terminal.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
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
_CONCURRENT = 20
_MIN_OVERLAP = 10

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
        response = http.get(f"/price/{_SYMBOL}")
    answer.status = response.status_code
    expected = {"symbol": _SYMBOL, "price": price_of(_SYMBOL)}
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
        f"status 200 from GET /price/{_SYMBOL}",
        f"status {response.status_code}: {response.text[:80]}",
        f"Keep the route `{_PATH}` and the parameter `symbol: str`.",
    )
    try:
        body = response.json()
    except ValueError:
        body = response.text
    price = body.get("price") if isinstance(body, dict) else None
    right = (
        isinstance(body, dict)
        and set(body) == {"symbol", "price"}
        and body["symbol"] == _SYMBOL
        and isinstance(price, int | float)
        and math.isclose(price, expected["price"])
    )
    expect(
        right,
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


def _check_overlap(server: Server, client: LegacyPriceClient) -> None:
    client.reset()
    result = run_in_fresh_loop(
        lambda: load(server, f"/price/{_SYMBOL}", requests=_CONCURRENT, concurrency=_CONCURRENT),
        timeout=60,
        name="check-1.1-load",
    )
    expect(
        result.ok == _CONCURRENT,
        f"{_CONCURRENT} responses with status 200",
        f"statuses {dict(result.statuses)}",
        "Run the cell above again, then this check: every request should succeed.",
    )
    overlap = client.max_in_flight
    on_loop = any(c.on_event_loop for c in client.calls)
    expect(
        overlap >= _MIN_OVERLAP,
        f"at least {_MIN_OVERLAP} of {_CONCURRENT} concurrent calls in flight at once",
        f"at most {overlap} at once: the requests "
        + ("ran one after another" if overlap <= 1 else "were mostly serialised"),
        (
            "That follows from the step above: while one call blocks the loop, no other request can start."
            if on_loop
            else "Something serialises the calls: a `CapacityLimiter(1)`, a lock, or a shared worker?"
        ),
        _OFFLOAD_HINT,
    )


def check_offload(app: Any, client: LegacyPriceClient) -> None:
    """Check Exercise 1.1: ``GET /price/{symbol}`` answers right and never blocks the event loop.

    Serves ``app`` (stopped again before returning), then checks: the response body is
    ``{"symbol": …, "price": …}``; no call of ``client.get_price`` ran on the event loop's thread
    (the client records where each call ran); and 20 concurrent requests overlapped
    (``client.max_in_flight`` ≥ 10).
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
        client.reset()
        tracker.install()
        try:
            with joins_new_threads(), serve(app, name="check-1.1") as server:
                answer = _Answer()
                shown = f'{{"symbol": "{_SYMBOL}", "price": {price_of(_SYMBOL)}}}'
                ex.step(f"GET /price/{_SYMBOL} answers {shown}", lambda: _check_answer(server, answer))
                if answer.status != 200:
                    return
                ex.step(
                    "no call of `client.get_price` ran on the event loop's thread",
                    lambda: _check_off_loop(client, tracker),
                )
                ex.step(
                    f"{_CONCURRENT} concurrent requests overlap (≥ {_MIN_OVERLAP} calls in flight at once)",
                    lambda: _check_overlap(server, client),
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
_HEARTBEAT = 0.01
_HELD = 0.02  # a heartbeat this late was held up by something on the loop
_IDLE_ATTEMPTS = 3


@dataclass
class _ProbeRun:
    value: Any = None
    awaitable: bool = True
    elapsed: float = 0.0
    held_up: float = 0.0  # how long a heartbeat task on the same loop was held up (gaps > _HELD)
    worst_beat: float = 0.0  # the heartbeat's own worst lag: how noisy the loop was


async def _measure_probe(probe: Callable[..., Any], duration: float, stalls: tuple[float, ...]) -> _ProbeRun:
    """Run ``probe(duration, interval)`` beside a heartbeat task, with ``stalls`` scheduled on the loop."""
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
    handles = [loop.call_later(at, time.sleep, _STALL) for at in stalls]
    start = time.perf_counter()
    try:
        result = probe(duration, _INTERVAL)
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


def _run_probe(probe: Callable[..., Any], duration: float, stalls: tuple[float, ...] = ()) -> _ProbeRun:
    try:
        with joins_new_threads():
            return run_in_fresh_loop(
                lambda: _measure_probe(probe, duration, stalls), timeout=duration + 3, name="check-1.2-loop"
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


def _check_probe_returns(probe: Callable[..., Any], runs: dict[str, _ProbeRun]) -> None:
    for _ in range(_IDLE_ATTEMPTS):
        run = runs["idle"] = _run_probe(probe, _IDLE_DURATION)
        if not _noisy(run):
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
    return (
        isinstance(value, int | float)
        and value >= _IDLE_MAX
        and run.worst_beat > _HELD
        and run.held_up < 0.5 * max(run.elapsed, _IDLE_DURATION)
    )


def _check_probe_awaits(runs: dict[str, _ProbeRun]) -> None:
    run = runs["idle"]
    expect(
        run.held_up < 0.5 * max(run.elapsed, _IDLE_DURATION),
        "other tasks keep running while the probe sleeps",
        f"a heartbeat task on the same loop was held up {run.held_up:.2f} s of the {run.elapsed:.2f} s "
        "your probe ran: the probe blocks the loop it measures",
        "An `async def` lets other tasks run only where it `await`s.",
        "Sleep with `await asyncio.sleep(interval)`; `time.sleep` blocks the loop.",
    )


def _check_probe_idle(runs: dict[str, _ProbeRun]) -> None:
    value = runs["idle"].value
    if 0.8 * _INTERVAL <= value <= _INTERVAL + 0.04:
        raise Mismatch(
            f"less than {_IDLE_MAX} s on an idle loop",
            f"{value:.3f} s, about the interval itself ({_INTERVAL} s): the sleep was counted as lag",
            [
                "Lag is how much *later* than asked the loop woke you, not how long the sleep took.",
                "Subtract what you asked for: `lag = (time after the sleep) − (time before) − interval`.",
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


def _check_probe_stalled(probe: Callable[..., Any]) -> None:
    run = _run_probe(probe, _STALLED_DURATION, _STALLS_AT)
    value = run.value
    expect(
        isinstance(value, int | float) and not isinstance(value, bool),
        "a number of seconds",
        short(value),
        "Return the worst lag as a float, in seconds.",
    )
    expect(
        run.elapsed >= 0.6 * _STALLED_DURATION,
        f"max_loop_lag({_STALLED_DURATION}) to keep measuring for about {_STALLED_DURATION} s",
        f"it returned after {run.elapsed:.2f} s",
        "Keep sleeping and measuring until `duration` seconds have passed.",
    )
    low, high = _STALLED_RANGE
    if low <= value <= high:
        return
    expected = f"a worst lag between {low} and {high} s (each stall holds the loop {_STALL} s)"
    if value > high:
        raise Mismatch(
            expected,
            f"{value:.3f} s: more than the longest stall ({_STALL} s); the lags were added up",
            [
                "Lags of separate wake-ups do not add up to one worse lag.",
                "Keep the maximum (`max`), not the sum.",
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
            "Measure every wake-up, for the whole `duration`.",
            "In a loop: note `asked = loop.time() + interval`, `await asyncio.sleep(interval)`, "
            "then `lag = loop.time() - asked`; keep the largest.",
        ],
    )


def check_loop_lag_probe(max_loop_lag: Callable[..., Awaitable[float]]) -> None:
    """Check Exercise 1.2: ``await max_loop_lag(duration, interval)`` returns the worst loop lag.

    Runs the probe on a fresh event loop (in a thread of the check's own): idle for 0.5 s, where
    it must report < 0.03 s and must not hold up a heartbeat task on the same loop; then while the
    loop is blocked three times for 0.2 s (``time.sleep`` scheduled with ``call_later``), where the
    worst lag is 0.15–0.2 s (accepted: 0.14–0.38 s).
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
            f"a loop blocked three times for {_STALL} s shows a worst lag of about {_STALL} s",
            lambda: _check_probe_stalled(max_loop_lag),
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 1.3: the right offload for each kind of work
# ---------------------------------------------------------------------------------------------------

_HASH_MB = 8
_PRIMES_BELOW = 20_000
_IO_CLIENT = LegacyPriceClient(delay=0.02)


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


def sha256_where(data: bytes) -> Ran:
    """SHA-256 of ``data`` (C code that releases the GIL on large buffers), reporting where it ran."""
    return _ran(hashlib.sha256(data).hexdigest())


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
        f"GIL-releasing C code (`hashlib.sha256` of {_HASH_MB} MB)",
        sha256_where,
        lambda: (bytes(_HASH_MB * 1024 * 1024),),
        "thread",
        lambda: hashlib.sha256(bytes(_HASH_MB * 1024 * 1024)).hexdigest(),
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
    "thread": "in a worker thread of this process",
    "process": "in another process",
}


@dataclass
class _Outcome:
    value: Any = None
    error: BaseException | None = None
    awaitable: bool = True


async def _offload_each(run_offloaded: Callable[..., Any]) -> dict[str, _Outcome]:
    outcomes: dict[str, _Outcome] = {}
    for work in _WORKLOADS:
        outcome = outcomes[work.kind] = _Outcome()
        try:
            result = run_offloaded(work.kind, work.func, *work.args())
            outcome.awaitable = inspect.isawaitable(result)
            outcome.value = await result if outcome.awaitable else result
        except Exception as exc:
            outcome.error = exc
    return outcomes


def _judge(work: _Workload, outcome: _Outcome) -> None:
    if outcome.error is not None:
        raise outcome.error
    value = outcome.value
    expect(
        outcome.awaitable,
        "an awaitable from `run_offloaded(…)`",
        f"it returned {short(value)} without awaiting",
        "Define it with `async def` and `await` the thread or the process.",
    )
    expect(
        isinstance(value, Ran) and value.result == work.expected(),
        "run_offloaded to return what `func(*args)` returned",
        short(value),
        "`return await …` the result of the offloaded call.",
    )
    place = "loop" if value.on_event_loop else ("process" if value.pid != os.getpid() else "thread")
    if place != work.right:
        seen, hints = work.messages[place]
        raise Mismatch(f"{work.label} to run {_PLACES[work.right]}", seen, hints)


def check_offload_choice(run_offloaded: Callable[..., Awaitable[Any]]) -> None:
    """Check Exercise 1.3: ``await run_offloaded(kind, func, *args)`` runs each kind of work right.

    Calls it on a fresh event loop with three importable workloads that report where they ran
    (process id, thread, on an event loop or not): ``"blocking_io"`` must run in a worker thread,
    ``"python_cpu"`` in another process, ``"gil_releasing"`` in a worker thread.
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
        outcomes: dict[str, _Outcome] = {}

        def judge(work: _Workload) -> None:
            if not outcomes:  # the first step runs all three, on one loop (one process start)
                outcomes.update(_offload_all(run_offloaded))
            _judge(work, outcomes[work.kind])

        for work in _WORKLOADS:
            passed = ex.step(
                f'"{work.kind}": {work.label} runs {_PLACES[work.right]}', lambda work=work: judge(work)
            )
            if not passed and not outcomes:
                return


def _offload_all(run_offloaded: Callable[..., Any]) -> dict[str, _Outcome]:
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
