"""Chapter 7's checks: every fault's own code is rejected at the probe, with a hint that says where to
look; findings that name the wrong objective, instrument or seam are told so before anything runs; and
a second seed (14: five faults other than seed 0's, which the solution notebook solves) is solved end
to end with the seams' healthy versions.

The end-to-end tests start systems and run the scenario (about 10 s a finding): marked ``notebooks``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest

import support.checks as checks
from support.checks import ExerciseIncomplete
from support.checks.ch07 import BUSY_MS, RULES, _judge, check_finding, check_incident_closed
from support.incident import POOL, Finding, plan
from support.incident.report import Objective
from support.incident.system import running_system, start_system
from tests.incident_fixes import FINDINGS
from tests.test_incident import _one_scenario_at_a_time as one_system_at_a_time

ROOT = Path(__file__).resolve().parent.parent
SEED_OF = {f.id: next(s for s in (0, 14, 3, 5) if f.id in {p.id for p in plan(s)}) for f in POOL}


def verdict_of(exercise_id: str, finding: Finding, seed: int) -> tuple[str, list]:
    with contextlib.suppress(ExerciseIncomplete):
        check_finding(exercise_id, lambda: finding, seed=seed)
    verdict = checks.last_verdict
    return verdict.status, [s for s in verdict.steps if s.status != "passed"]


def test_every_fault_has_a_rule_and_the_seed_mapping_covers_the_pool() -> None:
    assert set(RULES) == {f.id for f in POOL}
    for f in POOL:
        assert f.breaks in RULES[f.id].objectives, f.id
        assert f.id in {p.id for p in plan(SEED_OF[f.id])}


@pytest.mark.parametrize("fault", POOL, ids=lambda f: f.id)
def test_the_faulty_code_is_rejected_at_the_probe_with_a_hint(fault) -> None:
    right = FINDINGS[fault.id]
    status, failed = verdict_of(
        "7.1", Finding(right.objective, right.evidence, right.seam, fault.version), SEED_OF[fault.id]
    )
    assert status == "not yet"
    assert [s.description for s in failed] == [
        "your fix does what the seam did, without the fault (probed directly)"
    ]
    assert failed[0].hints, "a hint says where to look"
    assert running_system() is None


@pytest.mark.parametrize(
    ("change", "step"),
    [
        ({"objective": "GET /quote/{id} p99 "}, "the objective is one of the report's"),
        ({"objective": "errors"}, "the objective is one this seam's fault breaks"),
        ({"evidence": "gut feeling"}, "the evidence names an instrument"),
        ({"evidence": "collector"}, "the evidence is an instrument that shows the cause"),
        ({"seam": "orders.get_product"}, "the fix is a function with the seam's signature"),
        (
            {"seam": "orders.update_price", "fix": FINDINGS["ch5-no-invalidation"].fix},
            "the seam's code is at fault in the system of seed 0",
        ),
    ],
)
def test_a_wrong_part_of_a_finding_is_named_before_anything_runs(change, step) -> None:
    right = FINDINGS["ch4-n-plus-one"]
    parts = {
        "objective": right.objective,
        "evidence": right.evidence,
        "seam": right.seam,
        "fix": right.fix,
    } | change
    status, failed = verdict_of("7.1", Finding(**parts), 0)
    assert status == "not yet"
    assert [s.description for s in failed] == [step]


def test_a_placeholder_is_not_started_and_a_learners_running_system_comes_back() -> None:
    def finding():
        raise NotImplementedError("Exercise 7.1: replace this line with your code")

    mine = start_system(seed=0)
    try:
        with contextlib.suppress(ExerciseIncomplete):
            check_finding("7.1", finding, seed=0)
        assert checks.last_verdict.status == "not started"
        right = FINDINGS["ch4-n-plus-one"]
        with contextlib.suppress(ExerciseIncomplete):
            check_finding(
                "7.1",
                lambda: Finding(right.objective, right.evidence, right.seam, plan(0)[2].version),
                seed=0,
            )
        assert running_system() is mine and mine.running, "the check restarts the learner's system"
    finally:
        mine.stop()


@pytest.mark.notebooks
@pytest.mark.one_system
def test_seed_14_solved_end_to_end() -> None:
    faults = plan(14)
    assert not {f.id for f in faults} & {f.id for f in plan(0)}, "seed 14 shares no fault with seed 0"
    with one_system_at_a_time():
        for n, fault in enumerate(faults, 1):
            status, failed = verdict_of(f"7.{n}", FINDINGS[fault.id], 14)
            assert status == "passed", (fault.id, [(s.description, s.seen) for s in failed])
        fixes = {FINDINGS[f.id].seam: FINDINGS[f.id].fix for f in faults}
        check_incident_closed(lambda: fixes, seed=14)
        assert checks.last_verdict.status == "passed"


@pytest.mark.notebooks
@pytest.mark.one_system
@pytest.mark.parametrize("fault_id", ["ch2-no-request-id", "ch3-request-id-dropped"])
def test_the_faults_neither_seed_plants_are_solved_too(fault_id: str) -> None:
    with one_system_at_a_time():
        status, failed = verdict_of("7.1", FINDINGS[fault_id], SEED_OF[fault_id])
    assert status == "passed", failed


def bank_case(path: str, letter: str):
    """The ``finding_1`` of case ``letter`` in a chapter 7 bank (see tests/banks/ch07_run.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ch07_run", ROOT / "tests" / "banks" / "ch07_run.py")
    runner = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(runner)
    for _kind, found, _what, expected, body in runner.CASE.findall(
        (ROOT / "tests" / "banks" / path).read_text()
    ):
        if found == letter:
            namespace: dict = {}
            exec(runner.SETUP, namespace)
            exec(compile("def finding_1():\n" + body, f"<case {letter}>", "exec"), namespace)
            return namespace["finding_1"], expected
    raise LookupError(letter)


@pytest.mark.notebooks
@pytest.mark.parametrize(
    ("path", "seed", "letter"),
    [
        ("ch07.md", 0, "AG"),  # trusts X-Real-IP instead of X-Forwarded-For
        ("ch07.md", 0, "J"),  # a job key that is not the order's
        ("ch07_seed14.md", 14, "I"),  # a 16-span queue that drops spans in a burst
        ("ch07_seed14.md", 14, "N"),  # the payment in a background task, the order stored at once
        ("ch07_seed14.md", 14, "W"),  # half the limit in each instance's memory
        ("ch07_seed14.md", 14, "Y"),  # one counter per client, its expiry pushed back by every request
        ("ch07_seed14.md", 14, "AC"),  # the cache deleted before the commit
        ("ch07_seed14.md", 14, "AD"),  # read, decide, write: two round trips apart
        ("ch07_seed14.md", 14, "AE"),  # the order stored before the payment is authorised
    ],
)
def test_bank_answers_that_once_passed_are_rejected(path: str, seed: int, letter: str) -> None:
    finding, expected = bank_case(path, letter)
    assert expected == "rejected"
    with contextlib.suppress(ExerciseIncomplete):
        check_finding("7.1", finding, seed=seed)
    assert checks.last_verdict.status == "not yet", letter


class _Judged:
    """What `_judge` reads of a report: its objectives, and the load generator's own loop lag."""

    def __init__(self, client_lag_ms: float) -> None:
        self.objectives = [
            Objective("errors", "", 84.5, 1.0, "max", "%", "160 of 190: 160×no answer"),
            Objective("PUT /products/{id}/price p50", "", 140.0, 100.0, "max", "ms", "40 requests"),
            Objective("jobs lost", "", 0.0, 0.0, "max", "", "12 orders, 12 emails sent"),
        ]
        self.run = SimpleNamespace(
            loop_lag={"client": [(0.01 * i, client_lag_ms / 1000) for i in range(100)]}
        )

    def __iter__(self):
        return iter(self.objectives)


def test_a_failed_objective_says_what_the_report_counted_and_a_busy_machine_excuses_only_latency(
    capsys: pytest.CaptureFixture[str],
) -> None:
    must = {o.key for o in _Judged(0)}
    assert _judge(_Judged(1.0), must) == [
        "errors: 84.5 % (objective ≤ 1.0 %): 160 of 190: 160×no answer",
        "PUT /products/{id}/price p50: 140 ms (objective ≤ 100 ms): 40 requests",
    ]
    assert "the machine was busy" not in capsys.readouterr().out
    assert _judge(_Judged(BUSY_MS + 5), must) == [
        "errors: 84.5 % (objective ≤ 1.0 %): 160 of 190: 160×no answer"
    ]
    assert "the machine was busy" in capsys.readouterr().out
