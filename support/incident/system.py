"""Start and stop the incident's system, in this process, and read its instruments.

    system = start_system(seed=0)                 # the seed's five faults planted
    system = start_system(overrides={"orders.get_product": my_get_product})
    with start_system(faults=[]) as system: …     # no fault at all

What runs: the orders service (uvicorn on a thread), two gateway instances in front of it, a SAQ
worker on its own thread and loop, an OpenTelemetry tracer provider per service (spans kept in memory,
and copied to a slow "collector" exporter as production would), a log book of every ``ch07`` log
line, and a loop-lag heartbeat per server. ``stop()`` ends all of it, deletes the chapter's Redis keys
and leaves no thread, server or socket behind; starting another system stops the one before.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan

from support.backends import describe_redis
from support.database import PoolWatch, describe_database, fresh_database
from support.incident.context import Settings
from support.incident.faults import Fault, plan, resolve
from support.incident.gateway import build_gateway
from support.incident.instruments import CacheCounters, Heartbeat, LogBook, LogLine, QueueCounters
from support.incident.orders import QUEUE, build_orders
from support.incident.seams import SEAMS, SeamTable, check_replacement, seam_source
from support.incident.vendor import PaymentsClient, ShippingClient
from support.incident.worker import make_job
from support.queues import start_worker
from support.server import Server, serve
from support.telemetry import SlowExporter, Tracing, by_trace, tracing
from support.thirdparty import EmailProvider
from support.workers import BackgroundLoop

__all__ = ["GATEWAYS", "SERVICES", "System", "running_system", "start_system"]

GATEWAYS = ("gateway-a", "gateway-b")
SERVICES = (*GATEWAYS, "orders")
COLLECTOR_DELAY = 0.008  # seconds per export call: a tracing collector across a network

_current: System | None = None
_current_lock = threading.Lock()


class System:
    """A running incident system: its URLs, its seams, and the instruments to diagnose it.

    Instruments: ``traces()`` / ``spans()`` (both services), ``pool`` (the orders database's
    ``PoolWatch``), ``cache`` (hits, misses, sets, deletes), ``jobs`` (enqueued, attempts, done,
    retried, failed), ``emails`` (the provider: what was really sent), ``collector`` (the tracing
    collector's export calls, by thread), ``logs()`` (every line, with service and request ID),
    ``loop_lag(service)`` (the heartbeat). ``clear()`` resets them all.
    """

    def __init__(
        self,
        seed: int | None,
        planted: list[Fault],
        versions: dict[str, Callable[..., Any]],
        overridden: set[str],
        settings: Settings,
    ) -> None:
        self.seed = seed
        self.settings = settings
        self._planted = planted
        self._overridden = overridden
        self._seams = SeamTable(versions)
        self.cache = CacheCounters()
        self.jobs = QueueCounters()
        self.emails = EmailProvider(delay=settings.email_delay, fail_every=settings.email_fail_every)
        self.shipping = ShippingClient()
        self.payments = PaymentsClient()
        self.collector = SlowExporter(COLLECTOR_DELAY)
        self.heartbeats = {service: Heartbeat(service) for service in SERVICES}
        self.log_book = LogBook()
        self.database_url = fresh_database("ch07")
        self._gateway_tracing: Tracing | None = None
        self._orders_tracing: Tracing | None = None
        self._orders: Server | None = None
        self._gateways: dict[str, Server] = {}
        self._worker: BackgroundLoop | None = None
        self.stopped = False

    # --- lifecycle ------------------------------------------------------------------------------

    def _start(self) -> None:
        self._threads_before = set(threading.enumerate())
        self.log_book.attach()
        self._gateway_tracing = tracing("gateway", name="ch07")
        self._orders_tracing = tracing("orders", name="ch07")
        self._gateway_tracing.provider.add_span_processor(self._seams["gateway.export_spans"](self.collector))
        orders_app = build_orders(
            database_url=self.database_url,
            seams=self._seams,
            settings=self.settings,
            tracing=self._orders_tracing,
            heartbeat=self.heartbeats["orders"],
            cache=self.cache,
            jobs=self.jobs,
            shipping=self.shipping,
            payments=self.payments,
        )
        self._orders = serve(orders_app, name="ch07-orders", graceful_timeout=2.0)
        job = make_job(seams=self._seams, settings=self.settings, emails=self.emails, counters=self.jobs)
        self._worker = start_worker(QUEUE, [job], concurrency=10, sweep_every=60, name="ch07-worker")
        for instance in GATEWAYS:
            app = build_gateway(
                instance,
                orders_url=self._orders.url,
                seams=self._seams,
                settings=self.settings,
                tracing=self._gateway_tracing,
                heartbeat=self.heartbeats[instance],
            )
            self._gateways[instance] = serve(app, name=f"ch07-{instance}", graceful_timeout=2.0)

    def stop(self) -> None:
        """Stop everything the system started (gateways, worker, orders, tracing); safe to call twice."""
        global _current
        if self.stopped:
            return
        self.stopped = True
        errors: list[BaseException] = []
        parts: list[Any] = [*self._gateways.values(), self._worker, self._orders]
        parts += [self._gateway_tracing, self._orders_tracing]
        for part in parts:
            if part is None:
                continue
            try:
                part.stop()
            except Exception as exc:  # stop the rest, then report
                errors.append(exc)
        self.log_book.detach()
        self._join_threads()
        with _current_lock:
            if _current is self:
                _current = None
        if errors:
            raise RuntimeError(f"the system did not stop cleanly: {errors}") from errors[0]

    def restart(self) -> None:
        """Start this system again as it was (seed, faults, overrides, settings), with fresh instruments.

        A check runs a system of its own, and only one system runs at a time (they share Redis keys
        and a queue): the check stops the learner's and restarts it afterwards with this.
        """
        global _current
        self.stop()
        with _current_lock:
            previous, _current = _current, None
        if previous is not None:
            previous.stop()
        versions = dict(self._seams)
        self.__init__(self.seed, self._planted, versions, set(self._overridden), self.settings)  # type: ignore[misc]
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        with _current_lock:
            _current = self

    def _join_threads(self, grace: float = 3.0) -> None:
        """Wait (up to ``grace`` s in all) for threads started since ``_start`` to end: the servers'
        loops have closed, but AnyIO's idle worker threads and the database driver's connection threads
        end a moment later, and a system must leave none behind."""
        before = getattr(self, "_threads_before", None)
        if before is None:
            return
        deadline = time.monotonic() + grace
        for thread in threading.enumerate():
            if thread not in before and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        servers = [self._orders, *self._gateways.values()]
        return not self.stopped and all(s is not None and s.running for s in servers)

    # --- where it is ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The first gateway's URL: where the public sends its requests."""
        return self._gateways[GATEWAYS[0]].url

    @property
    def urls(self) -> dict[str, str]:
        """Every service's URL (the two gateways and, behind them, the orders service)."""
        assert self._orders is not None
        return {**{name: server.url for name, server in self._gateways.items()}, "orders": self._orders.url}

    @property
    def servers(self) -> dict[str, Server]:
        """The uvicorn servers, by service name."""
        assert self._orders is not None
        return {**self._gateways, "orders": self._orders}

    # --- seams ----------------------------------------------------------------------------------

    @property
    def seams(self) -> list[str]:
        """The seams' names (``service.function``)."""
        return list(SEAMS)

    def seam(self, name: str) -> Callable[..., Any]:
        """The version of seam ``name`` this system runs."""
        return self._seams[name]

    def seam_source(self, name: str) -> str:
        """The source code of the version of seam ``name`` this system runs."""
        return seam_source(name, self._seams[name])

    def describe_seams(self) -> str:
        """One line per seam: its name, signature and what it does (not whether it is faulty)."""
        width = max(map(len, SEAMS))
        return "\n".join(f"{name:{width}}  {seam.summary}" for name, seam in SEAMS.items())

    def overridden(self) -> set[str]:
        """The seams replaced by ``overrides`` at start."""
        return set(self._overridden)

    def answer_key(self) -> list[Fault]:
        """The faults planted and not overridden: for instructors and the checks, not for the drill."""
        return [f for f in self._planted if f.seam not in self._overridden]

    # --- instruments ----------------------------------------------------------------------------

    @property
    def pool(self) -> PoolWatch:
        """The orders database pool's ``PoolWatch``: in use, peak, opened, queries, holds."""
        assert self._orders is not None
        return self._orders.app.state.pool

    def spans(self) -> list[ReadableSpan]:
        """Every finished span of both services, oldest first."""
        assert self._gateway_tracing is not None and self._orders_tracing is not None
        found = self._gateway_tracing.spans() + self._orders_tracing.spans()
        return sorted(found, key=lambda s: s.start_time or 0)

    def traces(self) -> dict[str, list[ReadableSpan]]:
        """The spans grouped by trace ID (``support.telemetry.by_trace``)."""
        return by_trace(self.spans())

    def logs(self, *, service: str | None = None, request_id: str | None = None) -> list[LogLine]:
        """The log lines so far, optionally only one service's or one request's."""
        return [
            line
            for line in self.log_book.snapshot()
            if (service is None or line.service == service)
            and (request_id is None or line.request_id == request_id)
        ]

    def loop_lag(self, service: str, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """The heartbeat's lags (seconds) on ``service``'s loop between ``since`` and ``until``."""
        return self.heartbeats[service].lags(since, until)

    def clear(self) -> None:
        """Reset every instrument: spans, logs, counters, the pool's counts, the heartbeats' samples."""
        assert self._gateway_tracing is not None and self._orders_tracing is not None
        self._gateway_tracing.clear()
        self._orders_tracing.clear()
        self.log_book.clear()
        self.cache.reset()
        self.jobs.reset()
        self.emails.reset()
        self.pool.reset()
        self.shipping.reset_reads()
        with self.collector._lock:
            self.collector.calls = 0
            self.collector.spans.clear()
            self.collector.threads.clear()
        for heartbeat in self.heartbeats.values():
            heartbeat.samples.clear()

    def describe(self) -> str:
        """Where the system runs, on which stores (never which faults)."""
        lines = [f"{name:9} {url}" for name, url in self.urls.items()]
        lines.append(f"database  {describe_database(self.database_url)}")
        lines.append(f"redis     {describe_redis()}")
        lines.append(f"worker    SAQ queue {QUEUE!r}, 10 jobs at a time")
        return "\n".join(lines)

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else "running"
        seed = "faults chosen by hand" if self.seed is None else f"seed {self.seed}"
        return f"<System {seed}, {state}, gateway at {self.url if self._gateways else '-'}>"


def start_system(
    seed: int = 0,
    overrides: Mapping[str, Callable[..., Any]] | None = None,
    *,
    faults: Iterable[str | Fault] | None = None,
    settings: Settings | None = None,
) -> System:
    """Start the system with ``seed``'s faults planted, and ``overrides`` replacing seams.

    ``overrides`` maps a seam's name to a function with the seam's signature (``system.seams`` and
    ``system.describe_seams()`` list them): the learner's fix. ``faults`` plants exactly these faults
    (ids from ``support.incident.POOL``) instead of the seed's plan; ``faults=[]`` plants none.
    ``settings`` changes the system's fixed numbers (``Settings``: the rate limit, the pool...), for
    experiments: the report's objectives were measured with the defaults. A system already running
    (from an earlier cell) is stopped first. Use it as a context manager, or call ``stop()``.
    """
    global _current
    planted = resolve(faults) if faults is not None else plan(seed)
    versions = {name: seam.healthy for name, seam in SEAMS.items()}
    for f in planted:
        versions[f.seam] = f.version
    overrides = dict(overrides or {})
    for name, function in overrides.items():
        check_replacement(name, function)
        versions[name] = function
    with _current_lock:
        previous, _current = _current, None
    if previous is not None:
        previous.stop()
    chosen_by = seed if faults is None else None  # None: faults chosen by hand
    system = System(chosen_by, planted, versions, set(overrides), settings or Settings())
    try:
        system._start()
    except BaseException:
        system.stop()
        raise
    with _current_lock:
        _current = system
    return system


def running_system() -> System | None:
    """The system started last, if it is still running."""
    system = _current
    return system if system is not None and system.running else None


async def wait_until_async(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` every 20 ms for up to ``timeout`` s without blocking the loop; its last value."""
    deadline = time.perf_counter() + timeout
    while not condition():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
