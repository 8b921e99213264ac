"""Chapter 1's workloads, importable so that thread pools and process pools can run them.

``anyio.to_process.run_sync`` (and any process pool under spawn) cannot run a function defined in a
notebook cell, so the CPU-bound functions live here. The "legacy" clients record where they ran, so
checks can assert the mechanism (was a blocking call made on the event loop thread?) instead of timing.
``probe_from_another_process`` measures a server from outside its process, so that the measuring
client does not compete with the server's threads for the server's GIL.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread

from support.loadgen import LoadResult, RequestRecord

__all__ = [
    "CallRecord",
    "GeoClient",
    "LegacyPriceClient",
    "count_primes",
    "hash_buffer",
    "on_event_loop_thread",
    "probe_from_another_process",
    "where",
]


def on_event_loop_thread() -> bool:
    """True when called from a thread that is running an asyncio event loop (blocking it)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def where() -> tuple[int, str]:
    """(process id, thread name) of the caller: which process and thread ran the work."""
    return os.getpid(), threading.current_thread().name


@dataclass(frozen=True)
class CallRecord:
    """One call to a legacy client: when, on which thread, and whether that thread ran an event loop.

    ``thread`` is the thread's name, ``thread_id`` its identity: AnyIO gives all its worker threads
    one name, so counting distinct ``thread_id`` values counts the threads a pool used.
    """

    start: float
    end: float
    thread: str
    on_event_loop: bool
    thread_id: int = 0


@contextmanager
def _counted(client: Any) -> Iterator[None]:
    """One call in progress on ``client``: counted in its ``max_in_flight`` (under its ``_lock``)."""
    with client._lock:
        client._in_flight += 1
        client.max_in_flight = max(client.max_in_flight, client._in_flight)
    try:
        yield
    finally:
        with client._lock:
            client._in_flight -= 1


@dataclass
class LegacyPriceClient:
    """A synchronous SDK, like many vendor clients: every call blocks its thread for ``delay`` seconds.

    ``calls`` records each call; ``max_in_flight`` is the most calls that overlapped, which is how
    many threads a pool really ran at once for it.
    """

    delay: float = 0.05
    calls: list[CallRecord] = field(default_factory=list)
    max_in_flight: int = 0
    _in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get_price(self, symbol: str) -> float:
        """The price of ``symbol`` (deterministic), after blocking for ``delay`` seconds."""
        on_loop = on_event_loop_thread()
        start = time.perf_counter()
        with _counted(self):
            time.sleep(self.delay)
        thread = threading.current_thread()
        self.calls.append(CallRecord(start, time.perf_counter(), thread.name, on_loop, thread.ident or 0))
        return price_of(symbol)

    def reset(self) -> None:
        with self._lock:
            self.calls.clear()
            self.max_in_flight = 0


def price_of(symbol: str) -> float:
    """The deterministic price the legacy client returns for ``symbol``."""
    return round(100 + sum(map(ord, symbol.upper())) % 900 / 10, 2)


class GeoClient:
    """An "async" SDK that blocks inside: ``lookup`` is ``async def`` but reads its database with a
    synchronous call (here ``time.sleep``, standing in for a file read or a DNS lookup).

    Nothing in its signature says it blocks; asyncio debug mode, a loop-lag probe or blockbuster does.
    ``max_in_flight`` is the most reads that overlapped (``reset()`` forgets it).
    """

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    def _read_database(self, ip: str) -> str:
        with _counted(self):
            time.sleep(self.delay)
        return "NL" if ip.startswith("10.") else "US"

    def reset(self) -> None:
        with self._lock:
            self.max_in_flight = 0

    async def lookup(self, ip: str) -> str:
        return self._read_database(ip)


def count_primes(limit: int) -> int:
    """Count primes below ``limit`` by trial division: pure Python, holds the GIL throughout."""
    count = 0
    for n in range(2, limit):
        for d in range(2, int(n**0.5) + 1):
            if n % d == 0:
                break
        else:
            count += 1
    return count


def hash_buffer(megabytes: int = 64, rounds: int = 1) -> str:
    """SHA-256 over a buffer of ``megabytes`` MB, ``rounds`` times: C code that releases the GIL."""
    data = bytes(megabytes * 1024 * 1024)
    digest = hashlib.sha256()
    for _ in range(rounds):
        digest.update(data)
    return digest.hexdigest()


# The probe's client: standard library only, so the interpreter starts in a few tens of milliseconds
# (``-I -S``: no site-packages, no environment variables). Same pacing as ``load(interval=…)``.
_PROBE_CLIENT = """
import http.client, json, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
requests, interval = int(sys.argv[4]), float(sys.argv[5])
conn = http.client.HTTPConnection(host, port, timeout=60)
conn.connect()
records, next_start, t0 = [], 0.0, time.perf_counter()
for _ in range(requests):
    delay = next_start - (time.perf_counter() - t0)
    if delay > 0:
        time.sleep(delay)
    next_start = max(next_start, time.perf_counter() - t0) + interval
    start = time.perf_counter() - t0
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    records.append((start, time.perf_counter() - t0, response.status))
conn.close()
print(json.dumps({"wall": time.perf_counter() - t0, "records": records}))
"""


async def probe_from_another_process(
    url: Any, path: str = "/ping", *, requests: int = 30, interval: float = 0.01, label: str | None = None
) -> LoadResult:
    """``load(url, path, requests=…, concurrency=1, interval=…)``, sent from a separate Python process.

    A client in the server's own process shares the server's GIL: while the server's threads run
    Python code, the client's event loop waits for the GIL too, and its waits are counted as the
    server's latency. From another process, only the server's threads compete for it, as in
    production. The connection is opened before the clock starts; ``url`` is a base URL or a
    ``serve()`` handle.
    """
    base = urlsplit(getattr(url, "url", url))
    if base.scheme != "http" or not base.hostname:
        raise ValueError(f"probe_from_another_process() needs an http:// URL or a server handle, got {url!r}")
    command = [sys.executable, "-I", "-S", "-c", _PROBE_CLIENT, base.hostname, str(base.port or 80)]
    command += [base.path.rstrip("/") + path, str(requests), str(interval)]
    run = functools.partial(subprocess.run, command, capture_output=True, text=True, timeout=120)
    done = await anyio.to_thread.run_sync(run)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConnectionError(f"the probe's process failed: {last}")
    result = json.loads(done.stdout)
    records = [RequestRecord(i, *record) for i, record in enumerate(result["records"])]
    return LoadResult(label or f"GET {path} from another process", 1, result["wall"], records)
