"""Checks for chapter 4's exercises: async database sessions.

Every check makes an engine of its own, on a fresh database (``support.database.fresh_database``:
an SQLite file unless ``$DATABASE_URL`` is set), with tables named ``ch04x_…``; it drops them and
disposes the engine before returning, on the event loop that used the engine.

How the checks avoid flakiness: they assert mechanisms, not clocks. Whether a row was stored, which
status a request got, how many connections are checked out (counted by the pool's own events,
``support.database.PoolWatch``) and how many SQL statements ran do not depend on the machine's speed.
Before reading them, a check waits (at most 2 s) until the app has finished every request, including
the code FastAPI runs after the response has gone. The one clock, "a refused request is refused
within 3 s", gives a pool wait of at most 1 s a threefold margin; the pool settings are read from the
engine before any load is sent, so a 30 s default wait is named at once instead of being sat through.
Exercise 4.2's slow query holds its connection 0.3 s, so that twenty requests on two connections
always leave some waiting longer than any accepted pool wait; its long query (1.5 s, on a connection
got at once) outlasts any accepted pool wait by half a second, so a deadline put on the whole
request instead of on the wait for a connection shows. Mechanisms the load alone would not show get
a request of their own: a handler that flushed and returned (nothing pending, still uncommitted), a
request cancelled midway (``CancelledError`` is not an ``Exception``), one request wanting more
connections than the pool has (no count of requests in flight predicts that pool timeout). Whether a
session was closed is told by the session's own ``close``, wrapped on the instance, not by the pool
(a commit or a rollback gives the connection back too). Exercise 4.3's caller has flushed an order of
its own before the call, so that a function which ends the caller's transaction loses it, and the
session's load events tell which rows the call read, so that reading every customer's shows.
Exercise 4.4's check counts connections with the pool's events at the start and end of each charge, in
all and by the task that called it (a checkout among ten at once is judged by its own holds, not its
neighbours'); a session held across the 0.3 s charge leaves ten checkouts on two connections waiting at
least 1.2 s for the last ones, past the 1 s pool_timeout, so its pool timeouts are a lower bound, not a
race. Pool timeouts with nothing to name them (the sale did not hang, no charge ran while its checkout
held a connection, no checkout held two, none was left checked out, no error but pool timeouts and
OutOfStock) come from a transaction kept open while it waits (a sleep, a retry, a lock), or from a stall
(a machine or database server so busy for a second that the checkouts' short transactions, two at a
time, outlast the pool wait): such a sale runs again, a second apart, three runs at most, and only
timeouts in every run are the verdict. Oversold stock would show only when two checkouts happen to read
before either writes, so the check makes that happen: after each read of the stock table, the reader
awaits 50 ms (from inside SQLAlchemy's greenlet, as a driver awaits its socket) while the other
checkouts run, except after a read that locks its row for writing on PostgreSQL (FOR UPDATE), which no
other such read can meet. It counts the reads that returned while another read's pause ran, before the
stock's units had all been charged for (reads that met while a race could still oversell), and a sale
that would pass although the answer read the stock at least twice (reads that lock their row on
PostgreSQL aside) and no two reads met is run again (three runs at most): such a run says nothing about
a read-then-write race (a run with no meeting could come if the next read is slower than the pause, e.g.
on a busy database server).
On PostgreSQL its tables are in a schema of their own (``ch04x_check_4_4``, its connections'
``search_path``), since ``$DATABASE_URL`` is the notebook's database too: the check does not drop the
notebook's shop, and an answer that uses the notebook's ``shop_sessions`` cannot reach the check's.

What a wrong answer leaves behind is tidied too: sessions it never closed are closed by the check
(so no connection is left for the garbage collector to complain about), and the "coroutine was never
awaited" warning that a lazy load under asyncio can leave is silenced while the check runs.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import re
import threading
import time
import typing
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
import sqlalchemy
from fastapi import FastAPI, HTTPException, params
from sqlalchemy import Row, String, event, insert, make_url, select
from sqlalchemy.exc import InvalidRequestError, MissingGreenlet, NoInspectionAvailable
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, object_session
from sqlalchemy.orm.exc import DetachedInstanceError
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_

from support.checks import Mismatch, exercise, expect
from support.checks.running import in_fresh_loop, joins_new_threads, run_in_fresh_loop, serve_answer, short
from support.database import PoolWatch, fresh_database, install_sleep, slow_query
from support.server import Server

__all__ = [
    "check_checkout",
    "check_orders_with_lines",
    "check_pool_fail_fast",
    "check_session_dependency",
]

SOLUTION = "solutions/04_async_database_exercises.ipynb"
_SERVE_FAILED = "The app failed while starting: fix its error, run the cell again, then this check."
_SETTLE = 2.0  # how long a check waits for the app to finish a request and give its connection back


# ---------------------------------------------------------------------------------------------------
# Plumbing shared by the checks
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Answer:
    """One HTTP response as the check's client saw it."""

    status: int
    headers: httpx.Headers
    text: str
    seconds: float


async def _send(server: Server, method: str, paths: Sequence[str]) -> list[_Answer]:
    """Send one request per path, all at once; each answer with its latency."""
    limits = httpx.Limits(max_connections=len(paths), max_keepalive_connections=len(paths))
    async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits, trust_env=False) as http:

        async def one(path: str) -> _Answer:
            start = time.perf_counter()
            response = await http.request(method, path)
            return _Answer(response.status_code, response.headers, response.text, time.perf_counter() - start)

        return list(await asyncio.gather(*(one(path) for path in paths)))


def _request(server: Server, method: str, paths: Sequence[str], name: str) -> list[_Answer]:
    # Not in_fresh_loop: the server opens pooled connections (aiosqlite threads) meanwhile, which
    # live until the engine is disposed; the check's outer joins_new_threads() waits for those.
    return run_in_fresh_loop(lambda: _send(server, method, paths), timeout=30, name=name)


def _new_exceptions(server: Server, before: int, wait: float) -> list[BaseException]:
    """Exceptions the app raised since ``before`` were logged, waiting up to ``wait`` s for the first."""
    deadline = time.monotonic() + wait
    while len(server.exceptions) <= before and time.monotonic() < deadline:
        time.sleep(0.02)
    return server.exceptions[before:]


def _dialect(engine: AsyncEngine) -> str:
    return engine.dialect.name


async def _dispose(engines: Sequence[AsyncEngine]) -> None:
    for engine in engines:
        await engine.dispose()


class _InFlight:
    """ASGI wrapper: counts the requests the app has not finished, and tidies up at shutdown.

    FastAPI runs the code after a dependency's ``yield`` (default scope) after the response has been
    sent, but before the app's ASGI call returns: counting calls, not responses, tells the check when
    that code has run. ``cleanup`` runs on the server's loop, after the app's own shutdown.
    """

    def __init__(self, app: Any, cleanup: Callable[[], Awaitable[None]]) -> None:
        self.app, self.cleanup = app, cleanup
        self.count = 0
        self.cleaned = False
        self._lock = threading.Lock()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":

            async def send_then_clean(message: dict) -> None:
                if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                    await self._clean()
                await send(message)

            await self.app(scope, receive, send_then_clean)
            return
        with self._lock:
            self.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            with self._lock:
                self.count -= 1

    async def _clean(self) -> None:
        if not self.cleaned:
            self.cleaned = True
            await self.cleanup()

    def settle(self, watch: PoolWatch | None = None, wait: float = _SETTLE) -> None:
        """Wait (at most ``wait`` s) until no request is in the app and no connection is checked out."""
        deadline = time.monotonic() + wait
        while (self.count or (watch is not None and watch.in_use)) and time.monotonic() < deadline:
            time.sleep(0.02)


@contextmanager
def _quiet_unawaited() -> Iterator[None]:
    """Silence "coroutine … was never awaited" while a lazy load may fail under asyncio.

    SQLAlchemy refuses IO outside its greenlet (``MissingGreenlet``) after aiosqlite has already made
    a coroutine for the query; that coroutine is never awaited, and Python warns when it is collected.
    The check collects garbage itself, while the warning is filtered, so it never reaches the notebook:
    on its own thread, once its engine is disposed (forced from a kernel's main thread instead, the
    collection intermittently killed the Jupyter kernel).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning
        )
        yield


# ---------------------------------------------------------------------------------------------------
# Exercise 4.1: a session per request, committed or rolled back
# ---------------------------------------------------------------------------------------------------


class _CheckBase(DeclarativeBase):
    pass


class _Placed(_CheckBase):
    """An order row of Exercise 4.1's check: its sku is unique, so a duplicate fails only at commit."""

    __tablename__ = "ch04x_session_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(String(40), unique=True)


_CONCURRENT_41 = 10
_OVERLAP = 0.2  # each concurrent request keeps its session this long, so that they overlap
_CALL_4_1 = "Call the check as `check_session_dependency(Session, SessionDep)`."
_ASYNC_WITH = (
    "`async with Session() as session:` around `try: yield session` / `except Exception: await "
    "session.rollback(); raise` / `else: await session.commit()`."
)


def _call_once(dependency: Callable[[], Awaitable[Any]]) -> Callable[[], Awaitable[None]]:
    async def main() -> None:
        result = await dependency()
        if isinstance(result, AsyncSession):
            await result.close()

    return main


def _dependency_of(Session: Any, SessionDep: Any) -> params.Depends:
    """The ``Depends`` in ``SessionDep``, once its function is known to be an async generator."""
    expect(
        isinstance(Session, async_sessionmaker),
        "`Session`, an async_sessionmaker",
        short(Session),
        _CALL_4_1,
    )
    found = [m for m in getattr(SessionDep, "__metadata__", ()) if isinstance(m, params.Depends)]
    expect(
        typing.get_origin(SessionDep) is Annotated and bool(found),
        "SessionDep = Annotated[AsyncSession, Depends(get_session, …)]",
        short(SessionDep),
        "Keep the given line `SessionDep = Annotated[…]` from the exercise cell.",
        _CALL_4_1,
    )
    depends = found[-1]
    dependency = depends.dependency
    if inspect.isasyncgenfunction(dependency):
        return depends
    if inspect.iscoroutinefunction(dependency):
        parameters = inspect.signature(dependency).parameters.values()
        if not any(
            p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            for p in parameters
        ):
            in_fresh_loop(_call_once(dependency), timeout=10, name="check-4.1-call")  # a placeholder raises
        raise Mismatch(
            "get_session to `yield` the session (an async generator)",
            "an `async def` that returns: FastAPI cannot run anything after the handler, so nothing "
            "commits, rolls back or closes the session",
            [
                "A dependency with `yield` hands its value to the handler, and resumes after the handler "
                "has finished (with the handler's exception, if it raised).",
                _ASYNC_WITH,
            ],
        )
    kind = (
        "a generator defined with plain `def`"
        if inspect.isgeneratorfunction(dependency)
        else short(dependency)
    )
    raise Mismatch(
        "get_session defined with `async def`, yielding the session",
        kind,
        ["An AsyncSession is committed and closed with `await`: write `async def get_session():`."],
    )


@contextmanager
def _bound(Session: async_sessionmaker[Any], engine: AsyncEngine) -> Iterator[None]:
    """Point ``Session`` at the check's engine for the duration of the check, then back."""
    missing = object()
    before = Session.kw.get("bind", missing)
    Session.configure(bind=engine)
    try:
        yield
    finally:
        if before is missing:
            Session.kw.pop("bind", None)
        else:
            Session.configure(bind=before)


async def _close_all(sessions: list[Any], engine: AsyncEngine) -> int:
    """Close every session a request was given (a wrong answer may have left some open).

    A session made before the check (bound to the notebook's engine) took its connection on the
    server's loop: that engine's pool is emptied too, so no connection of it outlives the server.
    """
    closed = 0
    others: dict[int, AsyncEngine] = {}
    for session in {id(s): s for s in sessions}.values():
        if isinstance(session, AsyncSession):
            bind = session.bind
            if isinstance(bind, AsyncEngine) and bind is not engine:
                others[id(bind)] = bind
            try:
                await session.close()
                closed += 1
            except Exception:  # a session of an engine already disposed: nothing more to do
                pass
    for other in others.values():
        await other.dispose()
    return closed


