"""Checks for chapter 3's exercises: observability.

Exercise 3.1's middleware is called straight through its ASGI interface (``support.asgi.call``), so
the check can send header bytes no HTTP client would, and needs no server. Exercise 3.2's spans go to
a tracer provider of the check's own, with a ``SimpleSpanProcessor`` and an in-memory exporter, so
every span is there the moment it ends; ``slowest_step`` is also given traces the check builds with
set times (a root or a query with more time of its own than any step, a gap between a step's
children), so no clock decides those. Exercise 3.3's app is served in-process and scraped.
Exercise 3.4's app is called through ASGI too, with two tracer providers of the check's own (the
service's and the worker's, spans in memory) and a queue of the check's own that stores each job's
arguments as JSON; the check then runs the jobs as a worker would, each in a task with a fresh
context, and reads the span that was current at each enqueue and at each send.

Where time matters (which checkout step is slow), the slow step sleeps several times longer than
anything it is compared with, and each comparison is a ratio, not a deadline. Every server and
tracer provider a check starts is stopped before it returns.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import httpx
import prometheus_client
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Tracer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from support.asgi import AsgiResponse, call
from support.checks import Mismatch, exercise, expect
from support.checks.running import (
    NoReturn,
    find_route,
    in_fresh_loop,
    joins_new_threads,
    serve_answer,
    short,
)
from support.metrics import histogram_quantile
from support.server import Server
from support.telemetry import Tracing, self_time, tracing

__all__ = [
    "check_checkout_spans",
    "check_job_joins_trace",
    "check_latency_histogram",
    "check_request_id_middleware",
]

_SERVE_FAILED = "The app failed while starting: fix its error, run the cell again, then this check."
SOLUTION = "solutions/03_observability_exercises.ipynb"


# ---------------------------------------------------------------------------------------------------
# Plumbing shared by the checks
# ---------------------------------------------------------------------------------------------------


def _raise_server_error(server: Server, statuses: Sequence[int], what: str) -> None:
    """After a 5xx: re-raise what the app raised (a placeholder, or the learner's own error)."""
    raised = server.wait_for_exception()
    if isinstance(raised, ValueError) and "Duplicated timeseries" in str(raised):
        raise Mismatch(
            "the histogram created in the registry the middleware is given",
            "prometheus_client refused to register it: 'Duplicated timeseries'. A metric of that name "
            "is already in the registry it went to: the global default REGISTRY, filled when the cell "
            "first ran",
            [
                "A metric created without `registry=` goes into the default registry, which lives as "
                "long as the kernel: creating it again, from a re-run cell, fails.",
                "`Histogram(…, registry=registry)`; then restart the kernel (or re-run every cell from "
                "the top) to forget the one in the default registry.",
            ],
        ) from None
    if raised is not None:
        raise raised
    raise Mismatch(what, f"statuses {dict(Counter(statuses))}")


# ---------------------------------------------------------------------------------------------------
# Exercise 3.1: a correlation-ID middleware
# ---------------------------------------------------------------------------------------------------

_WHOAMI = "/whoami"
_SANE = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CONCURRENT = 20
_CALL_3_1 = "Call the check as `check_request_id_middleware(ids_app, request_id_var)`."
_KEPT: dict[str, bytes] = {
    "a sane ID": b"checkout-42.a_b",
    "64 characters, the longest allowed": b"req-" + b"0123456789" * 6,
}
_MISSING: dict[str, bytes | None] = {"no X-Request-ID header": None, "an empty X-Request-ID": b""}
_FULLMATCH_HINT = (
    'Accept the header only if `re.fullmatch(r"[A-Za-z0-9._-]{1,64}", incoming)`, '
    "else use `uuid.uuid4().hex`."
)
_NO_CHECK_HINT = (
    "The header is whatever the client sent, and it ends up in every log line: accept it only if it "
    "is 1 to 64 ASCII letters, digits, `.`, `_` or `-`."
)

_EMPTY_HINTS = (
    "An empty ID is no ID: every request that sends one would share it in the logs.",
    "`{1,64}` asks for at least one character; `*` or `{0,64}` accepts none. " + _FULLMATCH_HINT,
)


@dataclass(frozen=True)
class _Hostile:
    label: str
    value: bytes
    hints: tuple[str, ...]


_HOSTILE = (
    _Hostile(
        "65 characters",
        b"a" * 65,
        (
            "An ID a character too long was kept: bound the length at 64.",
            "`{1,64}` bounds it; `+` or `*` does not. " + _FULLMATCH_HINT,
        ),
    ),
    _Hostile(
        "10 kB",
        b"A" * 10_000,
        (
            "A 10 kB ID would be copied into every log line of the request: bound the length at 64.",
            "`{1,64}` bounds it; `+` or `*` does not. " + _FULLMATCH_HINT,
        ),
    ),
    _Hostile(
        "a newline (a forged log line)",
        b"abc\n2026-01-01 INFO payment refunded",
        (_NO_CHECK_HINT, _FULLMATCH_HINT),
    ),
    _Hostile(
        "a trailing newline",
        b"abc123\n",
        (
            "`$` matches at the very end *and* just before a final newline, so `re.match(r'^…$')` "
            "accepts 'abc123\\n'.",
            "Match the whole string, and nothing after it: `re.fullmatch(pattern, incoming)` (or `\\Z`).",
        ),
    ),
    _Hostile("an escape character (ESC)", b"\x1b[31mred\x1b[0m", (_NO_CHECK_HINT, _FULLMATCH_HINT)),
    _Hostile(
        "non-ASCII digits",
        "١٢٣".encode(),
        (
            "`\\w` and `\\d` match any Unicode letter or digit, such as Arabic-Indic '١٢٣', not only "
            "ASCII ones.",
            "Spell the class out: `[A-Za-z0-9._-]` (or compile with `re.ASCII`).",
        ),
    ),
    _Hostile(
        "brackets, a caret, a backtick and a backslash",
        b"a[b]^c`d\\e",
        (
            "`A-z` is a range of code points: besides the letters it spans `[ \\ ] ^ _` and the "
            "backtick, which sit between 'Z' and 'a'.",
            "Give the letters as two ranges: `[A-Za-z0-9._-]`.",
        ),
    ),
    _Hostile(
        "the Kelvin sign (U+212A)",
        "\u212aey".encode(),
        (
            "With `re.IGNORECASE`, `[a-z]` also matches non-ASCII letters that case-fold into it: the "
            "Kelvin sign 'K', the long s 'ſ', the dotless 'ı'.",
            "Spell out both cases, `[A-Za-z0-9._-]`, without IGNORECASE (or add `re.ASCII`), and decode "
            "the header as latin-1.",
        ),
    ),
    _Hostile("bytes that are not UTF-8", b"\xff\xfeid", (_NO_CHECK_HINT, _FULLMATCH_HINT)),
)


@dataclass(frozen=True)
class _Seen:
    """One request through the middleware: what was sent, what the handler saw, what came back."""

    label: str
    sent: bytes | None
    status: int
    handler: str | None  # the ID the handler read from request_id_var
    echoed: str | None  # the response's X-Request-ID

    def kept(self) -> bool:
        if self.sent is None or self.handler is None:
            return False
        return self.handler in {self.sent.decode("latin-1"), self.sent.decode("utf-8", "replace")}


def _from_handler(response: AsgiResponse) -> str | None:
    try:
        value = json.loads(response.body)["request_id"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, str) else None


async def _send(app: Any, label: str, value: bytes | None) -> _Seen:
    headers = [] if value is None else [(b"x-request-id", value)]
    try:
        response = await call(app, _WHOAMI, headers=headers)
    except UnicodeError as exc:
        raise Mismatch(
            f"status 200 and a fresh ID for a request with {label} ({short(value, 30)})",
            f"the middleware raised {type(exc).__name__}: {short(str(exc), 70)}",
            [
                "Header values are bytes, and a client may send any bytes: decoding them as UTF-8 "
                "fails on some, and the request then fails instead of getting a fresh ID.",
                'Decode with `.decode("latin-1")`, which cannot fail (one character per byte), then '
                "fullmatch: any byte outside ASCII fails the pattern.",
            ],
        ) from None
    return _Seen(label, value, response.status, _from_handler(response), response.header("x-request-id"))


def _check_answered(seen: _Seen) -> None:
    expect(
        seen.status == 200,
        f"status 200 for a request with {seen.label}",
        f"status {seen.status}",
        "Do not refuse a request for its ID: replace a missing or bad ID with a fresh one and go on.",
    )
    expect(
        seen.handler is not None,
        'the handler\'s answer, {"request_id": …}',
        short(seen.handler),
        f"Keep the given endpoint `GET {_WHOAMI}`: it returns `request_id_var.get()`.",
    )


def _check_echoed(seen: _Seen) -> None:
    expect(
        seen.echoed is not None,
        f"an X-Request-ID header on the response (for {seen.label})",
        "none",
        "The client needs the ID to quote it in a bug report: add it to the response's headers.",
        "Wrap `send`: on the `http.response.start` message, "
        '`message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]`.',
    )
    expect(
        seen.echoed == seen.handler,
        f"the response to echo the ID the handler saw (for {seen.label})",
        f"echoed {short(seen.echoed)}, the handler saw {short(seen.handler)}",
        "Echo the ID you decided on (the incoming one, or the fresh one), not the raw header.",
    )


def _is_piece_of(candidate: str, sent: bytes) -> bool:
    """Whether ``candidate`` is made of the sent header's characters, in order (truncated, cleaned)."""
    for text in {sent.decode("latin-1"), sent.decode("utf-8", "replace")}:
        rest = iter(text)
        if all(char in rest for char in candidate):
            return True
    return False


def _check_fresh(results: list[_Seen]) -> None:
    """Each request whose header was missing or bad got a sane ID of its own, echoed."""
    for seen in results:
        _check_answered(seen)
    kept = [s for s in results if s.kept()]
    if kept:
        hints = {h.label: h.hints for h in _HOSTILE} | {"an empty X-Request-ID": _EMPTY_HINTS}
        listed = "; ".join(f"{s.label}: {short(s.handler, 40)}" for s in kept)
        raise Mismatch(
            "each missing or bad ID replaced with a fresh one",
            f"{len(kept)} of {len(results)} kept as sent ({listed})",
            hints.get(kept[0].label, (_NO_CHECK_HINT, _FULLMATCH_HINT)),
        )
    for seen in results:
        assert seen.handler is not None
        expect(
            _SANE.fullmatch(seen.handler),
            f"a fresh, sane ID for {seen.label} (1 to 64 of A-Z a-z 0-9 . _ -)",
            f"the handler saw {short(seen.handler)}",
            "Make the new ID with `uuid.uuid4().hex`: 32 hex digits.",
        )
        expect(
            seen.sent is None or seen.sent == b"" or not _is_piece_of(seen.handler, seen.sent),
            f"a fresh ID for {seen.label}, not a piece of the header",
            f"the handler saw {short(seen.handler)}, cut or cleaned from {short(seen.sent)}",
            "Truncating or cleaning an untrusted ID still lets the client choose it: replace it.",
            "Use the header only if it fullmatches as it is; otherwise `uuid.uuid4().hex`.",
        )
        _check_echoed(seen)
    ids = Counter(s.handler for s in results)
    repeated = [rid for rid, n in ids.items() if n > 1]
    expect(
        not repeated,
        f"a different fresh ID for each of the {len(results)} requests",
        f"{ids[repeated[0]]} requests got {short(repeated[0])}" if repeated else "",
        "A constant fallback ('-', 'unknown') ties unrelated requests together in the logs.",
        "Make a new one for each request: `uuid.uuid4().hex`.",
    )


def _check_kept(app: Any) -> None:
    async def main() -> list[_Seen]:
        return [await _send(app, label, value) for label, value in _KEPT.items()]

    for seen in in_fresh_loop(main, timeout=10, name="check-3.1-kept"):
        _check_answered(seen)
        expect(
            seen.kept(),
            f"{seen.label} ({short(seen.sent, 40)}) kept, so the request keeps its ID across services",
            f"the handler saw {short(seen.handler)}",
            "Accept an incoming ID of 1 to 64 ASCII letters, digits, `.`, `_` or `-`: other services "
            "send theirs, and the logs of both must share it.",
            "Set the context variable to the incoming ID when it fullmatches "
            "`[A-Za-z0-9._-]{1,64}` (64 included).",
        )
        _check_echoed(seen)


def _check_missing(app: Any) -> None:
    async def main() -> list[_Seen]:
        return [await _send(app, label, value) for label, value in _MISSING.items()]

    _check_fresh(in_fresh_loop(main, timeout=10, name="check-3.1-missing"))


def _check_hostile(app: Any) -> None:
    async def main() -> list[_Seen]:
        return [await _send(app, h.label, h.value) for h in _HOSTILE]

    _check_fresh(in_fresh_loop(main, timeout=10, name="check-3.1-hostile"))


def _check_concurrent(app: Any) -> None:
    ids = [f"ex31-req-{i:02d}" for i in range(_CONCURRENT)]

    async def main() -> list[_Seen]:
        return list(await asyncio.gather(*(_send(app, rid, rid.encode()) for rid in ids)))

    results = in_fresh_loop(main, timeout=10, name="check-3.1-concurrent")
    for seen in results:
        _check_answered(seen)
    wrong = [s for s in results if s.handler != s.label]
    if wrong:
        example = f"the handler of {wrong[0].label!r} saw {short(wrong[0].handler)}"
        raise Mismatch(
            f"each of {_CONCURRENT} concurrent requests to see its own ID",
            f"{len(wrong)} of {_CONCURRENT} saw another one ({example}): a value shared by all requests "
            "(a module-level variable, an attribute of the middleware) was overwritten by a later request",
            [
                "Each request runs in its own task, with its own copy of the context: a context "
                "variable set in the middleware is that request's alone.",
                "Keep the ID in the context variable: `token = request_id_var.set(rid)`, and let the "
                "handler read `request_id_var.get()`.",
            ],
        )
    echoed = [s for s in results if s.echoed != s.label]
    if echoed:
        example = f"{echoed[0].label!r} came back as {short(echoed[0].echoed)}"
        raise Mismatch(
            f"each of {_CONCURRENT} concurrent responses to echo its own request's ID",
            f"{len(echoed)} of {_CONCURRENT} echoed another one ({example}): the middleware object is "
            "shared by all requests, and a later request overwrote what it kept",
            [
                "One middleware instance serves every request at once: nothing per-request belongs on "
                "`self` or in a module-level variable.",
                "Keep the ID in a local variable of `__call__`, which the `send` wrapper defined inside "
                "`__call__` closes over.",
            ],
        )


def _check_app_headers(app: Any) -> None:
    async def main() -> Any:
        return await call(app, _WHOAMI, headers=[(b"x-request-id", b"ex31-headers")])

    response = in_fresh_loop(main, timeout=10, name="check-3.1-headers")
    names = sorted({name.decode("latin-1").lower() for name, _ in response.raw_headers})
    expect(
        response.header("content-type") == "application/json" and response.header("content-length"),
        "the app's own headers (content-type: application/json, content-length) beside X-Request-ID",
        f"the response's headers: {', '.join(names) or 'none'}",
        "Add X-Request-ID to the headers the app sent, rather than replacing them: without "
        "content-type and content-length the client cannot read the body.",
        '`message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]`.',
    )


_OUTSIDE = "ex31-outside"


def _probe_app(app: Any, request_id_var: ContextVar[str], seen: list[str]) -> Any:
    """A FastAPI app of the check's own, behind the learner's middleware: a background task, an error."""
    from fastapi import FastAPI
    from starlette.background import BackgroundTask
    from starlette.responses import JSONResponse

    middleware = list(getattr(app, "user_middleware", []))
    expect(
        middleware,
        "the middleware added to ids_app with `ids_app.add_middleware(RequestIDMiddleware)`",
        "no middleware on the app",
        "Keep the given line `ids_app.add_middleware(RequestIDMiddleware)`.",
    )
    probe = FastAPI(middleware=middleware)

    async def record() -> None:
        await asyncio.sleep(0.01)
        seen.append(request_id_var.get())

    @probe.get("/later")
    async def later() -> JSONResponse:
        return JSONResponse({"ok": True}, background=BackgroundTask(record))

    @probe.get("/boom")
    async def boom() -> None:
        raise RuntimeError("ex31: the endpoint failed")

    return probe


def _check_background(app: Any, request_id_var: ContextVar[str]) -> None:
    seen: list[str] = []
    probe = _probe_app(app, request_id_var, seen)

    async def main() -> None:
        request_id_var.set(_OUTSIDE)
        await call(probe, "/later", headers=[(b"x-request-id", b"ex31-later")])

    in_fresh_loop(main, timeout=10, name="check-3.1-background")
    expect(
        seen == ["ex31-later"],
        "a background task of the request to see its ID, 'ex31-later'",
        f"it saw {short(seen[0]) if seen else 'nothing (it did not run)'}: the variable was put back "
        "before the task ran",
        "Starlette runs a request's background tasks after the response's last body message is sent, "
        "still inside `await self.app(…)`: the request is not over when its response is.",
        "Reset the variable after `await self.app(scope, receive, send_with_id)` returns (in a "
        "`finally:`), not in `send`.",
    )


def _check_reset_on_error(app: Any, request_id_var: ContextVar[str]) -> None:
    probe = _probe_app(app, request_id_var, [])

    async def main() -> tuple[str, BaseException | None]:
        request_id_var.set(_OUTSIDE)
        raised: BaseException | None = None
        try:
            await call(probe, "/boom", headers=[(b"x-request-id", b"ex31-boom")])
        except RuntimeError as exc:
            raised = exc
        return request_id_var.get(), raised

    after, _ = in_fresh_loop(main, timeout=10, name="check-3.1-error")
    expect(
        after == _OUTSIDE,
        f"request_id_var back to {_OUTSIDE!r} after a request whose endpoint raised",
        f"{after!r}",
        "When the app raises, the code after `await self.app(…)` never runs: the ID stays behind in "
        "the context that ran the request.",
        "`token = request_id_var.set(rid)`, then `try: await self.app(scope, receive, send_with_id)` "
        "and `finally: request_id_var.reset(token)`.",
    )


def _check_reset(app: Any, request_id_var: ContextVar[str]) -> None:
    async def main() -> tuple[str, str]:
        request_id_var.set(_OUTSIDE)  # this task's own context: the notebook's is not touched
        await _send(app, "a sane ID", b"ex31-inside")
        return _OUTSIDE, request_id_var.get()

    before, after = in_fresh_loop(main, timeout=10, name="check-3.1-reset")
    expect(
        after == before,
        f"request_id_var back to {before!r} once the request is done",
        f"{after!r}",
        "What runs after the request in the same context (the server's next step, a test, another "
        "app around this one) would still see this request's ID.",
        "`token = request_id_var.set(rid)`, then `try: await self.app(scope, receive, send_with_id)` "
        "and `finally: request_id_var.reset(token)`.",
    )


def check_request_id_middleware(app: Any, request_id_var: ContextVar[str]) -> None:
    """Check Exercise 3.1: the middleware keeps a sane X-Request-ID, replaces anything else, returns it.

    Calls ``app`` (with the learner's middleware) through ASGI, ``GET /whoami``, whose handler returns
    ``request_id_var.get()``: a sane ID and one of 64 characters are kept, seen by the handler and
    echoed in ``X-Request-ID``; a missing or empty header, 65 characters, 10 kB, a newline, a trailing
    newline, an ESC and non-ASCII digits each get a fresh, sane, distinct ID, seen and echoed; 20
    concurrent requests each see and get back their own; and ``request_id_var`` is reset afterwards.
    """
    with exercise("3.1", "A correlation-ID middleware", SOLUTION) as ex:

        def arguments() -> None:
            find_route(app, "GET", _WHOAMI, "ids_app")
            expect(
                isinstance(request_id_var, ContextVar),
                "the context variable `request_id_var`",
                short(request_id_var),
                _CALL_3_1,
            )

        if not ex.step(f"the app has a GET {_WHOAMI} endpoint", arguments):
            return
        if not ex.step(
            "a sane X-Request-ID (up to 64 characters) is kept, seen by the handler and echoed",
            lambda: _check_kept(app),
        ):
            return
        ex.step(
            "the response keeps the app's own headers beside X-Request-ID", lambda: _check_app_headers(app)
        )
        ex.step(
            "a missing or empty X-Request-ID gets a fresh ID, seen by the handler and echoed",
            lambda: _check_missing(app),
        )
        ex.step(
            "a hostile X-Request-ID (too long, a newline, ESC, punctuation, non-ASCII, not UTF-8) is "
            "replaced by a fresh one",
            lambda: _check_hostile(app),
        )
        ex.step(
            f"{_CONCURRENT} concurrent requests each see, and get back, their own ID",
            lambda: _check_concurrent(app),
        )
        ex.step("request_id_var is reset once the request is done", lambda: _check_reset(app, request_id_var))
        ex.step(
            "request_id_var is reset even when the endpoint raises",
            lambda: _check_reset_on_error(app, request_id_var),
        )
        ex.step(
            "a background task of the request still sees its ID",
            lambda: _check_background(app, request_id_var),
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 3.2: custom spans, and the slow step
# ---------------------------------------------------------------------------------------------------

_STEPS = ("validate", "price", "reserve")
_PARENT = "checkout"
_CHILD = "db.query"
_SLOW = 0.1  # the slow step sleeps this long, in its own code
_SLOW_QUERIES, _SLOW_QUERY = 5, 0.04  # ... then makes this many child spans at once, each this long
_QUERIES, _QUERY = (
    8,
    0.025,
)  # the busy step makes this many child spans, one after the other: longer, not slower
_FAST = 0.005
_FAILED = "ex32: the card was declined"
_CALL_3_2 = "Call the check as `check_checkout_spans(checkout, slowest_step)`."
_START_AS_CURRENT = (
    '`with tracer.start_as_current_span(f"checkout.{name}", attributes={"order.id": order["id"]}):` '
    "around `await steps[name](order)`."
)


def _span_name(step: str) -> str:
    return f"{_PARENT}.{step}"


@dataclass
class _Checkout:
    """One checkout the check ran: which step was slow, which was busy, and what came of it."""

    slow: str
    busy: str
    order_id: str
    fail: str | None = None  # the step that raises, if any
    calls: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)  # "start <step>", "end <step>", in order
    spans: list[ReadableSpan] = field(default_factory=list)  # in the order they ended
    parent: ReadableSpan | None = None
    raised: BaseException | None = None  # what checkout raised (the run with a failing step)
    current_after: str = ""  # the current span's name once checkout returned or raised

    def step_spans(self, step: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == _span_name(step)]


def _plan() -> list[tuple[str, str]]:
    """Two checkouts' (slow step, busy step): the slow steps differ, the busy step is another one."""
    first, second = random.sample(_STEPS, 2)
    return [(slow, random.choice([s for s in _STEPS if s != slow])) for slow in (first, second)]


async def _reference_checkout(order: dict[str, Any], tracer: Tracer, steps: dict[str, Any]) -> None:
    for name in _STEPS:
        with tracer.start_as_current_span(_span_name(name), attributes={"order.id": order["id"]}):
            await steps[name](order)


async def _run_checkout(
    checkout: Callable[..., Any], traced: Tracing, slow: str, busy: str, fail: str | None = None
) -> _Checkout:
    traced.clear()
    tracer = traced.tracer
    run = _Checkout(slow, busy, f"ord-{random.randrange(16**6):06x}", fail)
    made: list[Coroutine[Any, Any, None]] = []

    async def query(seconds: float) -> None:
        with tracer.start_as_current_span(_CHILD):
            await asyncio.sleep(seconds)

    async def work(step: str) -> None:
        run.calls.append(step)
        run.events.append(f"start {step}")
        try:
            if step == fail:
                await asyncio.sleep(_FAST)
                raise RuntimeError(_FAILED)
            if step == slow:
                await asyncio.sleep(_SLOW)
                await asyncio.gather(*(query(_SLOW_QUERY) for _ in range(_SLOW_QUERIES)))
            elif step == busy:
                for _ in range(_QUERIES):
                    await query(_QUERY)
            else:
                await asyncio.sleep(_FAST)
        finally:
            run.events.append(f"end {step}")

    def step_function(step: str) -> Callable[[dict[str, Any]], Coroutine[Any, Any, None]]:
        def step_call(order: dict[str, Any]) -> Coroutine[Any, Any, None]:
            coroutine = work(step)
            made.append(coroutine)
            return coroutine

        step_call.__name__ = step
        return step_call

    steps = {name: step_function(name) for name in reversed(_STEPS)}  # not in the order to run them
    order = {"id": run.order_id, "items": ["lamp", "book"]}
    try:
        with tracer.start_as_current_span(_PARENT) as parent:
            result = checkout(order, tracer, steps)
            expect(
                inspect.isawaitable(result),
                "an awaitable: `checkout` defined with `async def`",
                f"a plain function that returned {short(result)}",
                "The steps are coroutines, so `checkout` must be `async def checkout(…)` and "
                "`await steps[name](order)`.",
            )
            try:
                await result
            except RuntimeError as exc:
                if fail is None or str(exc) != _FAILED:
                    raise
                run.raised = exc
            current = otel_trace.get_current_span()
            run.current_after = getattr(current, "name", "") if current is not parent else _PARENT
    finally:
        for coroutine in made:
            if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
                coroutine.close()  # a step called but never awaited: no "never awaited" warning
    run.parent = next((s for s in traced.spans() if s.context == parent.get_span_context()), None)
    run.spans = sorted(traced.spans(), key=lambda s: s.end_time or 0)
    return run


def _run_all(
    checkout: Callable[..., Any], plan: list[tuple[str, str]], fail: str | None = None
) -> list[_Checkout]:
    traced = tracing("ch03-check", processor="simple", name="check-3.2")
    try:

        async def main() -> list[_Checkout]:
            return [await _run_checkout(checkout, traced, slow, busy, fail) for slow, busy in plan]

        return in_fresh_loop(main, timeout=10, name="check-3.2")
    finally:
        traced.stop()


def _check_steps_called(runs: list[_Checkout]) -> None:
    for run in runs:
        expect(
            run.calls == list(_STEPS),
            f"the steps called once each, in order: {', '.join(_STEPS)}",
            f"{', '.join(run.calls) or 'none'}",
            "Call each step once, in order, and await it: `await steps[name](order)` for `name` in "
            f"{_STEPS}: the order of the dict `steps` is not the order of the checkout.",
        )
        wanted = [f"{event} {step}" for step in _STEPS for event in ("start", "end")]
        expect(
            run.events == wanted,
            "each step to start once the one before it has finished",
            f"{', '.join(run.events[:4])} …: the steps ran at the same time",
            "A checkout's steps depend on each other (reserve what was priced): await each before "
            "starting the next, not `asyncio.gather`.",
            "`for name in STEPS:` … `await steps[name](order)` inside the span.",
        )


def _check_named_spans(runs: list[_Checkout]) -> None:
    for run in runs:
        names = Counter(s.name for s in run.spans if s is not run.parent and s.name != _CHILD)
        missing = [_span_name(step) for step in _STEPS if not run.step_spans(step)]
        if missing and not names:
            raise Mismatch(
                f"a finished span for each step: {', '.join(map(_span_name, _STEPS))}",
                "no finished span other than the check's own: spans that are never ended are never exported",
                [
                    "A span reaches the exporter when it ends: `tracer.start_span(…)` returns a span you "
                    "must end yourself.",
                    "Let a `with` block end it: " + _START_AS_CURRENT,
                ],
            )
        expect(
            not missing,
            f"a finished span for each step: {', '.join(map(_span_name, _STEPS))}",
            f"spans {dict(names)}",
            f"Name each step's span `checkout.<step>`, e.g. {_span_name(_STEPS[0])!r}: a dashboard "
            "finds spans by name.",
            '`with tracer.start_as_current_span(f"checkout.{name}", …):`',
        )
        many = {step: len(run.step_spans(step)) for step in _STEPS if len(run.step_spans(step)) > 1}
        expect(
            not many,
            "one span per step",
            ", ".join(f"{n} spans named {_span_name(step)!r}" for step, n in many.items()),
            "Start one span around each step's call, and nothing else under that name.",
        )


def _check_parents(runs: list[_Checkout]) -> None:
    for run in runs:
        assert run.parent is not None and run.parent.context is not None
        parent_id = run.parent.context.span_id
        for step in _STEPS:
            (span,) = run.step_spans(step)
            if span.parent is None:
                raise Mismatch(
                    f"{span.name} a child of the current span ({_PARENT!r}), in its trace",
                    f"{span.name} is the root of a trace of its own: the waterfall of this checkout "
                    "would not show it",
                    [
                        "A span started without an explicit `context=` takes the current span as its "
                        "parent; a new, empty `Context()` starts a new trace.",
                        "Do not pass `context=`: " + _START_AS_CURRENT,
                    ],
                )
            if span.parent.span_id != parent_id:
                other = next((s.name for s in run.spans if s.context.span_id == span.parent.span_id), "?")
                raise Mismatch(
                    f"{span.name} a child of the current span ({_PARENT!r})",
                    f"its parent is {other!r}: each step's span should end before the next one starts",
                    [
                        "End each step's span when its step returns: one `with` block per step, one after "
                        "the other, not nested."
                    ],
                )


def _check_attributes(runs: list[_Checkout]) -> None:
    for run in runs:
        for step in _STEPS:
            (span,) = run.step_spans(step)
            attributes = dict(span.attributes or {})
            expect(
                attributes.get("order.id") == run.order_id,
                f"the attribute order.id = {run.order_id!r} on {span.name}",
                f"attributes {short(attributes)}",
                "An attribute lets you find every span of one order: "
                '`attributes={"order.id": order["id"]}` when you start the span.',
                '`tracer.start_as_current_span(name, attributes={"order.id": order["id"]})` '
                "(the key is 'order.id', with a dot).",
            )


def _check_nesting(runs: list[_Checkout]) -> None:
    for run in runs:
        (busy,) = run.step_spans(run.busy)
        (slow,) = run.step_spans(run.slow)
        assert busy.context is not None and slow.context is not None
        ids = {busy.context.span_id, slow.context.span_id}
        queries = [s for s in run.spans if s.name == _CHILD]
        elsewhere = [s for s in queries if s.parent is None or s.parent.span_id not in ids]
        expect(
            not elsewhere,
            f"the {_CHILD!r} spans made inside steps {run.busy!r} and {run.slow!r} nested under their "
            "step's span",
            f"{len(elsewhere)} of {len(queries)} were not: they went to the step's parent, so the "
            "step's span was not the current span while the step ran",
            "`tracer.start_span(…)` (even in a `with`) starts a span without making it current; what "
            "the step's code traces then hangs off the step's parent instead.",
            "Make it current: " + _START_AS_CURRENT,
        )


def _fast_step(run: _Checkout) -> str:
    return next(s for s in _STEPS if s not in (run.slow, run.busy))


def _check_failure(failed: _Checkout, runs: list[_Checkout]) -> None:
    fail = failed.fail
    assert fail is not None
    expect(
        failed.raised is not None,
        f"checkout to raise the RuntimeError that step {fail!r} raised",
        "checkout returned normally: the caller cannot tell the checkout failed",
        "Record the error on the span if you like, but let it go on to the caller: a failed step "
        "fails the checkout.",
        "`start_as_current_span` records the exception on the span and re-raises it: no `try` needed.",
    )
    after = _STEPS[_STEPS.index(fail) + 1 :]
    expect(
        not any(step in failed.calls for step in after),
        f"no step after the failing {fail!r}",
        f"steps called: {', '.join(failed.calls)}",
        "Once a step has failed, the checkout stops: do not catch the exception to carry on.",
    )
    spans = failed.step_spans(fail)
    expect(
        len(spans) == 1,
        f"the span {_span_name(fail)} finished (and exported) although its step raised",
        "no finished span for it: the code that ends it never ran",
        "When the step raises, the lines after `await` are skipped: end the span in a `finally:`, or "
        "let a `with` block end it.",
        "Make it current: " + _START_AS_CURRENT,
    )
    attributes = dict(spans[0].attributes or {})
    tagged = all(  # order.id on this step's span when the step returns: the attributes step checks that
        dict(span.attributes or {}).get("order.id") == run.order_id
        for run in runs
        for span in run.step_spans(fail)
    )
    expect(
        attributes.get("order.id") == failed.order_id or not tagged,
        f"the attribute order.id = {failed.order_id!r} on {_span_name(fail)}, whose step raised",
        f"attributes {short(attributes)}, though the span carries it when its step returns: it is set "
        "after the step, a line that a step that raises skips",
        "The span of a failed step is the one you will search for by order: give it its attributes "
        "when you start it, before the step runs.",
        '`tracer.start_as_current_span(name, attributes={"order.id": order["id"]})`, or '
        '`span.set_attribute("order.id", order["id"])` before `await steps[name](order)`.',
    )
    expect(
        failed.current_after == _PARENT,
        f"the caller's span ({_PARENT!r}) current again once checkout has raised",
        f"the current span is {failed.current_after!r}: the step's context is still attached",
        "`context.attach(…)` must be matched by `context.detach(token)` in a `finally:`, or the step's "
        "span stays current for whatever the caller does next.",
        "Let `with tracer.start_as_current_span(…):` attach and detach it.",
    )


def _most_own_time(run: _Checkout) -> str:
    """The name of the step's span with the most time of its own in what the run recorded: the planned
    slow step, by some 100 ms, unless the machine stalled another step's code by more than that (the
    stall is that step's own time). The spans decide, as they would for the learner reading them."""
    steps = [s for s in run.spans if s.name.startswith(f"{_PARENT}.")]
    return max(steps, key=lambda s: self_time(s, run.spans)).name if steps else _span_name(run.slow)


def _timed_checkout() -> _Checkout:
    """A checkout like the live ones, made with set times: checkout.price slow (100 ms of its own, then
    five queries at once), checkout.reserve busy (eight queries one after the other), validate 5 ms.
    A stall can make another step slowest in a live run; here nothing can, so an answer that is right
    only when the slow step's children do not overlap (their durations summed) fails every time."""
    q = _CHILD
    trace = _trace(
        "set times",
        "price",
        [
            (_PARENT, None, 0, 360),
            ("checkout.validate", 0, 0, 5),
            ("checkout.price", 0, 5, 150),
            *[(q, 2, 105, 145 + n) for n in range(_SLOW_QUERIES)],
            ("checkout.reserve", 0, 150, 352),  # 2 ms of its own: the moments between its queries
            *[(q, 3 + _SLOW_QUERIES, 151 + 25 * n, 176 + 25 * n) for n in range(_QUERIES)],
        ],
    )
    return _Checkout("price", "reserve", f"ord-{random.randrange(16**6):06x}", spans=trace.spans)


def _check_slowest(slowest_step: Callable[..., Any], runs: list[_Checkout]) -> None:
    for run in [*runs, _timed_checkout()]:
        expected = _most_own_time(run)
        answer = slowest_step(list(run.spans))
        if not isinstance(answer, str) and hasattr(answer, "name"):
            raise Mismatch(
                f"the name of the slow step's span, a str: {expected!r}",
                f"a {type(answer).__name__} (named {short(getattr(answer, 'name', None))})",
                ["Return the span's name: `….name`."],
            )
        if answer in (expected, _span_name(run.slow)):
            continue
        durations = "; ".join(
            f"{s.name} {((s.end_time or 0) - (s.start_time or 0)) / 1e6:.0f} ms long, "
            f"{self_time(s, run.spans) * 1000:.0f} ms its own"
            for s in sorted(run.spans, key=lambda s: s.start_time or 0)
            if s.name != _CHILD
        )
        if answer == _PARENT:
            why = "the root span: it is always the longest, but its time is its children's"
        elif answer == _CHILD:
            why = "a query, not a step: the answer is one of the steps' spans"
        elif answer == _span_name(run.busy):
            why = (
                f"the longest step, whose time was spent in its {_QUERIES} {_CHILD!r} children, "
                "not in its own code"
            )
        elif answer == _span_name(_fast_step(run)):
            why = (
                f"the step with the least time of all; {_span_name(run.slow)}'s {_SLOW_QUERIES} "
                f"{_CHILD!r} children ran at the same time: subtracting the sum of their durations "
                "subtracts the same time several times"
            )
        else:
            why = "not the span with the most time of its own"
        raise Mismatch(
            f"{expected!r}, the span with the most time of its own (when {run.slow!r} is the slow step)"
            if expected == _span_name(run.slow)
            else f"{expected!r}, the span with the most time of its own in this run (something, most "
            f"likely a stall on this machine, gave it more than {_span_name(run.slow)!r}, the step made "
            "slow)",
            f"{short(answer)}: {why}. The spans: {durations}",
            [
                "A span's own time is its duration minus the time covered by its children; the slow "
                "step is the one with the most of it, whichever step that is.",
                "`return max(spans, key=lambda span: self_time(span, spans)).name`, with `self_time` "
                "from `support.telemetry`.",
            ],
        )


@dataclass(frozen=True)
class _Trace:
    """A checkout's finished spans, made by the check with set times: no clock involved."""

    where: str
    slow: str  # the step whose span has the most time of its own
    spans: list[ReadableSpan]
    layout: list[tuple[str, int | None, int, int]]  # (name, parent's index, start ms, end ms)


def _trace(where: str, slow: str, layout: list[tuple[str, int | None, int, int]]) -> _Trace:
    """Spans as an exporter hands them over (in the order they ended), from (name, parent, start, end)."""
    trace_id = random.getrandbits(128)
    contexts = [
        otel_trace.SpanContext(trace_id, random.getrandbits(64), False, otel_trace.TraceFlags(1))
        for _ in layout
    ]
    t0 = time.time_ns()
    order = {"order.id": f"ord-{random.randrange(16**6):06x}"}
    spans = [
        ReadableSpan(
            name,
            context=contexts[i],
            parent=None if parent is None else contexts[parent],
            attributes=order if name.startswith(f"{_PARENT}.") else {},
            start_time=t0 + start * 1_000_000,
            end_time=t0 + end * 1_000_000,
        )
        for i, (name, parent, start, end) in enumerate(layout)
    ]
    return _Trace(where, slow, sorted(spans, key=lambda s: s.end_time or 0), layout)


def _not_a_step_traces() -> list[_Trace]:
    """Two checkouts in which a span that is not a step has more time of its own than any step."""
    q = _CHILD
    return [
        _trace(
            "a checkout whose root span has 160 ms of its own, after the steps (serialising the answer, "
            "say), more than any step",
            "reserve",
            [
                (_PARENT, None, 0, 420),
                ("checkout.validate", 0, 10, 20),
                ("checkout.price", 0, 20, 140),
                (q, 2, 20, 60),
                (q, 2, 60, 100),
                (q, 2, 100, 140),
                ("checkout.reserve", 0, 140, 270),  # 100 ms of its own, then three queries at once
                (q, 6, 240, 270),
                (q, 6, 240, 265),
                (q, 6, 242, 270),
            ],
        ),
        _trace(
            "a checkout in which one query took 150 ms, more time of its own than any step",
            "price",
            [
                (_PARENT, None, 0, 310),
                ("checkout.validate", 0, 0, 160),
                (q, 1, 5, 155),
                ("checkout.price", 0, 160, 290),  # 100 ms of its own, then a query
                (q, 3, 260, 290),
                ("checkout.reserve", 0, 290, 300),
            ],
        ),
    ]


def _gap_trace() -> _Trace:
    """A checkout whose slow step spends its own time between two of its queries."""
    q = _CHILD
    return _trace(
        "a checkout whose checkout.validate runs a query, works 100 ms on its own, then runs two more",
        "validate",
        [
            (_PARENT, None, 0, 300),
            ("checkout.validate", 0, 5, 135),
            (q, 1, 5, 20),
            (q, 1, 120, 135),
            (q, 1, 120, 130),
            ("checkout.price", 0, 135, 165),
            ("checkout.reserve", 0, 165, 290),
            (q, 6, 165, 205),
            (q, 6, 205, 245),
            (q, 6, 245, 285),
        ],
    )


def _outliving_trace() -> _Trace:
    """A checkout whose slow step starts a query it does not wait for, which ends long after the step."""
    q = _CHILD
    return _trace(
        "a checkout whose checkout.validate works 90 ms, then starts a 70 ms query it does not wait for "
        "(it ends 60 ms after the step has)",
        "validate",
        [
            (_PARENT, None, 0, 400),
            ("checkout.validate", 0, 0, 100),
            (q, 1, 90, 160),
            ("checkout.price", 0, 100, 160),  # 40 ms of its own, and a query
            (q, 3, 120, 140),
            ("checkout.reserve", 0, 160, 380),
            *[(q, 5, 160 + 50 * n, 210 + 50 * n) for n in range(4)],
        ],
    )


def _own_ms(trace: _Trace, index: int, *, envelope: bool = False, clipped: bool = True) -> int:
    """A span's own time in the trace's layout; with ``envelope``, its children taken as one block from
    the first one's start to the last one's end; not ``clipped``, a child's time after the span's end
    taken from the span too."""
    _, _, start, end = trace.layout[index]
    kids = sorted((s, min(e, end) if clipped else e) for _, parent, s, e in trace.layout if parent == index)
    if envelope and kids:
        return end - start - (max(e for _, e in kids) - kids[0][0])
    covered, cursor = 0, start
    for s, e in kids:
        s = max(s, cursor)
        if e > s:
            covered, cursor = covered + e - s, e
    return end - start - covered


def _check_slowest_in(slowest_step: Callable[..., Any], traces: list[_Trace]) -> None:
    for trace in traces:
        expected = _span_name(trace.slow)
        answer = slowest_step(list(trace.spans))
        if not isinstance(answer, str) and hasattr(answer, "name"):
            answer = getattr(answer, "name", None)  # the step before this one names that
        if answer == expected:
            continue
        own = {i: _own_ms(trace, i) for i in range(len(trace.layout))}
        shown = "; ".join(
            f"{name} {own[i]} ms" for i, (name, _, _, _) in enumerate(trace.layout) if name != _CHILD
        )
        queries = [own[i] for i, (name, _, _, _) in enumerate(trace.layout) if name == _CHILD]
        spans = f"Time of their own: {shown}; the longest query {max(queries)} ms"
        steps = [i for i, (name, _, _, _) in enumerate(trace.layout) if name.startswith(f"{_PARENT}.")]
        by_envelope = max(steps, key=lambda i: _own_ms(trace, i, envelope=True))
        by_unclipped = max(steps, key=lambda i: _own_ms(trace, i, clipped=False))
        hints: list[str]
        if answer in (_PARENT, _CHILD):
            what = "the root span" if answer == _PARENT else "a query"
            why = (
                f"{what}: it has the most time of its own here, but it is not a step, and the question is "
                "which step is slow"
            )
            hints = [
                "The root's own time (the work around the steps) and a query's are not a step's, however "
                "much of it they have: rank only the steps' spans.",
                f'Keep the spans named `checkout.<step>`: `max((s for s in spans if s.name.startswith("'
                f'{_PARENT}.")), key=lambda s: self_time(s, spans)).name`.',
            ]
        elif answer == trace.layout[by_envelope][0] != expected:
            slow = next(i for i in steps if trace.layout[i][0] == expected)
            why = (
                "the step with the most time of its own if its children covered everything from the first "
                f"one's start to the last one's end; {expected} worked {own[slow]} ms between two of its "
                "queries, time no child covers"
            )
            hints = [
                "Children cover only the time they run: the time between one child's end and the next "
                "child's start is the span's own.",
                "Merge the children's intervals and subtract the length of their union, as "
                "`self_time(span, spans)` from `support.telemetry` does.",
            ]
        elif answer == trace.layout[by_unclipped][0] != expected:
            slow = next(i for i in steps if trace.layout[i][0] == expected)
            why = (
                "the step with the most time of its own if a child's time after its step had ended were "
                f"taken from the step; {expected} worked {own[slow]} ms of its own, and its query's time "
                "after the step ended is not the step's"
            )
            hints = [
                "A child can end after its parent (a task the step started and did not wait for): only "
                "the part of a child's interval inside the span covers the span's time.",
                "Clip each child's interval to the span, `max(child.start_time, span.start_time)` and "
                "`min(child.end_time, span.end_time)`, before merging, as `self_time(span, spans)` "
                "from `support.telemetry` does.",
            ]
        else:
            why = "not the step's span with the most time of its own"
            hints = [
                "A span's own time is its duration minus the time covered by its children (merged where "
                "they overlap); the slow step is the step's span with the most of it.",
                f'`max((s for s in spans if s.name.startswith("{_PARENT}.")), key=lambda s: '
                "self_time(s, spans)).name`, with `self_time` from `support.telemetry`.",
            ]
        raise Mismatch(
            f"{expected!r}, the step's span with the most time of its own, on {trace.where}",
            f"{short(answer)}: {why}. {spans}",
            hints,
        )


def check_checkout_spans(checkout: Callable[..., Awaitable[None]], slowest_step: Callable[..., Any]) -> None:
    """Check Exercise 3.2: a span per checkout step, and the slow step found from the spans alone.

    Runs ``await checkout(order, tracer, steps)`` twice inside a ``checkout`` span, with a tracer
    provider of the check's own (a ``SimpleSpanProcessor`` to memory, stopped before returning). In
    each run one step, chosen at random and different in the two runs, sleeps 100 ms; another makes
    8 ``db.query`` child spans of 25 ms (longer, but not its own time); the third sleeps 5 ms. Each
    step must run once, in order, in a finished span ``checkout.<step>`` that is a child of the
    ``checkout`` span, carries ``order.id`` (the span of a step that raises too) and is current while
    the step runs; and ``slowest_step(spans)`` must name the slow step's span: in those two runs (or
    the step the spans give the most time of its own, when a stall on the machine gave another step
    more than the slow one), in a checkout like them made with set times, and in traces the check makes
    with set times, where the root or a query has more time of its own than any step, where the slow
    step's own time lies between two of its children, and where a query of the slow step ends long
    after the step (a task it did not wait for: only time inside a span covers it).
    """
    with exercise("3.2", "Custom spans, and the slow step", SOLUTION) as ex:

        def arguments() -> None:
            for name, function in (("checkout", checkout), ("slowest_step", slowest_step)):
                expect(callable(function), f"the function `{name}`", short(function), _CALL_3_2)

        if not ex.step("checkout and slowest_step are functions", arguments):
            return
        plan = _plan()
        runs: list[_Checkout] = []

        def run_checkouts() -> None:
            runs.extend(_run_all(checkout, plan))
            _check_steps_called(runs)

        if not ex.step(
            "checkout(order, tracer, steps) runs validate, price and reserve, once each, in order",
            run_checkouts,
        ):
            return

        if not ex.step(
            "each step runs in a finished span named checkout.validate, checkout.price, checkout.reserve",
            lambda: _check_named_spans(runs),
        ):
            return
        fail = random.choice(_STEPS[:2])

        def failing_step() -> None:
            (failed,) = _run_all(checkout, [plan[0]], fail=fail)
            _check_failure(failed, runs)

        ex.step(
            "a step that raises stops the checkout: the error reaches the caller, its span still ends, "
            "with order.id",
            failing_step,
        )
        structure = [
            ex.step(
                "each step's span is a child of the current span, 'checkout'", lambda: _check_parents(runs)
            ),
            ex.step("each step's span carries the attribute order.id", lambda: _check_attributes(runs)),
            ex.step(
                "spans made inside a step nest under the step's span (it is current)",
                lambda: _check_nesting(runs),
            ),
        ]
        if not all(structure):
            runs = _run_all(_reference_checkout, plan)  # spans of the right shape, to check slowest_step
        ex.step(
            "slowest_step(spans) names the step with the most time of its own, in three checkouts",
            lambda: _check_slowest(slowest_step, runs),
        )
        ex.step(
            "slowest_step(spans) names a step, even where the root or a query has more time of its own",
            lambda: _check_slowest_in(slowest_step, _not_a_step_traces()),
        )
        ex.step(
            "slowest_step(spans) counts as a step's own the time inside it that no child covers: between "
            "its children, and not a child's time after the step has ended",
            lambda: _check_slowest_in(slowest_step, [_gap_trace(), _outliving_trace()]),
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 3.3: a latency histogram, and p99 from it
# ---------------------------------------------------------------------------------------------------

_METRIC = "http_request_duration_seconds"
_ITEM_ROUTE = "/items/{item_id}"
_SLO = 0.1
_REQUESTS = 60
_SLOW_ITEM_SECONDS, _SLOW_ITEMS = 0.08, 6  # the given endpoint: items ending in 7 sleep 80 ms
_CALL_3_3 = "Call the check as `check_latency_histogram(shop_app, p99_from_metrics)`."
_DEFAULT_ONLY = ("python_gc_", "python_info", "process_")  # what only the default REGISTRY exports
_RESPONSE_HINT = (
    "`return Response(generate_latest(metrics_registry), media_type=CONTENT_TYPE_LATEST)`: the text "
    "itself, not JSON."
)
_P99_HINT = (
    "Find the rank 0.99 × count in the cumulative buckets, and interpolate linearly inside the bucket "
    "that reaches it; `support.metrics.histogram_quantile(0.99, buckets)` shows the arithmetic."
)


@dataclass
class _Page:
    """What the check read from the app's /metrics page."""

    text: str = ""
    kind: str | None = None  # the type of the family named _METRIC, if any
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    def routes(self) -> list[str | None]:
        return sorted({dict(labels).get("route") for labels in self.series}, key=str)

    def total(self, route: str | None = None) -> tuple[float, float]:
        """(count, sum) over the series (of ``route``, if given)."""
        chosen = [
            s for labels, s in self.series.items() if route is None or dict(labels).get("route") == route
        ]
        return sum(s["count"] for s in chosen), sum(s["sum"] for s in chosen)

    def buckets(self, route: str | None = None) -> list[tuple[float, float]]:
        merged: dict[float, float] = {}
        for labels, s in self.series.items():
            if route is None or dict(labels).get("route") == route:
                for le, n in s["buckets"].items():
                    merged[le] = merged.get(le, 0.0) + n
        return sorted(merged.items())


def _parse(text: str) -> _Page:
    page = _Page(text=text)
    expect(
        not text.lstrip().startswith('"'),
        "the Prometheus text format on GET /metrics",
        f"a JSON string: {short(text, 50)}",
        "FastAPI turns whatever an endpoint returns into JSON, unless it is a `Response`.",
        _RESPONSE_HINT,
    )
    try:
        families = list(text_string_to_metric_families(text))
    except Exception as exc:
        first = text.strip().splitlines()[0] if text.strip() else "an empty page"
        raise Mismatch(
            "the Prometheus text format on GET /metrics",
            f"{short(first, 60)} (the parser said: {short(str(exc), 60)})",
            ["`generate_latest(registry)` writes the page; return it as it is.", _RESPONSE_HINT],
        ) from None
    page.names = sorted(f.name for f in families)
    for family in families:
        if family.name != _METRIC:
            continue
        page.kind = family.type
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in ("le", "quantile")))
            series = page.series.setdefault(labels, {"buckets": {}, "count": 0.0, "sum": 0.0})
            if sample.name == f"{_METRIC}_bucket":
                series["buckets"][float(sample.labels["le"])] = sample.value
            elif sample.name == f"{_METRIC}_count":
                series["count"] = sample.value
            elif sample.name == f"{_METRIC}_sum":
                series["sum"] = sample.value
    return page


