"""support.incident: the capstone's system, its fault pool and plan, the scenario, the objectives report.

The quick tests check the plan, the seams and the start/stop of the system. The scenario tests
(marked ``notebooks``: each starts the whole system and runs the ~4 s scenario, 6–7 s apiece, about
50 s together) check what the chapter promises: seed 0's faults fail their objectives, the same seed
with every fault fixed passes the whole report, and every fault of the pool breaks the objective it is
meant to break while the measured mechanism behind it shows (a blocking read on the loop, an export on
the server thread, a connection held through the payment call...).

Latency faults run alone. Faults whose objectives are counts of independent mechanisms (jobs lost,
log lines without their request ID, stale and wrong-currency reads, clients admitted past the limit)
share a run, and the test checks that the count objectives no fault of the run targets still pass.

The latency objectives assume a machine that is not saturated by other work: under the suite's
parallel workers a healthy run can starve. The healthy test runs the scenario again (three times at
most) when only latency objectives failed, and says so; if the last run still misses one while the load
generator's own loop lagged as long as check 7.6 calls a busy machine, the miss is the machine's.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

import support
from support.backends import redis_client

# what a busy machine can make miss once, and the load generator's own lag that marks a busy machine,
# as the checks judge them
from support.checks.ch07 import BUSY_MS, CAN_MISS_ONCE, LATENCY, _client_lag_ms
from support.incident import POOL, SEAMS, THRESHOLDS, fault, plan, report, run_scenario, start_system
from support.incident.faults import resolve
from support.incident.report import Report
from support.incident.scenario import REQUEST_TIMEOUT, ScenarioRun
from support.incident.seams import check_replacement, seam_source
from support.incident.system import running_system
from support.telemetry import by_trace
from tests import locks

LATENCY_FAULTS = ["ch1-blocking-sdk", "ch3-export-on-request-path", "ch4-session-held", "ch4-n-plus-one"]
COUNT_GROUPS = [
    [
        "ch2-swallowed-failure",
        "ch2-no-request-id",
        "ch3-request-id-dropped",
        "ch5-no-invalidation",
        "ch6-spoofable-key",
    ],
    ["ch2-no-retries", "ch5-key-without-currency", "ch6-per-process-limiter"],
]
COUNTS = {key for key in THRESHOLDS if key not in LATENCY}
# Counts that a slow system can move too: a connection held through a payment call makes a reader that
# missed the cache wait, which widens the cache-aside race (stale reads), and can pass pool_timeout (503).
TIMING_SENSITIVE = {"errors", "stale reads"}


# --- the pool and the plan --------------------------------------------------------------------


def test_the_pool_spans_every_chapter_and_each_fault_fits_its_seam() -> None:
    assert len(POOL) >= 8
    assert {f.chapter for f in POOL} == {1, 2, 3, 4, 5, 6}
    assert len({f.id for f in POOL}) == len(POOL)
    for f in POOL:
        assert f.seam in SEAMS, f
        assert f.breaks in THRESHOLDS, f
        check_replacement(f.seam, f.version)  # the faulty version has the seam's signature
        assert fault(f.id) is f
    planted_at_most = max(len(plan(seed)) for seed in range(50))
    assert len(SEAMS) > planted_at_most, "more seams than any seed plants faults in"
    healthy_only = set(SEAMS) - {f.seam for f in POOL}
    assert healthy_only, "some seams are never faulty: reading the code of each is part of the drill"


def test_the_plan_is_deterministic_and_covers_five_chapters_for_every_seed() -> None:
    for seed in range(300):
        chosen = plan(seed)
        assert chosen == plan(seed), seed
        assert len(chosen) == 5
        assert len({f.chapter for f in chosen}) == 5, seed
        assert len({f.seam for f in chosen}) == 5, seed
    assert plan() == plan(0)


def test_different_seeds_plant_different_incidents() -> None:
    assert [f.id for f in plan(0)] != [f.id for f in plan(1)]
    incidents = {tuple(f.id for f in plan(seed)) for seed in range(200)}
    assert len(incidents) >= 40, f"only {len(incidents)} different incidents in 200 seeds"
    planted = {f.id for seed in range(200) for f in plan(seed)}
    assert planted == {f.id for f in POOL}, "every fault of the pool is planted by some seed"


def test_two_faults_in_one_seam_are_refused() -> None:
    with pytest.raises(ValueError, match="same seam"):
        resolve(["ch2-no-retries", "ch2-no-request-id"])
    with pytest.raises(KeyError, match="no fault"):
        resolve(["ch9-nothing"])


def test_seam_sources_read_as_the_seam_and_give_no_fault_away() -> None:
    for name, seam in SEAMS.items():
        short = name.split(".")[-1]
        versions = [seam.healthy] + [f.version for f in POOL if f.seam == name]
        for version in versions:
            source = seam_source(name, version)
            first = next(
                line for line in source.splitlines() if line.lstrip().startswith(("def ", "async def "))
            )
            assert first.split("(")[0].split()[-1] == short, (name, first)
            assert not re.search(r"\bfault", source, re.IGNORECASE) and "__" not in first, (name, version)


def test_replacements_are_checked_before_anything_starts() -> None:
    async def get_product(ctx: Any, product_id: int, currency: str) -> dict:
        return {}

    def sync_get_product(ctx: Any, product_id: int, currency: str) -> dict:
        return {}

    async def too_few(ctx: Any) -> dict:
        return {}

    with pytest.raises(KeyError, match=r"did you mean 'orders\.get_product'"):
        start_system(overrides={"gateway.get_product": get_product})
    with pytest.raises(TypeError, match="async def"):
        start_system(overrides={"orders.get_product": sync_get_product})
    with pytest.raises(TypeError, match="3 arguments"):
        start_system(overrides={"orders.get_product": too_few})
    assert support.running() == [] and running_system() is None


# --- starting and stopping --------------------------------------------------------------------


async def _chapter_keys() -> list[bytes]:
    client = redis_client()
    try:
        keys = [key async for key in client.scan_iter(match="ch07:*")]
        return keys + [key async for key in client.scan_iter(match="saq:*ch07*")]
    finally:
        await client.aclose()


def _threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.is_alive()}


def test_start_and_stop_twice_leave_nothing_running() -> None:
    before = _threads()
    for _ in range(2):
        with start_system(faults=[]) as system:
            answer = httpx.get(
                f"{system.url}/products/3?currency=EUR", headers={"X-API-Key": "pricing"}, timeout=5
            )
            assert answer.status_code == 200 and answer.json()["currency"] == "EUR"
            placed = httpx.post(
                f"{system.urls['gateway-b']}/orders",
                params={"customer": "customer-1", "product_id": 3},
                headers={"X-API-Key": "checkout-1"},
                timeout=5,
            )
            assert placed.status_code == 201, placed.text
        assert system.stopped and not system.running
        deadline = time.perf_counter() + 5
        while _threads() - before and time.perf_counter() < deadline:
            time.sleep(0.05)
        assert _threads() - before == set(), "threads left running"
        assert support.running() == [] and support.running_workers() == [] and support.running_tracing() == []
        assert asyncio.run(_chapter_keys()) == []
    assert running_system() is None


def test_a_second_start_stops_the_first_and_works() -> None:
    first = start_system(faults=[])
    second = start_system(seed=1)
    try:
        assert first.stopped and second.running and running_system() is second
        answer = httpx.get(f"{second.url}/health", timeout=5)
        assert answer.status_code == 200
        assert [f.id for f in second.answer_key()] == [f.id for f in plan(1)]
    finally:
        second.stop()
        first.stop()  # a second stop does nothing


def test_overrides_replace_seams() -> None:
    asked: list[tuple[int, str]] = []

    def key_with_currency(product_id: int, currency: str) -> str:
        asked.append((product_id, currency))
        return f"ch07:product:{product_id}:{currency}:mine"

    system = start_system(
        faults=["ch5-key-without-currency", "ch1-blocking-sdk"],
        overrides={"orders.product_cache_key": key_with_currency},
    )
    try:
        for currency in ("USD", "EUR", "USD"):
            answer = httpx.get(
                f"{system.url}/products/5",
                params={"currency": currency},
                headers={"X-API-Key": "pricing"},
                timeout=5,
            )
            assert answer.json()["currency"] == currency
        assert (5, "EUR") in asked and (5, "USD") in asked
        assert system.seam("orders.product_cache_key") is key_with_currency
        assert "def key_with_currency" in system.seam_source("orders.product_cache_key")
        assert system.overridden() == {"orders.product_cache_key"}
        assert [f.id for f in system.answer_key()] == ["ch1-blocking-sdk"]
        assert system.cache.hits == 1 and system.cache.misses == 2
        assert "await ctx.shipping.quote(" in system.seam_source("orders.quote_shipping")
    finally:
        system.stop()


# --- the scenario and the report ---------------------------------------------------------------


@dataclass
class Outcome:
    """A scenario's report, and the mechanisms the tests read before the system stopped."""

    report: Report
    run: ScenarioRun
    attempts: int
    rate_table_reads: tuple[int, int]  # (reads, on an event loop's thread)
    selects_per_account_page: int  # the most 'db SELECT' spans in one GET /orders trace
    email_failures: int

    def failed(self) -> set[str]:
        return {o.key for o in self.report.failed()}


