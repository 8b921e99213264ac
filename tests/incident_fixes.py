"""A finding for every fault of chapter 7's pool, for the checks' tests: (objective, evidence, seam), and
as the fix the seam's healthy version (the code every fault replaces).

The solution notebook fixes seed 0's five faults as a learner would write them; these let the tests
solve any seed (seed 14 plants five other faults, from the same five chapters' pool).
"""

from __future__ import annotations

from support.incident import SEAMS, Finding

_FOUND = {
    "ch1-blocking-sdk": ("orders loop lag p99", "loop lag", "orders.quote_shipping"),
    "ch2-swallowed-failure": ("jobs lost", "emails", "worker.send_confirmation"),
    "ch2-no-retries": ("jobs lost", "queue counters", "orders.enqueue_confirmation"),
    "ch2-no-request-id": ("jobs traceable", "logs", "orders.enqueue_confirmation"),
    "ch3-export-on-request-path": ("GET /products/{id} p50", "collector", "gateway.export_spans"),
    "ch3-request-id-dropped": ("logs correlated", "logs", "gateway.forward_headers"),
    "ch4-session-held": ("PUT /products/{id}/price p50", "pool", "orders.place_order"),
    "ch4-n-plus-one": ("GET /orders p50", "queries", "orders.list_orders"),
    "ch5-no-invalidation": ("stale reads", "cache counters", "orders.update_price"),
    "ch5-key-without-currency": ("wrong-currency reads", "cache keys", "orders.product_cache_key"),
    "ch6-spoofable-key": ("spoofing client admitted", "admitted", "gateway.client_key"),
    "ch6-per-process-limiter": ("heavy client admitted", "rate-limit keys", "gateway.rate_limit"),
}

FINDINGS: dict[str, Finding] = {
    fault_id: Finding(objective, evidence, seam, SEAMS[seam].healthy)
    for fault_id, (objective, evidence, seam) in _FOUND.items()
}