@dataclass
class _Shop:
    before: _Page = field(default_factory=_Page)
    after: _Page = field(default_factory=_Page)
    statuses: list[int] = field(default_factory=list)
    client_seconds: float = 0.0  # the requests' latencies as the client measured them, summed


async def _get_metrics(server: Server) -> tuple[int, str, str]:
    async with httpx.AsyncClient(base_url=server.url, timeout=10, trust_env=False) as http:
        response = await http.get("/metrics")
    return response.status_code, response.text, response.headers.get("content-type", "")


def _media_type(value: str) -> tuple[str, dict[str, str]]:
    kind, *params = (part.strip() for part in value.split(";"))
    pairs = (param.partition("=") for param in params if param)
    return kind.lower(), {k.strip().lower(): v.strip().strip('"').lower() for k, _, v in pairs}


def _scrape(server: Server, content_type: list[str] | None = None) -> _Page:
    status, text, kind = in_fresh_loop(lambda: _get_metrics(server), timeout=15, name="check-3.3-scrape")
    if content_type is not None:
        content_type.append(kind)
    if status >= 500:
        _raise_server_error(server, [status], "status 200 for GET /metrics")
    expect(
        status == 200,
        "status 200 for GET /metrics",
        f"status {status}",
        'Keep the given endpoint `@shop_app.get("/metrics")`.',
    )
    return _parse(text)


