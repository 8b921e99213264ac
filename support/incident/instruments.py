"""The instruments the system carries, the course's own: what a learner reads to find the faults.

- request IDs: each service's pure ASGI middleware (chapter 3) accepts a sane incoming
  ``X-Request-ID`` or makes one, keeps it in the ``request_id`` context variable and echoes it;
- logs: every line of the ``ch07`` loggers is kept with its service, request ID and extra fields
  (``LogBook``), never printed from a server's thread;
- a loop-lag heartbeat per service (chapter 1): a task that asks to sleep 10 ms and records how late
  it woke; a blocked loop wakes it late;
- cache counters (chapter 5): hits, misses, sets and deletes of the orders service's Redis client,
  counted by wrapping the client, whatever the code that calls it, with a span per command;
- a span per SQL statement (chapter 4), from SQLAlchemy's cursor events, beside ``PoolWatch``;
- queue counters (chapter 2): jobs enqueued, attempts, done, retried, failed for good.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
import uuid
from collections import Counter
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.trace import Tracer
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "CacheCounters",
    "Heartbeat",
    "LogBook",
    "LogLine",
    "QueueCounters",
    "RequestIDMiddleware",
    "add_query_spans",
    "count_cache",
    "current_request_id",
    "request_id",
]

request_id: ContextVar[str] = ContextVar("ch07_request_id", default="-")
SANE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def current_request_id() -> str:
    """The ID of the request being served ("-" outside a request)."""
    return request_id.get()


class RequestIDMiddleware:
    """Pure ASGI middleware: the request's ID in ``request_id`` and in the response's X-Request-ID."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if SANE_ID.fullmatch(incoming) else uuid.uuid4().hex

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        token = request_id.set(rid)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


@dataclass(frozen=True)
class LogLine:
    """One log record as the system keeps it."""

    at: float  # time.perf_counter() when logged
    service: str  # gateway-a, gateway-b, orders, worker
    level: str
    request_id: str
    message: str
    fields: dict[str, Any]

    def __str__(self) -> str:
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return f"{self.level:7} {self.service:9} [{self.request_id}] {self.message}" + (
            f" ({extra})" if extra else ""
        )


class LogBook(logging.Handler):
    """Keeps what the ``ch07`` loggers log (not printed: servers run on other threads).

    The request ID is read in the logging call, on the thread and in the context that logs; the
    service is the logger's last name part, or the ``service`` extra field.
    """

    FIELDS = ("order_id", "product_id", "job", "attempt", "client")

    def __init__(self, logger_name: str = "ch07") -> None:
        super().__init__(level=logging.INFO)
        self.logger = logging.getLogger(logger_name)
        self.lines: list[LogLine] = []
        self._lock = threading.Lock()

    def attach(self) -> None:
        for handler in list(self.logger.handlers):
            if isinstance(handler, LogBook):
                self.logger.removeHandler(handler)
        self.logger.addHandler(self)
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False

    def detach(self) -> None:
        self.logger.removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        service = getattr(record, "service", None) or record.name.rsplit(".", 1)[-1]
        fields = {name: getattr(record, name) for name in self.FIELDS if hasattr(record, name)}
        line = LogLine(
            record.created - time.time() + time.perf_counter(),
            service,
            record.levelname,
            getattr(record, "request_id", None) or request_id.get(),
            record.getMessage(),
            fields,
        )
        with self._lock:
            self.lines.append(line)

    def clear(self) -> None:
        with self._lock:
            self.lines.clear()

    def snapshot(self) -> list[LogLine]:
        with self._lock:
            return list(self.lines)


class Heartbeat:
    """A task on a service's loop that sleeps ``interval`` s again and again and records how late it woke.

    ``samples`` holds ``(time.perf_counter() at waking, lag in seconds)``. A loop that runs other
    callbacks promptly wakes it within a millisecond or two; a loop blocked by a synchronous call wakes
    it as late as the call was long.
    """

    def __init__(self, service: str, interval: float = 0.01) -> None:
        self.service = service
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _beat(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.samples.append((now, max(0.0, now - asked - self.interval)))
            if len(self.samples) > 200_000:
                del self.samples[:100_000]

    def lags(self, since: float = 0.0, until: float = float("inf")) -> list[float]:
        """The lags (seconds) recorded between ``since`` and ``until`` (``time.perf_counter()``)."""
        return [lag for at, lag in list(self.samples) if since <= at <= until]

    def worst(self, since: float = 0.0, until: float = float("inf")) -> float:
        return max(self.lags(since, until), default=0.0)


@dataclass
class CacheCounters:
    """What the orders service asked its Redis cache: hits, misses, sets, deletes (and by key prefix)."""

    hits: int = 0
    misses: int = 0
    sets: int = 0
    deletes: int = 0
    keys: Counter[str] = field(default_factory=Counter)

    def reset(self) -> None:
        self.hits = self.misses = self.sets = self.deletes = 0
        self.keys.clear()

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")

    def __repr__(self) -> str:
        return (
            f"<CacheCounters hits={self.hits} misses={self.misses} hit ratio={self.hit_ratio:.0%} "
            f"sets={self.sets} deletes={self.deletes}>"
        )


def count_cache(client: Any, counters: CacheCounters, tracer: Tracer) -> None:
    """Count ``client``'s GET/SET/DEL commands in ``counters``, each in a span ``redis GET`` etc."""
    execute = client.execute_command

    async def counted(*args: Any, **options: Any) -> Any:
        command = str(args[0]).upper() if args else "?"
        with tracer.start_as_current_span(f"redis {command}") as span:
            if len(args) > 1:
                span.set_attribute("db.key", str(args[1]))
            result = await execute(*args, **options)
        if command == "GET":
            if result is None:
                counters.misses += 1
            else:
                counters.hits += 1
        elif command == "SET":
            counters.sets += 1
        elif command in ("DEL", "UNLINK"):
            counters.deletes += 1
        if len(args) > 1:
            counters.keys[str(args[1]).rsplit(":", 1)[0]] += 1
        return result

    client.execute_command = counted


def add_query_spans(engine: AsyncEngine, tracer: Tracer) -> None:
    """A span per SQL statement (``db SELECT``, ``db UPDATE``…), child of whatever span runs it."""
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "before_cursor_execute")
    def _start(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool) -> None:
        verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "SQL"
        span = tracer.start_span(f"db {verb}", attributes={"db.statement": statement[:200]})
        context._ch07_span = span

    @event.listens_for(sync_engine, "after_cursor_execute")
    def _end(_conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool) -> None:
        span = getattr(context, "_ch07_span", None)
        if span is not None:
            span.end()
            context._ch07_span = None

    @event.listens_for(sync_engine, "handle_error")
    def _failed(exception_context: Any) -> None:
        context = exception_context.execution_context
        span = getattr(context, "_ch07_span", None) if context is not None else None
        if span is not None:
            span.set_attribute("error", True)
            span.end()
            context._ch07_span = None


@dataclass
class QueueCounters:
    """What happened to the confirmation jobs: enqueued, attempts, done, retried, failed for good."""

    enqueued: int = 0
    attempts: int = 0
    done: int = 0
    retried: int = 0
    failed: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def reset(self) -> None:
        with self._lock:
            self.enqueued = self.attempts = self.done = self.retried = self.failed = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def as_dict(self) -> dict[str, int]:
        return {
            "enqueued": self.enqueued,
            "attempts": self.attempts,
            "done": self.done,
            "retried": self.retried,
            "failed": self.failed,
        }

    def __repr__(self) -> str:
        return "<QueueCounters " + " ".join(f"{k}={v}" for k, v in self.as_dict().items()) + ">"