@contextlib.contextmanager
def _one_scenario_at_a_time() -> Iterator[None]:
    """Serialise the scenario tests across pytest-xdist's workers: two at once on 2 cores starve both."""
    with locks.held("ch07"):
        yield


def _scenario(*, attempts: int = 1, **start: Any) -> Outcome:
    """Start a system, run the scenario (again, up to ``attempts`` times, while only what a busy machine
    can miss fails: a latency, the cache's race)."""
    with _one_scenario_at_a_time():
        return _run_scenario(attempts=attempts, **start)


def _run_scenario(*, attempts: int, **start: Any) -> Outcome:
    system = start_system(**start)
    try:
        for attempt in range(1, attempts + 1):
            run = asyncio.run(run_scenario(system))
            result = report(run)
            failed = {o.key for o in result.failed()}
            if not failed or failed - CAN_MISS_ONCE or attempt == attempts:
                break
            print(
                f"attempt {attempt}: only objectives a busy machine can miss failed ({sorted(failed)}): "
                "a latency or the cache's race"
            )
            time.sleep(2)
        spans = system.spans()
        selects = [
            sum(s.name == "db SELECT" for s in trace)
            for trace in by_trace(spans).values()
            if any(s.name == "orders.list_orders" for s in trace)
        ]
        return Outcome(
            result,
            run,
            attempt,
            system.shipping.rate_table_reads(),
            max(selects, default=0),
            system.emails.failures,
        )
    finally:
        system.stop()


