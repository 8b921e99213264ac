"""Small readers of the instruments, for the drill: the slow tail of a route, a trace's culprit, the
statements a request sent, the loops' lag over time, what Redis holds.

They only read what ``run_scenario`` and ``System`` recorded; none of them knows which faults a
system has.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan

from support.backends import redis_client
from support.incident.report import Report
from support.incident.scenario import ROUTES, ScenarioRun
from support.telemetry import by_trace, self_time

__all__ = [
    "culprit",
    "culprits",
    "limiter_clients",
    "plot_before_after",
    "plot_loop_lag",
    "redis_keys",
    "route_of",
    "slow_tail",
    "statements",
    "trace_ms",
]

_ROOTS = {route.replace("{id}", "{product_id}"): route for route in ROUTES}


def _root(trace: Sequence[ReadableSpan]) -> ReadableSpan | None:
    return next((s for s in trace if s.parent is None), None)


def route_of(trace: Sequence[ReadableSpan]) -> str | None:
    """The route a trace served (``'GET /orders'``…), from its root span; None for other traces."""
    root = _root(trace)
    return _ROOTS.get(root.name) if root is not None else None


def trace_ms(trace: Sequence[ReadableSpan]) -> float:
    """How long the trace's root span took, in milliseconds."""
    root = _root(trace)
    if root is None or root.end_time is None or root.start_time is None:
        return 0.0
    return (root.end_time - root.start_time) / 1e6


def slow_tail(run: ScenarioRun, route: str, share: float = 0.1) -> list[list[ReadableSpan]]:
    """The slowest ``share`` of ``route``'s traces in ``run`` (at least one), slowest first."""
    if route not in ROUTES:
        raise KeyError(f"no route {route!r}; the routes are {', '.join(ROUTES)}")
    traces = [t for t in by_trace(run.system.spans()).values() if route_of(t) == route]
    traces.sort(key=trace_ms, reverse=True)
    return traces[: max(1, round(len(traces) * share))] if traces else []


def culprit(trace: Sequence[ReadableSpan]) -> str:
    """The name of the span with the most time of its own in ``trace`` (where the time went)."""
    return max(trace, key=lambda s: self_time(s, trace)).name


def culprits(traces: Iterable[Sequence[ReadableSpan]]) -> Counter[str]:
    """How often each span name is the culprit across ``traces``."""
    return Counter(culprit(t) for t in traces)


def limiter_clients(run: ScenarioRun) -> Counter[str]:
    """The client keys the rate limiter counted in Redis during ``run``, with how many windows each
    (from ``run.ratelimit_keys``, ``ch07:ratelimit:<client key>:<window>``)."""
    return Counter(key.removeprefix("ch07:ratelimit:").rsplit(":", 1)[0] for key in run.ratelimit_keys)


def statements(trace: Sequence[ReadableSpan]) -> int:
    """The SQL statements a trace sent (its ``db …`` spans)."""
    return sum(s.name.startswith("db ") for s in trace)


def plot_loop_lag(run: ScenarioRun, ax: Any = None) -> Any:
    """Each service's heartbeat lag (ms) over the run: a loop held by blocking work shows as spikes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3), constrained_layout=True)
    for service, samples in run.loop_lag.items():
        if samples:
            ax.plot([t for t, _ in samples], [lag * 1000 for _, lag in samples], ".", ms=3, label=service)
    ax.set_xlabel("seconds into the run")
    ax.set_ylabel("loop lag (ms)")
    ax.set_title("How late each event loop woke for its 10 ms heartbeat")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    return ax


def plot_before_after(before: Report, after: Report, labels: tuple[str, str] = ("before", "after")) -> Any:
    """Two reports' p99 per route side by side, each against its objective."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharex=True, constrained_layout=True)
    for ax, result, label in zip(axes, (before, after), labels, strict=True):
        result.plot(ax=ax, title=f"{label}: {len(result.failed())} of {len(list(result))} objectives failed")
        if ax is axes[0]:
            ax.get_legend().remove()
    axes[1].set_yticklabels([])
    return fig


async def redis_keys(pattern: str = "ch07:*") -> list[str]:
    """The Redis keys matching ``pattern``, sorted (the system's own keys start ``ch07:``)."""
    client = redis_client(decode_responses=True)
    try:
        return sorted([key async for key in client.scan_iter(match=pattern, count=500)])
    finally:
        await client.aclose()