class _Closes:
    """Which of the sessions given to the handlers were closed, and which only had ``close()`` called.

    Each session's ``close`` is wrapped on the instance: ``async with`` (``AsyncSession.__aexit__``),
    ``Session.begin()`` and ``aclose()`` all call ``self.close()``, so they go through it. The
    wrapper notes the call and returns the real coroutine; the session's own ``sync_session.close``
    (and ``invalidate``), which that coroutine runs once awaited, note that a close ran.
    """

    def __init__(self) -> None:
        self.called: set[int] = set()
        self.ran: set[int] = set()
        self._watched: set[int] = set()

    def watch(self, session: Any) -> None:
        key = id(session)
        if not isinstance(session, AsyncSession) or key in self._watched:
            return
        self._watched.add(key)
        close = session.close

        def called() -> Awaitable[None]:
            self.called.add(key)
            return close()

        session.close = called  # type: ignore[method-assign]
        sync = session.sync_session
        for name in ("close", "invalidate"):
            original = getattr(sync, name)

            def ran(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
                self.ran.add(key)
                return _original(*args, **kwargs)

            setattr(sync, name, ran)


def _session_app(session_dep: Any, engine: AsyncEngine, seen: list[Any], closes: _Closes) -> FastAPI:
    """The check's own shop: its handlers take the learner's SessionDep, and remember each session."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(_CheckBase.metadata.drop_all)
            await conn.run_sync(_CheckBase.metadata.create_all)
        yield

    app = FastAPI(lifespan=lifespan)

    def given(session: Any) -> None:
        seen.append(session)
        closes.watch(session)

    async def place(sku: str, session: Any) -> dict[str, str]:
        given(session)
        session.add(_Placed(sku=sku))  # no flush: a duplicate sku fails only when committed
        return {"sku": sku}

    async def place_then_fail(sku: str, session: Any) -> None:
        given(session)
        session.add(_Placed(sku=sku))
        await session.flush()  # the row is in the transaction now: only a rollback keeps it out
        raise HTTPException(status_code=409, detail="out of stock")

    async def place_and_flush(sku: str, session: Any) -> dict[str, Any]:
        given(session)
        row = _Placed(sku=sku)
        session.add(row)
        await session.flush()  # to learn its id: nothing is pending in the session any more
        return {"sku": sku, "id": row.id}

    async def place_then_cancelled(sku: str, session: Any) -> None:
        given(session)
        session.add(_Placed(sku=sku))
        await session.flush()
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # as a timeout around the request does when it expires
        await asyncio.sleep(0)  # the CancelledError arrives here, as it would at any await

    async def place_slowly(sku: str, session: Any) -> dict[str, str]:
        given(session)
        session.add(_Placed(sku=sku))
        await asyncio.sleep(_OVERLAP)  # the other requests arrive meanwhile
        return {"sku": sku}

    for path, endpoint in (
        ("/orders/{sku}", place),
        ("/orders/{sku}/flushed", place_and_flush),
        ("/orders/{sku}/fail", place_then_fail),
        ("/orders/{sku}/cancelled", place_then_cancelled),
        ("/orders/{sku}/slow", place_slowly),
    ):
        endpoint.__annotations__ = {"sku": str, "session": session_dep}  # the learner's SessionDep
        app.add_api_route(path, endpoint, methods=["POST"])

    async def skus() -> list[str]:
        async with engine.connect() as conn:
            return sorted((await conn.scalars(select(_Placed.sku))).all())

    async def seed(sku: str) -> dict[str, str]:
        async with engine.begin() as conn:
            await conn.execute(insert(_Placed).values(sku=sku))
        return {"sku": sku}

    async def release() -> dict[str, int]:
        return {"closed": await _close_all(seen, engine)}

    skus.__annotations__ = {}
    seed.__annotations__ = {"sku": str}
    release.__annotations__ = {}
    app.add_api_route("/_ch04x/skus", skus, methods=["GET"])
    app.add_api_route("/_ch04x/seed/{sku}", seed, methods=["POST"])
    app.add_api_route("/_ch04x/release", release, methods=["POST"])
    return app


@dataclass
class _SessionRun:
    """The check's handle on its served shop: send requests, settle, read what was stored."""

    server: Server
    wrapper: _InFlight
    watch: PoolWatch
    engine: AsyncEngine
    depends: params.Depends
    seen: list[Any] = field(default_factory=list)
    closes: _Closes = field(default_factory=_Closes)
    # id(session) → (the request it was given to, whether `close()` had been called), if not closed
    left_open: dict[int, tuple[str, bool]] = field(default_factory=dict)
    last_request: str = ""
    tracked: dict[int, None] = field(default_factory=dict)  # the sessions whose closing is checked, in order

    def post(self, path: str) -> _Answer:
        self.last_request = f"POST {path}"
        return _request(self.server, "POST", [path], "check-4.1")[0]

    def settle(self, closed: bool = True) -> int:
        """Connections still checked out once the app is done (then closed by the check).

        Unless ``closed`` is false, the sessions that get_session had not closed by then are noted
        first, before the check closes any of them.
        """
        self.wrapper.settle(self.watch)
        for session in self.seen if closed else ():
            key = id(session)
            if not isinstance(session, AsyncSession):
                continue
            self.tracked.setdefault(key, None)
            if key not in self.closes.ran:
                self.left_open[key] = (
                    self.left_open.get(key, (self.last_request, False))[0],
                    key in self.closes.called,
                )
        leaked = self.watch.in_use
        if leaked:
            _request(self.server, "POST", ["/_ch04x/release"], "check-4.1-release")
            self.wrapper.settle(self.watch, wait=1.0)
        return leaked

    def skus(self) -> list[str]:
        (answer,) = _request(self.server, "GET", ["/_ch04x/skus"], "check-4.1-rows")
        return json.loads(answer.text) if answer.status == 200 else []

    def raise_server_error(self, before: int, status: int, what: str) -> None:
        for raised in _new_exceptions(self.server, before, 2.0):
            raise raised
        raise Mismatch(what, f"status {status}")

    def expect_session(self, sessions: list[Any], requests: str) -> None:
        expect(
            bool(sessions),
            f"the handler of {requests} to be given a session",
            "it never ran: get_session raised or never yielded",
            "`yield session` once, inside `async with Session() as session:`.",
        )
        for session in sessions:
            expect(
                isinstance(session, AsyncSession),
                "an AsyncSession in the handler",
                f"a {type(session).__name__}: {short(session)}",
                "Yield the session itself: `async with Session() as session: … yield session`.",
            )
            if session.bind is not self.engine:
                raise Mismatch(
                    "a session made by `Session()` when the request arrived",
                    "a session bound to another engine than `Session`'s, so made before the check "
                    "pointed `Session` at its own database: one session made once and shared by "
                    "every request?",
                    [
                        "A session is a unit of work: one per request, made when the request arrives "
                        "and closed when it is done; one shared session mixes requests' changes.",
                        _ASYNC_WITH,
                    ],
                )

    def expect_returned(self, leaked: int, after: str, hints: Sequence[str] = ()) -> None:
        expect(
            leaked == 0,
            f"every connection back in the pool {after}",
            f"{leaked} still checked out {_SETTLE:g} s later: the session was never closed",
            *(
                hints
                or (
                    "A session holds its connection until it is committed, rolled back or closed: "
                    "close it whatever happens.",
                    "Let `async with Session() as session:` close it, around the `yield`.",
                )
            ),
        )

    def succeeds(self) -> None:
        before_errors, before_seen = len(self.server.exceptions), len(self.seen)
        answer = self.post("/orders/ch04x-ok")
        leaked = self.settle()
        self.expect_session(self.seen[before_seen:], "POST /orders/ch04x-ok")
        if answer.status >= 500:
            self.raise_server_error(before_errors, answer.status, "status 200 for a request that succeeds")
        expect(answer.status == 200, "status 200 for a request that succeeds", f"status {answer.status}")
        stored = self.skus()
        expect(
            "ch04x-ok" in stored,
            "the row of a request that succeeded stored in the database",
            f"not there (the table holds {stored or 'nothing'}): the session was closed without a commit, "
            "and closing rolls back",
            "Commit when the handler has returned without raising: the code after `yield` runs then.",
            "`try: yield session` / `except Exception: await session.rollback(); raise` / "
            "`else: await session.commit()`.",
        )
        self.expect_returned(leaked, "after a request that succeeded")

    def flushed(self) -> None:
        before_errors, before_seen = len(self.server.exceptions), len(self.seen)
        answer = self.post("/orders/ch04x-flushed/flushed")
        leaked = self.settle()
        self.expect_session(self.seen[before_seen:], "POST /orders/ch04x-flushed/flushed")
        if answer.status >= 500:
            self.raise_server_error(before_errors, answer.status, "status 200 for a request that succeeds")
        expect(answer.status == 200, "status 200 for a request that succeeds", f"status {answer.status}")
        stored = self.skus()
        expect(
            "ch04x-flushed" in stored,
            "the row of a request that flushed it (to learn its id) and returned stored in the database",
            "not there, though the row of a request that only added its row was: once flushed, a row is "
            "in the transaction but no longer pending (`session.new` is empty), and get_session closed "
            "the session without committing it, so closing rolled it back",
            "Commit whenever the handler returned, whatever the session still holds: a flushed row, or "
            "one written with `session.execute(insert(…))`, is in the transaction but not in "
            "`session.new`, `dirty` or `deleted`.",
            "`else: await session.commit()`, with no condition: committing a transaction with nothing in "
            "it costs next to nothing.",
        )
        self.expect_returned(leaked, "after a request that flushed its row and returned")

    def cancelled(self) -> None:
        before_seen = len(self.seen)
        self.post("/orders/ch04x-cancelled/cancelled")  # whatever the client gets: the request died
        leaked = self.settle()
        self.expect_session(self.seen[before_seen:], "POST /orders/ch04x-cancelled/cancelled")
        stored = self.skus()
        expect(
            "ch04x-cancelled" not in stored,
            "no row from a request that was cancelled",
            "its row was stored: the handler had flushed it, was cancelled, and something committed "
            "that transaction anyway",
            "A cancelled request did not finish: roll back, as for any exception; commit only when the "
            "handler returned.",
            "`try: yield session` / `except BaseException: await session.rollback(); raise` / "
            "`else: await session.commit()`, inside `async with Session() as session:`.",
        )
        self.expect_returned(
            leaked,
            "after a request that was cancelled",
            (
                "Cancelling a request raises `asyncio.CancelledError` at your `yield`; it derives from "
                "BaseException, not Exception, so `except Exception:` does not see it, and a session "
                "closed only there, or after the commit, stays open with its connection.",
                "Let `async with Session() as session:` close it (or close it in `finally:`): both run "
                "on every way out, cancellation included.",
            ),
        )

    def fails(self) -> None:
        before_seen = len(self.seen)
        answer = self.post("/orders/ch04x-refused/fail")
        leaked = self.settle()
        self.expect_session(self.seen[before_seen:], "POST /orders/ch04x-refused/fail")
        expect(
            answer.status == 409,
            "status 409, the HTTPException the handler raised",
            f"status {answer.status}: {short(answer.text, 60)}",
            "Re-raise the handler's exception after rolling back: `except Exception: await "
            "session.rollback(); raise`.",
        )
        stored = self.skus()
        expect(
            "ch04x-refused" not in stored,
            "no row from a request whose handler raised",
            "its row was stored: the handler had flushed it into the transaction, and something "
            "committed that transaction anyway",
            "Commit only when the handler returned; a `finally:` runs when it raised too.",
            "`except Exception: await session.rollback(); raise` / `else: await session.commit()`: "
            "`else` runs only when no exception came through the `yield`.",
        )
        self.expect_returned(
            leaked,
            "after a request whose handler raised",
            (
                "The handler's exception comes out of your `yield`: whatever follows it in the same "
                "block does not run, and the session stays open with its transaction.",
                "Let `async with Session() as session:` close it: the `async with` exits even when "
                "the exception passes through.",
            ),
        )

    def concurrent(self) -> None:
        before_errors, before_seen = len(self.server.exceptions), len(self.seen)
        paths = [f"/orders/ch04x-c{i}/slow" for i in range(_CONCURRENT_41)]
        self.last_request = f"one of {_CONCURRENT_41} concurrent requests"
        answers = _request(self.server, "POST", paths, "check-4.1-concurrent")
        leaked = self.settle()
        sessions = self.seen[before_seen:]
        self.expect_session(sessions, f"{_CONCURRENT_41} concurrent requests")
        distinct = len({id(s) for s in sessions})
        expect(
            distinct == len(sessions) == _CONCURRENT_41,
            f"{_CONCURRENT_41} different sessions, one per request",
            f"{distinct} different for {len(sessions)} requests"
            + (": one session shared by all of them" if distinct == 1 else ""),
            "Concurrent requests must never share a session: it is one transaction, on one "
            "connection, and not safe to use from several tasks at once.",
            "Make the session inside get_session, per call: " + _ASYNC_WITH,
        )
        statuses = [a.status for a in answers]
        if any(s >= 500 for s in statuses):
            self.raise_server_error(
                before_errors, max(statuses), f"{_CONCURRENT_41} responses with status 200"
            )
        expect(
            all(s == 200 for s in statuses),
            f"{_CONCURRENT_41} responses with status 200",
            f"statuses {dict(Counter(statuses))}",
        )
        self.expect_returned(leaked, f"after {_CONCURRENT_41} concurrent requests")

    def all_closed(self) -> None:
        sessions = list(self.tracked)
        left = [key for key in sessions if key in self.left_open]
        if not left:
            return
        example = self.left_open[left[0]][0]
        if any(self.left_open[key][1] for key in left):
            raise Mismatch(
                "every session closed by get_session once its request is done",
                f"{len(left)} of {len(sessions)} sessions never closed (the first given to {example}): "
                "`session.close()` was called but not awaited, so it only made a coroutine, which was "
                "dropped (Python warns: \"coroutine 'AsyncSession.close' was never awaited\"), and the "
                "close never ran",
                [
                    "Calling an `async def` method runs none of its code: it returns a coroutine, and the "
                    "work happens only when that coroutine is awaited.",
                    "`finally: await session.close()`; or let `async with Session() as session:` close it.",
                ],
            )
        raise Mismatch(
            "every session closed by get_session once its request is done",
            f"{len(left)} of {len(sessions)} sessions still open after their request (the first given to "
            f"{example}): nothing closed them; a commit or a rollback gives the connection back, but "
            "only closing ends the session, whatever happened in the request",
            [
                "A session is closed by `close()`, or by the `async with` block it was made in; "
                "committing or rolling back is not closing.",
                "Let `async with Session() as session:` close it, around the `yield` (or `await "
                "session.close()` in `finally:`).",
            ],
        )

    def commit_fails(self) -> None:
        seeded = _request(self.server, "POST", ["/_ch04x/seed/ch04x-taken"], "check-4.1-seed")[0]
        assert seeded.status == 200, f"the check could not seed its table: {seeded.text}"
        before_errors = len(self.server.exceptions)
        answer = self.post("/orders/ch04x-taken")
        # not whether it was closed: `Session.begin()` skips the close when its commit raises (having
        # rolled back, which gives the connection back); whether the connection came back is checked
        leaked = self.settle(closed=False)
        late = [e for e in _new_exceptions(self.server, before_errors, 0.2) if "UNIQUE" in str(e).upper()]
        if answer.status < 400:
            when = "; the commit failed after the response had gone (the server logged it)" if late else ""
            if self.depends.scope != "function":
                hints = [
                    "With the default scope, FastAPI runs the code after `yield` once the response "
                    "has been sent: the client has its 200 before the commit has even started.",
                    '`SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]`: '
                    "the code after `yield` then runs before the response is sent.",
                ]
            else:
                hints = [
                    "The commit's exception must reach FastAPI, which answers 500: do not catch it in "
                    "get_session (or re-raise it).",
                    "`else: await session.commit()` after `try: yield session`, with nothing around the "
                    "commit that swallows its error.",
                ]
            raise Mismatch(
                "an error status (500) for a request whose commit failed",
                f"status {answer.status}: the client was told its order was placed, but it could not be "
                f"stored (a row with that unique sku was already there){when}",
                hints,
            )
        self.expect_returned(
            leaked,
            "after a request whose commit failed",
            (
                "When `commit()` raises, the session is left in a failed transaction, holding its "
                "connection, until it is rolled back or closed.",
                "Let `async with Session() as session:` close it, around the whole `try`.",
            ),
        )


def check_session_dependency(Session: Any, SessionDep: Any) -> None:
    """Check Exercise 4.1: a session per request, committed when the handler succeeded, else rolled back.

    Points ``Session`` at a database of the check's own for the duration of the check, then serves
    an app whose handlers take ``SessionDep``: one adds a row and returns, one adds and flushes a
    row and returns, one flushes a row and raises ``HTTPException(409)``, one flushes a row and is
    cancelled, one adds a row while nine others do the same. The rows of the handlers that returned
    must be stored, the others not; every request must get a session of its own, made by
    ``Session()``; after each request (the cancelled one too) no connection may stay checked out, and
    its session must have been closed (each session's ``close`` is wrapped on the instance, which
    ``async with`` and ``Session.begin()`` call too: a commit or rollback gives the connection back,
    so the pool alone does not show a session never closed, or a ``close()`` never awaited); and a
    request whose commit fails (a duplicate unique sku, seen only at commit) must get an error
    status, not 200.
    """
    with exercise("4.1", "A session per request, committed or rolled back", SOLUTION) as ex:
        found: list[params.Depends] = []
        if not ex.step(
            "SessionDep declares get_session, an async generator, as its dependency",
            lambda: found.append(_dependency_of(Session, SessionDep)),
        ):
            return
        engine = create_async_engine(
            fresh_database("ch04x-check-4-1"), pool_size=5, max_overflow=5, pool_timeout=5
        )
        watch = PoolWatch(engine)
        seen: list[Any] = []
        closes = _Closes()

        async def cleanup() -> None:
            await _close_all(seen, engine)
            try:
                async with engine.begin() as conn:
                    await conn.run_sync(_CheckBase.metadata.drop_all)
            finally:
                await engine.dispose()

        wrapper = _InFlight(_session_app(SessionDep, engine, seen, closes), cleanup)
        try:
            with (
                _bound(Session, engine),
                joins_new_threads(),
                serve_answer(wrapper, "check-4.1", "4.1", _SERVE_FAILED) as server,
            ):
                run = _SessionRun(server, wrapper, watch, engine, found[0], seen, closes)
                if not ex.step(
                    "a request that succeeds: it gets a new session, its row is stored, its connection "
                    "given back",
                    run.succeeds,
                ):
                    return
                ex.step(
                    "a request that flushed its row (to learn its id) and returned: its row is stored",
                    run.flushed,
                )
                ex.step(
                    "a request whose handler raises: its row is not stored, its connection given back",
                    run.fails,
                )
                ex.step(
                    "a request cancelled midway (as by a timeout): its row is not stored, its connection "
                    "given back",
                    run.cancelled,
                )
                ex.step(
                    f"{_CONCURRENT_41} concurrent requests: each gets a session of its own", run.concurrent
                )
                ex.step(
                    "a request whose commit fails (a duplicate sku) gets an error status, not 200",
                    run.commit_fails,
                )
                ex.step(
                    "every request's session is closed once the request is done, whatever happened",
                    run.all_closed,
                )
        finally:
            if not wrapper.cleaned:  # the app never started, so its shutdown never ran
                in_fresh_loop(lambda: _dispose([engine]), timeout=10, name="check-4.1-dispose")


# ---------------------------------------------------------------------------------------------------
# Exercise 4.2: fail fast when the pool is exhausted
# ---------------------------------------------------------------------------------------------------

_POOL = 2
_MAX_WAIT = 1.0  # the longest pool_timeout accepted, in seconds
_REQUESTS_42 = 20
_HOLD = 0.3  # each request keeps its connection this long
_REFUSED_WITHIN = 3.0
_OTHER_SIZE = 5  # make_engine is called with this size too: the size must be the caller's
_LONG = 1.5  # a query this long, on a connection got at once, must be served: the bound is on the wait
_HOLD_PATH = "/_ch04x/hold"
_LONG_PATH = "/_ch04x/long"
_GREEDY_PATH = "/_ch04x/greedy"
_BUG_PATH = "/_ch04x/bug"
_BROKEN_PATH = "/_ch04x/broken-query"
_CALL_4_2 = "Call the check as `check_pool_fail_fast(make_engine, make_app)`."
_HANDLER = (
    "`@app.exception_handler(sqlalchemy.exc.TimeoutError)` on an `async def` that returns "
    '`JSONResponse({"detail": "…"}, status_code=503, headers={"Retry-After": "1"})`.'
)


class _BugError(Exception):
    """What the check's route raises: a bug, not a busy database."""


def _make_engine(
    make_engine: Callable[..., Any], url: str, engines: list[AsyncEngine], size: int = _POOL
) -> AsyncEngine:
    engine = make_engine(url, size)
    if isinstance(engine, AsyncEngine):
        engines.append(engine)
        return engine
    if isinstance(engine, sqlalchemy.Engine):
        engine.dispose()
    raise Mismatch(
        "an AsyncEngine, from `create_async_engine(url, …)`",
        short(engine),
        ["An async app needs an async engine: `create_async_engine(url, pool_size=pool_size, …)`."],
    )


def _check_pool_settings(
    engine: AsyncEngine, make_engine: Callable[..., Any], url: str, engines: list[AsyncEngine]
) -> None:
    pool = engine.pool
    size, timeout = getattr(pool, "size", None), getattr(pool, "timeout", None)
    expect(
        callable(size) and callable(timeout),
        "a queue pool, sized by pool_size and max_overflow",
        f"a {type(pool).__name__}",
        "Leave `poolclass` out: `create_async_engine` gives a file database a queue pool.",
    )
    assert callable(size) and callable(timeout)
    expect(
        size() == _POOL,
        f"pool_size={_POOL}, the size passed to make_engine",
        f"pool_size {size()}",
        "`create_async_engine(url, pool_size=pool_size, …)`: the caller chooses the size.",
    )
    overflow = getattr(pool, "_max_overflow", None)
    expect(
        overflow == 0,
        "max_overflow=0: never more connections than the pool's",
        "max_overflow -1: no limit at all, so a burst opens as many connections as it has requests"
        if overflow == -1
        else f"max_overflow {overflow}: a burst opens up to {overflow} connections more than the pool's "
        "(the default is 10)",
        "The database has a connection limit of its own, shared by every instance of the app; the "
        "pool's size is this instance's share of it, so a burst must not grow it.",
        "`max_overflow=0`.",
    )
    wait = timeout()
    expect(
        0 < wait <= _MAX_WAIT,
        f"pool_timeout between 0 and {_MAX_WAIT:g} s: how long a request waits for a free connection",
        f"pool_timeout {wait:g} s"
        + (
            ", the default: when the pool is busy, each request beyond it waits 30 s before failing"
            if wait == 30
            else ": a request would not wait at all, not even for a connection about to be free"
            if wait <= 0
            else ""
        ),
        "A request that cannot get a connection soon should be refused soon, so that the client "
        "can retry or go elsewhere, instead of piling up behind the others.",
        "`pool_timeout=0.5` (seconds).",
    )
    other = _make_engine(make_engine, url, engines, _OTHER_SIZE)
    other_size = getattr(other.pool, "size", None)
    seen_size = other_size() if callable(other_size) else None
    expect(
        seen_size == _OTHER_SIZE,
        f"pool_size={_OTHER_SIZE} from make_engine(url, {_OTHER_SIZE}): the size the caller passed",
        f"pool_size {seen_size}" + (": the same size whatever the caller asks" if seen_size == _POOL else ""),
        "`create_async_engine(url, pool_size=pool_size, …)`: the caller chooses the size.",
    )


def _add_check_routes(app: FastAPI, engine: AsyncEngine) -> None:
    dialect = _dialect(engine)

    async def hold() -> dict[str, float]:
        async with engine.connect() as conn:
            await conn.execute(slow_query(_HOLD, dialect))
        return {"held": _HOLD}

    async def long() -> dict[str, float]:
        async with engine.connect() as conn:
            await conn.execute(slow_query(_LONG, dialect))
        return {"held": _LONG}

    async def greedy() -> dict[str, int]:
        # one request that wants one connection more than the pool has: no count of requests in
        # flight predicts it, only the pool knows
        async with AsyncExitStack() as stack:
            for _ in range(engine.pool.size() + 1):  # type: ignore[attr-defined]
                await stack.enter_async_context(engine.connect())
        return {"connections": engine.pool.size() + 1}  # type: ignore[attr-defined]

    async def bug() -> None:
        raise _BugError("a bug in a handler, not a busy database")

    async def broken_query() -> None:
        async with engine.connect() as conn:
            await conn.execute(sqlalchemy.text("SELECT * FROM ch04x_no_such_table"))

    for path, endpoint in (
        (_HOLD_PATH, hold),
        (_LONG_PATH, long),
        (_GREEDY_PATH, greedy),
        (_BUG_PATH, bug),
        (_BROKEN_PATH, broken_query),
    ):
        endpoint.__annotations__ = {}
        app.add_api_route(path, endpoint, methods=["GET"])


def _build_app(make_app: Callable[[AsyncEngine], Any], engine: AsyncEngine, apps: list[FastAPI]) -> None:
    app = make_app(engine)
    expect(
        isinstance(app, FastAPI),
        "make_app(engine) to return a FastAPI app",
        short(app),
        "Keep the given `return app` at the end of make_app.",
    )
    _add_check_routes(app, engine)
    apps.append(app)


@dataclass
class _Burst:
    answers: list[_Answer] = field(default_factory=list)
    exceptions: list[BaseException] = field(default_factory=list)
    peak: int = 0

    def statuses(self) -> dict[int, int]:
        return dict(sorted(Counter(a.status for a in self.answers).items()))

    def with_status(self, status: int) -> list[_Answer]:
        return [a for a in self.answers if a.status == status]


def _send_burst(server: Server, watch: PoolWatch, burst: _Burst) -> None:
    before = len(server.exceptions)
    burst.answers = _request(server, "GET", [_HOLD_PATH] * _REQUESTS_42, "check-4.2")
    burst.peak = watch.peak
    if any(a.status == 500 and a.text == "Internal Server Error" for a in burst.answers):
        burst.exceptions = _new_exceptions(server, before, 2.0)


def _first_line(exc: BaseException) -> str:
    """``QueuePool limit of size 2 …, timeout 0.50``: the message, without SQLAlchemy's link."""
    return str(exc).splitlines()[0].split(" (Background on this error")[0]


def _handles_builtin_timeout(app: FastAPI) -> bool:
    return any(key in (TimeoutError, asyncio.TimeoutError) for key in app.exception_handlers)


def _check_served(burst: _Burst, app: FastAPI) -> None:
    failed = burst.with_status(500)
    if failed:
        pool_timeouts = [e for e in burst.exceptions if isinstance(e, sqlalchemy.exc.TimeoutError)]
        if pool_timeouts:
            hints = [
                "The pool raises `sqlalchemy.exc.TimeoutError` when no connection frees up in time; "
                "without a handler for it, FastAPI answers 500, which says the server is broken.",
                _HANDLER,
            ]
            if _handles_builtin_timeout(app):
                hints.insert(
                    0,
                    "Your handler is registered for Python's built-in TimeoutError; SQLAlchemy's "
                    "`sqlalchemy.exc.TimeoutError` is another class, which does not derive from it.",
                )
            raise Mismatch(
                "no 500: a request refused by the pool answered by your handler",
                f"{len(failed)} of {_REQUESTS_42} got 500: {_first_line(pool_timeouts[-1])} "
                "reached the client unhandled",
                hints,
            )
        for raised in burst.exceptions:
            raise raised
        raise Mismatch(
            "no 500: a request refused by the pool gets 503, Service Unavailable",
            f"{len(failed)} of {_REQUESTS_42} got 500 from your handler: {short(failed[0].text, 60)}",
            [
                "500 says the server is broken, and a client should not retry; 503 says it is busy "
                "for now, and Retry-After says when to try again.",
                _HANDLER,
            ],
        )
    served = burst.with_status(200)
    expect(
        len(served) >= _POOL,
        f"at least {_POOL} of {_REQUESTS_42} served (one per connection in the pool)",
        f"statuses {burst.statuses()}",
        "Keep the given endpoints; only a request that cannot get a connection should be refused.",
    )


def _retry_after_problem(answer: _Answer) -> str | None:
    value = answer.headers.get("retry-after")
    if value is None:
        return "no Retry-After header"
    if not re.fullmatch(r"\d+", value.strip()) or int(value) < 1:
        return f"Retry-After: {value!r}, not a whole number of seconds (at least 1)"
    if not answer.headers.get("content-type", "").startswith("application/json"):
        return f"a {answer.headers.get('content-type', 'untyped')} body, not JSON: {short(answer.text, 50)}"
    try:
        body = json.loads(answer.text)
    except ValueError:
        return f"a body that is not JSON: {short(answer.text, 50)}"
    if not isinstance(body, dict):
        return f"the JSON body {short(body, 50)}, not an object"
    return None


def _check_refused(burst: _Burst) -> None:
    refused = burst.with_status(503)
    expect(
        bool(refused),
        f"some of the {_REQUESTS_42} requests refused with 503 (only {_POOL} connections, each held "
        f"{_HOLD:g} s)",
        f"statuses {burst.statuses()}",
        "A request that waited pool_timeout seconds without a connection raises "
        "`sqlalchemy.exc.TimeoutError`; answer it with 503.",
        _HANDLER,
    )
    others = {s: n for s, n in burst.statuses().items() if s not in (200, 503)}
    expect(
        not others,
        "only 200 (served) and 503 (refused)",
        f"statuses {burst.statuses()}",
        "503 Service Unavailable is the status for 'busy now, try again later'.",
    )
    problems = [p for p in map(_retry_after_problem, refused) if p]
    expect(
        not problems,
        "every 503 with Retry-After (whole seconds) and a short JSON body",
        f"{len(problems)} of {len(refused)} with {problems[0] if problems else ''}",
        "Retry-After tells the client how many seconds to wait before trying again; a client that "
        "gets none tends to retry at once, making the burst worse.",
        _HANDLER,
    )


def _check_refused_fast(burst: _Burst) -> None:
    refused = burst.with_status(503)
    slowest = max(a.seconds for a in refused)
    expect(
        slowest < _REFUSED_WITHIN,
        f"each 503 within {_REFUSED_WITHIN:g} s of the request",
        f"the slowest after {slowest:.1f} s",
        "A request refused after a long wait has held a worker, a socket and the client for nothing; "
        "the pool's wait bounds it.",
        "`pool_timeout=0.5` in make_engine.",
    )


def _check_greedy(server: Server, app: FastAPI) -> None:
    before = len(server.exceptions)
    (answer,) = _request(server, "GET", [_GREEDY_PATH], "check-4.2-greedy")
    raised = _new_exceptions(server, before, 1.0) if answer.status == 500 else []
    unhandled = [e for e in raised if isinstance(e, sqlalchemy.exc.TimeoutError)]
    expect(
        answer.status == 503 and _retry_after_problem(answer) is None,
        f"status 503 with Retry-After for a request that, alone in the app, wanted {_POOL + 1} "
        f"connections of a pool of {_POOL}",
        f"status {answer.status}"
        + (
            f": {_first_line(unhandled[-1])} reached the client unhandled, though only one request was "
            "in the app"
            if unhandled
            else f", {_retry_after_problem(answer)}"
            if answer.status == 503
            else f": {short(answer.text, 60)}"
        ),
        "Only the pool knows when it has no connection to give: a count of requests in flight misses "
        "a request that needs two connections, or another user of the same engine, and refuses "
        "requests a short wait would have served.",
        "Answer the pool's own `sqlalchemy.exc.TimeoutError`, wherever it is raised: " + _HANDLER,
    )


def _check_long(server: Server) -> None:
    (answer,) = _request(server, "GET", [_LONG_PATH], "check-4.2-long")
    expect(
        answer.status == 200,
        f"status 200 for a request that got its connection at once and ran a {_LONG:g} s query",
        f"status {answer.status} after {answer.seconds:.1f} s: {short(answer.text, 60)}: the limit was "
        "put on the whole request, not on the wait for a connection",
        "pool_timeout bounds how long a request waits for a connection to come free; a request that "
        "has one is doing its work, and cancelling it throws that work away.",
        "Leave the request alone: `pool_timeout` in make_engine, and a handler for the "
        "`sqlalchemy.exc.TimeoutError` it raises.",
    )


def _check_bug(server: Server, app: FastAPI) -> None:
    bug, broken = _request(server, "GET", [_BUG_PATH, _BROKEN_PATH], "check-4.2-bug")
    catch_all = Exception in app.exception_handlers
    expect(
        bug.status == 500,
        "status 500 for a handler that raised another exception (a bug)",
        f"status {bug.status}"
        + (": a handler for every Exception answers 'busy, retry later' to bugs too" if catch_all else ""),
        "Register the handler for the pool's exception only, so that a bug still shows as one "
        "(500, and a traceback in the log) instead of hiding behind 'retry later'.",
        "`@app.exception_handler(sqlalchemy.exc.TimeoutError)`, not `Exception`.",
    )
    broad = [
        cls.__name__
        for cls in app.exception_handlers
        if isinstance(cls, type)
        and issubclass(cls, sqlalchemy.exc.SQLAlchemyError)
        and not issubclass(cls, sqlalchemy.exc.TimeoutError)
    ]
    expect(
        broken.status == 500,
        "status 500 for a query on a table that does not exist (a database error, not a busy pool)",
        f"status {broken.status}"
        + (
            f": a handler for {broad[0]} answers 'busy, retry later' to errors that retrying cannot fix"
            if broad
            else ""
        ),
        "Only the pool's `sqlalchemy.exc.TimeoutError` means 'busy now': an IntegrityError, a bad "
        "query or a database that is down fail again when retried, and must show as 500.",
        "`@app.exception_handler(sqlalchemy.exc.TimeoutError)`, not `SQLAlchemyError`.",
    )


def check_pool_fail_fast(make_engine: Callable[..., Any], make_app: Callable[[AsyncEngine], Any]) -> None:
    """Check Exercise 4.2: a small pool that refuses quickly, and 503 with Retry-After when it does.

    ``make_engine(url, 2)`` must return an async engine whose pool has 2 connections, no overflow and a
    pool_timeout above 0 and at most 1 s (read from the engine, before any load), and
    ``make_engine(url, 5)`` one of 5. The app from ``make_app(engine)`` then gets routes of the
    check's: one holding a connection for a 0.3 s query, one for a 1.5 s query, one wanting 3
    connections at once, one raising an exception of its own, one querying a table that does not
    exist. Twenty requests at once to the first: at least two are served, none gets 500, the others
    get 503 with a whole-seconds ``Retry-After`` and a JSON body, each within 3 s. Alone, the greedy
    request gets 503 too, the 1.5 s query is served, and the two errors still answer 500. If the pool
    settings are wrong, the app is checked on an engine of the check's own (pool of 2, no overflow,
    0.3 s wait).
    """
    with exercise("4.2", "Fail fast when the pool is exhausted", SOLUTION) as ex:

        def arguments() -> None:
            for name, function in (("make_engine", make_engine), ("make_app", make_app)):
                expect(callable(function), f"the function `{name}`", short(function), _CALL_4_2)

        if not ex.step("make_engine and make_app are functions", arguments):
            return
        url = fresh_database("ch04x-check-4-2")
        engines: list[AsyncEngine] = []
        disposed: list[AsyncEngine] = []
        try:
            if not ex.step(
                f"make_engine(url, {_POOL}) returns an async engine",
                lambda: _make_engine(make_engine, url, engines),
            ):
                return
            engine = engines[0]
            if not ex.step(
                f"its pool: the size asked for ({_POOL}), no overflow, a wait of at most {_MAX_WAIT:g} s "
                "for a connection",
                lambda: _check_pool_settings(engine, make_engine, url, engines),
            ):
                # check the handler all the same, on a pool that is right
                engine = create_async_engine(url, pool_size=_POOL, max_overflow=0, pool_timeout=0.3)
                engines.append(engine)
            install_sleep(engine)
            watch = PoolWatch(engine)
            apps: list[FastAPI] = []
            if not ex.step(
                "make_app(engine) returns a FastAPI app", lambda: _build_app(make_app, engine, apps)
            ):
                return
            app = apps[0]

            async def cleanup() -> None:
                disposed.append(engine)
                await engine.dispose()

            burst = _Burst()
            wrapper = _InFlight(app, cleanup)
            with joins_new_threads(), serve_answer(wrapper, "check-4.2", "4.2", _SERVE_FAILED) as server:
                answered = ex.step(
                    f"{_REQUESTS_42} requests at once on {_POOL} connections: those that get one are "
                    "served, none fails with 500",
                    lambda: (_send_burst(server, watch, burst), _check_served(burst, app)),
                )
                refused = answered and ex.step(
                    "the others get 503, with Retry-After in whole seconds and a JSON body",
                    lambda: _check_refused(burst),
                )
                if refused:
                    ex.step(
                        f"each 503 comes within {_REFUSED_WITHIN:g} s, not after a long wait",
                        lambda: _check_refused_fast(burst),
                    )
                    # the burst's refusals were right: were they the pool's own, or a guess?
                    ex.step(
                        f"one request that wants {_POOL + 1} connections from a pool of {_POOL} gets 503 too",
                        lambda: _check_greedy(server, app),
                    )
                ex.step(
                    f"a request that gets its connection at once is served, even with a {_LONG:g} s query",
                    lambda: _check_long(server),
                )
                ex.step(
                    "a request that raises another exception (a bug, a bad query) still gets 500",
                    lambda: _check_bug(server, app),
                )
        finally:
            rest = [e for e in engines if e not in disposed]
            if rest:
                in_fresh_loop(lambda: _dispose(rest), timeout=10, name="check-4.2-dispose")


# ---------------------------------------------------------------------------------------------------
# Exercise 4.3: orders with their lines, loaded before the session closes
# ---------------------------------------------------------------------------------------------------

_ORDERS, _LINES = 20, 3  # the customer asked about
_OTHER_ORDERS, _OTHER_LINES = 4, 2  # another customer, whose orders must not come back
_MAX_QUERIES = 3
_CALL_4_3 = "Call the check as `check_orders_with_lines(orders_with_lines, Customer, Order, OrderLine)`."
_SELECTIN = (
    "`select(Order).where(Order.customer_id == customer_id).options(selectinload(Order.lines))`, "
    "then `return list((await session.scalars(query)).all())`."
)


@dataclass
class _Loading:
    """What Exercise 4.3's check saw: the truth, the answer, and what reading the answer did."""

    truth: dict[int, list[int]] = field(default_factory=dict)  # order id → its line ids
    others: set[int] = field(default_factory=set)  # the other customer's order ids
    returned: str = ""  # a short repr: the object itself may hold a coroutine never awaited
    items: list[Any] | None = None
    not_async: bool = False
    returned_coroutine: bool = False
    one_shot: str | None = None  # the type of an iterable returned that is not a sequence
    error: str | None = None  # "unique", "missing-greenlet" or "detached": an error translated
    error_text: str = ""
    statements: list[str] = field(default_factory=list)
    open_read: dict[int, list[int]] | None = None  # order id → line ids, read while the session is open
    open_error: str | None = None
    open_statements: int = 0
    closed_read: dict[int, list[int]] | None = None  # the same, once the session is closed
    closed_error: str | None = None
    empty: set[int] = field(default_factory=set)  # the asked customer's orders that have no lines
    transaction_open: bool = True  # the caller's transaction still open after the call
    pending_committed: bool = False  # the call committed the caller's transaction
    new_kept: bool = True  # the order the caller flushed (not committed) still in its session after the call
    new_returned: bool = False  # … and among the orders returned
    elsewhere: int = 0  # orders returned that are not in the caller's session (read through another)
    other_lines: set[int] = field(default_factory=set)  # the other customer's line ids
    others_loaded: int = 0  # the other customer's orders the call loaded from the database
    other_lines_loaded: int = 0  # … and their lines


def _translate(exc: BaseException) -> str | None:
    """The kind of a loading error the check explains itself, or None for any other exception."""
    if isinstance(exc, MissingGreenlet) or isinstance(getattr(exc, "orig", None), MissingGreenlet):
        return "missing-greenlet"
    if isinstance(exc, DetachedInstanceError):
        return "detached"
    if isinstance(exc, InvalidRequestError) and "unique()" in str(exc):
        return "unique"
    return None


def _read_lines(items: list[Any]) -> dict[int, list[int]]:
    return {order.id: sorted(line.id for line in order.lines) for order in items}


def _mapped(cls: Any, name: str) -> None:
    try:
        sqlalchemy.inspect(cls)
    except NoInspectionAvailable:
        raise Mismatch(f"`{name}`, the mapped class from the exercise", short(cls), [_CALL_4_3]) from None


async def _load(
    orders_with_lines: Callable[..., Any], Customer: Any, Order: Any, OrderLine: Any, seen: _Loading
) -> None:
    engine = create_async_engine(fresh_database("ch04x-check-4-3"))
    tables = [Customer.__table__, Order.__table__, OrderLine.__table__]
    metadata = Customer.metadata
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: metadata.drop_all(sync, tables=tables))
            await conn.run_sync(lambda sync: metadata.create_all(sync, tables=tables))
        Session = async_sessionmaker(engine, expire_on_commit=False)

        def customer(name: str, lines: list[int]) -> Any:
            return Customer(
                name=name,
                orders=[
                    Order(lines=[OrderLine(sku=f"sku-{o}-{n}", quantity=n + 1) for n in range(count)])
                    for o, count in enumerate(lines)
                ],
            )

        async with Session() as session:
            other = customer("ch04x-other", [_OTHER_LINES] * _OTHER_ORDERS)
            target = customer("ch04x-asked", [_LINES] * (_ORDERS - 1))
            session.add_all([other, target])
            await session.commit()
            seen.truth = {o.id: sorted(line.id for line in o.lines) for o in target.orders}
            seen.others = {o.id for o in other.orders}
            seen.other_lines = {line.id for o in other.orders for line in o.lines}
            target_id = target.id
        watch = PoolWatch(engine)
        async with Session() as session:
            # the caller's own work, flushed and not committed: a new order with no lines yet, one of
            # the customer's orders all the same (only this transaction can see it)
            new = Order(customer_id=target_id, lines=[])
            session.add(new)
            await session.flush()
            seen.truth[new.id] = []
            seen.empty = {new.id}
            watch.reset()
            # the session's transaction is the caller's: orders_with_lines must not end it
            ended: list[str] = []
            loaded: list[tuple[type, Any]] = []
            sync_session = session.sync_session

            def on_commit(_: Any) -> None:
                ended.append("commit")

            def on_rollback(_: Any) -> None:
                ended.append("rollback")

            def on_load(_: Any, instance: Any) -> None:
                loaded.append((type(instance), sqlalchemy.inspect(instance).identity))

            listeners = (
                ("after_commit", on_commit),
                ("after_rollback", on_rollback),
                ("loaded_as_persistent", on_load),
            )
            for name, listener in listeners:
                event.listen(sync_session, name, listener)
            try:
                result = orders_with_lines(session, target_id)
                if inspect.isawaitable(result):
                    result = await result
                else:
                    seen.not_async = True
                seen.returned = short(result)
                if inspect.iscoroutine(result):
                    seen.returned_coroutine = True
                    result.close()  # e.g. `return session.scalars(…)`, never awaited
                elif hasattr(result, "__iter__") and not isinstance(result, str | bytes | dict):
                    if not isinstance(result, Sequence):
                        seen.one_shot = type(result).__name__
                    seen.items = list(result)
            except Exception as exc:
                kind = _translate(exc)
                if kind is None:
                    raise
                seen.error, seen.error_text = kind, str(exc).splitlines()[0]
            for name, listener in listeners:
                event.remove(sync_session, name, listener)
            seen.pending_committed = "commit" in ended
            seen.transaction_open = not ended
            seen.new_kept = new in session
            seen.statements = list(watch.statements)
            orders = [item for item in seen.items or () if isinstance(item, Order)]
            seen.new_returned = any(item is new for item in orders)
            seen.elsewhere = sum(object_session(item) is not sync_session for item in orders)
            seen.others_loaded = len(
                {key for cls, key in loaded if issubclass(cls, Order) and key and key[0] in seen.others}
            )
            seen.other_lines_loaded = len(
                {
                    key
                    for cls, key in loaded
                    if issubclass(cls, OrderLine) and key and key[0] in seen.other_lines
                }
            )
            if seen.error is None and orders:
                try:
                    seen.open_read = _read_lines(orders)
                except Exception as exc:
                    seen.open_error = _translate(exc) or f"{type(exc).__name__}: {exc}"
                seen.open_statements = len(watch.statements) - len(seen.statements)
        if seen.error is None and orders:
            try:
                seen.closed_read = _read_lines(orders)
            except Exception as exc:
                seen.closed_error = _translate(exc) or f"{type(exc).__name__}: {exc}"
    finally:
        try:
            async with engine.begin() as conn:
                await conn.run_sync(lambda sync: metadata.drop_all(sync, tables=tables))
        finally:
            await engine.dispose()
            gc.collect()  # on the check's own thread and loop: see _quiet_unawaited


