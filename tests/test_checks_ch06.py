"""support.checks.ch06: chapter 6's checks pass right answers and name each plausible wrong one.

Every answer here is written the way a learner would write it in the exercise cell; the given code
around it (the `Depends(enforce)` wrapper, the limiter's `check` call) is the notebook's.
"""

from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import math
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from redis.asyncio import Redis
from starlette.datastructures import Headers

import support
import support.checks
from support.checks import forget_answers, placeholder_message
from support.checks.ch06 import (
    check_client_key,
    check_limited_response,
    check_plan_quotas,
    check_token_bucket,
)
from tests.checking import fresh_and_leaves_nothing_running, rejected


@pytest.fixture(autouse=True)
def _fresh_and_leaves_nothing_running(redis_backend: str) -> Iterator[None]:
    """Every test runs on fakeredis and on a real Redis (tests/backends.py)."""
    with fresh_and_leaves_nothing_running(redis_pattern="ex06:*"):
        yield


# ---------------------------------------------------------------------------------------------------
# Exercise 6.1: a token bucket in one atomic script
# ---------------------------------------------------------------------------------------------------


def bucket_script(variant: str) -> str:
    """The Lua script, right or wrong in one way."""
    now = "tonumber(redis.call('TIME')[1])" if variant == "server-time" else "tonumber(ARGV[3])"
    refill = "(now - updated) * rate"
    if variant == "floor":
        refill = "math.floor((now - updated) * rate)"
    if variant == "no-refill":
        refill = "0"
    level = f"tokens + {refill}" if variant == "no-cap" else f"math.min(capacity, tokens + {refill})"
    enough = "tokens > 0" if variant == "lenient" else "tokens >= 1"
    capacity = "5" if variant == "fixed-capacity" else "tonumber(ARGV[2])"
    expire = {
        "no-expiry": "",
        "separate-expire": "",
        "short-expiry": "redis.call('EXPIRE', KEYS[1], 1)",
        "floor-expiry": "redis.call('EXPIRE', KEYS[1], math.floor(capacity / rate))",
        "capacity-expiry": "redis.call('EXPIRE', KEYS[1], capacity)",
        "hour-expiry": "redis.call('EXPIRE', KEYS[1], 3600)",
        # right too: the time until the bucket is full again
        "until-full": "redis.call('EXPIRE', KEYS[1], math.ceil((capacity - tokens) / rate))",
        "expire-once": "if fresh then redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate)) end",
    }.get(variant, "redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate))")
    refused = {
        "debit-refused": "tokens = tokens - 1",  # a refusal still pays a token
        "write-only-allowed": "return 0",  # right too: a refusal changes nothing, so stores nothing
        "stale-updated": "now = updated",  # stores the refill, but keeps the old time
    }.get(variant, "")
    return f"""
local rate, capacity, now = tonumber(ARGV[1]), {capacity}, {now}
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens, updated = tonumber(bucket[1]), tonumber(bucket[2])
local fresh = tokens == nil
if fresh then tokens, updated = capacity, now end
tokens = {level}
local allowed = 0
if {enough} then tokens, allowed = tokens - 1, 1 end
if allowed == 0 then {refused} end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'updated', now)
{expire}
return allowed
"""


def bucket_answer(variant: str) -> Any:
    """``take_token`` as a learner might write it."""
    script = bucket_script(variant)

    async def take_token(redis: Redis, key: str, rate: float, capacity: int, now: float) -> bool:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("6.1"))
        if variant == "hangs":
            await asyncio.sleep(60)
        if variant == "one-key":
            key = "ex06:bucket"
        if variant == "python-time":
            now = time.time()
        if variant == "register-script":  # right too: EVALSHA, with SCRIPT LOAD the first time
            return bool(await redis.register_script(script)(keys=[key], args=[rate, capacity, now]))
        if variant == "read-then-write":
            level, updated = await redis.hmget(key, "tokens", "updated")
            tokens = capacity if level is None else float(level)
            last = now if updated is None else float(updated)
            tokens = min(capacity, tokens + (now - last) * rate)
            allowed = tokens >= 1
            await redis.hset(key, mapping={"tokens": tokens - allowed, "updated": now})
            await redis.expire(key, math.ceil(capacity / rate))
            return allowed
        allowed = bool(await redis.eval(script, 1, key, rate, capacity, now))
        if variant == "separate-expire":
            await redis.expire(key, math.ceil(capacity / rate))
        return allowed

    def not_async(redis: Redis, key: str, rate: float, capacity: int, now: float) -> bool:
        return True

    return not_async if variant == "not-async" else take_token


@pytest.mark.parametrize("variant", ["right", "register-script", "until-full", "write-only-allowed"])
def test_6_1_a_token_bucket_script_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    check_token_bucket(bucket_answer(variant))
    assert time.perf_counter() - start < 5
    out = capsys.readouterr().out
    assert out.startswith("Exercise 6.1 · A token bucket in one atomic script\n")
    assert (
        "  ✅ passed: 50 concurrent requests, with a 2 ms round trip to Redis, get exactly 5 tokens\n" in out
    )
    assert out.endswith("Exercise 6.1: passed ✅ (9 of 9 checks)\n")


def test_6_1_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("placeholder"))
    assert "⬜ not started: Exercise 6.1's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 6.1: not started")


def test_6_1_read_then_write_in_python_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("read-then-write"))
    assert (
        "❌ not yet: 50 concurrent requests, with a 2 ms round trip to Redis, get exactly 5 tokens\n"
        "       expected: exactly 5 of 50 concurrent requests admitted (capacity 5)\n"
        "       seen:     50 admitted\n"
        "       hint:     Calls that read the level before any of them writes it back all see a full bucket"
    ) in out
    assert (
        "❌ not yet: each decision is one round trip to Redis: a single EVAL\n"
        "       expected: one command per call: EVAL (or EVALSHA)\n"
        "       seen:     HMGET, HSET, EXPIRE\n"
    ) in out
    assert out.endswith("Exercise 6.1: not yet — 7 of 9 checks pass")


def test_6_1_no_refill_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("no-refill"))
    assert (
        "❌ not yet: it refills a token every 1/rate = 0.5 s of the `now` it is given\n"
        "       expected: after draining the bucket (rate 2 a second): at +0.5 s 1 allowed; "
        "at +1.5 s 2 allowed, then refused\n"
        "       seen:     at +0.5 s: 1 refused; at +1.5 s: 3 refused\n"
        "       hint:     The bucket refills as time passes"
    ) in out
    assert "❌ not yet: after a long idle it holds no more than its capacity, 5" in out
    assert out.endswith("Exercise 6.1: not yet — 4 of 9 checks pass")


@pytest.mark.parametrize("variant", ["server-time", "python-time"])
def test_6_1_a_clock_other_than_now_is_rejected(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    bucket = bucket_answer(variant)
    first = rejected(capsys, check_token_bucket, bucket)
    assert "❌ not yet: it refills a token every 1/rate = 0.5 s of the `now` it is given\n" in first
    # how many a real clock refuses depends on when its second ticks (Redis's TIME is whole seconds)
    assert re.search(r"seen:     at \+0\.5 s: \d refused; at \+1\.5 s: \d refused\n", first), first
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_token_bucket, bucket)
    assert (
        "hint:     Use the `now` you are given (pass it in ARGV), not Redis's `TIME` nor `time.time()`"
        in second
    )
    assert "hint:     Use the `now` you are given" not in first


def test_6_1_refill_without_a_cap_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("no-cap"))
    assert (
        "❌ not yet: after a long idle it holds no more than its capacity, 5\n"
        "       expected: 5 allowed, then refused, after 1000 s idle: a bucket holds at most its capacity\n"
        "       seen:     8 allowed (it had refilled 2000 tokens)\n"
    ) in out
    assert out.endswith("Exercise 6.1: not yet — 8 of 9 checks pass")