def _check_metrics_page(server: Server, shop: _Shop) -> None:
    kinds: list[str] = []
    shop.before = _scrape(server, kinds)
    wanted, seen = _media_type(CONTENT_TYPE_LATEST), _media_type(kinds[0])
    expect(
        seen[0] == wanted[0] and seen[1].get("version") == wanted[1]["version"],
        f"the content type {CONTENT_TYPE_LATEST!r} on GET /metrics",
        f"{kinds[0]!r}" + ("" if "version" in seen[1] else ": no version of the exposition format"),
        "A scraper reads the `version` in the content type to know which text format it gets; without "
        "it, it must guess.",
        _RESPONSE_HINT,
    )


async def _get_items(server: Server) -> tuple[list[int], float]:
    limits = httpx.Limits(max_connections=10, max_keepalive_connections=10)
    async with httpx.AsyncClient(base_url=server.url, timeout=10, limits=limits, trust_env=False) as http:

        async def get(item: int) -> tuple[int, float]:
            start = time.perf_counter()
            response = await http.get(f"/items/{item}")
            return response.status_code, time.perf_counter() - start

        answers = await asyncio.gather(*(get(item) for item in range(_REQUESTS)))
    return [status for status, _ in answers], sum(seconds for _, seconds in answers)


def _check_items(server: Server, shop: _Shop) -> None:
    shop.statuses, shop.client_seconds = in_fresh_loop(
        lambda: _get_items(server), timeout=30, name="check-3.3"
    )
    if any(status >= 500 for status in shop.statuses):
        _raise_server_error(server, shop.statuses, f"{_REQUESTS} responses with status 200")
    expect(
        all(status == 200 for status in shop.statuses),
        f"{_REQUESTS} responses with status 200",
        f"statuses {dict(Counter(shop.statuses))}",
        f"Keep the given endpoint `GET {_ITEM_ROUTE}`.",
    )


