"""Read Prometheus histograms the way Prometheus does, from a service's ``/metrics`` page.

A histogram keeps only cumulative bucket counts; a percentile read from it is an estimate, linearly
interpolated inside the bucket that holds it (PromQL's ``histogram_quantile``). The notebooks compare
that estimate with the percentiles the load generator measured, so this module reproduces PromQL's
arithmetic rather than inventing its own.
"""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Histogram", "histogram_quantile", "read_histogram", "scrape", "scrape_histogram"]


@dataclass(frozen=True)
class Histogram:
    """One histogram's cumulative buckets ``(upper bound, count)``, ending with ``(inf, total)``."""

    name: str
    buckets: tuple[tuple[float, float], ...]
    sum: float

    @property
    def count(self) -> float:
        return self.buckets[-1][1] if self.buckets else 0.0

    def quantile(self, q: float) -> float:
        """The ``q``-quantile (0 < q < 1) estimated as PromQL's ``histogram_quantile`` does.

        NaN while the histogram has no observations (and no series yet), as in PromQL.
        """
        if not self.buckets:
            return histogram_quantile(q, ((math.inf, 0.0),))
        return histogram_quantile(q, self.buckets)


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """PromQL's ``histogram_quantile(q, …)`` over cumulative ``(upper bound, count)`` buckets.

    The rank ``q × total`` is found in the first bucket whose cumulative count reaches it, and the
    value is interpolated linearly between that bucket's lower and upper bounds (the lowest bucket
    starts at 0). A rank in the ``+Inf`` bucket returns the highest finite bound, as Prometheus does.
    Returns NaN for an empty histogram.
    """
    if not 0 <= q <= 1:
        raise ValueError(f"q must be between 0 and 1, got {q}")
    ordered = sorted((float(le), float(count)) for le, count in buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        raise ValueError("buckets must end with the +Inf bucket (the total count)")
    total = ordered[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    lower, below = 0.0, 0.0
    for upper, count in ordered:
        if count >= rank:
            if math.isinf(upper):
                return ordered[-2][0] if len(ordered) > 1 else math.nan
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return ordered[-2][0]


def scrape(server: Any, path: str = "/metrics", timeout: float = 5.0) -> str:
    """The text a server's metrics endpoint returns (``server`` is a ``serve()`` handle or a base URL)."""
    base = str(getattr(server, "url", server)).rstrip("/")
    with urllib.request.urlopen(base + path, timeout=timeout) as response:
        return response.read().decode()


def read_histogram(text: str, name: str, **labels: str) -> Histogram:
    """The histogram ``name`` from exposition ``text``, summed over the series matching ``labels``.

    ``name`` is the metric's base name (without ``_bucket``). Label values not given are summed over,
    e.g. ``read_histogram(text, "http_request_duration_seconds", route="/orders/{sku}")``.
    A histogram declared on the page but without a matching series yet (a labelled histogram before
    its first observation shows only its ``HELP`` and ``TYPE`` lines) is empty: count 0, quantiles NaN.
    """
    counts: dict[float, float] = {}
    total_sum = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        if family.type != "histogram":
            raise ValueError(f"{name} is a {family.type}, not a histogram")
        found = found or not labels or not family.samples
        for sample in family.samples:
            if any(sample.labels.get(k) != v for k, v in labels.items()):
                continue
            found = True
            if sample.name == f"{name}_bucket":
                le = float(sample.labels["le"])
                counts[le] = counts.get(le, 0.0) + sample.value
            elif sample.name == f"{name}_sum":
                total_sum += sample.value
    if not found:
        names = sorted({f.name for f in text_string_to_metric_families(text)})
        wanted = f"{name}{labels}" if labels else name
        found_names = ", ".join(names) or "nothing"
        raise LookupError(f"no histogram {wanted} in the metrics text; it has: {found_names}")
    return Histogram(name, tuple(sorted(counts.items())), total_sum)


def scrape_histogram(server: Any, name: str, path: str = "/metrics", **labels: str) -> Histogram:
    """``read_histogram(scrape(server, path), name, **labels)``."""
    return read_histogram(scrape(server, path), name, **labels)