HALF_A_TOKEN = (
    "❌ not yet: a request needs a whole token: half a token refuses it, costs nothing, and is kept\n"
)


def test_6_1_half_a_token_is_not_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("lenient"))
    assert (
        HALF_A_TOKEN + "       expected: after draining the bucket (rate 2 a second): at +0.25 s refused "
        "(half a token); at +0.5 s 1 allowed, then refused\n"
        "       seen:     at +0.25 s: 1 allowed; at +0.5 s: 2 refused\n"
        "       hint:     Half a token let a request through: a request takes a whole token.\n"
    ) in out
    assert out.endswith("Exercise 6.1: not yet — 7 of 9 checks pass")


def test_6_1_a_refill_rounded_down_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("floor"))
    assert HALF_A_TOKEN + "       expected: " in out
    assert "seen:     at +0.25 s: 1 refused; at +0.5 s: 2 refused\n" in out
    assert "hint:     The refused call at +0.25 s lost the half token it refilled" in out
    assert out.endswith("Exercise 6.1: not yet — 7 of 9 checks pass")


def test_6_1_a_refusal_that_takes_a_token_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("debit-refused"))
    assert (
        HALF_A_TOKEN + "       expected: after draining the bucket (rate 2 a second): at +0.25 s refused "
        "(half a token); at +0.5 s 1 allowed, then refused\n"
        "       seen:     at +0.25 s: 1 refused; at +0.5 s: 2 refused\n"
        "       hint:     The refused call at +0.25 s lost the half token it refilled, or paid a token it "
        "did not get"
    ) in out
    assert "✅ passed: it refills a token every 1/rate = 0.5 s of the `now` it is given\n" in out


def test_6_1_a_refusal_that_keeps_the_old_time_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("stale-updated"))
    assert (
        "❌ not yet: a client retrying while refused earns no extra tokens\n"
        "       expected: after draining the bucket (rate 2 a second): at +0.25 s 3 refused (half a token, "
        "however often asked); at +0.5 s 1 allowed, then refused\n"
        "       seen:     at +0.25 s: 1 refused, then 1 allowed, then 1 refused; at +0.5 s: 1 refused, then "
        "1 allowed\n"
        "       hint:     A client that retries while refused was credited the same time twice"
    ) in out
    assert out.endswith("Exercise 6.1: not yet — 8 of 9 checks pass")


def test_6_1_one_bucket_for_every_key_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("one-key"))
    assert (
        "❌ not yet: each key is a bucket of its own, with the rate and capacity it is given\n"
        "       expected: a new key to be a new, full bucket, after another key was drained\n"
        "       seen:     5 refused on the new key\n"
    ) in out
    assert EXPIRY + "       expected: after a first request (4 tokens left): a hash at the key" in out
    assert "seen:     no key at all under that name" in out


def test_6_1_a_fixed_capacity_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("fixed-capacity"))
    assert (
        "       expected: 3 allowed, then refused, on a new bucket of capacity 3 (rate 1 a second)\n"
        "       seen:     5 allowed\n"
        "       hint:     Use the `capacity` you are given (`ARGV`), not a number of your own.\n"
    ) in out
    assert out.endswith("Exercise 6.1: not yet — 8 of 9 checks pass")


EXPIRY = (
    "❌ not yet: the bucket is a hash at its key, expiring no sooner than it would be full again (after "
    "every write, at any rate), and not long after\n"
)


@pytest.mark.parametrize(
    ("variant", "seen"),
    [
        (
            "no-expiry",
            "       expected: after a first request (4 tokens left): the bucket's key to expire, so that an "
            "idle client's bucket does not stay in Redis forever\n"
            "       seen:     no expiry (PTTL -1)\n",
        ),
        (
            "short-expiry",
            "       expected: after draining the bucket: an expiry no sooner than the bucket would be full "
            "again, in 2.5 s\n"
            "       seen:     PTTL ",
        ),
        (
            "floor-expiry",  # 2 s, where the bucket needs 2.5 s
            "       expected: after draining the bucket: an expiry no sooner than the bucket would be full "
            "again, in 2.5 s\n"
            "       seen:     PTTL ",
        ),
        (
            "expire-once",
            "       expected: 2 s later, drained again (an expiry set when it was created has 1 s left): an "
            "expiry no sooner than the bucket would be full again, in 2.5 s\n"
            "       seen:     PTTL ",
        ),
        (
            "capacity-expiry",  # 5 s: enough at 2 a second, not at 0.5
            "       expected: after draining a bucket of 5 at 0.5 a second: an expiry no sooner than the "
            "bucket would be full again, in 10 s\n"
            "       seen:     PTTL ",
        ),
        (
            "hour-expiry",
            "       expected: after a first request (4 tokens left): an expiry soon after the bucket would "
            "be full again, in 0.5 s (at most 6 s)\n"
            "       seen:     PTTL 3",  # an hour, 3600000 ms (a real Redis has counted a few down)
        ),
    ],
)
def test_6_1_a_missing_short_or_long_expiry_is_rejected(
    variant: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer(variant))
    assert EXPIRY + seen in out, out
    assert out.endswith("Exercise 6.1: not yet — 8 of 9 checks pass")


def test_6_1_an_expiry_that_ignores_the_rate_gets_the_rate_hint(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("capacity-expiry"))
    assert re.search(
        r"       seen:     PTTL (4\d{3}|5000) ms\n"  # a real Redis's PTTL is already counting down
        + re.escape(
            "       hint:     At 0.5 tokens a second a bucket of 5 takes 10 s to fill: the expiry depends on "
            "the rate as well as the capacity.\n"
        ),
        out,
    ), out


def test_6_1_an_expire_sent_apart_from_the_script_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("separate-expire"))
    assert "       seen:     EVAL, EXPIRE\n" in out
    assert out.endswith("Exercise 6.1: not yet — 8 of 9 checks pass")


# fakeredis only: a real Redis client used from several event loops cannot be closed cleanly
@pytest.mark.parametrize("redis_backend", ["fakeredis"], indirect=True)
def test_6_1_a_script_on_another_client_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    notebook_redis = support.redis_client(decode_responses=True)  # the notebook's: never used by the check
    script = notebook_redis.register_script(bucket_script("right"))

    async def take_token(redis: Redis, key: str, rate: float, capacity: int, now: float) -> bool:
        return bool(await script(keys=[key], args=[rate, capacity, now]))

    try:
        out = rejected(capsys, check_token_bucket, take_token)
    finally:
        asyncio.run(notebook_redis.aclose())
    assert (
        "       expected: one command per call, EVAL (or EVALSHA), on the client passed as `redis`\n"
        "       seen:     no command on that client\n"
    ) in out
    assert out.endswith("Exercise 6.1: not yet — 8 of 9 checks pass")


def test_6_1_a_plain_function_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("not-async"))
    assert "expected: an awaitable: `take_token` defined with `async def`" in out
    assert out.endswith("Exercise 6.1: not yet — 0 of 1 checks pass")


def test_6_1_a_hanging_answer_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_token_bucket, bucket_answer("hangs"))
    assert (
        "       expected: each call of `take_token` to return at once\n"
        "       seen:     no return within 5 s\n"
    ) in out
    assert out.endswith("Exercise 6.1: not yet — 0 of 1 checks pass")


# ---------------------------------------------------------------------------------------------------
# Exercise 6.2: answer a limited request
# ---------------------------------------------------------------------------------------------------


def peer_key(request: Request) -> str:
    assert request.client is not None
    return f"ip:{request.client.host}"