def _counted(shop: _Shop) -> float:
    return shop.after.total()[0] - shop.before.total()[0]


def _scrape_after(server: Server, shop: _Shop) -> None:
    """Scrape once the requests are counted (an observation may land just after its response)."""
    deadline = time.monotonic() + 1.0
    shop.after = _scrape(server)
    while shop.after.kind == "histogram" and _counted(shop) < _REQUESTS and time.monotonic() < deadline:
        time.sleep(0.05)
        shop.after = _scrape(server)


def _in_default_registry() -> bool:
    names = getattr(prometheus_client.REGISTRY, "_names_to_collectors", {})
    return f"{_METRIC}_bucket" in names or _METRIC in names


def _check_histogram(page: _Page) -> None:
    if page.kind is None:
        if _in_default_registry():
            raise Mismatch(
                f"the histogram {_METRIC} on GET /metrics",
                f"not on the page, which has: {', '.join(page.names) or 'nothing'}. A metric of that "
                "name is in prometheus_client's default REGISTRY, which this page does not show",
                [
                    "A metric created without `registry=` goes into the global default registry; "
                    "re-running its cell then fails with 'Duplicated timeseries'.",
                    f'`Histogram("{_METRIC}", "…", ["route"], buckets=…, registry=registry)`.',
                ],
            )
        raise Mismatch(
            f"the histogram {_METRIC} on GET /metrics",
            f"the page has: {', '.join(page.names) or 'nothing'}",
            [
                f"Name the metric {_METRIC!r} (a base unit, seconds, in the name), in the registry "
                "that /metrics shows.",
                f'`Histogram("{_METRIC}", "…", ["route"], buckets=…, registry=registry)`, with '
                "`generate_latest(metrics_registry)` in /metrics.",
            ],
        )
    why = {
        "summary": "a Summary's quantiles are computed per process and cannot be summed across "
        "instances, nor re-read with other percentiles later",
        "gauge": "a Gauge keeps only the last value: every other request is lost",
        "counter": "a Counter only adds up: no distribution",
    }.get(page.kind or "", "")
    expect(
        page.kind == "histogram",
        f"{_METRIC} to be a histogram (with _bucket series)",
        f"a {page.kind}" + (f": {why}" if why else ""),
        "A histogram counts requests per bucket; buckets can be summed across instances and any "
        "percentile read from them.",
        f'`Histogram("{_METRIC}", "…", ["route"], buckets=…, registry=registry)`.',
    )
    expect(
        page.series and all(s["buckets"] for s in page.series.values()),
        f"{_METRIC} with _bucket series",
        "no _bucket samples on the page",
        "Observe each request's duration: `self.latency.labels(route=…).observe(seconds)`.",
    )


