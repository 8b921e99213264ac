"""support.checks.ch04: chapter 4's checks pass right answers and name each plausible wrong one.

Every answer here is written the way a learner would write it in the exercise cell; the given code
around it (the notebook's engine and `Session`, `make_app`'s route, the models) is the notebook's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import pytest
import sqlalchemy
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import ForeignKey, String, delete, insert, make_url, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    contains_eager,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
    subqueryload,
)
from sqlalchemy.pool import NullPool

from support.checks import ch04, forget_answers, placeholder_message
from support.checks.ch04 import (
    check_checkout,
    check_orders_with_lines,
    check_pool_fail_fast,
    check_session_dependency,
)
from support.checks.running import joins_new_threads
from support.database import database_url, fresh_database, install_sleep, slow_query
from tests.checking import fresh_and_leaves_nothing_running, rejected


@pytest.fixture(autouse=True)
def _fresh_and_leaves_nothing_running(database_backend: str) -> Iterator[None]:
    """Every test runs on SQLite and on PostgreSQL (tests/backends.py)."""
    with fresh_and_leaves_nothing_running():
        yield


# ---------------------------------------------------------------------------------------------------
# Exercise 4.1: a session per request, committed or rolled back
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def notebook_engines() -> Iterator[list[AsyncEngine]]:
    """The engines the notebook's cell made (the check points `Session` elsewhere while it runs)."""
    engines: list[AsyncEngine] = []
    yield engines

    async def dispose() -> None:
        for engine in engines:
            await engine.dispose()

    asyncio.run(dispose())


def session_answer(variant: str, engines: list[AsyncEngine]) -> tuple[async_sessionmaker[AsyncSession], Any]:
    """The exercise cell, answered one way or another: (Session, SessionDep)."""
    engine = create_async_engine(fresh_database("test-ch04-notebook"))
    engines.append(engine)
    Session = async_sessionmaker(engine, expire_on_commit=False)
    shared = Session() if variant == "shared" else None  # made once, when the cell runs
    cache: dict[str, AsyncSession] = {}

    async def get_session() -> AsyncIterator[AsyncSession]:
        if variant == "no-commit":
            async with Session() as session:
                yield session
        elif variant == "begin":  # right too: Session.begin() commits, or rolls back, and closes
            async with Session.begin() as session:
                yield session
        elif variant == "commit-in-finally":
            async with Session() as session:
                try:
                    yield session
                finally:
                    await session.commit()
        elif variant == "base-exception":  # right too: rolls back on cancellation, closes in finally
            session = Session()
            try:
                yield session
            except BaseException:
                await session.rollback()
                raise
            else:
                await session.commit()
            finally:
                await session.close()
        elif variant == "commit-if-pending":
            async with Session() as session:
                try:
                    yield session
                    if session.new or session.dirty or session.deleted:
                        await session.commit()
                except Exception:
                    await session.rollback()
                    raise
        elif variant == "not-closed":
            session = Session()
            try:
                yield session
            except Exception:
                await session.rollback()
                raise
            else:
                await session.commit()
        elif variant == "close-not-awaited":  # `session.close()` without `await`: a coroutine, dropped
            session = Session()
            try:
                yield session
                await session.commit()
            except BaseException:
                await session.rollback()
                raise
            finally:
                session.close()
        elif variant == "bare":
            session = Session()
            yield session
            await session.commit()
        elif variant == "swallowed":
            async with Session() as session:
                try:
                    yield session
                except Exception:
                    await session.rollback()
                    raise
                try:
                    await session.commit()
                except SQLAlchemyError:
                    await session.rollback()
        elif variant in ("shared", "shared-lazy"):
            if variant == "shared":
                assert shared is not None
                session = shared
            else:
                session = cache.setdefault("session", Session())
            try:
                yield session
            except Exception:
                await session.rollback()
                raise
            else:
                await session.commit()
        else:
            async with Session() as session:
                try:
                    yield session
                except Exception:
                    await session.rollback()
                    raise
                else:
                    await session.commit()

    async def not_started() -> AsyncIterator[AsyncSession]:
        raise NotImplementedError(placeholder_message("4.1"))

    async def returns() -> AsyncSession:
        return Session()

    dependency: Any = {"placeholder": not_started, "returns": returns}.get(variant, get_session)
    if variant == "default-scope":
        return Session, Annotated[AsyncSession, Depends(dependency)]
    return Session, Annotated[AsyncSession, Depends(dependency, scope="function")]


@pytest.mark.parametrize("variant", ["right", "begin", "base-exception"])
def test_4_1_a_session_per_request_passes(
    variant: str, notebook_engines: list[AsyncEngine], capsys: pytest.CaptureFixture[str]
) -> None:
    Session, SessionDep = session_answer(variant, notebook_engines)
    check_session_dependency(Session, SessionDep)
    out = capsys.readouterr().out
    assert out.startswith("Exercise 4.1 · A session per request, committed or rolled back\n")
    assert "  ✅ passed: 10 concurrent requests: each gets a session of its own\n" in out
    assert (
        "  ✅ passed: a request cancelled midway (as by a timeout): its row is not stored, its connection "
        "given back\n"
    ) in out
    assert (
        "  ✅ passed: every request's session is closed once the request is done, whatever happened\n"
    ) in out
    assert out.endswith("Exercise 4.1: passed ✅ (8 of 8 checks)\n")
    assert Session.kw["bind"] is notebook_engines[0], "the check must point Session back at its engine"


def test_4_1_placeholder_is_not_started(
    notebook_engines: list[AsyncEngine], capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_session_dependency, *session_answer("placeholder", notebook_engines))
    assert "⬜ not started: Exercise 4.1's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 4.1: not started")


