"""support.environment: the start-here checks pass here, and each failure names its fix."""

from __future__ import annotations

import asyncio

import pytest

from support import environment
from support.environment import EnvironmentNotReady, Finding, check_environment


def test_everything_passes_in_the_course_environment(capsys: pytest.CaptureFixture[str]) -> None:
    findings = asyncio.run(check_environment())
    assert [f.what for f in findings if not f.ok] == []
    out = capsys.readouterr().out
    assert out.count("✅") == len(findings) == 7
    assert "in-process server: started, answered {'ok': True}, stopped" in out


def test_a_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "pinned_versions", lambda: {"fastapi": "0.165.0", "no-such-pkg": "1.0"})
    finding = environment.check_packages()
    assert not finding.ok
    assert finding.seen == "missing: no-such-pkg"
    assert "python course.py lab" in finding.fix


def test_another_version_is_only_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(environment, "pinned_versions", lambda: {"fastapi": "0.1.0"})
    finding = environment.check_packages()
    assert finding.ok
    assert "fastapi 0.165.0 (pinned 0.1.0)" in finding.seen


def test_an_unreachable_redis_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens on port 1
    finding = asyncio.run(environment.check_redis())
    assert not finding.ok
    assert finding.seen.startswith("Redis at redis://127.0.0.1:1/0 (from REDIS_URL): ConnectionError")
    assert finding.fix == "unset REDIS_URL to use the embedded fakeredis, or start the server it names"


def test_a_bad_database_url_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path}/no/such/dir/x.db")
    finding = asyncio.run(environment.check_database())
    assert not finding.ok
    assert "OperationalError" in finding.seen
    assert finding.fix.startswith("unset DATABASE_URL")


def test_failures_stop_the_notebook_with_every_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(environment, "check_python", lambda: Finding("Python", False, "3.9.1", "use 3.11"))
    with pytest.raises(EnvironmentNotReady) as failure:
        asyncio.run(check_environment(quiet=True))
    message = str(failure.value)
    assert message.startswith("2 of 7 checks failed.")
    assert "- Python: use 3.11\n- Redis: unset REDIS_URL" in message


def test_a_finding_prints_its_fix_only_when_it_failed() -> None:
    assert str(Finding("plots", True, "fine", "never shown")) == "✅ plots: fine"
    assert str(Finding("plots", False, "broken", "do this")) == "❌ plots: broken\n     fix: do this"
