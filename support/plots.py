"""The chapters' plots, drawn from ``LoadResult`` runs: request timelines and latency CDFs.

The timeline (one horizontal bar per request, from its start to its end) is the course's signature
picture: requests that wait for one another form a staircase, requests that overlap form a block.
Several runs are drawn side by side on shared axes so broken and fixed compare at a glance.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from support.loadgen import LoadResult

__all__ = ["bar_chart", "compare", "plot_cdf", "plot_timeline", "plot_waterfall"]

_STATUS_COLOURS = {2: "tab:blue", 3: "tab:cyan", 4: "tab:orange", 5: "tab:red"}


def _colour(status: int) -> str:
    return _STATUS_COLOURS.get(status // 100, "black")


def _as_runs(results: LoadResult | Sequence[LoadResult] | Mapping[str, LoadResult]) -> dict[str, LoadResult]:
    if isinstance(results, LoadResult):
        return {results.label: results}
    if isinstance(results, Mapping):
        return dict(results)
    return {r.label: r for r in results}


def plot_timeline(result: LoadResult, ax: Axes | None = None, title: str | None = None) -> Axes:
    """One bar per request, start to end, in the order requests started (errors in black)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    records = sorted(result.records, key=lambda r: r.start)
    ax.barh(
        range(len(records)),
        [r.latency * 1000 for r in records],
        left=[r.start * 1000 for r in records],
        height=0.8,
        color=[_colour(r.status) for r in records],
    )
    ax.set_xlabel("time since the run started (ms)")
    ax.set_ylabel("request (in order sent)")
    ax.set_ylim(len(records) - 0.5, -0.5)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title or f"{result.label}\nwall {result.wall * 1000:.0f} ms, p50 {result.p50 * 1000:.0f} ms")
    return ax


