"""The orders service: products (cached in Redis), prices, orders, shipping quotes.

It owns the database (SQLAlchemy's async engine, a small pool: ``settings.pool_size`` connections, no
overflow, ``settings.pool_timeout`` seconds of waiting before it answers 503), the product cache
(Redis, cache-aside) and the producer side of the confirmation queue (SAQ). Each route calls its seam
inside a span named after the seam, so a trace says which seam a slow request spent its time in;
under it, a span per Redis command and per SQL statement.

At start-up it creates the chapter's tables and deletes what an earlier run left in Redis
(``ch07:*`` and SAQ's ``saq:*ch07*`` keys); at shutdown it deletes them again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from support.backends import delete_keys, redis_client
from support.database import PoolWatch
from support.incident.context import OrdersContext, Settings
from support.incident.instruments import (
    CacheCounters,
    Heartbeat,
    QueueCounters,
    RequestIDMiddleware,
    add_query_spans,
    count_cache,
)
from support.incident.model import CURRENCIES, create_tables
from support.incident.vendor import PaymentsClient, ShippingClient
from support.queues import job_queue
from support.telemetry import Tracing

__all__ = ["QUEUE", "REDIS_PATTERNS", "build_orders", "clear_redis"]

QUEUE = "ch07-confirmations"
REDIS_PATTERNS = ("ch07:*", "saq:*ch07*")


async def clear_redis() -> int:
    """Delete every key the chapter made (its own ``ch07:*`` and SAQ's for the chapter's queue)."""
    client = redis_client()
    try:
        return sum([await delete_keys(client, pattern) for pattern in REDIS_PATTERNS])
    finally:
        await client.aclose()


class CountingQueue:
    """The SAQ queue, counting what is enqueued (``QueueCounters.enqueued``)."""

    def __init__(self, queue: Any, counters: QueueCounters) -> None:
        self._queue = queue
        self._counters = counters

    async def enqueue(self, *args: Any, **kwargs: Any) -> Any:
        job = await self._queue.enqueue(*args, **kwargs)
        self._counters.add(enqueued=1)
        return job

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)


def _sqlite_pragmas(engine: Any) -> None:
    """WAL and synchronous=NORMAL: commits without an fsync each, readers beside a writer (SQLite only)."""
    if engine.sync_engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()


def build_orders(
    *,
    database_url: str,
    seams: Mapping[str, Any],
    settings: Settings,
    tracing: Tracing,
    heartbeat: Heartbeat,
    cache: CacheCounters,
    jobs: QueueCounters,
    shipping: ShippingClient,
    payments: PaymentsClient,
) -> FastAPI:
    """The orders app; its lifespan puts ``app.state.ctx`` (an ``OrdersContext``) and ``app.state.pool``."""
    log = logging.getLogger("ch07.orders")
    tracer = tracing.tracer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await clear_redis()
        engine = create_async_engine(
            database_url, pool_size=settings.pool_size, max_overflow=0, pool_timeout=settings.pool_timeout
        )
        _sqlite_pragmas(engine)
        await create_tables(engine)
        # The set-up's connections go: the pool starts empty, and PoolWatch counts from zero.
        await engine.dispose()
        app.state.pool = PoolWatch(engine)
        add_query_spans(engine, tracer)
        redis = redis_client(decode_responses=True)
        count_cache(redis, cache, tracer)
        queue = job_queue(QUEUE)
        await queue.connect()
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        app.state.ctx = OrdersContext(
            sessions, redis, CountingQueue(queue, jobs), shipping, payments, settings, seams, log, cache
        )
        heartbeat.start()
        try:
            yield
        finally:
            await heartbeat.stop()
            await queue.disconnect()
            await redis.aclose()
            await engine.dispose()
            await clear_redis()

    app = FastAPI(lifespan=lifespan, telemetry={"tracer_provider": tracing.provider})
    app.add_middleware(RequestIDMiddleware)

    @app.exception_handler(sa_exc.TimeoutError)
    async def pool_exhausted(request: Request, exc: sa_exc.TimeoutError) -> JSONResponse:
        log.warning("no database connection within %.1f s", settings.pool_timeout)
        return JSONResponse({"detail": "the database is busy"}, status_code=503, headers={"Retry-After": "1"})

    async def call(name: str, *args: Any) -> Any:
        with tracer.start_as_current_span(name):
            return await seams[name](*args)

    def found(value: Any, what: str) -> Any:
        if value is None:
            raise HTTPException(404, f"no such {what}")
        return value

    @app.get("/products/{product_id}")
    async def product(request: Request, product_id: int, currency: str = Query("USD")) -> dict:
        if currency not in CURRENCIES:
            raise HTTPException(422, f"currency must be one of {', '.join(CURRENCIES)}")
        page = found(await call("orders.get_product", request.app.state.ctx, product_id, currency), "product")
        log.info("product page served", extra={"product_id": product_id})
        return page

    @app.put("/products/{product_id}/price")
    async def change_price(request: Request, product_id: int, price_cents: int = Query(gt=0)) -> dict:
        found(
            await call("orders.update_price", request.app.state.ctx, product_id, price_cents) or None,
            "product",
        )
        log.info("price changed to %d", price_cents, extra={"product_id": product_id})
        return {"product_id": product_id, "price_cents": price_cents}

    @app.post("/orders", status_code=201)
    async def place_order(
        request: Request, customer: str, product_id: int, quantity: int = Query(1, ge=1)
    ) -> dict:
        ctx = request.app.state.ctx
        order = found(await call("orders.place_order", ctx, customer, product_id, quantity), "product")
        log.info("order placed", extra={"order_id": order["order_id"]})
        await call("orders.enqueue_confirmation", ctx, order)
        return order

    @app.get("/orders")
    async def list_orders(request: Request, customer: str) -> dict:
        orders = await call("orders.list_orders", request.app.state.ctx, customer)
        log.info("%d orders listed", len(orders))
        return {"customer": customer, "orders": orders}

    @app.get("/quote/{product_id}")
    async def quote(request: Request, product_id: int, postcode: str) -> dict:
        answer = found(
            await call("orders.quote_shipping", request.app.state.ctx, product_id, postcode), "product"
        )
        log.info("shipping quoted", extra={"product_id": product_id})
        return answer

    return app
