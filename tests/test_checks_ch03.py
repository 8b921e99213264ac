"""support.checks.ch03: chapter 3's checks pass right answers and name each plausible wrong one.

Every answer here is written the way a learner would write it in the exercise cell; the given code
around it (the `/whoami` and `/items/{item_id}` endpoints, the registry) is the notebook's.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import nbformat
import prometheus_client
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from opentelemetry import context as otel_context
from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from support.checks import forget_answers, placeholder_message
from support.checks.ch03 import (
    check_checkout_spans,
    check_job_joins_trace,
    check_latency_histogram,
    check_request_id_middleware,
)
from support.metrics import read_histogram
from support.telemetry import children, self_time
from tests.checking import fresh_and_leaves_nothing_running, rejected


@pytest.fixture(autouse=True)
def _fresh_and_leaves_nothing_running() -> Iterator[None]:
    with fresh_and_leaves_nothing_running():
        yield


# ---------------------------------------------------------------------------------------------------
# Exercise 3.1: a correlation-ID middleware
# ---------------------------------------------------------------------------------------------------


def ids_answer(variant: str) -> tuple[FastAPI, ContextVar[str]]:
    """The exercise cell, answered one way or another: (ids_app, request_id_var)."""
    request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
    shared = {"current": "-"}  # a module-level "current request id", as a learner might keep one

    def accept(incoming: str) -> bool:
        if variant == "no-validation":
            return bool(incoming)
        if variant == "dollar":
            return bool(re.match(r"^[A-Za-z0-9._-]{1,64}$", incoming))
        if variant == "word-class":
            return bool(re.fullmatch(r"[\w.-]{1,64}", incoming))
        if variant == "unbounded":
            return bool(re.fullmatch(r"[A-Za-z0-9._-]+", incoming))
        if variant == "ascii-flag":  # right too
            return bool(re.fullmatch(r"[\w.-]{1,64}", incoming, re.ASCII))
        if variant == "backslash-z":  # right too
            return bool(re.match(r"[A-Za-z0-9._-]{1,64}\Z", incoming))
        if variant == "a-z-range":
            return bool(re.fullmatch(r"[A-z0-9._-]{1,64}", incoming))
        if variant == "ignorecase":
            return bool(re.fullmatch(r"[a-z0-9._-]{1,64}", incoming, re.IGNORECASE))
        return bool(re.fullmatch(r"[A-Za-z0-9._-]{1,64}", incoming))

    class RequestIDMiddleware:
        def __init__(self, app: Callable) -> None:
            self.app = app

        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            if variant == "placeholder":
                raise NotImplementedError(placeholder_message("3.1"))
            raw = dict(scope["headers"]).get(b"x-request-id", b"")
            utf8 = variant in ("word-class", "ignorecase")
            incoming = raw.decode("utf-8", "replace") if utf8 else raw.decode("latin-1")
            if variant == "strict-utf8":
                incoming = raw.decode()
            if variant == "truncate":
                incoming = incoming[:64]
            if variant == "refuse" and not accept(incoming):
                await JSONResponse({"detail": "bad X-Request-ID"}, status_code=400)(scope, receive, send)
                return
            fallback = "-" if variant == "constant" else uuid.uuid4().hex
            rid = incoming if accept(incoming) else fallback
            if variant == "error":
                raise KeyError("x-request-id")
            if variant == "attribute":
                self.rid = rid

            async def send_with_id(message: dict) -> None:
                if message["type"] == "http.response.start" and variant != "no-echo":
                    echo = self.rid if variant == "attribute" else rid
                    kept = [] if variant == "replace-headers" else message.get("headers", [])
                    message["headers"] = [*kept, (b"x-request-id", echo.encode())]
                await send(message)
                if variant == "reset-in-send" and message["type"] == "http.response.body":
                    request_id_var.reset(token)

            if variant == "global":
                shared["current"] = rid
            if variant == "no-reset":
                request_id_var.set(rid)
                await self.app(scope, receive, send_with_id)
                return
            token = request_id_var.set(rid)
            if variant in ("no-finally", "reset-in-send"):
                await self.app(scope, receive, send_with_id)
                if variant == "no-finally":
                    request_id_var.reset(token)
                return
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                request_id_var.reset(token)

    ids_app = FastAPI()
    ids_app.add_middleware(RequestIDMiddleware)

    @ids_app.get("/whoami")
    async def whoami() -> dict[str, str]:
        await asyncio.sleep(0.01)  # other requests run meanwhile
        return {"request_id": shared["current"] if variant == "global" else request_id_var.get()}

    return ids_app, request_id_var


@pytest.mark.parametrize("variant", ["right", "ascii-flag", "backslash-z"])
def test_3_1_a_validating_middleware_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_request_id_middleware(*ids_answer(variant))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 3.1 · A correlation-ID middleware\n")
    assert (
        "  ✅ passed: a hostile X-Request-ID (too long, a newline, ESC, punctuation, non-ASCII, not UTF-8) "
        "is replaced" in out
    )
    assert "  ✅ passed: 20 concurrent requests each see, and get back, their own ID\n" in out
    assert out.endswith("Exercise 3.1: passed ✅ (9 of 9 checks)\n")


def test_3_1_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("placeholder"))
    assert "⬜ not started: Exercise 3.1's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 3.1: not started")


def test_3_1_no_validation_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("no-validation"))
    assert "❌ not yet: a hostile X-Request-ID (too long, a newline, ESC, punctuation, non-ASCII, not" in out
    assert "       expected: each missing or bad ID replaced with a fresh one\n" in out
    assert "       seen:     9 of 9 kept as sent (65 characters: 'aaaa" in out
    assert "hint:     An ID a character too long was kept: bound the length at 64." in out
    assert out.endswith("Exercise 3.1: not yet — 8 of 9 checks pass")


def test_3_1_a_dollar_anchor_with_re_match_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("dollar"))
    assert "       seen:     1 of 9 kept as sent (a trailing newline: 'abc123\\n')\n" in out
    assert "hint:     `$` matches at the very end *and* just before a final newline" in out
    assert out.endswith("Exercise 3.1: not yet — 8 of 9 checks pass")


def test_3_1_a_word_class_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("word-class"))
    assert (
        "       seen:     2 of 9 kept as sent (non-ASCII digits: '١٢٣'; "
        "the Kelvin sign (U+212A): '\u212aey')\n" in out
    )
    assert "hint:     `\\w` and `\\d` match any Unicode letter or digit" in out
    assert out.endswith("Exercise 3.1: not yet — 8 of 9 checks pass")


def test_3_1_no_length_bound_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("unbounded"))
    assert "       seen:     2 of 9 kept as sent (65 characters: 'aaa" in out
    assert "; 10 kB: 'AAA" in out
    assert out.endswith("Exercise 3.1: not yet — 8 of 9 checks pass")


def test_3_1_a_truncated_id_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("truncate"))
    assert "       expected: a fresh ID for 65 characters, not a piece of the header\n" in out
    assert "hint:     Truncating or cleaning an untrusted ID still lets the client choose it" in out
    assert out.endswith("Exercise 3.1: not yet — 8 of 9 checks pass")


def test_3_1_a_constant_fallback_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("constant"))
    assert "       expected: a different fresh ID for each of the 2 requests\n" in out
    assert "       seen:     2 requests got '-'\n" in out
    assert out.endswith("Exercise 3.1: not yet — 7 of 9 checks pass")


def test_3_1_refusing_a_bad_id_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("refuse"))
    assert "       expected: status 200 for a request with no X-Request-ID header\n" in out
    assert "       seen:     status 400\n" in out
    assert out.endswith("Exercise 3.1: not yet — 7 of 9 checks pass")


def test_3_1_a_global_variable_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("global"))
    assert "❌ not yet: 20 concurrent requests each see, and get back, their own ID" in out
    assert re.search(r"seen:     1\d of 20 saw another one \(the handler of 'ex31-req-\d\d' saw", out)
    assert "hint:     Each request runs in its own task, with its own copy of the context" in out
    assert out.endswith("Exercise 3.1: not yet — 8 of 9 checks pass")


def test_3_1_an_id_kept_on_the_middleware_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("attribute"))
    assert "       expected: each of 20 concurrent responses to echo its own request's ID\n" in out
    assert "the middleware object is shared by all requests" in out
    assert out.endswith("Exercise 3.1: not yet — 8 of 9 checks pass")


def test_3_1_no_echo_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("no-echo"))
    assert (
        "❌ not yet: a sane X-Request-ID (up to 64 characters) is kept, seen by the handler and echoed\n"
        "       expected: an X-Request-ID header on the response (for a sane ID)\n"
        "       seen:     none\n"
    ) in out
    assert out.endswith("Exercise 3.1: not yet — 1 of 2 checks pass")


def test_3_1_a_variable_never_reset_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("no-reset"))
    assert (
        "❌ not yet: request_id_var is reset once the request is done\n"
        "       expected: request_id_var back to 'ex31-outside' once the request is done\n"
        "       seen:     'ex31-inside'\n"
    ) in out
    assert out.endswith("Exercise 3.1: not yet — 7 of 9 checks pass")


def test_3_1_an_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer("error"))
    assert "your code raised KeyError: 'x-request-id'" in out
    assert "Traceback" not in out


def test_3_1_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    answer = ids_answer("dollar")
    first = rejected(capsys, check_request_id_middleware, *answer)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_request_id_middleware, *answer)
    assert "re.fullmatch(pattern, incoming)" not in first
    assert "re.fullmatch(pattern, incoming)" in second


# ---------------------------------------------------------------------------------------------------
# Exercise 3.2: custom spans, and the slow step
# ---------------------------------------------------------------------------------------------------

STEPS = ("validate", "price", "reserve")


def checkout_answer(variant: str) -> Any:
    """``checkout`` as a learner might write it."""

    async def traced(order: dict, tracer: Tracer, steps: dict[str, Any], name: str) -> None:
        with tracer.start_as_current_span(f"checkout.{name}", attributes={"order.id": order["id"]}) as span:
            try:
                await steps[name](order)
            except Exception as exc:
                if variant != "swallow":
                    raise
                span.record_exception(exc)  # and carry on with the next step

    async def checkout(order: dict, tracer: Tracer, steps: dict[str, Any]) -> None:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("3.2"))
        if variant == "gather":
            await asyncio.gather(*(traced(order, tracer, steps, name) for name in STEPS))
            return
        if variant == "attach-no-finally":
            for name in STEPS:
                span = tracer.start_span(f"checkout.{name}", attributes={"order.id": order["id"]})
                token = otel_context.attach(otel_trace.set_span_in_context(span))
                await steps[name](order)
                otel_context.detach(token)
                span.end()
            return
        names = list(steps) if variant == "dict-order" else STEPS
        if variant in ("dict-order", "swallow"):
            for name in names:
                await traced(order, tracer, steps, name)
            return
        if variant == "attribute-after":  # a step that raises skips the line after it
            for name in STEPS:
                with tracer.start_as_current_span(f"checkout.{name}") as span:
                    await steps[name](order)
                    span.set_attribute("order.id", order["id"])
            return
        for name in STEPS:
            attributes = {} if variant == "no-attribute" else {"order.id": order["id"]}
            span_name = name if variant == "wrong-names" else f"checkout.{name}"
            if variant == "not-ended":
                tracer.start_span(span_name, attributes=attributes)
                await steps[name](order)
            elif variant == "start-span":
                with tracer.start_span(span_name, attributes=attributes):
                    await steps[name](order)
            else:
                context = Context() if variant == "new-root" else None
                with tracer.start_as_current_span(span_name, context=context, attributes=attributes):
                    await steps[name](order)

    def not_async(order: dict, tracer: Tracer, steps: dict[str, Any]) -> None:
        for name in STEPS:
            with tracer.start_as_current_span(f"checkout.{name}", attributes={"order.id": order["id"]}):
                steps[name](order)

    return not_async if variant == "not-async" else checkout


def duration(span: ReadableSpan) -> float:
    return ((span.end_time or 0) - (span.start_time or 0)) / 1e9


def slowest_answer(variant: str) -> Any:
    """``slowest_step`` as a learner might write it."""

    def slowest_step(spans: list[ReadableSpan]) -> Any:
        steps = [s for s in spans if s.name.startswith("checkout.")]
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("3.2"))
        if variant == "longest":
            return max(spans, key=duration).name
        if variant == "longest-step":
            return max(steps, key=duration).name
        if variant == "last-started":
            return max(steps, key=lambda s: s.start_time or 0).name
        if variant == "hard-coded":
            return "checkout.price"
        if variant == "span":
            return max(spans, key=lambda span: self_time(span, spans))
        if variant == "sum-of-children":  # children at the same time are subtracted twice
            return max(steps, key=lambda s: duration(s) - sum(duration(c) for c in children(s, spans))).name
        if variant == "longest-leaf":
            leaves = [s for s in spans if not children(s, spans)]
            return max(leaves, key=duration).name
        if variant == "all-spans":  # the root or a query can have the most time of its own
            return max(spans, key=lambda span: self_time(span, spans)).name
        if variant == "envelope":  # children taken as one block, from the first start to the last end

            def own(span: ReadableSpan) -> float:
                kids = children(span, spans)
                if not kids:
                    return duration(span)
                covered = max(c.end_time or 0 for c in kids) - min(c.start_time or 0 for c in kids)
                return duration(span) - covered / 1e9

            return max(steps, key=own).name
        if variant == "unclipped":  # children merged, but not cut to the span: a child after its end counts

            def unclipped(span: ReadableSpan) -> float:
                covered, cursor = 0, span.start_time or 0
                for start, end in sorted((c.start_time or 0, c.end_time or 0) for c in children(span, spans)):
                    start = max(start, cursor)
                    if end > start:
                        covered, cursor = covered + end - start, end
                return duration(span) - covered / 1e9

            return max(steps, key=unclipped).name
        if variant == "exact-names":  # right too
            wanted = {f"checkout.{step}" for step in STEPS}
            return max((s for s in spans if s.name in wanted), key=lambda s: self_time(s, spans)).name
        return max(steps, key=lambda span: self_time(span, spans)).name

    return slowest_step


@pytest.mark.parametrize("slowest", ["right", "exact-names"])
def test_3_2_spans_per_step_and_self_time_pass(slowest: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_checkout_spans(checkout_answer("right"), slowest_answer(slowest))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 3.2 · Custom spans, and the slow step\n")
    assert "  ✅ passed: spans made inside a step nest under the step's span (it is current)\n" in out
    assert (
        "  ✅ passed: slowest_step(spans) names the step with the most time of its own, in three checkouts\n"
        in out
    )
    assert out.endswith("Exercise 3.2: passed ✅ (10 of 10 checks)\n")


@pytest.mark.parametrize(("checkout", "slowest"), [("placeholder", "right"), ("right", "placeholder")])
def test_3_2_placeholder_is_not_started(
    checkout: str, slowest: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer(checkout), slowest_answer(slowest))
    assert "⬜ not started: Exercise 3.2's cell" in out
    assert out.endswith("Exercise 3.2: not started")


def test_3_2_spans_never_ended_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("not-ended"), slowest_answer("right"))
    assert (
        "❌ not yet: each step runs in a finished span named checkout.validate, checkout.price, "
        "checkout.reserve\n"
        "       expected: a finished span for each step: checkout.validate, checkout.price, "
        "checkout.reserve\n"
        "       seen:     no finished span other than the check's own: spans that are never ended are never "
        "exported\n"
    ) in out
    assert out.endswith("Exercise 3.2: not yet — 2 of 3 checks pass")


def test_3_2_wrong_names_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("wrong-names"), slowest_answer("right"))
    assert "       seen:     spans {'validate': 1, 'price': 1, 'reserve': 1}\n" in out
    assert out.endswith("Exercise 3.2: not yet — 2 of 3 checks pass")


def test_3_2_a_new_trace_per_step_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("new-root"), slowest_answer("right"))
    assert (
        "❌ not yet: each step's span is a child of the current span, 'checkout'\n"
        "       expected: checkout.validate a child of the current span ('checkout'), in its trace\n"
        "       seen:     checkout.validate is the root of a trace of its own"
    ) in out
    assert "  ✅ passed: slowest_step(spans) names the step with the most time of its own" in out
    assert out.endswith("Exercise 3.2: not yet — 9 of 10 checks pass")


def _stalled_checkout() -> Any:
    """A checkout made slow at checkout.price (100 ms of its own), whose checkout.validate the machine
    stalled for 180 ms: in these spans, validate has the most time of its own."""
    from support.checks import ch03

    q = "db.query"
    trace = ch03._trace(
        "stalled",
        "validate",
        [
            ("checkout", None, 0, 600),
            ("checkout.validate", 0, 0, 185),  # a 5 ms sleep that woke 180 ms late
            ("checkout.price", 0, 185, 330),  # 100 ms of its own, then five queries at once
            *[(q, 2, 285, 325 + n) for n in range(5)],
            ("checkout.reserve", 0, 330, 560),  # eight queries one after the other: long, little of its own
            *[(q, 8, 330 + 28 * n, 355 + 28 * n) for n in range(8)],
        ],
    )
    return ch03._Checkout("price", "reserve", "ord-000000", spans=trace.spans)


@pytest.mark.parametrize("variant", ["right", "span-name"])
def test_3_2_a_stall_that_makes_another_step_slowest_does_not_fail_a_right_answer(variant: str) -> None:
    from support.checks import ch03

    run = _stalled_checkout()
    assert ch03._most_own_time(run) == "checkout.validate"
    answer = slowest_answer("right")
    if variant == "span-name":  # the planned slow step, named by an answer that knew it: still taken
        answer = slowest_answer("hard-coded")
    ch03._check_slowest(answer, [run])


def test_3_2_the_check_own_checkout_with_set_times_has_price_slowest() -> None:
    from support.checks import ch03

    run = ch03._timed_checkout()
    assert ch03._most_own_time(run) == "checkout.price"
    ch03._check_slowest(slowest_answer("right"), [])  # the set-time checkout alone
    with pytest.raises(ch03.Mismatch, match="subtracts the same time several times"):
        ch03._check_slowest(slowest_answer("sum-of-children"), [])


def test_3_2_a_stalled_run_still_rejects_the_longest_step() -> None:
    from support.checks import ch03

    with pytest.raises(ch03.Mismatch) as failed:
        ch03._check_slowest(slowest_answer("longest-step"), [_stalled_checkout()])
    assert "'checkout.validate', the span with the most time of its own in this run" in str(failed.value)


def test_3_2_a_span_that_is_not_current_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("start-span"), slowest_answer("right"))
    assert "❌ not yet: spans made inside a step nest under the step's span (it is current)" in out
    assert re.search(r"seen:     13 of 13 were not: they went to the step's parent", out)
    assert out.endswith("Exercise 3.2: not yet — 9 of 10 checks pass")


def test_3_2_a_missing_attribute_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("no-attribute"), slowest_answer("right"))
    assert re.search(r"expected: the attribute order.id = 'ord-[0-9a-f]{6}' on checkout.validate\n", out)
    assert "       seen:     attributes {}\n" in out
    assert out.endswith("Exercise 3.2: not yet — 9 of 10 checks pass")


def test_3_2_a_plain_function_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("not-async"), slowest_answer("right"))
    assert "expected: an awaitable: `checkout` defined with `async def`" in out
    assert out.endswith("Exercise 3.2: not yet — 1 of 2 checks pass")


def test_3_2_the_longest_span_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("right"), slowest_answer("longest"))
    assert re.search(
        r"seen:     'checkout': the root span: it is always the longest, but its time is its children's\. "
        r"The spans: checkout \d+ ms long, \d+ ms its own; checkout.validate",
        out,
    )
    assert out.endswith("Exercise 3.2: not yet — 7 of 10 checks pass")


def test_3_2_the_longest_step_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("right"), slowest_answer("longest-step"))
    assert re.search(r"whose time was spent in its 8 'db.query' children, not in its own code", out)
    assert out.endswith("Exercise 3.2: not yet — 7 of 10 checks pass")


@pytest.mark.parametrize("variant", ["last-started", "hard-coded"])
def test_3_2_a_step_not_found_from_the_spans_is_rejected(
    variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("right"), slowest_answer(variant))
    assert (
        "❌ not yet: slowest_step(spans) names the step with the most time of its own, in three checkouts"
        in out
    )
    # a stall can make the run's slowest step another than the one made slow: the message says which
    assert re.search(
        r"expected: 'checkout\.\w+', the span with the most time of its own (\(when '\w+'|in this run)", out
    )
    assert out.endswith("Exercise 3.2: not yet — 7 of 10 checks pass")


def test_3_2_a_span_instead_of_its_name_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("right"), slowest_answer("span"))
    assert "hint:     Return the span's name: `….name`." in out


def test_3_2_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    first = rejected(capsys, check_checkout_spans, checkout_answer("right"), slowest_answer("longest"))
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_checkout_spans, checkout_answer("right"), slowest_answer("longest"))
    assert "self_time(span, spans)).name" not in first
    assert "self_time(span, spans)).name" in second


# ---------------------------------------------------------------------------------------------------
# Exercise 3.3: a latency histogram, and p99 from it
# ---------------------------------------------------------------------------------------------------

SLO_SECONDS = 0.1
METRIC = "http_request_duration_seconds"


@pytest.fixture
def default_registry() -> Iterator[None]:
    """Unregister from the default REGISTRY what an answer put there."""
    yield
    registry = prometheus_client.REGISTRY
    for collector in list(getattr(registry, "_collector_to_names", {})):
        if any(name.startswith(METRIC) for name in registry._collector_to_names[collector]):
            registry.unregister(collector)


def shop_answer(variant: str) -> FastAPI:
    """The exercise cell, answered one way or another: ``shop_app``."""
    metrics_registry = CollectorRegistry()
    in_default = variant in ("default-registry", "default-registry-hidden")

    class LatencyMiddleware:
        def __init__(self, app: Callable, registry: CollectorRegistry) -> None:
            self.app = app
            if variant == "placeholder":
                raise NotImplementedError(placeholder_message("3.3"))
            buckets = [0.005, 0.01, 0.025, 0.05, 0.075, SLO_SECONDS, 0.25, 0.5, 1.0]
            if variant == "fine-buckets":  # the lesson's, 25 % apart: no boundary at 0.1
                buckets = [round(0.001 * 1.25**i, 5) for i in range(32)]
            if variant == "float-buckets":  # 0.1 * 0.1 * 10 is 0.10000000000000002
                buckets = [SLO_SECONDS * 0.1 * i for i in range(1, 21)] + [0.5, 1.0]
            where = {} if in_default else {"registry": registry}
            if variant == "summary":
                self.latency = Summary(METRIC, "Request duration", ["route"], **where)
            elif variant == "gauge":
                self.latency = Gauge(METRIC, "Request duration", ["route"], **where)
            else:
                self.latency = Histogram(METRIC, "Request duration", ["route"], buckets=buckets, **where)

        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http" or scope["path"] == "/metrics":
                await self.app(scope, receive, send)
                return
            start, observed = time.perf_counter(), False

            def observe() -> None:
                nonlocal observed
                observed = True
                route = scope["route"].path if "route" in scope else "unmatched"
                self.latency.labels(route=route).observe(time.perf_counter() - start)

            if variant == "after-app":  # the clock stops after the background tasks
                try:
                    await self.app(scope, receive, send)
                finally:
                    observe()
                return

            async def timed_send(message: dict) -> None:
                nonlocal observed
                if variant == "at-start" and message["type"] == "http.response.start":
                    observe()
                await send(message)
                if variant == "at-start":
                    return
                if variant == "every-body" and message["type"] == "http.response.body":
                    observe()
                    return
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    route = scope["route"].path if "route" in scope else "unmatched"
                    if variant == "no-fallback":
                        route = scope["route"].path
                    if variant == "raw-fallback" and "route" not in scope:
                        route = scope["path"]
                    if variant == "raw-path":
                        route = scope["path"]
                    seconds = time.perf_counter() - start
                    if variant == "milliseconds":
                        seconds *= 1000
                    observed = True
                    if variant == "gauge":
                        self.latency.labels(route=route).set(seconds)
                    else:
                        self.latency.labels(route=route).observe(seconds)

            if variant == "send-only":  # a handler that raises sends nothing through timed_send
                await self.app(scope, receive, timed_send)
                return
            if variant == "swallows":  # records the failing request, and the exception goes no further
                try:
                    await self.app(scope, receive, timed_send)
                except Exception:
                    if not observed:
                        observe()
                return
            try:
                await self.app(scope, receive, timed_send)
            finally:  # the handler raised: its 500 goes out through ServerErrorMiddleware, outside
                if not observed or variant == "finally-always":
                    observe()

    shop_app = FastAPI()
    shop_app.add_middleware(LatencyMiddleware, registry=metrics_registry)

    @shop_app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        await asyncio.sleep(0.08 if item_id % 10 == 7 else 0.005)
        return {"item_id": item_id}

    @shop_app.get("/metrics", include_in_schema=False)
    async def metrics() -> Any:
        if variant == "placeholder-metrics":
            raise NotImplementedError(placeholder_message("3.3"))
        served = prometheus_client.REGISTRY if variant == "default-registry" else metrics_registry
        if variant == "bytes":
            return generate_latest(served)
        if variant == "plain-text":
            return PlainTextResponse(generate_latest(served).decode())
        return Response(generate_latest(served), media_type=CONTENT_TYPE_LATEST)

    return shop_app


def p99_answer(variant: str) -> Any:
    """``p99_from_metrics`` as a learner might write it."""

    def p99_from_metrics(text: str) -> float:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("3.3"))
        if variant == "helper":
            return read_histogram(text, METRIC).quantile(0.99)
        buckets: dict[float, float] = {}
        total_sum = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_bucket") and variant == "every-histogram":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
                elif sample.name == f"{METRIC}_bucket" and variant == "last-series":
                    buckets[float(sample.labels["le"])] = sample.value
                elif sample.name == f"{METRIC}_bucket":
                    le = float(sample.labels["le"])
                    buckets[le] = buckets.get(le, 0.0) + sample.value
                elif sample.name == f"{METRIC}_sum":
                    total_sum += sample.value
        if variant == "le-first":  # a pattern that expects le to be the first label
            buckets = {}
            for le, value in re.findall(
                rf'^{METRIC}_bucket\{{le="([^"]+)"[^\n]*\}} (\S+)$', text, re.MULTILINE
            ):
                buckets[float(le)] = buckets.get(float(le), 0.0) + float(value)
        ordered = sorted(buckets.items())
        if variant == "no-series-lookup" and not ordered:  # as read_histogram once did
            raise LookupError(f"no histogram {METRIC} in the metrics text")
        if variant == "text-order":  # the finite bounds sorted as the page writes them
            finite = sorted((floatToGoString(le), n) for le, n in ordered[:-1])
            ordered = [(float(le), n) for le, n in finite] + ordered[-1:]
        total = ordered[-1][1] if ordered or variant == "no-series-guard" else 0.0
        if total == 0 and variant != "no-nan-guard":
            return math.nan
        if variant == "mean":
            return total_sum / total
        if variant == "max":  # the highest bucket with requests in it
            return next(le for le, count in ordered if count >= total)
        rank = 0.99 * total
        if variant == "no-interpolation":
            return next(le for le, count in ordered if count >= rank)
        lower, below = 0.0, 0.0
        for i, (upper, count) in enumerate(ordered):
            if count > rank if variant == "strictly-above" else count >= rank:
                if math.isinf(upper):
                    return math.inf if variant == "infinity" else lower
                if i == 0 and variant == "no-lowest-interpolation":
                    return upper
                return lower + (upper - lower) * (rank - below) / (count - below)
            lower, below = upper, count
        return lower

    return p99_from_metrics


@pytest.mark.parametrize("p99", ["right", "helper"])
def test_3_3_a_histogram_per_route_passes(p99: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_latency_histogram(shop_answer("right"), p99_answer(p99))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 3.3 · A latency histogram, and p99 from it\n")
    assert (
        '  ✅ passed: it has one series per route template: route="/items/{item_id}", not one per item\n'
        in out
    )
    assert out.endswith("Exercise 3.3: passed ✅ (20 of 20 checks)\n")


def test_3_3_the_same_app_checked_twice_passes(capsys: pytest.CaptureFixture[str]) -> None:
    app, p99 = shop_answer("right"), p99_answer("right")
    check_latency_histogram(app, p99)
    check_latency_histogram(app, p99)  # the histogram holds both runs' requests: only the new ones count
    assert capsys.readouterr().out.endswith("Exercise 3.3: passed ✅ (20 of 20 checks)\n")


SOLUTIONS = Path(__file__).resolve().parent.parent / "solutions" / "03_observability_exercises.ipynb"


def solution_3_3() -> tuple[FastAPI, Any]:
    """The solution notebook's own cells for Exercise 3.3, run: (shop_app, p99_from_metrics)."""
    cells = {cell.get("id"): cell.source for cell in nbformat.read(SOLUTIONS, as_version=4).cells}
    given = next(cell_id for cell_id, source in cells.items() if source.startswith("shop_app = FastAPI()"))
    namespace: dict[str, Any] = {}
    for cell_id in ("setup", "ex3-code", given, "ex3-p99"):
        exec(compile(cells[cell_id], f"<{cell_id}>", "exec"), namespace)
    return namespace["shop_app"], namespace["p99_from_metrics"]


