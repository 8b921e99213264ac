"""The chapters that use Redis or a database, run again on a real Redis and PostgreSQL.

Each notebook runs once, on every real store it uses that the machine has (tests/backends.py): chapter
5's lesson on a real Redis and PostgreSQL together. Chapter 7's lesson and its solved drill start the
same system: the lesson runs on PostgreSQL, the drill on Redis. The exercise checks of chapters 4, 5
and 6 run on the real stores in their own modules (the ``database_backend`` and ``redis_backend``
fixtures).
"""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from tests.backends import ROOT, available, run_notebook

STORES = {  # notebook: the real stores it runs on
    "notebooks/02_background_tasks.ipynb": ("redis",),
    "notebooks/04_async_database.ipynb": ("postgresql",),
    "notebooks/05_caching.ipynb": ("redis", "postgresql"),
    "notebooks/06_rate_limiting.ipynb": ("redis",),
    "notebooks/07_incident_drill.ipynb": ("postgresql",),
    "solutions/02_background_tasks_exercises.ipynb": ("redis",),
    "solutions/04_async_database_exercises.ipynb": ("postgresql",),
    "solutions/05_caching_exercises.ipynb": ("redis",),
    "solutions/06_rate_limiting_exercises.ipynb": ("redis",),
    "solutions/07_incident_drill_exercises.ipynb": ("redis",),
}


def test_every_notebook_that_uses_a_store_runs_on_a_real_one() -> None:
    uses = set()
    for path in [*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("solutions/*.ipynb")]:
        text = path.read_text()
        if any(name in text for name in ("redis_client", "fresh_database", "start_system")):
            uses.add(path.relative_to(ROOT).as_posix())
    assert uses == set(STORES)


@pytest.mark.backends
@pytest.mark.whole_notebook
@pytest.mark.parametrize(
    ("name", "stores"),
    [pytest.param(name, uses, marks=pytest.mark.stores(*uses), id=name) for name, uses in STORES.items()],
)
def test_notebook_runs_on_the_real_stores(
    name: str, stores: tuple[str, ...], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {}
    if "redis" in stores and (url := available(request, "real_redis_url")):
        env["REDIS_URL"] = url
    if "postgresql" in stores and (url := available(request, "postgres_url")):
        env["DATABASE_URL"] = url
    assert env, "tests/conftest.py leaves out a notebook whose real stores are all missing"
    path = ROOT / name
    printed = run_notebook(path, monkeypatch, **env)
    if "REDIS_URL" in env and path.parent.name == "notebooks":  # lessons say which Redis they use
        assert f"Redis at {env['REDIS_URL']} (from REDIS_URL)" in printed
    if "DATABASE_URL" in env:
        shown = make_url(env["DATABASE_URL"]).render_as_string(hide_password=True)
        assert f"{shown} (from $DATABASE_URL)" in printed, "the notebook says which database it used"