def _check_own_registry(page: _Page) -> None:
    default = sorted({n for n in page.names if n.startswith(_DEFAULT_ONLY)})
    expect(
        not default,
        "the metrics of the app's own registry only",
        f"{', '.join(default[:3])}{' …' if len(default) > 3 else ''}: metrics that only prometheus_client's "
        "default REGISTRY has",
        "The default REGISTRY is global: a histogram registered there once cannot be created again, so "
        "re-running its cell fails with 'Duplicated timeseries'.",
        "Create the histogram with `registry=registry`, and serve `generate_latest(metrics_registry)`.",
    )


def _check_route_label(page: _Page) -> None:
    labels = sorted({name for series in page.series for name, _ in series})
    expect(
        "route" in labels,
        f"{_METRIC} labelled by 'route'",
        f"labels {labels}",
        f'Declare the label when creating the histogram: `Histogram("{_METRIC}", "…", ["route"], …)`.',
    )
    routes = page.routes()
    shown = ", ".join(repr(r) for r in routes[:4]) + (" …" if len(routes) > 4 else "")
    expect(
        routes == [_ITEM_ROUTE],
        f'one series, route="{_ITEM_ROUTE}", for all {_REQUESTS} items',
        f"{len(routes)} series: route = {shown}",
        "A raw path makes one series per item: Prometheus stores each series separately, and their "
        "number grows without bound.",
        'Label by the route template, which the router puts in the scope: `scope["route"].path` '
        "(read it after `await self.app(…)` has routed the request).",
    )


def _check_slo_bucket(page: _Page) -> None:
    bounds = [le for le, _ in page.buckets() if not math.isinf(le)]
    below = [le for le in bounds if le < _SLO]
    above = [le for le in bounds if le > _SLO]
    nearest = ([f"{below[-1]:g}"] if below else []) + ([f"{above[0]:g}"] if above else [])
    almost = [le for le in bounds if le != _SLO and math.isclose(le, _SLO, rel_tol=1e-6)]
    expect(
        not almost,
        f'a bucket boundary at exactly SLO_SECONDS = {_SLO:g} s (le="{_SLO:g}")',
        f'le="{almost[0] if almost else _SLO!r}": almost {_SLO:g}, off by a floating-point rounding; '
        f'a dashboard or an alert that reads the bucket le="{_SLO:g}" finds nothing',
        "Multiplying floats rounds: `0.1 * 0.1 * 10` is 0.10000000000000002, not 0.1, and the label is "
        "the number as it is.",
        "Put `SLO_SECONDS` itself in the list (or round each computed boundary, e.g. `round(x, 6)`).",
    )
    expect(
        _SLO in bounds,
        f'a bucket boundary at the objective, SLO_SECONDS = {_SLO:g} s (le="{_SLO:g}")',
        f"{len(bounds)} boundaries, the nearest {' and '.join(nearest) or 'none'}: the share of requests "
        f"within {_SLO:g} s can only be interpolated",
        "With a boundary at the objective, the share of requests within it is counted exactly, not "
        "estimated; a dashboard or an alert on the objective reads that bucket.",
        "Put `SLO_SECONDS` in your list: `buckets=[0.005, 0.01, 0.025, 0.05, 0.075, SLO_SECONDS, 0.25, "
        "0.5, 1.0]`.",
    )


def _check_counted(shop: _Shop) -> None:
    counted = _counted(shop)
    twice = ": each twice, in `send` and again after `await self.app(…)`" if counted == 2 * _REQUESTS else ""
    expect(
        counted == _REQUESTS,
        f"the {_REQUESTS} requests counted in the histogram, once each",
        f"{counted:g} more than before they were sent{twice}",
        "Observe once per request, when its last body message is sent "
        '(`message["type"] == "http.response.body" and not message.get("more_body", False)`); '
        "after `await self.app(…)` (in a `finally`), only if nothing was observed then.",
    )
    seconds = shop.after.total()[1] - shop.before.total()[1]
    slept = _SLOW_ITEM_SECONDS * _SLOW_ITEMS
    expect(
        0.8 * slept <= seconds <= 1.5 * shop.client_seconds + 0.1,
        f"the requests' durations in seconds, summing to about what they took "
        f"(at least {0.8 * slept:.2f} s, at most {1.5 * shop.client_seconds + 0.1:.2f} s)",
        f"a sum of {seconds:g}",
        "Observe the time from the request's arrival to its last body message, in seconds: "
        "`start = time.perf_counter()` first, then `observe(time.perf_counter() - start)`.",
    )


_PROBE_CHUNKS, _PROBE_GAP = 3, 0.05  # a streamed body: chunks this far apart
_PROBE_BACKGROUND = 0.3  # a background task this long, after the response
_PROBE_FAILS = 0.05  # a handler that raises after this long
_FAILING_ROUTE = "/probe/fails/{n}"  # its label: a route of its own, in a registry of its own
_UNMATCHED = ("/nowhere/1", "/nowhere/2", "/admin.php")


class _HandlerFailed(RuntimeError):
    """What the check's failing handler raises: a bug in an endpoint, not in the middleware."""


def _probe(app: Any) -> tuple[Any, CollectorRegistry]:
    """An app of the check's own behind the learner's middleware, with a registry of its own."""
    from fastapi import FastAPI
    from starlette.background import BackgroundTask
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse, StreamingResponse

    registry = CollectorRegistry()
    middleware = [
        Middleware(m.cls, *m.args, **{**m.kwargs, "registry": registry}) if "registry" in m.kwargs else m
        for m in getattr(app, "user_middleware", [])
    ]
    probe = FastAPI(middleware=middleware)

    async def chunks() -> Any:
        for i in range(_PROBE_CHUNKS):
            if i:
                await asyncio.sleep(_PROBE_GAP)
            yield b"chunk\n"

    @probe.get("/probe/stream/{n}")
    async def stream(n: int) -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    @probe.get("/probe/later/{n}")
    async def later(n: int) -> JSONResponse:
        return JSONResponse({"n": n}, background=BackgroundTask(asyncio.sleep, _PROBE_BACKGROUND))

    @probe.get(_FAILING_ROUTE)
    async def fails(n: int) -> None:
        await asyncio.sleep(_PROBE_FAILS)
        raise _HandlerFailed("the check's endpoint failed, as a bug in an endpoint would")

    return probe, registry


def _probe_series(registry: CollectorRegistry) -> dict[tuple[tuple[str, str], ...], dict[str, Any]]:
    return _parse(prometheus_client.generate_latest(registry).decode()).series


def _run_probe(app: Any, paths: Sequence[str]) -> tuple[CollectorRegistry, list[BaseException]]:
    registry, raised, _ = _run_probe_statuses(app, paths)
    return registry, raised


def _run_probe_statuses(
    app: Any, paths: Sequence[str]
) -> tuple[CollectorRegistry, list[BaseException], list[int | None]]:
    """The probe's registry, what came out of the app, and each response's status: 0 if none was sent,
    None if the app raised (Starlette's outermost layer re-raises after sending its 500)."""
    probe, registry = _probe(app)

    async def main() -> tuple[list[BaseException], list[int | None]]:
        raised: list[BaseException] = []
        statuses: list[int | None] = []
        for path in paths:
            try:
                statuses.append((await call(probe, path)).status)
            except Exception as exc:
                raised.append(exc)
                statuses.append(None)
        return raised, statuses

    raised, statuses = in_fresh_loop(main, timeout=10, name="check-3.3-probe")
    return registry, raised, statuses


def _check_timed_to_last_body(app: Any) -> None:
    registry, raised = _run_probe(app, ["/probe/stream/1"])
    if raised:
        raise raised[0]
    series = _probe_series(registry)
    count = sum(s["count"] for s in series.values())
    seconds = sum(s["sum"] for s in series.values())
    body = _PROBE_GAP * (_PROBE_CHUNKS - 1)
    expect(
        count == 1,
        f"one observation for one streamed response (its body in {_PROBE_CHUNKS} messages)",
        f"{count:g} observations",
        "A streamed body arrives in several `http.response.body` messages; only the last has "
        "`more_body` false.",
        'Observe once: `if message["type"] == "http.response.body" and not message.get("more_body", '
        "False):`.",
    )
    expect(
        seconds >= 0.9 * body,
        f"a streamed response whose body took {body * 1000:.0f} ms to send timed at {body * 1000:.0f} ms "
        "or more",
        f"{seconds * 1000:.1f} ms: the clock stopped before the last body message",
        "The response is over when its last body message is sent, not when it starts "
        "(`http.response.start` carries only the status and headers).",
        "Stop the clock after `await send(message)` for the body message whose `more_body` is false.",
    )
    # timed with the task, it measures the task's whole sleep or more, every time; without it, a few ms,
    # unless a loaded machine held the loop (271 ms once, beside eight busy processes): the least of up
    # to three tries, and a bound just under the sleep
    tries = []
    while len(tries) < 3 and (not tries or min(tries) >= 0.9 * _PROBE_BACKGROUND):
        registry, raised = _run_probe(app, ["/probe/later/1"])
        if raised:
            raise raised[0]
        tries.append(sum(s["sum"] for s in _probe_series(registry).values()))
    seconds = min(tries)
    expect(
        seconds < 0.9 * _PROBE_BACKGROUND,
        f"a response with a {_PROBE_BACKGROUND * 1000:.0f} ms background task timed without it "
        f"(under {_PROBE_BACKGROUND * 900:.0f} ms)",
        f"{seconds * 1000:.0f} ms at the least in {len(tries)} requests: the clock stopped when the app "
        "returned, after its background tasks",
        "Starlette runs a response's background tasks after its last body message, before "
        "`await self.app(…)` returns: the client already has its answer.",
        "Stop the clock in the `send` wrapper, at the last body message, not after `await self.app(…)`.",
    )


def _check_failed_request(app: Any) -> None:
    registry, raised, statuses = _run_probe_statuses(app, ["/probe/fails/1"])
    other = [exc for exc in raised if not isinstance(exc, _HandlerFailed)]
    if other:
        raise other[0]
    expect(
        bool(raised) or statuses == [500],
        "the handler's exception to leave your middleware (Starlette then answers 500 and logs it), or a "
        "500 sent by your middleware",
        f"no exception came out of your middleware, and the client got "
        f"{f'a {statuses[0]}' if statuses and statuses[0] else 'no response at all'}: the error was "
        "swallowed",
        "An `except` that records the request must end with a bare `raise`; or record it in a `finally`, "
        "which lets the exception go on by itself.",
    )
    series = _probe_series(registry)
    count = sum(s["count"] for labels, s in series.items() if dict(labels).get("route") == _FAILING_ROUTE)
    elsewhere = {
        dict(labels).get("route"): s["count"]
        for labels, s in series.items()
        if dict(labels).get("route") != _FAILING_ROUTE and s["count"]
    }
    if elsewhere:
        others = ", ".join(f"{n:g} under route={r!r}" for r, n in elsewhere.items())
        seen = f"{count:g} under it, and {others}"
    elif count == 0:
        seen = "no observation: nothing went out through your `send` wrapper, so nothing observed it"
    else:
        seen = f"{count:g} observations"
    expect(
        count == 1 and not elsewhere,
        f'one observation, route="{_FAILING_ROUTE}", for a request whose handler raised after '
        f"{_PROBE_FAILS * 1000:.0f} ms (the client got a 500)",
        seen,
        "Look at what `await self.app(scope, receive, timed_send)` does when the handler raises: the "
        "exception comes out of it, and no message has gone through `timed_send`.",
        "The 500 is sent by Starlette's `ServerErrorMiddleware`, the app's outermost layer, outside your "
        "middleware, after the exception has left it: record the request in a `finally` around "
        "`await self.app(…)` when nothing was observed in `timed_send` (a flag set there), under "
        '`scope["route"].path`.',
    )


def _check_unmatched(app: Any) -> None:
    registry, raised = _run_probe(app, _UNMATCHED)
    if raised:
        raise Mismatch(
            f"{len(_UNMATCHED)} requests to paths no route matches answered 404 and counted",
            f"the middleware raised {type(raised[0]).__name__}: {short(str(raised[0]), 60)}",
            [
                'A request that matches no route has no `scope["route"]`: the router answers 404 '
                "without setting it.",
                'Give those one fixed label: `scope["route"].path if "route" in scope else "unmatched"`.',
            ],
        )
    series = _probe_series(registry)
    values = sorted({v for labels in series for _, v in labels})
    count = sum(s["count"] for s in series.values())
    expect(
        count == len(_UNMATCHED),
        f"the {len(_UNMATCHED)} requests to paths no route matches counted",
        f"{count:g} counted",
        "A 404 is a request too: a scanner's traffic belongs on the dashboard.",
        'Observe it under a fixed label: `scope["route"].path if "route" in scope else "unmatched"`.',
    )
    raw = [v for v in values if v in _UNMATCHED]
    expect(
        not raw and len(series) <= 1,
        f"the requests to {len(_UNMATCHED)} unmatched paths under one fixed label",
        f"{len(series)} series, labelled {', '.join(map(repr, values))}",
        "Any client can send any path: a label taken from it makes a new series per path, without bound.",
        'One fixed label for whatever matched no route: `… if "route" in scope else "unmatched"`.',
    )