def _fixed(seed: int) -> dict[str, Any]:
    return {f.seam: SEAMS[f.seam].healthy for f in plan(seed)}


@pytest.mark.notebooks
@pytest.mark.one_system
def test_seed_0_with_every_fault_fixed_meets_every_objective() -> None:
    outcome = _scenario(seed=0, overrides=_fixed(0), attempts=3)
    missed = outcome.failed()
    if _client_lag_ms(outcome.report) >= BUSY_MS:  # the machine's, as check 7.6 judges it
        print(f"a busy machine: {sorted(missed & LATENCY)} not held against the system")
        missed -= LATENCY
    assert not missed, f"after {outcome.attempts} attempt(s):\n{outcome.report}"
    run = outcome.run
    # the mechanisms at their healthy values
    assert outcome.rate_table_reads[0] > 0 and outcome.rate_table_reads[1] == 0, (
        "the SDK's read ran in a thread"
    )
    assert set(run.collector["threads"]) <= {"OtelBatchSpanRecordProcessor"}, run.collector
    assert run.pool["holds_over_300ms"] <= 2, run.pool
    assert 1 <= outcome.selects_per_account_page <= 3
    assert run.cache["deletes"] > 0 and run.jobs["retried"] > 0 and run.jobs["failed"] == 0
    assert outcome.email_failures > 0, "the provider did fail now and then: the retries covered it"
    assert run.traffic_wall < 8 and run.drain_wall < 2


