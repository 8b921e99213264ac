"""OpenTelemetry plumbing for the notebooks: one tracer provider per service, spans kept in memory.

A chapter runs two services in one kernel, so each gets its own ``TracerProvider`` (named by its
``service.name``) and passes it explicitly (``FastAPI(telemetry={"tracer_provider": ...})``,
``HTTPXClientInstrumentor.instrument_client(client, tracer_provider=...)``). Nothing here touches the
global provider: a second ``trace.set_tracer_provider`` only warns and keeps the first, which would
make re-running a notebook silently keep stale exporters.

A ``BatchSpanProcessor`` runs a thread, so providers are registered like servers: re-running the cell
that made one shuts the old one down, and ``support.stop_all()`` shuts them all down.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Literal

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Sampler
from opentelemetry.trace import Tracer

from support.registry import Registry, caller_key

__all__ = [
    "SlowExporter",
    "Tracing",
    "by_trace",
    "children",
    "running_tracing",
    "self_time",
    "stop_tracing",
    "trace_id",
    "tracing",
]

_providers: Registry[Tracing] = Registry()


class SlowExporter(SpanExporter):
    """An exporter that takes ``delay`` seconds per export call, like a network call to a collector.

    It keeps the spans it was given (``.spans``), counts ``.calls``, and counts the calls made on each
    thread, by the thread's name (``.threads``), so a notebook can see how many spans arrived, in how
    many batches, and which thread waited for the "network": a ``SimpleSpanProcessor`` calls it on the
    thread that ended the span, a ``BatchSpanProcessor`` on its own worker thread (and ``force_flush``
    on the thread that asks for the flush).
    """

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self.spans: list[ReadableSpan] = []
        self.threads: Counter[str] = Counter()
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        time.sleep(self.delay)
        with self._lock:
            self.calls += 1
            self.spans.extend(spans)
            self.threads[threading.current_thread().name] += 1
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class Tracing:
    """One service's tracer provider and the exporter its spans go to.

    ``.provider`` is what you pass to FastAPI and to the httpx instrumentation, ``.tracer`` makes
    custom spans, ``.spans()`` returns the finished spans (flushing a batch processor first).
    """

    def __init__(
        self,
        service: str,
        key: str,
        *,
        processor: Literal["batch", "simple"],
        exporter: SpanExporter | None,
        sampler: Sampler | None,
    ) -> None:
        self.service = service
        self.key = key
        self.exporter: SpanExporter = exporter if exporter is not None else InMemorySpanExporter()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service}),
            sampler=sampler,
            shutdown_on_exit=False,
        )
        if processor == "batch":
            self.provider.add_span_processor(BatchSpanProcessor(self.exporter, schedule_delay_millis=200))
        elif processor == "simple":
            self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        else:
            raise ValueError(f"processor must be 'batch' or 'simple', got {processor!r}")
        self.tracer: Tracer = self.provider.get_tracer(service)
        self.stopped = False

    def spans(self) -> list[ReadableSpan]:
        """The spans finished so far, oldest first.

        A batch processor is flushed first: what it still holds is exported on the calling thread.
        """
        self.provider.force_flush()
        if isinstance(self.exporter, InMemorySpanExporter):
            found = list(self.exporter.get_finished_spans())
        else:
            found = list(getattr(self.exporter, "spans", []))
        return sorted(found, key=lambda s: s.start_time or 0)

    def clear(self) -> None:
        """Forget the spans collected so far."""
        self.provider.force_flush()
        if isinstance(self.exporter, InMemorySpanExporter):
            self.exporter.clear()
        elif isinstance(self.exporter, SlowExporter):
            with self.exporter._lock:
                self.exporter.spans.clear()

    def stop(self) -> None:
        """Flush and shut the provider down (stops a batch processor's thread)."""
        if self.stopped:
            return
        self.stopped = True
        _providers.discard(self.key, self)
        self.provider.shutdown()

    def __repr__(self) -> str:
        state = "stopped" if self.stopped else "running"
        return f"<Tracing {self.service!r} {state}>"


def tracing(
    service: str,
    *,
    processor: Literal["batch", "simple"] = "batch",
    exporter: SpanExporter | None = None,
    sampler: Sampler | None = None,
    name: str | None = None,
) -> Tracing:
    """A tracer provider for ``service`` whose spans are kept in memory (or go to ``exporter``).

    ``processor`` chooses how finished spans reach the exporter: ``"batch"`` (a background thread, as
    in production) or ``"simple"`` (synchronously, inside ``span.end()``, on the request's path).
    ``sampler`` is an OpenTelemetry sampler, e.g. ``ParentBased(TraceIdRatioBased(0.1))``.
    Re-running the cell that called this shuts the previous provider for the same service down.
    """
    key = f"{name or caller_key()}:{service}"
    _providers.stop_old(key)
    handle = Tracing(service, key, processor=processor, exporter=exporter, sampler=sampler)
    _providers.add(key, handle)
    return handle


def running_tracing() -> list[Tracing]:
    """The providers made by ``tracing()`` that have not been shut down."""
    return _providers.handles()


def stop_tracing() -> int:
    """Shut down every provider made by ``tracing()``; returns how many."""
    return _providers.stop_all()


def trace_id(span: ReadableSpan) -> str:
    """A span's trace ID as the 32 hex digits that logs and ``traceparent`` headers show."""
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def by_trace(spans: Iterable[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    """Spans grouped by trace ID, each trace's spans in start order."""
    traces: dict[str, list[ReadableSpan]] = defaultdict(list)
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        traces[trace_id(span)].append(span)
    return dict(traces)


def children(span: ReadableSpan, spans: Iterable[ReadableSpan]) -> list[ReadableSpan]:
    """The spans whose parent is ``span``."""
    assert span.context is not None
    me = span.context.span_id
    return [s for s in spans if s.parent is not None and s.parent.span_id == me]


def self_time(span: ReadableSpan, spans: Iterable[ReadableSpan]) -> float:
    """Seconds of ``span`` not covered by its children: the time spent in the span's own code.

    Overlapping children (concurrent calls) are merged, so time is never subtracted twice.
    """
    assert span.start_time is not None and span.end_time is not None
    intervals = sorted(
        (max(c.start_time or 0, span.start_time), min(c.end_time or 0, span.end_time))
        for c in children(span, spans)
    )
    covered, cursor = 0, span.start_time
    for start, end in intervals:
        start = max(start, cursor)
        if end > start:
            covered += end - start
            cursor = end
    return (span.end_time - span.start_time - covered) / 1e9
