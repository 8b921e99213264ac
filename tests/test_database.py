"""support.database: a fresh SQLite file by default, a slow query that sleeps off the loop, pool counts."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from support.database import PoolWatch, describe_database, fresh_database, install_sleep, slow_query, sync_url


def test_fresh_database_is_an_empty_sqlite_file_unless_database_url_is_set(monkeypatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    url = fresh_database("test-fresh")
    assert url.startswith("sqlite+aiosqlite:///") and url.endswith("test-fresh.db")
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