@pytest.mark.notebooks
@pytest.mark.one_system
def test_seed_0_fails_the_objectives_of_its_faults() -> None:
    outcome = _scenario(seed=0)
    planted = plan(0)
    assert {f.breaks for f in planted} <= outcome.failed(), outcome.report
    assert len(outcome.failed()) >= 5
    text = str(outcome.report)
    assert "❌" in text and "objectives failed" in text
    page = outcome.report._repr_html_()
    assert page.count("<tr") == len(THRESHOLDS) + 1
    ax = outcome.report.plot()
    assert len(ax.patches) == 5, "one bar per route"
    import matplotlib.pyplot as plt

    plt.close(ax.figure)


MECHANISMS = {
    "ch1-blocking-sdk": lambda o: o.rate_table_reads[1] == o.rate_table_reads[0] > 0,
    "ch3-export-on-request-path": lambda o: any(t.startswith("serve:") for t in o.run.collector["threads"]),
    "ch4-session-held": lambda o: o.run.pool["holds_over_300ms"] >= 5,  # through the 500 ms payment call
    "ch4-n-plus-one": lambda o: o.selects_per_account_page > 200,
    "ch2-swallowed-failure": lambda o: o.run.jobs["retried"] == o.run.jobs["failed"] == 0 < o.email_failures,
    "ch2-no-retries": lambda o: o.run.jobs["failed"] > 0 and o.run.jobs["retried"] == 0,
    "ch2-no-request-id": lambda o: (
        {line.request_id for line in o.run.logs if line.service == "worker"} == {"-"}
    ),
    "ch3-request-id-dropped": lambda o: (
        not (
            {line.request_id for line in o.run.logs if line.service == "orders"}
            & {line.request_id for line in o.run.logs if line.service.startswith("gateway")}
        )
    ),
    "ch5-no-invalidation": lambda o: o.run.cache["deletes"] == 0,
    "ch5-key-without-currency": lambda o: o.report["wrong-currency reads"].measured > 5,
    "ch6-spoofable-key": lambda o: o.report["spoofing client admitted"].measured > 1.5,
    "ch6-per-process-limiter": lambda o: o.report["heavy client admitted"].measured > 1.4,
}


def test_every_fault_has_a_test_of_its_mechanism() -> None:
    assert set(MECHANISMS) == {f.id for f in POOL}
    assert set(LATENCY_FAULTS) | {i for group in COUNT_GROUPS for i in group} == {f.id for f in POOL}


@pytest.mark.notebooks
@pytest.mark.one_system
@pytest.mark.parametrize("fault_id", LATENCY_FAULTS)
def test_a_latency_fault_alone_breaks_its_objective(fault_id: str) -> None:
    outcome = _scenario(faults=[fault_id])
    planted = fault(fault_id)
    assert planted.breaks in outcome.failed(), outcome.report
    assert MECHANISMS[fault_id](outcome), f"{fault_id}: the mechanism did not show"
    assert not outcome.failed() & (COUNTS - TIMING_SENSITIVE), (
        f"a latency fault should break no count objective:\n{outcome.report}"
    )
    assert outcome.run.traffic_wall < 4 + REQUEST_TIMEOUT + 2, "the scenario is bounded whatever the faults"


@pytest.mark.notebooks
@pytest.mark.one_system
@pytest.mark.parametrize("group", COUNT_GROUPS, ids=lambda g: "+".join(i.split("-", 1)[0] for i in g))
def test_count_faults_break_their_own_objectives_and_no_other(group: list[str]) -> None:
    outcome = _scenario(faults=group)
    targeted = {fault(i).breaks for i in group}
    for fault_id in group:
        assert fault(fault_id).breaks in outcome.failed(), f"{fault_id}:\n{outcome.report}"
        assert MECHANISMS[fault_id](outcome), f"{fault_id}: the mechanism did not show"
    assert not (outcome.failed() & COUNTS) - targeted, outcome.report
