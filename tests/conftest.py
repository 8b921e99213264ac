"""Shared fixtures: a small app with endpoints of known behaviour, served for the test."""

from __future__ import annotations

import time
from collections.abc import Iterator

import matplotlib
import pytest
from fastapi import FastAPI, Header, Response

import support
from support.bench import bench_app
from support.checks import reset_hints

matplotlib.use("Agg")


def make_app() -> FastAPI:
    """The benchmark's ``/ping`` and ``/sleep?s=…``, plus endpoints of known misbehaviour."""
    app = bench_app()

    @app.get("/block")
    async def block(s: float = 0.05) -> dict[str, float]:
        time.sleep(s)  # blocks the server's event loop on purpose
        return {"blocked": s}

    @app.get("/status/{code}")
    async def status(code: int) -> Response:
        return Response(status_code=code)

    @app.get("/close")
    async def close() -> Response:
        return Response("bye", headers={"Connection": "close"})

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom from the app")

    @app.post("/echo")
    async def echo(body: dict) -> dict:
        return body

    @app.get("/headers")
    async def headers(x_client: str = Header("")) -> dict[str, str]:
        return {"client": x_client}

    return app


@pytest.fixture
def server() -> Iterator[support.Server]:
    with support.serve(make_app(), name="test-server") as running:
        yield running


@pytest.fixture(autouse=True)
def _clean_state() -> Iterator[None]:
    reset_hints()
    yield
    support.stop_all()
