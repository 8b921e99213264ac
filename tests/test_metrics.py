"""support.metrics reads a Prometheus histogram and estimates percentiles exactly as PromQL does."""

from __future__ import annotations

import math

import pytest
from fastapi import FastAPI, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

import support
from support.metrics import histogram_quantile, read_histogram, scrape_histogram

INF = math.inf


def test_interpolates_inside_the_bucket_that_holds_the_rank() -> None:
    buckets = [(0.1, 50), (0.2, 90), (0.5, 100), (INF, 100)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)  # rank 50: the top of the first
    assert histogram_quantile(0.25, buckets) == pytest.approx(0.05)  # from 0, halfway to 0.1
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.15)  # 20 of 40 into (0.1, 0.2]
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.2 + 0.3 * 9 / 10)


def test_a_rank_in_the_inf_bucket_returns_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, [(0.1, 90), (INF, 100)]) == 0.1


def test_empty_and_malformed_histograms() -> None:
    assert math.isnan(histogram_quantile(0.5, [(0.1, 0), (INF, 0)]))
    with pytest.raises(ValueError, match="Inf"):
        histogram_quantile(0.5, [(0.1, 3)])
    with pytest.raises(ValueError, match="between 0 and 1"):
        histogram_quantile(99, [(INF, 1)])


def test_reads_and_sums_series_from_exposition_text() -> None:
    registry = CollectorRegistry()
    latency = Histogram("req_seconds", "latency", ["route"], buckets=(0.01, 0.1), registry=registry)
    Counter("hits", "hits", registry=registry).inc()
    for value in (0.005, 0.05, 0.5):
        latency.labels("/a").observe(value)
    latency.labels("/b").observe(0.05)
    text = generate_latest(registry).decode()

    a = read_histogram(text, "req_seconds", route="/a")
    assert a.buckets == ((0.01, 1.0), (0.1, 2.0), (INF, 3.0))
    assert a.count == 3 and a.sum == pytest.approx(0.555)
    both = read_histogram(text, "req_seconds")
    assert both.count == 4 and both.buckets[1] == (0.1, 3.0)
    assert both.quantile(0.5) == pytest.approx(0.01 + 0.09 * (2 - 1) / 2)

    with pytest.raises(LookupError, match="hits"):  # the error lists what is there
        read_histogram(text, "latency_seconds")
    with pytest.raises(ValueError, match="counter"):
        read_histogram(text, "hits")


def test_scrapes_a_running_app(server) -> None:
    from fastapi import Response

    registry = CollectorRegistry()
    latency = Histogram("t_seconds", "t", buckets=(1.0,), registry=registry)
    latency.observe(0.5)
    app = FastAPI()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type="text/plain")

    running = support.serve(app, name="t-metrics")
    assert scrape_histogram(running, "t_seconds").buckets == ((1.0, 1.0), (INF, 1.0))


def test_a_histogram_declared_but_not_yet_observed_is_empty() -> None:
    page = "# HELP lat Latency\n# TYPE lat histogram\n"  # a labelled histogram before its first request
    assert read_histogram(page, "lat").count == 0
    assert math.isnan(read_histogram(page, "lat", route="/orders").quantile(0.99))
    with pytest.raises(LookupError, match="no histogram missing"):
        read_histogram(page, "missing")
