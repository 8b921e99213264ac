"""Real Redis and PostgreSQL for the suite, next to the embedded stores learners get.

The chapters run on fakeredis and SQLite out of the box. Where the machine has a real store, the
tests that touch one run on it too:

- ``redis_backend`` and ``database_backend`` are parametrized fixtures: a test that uses one runs
  twice, on the embedded store (``fakeredis``, ``sqlite``) and on the real one (``real-redis``,
  ``postgresql``, marked ``backends``), with ``REDIS_URL`` or ``DATABASE_URL`` set for that run only.
- A test whose real stores are all missing (and not required) is left out at collection, and the
  run's header says which are missing.
- ``real_redis_url`` starts one ``redis-server`` per test worker on a free port, the first time a test
  asks for it, and stops it at the end. Without ``redis-server`` its tests are left out, unless
  ``COURSE_REAL_REDIS=required`` (CI sets it), which fails them instead.
- ``postgres_url`` is a database of this test worker's own (``course_scratch_gw0``, …), made next to
  ``COURSE_TEST_DATABASE_URL``'s: the notebooks use fixed table names, so two workers on one database
  would drop each other's tables. Without the variable its tests are left out, unless
  ``COURSE_REAL_POSTGRES=required``.

tests/conftest.py imports the fixtures, so every test module can use them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy.engine import make_url

from support import site

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(server: str) -> tuple[subprocess.Popen[bytes], str] | None:
    """A redis-server on a free port, once it answers; None if the port was taken meanwhile."""
    port = _free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    with redis.Redis.from_url(url) as client:
        while process.poll() is None:
            try:
                # the server that answers must be this one: another worker's may have taken the port
                if client.info("server")["process_id"] == process.pid:
                    return process, url
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    process.terminate()
    process.wait(timeout=10)
    return None


@pytest.fixture(scope="session")
def real_redis_url() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("COURSE_REAL_REDIS") == "required":
            pytest.fail("COURSE_REAL_REDIS=required but redis-server is not installed")
        pytest.skip("redis-server is not installed (apt install redis-server) to test against a real Redis")
    for _ in range(3):
        if started := _start_redis(server):
            break
    else:
        pytest.fail("redis-server did not start on a free port in three tries")
    process, url = started
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
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


def _on_store(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, variable: str, real: str
) -> str:
    """Point ``variable`` at the real store's URL (fixture ``real``) for the real run; unset it otherwise."""
    if request.param in ("real-redis", "postgresql"):
        monkeypatch.setenv(variable, request.getfixturevalue(real))
    else:
        monkeypatch.delenv(variable, raising=False)
    return request.param


@pytest.fixture(params=["fakeredis", pytest.param("real-redis", marks=pytest.mark.backends)])
def redis_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's Redis: the embedded one, or (second run) the worker's real server through REDIS_URL."""
    return _on_store(request, monkeypatch, "REDIS_URL", "real_redis_url")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.backends)])
def database_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's database: SQLite files, or (second run) the worker's PostgreSQL through DATABASE_URL."""
    return _on_store(request, monkeypatch, "DATABASE_URL", "postgres_url")


def missing_stores() -> dict[str, str]:
    """The real stores this machine lacks and does not require, each with how to get it."""
    missing = {}
    if shutil.which("redis-server") is None and os.environ.get("COURSE_REAL_REDIS") != "required":
        missing["redis"] = "no redis-server (apt install redis-server)"
    postgres_required = os.environ.get("COURSE_REAL_POSTGRES") == "required"
    if not os.environ.get("COURSE_TEST_DATABASE_URL") and not postgres_required:
        missing["postgresql"] = "COURSE_TEST_DATABASE_URL is not set"
    return missing


def stores_of(item: pytest.Item) -> set[str]:
    """The real stores a test runs on: its backend fixture's real run, or its ``stores`` mark."""
    params = getattr(item, "callspec", None)
    params = params.params if params else {}
    stores = {"redis"} if params.get("redis_backend") == "real-redis" else set()
    stores |= {"postgresql"} if params.get("database_backend") == "postgresql" else set()
    for mark in item.iter_markers("stores"):
        stores |= set(mark.args)
    return stores


def available(request: pytest.FixtureRequest, fixture: str) -> str | None:
    """The fixture's URL, or None where its store is missing and not required (a required one fails)."""
    try:
        return request.getfixturevalue(fixture)
    except pytest.skip.Exception:
        return None


def run_notebook(path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    """Run a notebook top to bottom in a kernel that inherits ``env``; return everything it printed."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    nb = site.execute(path)  # raises CellExecutionError on the first failing cell
    return "".join(o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []))
