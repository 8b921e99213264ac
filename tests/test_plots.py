"""support.plots draws from real LoadResults: one bar per request, broken and fixed on shared axes."""

from __future__ import annotations

import time

import matplotlib.pyplot as plt
import pytest
from opentelemetry import trace as otel_trace

from support.loadgen import LoadResult, RequestRecord
from support.plots import bar_chart, compare, plot_cdf, plot_latency_over_time, plot_timeline


def fake_run(label: str, n: int, step: float, status: int = 200) -> LoadResult:
    """A staircase (step > 0) or a block (step == 0) of n requests of 100 ms."""
    records = [RequestRecord(i, i * step, i * step + 0.1, status) for i in range(n)]
    return LoadResult(label, n, max(r.end for r in records), records)


def test_timeline_draws_one_bar_per_request() -> None:
    ax = plot_timeline(fake_run("x", 12, 0.1))
    assert len(ax.patches) == 12
    first, last = ax.patches[0], ax.patches[-1]
    assert first.get_x() == 0 and round(last.get_x()) == 1100  # ms: the staircase
    assert ax.get_xlabel() == "time since the run started (ms)"
    plt.close("all")


def test_errors_are_drawn_in_another_colour() -> None:
    ok, failed = plot_timeline(fake_run("ok", 1, 0)), plot_timeline(fake_run("bad", 1, 0, status=503))
    assert ok.patches[0].get_facecolor() != failed.patches[0].get_facecolor()
    plt.close("all")


def test_compare_shares_axes_and_adds_a_cdf() -> None:
    fig = compare({"blocking": fake_run("b", 10, 0.1), "offloaded": fake_run("o", 10, 0.0)})
    timelines, cdf = fig.axes[:2], fig.axes[2]
    assert len(fig.axes) == 3
    assert timelines[0].get_xlim() == timelines[1].get_xlim()
    assert timelines[0].get_xlim()[1] >= 1000  # the slow run fits
    assert "blocking" in timelines[0].get_title()
    assert len(cdf.get_lines()) == 2 and cdf.get_xlabel() == "latency (ms)"
    plt.close(fig)


def test_cdf_reaches_one() -> None:
    ax = plot_cdf([fake_run("a", 5, 0.0)])
    ys = ax.get_lines()[0].get_ydata()
    assert ys[0] == 0.2 and ys[-1] == 1.0
    plt.close("all")


def test_bar_chart_labels_each_bar_in_order() -> None:
    ax = bar_chart({"blocking": 4000.0, "offloaded": 140.0}, "wall time (ms)")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["blocking", "offloaded"]
    assert [t.get_text() for t in ax.texts] == ["4000.0 ms", "140.0 ms"]
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # first entry on top
    plt.close("all")


def test_bar_chart_rounds_labels_to_the_digits_asked_for() -> None:
    ax = bar_chart({"none": 2511.4, "traced": 1107.6}, "requests/s", unit="req/s", decimals=0)
    assert [t.get_text() for t in ax.texts] == ["2511 req/s", "1108 req/s"]
    plt.close("all")


def test_waterfall_nests_spans_and_outlines_the_one_with_most_time_of_its_own() -> None:
    import support
    from support.plots import plot_waterfall

    tracing = support.tracing("svc", name="t-waterfall")
    tracer = tracing.tracer
    # set times (ms), so that a busy machine changes nothing: "slow" has the most time of its own
    t0, ms = time.time_ns(), 1_000_000
    request = tracer.start_span("request", start_time=t0)
    inside = otel_trace.set_span_in_context(request)
    for name, start, end in (("fast", 0, 2), ("slow", 3, 33), ("tiny", 34, 34.1)):
        tracer.start_span(name, context=inside, start_time=t0 + int(start * ms)).end(
            end_time=t0 + int(end * ms)
        )
    request.end(end_time=t0 + 35 * ms)
    ax = plot_waterfall(tracing.spans(), min_ms=1)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["svc: request", "  svc: fast", "  svc: slow"]  # "tiny" is under 1 ms
    assert "1 under 1 ms not shown" in ax.get_title()
    outlined = [i for i, bar in enumerate(ax.patches[:3]) if bar.get_linewidth() > 0]
    assert outlined == [2]
    assert any("of its own" in t.get_text() for t in ax.texts)
    plt.close("all")
    with pytest.raises(ValueError, match="one trace"):
        with tracer.start_as_current_span("another trace"):
            pass
        plot_waterfall(tracing.spans())


def test_latency_over_time_draws_one_line_per_run() -> None:
    ax = plot_latency_over_time(
        {"fast": fake_run("f", 5, 0.1), "slow": fake_run("s", 4, 0)}, "probe (ms)", "Two"
    )
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["fast", "slow"]
    assert [len(line.get_xdata()) for line in lines] == [5, 4]
    assert list(lines[0].get_xdata()) == [
        0,
        0.1,
        0.2,
        0.30000000000000004,
        0.4,
    ]  # seconds: when each was sent
    assert set(lines[1].get_ydata()) == {100.0}  # ms: how long each took
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "probe (ms)" and ax.get_title() == "Two"
    plt.close("all")