def test_3_3_the_solution_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_latency_histogram(*solution_3_3())
    out = capsys.readouterr().out
    assert (
        "  ✅ passed: a request whose handler raises is counted too, under its route, though its 500 never "
        "goes through your `send`\n"
    ) in out
    assert out.endswith("Exercise 3.3: passed ✅ (20 of 20 checks)\n")


def test_3_3_observing_only_in_send_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer("send-only"), p99_answer("right"))
    assert (
        "  ❌ not yet: a request whose handler raises is counted too, under its route, though its 500 never "
        "goes through your `send`\n"
        '       expected: one observation, route="/probe/fails/{n}", for a request whose handler raised '
        "after 50 ms (the client got a 500)\n"
        "       seen:     no observation: nothing went out through your `send` wrapper, so nothing observed "
        "it\n"
    ) in out
    assert "hint:     Look at what `await self.app(scope, receive, timed_send)` does when the handler" in out
    assert out.count("❌ not yet") == 1, out
    assert out.endswith("Exercise 3.3: not yet — 19 of 20 checks pass")


def test_3_3_swallowing_the_handlers_exception_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    # from the blind bank's second round (tests/banks/ch03.md, 3.3 wrong AY): counted, but no 500 is sent
    out = rejected(capsys, check_latency_histogram, shop_answer("swallows"), p99_answer("right"))
    assert (
        "  ❌ not yet: a request whose handler raises is counted too, under its route, though its 500 never "
        "goes through your `send`\n"
        "       expected: the handler's exception to leave your middleware (Starlette then answers 500 and "
        "logs it), or a 500 sent by your middleware\n"
        "       seen:     no exception came out of your middleware, and the client got no response at all: "
        "the error was swallowed\n"
    ) in out, out
    assert "hint:     An `except` that records the request must end with a bare `raise`" in out
    assert out.count("❌ not yet") == 1, out
    assert out.endswith("Exercise 3.3: not yet — 19 of 20 checks pass"), out


