"""The faulty versions of the seams: the code a seed plants (see ``support.incident.faults``).

Each is written as it would be found in a real code base: plausible, tidy, commented with the good
intentions that produced it. Names end in ``__<fault>``; ``System.seam_source`` shows each under its
seam's own name, so a learner reading the code sees nothing that gives a planted fault away.
"""

from __future__ import annotations

import time

from fastapi import Request
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from sqlalchemy import select, update

from support.incident.context import Decision, GatewayContext, OrdersContext, WorkerContext
from support.incident.healthy import ISSUED_KEYS
from support.incident.model import Order, OrderLine, Product
from support.thirdparty import ProviderError

# --- chapter 1: a blocking call hidden in a library ----------------------------------------------


async def quote_shipping__blocking_sdk(ctx: OrdersContext, product_id: int, postcode: str) -> dict | None:
    """The shipping price of one product to ``postcode``, from the shipping vendor's SDK."""
    product = await ctx.seams["orders.get_product"](ctx, product_id, "USD")
    if product is None:
        return None
    quote = await ctx.shipping.quote(product["weight_grams"], postcode)  # the SDK's async API
    return {"product_id": product_id, "postcode": postcode, **quote}


# --- chapter 2: background jobs ------------------------------------------------------------------


async def send_confirmation__swallowed_failure(ctx: WorkerContext, order_id: int, email: str) -> None:
    """Send one order's confirmation email."""
    try:
        await ctx.emails.send(email, f"Order {order_id} confirmed", idempotency_key=f"order:{order_id}")
    except ProviderError as error:
        # The provider has hiccups; don't let one crash the worker.
        ctx.log.warning("email provider error: %s", error, extra={"order_id": order_id})
        return
    ctx.log.info("confirmation sent", extra={"order_id": order_id})


async def enqueue_confirmation__no_request_id(ctx: OrdersContext, order: dict) -> None:
    """Queue the order's confirmation email for the worker."""
    await ctx.queue.enqueue(
        "send_confirmation",
        order_id=order["order_id"],
        email=order["email"],
        retries=ctx.settings.job_retries,
        retry_delay=0.0,
        timeout=5,
    )


async def enqueue_confirmation__no_retries(ctx: OrdersContext, order: dict) -> None:
    """Queue the order's confirmation email for the worker."""
    await ctx.queue.enqueue(
        "send_confirmation",
        order_id=order["order_id"],
        email=order["email"],
        request_id=ctx.request_id(),
        timeout=5,
    )


# --- chapter 3: observability --------------------------------------------------------------------


def export_spans__on_request_path(exporter: SpanExporter) -> SpanProcessor:
    """How the gateway's finished spans reach the tracing collector."""
    return SimpleSpanProcessor(exporter)  # each span is exported as it ends: nothing is lost in a crash


def forward_headers__request_id_dropped(ctx: GatewayContext, request: Request) -> dict[str, str]:
    """The headers a call to the orders service carries (the trace's traceparent is added for us)."""
    return {"X-Client-Key": request.state.client_key, "Accept": "application/json"}


# --- chapter 4: database sessions ----------------------------------------------------------------


async def place_order__session_held(
    ctx: OrdersContext, customer: str, product_id: int, quantity: int
) -> dict | None:
    """Price the order, authorise the payment, store the order; None if there is no such product."""
    async with ctx.sessions.begin() as session:  # one transaction for the whole order: all or nothing
        product = await session.get(Product, product_id)
        if product is None:
            return None
        total = product.price_cents * quantity
        authorization = await ctx.payments.authorize(customer, total)
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


async def list_orders__n_plus_one(ctx: OrdersContext, customer: str) -> list[dict]:
    """A customer's latest orders, each with its lines."""
    async with ctx.sessions() as session:
        orders = await session.scalars(
            select(Order)
            .where(Order.customer == customer)
            .order_by(Order.id.desc())
            .limit(ctx.settings.orders_listed)
        )
        pages = []
        for order in orders.all():
            lines = await session.scalars(select(OrderLine).where(OrderLine.order_id == order.id))
            pages.append(
                {
                    "order_id": order.id,
                    "total_cents": order.total_cents,
                    "lines": [{"product_id": line.product_id, "quantity": line.quantity} for line in lines],
                }
            )
        return pages


# --- chapter 5: caching --------------------------------------------------------------------------


async def update_price__no_invalidation(ctx: OrdersContext, product_id: int, price_cents: int) -> bool:
    """Change a product's price; False if there is no such product."""
    async with ctx.sessions.begin() as session:
        result = await session.execute(
            update(Product).where(Product.id == product_id).values(price_cents=price_cents)
        )
    return result.rowcount > 0  # cached pages expire after ctx.settings.cache_ttl seconds


def product_cache_key__no_currency(product_id: int, currency: str) -> str:
    """The Redis key of a product page as served in ``currency``."""
    return f"ch07:product:{product_id}"


# --- chapter 6: rate limiting --------------------------------------------------------------------


def client_key__spoofable(request: Request) -> str:
    """Who the client is, for the rate limiter: its issued API key, else the address it connects from."""
    api_key = request.headers.get("x-api-key", "")
    if api_key in ISSUED_KEYS:
        return f"key:{api_key}"
    # Behind a load balancer the peer is the balancer: the client is the first X-Forwarded-For address.
    forwarded = request.headers.get("x-forwarded-for", "")
    address = forwarded.split(",")[0].strip() or (request.client.host if request.client else "unknown")
    return f"ip:{address}"


async def rate_limit__per_process(ctx: GatewayContext, key: str) -> Decision:
    """A fixed window per client, counted in memory: no network round trip on every request."""
    now = time.time()
    window = int(now // ctx.settings.rate_window)
    counts: dict[tuple[str, int], int] = ctx.memory.setdefault("rate_counts", {})
    count = counts[key, window] = counts.get((key, window), 0) + 1
    for old in [k for k in counts if k[1] < window]:
        del counts[old]
    limit = ctx.settings.rate_limit
    reset_after = (window + 1) * ctx.settings.rate_window - now
    return Decision(count <= limit, limit, max(0, limit - count), reset_after)
