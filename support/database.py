"""The course's database: a temporary SQLite file through aiosqlite unless ``DATABASE_URL`` is set.

    url = support.fresh_database("ch04")           # sqlite+aiosqlite:///…/ch04-<pid>.db, or $DATABASE_URL
    engine = create_async_engine(url, pool_size=5)
    support.database.install_sleep(engine)          # so that slow_query(0.05) works on SQLite too
    watch = support.database.PoolWatch(engine)      # connections in use, peak, queries run, holds
    limit = support.database.ConnectionLimit(20)    # a database server's max_connections, simulated
    limit.attach(engine)

A *file*, not ``:memory:``: SQLAlchemy gives aiosqlite file databases a real
``AsyncAdaptedQueuePool``, while ``:memory:`` gets a ``StaticPool`` (one shared connection), which
would hide everything chapter 4 measures about pools.

A slow query is ``slow_query(seconds)``: it takes that long in the database and uses none of its
CPU, as a query waiting on disk or on a lock would, so as many run side by side as there are
connections (a CPU-bound query would compete for the database's cores instead). On SQLite it calls
a ``sleep_ms`` SQL function that ``install_sleep`` registers on every new connection (it sleeps in
the connection's aiosqlite thread); on PostgreSQL the built-in ``pg_sleep``.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import TextClause, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = [
    "ConnectionLimit",
    "PoolWatch",
    "database_url",
    "describe_database",
    "fresh_database",
    "install_sleep",
    "slow_query",
    "sync_url",
]

_DIRECTORY = Path(tempfile.gettempdir()) / "fastapi-async-course"
_SIDE_FILES = ("-journal", "-wal", "-shm")
_OWNER = re.compile(r"-(\d+)\.db(?:-journal|-wal|-shm)?$")
_SYNC_DRIVERS = {"aiosqlite": "pysqlite", "asyncpg": "psycopg", "aiomysql": "pymysql"}


def database_url() -> str | None:
    """The real database to use (``$DATABASE_URL``, an async driver's URL), or None for SQLite."""
    return os.environ.get("DATABASE_URL") or None


def fresh_database(name: str) -> str:
    """An async URL for a database the caller may drop and fill: a new, empty SQLite file by default.

    The file is this process's own (``name-<pid>.db``): a test run or a second kernel that asks for
    the same name gets another file instead of deleting this one under it. Files left by processes
    that have ended are removed (on Linux, where ``/proc`` says which are still running).

    With ``$DATABASE_URL`` set, that URL is returned unchanged: the chapter creates and drops only its
    own tables (named ``chNN_…``), so point it at a scratch database, never at one you care about.
    """
    url = database_url()
    if url:
        return url
    _DIRECTORY.mkdir(exist_ok=True)
    _remove_files_of_ended_processes()
    path = _DIRECTORY / f"{name}-{os.getpid()}.db"
    for leftover in (path, *(path.with_name(path.name + suffix) for suffix in _SIDE_FILES)):
        leftover.unlink(missing_ok=True)
    return f"sqlite+aiosqlite:///{path}"


def _remove_files_of_ended_processes() -> None:
    if not Path("/proc/self").is_dir():  # no cheap, safe way to ask elsewhere: leave the files
        return
    for path in _DIRECTORY.iterdir():
        found = _OWNER.search(path.name)
        if found and not Path(f"/proc/{found.group(1)}").exists():
            path.unlink(missing_ok=True)


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

    ``holds`` has one entry per checkout that has ended: how long, in seconds, it kept its connection.
    Counting happens in SQLAlchemy's pool and cursor events, on whichever thread fires them. A
    connection stops being in use when it is checked in, or when it is detached from the pool: that
    is what SQLAlchemy does with a checked-out connection of an async driver that the garbage
    collector finds (it terminates it instead of checking it in, so no ``checkin`` event fires).
    """

    def __init__(self, engine: AsyncEngine | Engine) -> None:
        self._lock = threading.Lock()
        self.in_use = self.peak = self.opened = self.queries = 0
        self.statements: list[str] = []
        self.holds: list[float] = []
        self._checked_out: dict[int, float] = {}  # id(connection record) → when it was checked out
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        event.listen(sync_engine, "connect", self._on_connect)
        event.listen(sync_engine, "checkout", self._on_checkout)
        event.listen(sync_engine, "checkin", self._on_checkin)
        event.listen(sync_engine, "detach", self._on_checkin)
        event.listen(sync_engine, "before_cursor_execute", self._on_execute)

    def reset(self) -> None:
        """Start counting peak, opened, queries and holds again (connections in use stay as they are)."""
        with self._lock:
            self.peak, self.opened, self.queries = self.in_use, 0, 0
            self.statements.clear()
            self.holds.clear()

    def _on_connect(self, *_: Any) -> None:
        with self._lock:
            self.opened += 1

    def _on_checkout(self, _dbapi_connection: Any, record: Any, *_: Any) -> None:
        with self._lock:
            self.in_use += 1
            self.peak = max(self.peak, self.in_use)
            self._checked_out[id(record)] = time.perf_counter()

    def _on_checkin(self, _dbapi_connection: Any, record: Any, *_: Any) -> None:
        with self._lock:
            self.in_use -= 1
            started = self._checked_out.pop(id(record), None)
            if started is not None:
                self.holds.append(time.perf_counter() - started)

    def _on_execute(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        with self._lock:
            self.queries += 1
            self.statements.append(statement)

    def __repr__(self) -> str:
        return (
            f"<PoolWatch in use {self.in_use}, peak {self.peak}, opened {self.opened}, "
            f"queries {self.queries}>"
        )


class ConnectionLimit:
    """A database server's connection limit, simulated: a connection past ``max_connections`` is refused.

    A real server has one: PostgreSQL's ``max_connections`` (100 by default) answers the next client
    "sorry, too many clients already", and a role that is not a superuser is refused earlier, once only
    the ``superuser_reserved_connections`` (3 by default) are left. SQLite has none, so chapter 4
    simulates it to show what an unbounded pool does to the other services of the same database.
    Every engine ``attach``-ed to one limit counts against it, as services sharing one server do: a
    connection counts from the moment it is opened until the pool closes it (checked in or not). A
    refused connection raises the driver's ``OperationalError`` (SQLAlchemy wraps it in
    ``sqlalchemy.exc.OperationalError``).
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.open = self.peak = self.refused = 0
        self._lock = threading.Lock()

    def attach(self, engine: AsyncEngine | Engine) -> None:
        """Make ``engine``'s new connections count against this limit (attach before it connects)."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        # do_connect replaces the driver's connect call: the last do_connect listener of the engine.
        event.listen(sync_engine, "do_connect", self._connect)
        event.listen(sync_engine, "close", self._closed)
        event.listen(sync_engine, "close_detached", self._closed)

    def _connect(self, dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
        with self._lock:
            if self.open >= self.max_connections:
                self.refused += 1
                refuse = True
            else:
                self.open += 1
                self.peak = max(self.peak, self.open)
                refuse = False
        if refuse:
            raise dialect.loaded_dbapi.OperationalError(
                f"sorry, too many clients already (max_connections={self.max_connections}, simulated)"
            )
        try:
            return dialect.connect(*cargs, **cparams)
        except BaseException:
            self._closed()
            raise

    def _closed(self, *_: Any) -> None:
        with self._lock:
            self.open -= 1

    def __repr__(self) -> str:
        return (
            f"<ConnectionLimit {self.open} of {self.max_connections} open, peak {self.peak}, "
            f"refused {self.refused}>"
        )