@pytest.mark.parametrize(
    ("shop", "p99"), [("placeholder", "right"), ("placeholder-metrics", "right"), ("right", "placeholder")]
)
def test_3_3_placeholder_is_not_started(shop: str, p99: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer(shop), p99_answer(p99))
    assert "⬜ not started: Exercise 3.3's cell" in out
    assert out.endswith("Exercise 3.3: not started")


def test_3_3_raw_path_labels_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer("raw-path"), p99_answer("right"))
    assert (
        '       expected: one series, route="/items/{item_id}", for all 60 items\n'
        "       seen:     60 series: route = '/items/0', '/items/1', '/items/10', '/items/11' …\n"
    ) in out
    assert out.endswith("Exercise 3.3: not yet — 18 of 20 checks pass")


@pytest.mark.parametrize(
    ("variant", "why"),
    [
        ("summary", "a summary: a Summary's quantiles"),
        ("gauge", "a gauge: a Gauge keeps only the last value"),
    ],
)
def test_3_3_not_a_histogram_is_rejected(variant: str, why: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer(variant), p99_answer("right"))
    assert "       expected: http_request_duration_seconds to be a histogram (with _bucket series)\n" in out
    assert f"       seen:     {why}" in out
    assert out.endswith("Exercise 3.3: not yet — 3 of 4 checks pass")


