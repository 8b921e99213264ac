"""support.telemetry: one tracer provider per service, spans in memory, shut down like servers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI, Request
from opentelemetry import trace as trace_api
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
    assert self_time(lookup, trace) >= 0.025  # a leaf: all its time is its own (it slept 30 ms)
    server_seconds = (server.end_time - server.start_time) / 1e9
    # the lookup's time is its descendant's, not the server span's own
    assert self_time(server, trace) <= server_seconds - self_time(lookup, trace)
    assert lookup in [s for s in trace if s.parent] and children(lookup, trace) == []

    gateway_tracing.clear()
    assert gateway_tracing.spans() == []


def test_self_time_merges_overlapping_children() -> None:
    tracing = support.tracing("svc", name="t-overlap")
    ms = 1_000_000  # nanoseconds: the spans get explicit times, so the arithmetic is exact
    t0 = time.time_ns()
    parent = tracing.tracer.start_span("parent", start_time=t0)
    inside = trace_api.set_span_in_context(parent)
    first = tracing.tracer.start_span("a", context=inside, start_time=t0 + 10 * ms)
    second = tracing.tracer.start_span("b", context=inside, start_time=t0 + 20 * ms)  # overlaps a
    nested = tracing.tracer.start_span("c", context=inside, start_time=t0 + 30 * ms)  # inside a and b
    nested.end(end_time=t0 + 40 * ms)
    first.end(end_time=t0 + 60 * ms)
    second.end(end_time=t0 + 70 * ms)
    late = tracing.tracer.start_span("d", context=inside, start_time=t0 + 80 * ms)
    late.end(end_time=t0 + 90 * ms)
    parent.end(end_time=t0 + 100 * ms)
    spans = tracing.spans()
    parent_span = next(s for s in spans if s.name == "parent")
    assert parent_span.context.span_id == parent.get_span_context().span_id
    assert len(children(parent_span, spans)) == 4
    # covered: 10–70 ms (a, b and c merged) and 80–90 ms (d); the parent's own: 100 - 70 = 30 ms
    assert self_time(parent_span, spans) == pytest.approx(0.030, abs=1e-9)
    leaf = next(s for s in spans if s.name == "c")
    assert self_time(leaf, spans) == pytest.approx(0.010, abs=1e-9)


def test_stop_all_shuts_batch_processors_down_and_rerun_replaces() -> None:
    before = threading.active_count()
    first = support.tracing("svc", name="t-rerun")
    second = support.tracing("svc", name="t-rerun")  # the same cell, run again
    assert first.stopped and not second.stopped
    assert support.running_tracing() == [second]
    assert support.stop_all() == 1
    assert second.stopped and support.running_tracing() == []
    deadline = time.monotonic() + 10  # generous: the thread only has to notice the shutdown
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() <= before


def test_simple_processor_exports_inside_span_end_batch_does_not() -> None:
    here = threading.current_thread().name
    simple_exporter = SlowExporter(0.05)
    slow = support.tracing("svc", processor="simple", exporter=simple_exporter, name="t-simple")
    start = time.perf_counter()
    with slow.tracer.start_as_current_span("work"):
        pass
    assert time.perf_counter() - start >= 0.045  # span.end() waited for the export
    assert simple_exporter.calls == 1 and simple_exporter.threads == {here: 1}  # on the caller's thread

    exporter = SlowExporter(0.05)
    batched = support.tracing("svc", processor="batch", exporter=exporter, name="t-batch")
    for _ in range(20):
        with batched.tracer.start_as_current_span("work"):
            pass
    # The worker thread exports on its own schedule (200 ms here); wait for it, without flushing,
    # since a flush exports on the thread that asks for it.
    deadline = time.monotonic() + 10
    while exporter.calls == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert exporter.calls >= 1 and here not in exporter.threads  # none of it on the caller's thread
    assert set(exporter.threads) == {"OtelBatchSpanRecordProcessor"}
    assert len(batched.spans()) == 20 and exporter.calls < 20  # batched: fewer calls than spans


def test_sampler_is_applied() -> None:
    tracing = support.tracing("svc", sampler=ALWAYS_OFF, name="t-sampler")
    with tracing.tracer.start_as_current_span("dropped"):
        pass
    assert tracing.spans() == []