def _run_load(orders_with_lines: Callable[..., Any], Customer: Any, Order: Any, OrderLine: Any) -> _Loading:
    seen = _Loading()
    with _quiet_unawaited():
        in_fresh_loop(
            lambda: _load(orders_with_lines, Customer, Order, OrderLine, seen), timeout=30, name="check-4.3"
        )
    return seen


_UNIQUE = Mismatch(
    "the customer's orders, each once",
    "SQLAlchemy refused the result: 'The unique() method must be invoked on this Result, as it "
    "contains results that include joined eager loads against collections'",
    [
        "`joinedload(Order.lines)` joins each order to its lines, so an order comes back once per line; "
        "SQLAlchemy 2 makes you say that you want each order once.",
        "`(await session.execute(query)).unique().scalars().all()`; or `selectinload(Order.lines)`, "
        "which needs no `.unique()`.",
    ],
)


def _not_loaded(kind: str, where: str) -> Mismatch:
    if kind == "missing-greenlet":
        seen = (
            f"{where}: `order.lines` was not loaded, so reading it started a query from plain "
            "(synchronous) attribute access, which SQLAlchemy refuses under asyncio: MissingGreenlet"
        )
    elif kind == "detached":
        seen = (
            f"{where}: `order.lines` was not loaded, and the session that could load it is closed "
            "(DetachedInstanceError)"
        )
    else:
        seen = f"{where}: {kind}"
    return Mismatch(
        "each order's lines loaded by orders_with_lines, before it returns",
        seen,
        [
            "Under asyncio nothing may load lazily: what the response needs must be loaded by the "
            "query, with a loader option.",
            _SELECTIN,
        ],
    )


