"""Check that this kernel can run the course, and say how to fix what it cannot.

    findings = await support.environment.check_environment()   # in the start-here notebook

Each check returns a ``Finding``: what was checked, whether it is fine, what was seen, and, when it is
not fine, the one thing to do about it. ``check_environment`` prints one line per finding and raises
``EnvironmentNotReady`` (listing every fix) if any failed, so "Run All" stops at the first notebook cell
that cannot work rather than somewhere inside a chapter.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import os
import platform
import sys
import tempfile
import threading
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = ["EnvironmentNotReady", "Finding", "check_environment", "pinned_versions"]

ROOT = Path(__file__).resolve().parent.parent
_INSTALL = (
    "run `python course.py lab` from the course folder (it installs the pinned versions), "
    "or `pip install -r requirements.txt`"
)


@dataclass(frozen=True)
class Finding:
    what: str
    ok: bool
    seen: str
    fix: str = ""

    def __str__(self) -> str:
        line = f"{'✅' if self.ok else '❌'} {self.what}: {self.seen}"
        return line if self.ok else f"{line}\n     fix: {self.fix}"


class EnvironmentNotReady(RuntimeError):
    """Raised by ``check_environment`` when something the course needs is missing or broken."""


def pinned_versions() -> dict[str, str]:
    """Package name → pinned version, read from requirements.txt by course.py's own parser."""
    spec = importlib.util.spec_from_file_location("course", ROOT / "course.py")
    assert spec is not None and spec.loader is not None
    course = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(course)
    return course._pins()


def check_python() -> Finding:
    version = platform.python_version()
    ok = sys.version_info >= (3, 11)
    return Finding("Python", ok, f"{version} at {sys.executable}", "use Python 3.11 or newer")


def check_packages() -> Finding:
    wrong, missing = [], []
    for name, version in pinned_versions().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
            continue
        if installed != version:
            wrong.append(f"{name} {installed} (pinned {version})")
    if not wrong and not missing:
        return Finding("pinned packages", True, f"all {len(pinned_versions())} at their pinned versions")
    seen = "; ".join(filter(None, [f"missing: {', '.join(missing)}" if missing else "", ", ".join(wrong)]))
    if missing:
        return Finding("pinned packages", False, seen, _INSTALL + ", then restart the kernel")
    # Other versions usually work; the course is tested with the pinned ones.
    return Finding("pinned packages", True, f"runs, but with other versions than the tested pins: {seen}")


def check_kernel() -> Finding:
    """The kernel must be this course's Python, else `import support` finds nothing or the wrong one."""
    support_dir = Path(__file__).resolve().parent
    ok = support_dir.parent == ROOT and (ROOT / "notebooks").is_dir()
    return Finding(
        "course package",
        ok,
        f"support/ imported from {support_dir}",
        "open the notebooks with `python course.py lab`, or choose the kernel of the course's .venv",
    )


def check_server() -> Finding:
    """Start an app in-process on 127.0.0.1, call it, stop it: what every chapter does."""
    import httpx
    from fastapi import FastAPI

    from support.server import ServerFailedToStart, serve

    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    try:
        with serve(app, name="environment-check") as server:
            answer = httpx.get(f"{server.url}/ping", timeout=5).json()
    except (ServerFailedToStart, httpx.HTTPError, OSError) as exc:
        return Finding(
            "in-process server",
            False,
            f"{type(exc).__name__}: {exc}",
            "something on this machine stops local connections to 127.0.0.1 (a firewall or proxy "
            "setting such as HTTP_PROXY without NO_PROXY=127.0.0.1): allow them, then restart the kernel",
        )
    return Finding("in-process server", answer == {"ok": True}, f"started, answered {answer}, stopped")


def check_plots() -> Finding:
    import matplotlib
    import matplotlib.pyplot as plt

    backend = matplotlib.get_backend()
    figure, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [0, 1])
    png = io.BytesIO()
    figure.savefig(png, format="png")
    plt.close(figure)
    inline = "inline" in backend.lower() or "agg" in backend.lower()
    return Finding(
        "plots",
        png.tell() > 0 and inline,
        f"backend {backend}, a test figure rendered ({png.tell():,} bytes of PNG)",
        "run the notebook in JupyterLab (the inline backend); in a script, set MPLBACKEND=Agg",
    )


async def check_redis() -> Finding:
    from support.backends import describe_redis, redis_client

    client = redis_client()
    try:
        await client.set("course:environment-check", "ok", ex=10)
        ok = await client.get("course:environment-check") == b"ok"
        await client.delete("course:environment-check")
    except Exception as exc:  # any failure here means the same fix
        return Finding(
            "Redis",
            False,
            f"{describe_redis()}: {type(exc).__name__}: {exc}",
            "unset REDIS_URL to use the embedded fakeredis, or start the server it names",
        )
    finally:
        await client.aclose()
    return Finding("Redis", ok, describe_redis())


async def check_database() -> Finding:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from support.database import describe_database, fresh_database

    url = fresh_database("environment-check")
    engine = create_async_engine(url)
    before = set(threading.enumerate())
    try:
        async with engine.connect() as conn:
            answer = (await conn.execute(text("SELECT 1"))).scalar()
    except Exception as exc:  # any failure here means the same fix
        return Finding(
            "database",
            False,
            f"{describe_database(url)}: {type(exc).__name__}: {exc}",
            "unset DATABASE_URL to use the embedded SQLite, or check the URL (driver installed? server up?)"
            if os.environ.get("DATABASE_URL")
            else f"the temporary directory {tempfile.gettempdir()} must be writable",
        )
    finally:
        await engine.dispose()
        # aiosqlite gives each connection a thread; let them finish while this loop still runs,
        # or a failed connection's thread reports to a closed loop.
        for thread in set(threading.enumerate()) - before:
            if "_connection_worker_thread" not in thread.name:
                continue
            await asyncio.to_thread(thread.join, 10)  # generous: a loaded machine is slow
    return Finding("database", answer == 1, describe_database(url))


async def check_environment(*, quiet: bool = False) -> list[Finding]:
    """Run every check, print one line each, and raise ``EnvironmentNotReady`` if any failed."""
    findings = [check_python(), check_kernel(), check_packages(), check_server(), check_plots()]
    findings += [await check_redis(), await check_database()]
    if not quiet:
        print(*findings, sep="\n")
    failed = [f for f in findings if not f.ok]
    if failed:
        fixes = "\n".join(f"- {f.what}: {f.fix}" for f in failed)
        raise EnvironmentNotReady(
            f"{len(failed)} of {len(findings)} checks failed. Fix these, restart the kernel, "
            f"and run the notebook again:\n{fixes}"
        )
    return findings
