"""An app with endpoints of known behaviour, for the tests of support/."""

from __future__ import annotations

import time

from fastapi import FastAPI, Header, Response

from support.bench import bench_app


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