def limit_answer(variant: str) -> Any:
    """``rate_limit`` as a learner might write it."""

    def rate_limit(limiter: Any, key: Callable[[Request], str] = peer_key) -> Any:
        async def enforce(request: Request, response: Response) -> Any:
            decision = await limiter.check(key(request))
            if variant == "placeholder":
                raise NotImplementedError(placeholder_message("6.2"))
            if variant == "twice":
                decision = await limiter.check(key(request))
            seconds = max(1, math.ceil(decision.reset_after))
            if variant == "int-plus-one":  # a second too long for a whole number: 3.0 gives 4
                seconds = int(decision.reset_after) + 1
            remaining = decision.limit if variant == "remaining-is-limit" else decision.remaining
            name = "default" if variant == "unquoted" else '"default"'
            window = 10 if variant == "fixed-window" else limiter.window  # the notebook's window, written in
            headers = {
                "RateLimit-Policy": f"{name};q={decision.limit};w={window}",
                "RateLimit": f"{name};r={remaining};t={seconds}",
            }
            if variant == "legacy":
                headers = {
                    "X-RateLimit-Limit": str(decision.limit),
                    "X-RateLimit-Remaining": str(decision.remaining),
                    "X-RateLimit-Reset": str(seconds),
                }
            if variant == "older-draft":
                headers = {
                    "RateLimit-Limit": str(decision.limit),
                    "RateLimit-Remaining": str(decision.remaining),
                    "RateLimit-Reset": str(seconds),
                }
            if decision.allowed:
                if variant == "retry-after-always":
                    headers["Retry-After"] = str(seconds)
                if variant != "only-on-429":
                    response.headers.update(headers)
                return None
            if variant == "waits":
                await asyncio.sleep(decision.reset_after)
                return None
            retry_after = {
                "truncated": str(int(decision.reset_after)),
                "rounded": str(round(decision.reset_after)),
                "ceil-only": str(math.ceil(decision.reset_after)),
                "float": str(decision.reset_after),
                "http-date": email.utils.formatdate(time.time() + decision.reset_after, usegmt=True),
                "window": str(limiter.window),
            }.get(variant, str(seconds))
            if variant != "no-retry-after":
                headers["Retry-After"] = retry_after
            status = {"forbidden": 403, "unavailable": 503}.get(variant, 429)
            if variant == "headers-on-response":
                response.headers.update(headers)
                raise HTTPException(429, "rate limit exceeded")
            if variant == "returns-response":
                return JSONResponse({"detail": "rate limit exceeded"}, status_code=429, headers=headers)
            if variant == "status-code":
                response.status_code = 429
                response.headers.update(headers)
                return None
            raise HTTPException(status, "rate limit exceeded", headers=headers)

        return Depends(enforce)

    return rate_limit


def test_6_2_a_429_with_its_headers_passes(capsys: pytest.CaptureFixture[str]) -> None:
    check_limited_response(limit_answer("right"))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 6.2 · Answer a limited request: 429, Retry-After, RateLimit\n")
    assert "  ✅ passed: each 429 has Retry-After: whole seconds, rounded up, at least 1\n" in out
    assert (
        "  ✅ passed: with another limiter (20 per 60 s), its own q and w; a wait of exactly 3 s is 3\n"
        in out
    )
    assert out.endswith("Exercise 6.2: passed ✅ (9 of 9 checks)\n")


def test_6_2_a_window_written_in_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    answer = limit_answer("fixed-window")
    out = rejected(capsys, check_limited_response, answer)
    assert (
        "❌ not yet: with another limiter (20 per 60 s), its own q and w; a wait of exactly 3 s is 3\n"
        '       expected: RateLimit-Policy: "default";q=20;w=60 and RateLimit: "default";r=0;t=3, for '
        "Decision(allowed=False, limit=20, remaining=0, reset_after=3)\n"
        "       seen:     RateLimit-Policy: '\"default\";q=20;w=10' and RateLimit: '\"default\";r=0;t=3'\n"
        "       hint:     `w` is the window in seconds of the limiter the dependency is given"
    ) in out
    assert out.endswith("Exercise 6.2: not yet — 8 of 9 checks pass")
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_limited_response, answer)
    assert "hint:     `w={limiter.window}` (this limiter's is 60 s), not a number written in.\n" in second


def test_6_2_a_second_added_to_a_whole_number_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    answer = limit_answer("int-plus-one")
    out = rejected(capsys, check_limited_response, answer)
    assert "  ✅ passed: each 429 has Retry-After: whole seconds, rounded up, at least 1\n" in out
    assert (
        "❌ not yet: with another limiter (20 per 60 s), its own q and w; a wait of exactly 3 s is 3\n"
        "       expected: Retry-After: 3, for Decision(allowed=False, limit=20, remaining=0, reset_after=3)\n"
        "       seen:     Retry-After: 4: a second more than the 3 s left, which is already a whole number\n"
        "       hint:     Rounding up leaves a whole number as it is"
    ) in out
    assert out.endswith("Exercise 6.2: not yet — 8 of 9 checks pass")
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_limited_response, answer)
    assert "hint:     `int(x) + 1` rounds a fraction up, but adds a second to a whole number" in second


def test_6_2_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_limited_response, limit_answer("placeholder"))
    assert "⬜ not started: Exercise 6.2's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 6.2: not started")


@pytest.mark.parametrize(
    ("variant", "why"),
    [
        ("forbidden", "403 Forbidden says the client may not have this at all, at any rate: it gives up"),
        ("unavailable", "503 Service Unavailable says the server is overloaded, for everyone"),
        ("returns-response", "200: the request was served as if allowed, and the endpoint ran"),
    ],
)
def test_6_2_a_status_other_than_429_is_rejected(
    variant: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_limited_response, limit_answer(variant))
    assert (
        "❌ not yet: requests over the limit get 429, and the endpoint does not run\n"
        "       expected: 429 Too Many Requests, for Decision(allowed=False, limit=5, remaining=0, "
        "reset_after=2.2)\n"
        f"       seen:     {why}\n"
    ) in out


def test_6_2_a_429_after_the_work_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_limited_response, limit_answer("status-code"))
    assert "       seen:     status 429, but the endpoint ran: its work was done anyway\n" in out
    assert out.endswith("Exercise 6.2: not yet — 7 of 8 checks pass")


@pytest.mark.parametrize(
    ("variant", "seen"),
    [
        ("no-retry-after", "seen:     no Retry-After header\n"),
        ("headers-on-response", "seen:     no Retry-After header\n"),
        ("truncated", "seen:     Retry-After: 2: rounded down, so the client comes back before its quota"),
        ("rounded", "seen:     Retry-After: 2: rounded down, so the client comes back before its quota"),
        (
            "float",
            "seen:     Retry-After: '2.2': not a whole number of seconds: Retry-After is delta-seconds",
        ),
        ("http-date", " GMT': an HTTP date: valid HTTP, but it depends on the client's clock"),
    ],
)
def test_6_2_a_missing_or_malformed_retry_after_is_rejected(
    variant: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_limited_response, limit_answer(variant))
    assert (
        "❌ not yet: each 429 has Retry-After: whole seconds, rounded up, at least 1\n"
        "       expected: Retry-After: 3, for Decision(allowed=False, limit=5, remaining=0, "
        "reset_after=2.2)\n"
    ) in out
    assert seen in out


