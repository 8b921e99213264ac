"""The fault pool, and the plan that picks a seed's five.

A fault replaces one seam with a faulty version (``support.incident.faulty``). The pool has faults
from all six chapters, several per chapter; ``plan(seed)`` picks five, from five different chapters
(so from five different seams), the same five for the same seed on every machine. Seed 0 is the
chapter's default, so Restart & Run All is reproducible; two learners at a workshop table with
different seeds get different incidents.

Each fault names the objective of ``report()`` it is meant to break (it may break others too, as real
faults do), and the evidence a learner finds with the course's instruments. That text is the answer
key: the notebook never prints it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from support.incident import faulty

__all__ = ["POOL", "Fault", "fault", "plan"]

FAULTS_PER_PLAN = 5


@dataclass(frozen=True)
class Fault:
    """One planted fault: which seam it replaces, what it breaks, how it shows."""

    id: str
    chapter: int
    seam: str
    title: str
    breaks: str  # the key of the objective it is meant to break (``Report.objectives``)
    evidence: str
    version: Callable[..., Any]

    def __repr__(self) -> str:
        return f"<Fault {self.id} (chapter {self.chapter}) in {self.seam}>"


POOL: tuple[Fault, ...] = (
    Fault(
        "ch1-blocking-sdk",
        1,
        "orders.quote_shipping",
        "the shipping SDK's async quote() reads its rate tables with a synchronous call, on the loop",
        "orders loop lag p99",
        "the orders heartbeat wakes 120 ms late again and again; every orders route's p99 rises with it; "
        "slow traces of unrelated routes show a gap with no child span; the quote spans have the most "
        "self time",
        faulty.quote_shipping__blocking_sdk,
    ),
    Fault(
        "ch2-swallowed-failure",
        2,
        "worker.send_confirmation",
        "the job catches the provider's failure and returns: the job is done, the email never sent",
        "jobs lost",
        "queue counters: no retries, no failures, every job done; yet emails sent < orders placed; the "
        "worker's log has 'email provider error' warnings, one per lost email",
        faulty.send_confirmation__swallowed_failure,
    ),
    Fault(
        "ch2-no-retries",
        2,
        "orders.enqueue_confirmation",
        "confirmation jobs are enqueued with SAQ's default retries=1: one provider failure loses the email",
        "jobs lost",
        "queue counters: failed > 0 and retried = 0; emails sent < orders placed",
        faulty.enqueue_confirmation__no_retries,
    ),
    Fault(
        "ch2-no-request-id",
        2,
        "orders.enqueue_confirmation",
        "the job is enqueued without the request's ID: the worker's lines cannot be tied to their order",
        "jobs traceable",
        "the worker's log lines have request ID '-'; the orders line 'order placed' of the same order_id "
        "has one",
        faulty.enqueue_confirmation__no_request_id,
    ),
    Fault(
        "ch3-export-on-request-path",
        3,
        "gateway.export_spans",
        "a SimpleSpanProcessor exports every span to the (slow) collector inside span.end(), on the loop",
        "GET /products/{id} p50",
        "every gateway route's p50 rises, even the cheapest; the gateway heartbeat lags; the collector's "
        "export calls ran on the server threads (collector.threads) one span at a time",
        faulty.export_spans__on_request_path,
    ),
    Fault(
        "ch3-request-id-dropped",
        3,
        "gateway.forward_headers",
        "the gateway's call to the orders service does not carry X-Request-ID: orders makes up its own",
        "logs correlated",
        "orders log lines carry IDs that no gateway line has; the trace still links both services "
        "(traceparent), the logs do not",
        faulty.forward_headers__request_id_dropped,
    ),
    Fault(
        "ch4-session-held",
        4,
        "orders.place_order",
        "one session (and connection) is held across the slow payment call",
        "PUT /products/{id}/price p50",
        "PoolWatch: connections in use at the pool's size, holds of ~the payment call; slow price changes "
        "and account pages wait before their first SQL span; 503s when the wait passes pool_timeout; on a "
        "busy machine even stale reads (a read that missed waits for a connection while a price commits)",
        faulty.place_order__session_held,
    ),
    Fault(
        "ch4-n-plus-one",
        4,
        "orders.list_orders",
        "the account page loads each order's lines with a query of its own (N + 1 queries)",
        "GET /orders p50",
        "a GET /orders trace has ~250 'db SELECT' spans under orders.list_orders; PoolWatch counts ~250 "
        "queries per account page",
        faulty.list_orders__n_plus_one,
    ),
    Fault(
        "ch5-no-invalidation",
        5,
        "orders.update_price",
        "a price change commits but never deletes the cached page",
        "stale reads",
        "cache counters: deletes = 0 while prices change; reads return a price older than the last "
        "committed change (the scenario counts them)",
        faulty.update_price__no_invalidation,
    ),
    Fault(
        "ch5-key-without-currency",
        5,
        "orders.product_cache_key",
        "the cache key leaves out the currency: a page cached in EUR is served to USD readers",
        "wrong-currency reads",
        "reads answered in another currency than asked (the scenario counts them); one key per product "
        "in Redis where there should be two",
        faulty.product_cache_key__no_currency,
    ),
    Fault(
        "ch6-spoofable-key",
        6,
        "gateway.client_key",
        "the limiter keys anonymous clients on the first X-Forwarded-For address, which anyone can send",
        "spoofing client admitted",
        "the anonymous client gets far more than the limit through; the gateway log shows a new client "
        "key per request",
        faulty.client_key__spoofable,
    ),
    Fault(
        "ch6-per-process-limiter",
        6,
        "gateway.rate_limit",
        "the limiter counts in each gateway instance's memory: two instances let 2× the limit through",
        "heavy client admitted",
        "the heavy client is admitted about twice the limit per window, half through each instance; no "
        "ch07:ratelimit:* keys in Redis",
        faulty.rate_limit__per_process,
    ),
)

_BY_ID = {f.id: f for f in POOL}


def fault(fault_id: str) -> Fault:
    """The fault called ``fault_id`` (see ``POOL``)."""
    try:
        return _BY_ID[fault_id]
    except KeyError:
        raise KeyError(f"no fault {fault_id!r}; the pool has {', '.join(_BY_ID)}") from None


def plan(seed: int = 0) -> list[Fault]:
    """The five faults planted for ``seed``: one from each of five chapters, chosen deterministically.

    The same seed gives the same faults on every machine and Python version (``random.Random`` with
    an integer seed is stable); different seeds give different sets.
    """
    rng = random.Random(f"ch07-incident:{int(seed)}")
    chapters = sorted({f.chapter for f in POOL})
    chosen = sorted(rng.sample(chapters, FAULTS_PER_PLAN))
    picked = [rng.choice([f for f in POOL if f.chapter == chapter]) for chapter in chosen]
    seams = [f.seam for f in picked]
    assert len(set(seams)) == len(seams), "a plan never plants two faults in one seam"
    return picked


def resolve(faults: Iterable[str | Fault]) -> list[Fault]:
    """Fault objects for ids (or faults), checking that no two replace the same seam."""
    resolved = [f if isinstance(f, Fault) else fault(f) for f in faults]
    seams = [f.seam for f in resolved]
    clash = sorted({s for s in seams if seams.count(s) > 1})
    if clash:
        raise ValueError(f"two faults replace the same seam ({', '.join(clash)}): plant one of them")
    return resolved
