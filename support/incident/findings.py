"""What a learner reports for each fault they find: a ``Finding``, and the instruments it can name.

A finding says which objective of the report the fault broke, which instrument shows the cause (one
of ``INSTRUMENTS``), which seam's code is at fault, and the learner's version of that seam (the fix).
The checks of chapter 7 (``support.checks.ch07``) judge each part.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["INSTRUMENTS", "Finding", "describe_instruments"]

# name -> where to read it, and what it tells
INSTRUMENTS: dict[str, str] = {
    "loop lag": "system.loop_lag(service), run.loop_lag: how late each service's event loop woke (a 10 ms "
    "heartbeat)",
    "traces": "system.traces(), the waterfall: where a request's time went, span by span (self time)",
    "queries": "system.pool.queries, run.pool['queries'], the 'db' spans of a trace: SQL statements sent",
    "pool": "system.pool, run.pool: connections in use and at peak, how long each was held",
    "cache counters": "system.cache, run.cache: hits, misses, sets, deletes of the product cache",
    "cache keys": "the keys in Redis (ch07:*): what the cache holds, under which names",
    "queue counters": "system.jobs, run.jobs: jobs enqueued, attempts, done, retried, failed",
    "emails": "system.emails.sent, run.emails_sent: what the email provider really sent",
    "logs": "system.logs(), run.logs: every service's log lines, with their request IDs",
    "collector": "system.collector, run.collector: the tracing collector's export calls, by thread",
    "admitted": "run.by_client(): each client's requests, and how many were admitted (not 429)",
    "rate-limit keys": "run.ratelimit_keys, limiter_clients(run): the rate limiter's counters seen in Redis "
    "during the run, by client key",
}


def describe_instruments() -> str:
    """One line per instrument a finding can name as its evidence."""
    width = max(map(len, INSTRUMENTS))
    return "\n".join(f"{name:{width}}  {what}" for name, what in INSTRUMENTS.items())


@dataclass(frozen=True)
class Finding:
    """One fault found: the objective it broke, the evidence, the seam at fault, and the fix.

    ``objective`` is a key of the report (``report(run).summary()`` lists them); ``evidence`` is the
    name of an instrument in ``INSTRUMENTS`` that shows the cause; ``seam`` is a seam's name
    (``system.seams``); ``fix`` is a function with that seam's signature.
    """

    objective: str
    evidence: str
    seam: str
    fix: Callable[..., Any]

    @classmethod
    def coerce(cls, value: Any) -> Finding:
        """A ``Finding`` from a ``Finding`` or a mapping with its four keys; ``TypeError`` otherwise."""
        if isinstance(value, Finding):
            return value
        if isinstance(value, Mapping):
            missing = [k for k in ("objective", "evidence", "seam", "fix") if k not in value]
            if missing:
                raise TypeError(f"a finding needs objective, evidence, seam and fix; missing {missing}")
            return cls(value["objective"], value["evidence"], value["seam"], value["fix"])
        raise TypeError(f"expected a Finding(objective=…, evidence=…, seam=…, fix=…), got {value!r}")