@pytest.mark.parametrize(
    ("variant", "expected", "seen"),
    [
        (
            "ceil-only",
            "Retry-After: 1, for Decision(allowed=False, limit=5, remaining=0, reset_after=0)",
            "0",
        ),
        (
            "window",
            "Retry-After: 3, for Decision(allowed=False, limit=5, remaining=0, reset_after=2.2)",
            "10",
        ),
    ],
)
def test_6_2_a_wrong_number_of_seconds_is_rejected(
    variant: str, expected: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_limited_response, limit_answer(variant))
    assert f"       expected: {expected}\n       seen:     Retry-After: {seen}" in out
    assert out.endswith("Exercise 6.2: not yet — 7 of 8 checks pass")


def test_6_2_a_truncated_retry_after_gets_a_more_specific_hint(capsys: pytest.CaptureFixture[str]) -> None:
    answer = limit_answer("truncated")
    rejected(capsys, check_limited_response, answer)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_limited_response, answer)
    assert "hint:     Round up: `math.ceil`, not `int()` or `round()`.\n" in second
    assert "hint:     `str(max(1, math.ceil(decision.reset_after)))`: rounded up, and never 0.\n" in second


def test_6_2_headers_only_on_429_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_limited_response, limit_answer("only-on-429"))
    assert (
        "❌ not yet: allowed answers have them too, RateLimit's r counting down\n"
        '       expected: RateLimit-Policy: "default";q=5;w=10 and RateLimit: "default";r=4;t=10, for '
        "Decision(allowed=True, limit=5, remaining=4, reset_after=9.2)\n"
        "       seen:     no RateLimit-Policy and RateLimit (headers: content-length, content-type)\n"
        "       hint:     A client that knows how much is left can slow down before it is refused"
    ) in out
    assert out.endswith("Exercise 6.2: not yet — 7 of 8 checks pass")


@pytest.mark.parametrize(
    ("variant", "which"),
    [
        ("legacy", "x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset: the legacy, unstandardised"),
        (
            "older-draft",
            "ratelimit-limit, ratelimit-remaining, ratelimit-reset: an earlier version of the draft",
        ),
    ],
)
def test_6_2_other_rate_limit_headers_are_rejected(
    variant: str, which: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_limited_response, limit_answer(variant))
    assert "❌ not yet: each 429 has RateLimit-Policy and RateLimit, in the draft's syntax\n" in out
    assert f"       seen:     no RateLimit-Policy and RateLimit, but {which}" in out
    assert out.endswith("Exercise 6.2: not yet — 6 of 8 checks pass")


def test_6_2_retry_after_on_an_allowed_answer_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_limited_response, limit_answer("retry-after-always"))
    assert (
        "❌ not yet: allowed answers carry no Retry-After: they have nothing to wait for\n"
        "       expected: no Retry-After on an allowed answer, for Decision(allowed=True, limit=5, "
        "remaining=4, reset_after=9.2)\n"
        "       seen:     Retry-After: '10' on a 200\n"
        "       hint:     Retry-After tells a client to wait before its next request"
    ) in out
    assert out.endswith("Exercise 6.2: not yet — 7 of 8 checks pass")


def test_6_2_a_remaining_that_does_not_count_down_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_limited_response, limit_answer("remaining-is-limit"))
    assert (
        "       seen:     RateLimit-Policy: '\"default\";q=5;w=10' and RateLimit: '\"default\";r=5;t=3'\n"
        "       hint:     `r` is what remains, `decision.remaining`.\n"
    ) in out
    assert out.endswith("Exercise 6.2: not yet — 6 of 8 checks pass")


def test_6_2_an_unquoted_policy_name_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_limited_response, limit_answer("unquoted"))
    assert "seen:     RateLimit-Policy: 'default;q=5;w=10' and RateLimit: 'default;r=0;t=3'\n" in out
    assert "hint:     The draft's headers are Structured Fields items: a quoted policy name" in out
    assert out.endswith("Exercise 6.2: not yet — 6 of 8 checks pass")


def test_6_2_waiting_for_the_quota_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_limited_response, limit_answer("waits"))
    assert (
        "❌ not yet: 7 requests are answered, the limiter asked once for each\n"
        "       expected: 7 requests answered at once, 3 of them within the limit and 4 over it\n"
        "       seen:     no answer within 5 s\n"
    ) in out
    assert out.endswith("Exercise 6.2: not yet — 1 of 2 checks pass")


def test_6_2_asking_the_limiter_twice_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_limited_response, limit_answer("twice"))
    assert "       expected: the limiter asked once per request: 7 times\n       seen:     14 times\n" in out


# ---------------------------------------------------------------------------------------------------
# Exercise 6.3: a client key that cannot be spoofed
# ---------------------------------------------------------------------------------------------------

NOTEBOOK_TRUSTED_PROXIES = {"10.1.0.1", "10.1.0.2"}
NOTEBOOK_ISSUED_KEYS = {"search-team-0001", "mobile-app-0042"}
API_KEY = re.compile(r"[A-Za-z0-9-]{8,64}")
FORMAT_ONLY = ["well-formed", "dollar", "word-class", "unbounded", "unvalidated-key"]


def key_answer(variant: str) -> Any:
    """``client_key`` as a learner might write it."""

    def known_key(api_key: str, issued_keys: set[str]) -> bool:
        if variant == "unvalidated-key":
            return bool(api_key)
        if variant == "well-formed":  # the lesson's mistake: any well-formed key is a client
            return bool(re.fullmatch(r"[A-Za-z0-9-]{8,64}", api_key))
        if variant == "dollar":
            return bool(re.match(r"^[A-Za-z0-9-]{8,64}$", api_key))
        if variant == "word-class":
            return bool(re.fullmatch(r"[\w-]{8,64}", api_key))
        if variant == "unbounded":
            return bool(re.fullmatch(r"[A-Za-z0-9-]{8,}", api_key))
        if variant == "format-then-lookup":  # right too: a cheap filter before the lookup
            return bool(API_KEY.fullmatch(api_key)) and api_key in issued_keys
        if variant == "module-keys":
            return api_key in NOTEBOOK_ISSUED_KEYS
        if variant == "any-case":  # and it returns the client's spelling: a quota per spelling
            return api_key.lower() in {key.lower() for key in issued_keys}
        return api_key in issued_keys

    def address(entry: str, peer: str) -> str:
        if variant == "no-ip-validation":
            return entry
        try:
            parsed = ipaddress.ip_address(entry)
        except ValueError:
            return peer
        return str(parsed) if variant == "normalised" else entry

    def forwarded_for(headers: Headers) -> str:
        if variant == "crashes":  # a missing header is a KeyError
            return headers["x-forwarded-for"]
        if variant == "first-line-only":
            return headers.get("x-forwarded-for", "")
        return ",".join(headers.getlist("x-forwarded-for"))

    def is_proxy(address: str, trusted_proxies: set[str]) -> bool:
        if variant != "proxy-subnet":
            return address in trusted_proxies
        try:  # "the load balancers' subnet": every host in the proxies' /24
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in ipaddress.ip_network(f"{proxy}/24", strict=False) for proxy in trusted_proxies)

    def client_key(peer: str, headers: Headers, trusted_proxies: set[str], issued_keys: set[str]) -> str:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("6.3"))
        if variant == "module-constant":
            trusted_proxies = NOTEBOOK_TRUSTED_PROXIES
        api_key = headers.get("x-api-key", "")
        if variant == "stripped-key":  # an issued key with a newline, space or tab around it counts
            api_key = api_key.strip()
        if variant != "no-key" and known_key(api_key, issued_keys):
            return f"key:{api_key}"
        forwarded = forwarded_for(headers)
        if not is_proxy(peer, trusted_proxies) and variant != "any-peer":
            return f"ip:{peer}"
        entries = forwarded.split(",") if variant == "no-strip" else [e.strip() for e in forwarded.split(",")]
        if variant == "leftmost":
            return f"ip:{address(entries[0], peer)}"
        if variant == "rightmost":
            return f"ip:{address(entries[-1], peer)}"
        for entry in reversed(entries):
            if not is_proxy(entry, trusted_proxies):
                return f"ip:{address(entry, peer)}"
        if variant == "last-proxy-skipped":  # uvicorn's _TrustedHosts: the leftmost proxy, not the peer
            return f"ip:{address(entries[0], peer)}"
        return f"ip:{peer}"

    async def not_plain(peer: str, headers: Headers, trusted_proxies: set[str], issued_keys: set[str]) -> str:
        return f"ip:{peer}"

    def three_arguments(peer: str, headers: Headers, trusted_proxies: set[str]) -> str:
        return f"ip:{peer}"

    return {"async": not_plain, "three-arguments": three_arguments}.get(variant, client_key)


