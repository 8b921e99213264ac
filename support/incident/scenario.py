"""The traffic scenario: a few seconds of a shop's day, fired at the running system.

Eight clients at once, each a series of ``support.load`` runs (``asyncio.gather`` runs them side by
side): shoppers reading product pages in two currencies, a pricing tool changing the prices of the
most read products, a checkout placing orders (each enqueues a confirmation email), account pages
listing orders, shipping quotes, one heavy client spread over both gateway instances, an anonymous
client that sends a made-up ``X-Forwarded-For`` with every request, and a burst of a partner's
requests halfway through.

Bounded whatever the faults: each client sends in runs of about half a second and starts no run
after ``seconds``; a request the wave would still send after ``seconds`` goes to the gateway's
``/health`` instead (not rate limited, not forwarded, not recorded), and a request gives up after
``REQUEST_TIMEOUT`` s (the gateway's own call to the orders service after 3 s). So the traffic ends by
``seconds`` + ``REQUEST_TIMEOUT`` and a few health checks at worst. Then the scenario waits up to
``DRAIN_TIMEOUT`` s for the queue to finish the jobs the orders enqueued, and takes a snapshot of the
instruments: the report is computed from the snapshot alone.

Everything the report counts is recorded here, from the client's side: each request's absolute start
and end (``time.perf_counter()``), the price each write committed and when its answer came back, the
price and currency each read returned.

The garbage collector is paused during the traffic (``gc.disable()``, re-enabled at the end; reference
counting still frees almost everything): a full collection of the kernel's heap (matplotlib, earlier
cells' results, the spans kept in memory) stops every thread of the process for 30–110 ms, measured
on the course's machine, which the heartbeats would report as the services' loop lag and the
percentiles as their latency. In production each service is a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from support import loadgen
from support.backends import redis_client
from support.incident.instruments import Heartbeat, LogLine
from support.incident.model import CURRENCIES, CUSTOMERS, HOT_PRODUCTS
from support.incident.system import GATEWAYS, SERVICES, System, wait_until_async
from support.loadgen import LoadResult, RequestRecord, load

__all__ = ["ROUTES", "Call", "ClientSpec", "ScenarioRun", "run_scenario"]

REQUEST_TIMEOUT = 4.0  # seconds a client waits for one answer (the gateway gives up after 3)
# Seconds the scenario waits, at most, for the queue to finish the jobs enqueued: a loaded machine needed
# more than 3; a healthy queue is done at once, so the wait costs only when jobs are stuck.
DRAIN_TIMEOUT = 10.0
WAVE = 0.5  # seconds of traffic per load() call of a client
FIRST_PRICE = 5000  # the price writes start from (every product starts below it), rising one cent a write

AFTER_DEADLINE = "after the deadline"  # the route of the /health requests that fill a wave's end

ROUTES = (
    "GET /products/{id}",
    "PUT /products/{id}/price",
    "POST /orders",
    "GET /orders",
    "GET /quote/{id}",
)


@dataclass(frozen=True)
class Call:
    """One request as a client builds it: route, path, and what the report needs to judge its answer."""

    route: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    product_id: int | None = None
    currency: str | None = None
    price_cents: int | None = None  # for a price change: the price it writes


@dataclass(frozen=True)
class ClientSpec:
    """A client of the scenario: how it builds its i-th request, how many at once, how often."""

    name: str
    method: str
    build: Callable[[int], Call]
    concurrency: int
    interval: float
    gateways: tuple[str, ...] = (GATEWAYS[0],)
    start: float = 0.0  # seconds after the scenario's start
    requests: int | None = None  # a fixed number (a burst), instead of until the scenario's end


@dataclass(frozen=True)
class Sent:
    """One request of the scenario and its answer (times in seconds since the scenario started)."""

    client: str
    gateway: str
    call: Call
    start: float
    end: float
    status: int
    error: str | None
    body: bytes

    @property
    def latency(self) -> float:
        return self.end - self.start

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


@dataclass
class ScenarioRun:
    """What one scenario sent, what came back, and the system's instruments right after.

    ``requests`` holds every request; ``by_client()`` and ``by_route()`` regroup them as
    ``LoadResult``s (times since the scenario's start) for the course's plots. The rest is the
    instruments' snapshot: ``jobs`` (queue counters), ``emails_sent`` (order IDs whose confirmation the
    provider accepted), ``logs``, ``loop_lag`` (per service, ``(seconds since start, lag)``), ``pool``,
    ``cache``, ``collector`` (export calls by thread), ``ratelimit_keys`` (every rate-limit counter
    seen in Redis during the traffic, ``ch07:ratelimit:<client key>:<window>``: they expire 2 s after
    their window, so the scenario looks every 0.25 s).
    """

    seconds: float
    t0: float  # time.perf_counter() at the scenario's start
    clock_offset: float  # time.time() - time.perf_counter(): turns the requests' times into wall-clock time
    traffic_wall: float  # seconds from the start to the last answer
    drain_wall: float  # seconds waited for the queue afterwards
    requests: list[Sent]
    settings: Any
    jobs: dict[str, int]
    emails_sent: set[int]
    logs: list[LogLine]
    loop_lag: dict[str, list[tuple[float, float]]]
    pool: dict[str, Any]
    cache: dict[str, Any]
    collector: dict[str, Any]
    ratelimit_keys: list[str] = field(default_factory=list)  # the limiter's counters seen in Redis
    system: System | None = field(default=None, repr=False)

    def by_client(self) -> dict[str, LoadResult]:
        """One ``LoadResult`` per client (every request, refused ones included)."""
        return self._group(lambda r: r.client)

    def by_route(self, *, admitted_only: bool = True) -> dict[str, LoadResult]:
        """One ``LoadResult`` per route, in ``ROUTES`` order; without the 429s unless asked."""
        kept = [r for r in self.requests if not (admitted_only and r.status == 429)]
        groups = self._group(lambda r: r.call.route, kept)
        return {route: groups[route] for route in ROUTES if route in groups}

    def _group(self, key: Callable[[Sent], str], requests: list[Sent] | None = None) -> dict[str, LoadResult]:
        groups: dict[str, list[Sent]] = {}
        for r in self.requests if requests is None else requests:
            groups.setdefault(key(r), []).append(r)
        results = {}
        for name, sent in groups.items():
            records = [
                RequestRecord(i, r.start, r.end, r.status, r.error, r.body)
                for i, r in enumerate(sorted(sent, key=lambda r: r.start))
            ]
            wall = max(r.end for r in sent) - min(r.start for r in sent)
            results[name] = LoadResult(name, 1, wall, records)
        return results

    def __repr__(self) -> str:
        return (
            f"<ScenarioRun {len(self.requests)} requests in {self.traffic_wall:.1f} s "
            f"(+{self.drain_wall:.1f} s for the queue)>"
        )


def clients(seconds: float, seed: int = 7) -> list[ClientSpec]:
    """The scenario's clients (the same traffic for every system seed)."""
    rng = random.Random(seed)
    hot = list(range(1, HOT_PRODUCTS + 1))
    weights = [1 / k for k in hot]  # Zipf: product 1 is read most
    reads = rng.choices(hot, weights=weights, k=5000)
    currencies = list(CURRENCIES)
    writes = [0]

    def shopper(i: int) -> Call:
        product, currency = reads[i % len(reads)], currencies[(i // 3) % 2]
        key = f"shopper-{1 + i % 8}"
        return Call(
            "GET /products/{id}",
            f"/products/{product}?currency={currency}",
            {"X-API-Key": key},
            product_id=product,
            currency=currency,
        )

    def pricing(i: int) -> Call:
        writes[0] += 1
        product = 1 + i % 10  # the ten most read products
        price = FIRST_PRICE + writes[0]
        return Call(
            "PUT /products/{id}/price",
            f"/products/{product}/price?price_cents={price}",
            {"X-API-Key": "pricing"},
            product_id=product,
            price_cents=price,
        )

    def checkout(i: int) -> Call:
        customer, product = f"customer-{i % CUSTOMERS}", reads[(7 * i) % len(reads)]
        return Call(
            "POST /orders",
            f"/orders?customer={customer}&product_id={product}&quantity={1 + i % 3}",
            {"X-API-Key": f"checkout-{1 + i % 4}"},
            product_id=product,
        )

    def account(i: int) -> Call:
        return Call("GET /orders", f"/orders?customer=customer-{i % CUSTOMERS}", {"X-API-Key": "account"})

    def shipping(i: int) -> Call:
        product = reads[(13 * i) % len(reads)]
        return Call(
            "GET /quote/{id}",
            f"/quote/{product}?postcode={1000 + (i * 7919) % 9000}",
            {"X-API-Key": "shipping"},
            product_id=product,
        )

    def reader(key: str | Callable[[int], str] | None) -> Callable[[int], Call]:
        def build(i: int) -> Call:
            product = reads[(31 * i) % len(reads)]
            if key is None:  # anonymous, and a new made-up address in X-Forwarded-For every time
                headers = {"X-Forwarded-For": f"198.51.100.{i % 250}"}
            else:
                headers = {"X-API-Key": key(i) if callable(key) else key}
            return Call(
                "GET /products/{id}",
                f"/products/{product}?currency=USD",
                headers,
                product_id=product,
                currency="USD",
            )

        return build

    return [
        ClientSpec("shoppers", "GET", shopper, concurrency=3, interval=0.15),
        ClientSpec("pricing", "PUT", pricing, concurrency=1, interval=0.25, start=0.4),
        ClientSpec("checkout", "POST", checkout, concurrency=3, interval=0.4, start=0.05),
        ClientSpec("account", "GET", account, concurrency=1, interval=0.25, start=0.1),
        ClientSpec("shipping", "GET", shipping, concurrency=1, interval=0.25, start=0.15),
        # 12.5 requests/s each (per gateway for the heavy client), with room for slow answers
        ClientSpec("heavy", "GET", reader("heavy"), concurrency=3, interval=0.24, gateways=GATEWAYS),
        ClientSpec("spoofer", "GET", reader(None), concurrency=3, interval=0.24, start=0.03),
        ClientSpec(
            "burst",
            "GET",
            reader(lambda i: f"partner-{1 + i % 4}"),
            concurrency=20,
            interval=0.0,
            start=seconds / 2,
            requests=20,
        ),
    ]


async def _run_client(
    system: System, spec: ClientSpec, gateway: str, t0: float, deadline: float, sent: list[Sent]
) -> None:
    """Send ``spec``'s requests to ``gateway`` until ``deadline`` (or its fixed number, a burst).

    A steady client runs one lane per worker, each one request at a time and started a fraction of the
    interval after the one before: requests arrive spread out, as from independent users, rather than
    in step (in step, three orders would take the pool together and free it together).
    """
    if spec.requests is not None or spec.interval <= 0:
        await _run_lane(system, spec, gateway, t0, deadline, sent, lane=0, lanes=1, offset=0.0)
        return
    await asyncio.gather(
        *(
            _run_lane(
                system,
                spec,
                gateway,
                t0,
                deadline,
                sent,
                lane=k,
                lanes=spec.concurrency,
                offset=k * spec.interval / spec.concurrency,
            )
            for k in range(spec.concurrency)
        )
    )


async def _run_lane(
    system: System,
    spec: ClientSpec,
    gateway: str,
    t0: float,
    deadline: float,
    sent: list[Sent],
    *,
    lane: int,
    lanes: int,
    offset: float,
) -> None:
    """One lane of a client: ``load()`` runs of about ``WAVE`` s each, until ``deadline``."""
    url = system.urls[gateway]
    concurrency = spec.concurrency if lanes == 1 else 1
    await asyncio.sleep(max(0.0, t0 + spec.start + offset - time.perf_counter()))
    counter = 0
    remaining = spec.requests
    while time.perf_counter() < deadline and (remaining is None or remaining > 0):
        per_worker = max(1, round(WAVE / spec.interval)) if spec.interval > 0 else 1
        n = concurrency * per_worker if remaining is None else remaining
        calls: dict[int, tuple[Call, float]] = {}
        base = counter

        def path(i: int, base: int = base, calls: dict[int, tuple[Call, float]] = calls) -> str:
            now = time.perf_counter()
            late = spec.requests is None and now >= deadline
            call = Call(AFTER_DEADLINE, "/health") if late else spec.build((base + i) * lanes + lane)
            calls[i] = (call, now)
            return call.path

        def headers(i: int, calls: dict[int, tuple[Call, float]] = calls) -> dict[str, str]:
            return calls[i][0].headers

        wave_start = time.perf_counter()
        result = await load(
            url,
            path,
            requests=n,
            concurrency=min(concurrency, n),
            method=spec.method,
            headers=headers,
            interval=spec.interval or None,
            timeout=REQUEST_TIMEOUT,
            keep_bodies=True,
            label=f"{spec.name} via {gateway}",
        )
        for record in result.records:
            call, started = calls[record.index]
            if call.route == AFTER_DEADLINE:
                continue
            start = started - t0
            sent.append(
                Sent(
                    spec.name,
                    gateway,
                    call,
                    start,
                    start + record.latency,
                    record.status,
                    record.error,
                    record.body,
                )
            )
        counter += n
        if remaining is not None:
            remaining -= n
        if spec.interval > 0:
            await asyncio.sleep(max(0.0, wave_start + per_worker * spec.interval - time.perf_counter()))


class _Quiet(loadgen._Progress):
    """``load()``'s progress line, switched off: the scenario's ~100 short runs would each print one."""

    def __init__(self, label: str, total: int) -> None:
        super().__init__(label, total)
        self.enabled = False


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    original = loadgen._Progress
    loadgen._Progress = _Quiet  # type: ignore[misc]
    try:
        yield
    finally:
        loadgen._Progress = original  # type: ignore[misc]


async def _watch_limiter(stop: asyncio.Event, seen: set[str]) -> None:
    """Collect the names of the limiter's counters in Redis every 0.25 s until ``stop`` is set."""
    client = redis_client(decode_responses=True)
    try:
        while True:
            async for key in client.scan_iter(match="ch07:ratelimit:*", count=1000):
                seen.add(key)
            if stop.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        await client.aclose()


async def run_scenario(
    system: System, *, seconds: float = 4.0, drain_timeout: float = DRAIN_TIMEOUT
) -> ScenarioRun:
    """Fire the scenario's traffic at ``system`` for about ``seconds`` s; returns what happened.

    The system's instruments are cleared first, so the snapshot describes this run alone. Await it
    (``run = await run_scenario(system)``) from a notebook cell or any coroutine.
    """
    if not system.running:
        raise RuntimeError("the system is not running: start it with start_system()")
    system.clear()
    sent: list[Sent] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # no collection pauses the process during the traffic (see above)
    t0 = time.perf_counter()
    clock_offset = time.time() - t0
    deadline = t0 + seconds
    specs = clients(seconds)
    client_heartbeat = Heartbeat("client")
    client_heartbeat.start()
    limiter_keys: set[str] = set()
    stop_watch = asyncio.Event()
    watch = asyncio.create_task(_watch_limiter(stop_watch, limiter_keys))
    try:
        with _quiet_progress():
            await asyncio.gather(
                *(
                    _run_client(system, spec, gateway, t0, deadline, sent)
                    for spec in specs
                    for gateway in spec.gateways
                )
            )
    finally:
        stop_watch.set()
        with contextlib.suppress(Exception):
            await watch
        await client_heartbeat.stop()
        if gc_was_enabled:
            gc.enable()
    traffic_end = time.perf_counter()
    jobs = system.jobs
    await wait_until_async(lambda: jobs.finished >= jobs.enqueued, drain_timeout)
    drained = time.perf_counter()
    sent.sort(key=lambda r: r.start)
    emails_sent = {
        int(m.idempotency_key.split(":")[1]) for m in list(system.emails.sent) if m.idempotency_key
    }
    lags = {
        service: [
            (at - t0, lag) for at, lag in list(system.heartbeats[service].samples) if t0 <= at <= traffic_end
        ]
        for service in SERVICES
    }
    lags["client"] = [(at - t0, lag) for at, lag in client_heartbeat.samples]
    pool = system.pool
    holds = sorted(pool.holds)
    collector = system.collector
    return ScenarioRun(
        seconds=seconds,
        t0=t0,
        clock_offset=clock_offset,
        traffic_wall=traffic_end - t0,
        drain_wall=drained - traffic_end,
        requests=sent,
        settings=system.settings,
        jobs=jobs.as_dict(),
        emails_sent=emails_sent,
        logs=system.logs(),
        loop_lag=lags,
        pool={
            "size": system.settings.pool_size,
            "peak": pool.peak,
            "queries": pool.queries,
            "checkouts": len(holds),
            "hold_p50_ms": 1000 * holds[len(holds) // 2] if holds else math.nan,
            "hold_p90_ms": 1000 * holds[int(0.9 * len(holds))] if holds else math.nan,
            "hold_max_ms": 1000 * holds[-1] if holds else math.nan,
            "holds_over_300ms": sum(hold > 0.3 for hold in holds),
        },
        cache={
            "hits": system.cache.hits,
            "misses": system.cache.misses,
            "sets": system.cache.sets,
            "deletes": system.cache.deletes,
        },
        collector={"calls": collector.calls, "threads": dict(collector.threads)},
        ratelimit_keys=sorted(limiter_keys),
        system=system,
    )
