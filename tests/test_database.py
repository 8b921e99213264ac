"""support.database: a fresh SQLite file by default, a slow query that sleeps off the loop, pool counts."""

from __future__ import annotations

import asyncio
import gc
import os
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

    async def main() -> tuple[float, PoolWatch]:
        engine = create_async_engine(fresh_database("test-pool"), pool_size=4, max_overflow=0)
        install_sleep(engine)
        watch = PoolWatch(engine)

        async def one() -> None:
            async with engine.connect() as conn:
                await conn.execute(slow_query(0.1))

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(4)))
        wall = time.perf_counter() - started
        await engine.dispose()
        return wall, watch

    wall, watch = asyncio.run(main())
    assert wall < 0.3, f"4 queries of 100 ms on 4 connections took {wall:.2f} s: they did not overlap"
    assert (watch.peak, watch.opened, watch.queries, watch.in_use) == (4, 4, 4, 0)


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

    async def main() -> tuple[int, int, list[str]]:
        engine = create_async_engine(fresh_database("test-gc"))
        watch = PoolWatch(engine)
        session = async_sessionmaker(engine)()
        await session.execute(text("SELECT 1"))  # checks out a connection, never given back
        before = watch.in_use
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            del session
            gc.collect()
        await engine.dispose()
        return before, watch.in_use, [str(w.message) for w in caught]

    before, after, messages = asyncio.run(main())
    assert (before, after) == (1, 0)
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
