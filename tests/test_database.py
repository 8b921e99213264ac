"""support.database: a fresh SQLite file by default, a slow query that sleeps off the loop, pool counts."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
import warnings

import pytest
from sqlalchemy import exc, text
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from support.database import (
    ConnectionLimit,
    PoolWatch,
    describe_database,
    fresh_database,
    install_sleep,
    slow_query,
    sync_url,
)


def test_fresh_database_is_an_empty_sqlite_file_unless_database_url_is_set(monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    url = fresh_database("test-fresh")
    assert url.startswith("sqlite+aiosqlite:///") and url.endswith(f"test-fresh-{os.getpid()}.db")
    assert "embedded default" in describe_database(url)
    monkeypatch.setenv("DATABASE_URL", "postgresql+asyncpg://u:secret@db/scratch")
    assert fresh_database("test-fresh") == "postgresql+asyncpg://u:secret@db/scratch"
    assert "secret" not in describe_database(fresh_database("test-fresh"))


@pytest.mark.parametrize(
    ("async_url", "expected"),
    [
        ("sqlite+aiosqlite:////tmp/x.db", "sqlite+pysqlite:////tmp/x.db"),
        ("postgresql+asyncpg://u:p@h/d", "postgresql+psycopg://u:p@h/d"),
    ],
)
def test_sync_url_swaps_the_driver_only(async_url: str, expected: str) -> None:
    assert sync_url(async_url) == expected


def test_slow_queries_on_separate_connections_overlap_and_the_pool_is_counted(monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    sleeps: list[tuple[float, float]] = []  # (start, end) of each sleep, seen inside the database

    def recorded_sleep_ms(ms: float) -> float:
        start = time.perf_counter()
        time.sleep(ms / 1000)
        sleeps.append((start, time.perf_counter()))
        return ms

    monkeypatch.setattr("support.database._sleep_ms", recorded_sleep_ms)

    async def main() -> PoolWatch:
        engine = create_async_engine(fresh_database("test-pool"), pool_size=4, max_overflow=0)
        install_sleep(engine)
        watch = PoolWatch(engine)
        connected = asyncio.Barrier(4)

        async def one() -> None:
            async with engine.connect() as conn:
                await connected.wait()  # all four connections open before any query starts
                await conn.execute(slow_query(0.2))

        await asyncio.gather(*(one() for _ in range(4)))
        await engine.dispose()
        return watch

    watch = asyncio.run(main())
    assert (watch.peak, watch.opened, watch.queries, watch.in_use) == (4, 4, 4, 0)
    assert len(sleeps) == 4
    last_start, first_end = max(start for start, _ in sleeps), min(end for _, end in sleeps)
    # one at a time, each query would start after the previous one ended
    assert last_start < first_end, f"the four 200 ms queries did not all run at once: {sleeps}"
    assert len(watch.holds) == 4 and all(0.2 <= held < 30 for held in watch.holds), watch.holds


def test_pool_watch_holds_say_how_long_each_checkout_kept_its_connection(monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)

    async def main() -> tuple[list[float], list[float]]:
        engine = create_async_engine(fresh_database("test-holds"))
        install_sleep(engine)
        watch = PoolWatch(engine)
        async with engine.connect() as conn:
            await conn.execute(slow_query(0.1))
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        before_reset = list(watch.holds)
        watch.reset()
        after_reset = list(watch.holds)
        await engine.dispose()
        return before_reset, after_reset

    before_reset, after_reset = asyncio.run(main())
    assert len(before_reset) == 2 and after_reset == []
    slow, quick = before_reset
    assert slow >= 0.1 and quick < slow, before_reset


def test_slow_query_uses_pg_sleep_on_postgresql() -> None:
    assert str(slow_query(0.25, "postgresql")) == "SELECT pg_sleep(0.25)"
    assert str(slow_query(0.25)) == str(text("SELECT sleep_ms(250.0)"))


def test_a_connection_limit_shared_by_two_engines_refuses_past_it_and_frees_on_close(monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)

    async def main() -> tuple[list[str], ConnectionLimit]:
        url = fresh_database("test-limit")
        busy, other = create_async_engine(url), create_async_engine(url)
        limit = ConnectionLimit(max_connections=2)
        for engine in (busy, other):
            limit.attach(engine)
        seen = []
        async with busy.connect() as first, busy.connect() as second:
            await first.execute(text("SELECT 1"))
            await second.execute(text("SELECT 1"))
            with pytest.raises(exc.OperationalError, match="too many clients"):
                async with other.connect():
                    pass
            seen.append(f"open {limit.open}, refused {limit.refused}")
        await busy.dispose()  # closes the two pooled connections: the server has room again
        async with other.connect() as conn:
            await conn.execute(text("SELECT 1"))
            seen.append(f"open {limit.open}")
        await other.dispose()
        return seen, limit

    seen, limit = asyncio.run(main())
    assert seen == ["open 2, refused 1", "open 1"]
    assert (limit.open, limit.peak, limit.refused) == (0, 2, 1)


def test_a_leaked_session_collected_by_the_gc_is_terminated_and_no_longer_in_use(monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)

    async def main() -> tuple[int, int, list[str], set[threading.Thread]]:
        engine = create_async_engine(fresh_database("test-gc"))
        watch = PoolWatch(engine)
        session = async_sessionmaker(engine)()
        threads = set(threading.enumerate())
        await session.execute(text("SELECT 1"))  # checks out a connection, never given back
        driver_threads = set(threading.enumerate()) - threads  # aiosqlite's thread for that connection
        before = watch.in_use
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del session
            gc.collect()
        # terminating stops the driver's thread, which reports back to this loop: wait for it before
        # the loop closes, or the thread fails with "Event loop is closed"
        deadline = time.perf_counter() + 10
        while any(t.is_alive() for t in driver_threads) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
        await engine.dispose()
        return before, watch.in_use, [str(w.message) for w in caught], driver_threads

    before, after, messages, driver_threads = asyncio.run(main())
    assert (before, after) == (1, 0)
    assert len(driver_threads) == 1 and not any(t.is_alive() for t in driver_threads), driver_threads
    assert any("non-checked-in connection" in m and "will be terminated" in m for m in messages), messages


def test_fresh_database_files_are_per_process_and_those_of_ended_processes_go(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setattr("support.database._DIRECTORY", tmp_path)
    ended = tmp_path / "ch04-999999999.db"  # no such process
    ended.write_text("")
    (tmp_path / "ch04-999999999.db-journal").write_text("")
    running = tmp_path / f"ch04-{os.getppid()}.db"  # the parent process: still running
    running.write_text("")
    url = fresh_database("ch04")
    assert url == f"sqlite+aiosqlite:///{tmp_path}/ch04-{os.getpid()}.db"
    if os.path.isdir("/proc/self"):
        assert sorted(p.name for p in tmp_path.iterdir()) == [running.name]
