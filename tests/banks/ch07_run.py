"""Run a chapter 7 bank through ``check_finding`` directly, for any seed (the answer-bank tool runs the
solution notebook, whose seed is 0):

    .venv/bin/python tests/banks/ch07_run.py tests/banks/ch07_seed14.md 14 [A B …]

Each case is the body of ``finding_1()`` (headings ``# 7.1 wrong A: … (expected: rejected)`` or
``# 14 …``); the body runs with the exercise notebook's imports, and the verdict is compared with the
label.
"""

import contextlib
import re
import sys
import time

import support.checks as checks
from support.checks import ExerciseIncomplete
from support.checks.ch07 import check_finding

SETUP = """
import json
import anyio.to_thread
import httpx
from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import selectinload
import support
from support.incident import Finding
from support.incident.healthy import ISSUED_KEYS
from support.incident.model import Order
"""
CASE = re.compile(
    r"^# \S+ (wrong|RIGHT) (\w+): (.*?)\(expected: (rejected|accepted)\)\s*\n```python\n(.*?)```", re.S | re.M
)


def main(path: str, seed: int, only: set[str]) -> int:
    judged = total = 0
    for _kind, letter, what, expected, body in CASE.findall(open(path).read()):
        if only and letter not in only:
            continue
        namespace: dict = {}
        exec(SETUP, namespace)
        exec(compile("def finding_1():\n" + body, f"<case {letter}>", "exec"), namespace)
        started = time.perf_counter()
        with open("/dev/null", "w") as quiet, contextlib.redirect_stdout(quiet):
            with contextlib.suppress(ExerciseIncomplete):
                check_finding("7.1", namespace["finding_1"], seed=seed)
        verdict = checks.last_verdict
        got = "accepted" if verdict.status == "passed" else "rejected"
        failed = [f"{s.description}: {s.seen}" for s in verdict.steps if s.status != "passed"][:1]
        total += 1
        judged += got == expected
        mark = "OK  " if got == expected else "MISS"
        print(f"{mark} {letter}: expected {expected}, {got} ({time.perf_counter() - started:.0f} s) {failed} {what[:90]}")
    print(f"held-out: {judged} of {total} judged as expected")
    return 0 if judged == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), set(sys.argv[3:])))