# Each wrong answer: lines its check must print, and how many steps passed (None: not compared).
WRONG_SESSIONS: dict[str, tuple[tuple[str, ...], str | None]] = {
    "returns": (
        (
            "       expected: get_session to `yield` the session (an async generator)\n",
            "       seen:     an `async def` that returns: FastAPI cannot run anything after the handler",
        ),
        "0 of 1",
    ),
    "no-commit": (
        (
            "       expected: the row of a request that succeeded stored in the database\n",
            "       seen:     not there (the table holds nothing): the session was closed without a commit, "
            "and closing rolls back\n",
            "hint:     Commit when the handler has returned without raising",
        ),
        "1 of 2",
    ),
    "commit-in-finally": (
        (
            "  ❌ not yet: a request whose handler raises: its row is not stored, its connection given back\n"
            "       expected: no row from a request whose handler raised\n"
            "       seen:     its row was stored: the handler had flushed it into the transaction, and "
            "something committed that transaction anyway\n"
            "       hint:     Commit only when the handler returned; a `finally:` runs when it raised too.\n",
            "  ❌ not yet: a request cancelled midway (as by a timeout): its row is not stored, its "
            "connection given back\n"
            "       expected: no row from a request that was cancelled\n",
        ),
        "6 of 8",
    ),
    "not-closed": (  # `except Exception` does not see a cancellation, and nothing closes the session
        (
            "  ❌ not yet: a request cancelled midway (as by a timeout): its row is not stored, its "
            "connection given back\n"
            "       expected: every connection back in the pool after a request that was cancelled\n"
            "       seen:     1 still checked out 2 s later: the session was never closed\n"
            "       hint:     Cancelling a request raises `asyncio.CancelledError` at your `yield`; it "
            "derives from BaseException, not Exception, so `except Exception:` does not see it",
            "  ❌ not yet: a request whose commit fails (a duplicate sku) gets an error status, not 200\n"
            "       expected: every connection back in the pool after a request whose commit failed\n"
            "       seen:     1 still checked out 2 s later: the session was never closed\n"
            "       hint:     When `commit()` raises, the session is left in a failed transaction",
        ),
        "5 of 8",
    ),
    "bare": (
        (
            "  ❌ not yet: a request whose handler raises: its row is not stored, its connection given back\n"
            "       expected: every connection back in the pool after a request whose handler raised\n"
            "       seen:     1 still checked out 2 s later: the session was never closed\n"
            "       hint:     The handler's exception comes out of your `yield`",
            "  ✅ passed: 10 concurrent requests: each gets a session of its own\n",  # the leak was tidied
        ),
        "4 of 8",
    ),
    "default-scope": (
        (
            "  ❌ not yet: a request whose commit fails (a duplicate sku) gets an error status, not 200\n"
            "       expected: an error status (500) for a request whose commit failed\n"
            "       seen:     status 200: the client was told its order was placed, but it could not be "
            "stored (a row with that unique sku was already there); the commit failed after the response "
            "had gone (the server logged it)\n"
            "       hint:     With the default scope, FastAPI runs the code after `yield` once the response "
            "has been sent",
        ),
        "7 of 8",
    ),
    "swallowed": (
        (
            "       seen:     status 200: the client was told its order was placed, but it could not be",
            "hint:     The commit's exception must reach FastAPI, which answers 500",
        ),
        "7 of 8",
    ),
    "commit-if-pending": (  # a flushed row is no longer in session.new, but still uncommitted
        (
            "  ❌ not yet: a request that flushed its row (to learn its id) and returned: its row is stored\n"
            "       expected: the row of a request that flushed it (to learn its id) and returned stored in "
            "the database\n"
            "       seen:     not there, though the row of a request that only added its row was: once "
            "flushed, a row is in the transaction but no longer pending (`session.new` is empty)",
        ),
        "7 of 8",
    ),
    "close-not-awaited": (  # commit or rollback gives the connection back: only the close is missing
        (
            "  ✅ passed: a request cancelled midway (as by a timeout): its row is not stored, its "
            "connection given back\n",
            "  ❌ not yet: every request's session is closed once the request is done, whatever happened\n"
            "       expected: every session closed by get_session once its request is done\n"
            "       seen:     14 of 14 sessions never closed (the first given to POST /orders/ch04x-ok): "
            "`session.close()` was called but not awaited, so it only made a coroutine, which was dropped "
            "(Python warns: \"coroutine 'AsyncSession.close' was never awaited\"), and the close never ran\n"
            "       hint:     Calling an `async def` method runs none of its code",
        ),
        "7 of 8",
    ),
    "shared": (
        (
            "       expected: a session made by `Session()` when the request arrived\n"
            "       seen:     a session bound to another engine than `Session`'s, so made before the check "
            "pointed `Session` at its own database: one session made once and shared by every request?\n",
        ),
        "1 of 2",
    ),
    "shared-lazy": (
        (
            "  ❌ not yet: 10 concurrent requests: each gets a session of its own\n"
            "       expected: 10 different sessions, one per request\n"
            "       seen:     1 different for 10 requests: one session shared by all of them\n",
        ),
        None,
    ),
}


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(
            variant,
            marks=pytest.mark.filterwarnings(  # the learner's dropped coroutine: Python warns, as it should
                "ignore:coroutine 'AsyncSession.close' was never awaited:RuntimeWarning",
                "ignore::pytest.PytestUnraisableExceptionWarning",
            ),
        )
        if variant == "close-not-awaited"
        else variant
        for variant in WRONG_SESSIONS
    ],
)
def test_4_1_wrong_answers_are_rejected(
    variant: str, notebook_engines: list[AsyncEngine], capsys: pytest.CaptureFixture[str]
) -> None:
    lines, passed = WRONG_SESSIONS[variant]
    out = rejected(capsys, check_session_dependency, *session_answer(variant, notebook_engines))
    for line in lines:
        assert line in out, out  # the whole report: pytest shortens a long string
    assert "Exercise 4.1: not yet" in out
    if passed is not None:
        assert out.endswith(f"Exercise 4.1: not yet — {passed} checks pass"), out  # the whole report


def test_4_1_hints_get_more_specific(
    notebook_engines: list[AsyncEngine], capsys: pytest.CaptureFixture[str]
) -> None:
    answer = session_answer("default-scope", notebook_engines)
    first = rejected(capsys, check_session_dependency, *answer)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_session_dependency, *answer)
    assert 'Depends(get_session, scope="function")' not in first
    assert 'Depends(get_session, scope="function")' in second


# ---------------------------------------------------------------------------------------------------
# Exercise 4.2: fail fast when the pool is exhausted
# ---------------------------------------------------------------------------------------------------

REPORT_SECONDS = 0.25


def pool_answer(variant: str) -> tuple[Any, Any]:
    """The exercise cell, answered one way or another: (make_engine, make_app)."""

    def make_engine(url: str, pool_size: int) -> AsyncEngine:
        if variant == "placeholder-engine":
            raise NotImplementedError(placeholder_message("4.2"))
        options: dict[str, Any] = {"pool_size": pool_size, "max_overflow": 0, "pool_timeout": 0.5}
        if variant == "default-timeout":
            del options["pool_timeout"]
        elif variant == "default-overflow":
            del options["max_overflow"]
        elif variant == "unbounded":
            options["max_overflow"] = -1
        elif variant == "hard-coded-size":
            options["pool_size"] = 2  # the size the notebook uses, whatever the caller asks
        return create_async_engine(url, **options)

    def make_app(engine: AsyncEngine) -> FastAPI:
        app = FastAPI()
        install_sleep(engine)

        @app.get("/report")
        async def report() -> dict[str, str]:
            async with engine.connect() as conn:
                await conn.execute(slow_query(REPORT_SECONDS, engine.dialect.name))
            return {"report": "ready"}

        if variant == "placeholder-app":
            raise NotImplementedError(placeholder_message("4.2"))
        if variant == "no-handler":
            return app
        if variant in ("middleware", "counting-middleware", "deadline"):
            in_flight = [0]

            @app.middleware("http")
            async def busy(request: Request, call_next: Any) -> Any:
                refused = JSONResponse({"detail": "busy"}, status_code=503, headers={"Retry-After": "1"})
                if variant == "middleware":  # right too: the pool's exception, caught around the app
                    try:
                        return await call_next(request)
                    except sqlalchemy.exc.TimeoutError:
                        return refused
                if variant == "deadline":  # a limit on the whole request, not on the wait
                    try:
                        return await asyncio.wait_for(call_next(request), timeout=1)
                    except (TimeoutError, sqlalchemy.exc.TimeoutError):
                        return refused
                if in_flight[0] >= engine.pool.size():  # type: ignore[attr-defined]
                    return refused  # a guess from a count, not the pool's answer
                in_flight[0] += 1
                try:
                    return await call_next(request)
                finally:
                    in_flight[0] -= 1

            return app
        caught: Any = {
            "builtin-timeout": TimeoutError,
            "catch-all": Exception,
            "sqlalchemy-error": SQLAlchemyError,
        }.get(variant, sqlalchemy.exc.TimeoutError)

        @app.exception_handler(caught)
        async def database_busy(request: Request, exc: Exception) -> Any:
            body = {"detail": "the database is busy; retry shortly"}
            if variant == "500":
                return JSONResponse(body, status_code=500)
            if variant == "text-body":
                return PlainTextResponse("busy", status_code=503, headers={"Retry-After": "1"})
            headers = {"no-retry-after": {}, "fractional": {"Retry-After": "0.5"}}.get(
                variant, {"Retry-After": "1"}
            )
            return JSONResponse(body, status_code=503, headers=headers)

        return app

    return make_engine, make_app


@pytest.mark.parametrize("variant", ["right", "middleware"])
def test_4_2_a_small_pool_and_a_503_handler_pass(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_pool_fail_fast(*pool_answer(variant))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 4.2 · Fail fast when the pool is exhausted\n")
    assert (
        "  ✅ passed: its pool: the size asked for (2), no overflow, a wait of at most 1 s for a connection\n"
    ) in out
    assert "  ✅ passed: the others get 503, with Retry-After in whole seconds and a JSON body\n" in out
    assert "  ✅ passed: one request that wants 3 connections from a pool of 2 gets 503 too\n" in out
    assert out.endswith("Exercise 4.2: passed ✅ (10 of 10 checks)\n")


@pytest.mark.parametrize("variant", ["placeholder-engine", "placeholder-app"])
def test_4_2_placeholder_is_not_started(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer(variant))
    assert "⬜ not started: Exercise 4.2's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 4.2: not started")


