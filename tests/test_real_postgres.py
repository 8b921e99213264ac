"""The database chapters again, against a real PostgreSQL instead of the embedded SQLite.

Set ``COURSE_TEST_DATABASE_URL`` to a scratch database, e.g.
``postgresql+asyncpg://course:course@127.0.0.1:5432/course_scratch``, whose user may create databases
(``.ci/run`` starts Debian's PostgreSQL and makes both). The lessons of chapters 4 and 5, chapter 4's
solutions and its exercise checks then run with ``DATABASE_URL`` set to a database of each test
worker's own, next to that one (``course_scratch_gw0``, …): the notebooks use fixed table names
(``ch04…``, ``ch05…``), so two of them running at once on one database would drop each other's tables.
Without the variable the module is skipped, unless ``COURSE_REAL_POSTGRES=required`` (CI sets it),
which turns the skip into a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from tests.backends import ROOT, run_notebook, run_tests

pytestmark = pytest.mark.backends

NOTEBOOKS = [
    ROOT / "notebooks" / "04_async_database.ipynb",
    ROOT / "notebooks" / "05_caching.ipynb",
    ROOT / "solutions" / "04_async_database_exercises.ipynb",
    ROOT / "notebooks" / "07_incident_drill.ipynb",
]
# chapter 4's check tests, about 2 minutes on one worker, in shares that several workers run at once
# (each worker has a database of its own)
CHECK_SHARDS = 4


@pytest.fixture(scope="module")
def postgres_url() -> str:
    url = os.environ.get("COURSE_TEST_DATABASE_URL")
    if not url:
        if os.environ.get("COURSE_REAL_POSTGRES") == "required":
            pytest.fail("COURSE_REAL_POSTGRES=required but COURSE_TEST_DATABASE_URL is not set")
        pytest.skip("set COURSE_TEST_DATABASE_URL to a scratch PostgreSQL database to test against it")
    assert make_url(url).get_backend_name() == "postgresql", url
    return worker_database(url)


def worker_database(url: str) -> str:
    """The URL of a database for this test worker alone, made next to ``url``'s if it is missing."""
    import psycopg

    base = make_url(url)
    name = f"{base.database}_{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
    admin = base.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            try:
                conn.execute(f'CREATE DATABASE "{name}"')
            except psycopg.errors.InsufficientPrivilege:
                pytest.fail(
                    f"the user of COURSE_TEST_DATABASE_URL may not create {name}: ALTER ROLE … CREATEDB"
                )
    return base.set(database=name).render_as_string(hide_password=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_runs_on_postgresql(path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    printed = run_notebook(path, monkeypatch, DATABASE_URL=postgres_url)
    shown = make_url(postgres_url).render_as_string(hide_password=True)
    assert f"{shown} (from $DATABASE_URL)" in printed, "the notebook says which database it used"


@pytest.mark.parametrize("shard", [f"{i}/{CHECK_SHARDS}" for i in range(CHECK_SHARDS)])
def test_exercise_checks_pass_and_reject_on_postgresql(shard: str, postgres_url: str) -> None:
    run_tests("tests/test_checks_ch04.py", shard=shard, DATABASE_URL=postgres_url)