@pytest.mark.usefixtures("default_registry")
def test_3_3_the_default_registry_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer("default-registry"), p99_answer("right"))
    assert "❌ not yet: it is in the app's own registry, not the default one" in out
    assert "metrics that only prometheus_client's default REGISTRY has" in out
    assert "hint:     The default REGISTRY is global" in out
    assert out.endswith("Exercise 3.3: not yet — 16 of 17 checks pass")


@pytest.mark.usefixtures("default_registry")
def test_3_3_a_histogram_left_in_the_default_registry_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(
        capsys, check_latency_histogram, shop_answer("default-registry-hidden"), p99_answer("right")
    )
    assert (
        "A metric of that name is in prometheus_client's default REGISTRY, which this page does not show"
        in out
    )
    assert out.endswith("Exercise 3.3: not yet — 3 of 4 checks pass")


@pytest.mark.usefixtures("default_registry")
def test_3_3_a_histogram_registered_again_in_the_default_registry_is_named(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rejected(capsys, check_latency_histogram, shop_answer("default-registry"), p99_answer("right"))
    out = rejected(capsys, check_latency_histogram, shop_answer("default-registry"), p99_answer("right"))
    assert "       seen:     prometheus_client refused to register it: 'Duplicated timeseries'." in out
    assert "your code raised" not in out
    assert out.endswith("Exercise 3.3: not yet — 1 of 2 checks pass")


def test_3_3_buckets_without_the_objective_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer("fine-buckets"), p99_answer("right"))
    assert (
        "❌ not yet: its buckets have a boundary at the objective, 0.1 s\n"
        '       expected: a bucket boundary at the objective, SLO_SECONDS = 0.1 s (le="0.1")\n'
        "       seen:     32 boundaries, the nearest 0.08674 and 0.10842: the share of requests within "
        "0.1 s can only be interpolated\n"
    ) in out
    assert out.endswith("Exercise 3.3: not yet — 19 of 20 checks pass")


