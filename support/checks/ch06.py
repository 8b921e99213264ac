"""Checks for chapter 6's exercises: rate limiting and throttling.

A limiter's answers depend on time, so the checks keep the real clock out of them. Exercise 6.1's
``take_token`` takes the time as its ``now`` argument: the check drives it with a clock of its own,
in whole, half and quarter seconds (exact in binary floating point and in the strings Redis stores),
and asserts exact counts of allowed and refused requests. The one real-time assertion is the bucket
key's expiry, compared with the time until the bucket would be full again, with 0.4 s to spare;
where the check's clock jumps ahead, it ages the key's expiry by as much (``PEXPIRE``), as real time
would have. Its race is made certain
rather than hoped for: 50 concurrent calls go through a Redis client that adds a 2 ms round trip to
every command (``latency=``), so a read, then a write, from Python lets every call read before any
writes. Exercise 6.2's limiter returns decisions the check scripted in advance, and the app is
called straight through ASGI (``support.asgi.call``): no server, no clock. Exercise 6.3's
``client_key`` is a pure function, checked against a table of cases. Exercise 6.4's dependency runs in
two apps of the check's own (two instances, each with its own Redis client on one store), called through
ASGI with requests alternating between them; the limiter it is given is the check's, the notebook's
fixed window in Redis on a clock of the check's, which moves to the next window instead of waiting and
records what each request was counted with, so the counts of admitted requests are exact. Its one
real-time assertion is that a refusal with a quarter second left in the window does not take that
quarter second: one that does is sent again, and only taking it three times running counts as a
dependency that waits before refusing.

The learner's coroutines run on a fresh event loop in a thread of the check's own, bounded in time.
The check's Redis keys start with ``ex06:``; they are cleared before and after each run, and every
client a check creates is closed before it returns.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import redis.asyncio
from fastapi import FastAPI
from fastapi.params import Depends
from starlette.datastructures import Headers

from support.asgi import AsgiResponse, call
from support.backends import delete_keys, redis_client
from support.checks import Mismatch, exercise, expect
from support.checks.running import NoReturn, in_fresh_loop, short

__all__ = ["check_client_key", "check_limited_response", "check_plan_quotas", "check_token_bucket"]

SOLUTION = "solutions/06_rate_limiting_exercises.ipynb"
_PREFIX = "ex06:"

_T = TypeVar("_T")


def _runs(flags: Sequence[bool]) -> str:
    """``[True, True, False]`` → ``"2 allowed, then 1 refused"``."""
    parts: list[str] = []
    for flag in flags:
        word = "allowed" if flag else "refused"
        if parts and parts[-1].endswith(word):
            count = int(parts[-1].split()[0]) + 1
            parts[-1] = f"{count} {word}"
        else:
            parts.append(f"1 {word}")
    return ", then ".join(parts) or "no calls"


# ---------------------------------------------------------------------------------------------------
# Exercise 6.1: a token bucket in one atomic script
# ---------------------------------------------------------------------------------------------------

_RATE, _CAPACITY = 2.0, 5  # a token every 0.5 s, bursts of 5
_REFILL_SECONDS = _CAPACITY / _RATE
_TTL_MARGIN = 0.4  # seconds: the expiry must outlive the refill time, less this
_LATENCY = 0.002
_CONCURRENT = 50
_IDLE = 1000.0
_ROUND_TRIPS = ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL")
_SCRIPT_HINT = (
    "Do it all in one Lua script: `HMGET` the level and time, refill, take a token if there is a whole "
    "one, `HSET` both back, `EXPIRE` the key; send it with "
    "`await redis.eval(script, 1, key, rate, capacity, now)`."
)


class _Bucket:
    """The learner's ``take_token``, called with the check's Redis client and clock."""

    def __init__(self, client: redis.asyncio.Redis, take_token: Callable[..., Any], start: float) -> None:
        self.client, self.take_token, self.start = client, take_token, start
        self.called = time.monotonic()  # when the last call began: its expiry has run since

    @staticmethod
    def key(name: str) -> str:
        return f"{_PREFIX}bucket:{name}"

    async def take(self, name: str, at: float, *, rate: float = _RATE, capacity: int = _CAPACITY) -> bool:
        self.called = time.monotonic()
        result = self.take_token(self.client, self.key(name), rate, capacity, self.start + at)
        expect(
            inspect.isawaitable(result),
            "an awaitable: `take_token` defined with `async def`",
            f"a plain function that returned {short(result)}",
            "It awaits Redis, so it must be `async def take_token(…)`, returning "
            "`bool(await redis.eval(…))`.",
        )
        value = await result
        expect(
            isinstance(value, bool | int) and value in (0, 1),
            "True (a token was taken) or False (none left)",
            short(value),
            "The script returns 1 or 0: `return bool(await redis.eval(…))`.",
        )
        return bool(value)

    async def takes(self, name: str, at: float, times: int, **options: Any) -> list[bool]:
        return [await self.take(name, at, **options) for _ in range(times)]


def _with_bucket(
    take_token: Callable[..., Any],
    body: Callable[[_Bucket], Awaitable[_T]],
    name: str,
    *,
    latency: float = 0.0,
) -> _T:
    """Run ``body`` on a fresh loop with a Redis client of the check's own and no ``ex06:`` keys."""
    start = float(math.ceil(time.time()))  # a whole second, not behind the real clock: exact fractions added

    async def main() -> _T:
        client = redis_client(decode_responses=True, latency=latency)
        try:
            await delete_keys(client, f"{_PREFIX}*")
            return await body(_Bucket(client, take_token, start))
        finally:
            try:
                await delete_keys(client, f"{_PREFIX}*")
            finally:
                await client.aclose()

    try:
        return in_fresh_loop(main, timeout=5, name=f"check-6.1-{name}")
    except NoReturn as late:
        raise Mismatch(
            "each call of `take_token` to return at once",
            f"no return within {late.seconds:g} s"
            + (" (and it still holds its thread: restart the kernel)" if late.stuck else ""),
            [
                "Does it wait for a token, or retry in a loop? A limiter decides at once: True or False.",
                _SCRIPT_HINT,
            ],
        ) from None


async def _fresh(bucket: _Bucket) -> None:
    taken = await bucket.takes("fresh", 0.0, _CAPACITY + 2)
    expected = [True] * _CAPACITY + [False] * 2
    if taken == expected:
        return
    allowed = sum(taken)
    hints: tuple[str, ...] = (_SCRIPT_HINT,)
    if allowed == 0:
        hints = (
            "A new bucket starts full: when `HMGET` finds no level (nil, `false` in Lua), take "
            "`capacity` as the level and `now` as the time.",
            _SCRIPT_HINT,
        )
    elif allowed == len(taken):
        hints = (
            "Every call found the bucket full: write the new level back after taking a token.",
            "`redis.call('HSET', KEYS[1], 'tokens', tokens, 'updated', now)` in the script, every call.",
        )
    raise Mismatch(
        f"{_CAPACITY} allowed, then refused, for {len(taken)} calls at the same `now` on a new bucket "
        f"(capacity {_CAPACITY})",
        _runs(taken),
        hints,
    )


def _story(plan: Sequence[tuple[float, int]], seen: Sequence[list[bool]]) -> str:
    return "; ".join(f"at +{at:g} s: {_runs(got)}" for (at, _), got in zip(plan, seen, strict=True))


async def _after_draining(bucket: _Bucket, name: str, plan: Sequence[tuple[float, int]]) -> list[list[bool]]:
    await bucket.takes(name, 0.0, _CAPACITY)
    return [await bucket.takes(name, at, calls) for at, calls in plan]


# (seconds after the bucket was drained, calls), and what they must get
_REFILL_PLAN = ((0.5, 1), (1.5, 3))
_REFILL_EXPECTED = [[True], [True, True, False]]
_HALF_PLAN = ((0.25, 1), (0.5, 2))
_HALF_EXPECTED = [[False], [True, False]]
_RETRY_PLAN = ((0.25, 3), (0.5, 2))
_RETRY_EXPECTED = [[False, False, False], [True, False]]


async def _refill(bucket: _Bucket) -> None:
    seen = await _after_draining(bucket, "refill", _REFILL_PLAN)
    if seen == _REFILL_EXPECTED:
        return
    expected = (
        f"after draining the bucket (rate {_RATE:g} a second): at +0.5 s 1 allowed; "
        "at +1.5 s 2 allowed, then refused"
    )
    flat = [flag for got in seen for flag in got]
    if sum(flat) > sum(sum(e) for e in _REFILL_EXPECTED):
        hints: tuple[str, ...] = (
            f"Too many tokens came back: `rate` is tokens a second, so 0.5 s at {_RATE:g} a second "
            "refills one.",
            "Refill `(now - updated) * rate`, where `updated` is the time you stored on the last call.",
        )
    else:
        hints = (
            "The bucket refills as time passes: before deciding, add `(now - updated) * rate` tokens "
            f"(`rate` is tokens a second: 0.5 s at {_RATE:g} a second is one token), and store `now` as "
            "the new `updated`.",
            "Use the `now` you are given (pass it in ARGV), not Redis's `TIME` nor `time.time()`: the "
            "check moves `now` on by 0.5 s without waiting, as a test would.",
        )
    raise Mismatch(expected, _story(_REFILL_PLAN, seen), hints)


async def _half(bucket: _Bucket) -> None:
    seen = await _after_draining(bucket, "half", _HALF_PLAN)
    if seen == _HALF_EXPECTED:
        return
    expected = (
        f"after draining the bucket (rate {_RATE:g} a second): at +0.25 s refused (half a token); "
        "at +0.5 s 1 allowed, then refused"
    )
    if seen[0] != [False]:
        hints: tuple[str, ...] = (
            "Half a token let a request through: a request takes a whole token.",
            "Allow only when the level is at least 1 (`if tokens >= 1`), and keep the level "
            "fractional: never round it up.",
        )
    else:
        hints = (
            "The refused call at +0.25 s lost the half token it refilled, or paid a token it did not "
            "get: a level rounded down, `updated` moved on without the refill being stored, or a token "
            "taken from a refused request.",
            "Take a token only when you allow the request, and store the refilled level (a fraction is "
            "fine) together with `now`: `HSET key tokens <level> updated <now>`.",
        )
    raise Mismatch(expected, _story(_HALF_PLAN, seen), hints)


async def _retries(bucket: _Bucket) -> None:
    seen = await _after_draining(bucket, "retries", _RETRY_PLAN)
    if seen == _RETRY_EXPECTED:
        return
    if seen[0][:1] == [False] and any(seen[0]):
        first = (
            "A client that retries while refused was credited the same time twice: the refusal stored "
            "the refilled level but kept the old `updated`, so the next call refilled from it again."
        )
    else:
        first = "A refused retry must change nothing: take no token, and neither lose nor repeat a refill."
    raise Mismatch(
        f"after draining the bucket (rate {_RATE:g} a second): at +0.25 s 3 refused (half a token, "
        "however often asked); at +0.5 s 1 allowed, then refused",
        _story(_RETRY_PLAN, seen),
        [
            first,
            "Store the refilled level and `now` together (`HSET key tokens <level> updated <now>`), or, "
            "on a refusal, store nothing at all: a level and the time it was measured go together.",
        ],
    )