@pytest.mark.parametrize("variant", ["right", "format-then-lookup", "normalised"])
def test_6_3_a_safe_client_key_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_client_key(key_answer(variant))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 6.3 · A client key that cannot be spoofed\n")
    assert (
        "  ✅ passed: behind trusted proxies, the client is the rightmost address they did not add\n" in out
    )
    assert "  ✅ passed: every X-Forwarded-For line is read, in order, not only the first\n" in out
    assert out.endswith("Exercise 6.3: passed ✅ (6 of 6 checks)\n")


def test_6_3_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("placeholder"))
    assert "⬜ not started: Exercise 6.3's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 6.3: not started")


def test_6_3_the_leftmost_entry_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("leftmost"))
    assert (
        "❌ not yet: behind trusted proxies, the client is the rightmost address they did not add\n"
        "       expected: 'ip:198.51.100.7' for one trusted proxy, a spoofed address on the left "
        "(peer 192.0.2.10; X-Forwarded-For: '6.6.6.6, 198.51.100.7')\n"
        "       seen:     'ip:6.6.6.6'\n"
        "       hint:     The leftmost entry is whatever the client wrote"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 3 of 6 checks pass")


def test_6_3_only_the_first_forwarded_for_line_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("first-line-only"))
    assert (
        "❌ not yet: every X-Forwarded-For line is read, in order, not only the first\n"
        "       expected: 'ip:198.51.100.7' for two X-Forwarded-For lines: the client's forged one, then "
        "the proxy's (peer 192.0.2.10; X-Forwarded-For: '6.6.6.6'; X-Forwarded-For: '198.51.100.7')\n"
        "       seen:     'ip:6.6.6.6'\n"
        "       hint:     A proxy may add an X-Forwarded-For line of its own"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 5 of 6 checks pass")


def test_6_3_the_first_line_only_gets_the_getlist_hint_next(capsys: pytest.CaptureFixture[str]) -> None:
    answer = key_answer("first-line-only")
    rejected(capsys, check_client_key, answer)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_client_key, answer)
    assert 'hint:     Read every line, in order: `",".join(headers.getlist("x-forwarded-for"))`' in second


def test_6_3_forwarded_for_from_any_peer_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("any-peer"))
    assert (
        "❌ not yet: a direct client is its own address, whatever its X-Forwarded-For says\n"
        "       expected: 'ip:203.0.113.5' for a direct client with a forged X-Forwarded-For "
        "(peer 203.0.113.5; X-Forwarded-For: '6.6.6.6')\n"
        "       seen:     'ip:6.6.6.6'\n"
    ) in out


def test_6_3_a_trusted_set_other_than_the_argument_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("module-constant"))
    assert (
        "       expected: 'ip:198.51.100.7' for one trusted proxy (peer 192.0.2.10; "
        "X-Forwarded-For: '198.51.100.7')\n"
        "       seen:     'ip:192.0.2.10'\n"
    ) in out
    assert "Test the peer against `trusted_proxies`, the argument" in out


def test_6_3_the_rightmost_entry_unskipped_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("rightmost"))
    assert "       expected: 'ip:198.51.100.7' for two trusted proxies in a chain" in out
    assert "       seen:     'ip:192.0.2.10'\n" in out
    assert out.endswith("Exercise 6.3: not yet — 3 of 6 checks pass")


def test_6_3_entries_not_stripped_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("no-strip"))
    assert "       expected: 'ip:198.51.100.7' for one trusted proxy, a spoofed address on the left" in out
    assert "       seen:     'ip:192.0.2.10'\n" in out  # ' 198.51.100.7' is not an address


def test_6_3_garbage_kept_as_an_address_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("no-ip-validation"))
    assert (
        "❌ not yet: with no client entry (none, empty, garbage, only trusted proxies), the peer's address\n"
        "       expected: 'ip:192.0.2.10' for a trusted proxy, no X-Forwarded-For (peer 192.0.2.10)\n"
        "       seen:     'ip:'\n"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 5 of 6 checks pass")


@pytest.mark.parametrize("variant", FORMAT_ONLY)
def test_6_3_a_key_that_is_only_well_formed_is_rejected(
    variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_client_key, key_answer(variant))
    assert (
        "❌ not yet: any other X-API-Key (never issued, 10 kB, a newline, empty, an issued one in other "
        "letter case or with spaces around it) is ignored\n"
        "       expected: 'ip:203.0.113.5' for a well-formed X-API-Key that was never issued "
        "(peer 203.0.113.5; X-API-Key: 'made-up-0001')\n"
        "       seen:     'key:made-up-0001'\n"
        "       hint:     A well-formed key is not an issued one: anyone can make one up"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 5 of 6 checks pass")


def test_6_3_a_key_matched_in_any_letter_case_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("any-case"))
    assert (
        "❌ not yet: any other X-API-Key (never issued, 10 kB, a newline, empty, an issued one in other "
        "letter case or with spaces around it) is ignored\n"
        "       expected: 'ip:203.0.113.5' for an issued X-API-Key in other letter case "
        "(peer 203.0.113.5; X-API-Key: 'TEAM-42-ABCDEFGH')\n"
        "       seen:     'key:TEAM-42-ABCDEFGH'\n"
        "       hint:     A key is a secret, compared exactly"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 5 of 6 checks pass")


def test_6_3_only_proxies_in_forwarded_for_is_the_peer(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("last-proxy-skipped"))
    assert (
        "❌ not yet: with no client entry (none, empty, garbage, only trusted proxies), the peer's address\n"
        "       expected: 'ip:192.0.2.11' for two trusted proxies, and no other entry "
        "(peer 192.0.2.11; X-Forwarded-For: '192.0.2.10')\n"
        "       seen:     'ip:192.0.2.10'\n"
        "       hint:     Every entry is one of your proxies, so no client address was forwarded"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 5 of 6 checks pass")


def test_6_3_a_made_up_key_gets_the_lookup_hint_next(capsys: pytest.CaptureFixture[str]) -> None:
    answer = key_answer("well-formed")
    rejected(capsys, check_client_key, answer)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_client_key, answer)
    assert "hint:     Use the key only if the service issued it: `if api_key in issued_keys`" in second


def test_6_3_issued_keys_other_than_the_argument_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("module-keys"))
    assert (
        "❌ not yet: an issued X-API-Key is the key, wherever the request comes from\n"
        "       expected: 'key:light-client-01' for an issued X-API-Key (peer 203.0.113.5; "
        "X-API-Key: 'light-client-01')\n"
        "       seen:     'ip:203.0.113.5'\n"
    ) in out
    assert "Test the key against `issued_keys`, the argument" in out
    assert out.endswith("Exercise 6.3: not yet — 5 of 6 checks pass")


def test_6_3_an_ignored_api_key_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("no-key"))
    assert (
        "❌ not yet: an issued X-API-Key is the key, wherever the request comes from\n"
        "       expected: 'key:light-client-01' for an issued X-API-Key (peer 203.0.113.5; "
        "X-API-Key: 'light-client-01')\n"
        "       seen:     'ip:203.0.113.5'\n"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 5 of 6 checks pass")


def test_6_3_a_crash_on_a_missing_header_names_the_case(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("crashes"))
    assert (
        "       expected: 'ip:203.0.113.5' for a direct client, no headers (peer 203.0.113.5)\n"
        "       seen:     it raised KeyError: 'x-forwarded-for'\n"
        "       hint:     Headers are the client's input"
    ) in out


def test_6_3_the_old_three_argument_signature_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    answer = key_answer("three-arguments")
    out = rejected(capsys, check_client_key, answer)
    assert "       seen:     it raised TypeError: " in out
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_client_key, answer)
    assert "`client_key` takes four arguments: `(peer, headers, trusted_proxies, issued_keys)`" in second
    assert out.endswith("Exercise 6.3: not yet — 0 of 6 checks pass")


