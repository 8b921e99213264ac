"""Chapter 1's workloads, importable so that thread pools and process pools can run them.

``anyio.to_process.run_sync`` (and any process pool under spawn) cannot run a function defined in a
notebook cell, so the CPU-bound functions live here. The "legacy" clients record where they ran, so
checks can assert the mechanism (was a blocking call made on the event loop thread?) instead of timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from dataclasses import dataclass, field

__all__ = [
    "CallRecord",
    "GeoClient",
    "LegacyPriceClient",
    "count_primes",
    "hash_buffer",
    "on_event_loop_thread",
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
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            time.sleep(self.delay)
        finally:
            with self._lock:
                self._in_flight -= 1
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
    """

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay

    def _read_database(self, ip: str) -> str:
        time.sleep(self.delay)
        return "NL" if ip.startswith("10.") else "US"

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
