"""The course's load generator: fire N requests at a given concurrency and record each one.

It is a measuring instrument, so it must not add the latency it measures. httpx's ``AsyncClient``
spends most of a request in connection-pool bookkeeping (a few hundred requests/s in one process);
this client keeps one keep-alive connection per concurrent worker, writes pre-built request bytes
and parses responses with httptools' C parser. ``python course.py bench`` measures it against wrk
and against the ideal; lesson code keeps using httpx, the client learners use in their own apps.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools

__all__ = ["LoadResult", "RequestRecord", "load"]

PathSpec = str | Callable[[int], str]
HeaderSpec = Mapping[str, str] | Callable[[int], Mapping[str, str]] | None


@dataclass(frozen=True)
class RequestRecord:
    """One request: when it started and ended (seconds since the run's start), and how it went.

    ``status`` is the HTTP status, or 0 when no response came (``error`` says why).
    """

    index: int
    start: float
    end: float
    status: int
    error: str | None = None
    body: bytes = b""

    @property
    def latency(self) -> float:
        return self.end - self.start


@dataclass
class LoadResult:
    """Every request of one run, with the summaries the chapters print and plot."""

    label: str
    concurrency: int
    wall: float
    records: list[RequestRecord] = field(repr=False)

    @property
    def latencies(self) -> list[float]:
        return [r.latency for r in self.records]

    @property
    def starts(self) -> list[float]:
        return [r.start for r in self.records]

    @property
    def ends(self) -> list[float]:
        return [r.end for r in self.records]

    @property
    def statuses(self) -> Counter[int]:
        return Counter(r.status for r in self.records)

    @property
    def errors(self) -> Counter[str]:
        return Counter(r.error for r in self.records if r.error)

    @property
    def ok(self) -> int:
        """How many requests got a 2xx response."""
        return sum(200 <= r.status < 300 for r in self.records)

    @property
    def rps(self) -> float:
        return len(self.records) / self.wall if self.wall > 0 else float("nan")

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile of latency in seconds (nearest rank, ``p`` in 0–100)."""
        values = sorted(self.latencies)
        if not values:
            return float("nan")
        rank = max(1, min(len(values), math.ceil(p / 100 * len(values))))
        return values[rank - 1]

    @property
    def p50(self) -> float:
        return self.percentile(50)

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def max(self) -> float:
        return max(self.latencies, default=float("nan"))

    def summary(self) -> dict[str, Any]:
        """The numbers of the compact table, as plain values (seconds, requests/s)."""
        return {
            "label": self.label,
            "requests": len(self.records),
            "concurrency": self.concurrency,
            "wall_s": round(self.wall, 4),
            "rps": round(self.rps, 1),
            "p50_ms": round(self.p50 * 1000, 1),
            "p90_ms": round(self.p90 * 1000, 1),
            "p99_ms": round(self.p99 * 1000, 1),
            "max_ms": round(self.max * 1000, 1),
            "statuses": dict(sorted(self.statuses.items())),
        }

    def _status_text(self) -> str:
        parts = [f"{n}×{'error' if code == 0 else code}" for code, n in sorted(self.statuses.items())]
        return ", ".join(parts)

    def __str__(self) -> str:
        s = self.summary()
        return (
            f"{self.label}: {s['requests']} requests at concurrency {s['concurrency']} in "
            f"{s['wall_s']:.3f} s ({s['rps']:,.0f} req/s) · latency p50 {s['p50_ms']:.1f} ms, "
            f"p99 {s['p99_ms']:.1f} ms, max {s['max_ms']:.1f} ms · {self._status_text()}"
        )

    def _repr_html_(self) -> str:
        s = self.summary()
        cells = [
            ("requests", f"{s['requests']:,}"),
            ("concurrency", f"{s['concurrency']}"),
            ("wall", f"{s['wall_s']:.3f} s"),
            ("throughput", f"{s['rps']:,.0f} req/s"),
            ("p50", f"{s['p50_ms']:.1f} ms"),
            ("p90", f"{s['p90_ms']:.1f} ms"),
            ("p99", f"{s['p99_ms']:.1f} ms"),
            ("max", f"{s['max_ms']:.1f} ms"),
            ("statuses", self._status_text()),
        ]
        head = "".join(f"<th>{k}</th>" for k, _ in cells)
        body = "".join(f"<td>{v}</td>" for _, v in cells)
        return f"<b>{self.label}</b><table><tr>{head}</tr><tr>{body}</tr></table>"


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; ``request()`` sends bytes and awaits one response."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.body = bytearray()
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("connection closed by the server"))

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            status = self.parser.get_status_code()
            self.waiter.set_result((status, bytes(self.body), self.parser.should_keep_alive()))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    async def request(self, data: bytes, timeout: float) -> tuple[int, bytes, bool]:
        """Send one request and wait for its response (a timer, not ``wait_for``: no task per request)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.body.clear()
        self.waiter = waiter = loop.create_future()
        timer = loop.call_later(timeout, self._fail, TimeoutError(f"no response within {timeout} s"))
        self.transport.write(data)
        try:
            return await waiter
        finally:
            timer.cancel()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _request_bytes(
    method: str, host: str, path: str, headers: Mapping[str, str], body: bytes | None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


class _Progress:
    """A one-line progress display for runs longer than a second (notebooks only).

    The line is raw ``text/plain`` (a plain ``display(str)`` would show the string's repr, quotes and
    all); when the run ends it becomes a one-line summary rather than an empty output.
    """

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.handle = label, total, None
        try:
            from IPython import get_ipython

            self.enabled = get_ipython() is not None and hasattr(get_ipython(), "kernel")
        except ImportError:
            self.enabled = False

    def update(self, done: int, elapsed: float) -> None:
        if not self.enabled or elapsed < 1.0:
            return
        self._show(f"{self.label}: {done:,}/{self.total:,} requests · {elapsed:.1f} s")

    def _show(self, text: str) -> None:
        from IPython.display import display

        if self.handle is None:
            self.handle = display({"text/plain": text}, raw=True, display_id=True)
        else:
            self.handle.update({"text/plain": text}, raw=True)

    def close(self, done: int, elapsed: float) -> None:
        """Turn the progress line, if one was shown, into a summary of the finished run."""
        if self.handle is not None:
            self._show(f"{self.label}: {done:,} requests in {elapsed:.1f} s")


async def load(
    url: Any,
    path: PathSpec = "/",
    *,
    requests: int = 100,
    concurrency: int = 10,
    method: str = "GET",
    headers: HeaderSpec = None,
    params: Mapping[str, Any] | None = None,
    json: Any = None,
    content: bytes | str | None = None,
    interval: float | None = None,
    timeout: float = 30.0,
    keep_bodies: bool = False,
    label: str | None = None,
) -> LoadResult:
    """Fire ``requests`` requests at ``url`` + ``path``, ``concurrency`` at a time, and record each.

    ``url`` is a base URL or a ``serve()`` handle. ``path`` and ``headers`` may be functions of the
    request's index (0 … requests-1), e.g. to spread requests over keys or clients. ``params``,
    ``json`` and ``content`` are as in httpx. ``interval`` paces each worker: a worker starts a request
    at most every ``interval`` seconds (a probe: ``concurrency=1, interval=0.01``).

    Connections are opened before the clock starts, like a warm connection pool; a request's latency
    runs from writing its first byte to reading its response's last byte.
    """
    base = urlsplit(getattr(url, "url", url))
    if base.scheme != "http" or not base.hostname:
        raise ValueError(f"load() needs an http:// URL or a server handle, got {url!r}")
    if requests < 1 or concurrency < 1:
        raise ValueError("requests and concurrency must be at least 1")
    if method.upper() == "HEAD":  # its answer announces a body it never sends: the parser would wait for it
        raise ValueError("load() does not send HEAD requests; measure the GET of the same path")
    concurrency = min(concurrency, requests)
    host, port = base.hostname, base.port or 80
    prefix = base.path.rstrip("/")
    body: bytes | None = None
    fixed_headers: dict[str, str] = {}
    if json is not None:
        body = jsonlib.dumps(json).encode()
        fixed_headers["Content-Type"] = "application/json"
    elif content is not None:
        body = content.encode() if isinstance(content, str) else content
    query = f"?{urlencode(params, doseq=True)}" if params else ""
    host_header = f"{host}:{port}"

    def build(i: int) -> bytes:
        p = path(i) if callable(path) else path
        h = dict(fixed_headers)
        h.update(headers(i) if callable(headers) else (headers or {}))
        return _request_bytes(method.upper(), host_header, prefix + p + query, h, body)

    fixed = None if callable(path) or callable(headers) else build(0)
    loop = asyncio.get_running_loop()

    opened: list[_Connection] = []

    async def connect() -> _Connection:
        _, conn = await loop.create_connection(_Connection, host, port)
        opened.append(conn)
        return conn

    try:
        warm = await asyncio.gather(*(connect() for _ in range(concurrency)))
    except OSError as exc:
        for conn in opened:
            conn.close()
        raise ConnectionError(f"cannot connect to {host}:{port} ({exc}); is the server running?") from None
    records: list[RequestRecord] = []
    next_index = iter(range(requests))
    name = label or f"{method.upper()} {path if isinstance(path, str) else '…'}"
    progress = _Progress(name, requests)
    t0 = time.perf_counter()

    async def worker(conn: _Connection | None) -> None:
        next_start = 0.0
        for i in next_index:
            if interval is not None:
                delay = next_start - (time.perf_counter() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                # at least ``interval`` after this start, even when the sleep overshot (busy loop)
                next_start = max(next_start, time.perf_counter() - t0) + interval
            data = fixed if fixed is not None else build(i)
            start = time.perf_counter()
            status, error, payload, keep_alive = 0, None, b"", False
            try:
                if conn is None or conn.closed:
                    conn = await connect()
                status, payload, keep_alive = await conn.request(data, timeout)
            except OSError as exc:  # ConnectionError and TimeoutError are OSErrors
                error = str(exc) or type(exc).__name__
            end = time.perf_counter()
            records.append(
                RequestRecord(i, start - t0, end - t0, status, error, payload if keep_bodies else b"")
            )
            if not keep_alive and conn is not None:
                conn.close()
                conn = None

    async def report() -> None:
        while True:
            await asyncio.sleep(0.25)
            progress.update(len(records), time.perf_counter() - t0)

    reporter = asyncio.ensure_future(report())
    try:
        await asyncio.gather(*(worker(c) for c in warm))
    finally:
        wall = time.perf_counter() - t0
        reporter.cancel()
        for conn in opened:
            conn.close()
        progress.close(len(records), wall)
    records.sort(key=lambda r: r.index)
    return LoadResult(name, concurrency, wall, records)