def test_4_2_the_default_pool_timeout_is_rejected_without_waiting(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("default-timeout"))
    assert (
        "       expected: pool_timeout between 0 and 1 s: how long a request waits for a free connection\n"
        "       seen:     pool_timeout 30 s, the default: when the pool is busy, each request beyond it "
        "waits 30 s before failing\n"
    ) in out
    assert "  ✅ passed: each 503 comes within 3 s, not after a long wait\n" in out  # on the check's own pool
    assert out.endswith("Exercise 4.2: not yet — 9 of 10 checks pass")


@pytest.mark.parametrize(
    ("variant", "seen"),
    [
        (
            "unbounded",
            "max_overflow -1: no limit at all, so a burst opens as many connections as it has requests",
        ),
        ("default-overflow", "max_overflow 10: a burst opens up to 10 connections more than the pool's"),
    ],
)
def test_4_2_an_overflowing_pool_is_rejected(
    variant: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer(variant))
    assert "       expected: max_overflow=0: never more connections than the pool's\n" in out
    assert f"       seen:     {seen}" in out
    assert out.endswith("Exercise 4.2: not yet — 9 of 10 checks pass")


def test_4_2_no_handler_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("no-handler"))
    assert "       expected: no 500: a request refused by the pool answered by your handler\n" in out
    assert re.search(
        r"seen:     \d+ of 20 got 500: QueuePool limit of size 2 overflow 0 reached, connection timed out, "
        r"timeout 0.50 reached the client unhandled\n",
        out,
    )
    assert (
        "hint:     The pool raises `sqlalchemy.exc.TimeoutError` when no connection frees up in time" in out
    )
    assert out.endswith("Exercise 4.2: not yet — 6 of 7 checks pass")


def test_4_2_a_handler_for_the_builtin_timeout_error_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("builtin-timeout"))
    assert "hint:     Your handler is registered for Python's built-in TimeoutError" in out
    assert out.endswith("Exercise 4.2: not yet — 6 of 7 checks pass")


def test_4_2_a_handler_answering_500_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("500"))
    assert "       expected: no 500: a request refused by the pool gets 503, Service Unavailable\n" in out
    assert re.search(r"seen:     \d+ of 20 got 500 from your handler: '\{\"detail\":", out)
    assert out.endswith("Exercise 4.2: not yet — 6 of 7 checks pass")


@pytest.mark.parametrize(
    ("variant", "seen"),
    [
        ("no-retry-after", "with no Retry-After header"),
        ("fractional", "with Retry-After: '0.5', not a whole number of seconds (at least 1)"),
        ("text-body", "with a text/plain; charset=utf-8 body, not JSON: 'busy'"),
    ],
)
def test_4_2_a_503_without_a_good_retry_after_is_rejected(
    variant: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer(variant))
    assert "       expected: every 503 with Retry-After (whole seconds) and a short JSON body\n" in out
    assert re.search(rf"seen:     (\d+) of \1 {re.escape(seen)}", out)
    assert out.endswith("Exercise 4.2: not yet — 7 of 8 checks pass")


def test_4_2_a_handler_for_every_exception_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("catch-all"))
    assert (
        "  ❌ not yet: a request that raises another exception (a bug, a bad query) still gets 500\n"
        "       expected: status 500 for a handler that raised another exception (a bug)\n"
        "       seen:     status 503: a handler for every Exception answers 'busy, retry later' to bugs too\n"
    ) in out
    assert out.endswith("Exercise 4.2: not yet — 9 of 10 checks pass")


def test_4_2_a_pool_size_fixed_in_make_engine_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("hard-coded-size"))
    assert (
        "       expected: pool_size=5 from make_engine(url, 5): the size the caller passed\n"
        "       seen:     pool_size 2: the same size whatever the caller asks\n"
    ) in out
    assert out.endswith("Exercise 4.2: not yet — 9 of 10 checks pass")


def test_4_2_a_handler_for_every_database_error_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("sqlalchemy-error"))
    assert (
        "  ❌ not yet: a request that raises another exception (a bug, a bad query) still gets 500\n"
        "       expected: status 500 for a query on a table that does not exist (a database error, not a "
        "busy pool)\n"
        "       seen:     status 503: a handler for SQLAlchemyError answers 'busy, retry later' to errors "
        "that retrying cannot fix\n"
    ) in out
    assert out.endswith("Exercise 4.2: not yet — 9 of 10 checks pass")


def test_4_2_refusing_by_a_count_of_requests_in_flight_is_rejected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("counting-middleware"))
    assert "  ✅ passed: the others get 503, with Retry-After in whole seconds and a JSON body\n" in out
    assert (
        "  ❌ not yet: one request that wants 3 connections from a pool of 2 gets 503 too\n"
        "       expected: status 503 with Retry-After for a request that, alone in the app, wanted 3 "
        "connections of a pool of 2\n"
        "       seen:     status 500: QueuePool limit of size 2 overflow 0 reached, connection timed out, "
        "timeout 0.50 reached the client unhandled, though only one request was in the app\n"
        "       hint:     Only the pool knows when it has no connection to give"
    ) in out
    assert out.endswith("Exercise 4.2: not yet — 9 of 10 checks pass")


def test_4_2_a_deadline_on_the_whole_request_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_pool_fail_fast, *pool_answer("deadline"))
    assert (
        "  ❌ not yet: a request that gets its connection at once is served, even with a 1.5 s query\n" in out
    )
    assert re.search(
        r"seen:     status 503 after \d\.\d s: '\{\"detail\":\"busy\"\}': the limit was put on the whole "
        r"request, not on the wait for a connection\n",
        out,
    )
    assert out.endswith("Exercise 4.2: not yet — 9 of 10 checks pass")


# ---------------------------------------------------------------------------------------------------
# Exercise 4.3: orders with their lines, loaded before the session closes
# ---------------------------------------------------------------------------------------------------


class Base(AsyncAttrs, DeclarativeBase):
    pass


class Customer(Base):
    __tablename__ = "ch04x_customers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80))
    orders: Mapped[list[Order]] = relationship(back_populates="customer")


class Order(Base):
    __tablename__ = "ch04x_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    customer_id: Mapped[int] = mapped_column(ForeignKey("ch04x_customers.id"))
    customer: Mapped[Customer] = relationship(back_populates="orders")
    lines: Mapped[list[OrderLine]] = relationship(back_populates="order")


class OrderLine(Base):
    __tablename__ = "ch04x_order_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("ch04x_orders.id"))
    sku: Mapped[str] = mapped_column(String(40))
    quantity: Mapped[int]
    order: Mapped[Order] = relationship(back_populates="lines")


MODELS = (Customer, Order, OrderLine)


