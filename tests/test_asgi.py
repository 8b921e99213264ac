"""support.asgi.call hands an app header bytes that no HTTP client would send."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from support.asgi import call


def test_raw_header_bytes_reach_the_app_unchanged() -> None:
    app = FastAPI()

    @app.get("/echo")
    async def echo(request: Request) -> dict[str, object]:
        raw = [v.decode("latin-1") for k, v in request.scope["headers"] if k == b"x-request-id"]
        return {"raw": raw, "q": request.query_params.get("q")}

    hostile = b"abc\n2026-11-25 INFO forged \x1b[31m" + b"\xff"
    response = asyncio.run(call(app, "/echo?q=1", headers=[("X-Request-ID", hostile)]))
    assert response.status == 200
    assert response.header("content-type") == "application/json"
    assert response.header("missing") is None
    assert json.loads(response.body) == {"raw": [hostile.decode("latin-1")], "q": "1"}


def test_streaming_responses_are_not_cut_short() -> None:
    app = FastAPI()

    async def chunks():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield f"{i};"

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(chunks())

    response = asyncio.run(call(app, "/stream"))
    assert response.body == b"0;1;2;"
