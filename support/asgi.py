"""Call an ASGI app directly, with header bytes no HTTP client would send.

HTTP servers reject some hostile header values before the app sees them (uvicorn's default parser
refuses control characters), but middleware is also reached by other servers, proxies and test
clients. Calling the app with a hand-made ASGI scope shows what the middleware itself does with
any bytes at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AsgiResponse", "call"]


@dataclass
class AsgiResponse:
    """What the app sent: status, raw headers, and the body."""

    status: int
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), decoded as latin-1; None if absent."""
        wanted = name.lower().encode("latin-1")
        for key, value in self.raw_headers:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return None


async def call(
    app: Any,
    path: str = "/",
    *,
    method: str = "GET",
    headers: Sequence[tuple[bytes | str, bytes | str]] = (),
    body: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 50000),
    raise_app_exceptions: bool = True,
) -> AsgiResponse:
    """Send one HTTP request straight into ``app`` and collect its response.

    ``headers`` are passed as given (str is encoded as latin-1, names are lower-cased), so a value
    may hold a newline, an escape character or 10 kB: exactly what the app's middleware receives.

    An exception the app raises is raised here, as a server would see it (Starlette's outermost
    ``ServerErrorMiddleware`` sends its 500 and then re-raises). With ``raise_app_exceptions=False``
    the response sent before the exception is returned instead, as a client would see it; an
    exception raised before any response started is raised either way.
    """
    raw = [
        (
            (k.encode("latin-1") if isinstance(k, str) else k).lower(),
            v.encode("latin-1") if isinstance(v, str) else v,
        )
        for k, v in headers
    ]
    path_only, _, query = path.partition("?")
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path_only,
        "raw_path": path_only.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver"), *raw],
        "client": client,
        "server": ("testserver", 80),
        "state": {},
    }
    sent_body = False
    finished = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # like a client that stays connected until the response is complete
        return {"type": "http.disconnect"}

    response = AsgiResponse(status=0)

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            response.status = message["status"]
            response.raw_headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            response.body += message.get("body", b"")
            if not message.get("more_body", False):
                finished.set()

    try:
        await app(scope, receive, send)
    except Exception:
        if raise_app_exceptions or response.status == 0:
            raise
    finally:
        finished.set()
    return response