def loading_answer(variant: str) -> Any:
    """``orders_with_lines`` as a learner might write it."""

    async def orders_with_lines(session: AsyncSession, customer_id: int) -> Any:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("4.3"))
        mine = select(Order).where(Order.customer_id == customer_id)
        if variant == "selectin":
            return list((await session.scalars(mine.options(selectinload(Order.lines)))).all())
        if variant == "joined-unique":  # right too, in one query
            result = await session.execute(mine.options(joinedload(Order.lines)))
            return list(result.unique().scalars().all())
        if variant == "via-customer":  # right too, in three queries
            customer = await session.get(
                Customer, customer_id, options=[selectinload(Customer.orders).selectinload(Order.lines)]
            )
            assert customer is not None
            return customer.orders
        if variant == "plain":
            return list((await session.scalars(mine)).all())
        if variant == "n+1":
            orders = list((await session.scalars(mine)).all())
            for order in orders:
                await order.awaitable_attrs.lines
            return orders
        if variant == "orders-only":
            customer = await session.get(Customer, customer_id, options=[selectinload(Customer.orders)])
            assert customer is not None
            return customer.orders
        if variant == "joined":
            return list((await session.scalars(mine.options(joinedload(Order.lines)))).all())
        if variant == "join":
            query = mine.join(Order.lines).options(selectinload(Order.lines))
            return list((await session.scalars(query)).all())
        if variant == "rows":
            return list((await session.execute(mine.options(selectinload(Order.lines)))).all())
        if variant == "every-customer":
            return list((await session.scalars(select(Order).options(selectinload(Order.lines)))).all())
        if variant == "not-awaited":
            return session.scalars(mine.options(selectinload(Order.lines)))
        if variant == "subquery":  # right too: two queries, whatever the number of orders
            return list((await session.scalars(mine.options(subqueryload(Order.lines)))).all())
        if variant == "inner-join":  # one query, but an order with no lines has no row to join
            query = mine.join(Order.lines).options(contains_eager(Order.lines))
            return list((await session.scalars(query)).unique().all())
        if variant == "commits":
            orders = list((await session.scalars(mine.options(selectinload(Order.lines)))).all())
            await session.commit()  # "to release the connection": the caller's transaction
            return orders
        if variant == "rolls-back":
            orders = list((await session.scalars(mine.options(selectinload(Order.lines)))).all())
            await session.rollback()
            return orders
        if variant == "rolls-back-first":
            await session.rollback()  # "to read from a clean transaction, only committed rows"
            return list((await session.scalars(mine.options(selectinload(Order.lines)))).all())
        if variant == "filters-in-python":
            everything = (await session.scalars(select(Order).options(selectinload(Order.lines)))).all()
            return [order for order in everything if order.customer_id == customer_id]
        if variant == "own-session":  # a session of its own: it sees only what is committed
            async with AsyncSession(session.bind) as own:
                return list((await own.scalars(mine.options(selectinload(Order.lines)))).all())
        if variant == "scalar-result":
            return await session.scalars(mine.options(selectinload(Order.lines)))
        if variant == "touches-lines":
            orders = (await session.scalars(mine)).all()
            return [order for order in orders if order.lines]
        raise AssertionError(variant)

    return orders_with_lines


@pytest.mark.parametrize("variant", ["selectin", "joined-unique", "via-customer", "subquery"])
def test_4_3_eager_loading_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_orders_with_lines(loading_answer(variant), *MODELS)
    out = capsys.readouterr().out
    assert out.startswith("Exercise 4.3 · Orders with their lines, loaded before the session closes\n")
    assert "  ✅ passed: in at most 3 queries, not one per order\n" in out
    assert (
        "  ✅ passed: orders_with_lines(session, customer_id) runs and leaves the caller's transaction "
        "alone: nothing committed, nothing rolled back\n"
    ) in out
    assert out.endswith("Exercise 4.3: passed ✅ (7 of 7 checks)\n")


def test_4_3_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer("placeholder"), *MODELS)
    assert "⬜ not started: Exercise 4.3's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 4.3: not started")


@pytest.mark.parametrize("variant", ["plain", "orders-only"])
def test_4_3_lines_not_loaded_are_rejected(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer(variant), *MODELS)
    assert (
        "  ❌ not yet: each order's lines are loaded: reading them in the open session runs no query\n"
        "       expected: each order's lines loaded by orders_with_lines, before it returns\n"
        "       seen:     reading `order.lines` in the open session, as a handler would: `order.lines` was "
        "not loaded, so reading it started a query from plain (synchronous) attribute access, which "
        "SQLAlchemy refuses under asyncio: MissingGreenlet\n"
    ) in out
    assert "Traceback" not in out
    assert out.endswith("Exercise 4.3: not yet — 3 of 4 checks pass")


def test_4_3_a_lazy_load_inside_the_function_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer("touches-lines"), *MODELS)
    assert "       seen:     inside orders_with_lines: `order.lines` was not loaded" in out
    assert "MissingGreenlet" in out and "your code raised" not in out
    assert out.endswith("Exercise 4.3: not yet — 2 of 3 checks pass")


def test_4_3_one_query_per_order_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer("n+1"), *MODELS)
    assert (
        "  ❌ not yet: in at most 3 queries, not one per order\n"
        "       expected: at most 3 queries for 20 orders, not one per order\n"
        "       seen:     20 queries for 20 orders: one for the orders, then one more per order "
        "(the N+1 problem)\n"
    ) in out
    assert (
        "  ✅ passed: the lines still read after the session has closed, as when FastAPI serialises them\n"
        in out
    )
    assert out.endswith("Exercise 4.3: not yet — 6 of 7 checks pass")


def test_4_3_joinedload_without_unique_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer("joined"), *MODELS)
    assert (
        "       expected: the customer's orders, each once\n"
        "       seen:     SQLAlchemy refused the result: 'The unique() method must be invoked on this Result"
    ) in out
    assert "hint:     `joinedload(Order.lines)` joins each order to its lines" in out
    assert out.endswith("Exercise 4.3: not yet — 2 of 3 checks pass")


@pytest.mark.parametrize(
    ("variant", "expected", "seen"),
    [
        ("join", "each of the 20 orders once", "57 objects for 19 orders: each order repeated once per line"),
        (
            "inner-join",
            "the customer's 20 orders, the one with no lines yet among them",
            "19 of them: the order that has no lines is missing, so the query kept only orders that have a "
            "line (an inner join)",
        ),
        (
            "scalar-result",
            "a list of the customer's 20 Order objects",
            "a ScalarResult: a result to iterate once, with no len() and no indexing",
        ),
        ("rows", "a list of the customer's 20 Order objects", "20 Row objects (tuples of columns), such as"),
        (
            "every-customer",
            "only the 20 orders of the customer asked for",
            "24 orders, 4 of them another customer's",
        ),
        (
            "not-awaited",
            "a list of the customer's 20 Order objects",
            "a coroutine, <coroutine object AsyncSession.scalars at",
        ),
    ],
)
def test_4_3_the_wrong_orders_are_rejected(
    variant: str, expected: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer(variant), *MODELS)
    assert f"       expected: {expected}\n" in out
    assert f"       seen:     {seen}" in out
    assert out.endswith("Exercise 4.3: not yet — 2 of 3 checks pass")


@pytest.mark.parametrize(
    ("variant", "seen"),
    [
        (
            "commits",
            "a commit during the call: orders_with_lines committed the caller's transaction, one it does "
            "not own, with whatever the caller had not committed yet",
        ),
        (
            "rolls-back",
            "it was over when the call returned: orders_with_lines rolled back (or closed) the caller's "
            "transaction, one it does not own, and whatever the caller had not committed with it: the "
            "order the caller had added and flushed, not committed, is gone from its session",
        ),
        (  # "to read from a clean transaction": the caller's new order is never read either
            "rolls-back-first",
            "it was over when the call returned: orders_with_lines rolled back (or closed) the caller's "
            "transaction, one it does not own, and whatever the caller had not committed with it: the "
            "order the caller had added and flushed, not committed, is gone from its session and missing "
            "from the result",
        ),
    ],
)
def test_4_3_ending_the_callers_transaction_is_rejected(
    variant: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer(variant), *MODELS)
    assert (
        "  ❌ not yet: orders_with_lines(session, customer_id) runs and leaves the caller's transaction "
        "alone: nothing committed, nothing rolled back\n"
        "       expected: the caller's transaction left open: orders_with_lines only reads\n"
        f"       seen:     {seen}\n"
    ) in out
    assert out.endswith("Exercise 4.3: not yet — 1 of 2 checks pass")


def test_4_3_loading_every_customers_orders_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer("filters-in-python"), *MODELS)
    assert "  ✅ passed: it returns the customer's 20 orders, each once\n" in out
    assert (
        "  ❌ not yet: it reads only that customer's orders and lines, not every customer's\n"
        "       expected: only the customer's orders and their lines read from the database\n"
        "       seen:     4 orders and 8 lines of another customer loaded too: the query read every "
        "customer's orders (the whole table), and the customer's were picked out afterwards, in Python\n"
    ) in out
    assert out.endswith("Exercise 4.3: not yet — 6 of 7 checks pass")


def test_4_3_reading_through_a_session_of_its_own_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_orders_with_lines, loading_answer("own-session"), *MODELS)
    assert (
        "  ❌ not yet: it returns the customer's 20 orders, each once\n"
        "       expected: the customer's 20 orders, read through the session it was given\n"
        "       seen:     19 of 19 orders that are not in that session: they were read through another "
        "session (or connection), whose transaction cannot see what the caller has flushed but not "
        "committed, so the caller's new order is missing\n"
    ) in out
    assert out.endswith("Exercise 4.3: not yet — 2 of 3 checks pass")


