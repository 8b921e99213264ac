"""The Redis chapters again, against a real Redis server instead of the embedded fakeredis.

When ``redis-server`` is installed (``apt install redis-server``; CI installs it), this module starts
one on 127.0.0.1 and a free port, sets ``REDIS_URL`` for the kernels and the checks it runs, and stops
it afterwards. Without ``redis-server`` the module is skipped, unless ``COURSE_REAL_REDIS=required``
(CI sets it), which turns the skip into a failure.
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

from tests.backends import ROOT, run_notebook, run_tests

pytestmark = pytest.mark.backends

REDIS_CHAPTERS = ("02", "05", "06", "07")
NOTEBOOKS = sorted(
    path
    for folder in ("notebooks", "solutions")
    for path in (ROOT / folder).glob("*.ipynb")
    if path.name[:2] in REDIS_CHAPTERS
    # chapter 7's lesson runs the same system as its solved drill, which runs here (the lesson runs
    # on PostgreSQL in test_real_postgres.py)
    and not (folder == "notebooks" and path.name.startswith("07"))
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def real_redis_url() -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("COURSE_REAL_REDIS") == "required":
            pytest.fail("COURSE_REAL_REDIS=required but redis-server is not installed")
        pytest.skip("redis-server is not installed (apt install redis-server) to test against a real Redis")
    port = _free_port()
    process = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_notebook_runs_on_a_real_redis(
    path: Path, real_redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    printed = run_notebook(path, monkeypatch, REDIS_URL=real_redis_url)
    if path.parent.name == "notebooks":  # lessons say which Redis they use
        assert f"Redis at {real_redis_url} (from REDIS_URL)" in printed


# the check tests in shares of about 30 s that several workers run at once (each worker starts a Redis
# server of its own)
CHECK_RUNS = [
    pytest.param("tests/test_checks_ch05.py", "0/2", id="ch05-share-0-of-2"),
    pytest.param("tests/test_checks_ch05.py", "1/2", id="ch05-share-1-of-2"),
    pytest.param("tests/test_checks_ch06.py", None, id="ch06"),
]


@pytest.mark.parametrize(("tests", "shard"), CHECK_RUNS)
def test_exercise_checks_pass_and_reject_on_a_real_redis(
    tests: str, shard: str | None, real_redis_url: str
) -> None:
    run_tests(tests, shard=shard, REDIS_URL=real_redis_url)
