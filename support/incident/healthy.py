"""The system's seams as they should be written: the versions every planted fault replaces.

Each function is one seam (its name after the service's: ``gateway.client_key`` is ``client_key``
here). ``System.seam_source(name)`` shows the version a system is running, healthy or not.
"""

from __future__ import annotations

import json
import time

import anyio.to_thread
from fastapi import Request
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from sqlalchemy import select, update
from sqlalchemy.orm import selectinload

from support.incident.context import Decision, GatewayContext, OrdersContext, WorkerContext
from support.incident.model import CURRENCIES, Order, OrderLine, Product, in_currency

ISSUED_KEYS = frozenset(
    [f"shopper-{n}" for n in range(1, 9)]
    + [f"checkout-{n}" for n in range(1, 5)]
    + [f"partner-{n}" for n in range(1, 5)]
    + ["account", "pricing", "shipping", "heavy"]
)  # the API keys the shop has issued (in production: a lookup)


# --- gateway -------------------------------------------------------------------------------------


def client_key(request: Request) -> str:
    """Who the client is, for the rate limiter: its issued API key, else the address it connects from."""
    api_key = request.headers.get("x-api-key", "")
    if api_key in ISSUED_KEYS:
        return f"key:{api_key}"
    return f"ip:{request.client.host if request.client else 'unknown'}"


async def rate_limit(ctx: GatewayContext, key: str) -> Decision:
    """A fixed window per client, counted in Redis: every gateway instance shares the count."""
    now = time.time()
    window = int(now // ctx.settings.rate_window)
    counter = f"ch07:ratelimit:{key}:{window}"
    async with ctx.redis.pipeline(transaction=True) as pipe:
        count, _ = await pipe.incr(counter).expire(counter, ctx.settings.rate_window + 1).execute()
    limit = ctx.settings.rate_limit
    reset_after = (window + 1) * ctx.settings.rate_window - now
    return Decision(count <= limit, limit, max(0, limit - count), reset_after)


def forward_headers(ctx: GatewayContext, request: Request) -> dict[str, str]:
    """The headers a call to the orders service carries (the trace's traceparent is added for us)."""
    return {"X-Request-ID": ctx.request_id(), "X-Client-Key": request.state.client_key}


def export_spans(exporter: SpanExporter) -> SpanProcessor:
    """How the gateway's finished spans reach the tracing collector."""
    return BatchSpanProcessor(exporter, schedule_delay_millis=200)


# --- orders --------------------------------------------------------------------------------------


def product_cache_key(product_id: int, currency: str) -> str:
    """The Redis key of a product page as served in ``currency``."""
    return f"ch07:product:{product_id}:{currency}"


async def get_product(ctx: OrdersContext, product_id: int, currency: str) -> dict | None:
    """A product page, cache-aside: from Redis if there, else from the database (then cached)."""
    key = ctx.seams["orders.product_cache_key"](product_id, currency)
    cached = await ctx.redis.get(key)
    if cached is not None:
        return json.loads(cached)
    async with ctx.sessions() as session:
        product = await session.get(Product, product_id)
    if product is None:
        return None
    page = {
        "id": product.id,
        "name": product.name,
        "price_cents": product.price_cents,
        "currency": currency,
        "price": in_currency(product.price_cents, currency),
        "weight_grams": product.weight_grams,
    }
    await ctx.redis.set(key, json.dumps(page), ex=ctx.settings.cache_ttl)
    return page


async def update_price(ctx: OrdersContext, product_id: int, price_cents: int) -> bool:
    """Change a product's price; False if there is no such product."""
    async with ctx.sessions.begin() as session:
        result = await session.execute(
            update(Product).where(Product.id == product_id).values(price_cents=price_cents)
        )
    if result.rowcount == 0:
        return False
    keys = {ctx.seams["orders.product_cache_key"](product_id, currency) for currency in CURRENCIES}
    await ctx.redis.delete(*keys)  # after the commit: a read from now on finds the new price
    return True


async def place_order(ctx: OrdersContext, customer: str, product_id: int, quantity: int) -> dict | None:
    """Price the order, authorise the payment, store the order; None if there is no such product."""
    async with ctx.sessions() as session:
        product = await session.get(Product, product_id)
    if product is None:
        return None
    total = product.price_cents * quantity
    authorization = await ctx.payments.authorize(customer, total)
    async with ctx.sessions.begin() as session:
        line = OrderLine(product_id=product_id, quantity=quantity, price_cents=product.price_cents)
        order = Order(customer=customer, email=f"{customer}@example.com", total_cents=total, lines=[line])
        session.add(order)
    return {
        "order_id": order.id,
        "customer": customer,
        "email": order.email,
        "total_cents": total,
        "authorization": authorization,
    }


async def list_orders(ctx: OrdersContext, customer: str) -> list[dict]:
    """A customer's latest orders, each with its lines."""
    async with ctx.sessions() as session:
        orders = await session.scalars(
            select(Order)
            .where(Order.customer == customer)
            .options(selectinload(Order.lines))
            .order_by(Order.id.desc())
            .limit(ctx.settings.orders_listed)
        )
        return [
            {
                "order_id": order.id,
                "total_cents": order.total_cents,
                "lines": [{"product_id": line.product_id, "quantity": line.quantity} for line in order.lines],
            }
            for order in orders
        ]


async def quote_shipping(ctx: OrdersContext, product_id: int, postcode: str) -> dict | None:
    """The shipping price of one product to ``postcode``, from the shipping vendor's SDK."""
    product = await ctx.seams["orders.get_product"](ctx, product_id, "USD")
    if product is None:
        return None
    # The SDK's quote() is async def but reads its rate tables synchronously: run the SDK in a thread.
    quote = await anyio.to_thread.run_sync(ctx.shipping.quote_blocking, product["weight_grams"], postcode)
    return {"product_id": product_id, "postcode": postcode, **quote}


async def enqueue_confirmation(ctx: OrdersContext, order: dict) -> None:
    """Queue the order's confirmation email for the worker."""
    await ctx.queue.enqueue(
        "send_confirmation",
        order_id=order["order_id"],
        email=order["email"],
        request_id=ctx.request_id(),
        retries=ctx.settings.job_retries,
        retry_delay=0.0,
        timeout=5,
    )


# --- worker --------------------------------------------------------------------------------------


async def send_confirmation(ctx: WorkerContext, order_id: int, email: str) -> None:
    """Send one order's confirmation email (the job's retries cover the provider's failures)."""
    await ctx.emails.send(email, f"Order {order_id} confirmed", idempotency_key=f"order:{order_id}")
    ctx.log.info("confirmation sent", extra={"order_id": order_id})