def test_3_3_milliseconds_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer("milliseconds"), p99_answer("right"))
    assert "❌ not yet: it counted the 60 requests, in seconds" in out
    assert out.endswith("Exercise 3.3: not yet — 16 of 17 checks pass")


def test_3_3_bytes_returned_as_json_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer("bytes"), p99_answer("right"))
    assert "       seen:     a JSON string: '\"# HELP" in out
    assert out.endswith("Exercise 3.3: not yet — 1 of 2 checks pass")


@pytest.mark.parametrize(
    ("variant", "why"),
    [
        ("max", "seen:     1: the upper bound of the highest bucket with requests in it, a maximum"),
        ("mean", "far below it; a mean?"),
        (
            "no-interpolation",
            "0.25: the upper bound of the bucket that holds the rank, without interpolating",
        ),
    ],
)
def test_3_3_p99_not_interpolated_is_rejected(
    variant: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer("right"), p99_answer(variant))
    assert (
        "❌ not yet: p99_from_metrics(text) estimates p99 as Prometheus does, on a page with known buckets\n"
        "       expected: p99 ≈ 0.2 s on a page with known buckets, as Prometheus's "
        "histogram_quantile(0.99, …) estimates it\n"
    ) in out
    assert why in out
    assert out.endswith("Exercise 3.3: not yet — 11 of 12 checks pass"), out