def test_4_3_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    first = rejected(capsys, check_orders_with_lines, loading_answer("plain"), *MODELS)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_orders_with_lines, loading_answer("plain"), *MODELS)
    assert "selectinload(Order.lines)" not in first
    assert "selectinload(Order.lines)" in second


# ---------------------------------------------------------------------------------------------------
# Exercise 4.4: a checkout that holds no connection while the payment provider charges
# ---------------------------------------------------------------------------------------------------


class ShopBase(DeclarativeBase):
    pass


class Stock(ShopBase):
    __tablename__ = "ch04x_stock"

    sku: Mapped[str] = mapped_column(String(40), primary_key=True)
    available: Mapped[int]


class CheckoutOrder(ShopBase):
    __tablename__ = "ch04x_checkout_orders"

    id: Mapped[int] = mapped_column(primary_key=True)
    sku: Mapped[str] = mapped_column(ForeignKey("ch04x_stock.sku"))
    status: Mapped[str] = mapped_column(String(20))


class OutOfStock(Exception):
    pass


class PaymentDeclined(Exception):
    pass


SHOP = (Stock, CheckoutOrder, PaymentDeclined, OutOfStock)
TAKE = update(Stock).values(available=Stock.available - 1)
GIVE_BACK = update(Stock).values(available=Stock.available + 1)


@pytest.fixture
def notebook_shop() -> Iterator[list[async_sessionmaker[AsyncSession]]]:
    """The notebook's own session factory (`shop_sessions`), which an answer should not use."""
    engine = create_async_engine(fresh_database("test-ch04-shop"), poolclass=NullPool)
    yield [async_sessionmaker(engine, expire_on_commit=False)]


def checkout_answer(variant: str, notebook: list[Any] | None = None) -> Any:
    """``checkout(sessions, payments, sku)`` as a learner might write it."""

    async def take_one(session: Any, sku: str) -> Any:
        """The guarded UPDATE, then the pending order (in the caller's transaction)."""
        taken = await session.execute(TAKE.where(Stock.sku == sku, Stock.available > 0))
        if taken.rowcount != 1:
            raise OutOfStock(sku)
        order = CheckoutOrder(sku=sku, status="pending")
        session.add(order)
        return order

    async def reserve(sessions: Any, sku: str) -> int:
        async with sessions.begin() as session:
            order = await take_one(session, sku)
        return order.id

    async def record(sessions: Any, sku: str, order_id: int, status: str) -> None:
        async with sessions.begin() as session:
            await session.execute(
                update(CheckoutOrder).where(CheckoutOrder.id == order_id).values(status=status)
            )
            if status == "declined":
                await session.execute(GIVE_BACK.where(Stock.sku == sku))

    async def charge(payments: Any, sku: str) -> str:
        try:
            await payments.charge(sku)
        except PaymentDeclined:
            return "declined"
        return "paid"

    locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def reading_lock() -> asyncio.Lock:  # each of the check's sales runs on an event loop of its own
        return locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())

    async def checkout(sessions: Any, payments: Any, sku: str) -> str:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("4.4"))
        if variant == "right":
            order_id = await reserve(sessions, sku)
            status = await charge(payments, sku)
            await record(sessions, sku, order_id, status)
            return status
        if variant == "returning":  # right too: RETURNING instead of rowcount, commits by hand
            async with sessions() as session:
                left = await session.scalar(
                    TAKE.where(Stock.sku == sku, Stock.available >= 1).returning(Stock.available)
                )
                if left is None:
                    raise OutOfStock(sku)
                order = CheckoutOrder(sku=sku, status="pending")
                session.add(order)
                await session.commit()
            status = await charge(payments, sku)
            async with sessions() as session:
                stored = await session.get(CheckoutOrder, order.id)
                assert stored is not None
                stored.status = status
                if status == "declined":
                    await session.execute(GIVE_BACK.where(Stock.sku == sku))
                await session.commit()
            return status
        if variant == "insert-first":  # right too: the order first, refused by the rollback
            async with sessions.begin() as session:
                order = CheckoutOrder(sku=sku, status="pending")
                session.add(order)
                await session.flush()
                taken = await session.execute(TAKE.where(Stock.sku == sku, Stock.available > 0))
                if taken.rowcount == 0:
                    raise OutOfStock(sku)
            try:
                await payments.charge(sku)
            except PaymentDeclined:
                await record(sessions, sku, order.id, "declined")
                return "declined"
            await record(sessions, sku, order.id, "paid")
            return "paid"
        if variant == "held":  # the exercise's first version
            async with sessions() as session:
                stock = await session.get(Stock, sku)
                if stock is None or stock.available < 1:
                    raise OutOfStock(sku)
                stock.available -= 1
                order = CheckoutOrder(sku=sku, status="pending")
                session.add(order)
                await session.flush()
                status = await charge(payments, sku)
                if status == "declined":
                    stock.available += 1
                order.status = status
                await session.commit()
                return status
        if variant == "no-commit-outcome":  # `async with sessions()` closes without committing
            order_id = await reserve(sessions, sku)
            status = await charge(payments, sku)
            async with sessions() as session:
                await session.execute(
                    update(CheckoutOrder).where(CheckoutOrder.id == order_id).values(status=status)
                )
                if status == "declined":
                    await session.execute(GIVE_BACK.where(Stock.sku == sku))
            return status
        if variant in ("read-then-decrement", "lost-update", "lost-update-reads-in-turn"):  # a read, a write
            async with sessions.begin() as session:
                if variant == "read-then-decrement":
                    left = await session.scalar(select(Stock.available).where(Stock.sku == sku))
                    if not left:
                        raise OutOfStock(sku)
                    await session.execute(TAKE.where(Stock.sku == sku))
                else:
                    if variant == "lost-update-reads-in-turn":  # one read at a time: no two ever meet
                        async with reading_lock():
                            stock = await session.get(Stock, sku)
                    else:
                        stock = await session.get(Stock, sku)
                    if stock is None or stock.available < 1:
                        raise OutOfStock(sku)
                    stock.available -= 1  # writes the number read, minus one
                order = CheckoutOrder(sku=sku, status="pending")
                session.add(order)
            status = await charge(payments, sku)
            await record(sessions, sku, order.id, status)
            return status
        if variant == "ignores-rowcount":
            async with sessions.begin() as session:
                await session.execute(TAKE.where(Stock.sku == sku, Stock.available > 0))
                order = CheckoutOrder(sku=sku, status="pending")
                session.add(order)
            status = await charge(payments, sku)
            await record(sessions, sku, order.id, status)
            return status
        if variant == "refused-order-kept":  # commits, then looks at rowcount
            async with sessions() as session:
                order = CheckoutOrder(sku=sku, status="pending")
                session.add(order)
                taken = await session.execute(TAKE.where(Stock.sku == sku, Stock.available > 0))
                await session.commit()
            if taken.rowcount != 1:
                raise OutOfStock(sku)
            status = await charge(payments, sku)
            await record(sessions, sku, order.id, status)
            return status
        if variant in ("declined-kept", "declined-deleted", "declined-raised"):
            order_id = await reserve(sessions, sku)
            status = await charge(payments, sku)
            async with sessions.begin() as session:
                if variant == "declined-deleted" and status == "declined":
                    await session.execute(delete(CheckoutOrder).where(CheckoutOrder.id == order_id))
                    await session.execute(GIVE_BACK.where(Stock.sku == sku))
                else:
                    stmt = update(CheckoutOrder).where(CheckoutOrder.id == order_id).values(status=status)
                    await session.execute(stmt)
                    if status == "declined" and variant == "declined-raised":
                        await session.execute(GIVE_BACK.where(Stock.sku == sku))
            if variant == "declined-raised" and status == "declined":
                raise PaymentDeclined(sku)
            return status
        if variant == "order-after-charge":  # the unit in one transaction, the order after the charge
            async with sessions.begin() as session:
                taken = await session.execute(TAKE.where(Stock.sku == sku, Stock.available > 0))
                if taken.rowcount != 1:
                    raise OutOfStock(sku)
            status = await charge(payments, sku)
            async with sessions.begin() as session:
                session.add(CheckoutOrder(sku=sku, status=status))
                if status == "declined":
                    await session.execute(GIVE_BACK.where(Stock.sku == sku))
            return status
        if variant == "finally-records":  # "always record an outcome": a cancelled charge too
            order_id = await reserve(sessions, sku)
            status = "declined"
            try:
                await payments.charge(sku)
                status = "paid"
            except PaymentDeclined:
                pass
            finally:
                await record(sessions, sku, order_id, status)
            return status
        if variant in ("any-error-declines", "error-swallowed"):  # an error from the provider
            order_id = await reserve(sessions, sku)
            try:
                await payments.charge(sku)
            except PaymentDeclined:
                status = "declined"
            except Exception:
                if variant == "error-swallowed":  # "leave it pending", and say so instead of raising
                    return "pending"
                status = "declined"  # "not paid, so declined"
            else:
                status = "paid"
            await record(sessions, sku, order_id, status)
            return status
        if variant == "for-update":  # locks the row it reads: on PostgreSQL, not on SQLite
            async with sessions.begin() as session:
                stock = await session.scalar(select(Stock).where(Stock.sku == sku).with_for_update())
                if stock is None or stock.available < 1:
                    raise OutOfStock(sku)
                stock.available -= 1
                order = CheckoutOrder(sku=sku, status="pending")
                session.add(order)
            status = await charge(payments, sku)
            await record(sessions, sku, order.id, status)
            return status
        if variant == "charge-in-wait-for":  # the session held across the charge, run in a child task
            async with sessions.begin() as session:
                order = await take_one(session, sku)
                await session.flush()
                try:
                    await asyncio.wait_for(payments.charge(sku), timeout=5)
                except PaymentDeclined:
                    order.status = "declined"
                    await session.execute(GIVE_BACK.where(Stock.sku == sku))
                else:
                    order.status = "paid"
            return order.status
        if variant == "retry-in-transaction":  # sleeps and tries again with its transaction open
            async with sessions.begin() as session:
                for _ in range(3):
                    taken = await session.execute(TAKE.where(Stock.sku == sku, Stock.available > 0))
                    if taken.rowcount == 1:
                        break
                    await asyncio.sleep(0.25)
                else:
                    raise OutOfStock(sku)
                order = CheckoutOrder(sku=sku, status="pending")
                session.add(order)
            status = await charge(payments, sku)
            await record(sessions, sku, order.id, status)
            return status
        if variant in ("skip-locked", "nowait"):  # gives up on a locked row: on PostgreSQL, refused or failed
            async with sessions.begin() as session:
                read = select(Stock).where(Stock.sku == sku)
                locked = read.with_for_update(
                    skip_locked=variant == "skip-locked", nowait=variant == "nowait"
                )
                if await session.scalar(locked) is None:
                    raise OutOfStock(sku)
                order = await take_one(session, sku)
            status = await charge(payments, sku)
            await record(sessions, sku, order.id, status)
            return status
        if variant == "for-share":  # a shared lock, then an UPDATE: on PostgreSQL two of them deadlock
            async with sessions.begin() as session:
                stock = await session.scalar(select(Stock).where(Stock.sku == sku).with_for_update(read=True))
                if stock is None or stock.available < 1:
                    raise OutOfStock(sku)
                order = await take_one(session, sku)
            status = await charge(payments, sku)
            await record(sessions, sku, order.id, status)
            return status
        if variant == "notebook-sessions":  # the notebook's factory, not the argument
            assert notebook is not None
            order_id = await reserve(notebook[0], sku)
            status = await charge(payments, sku)
            await record(notebook[0], sku, order_id, status)
            return status
        raise AssertionError(variant)

    return checkout


