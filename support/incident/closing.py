"""The closing table of the drill: what each fix gained (measured, before → after) and what it costs.

One row per finding, in the course's cross-cutting table's shape (the README's "course in one table"):
the concern, the fix, the objective it broke before and after, and the cost of the fix, named, with
the figure of the "after" run that measures it where one does.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from support.incident.faults import Fault, plan
from support.incident.findings import Finding
from support.incident.report import Report

__all__ = ["ClosingTable", "closing_table", "findings_so_far"]

CONCERNS = {
    1: "blocking work in request handlers (ch. 1)",
    2: "slow side effects of a request (ch. 2)",
    3: "seeing what a request did (ch. 3)",
    4: "database access under concurrency (ch. 4)",
    5: "repeated reads of slow data (ch. 5)",
    6: "one client's load hurting others (ch. 6)",
}


FIXES = {
    "ch1-blocking-sdk": "the SDK's blocking read in a worker thread",
    "ch2-swallowed-failure": "the provider's failure fails the job, so the queue retries it",
    "ch2-no-retries": "confirmation jobs get retries",
    "ch2-no-request-id": "the request ID travels in the job",
    "ch3-export-on-request-path": "spans exported in batches, off the request path",
    "ch3-request-id-dropped": "the gateway forwards X-Request-ID",
    "ch4-session-held": "no connection held through the payment call",
    "ch4-n-plus-one": "each order's lines loaded with the orders (selectinload)",
    "ch5-no-invalidation": "a price change deletes the product's cached pages",
    "ch5-key-without-currency": "the cache key names the currency",
    "ch6-spoofable-key": "anonymous clients keyed on the connection's address",
    "ch6-per-process-limiter": "the limiter counts in Redis, shared by both gateways",
}


def _cost(fault: Fault, before: Report, after: Report) -> str:
    run = after.run
    jobs, pool, cache, collector = run.jobs, run.pool, run.cache, run.collector
    retried, calls, deletes = jobs.get("retried", 0), collector.get("calls", 0), cache.get("deletes", 0)
    hold = pool.get("hold_max_ms", 0)
    misses, hits = cache.get("misses", 0), cache.get("hits", 0)
    misses_before, hits_before = before.run.cache.get("misses", 0), before.run.cache.get("hits", 0)
    costs: dict[str, str] = {
        "ch1-blocking-sdk": "a worker thread per quote in flight, from AnyIO's 40 tokens that every `def` "
        "endpoint shares",
        "ch2-swallowed-failure": f"failed emails are retried ({retried} retries in the run): "
        "the provider must honour the idempotency key, or a retry after a lost answer sends twice",
        "ch2-no-retries": f"{retried} retries in the run; each retry can send twice unless the "
        "provider honours the idempotency key; a job that keeps failing needs a dead-letter place",
        "ch2-no-request-id": "one more argument in every job, restored by the worker",
        "ch3-export-on-request-path": f"spans wait in a buffer before export ({calls} "
        "export calls in the run) and are lost if the process dies, or dropped when the queue (2,048 by "
        "default) is full; the export thread's CPU still shares the GIL",
        "ch3-request-id-dropped": "a header on every internal call, and every service must validate it",
        "ch4-session-held": f"the order is two transactions, not one (longest hold {hold:.0f} "
        "ms): the write must re-check what the read saw, and the payment needs an idempotency key",
        "ch4-n-plus-one": "the query must say what each page loads (one more statement per 500 parents)",
        "ch5-no-invalidation": f"every write must delete every key that holds its data ({deletes} "
        "deletes in the run), and a read after it misses",
        "ch5-key-without-currency": f"one cached copy per currency: more keys, more misses ({misses} misses "
        f"and {hits} hits after, {misses_before} and {hits_before} before)",
        "ch6-spoofable-key": "clients behind one address (a NAT, an office) share one quota",
        "ch6-per-process-limiter": "a Redis round trip on every request, and a choice for when Redis is down "
        "(fail open or closed)",
    }
    return costs[fault.id]


@dataclass(frozen=True)
class Row:
    concern: str
    fix: str
    objective: str
    before: str
    after: str
    cost: str


class ClosingTable:
    """The rows, shown as a table in a notebook (``_repr_html_``) or as text."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = rows

    def __str__(self) -> str:
        lines = []
        for r in self.rows:
            lines.append(f"{r.concern}\n  fix:    {r.fix}\n  gained: {r.objective}: {r.before} → {r.after}")
            lines.append(f"  cost:   {r.cost}")
        return "\n".join(lines) if lines else "no finding yet"

    def __repr__(self) -> str:
        return f"<ClosingTable of {len(self.rows)} fixes>"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{h}</th>" for h in ("concern", "fix", "gained (before → after)", "cost"))
        body = "".join(
            "<tr>"
            + "".join(
                f"<td>{html.escape(c)}</td>"
                for c in (r.concern, r.fix, f"{r.objective}: {r.before} → {r.after}", r.cost)
            )
            + "</tr>"
            for r in self.rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"


def findings_so_far(findings: Iterable[Callable[[], Any]]) -> list[Finding]:
    """The findings written so far: each ``finding_N()`` that returns one (placeholders are skipped)."""
    found = []
    for finding in findings:
        try:
            found.append(Finding.coerce(finding()))
        except NotImplementedError:
            continue
    return found


def closing_table(before: Report, after: Report, findings: Iterable[Finding], seed: int) -> ClosingTable:
    """One row per finding whose seam is one of ``seed``'s faults, filled from the two reports."""
    planted = {f.seam: f for f in plan(seed)}
    rows = []
    for finding in sorted(findings, key=lambda f: planted[f.seam].chapter if f.seam in planted else 0):
        fault = planted.get(finding.seam)
        if fault is None:
            continue
        key = finding.objective if finding.objective in before.summary() else fault.breaks
        rows.append(
            Row(
                CONCERNS[fault.chapter],
                f"{FIXES[fault.id]} ({finding.seam})",
                key,
                before[key].measured_text,
                after[key].measured_text,
                _cost(fault, before, after),
            )
        )
    return ClosingTable(rows)