def plot_cdf(
    results: LoadResult | Sequence[LoadResult] | Mapping[str, LoadResult],
    ax: Axes | None = None,
    log: bool = False,
) -> Axes:
    """The latency distribution of each run as a CDF (the fraction of requests at most this slow)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for label, result in _as_runs(results).items():
        values = sorted(v * 1000 for v in result.latencies)
        n = len(values)
        ax.step(
            values,
            [(i + 1) / n for i in range(n)],
            where="post",
            label=f"{label} (p50 {result.p50 * 1000:.0f} ms)",
        )
    ax.set_xlabel("latency (ms)" + (", log scale" if log else ""))
    ax.set_ylabel("fraction of requests")
    if log:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax.set_title("latency distribution")
    return ax


def plot_latency_over_time(
    runs: Mapping[str, LoadResult], ylabel: str = "latency (ms)", title: str = "", ax: Axes | None = None
) -> Axes:
    """Each run's requests as points (when sent, how long it took), on a log scale: a probe's story."""
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.4), constrained_layout=True)
    for label, run in runs.items():
        ax.plot(
            [r.start for r in run.records], [r.latency * 1000 for r in run.records], "o-", ms=3, label=label
        )
    ax.set(xlabel="time since the run started (s)", ylabel=ylabel, yscale="log", title=title)
    ax.legend()
    return ax


def compare(
    results: Sequence[LoadResult] | Mapping[str, LoadResult], cdf: bool = True, log: bool = False
) -> Figure:
    """Timelines side by side on shared axes, and (``cdf=True``) their latency CDFs beside them."""
    runs = _as_runs(results)
    columns = len(runs) + (1 if cdf else 0)
    fig, axes = plt.subplots(1, columns, figsize=(4.2 * columns, 3.6), constrained_layout=True)
    axes = list(axes) if columns > 1 else [axes]
    timeline_axes = axes[: len(runs)]
    for ax, (label, result) in zip(timeline_axes, runs.items(), strict=True):
        plot_timeline(result, ax=ax, title=f"{label}\nwall {result.wall * 1000:.0f} ms")
    right = max(max(r.ends, default=0) for r in runs.values()) * 1000 * 1.05
    bottom = max(len(r.records) for r in runs.values()) - 0.5
    for ax in timeline_axes:
        ax.set_xlim(0, right)
        ax.set_ylim(bottom, -0.5)
    for ax in timeline_axes[1:]:
        ax.set_ylabel("")
    if cdf:
        plot_cdf(runs, ax=axes[-1], log=log)
    return fig


def bar_chart(
    values: Mapping[str, float],
    xlabel: str,
    title: str = "",
    unit: str = "ms",
    log: bool = False,
    ax: Axes | None = None,
    decimals: int | None = None,
) -> Axes:
    """One labelled horizontal bar per entry of ``values`` (label → number), first entry on top.

    Bar labels show ``decimals`` digits after the point (default: 1 for ms, else 2), then ``unit``
    (``unit=""`` for a plain count).
    """
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(values)), constrained_layout=True)
    bars = ax.barh(list(values), list(values.values()), color="tab:blue")
    if decimals is None:
        decimals = 1 if unit == "ms" else 2
    ax.bar_label(bars, fmt=f"%.{decimals}f {unit}".rstrip(), padding=3)
    ax.set_ylim(len(values) - 0.5, -0.5)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if log:
        ax.set_xscale("log")
    ax.margins(x=0.25)
    return ax


def _service(span: Any) -> str:
    resource = getattr(span, "resource", None)
    return str(resource.attributes.get("service.name", "?")) if resource is not None else "?"


def _tree_order(spans: list[Any]) -> list[tuple[Any, int]]:
    """Spans depth-first from the roots, children in start order, with their depth."""
    ids = {s.context.span_id for s in spans}
    kids: dict[int, list[Any]] = {}
    roots = []
    for span in sorted(spans, key=lambda s: s.start_time):
        parent = span.parent.span_id if span.parent is not None else None
        if parent in ids:
            kids.setdefault(parent, []).append(span)
        else:
            roots.append(span)
    ordered: list[tuple[Any, int]] = []

    def visit(span: Any, depth: int) -> None:
        ordered.append((span, depth))
        for child in kids.get(span.context.span_id, []):
            visit(child, depth + 1)

    for root in roots:
        visit(root, 0)
    return ordered


def plot_waterfall(
    spans: Iterable[Any], ax: Axes | None = None, title: str | None = None, min_ms: float = 0.0
) -> Axes:
    """One trace's spans as a waterfall: one bar per span, nested under its parent, coloured by service.

    The span with the most time of its own (not spent in its children) is outlined in red: in a slow
    request, that is where the time went. Spans shorter than ``min_ms`` are left out of the picture
    (the title says how many).
    """
    from support.telemetry import self_time

    spans = [s for s in spans if s.end_time is not None]
    if not spans:
        raise ValueError("no finished spans to draw")
    if len({s.context.trace_id for s in spans}) > 1:
        raise ValueError("plot_waterfall draws one trace; group spans with support.telemetry.by_trace()")
    shown = {id(s) for s in spans if (s.end_time - s.start_time) / 1e6 >= min_ms}
    ordered = [(s, depth) for s, depth in _tree_order(spans) if id(s) in shown]
    t0 = min(s.start_time for s in spans)
    services = list(dict.fromkeys(_service(s) for s, _ in ordered))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {name: palette[i % len(palette)] for i, name in enumerate(services)}
    own = {id(s): self_time(s, spans) for s in spans}
    slowest = max(spans, key=lambda s: own[id(s)])
    if ax is None:
        _, ax = plt.subplots(figsize=(8, 0.6 + 0.32 * len(ordered)), constrained_layout=True)
    for row, (span, _) in enumerate(ordered):
        start = (span.start_time - t0) / 1e6
        length = (span.end_time - span.start_time) / 1e6
        is_slowest = span is slowest
        ax.barh(
            row,
            max(length, 0.05),
            left=start,
            height=0.7,
            color=colours[_service(span)],
            edgecolor="red" if is_slowest else "none",
            linewidth=2 if is_slowest else 0,
        )
        note = f" {length:.1f} ms" + (f"  ← {own[id(span)] * 1000:.0f} ms of its own" if is_slowest else "")
        colour = "red" if is_slowest else "black"
        ax.text(start + length, row, note, va="center", fontsize="small", color=colour)
    ax.set_yticks(range(len(ordered)))
    ax.set_yticklabels(["  " * depth + f"{_service(s)}: {s.name}" for s, depth in ordered], fontsize="small")
    ax.set_ylim(len(ordered) - 0.5, -0.5)
    ax.set_xlabel("time since the trace started (ms)")
    total = (max(s.end_time for s in spans) - t0) / 1e6
    ax.set_xlim(0, total * 1.6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[name]) for name in services]
    ax.legend(handles, services, loc="lower right", fontsize="small")
    hidden = len(spans) - len(ordered)
    note = f" ({hidden} under {min_ms:g} ms not shown)" if hidden else ""
    ax.set_title(title or f"one trace: {len(spans)} spans{note}, {total:.0f} ms")
    return ax