async def _capped(bucket: _Bucket) -> None:
    await bucket.takes("idle", 0.0, _CAPACITY)
    taken = await bucket.takes("idle", _IDLE, _CAPACITY + 3)
    allowed = sum(taken)
    expect(
        allowed == _CAPACITY,
        f"{_CAPACITY} allowed, then refused, after {_IDLE:g} s idle: a bucket holds at most its capacity",
        f"{_runs(taken)}" + (f" (it had refilled {_IDLE * _RATE:g} tokens)" if allowed == len(taken) else ""),
        "An idle client must not save up an unbounded burst: the level stops at `capacity`.",
        "`tokens = math.min(capacity, tokens + (now - updated) * rate)`.",
    )


async def _keys_and_arguments(bucket: _Bucket) -> None:
    await bucket.takes("first", 0.0, _CAPACITY + 2)
    other = await bucket.takes("second", 0.0, 5, rate=1.0, capacity=3)
    expect(
        any(other),
        "a new key to be a new, full bucket, after another key was drained",
        f"{_runs(other)} on the new key",
        "Each client has its own bucket: keep it under the key you are given, `KEYS[1]`.",
        "`redis.eval(script, 1, key, rate, capacity, now)`, and `KEYS[1]` in every `redis.call` of "
        "the script.",
    )
    expect(
        other == [True, True, True, False, False],
        "3 allowed, then refused, on a new bucket of capacity 3 (rate 1 a second)",
        _runs(other),
        "Use the `capacity` you are given (`ARGV`), not a number of your own.",
    )
    later = await bucket.takes("second", 1.0, 2, rate=1.0, capacity=3)
    expect(
        later == [True, False],
        "1 allowed, then refused, 1 s later at rate 1 a second",
        _runs(later),
        "Use the `rate` you are given (`ARGV`), not a number of your own.",
    )


_LATER = 2.0  # seconds: the check's clock jumps this far, and ages the key's expiry as much
_SLOW_RATE = 0.5  # tokens a second: an empty bucket of 5 fills in 10 s, longer than 5 s


@dataclass
class _Expiry:
    moment: str  # when the check looked, and the bucket's state then
    full_in: float  # seconds until the bucket would be full again
    longest: float  # seconds: an expiry beyond this keeps idle buckets for no reason
    kind: str  # the key's type
    pttl: int  # ms (-1: no expiry, -2: no key)
    since: float  # seconds of real time since the last call began: the expiry has run that long
    hints: tuple[str, ...]


_SHORT_HINTS = (
    "A drained bucket that expires before it has refilled comes back full: a client that waits for "
    "the expiry gets more than its rate.",
    "Expire after `math.ceil(capacity / rate)` seconds, or after the time until the bucket is full "
    "again, `math.ceil((capacity - tokens) / rate)`: rounded up, never down.",
)
_ONCE_HINTS = (
    "An expiry set only when the bucket is created runs out while the client is still busy: its "
    "drained bucket vanishes and comes back full.",
    "Set the expiry each time the script writes the bucket (`EXPIRE` after `HSET`), not only when "
    "the bucket is new.",
)
_RATE_HINTS = (
    f"At {_SLOW_RATE:g} tokens a second a bucket of {_CAPACITY} takes {_CAPACITY / _SLOW_RATE:g} s to "
    "fill: the expiry depends on the rate as well as the capacity.",
    "Expire after `math.ceil(capacity / rate)` seconds, from the script's own `rate` and `capacity`.",
)


async def _expiry(bucket: _Bucket) -> list[_Expiry]:
    """The key's type and expiry after each kind of call, with real time simulated for the clock's jumps."""
    seen: list[_Expiry] = []

    async def look(name: str, moment: str, full_in: float, rate: float, hints: tuple[str, ...]) -> None:
        key = bucket.key(name)
        kind, pttl = str(await bucket.client.type(key)), int(await bucket.client.pttl(key))
        since = time.monotonic() - bucket.called
        seen.append(_Expiry(moment, full_in, 2 * _CAPACITY / rate + 1, kind, pttl, since, hints))

    async def advance(name: str, seconds: float) -> None:
        """Age the key's expiry as ``seconds`` of real time would, since the check's clock jumps."""
        key = bucket.key(name)
        left = int(await bucket.client.pttl(key))
        if left >= 0:
            if left > seconds * 1000:
                await bucket.client.pexpire(key, left - int(seconds * 1000))
            else:
                await bucket.client.delete(key)

    await bucket.take("expiry", 0.0)
    await look("expiry", "after a first request (4 tokens left)", 0.5, _RATE, _SHORT_HINTS)
    await bucket.takes("expiry", 0.0, _CAPACITY - 1)
    await look("expiry", "after draining the bucket", _REFILL_SECONDS, _RATE, _SHORT_HINTS)
    await bucket.take("expiry", 0.0)
    await look("expiry", "after a refused request", _REFILL_SECONDS, _RATE, _SHORT_HINTS)
    await advance("expiry", _LATER)  # 2 s: a 3 s expiry set at creation has 1 s left
    await bucket.takes("expiry", _LATER, int(_LATER * _RATE))
    await look(
        "expiry",
        f"{_LATER:g} s later, drained again (an expiry set when it was created has 1 s left)",
        _REFILL_SECONDS,
        _RATE,
        _ONCE_HINTS,
    )
    await bucket.takes("slow", 0.0, _CAPACITY, rate=_SLOW_RATE)
    await look(
        "slow",
        f"after draining a bucket of {_CAPACITY} at {_SLOW_RATE:g} a second",
        _CAPACITY / _SLOW_RATE,
        _SLOW_RATE,
        _RATE_HINTS,
    )
    return seen


def _check_expiry(seen: list[_Expiry]) -> None:
    for look in seen:
        expect(
            look.kind == "hash",
            f"{look.moment}: a hash at the key `take_token` was given (the level and the time of the "
            "last update)",
            "no key at all under that name" if look.kind == "none" else f"a {look.kind}",
            "Keep the bucket in one hash under `KEYS[1]`: `HSET KEYS[1] tokens <level> updated <now>`.",
        )
        expect(
            look.pttl != -1,
            f"{look.moment}: the bucket's key to expire, so that an idle client's bucket does not "
            "stay in Redis forever",
            "no expiry (PTTL -1)",
            "A full bucket and a missing one mean the same: let the key expire once the bucket would "
            "be full again.",
            "`redis.call('EXPIRE', KEYS[1], math.ceil(capacity / rate))` in the script, whenever it "
            "writes the bucket.",
        )
        expect(
            look.pttl >= (look.full_in - _TTL_MARGIN - look.since) * 1000,
            f"{look.moment}: an expiry no sooner than the bucket would be full again, in {look.full_in:g} s",
            f"PTTL {look.pttl} ms",
            *look.hints,
        )
        expect(
            look.pttl <= look.longest * 1000,
            f"{look.moment}: an expiry soon after the bucket would be full again, in "
            f"{look.full_in:g} s (at most {look.longest:g} s)",
            f"PTTL {look.pttl} ms",
            "An idle client's bucket is full, and a full bucket is the same as none: keeping it longer "
            "only fills Redis with buckets of clients long gone.",
            "Expire after `math.ceil(capacity / rate)` seconds, computed from the arguments.",
        )


async def _concurrent(bucket: _Bucket) -> list[bool]:
    return list(await asyncio.gather(*(bucket.take("concurrent", 0.0) for _ in range(_CONCURRENT))))


def _check_concurrent(taken: list[bool]) -> None:
    admitted = sum(taken)
    expect(
        admitted == _CAPACITY,
        f"exactly {_CAPACITY} of {_CONCURRENT} concurrent requests admitted (capacity {_CAPACITY})",
        f"{admitted} admitted",
        "Calls that read the level before any of them writes it back all see a full bucket: the read, "
        "the decision and the write must be one step, inside Redis.",
        _SCRIPT_HINT + " Redis runs a script without running any other command in between.",
    )


async def _commands(bucket: _Bucket) -> list[list[str]]:
    """The commands each of three calls sent (a pipeline counts as one entry, ``PIPELINE``)."""
    client = bucket.client
    sent: list[str] = []
    execute, pipeline = client.execute_command, client.pipeline

    async def recording(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]).upper())
        return await execute(*args, **options)

    def recording_pipeline(*args: Any, **options: Any) -> Any:
        sent.append("PIPELINE")
        return pipeline(*args, **options)

    client.execute_command = recording  # type: ignore[method-assign]
    client.pipeline = recording_pipeline  # type: ignore[method-assign]
    per_call = []
    try:
        for at in (0.0, 0.0, 0.5):
            sent.clear()
            await bucket.take("commands", at)
            per_call.append([c for c in sent if not c.startswith("SCRIPT")])
    finally:
        client.execute_command, client.pipeline = execute, pipeline  # type: ignore[method-assign]
    return per_call


def _check_commands(per_call: list[list[str]]) -> None:
    for sent in per_call:
        expect(
            bool(sent),
            "one command per call, EVAL (or EVALSHA), on the client passed as `redis`",
            "no command on that client",
            "The check passes a Redis client of its own, on its own event loop: send the script through "
            "the `redis` argument, not through a client made elsewhere in the notebook.",
            "`await redis.eval(script, 1, key, rate, capacity, now)`; a script from `register_script` runs "
            "on the client it was registered with, unless called with `client=redis`.",
        )
        expect(
            len(sent) == 1 and sent[0] in _ROUND_TRIPS,
            "one command per call: EVAL (or EVALSHA)",
            ", ".join(sent) or "no command",
            "Each command is a round trip to Redis, on every request's path; and commands sent one by "
            "one let other clients' commands run in between.",
            _SCRIPT_HINT,
        )


