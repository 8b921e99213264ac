"""The gateway: the system's public face. Two instances of it run, each on its own URL.

Every public route is rate limited per client (the seams ``gateway.client_key`` and
``gateway.rate_limit``), carries a request ID (``X-Request-ID``, chapter 3's middleware), is traced
(FastAPI's built-in OpenTelemetry support; the httpx client to the orders service is instrumented, so
each call carries ``traceparent``), and is forwarded to the orders service with the headers of the seam
``gateway.forward_headers``. Every wait is bounded: the call to the orders service times out after
``settings.upstream_timeout`` seconds (the gateway answers 504).
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

from support.backends import redis_client
from support.incident.context import GatewayContext, Settings
from support.incident.instruments import Heartbeat, RequestIDMiddleware
from support.telemetry import Tracing

__all__ = ["build_gateway"]


def build_gateway(
    instance: str,
    *,
    orders_url: str,
    seams: Mapping[str, Any],
    settings: Settings,
    tracing: Tracing,
    heartbeat: Heartbeat,
) -> FastAPI:
    """The gateway app called ``instance`` (``gateway-a`` or ``gateway-b``)."""
    log = logging.getLogger(f"ch07.{instance}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_client(decode_responses=True)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        async with httpx.AsyncClient(
            base_url=orders_url, timeout=settings.upstream_timeout, limits=limits
        ) as client:
            HTTPXClientInstrumentor.instrument_client(client, tracer_provider=tracing.provider)
            app.state.ctx = GatewayContext(instance, redis, client, settings, seams, log)
            heartbeat.start()
            try:
                yield
            finally:
                await heartbeat.stop()
                await redis.aclose()

    app = FastAPI(lifespan=lifespan, telemetry={"tracer_provider": tracing.provider})
    app.add_middleware(RequestIDMiddleware)

    async def rate_limited(request: Request, response: Response) -> None:
        ctx: GatewayContext = request.app.state.ctx
        key = seams["gateway.client_key"](request)
        request.state.client_key = key
        decision = await seams["gateway.rate_limit"](ctx, key)
        response.headers["RateLimit"] = (
            f'"default";r={decision.remaining};t={math.ceil(decision.reset_after)}'
        )
        if not decision.allowed:
            log.info("refused: over the rate limit", extra={"client": key})
            retry_after = str(max(1, math.ceil(decision.reset_after)))
            raise HTTPException(429, "rate limit exceeded", headers={"Retry-After": retry_after})

    async def forward(
        request: Request, method: str, path: str, params: dict[str, Any] | None = None
    ) -> Response:
        ctx: GatewayContext = request.app.state.ctx
        headers = seams["gateway.forward_headers"](ctx, request)
        try:
            upstream = await ctx.orders.request(method, path, params=params, headers=headers)
        except httpx.TimeoutException:
            log.warning("orders service timed out", extra={"client": request.state.client_key})
            return JSONResponse({"detail": "the orders service did not answer in time"}, status_code=504)
        except httpx.HTTPError as error:
            log.warning("orders service unreachable: %s", error, extra={"client": request.state.client_key})
            return JSONResponse({"detail": "the orders service is unreachable"}, status_code=502)
        log.info("%s %s → %d", method, path, upstream.status_code, extra={"client": request.state.client_key})
        return Response(upstream.content, status_code=upstream.status_code, media_type="application/json")

    limited = [Depends(rate_limited)]

    @app.get("/products/{product_id}", dependencies=limited)
    async def product(request: Request, product_id: int, currency: str = "USD") -> Response:
        return await forward(request, "GET", f"/products/{product_id}", {"currency": currency})

    @app.put("/products/{product_id}/price", dependencies=limited)
    async def change_price(request: Request, product_id: int, price_cents: int) -> Response:
        return await forward(request, "PUT", f"/products/{product_id}/price", {"price_cents": price_cents})

    @app.post("/orders", dependencies=limited)
    async def place_order(request: Request, customer: str, product_id: int, quantity: int = 1) -> Response:
        params = {"customer": customer, "product_id": product_id, "quantity": quantity}
        return await forward(request, "POST", "/orders", params)

    @app.get("/orders", dependencies=limited)
    async def list_orders(request: Request, customer: str) -> Response:
        return await forward(request, "GET", "/orders", {"customer": customer})

    @app.get("/quote/{product_id}", dependencies=limited)
    async def quote(request: Request, product_id: int, postcode: str) -> Response:
        return await forward(request, "GET", f"/quote/{product_id}", {"postcode": postcode})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok", "instance": instance}

    return app