def _known_page() -> str:
    """A /metrics page whose p99 is 0.2 s: 392 requests of 4 ms, 6 of 200 ms and 2 of 700 ms.

    The rank (396) falls two thirds into the bucket 0.1–0.25 s, so the estimate differs from that
    bucket's bounds, from the highest bucket with requests (1 s), and from the mean (10 ms).
    """
    registry = CollectorRegistry()
    latency = Histogram(
        _METRIC, "Request duration", ["route"], buckets=[0.01, 0.05, 0.1, 0.25, 0.5, 1.0], registry=registry
    )
    series = latency.labels(route=_ITEM_ROUTE)
    for seconds, times in ((0.004, 392), (0.2, 6), (0.7, 2)):
        for _ in range(times):
            series.observe(seconds)
    return prometheus_client.generate_latest(registry).decode()


_BOUNDS = [0.01, 0.05, 0.1, 0.25, 0.5, 1.0]


def _page_of(
    routes: dict[str, Sequence[tuple[float, int]]],
    *,
    other: bool = False,
    bounds: Sequence[float] = _BOUNDS,
    code: dict[str, str] | None = None,
) -> str:
    """A /metrics page: ``http_request_duration_seconds`` with one series per route, observed as given.

    With ``code`` (route → status code), each series also carries a ``code`` label, which the text
    format writes before ``le`` (prometheus_client sorts the labels by name).
    """
    registry = CollectorRegistry()
    names = ["code", "route"] if code is not None else ["route"]
    latency = Histogram(_METRIC, "Request duration", names, buckets=bounds, registry=registry)
    for route, observations in routes.items():
        path = route.split("#")[0]  # "#…": another series of the same route (another code)
        series = (
            latency.labels(code=code[route], route=path) if code is not None else latency.labels(route=path)
        )
        for seconds, times in observations:
            for _ in range(times):
                series.observe(seconds)
    if other:  # another histogram on the same page, with buckets of its own
        size = Histogram(
            "http_response_size_bytes", "Response size", buckets=[100, 1000, 10_000], registry=registry
        )
        for _ in range(300):
            size.observe(5000)
    return prometheus_client.generate_latest(registry).decode()


def _estimate_in_text_order(buckets: list[tuple[float, float]]) -> float:
    """The estimate with the finite buckets taken in the order of their ``le`` labels as text."""
    total = buckets[-1][1] if buckets else 0.0
    finite = sorted(((floatToGoString(le), count) for le, count in buckets if not math.isinf(le)))
    rank, lower, below = 0.99 * total, 0.0, 0.0
    for le, count in finite:
        upper = float(le)
        if count >= rank:
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def _read_no_series(answer: Any, buckets: list[tuple[float, float]]) -> bool:
    """Whether ``answer`` says the page had no bucket of the histogram, though it counted requests."""
    total = buckets[-1][1] if buckets else 0.0
    return total > 0 and (answer is None or (isinstance(answer, float) and math.isnan(answer)))


@dataclass(frozen=True)
class _EdgePage:
    step: str
    where: str
    text: str
    flaw: Callable[[Any, list[tuple[float, float]]], bool] | None = None  # the answer shows this flaw
    why: str = ""  # … which the line names, with these hints
    hints: tuple[str, ...] = ()