@pytest.mark.parametrize("variant", ["right", "returning", "insert-first"])
def test_4_4_short_transactions_pass(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_checkout(checkout_answer(variant), *SHOP)
    out = capsys.readouterr().out
    assert out.startswith("Exercise 4.4 · A checkout that holds no connection while the provider charges\n")
    assert (
        "  ✅ passed: 10 checkouts at once on a pool of 2: all paid, none waits out pool_timeout, none holds "
        "a connection while its charge runs\n"
    ) in out
    assert out.endswith("Exercise 4.4: passed ✅ (8 of 8 checks)\n")


def test_4_4_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout, checkout_answer("placeholder"), *SHOP)
    assert "⬜ not started: Exercise 4.4's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 4.4: not started")


CONCURRENT_STEP = (
    "  ❌ not yet: 10 checkouts at once on a pool of 2: all paid, none waits out pool_timeout, none holds a "
    "connection while its charge runs\n"
)
SCARCE_STEP = (
    "  ❌ not yet: 10 checkouts at once for 3 units: 3 sold, the others refused with OutOfStock, never "
    "oversold\n"
)
DECLINED_STEP = (
    "  ❌ not yet: a declined payment: returns 'declined', its order 'declined', its unit back in stock\n"
)
PROVIDER_ERROR_STEP = (
    "  ❌ not yet: the provider fails with another error than PaymentDeclined (a ConnectionError): the "
    "error propagates, its order stays 'pending', its unit reserved\n"
    "       expected: the ConnectionError raised out of checkout, its order left 'pending', its unit "
    "reserved (4 of 5 in stock)\n"
)
CRASH_STEP = (
    "  ❌ not yet: a checkout cut short while charge() runs (a crash): its order stays 'pending', its unit "
    "reserved\n"
    "       expected: the order left 'pending', its unit reserved (4 of 5 in stock)\n"
)
OVERSOLD = (
    "       expected: 3 paid and 7 refused with OutOfStock: never more sold than the 3 units in stock\n"
)