# ---------------------------------------------------------------------------------------------------
# Failure paths, edge inputs and state over time, each named by the step that finds it
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "failed", "detail"),
    [
        (
            "a-z-range",
            "a hostile X-Request-ID (too long, a newline, ESC, punctuation, non-ASCII, not UTF-8)",
            "seen:     1 of 9 kept as sent (brackets, a caret, a backtick and a backslash: 'a[b]^c`d\\\\e')",
        ),
        (
            "ignorecase",
            "a hostile X-Request-ID (too long, a newline, ESC, punctuation, non-ASCII, not UTF-8)",
            "seen:     1 of 9 kept as sent (the Kelvin sign (U+212A): '\u212aey')",
        ),
        (
            "strict-utf8",
            "a hostile X-Request-ID (too long, a newline, ESC, punctuation, non-ASCII, not UTF-8)",
            "seen:     the middleware raised UnicodeDecodeError",
        ),
        (
            "replace-headers",
            "the response keeps the app's own headers beside X-Request-ID",
            "seen:     the response's headers: x-request-id",
        ),
        (
            "no-finally",
            "request_id_var is reset even when the endpoint raises",
            "seen:     'ex31-boom'",
        ),
        (
            "reset-in-send",
            "a background task of the request still sees its ID",
            "seen:     it saw 'ex31-outside': the variable was put back before the task ran",
        ),
    ],
)
def test_3_1_each_flaw_is_named(
    variant: str, failed: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_request_id_middleware, *ids_answer(variant))
    assert f"❌ not yet: {failed}" in out
    assert detail in out
    assert "✅ passed: 20 concurrent requests each see, and get back, their own ID" in out


@pytest.mark.parametrize(
    ("variant", "detail"),
    [
        ("gather", "expected: each step to start once the one before it has finished"),
        ("dict-order", "seen:     reserve, price, validate"),
    ],
)
def test_3_2_steps_out_of_order_are_rejected(
    variant: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer(variant), slowest_answer("right"))
    assert (
        "❌ not yet: checkout(order, tracer, steps) runs validate, price and reserve, once each, in order"
        in out
    )
    assert detail in out
    assert out.endswith("Exercise 3.2: not yet — 1 of 2 checks pass")


@pytest.mark.parametrize(
    ("variant", "detail"),
    [
        ("attach-no-finally", "seen:     no finished span for it: the code that ends it never ran"),
        ("swallow", "seen:     checkout returned normally: the caller cannot tell the checkout failed"),
        (
            "attribute-after",
            "seen:     attributes {}, though the span carries it when its step returns: it is set after "
            "the step",
        ),
    ],
)
def test_3_2_a_failing_step_mishandled_is_rejected(
    variant: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer(variant), slowest_answer("right"))
    assert (
        "❌ not yet: a step that raises stops the checkout: the error reaches the caller, its span still "
        "ends, with order.id" in out
    )
    assert detail in out
    assert out.endswith("Exercise 3.2: not yet — 9 of 10 checks pass")


@pytest.mark.parametrize(
    ("variant", "why", "passed"),
    [
        # subtracting the slow step's overlapping queries one by one leaves it below zero, so the answer
        # is whichever other step kept more of its own time in that run: the fast step's few ms, or
        # the gaps between the busy step's queries, which a loaded machine widens
        (
            "sum-of-children",
            ("the step with the least time of all; checkout.", "the longest step, whose time was spent in"),
            8,
        ),
        ("longest-leaf", ("seen:     'db.query': a query, not a step",), 7),
    ],
)
def test_3_2_own_time_miscounted_is_rejected(
    variant: str, why: tuple[str, ...], passed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("right"), slowest_answer(variant))
    assert (
        "❌ not yet: slowest_step(spans) names the step with the most time of its own, in three checkouts"
        in out
    )
    assert any(reason in out for reason in why), out
    assert out.endswith(f"Exercise 3.2: not yet — {passed} of 10 checks pass")


@pytest.mark.parametrize(
    ("variant", "failed", "detail", "passed"),
    [
        (
            "all-spans",
            "names a step, even where the root or a query has more time of its own",
            "seen:     'checkout': the root span: it has the most time of its own here, but it is not a step",
            9,
        ),
        (
            "envelope",
            "counts as a step's own the time inside it that no child covers: between its children, and not "
            "a child's time after the step has ended",
            "seen:     'checkout.price': the step with the most time of its own if its children covered "
            "everything from the first one's start to the last one's end; checkout.validate worked 100 ms",
            9,
        ),
        (
            "unclipped",
            "counts as a step's own the time inside it that no child covers: between its children, and not "
            "a child's time after the step has ended",
            "seen:     'checkout.price': the step with the most time of its own if a child's time after its "
            "step had ended were taken from the step; checkout.validate worked 90 ms of its own",
            9,
        ),
    ],
)
def test_3_2_slowest_step_on_traces_with_set_times(
    variant: str, failed: str, detail: str, passed: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_checkout_spans, checkout_answer("right"), slowest_answer(variant))
    assert f"❌ not yet: slowest_step(spans) {failed}\n" in out
    assert detail in out
    assert (
        "✅ passed: slowest_step(spans) names the step with the most time of its own, in three checkouts"
        in out
    )
    assert out.endswith(f"Exercise 3.2: not yet — {passed} of 10 checks pass")