def _check_returned(seen: _Loading, Order: Any) -> None:
    if seen.error == "unique":
        raise _UNIQUE
    if seen.error is not None:
        raise _not_loaded(seen.error, "inside orders_with_lines")
    expect(
        not seen.not_async,
        "an awaitable: orders_with_lines defined with `async def`",
        f"a plain function that returned {seen.returned}",
        "Queries on an AsyncSession are awaited: `async def orders_with_lines(…)`, and "
        "`await session.scalars(…)` inside.",
    )
    items = seen.items
    if seen.returned_coroutine:
        raise Mismatch(
            f"a list of the customer's {len(seen.truth)} Order objects",
            f"a coroutine, {seen.returned}: a query that was never awaited, so never ran",
            [
                "`session.scalars(…)` and `session.execute(…)` are coroutines on an AsyncSession: "
                "nothing runs until they are awaited.",
                "`return list((await session.scalars(query)).all())`.",
            ],
        )
    if items is None:
        raise Mismatch(
            f"a list of the customer's {len(seen.truth)} Order objects",
            seen.returned,
            ["Return the orders themselves: `return list((await session.scalars(query)).all())`."],
        )
    if seen.one_shot is not None:
        raise Mismatch(
            f"a list of the customer's {len(seen.truth)} Order objects",
            f"a {seen.one_shot}: a result to iterate once, with no len() and no indexing (a second loop "
            "over it finds nothing)",
            [
                "A result is a cursor over rows, not a collection: turn it into a list before you return it.",
                "`return list((await session.scalars(query)).all())`.",
            ],
        )
    if items and all(isinstance(item, Row) for item in items):
        raise Mismatch(
            f"a list of the customer's {len(seen.truth)} Order objects",
            f"{len(items)} Row objects (tuples of columns), such as {short(items[0], 50)}",
            [
                "`session.execute(select(Order))` gives rows; `session.scalars(…)` (or "
                "`.scalars()` on the result) gives the Order objects.",
                _SELECTIN,
            ],
        )
    strangers = [item for item in items if not isinstance(item, Order)]
    expect(
        not strangers,
        f"a list of the customer's {len(seen.truth)} Order objects",
        f"{len(strangers)} of {len(items)} are not orders, such as "
        f"{short(strangers[0] if strangers else None, 50)}",
        "Return the Order objects the query loaded: `list((await session.scalars(query)).all())`.",
    )
    if seen.elsewhere:
        raise Mismatch(
            f"the customer's {len(seen.truth)} orders, read through the session it was given",
            f"{seen.elsewhere} of {len(items)} orders that are not in that session: they were read "
            "through another session (or connection), whose transaction cannot see what the caller "
            "has flushed but not committed"
            + ("" if seen.new_returned else ", so the caller's new order is missing"),
            [
                "The caller passes its session so that the read happens in its transaction, and sees "
                "its own work; a session of your own reads only what is committed.",
                "Query through the `session` argument: " + _SELECTIN,
            ],
        )
    ids = [order.id for order in items]
    returned = set(ids)
    expected = set(seen.truth)
    foreign = returned & seen.others
    expect(
        not foreign,
        f"only the {len(expected)} orders of the customer asked for",
        f"{len(returned)} orders, {len(foreign)} of them another customer's",
        "Filter on the customer: `.where(Order.customer_id == customer_id)`.",
    )
    expect(
        len(ids) == len(returned),
        f"each of the {len(expected)} orders once",
        f"{len(ids)} objects for {len(returned)} orders: each order repeated once per line (a join)",
        "A join to the lines returns one row per line; load the lines with an option instead.",
        _SELECTIN,
    )
    missing = expected - returned
    if missing and missing <= seen.empty:
        raise Mismatch(
            f"the customer's {len(expected)} orders, the one with no lines yet among them",
            f"{len(returned)} of them: the order that has no lines is missing, so the query kept only "
            "orders that have a line (an inner join)",
            [
                "`.join(Order.lines)` is an INNER JOIN: an order with no line has no row to join, and "
                "drops out of the result.",
                "Load the lines with a loader option, which never filters the orders: " + _SELECTIN,
            ],
        )
    expect(
        returned == expected,
        f"the customer's {len(expected)} orders",
        f"{len(returned)} of them" + (f", {len(missing)} missing" if missing else ""),
        "Select every order of the customer: `select(Order).where(Order.customer_id == customer_id)`.",
    )