# Each wrong answer (why a developer writes it): lines its check must print, and its summary.
WRONG_CHECKOUTS: dict[str, tuple[tuple[str, ...], str]] = {
    # the exercise's first version: one session from the reservation to the outcome
    "held": (
        (
            "  ❌ not yet: no connection is checked out while charge() runs, nor once the checkout has "
            "returned\n"
            "       expected: no connection checked out while charge() runs\n"
            "       seen:     1 checked out during the 0.3 s charge (the only checkout running): its session "
            "was still open",
            CONCURRENT_STEP + "       expected: 10 checkouts served by 2 connections, none holding one while "
            "its charge runs\n",
            "failed with the pool's TimeoutError (QueuePool limit of size 2 overflow 0 reached, connection "
            "timed out, timeout 1.00), and ",
            "hint:     This is the lesson's session held across a slow call (section 3)",
            "       seen:     no order, and no unit reserved; 5 of 5 units in stock: the reservation was not "
            "committed before charge() ran",
        ),
        "3 of 8",
    ),
    # `async with sessions() as session:` for the outcome, thinking the block commits
    "no-commit-outcome": (
        (
            "       expected: one order stored, 'paid'\n"
            "       seen:     one order, still 'pending': the transaction that marks it paid was never "
            "committed, and closing a session rolls back what it did not commit\n",
        ),
        "1 of 2",
    ),
    # reads the stock, then decrements it with `available - 1`, as two statements
    "read-then-decrement": (
        (SCARCE_STEP + OVERSOLD, "each checkout took a unit whatever the number it had read\n"),
        "7 of 8",
    ),
    # the ORM way: `stock.available -= 1` on the object it read
    "lost-update": (
        (
            SCARCE_STEP + OVERSOLD,
            "; the stock says 0: each checkout wrote the number it had read, less one, over the other "
            "checkouts' writes (a lost update)\n",
        ),
        "7 of 8",
    ),
    # the conditional UPDATE, but its rowcount never looked at
    "ignores-rowcount": (
        (
            SCARCE_STEP + OVERSOLD + "       seen:     10 paid for 3 units, oversold by 7; the stock says 0: "
            "the UPDATE found no unit left for 7 of them and changed nothing, and they were sold all the "
            "same\n",
        ),
        "7 of 8",
    ),
    # commits the order with the UPDATE, then tests rowcount
    "refused-order-kept": (
        (
            SCARCE_STEP + "       expected: 3 orders stored, one per sale\n"
            "       seen:     10 orders (3 'paid', 7 'pending'): 7 left by checkouts that were refused\n",
        ),
        "7 of 8",
    ),
    # marks the order declined, forgets the unit
    "declined-kept": (
        (
            DECLINED_STEP + "       expected: the unit back in stock: 5 of 5\n"
            "       seen:     4 of 5: the reserved unit was not given back\n",
        ),
        "7 of 8",
    ),
    # "a declined order is no order": deletes it
    "declined-deleted": (
        (
            DECLINED_STEP + "       expected: one order stored, 'declined'\n"
            "       seen:     orders of that sku: none: the declined checkout left no record\n",
        ),
        "7 of 8",
    ),
    # records the decline, then re-raises it to the caller
    "declined-raised": (
        (
            DECLINED_STEP + "       expected: 'declined' returned, once the outcome is recorded\n"
            "       seen:     PaymentDeclined raised out of checkout (orders of that sku: 1 'declined'; 5 of "
            "5 units in stock)\n",
        ),
        "7 of 8",
    ),
    # takes the unit, charges, and only then writes the order with its final status
    "order-after-charge": (
        (
            CRASH_STEP + "       seen:     no order, and a unit gone: the unit was taken before the charge "
            "and the order was to be written after it",
        ),
        "6 of 8",
    ),
    # "always record an outcome": a `finally` that marks a cancelled charge declined
    "finally-records": (
        (
            CRASH_STEP + "       seen:     the order recorded 'declined'; 5 of 5 units in stock: the "
            "checkout was cut short while the provider was charging",
        ),
        "6 of 8",
    ),
    # "not paid, so declined": `except Exception` takes the provider's own failure for a decline
    "any-error-declines": (
        (
            PROVIDER_ERROR_STEP + "       seen:     returned 'declined'; orders of that sku: 1 'declined'; "
            "5 of 5 in stock: the provider's ConnectionError was taken for a decline, so the order was "
            "closed and its unit given back, though nobody knows whether the card was charged\n",
        ),
        "7 of 8",
    ),
    # leaves the order pending, but returns instead of letting the error propagate
    "error-swallowed": (
        (
            PROVIDER_ERROR_STEP + "       seen:     returned 'pending'; orders of that sku: 1 'pending'; "
            "4 of 5 in stock: the provider's ConnectionError was swallowed",
        ),
        "7 of 8",
    ),
    # the notebook's `shop_sessions` instead of the `sessions` argument
    "notebook-sessions": (
        (
            "       expected: the checkout to work through the `sessions` it is given\n"
            "       seen:     no statement on the check's database",
        ),
        "1 of 2",
    ),
}