@pytest.mark.parametrize(
    ("variant", "failed", "detail"),
    [
        (
            "float-buckets",
            "its buckets have a boundary at the objective, 0.1 s",
            'seen:     le="0.10000000000000002": almost 0.1',
        ),
        (
            "at-start",
            "it times a request until its last body message: all of a streamed body, no background task",
            "ms: the clock stopped before the last body message",
        ),
        (
            "after-app",
            "it times a request until its last body message: all of a streamed body, no background task",
            "ms at the least in 3 requests: the clock stopped when the app returned, after its background",
        ),
        (
            "every-body",
            "it times a request until its last body message: all of a streamed body, no background task",
            "seen:     4 observations",
        ),
        (
            "no-fallback",
            "requests that match no route are counted under one fixed label, not their path",
            "seen:     the middleware raised KeyError",
        ),
        (
            "raw-fallback",
            "requests that match no route are counted under one fixed label, not their path",
            "seen:     3 series, labelled '/admin.php', '/nowhere/1', '/nowhere/2'",
        ),
        (
            "finally-always",
            "it counted the 60 requests, in seconds",
            "seen:     120 more than before they were sent: each twice, in `send` and again after",
        ),
        (
            "plain-text",
            "GET /metrics answers with the Prometheus text format, and its content type",
            "seen:     'text/plain; charset=utf-8': no version of the exposition format",
        ),
    ],
)
def test_3_3_each_middleware_flaw_is_named(
    variant: str, failed: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer(variant), p99_answer("right"))
    assert f"❌ not yet: {failed}" in out
    assert detail in out
    assert out.count("❌ not yet") == 1, out


@pytest.mark.parametrize(
    ("variant", "failed", "detail"),
    [
        (
            "every-histogram",
            "adds up every series of http_request_duration_seconds, and nothing else on the page",
            "on a page with two routes, and another histogram beside it",
        ),
        (
            "last-series",
            "adds up every series of http_request_duration_seconds, and nothing else on the page",
            "on a page with two routes, and another histogram beside it",
        ),
        (
            "strictly-above",
            "takes the first bucket whose count reaches the rank, even when it equals it exactly",
            "seen:     0.5: beyond the first bucket whose count reaches the rank",
        ),
        (
            "infinity",
            "answers the highest finite boundary when the rank is in the +Inf bucket",
            "seen:     inf: infinity; when the rank falls in the +Inf bucket",
        ),
        (
            "no-lowest-interpolation",
            "interpolates from 0 inside the lowest bucket",
            "expected: p99 ≈ 0.0099 s on a page where the rank falls in the lowest bucket",
        ),
        (
            "no-nan-guard",
            "is NaN when the histogram has counted no request yet",
            "your code raised ZeroDivisionError",
        ),
        (
            "no-series-guard",
            "is NaN when the histogram has counted no request yet, even before it has a series",
            "seen:     IndexError: 'list index out of range': the code looked up a bucket",
        ),
        (
            "no-series-lookup",
            "is NaN when the histogram has counted no request yet, even before it has a series",
            "seen:     LookupError: 'no histogram http_request_duration_seconds in th…: the code took a "
            "histogram with no series for a missing one",
        ),
        (
            "text-order",
            "orders the buckets by their bounds as numbers, in which 2.5 comes before 10",
            "seen:     8.2: the estimate with the buckets in the order of their le labels as text, "
            'in which "10.0" comes before "2.5"',
        ),
        (
            "le-first",
            'reads every series, whatever its labels: code="…" written before le="…"',
            "seen:     nan: as if the page had no bucket of the histogram: every series here has a code "
            "label",
        ),
    ],
)
def test_3_3_p99_edge_cases_are_named(
    variant: str, failed: str, detail: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_latency_histogram, shop_answer("right"), p99_answer(variant))
    assert f"❌ not yet: p99_from_metrics(text) {failed}" in out
    assert detail in out
    assert "✅ passed: p99_from_metrics(text) estimates p99 as Prometheus does, on a page with known" in out


# ---------------------------------------------------------------------------------------------------
# Exercise 3.4: a queued job that joins the request's trace
# ---------------------------------------------------------------------------------------------------

LATEST: dict[str, Any] = {}  # a module-level "current trace context", as a learner might keep one


def receipts_answer(variant: str) -> tuple[Callable[..., FastAPI], Any, Any]:
    """The exercise cell, answered one way or another: (build_orders_app, enqueue_receipt, send_receipt).

    ``build_orders_app`` is the notebook's given code.
    """

    async def enqueue_receipt(queue: Any, order_id: str) -> None:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("3.4"))
        current = otel_trace.get_current_span().get_span_context()
        carrier: dict[str, Any] = {}
        if variant == "propagator":
            TraceContextTextMapPropagator().inject(carrier)
        elif variant in ("manual-right", "manual-01"):
            flags = "01" if variant == "manual-01" else f"{current.trace_flags:02x}"
            carrier["traceparent"] = f"00-{current.trace_id:032x}-{current.span_id:016x}-{flags}"
            if variant == "manual-right" and current.trace_state:
                carrier["tracestate"] = current.trace_state.to_header()
        elif variant == "int-ids":
            carrier = {"trace_id": current.trace_id, "span_id": current.span_id, "sampled": "1"}
        else:
            inject(carrier)
        if variant == "today":
            await queue.enqueue("send_receipt", order_id=order_id)
            return
        if variant == "traceparent-only":
            carrier = {"traceparent": carrier["traceparent"]}
        if variant == "global":
            LATEST.clear()
            LATEST.update(carrier)
        argument: Any = carrier
        if variant == "context-object":
            argument = otel_context.get_current()
        elif variant == "span-context-object":
            argument = current
        await queue.enqueue("send_receipt", order_id=order_id, trace_context=argument)

    async def send_receipt(ctx: dict, *, order_id: str, trace_context: dict[str, Any] | None = None) -> None:
        tracer: Tracer = ctx["tracer"]
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("3.4"))

        async def send() -> None:
            await ctx["mailer"].send(f"{order_id}@example.com", "Your receipt")

        carrier = LATEST if variant == "global" else trace_context or {}
        if variant == "propagator":
            parent = TraceContextTextMapPropagator().extract(carrier)
        elif variant == "key-error":
            parent = extract({"traceparent": carrier["traceparent"]})
        elif variant == "int-ids":
            parent = otel_trace.set_span_in_context(
                otel_trace.NonRecordingSpan(
                    otel_trace.SpanContext(
                        carrier["trace_id"], carrier["span_id"], True, otel_trace.TraceFlags(1)
                    )
                )
            )
        else:
            parent = extract(carrier)
        if variant in ("today", "no-context"):
            with tracer.start_as_current_span("send_receipt"):
                await send()
        elif variant == "link":
            linked = otel_trace.get_current_span(parent).get_span_context()
            with tracer.start_as_current_span("send_receipt", links=[otel_trace.Link(linked)]):
                await send()
        elif variant == "not-current":
            with tracer.start_span("send_receipt", context=parent):
                await send()
        elif variant in ("attach-only", "attach-detach", "no-detach"):
            token = otel_context.attach(parent)
            try:
                if variant == "attach-only":
                    await send()
                else:
                    with tracer.start_as_current_span("send_receipt"):
                        await send()
            finally:
                if variant != "no-detach":
                    otel_context.detach(token)
        elif variant == "use-span":
            span = tracer.start_span("send_receipt", context=parent)
            with otel_trace.use_span(span, end_on_exit=True):
                await send()
        elif variant == "nested":
            with (
                tracer.start_as_current_span("send_receipt", context=parent),
                tracer.start_as_current_span("email.send"),
            ):
                await send()
        else:
            with tracer.start_as_current_span("send_receipt", context=parent):
                await send()

    def build_orders_app(tracing: Any, queue: Any) -> FastAPI:
        app = FastAPI(telemetry={"tracer_provider": tracing.provider})

        @app.post("/orders/{order_id}", status_code=202)
        async def place_order(order_id: str) -> dict[str, Any]:
            await asyncio.sleep(0.01)  # the order is stored; other requests run meanwhile
            await enqueue_receipt(queue, order_id)
            return {"order_id": order_id, "queued": True}

        return app

    if variant == "sync-job":

        def sync_receipt(ctx: dict, *, order_id: str, trace_context: dict[str, str] | None = None) -> None:
            with ctx["tracer"].start_as_current_span("send_receipt", context=extract(trace_context or {})):
                ctx["mailer"].send(f"{order_id}@example.com", "Your receipt")

        return build_orders_app, enqueue_receipt, sync_receipt
    return build_orders_app, enqueue_receipt, send_receipt


