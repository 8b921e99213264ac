"""The course's database: a temporary SQLite file through aiosqlite unless ``DATABASE_URL`` is set.

    url = support.fresh_database("ch04")           # sqlite+aiosqlite:///…/ch04.db, or $DATABASE_URL
    engine = create_async_engine(url, pool_size=5)
    support.database.install_sleep(engine)          # so that slow_query(0.05) works on SQLite too
    watch = support.database.PoolWatch(engine)      # connections in use, peak, queries run

A *file*, not ``:memory:``: SQLAlchemy gives aiosqlite file databases a real
``AsyncAdaptedQueuePool``, while ``:memory:`` gets a ``StaticPool`` (one shared connection), which
would hide everything chapter 4 measures about pools.

A realistically slow query is ``slow_query(seconds)``: on SQLite a ``sleep_ms`` SQL function that
``install_sleep`` registers on every new connection (it sleeps in the connection's thread, as a
heavy query would keep the database busy); on PostgreSQL the built-in ``pg_sleep``.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import TextClause, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "PoolWatch",
    "database_url",
    "describe_database",
    "fresh_database",
    "install_sleep",
    "slow_query",
    "sync_url",
]

_DIRECTORY = Path(tempfile.gettempdir()) / "fastapi-async-course"
_SYNC_DRIVERS = {"aiosqlite": "pysqlite", "asyncpg": "psycopg", "aiomysql": "pymysql"}


def database_url() -> str | None:
    """The real database to use (``$DATABASE_URL``, an async driver's URL), or None for SQLite."""
    return os.environ.get("DATABASE_URL") or None


def fresh_database(name: str) -> str:
    """An async URL for a database the caller may drop and fill: a new, empty SQLite file by default.

    With ``$DATABASE_URL`` set, that URL is returned unchanged: the chapter creates and drops only its
    own tables (named ``chNN_…``), so point it at a scratch database, never at one you care about.
    """
    url = database_url()
    if url:
        return url
    _DIRECTORY.mkdir(exist_ok=True)
    path = _DIRECTORY / f"{name}.db"
    for leftover in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal")):
        leftover.unlink(missing_ok=True)
    return f"sqlite+aiosqlite:///{path}"


def sync_url(url: str) -> str:
    """The same database through a synchronous driver (aiosqlite → sqlite3, asyncpg → psycopg)."""
    parsed = make_url(url)
    driver = _SYNC_DRIVERS.get(parsed.get_driver_name(), parsed.get_driver_name())
    return parsed.set(drivername=f"{parsed.get_backend_name()}+{driver}").render_as_string(
        hide_password=False
    )


def describe_database(url: str) -> str:
    """One line for a notebook: which database the chapter runs on (password hidden)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite file {parsed.database} through {parsed.get_driver_name()} (embedded default)"
    return f"{parsed.render_as_string(hide_password=True)} (from $DATABASE_URL)"


def _sleep_ms(ms: float) -> float:
    time.sleep(ms / 1000)
    return ms


def install_sleep(engine: AsyncEngine | Engine) -> None:
    """Register ``sleep_ms(ms)`` on every new SQLite connection of ``engine`` (no-op elsewhere)."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    if sync_engine.dialect.name != "sqlite":
        return

    @event.listens_for(sync_engine, "connect")
    def _register(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.create_function("sleep_ms", 1, _sleep_ms)


def slow_query(seconds: float, dialect: str = "sqlite") -> TextClause:
    """A query that takes ``seconds`` inside the database (SQLite needs ``install_sleep`` first)."""
    if dialect == "postgresql":
        return text(f"SELECT pg_sleep({float(seconds)})")
    return text(f"SELECT sleep_ms({float(seconds) * 1000})")


class PoolWatch:
    """Counts what an engine's pool does: connections in use now and at peak, opened, queries run.

    Counting happens in SQLAlchemy's pool and cursor events, on whichever thread fires them.
    """

    def __init__(self, engine: AsyncEngine | Engine) -> None:
        self._lock = threading.Lock()
        self.in_use = self.peak = self.opened = self.queries = 0
        self.statements: list[str] = []
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        event.listen(sync_engine, "connect", self._on_connect)
        event.listen(sync_engine, "checkout", self._on_checkout)
        event.listen(sync_engine, "checkin", self._on_checkin)
        event.listen(sync_engine, "before_cursor_execute", self._on_execute)

    def reset(self) -> None:
        """Start counting peak, opened and queries again (connections in use stay as they are)."""
        with self._lock:
            self.peak, self.opened, self.queries = self.in_use, 0, 0
            self.statements.clear()

    def _on_connect(self, *_: Any) -> None:
        with self._lock:
            self.opened += 1

    def _on_checkout(self, *_: Any) -> None:
        with self._lock:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)

    def _on_checkin(self, *_: Any) -> None:
        with self._lock:
            self.in_use -= 1

    def _on_execute(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        with self._lock:
            self.queries += 1
            self.statements.append(statement)

    def __repr__(self) -> str:
        return (
            f"<PoolWatch in use {self.in_use}, peak {self.peak}, opened {self.opened}, "
            f"queries {self.queries}>"
        )