@pytest.mark.parametrize("variant", list(WRONG_CHECKOUTS))
def test_4_4_wrong_answers_are_rejected(
    variant: str,
    notebook_shop: list[async_sessionmaker[AsyncSession]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    lines, passed = WRONG_CHECKOUTS[variant]
    out = rejected(capsys, check_checkout, checkout_answer(variant, notebook_shop), *SHOP)
    for line in lines:
        assert line in out, out  # the whole report: pytest shortens a long string
    assert out.endswith(f"Exercise 4.4: not yet — {passed} checks pass")


def test_4_4_a_read_with_for_update_is_judged_by_the_database(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = database_url()
    if url is not None and make_url(url).get_backend_name() == "postgresql":
        runs = _counting_sales(monkeypatch)
        # a pause after each locked read would hold the lock: ten of 0.3 s, one after the other, outlast
        # the 1 s pool wait
        monkeypatch.setattr(ch04, "_READ_PAUSE", 0.3)
        check_checkout(checkout_answer("for-update"), *SHOP)  # the row is locked: no other read meanwhile
        assert capsys.readouterr().out.endswith("Exercise 4.4: passed ✅ (8 of 8 checks)\n")
        # reads that lock the row cannot meet: no pause after them, and no run again for want of a meeting
        assert runs.count("ch04x-last") == 1, runs
        return
    out = rejected(capsys, check_checkout, checkout_answer("for-update"), *SHOP)
    assert (
        SCARCE_STEP + OVERSOLD + "       seen:     6 paid for 3 units, oversold by 3; the stock was read "
        in out
    )
    assert "with FOR UPDATE, which SQLite ignores (it has no row locks), so the other checkouts read " in out
    assert "One statement guarded by `WHERE available > 0` is the portable way" in out
    assert out.endswith("Exercise 4.4: not yet — 7 of 8 checks pass")


def test_4_4_a_shared_lock_then_an_update_is_named_on_either_database(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = database_url()
    if url is None or make_url(url).get_backend_name() != "postgresql":
        # SQLite drops FOR SHARE, so the guarded UPDATE decides and nothing deadlocks: named all the same
        out = rejected(capsys, check_checkout, checkout_answer("for-share"), *SHOP)
        assert "UPDATEs of the stock in a transaction that had read it with FOR SHARE: right here only" in out
        assert "a deadlock, which PostgreSQL breaks only after `deadlock_timeout`" in out
        assert out.endswith("Exercise 4.4: not yet — 7 of 8 checks pass"), out
        return
    out = rejected(capsys, check_checkout, checkout_answer("for-share"), *SHOP)
    assert (
        "though no charge ran while its own checkout held a connection: the checkouts' transactions waited "
        "on each other's row locks, and another failed with deadlock detected" in out
    )
    assert "(`FOR SHARE`, `with_for_update(read=True)`) and then both UPDATE it wait for each other" in out
    assert "each held one for the whole" not in out, "the charge is not what held the connections"


@pytest.mark.parametrize(("variant", "clause"), [("skip-locked", "SKIP LOCKED"), ("nowait", "NOWAIT")])
def test_4_4_a_read_that_gives_up_on_a_lock_is_named_on_either_database(
    variant: str, clause: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_checkout, checkout_answer(variant), *SHOP)
    url = database_url()
    if url is None or make_url(url).get_backend_name() != "postgresql":  # SQLite drops the clause
        assert f"reads of the stock with {clause}: passed here only because SQLite" in out, out
        assert out.endswith("Exercise 4.4: not yet — 7 of 8 checks pass"), out


@pytest.mark.parametrize(
    ("variant", "seen"),
    [
        # asyncio.wait_for runs the charge in a task of its own (Python 3.11): still this checkout's
        ("charge-in-wait-for", r"([1-9]\d*) of \1 charges ran while their own checkout held a connection"),
        (
            "retry-in-transaction",
            "though no charge ran while its own checkout held a connection: each held one outside",
        ),
    ],
)
def test_4_4_what_held_the_pool_is_named(
    variant: str, seen: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = _counting_sales(monkeypatch)
    out = rejected(capsys, check_checkout, checkout_answer(variant), *SHOP)
    assert re.search(seen, out), out
    assert "row lock" not in out, "no lock was waited on"
    if variant == "charge-in-wait-for":  # a charge run while its checkout held a connection: one run
        assert runs.count("ch04x-mug") == 1, runs
    else:  # timeouts nothing names, in every run
        assert runs.count("ch04x-last") == ch04._STALLED_RUNS, runs
        assert f"in each of the {ch04._STALLED_RUNS - 1} runs just before this one too" in out, out


def test_4_4_the_notebooks_shop_is_left_alone(
    notebook_shop: list[async_sessionmaker[AsyncSession]], capsys: pytest.CaptureFixture[str]
) -> None:
    """The check's tables are apart from the notebook's (on $DATABASE_URL, the same database)."""
    shop_sessions = notebook_shop[0]

    async def stock_the_shop() -> None:
        async with shop_sessions() as session, session.begin():
            connection = await session.connection()
            await connection.run_sync(ShopBase.metadata.create_all)
            await session.execute(insert(Stock).values(sku="ch04x-lamp", available=20))

    async def read_and_drop() -> int | None:
        async with shop_sessions() as session, session.begin():
            left = await session.scalar(select(Stock.available).where(Stock.sku == "ch04x-lamp"))
            connection = await session.connection()
            await connection.run_sync(ShopBase.metadata.drop_all)
        return left

    with joins_new_threads():  # the shop's own connections' threads end before the test does
        asyncio.run(stock_the_shop())
        try:
            check_checkout(checkout_answer("right"), *SHOP)
        finally:
            left = asyncio.run(read_and_drop())
    assert capsys.readouterr().out.endswith("Exercise 4.4: passed ✅ (8 of 8 checks)\n")
    assert left == 20


def test_4_4_a_plain_function_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    def checkout(sessions: Any, payments: Any, sku: str) -> str:
        return "paid"

    out = rejected(capsys, check_checkout, checkout, *SHOP)
    assert "       expected: checkout defined with `async def`\n" in out
    assert out.endswith("Exercise 4.4: not yet — 0 of 1 checks pass")


def test_4_4_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    answer = checkout_answer("lost-update")
    first = rejected(capsys, check_checkout, answer, *SHOP)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_checkout, answer, *SHOP)
    assert "Stock.available > 0" not in first
    assert "update(Stock).where(Stock.sku == sku, Stock.available > 0)" in second


def _counting_sales(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each run of a sale in check 4.4, by sku, as it starts."""
    runs: list[str] = []
    sell = ch04._sell

    async def counted(*args: Any, **kwargs: Any) -> Any:
        runs.append(args[2])
        return await sell(*args, **kwargs)

    monkeypatch.setattr(ch04, "_sell", counted)
    return runs


def _serialised_at_first(sales: int) -> Any:
    """The lost-update answer, one checkout at a time (an asyncio.Lock) in its first ``sales`` scarce
    sales (each sale has an event loop of its own), then as it is: its reads meet from then on."""
    locks: dict[asyncio.AbstractEventLoop, asyncio.Lock | None] = {}
    lost_update = checkout_answer("lost-update")

    async def checkout(sessions: Any, payments: Any, sku: str) -> str:
        loop = asyncio.get_running_loop()
        if sku != "ch04x-last":  # the check's other sales
            return await lost_update(sessions, payments, sku)
        if loop not in locks:
            locks[loop] = asyncio.Lock() if len(locks) < sales else None
        lock = locks[loop]
        if lock is None:
            return await lost_update(sessions, payments, sku)
        async with lock:  # the read and the write of one checkout, then the next one's
            return await lost_update(sessions, payments, sku)

    return checkout


def test_4_4_a_scarce_sale_that_fails_is_the_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sale that oversold (here with no two reads meeting) is not run again, nor one with no reads."""
    runs = _counting_sales(monkeypatch)
    models = (Stock, CheckoutOrder, PaymentDeclined)
    sale = ch04._scarce_sale(checkout_answer("lost-update-reads-in-turn"), models, OutOfStock)
    paid = sum(r == "paid" for r in sale.results)
    # a run again only after pool timeouts alone (a stalled machine), not for want of a meeting
    assert (len(runs), sale.met, paid > ch04._SCARCE) == (sale.runs, 0, True), (sale.met, paid, sale.stock)
    runs.clear()
    sale = ch04._scarce_sale(checkout_answer("right"), models, OutOfStock)
    assert (len(runs), sale.stock_reads, sale.stock) == (sale.runs, 0, 0)


def test_4_4_a_scarce_sale_whose_reads_never_met_is_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads that never meet say nothing about the race: the sale runs ``_SCARCE_RUNS`` times (here
    a right answer, in one process), and a run in which they met and it oversold is the verdict."""
    monkeypatch.setattr(ch04, "_CHARGE", 0.01)
    runs = _counting_sales(monkeypatch)
    models = (Stock, CheckoutOrder, PaymentDeclined)
    sale = ch04._scarce_sale(_serialised_at_first(ch04._SCARCE_RUNS), models, OutOfStock)
    assert (len(runs), sale.met, sale.stock_reads) == (ch04._SCARCE_RUNS, 0, ch04._CONCURRENT_44)
    assert sale.stock == 0 and sum(r == "paid" for r in sale.results) == ch04._SCARCE
    runs.clear()
    sale = ch04._scarce_sale(_serialised_at_first(1), models, OutOfStock)
    assert len(runs) == 2 and sale.met >= 1 and sum(r == "paid" for r in sale.results) > ch04._SCARCE


def _stalled_at_first(sales: int, sku_stalled: str = "ch04x-mug") -> Any:
    """The right answer, but in its first ``sales`` sales of ``sku_stalled`` (ten at once, an event loop
    each), every checkout first holds a connection 0.3 s in a transaction of its own, as a stalled
    database server would: ten such holds on two connections leave the last past the 1 s pool_timeout."""
    stalled: dict[asyncio.AbstractEventLoop, bool] = {}
    right = checkout_answer("right")

    async def checkout(sessions: Any, payments: Any, sku: str) -> str:
        loop = asyncio.get_running_loop()
        if sku == sku_stalled and stalled.setdefault(loop, len(stalled) < sales):
            async with sessions.begin() as session:
                await session.execute(select(Stock.available).where(Stock.sku == sku))
                await asyncio.sleep(0.3)
        return await right(sessions, payments, sku)

    return checkout


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # the check's logic alone
def test_4_4_pool_timeouts_nothing_explains_are_run_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sale whose only fault is pool timeouts, with no charge, second connection, leftover session
    or lock to blame, runs again: a stall passes on the next run, a fault that stays is the verdict."""
    runs = _counting_sales(monkeypatch)
    check_checkout(_stalled_at_first(1), *SHOP)
    assert capsys.readouterr().out.endswith("Exercise 4.4: passed ✅ (8 of 8 checks)\n")
    assert runs.count("ch04x-mug") == 2, runs
    runs.clear()
    out = rejected(capsys, check_checkout, _stalled_at_first(ch04._STALLED_RUNS), *SHOP)
    assert runs.count("ch04x-mug") == ch04._STALLED_RUNS, runs
    assert CONCURRENT_STEP in out and "each held one outside the charge" in out, out
    assert f"pool timeouts alone in each of the {ch04._STALLED_RUNS - 1} runs just before this one" in out
    assert out.endswith("7 of 8 checks pass"), out


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # the check's logic alone
def test_4_4_a_scarce_sale_that_stalled_is_run_again(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = _counting_sales(monkeypatch)
    check_checkout(_stalled_at_first(1, "ch04x-last"), *SHOP)
    assert capsys.readouterr().out.endswith("Exercise 4.4: passed ✅ (8 of 8 checks)\n")
    assert (runs.count("ch04x-mug"), runs.count("ch04x-last")) == (1, 2), runs


@pytest.mark.parametrize(
    ("runs", "said"),
    [
        (1, None),
        (2, "; pool timeouts alone in the run just before this one too"),
        (3, "; pool timeouts alone in each of the 2 runs just before this one too"),
    ],
)
@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # no database
def test_4_4_the_runs_before_are_counted_in_words(runs: int, said: str | None) -> None:
    timeout = sqlalchemy.exc.TimeoutError("QueuePool limit of size 2 overflow 0 reached")
    sale = ch04._Sale(results=[timeout, "paid"], runs=runs)
    seen = ch04._held_in_the_database(sale, [timeout], "expected", OutOfStock).seen
    if said is None:
        assert "just before" not in seen, seen
    else:
        assert seen.endswith(said), seen


def test_4_4_the_verdict_comes_from_the_run_whose_reads_met(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout, _serialised_at_first(1), *SHOP)
    assert SCARCE_STEP + OVERSOLD in out, out


@pytest.mark.parametrize(
    ("statement", "named"),
    [
        ("select ch04x_stock.available from ch04x_stock where ch04x_stock.sku = $1", True),
        ('select "ch04x_stock".available from public."ch04x_stock" for update', True),
        ("update ch04x_stock set available=(ch04x_stock.available - ?)", True),
        ("select count(*) from ch04x_stock_log", False),
        ("select * from old_ch04x_stock", False),
    ],
)
@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # no database: one run is enough
def test_4_4_the_stock_table_is_told_from_tables_whose_names_contain_it(statement: str, named: bool) -> None:
    assert ch04._names_table(statement, "ch04x_stock") is named