@pytest.mark.parametrize(
    "variant", ["right", "propagator", "attach-detach", "use-span", "manual-right", "nested"]
)
def test_3_4_a_job_that_joins_the_trace_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_job_joins_trace(*receipts_answer(variant))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 3.4 · A queued job that joins the request's trace\n")
    assert (
        "  ✅ passed: each job's span is in the trace of its own request, never another's (12 at once)\n"
        in out
    )
    assert out.endswith("Exercise 3.4: passed ✅ (10 of 10 checks)\n")


def test_3_4_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_job_joins_trace, *receipts_answer("placeholder"))
    assert "⬜ not started: Exercise 3.4's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 3.4: not started")


ORDERS_STEP = (
    "12 concurrent orders (some with their caller's traceparent, some without) are answered 202, each "
    "enqueueing one send_receipt job stored as JSON"
)
OWN_TRACE_STEP = "each job's span is in the trace of its own request, never another's (12 at once)"


@pytest.mark.parametrize(
    ("variant", "failed", "detail", "summary"),
    [
        (  # the service as first written: nothing of the trace travels, the job starts a new one
            "today",
            "each job's arguments hold its request's trace context, as strings",
            "seen:     only {'order_id': 'ord-",
            "5 of 7 checks pass",
        ),
        (  # extract() returns a Context: without context=, the span takes the worker's (empty) one
            "no-context",
            OWN_TRACE_STEP,
            "12 of 12 jobs in a trace of their own (the job of ord-",
            "6 of 7 checks pass",
        ),
        (  # a link, not a parent: a trace of its own, linked to the request's
            "link",
            OWN_TRACE_STEP,
            "hint:     `extract(carrier)` returns a Context holding the request's span; it does not make "
            "it current. A span started without `context=` takes the worker's current span as parent: "
            "none, so a new trace. A link (`links=[…]`) also starts a new trace",
            "6 of 7 checks pass",
        ),
        (  # the Context object as the job's argument: JSON cannot hold it
            "context-object",
            ORDERS_STEP,
            "seen:     JSON cannot hold them: trace_context: a Context (Object of type",
            "1 of 2 checks pass",
        ),
        (  # the SpanContext object: the same
            "span-context-object",
            ORDERS_STEP,
            "seen:     JSON cannot hold them: trace_context: a SpanContext (Object of type",
            "1 of 2 checks pass",
        ),
        (  # trace and span IDs as integers: JSON keeps them here, not every reader does
            "int-ids",
            "each job's arguments hold its request's trace context, as strings",
            "expected: the trace context as text, a dict of strings, as the W3C headers are",
            "7 of 10 checks pass",
        ),
        (  # the context kept in a module-level variable: every job reads the last request's
            "global",
            OWN_TRACE_STEP,
            "in another request's trace (the job of ord-",
            "6 of 7 checks pass",
        ),
        (  # traceparent by hand with the sampled flag hard-coded
            "manual-01",
            "a request whose caller sampled the trace out (flags 00) leads to no recorded job span",
            "seen:     the job's span was recorded and exported, flags 01: the job would appear in a trace "
            "whose request does not",
            "8 of 10 checks pass",
        ),
        (  # only traceparent copied: the caller's tracestate is lost (and an empty carrier fails)
            "traceparent-only",
            "the caller's tracestate travels with the job",
            "seen:     tracestate '': only the traceparent travelled",
            "8 of 10 checks pass",
        ),
        (  # the extracted context attached, but no span of the job's own
            "attach-only",
            "each job's span is a child of the span current at the enqueue (the endpoint's)",
            "seen:     the receipt was sent under the endpoint's span itself",
            "7 of 9 checks pass",
        ),
        (  # start_span does not make the span current: the send runs outside it
            "not-current",
            OWN_TRACE_STEP,
            "seen:     no span was current while 12 of 12 jobs sent their receipt",
            "5 of 7 checks pass",
        ),
        (  # attach without detach: the request's context stays behind in the worker's task
            "no-detach",
            "the job leaves the worker's context as it found it",
            "seen:     12 of 12 jobs left a context attached",
            "9 of 10 checks pass",
        ),
        (  # trace_context["traceparent"]: a job enqueued outside any request has none
            "key-error",
            "a job enqueued outside any request starts a trace of its own, without an error",
            "seen:     KeyError: 'traceparent' in send_receipt: outside any request no span is current",
            "8 of 10 checks pass",
        ),
        (  # a plain function as the job
            "sync-job",
            "build_orders_app, enqueue_receipt and send_receipt are functions",
            "expected: `send_receipt` defined with `async def`",
            "0 of 1 checks pass",
        ),
    ],
)
def test_3_4_each_flaw_is_named(
    variant: str, failed: str, detail: str, summary: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_job_joins_trace, *receipts_answer(variant))
    assert f"❌ not yet: {failed}" in out
    assert detail in out
    assert out.endswith(f"Exercise 3.4: not yet — {summary}")


def test_3_4_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    first = rejected(capsys, check_job_joins_trace, *receipts_answer("no-context"))
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_job_joins_trace, *receipts_answer("no-context"))
    assert "context=parent)`." not in first
    assert '`parent = extract(trace_context)`, then `tracer.start_as_current_span("send_receipt", ' in second