def test_6_3_a_coroutine_function_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("async"))
    assert "       expected: a str from `client_key`\n       seen:     a coroutine\n" in out
    assert out.endswith("Exercise 6.3: not yet — 0 of 6 checks pass")


def test_6_3_an_issued_key_with_spaces_around_it_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("stripped-key"))
    assert (
        "❌ not yet: any other X-API-Key (never issued, 10 kB, a newline, empty, an issued one in other "
        "letter case or with spaces around it) is ignored\n"
        "       expected: 'ip:203.0.113.5' for an issued X-API-Key with a newline after it "
        "(peer 203.0.113.5; X-API-Key: 'light-client-01\\n')\n"
        "       seen:     'key:light-client-01'\n"
        "       hint:     A key counts only when it is exactly one you issued"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 5 of 6 checks pass")


def test_6_3_a_host_in_the_proxies_network_is_not_a_proxy(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_client_key, key_answer("proxy-subnet"))
    assert (
        "❌ not yet: a direct client is its own address, whatever its X-Forwarded-For says\n"
        "       expected: 'ip:192.0.2.99' for a direct client in the proxies' own network, not a proxy, "
        "with a forged X-Forwarded-For (peer 192.0.2.99; X-Forwarded-For: '6.6.6.6')\n"
        "       seen:     'ip:6.6.6.6'\n"
        "       hint:     Your proxies are the addresses in `trusted_proxies`, and only those"
    ) in out
    assert (
        "       expected: 'ip:192.0.2.99' for a client in the proxies' own network, not a proxy "
        "(peer 192.0.2.10; X-Forwarded-For: '192.0.2.99')\n"
        "       seen:     'ip:192.0.2.10'\n"
    ) in out
    assert out.endswith("Exercise 6.3: not yet — 4 of 6 checks pass")


# ---------------------------------------------------------------------------------------------------
# Exercise 6.4: quotas per plan, on a shared store
# ---------------------------------------------------------------------------------------------------

NOTEBOOK_QUOTAS = {"free": (5, 10), "paid": (50, 10)}  # (limit, window): the notebook's, not the check's
COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""


class SharedWindow:
    """The notebook's given limiter: a fixed window in Redis, on the real clock."""

    def __init__(self, prefix: str = "ex06:plans") -> None:
        self.prefix = prefix

    async def check(self, redis: Redis, key: str, limit: int, window: int) -> Any:
        now = time.time()
        slot = int(now // window)
        count = await redis.eval(COUNT, 1, f"{self.prefix}:{key}:{window}:{slot}", window + 1)
        return support.checks.ch06._Decision(
            count <= limit, limit, max(0, limit - count), (slot + 1) * window - now
        )


def issued_or_peer(peer: str, headers: Headers, issued_keys: set[str]) -> str:
    """Exercise 6.3's answer, without proxies: the issued key, else the peer."""
    api_key = headers.get("x-api-key", "")
    return f"key:{api_key}" if api_key in issued_keys else f"ip:{peer}"


def plan_answer(variant: str) -> Any:
    """``plan_limit`` as a learner might write it."""

    def plan_limit(limiter: Any, plans: dict[str, str], quotas: dict[str, Any]) -> Any:
        counts: dict[tuple[str, int], int] = {}  # "per-instance": this dependency's own counts
        known = dict(plans)  # "snapshot": the plans as they were when the dependency was made
        own = SharedWindow()  # "own-limiter": the notebook's limiter, not the one passed in
        own_client = support.redis_client(decode_responses=True) if variant == "own-client" else None
        longest = max(quota.window for quota in quotas.values())

        def identify(request: Request) -> tuple[str, str] | None:
            """(the client's key, its plan); None for a client left unlimited."""
            assert request.client is not None
            host = request.client.host
            api_key = request.headers.get("x-api-key", "")
            if variant == "client-key":  # right too: exercise 6.3's function, the plans' keys as issued
                client = issued_or_peer(host, request.headers, set(plans))
                return client, plans.get(client.removeprefix("key:"), "free")
            plan = (known if variant == "snapshot" else plans).get(api_key)
            if variant in ("forgiving", "normalized"):  # "forgive" a key's letter case and spaces
                spelled = api_key.strip().lower()
                plan = {key.lower(): plan for key, plan in plans.items()}.get(spelled)
                if plan is not None:  # "forgiving" counts on the key as sent: one count per spelling
                    return f"key:{spelled if variant == 'normalized' else api_key}", plan
            if variant == "x-plan":
                plan = request.headers.get("x-plan") or plan
            if plan is None:
                if variant == "made-up-key" and api_key:
                    return f"key:{api_key}", "free"
                if variant == "anonymous-unlimited":
                    return None
                return ("anonymous" if variant == "anonymous-shared" else f"ip:{host}"), "free"
            if variant == "keyed-on-address":
                return f"ip:{host}", plan
            return f"key:{api_key}", plan

        async def enforce(request: Request, response: Response) -> None:
            if variant == "placeholder":
                raise NotImplementedError(placeholder_message("6.4"))
            found = identify(request)
            if found is None:
                return
            client, plan = found
            if variant == "keyed-on-plan":
                client = f"plan:{plan}"
            if variant == "plan-in-key":  # right too: the plan in the key, beside the client
                client = f"{plan}:{client}"
            quota = quotas["free" if variant == "one-quota" else plan]
            limit, window = NOTEBOOK_QUOTAS[plan] if variant == "notebook-quotas" else quota
            if variant == "free-window":  # the plan's limit, but the free plan's window for everyone
                window = quotas["free"].window
            if variant == "per-instance":
                slot = (client, int(time.time() // window))
                counts[slot] = counts.get(slot, 0) + 1
                left = (slot[1] + 1) * window - time.time()
                decision = support.checks.ch06._Decision(counts[slot] <= limit, limit, 0, left)
            elif variant == "own-limiter":
                decision = await own.check(request.app.state.redis, client, limit, window)
            elif variant == "own-client":
                decision = await limiter.check(own_client, client, limit, window)
            else:
                decision = await limiter.check(request.app.state.redis, client, limit, window)
            if variant == "twice":  # asks again, "to be sure": each call counts the request
                decision = await limiter.check(request.app.state.redis, client, limit, window)
            if decision.allowed:
                if variant == "headers":  # right too: the draft's headers on every answer
                    response.headers["RateLimit-Policy"] = f'"{plan}";q={limit};w={window}'
                return
            if variant == "waits":
                await asyncio.sleep(decision.reset_after)
                return
            if variant in ("near-retry", "near-sleep") and decision.reset_after < 1:
                await asyncio.sleep(decision.reset_after)  # "almost free again": hold the request a moment
                if variant == "near-retry":  # and ask again: the request is counted twice
                    decision = await limiter.check(request.app.state.redis, client, limit, window)
                    if decision.allowed:
                        return
            retry_after = {
                "truncated": str(int(decision.reset_after)),
                "plus-one": str(int(decision.reset_after) + 1),  # right but for a whole number of seconds
                "float": str(decision.reset_after),
                "milliseconds": str(math.ceil(decision.reset_after * 1000)),
                "longest-window": str(longest),
            }.get(variant, str(max(1, math.ceil(decision.reset_after))))
            headers = {} if variant == "no-retry-after" else {"Retry-After": retry_after}
            raise HTTPException(429, "rate limit exceeded", headers=headers)

        return Depends(enforce)

    return plan_limit


PLAN_QUOTAS = (
    "❌ not yet: a free key gets the free quota (3 per 30 s) and a paid key the paid one (12 per 20 s), "
    "across two instances sharing one store\n"
)
BOTH_QUOTAS = (
    "       expected: the free key: 3 of 8 admitted (3 per 30 s); the paid key: 12 of 20 admitted (12 per "
    "20 s), the requests alternating between two instances\n"
)
ANONYMOUS = (
    "❌ not yet: a client with no key gets the free quota, keyed on its address\n"
    "       expected: each anonymous client: 3 of 14 admitted (the free quota, 3 per 30 s, keyed on its "
    "address)\n"
)
NO_UPGRADE = (
    "❌ not yet: a made-up key, an issued key spelled otherwise, or an X-Plan header, buys no more than "
    "the free quota\n"
)
SEPARATE = (
    "❌ not yet: one client's refusals leave other clients' quotas alone, behind one address too\n"
    "       expected: after the free key's 10 requests (3 admitted), another free key and an anonymous "
    "client 3 each of 5, the paid key 12 of 14, all from 198.51.100.40\n"
)
RETRY_AFTER = (
    "❌ not yet: each 429 has Retry-After: the seconds until the quota frees up, rounded up, at least 1\n"
)
RETRY_FREE = (
    "       expected: Retry-After: 18, for the free key (3 per 30 s): the 17.5 s until its quota frees up, "
    "rounded up\n"
)


@pytest.mark.parametrize(
    "variant",
    [
        "right",
        "client-key",  # exercise 6.3's function, with the plans' keys as the issued keys
        "plan-in-key",  # the plan in the counter's key, beside the client
        "headers",  # the draft's RateLimit-Policy on allowed answers as well
    ],
)
def test_6_4_quotas_per_plan_pass(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    start = time.perf_counter()
    check_plan_quotas(plan_answer(variant))
    assert time.perf_counter() - start < 5
    out = capsys.readouterr().out
    assert out.startswith("Exercise 6.4 · Quotas per plan, on a shared store\n")
    assert "  ✅ passed: a changed plan, a new key and a revoked key count from the next window\n" in out
    assert out.endswith("Exercise 6.4: passed ✅ (8 of 8 checks)\n")


def test_6_4_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_plan_quotas, plan_answer("placeholder"))
    assert "⬜ not started: Exercise 6.4's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 6.4: not started")


def test_6_4_counts_per_instance_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """A dict in the dependency: one per instance, so each client gets its quota twice."""
    answer = plan_answer("per-instance")
    out = rejected(capsys, check_plan_quotas, answer)
    assert (
        PLAN_QUOTAS + BOTH_QUOTAS + "       seen:     the free key: 6 of 8 admitted; the paid key: 20 of 20 "
        "admitted\n"
        "       hint:     Each client got its quota twice: once per instance."
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 1 of 2 checks pass")
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_plan_quotas, answer)
    assert (
        "hint:     Count with the limiter you are given, in the store every instance shares: `decision = "
        "await limiter.check(request.app.state.redis, client, quota.limit, quota.window)`." in second
    )


def test_6_4_a_limiter_of_its_own_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """The notebook's SharedWindow made in the answer: right counts, but not the limiter passed in."""
    out = rejected(capsys, check_plan_quotas, plan_answer("own-limiter"))
    assert (
        PLAN_QUOTAS + "       expected: the limiter you are given asked once per request of the free key, "
        "8 times, with its plan's quota, 3 per 30 s\n"
        "       seen:     0 times\n"
        "       hint:     The limiter you are given was never asked"
    ) in out


def test_6_4_a_redis_client_of_its_own_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """A client made outside the app (the notebook's `redis`, say), not the instance's."""
    out = rejected(capsys, check_plan_quotas, plan_answer("own-client"))
    assert (
        PLAN_QUOTAS + "       expected: `limiter.check(request.app.state.redis, …)`: the Redis client of the "
        "instance serving the request\n"
        "       seen:     a "  # FakeRedis, or Redis with REDIS_URL set
    ) in out
    assert "Redis that is not the serving instance's `app.state.redis`\n" in out
    assert out.endswith("Exercise 6.4: not yet — 1 of 2 checks pass")


@pytest.mark.parametrize(
    ("variant", "seen", "hint"),
    [
        (  # the plan ignored: everyone on the free quota
            "one-quota",
            "the free key: 3 of 8 admitted; the paid key: 3 of 20 admitted",
            "The paid key was counted with 3 per 30 s; its plan's quota is 12 per 20 s.",
        ),
        (  # the notebook's QUOTAS, not the argument
            "notebook-quotas",
            "the free key: 5 of 8 admitted; the paid key: 20 of 20 admitted",
            "The free key was counted with 5 per 10 s; its plan's quota is 3 per 30 s.",
        ),
        (  # the limiter asked twice per request
            "twice",
            "the free key: 1 of 8 admitted; the paid key: 6 of 20 admitted",
            "The free key's 8 requests were counted 16 times",
        ),
    ],
)
def test_6_4_a_quota_other_than_the_plans_is_rejected(
    variant: str, seen: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_plan_quotas, plan_answer(variant))
    assert PLAN_QUOTAS + BOTH_QUOTAS + f"       seen:     {seen}\n       hint:     {hint}" in out
    assert out.endswith("Exercise 6.4: not yet — 1 of 2 checks pass")


def test_6_4_one_window_for_every_plan_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """The paid limit with the free plan's window: right counts at one instant, the wrong window."""
    out = rejected(capsys, check_plan_quotas, plan_answer("free-window"))
    assert (
        PLAN_QUOTAS + "       expected: the limiter you are given asked once per request of the paid key, "
        "20 times, with its plan's quota, 12 per 20 s\n"
        "       seen:     20 times, with 12 per 30 s\n"
        "       hint:     The paid key was counted with 12 per 30 s; its plan's quota is 12 per 20 s."
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 1 of 2 checks pass")


@pytest.mark.parametrize(
    ("variant", "seen", "hint"),
    [
        (  # no key: no limit
            "anonymous-unlimited",
            "an anonymous client at 203.0.113.21: 14 of 14 admitted; an anonymous client at 203.0.113.22: "
            "14 of 14 admitted",
            "Clients with no key were not limited at all",
        ),
        (  # every anonymous client on one counter
            "anonymous-shared",
            "an anonymous client at 203.0.113.21: 2 of 14 admitted; an anonymous client at 203.0.113.22: "
            "1 of 14 admitted",
            "Every anonymous client shared one quota",
        ),
    ],
)
def test_6_4_anonymous_clients_keyed_wrongly_are_rejected(
    variant: str, seen: str, hint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_plan_quotas, plan_answer(variant))
    assert ANONYMOUS + f"       seen:     {seen}\n       hint:     {hint}" in out


def test_6_4_a_made_up_key_as_a_client_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown key counted as a free client of its own: a new key, a new quota."""
    out = rejected(capsys, check_plan_quotas, plan_answer("made-up-key"))
    assert (
        NO_UPGRADE + "       expected: a client at 203.0.113.31 sending a new made-up X-API-Key with each "
        "request: 3 of 14 admitted (the free quota, 3 per 30 s), all counted on its address\n"
        "       seen:     a client at 203.0.113.31 sending a new made-up X-API-Key with each request: "
        "14 of 14 admitted\n"
        "       hint:     A key you never issued is no key"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 7 of 8 checks pass")


def test_6_4_a_plan_header_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """The plan taken from X-Plan when the client sends one."""
    answer = plan_answer("x-plan")
    out = rejected(capsys, check_plan_quotas, answer)
    assert (
        NO_UPGRADE + "       expected: a client at 203.0.113.32 with no key and `X-Plan: paid`: 3 of 14 "
        "admitted (the free quota, 3 per 30 s)\n"
        "       seen:     a client at 203.0.113.32 with no key and `X-Plan: paid`: 12 of 14 admitted\n"
        "       hint:     The plan belongs to the key, and the service keeps it (`plans`)"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 7 of 8 checks pass")
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_plan_quotas, answer)
    assert "hint:     Take the plan only from `plans.get(api_key)`; ignore `X-Plan`" in second


def test_6_4_a_count_per_plan_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """The counter keyed on the plan: every free client shares one quota."""
    out = rejected(capsys, check_plan_quotas, plan_answer("keyed-on-plan"))
    assert (
        SEPARATE + "       seen:     the free key, from 198.51.100.40: 3 of 10 admitted; another free key, "
        "from 198.51.100.40: 0 of 5 admitted; an anonymous client at 198.51.100.40: 0 of 5 admitted; the "
        "paid key, from 198.51.100.40: 12 of 14 admitted\n"
        "       hint:     Every client on the free plan shared one count"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 4 of 8 checks pass")


def test_6_4_a_count_per_address_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """The counter keyed on the address, the key choosing only the plan: a NAT shares one count."""
    out = rejected(capsys, check_plan_quotas, plan_answer("keyed-on-address"))
    assert (
        SEPARATE + "       seen:     the free key, from 198.51.100.40: 3 of 10 admitted; another free key, "
        "from 198.51.100.40: 0 of 5 admitted; an anonymous client at 198.51.100.40: 0 of 5 admitted; the "
        "paid key, from 198.51.100.40: 12 of 14 admitted\n"
        "       hint:     Every client from one address shared one count"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 7 of 8 checks pass")


def test_6_4_plans_read_once_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """A copy of the plans made with the dependency: upgrades, new keys and revocations never count."""
    answer = plan_answer("snapshot")
    out = rejected(capsys, check_plan_quotas, answer)
    assert (
        "❌ not yet: a changed plan, a new key and a revoked key count from the next window\n"
        "       expected: in the next window, after the plans changed: the free key, upgraded to paid: "
        "12 of 14 admitted; the paid key, downgraded to free: 3 of 14 admitted; a key issued since, on the "
        "paid plan: 12 of 14 admitted; the paid key revoked since: 3 of 14 admitted\n"
        "       seen:     the free key, upgraded to paid: 3 of 14 admitted; the paid key, downgraded to "
        "free: 12 of 14 admitted; a key issued since, on the paid plan: 3 of 14 admitted; the paid key "
        "revoked since: 12 of 14 admitted\n"
        "       hint:     The plans were read once, when the dependency was made"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 7 of 8 checks pass")
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_plan_quotas, answer)
    assert "hint:     Look the key up in `plans` on each request, `plans.get(api_key)`" in second


@pytest.mark.parametrize(
    ("variant", "expected", "seen"),
    [
        ("truncated", RETRY_FREE, "Retry-After: 17: rounded down, so the client comes back before its quota"),
        ("float", RETRY_FREE, "Retry-After: '17.5': not a whole number of seconds"),
        ("no-retry-after", RETRY_FREE, "a 429 with no Retry-After header"),
        ("longest-window", RETRY_FREE, "Retry-After: 30: the plan's whole window, not the time left in it"),
        ("milliseconds", RETRY_FREE, "Retry-After: 17500: longer than the plan's whole window"),
        (
            "plus-one",  # int(x) + 1: right for 17.5, 7.5 and 0.25 s, a second too many for 3 s
            "       expected: Retry-After: 3, for the paid key (12 per 20 s): the 3 s until its quota frees "
            "up, rounded up\n",
            "Retry-After: 4: a second more than the 3 s left, which is already a whole number\n"
            "       hint:     Rounding up leaves a whole number as it is",
        ),
    ],
)
def test_6_4_a_wrong_retry_after_is_rejected(
    variant: str, expected: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_plan_quotas, plan_answer(variant))
    assert RETRY_AFTER + expected + f"       seen:     {seen}" in out
    assert out.endswith("Exercise 6.4: not yet — 7 of 8 checks pass")


AT_ONCE = "❌ not yet: a request over its quota is refused at once, the limiter asked once\n"
AT_ONCE_PAID = (
    "       expected: the paid key's request 13, over its quota (12 per 20 s) with 0.25 s left in its "
    "window: refused at once, the limiter asked once\n"
)


def test_6_4_waiting_under_a_second_and_asking_again_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """With under a second left, it sleeps and asks the limiter again: the request waits, counted twice."""
    out = rejected(capsys, check_plan_quotas, plan_answer("near-retry"))
    assert (
        AT_ONCE + AT_ONCE_PAID + "       seen:     the limiter asked 2 times for that one request\n"
        "       hint:     A refusal comes at once"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 7 of 8 checks pass")


def test_6_4_sleeping_before_a_refusal_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    """With under a second left, it sleeps, then refuses: one limiter call, but the request waited."""
    start = time.perf_counter()
    out = rejected(capsys, check_plan_quotas, plan_answer("near-sleep"))
    assert time.perf_counter() - start < 10
    assert (
        AT_ONCE + AT_ONCE_PAID + "       seen:     each of 3 refusals took 0.25 s or more, the 0.25 s until "
        "the quota frees up: the dependency waited before refusing\n"
        "       hint:     A refusal comes at once"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 7 of 8 checks pass")


@pytest.mark.parametrize(
    ("variant", "seen"),
    [
        ("forgiving", "14 of 14 admitted"),  # each spelling a quota of its own, on the paid plan
        ("normalized", "12 of 14 admitted"),  # counted on the issued key: the paid quota, for a guess
    ],
)
def test_6_4_an_issued_key_spelled_otherwise_is_rejected(
    variant: str, seen: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The key looked up ignoring its letter case and spaces: a key nobody issued gets a plan."""
    out = rejected(capsys, check_plan_quotas, plan_answer(variant))
    spelled = (
        "a client at 203.0.113.33 sending the paid key in other letter case or with spaces around it "
        "('KESTREL-9054', ' kestrel-9054', 'Kestrel-9054' …)"
    )
    assert (
        NO_UPGRADE + f"       expected: {spelled}: 3 of 14 admitted (the free quota, 3 per 30 s), all "
        "counted on its address: not keys you issued\n"
        f"       seen:     {spelled}: {seen}\n"
        "       hint:     A key counts only when it is exactly one you issued (as in exercise 6.3)"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 7 of 8 checks pass")


def test_6_4_a_hanging_answer_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    """A dependency that sleeps until the quota frees up, instead of refusing."""
    out = rejected(capsys, check_plan_quotas, plan_answer("waits"))
    assert (
        PLAN_QUOTAS + "       expected: each request answered at once, allowed or refused\n"
        "       seen:     no answer within 5 s\n"
        "       hint:     Does the dependency wait until the quota frees up?"
    ) in out
    assert out.endswith("Exercise 6.4: not yet — 1 of 2 checks pass")