def _check_lines_loaded(seen: _Loading) -> None:
    if seen.open_error is not None:
        raise _not_loaded(seen.open_error, "reading `order.lines` in the open session, as a handler would")
    expect(
        seen.open_statements == 0,
        "every order's lines already loaded (reading them runs no query)",
        f"{seen.open_statements} queries while reading them",
        _SELECTIN,
    )
    wrong = [oid for oid, lines in (seen.open_read or {}).items() if lines != seen.truth.get(oid)]
    expect(
        not wrong,
        "each order with its own lines",
        f"{len(wrong)} of {len(seen.truth)} orders with other lines, e.g. order {wrong[0] if wrong else ''}: "
        f"{(seen.open_read or {}).get(wrong[0]) if wrong else ''}",
        "Load the relationship as it is: `selectinload(Order.lines)`, without extra criteria.",
    )


def _check_queries(seen: _Loading) -> None:
    count = len(seen.statements)
    per_order = count > len(seen.truth) - len(seen.empty)  # the new order's lines are known already
    expect(
        count <= _MAX_QUERIES,
        f"at most {_MAX_QUERIES} queries for {len(seen.truth)} orders, not one per order",
        f"{count} queries for {len(seen.truth)} orders"
        + (": one for the orders, then one more per order (the N+1 problem)" if per_order else ""),
        "Each `await order.awaitable_attrs.lines` is a query of its own: with 1,000 orders, 1,001 "
        "round trips to the database.",
        "Load the lines of all the orders in one more query (one per 500 orders): " + _SELECTIN,
    )


def _check_only_customer(seen: _Loading) -> None:
    expect(
        not seen.others_loaded and not seen.other_lines_loaded,
        "only the customer's orders and their lines read from the database",
        f"{seen.others_loaded} orders and {seen.other_lines_loaded} lines of another customer loaded "
        "too: the query read every customer's orders (the whole table), and the customer's were picked "
        "out afterwards, in Python",
        "Let the database filter: a `WHERE` sends back only the customer's rows, where filtering in "
        "Python loads every order (and its lines) on each request, however large the table grows.",
        "`select(Order).where(Order.customer_id == customer_id)`, with `selectinload(Order.lines)`.",
    )


def _check_after_close(seen: _Loading) -> None:
    if seen.closed_error is not None:
        raise _not_loaded(seen.closed_error, "reading `order.lines` after the session closed")
    expect(
        seen.closed_read == {oid: lines for oid, lines in seen.truth.items()},
        f"the {len(seen.truth)} orders and their lines readable after the session closed",
        short(seen.closed_read),
        _SELECTIN,
    )


def _check_transaction(seen: _Loading) -> None:
    if seen.pending_committed:
        raise Mismatch(
            "the caller's transaction left open: orders_with_lines only reads",
            "a commit during the call: orders_with_lines committed the caller's transaction, one it "
            "does not own, with whatever the caller had not committed yet",
            [
                "The session, and its transaction, belong to the caller (the request's dependency "
                "commits or rolls back once the handler is done); a function that reads through it "
                "must not end it.",
                "Return the loaded orders and leave `commit()` to get_session.",
            ],
        )
    lost = ""
    if not seen.new_kept:
        lost = ": the order the caller had added and flushed, not committed, is gone from its session" + (
            "" if seen.new_returned else " and missing from the result"
        )
    expect(
        seen.transaction_open and seen.new_kept,
        "the caller's transaction left open: orders_with_lines only reads",
        "it was over when the call returned: orders_with_lines rolled back (or closed) the caller's "
        "transaction, one it does not own, and whatever the caller had not committed with it" + lost,
        "The session, and its transaction, belong to the caller; a function that reads through it "
        "must not end it.",
        "Return the loaded orders without `rollback()`, `close()` or `async with session:`.",
    )