def _edge_pages() -> list[_EdgePage]:
    items = _ITEM_ROUTE
    return [
        _EdgePage(
            "adds up every series of http_request_duration_seconds, and nothing else on the page",
            "a page with two routes, and another histogram beside it",
            _page_of({items: [(0.004, 190), (0.2, 10)], "/health": [(0.004, 200)]}, other=True),
        ),
        _EdgePage(
            "takes the first bucket whose count reaches the rank, even when it equals it exactly",
            "a page where a bucket's count equals the rank, with empty buckets after it",
            _page_of({items: [(0.004, 90), (0.03, 5), (0.08, 4), (0.7, 1)]}),
        ),
        _EdgePage(
            "answers the highest finite boundary when the rank is in the +Inf bucket",
            "a page with requests above the top bucket",
            _page_of({items: [(0.004, 97), (2.0, 3)]}),
        ),
        _EdgePage(
            "interpolates from 0 inside the lowest bucket",
            "a page where the rank falls in the lowest bucket",
            _page_of({items: [(0.004, 100)]}),
        ),
        _EdgePage(
            "orders the buckets by their bounds as numbers, in which 2.5 comes before 10",
            'a page with buckets up to 10 s (le="2.5", le="5.0", le="10.0"), the rank between 2.5 and 5 s',
            _page_of(
                {items: [(0.004, 90), (0.7, 5), (3.0, 5)]}, bounds=[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
            ),
            lambda answer, buckets: _agrees(answer, _estimate_in_text_order(buckets)),
            "the estimate with the buckets in the order of their le labels as text, in which "
            '"10.0" comes before "2.5"',
            (
                "A bucket's bound is a number written as text: as text, '10.0' sorts before '2.5', and the "
                "cumulative counts are then out of order.",
                'Turn each le into a number before sorting: `float(sample.labels["le"])` as the key of '
                'your buckets (`float("+Inf")` is infinity, so +Inf sorts last too).',
            ),
        ),
        _EdgePage(
            'reads every series, whatever its labels: code="…" written before le="…"',
            "a page whose series carry a code label too, which the text format writes before le",
            _page_of(
                {items: [(0.004, 190), (0.2, 5)], f"{items}#500": [(0.7, 5)]},
                code={items: "200", f"{items}#500": "500"},
            ),
            _read_no_series,
            "as if the page had no bucket of the histogram: every series here has a code label, written "
            "before le, and a reader that expects le first skips them all",
            (
                "The labels of a sample come in any order (prometheus_client writes them sorted by name: "
                "`code` before `le`): read them by name, not by position.",
                "Let the parser read the labels: `text_string_to_metric_families(text)`, then "
                '`float(sample.labels["le"])` for each `…_bucket` sample.',
            ),
        ),
    ]


def _check_p99_edge(p99_from_metrics: Callable[[str], Any], page: _EdgePage) -> None:
    buckets = _parse(page.text).buckets()
    expected = histogram_quantile(0.99, buckets)
    answer = p99_from_metrics(page.text)
    if _agrees(answer, expected):
        return
    if page.flaw is not None and page.flaw(answer, buckets):
        shown = ", ".join(f"{le:g}: {count:g}" for le, count in buckets if not math.isinf(le))
        raise Mismatch(
            f"p99 ≈ {expected:.4g} s on {page.where}, as Prometheus's histogram_quantile(0.99, …) "
            "estimates it",
            f"{_number(answer)}: {page.why} (cumulative buckets le → count: {shown}, "
            f"+Inf: {buckets[-1][1]:g})",
            page.hints,
        )
    raise _p99_mismatch(answer, expected, page.where, buckets)


_NO_SERIES_HINTS = (
    "Before its first request, a histogram with labels has no series at all: the page shows only its "
    "HELP and TYPE lines, and there is no bucket to read.",
    "Check that you found buckets, and that they counted something, before using them: "
    "`if not buckets or total == 0: return math.nan`.",
)


def _check_p99_empty(p99_from_metrics: Callable[[str], Any]) -> None:
    answer = p99_from_metrics(_page_of({_ITEM_ROUTE: []}))
    expect(
        isinstance(answer, float) and math.isnan(answer),
        "NaN on a page whose series has counted no request yet, as PromQL answers",
        short(answer),
        "With no requests there is no p99: say so with `math.nan` rather than a number or an error.",
        "Before the division: `if total == 0: return math.nan`.",
    )
    where = (
        "a page where the histogram has no series yet (its HELP and TYPE lines only, as before the first "
        "request)"
    )
    try:
        answer = p99_from_metrics(_page_of({}))
    except LookupError as exc:
        why = (
            "the code looked up a bucket (`buckets[-1]`, say) before checking there is one"
            if isinstance(exc, IndexError | KeyError)
            else "the code took a histogram with no series for a missing one; it is declared, and has "
            "counted nothing yet"
        )
        raise Mismatch(
            f"NaN on {where}", f"{type(exc).__name__}: {short(str(exc), 50)}: {why}", _NO_SERIES_HINTS
        ) from None
    except (ValueError, ZeroDivisionError) as exc:
        raise Mismatch(
            f"NaN on {where}", f"{type(exc).__name__}: {short(str(exc), 50)}", _NO_SERIES_HINTS
        ) from None
    expect(
        isinstance(answer, float) and math.isnan(answer), f"NaN on {where}", short(answer), *_NO_SERIES_HINTS
    )


def _p99_mismatch(answer: Any, expected: float, where: str, buckets: list[tuple[float, float]]) -> Mismatch:
    total = buckets[-1][1] if buckets else 0.0
    bounds = [le for le, count in buckets if not math.isinf(le)]
    top = next((le for le, count in buckets if count >= total and not math.isinf(le)), None)
    rank_bound = next((le for le, count in buckets if count >= 0.99 * total and not math.isinf(le)), None)
    why = ""
    if isinstance(answer, int | float):
        if math.isclose(answer, expected * 1000, rel_tol=0.01):
            why = ": that is in milliseconds; Prometheus works in seconds"
        elif top is not None and math.isclose(answer, top, rel_tol=1e-6) and rank_bound == top:
            why = ": the upper bound of the bucket that holds the rank, without interpolating inside it"
        elif top is not None and math.isclose(answer, top, rel_tol=1e-6):
            why = ": the upper bound of the highest bucket with requests in it, a maximum, not p99"
        elif rank_bound is not None and math.isclose(answer, rank_bound, rel_tol=1e-6):
            why = ": the upper bound of the bucket that holds the rank, without interpolating inside it"
        elif math.isinf(answer):
            why = (
                ": infinity; when the rank falls in the +Inf bucket, PromQL answers the highest finite "
                "boundary"
            )
        elif any(count == 0.99 * total and le < answer for le, count in buckets):
            why = (
                ": beyond the first bucket whose count reaches the rank; a count equal to the rank "
                "reaches it (>=, not >)"
            )
        elif answer < expected / 3:
            why = ": far below it; a mean? The few slow requests barely move a mean, but they make the p99"
    shown = ", ".join(f"{le:g}: {count:g}" for le, count in buckets if not math.isinf(le))
    return Mismatch(
        f"p99 ≈ {expected:.4g} s on {where}, as Prometheus's histogram_quantile(0.99, …) estimates it",
        f"{_number(answer)}{why}"
        + (f" (cumulative buckets le → count: {shown}, +Inf: {total:g})" if bounds else ""),
        [
            "p99 is the value 99 % of requests stay under: with 100 requests, the 99th, found in the "
            "cumulative bucket counts.",
            _P99_HINT,
            "`from support.metrics import read_histogram`, then "
            f'`return read_histogram(text, "{_METRIC}").quantile(0.99)`.',
        ],
    )


def _number(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return short(value)


def _agrees(answer: Any, expected: float) -> bool:
    return (
        isinstance(answer, int | float)
        and not isinstance(answer, bool)
        and math.isfinite(answer)
        and math.isclose(answer, expected, rel_tol=1e-6, abs_tol=1e-9)
    )


def _check_p99_known(p99_from_metrics: Callable[[str], Any]) -> None:
    text = _known_page()
    page = _parse(text)
    buckets = page.buckets()
    expected = histogram_quantile(0.99, buckets)
    answer = p99_from_metrics(text)
    if not _agrees(answer, expected):
        raise _p99_mismatch(answer, expected, "a page with known buckets", buckets)


def _check_p99_app(p99_from_metrics: Callable[[str], Any], page: _Page) -> None:
    answer = p99_from_metrics(page.text)
    expected = {
        histogram_quantile(0.99, buckets)
        for buckets in (page.buckets(_ITEM_ROUTE), page.buckets())
        if buckets and math.isinf(buckets[-1][0])
    }
    if not any(_agrees(answer, value) for value in expected):
        raise _p99_mismatch(answer, min(expected), "your app's page", page.buckets())


def check_latency_histogram(app: Any, p99_from_metrics: Callable[[str], Any]) -> None:
    """Check Exercise 3.3: a latency histogram per route template, on /metrics, and p99 read from it.

    Serves ``app``; scrapes ``GET /metrics``; sends 60 ``GET /items/{item_id}`` (the given endpoint
    makes one item in ten take 80 ms); scrapes again. ``http_request_duration_seconds`` must be a
    histogram in the app's own registry (no default-registry metrics on the page), with one series,
    ``route="/items/{item_id}"``, a bucket boundary at 0.1 s, and 60 more requests counted, in seconds.
    The middleware, in front of an app of the check's own with a registry of its own, must then time a
    streamed body to its last message and not a background task, count requests that match no route
    under one fixed label, and observe once a request whose handler raises (its 500 goes out through
    Starlette's ``ServerErrorMiddleware``, outside the middleware).
    ``p99_from_metrics(text)`` must then agree (within 1 %) with PromQL's ``histogram_quantile(0.99,
    …)``: on a page the check makes (p99 0.2 s); on edge pages (several series and another histogram,
    a count exactly at the rank, requests above the top bucket, a rank in the lowest bucket, bounds
    whose order as text is not their order as numbers, series whose labels put ``code`` before ``le``);
    NaN with no request counted, with or without a series; and on the app's page.
    """
    with exercise("3.3", "A latency histogram, and p99 from it", SOLUTION) as ex:

        def arguments() -> None:
            find_route(app, "GET", _ITEM_ROUTE, "shop_app")
            find_route(app, "GET", "/metrics", "shop_app")
            expect(
                callable(p99_from_metrics),
                "the function `p99_from_metrics`",
                short(p99_from_metrics),
                _CALL_3_3,
            )

        if not ex.step(f"the app has GET {_ITEM_ROUTE} and GET /metrics", arguments):
            return
        shop = _Shop()
        with joins_new_threads(), serve_answer(app, "check-3.3", "3.3", _SERVE_FAILED) as server:
            if not ex.step(
                "GET /metrics answers with the Prometheus text format, and its content type",
                lambda: _check_metrics_page(server, shop),
            ):
                return
            if not ex.step(
                f"{_REQUESTS} requests to GET {_ITEM_ROUTE}, one in ten slow, are answered",
                lambda: _check_items(server, shop),
            ):
                return
            if not ex.step(
                f"{_METRIC} on /metrics is a histogram",
                lambda: (_scrape_after(server, shop), _check_histogram(shop.after)),
            ):
                return
        own = ex.step(
            "it is in the app's own registry, not the default one", lambda: _check_own_registry(shop.after)
        )
        ex.step(
            f'it has one series per route template: route="{_ITEM_ROUTE}", not one per item',
            lambda: _check_route_label(shop.after),
        )
        ex.step(
            f"its buckets have a boundary at the objective, {_SLO:g} s", lambda: _check_slo_bucket(shop.after)
        )
        counted = ex.step(f"it counted the {_REQUESTS} requests, in seconds", lambda: _check_counted(shop))
        if own and counted:  # the middleware again, with a registry of the check's own
            ex.step(
                "it times a request until its last body message: all of a streamed body, no background task",
                lambda: _check_timed_to_last_body(app),
            )
            ex.step(
                "requests that match no route are counted under one fixed label, not their path",
                lambda: _check_unmatched(app),
            )
            ex.step(
                "a request whose handler raises is counted too, under its route, though its 500 never "
                "goes through your `send`",
                lambda: _check_failed_request(app),
            )
        if not ex.step(
            "p99_from_metrics(text) estimates p99 as Prometheus does, on a page with known buckets",
            lambda: _check_p99_known(p99_from_metrics),
        ):
            return
        for edge in _edge_pages():
            ex.step(
                f"p99_from_metrics(text) {edge.step}",
                lambda edge=edge: _check_p99_edge(p99_from_metrics, edge),  # type: ignore[misc]
            )
        ex.step(
            "p99_from_metrics(text) is NaN when the histogram has counted no request yet, even before "
            "it has a series",
            lambda: _check_p99_empty(p99_from_metrics),
        )
        ex.step(
            "p99_from_metrics(text) agrees with Prometheus's estimate on your app's page",
            lambda: _check_p99_app(p99_from_metrics, shop.after),
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 3.4: a queued job that joins the request's trace
# ---------------------------------------------------------------------------------------------------

_ORDERS_ROUTE = "/orders/{order_id}"
_JOB = "send_receipt"
_CALL_3_4 = "Call the check as `check_job_joins_trace(build_orders_app, enqueue_receipt, send_receipt)`."
_FRESH, _SAMPLED, _UNSAMPLED = 4, 5, 3  # requests without a traceparent, with a sampled one, with flags 00
_ORDERS = _FRESH + _SAMPLED + _UNSAMPLED
_ENDPOINT_HINT = (
    "Keep the given `build_orders_app`: its endpoint awaits `enqueue_receipt(queue, order_id)` once per "
    'order, in an app traced with `FastAPI(telemetry={"tracer_provider": tracing.provider})`.'
)
_INJECT_EXTRACT = (
    'In `enqueue_receipt`: `carrier = {}`, `inject(carrier)`, then `await queue.enqueue("send_receipt", '
    "order_id=order_id, trace_context=carrier)`; in the job: `parent = extract(trace_context)`, then "
    '`with tracer.start_as_current_span("send_receipt", context=parent):` around the send.'
)
_request_var: ContextVar[str | None] = ContextVar("ch03_check_request", default=None)  # the check's own
_job_var: ContextVar[int | None] = ContextVar("ch03_check_job", default=None)


class _NotStorable(TypeError):
    """A job's arguments that JSON cannot hold: what a queue that stores jobs in Redis raises."""


@dataclass
class _Job:
    """One job the learner's code enqueued, and what became of it when the check's worker ran it."""

    function: str
    kwargs: dict[str, Any]  # as JSON gave them back: what a worker in another process receives
    request: str | None  # the check's request whose task enqueued it (None: outside any request)
    at_enqueue: otel_trace.SpanContext  # the span current when it was enqueued
    sends: list[tuple[otel_trace.SpanContext, bool]] = field(default_factory=list)  # (span, recording)
    raised: BaseException | None = None
    context_after: Any = None  # OpenTelemetry's context in the job's task once the job returned
    context_before: Any = None


class _CheckQueue:
    """The queue given to the learner's app: stores each job's arguments as JSON, as Redis would, and
    notes the request that enqueued it and the span that was current then."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []

    async def enqueue(self, function: Any, **kwargs: Any) -> None:
        name = function if isinstance(function, str) else getattr(function, "__name__", repr(function))
        try:
            stored = json.dumps(kwargs)
        except (TypeError, ValueError) as exc:
            raise _NotStorable(f"{', '.join(_unstorable(kwargs))} ({exc})") from None
        current = otel_trace.get_current_span().get_span_context()
        self.jobs.append(_Job(name, json.loads(stored), _request_var.get(), current))
        await asyncio.sleep(0.005)  # a round trip to Redis: other requests run meanwhile


def _unstorable(kwargs: dict[str, Any]) -> list[str]:
    """The arguments JSON cannot hold, as "name: a Type"."""
    found = []
    for name, value in kwargs.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            found.append(f"{name}: a {type(value).__name__}")
    return found


class _ReceiptMailer:
    """The email API the job calls (``ctx["mailer"]``): notes the span current at each send."""

    def __init__(self, jobs: list[_Job]) -> None:
        self.jobs = jobs

    async def send(self, to: str, subject: str = "Your receipt", **_: Any) -> None:
        index = _job_var.get()
        span = otel_trace.get_current_span()
        if index is not None:
            self.jobs[index].sends.append((span.get_span_context(), span.is_recording()))
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class _Order:
    order_id: str
    incoming: str | None  # the caller's traceparent, if any
    tracestate: str | None
    trace_id: int | None  # known up front when the caller sent one

    @property
    def sampled(self) -> bool:
        return self.incoming is None or self.incoming.endswith("-01")

    @property
    def kind(self) -> str:
        if self.incoming is None:
            return "no traceparent"
        return "a sampled traceparent" if self.sampled else "a traceparent with flags 00 (not sampled)"


@dataclass
class _JobsRun:
    """Everything the check saw: the orders, their traces, the jobs and the spans."""

    orders: list[_Order]
    queue: _CheckQueue = field(default_factory=_CheckQueue)
    statuses: dict[str, int] = field(default_factory=dict)
    trace_ids: dict[str, int] = field(default_factory=dict)  # order → its request's trace ID
    worker_spans: list[ReadableSpan] = field(default_factory=list)

    def job_of(self, order: _Order) -> _Job:
        return next(job for job in self.queue.jobs if job.request == order.order_id)


def _plan_orders() -> list[_Order]:
    tag = f"{random.randrange(16**6):06x}"
    orders = []
    for i in range(_ORDERS):
        order_id = f"ord-{tag}-{i:02d}"
        if i < _FRESH:
            orders.append(_Order(order_id, None, None, None))
            continue
        sampled = i < _FRESH + _SAMPLED
        trace_id = random.getrandbits(128) | 1
        header = f"00-{trace_id:032x}-{random.getrandbits(64) | 1:016x}-{'01' if sampled else '00'}"
        orders.append(_Order(order_id, header, f"ex34={order_id}" if sampled else None, trace_id))
    random.shuffle(orders)
    return orders


def _hex(trace_id: int) -> str:
    return format(trace_id, "032x")


def _late(late: NoReturn, what: str, hint: str) -> Mismatch:
    return Mismatch(
        what,
        f"no return within {late.seconds:g} s"
        + (" (and it still holds its thread: restart the kernel)" if late.stuck else ""),
        [hint, "Nothing here needs to wait: enqueueing stores the job and returns; the job sends once."],
    )


def _not_storable(exc: BaseException) -> _NotStorable | None:
    leaves = _leaves_of(exc)
    return next((leaf for leaf in leaves if isinstance(leaf, _NotStorable)), None)


def _leaves_of(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves_of(inner)]
    return [exc]


def _storable_mismatch(exc: _NotStorable) -> Mismatch:
    return Mismatch(
        "the job's arguments stored as JSON, as a queue stores them in Redis",
        f"JSON cannot hold them: {str(exc)[:160]}",
        [
            "The worker is another process: the job gets only what the queue stored, as text. A "
            "`Context` or a `SpanContext` is an object of this process, and cannot travel.",
            "Write the trace context as the W3C headers: `carrier = {}`, `inject(carrier)` gives "
            "`{'traceparent': '00-…-…-01'}`, a dict of strings; pass that dict as the job's argument.",
        ],
    )


def _place_orders(build_orders_app: Callable[..., Any], run: _JobsRun, tracing_: Tracing) -> None:
    app = build_orders_app(tracing_, run.queue)
    find_route(app, "POST", _ORDERS_ROUTE, "app")

    async def place(order: _Order) -> tuple[str, int]:
        _request_var.set(order.order_id)  # this request's task only
        headers = []
        if order.incoming is not None:
            headers.append((b"traceparent", order.incoming.encode()))
        if order.tracestate is not None:
            headers.append((b"tracestate", order.tracestate.encode()))
        response = await call(app, f"/orders/{order.order_id}", method="POST", headers=headers)
        return order.order_id, response.status

    async def main() -> dict[str, int]:
        return dict(await asyncio.gather(*(place(order) for order in run.orders)))

    try:
        run.statuses = in_fresh_loop(main, timeout=10, name="check-3.4-orders")
    except NoReturn as late:
        raise _late(
            late,
            f"{_ORDERS} orders answered within a few seconds",
            "Does `enqueue_receipt` wait for something, or await the job itself? It only stores the job.",
        ) from None
    except BaseException as exc:
        unstorable = _not_storable(exc)
        if unstorable is not None:
            raise _storable_mismatch(unstorable) from None
        raise
    bad = {order: status for order, status in run.statuses.items() if status != 202}
    expect(
        not bad,
        f"status 202 for each of the {_ORDERS} orders",
        f"statuses {dict(Counter(run.statuses.values()))}",
        _ENDPOINT_HINT,
    )
    counts = Counter(job.request for job in run.queue.jobs)
    wrong = [o.order_id for o in run.orders if counts[o.order_id] != 1]
    expect(
        not wrong,
        f"one job enqueued by each of the {_ORDERS} requests",
        f"{sum(counts.values())} jobs, {len(wrong)} requests with none or several"
        + (": `enqueue_receipt` was called but the enqueue never awaited?" if not counts else ""),
        'Each order enqueues one receipt: `await queue.enqueue("send_receipt", …)` once in '
        "`enqueue_receipt`, awaited (the queue's `enqueue` is a coroutine, as SAQ's is).",
    )
    names = sorted({job.function for job in run.queue.jobs} - {_JOB})
    expect(
        not names,
        f"jobs for the function {_JOB!r}",
        f"jobs for {', '.join(map(repr, names))}",
        f'A worker finds a job\'s function by name: `await queue.enqueue("{_JOB}", …)`.',
    )
    for span in tracing_.spans():
        path = dict(span.attributes or {}).get("url.path")
        if span.kind == otel_trace.SpanKind.SERVER and isinstance(path, str) and span.context is not None:
            run.trace_ids[path.removeprefix("/orders/")] = span.context.trace_id
    for order in run.orders:
        if order.trace_id is not None:
            run.trace_ids[order.order_id] = order.trace_id
    missing = [o.order_id for o in run.orders if o.order_id not in run.trace_ids]
    expect(
        not missing,
        "a server span for each request, made by the app's tracer provider",
        f"none for {len(missing)} of the {_FRESH} requests that came without a traceparent",
        _ENDPOINT_HINT,
    )


def _strings_only(value: Any) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, dict):
        return all(isinstance(k, str) and _strings_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_strings_only(v) for v in value)
    return value is None


def _check_carrier(run: _JobsRun) -> None:
    for order in run.orders:
        job = run.job_of(order)
        context = {k: v for k, v in job.kwargs.items() if k != "order_id"}
        if not context:
            raise Mismatch(
                "the request's trace context among the job's arguments",
                f"only {short(job.kwargs)}: the job carries nothing of the request's trace",
                [
                    "A job runs later, in a worker, in a context of its own: the request's current span "
                    "is not there. What the job needs from the request must travel in its arguments.",
                    _INJECT_EXTRACT,
                ],
            )
        odd = {k: v for k, v in context.items() if not _strings_only(v)}
        expect(
            not odd,
            "the trace context as text, a dict of strings, as the W3C headers are",
            f"{short(odd, 120)}: not strings",
            "A carrier is what a header would hold: strings. A trace ID as an int loses digits in any "
            "JSON reader that holds numbers as doubles (JavaScript's, for one), and a worker in another "
            "language expects the `traceparent` format.",
            "`inject(carrier)` writes `traceparent` (and `tracestate`) as strings; `extract(carrier)` "
            "reads them back.",
        )
        wanted = _hex(run.trace_ids[order.order_id])
        expect(
            wanted in json.dumps(job.kwargs),
            f"the trace ID of the request that enqueued it ({wanted}) in the job's arguments",
            f"{short(job.kwargs, 140)} (for a request with {order.kind})",
            "Inject while the request's span is current: in `enqueue_receipt`, called from the endpoint, "
            "not in the job or at import time.",
            _INJECT_EXTRACT,
        )


def _run_jobs(send_receipt: Callable[..., Any], jobs: list[_Job], worker: Tracing) -> None:
    """Run every job as a worker would: concurrently, each in a task with a fresh context."""
    ctx = {"tracer": worker.tracer, "mailer": _ReceiptMailer(jobs)}

    async def one(index: int) -> None:
        job = jobs[index]
        _job_var.set(index)
        job.context_before = otel_context.get_current()
        try:
            await send_receipt(dict(ctx), **job.kwargs)
        except Exception as exc:
            job.raised = exc
        job.context_after = otel_context.get_current()

    async def main() -> None:
        tasks = [asyncio.create_task(one(i), context=contextvars.Context()) for i in range(len(jobs))]
        await asyncio.gather(*tasks)

    try:
        in_fresh_loop(main, timeout=10, name="check-3.4-worker")
    except NoReturn as late:
        raise _late(
            late,
            f"each {_JOB} job to return within a second or so",
            "Does the job wait for something that never comes? It sends one receipt and returns.",
        ) from None


def _check_jobs_ran(send_receipt: Callable[..., Any], run: _JobsRun, worker: Tracing) -> None:
    _run_jobs(send_receipt, run.queue.jobs, worker)
    run.worker_spans = worker.spans()
    for job in run.queue.jobs:
        if job.raised is not None:
            raise job.raised
    counts = Counter(len(job.sends) for job in run.queue.jobs)
    expect(
        set(counts) == {1},
        f'each of the {_ORDERS} jobs to send its receipt once, with `await ctx["mailer"].send(…)`',
        ", ".join(f"{n} jobs sent {times}" for times, n in sorted(counts.items())),
        'Keep the send in the job: `await ctx["mailer"].send(f"{order_id}@example.com", '
        '"Your receipt")`, inside the span.',
    )


def _worker_span(spans: list[ReadableSpan], span_id: int) -> ReadableSpan | None:
    return next((s for s in spans if s.context is not None and s.context.span_id == span_id), None)


def _top_of_job(spans: list[ReadableSpan], span: ReadableSpan) -> ReadableSpan:
    """The job's outermost span: up from ``span`` through the worker's spans (a job may nest several)."""
    for _ in range(50):
        parent = _worker_span(spans, span.parent.span_id) if span.parent is not None else None
        if parent is None:
            break
        span = parent
    return span


def _check_own_trace(run: _JobsRun) -> None:
    wrong: list[tuple[_Order, otel_trace.SpanContext]] = []
    outside: list[_Order] = []
    for order in run.orders:
        job = run.job_of(order)
        (sent, _) = job.sends[0]
        if not sent.is_valid:
            outside.append(order)
        elif sent.trace_id != run.trace_ids[order.order_id]:
            wrong.append((order, sent))
    if outside:
        raise Mismatch(
            "the receipt sent inside the job's span",
            f"no span was current while {len(outside)} of {_ORDERS} jobs sent their receipt",
            [
                "`tracer.start_span(…)` (even in a `with`) starts a span without making it current, and "
                "what runs outside the `with` block runs outside the span.",
                '`with tracer.start_as_current_span("send_receipt", context=parent):` around the send.',
            ],
        )
    if not wrong:
        return
    owners = {trace_id: order_id for order_id, trace_id in run.trace_ids.items()}
    borrowed = [(order, owners[sent.trace_id]) for order, sent in wrong if sent.trace_id in owners]
    if borrowed:
        order, other = borrowed[0]
        raise Mismatch(
            f"each of {_ORDERS} jobs, enqueued by concurrent requests, in its own request's trace",
            f"{len(borrowed)} of {_ORDERS} in another request's trace (the job of {order.order_id} in the "
            f"trace of {other}): the context came from something all requests share, not from the job's "
            "arguments",
            [
                "By the time the worker runs a job, later requests have run: a module-level variable "
                "holds the last one's context, not this job's.",
                "Let the job read its trace context from its own arguments only: "
                "`extract(trace_context)`, the dict `enqueue_receipt` passed with this job.",
            ],
        )
    order, sent = min(wrong, key=lambda pair: pair[0].incoming is None or not pair[0].sampled)
    raise Mismatch(
        "each job's span in the trace of the request that enqueued it",
        f"{len(wrong)} of {_ORDERS} jobs in a trace of their own (the job of {order.order_id}, a request "
        f"with {order.kind}: trace {_hex(sent.trace_id)}, its request's "
        f"{_hex(run.trace_ids[order.order_id])}): the request's waterfall ends at the enqueue",
        [
            "`extract(carrier)` returns a Context holding the request's span; it does not make it current. A "
            "span started without `context=` takes the worker's current span as parent: none, so a new "
            "trace. A link (`links=[…]`) also starts a new trace; this exercise wants the job as a child.",
            '`parent = extract(trace_context)`, then `tracer.start_as_current_span("send_receipt", '
            "context=parent)`.",
        ],
    )


def _check_parent(run: _JobsRun) -> None:
    for order in (o for o in run.orders if o.sampled):
        job = run.job_of(order)
        (sent, recording) = job.sends[0]
        expect(
            sent.span_id != job.at_enqueue.span_id,
            "a span of the job's own, a child of the span current at enqueue",
            "the receipt was sent under the endpoint's span itself, made current in the worker: the job's "
            "work has no span, and its time shows in no waterfall",
            "Extracting gives the *parent*: the job still needs a span of its own, started as its child.",
            '`with tracer.start_as_current_span("send_receipt", context=extract(trace_context)):`',
        )
        span = _worker_span(run.worker_spans, sent.span_id)
        expect(
            recording and span is not None,
            "the job's span recorded and ended, so that the worker's exporter has it",
            "the span current at the send was " + ("never ended" if recording else "not recording"),
            "A span reaches the exporter when it ends: let a `with` block end it.",
        )
        assert span is not None
        top = _top_of_job(run.worker_spans, span)
        parent = top.parent
        expect(
            parent is not None and parent.span_id == job.at_enqueue.span_id,
            f"the job's span a child of the span current at enqueue ({job.at_enqueue.span_id:016x}, the "
            "endpoint's)",
            f"{top.name!r} has parent "
            + (f"{parent.span_id:016x}" if parent is not None else "none")
            + f" (the job of {order.order_id})",
            "Inject in `enqueue_receipt`, called from the endpoint: the current span there is the one "
            "the job's span should hang under.",
            _INJECT_EXTRACT,
        )


def _check_tracestate(run: _JobsRun) -> None:
    for order in (o for o in run.orders if o.tracestate is not None):
        job = run.job_of(order)
        span = _worker_span(run.worker_spans, job.sends[0][0].span_id)
        assert span is not None
        top = _top_of_job(run.worker_spans, span)
        header = top.context.trace_state.to_header() if top.context is not None else ""
        expect(
            order.tracestate in header.split(","),
            f"the job's span to carry the caller's tracestate, {order.tracestate!r}",
            f"tracestate {header!r}: only the traceparent travelled",
            "The W3C trace context is two headers: `traceparent`, and `tracestate`, where vendors keep "
            "their own data. A carrier built by hand usually forgets the second.",
            "Let the propagator write both: `inject(carrier)`, and `extract(carrier)` in the job.",
        )


def _check_not_sampled(run: _JobsRun) -> None:
    for order in (o for o in run.orders if not o.sampled):
        job = run.job_of(order)
        (sent, recording) = job.sends[0]
        exported = [
            s for s in run.worker_spans if s.context is not None and s.context.trace_id == sent.trace_id
        ]
        expect(
            not recording and not exported,
            f"no job span recorded for a request whose caller sampled its trace out ({order.incoming})",
            f"the job's span was recorded{' and exported' if exported else ''}, flags "
            f"{int(sent.trace_flags):02x}: the job would appear in a trace whose request does not",
            "The last field of `traceparent` is the caller's sampling decision: 01 kept, 00 dropped. "
            "Every service, and every job, follows the root's decision, so a trace is kept whole or not "
            "at all.",
            "Do not write the flags yourself: `inject(carrier)` copies the current span's, and the "
            "worker's `ParentBased` sampler follows them when the job's span is started with "
            "`context=extract(trace_context)`.",
        )


def _check_context_left(run: _JobsRun) -> None:
    left = [job for job in run.queue.jobs if job.context_after != job.context_before]
    expect(
        not left,
        "OpenTelemetry's context in the job's task as it was before the job ran",
        f"{len(left)} of {len(run.queue.jobs)} jobs left a context attached: whatever the worker runs "
        "next in that task would join this request's trace",
        "`context.attach(…)` must be matched by `context.detach(token)` in a `finally:`.",
        "Or attach nothing: pass the context to the span, "
        '`tracer.start_as_current_span("send_receipt", context=parent)`, which detaches when its block ends.',
    )


def _missing_header(exc: KeyError, where: str) -> None:
    """A ``KeyError`` for a W3C header, outside any request: the carrier is empty there."""
    if exc.args and exc.args[0] in ("traceparent", "tracestate"):
        raise Mismatch(
            "a job enqueued outside any request to run, in a trace of its own",
            f"KeyError: {exc.args[0]!r} in {where}: outside any request no span is current, and "
            "`inject` leaves the carrier empty",
            [
                "A carrier holds only what there is to carry: `{}` when nothing is being traced, "
                "`traceparent` alone when the trace has no `tracestate`. Never index it.",
                "Pass the whole carrier along, and let `extract(trace_context)` read it: for `{}` it "
                "returns an empty context, and the span started with it is the root of a new trace.",
            ],
        ) from None


def _check_outside_request(
    enqueue_receipt: Callable[..., Any], send_receipt: Callable[..., Any], run: _JobsRun, worker: Tracing
) -> None:
    queue = _CheckQueue()
    order_id = "nightly-resend-1"

    async def main() -> None:
        await enqueue_receipt(queue, order_id)

    try:
        in_fresh_loop(main, timeout=10, name="check-3.4-outside")
    except NoReturn as late:
        raise _late(late, "enqueue_receipt to return", "It only stores the job.") from None
    except _NotStorable as exc:
        raise _storable_mismatch(exc) from None
    except KeyError as exc:
        _missing_header(exc, "enqueue_receipt")
        raise
    expect(
        len(queue.jobs) == 1,
        "one job enqueued by `enqueue_receipt(queue, order_id)` called outside any request",
        f"{len(queue.jobs)} jobs",
        f'`await queue.enqueue("{_JOB}", order_id=order_id, trace_context=carrier)`, once.',
    )
    worker.clear()
    _run_jobs(send_receipt, queue.jobs, worker)
    (job,) = queue.jobs
    if isinstance(job.raised, KeyError):
        _missing_header(job.raised, _JOB)
    if job.raised is not None:
        raise job.raised
    expect(
        len(job.sends) == 1,
        "the job to send its receipt once",
        f"{len(job.sends)} sends",
        "Keep the send in the job, inside the span.",
    )
    (sent, recording) = job.sends[0]
    expect(
        sent.is_valid and recording,
        "the job's receipt sent in a span of its own, recorded: the root of a new trace",
        "no span was current while it sent"
        if not sent.is_valid
        else "the span current at the send was not recording",
        "With nothing to join, `extract({})` returns an empty context, and a span started with it is the "
        "root of a new trace: the job still gets a span.",
        '`with tracer.start_as_current_span("send_receipt", context=extract(trace_context)):` whatever the '
        "carrier holds.",
    )
    owners = {trace_id: order for order, trace_id in run.trace_ids.items()}
    expect(
        sent.trace_id not in owners,
        "a new trace for a job enqueued outside any request",
        f"the job joined the trace of {owners.get(sent.trace_id)}, an earlier request",
        "A job enqueued by a script has no request: it must not borrow the last request's context.",
        "Carry the context in the job's own arguments, and nowhere else.",
    )
    spans = worker.spans()
    span = _worker_span(spans, sent.span_id)
    top = _top_of_job(spans, span) if span is not None else None
    expect(
        top is not None and top.parent is None,
        "the job's span recorded, ended, and the root of its new trace",
        "it was never ended" if top is None else f"{top.name!r} has a parent, {short(top.parent)}",
        "With an empty carrier there is no parent to take: a span started with `context=extract({})` is a "
        "root.",
    )


def check_job_joins_trace(
    build_orders_app: Callable[..., Any],
    enqueue_receipt: Callable[..., Awaitable[None]],
    send_receipt: Callable[..., Awaitable[None]],
) -> None:
    """Check Exercise 3.4: a queued job's span joins the trace of the request that enqueued it.

    Builds ``build_orders_app(tracing, queue)`` with a tracer provider of the check's own ("orders", a
    ``SimpleSpanProcessor`` to memory) and a queue of its own that stores each job's arguments as JSON
    and notes the span current at the enqueue. Sends 12 concurrent ``POST /orders/{order_id}``
    through ASGI: 4 without a ``traceparent``, 5 with a sampled one (and a ``tracestate``), 3 with flags
    00. Then runs every job as a worker would (concurrently, each in a task with a fresh context, with
    ``ctx = {"tracer": …, "mailer": …}`` from a second provider, "receipts-worker"), and requires for
    each: a trace context of strings in its arguments, holding its request's trace ID; the receipt sent
    in a span of the job's own, in its request's trace (never another's), a child of the span current
    at the enqueue, carrying the caller's tracestate; no recorded span for a sampled-out request; the
    context left as it was. Last, ``enqueue_receipt`` called outside any request must lead to a job
    whose span is the root of a new trace. Both providers are stopped before it returns.
    """
    with exercise("3.4", "A queued job that joins the request's trace", SOLUTION) as ex:

        def arguments() -> None:
            for name, function in (
                ("build_orders_app", build_orders_app),
                ("enqueue_receipt", enqueue_receipt),
                ("send_receipt", send_receipt),
            ):
                expect(callable(function), f"the function `{name}`", short(function), _CALL_3_4)
            for name, function in (("enqueue_receipt", enqueue_receipt), ("send_receipt", send_receipt)):
                expect(
                    inspect.iscoroutinefunction(function),
                    f"`{name}` defined with `async def`",
                    f"a plain function: {short(function)}",
                    "The queue's `enqueue` and the mailer's `send` are coroutines: a function that "
                    "awaits them is `async def`.",
                )

        if not ex.step("build_orders_app, enqueue_receipt and send_receipt are functions", arguments):
            return
        orders = tracing("orders", processor="simple", name="check-3.4")
        worker = tracing("receipts-worker", processor="simple", name="check-3.4")
        try:
            run = _JobsRun(_plan_orders())
            ex.require(
                f"{_ORDERS} concurrent orders (some with their caller's traceparent, some without) are "
                "answered 202, each enqueueing one send_receipt job stored as JSON",
                lambda: _place_orders(build_orders_app, run, orders),
            )
            ex.step(
                "each job's arguments hold its request's trace context, as strings",
                lambda: _check_carrier(run),
            )
            ex.require(
                "a worker runs every job, each in a context of its own, and each sends its receipt",
                lambda: _check_jobs_ran(send_receipt, run, worker),
            )
            if ex.step(
                f"each job's span is in the trace of its own request, never another's ({_ORDERS} at once)",
                lambda: _check_own_trace(run),
            ):
                if ex.step(
                    "each job's span is a child of the span current at the enqueue (the endpoint's)",
                    lambda: _check_parent(run),
                ):
                    ex.step("the caller's tracestate travels with the job", lambda: _check_tracestate(run))
                ex.step(
                    "a request whose caller sampled the trace out (flags 00) leads to no recorded job span",
                    lambda: _check_not_sampled(run),
                )
            ex.step("the job leaves the worker's context as it found it", lambda: _check_context_left(run))
            ex.step(
                "a job enqueued outside any request starts a trace of its own, without an error",
                lambda: _check_outside_request(enqueue_receipt, send_receipt, run, worker),
            )
        finally:
            orders.stop()
            worker.stop()
