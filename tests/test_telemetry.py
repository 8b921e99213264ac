"""support.telemetry: one tracer provider per service, spans in memory, shut down like servers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

import support
from support.telemetry import SlowExporter, by_trace, children, self_time, trace_id


def test_spans_of_two_services_join_into_one_trace() -> None:
    inventory_tracing = support.tracing("inventory", name="t-inv")
    gateway_tracing = support.tracing("gateway", name="t-gw")
    inventory = FastAPI(telemetry={"tracer_provider": inventory_tracing.provider})

    @inventory.get("/stock/{sku}")
    async def stock(sku: str) -> dict[str, str]:
        with inventory_tracing.tracer.start_as_current_span("warehouse.lookup"):
            await asyncio.sleep(0.03)
        return {"sku": sku}

    inventory_server = support.serve(inventory, name="t-inventory")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with httpx.AsyncClient(base_url=inventory_server.url) as client:
            HTTPXClientInstrumentor.instrument_client(client, tracer_provider=gateway_tracing.provider)
            app.state.client = client
            yield

    gateway = FastAPI(lifespan=lifespan, telemetry={"tracer_provider": gateway_tracing.provider})

    @gateway.get("/orders/{sku}")
    async def order(sku: str, request: Request) -> dict[str, int]:
        response = await request.app.state.client.get(f"/stock/{sku}")
        return {"status": response.status_code}

    gateway_server = support.serve(gateway, name="t-gateway")
    assert httpx.get(f"{gateway_server.url}/orders/a1").json() == {"status": 200}

    spans = gateway_tracing.spans() + inventory_tracing.spans()
    traces = by_trace(spans)
    assert len(traces) == 1
    ((tid, trace),) = traces.items()
    assert len(tid) == 32 and all(trace_id(s) == tid for s in trace)
    client = next(s for s in trace if s.kind == SpanKind.CLIENT)
    server = next(s for s in trace if s.kind == SpanKind.SERVER and s.name == "GET /stock/{sku}")
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    lookup = next(s for s in trace if s.name == "warehouse.lookup")
    assert {s.resource.attributes["service.name"] for s in trace} == {"gateway", "inventory"}
    assert self_time(lookup, trace) >= 0.025  # a leaf: all its time is its own
    assert self_time(server, trace) < 0.025  # the lookup's time is its child's, not its own
    assert lookup in [s for s in trace if s.parent] and children(lookup, trace) == []

    gateway_tracing.clear()
    assert gateway_tracing.spans() == []


def test_self_time_merges_overlapping_children() -> None:
    tracing = support.tracing("svc", name="t-overlap")
    with tracing.tracer.start_as_current_span("parent") as parent:
        parent_context = parent.get_span_context()
        first = tracing.tracer.start_span("a")
        second = tracing.tracer.start_span("b")
        time.sleep(0.05)
        first.end()
        second.end()
        time.sleep(0.02)
    spans = tracing.spans()
    parent_span = next(s for s in spans if s.name == "parent")
    assert parent_span.context.span_id == parent_context.span_id
    assert len(children(parent_span, spans)) == 2
    own = self_time(parent_span, spans)
    assert 0.015 <= own < 0.045, own  # ~20 ms: the two 50 ms children overlap, counted once


def test_stop_all_shuts_batch_processors_down_and_rerun_replaces() -> None:
    before = threading.active_count()
    first = support.tracing("svc", name="t-rerun")
    second = support.tracing("svc", name="t-rerun")  # the same cell, run again
    assert first.stopped and not second.stopped
    assert support.running_tracing() == [second]
    assert support.stop_all() == 1
    assert second.stopped and support.running_tracing() == []
    deadline = time.monotonic() + 2
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_simple_processor_exports_inside_span_end_batch_does_not() -> None:
    slow = support.tracing("svc", processor="simple", exporter=SlowExporter(0.05), name="t-simple")
    start = time.perf_counter()
    with slow.tracer.start_as_current_span("work"):
        pass
    assert time.perf_counter() - start >= 0.045  # the export ran on the caller's thread

    exporter = SlowExporter(0.05)
    batched = support.tracing("svc", processor="batch", exporter=exporter, name="t-batch")
    start = time.perf_counter()
    for _ in range(20):
        with batched.tracer.start_as_current_span("work"):
            pass
    assert time.perf_counter() - start < 0.045
    assert len(batched.spans()) == 20 and exporter.calls <= 2  # one batch (two at most)


def test_sampler_is_applied() -> None:
    tracing = support.tracing("svc", sampler=ALWAYS_OFF, name="t-sampler")
    with tracing.tracer.start_as_current_span("dropped"):
        pass
    assert tracing.spans() == []