def check_orders_with_lines(
    orders_with_lines: Callable[..., Any], Customer: Any, Order: Any, OrderLine: Any
) -> None:
    """Check Exercise 4.3: a customer's orders, with their lines loaded up front, in a few queries.

    On a database of the check's own, one customer has 19 committed orders of 3 lines and another 4
    orders of 2. In a session of the check's, which has added and flushed (not committed) a 20th
    order of the first customer, with no lines yet,
    ``await orders_with_lines(session, customer_id)`` must return a list (a sequence) of the first
    customer's 20 Order objects, each once, the new one too, read through that session; reading
    every ``order.lines`` in the still-open session must run no query (a lazy load raises
    MissingGreenlet under asyncio) and give each order its own lines; the call must run at most 3
    SQL statements (not one per order) and load none of the other customer's orders or lines (the
    session's ``loaded_as_persistent`` events tell); the lines must still read after the session has
    closed, as when FastAPI serialises a response; and the caller's transaction must be left open,
    neither committed nor rolled back (session events tell which), its new order still in the session.
    """
    with exercise("4.3", "Orders with their lines, loaded before the session closes", SOLUTION) as ex:

        def arguments() -> None:
            expect(
                callable(orders_with_lines),
                "the function `orders_with_lines`",
                short(orders_with_lines),
                _CALL_4_3,
            )
            for cls, name in ((Customer, "Customer"), (Order, "Order"), (OrderLine, "OrderLine")):
                _mapped(cls, name)

        if not ex.step("orders_with_lines is a function; Customer, Order, OrderLine are mapped", arguments):
            return
        found: list[_Loading] = []
        if not ex.step(
            "orders_with_lines(session, customer_id) runs and leaves the caller's transaction alone: "
            "nothing committed, nothing rolled back",
            lambda: (
                found.append(_run_load(orders_with_lines, Customer, Order, OrderLine)),
                _check_transaction(found[0]),
            ),
        ):
            return
        seen = found[0]
        if not ex.step(
            f"it returns the customer's {_ORDERS} orders, each once", lambda: _check_returned(seen, Order)
        ):
            return
        if not ex.step(
            "each order's lines are loaded: reading them in the open session runs no query",
            lambda: _check_lines_loaded(seen),
        ):
            return
        ex.step(f"in at most {_MAX_QUERIES} queries, not one per order", lambda: _check_queries(seen))
        ex.step(
            "it reads only that customer's orders and lines, not every customer's",
            lambda: _check_only_customer(seen),
        )
        ex.step(
            "the lines still read after the session has closed, as when FastAPI serialises them",
            lambda: _check_after_close(seen),
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 4.4: a checkout that holds no connection while the payment provider works
# ---------------------------------------------------------------------------------------------------

_SHOP_POOL = 2
_SHOP_WAIT = 1.0  # the pool_timeout of the check's engine, as in the exercise
_CHARGE = 0.3  # how long a charge of the check's provider takes
_STOCKED = 5  # units of the sku sold alone, declined, or cut short
_CONCURRENT_44 = 10
_SCARCE = 3  # units for _CONCURRENT_44 checkouts that arrive together
_READ_PAUSE = 0.05  # after each read of the stock table, the other checkouts run this long
_SCARCE_RUNS = 3  # runs of the scarce sale at most, while it would pass and no two reads of the stock met
_STALLED_RUNS = 3  # runs of a sale at most, while pool timeouts nothing named explains are all it did wrong
_STALL_GAP = 1.0  # seconds between those runs, so that a stall has time to pass
_BOUND_44 = 8.0  # the longest a scenario's checkouts may take
_SCHEMA_44 = "ch04x_check_4_4"  # on PostgreSQL: the check's tables, apart from the notebook's own shop
_PROVIDER_DOWN = "the payment provider did not answer (the check's provider)"
_CALL_4_4 = "Call the check as `check_checkout(checkout, Stock, CheckoutOrder, PaymentDeclined, OutOfStock)`."
_RESERVE = (
    "`result = await session.execute(update(Stock).where(Stock.sku == sku, Stock.available > 0)"
    ".values(available=Stock.available - 1))`, then `if result.rowcount != 1: raise OutOfStock(sku)`"
)
_THREE_STEPS = (
    "`async with sessions.begin() as session:` around the reservation (the conditional UPDATE and the "
    "pending order); `await payments.charge(sku)` after that block has ended; then another `async with "
    "sessions.begin() as session:` that records the outcome."
)


@dataclass
class _Charge:
    """One call of the check's provider: connections checked out when it started and when it ended."""

    in_use: int  # by anyone (the scenario runs one checkout, or many)
    mine: int  # by the task that called charge()
    in_use_end: int = 0
    mine_end: int = 0

    @property
    def held(self) -> int:
        return max(self.in_use, self.in_use_end)

    @property
    def held_by_caller(self) -> int:
        return max(self.mine, self.mine_end)


_CHECKOUT: ContextVar[object | None] = ContextVar("ch04_checkout", default=None)


def _owner() -> object | None:
    """Who is running: the check's checkout call (``_one_checkout``), else the current task.

    A learner's checkout may run its work in tasks of its own (``asyncio.wait_for`` does on Python 3.11,
    as do ``gather`` and ``create_task``): those copy the context, so they count as the same checkout.
    """
    owner = _CHECKOUT.get()
    if owner is not None:
        return owner
    try:
        return asyncio.current_task()
    except RuntimeError:  # no loop running on this thread
        return None


async def _one_checkout(checkout: Callable[..., Any], *args: Any) -> Any:
    """``checkout(*args)`` as one checkout: every connection its tasks take is counted as its own."""
    _CHECKOUT.set(object())  # in this task's own copy of the context, which its child tasks inherit
    return await checkout(*args)


class _Holders:
    """Which checkout holds each of an engine's connections, from the pool's own events.

    A connection is checked out inside the greenlet of the task that runs the query, on the loop's
    thread, with that task's context: ``_owner()`` in the ``checkout`` event names the checkout that
    holds it until its ``checkin`` (or ``detach``).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._lock = threading.Lock()
        self._owners: dict[int, object | None] = {}
        self.most_by_one = 0  # the most connections one checkout held at once
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "checkout", self._on_checkout)
        event.listen(sync_engine, "checkin", self._on_checkin)
        event.listen(sync_engine, "detach", self._on_checkin)

    def _on_checkout(self, _dbapi_connection: Any, record: Any, *_: Any) -> None:
        owner = _owner()
        with self._lock:
            self._owners[id(record)] = owner
            if _CHECKOUT.get() is not None:
                held = sum(held_by is owner for held_by in self._owners.values())
                self.most_by_one = max(self.most_by_one, held)

    def _on_checkin(self, _dbapi_connection: Any, record: Any, *_: Any) -> None:
        with self._lock:
            self._owners.pop(id(record), None)

    def held_by(self, checkout: object | None) -> int:
        with self._lock:
            return sum(owner is checkout for owner in self._owners.values()) if checkout is not None else 0


@dataclass
class _Shop:
    """One scenario's shop: the check's engine (a pool of 2) and what watches it."""

    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    made: list[AsyncSession]  # every session the learner's code made from `sessions`
    watch: PoolWatch
    holders: _Holders
    Stock: Any
    Order: Any
    schema: str | None = None  # PostgreSQL: the schema of the check's tables (its connections' search_path)
    stock_reads: int = 0  # SELECTs of the stock table, counted while the check pauses after them
    serialised_reads: int = 0  # of which held the row's lock on PostgreSQL: no pause after them
    locked_reads: int = 0  # of which asked for a row lock (FOR UPDATE), whether the database gives one or not
    met: int = 0  # reads of the stock table that returned during another's pause, while units were unsold
    shared: list[Any] = field(default_factory=list)  # transactions that read the stock FOR SHARE
    shared_then_update: int = 0  # UPDATEs of the stock in one of those transactions
    no_wait_reads: list[str] = field(default_factory=list)  # "SKIP LOCKED" / "NOWAIT" reads of the stock
    updated: list[Any] = field(default_factory=list)  # transactions that have updated the stock
    pausing: int = 0  # reads whose pause runs now
    provider: _Provider | None = None  # the sale's payment provider: how many charges have started


class _Provider:
    """The check's payment provider: a charge takes 0.3 s, and notes the connections held meanwhile.

    ``mode``: "accept" every charge, "decline" every charge (raising the learner's PaymentDeclined),
    "fail": the charge raises ``ConnectionError``, an error that is no answer (the card may or may not
    have been charged), or "hang": the charge never returns, as when the process dies while the
    provider works.
    """

    def __init__(self, shop: _Shop, declined: type[BaseException], mode: str = "accept") -> None:
        self.shop, self.declined, self.mode = shop, declined, mode
        self.charges: list[_Charge] = []
        self.failures: list[BaseException] = []  # the errors raised in "fail" mode
        self.charging = asyncio.Event()

    async def charge(self, *args: Any, **kwargs: Any) -> None:
        caller = _owner()
        record = _Charge(self.shop.watch.in_use, self.shop.holders.held_by(caller))
        self.charges.append(record)
        if self.mode == "hang":
            self.charging.set()
            await asyncio.Event().wait()  # until the check cancels the checkout
        await asyncio.sleep(_CHARGE)
        record.in_use_end, record.mine_end = self.shop.watch.in_use, self.shop.holders.held_by(caller)
        if self.mode == "decline":
            raise self.declined("card declined (the check's provider)")
        if self.mode == "fail":
            failure = ConnectionError(_PROVIDER_DOWN)
            self.failures.append(failure)
            raise failure


@dataclass
class _Sale:
    """What a scenario saw: each checkout's result (a value or an exception) and the database after."""

    results: list[Any] = field(default_factory=list)
    charges: list[_Charge] = field(default_factory=list)
    hung: bool = False
    queries: int = 0  # statements the learner's code ran on the check's engine
    in_use_after: int = 0  # connections still checked out once every checkout had returned
    most_held_by_one: int = 0  # the most connections one checkout held at once
    stock_reads: int = 0  # SELECTs of the stock table (counted only where the check pauses after them)
    serialised_reads: int = 0  # of which held the row's lock on PostgreSQL (FOR UPDATE): no pause after them
    locked_reads: int = 0  # of which with FOR UPDATE (SQLAlchemy leaves the clause out on SQLite)
    met: int = 0  # reads of the stock table that returned during another's pause, while units were unsold
    shared_then_update: int = 0  # UPDATEs of the stock in a transaction that had read it FOR SHARE
    no_wait_reads: list[str] = field(
        default_factory=list
    )  # reads of the stock that would not wait for a lock
    dialect: str = ""
    failures: list[BaseException] = field(default_factory=list)  # the provider's errors, in "fail" mode
    reached_charge: bool = True
    stock: int | None = None
    statuses: list[str] = field(default_factory=list)  # the sku's orders, by id
    runs: int = 1  # the runs of this sale the check made, pool timeouts being all that went wrong before


def _tracked_sessions(engine: AsyncEngine) -> tuple[async_sessionmaker[AsyncSession], list[AsyncSession]]:
    """A session factory like the exercise's that remembers each session it makes (to close leftovers)."""
    made: list[AsyncSession] = []

    class _Session(AsyncSession):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    return async_sessionmaker(engine, class_=_Session, expire_on_commit=False), made


def _names_table(statement: str, table: str) -> bool:
    """Whether ``statement`` (lower case) names ``table`` itself, not a table whose name contains it
    (``ch04x_stock_log`` is not ``ch04x_stock``)."""
    return re.search(rf"(?<!\w){re.escape(table)}(?!\w)", statement) is not None


def _holds_the_row(statement: str, lock: Any, table: str) -> bool:
    """Whether a read (lower case, and its ``with_for_update`` arguments if any) locks the row of
    ``table`` it reads for writing and waits for that lock: FOR UPDATE or FOR NO KEY UPDATE, of that
    table if ``OF`` names tables, neither NOWAIT nor SKIP LOCKED. Comments in SQL text do not count."""
    if lock is not None:
        of = getattr(lock, "of", None)
        if of and not any(_names_table(str(getattr(o, "table", o)).lower(), table) for o in of):
            return False
        return not (lock.read or lock.nowait or lock.skip_locked)
    code = re.sub(r"--[^\n]*|/\*.*?\*/", " ", statement, flags=re.S)
    clause = re.search(r"\bfor\s+(no\s+key\s+)?update\b([^;]*)", code)
    if clause is None or re.search(r"\b(nowait|skip\s+locked)\b", clause.group(2)):
        return False
    named = re.match(r"\s+of\s+([\w\s,.\"]+)", clause.group(2))
    return named is None or _names_table(named.group(1), table)


def _pause_after_stock_reads(shop: _Shop) -> Callable[..., None]:
    """After a SELECT of the stock table, let the other checkouts run before the reader goes on.

    The listener runs inside SQLAlchemy's greenlet (the learner's query is being executed there), so
    it can await: ``await_`` hands ``asyncio.sleep`` to the event loop, as a driver awaits its socket.
    A decision taken on a number read earlier then meets the other checkouts' reads, instead of only
    when the scheduler happens to interleave them; ``shop.met`` counts the reads that did while fewer
    charges than ``_SCARCE`` had started (later, every unit is taken: two reads that meet then find
    none left, and show no race).

    A read that holds the row's lock on PostgreSQL (it takes it: FOR UPDATE or FOR NO KEY UPDATE, with
    neither NOWAIT nor SKIP LOCKED; or its transaction has updated the stock) gets no pause: no other
    read that wants the lock can return before its transaction ends, so a pause would not let them
    meet; it would only hold the lock 50 ms longer, and ten checkouts, one after the other behind that
    lock, would spend half the pool wait on the check's pauses.
    """

    table = str(shop.Stock.__table__.name).lower()

    def pause(_conn: Any, _cursor: Any, statement: str, _parameters: Any, context: Any, *_: Any) -> None:
        text = statement.lstrip().lower()
        if text.startswith("select") and _names_table(text, table):
            shop.stock_reads += 1
            asked = getattr(getattr(context, "compiled", None), "statement", None)
            lock = getattr(asked, "_for_update_arg", None)
            if "for update" in text or lock is not None:
                shop.locked_reads += 1
            # on PostgreSQL, a read that holds the row's lock (taken by this read, or by an UPDATE of this
            # transaction) cannot meet another read that wants it
            held = _holds_the_row(text, lock, table) or _conn.get_transaction() in shop.updated
            if _conn.dialect.name == "postgresql" and held:
                shop.serialised_reads += 1
                return
            shared_in = _conn.get_transaction()
            shared = "for share" in text or (
                getattr(lock, "read", False) and not getattr(lock, "key_share", False)
            )
            if shared and shared_in is not None:  # FOR KEY SHARE does not stop the UPDATE: no deadlock
                shop.shared.append(shared_in)  # SQLite drops the clause; the statement still asks for it
            # a read that gives up on a locked row, unless it cannot meet one: FOR KEY SHARE does not
            # conflict with an UPDATE's lock, and a transaction's own lock never blocks it
            key_share = getattr(lock, "read", False) and getattr(lock, "key_share", False)
            if not key_share and shared_in not in shop.updated:
                for clause, asked_for in (("SKIP LOCKED", "skip_locked"), ("NOWAIT", "nowait")):
                    if getattr(lock, asked_for, False):
                        shop.no_wait_reads.append(clause)
            charged = len(shop.provider.charges) if shop.provider is not None else 0
            if shop.pausing and charged < _SCARCE:
                shop.met += 1
            shop.pausing += 1
            try:
                await_(asyncio.sleep(_READ_PAUSE))
            finally:
                shop.pausing -= 1
        elif text.startswith("update") and _names_table(text, table):
            shop.updated.append(_conn.get_transaction())
            if _conn.get_transaction() in shop.shared:
                shop.shared_then_update += 1

    event.listen(shop.engine.sync_engine, "after_cursor_execute", pause)
    return pause


async def _own_schema(url: str) -> str | None:
    """On PostgreSQL, a schema for the check's tables (None elsewhere, or where it may not be made).

    ``$DATABASE_URL`` is the notebook's database too, whose `shop_sessions` works on tables of the
    same names: in a schema of its own, the check neither drops the notebook's shop nor lets an answer
    that uses `shop_sessions` instead of `sessions` change the check's stock.
    """
    if make_url(url).get_backend_name() != "postgresql":
        return None
    admin = create_async_engine(url, poolclass=NullPool)
    try:
        async with admin.begin() as conn:
            await conn.execute(sqlalchemy.text(f"CREATE SCHEMA IF NOT EXISTS {_SCHEMA_44}"))
    except sqlalchemy.exc.DBAPIError:  # no right to make schemas: the tables go where they always did
        return None
    finally:
        await admin.dispose()
    return _SCHEMA_44


def _search_path(engine: AsyncEngine, schema: str) -> None:
    """Every new connection of ``engine`` finds unqualified tables in ``schema`` (SQL text too)."""

    def use(dbapi_connection: Any, _record: Any) -> None:
        autocommit = dbapi_connection.autocommit
        dbapi_connection.autocommit = True  # so that no rollback undoes the SET
        cursor = dbapi_connection.cursor()
        cursor.execute(f"SET SESSION search_path TO {schema}")
        cursor.close()
        dbapi_connection.autocommit = autocommit

    event.listen(engine.sync_engine, "connect", use, insert=True)


async def _open_shop(Stock: Any, Order: Any, sku: str, units: int) -> _Shop:
    url = fresh_database("ch04x-check-4-4")
    schema = await _own_schema(url)
    engine = create_async_engine(url, pool_size=_SHOP_POOL, max_overflow=0, pool_timeout=_SHOP_WAIT)
    if schema is not None:
        _search_path(engine, schema)
    tables = (Stock.__table__, Order.__table__)
    async with engine.begin() as conn:
        for table in reversed(tables):
            await conn.run_sync(lambda sync, t=table: t.drop(sync, checkfirst=True))
        for table in tables:
            await conn.run_sync(lambda sync, t=table: t.create(sync))
        await conn.execute(insert(Stock).values(sku=sku, available=units))
    # the pool's connections, all open before the checkouts start: one made during a sale (slow on a
    # busy database server) leaves the first checkouts on one connection, one at a time, where a
    # read-then-write answer's race would not show
    async with AsyncExitStack() as opened:
        for _ in range(_SHOP_POOL):
            await opened.enter_async_context(engine.connect())
    sessions, made = _tracked_sessions(engine)
    watch = PoolWatch(engine)
    return _Shop(engine, sessions, made, watch, _Holders(engine), Stock, Order, schema)


async def _close_sessions(shop: _Shop) -> None:
    """Close every session the learner's code made: a wrong answer may leave one open, with its
    connection checked out (and, on SQLite, the write lock)."""
    for session in shop.made:
        with suppress(Exception):  # a session whose connection is already gone: nothing more to do
            await session.close()


async def _close_shop(shop: _Shop) -> None:
    await _close_sessions(shop)
    try:
        async with shop.engine.begin() as conn:
            for table in (shop.Order.__table__, shop.Stock.__table__):
                await conn.run_sync(lambda sync, t=table: t.drop(sync, checkfirst=True))
        if shop.schema is not None:
            with suppress(sqlalchemy.exc.DBAPIError):  # not empty: another run's tables are in it
                async with shop.engine.begin() as conn:
                    await conn.execute(sqlalchemy.text(f"DROP SCHEMA IF EXISTS {shop.schema}"))
    finally:
        await shop.engine.dispose()


async def _read_back(shop: _Shop, sku: str, sale: _Sale) -> None:
    async with shop.engine.connect() as conn:
        sale.stock = await conn.scalar(select(shop.Stock.available).where(shop.Stock.sku == sku))
        rows = await conn.execute(
            select(shop.Order.status).where(shop.Order.sku == sku).order_by(shop.Order.id)
        )
        sale.statuses = [str(status) for status in rows.scalars()]


async def _sell(
    checkout: Callable[..., Any],
    models: tuple[Any, Any, type[BaseException]],
    sku: str,
    units: int,
    count: int,
    mode: str = "accept",
    pause: bool = False,
) -> _Sale:
    """``count`` checkouts of ``sku`` at once, on a shop with ``units`` of it; what they did."""
    Stock, Order, declined = models
    shop = await _open_shop(Stock, Order, sku, units)
    sale = _Sale()
    try:
        provider = _Provider(shop, declined, mode)
        shop.provider = provider
        pausing = _pause_after_stock_reads(shop) if pause else None
        shop.watch.reset()
        scope = asyncio.timeout(_BOUND_44)
        try:
            async with scope:
                sale.results = list(
                    await asyncio.gather(
                        *(_one_checkout(checkout, shop.sessions, provider, sku) for _ in range(count)),
                        return_exceptions=True,
                    )
                )
        except TimeoutError:
            if not scope.expired():
                raise
            sale.hung = True
        sale.queries, sale.in_use_after = shop.watch.queries, shop.watch.in_use
        sale.most_held_by_one = shop.holders.most_by_one
        sale.stock_reads, sale.locked_reads, sale.met = shop.stock_reads, shop.locked_reads, shop.met
        sale.serialised_reads = shop.serialised_reads
        sale.shared_then_update, sale.no_wait_reads = shop.shared_then_update, shop.no_wait_reads
        sale.dialect = _dialect(shop.engine)
        sale.charges, sale.failures = provider.charges, provider.failures
        if pausing is not None:
            event.remove(shop.engine.sync_engine, "after_cursor_execute", pausing)
        await _close_sessions(shop)
        await _read_back(shop, sku, sale)
    finally:
        await _close_shop(shop)
    return sale


async def _crash(
    checkout: Callable[..., Any], models: tuple[Any, Any, type[BaseException]], sku: str
) -> _Sale:
    """One checkout, cancelled while charge() runs (as a crash or a shutdown would end it)."""
    Stock, Order, declined = models
    shop = await _open_shop(Stock, Order, sku, _STOCKED)
    sale = _Sale()
    try:
        provider = _Provider(shop, declined, "hang")
        shop.watch.reset()
        task = asyncio.ensure_future(_one_checkout(checkout, shop.sessions, provider, sku))
        waiter = asyncio.ensure_future(provider.charging.wait())
        await asyncio.wait({task, waiter}, timeout=_BOUND_44, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        sale.reached_charge = provider.charging.is_set()
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=_BOUND_44)
        if not task.done():
            sale.hung = True
        elif not task.cancelled():
            sale.results = [task.exception() or task.result()]
        sale.queries, sale.charges = shop.watch.queries, provider.charges
        await _close_sessions(shop)
        await _read_back(shop, sku, sale)
    finally:
        await _close_shop(shop)
    return sale


def _run_sale(main: Callable[[], Awaitable[_Sale]]) -> _Sale:
    with _quiet_unawaited():
        return in_fresh_loop(main, timeout=_BOUND_44 * 3 + 10, name="check-4.4")


def _hung(what: str) -> Mismatch:
    return Mismatch(
        f"{what} to finish within {_BOUND_44:g} s",
        f"still running after {_BOUND_44:g} s: hung",
        [
            "A checkout that waits for a connection nobody gives back (a session opened inside another, "
            "on a pool of 2), or for a lock its own other transaction holds, never finishes.",
            "One session at a time, each in its own `async with sessions.begin() as session:` block, "
            "ended before the next one starts: " + _THREE_STEPS,
        ],
    )


def _first_error(sale: _Sale, allowed: tuple[type[BaseException], ...] = ()) -> None:
    """Raise the first exception a checkout raised that is not ``allowed`` (a placeholder first)."""
    errors = [r for r in sale.results if isinstance(r, BaseException) and not isinstance(r, allowed)]
    for error in errors:
        if isinstance(error, NotImplementedError):
            raise error
    if errors:
        raise errors[0]


def _one_line(exc: BaseException, limit: int = 70) -> str:
    text = re.sub(r"^\([\w.]+\) ", "", (str(exc).splitlines() or [""])[0])  # SQLAlchemy's "(driver.Error) "
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _expect_own_engine(sale: _Sale) -> None:
    if sale.queries:
        return
    for result in sale.results:
        if isinstance(result, NotImplementedError):
            raise result
    raised = next((r for r in sale.results if isinstance(r, BaseException)), None)
    raise Mismatch(
        "the checkout to work through the `sessions` it is given",
        "no statement on the check's database"
        + (f" (your code raised {type(raised).__name__}: {_one_line(raised)})" if raised else "")
        + ": it used another session factory or engine, such as the notebook's `shop_sessions`",
        [
            "The check passes a session factory of its own, on its own database with its pool of 2; "
            "make every session from the `sessions` argument.",
            _THREE_STEPS,
        ],
    )


def _statuses(statuses: list[str]) -> str:
    return ", ".join(f"{n} {status!r}" for status, n in Counter(statuses).items()) or "none"


def _check_alone(sale: _Sale, out_of_stock: type[BaseException]) -> None:
    if sale.hung:
        raise _hung("one checkout")
    _expect_own_engine(sale)
    (result,) = sale.results
    if isinstance(result, out_of_stock):
        raise Mismatch(
            f"'paid' for a checkout of a sku with {_STOCKED} units in stock",
            f"{type(result).__name__} raised with {_STOCKED} units in stock",
            [
                "The conditional UPDATE changes one row when a unit was left, and none when there was "
                "none: refuse the checkout only when it changed nothing.",
                _RESERVE + ".",
            ],
        )
    _first_error(sale)
    expect(
        len(sale.charges) == 1,
        "one charge by the payment provider",
        f"{len(sale.charges)} charges"
        + (": the customer was never charged" if not sale.charges else ": the customer paid more than once"),
        "Call `await payments.charge(sku)` once per checkout, between the reservation and the outcome.",
    )
    expect(
        result == "paid",
        "'paid' returned: the order's status once the payment went through",
        short(result),
        "Return the status the order was given: 'paid' when `charge()` returned, 'declined' when it "
        "raised PaymentDeclined.",
    )
    if sale.statuses == ["pending"]:
        raise Mismatch(
            "one order stored, 'paid'",
            "one order, still 'pending': the transaction that marks it paid was never committed, and "
            "closing a session rolls back what it did not commit",
            [
                "Each step is a transaction of its own, and each must be committed: the outcome's too.",
                "`async with sessions.begin() as session:` commits when the block ends without an "
                "exception; a plain `async with sessions() as session:` needs `await session.commit()`.",
            ],
        )
    expect(
        sale.statuses == ["paid"],
        "one order stored, 'paid'",
        f"orders of that sku: {_statuses(sale.statuses)}",
        "Store one order per checkout: added as 'pending' with the reservation, then updated to its outcome.",
    )
    expect(
        sale.stock == _STOCKED - 1,
        f"{_STOCKED - 1} units left of {_STOCKED}: one taken",
        f"{sale.stock} left" + (": no unit was taken" if sale.stock == _STOCKED else ""),
        "The reservation takes the unit: " + _RESERVE + ".",
    )


def _check_released(sale: _Sale) -> None:
    (charge,) = sale.charges
    expect(
        charge.held == 0,
        "no connection checked out while charge() runs",
        f"{charge.held} checked out during the {_CHARGE:g} s charge (the only checkout running): its "
        "session was still open, holding a connection the pool could have given another checkout",
        "A session holds its connection from its first query until it commits, rolls back or closes; "
        "the charge must come after the reservation's transaction has ended, outside any session.",
        _THREE_STEPS,
    )
    expect(
        sale.in_use_after == 0,
        "no connection checked out once the checkout has returned",
        f"{sale.in_use_after} still checked out: a session was never closed",
        "Make every session in an `async with` block, which closes it however the block ends.",
    )


def _check_pool(sale: _Sale, out_of_stock: type[BaseException]) -> None:
    if sale.hung:
        raise _hung(f"{_CONCURRENT_44} checkouts")
    pool = _pool_mismatch(
        sale,
        f"{_CONCURRENT_44} checkouts served by {_SHOP_POOL} connections, none holding one while its "
        "charge runs",
        out_of_stock,
    )
    if pool is not None:
        raise pool
    _first_error(sale, (out_of_stock,))
    paid = sum(r == "paid" for r in sale.results)
    expect(
        paid == _CONCURRENT_44,
        f"all {_CONCURRENT_44} paid ({_CONCURRENT_44} units in stock)",
        f"{paid} paid; returned {dict(Counter(short(r, 40) for r in sale.results))}",
        "With a unit for each checkout and every payment accepted, each checkout returns 'paid'.",
    )


def _pool_mismatch(sale: _Sale, expected: str, out_of_stock: type[BaseException]) -> Mismatch | None:
    """The pool's TimeoutErrors and the charges run while their own checkout held a connection."""
    timeouts = [r for r in sale.results if isinstance(r, sqlalchemy.exc.TimeoutError)]
    holding = [c for c in sale.charges if c.held_by_caller]
    if not timeouts and not holding:
        return None
    if not holding:
        return _held_in_the_database(sale, timeouts, expected, out_of_stock)
    return Mismatch(
        expected,
        f"{len(timeouts)} of {len(sale.results)} failed with the pool's TimeoutError"
        + (f" ({_first_line(timeouts[0])})" if timeouts else "")
        + f", and {len(holding)} of {len(sale.charges)} charges ran while their own checkout held a "
        f"connection: each held one for the whole {_CHARGE:g} s, so {_SHOP_POOL} connections served "
        f"{_SHOP_POOL} checkouts at a time and the others waited out pool_timeout",
        [
            "This is the lesson's session held across a slow call (section 3): the database does "
            "nothing for a checkout while the provider works, so no connection should wait with it.",
            "End the reservation's transaction before the charge, and open another for the outcome: "
            + _THREE_STEPS,
        ],
    )


_SHARED_LOCK_DEADLOCK = (
    "Two checkouts that both lock the stock row for sharing (`FOR SHARE`, `with_for_update(read=True)`) "
    "and then both UPDATE it wait for each other: a deadlock, which PostgreSQL breaks only after "
    "`deadlock_timeout` (1 s by default) by failing one of them."
)


def _held_in_the_database(
    sale: _Sale, timeouts: list[BaseException], expected: str, out_of_stock: type[BaseException]
) -> Mismatch:
    """Pool timeouts though no charge ran while its checkout held a connection: something else held the
    pool's connections. Named from what was seen: transactions waiting on each other's row locks (a
    deadlock or a lock error among the results), a checkout holding two connections at once, a session
    left open after its checkout returned; else a transaction kept open while it waits."""
    others = [
        r
        for r in sale.results
        if isinstance(r, BaseException) and not isinstance(r, sqlalchemy.exc.TimeoutError | out_of_stock)
    ]
    seen = (
        f"{len(timeouts)} of {len(sale.results)} failed with the pool's TimeoutError "
        f"({_first_line(timeouts[0])}), though no charge ran while its own checkout held a connection"
    )
    again = ""
    if sale.runs == 2:
        again = "; pool timeouts alone in the run just before this one too"
    elif sale.runs > 2:
        again = f"; pool timeouts alone in each of the {sale.runs - 1} runs just before this one too"
    locks = [r for r in others if _lock_error(r)]
    if locks:
        return Mismatch(
            expected,
            f"{seen}: the checkouts' transactions waited on each other's row locks, and another failed "
            f"with {_one_line(locks[0])}{again}",
            [
                "A connection is held for as long as its transaction lasts, including while it waits for "
                "a row lock another transaction holds. " + _SHARED_LOCK_DEADLOCK,
                "Let one guarded UPDATE decide (`… WHERE available > 0`, then its `rowcount`): it locks the "
                "row only for its own short transaction, and a second checkout waits its turn instead of "
                "deadlocking. " + _THREE_STEPS,
            ],
        )
    if sale.most_held_by_one > 1:
        cause = (
            f"one checkout held {sale.most_held_by_one} connections at once: a session opened while "
            "another of the same checkout was still open"
        )
    elif sale.in_use_after:
        cause = (
            f"{sale.in_use_after} still checked out once every checkout had returned: a session never closed"
        )
    else:
        cause = "each held one outside the charge, for as long as its transaction stayed open"
    return Mismatch(
        expected,
        f"{seen}: {cause}"
        + (
            f"; another checkout failed with {type(others[0]).__name__}: {_one_line(others[0])}"
            if others
            else ""
        )
        + again,
        [
            f"Something other than the charge kept the pool's {_SHOP_POOL} connections: a session never "
            "closed, a second session opened while the first is still open (each holds a connection), or "
            "a transaction kept open while it waits (a sleep, a retry).",
            "Open each session in an `async with` block, one at a time, and keep each transaction to its "
            "statements: " + _THREE_STEPS,
        ],
    )


def _lock_error(exc: BaseException) -> bool:
    """A deadlock (SQLSTATE 40P01) or a row lock not granted (55P03), whichever driver raised it."""
    orig = getattr(exc, "orig", None)
    code = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return code in ("40P01", "55P03") or "deadlock detected" in str(exc)


def _check_scarce(sale: _Sale, out_of_stock: type[BaseException]) -> None:
    if sale.hung:
        raise _hung(f"{_CONCURRENT_44} checkouts")
    pool = _pool_mismatch(
        sale,
        f"{_CONCURRENT_44} checkouts each sold a unit or refused, none failing for want of a connection",
        out_of_stock,
    )
    if pool is not None:
        raise pool
    _first_error(sale, (out_of_stock,))
    paid = sum(r == "paid" for r in sale.results)
    refused = sum(isinstance(r, out_of_stock) for r in sale.results)
    if paid > _SCARCE or (sale.stock is not None and sale.stock < 0):
        expected = (
            f"{_SCARCE} paid and {_CONCURRENT_44 - _SCARCE} refused with OutOfStock: never more sold than "
            f"the {_SCARCE} units in stock"
        )
        oversold = f"{paid} paid for {_SCARCE} units, oversold by {paid - _SCARCE}"
        if not sale.stock_reads:
            raise Mismatch(
                expected,
                f"{oversold}; the stock says {sale.stock}: the UPDATE found no unit left for "
                f"{paid - _SCARCE} of them and changed nothing, and they were sold all the same",
                [
                    "A conditional UPDATE does not fail when its condition is false: it changes no row, "
                    "and says so in the result's `rowcount`. The checkout must look, and stop there.",
                    _RESERVE + ", before the pending order is added.",
                ],
            )
        how = (
            f"the stock went to {sale.stock}: each checkout took a unit whatever the number it had read"
            if sale.stock is not None and sale.stock < 0
            else f"the stock says {sale.stock}: each checkout wrote the number it had read, less one, over "
            "the other checkouts' writes (a lost update)"
        )
        if sale.locked_reads and sale.dialect == "sqlite":
            raise Mismatch(
                expected,
                f"{oversold}; the stock was read with FOR UPDATE, which SQLite ignores (it has no row "
                f"locks), so the other checkouts read the same number meanwhile; {how}",
                [
                    "`with_for_update()` makes the read wait for other transactions' locks on "
                    "PostgreSQL, but SQLite, the course's default database, has no row locks: there a "
                    "read and then a write still race. One statement guarded by `WHERE available > 0` "
                    "is the portable way: the write itself decides, on every database.",
                    "Take the unit and test it in one statement, and refuse when it changed no row: "
                    + _RESERVE
                    + ".",
                ],
            )
        raise Mismatch(
            expected,
            f"{oversold}; {how}",
            [
                "Between a read of the stock and the write that takes a unit, other checkouts read the "
                f"same number (the check lets them: it pauses {_READ_PAUSE * 1000:.0f} ms after each "
                "read of the stock table that does not lock its row, as a busy database would). Only the "
                "write itself can decide.",
                "Take the unit and test it in one statement, and refuse when it changed no row: "
                + _RESERVE
                + ".",
            ],
        )
    if sale.no_wait_reads:  # on every database: where the lock is real, retrying on it only busy-waits
        clause = sale.no_wait_reads[0]
        count = sale.no_wait_reads.count(clause)
        gives_up = (
            "the read returns no row, as if the product did not exist, so the checkout is refused or fails"
            if clause == "SKIP LOCKED"
            else "the read fails at once with a lock-not-available error"
        )
        raise Mismatch(
            f"no read of the stock that gives up on a locked row ({clause})",
            f"{count} read{'s' if count > 1 else ''} of the stock with {clause}"
            + (
                ": passed here only because SQLite, the course's default database, drops the clause"
                if sale.dialect == "sqlite"
                else ""
            ),
            [
                f"On PostgreSQL, a read with `{clause}` does not wait for a row another checkout has locked: "
                f"{gives_up} while units are left; an answer that retries instead busy-waits for what a "
                "guarded UPDATE waits for anyway.",
                "Leave out the lock and let the guarded UPDATE decide: " + _RESERVE + ".",
            ],
        )
    if sale.shared_then_update and sale.dialect == "sqlite":
        raise Mismatch(
            "no transaction that reads the stock FOR SHARE and then updates it: on PostgreSQL two such "
            "checkouts deadlock",
            f"{sale.shared_then_update} UPDATEs of the stock in a transaction that had read it with FOR "
            "SHARE: right here only because SQLite, the course's default database, drops the clause",
            [
                _SHARED_LOCK_DEADLOCK,
                "Leave out the shared lock and let the guarded UPDATE decide: " + _RESERVE + ".",
            ],
        )
    expect(
        paid + refused == _CONCURRENT_44,
        "each checkout 'paid' or refused with OutOfStock",
        f"returned {dict(Counter(short(r, 40) for r in sale.results))}",
        "Raise OutOfStock when no unit was left; return 'paid' when the payment went through.",
    )
    expect(
        paid == _SCARCE and sale.stock == 0,
        f"all {_SCARCE} units sold to the {_CONCURRENT_44} checkouts that asked",
        f"{paid} paid, {sale.stock} left in stock: checkouts refused while units were left",
        "Refuse only when the UPDATE found no unit left: `rowcount` is 0 then, and 1 when it took one.",
    )
    extra = [s for s in sale.statuses if s != "paid"]
    expect(
        len(sale.statuses) == paid,
        f"{paid} orders stored, one per sale",
        f"{len(sale.statuses)} orders ({_statuses(sale.statuses)}): {len(extra)} left by checkouts that "
        "were refused",
        "A refused checkout must leave nothing behind: raise OutOfStock inside the reservation's "
        "transaction, before it commits, so that leaving the block with the exception rolls it back.",
        "Test `rowcount` right after the UPDATE, inside `async with sessions.begin() as session:`, and "
        "add the pending order only after that test.",
    )


def _check_declined(sale: _Sale, declined: type[BaseException]) -> None:
    if sale.hung:
        raise _hung("a declined checkout")
    (result,) = sale.results
    if isinstance(result, declined):
        raise Mismatch(
            "'declined' returned, once the outcome is recorded",
            f"{type(result).__name__} raised out of checkout (orders of that sku: "
            f"{_statuses(sale.statuses)}; {sale.stock} of {_STOCKED} units in stock)",
            [
                "A declined payment is an outcome, not an error of the checkout: catch PaymentDeclined "
                "around the charge, record it, and return 'declined'.",
                "`try: await payments.charge(sku)` / `except PaymentDeclined: status = 'declined'` / "
                "`else: status = 'paid'`, then record `status` in a transaction of its own.",
            ],
        )
    _first_error(sale)
    expect(
        sale.statuses == ["declined"],
        "one order stored, 'declined'",
        f"orders of that sku: {_statuses(sale.statuses)}"
        + (
            ": the declined checkout left no record"
            if not sale.statuses
            else ": the outcome's transaction was never committed"
            if sale.statuses == ["pending"]
            else ""
        ),
        "Keep the order and mark it 'declined': it is the record of what happened to the reserved unit "
        "and to the customer's attempt.",
        "In the outcome's transaction: `update(CheckoutOrder).where(CheckoutOrder.id == order_id)"
        ".values(status='declined')`, committed.",
    )
    expect(
        sale.stock == _STOCKED,
        f"the unit back in stock: {_STOCKED} of {_STOCKED}",
        f"{sale.stock} of {_STOCKED}: the reserved unit was not given back",
        "The reservation took a unit for a sale that did not happen: the outcome's transaction gives "
        "it back, with the same kind of relative UPDATE.",
        "`update(Stock).where(Stock.sku == sku).values(available=Stock.available + 1)`, in the same "
        "transaction that marks the order 'declined'.",
    )
    expect(
        result == "declined",
        "'declined' returned",
        short(result),
        "Return the status the order was given: 'declined' when `charge()` raised PaymentDeclined.",
    )


def _check_crash(sale: _Sale) -> None:
    if sale.hung:
        raise _hung("a checkout cancelled while charge() ran")
    expect(
        sale.reached_charge,
        "the checkout to call charge()",
        "it finished without charging: " + (short(sale.results[0], 60) if sale.results else "no result"),
        "Call `await payments.charge(sku)` once the reservation's transaction has ended.",
    )
    _first_error(sale)
    stock, statuses = sale.stock, sale.statuses
    left = f"; {stock} of {_STOCKED} units in stock"
    if statuses == ["pending"] and stock == _STOCKED - 1:
        return
    if not statuses and stock == _STOCKED - 1:
        seen = (
            "no order, and a unit gone: the unit was taken before the charge and the order was to be "
            "written after it, so a crash in between loses the unit with no record of why"
        )
        hints = [
            "Whatever can happen between two steps will happen to some checkout: the process is "
            "restarted, the request cancelled. What the first step commits must say what it is for.",
            "Add the order, 'pending', in the reservation's transaction, with the UPDATE that takes the "
            "unit; the outcome's transaction then only changes its status.",
        ]
    elif not statuses:
        seen = (
            f"no order, and no unit reserved{left}: the reservation was not committed before charge() "
            "ran, so it was rolled back with the cancelled checkout"
        )
        hints = [
            "The reservation's transaction must be committed, and its session closed, before the "
            "charge: a transaction held across the charge holds a connection too.",
            _THREE_STEPS,
        ]
    elif statuses == ["declined"]:
        seen = (
            f"the order recorded 'declined'{left}: the checkout was cut short while the provider was "
            "charging, so nobody knows whether the payment went through, yet the unit was given back "
            "and the order closed"
        )
        hints = [
            "Record an outcome only when the provider gave one: an `except BaseException:` or a "
            "`finally:` around the charge also runs when the checkout is cancelled.",
            "`except PaymentDeclined:` for the decline, nothing for anything else: the order stays "
            "'pending', for a job that asks the provider later.",
        ]
    else:
        seen = f"orders of that sku: {_statuses(statuses)}{left}"
        hints = [
            "The reservation commits one 'pending' order with its unit; only an answer from the provider "
            "changes it.",
        ]
    raise Mismatch(
        f"the order left 'pending', its unit reserved ({_STOCKED - 1} of {_STOCKED} in stock)",
        seen,
        hints,
    )


def _raised_from(exc: BaseException, causes: list[BaseException]) -> bool:
    """Whether ``exc`` is one of ``causes``, holds one (an ExceptionGroup) or was raised from one."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if any(current is cause for cause in causes):
            return True
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return False


def _check_provider_error(sale: _Sale) -> None:
    if sale.hung:
        raise _hung("a checkout whose charge failed")
    (result,) = sale.results
    propagated = isinstance(result, BaseException) and _raised_from(result, sale.failures)
    if isinstance(result, BaseException) and not propagated:
        raise result  # the learner's code raised an error of its own
    expected = (
        f"the ConnectionError raised out of checkout, its order left 'pending', its unit reserved "
        f"({_STOCKED - 1} of {_STOCKED} in stock)"
    )
    expect(
        sale.charges,
        "the checkout to call charge()",
        "it finished without charging: " + short(result, 60),
        "Call `await payments.charge(sku)` once the reservation's transaction has ended.",
    )
    expect(
        len(sale.charges) == 1,
        "one charge: after an error nobody knows whether the first went through",
        f"{len(sale.charges)} charges: charge() was called again after the provider failed, which can "
        "charge the customer twice",
        "An error from the provider is no answer: the first charge may have gone through. Do not retry "
        "it in the checkout; let the error propagate and leave the order 'pending'.",
    )
    did = f"raised {type(result).__name__}" if propagated else f"returned {short(result, 40)}"
    found = f"{did}; orders of that sku: {_statuses(sale.statuses)}; {sale.stock} of {_STOCKED} in stock"
    if sale.statuses == ["declined"]:
        raise Mismatch(
            expected,
            f"{found}: the provider's ConnectionError was taken for a decline, so the order was closed "
            "and its unit given back, though nobody knows whether the card was charged",
            [
                "Only PaymentDeclined is the provider's answer 'no'. After any other error (a timeout, "
                "the provider down) the charge may or may not have gone through: `except Exception:` "
                "around the charge (or anything broader, a `finally:` too) takes every error for a "
                "decline.",
                "`except PaymentDeclined:` for the decline, and nothing for any other error: it "
                "propagates, and the order stays 'pending' with its unit reserved, as after a crash, for "
                "a job that asks the provider later.",
            ],
        )
    if sale.statuses != ["pending"] or sale.stock != _STOCKED - 1:
        raise Mismatch(
            expected,
            found,
            [
                "The reservation commits one 'pending' order with its unit; only an answer from the "
                "provider (charge() returned, or raised PaymentDeclined) changes it. After any other "
                "error nobody knows whether the card was charged.",
                "Catch only PaymentDeclined around the charge: any other error leaves checkout as it "
                "came, with the order and its unit as the reservation committed them.",
            ],
        )
    expect(
        propagated,
        expected,
        f"{found}: the provider's ConnectionError was swallowed, so the caller is told the checkout "
        "ended when nobody knows whether the customer paid",
        "Let the provider's error propagate: the caller (the endpoint, the code that retries later) "
        "must know that the checkout did not finish.",
        "Catch only PaymentDeclined around the charge; with no `except` for it, any other error leaves "
        "checkout as it came.",
    )


def _shop_models(checkout: Any, Stock: Any, Order: Any, declined: Any, out_of_stock: Any) -> None:
    expect(callable(checkout), "the function `checkout`", short(checkout), _CALL_4_4)
    expect(
        inspect.iscoroutinefunction(checkout),
        "checkout defined with `async def`",
        f"a plain function: {short(checkout)}",
        "Sessions are used with `await`: `async def checkout(sessions, payments, sku):`.",
    )
    for cls, name, columns in (
        (Stock, "Stock", ("sku", "available")),
        (Order, "CheckoutOrder", ("id", "sku", "status")),
    ):
        try:
            mapper = sqlalchemy.inspect(cls)
        except NoInspectionAvailable:
            raise Mismatch(f"`{name}`, the mapped class from the exercise", short(cls), [_CALL_4_4]) from None
        missing = [c for c in columns if c not in mapper.columns]
        expect(
            not missing,
            f"`{name}` with the columns {', '.join(columns)}",
            f"no {', '.join(missing)}",
            "Keep the given models as they are.",
        )
    for cls, name in ((declined, "PaymentDeclined"), (out_of_stock, "OutOfStock")):
        expect(
            isinstance(cls, type) and issubclass(cls, Exception),
            f"`{name}`, the exception class from the exercise",
            short(cls),
            _CALL_4_4,
        )


def check_checkout(
    checkout: Callable[..., Any], Stock: Any, CheckoutOrder: Any, PaymentDeclined: Any, OutOfStock: Any
) -> None:
    """Check Exercise 4.4: a checkout in short transactions, with no connection held during the charge.

    Each scenario runs ``await checkout(sessions, payments, sku)`` on a database of the check's own
    (tables ``Stock`` and ``CheckoutOrder``, created and dropped), with a session factory on an engine
    whose pool has 2 connections, no overflow and a 1 s ``pool_timeout``, and a payment provider of the
    check's whose ``charge()`` takes 0.3 s and notes how many connections are checked out when it starts
    and ends, in all and by the calling task (the pool's own events tell). One checkout of a sku with 5
    units: 'paid', one unit taken, one order 'paid', no connection checked out during the charge nor after
    the return. Ten at once with 10 units: all 'paid', no pool ``TimeoutError``, no charge while its own
    checkout holds a connection (a sale of ten whose only fault is pool timeouts that nothing named
    explains runs again, three runs at most). Ten at once for 3 units, the check pausing 50 ms after each
    read of the stock table (but a read that locks its row on PostgreSQL) so that a read-then-write races
    (and runs the sale again, three runs at most, while it would pass and no two reads met): 3 'paid', 7
    ``OutOfStock``, stock 0, 3 orders. A declined card: 'declined' returned, the order 'declined', the
    unit back. A checkout cancelled while the provider charges (as by a crash): its order left 'pending'
    and its unit still reserved. A charge that fails with ``ConnectionError`` (no answer: the card may or
    may not have been charged): that error raised out of checkout, charged once, the order left 'pending'
    and its unit reserved.
    """
    with exercise("4.4", "A checkout that holds no connection while the provider charges", SOLUTION) as ex:
        if not ex.step(
            "checkout is an async function; the models and exceptions are the exercise's",
            lambda: _shop_models(checkout, Stock, CheckoutOrder, PaymentDeclined, OutOfStock),
        ):
            return
        models = (Stock, CheckoutOrder, PaymentDeclined)
        alone = ex.require(
            "one checkout, payment accepted: returns 'paid', takes one unit, stores its order 'paid'",
            lambda: _checked(
                _run_sale(lambda: _sell(checkout, models, "ch04x-lamp", _STOCKED, 1)),
                lambda sale: _check_alone(sale, OutOfStock),
            ),
        )
        ex.step(
            "no connection is checked out while charge() runs, nor once the checkout has returned",
            lambda: _check_released(alone),
        )
        ex.step(
            f"{_CONCURRENT_44} checkouts at once on a pool of {_SHOP_POOL}: all paid, none waits out "
            "pool_timeout, none holds a connection while its charge runs",
            lambda: _check_pool(
                _unless_stalled(
                    lambda: _run_sale(
                        lambda: _sell(checkout, models, "ch04x-mug", _CONCURRENT_44, _CONCURRENT_44)
                    ),
                    OutOfStock,
                    _CONCURRENT_44,
                ),
                OutOfStock,
            ),
        )
        ex.step(
            f"{_CONCURRENT_44} checkouts at once for {_SCARCE} units: {_SCARCE} sold, the others refused "
            "with OutOfStock, never oversold",
            lambda: _check_scarce(_scarce_sale(checkout, models, OutOfStock), OutOfStock),
        )
        ex.step(
            "a declined payment: returns 'declined', its order 'declined', its unit back in stock",
            lambda: _check_declined(
                _run_sale(lambda: _sell(checkout, models, "ch04x-card", _STOCKED, 1, mode="decline")),
                PaymentDeclined,
            ),
        )
        ex.step(
            "a checkout cut short while charge() runs (a crash): its order stays 'pending', its unit "
            "reserved",
            lambda: _check_crash(_run_sale(lambda: _crash(checkout, models, "ch04x-crash"))),
        )
        ex.step(
            "the provider fails with another error than PaymentDeclined (a ConnectionError): the error "
            "propagates, its order stays 'pending', its unit reserved",
            lambda: _check_provider_error(
                _run_sale(lambda: _sell(checkout, models, "ch04x-outage", _STOCKED, 1, mode="fail"))
            ),
        )


def _scarce_sale(
    checkout: Callable[..., Any],
    models: tuple[Any, Any, type[BaseException]],
    out_of_stock: type[BaseException],
) -> _Sale:
    """The scarce sale; again (``_SCARCE_RUNS`` runs at most) while it would pass although the answer
    read the stock at least twice and no two reads met: such a run says nothing about a read-then-write
    race. A run that fails the step in any way, or had reads meet, is the verdict."""
    for _ in range(_SCARCE_RUNS):
        sale = _unless_stalled(
            lambda: _run_sale(
                lambda: _sell(checkout, models, "ch04x-last", _SCARCE, _CONCURRENT_44, pause=True)
            ),
            out_of_stock,
            _SCARCE,
        )
        try:
            _check_scarce(sale, out_of_stock)
        except Exception:  # the step's verdict: the step judges this sale again and says why
            return sale
        if sale.met or sale.stock_reads - sale.serialised_reads < 2:
            return sale
    return sale


def _unless_stalled(run: Callable[[], _Sale], out_of_stock: type[BaseException], units: int) -> _Sale:
    """``run()``, again (``_STALLED_RUNS`` runs at most) while its pool timeouts are all it did wrong
    and nothing the check can name held the pool (``_stalled``). A run that did anything else is the
    verdict."""
    for runs in range(1, _STALLED_RUNS + 1):
        if runs > 1:
            time.sleep(_STALL_GAP)
        sale = run()
        sale.runs = runs
        if not _stalled(sale, out_of_stock, units):
            break
    return sale


def _stalled(sale: _Sale, out_of_stock: type[BaseException], units: int) -> bool:
    """Whether the sale's pool TimeoutErrors are unexplained: the sale did not hang nor sell more than
    its ``units``, no charge ran while its own checkout held a connection, no checkout held two at once,
    none was left checked out, and no checkout failed with anything but a pool timeout or OutOfStock.

    A transaction kept open while it waits (a sleep, a retry, a row or advisory lock another
    transaction holds) does that, and so does a right answer whose short transactions a stall made
    long: a machine or a database server busy for a second (CPU, or a disk slow to flush commits)
    slows the checkouts' transactions, two at a time, past the 1 s pool_timeout, as in a loaded
    test run on a 2-core machine. A wait in the answer's own transactions comes back in every run; a
    stall that spans three runs a second apart is rarer. Load that stays (more work than the machine
    can do for minutes) is not told apart: under it, a right answer whose checkouts wait on each
    other's locks can still fail.
    """
    if sale.hung or not any(isinstance(r, sqlalchemy.exc.TimeoutError) for r in sale.results):
        return False
    if (sale.stock is not None and sale.stock < 0) or sum(r == "paid" for r in sale.results) > units:
        return False  # oversold: a fault of its own, judged now
    if any(c.held_by_caller for c in sale.charges) or sale.most_held_by_one > 1 or sale.in_use_after:
        return False
    return all(
        isinstance(r, sqlalchemy.exc.TimeoutError | out_of_stock) or not isinstance(r, BaseException)
        for r in sale.results
    )


def _checked(sale: _Sale, check: Callable[[_Sale], None]) -> _Sale:
    check(sale)
    return sale