def check_token_bucket(take_token: Callable[..., Awaitable[Any]]) -> None:
    """Check Exercise 6.1: a token bucket kept in a Redis hash, decided in one atomic script.

    Calls ``take_token(redis, key, rate, capacity, now)`` with the check's client and clock (rate 2 a
    second, capacity 5 unless said): a new bucket allows 5 calls at one instant, then refuses; once
    drained, it allows one 0.5 s later and two 1.5 s later; 0.25 s after draining it refuses (half a
    token), however often asked, and allows one at 0.5 s; after 1000 s idle it allows 5 again, no
    more; another key is another bucket, and its rate and capacity are the arguments; the key is a
    hash whose expiry, after a first, a draining and a refused call, after draining it again 2 s
    later (its expiry aged as much), and at 0.5 tokens a second, is no shorter than the time until the
    bucket is full again (less 0.4 s) and no longer than twice an empty bucket's refill time plus 1 s;
    50 concurrent calls through a client with a 2 ms round trip get exactly 5 tokens; and each call
    sends one EVAL.
    """
    with exercise("6.1", "A token bucket in one atomic script", SOLUTION) as ex:
        expect(
            callable(take_token),
            "the function `take_token`",
            short(take_token),
            "Call the check as `check_token_bucket(take_token)`.",
        )
        if not ex.step(
            f"a new bucket allows {_CAPACITY} requests at the same instant, then refuses",
            lambda: _with_bucket(take_token, _fresh, "fresh"),
        ):
            return
        ex.step(
            f"it refills a token every 1/rate = {1 / _RATE:g} s of the `now` it is given",
            lambda: _with_bucket(take_token, _refill, "refill"),
        )
        ex.step(
            "a request needs a whole token: half a token refuses it, costs nothing, and is kept",
            lambda: _with_bucket(take_token, _half, "half"),
        )
        ex.step(
            "a client retrying while refused earns no extra tokens",
            lambda: _with_bucket(take_token, _retries, "retries"),
        )
        ex.step(
            f"after a long idle it holds no more than its capacity, {_CAPACITY}",
            lambda: _with_bucket(take_token, _capped, "idle"),
        )
        ex.step(
            "each key is a bucket of its own, with the rate and capacity it is given",
            lambda: _with_bucket(take_token, _keys_and_arguments, "keys"),
        )
        ex.step(
            "the bucket is a hash at its key, expiring no sooner than it would be full again (after "
            "every write, at any rate), and not long after",
            lambda: _check_expiry(_with_bucket(take_token, _expiry, "expiry")),
        )
        ex.step(
            f"{_CONCURRENT} concurrent requests, with a {_LATENCY * 1000:g} ms round trip to Redis, get "
            f"exactly {_CAPACITY} tokens",
            lambda: _check_concurrent(_with_bucket(take_token, _concurrent, "concurrent", latency=_LATENCY)),
        )
        ex.step(
            "each decision is one round trip to Redis: a single EVAL",
            lambda: _check_commands(_with_bucket(take_token, _commands, "commands")),
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 6.2: answer a limited request
# ---------------------------------------------------------------------------------------------------

_LIMIT, _WINDOW = 5, 10
_CALL_6_2 = "Call the check as `check_limited_response(rate_limit)`."
_RAISE_HINT = (
    'Refuse with `raise HTTPException(429, "rate limit exceeded", headers=…)`: the headers dict holds '
    "`Retry-After`, `RateLimit-Policy` and `RateLimit`."
)


@dataclass(frozen=True)
class _Decision:
    """What a limiter decided for one request (the fields of the notebook's ``Decision``)."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float

    def __str__(self) -> str:
        return (
            f"Decision(allowed={self.allowed}, limit={self.limit}, remaining={self.remaining}, "
            f"reset_after={self.reset_after:g})"
        )


# The notebook's description of the check: limit 5, window 10 s, these seven decisions.
_PLAN = (
    _Decision(True, _LIMIT, 4, 9.2),
    _Decision(True, _LIMIT, 3, 8.5),
    _Decision(True, _LIMIT, 0, 0.4),
    _Decision(False, _LIMIT, 0, 2.2),
    _Decision(False, _LIMIT, 0, 0.3),
    _Decision(False, _LIMIT, 0, 0.0),
    _Decision(False, _LIMIT, 0, 7.5),
)

# Another limiter, with its own limit and window, and whole seconds to wait (a fresh window's first
# request has exactly the window left): a limit or window written into the code shows, and so does a
# rounding up that adds a second to a whole number (`int(x) + 1`).
_OTHER_LIMIT, _OTHER_WINDOW = 20, 60
_OTHER_PLAN = (
    _Decision(True, _OTHER_LIMIT, 19, 60.0),
    _Decision(False, _OTHER_LIMIT, 0, 3.0),
)


class _ScriptedLimiter:
    """A limiter whose decisions the check wrote in advance, one per call of ``check``."""

    def __init__(
        self, limit: int = _LIMIT, window: int = _WINDOW, plan: tuple[_Decision, ...] = _PLAN
    ) -> None:
        self.limit, self.window, self.plan = limit, window, plan
        self.keys: list[str] = []

    async def check(self, key: str) -> _Decision:
        self.keys.append(key)
        index = len(self.keys) - 1
        return self.plan[index] if index < len(self.plan) else _Decision(False, self.limit, 0, 1.5)


@dataclass
class _Answer:
    decision: _Decision
    response: AsgiResponse
    ran: bool  # whether the endpoint ran


@dataclass
class _Limited:
    limiter: _ScriptedLimiter
    app: FastAPI
    runs: list[int]
    answers: list[_Answer]


def _limited_app(rate_limit: Callable[..., Any], limiter: _ScriptedLimiter | None = None) -> _Limited:
    limiter = limiter or _ScriptedLimiter()
    dependency = rate_limit(limiter)
    expect(
        isinstance(dependency, Depends),
        "a dependency: `Depends(enforce)`",
        short(dependency),
        "Keep the given last line of `rate_limit`: `return Depends(enforce)`.",
    )
    app = FastAPI()
    runs: list[int] = []

    @app.get("/search", dependencies=[dependency])
    async def search() -> dict[str, list[str]]:
        runs.append(1)
        return {"results": []}

    return _Limited(limiter, app, runs, [])


def _answer(limited: _Limited) -> None:
    plan = limited.limiter.plan

    async def main() -> list[_Answer]:
        answers = []
        for index, decision in enumerate(plan):
            before = len(limited.runs)
            response = await call(limited.app, "/search", client=("203.0.113.5", 40000 + index))
            answers.append(_Answer(decision, response, len(limited.runs) > before))
        return answers

    try:
        limited.answers = in_fresh_loop(main, timeout=5, name="check-6.2")
    except NoReturn as late:
        allowed = sum(decision.allowed for decision in plan)
        raise Mismatch(
            f"{len(plan)} requests answered at once, {allowed} of them within the limit and "
            f"{len(plan) - allowed} over it",
            f"no answer within {late.seconds:g} s"
            + (" (and the loop is still held: restart the kernel)" if late.stuck else ""),
            [
                "Does the dependency wait until the quota frees up? A limiter refuses at once, and "
                "`Retry-After` tells the client when to come back.",
                _RAISE_HINT,
            ],
        ) from None
    asked = len(limited.limiter.keys)
    expect(
        asked == len(plan),
        f"the limiter asked once per request: {len(plan)} times",
        f"{asked} times",
        "Keep the given line `decision = await limiter.check(key(request))`, and call it once: each "
        "call counts a request.",
    )


def _check_allowed_served(limited: _Limited) -> None:
    for answer in limited.answers:
        if not answer.decision.allowed:
            continue
        expect(
            answer.response.status == 200 and answer.ran,
            f"status 200 from the endpoint, for {answer.decision}",
            f"status {answer.response.status}" + ("" if answer.ran else ", and the endpoint did not run"),
            "Refuse only when `not decision.allowed`; otherwise return, and the endpoint runs.",
        )


_STATUS_WHY = {
    403: "403 Forbidden says the client may not have this at all, at any rate: it gives up",
    503: "503 Service Unavailable says the server is overloaded, for everyone",
    400: "400 Bad Request says the request itself is wrong",
    200: "200: the request was served as if allowed",
}


def _check_refused(limited: _Limited) -> None:
    for answer in limited.answers:
        if answer.decision.allowed:
            continue
        status = answer.response.status
        if status != 429:
            why = _STATUS_WHY.get(status, f"status {status}")
            raise Mismatch(
                f"429 Too Many Requests, for {answer.decision}",
                why + (", and the endpoint ran" if answer.ran else ""),
                [
                    "429 tells this client that it, alone, is over its quota, and should come back later.",
                    _RAISE_HINT,
                ],
            )
        expect(
            not answer.ran,
            f"the endpoint not to run for {answer.decision}",
            "status 429, but the endpoint ran: its work was done anyway",
            "A limiter protects the work behind it only if the request stops before it: setting "
            "`response.status_code` does not stop anything.",
            _RAISE_HINT,
        )


_WHOLE_HINT = (
    "`int(x) + 1` rounds a fraction up, but adds a second to a whole number: `math.ceil(x)` rounds "
    "up only what is not whole."
)


def _check_retry_after(limited: _Limited) -> None:
    for answer in limited.answers:
        if answer.decision.allowed:
            continue
        left = answer.decision.reset_after
        want = max(1, math.ceil(left))
        value = answer.response.header("retry-after")
        expected = f"Retry-After: {want}, for {answer.decision}"
        ceil_hint = "`str(max(1, math.ceil(decision.reset_after)))`: rounded up, and never 0."
        if value is None:
            raise Mismatch(
                expected,
                "no Retry-After header",
                [
                    "Without Retry-After a client retries at once, and its refusals become the load.",
                    'Pass it in the exception: `HTTPException(429, …, headers={…, "Retry-After": …})`; '
                    "headers set on the `response` parameter are not sent when the dependency raises.",
                ],
            )
        if not re.fullmatch(r"[0-9]+", value):
            why = (
                "an HTTP date: valid HTTP, but it depends on the client's clock agreeing with the "
                "server's; give whole seconds, as the draft's `t` does"
                if "GMT" in value
                else "not a whole number of seconds: Retry-After is delta-seconds, digits only"
            )
            raise Mismatch(expected, f"Retry-After: {short(value)}: {why}", [ceil_hint])
        seconds = int(value)
        if seconds == 0:
            raise Mismatch(
                expected,
                "Retry-After: 0, which tells the client to retry at once, and be refused again",
                [
                    "Round the time left up, to at least one second: `math.ceil`, not `int()` or `round()`.",
                    ceil_hint,
                ],
            )
        if seconds < want:
            raise Mismatch(
                expected,
                f"Retry-After: {seconds}: rounded down, so the client comes back before its quota frees "
                "up, and is refused again",
                ["Round up: `math.ceil`, not `int()` or `round()`.", ceil_hint],
            )
        if seconds == want + 1 and left == math.ceil(left) and left >= 1:
            raise Mismatch(
                expected,
                f"Retry-After: {seconds}: a second more than the {left:g} s left, which is already "
                "a whole number",
                [
                    f"Rounding up leaves a whole number as it is: {left:g} s to wait is {want}; a "
                    f"client told {seconds} waits a second longer than it must.",
                    _WHOLE_HINT,
                    ceil_hint,
                ],
            )
        expect(
            seconds == want,
            expected,
            f"Retry-After: {seconds}",
            "Retry-After is the time left until the quota frees up, `decision.reset_after`, rounded "
            "up: not the whole window.",
            ceil_hint,
        )


def _structured_item(value: str) -> tuple[str, dict[str, str]] | None:
    """``'"default";q=5;w=10'`` → ``("default", {"q": "5", "w": "10"})``; None if it is not that shape."""
    name, *params = value.strip().split(";")
    quoted = re.fullmatch(r'"([^"\\]*)"', name.strip())
    if quoted is None:
        return None
    fields = {}
    for param in params:
        key, equals, number = param.strip().partition("=")
        if not equals:
            return None
        fields[key.strip()] = number.strip()
    return quoted[1], fields


_DRAFT = '`RateLimit-Policy: "default";q=5;w=10` and `RateLimit: "default";r=0;t=1`'
_SYNTAX_HINT = (
    "The draft's headers are Structured Fields items: a quoted policy name, then `;key=value` "
    f"parameters: {_DRAFT}."
)


def _check_rate_limit_headers(answer: _Answer, window: int) -> None:
    response, decision = answer.response, answer.decision
    left = math.ceil(decision.reset_after)
    resets = sorted({str(left), str(max(1, left))})
    want_policy = f'"default";q={decision.limit};w={window}'
    want_state = f'"default";r={decision.remaining};t={" or ".join(resets)}'
    expected = f"RateLimit-Policy: {want_policy} and RateLimit: {want_state}, for {decision}"
    policy, state = response.header("ratelimit-policy"), response.header("ratelimit")
    if policy is None or state is None:
        names = sorted({k.decode("latin-1") for k, _ in response.raw_headers})
        legacy = [n for n in names if n.lower().startswith("x-ratelimit")]
        older = [
            n for n in names if n.lower() in ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset")
        ]
        missing = " and ".join(
            n for n, v in (("RateLimit-Policy", policy), ("RateLimit", state)) if v is None
        )
        if legacy or older:
            raise Mismatch(
                expected,
                f"no {missing}, but {', '.join(legacy or older)}: "
                + ("the legacy, unstandardised headers" if legacy else "an earlier version of the draft"),
                [
                    "Many APIs still send X-RateLimit-*; the IETF draft replaces them (and its own "
                    "earlier RateLimit-Limit, -Remaining, -Reset) with two headers.",
                    _SYNTAX_HINT,
                ],
            )
        hints = [_SYNTAX_HINT]
        if decision.allowed:
            hints.insert(
                0,
                "A client that knows how much is left can slow down before it is refused: send the "
                "headers on every answer, through the dependency's `response` parameter "
                "(`response.headers.update(…)`).",
            )
        raise Mismatch(expected, f"no {missing} (headers: {', '.join(names)})", hints)
    parsed_policy, parsed_state = _structured_item(policy), _structured_item(state)
    seen = f"RateLimit-Policy: {short(policy, 60)} and RateLimit: {short(state, 60)}"
    if parsed_policy is None or parsed_state is None:
        raise Mismatch(expected, seen, [_SYNTAX_HINT])
    (policy_name, quota), (state_name, remaining) = parsed_policy, parsed_state
    t_hint = (
        "`t` is the seconds until the quota frees up, a whole number rounded up: "
        "`math.ceil(decision.reset_after)`."
    )
    checks = [
        (
            policy_name == state_name,
            ["RateLimit names the policy it reports on: the same quoted name in both.", _SYNTAX_HINT],
        ),
        (
            quota.get("q") == str(decision.limit),
            [
                "`q` is the quota of the limiter the dependency is given, whatever limiter that is.",
                f"`q={{decision.limit}}` (this limiter's is {decision.limit}), not a number written in.",
            ],
        ),
        (
            quota.get("w") == str(window),
            [
                "`w` is the window in seconds of the limiter the dependency is given, whatever "
                "limiter that is.",
                f"`w={{limiter.window}}` (this limiter's is {window} s), not a number written in.",
            ],
        ),
        (
            remaining.get("r") == str(decision.remaining),
            ["`r` is what remains, `decision.remaining`.", _SYNTAX_HINT],
        ),
    ]
    t = remaining.get("t")
    if t is not None and t.isdigit() and left >= 1 and left == decision.reset_after and int(t) == left + 1:
        checks.append(
            (
                False,
                [
                    f"Rounding up leaves a whole number as it is: {decision.reset_after:g} s to wait "
                    f"is `t={left}`, not `t={t}`.",
                    _WHOLE_HINT,
                    t_hint,
                ],
            )
        )
    checks.append((t in resets, [t_hint, _SYNTAX_HINT]))
    for holds, hints in checks:
        expect(holds, expected, seen, *hints)


def _check_refused_headers(limited: _Limited) -> None:
    for answer in limited.answers:
        if not answer.decision.allowed:
            _check_rate_limit_headers(answer, limited.limiter.window)


def _check_allowed_headers(limited: _Limited) -> None:
    for answer in limited.answers:
        if answer.decision.allowed:
            _check_rate_limit_headers(answer, limited.limiter.window)


def _check_no_retry_after(limited: _Limited) -> None:
    for answer in limited.answers:
        if answer.decision.allowed:
            value = answer.response.header("retry-after")
            expect(
                value is None,
                f"no Retry-After on an allowed answer, for {answer.decision}",
                f"Retry-After: {short(value)} on a 200",
                "Retry-After tells a client to wait before its next request: on an allowed answer it "
                "makes a client with quota left back off for nothing (RateLimit's `t` already says "
                "when the window resets).",
                'Add `Retry-After` only to the refusal\'s headers: `headers | {"Retry-After": …}` in '
                "the `HTTPException`, not in what goes on `response`.",
            )


def _check_other_limiter(rate_limit: Callable[..., Any]) -> None:
    """The same answers from an app whose limiter has a limit, a window and waits of its own."""
    limited = _limited_app(rate_limit, _ScriptedLimiter(_OTHER_LIMIT, _OTHER_WINDOW, _OTHER_PLAN))
    _answer(limited)
    for check in (
        _check_allowed_served,
        _check_refused,
        _check_retry_after,
        _check_refused_headers,
        _check_allowed_headers,
        _check_no_retry_after,
    ):
        check(limited)


def check_limited_response(rate_limit: Callable[..., Any]) -> None:
    """Check Exercise 6.2: 429 with Retry-After and the draft's RateLimit headers; RateLimit on every answer.

    Builds an app whose ``GET /search`` depends on ``rate_limit(limiter)``, where ``limiter.check(key)``
    returns decisions scripted by the check (limit 5, window 10 s): three allowed (remaining 4, 3, 0),
    then four refused (reset_after 2.2, 0.3, 0 and 7.5 s). Calls the app through ASGI, once per
    decision. Allowed requests must reach the endpoint (200); refused ones must get 429 without it,
    ``Retry-After`` of 3, 1, 1 and 8; every answer ``RateLimit-Policy: "default";q=5;w=10`` and
    ``RateLimit: "default";r=<remaining>;t=<seconds, rounded up>``; and no allowed one ``Retry-After``.
    Once all of that holds, the same with another limiter (limit 20, window 60 s), whose waits are
    whole seconds (60 and 3): ``q=20;w=60``, and ``Retry-After: 3`` and ``t=3`` for 3.0 s, not 4.
    """
    with exercise("6.2", "Answer a limited request: 429, Retry-After, RateLimit", SOLUTION) as ex:
        expect(callable(rate_limit), "the function `rate_limit`", short(rate_limit), _CALL_6_2)
        box: list[_Limited] = []
        if not ex.step(
            "rate_limit(limiter) gives a dependency", lambda: box.append(_limited_app(rate_limit))
        ):
            return
        limited = box[0]
        if not ex.step(
            f"{len(_PLAN)} requests are answered, the limiter asked once for each",
            lambda: _answer(limited),
        ):
            return
        passed = [
            ex.step(
                "requests within the limit reach the endpoint (200)", lambda: _check_allowed_served(limited)
            ),
            ex.step(
                "requests over the limit get 429, and the endpoint does not run",
                lambda: _check_refused(limited),
            ),
            ex.step(
                "each 429 has Retry-After: whole seconds, rounded up, at least 1",
                lambda: _check_retry_after(limited),
            ),
            ex.step(
                "each 429 has RateLimit-Policy and RateLimit, in the draft's syntax",
                lambda: _check_refused_headers(limited),
            ),
            ex.step(
                "allowed answers have them too, RateLimit's r counting down",
                lambda: _check_allowed_headers(limited),
            ),
            ex.step(
                "allowed answers carry no Retry-After: they have nothing to wait for",
                lambda: _check_no_retry_after(limited),
            ),
        ]
        if all(passed):  # otherwise the same flaw would show twice
            ex.step(
                f"with another limiter ({_OTHER_LIMIT} per {_OTHER_WINDOW} s), its own q and w; a wait "
                "of exactly 3 s is 3",
                lambda: _check_other_limiter(rate_limit),
            )


# ---------------------------------------------------------------------------------------------------
# Exercise 6.3: a client key that cannot be spoofed
# ---------------------------------------------------------------------------------------------------

_TRUSTED = frozenset({"192.0.2.10", "192.0.2.11"})  # not the notebook's TRUSTED_PROXIES, on purpose
_ISSUED = frozenset({"light-client-01", "Team-42-abcdefgh"})  # not the notebook's ISSUED_KEYS either
_PROXY, _OUTER_PROXY = "192.0.2.10", "192.0.2.11"
_DIRECT = "203.0.113.5"
_NEIGHBOUR = "192.0.2.99"  # in the proxies' network, 192.0.2.0/24, but not a proxy
_CLIENT = "198.51.100.7"
_EVERY_LINE = '`",".join(headers.getlist("x-forwarded-for"))`'
_FROM_RIGHT_HINT = (
    f"Read every X-Forwarded-For line, {_EVERY_LINE}, then walk the entries from the right, "
    '`reversed(forwarded.split(","))`, each `.strip()`ped, skip those in `trusted_proxies`, and take '
    "the first other one."
)


@dataclass(frozen=True)
class _Case:
    label: str
    peer: str
    headers: tuple[tuple[str, bytes], ...]
    expected: str
    hints: tuple[str, ...]

    def describe(self) -> str:
        sent = "; ".join(f"{name}: {short(value.decode('latin-1'), 40)}" for name, value in self.headers)
        return f"{self.label} (peer {self.peer}{'; ' + sent if sent else ''})"


def _xff(value: str) -> tuple[str, bytes]:
    return ("X-Forwarded-For", value.encode("latin-1"))


def _api_key(value: bytes) -> tuple[str, bytes]:
    return ("X-API-Key", value)


_DIRECT_CASES = (
    _Case(
        "a direct client, no headers",
        _DIRECT,
        (),
        f"ip:{_DIRECT}",
        ('With no API key, the key is `f"ip:{address}"`; a client not behind a proxy is its peer.',),
    ),
    _Case(
        "a direct client with a forged X-Forwarded-For",
        _DIRECT,
        (_xff("6.6.6.6"),),
        f"ip:{_DIRECT}",
        (
            "The peer is not one of your proxies, so whatever it wrote in X-Forwarded-For is its own "
            "invention: a new address on every request, a new quota each time.",
            'Read X-Forwarded-For only when `peer in trusted_proxies`; otherwise the key is `f"ip:{peer}"`.',
        ),
    ),
    _Case(
        "a direct client naming a trusted proxy in X-Forwarded-For",
        _DIRECT,
        (_xff(f"6.6.6.6, {_PROXY}"),),
        f"ip:{_DIRECT}",
        (
            "Entries that name your proxies can be forged too: trust the header only when the "
            "connection itself comes from a trusted proxy.",
            'Check the peer first: `if peer not in trusted_proxies: return f"ip:{peer}"`.',
        ),
    ),
    _Case(
        "a direct client in the proxies' own network, not a proxy, with a forged X-Forwarded-For",
        _NEIGHBOUR,
        (_xff("6.6.6.6"),),
        f"ip:{_NEIGHBOUR}",
        (
            f"Your proxies are the addresses in `trusted_proxies`, and only those: {_NEIGHBOUR} shares "
            "their network but is not one of them, so what it writes in X-Forwarded-For is its own "
            "invention. Any host that gets an address in that network could forge it.",
            "Test the peer with `peer in trusted_proxies`, an exact match: not a network around the "
            "proxies' addresses.",
        ),
    ),
)

_LEFTMOST_HINT = (
    "The leftmost entry is whatever the client wrote before the request reached your proxy: a client "
    "that changes it on every request gets a new quota each time.",
    _FROM_RIGHT_HINT,
)

_PROXIED_CASES = (
    _Case(
        "one trusted proxy",
        _PROXY,
        (_xff(_CLIENT),),
        f"ip:{_CLIENT}",
        (
            "Behind your proxy, the peer is the proxy: the client's address is the one the proxy "
            "appended to X-Forwarded-For. Test the peer against `trusted_proxies`, the argument (the "
            "check passes proxies of its own).",
            _FROM_RIGHT_HINT,
        ),
    ),
    _Case(
        "one trusted proxy, a spoofed address on the left",
        _PROXY,
        (_xff(f"6.6.6.6, {_CLIENT}"),),
        f"ip:{_CLIENT}",
        _LEFTMOST_HINT,
    ),
    _Case(
        "two trusted proxies in a chain",
        _OUTER_PROXY,
        (_xff(f"6.6.6.6, {_CLIENT}, {_PROXY}"),),
        f"ip:{_CLIENT}",
        (
            "The outer proxy appended the client; the inner one appended the outer proxy's address. "
            "Skip every entry that is one of your proxies.",
            _FROM_RIGHT_HINT,
        ),
    ),
    _Case(
        "spaces around the entries",
        _PROXY,
        (_xff(f"  6.6.6.6 ,{_CLIENT}  "),),
        f"ip:{_CLIENT}",
        ("Proxies write `a, b`: strip the spaces around each entry before using it.", _FROM_RIGHT_HINT),
    ),
    _Case(
        "an IPv6 client",
        _PROXY,
        (_xff("2001:db8::7"),),
        "ip:2001:db8::7",
        ("An IPv6 address is an address too: `ipaddress.ip_address` accepts both.", _FROM_RIGHT_HINT),
    ),
    _Case(
        "a client in the proxies' own network, not a proxy",
        _PROXY,
        (_xff(_NEIGHBOUR),),
        f"ip:{_NEIGHBOUR}",
        (
            f"Skip only the entries that are in `trusted_proxies`: {_NEIGHBOUR} shares their network "
            "but is not one of them, so it is the client your proxy saw.",
            _FROM_RIGHT_HINT,
        ),
    ),
)

_LINES_HINT = (
    "A proxy may add an X-Forwarded-For line of its own instead of appending to the client's, so the "
    "client's forged line comes first; `headers.get` returns only that first line.",
    f"Read every line, in order: {_EVERY_LINE}, as uvicorn's ProxyHeadersMiddleware does; then walk "
    "the entries from the right.",
)

_LINES_CASES = (
    _Case(
        "two X-Forwarded-For lines: the client's forged one, then the proxy's",
        _PROXY,
        (_xff("6.6.6.6"), _xff(_CLIENT)),
        f"ip:{_CLIENT}",
        _LINES_HINT,
    ),
    _Case(
        "two X-Forwarded-For lines behind two proxies",
        _OUTER_PROXY,
        (_xff(f"6.6.6.6, {_CLIENT}"), _xff(_PROXY)),
        f"ip:{_CLIENT}",
        _LINES_HINT,
    ),
)

_FALLBACK_HINT = (
    "An entry your proxy did not write, or that is not an address, cannot be the client: key on the "
    "proxy's own address instead, `ip:{peer}`.",
    "Validate the entry with `ipaddress.ip_address(entry)` (it raises ValueError); when there is no "
    'valid one, `return f"ip:{peer}"`.',
)

_FALLBACK_CASES = (
    _Case("a trusted proxy, no X-Forwarded-For", _PROXY, (), f"ip:{_PROXY}", _FALLBACK_HINT),
    _Case("a trusted proxy, an empty X-Forwarded-For", _PROXY, (_xff(""),), f"ip:{_PROXY}", _FALLBACK_HINT),
    _Case(
        "a trusted proxy, X-Forwarded-For 'unknown'",
        _PROXY,
        (_xff("unknown"),),
        f"ip:{_PROXY}",
        _FALLBACK_HINT,
    ),
    _Case(
        "two trusted proxies, and no other entry",
        _OUTER_PROXY,
        (_xff(_PROXY),),
        f"ip:{_OUTER_PROXY}",
        (
            "Every entry is one of your proxies, so no client address was forwarded: the client is "
            "the peer, not the last proxy you skipped.",
            'When the walk from the right finds no entry that is not a trusted proxy, `return f"ip:{peer}"`.',
        ),
    ),
    _Case(
        "a trusted proxy, garbage as the rightmost entry",
        _PROXY,
        (_xff(f"{_CLIENT}, <script>"),),
        f"ip:{_PROXY}",
        _FALLBACK_HINT,
    ),
)

_ISSUED_KEY_HINT = (
    "A client that sends a key you issued is that key, wherever it connects from: everyone behind one "
    "NAT shares an address, not a key. Test the key against `issued_keys`, the argument (the check "
    "passes keys of its own).",
    '`if api_key in issued_keys: return f"key:{api_key}"`, first.',
)

_ISSUED_CASES = (
    _Case(
        "an issued X-API-Key",
        _DIRECT,
        (_api_key(b"light-client-01"),),
        "key:light-client-01",
        _ISSUED_KEY_HINT,
    ),
    _Case(
        "an issued X-API-Key through a proxy, with a spoofed X-Forwarded-For",
        _PROXY,
        (_api_key(b"Team-42-abcdefgh"), _xff(f"6.6.6.6, {_CLIENT}")),
        "key:Team-42-abcdefgh",
        _ISSUED_KEY_HINT,
    ),
)

_MADE_UP_HINT = (
    "A well-formed key is not an issued one: anyone can make one up, and a client that sends a new "
    "one with every request gets a new quota every time, as with a rotating X-Forwarded-For.",
    "Use the key only if the service issued it: `if api_key in issued_keys`; any other key counts "
    "as none, and the client is keyed on its address.",
)

_SPACING_HINT = (
    "A key counts only when it is exactly one you issued: with a newline, a space or a tab around "
    "it, it is a value you never issued, and counts as no key. Cleaning up the client's value before "
    "the lookup accepts what you never issued.",
    "`if api_key in issued_keys`, with the value as sent: no `.strip()`, and return the key only "
    "when it is exactly one you issued.",
)

_UNKNOWN_KEY_CASES = (
    _Case(
        "a well-formed X-API-Key that was never issued",
        _DIRECT,
        (_api_key(b"made-up-0001"),),
        f"ip:{_DIRECT}",
        _MADE_UP_HINT,
    ),
    _Case(
        "a made-up X-API-Key through a proxy",
        _PROXY,
        (_api_key(b"made-up-0002"), _xff(_CLIENT)),
        f"ip:{_CLIENT}",
        _MADE_UP_HINT,
    ),
    _Case("an X-API-Key of 10 kB", _DIRECT, (_api_key(b"K" * 10_000),), f"ip:{_DIRECT}", _MADE_UP_HINT),
    _Case(
        "an X-API-Key with a newline in it",
        _DIRECT,
        (_api_key(b"abcdefgh\r\nX-Admin: true"),),
        f"ip:{_DIRECT}",
        _MADE_UP_HINT,
    ),
    _Case(
        "an X-API-Key with non-ASCII letters",
        _DIRECT,
        (_api_key("schlüssel-42".encode("latin-1")),),
        f"ip:{_DIRECT}",
        _MADE_UP_HINT,
    ),
    _Case("an empty X-API-Key", _DIRECT, (_api_key(b""),), f"ip:{_DIRECT}", _MADE_UP_HINT),
    _Case(
        "an issued X-API-Key with a newline after it",
        _DIRECT,
        (_api_key(b"light-client-01\n"),),
        f"ip:{_DIRECT}",
        _SPACING_HINT,
    ),
    _Case(
        "an issued X-API-Key with a space after it",
        _DIRECT,
        (_api_key(b"light-client-01 "),),
        f"ip:{_DIRECT}",
        _SPACING_HINT,
    ),
    _Case(
        "an issued X-API-Key with a tab before it",
        _DIRECT,
        (_api_key(b"\tTeam-42-abcdefgh"),),
        f"ip:{_DIRECT}",
        _SPACING_HINT,
    ),
    _Case(
        "an issued X-API-Key in other letter case",
        _DIRECT,
        (_api_key(b"TEAM-42-ABCDEFGH"),),
        f"ip:{_DIRECT}",
        (
            "A key is a secret, compared exactly: `TEAM-42-ABCDEFGH` is not the key you issued, and "
            "if every spelling of it counts, a client gets a quota per spelling.",
            "`if api_key in issued_keys`, as sent: no `.lower()`, and return the key only when it is "
            "exactly one you issued.",
        ),
    ),
)


def _key_for(client_key: Callable[..., Any], case: _Case) -> None:
    headers = Headers(raw=[(name.lower().encode("latin-1"), value) for name, value in case.headers])
    try:
        result = client_key(case.peer, headers, set(_TRUSTED), set(_ISSUED))
    except NotImplementedError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise Mismatch(
            f"{case.expected!r} for {case.describe()}",
            f"it raised {type(exc).__name__}{': ' + detail[:80] if detail else ''}",
            [
                "Headers are the client's input: a missing, empty or malformed one is not an error. "
                '`headers.get(name, "")`, and catch what `ipaddress.ip_address` raises.',
                "`client_key` takes four arguments: `(peer, headers, trusted_proxies, issued_keys)`.",
                *case.hints,
            ],
        ) from None
    if inspect.iscoroutine(result):
        result.close()  # never awaited: no warning
        raise Mismatch(
            "a str from `client_key`",
            "a coroutine",
            ["`client_key` awaits nothing: define it with `def`, not `async def`."],
        )
    expect(
        isinstance(result, str),
        f"a str: {case.expected!r}, for {case.describe()}",
        short(result),
        'Return `f"key:{api_key}"` or `f"ip:{address}"`.',
    )
    expect(result == case.expected, f"{case.expected!r} for {case.describe()}", short(result), *case.hints)


def _check_cases(client_key: Callable[..., Any], cases: Sequence[_Case]) -> None:
    for case in cases:
        _key_for(client_key, case)


def check_client_key(client_key: Callable[..., Any]) -> None:
    """Check Exercise 6.3: ``key:<API key>`` for an issued key, else the address a trusted proxy saw.

    Calls ``client_key(peer, headers, trusted_proxies, issued_keys)`` (``headers`` a case-insensitive
    Starlette ``Headers``; trusted proxies 192.0.2.10 and 192.0.2.11; issued keys of the check's own)
    on a table of cases: a direct client is its peer, whatever its X-Forwarded-For says (192.0.2.99
    too: in the proxies' network, but not a proxy); behind
    trusted proxies, the rightmost entry that is not a trusted proxy (spaces stripped, IPv6 too),
    read from every X-Forwarded-For line in order, not only the first; an empty or garbage entry, or
    only trusted proxies, falls back to the peer; an issued X-API-Key wins; any other (well-formed
    but never issued, 10 kB, a newline, non-ASCII, empty, an issued one in other letter case or with a
    newline, space or tab around it) is ignored.
    """
    with exercise("6.3", "A client key that cannot be spoofed", SOLUTION) as ex:
        expect(
            callable(client_key),
            "the function `client_key`",
            short(client_key),
            "Call the check as `check_client_key(client_key)`.",
        )
        ex.step(
            "a direct client is its own address, whatever its X-Forwarded-For says",
            lambda: _check_cases(client_key, _DIRECT_CASES),
        )
        ex.step(
            "behind trusted proxies, the client is the rightmost address they did not add",
            lambda: _check_cases(client_key, _PROXIED_CASES),
        )
        ex.step(
            "every X-Forwarded-For line is read, in order, not only the first",
            lambda: _check_cases(client_key, _LINES_CASES),
        )
        ex.step(
            "with no client entry (none, empty, garbage, only trusted proxies), the peer's address",
            lambda: _check_cases(client_key, _FALLBACK_CASES),
        )
        ex.step(
            "an issued X-API-Key is the key, wherever the request comes from",
            lambda: _check_cases(client_key, _ISSUED_CASES),
        )
        ex.step(
            "any other X-API-Key (never issued, 10 kB, a newline, empty, an issued one in other letter "
            "case or with spaces around it) is ignored",
            lambda: _check_cases(client_key, _UNKNOWN_KEY_CASES),
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 6.4: quotas per plan, on a shared store
# ---------------------------------------------------------------------------------------------------


class _Quota(NamedTuple):
    """A plan's quota (the fields of the notebook's ``Quota``)."""

    limit: int  # requests per window
    window: int  # seconds


# Not the notebook's quotas (5 and 50 per 10 s), and a window of their own each: numbers written into
# the answer show, and so does one plan's window used for the other.
_FREE, _PAID = _Quota(3, 30), _Quota(12, 20)
_START = 1_800_000_000.0  # the check's clock starts on a whole minute: a new window of both plans
_NEXT_WINDOWS = 60.0  # a whole number of both windows: the next window of both
_COUNT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return count
"""
# the check's issued keys, not the notebook's
_FREE_KEY, _FREE_KEY_2, _PAID_KEY = "bluebird-7731", "larkspur-2208", "kestrel-9054"
_REVOKED_KEY, _NEW_KEY = "osprey-4410", "wren-6623"
_CALL_6_4 = "Call the check as `check_plan_quotas(plan_limit)`."
_SHARED_HINT = (
    "Count with the limiter you are given, in the store every instance shares: "
    "`decision = await limiter.check(request.app.state.redis, client, quota.limit, quota.window)`."
)
_LOOKUP_HINT = (
    "Look the key up in `plans` (the argument) on every request: `plan = plans.get(api_key)`; an issued "
    'key is the client `f"key:{api_key}"` on that plan; no plan means an anonymous client, '
    '`f"ip:{request.client.host}"`, on the free plan; its quota is `quotas[plan]`.'
)


def _plans() -> dict[str, str]:
    return {_FREE_KEY: "free", _FREE_KEY_2: "free", _PAID_KEY: "paid", _REVOKED_KEY: "paid"}


def _quotas() -> dict[str, _Quota]:
    return {"free": _FREE, "paid": _PAID}


def _per(quota: _Quota) -> str:
    return f"{quota.limit} per {quota.window} s"


@dataclass(frozen=True)
class _Client:
    """One client of the check's: where it connects from and what it sends."""

    label: str  # how the check's lines name it
    peer: str
    key: str | None = None  # its X-API-Key
    plan_header: str | None = None  # an X-Plan header of its own invention
    made_up: bool = False  # a new made-up X-API-Key with every request
    spellings: tuple[str, ...] = ()  # X-API-Keys sent in turn, one per request

    def headers(self, index: int) -> list[tuple[str, str]]:
        sent = []
        if self.made_up:
            sent.append(("X-API-Key", f"premium-{index:04d}"))
        elif self.spellings:
            sent.append(("X-API-Key", self.spellings[index % len(self.spellings)]))
        elif self.key is not None:
            sent.append(("X-API-Key", self.key))
        if self.plan_header is not None:
            sent.append(("X-Plan", self.plan_header))
        return sent


@dataclass(frozen=True)
class _Counted:
    """One call of the check's limiter: whose request it was, and what the answer asked it to count."""

    client: str
    key: str
    limit: int
    window: float
    decision: _Decision


class _PlanLimiter:
    """The notebook's ``SharedWindow``: a fixed window in Redis, counted by one script, with the quota given
    on each call; on the check's clock, ``now``. It counts only with the Redis client of the instance that
    serves the request, and records each call."""

    def __init__(self) -> None:
        self.now = _START
        self.serving: Any = None  # the Redis client of the instance serving the current request
        self.client = ""  # the label of the client whose request it is
        self.calls: list[_Counted] = []

    async def check(self, redis: Any, key: Any, limit: Any, window: Any) -> _Decision:
        expect(
            redis is self.serving,
            "`limiter.check(request.app.state.redis, …)`: the Redis client of the instance serving the "
            "request",
            f"a {type(redis).__name__} that is not the serving instance's `app.state.redis`",
            "Each instance reaches the store they share through its own client, `request.app.state.redis`: "
            "pass that one (the notebook's `redis` belongs to the notebook's event loop, not the app's).",
            _SHARED_HINT,
        )
        expect(
            isinstance(key, str),
            "a str as the client's key, such as `key:<API key>` or `ip:<address>`",
            short(key),
            "The limiter keeps one count per key: pass a string that names the client, the same for each "
            "of its requests.",
            _SHARED_HINT,
        )
        numbers = isinstance(limit, int) and not isinstance(limit, bool) and isinstance(window, int | float)
        expect(
            numbers and limit >= 0 and window > 0,
            "`limiter.check(redis, key, limit, window)` with the plan's limit and window, as numbers",
            f"limit {short(limit, 40)}, window {short(window, 40)}",
            "The limiter counts with the limit and window it is given on each call: the client's plan's, "
            "from `quotas`.",
            "Pass the two fields of the plan's quota: `quota = quotas[plan]`, then "
            "`quota.limit, quota.window`.",
        )
        slot = int(self.now // window)
        counter = f"{_PREFIX}plans:{key}:{window:g}:{slot}"
        count = int(await redis.eval(_COUNT, 1, counter, math.ceil(window) + 1))
        decision = _Decision(count <= limit, limit, max(0, limit - count), (slot + 1) * window - self.now)
        self.calls.append(_Counted(self.client, key, limit, window, decision))
        return decision


@dataclass
class _Instance:
    app: FastAPI
    redis: redis.asyncio.Redis
    runs: list[int]  # one entry per request the endpoint served


@dataclass
class _Refusal:
    """One 429: the answer, the limiter's last decision for its request, and what that request took."""

    response: AsgiResponse
    decision: _Decision | None
    asked: int  # how many times the request asked the limiter
    seconds: float  # how long the request took, in real time


@dataclass
class _Burst:
    """What one client got: each answer's status, and its refusals."""

    client: _Client
    statuses: list[int]
    refusals: list[_Refusal]

    @property
    def admitted(self) -> int:
        return self.statuses.count(200)

    def __str__(self) -> str:
        return f"{self.client.label}: {self.admitted} of {len(self.statuses)} admitted"


def _instance(
    plan_limit: Callable[..., Any], limiter: _PlanLimiter, plans: dict[str, str], quotas: Any, client: Any
) -> _Instance:
    """One instance of the service: its own dependency from ``plan_limit``, and its own Redis client."""
    dependency = plan_limit(limiter, plans, quotas)
    expect(
        isinstance(dependency, Depends),
        "a dependency: `Depends(enforce)`",
        short(dependency),
        "Keep the given last line of `plan_limit`: `return Depends(enforce)`.",
    )
    app = FastAPI()
    app.state.redis = client
    runs: list[int] = []

    @app.get("/search", dependencies=[dependency])
    async def search() -> dict[str, list[str]]:
        runs.append(1)
        return {"results": []}

    return _Instance(app, client, runs)


class _World:
    """Two instances of the service, each with its own dependency and Redis client, on one store."""

    def __init__(self, limiter: _PlanLimiter, plans: dict[str, str], instances: list[_Instance]) -> None:
        self.limiter, self.plans, self.instances = limiter, plans, instances

    async def _send(self, client: _Client, index: int, burst: _Burst) -> None:
        instance = self.instances[index % len(self.instances)]  # each client's requests alternate
        self.limiter.serving, self.limiter.client = instance.redis, client.label
        before, asked = len(instance.runs), len(self.limiter.calls)
        started = time.perf_counter()
        response = await call(
            instance.app, "/search", headers=client.headers(index), client=(client.peer, 40000 + index)
        )
        seconds = time.perf_counter() - started
        ran = len(instance.runs) > before
        status = response.status
        if status not in (200, 429):
            raise Mismatch(
                f"200 or 429 for each request, from {client.label}",
                f"status {status}",
                [
                    "Within its quota a request goes on to the endpoint (200); over it, the dependency "
                    "refuses it with 429, the status for a client over its own quota.",
                    'Refuse with `raise HTTPException(429, "rate limit exceeded", headers={…})`, '
                    "with `Retry-After` in the headers.",
                ],
            )
        expect(
            status == 429 or ran,
            f"the endpoint to run for a 200, from {client.label}",
            "status 200, but the endpoint did not run",
            "An allowed request goes on to the endpoint, which gives the answer: the dependency only "
            "decides whether it may.",
            "Return nothing from the dependency when the request is allowed: the endpoint then runs.",
        )
        expect(
            status == 200 or not ran,
            f"the endpoint not to run for a 429, from {client.label}",
            "status 429, but the endpoint ran: its work was done anyway",
            "Setting the answer's status stops nothing: the endpoint did the work the limit protects.",
            "A refusal must stop the request before the endpoint: raise `HTTPException(429, …)` from the "
            "dependency, rather than setting `response.status_code`.",
        )
        burst.statuses.append(status)
        if status == 429:
            decisions = self.limiter.calls[asked:]
            last = decisions[-1].decision if decisions else None
            burst.refusals.append(_Refusal(response, last, len(decisions), seconds))

    async def rounds(self, *plan: tuple[_Client, int]) -> list[_Burst]:
        """Each client sends its number of requests, the clients taking turns, to alternate instances."""
        bursts = [_Burst(client, [], []) for client, _ in plan]
        for index in range(max(times for _, times in plan)):
            for burst, (client, times) in zip(bursts, plan, strict=True):
                if index < times:
                    await self._send(client, index, burst)
        return bursts

    def calls_of(self, client: _Client) -> list[_Counted]:
        return [counted for counted in self.limiter.calls if counted.client == client.label]


def _with_world(plan_limit: Callable[..., Any], body: Callable[[_World], Awaitable[_T]], name: str) -> _T:
    """Run ``body`` on a fresh loop: two instances, the check's plans and limiter, no ``ex06:`` keys."""

    async def main() -> _T:
        clients = [redis_client(decode_responses=True) for _ in range(2)]
        try:
            await delete_keys(clients[0], f"{_PREFIX}*")
            limiter, plans, quotas = _PlanLimiter(), _plans(), _quotas()
            instances = [_instance(plan_limit, limiter, plans, quotas, client) for client in clients]
            return await body(_World(limiter, plans, instances))
        finally:
            try:
                await delete_keys(clients[0], f"{_PREFIX}*")
            finally:
                for client in clients:
                    await client.aclose()

    try:
        return in_fresh_loop(main, timeout=5, name=f"check-6.4-{name}")
    except NoReturn as late:
        raise Mismatch(
            "each request answered at once, allowed or refused",
            f"no answer within {late.seconds:g} s"
            + (" (and the loop is still held: restart the kernel)" if late.stuck else ""),
            [
                "Does the dependency wait until the quota frees up? A limiter decides at once, and "
                "`Retry-After` tells the client when to come back.",
                _SHARED_HINT + " Then, when `not decision.allowed`, `raise HTTPException(429, …)`.",
            ],
        ) from None


def _admitted(bursts: Sequence[_Burst]) -> str:
    return "; ".join(str(burst) for burst in bursts)


def _quota_hints(world: _World, bursts: Sequence[_Burst], quotas: Sequence[_Quota]) -> list[str]:
    """Hints for clients that did not get their plan's quota, from what the limiter was asked."""
    pairs = list(zip(bursts, quotas, strict=True))
    if not world.limiter.calls:
        if any(b.admitted == min(len(b.statuses), 2 * q.limit) > q.limit for b, q in pairs):
            first = (
                "Each client got its quota twice: once per instance. Counts kept in the dependency (or in "
                "this process's memory) are one set per instance; the instances share only the store."
            )
        else:
            first = (
                "The limiter you are given was never asked: the requests were counted elsewhere, or "
                "not at all."
            )
        return [first, _SHARED_HINT + " (The check passes a limiter of its own, on a clock of its own.)"]
    for burst in bursts:
        calls = len(world.calls_of(burst.client))
        if calls > len(burst.statuses):
            return [
                f"{burst.client.label.capitalize()}'s {len(burst.statuses)} requests were counted {calls} "
                "times: each call of the limiter counts a request, so a second call uses up the quota twice "
                "as fast.",
                _SHARED_HINT + " Once per request.",
            ]
    for burst, quota in pairs:
        asked = {(c.limit, c.window) for c in world.calls_of(burst.client)}
        if asked and asked != {(quota.limit, quota.window)}:
            used = ", ".join(f"{limit} per {window:g} s" for limit, window in sorted(asked))
            return [
                f"{burst.client.label.capitalize()} was counted with {used}; its plan's quota is "
                f"{_per(quota)}. The check passes plans and quotas of its own: use the arguments, "
                "`plans` and `quotas`, not the notebook's `PLANS` and `QUOTAS` nor numbers written in.",
                _LOOKUP_HINT,
            ]
    for quota in set(quotas):
        same = [b for b, q in pairs if q == quota]
        if len(same) > 1 and sum(b.admitted for b in same) == quota.limit:
            return [
                "Clients on one plan shared one count: together they got one client's quota, and each "
                "one's requests used up the others'.",
                "Key the count on the client (`key:<API key>` or `ip:<address>`), not on the plan: the "
                "plan sets the limit, the client owns the count.",
            ]
    return [
        "Each client's count is its own, and its limit is its plan's: an issued key's plan is in "
        "`plans`, and the quota of a plan in `quotas`.",
        _LOOKUP_HINT,
    ]


def _expect_quotas(world: _World, bursts: Sequence[_Burst], quotas: Sequence[_Quota], why: str = "") -> None:
    wanted = [min(len(b.statuses), q.limit) for b, q in zip(bursts, quotas, strict=True)]
    if [b.admitted for b in bursts] == wanted:
        return
    expected = "; ".join(
        f"{b.client.label}: {want} of {len(b.statuses)} admitted ({_per(q)})"
        for b, q, want in zip(bursts, quotas, wanted, strict=True)
    )
    raise Mismatch(expected + why, _admitted(bursts), _quota_hints(world, bursts, quotas))


def _expect_asked(world: _World, bursts: Sequence[_Burst], quotas: Sequence[_Quota]) -> None:
    """Each request counted once, by the check's limiter, with its client's plan's quota."""
    for burst, quota in zip(bursts, quotas, strict=True):
        calls = world.calls_of(burst.client)
        asked = sorted({(c.limit, c.window) for c in calls})
        seen = f"{len(calls)} times" + (
            ", with " + ", ".join(f"{limit} per {window:g} s" for limit, window in asked) if asked else ""
        )
        expect(
            len(calls) == len(burst.statuses) and asked == [(quota.limit, quota.window)],
            f"the limiter you are given asked once per request of {burst.client.label}, "
            f"{len(burst.statuses)} times, with its plan's quota, {_per(quota)}",
            seen,
            *(
                _quota_hints(world, bursts, quotas)
                if len(calls) in (0, len(burst.statuses))
                else [
                    "Every request must be counted once, in the store both instances share: a request "
                    "counted twice uses up two of the client's quota, and one counted elsewhere is "
                    "counted once per process.",
                    _SHARED_HINT + " Once per request.",
                ]
            ),
        )


async def _plan_quotas(world: _World) -> None:
    free = _Client("the free key", "198.51.100.11", _FREE_KEY)
    paid = _Client("the paid key", "198.51.100.12", _PAID_KEY)
    bursts = await world.rounds((free, 8), (paid, 20))
    _expect_quotas(world, bursts, (_FREE, _PAID), ", the requests alternating between two instances")
    _expect_asked(world, bursts, (_FREE, _PAID))


async def _anonymous(world: _World) -> None:
    first = _Client("an anonymous client at 203.0.113.21", "203.0.113.21")
    second = _Client("an anonymous client at 203.0.113.22", "203.0.113.22")
    bursts = await world.rounds((first, 14), (second, 14))
    admitted = [b.admitted for b in bursts]
    if admitted == [_FREE.limit, _FREE.limit]:
        return
    if all(a == 14 for a in admitted):
        hints = [
            "Clients with no key were not limited at all: a client without a key is still a client, and "
            "the cheapest one to flood you with.",
            "When the key is missing, or not in `plans`, key the client on its address, "
            '`f"ip:{request.client.host}"`, and give it the free quota, `quotas["free"]`.',
        ]
    elif sum(admitted) == _FREE.limit:
        hints = [
            "Every anonymous client shared one quota: once one had used it, the other was refused "
            "without having sent anything over its limit.",
            'Key each anonymous client on its own address, `f"ip:{request.client.host}"`, not on a '
            'single name such as `"anonymous"`.',
        ]
    elif all(a == min(14, _PAID.limit) for a in admitted):
        hints = [
            "Anonymous clients got the paid quota: a client with no issued key is on the free plan.",
            'For an unknown client, `quota = quotas["free"]`.',
        ]
    else:
        hints = [_LOOKUP_HINT]
    raise Mismatch(
        f"each anonymous client: {_FREE.limit} of 14 admitted (the free quota, {_per(_FREE)}, keyed on its "
        "address)",
        _admitted(bursts),
        hints,
    )


_SHORT_HINTS_6_4 = (
    "This client got less than the free quota: its count was shared with another client's, so the "
    "other's requests used up its quota.",
    'Key each anonymous client on its own address, `f"ip:{request.client.host}"`.',
)
# the paid key in other letter case or with spaces around it: none of them is a key the check issued
_SPELLINGS = (
    "KESTREL-9054",
    " kestrel-9054",
    "Kestrel-9054",
    "kestrel-9054 ",
    "\tkestrel-9054",
    "kESTREL-9054",
    "KESTREL-9054\t",
)


async def _no_upgrade(world: _World) -> None:
    made_up = _Client(
        "a client at 203.0.113.31 sending a new made-up X-API-Key with each request",
        "203.0.113.31",
        made_up=True,
    )
    header = _Client(
        "a client at 203.0.113.32 with no key and `X-Plan: paid`", "203.0.113.32", plan_header="paid"
    )
    free = _Client("the free key with `X-Plan: paid`", "198.51.100.11", _FREE_KEY, plan_header="paid")
    spelled = _Client(
        "a client at 203.0.113.33 sending the paid key in other letter case or with spaces around it "
        f"({', '.join(repr(s) for s in _SPELLINGS[:3])} …)",
        "203.0.113.33",
        spellings=_SPELLINGS,
    )
    bursts = await world.rounds((made_up, 14), (spelled, 14), (header, 14), (free, 14))
    expected = f"{_FREE.limit} of 14 admitted (the free quota, {_per(_FREE)})"
    made_up_burst, spelled_burst, header_burst, free_burst = bursts
    expect(
        made_up_burst.admitted == _FREE.limit,
        f"{made_up.label}: {expected}, all counted on its address",
        str(made_up_burst),
        *(
            _SHORT_HINTS_6_4
            if made_up_burst.admitted < _FREE.limit
            else (
                "A key you never issued is no key: anyone can make one up, and a client that sends a new "
                "one with every request gets a new quota each time (the lesson's section 6 measured it).",
                "Use the key only when it is in `plans`; otherwise the client is anonymous: "
                '`f"ip:{request.client.host}"`, on the free plan.',
            )
        ),
    )
    expect(
        spelled_burst.admitted == _FREE.limit,
        f"{spelled.label}: {expected}, all counted on its address: not keys you issued",
        str(spelled_burst),
        *(
            _SHORT_HINTS_6_4
            if spelled_burst.admitted < _FREE.limit
            else (
                "A key counts only when it is exactly one you issued (as in exercise 6.3): "
                "'KESTREL-9054' or ' kestrel-9054' is another string, which you never issued. "
                "Forgiving its spelling gives the paid plan to near-guesses, and counting on the header "
                "as sent gives each spelling a quota of its own.",
                "Look the header up as it was sent, `plans.get(api_key)`, with no `.lower()` or "
                "`.strip()`, and count on that same key; a key not in `plans` is anonymous: "
                '`f"ip:{request.client.host}"`, on the free plan.',
            )
        ),
    )
    for burst in (header_burst, free_burst):
        expect(
            burst.admitted == _FREE.limit,
            f"{burst.client.label}: {expected}",
            str(burst),
            *(
                _SHORT_HINTS_6_4
                if burst.admitted < _FREE.limit
                else (
                    "The plan belongs to the key, and the service keeps it (`plans`): a header says "
                    "whatever the client writes, so `X-Plan: paid` would sell the paid plan for nothing.",
                    "Take the plan only from `plans.get(api_key)`; ignore `X-Plan` and any other header "
                    "that claims a plan.",
                )
            ),
        )


async def _separate(world: _World) -> None:
    nat = "198.51.100.40"  # one address for everyone behind a NAT or a corporate proxy
    heavy = _Client(f"the free key, from {nat}", nat, _FREE_KEY)
    (hammered,) = await world.rounds((heavy, 10))
    others = await world.rounds(
        (_Client(f"another free key, from {nat}", nat, _FREE_KEY_2), 5),
        (_Client(f"an anonymous client at {nat}", nat), 5),
        (_Client(f"the paid key, from {nat}", nat, _PAID_KEY), 14),
    )
    bursts = [hammered, *others]
    admitted = [b.admitted for b in bursts]
    if admitted == [_FREE.limit, _FREE.limit, _FREE.limit, _PAID.limit]:
        return
    counted = [{c.key for c in world.calls_of(b.client)} for b in bursts]
    if admitted[0] == _FREE.limit and admitted[1:3] == [0, 0] and counted[0] & counted[3]:
        hints = [
            "Every client from one address shared one count: the clients behind a NAT or a company's "
            "proxy share an address, and the free key's refusals used up the others' quotas.",
            "Count an issued key on the key, `key:<API key>`, wherever it connects from; only an "
            "anonymous client is counted on its address.",
        ]
    elif admitted[0] == _FREE.limit and admitted[1:3] == [0, 0]:
        hints = [
            "Every client on the free plan shared one count: once the free key had used it up, the "
            "other free clients were refused without having sent anything over their limit.",
            "Key the count on the client (`key:<API key>` or `ip:<address>`), not on the plan: the plan "
            "sets the limit, the client owns the count (the plan may be part of the key, not all of it).",
        ]
    else:
        hints = [
            "Each client's count is its own: one client's requests, refused ones included, must not touch "
            "another's.",
            _LOOKUP_HINT,
        ]
    raise Mismatch(
        f"after the free key's 10 requests (3 admitted), another free key and an anonymous client "
        f"{_FREE.limit} each of 5, the paid key {_PAID.limit} of 14, all from {nat}",
        _admitted(bursts),
        hints,
    )


async def _plan_change(world: _World) -> None:
    before = await world.rounds(
        (_Client("the free key", "198.51.100.11", _FREE_KEY), 14),
        (_Client("the paid key", "198.51.100.12", _PAID_KEY), 14),
        (_Client("a paid key", "198.51.100.14", _REVOKED_KEY), 14),
    )
    _expect_quotas(world, before, (_FREE, _PAID, _PAID), ", in a first window, before the plans change")
    world.plans[_FREE_KEY], world.plans[_PAID_KEY], world.plans[_NEW_KEY] = "paid", "free", "paid"
    del world.plans[_REVOKED_KEY]
    world.limiter.now += _NEXT_WINDOWS
    after = await world.rounds(
        (_Client("the free key, upgraded to paid", "198.51.100.11", _FREE_KEY), 14),
        (_Client("the paid key, downgraded to free", "198.51.100.12", _PAID_KEY), 14),
        (_Client("a key issued since, on the paid plan", "198.51.100.13", _NEW_KEY), 14),
        (_Client("the paid key revoked since", "198.51.100.14", _REVOKED_KEY), 14),
    )
    wanted = (_PAID, _FREE, _PAID, _FREE)
    admitted = [b.admitted for b in after]
    if admitted == [q.limit for q in wanted]:
        return
    if admitted == [_FREE.limit, _PAID.limit, _FREE.limit, _PAID.limit]:
        hints = [
            "The plans were read once, when the dependency was made, and the service's changes since were "
            "ignored: an upgrade, a downgrade, a new customer, a revoked key.",
            "Look the key up in `plans` on each request, `plans.get(api_key)`: not in a copy, a set of "
            "keys or a table of quotas built in advance, nor through a cache.",
        ]
    else:
        hints = [
            "A plan is the one `plans` gives when the request arrives: the check changed the mapping, "
            "then sent its requests in the next window.",
            _LOOKUP_HINT,
        ]
    raise Mismatch(
        "in the next window, after the plans changed: "
        + "; ".join(
            f"{b.client.label}: {q.limit} of 14 admitted" for b, q in zip(after, wanted, strict=True)
        ),
        _admitted(after),
        hints,
    )


_CEIL_HINT = "`str(max(1, math.ceil(decision.reset_after)))`: rounded up, and never 0."
_NEAR_EDGE = 0.25  # seconds left in a window at the check's near-edge refusals
_TRIES = 3  # a refusal that took the wait is sent again: a sleep takes it every time, a busy machine not


async def _at_once(world: _World) -> None:
    paid = _Client("the paid key", "198.51.100.12", _PAID_KEY)
    free = _Client("the free key", "198.51.100.11", _FREE_KEY)
    for client, quota in ((paid, _PAID), (free, _FREE)):
        world.limiter.now = _START + quota.window - _NEAR_EDGE  # the window's last quarter second
        (burst,) = await world.rounds((client, quota.limit + 1))
        expect(
            bool(burst.refusals),
            f"{client.label}, over its quota, refused with 429",
            str(burst),
            "A client over its plan's quota is refused: when `not decision.allowed`, raise "
            "`HTTPException(429, …)`.",
            _LOOKUP_HINT,
        )
        refusal = burst.refusals[0]
        expected = (
            f"{client.label}'s request {quota.limit + 1}, over its quota ({_per(quota)}) with "
            f"{_NEAR_EDGE:g} s left in its window: refused at once, the limiter asked once"
        )
        expect(
            refusal.asked <= 1,
            expected,
            f"the limiter asked {refusal.asked} times for that one request",
            "A refusal comes at once: waiting for the quota to free up and asking the limiter again "
            "holds the request open on the server, the load the limit is there to shed, and each call "
            "of the limiter counts the request once more. The client does the waiting, told how long by "
            "Retry-After.",
            "Ask the limiter once per request; when `not decision.allowed`, raise "
            '`HTTPException(429, "rate limit exceeded", headers={"Retry-After": …})` right away, with '
            "no `asyncio.sleep` in the dependency.",
        )
        wait = refusal.decision.reset_after if refusal.decision is not None else _NEAR_EDGE
        took = [refusal.seconds]
        while len(took) < _TRIES and took[-1] >= wait:  # the same request again, on the same clock
            (again,) = await world.rounds((client, 1))
            took += [r.seconds for r in again.refusals] or [0.0]
        expect(
            len(took) < _TRIES or took[-1] < wait,
            expected,
            f"each of {_TRIES} refusals took {min(took):.2f} s or more, the {wait:g} s until the quota "
            "frees up: the dependency waited before refusing",
            "A refusal comes at once: a dependency that sleeps before refusing holds the request open on "
            "the server, the load the limit is there to shed. The client does the waiting, told how long "
            "by Retry-After.",
            "When `not decision.allowed`, raise `HTTPException(429, …)` right away, with `Retry-After`: "
            "no `asyncio.sleep` in the dependency.",
        )


def _expect_retry_after(burst: _Burst, quota: _Quota) -> None:
    for refusal in burst.refusals:
        decision, response = refusal.decision, refusal.response
        if decision is None:  # refused without asking the limiter: the steps above name that
            continue
        left = decision.reset_after
        want = max(1, math.ceil(left))
        expected = (
            f"Retry-After: {want}, for {burst.client.label} ({_per(quota)}): the {left:g} s until its "
            "quota frees up, rounded up"
        )
        value = response.header("retry-after")
        if value is None:
            raise Mismatch(
                expected,
                "a 429 with no Retry-After header",
                [
                    "Without Retry-After a client retries at once, and its refusals become the load.",
                    'Pass it in the exception: `HTTPException(429, …, headers={"Retry-After": …})`. '
                    + _CEIL_HINT,
                ],
            )
        if not re.fullmatch(r"[0-9]+", value):
            raise Mismatch(
                expected,
                f"Retry-After: {short(value)}: not a whole number of seconds (delta-seconds are digits only)",
                ["Round the time left up to whole seconds.", _CEIL_HINT],
            )
        seconds = int(value)
        if seconds == 0:
            raise Mismatch(
                expected,
                "Retry-After: 0, which tells the client to retry at once, and be refused again",
                ["Round the time left up, to at least one second: `math.ceil`, not `int()`.", _CEIL_HINT],
            )
        expect(
            seconds >= want,
            expected,
            f"Retry-After: {seconds}: rounded down, so the client comes back before its quota frees up",
            "Round up: `math.ceil`, not `int()` or `round()`.",
            _CEIL_HINT,
        )
        expect(
            not (seconds == want + 1 and left == want),
            expected,
            f"Retry-After: {seconds}: a second more than the {left:g} s left, which is already a whole "
            "number",
            f"Rounding up leaves a whole number as it is: {left:g} s to wait is {want}; a client told "
            f"{seconds} waits a second longer than it must.",
            _WHOLE_HINT,
            _CEIL_HINT,
        )
        expect(
            seconds <= quota.window,
            expected,
            f"Retry-After: {seconds}: longer than the plan's whole window, within which its quota frees up",
            "Retry-After is the time until this client's quota frees up, from its own plan's window: not "
            "another plan's window, nor milliseconds.",
            _CEIL_HINT,
        )
        expect(
            seconds == want,
            expected,
            f"Retry-After: {seconds}: "
            + (
                "the plan's whole window, not the time left in it"
                if seconds == quota.window
                else "longer than the client must wait"
            ),
            "Retry-After is the time left until this client's quota frees up, `decision.reset_after`, "
            "rounded up: no more, or the client waits for nothing.",
            _CEIL_HINT,
        )


async def _retry_after(world: _World) -> None:
    free = _Client("the free key", "198.51.100.11", _FREE_KEY)
    paid = _Client("the paid key", "198.51.100.12", _PAID_KEY)
    world.limiter.now = _START + 12.5  # 17.5 s left in the free window, 7.5 s in the paid one
    bursts = await world.rounds((free, _FREE.limit + 1), (paid, _PAID.limit + 1))
    world.limiter.now = _START + 17  # a whole number of seconds left in the paid window: 3
    bursts += await world.rounds((paid, 1))
    world.limiter.now = _START + 19.75  # the paid window's last quarter second
    bursts += await world.rounds((paid, 1))
    world.limiter.now = _START + 27  # a whole number of seconds left in the free window: 3
    bursts += await world.rounds((free, 1))
    world.limiter.now = _START + 29.75  # the free window's last quarter second
    bursts += await world.rounds((free, 1))
    for burst in bursts:
        expect(
            bool(burst.refusals),
            f"{burst.client.label}, over its quota, refused with 429",
            str(burst),
            "A client over its plan's quota is refused: when `not decision.allowed`, raise "
            "`HTTPException(429, …)`.",
            _LOOKUP_HINT,
        )
        _expect_retry_after(burst, _FREE if burst.client.key == _FREE_KEY else _PAID)


def check_plan_quotas(plan_limit: Callable[..., Any]) -> None:
    """Check Exercise 6.4: each client gets its plan's quota, counted in the store two instances share.

    Builds two instances of a service, each an app whose ``GET /search`` depends on
    ``plan_limit(limiter, plans, quotas)`` (called once per instance) and which has a Redis client of its
    own in ``app.state.redis``, both on one store. ``limiter`` is the check's: the notebook's
    ``SharedWindow`` on the check's clock, recording each call. ``plans`` are the check's issued keys
    (two free, two paid), ``quotas`` free 3 per 30 s and paid 12 per 20 s. Requests alternate between the
    instances, sent through ASGI, and each client's admitted requests are counted: a free key 3 of 8 and
    a paid key 12 of 20, each request counted once with its plan's quota; two anonymous clients 3 of 14
    each, keyed on their addresses; a new made-up key with every request, the paid key in other letter
    case or with spaces around it (not issued keys: anonymous), ``X-Plan: paid`` with no key, and the
    free key with ``X-Plan: paid``, 3 of 14 each; from one address, after the free key's 10 requests,
    another free key and an anonymous client 3 of 5 each and the paid key 12 of 14; after the check
    changes the plans (an upgrade, a downgrade, a new key, a revoked one) and moves its clock to the
    next window, each client its new plan's quota; a refusal with 0.25 s left in the window comes at
    once, from one call of the limiter (a refusal that took the 0.25 s of real time is sent again, and
    only one that takes it three times is a wait); and each 429's ``Retry-After`` the time left rounded
    up (17.5, 7.5, 3 and 0.25 s left: 18, 8, 3 and 1).
    """
    with exercise("6.4", "Quotas per plan, on a shared store", SOLUTION) as ex:
        expect(callable(plan_limit), "the function `plan_limit`", short(plan_limit), _CALL_6_4)
        ex.require(
            "plan_limit(limiter, plans, quotas) gives a dependency",
            lambda: _instance(plan_limit, _PlanLimiter(), _plans(), _quotas(), None),
        )
        if not ex.step(
            f"a free key gets the free quota ({_per(_FREE)}) and a paid key the paid one ({_per(_PAID)}), "
            "across two instances sharing one store",
            lambda: _with_world(plan_limit, _plan_quotas, "plans"),
        ):
            return
        ex.step(
            "a client with no key gets the free quota, keyed on its address",
            lambda: _with_world(plan_limit, _anonymous, "anonymous"),
        )
        ex.step(
            "a made-up key, an issued key spelled otherwise, or an X-Plan header, buys no more than the "
            "free quota",
            lambda: _with_world(plan_limit, _no_upgrade, "made-up"),
        )
        ex.step(
            "one client's refusals leave other clients' quotas alone, behind one address too",
            lambda: _with_world(plan_limit, _separate, "separate"),
        )
        ex.step(
            "a changed plan, a new key and a revoked key count from the next window",
            lambda: _with_world(plan_limit, _plan_change, "plan-change"),
        )
        ex.step(
            "a request over its quota is refused at once, the limiter asked once",
            lambda: _with_world(plan_limit, _at_once, "at-once"),
        )
        ex.step(
            "each 429 has Retry-After: the seconds until the quota frees up, rounded up, at least 1",
            lambda: _with_world(plan_limit, _retry_after, "retry-after"),
        )
