"""Checks for chapter 5's exercises: caching strategies.

The checks count instead of timing: database reads, loads started, loads in flight at once, and the
keys, values and TTLs in Redis. Where a race is the point, the check orders it itself instead of
hoping for it: Exercise 5.1's database can hold a write half-done until the check has read in the
middle of it, or hold back the answer of a read that a writer makes after its commit until a second
writer is done, Exercise 5.2's loads wait on events the check sets, and Exercise 5.4's database can
pause a job's write half-way, fail it, or hold back the answer of a read until a job is done, so that
the outcome is the same on an idle laptop and on a loaded 2-core runner. The few waits that are
bounded by a clock (a load waiting for a second one to start) are a second or more, for something that
takes one turn of the event loop.

The learner's coroutines run on a fresh event loop in a thread of the check's own, bounded in time.
Exercises 5.1 and 5.4 use Redis keys under ``ex05:`` (cleared before and after each scenario, with any
other key the learner's code wrote) and clients of their own, closed before the check returns.
Exercise 5.3 computes keys in two short-lived Python processes with other hash seeds.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import contextvars
import inspect
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import types
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio
import redis.exceptions

from support.backends import delete_keys, redis_client
from support.checks import Mismatch, exercise, expect
from support.checks.running import NoReturn, in_fresh_loop, short

__all__ = ["check_cache_aside", "check_coalescer", "check_profile_cache", "check_recommendations_key"]

SOLUTION = "solutions/05_caching_exercises.ipynb"
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------
# Plumbing shared by the checks
# ---------------------------------------------------------------------------------------------------


def _quiet_loop() -> None:
    """Keep asyncio's "Task exception was never retrieved" (from a wrong answer) out of the output."""
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)


class _Hung(Mismatch):
    """The learner's code did not return in time: the later steps would only hang again."""


def _late(late: NoReturn, what: str, *hints: str) -> Mismatch:
    return _Hung(
        what,
        f"no return within {late.seconds:g} s"
        + (" (and it still holds its thread: restart the kernel)" if late.stuck else ""),
        hints,
    )


def _watch(hangs: list[str], scenario: Callable[[], object]) -> Callable[[], None]:
    """``scenario``, noting in ``hangs`` when it did not return in time."""

    def watched() -> None:
        try:
            scenario()
        except _Hung:
            hangs.append("no return")
            raise

    return watched


# ---------------------------------------------------------------------------------------------------
# Exercise 5.1: cache-aside, invalidated on write
# ---------------------------------------------------------------------------------------------------

_NAMESPACE = "ex05:*"
_ID = 7
_PRODUCT = {"id": _ID, "name": "desk lamp", "price_cents": 1999}
_OTHER_ID = 8
_OTHER = {"id": _OTHER_ID, "name": "office chair", "price_cents": 8999}
_OTHER_PRICE = 9499
_NEW_PRICE = 2499
_MISSING = 404
_KEY = re.compile(rf"ex05:product:v\d+:{_ID}")
_KEY_SHOWN = f"ex05:product:v1:{_ID}"
_MAX_TTL = 86_400
_WRITES = frozenset({"SET", "SETEX", "PSETEX", "SETNX", "GETSET", "APPEND", "HSET", "HMSET"})
_DELETES = frozenset({"DEL", "UNLINK"})
_STORE_HINT = "`await redis.set(key, json.dumps(product), ex=TTL_SECONDS)`, after reading the database."
_AGED_TTL = 100  # what the check leaves of an entry's TTL, as if it had been cached a while ago
_SECOND_PRICE = 2999
_UNTIL_SECOND = 2.0  # how long the first of two writers is held for the second (done in ~50 ms)
_WRITER: contextvars.ContextVar[str | None] = contextvars.ContextVar("ex05_writer", default=None)
_DELETE_AFTER_HINT = (
    "`await db.write(product_id, price_cents)` first, then `await redis.delete(product_key(product_id))`."
)


class _CheckDatabase:
    """The notebook's ``ProductDatabase``, for the check: 20 ms a read, counted per product.

    ``hold``, when set to an event, pauses every write in the middle (before it commits) until the
    event is set; ``writing`` is set as soon as a write begins; ``first_committed`` once the write of
    the update that the check runs as the first of two writers (``_WRITER``) has committed.
    ``slow_reads``, when set to an event, slows a read that the first writer makes after its commit:
    it reads the row at once, sets ``slowed``, and answers only when the event is set (a read whose
    answer is delayed on its way back).
    """

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {_ID: dict(_PRODUCT), _OTHER_ID: dict(_OTHER)}
        self.reads: Counter[int] = Counter()
        self.hold: asyncio.Event | None = None
        self.writing = asyncio.Event()
        self.first_committed = asyncio.Event()
        self.slow_reads: asyncio.Event | None = None
        self.slowed = asyncio.Event()

    async def read(self, product_id: int) -> dict[str, Any] | None:
        self.reads[product_id] += 1
        if self.slow_reads is not None and _WRITER.get() == "first" and self.first_committed.is_set():
            row = self.rows.get(product_id)
            answer = dict(row) if row is not None else None
            self.slowed.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.slow_reads.wait(), _UNTIL_SECOND)
            return answer
        await asyncio.sleep(0.02)
        row = self.rows.get(product_id)
        return dict(row) if row is not None else None

    async def write(self, product_id: int, price_cents: int) -> None:
        self.writing.set()
        await asyncio.sleep(0.02)
        if self.hold is not None:
            await self.hold.wait()
        self.rows[product_id]["price_cents"] = price_cents  # committed when this returns
        if _WRITER.get() == "first":
            self.first_committed.set()

    def price(self, product_id: int) -> int:
        return int(self.rows[product_id]["price_cents"])


def _note(scene: _Scene | _ProfileScene, args: tuple[Any, ...]) -> None:
    """Note the key a command of the learner's code writes or deletes, and who ran it (``_WRITER``)."""
    command = str(args[0]).upper() if args else ""
    keys = [a.decode("utf-8", "replace") if isinstance(a, bytes) else a for a in args[1:]]
    keys = [k for k in keys if isinstance(k, str)]
    writer = _WRITER.get()
    if command in _WRITES and keys:
        scene.written.append(keys[0])
        scene.writes_by.append((keys[0], writer))
    elif command in ("MSET", "MSETNX"):
        scene.written.extend(keys[::2])
        scene.writes_by.extend((key, writer) for key in keys[::2])
    elif command in _DELETES:
        scene.deleted.extend(keys)
    if writer is not None and command:
        scene.by_writer.add(command)


def _instrument(client: redis.asyncio.Redis, scene: _Scene | _ProfileScene) -> None:
    """Note the keys the learner's code writes and deletes through ``client``, commands and pipelines
    alike, and hold the first of two writers' Redis calls after its commit (``_Scene.gate``)."""
    execute = client.execute_command

    def recording(*args: Any, **options: Any) -> Coroutine[Any, Any, Any]:
        command = str(args[0]).upper() if args else ""
        if command in _DELETES:
            scene.delete_calls += 1  # counted when called: awaited or not

        async def run() -> Any:
            _note(scene, args)
            await scene.gate()
            return await execute(*args, **options)

        return run()

    client.execute_command = recording  # type: ignore[method-assign]
    make_pipeline = client.pipeline  # a pipeline writes its batch to the connection directly

    def pipeline(*args: Any, **options: Any) -> Any:
        pipe = make_pipeline(*args, **options)
        run = pipe.execute

        async def execute_batch(*run_args: Any, **run_options: Any) -> Any:
            for queued, _ in list(pipe.command_stack):
                _note(scene, queued)
            await scene.gate()
            return await run(*run_args, **run_options)

        pipe.execute = execute_batch
        return pipe

    client.pipeline = pipeline  # type: ignore[method-assign]


@dataclass
class _Entry:
    """One key the learner's code wrote, as Redis holds it."""

    key: str
    kind: str  # Redis's TYPE: string, hash, …
    raw: bytes | None  # the value, for a string
    ttl: int  # -1: no expiry


@dataclass
class _Scene:
    redis: redis.asyncio.Redis  # the learner's: answers str
    raw: redis.asyncio.Redis  # the check's own: answers bytes
    db: _CheckDatabase
    get_product: Callable[..., Any]
    update_price: Callable[..., Any]
    written: list[str] = field(default_factory=list)
    writes_by: list[tuple[str, str | None]] = field(default_factory=list)  # each key written, and by whom
    deleted: list[str] = field(default_factory=list)
    by_writer: set[str] = field(default_factory=set)  # the commands run by update_price
    delete_calls: int = 0  # DEL and UNLINK called, whether or not they ran
    second_done: asyncio.Event | None = None  # set: the first writer's held calls go on

    async def gate(self) -> None:
        """Hold a Redis call of the first of two writers, made after its commit, until the second is done."""
        if _WRITER.get() == "first" and self.second_done is not None and self.db.first_committed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.second_done.wait(), _UNTIL_SECOND)

    async def get(self, product_id: int) -> Any:
        result = self.get_product(self.redis, self.db, product_id)
        expect(
            inspect.isawaitable(result),
            "an awaitable: `get_product` defined with `async def`",
            f"a plain function that returned {short(result)}",
            "It awaits Redis and the database, so it must be `async def get_product(…)`.",
        )
        return await result

    async def update(self, product_id: int, price_cents: int) -> None:
        result = self.update_price(self.redis, self.db, product_id, price_cents)
        expect(
            inspect.isawaitable(result),
            "an awaitable: `update_price` defined with `async def`",
            f"a plain function that returned {short(result)}",
            "It awaits the database and Redis, so it must be `async def update_price(…)`.",
        )
        await result

    async def entries(self) -> list[_Entry]:
        """The keys the learner's code wrote that still exist."""
        found = []
        for key in dict.fromkeys(self.written):
            kind = await self.raw.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind == "none":
                continue
            raw = await self.raw.get(key) if kind == "string" else None
            found.append(_Entry(key, kind, raw, await self.raw.ttl(key)))
        return found


def _scenario(
    get_product: Callable[..., Any],
    update_price: Callable[..., Any],
    body: Callable[[_Scene], Awaitable[T]],
    name: str,
) -> T:
    """Run ``body`` on a fresh loop with a fresh database, clients of the check's own, and clean keys."""

    async def main() -> T:
        _quiet_loop()
        client = redis_client(decode_responses=True)
        raw = redis_client()
        scene = _Scene(client, raw, _CheckDatabase(), get_product, update_price)
        _instrument(client, scene)
        try:
            await delete_keys(raw, _NAMESPACE)
            return await body(scene)
        finally:
            try:
                outside = [k for k in set(scene.written) if not k.startswith("ex05:")]
                if outside:
                    await raw.delete(*outside)
                await delete_keys(raw, _NAMESPACE)
            finally:
                await client.aclose()
                await raw.aclose()

    try:
        return in_fresh_loop(main, timeout=5, name=f"check-5.1-{name}")
    except NoReturn as late:
        raise _late(
            late,
            "get_product and update_price to return within a second or so",
            "Does your code wait for something that never comes (a lock, an event, a loop that "
            "never ends)? Each function makes a few Redis calls and at most one database call.",
        ) from None
    except redis.exceptions.DataError as refused:
        raise Mismatch(
            "a value Redis can store: the product as a JSON string",
            f"redis-py refused it: {refused}",
            [
                "Redis stores strings and bytes, not dicts or None: serialise the product first.",
                _STORE_HINT + " A missing product (None) is not stored at all: `if product is not None:`.",
            ],
        ) from None
    except UnicodeDecodeError:
        raise Mismatch(
            "the cached value read back as text (the client answers str)",
            "reading it failed: it is not UTF-8 text, so it was not stored as JSON (a pickle?)",
            ["Store JSON, `json.dumps(product)`, and read it back with `json.loads(cached)`."],
        ) from None


@dataclass
class _FirstRead:
    value: Any = None
    reads: int = 0
    entries: list[_Entry] = field(default_factory=list)

    def entry(self) -> _Entry | None:
        """The entry under the expected key, else the first one written."""
        named = [e for e in self.entries if _KEY.fullmatch(e.key)]
        return (named or self.entries or [None])[0]


def _first_read(get_product: Callable[..., Any], update_price: Callable[..., Any], run: _FirstRead) -> None:
    async def body(scene: _Scene) -> None:
        run.value = await scene.get(_ID)
        run.reads = scene.db.reads[_ID]
        run.entries = await scene.entries()

    _scenario(get_product, update_price, body, "first-read")
    expect(
        run.value == _PRODUCT,
        f"the product, {_PRODUCT}",
        short(run.value),
        "On a miss, read the database, `product = await db.read(product_id)`, and return what it gave.",
    )
    expect(
        run.reads == 1,
        "1 database read for a first call, with nothing cached yet",
        f"{run.reads}",
        "Read the database once, on a miss: `product = await db.read(product_id)`.",
    )


def _check_key(run: _FirstRead) -> None:
    expect(
        run.entries,
        "the product stored in Redis by the first call (a miss)",
        "no key written by get_product was there afterwards",
        "Cache-aside fills the cache on a miss: after reading the database, store what you read.",
        _STORE_HINT,
    )
    keys = [e.key for e in run.entries]
    expect(
        any(_KEY.fullmatch(key) for key in keys),
        f"the product cached under {_KEY_SHOWN!r}: the namespace ex05:product, a version, the id",
        f"written: {', '.join(repr(k) for k in keys)}",
        "A key without a namespace collides with everything else cached in the same Redis (user 7, "
        "order 7) and cannot be found or cleared as a family; without a version, a change to what is "
        "cached meets old entries written in the old shape.",
        '`product_key` returns `f"ex05:product:v1:{product_id}"`, and both functions use it.',
    )


def _check_json(run: _FirstRead) -> None:
    entry = run.entry()
    assert entry is not None
    expect(
        entry.kind == "string",
        f"a JSON string under {entry.key!r}",
        f"a Redis {entry.kind}",
        "Store the whole product as one JSON string: one GET reads it back, nested values and types "
        "included. " + _STORE_HINT,
    )
    raw = entry.raw or b""
    if raw.startswith(b"\x80"):
        raise Mismatch(
            f"JSON under {entry.key!r}",
            f"a pickle, {short(raw, 40)}",
            [
                "Unpickling runs code: whoever can write to this Redis could run theirs in every service "
                "that reads the cache; and a pickle of an old version of a class breaks the new one.",
                "`json.dumps(product)` to store, `json.loads(cached)` to read back.",
            ],
        )
    try:
        value = json.loads(raw)
    except ValueError:
        repr_like = raw.startswith(b"{'")
        raise Mismatch(
            f"JSON under {entry.key!r}",
            f"{short(raw, 60)}: not JSON" + (" but Python's repr, `str(product)`" if repr_like else ""),
            [
                "Another service (or another version of this one) must be able to read it back: store JSON.",
                "`json.dumps(product)` to store, `json.loads(cached)` to read back.",
            ],
        ) from None
    expect(
        value == _PRODUCT,
        f"the product as JSON under {entry.key!r}: {json.dumps(_PRODUCT)}",
        short(raw, 80),
        "Cache exactly what the database gave: `json.dumps(product)`.",
    )


def _check_ttl(run: _FirstRead) -> None:
    entry = run.entry()
    assert entry is not None
    expect(
        entry.ttl != -1,
        "the entry to expire on its own: a TTL of at most a day",
        f"{entry.key!r} has no TTL: if an invalidation is ever missed (a write by another service, a "
        "crash between the write and the delete), it serves the old value for ever",
        "Every cache entry gets a TTL, even a long one: it bounds how long a missed invalidation lasts.",
        _STORE_HINT,
    )
    expect(
        0 < entry.ttl <= _MAX_TTL,
        "the entry to expire on its own: a TTL of at most a day",
        f"a TTL of {entry.ttl:,} s (about {entry.ttl / _MAX_TTL:,.0f} days): a missed invalidation would "
        "serve the old value that long",
        "A TTL is the longest you accept a stale page: minutes for a price, not weeks.",
        "`ex=TTL_SECONDS` with `TTL_SECONDS = 300`, say.",
    )


async def _hit(scene: _Scene) -> None:
    await scene.get(_ID)
    second = await scene.get(_ID)
    reads = scene.db.reads[_ID]
    expect(
        reads == 1,
        "1 database read for two calls: the second served from Redis",
        f"{reads} reads: the second call read the database again",
        "Look in Redis first: `cached = await redis.get(key)`; if it is not None, return "
        "`json.loads(cached)` without touching the database.",
    )
    expect(
        second == _PRODUCT,
        f"the second call (a hit) to return the product, {_PRODUCT}",
        short(second),
        "Decode what Redis gives back: `return json.loads(cached)`.",
    )


async def _missing(scene: _Scene) -> None:
    values = [await scene.get(_MISSING), await scene.get(_MISSING)]
    expect(
        values == [None, None],
        f"None for a product that does not exist (id {_MISSING}), twice",
        f"{short(values[0])}, then {short(values[1])}",
        "`db.read` gives None for a product that does not exist: return None, whether or not you cache that.",
    )
    forever = [e for e in await scene.entries() if e.ttl == -1]
    if forever:
        entry = forever[0]
        raise Mismatch(
            f"nothing cached for ever about product {_MISSING}, which does not exist",
            f"{entry.key!r} = {short(entry.raw, 30)} with no TTL: if the product is created later, the "
            "page says it does not exist until someone deletes the key by hand",
            [
                "Decide on purpose: either do not cache a missing product (`if product is not None:`), "
                "or cache the miss with a short TTL.",
            ],
        )


def _stale_seen(scene: _Scene, after: Any, key: str | None) -> str:
    price = after.get("price_cents") if isinstance(after, dict) else after
    seen = f"price_cents {short(price)}: the cache still held the old price"
    deleted = list(dict.fromkeys(scene.deleted))
    if not deleted and scene.delete_calls:
        return seen + ": update_price called redis.delete without `await`, so it never ran"
    if not deleted:
        return seen + ", and update_price deleted no key"
    if key and key not in deleted:
        named = ", ".join(map(repr, deleted))
        return seen + f"; update_price deleted {named}, but it is cached under {key!r}"
    return seen


def _read_elsewhere(scene: _Scene) -> Any:
    """get_product on another instance (a loop and a client of its own), while this loop is held.

    Right after update_price returns, nothing it left running on this loop (a task not awaited) can
    land before that read: as when the next request goes to another process of the service.
    """

    async def main() -> Any:
        _quiet_loop()
        client = redis_client(decode_responses=True)
        _instrument(client, scene)
        try:
            return await scene.get_product(client, scene.db, _ID)
        finally:
            await client.aclose()

    return in_fresh_loop(main, timeout=3, name="check-5.1-other-instance")


def _price_of(value: Any) -> Any:
    return value.get("price_cents") if isinstance(value, dict) else value


async def _update(scene: _Scene) -> None:
    await scene.get(_ID)
    key = next((k for k in scene.written if _KEY.fullmatch(k)), scene.written[0] if scene.written else None)
    await scene.update(_ID, _NEW_PRICE)
    if (held := scene.db.price(_ID)) != _NEW_PRICE:
        await asyncio.sleep(0.2)  # a write left running commits now: seen only to name the flaw
        raise Mismatch(
            f"update_price to write price_cents {_NEW_PRICE} to the database before it returns",
            f"the database still held {held} when update_price returned"
            + (
                "; the write committed only later (a task that nobody awaited)"
                if scene.db.price(_ID) == _NEW_PRICE
                else ""
            ),
            [
                "`await db.write(product_id, price_cents)`: the database is the source of truth, and "
                "update_price is done when the write has committed.",
            ],
        )
    deleted_by_then = len(scene.deleted)
    elsewhere = _read_elsewhere(scene)  # holds this loop: what update_price left running waits
    await asyncio.sleep(0.05)  # and lands now: seen only to name the flaw, the verdict is above
    expect(
        _price_of(elsewhere) == _NEW_PRICE or len(scene.deleted) == deleted_by_then,
        f"a read right after update_price returned, on another instance, to get the new price, {_NEW_PRICE}",
        f"price_cents {short(_price_of(elsewhere))}: the entry was still cached when update_price returned; "
        "its delete reached Redis only later (a task that nobody awaited)",
        "update_price is done when the entry is gone: the next request may come a moment later, on "
        "another instance of the service.",
        "Await the delete in update_price itself: " + _DELETE_AFTER_HINT,
    )
    after = await scene.get(_ID)
    if _price_of(after) != _NEW_PRICE:
        missed = bool(scene.deleted) and key not in scene.deleted
        raise Mismatch(
            f"the next read after update_price to return the new price, {_NEW_PRICE}",
            _stale_seen(scene, after, key),
            [
                "update_price must delete the very key that get_product stores the product under.",
                "Build the key in one place, `product_key(product_id)`, and use it in both functions.",
            ]
            if missed
            else [
                "Calling an async method only creates a coroutine; nothing is sent to Redis until it is "
                "awaited.",
                "`await redis.delete(product_key(product_id))`, after the write.",
            ]
            if scene.delete_calls and not scene.deleted
            else [
                "The write went to the database only: the cache keeps serving its copy until it expires.",
                "Invalidate on write: " + _DELETE_AFTER_HINT,
            ],
        )
    expect(
        _price_of(elsewhere) == _NEW_PRICE,
        f"a read right after update_price returned, on another instance, to get the new price, {_NEW_PRICE}",
        f"price_cents {short(_price_of(elsewhere))}: the entry was still cached when update_price returned",
        "update_price is done when the entry is gone: the next request may come a moment later, on "
        "another instance of the service.",
        "Await the delete in update_price itself: " + _DELETE_AFTER_HINT,
    )


async def _two_products(scene: _Scene) -> None:
    """Two products read one after the other, then the second one updated: an entry each."""
    await scene.get(_ID)
    before = len(scene.written)
    other = await scene.get(_OTHER_ID)
    keys = list(dict.fromkeys(scene.written))
    shared = other == _PRODUCT
    expect(
        other == _OTHER,
        f"product {_OTHER_ID}, read after product {_ID}: {_OTHER}",
        f"product {_ID}, {short(other)}: products {_ID} and {_OTHER_ID} shared one entry"
        + (f", {keys[0]!r}: the key does not depend on the id" if len(keys) == 1 else "")
        if shared
        else short(other),
        "A cache key holds everything the cached value depends on: here, which product it is. A key "
        "that leaves the id out serves every product the one that was cached first.",
        '`product_key` returns `f"ex05:product:v1:{product_id}"`, and both functions use it.',
    )
    key = next((k for k in scene.written[before:] if k.endswith(f":{_OTHER_ID}")), None)
    deleted_before = len(scene.deleted)
    await scene.update(_OTHER_ID, _OTHER_PRICE)
    deleted = list(dict.fromkeys(scene.deleted[deleted_before:]))
    updated, untouched = await scene.get(_OTHER_ID), await scene.get(_ID)
    expect(
        _price_of(updated) == _OTHER_PRICE,
        f"product {_OTHER_ID} at its new price, {_OTHER_PRICE}, after `update_price(…, {_OTHER_ID}, "
        f"{_OTHER_PRICE})`",
        f"price_cents {short(_price_of(updated))}: the cache still held its old price"
        + (
            f"; update_price deleted {', '.join(map(repr, deleted))}, but product {_OTHER_ID} is cached "
            f"under {key!r}"
            if deleted and key and key not in deleted
            else ""
        ),
        "update_price must delete the entry of the product it changed, whichever product that is.",
        "`await redis.delete(product_key(product_id))`, with the `product_id` that update_price was given.",
    )
    expect(
        untouched == _PRODUCT,
        f"product {_ID} as it was, {_PRODUCT}, after product {_OTHER_ID}'s update",
        short(untouched),
        f"An update to product {_OTHER_ID} changes product {_OTHER_ID} only: the key of each entry holds "
        "its product's id.",
    )


async def _ttl_kept(scene: _Scene) -> None:
    """A hit must not renew the TTL: the TTL is the bound on how long a missed invalidation lasts."""
    await scene.get(_ID)
    entries = await scene.entries()
    named = [e for e in entries if _KEY.fullmatch(e.key)] or entries
    expect(
        named, "the product cached by the first call", "no key written by get_product was there", _STORE_HINT
    )
    key = named[0].key
    await scene.raw.expire(key, _AGED_TTL)  # as if the entry had been cached a while ago
    reads = scene.db.reads[_ID]
    await scene.get(_ID)
    ttl = await scene.raw.ttl(key)
    how = (
        "the second call was no hit: it read the database and stored the entry again"
        if scene.db.reads[_ID] > reads
        else "reading the entry set its TTL again (GETEX, EXPIRE or a new SET)"
    )
    expect(
        ttl <= _AGED_TTL,
        f"a hit to leave the entry's TTL alone: {_AGED_TTL} s left before the hit, at most that after",
        f"{ttl:,} s after the hit: {how}, so a product read more often than once a TTL never expires",
        "TTL_SECONDS is the longest an entry may serve an old price if an invalidation is missed; a TTL "
        "that each hit renews no longer bounds that for a popular product.",
        "On a hit, only read: `cached = await redis.get(key)`; the TTL is set once, when the entry is "
        "stored.",
    )


async def _until(event: asyncio.Event, task: asyncio.Future[None]) -> None:
    """Wait (up to 2 s) until ``event`` is set or ``task`` is done; raise what the task raised."""
    waiting = asyncio.ensure_future(event.wait())
    await asyncio.wait([waiting, task], timeout=2, return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if task.done():
        task.result()  # raises what update_price raised


async def _two_updates(scene: _Scene, release: asyncio.Event, parked: asyncio.Event | None = None) -> None:
    """``update_price`` to _NEW_PRICE (the first writer), then, once its write has committed (and, with
    ``parked``, once it is held there), to _SECOND_PRICE (the second); ``release`` is set when the
    second is done, so that what the check holds of the first goes on."""

    async def as_writer(name: str, price: int) -> None:
        _WRITER.set(name)  # in this task only, and the tasks it starts
        await scene.update(_ID, price)

    first = asyncio.ensure_future(as_writer("first", _NEW_PRICE))
    try:
        await _until(scene.db.first_committed, first)
        if parked is not None:
            await _until(parked, first)
        await asyncio.wait_for(asyncio.ensure_future(as_writer("second", _SECOND_PRICE)), 3)
        release.set()
        await asyncio.wait_for(first, 3)
    finally:
        release.set()
        if not first.done():
            first.cancel()
        await asyncio.gather(first, return_exceptions=True)


_INVALIDATE_HINT = "Invalidate, do not update: " + _DELETE_AFTER_HINT
_REFILL_HINT = (
    "Leave the refill to the next get_product, and end update_price with the delete: " + _DELETE_AFTER_HINT
)


async def _two_writers(scene: _Scene) -> None:
    """Two updates at once; the first commits first, but its Redis calls after the commit land last."""
    await scene.get(_ID)  # cached: the old price
    scene.second_done = asyncio.Event()
    await _two_updates(scene, scene.second_done)
    after = await scene.get(_ID)
    wrote = scene.by_writer & _WRITES
    expect(
        _price_of(after) == scene.db.price(_ID) == _SECOND_PRICE,
        f"after two updates at once ({_NEW_PRICE}, then {_SECOND_PRICE}), the price the database holds, "
        f"{scene.db.price(_ID)}",
        f"price_cents {short(_price_of(after))}: "
        + (
            f"update_price wrote the price into the cache ({', '.join(sorted(wrote))}), and the first "
            "writer's copy landed after the second's"
            if wrote
            else "the first writer's Redis calls, landing after the second's, left its price cached"
        ),
        "Writing the new value into the cache (write-through) races: two writers can commit in one "
        "order and reach Redis in the other, and the older price then stays until the TTL. A delete "
        "gives the same result whichever lands last.",
        _INVALIDATE_HINT,
    )


async def _rewarm(scene: _Scene) -> None:
    """Two updates at once again; this time a read of the database that the first writer makes after
    its commit (to fill the cache again) answers only once the second writer is done."""
    await scene.get(_ID)  # cached: the old price
    scene.db.slow_reads = asyncio.Event()
    await _two_updates(scene, scene.db.slow_reads, parked=scene.db.slowed)
    cached = [e.key for e in await scene.entries() if _KEY.fullmatch(e.key)]
    after = await scene.get(_ID)
    refilled = sorted(scene.by_writer & _WRITES)
    how = (
        ("after its delete, " if scene.by_writer & _DELETES else "")
        + f"update_price read the product again and cached it (a re-warm): the first writer's read got "
        f"{_NEW_PRICE}, before the second writer's commit, and its {refilled[0] if refilled else ''} landed "
        "after the second writer's delete"
        if scene.db.slowed.is_set() and refilled
        else "a read of the database that the first writer made after its commit, slowed, left its price "
        "cached"
    )
    expect(
        _price_of(after) == scene.db.price(_ID) == _SECOND_PRICE,
        f"after two updates at once ({_NEW_PRICE}, then {_SECOND_PRICE}), the price the database holds, "
        f"{scene.db.price(_ID)}",
        f"price_cents {short(_price_of(after))}: {how}",
        "When update_price returns, the entry must be gone: filling it again there (a re-warm) stores "
        "what a read saw, and that read may have started before another writer's commit. Its older price "
        "then lands after that writer's delete and stays until the TTL.",
        _REFILL_HINT,
    )
    expect(
        not cached,
        "the entry gone once both updates have returned: the next read loads it from the database",
        f"{cached[0]!r} was cached again by update_price" if cached else "",
        "When update_price returns, the entry must be gone: filling it again there (a re-warm) races "
        "with other writers, who may commit between its read and its SET.",
        _REFILL_HINT,
    )


async def _race(scene: _Scene) -> None:
    """A read lands while the write is under way: with delete-before-write it refills the old price."""
    await scene.get(_ID)  # cached: the old price
    scene.db.hold = asyncio.Event()
    update = asyncio.ensure_future(scene.update(_ID, _NEW_PRICE))
    try:
        started = asyncio.ensure_future(scene.db.writing.wait())
        await asyncio.wait([started, update], timeout=2, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if update.done():
            update.result()  # raises what update_price raised
        expect(
            scene.db.writing.is_set(),
            "update_price to call db.write (the check pauses that write half-way)",
            "no call to db.write within 2 s",
            "`await db.write(product_id, price_cents)`.",
        )
        await scene.get(_ID)  # while the write is half-done
        scene.db.hold.set()
        await asyncio.wait_for(update, 2)
    finally:
        scene.db.hold.set()
        if not update.done():
            update.cancel()
        await asyncio.gather(update, return_exceptions=True)
    after = await scene.get(_ID)
    fresh = isinstance(after, dict) and after.get("price_cents") == _NEW_PRICE
    read_during = "a read during the write" + (
        " missed (the key was already deleted), read the old row, and cached it again"
        if scene.db.reads[_ID] > 1
        else ""
    )
    expect(
        fresh,
        f"the price {_NEW_PRICE} once update_price has returned, even with a read during the write",
        f"price_cents {short(after.get('price_cents') if isinstance(after, dict) else after)}: "
        f"{read_during}; nothing deleted it after the write, so it stays stale until the TTL",
        "Until the write commits, the database still holds the old row: a read that misses in "
        "between puts the old value straight back into the cache.",
        "Delete after the write: " + _DELETE_AFTER_HINT,
    )


def check_cache_aside(
    get_product: Callable[..., Awaitable[Any]], update_price: Callable[..., Awaitable[None]]
) -> None:
    """Check Exercise 5.1: cache-aside with JSON and a TTL, invalidated after the write.

    Each scenario runs on a fresh loop, with a database of the check's own (the notebook's
    ``ProductDatabase``: 20 ms a read, counted) holding products 7 and 8, and a Redis client of the check's
    own (``decode_responses=True``); keys under ``ex05:``, and any other key the answer wrote, are
    deleted before and after. A first call returns the product with one database read and stores it
    under ``ex05:product:v<n>:7`` as JSON with a TTL of at most a day; a second call reads nothing; a
    hit leaves the TTL alone (the check cuts it to 100 s first: a hit must not set it back up); a
    missing product gives None and is not cached for ever; after ``update_price`` the next read has the
    new price, also on another instance (a loop of its own, run while the check's loop is held, so a
    delete left in a task nobody awaited has not landed); product 8 read after product 7 must be product
    8, and after its update have its new price while product 7 keeps its own (rejects a key that leaves
    out the id); a read made while the write is half-done
    (the check pauses it) must not leave the old price cached once ``update_price`` returns, which
    rejects deleting before writing; and of two updates at once, the first to commit has its Redis
    calls after the commit held until the second is done: the newer price must be what a read gets,
    which rejects writing the new value into the cache instead of deleting it. Then two updates at once
    again, with the first writer's database reads after its commit answered (with the row as it was
    when asked) only once the second is done: the newer price must be what a read gets, and the entry
    must be gone, which rejects filling the cache again in ``update_price`` (a re-warm). Commands sent
    in a pipeline are seen as well as single ones.
    """
    with exercise("5.1", "Cache-aside, invalidated on write", SOLUTION) as ex:
        for name, function in (("get_product", get_product), ("update_price", update_price)):
            expect(
                callable(function),
                f"the function `{name}`",
                short(function),
                "Call the check as `check_cache_aside(get_product, update_price)`.",
            )
        run = _FirstRead()
        if not ex.step(
            "a first call returns the product, read from the database",
            lambda: _first_read(get_product, update_price, run),
        ):
            return
        keyed = ex.step(
            f"it is cached under a namespaced, versioned key ({_KEY_SHOWN})", lambda: _check_key(run)
        )
        if not keyed and not run.entries:
            return
        readable = ex.step("the cached value is JSON", lambda: _check_json(run))
        ex.step("the cached value expires: a TTL of at most a day", lambda: _check_ttl(run))
        if not readable:
            return

        def scene(body: Callable[[_Scene], Awaitable[None]], name: str) -> Callable[[], None]:
            return lambda: _scenario(get_product, update_price, body, name)

        hangs: list[str] = []
        for description, body, name in (
            ("a second call is a hit: no database read", _hit, "hit"),
            ("a hit leaves the TTL alone: the entry still expires on time", _ttl_kept, "ttl-kept"),
            ("a product that does not exist gives None, and is not cached for ever", _missing, "missing"),
        ):
            if not ex.step(description, _watch(hangs, scene(body, name))) and hangs:
                return
        if not ex.step(
            "after update_price returns, the next read (here or on another instance) has the new price",
            scene(_update, "update"),
        ):
            return
        ex.step(
            "each product has an entry of its own: products 7 and 8, read and updated",
            scene(_two_products, "two-products"),
        )
        ex.step(
            "update_price deletes the key after the write: a read during the write leaves nothing stale",
            scene(_race, "race"),
        )

        def two_writers() -> None:
            _scenario(get_product, update_price, _two_writers, "two-writers")
            _scenario(get_product, update_price, _rewarm, "re-warm")

        ex.step(
            "two updates at once leave the newer price: the entry is deleted, not overwritten or refilled",
            two_writers,
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 5.2: coalesce concurrent loads (single-flight)
# ---------------------------------------------------------------------------------------------------

_CALLERS = 100
_FAILING_CALLERS = 10
_CANCEL_CALLERS = 5
_UNTIL = 1.0  # how long a load waits for an event the check sets (after one turn of the loop, normally)
_CALL_5_2 = "Call the check as `check_coalescer(Coalescer)`: the class, not an instance."
_PER_KEY_HINT = (
    "Keep the running load per key: `task = asyncio.ensure_future(load())`, `self._loads[key] = task`, "
    "removed when it is done (`task.add_done_callback(…)`); every caller awaits that task."
)
_SHIELD_HINT = "`return await asyncio.shield(task)`: a cancelled caller stops waiting, the load goes on."


class _DatabaseDown(Exception):
    """What the check's failing load raises."""


class _Loads:
    """Loads for the check: counted, with how many run at once; each returns ``{"key", "load"}``."""

    def __init__(self) -> None:
        self.started = 0
        self.in_flight = 0
        self.most_in_flight = 0
        self.together = asyncio.Event()  # set when two loads run at once
        self.made: list[Coroutine[Any, Any, Any]] = []

    def loader(
        self,
        key: str,
        *,
        fail: bool = False,
        until: asyncio.Event | None = None,
        seconds: float = 0.02,
    ) -> Callable[[], Coroutine[Any, Any, Any]]:
        def load() -> Coroutine[Any, Any, Any]:
            coroutine = self._load(key, fail, until, seconds)
            self.made.append(coroutine)
            return coroutine

        return load

    async def _load(self, key: str, fail: bool, until: asyncio.Event | None, seconds: float) -> Any:
        self.started += 1
        number = self.started
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        if self.in_flight >= 2:
            self.together.set()
        try:
            if until is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(until.wait(), _UNTIL)
            else:
                await asyncio.sleep(seconds)
            if fail:
                raise _DatabaseDown(f"ex05: load {number} failed, the database is down")
            return {"key": key, "load": number}
        finally:
            self.in_flight -= 1
            if until is not None:
                until.set()  # a load that ran alone: the next one need not wait for company

    def close_unawaited(self) -> None:
        for coroutine in self.made:
            if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
                coroutine.close()  # called but never awaited: no "never awaited" warning later


def _new(coalescer_class: Any) -> Any:
    expect(
        isinstance(coalescer_class, type),
        "the class `Coalescer`",
        short(coalescer_class),
        _CALL_5_2,
    )
    coalescer = coalescer_class()
    expect(
        callable(getattr(coalescer, "run", None)),
        "a method `run(key, load)`",
        f"a {type(coalescer).__name__} without one",
        "Keep the method `async def run(self, key, load)` from the exercise cell.",
    )
    return coalescer


def _call(coalescer: Any, key: Any, load: Callable[[], Any]) -> Awaitable[Any]:
    result = coalescer.run(key, load)
    expect(
        inspect.isawaitable(result),
        "an awaitable: `run` defined with `async def`",
        f"a plain method that returned {short(result)}",
        "Callers wait for the load, so `run` must be `async def run(self, key, load)`.",
    )
    return result


def _in_loop(coalescer_class: Any, body: Callable[[Any, _Loads], Awaitable[T]], name: str) -> T:
    async def main() -> T:
        _quiet_loop()
        loads = _Loads()
        try:
            return await body(_new(coalescer_class), loads)
        finally:
            loads.close_unawaited()

    try:
        return in_fresh_loop(main, timeout=5, name=f"check-5.2-{name}")
    except NoReturn as late:
        raise _late(
            late,
            "every call of run to return once its load is done (a load here takes 20 ms)",
            "A caller that waits for something nobody will ever finish (a Future never given a result, a "
            "lock never released) waits for ever.",
        ) from None


def _raise_errors(results: list[Any]) -> None:
    for result in results:
        if isinstance(result, Exception) and not isinstance(result, _DatabaseDown):
            raise result


async def _one_key(coalescer: Any, loads: _Loads) -> None:
    key = "ex05:item:1"
    load = loads.loader(key)
    calls = [_call(coalescer, key, load) for _ in range(_CALLERS)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    _raise_errors(results)
    if loads.started > 1:
        raise Mismatch(
            f"1 load for {_CALLERS} concurrent calls of run({key!r}, load)",
            f"{loads.started} loads" + (": every caller ran its own" if loads.started == _CALLERS else ""),
            [
                "The first caller for a key starts the load; the callers that arrive while it runs must "
                "wait for that same load, not start their own.",
                _PER_KEY_HINT,
            ],
        )
    expected = {"key": key, "load": 1}
    other = [r for r in results if r != expected]
    expect(
        not other,
        f"all {_CALLERS} callers to get the load's result, {expected}",
        f"{len(other)} got something else, e.g. {short(other[0]) if other else ''}",
        "Return what the load returned: `return await asyncio.shield(task)`.",
    )


async def _two_keys(coalescer: Any, loads: _Loads) -> None:
    first, second = "ex05:item:a", "ex05:item:b"
    results = await asyncio.gather(
        _call(coalescer, first, loads.loader(first, until=loads.together)),
        _call(coalescer, second, loads.loader(second, until=loads.together)),
        return_exceptions=True,
    )
    _raise_errors(results)
    keys = [r.get("key") if isinstance(r, dict) else None for r in results]
    if keys[1] == first:
        raise Mismatch(
            f"each key to get its own load's result: {second!r} the result of its load",
            f"{second!r} got the result of the load for {first!r}: one load for every key",
            [
                "Loads are shared per key, not across keys: two products are two loads.",
                "Keep the running loads in a dict keyed by `key`: `self._loads[key]`.",
            ],
        )
    expect(
        keys == [first, second],
        f"each key to get its own load's result: {first!r}, {second!r}",
        f"{short(results)}",
        "Return what the key's load returned.",
    )
    apart = _Loads()
    results = await asyncio.gather(
        _call(coalescer, 7, apart.loader("7")),
        _call(coalescer, "7", apart.loader("'7'")),
        return_exceptions=True,
    )
    _raise_errors(results)
    expect(
        apart.started == 2 and [r.get("key") if isinstance(r, dict) else r for r in results] == ["7", "'7'"],
        "keys 7 and '7' (not equal: two different keys) to load separately, each getting its own result",
        f"{apart.started} load{'s' if apart.started != 1 else ''} for both; results {short(results)}: the "
        "loads were looked up by something other than the key itself (str(key)?)",
        "Two calls share a load only when their keys are equal, as dict keys are: 7 and '7' are not.",
        "Use the key itself as the dict key, `self._loads[key]`: any hashable value works.",
    )
    expect(
        loads.most_in_flight == 2,
        "the loads of two different keys to run at the same time (2 in flight)",
        f"at most {loads.most_in_flight} at a time: the load for {second!r} waited for the load for "
        f"{first!r} to finish",
        "One lock for every key makes each key wait for all the others: a slow product would hold up "
        "every other page.",
        "Coalesce per key, without a global lock: in asyncio, looking up `self._loads[key]` and storing "
        "a new task there, with no `await` in between, cannot be interleaved.",
    )


async def _after_done(coalescer: Any, loads: _Loads) -> None:
    key = "ex05:item:2"
    first = await _call(coalescer, key, loads.loader(key))
    await asyncio.sleep(0)
    second = await _call(coalescer, key, loads.loader(key))
    if loads.started == 1:
        raise Mismatch(
            f"a second load for a call made after the first load finished (2 loads in all for {key!r})",
            f"1 load: the later call got the first load's result, {short(second)}. run keeps results "
            "for ever: a cache with no TTL and no invalidation",
            [
                "Single-flight shares a load only while it runs; what happens after is the cache's job "
                "(with its TTL and invalidation).",
                "Forget the load once it is done: `task.add_done_callback(lambda _: self._loads.pop(key, "
                "None))`.",
            ],
        )
    expect(
        loads.started == 2 and first == {"key": key, "load": 1} and second == {"key": key, "load": 2},
        "two calls one after the other: two loads, each caller getting its own load's result",
        f"{loads.started} loads; results {short(first)} and {short(second)}",
        "Start a load when none is running for the key, and return its result.",
    )


async def _failure(coalescer: Any, loads: _Loads) -> None:
    key = "ex05:item:3"
    load = loads.loader(key, fail=True)
    results = await asyncio.gather(
        *(_call(coalescer, key, load) for _ in range(_FAILING_CALLERS)), return_exceptions=True
    )
    _raise_errors(results)
    raised = sum(isinstance(r, _DatabaseDown) for r in results)
    returned = [r for r in results if not isinstance(r, _DatabaseDown)]
    expect(
        raised == _FAILING_CALLERS,
        f"each of {_FAILING_CALLERS} concurrent callers to get the load's exception",
        f"{raised} got it; the others returned {short(returned)}",
        "A failed load fails every caller waiting for it: let the exception propagate.",
    )
    how = (
        "each caller ran its own, at the same time"
        if loads.most_in_flight > 1
        else "the callers loaded again, one after another, after the first failed"
    )
    expect(
        loads.started == 1,
        f"1 load for the {_FAILING_CALLERS} callers, failure included",
        f"{loads.started} loads: {how}",
        "Callers waiting for a load share its outcome, result or exception: a database that is down "
        "should not get the same query once per waiting request.",
        _PER_KEY_HINT,
    )
    try:
        retried = await _call(coalescer, key, loads.loader(key))
    except _DatabaseDown:
        raise Mismatch(
            "the next call, after the failure, to load again",
            f"it raised the earlier failure again, without loading ({loads.started} load in all): the "
            "failed load was kept, and every later call for this key fails",
            [
                "A failed load must be forgotten as well as a successful one, or the key is broken for good.",
                "Remove the entry whether the load succeeded or failed: `task.add_done_callback(…)` runs "
                "either way (or `try: … finally:`).",
            ],
        ) from None
    expect(
        loads.started == 2 and retried == {"key": key, "load": 2},
        "the next call, after the failure, to load again and return that load's result",
        f"{loads.started} loads; it returned {short(retried)}",
        "Forget the load once it is done, failed or not.",
    )


async def _cancelled(coalescer: Any, loads: _Loads) -> None:
    key = "ex05:item:4"
    release = asyncio.Event()
    load = loads.loader(key, until=release)
    calls = [asyncio.ensure_future(_call(coalescer, key, load)) for _ in range(_CANCEL_CALLERS)]
    others = calls[1:]
    try:
        for _ in range(200):  # until the load is running (a turn or two of the loop)
            if loads.started or any(c.done() for c in calls):
                break
            await asyncio.sleep(0.005)
        for _ in range(5):
            await asyncio.sleep(0)
        failed = [c for c in calls if c.done() and not c.cancelled() and c.exception() is not None]
        if failed:
            failed[0].result()
        calls[0].cancel()  # the first caller, the one that started the load, gives up
        await asyncio.wait([calls[0]], timeout=1)
        before_late, together_before_late = loads.started, loads.most_in_flight
        late = asyncio.ensure_future(_call(coalescer, key, load))  # while the load still runs
        calls.append(late)
        for _ in range(5):
            await asyncio.sleep(0)
        late_loaded = loads.started > before_late
        release.set()
        done, pending = await asyncio.wait(others, timeout=2)
        cancelled = [c for c in others if c.cancelled()]
        expect(
            not cancelled,
            f"the other {len(others)} callers to get the load's result when the first is cancelled",
            f"{len(cancelled)} of {len(others)} were cancelled too: cancelling the caller cancelled the "
            "load they all shared",
            "A caller that gives up (a client gone, a timeout) must not take the others' load with it.",
            _SHIELD_HINT,
        )
        expect(
            not pending,
            f"the other {len(others)} callers to get the load's result when the first is cancelled",
            f"{len(pending)} of {len(others)} still waiting 2 s after the load could finish: the first "
            "caller ran the load itself, and when it was cancelled, nobody finished it",
            "Run the load in a task of its own (`asyncio.ensure_future(load())`), which no caller owns, "
            "and have every caller await that task.",
            _SHIELD_HINT,
        )
        _raise_errors([c.exception() for c in done])
        results = [c.result() for c in others]
        expected = {"key": key, "load": 1}
        how = (
            "each caller ran its own"
            if together_before_late > 1
            else "the first caller's load stopped when it was cancelled, and the others loaded again"
        )
        expect(
            before_late == 1,
            f"the other {len(others)} callers to get the result of the one load, {expected}",
            f"{before_late} loads: {how}",
            "A load that a caller runs itself stops when that caller is cancelled; the others then have "
            "to start again.",
            "Run the load in a task of its own (`asyncio.ensure_future(load())`), which no caller owns, "
            "and have every caller await it through `asyncio.shield`.",
        )
        await asyncio.wait([late], timeout=2)
        expect(
            not late_loaded,
            "a call made after the first caller was cancelled, while the load still ran, to share that load",
            f"it started load {loads.started}: the entry was removed when the caller that started the load "
            "was cancelled, while its load ran on, so two loads of one key ran at once",
            "The entry belongs to the load, not to the caller that started it: remove it when the load "
            "is done, however its callers fare.",
            "Forget the load in a done callback of the task, `task.add_done_callback(lambda _: "
            "self._loads.pop(key, None))`, not in a `finally:` of the caller.",
        )
        expect(
            all(r == expected for r in results) and loads.started == 1,
            f"the other {len(others)} callers to get the result of the one load, {expected}",
            f"{loads.started} loads; results {short(results)}",
            "The load goes on when one caller is cancelled; the others still share it. " + _SHIELD_HINT,
        )
    finally:
        release.set()
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)


def check_coalescer(coalescer_class: type) -> None:
    """Check Exercise 5.2: ``Coalescer().run(key, load)`` shares one load per key while it runs.

    Each scenario runs on a fresh loop with a new ``Coalescer()`` and loads of the check's own, which
    count how many started and how many ran at once. 100 concurrent calls for one key: 1 load, and all
    100 get its result; two keys at once: 2 loads in flight together (a load waits for the other to
    start, up to 1 s), and keys 7 and "7" (not equal) 2 loads; a call after a load finished: a new
    load; a failing load: every one of 10 waiting callers gets its exception, from 1 load, and the next
    call loads again; 5 callers, the first cancelled while the load runs: the other 4 still get its
    result, and a call made after the cancellation, while the load still runs, joins it.
    """
    with exercise("5.2", "Coalesce concurrent loads (single-flight)", SOLUTION) as ex:
        hangs: list[str] = []
        steps: list[tuple[str, Callable[[Any, _Loads], Awaitable[None]], str]] = [
            (
                f"{_CALLERS} concurrent calls for one key: 1 load, and all {_CALLERS} get its result",
                _one_key,
                "one-key",
            ),
            (
                "two different keys (7 and '7' too) load at the same time, each getting its own result",
                _two_keys,
                "two-keys",
            ),
            (
                "once a load is done, the next call loads again: single-flight, not a cache",
                _after_done,
                "after-done",
            ),
            (
                "a failing load raises in every waiting caller, and the next call loads again",
                _failure,
                "failure",
            ),
            (
                "cancelling the first caller leaves the load running, and shared, for the others",
                _cancelled,
                "cancelled",
            ),
        ]
        for description, body, name in steps:
            scenario = _watch(hangs, lambda body=body, name=name: _in_loop(coalescer_class, body, name))
            if not ex.step(description, scenario) and hangs:
                return  # the next scenarios would hang as long again


# ---------------------------------------------------------------------------------------------------
# Exercise 5.3: a safe cache key
# ---------------------------------------------------------------------------------------------------

_PREFIX = "ex05:recs:v1:"
_MAX_KEY = 100
_PRINTABLE = re.compile(r"[!-~]+")  # printable ASCII, no space
_SEPARATORS = (":", "|", "/", ",", ";", " ", "-", "_", "#", "\n", "\x00")
_DIGEST_HINT = "`hashlib.sha256(text.encode()).hexdigest()` is 64 hex digits, for any text."
_JSON_HINT = (
    "Hash the parts together in an encoding that keeps them apart: "
    "`hashlib.sha256(json.dumps([user_id, normalised, lang]).encode()).hexdigest()`."
)
_SEEDS = ("1", "2")
_ELSEWHERE_SECONDS = 15  # a fresh interpreter starts in well under a second, even on a busy machine


@dataclass
class _Keys:
    key: Callable[..., Any]
    first: Any = None

    def __call__(self, user_id: str, query: str, lang: str) -> Any:
        return self.key(user_id, query, lang)


def _label(args: tuple[str, str, str]) -> str:
    return "(" + ", ".join(short(a, 24) for a in args) + ")"


def _check_returns(keys: _Keys) -> None:
    keys.first = keys("alice", "red shoes", "en")
    expect(
        isinstance(keys.first, str),
        "a str",
        f"a value of type {type(keys.first).__name__}: {short(keys.first)}",
        'Return the key as a str: `return f"ex05:recs:v1:{digest}"`.',
    )
    expect(
        keys.first.startswith(_PREFIX),
        f"a key starting with {_PREFIX!r}: the namespace, the kind of entry, a version",
        short(keys.first),
        "A namespace keeps these keys apart from every other use of the same Redis, and lets you find or "
        "delete them as a family; a version lets you change what is cached without reading old entries.",
        f'`return f"{_PREFIX}{{digest}}"`.',
    )


def _check_distinct(keys: _Keys) -> None:
    same = ("alice", "red shoes", "en")
    expect(
        keys(*same) == keys(*same),
        f"the same key for the same inputs, {_label(same)}, twice",
        f"{short(keys(*same))}, then {short(keys(*same))}",
        "Nothing random or time-based in a cache key: the next request must find the entry.",
    )
    long_query = "shoes " * 1_700
    pairs = [
        (("alice", "red shoes", "en"), ("bob", "red shoes", "en"), "two users"),
        (("alice", "red shoes", "en"), ("alice", "blue shoes", "en"), "two queries"),
        (("alice", "red shoes", "en"), ("alice", "red shoes", "fr"), "two languages"),
        (("alice", long_query + "red", "en"), ("alice", long_query + "blue", "en"), "two 10 kB queries"),
    ]
    for one, other, what in pairs:
        if keys(*one) != keys(*other):
            continue
        if what == "two users":
            raise Mismatch(
                "different keys for different users",
                f"{_label(one)} and {_label(other)} share {short(keys(*one))}: bob would be served "
                "alice's recommendations",
                [
                    "The key must hold everything the answer depends on; these recommendations depend on "
                    "who asks.",
                    "Put `user_id` into what you hash: " + _JSON_HINT,
                ],
            )
        if what == "two 10 kB queries":
            raise Mismatch(
                "different keys for two long queries that differ only at the end",
                f"both give {short(keys(*one))}: the end of the query was cut off, so different searches "
                "share an entry",
                [
                    "Truncating bounds the length but merges queries; a digest bounds it and keeps "
                    "them apart.",
                    _DIGEST_HINT,
                ],
            )
        raise Mismatch(
            f"different keys for {what}",
            f"{_label(one)} and {_label(other)} share {short(keys(*one))}",
            ["The key must hold everything the answer depends on: the user, the query and the language."],
        )
    apart = [
        (
            ("Alice", "red shoes", "en"),
            ("alice", "red shoes", "en"),
            "users 'Alice' and 'alice'",
            "the user id was normalised like the query: user ids are compared exactly as given",
            "Only the query is normalised; two user ids that differ in any way are two users.",
        ),
        (
            ("alice", "red shoes", "en"),
            ("alice", "redshoes", "en"),
            "queries 'red shoes' and 'redshoes'",
            "whitespace inside the query was removed: it separates words, so these are two searches",
            "Strip the whitespace around the query only: `query.strip()`.",
        ),
        (
            ("alice", "café", "fr"),
            ("alice", "caf", "fr"),
            "queries 'café' and 'caf'",
            "characters outside ASCII were dropped before hashing",
            "Encode the whole text, `text.encode()` (UTF-8, which encodes any character), and hash the "
            "bytes: the digest is what makes the key ASCII.",
        ),
        (
            ("alice", "обувь", "en"),
            ("alice", "сапоги", "en"),
            "queries 'обувь' and 'сапоги'",
            "characters outside ASCII were dropped before hashing, so every query in another script "
            "shares one key",
            "Encode the whole text, `text.encode()` (UTF-8, which encodes any character), and hash the "
            "bytes: the digest is what makes the key ASCII.",
        ),
    ]
    for one, other, what, why, hint in apart:
        if keys(*one) == keys(*other):
            raise Mismatch(
                f"different keys for {what}",
                f"both give {short(keys(*one))}: {why}",
                [hint, _JSON_HINT],
            )


def _check_normalised(keys: _Keys) -> None:
    variants = ["red shoes", "Red Shoes", "  RED SHOES\t", "red shoes "]
    got = {query: keys("alice", query, "en") for query in variants}
    apart = [query for query in variants[1:] if got[query] != got[variants[0]]]
    expect(
        not apart,
        f"one key for {', '.join(repr(q) for q in variants)}: the same search",
        f"{apart[0]!r} gets {short(got[apart[0]])}, {variants[0]!r} gets {short(got[variants[0]])}"
        if apart
        else "",
        "Normalise the query before it goes into the key, or every spelling of a search is a miss.",
        "`normalised = query.strip().casefold()`, and hash that.",
    )
    folded = {query: keys("alice", query, "de") for query in ("straße", "STRASSE")}
    expect(
        folded["straße"] == folded["STRASSE"],
        "one key for 'straße' and 'STRASSE': they differ only in letter case ('straße'.upper() is 'STRASSE')",
        f"'straße' gets {short(folded['straße'])}, 'STRASSE' gets {short(folded['STRASSE'])}: lower() "
        "leaves ß as it is, so the two never meet",
        "`str.lower` is not a caseless comparison: it keeps ß, and uppercasing gives SS.",
        "`query.strip().casefold()`: casefold is made for comparing text without case (it folds ß to ss).",
    )


def _check_bounded(keys: _Keys) -> None:
    cases = [
        (("alice", "x" * 10_000, "en"), "a 10 kB query"),
        (("u" * 10_000, "shoes", "en"), "a 10 kB user id"),
        (("alice", "shoes", "e" * 10_000), "a 10 kB language"),
    ]
    for args, what in cases:
        key = keys(*args)
        expect(
            isinstance(key, str) and len(key) <= _MAX_KEY,
            f"a key of at most {_MAX_KEY} characters for {what}",
            f"a key of {len(key):,} characters: every request can store a key that size, and the caller "
            "chooses how long"
            if isinstance(key, str)
            else short(key),
            "Hash what the caller controls: a digest has the same length whatever the input.",
            _DIGEST_HINT,
        )
    hostile = [
        (("alice", "shoes\r\nex05:recs:v1:bob", "en"), "a query with a newline"),
        (("alice\n", "shoes", "en"), "a user id with a newline"),
        (("alice", "chaussures d'été", "fr"), "a query with accents and a space"),
        (("alice", "shoes", "en us"), "a language with a space"),
    ]
    for args, what in hostile:
        key = keys(*args)
        expect(
            isinstance(key, str) and _PRINTABLE.fullmatch(key),
            f"only printable ASCII, no spaces or newlines, in the key for {what}",
            short(key),
            "Raw input in a key carries whatever the caller put there: newlines (a forged line in "
            "`MONITOR` or a log), spaces, and `:` that mimics another namespace.",
            "Put only a digest of the inputs in the key: " + _DIGEST_HINT,
        )


def _check_unambiguous(keys: _Keys) -> None:
    for sep in _SEPARATORS:
        pairs = [
            (("a", f"b{sep}c", "en"), (f"a{sep}b", "c", "en")),
            (("a", f"b{sep}c", "en"), ("a", "b", f"c{sep}en")),
        ]
        for one, other in pairs:
            if keys(*one) == keys(*other):
                raise Mismatch(
                    "different keys whenever the user, query or language differ",
                    f"{_label(one)} and {_label(other)} share {short(keys(*one))}: the parts were joined "
                    f"with {sep!r}, which can appear inside them",
                    [
                        "Joined with a separator that may appear inside a part, two different inputs can "
                        'make the same string: user "a:b" searching "c" would read the entry of user "a" '
                        'searching "b:c".',
                        _JSON_HINT,
                    ],
                )


_MIN_BITS = 120  # the text asks for 32 hex digits of a digest (128 bits); a UUID keeps 122 of them
_SAMPLES = 1_000


def _bits(keys: _Keys) -> tuple[float, list[str]]:
    """How many bits the keys of many different inputs carry: the sum, over each character position
    after the prefix, of log2 of the number of different characters seen there."""
    langs = ("en", "fr", "de", "es")
    made = [keys(f"user{i}", f"query {i}", langs[i % len(langs)]) for i in range(_SAMPLES)]
    tails = [key[len(_PREFIX) :] if isinstance(key, str) else "" for key in made]
    width = max(map(len, tails), default=0)
    seen = [{tail[i] for tail in tails if i < len(tail)} for i in range(width)]
    return sum(math.log2(len(chars)) for chars in seen if chars), made


def _check_strong(keys: _Keys) -> None:
    bits, made = _bits(keys)
    expect(
        bits >= _MIN_BITS,
        "a digest long enough that two inputs never share a key in practice: 32 hex digits (128 bits) "
        "or more",
        f"keys such as {short(made[0])} carry about {bits:.0f} bits: among about {2 ** (bits / 2):,.0f} "
        "different users and queries, two share a key at even odds, and one user is served the other's page",
        "A digest cut short collides long before the inputs run out (the birthday bound): n bits give "
        "even odds of a clash after about 2^(n/2) keys.",
        "Keep the whole digest: " + _DIGEST_HINT + " That is well under the 100-character limit.",
    )


_STABLE_INPUTS = [
    ("alice", "red shoes", "en"),
    ("bob", "Blue Shoes ", "fr"),
    ("a:b", "c", "en"),
]


def _names_in(source: str) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}


def _literal(value: Any) -> bool:
    try:
        return ast.literal_eval(repr(value)) == value
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False


def _importable(value: Any) -> str | None:
    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if not module or not name or "." in name or module == "__main__":
        return None
    found = sys.modules.get(module)
    return f"from {module} import {name}" if getattr(found, name, None) is value else None


def _portable(function: Callable[..., Any]) -> str:
    """Source that defines ``function`` in a fresh interpreter: its imports, constants and helpers."""
    prelude: list[str] = []
    definitions: list[str] = []
    shipped: set[str] = set()

    def ship(fn: Any) -> None:
        fn = inspect.unwrap(fn)
        source = textwrap.dedent(inspect.getsource(fn))
        frees = dict(zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=True))
        for name in sorted(_names_in(source) - shipped):
            if name in frees:
                value = frees[name].cell_contents
            elif name in fn.__globals__:
                value = fn.__globals__[name]
            else:
                continue
            shipped.add(name)
            if isinstance(value, types.ModuleType):
                prelude.append(f"import {value.__name__} as {name}")
            elif isinstance(value, re.Pattern):
                prelude.append(f"import re as _re\n{name} = _re.compile({value.pattern!r}, {value.flags})")
            elif _literal(value):
                prelude.append(f"{name} = {value!r}")
            elif (line := _importable(value)) is not None:
                prelude.append(f"{line} as {name}")
            elif isinstance(value, types.FunctionType) and value is not fn:
                ship(value)
        definitions.append(source)

    ship(function)
    return "\n".join([*prelude, *definitions])


def _keys_elsewhere(function: Callable[..., Any], seed: str) -> list[Any]:
    name = inspect.unwrap(function).__name__
    script = (
        "from __future__ import annotations  # annotations may name what the new process lacks\n"
        + _portable(function)
        + "\nimport json as _json, sys as _sys\n"
        + "_out, _sys.stdout = _sys.stdout, _sys.stderr  # what the function prints stays out of the answer\n"
        + f"_out.write(_json.dumps([{name}(*args) for args in _json.loads(_sys.stdin.read())]))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONIOENCODING": "utf-8"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            input=json.dumps(_STABLE_INPUTS),
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=_ELSEWHERE_SECONDS,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Mismatch(
            f"recommendations_key to run in a fresh Python process (PYTHONHASHSEED={seed})",
            f"no answer for {len(_STABLE_INPUTS)} keys within {_ELSEWHERE_SECONDS} s",
            ["Computing a key takes microseconds: does your function loop, or wait for input?"],
        ) from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise Mismatch(
            f"recommendations_key to run in a fresh Python process (PYTHONHASHSEED={seed})",
            f"it failed there: {lines[-1] if lines else f'exit status {done.returncode}'}",
            [
                "The check copies your function's source into a new process, with the modules, "
                "constants and helper functions it names; keep what it needs to those.",
            ],
        )
    return list(json.loads(done.stdout))


def _check_stable(keys: _Keys) -> None:
    here = [keys(*args) for args in _STABLE_INPUTS]
    try:
        _portable(keys.key)
    except (OSError, TypeError) as unreadable:
        raise Mismatch(
            "the source of recommendations_key, to run it in another process",
            f"it could not be read: {unreadable}",
            ["Define it with `def` in a notebook cell (or a module), as the exercise cell does."],
        ) from None
    for seed in _SEEDS:
        there = _keys_elsewhere(keys.key, seed)
        differ = [i for i, (a, b) in enumerate(zip(here, there, strict=True)) if a != b]
        if differ:
            i = differ[0]
            raise Mismatch(
                "the same key in every process of the service (here, and with PYTHONHASHSEED "
                f"{' and '.join(_SEEDS)})",
                f"for {_label(_STABLE_INPUTS[i])}, this process made {short(here[i])}, one with "
                f"PYTHONHASHSEED={seed} {short(there[i])}",
                [
                    "Python's `hash()` of a str is salted with a random seed per process: every instance "
                    "of the service, and every restart, computes other keys, and none finds the others' "
                    "entries.",
                    "Use a digest that is the same everywhere: " + _DIGEST_HINT,
                ],
            )


def check_recommendations_key(recommendations_key: Callable[[str, str, str], str]) -> None:
    """Check Exercise 5.3: ``recommendations_key(user_id, query, lang)`` is a safe cache key.

    It must be a str starting with ``ex05:recs:v1:``; the same for the same inputs, and for queries
    that differ only in case or surrounding whitespace; different for another user, query (including
    two 10 kB queries that differ at the end) or language; at most 100 characters of printable ASCII
    without spaces for any input (10 kB parts, newlines, accents); different for inputs that a
    separator would run together (user "a" with query "b:c", user "a:b" with query "c", for a dozen
    separators); different for users that differ only in case or surrounding whitespace, for "red
    shoes" and "redshoes", and for queries outside ASCII ("café" and "caf"); the same for "straße" and
    "STRASSE" (casefold, not lower); carrying at least 120 bits in what follows the prefix (estimated
    over 1,000 inputs, position by position: a digest cut to 8 hex digits carries 32); and the same in
    two fresh processes with ``PYTHONHASHSEED`` 1 and 2 (rejects
    ``hash()``). The function's source is copied into those processes, with the modules, constants
    and helper functions it names.
    """
    with exercise("5.3", "A safe cache key", SOLUTION) as ex:
        keys = _Keys(recommendations_key)
        expect(
            callable(recommendations_key),
            "the function `recommendations_key`",
            short(recommendations_key),
            "Call the check as `check_recommendations_key(recommendations_key)`.",
        )
        returned = ex.step(f"it returns a str under {_PREFIX!r}", lambda: _check_returns(keys))
        if not returned and not isinstance(keys.first, str):
            return
        ex.step(
            "the same inputs give the same key; another user, query or language, another key",
            lambda: _check_distinct(keys),
        )
        ex.step(
            "queries that differ only in case or surrounding whitespace share a key",
            lambda: _check_normalised(keys),
        )
        bounded = ex.step(
            f"the key is at most {_MAX_KEY} printable ASCII characters, whatever the input",
            lambda: _check_bounded(keys),
        )
        ex.step(
            "the parts cannot run into each other: ('a', 'b:c') and ('a:b', 'c') get different keys",
            lambda: _check_unambiguous(keys),
        )
        ex.step("the key is the same in another Python process (no hash())", lambda: _check_stable(keys))
        if bounded:  # a key that holds raw input is not a digest to measure
            ex.step(
                "the digest is long enough never to collide in practice (32 hex digits or more)",
                lambda: _check_strong(keys),
            )


# ---------------------------------------------------------------------------------------------------
# Exercise 5.4: a profile cache whose writes arrive through a background job
# ---------------------------------------------------------------------------------------------------

_ADA, _BEN = 41, 42
_NOBODY = 43  # a user the database does not hold
_PROFILES: dict[int, dict[str, Any]] = {
    _ADA: {"user_id": _ADA, "display_name": "Ada", "city": "Leeds"},
    _BEN: {"user_id": _BEN, "display_name": "Ben", "city": "Hull"},
}
_CHANGES = {"display_name": "Ada Lovelace", "city": "London"}
_UPDATED = {**_PROFILES[_ADA], **_CHANGES}
_STALE_FOR = 60  # seconds: the bound the text states on how long a profile may be out of date
_CUT_TTL = 5  # what the check leaves of an entry's TTL before a hit
_PROFILE_SHOWN = f"ex05:profile:v1:{_ADA}"
_VERSION_PART = re.compile(r"(?:^|:)v\d+(?::|$)")
_EXPIRES = frozenset({"EXPIRE", "PEXPIRE", "EXPIREAT", "PEXPIREAT"})
_JOB_HINT = (
    "`await apply_profile_update(db, update)` first, then "
    '`await redis.delete(profile_key(update["user_id"]))`: nothing around them, nothing else.'
)
_FILL_HINT = "`await redis.set(key, json.dumps(profile), ex=STALE_AT_MOST)`, after reading the database."


def _job() -> dict[str, Any]:
    """The import's update for Ada, a fresh copy for each run (a worker hands each attempt its own)."""
    return {"job_id": "import-17/41", "user_id": _ADA, "changes": dict(_CHANGES)}


class _WriteFailed(ConnectionError):
    """What the check's database raises for a write it was told to fail (nothing is committed)."""


class _ProfileDatabase:
    """The notebook's ``ProfileDatabase``, for the check: 10 ms a read, reads and commits counted per user.

    ``fail_writes`` is how many of the next writes raise ``_WriteFailed`` instead of committing. ``hold``,
    when set to an event, pauses each write before it commits until the event is set (``writing`` is set
    when a write begins). ``slow_next_read``, when set to an event, makes the next read take the row at
    once and answer only when the event is set (``slowed`` is set then): a read whose answer comes back
    late. ``on_commit`` runs as a write commits, and ``on_write`` as one begins: the check notes there
    what the learner's code had deleted by then, and what Redis held.
    """

    def __init__(self) -> None:
        self.rows = {user_id: dict(row) for user_id, row in _PROFILES.items()}
        self.reads: Counter[int] = Counter()
        self.commits: Counter[int] = Counter()
        self.fail_writes = 0
        self.hold: asyncio.Event | None = None
        self.writing = asyncio.Event()
        self.slow_next_read: asyncio.Event | None = None
        self.slowed = asyncio.Event()
        self.on_write: Callable[[], None] | None = None
        self.on_commit: Callable[[int], Awaitable[None]] | None = None

    async def read(self, user_id: int) -> dict[str, Any] | None:
        self.reads[user_id] += 1
        if (release := self.slow_next_read) is not None:
            self.slow_next_read = None
            row = self.rows.get(user_id)
            answer = dict(row) if row is not None else None
            self.slowed.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), _UNTIL_SECOND)
            return answer
        await asyncio.sleep(0.01)
        row = self.rows.get(user_id)
        return dict(row) if row is not None else None

    async def write(self, user_id: int, changes: dict[str, Any]) -> None:
        if self.on_write is not None:
            self.on_write()
        self.writing.set()
        await asyncio.sleep(0.01)
        if self.hold is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.hold.wait(), _UNTIL_SECOND)
        if self.fail_writes:
            self.fail_writes -= 1
            raise _WriteFailed("ex05: the database went away before the write committed")
        self.rows[user_id].update(changes)  # committed here
        self.commits[user_id] += 1
        if self.on_commit is not None:
            await self.on_commit(user_id)

    def profile(self, user_id: int) -> dict[str, Any]:
        return dict(self.rows[user_id])


@dataclass(frozen=True)
class _ProfileAnswer:
    profile_key: Callable[[int], Any]
    get_profile: Callable[..., Any]
    job: Callable[..., Any]


@dataclass
class _ProfileScene:
    redis: redis.asyncio.Redis  # the learner's: answers str
    raw: redis.asyncio.Redis  # the check's own: answers bytes
    db: _ProfileDatabase
    answer: _ProfileAnswer
    written: list[str] = field(default_factory=list)
    writes_by: list[tuple[str, str | None]] = field(default_factory=list)  # each key written, and by whom
    deleted: list[str] = field(default_factory=list)
    by_writer: set[str] = field(default_factory=set)  # the commands the job ran (cleared before each job)
    delete_calls: int = 0  # DEL and UNLINK called, whether or not they ran
    filled: dict[int, list[str]] = field(default_factory=dict)  # user → keys get_profile wrote, alone
    deleted_at_write: int | None = None  # how many keys had been deleted when the last write began
    deleted_at_commit: int | None = None  # … when it committed
    cached_at_commit: list[str] = field(default_factory=list)  # the user's keys in Redis at that commit

    def __post_init__(self) -> None:
        self.db.on_write = self._write_begins
        self.db.on_commit = self._committed

    async def gate(self) -> None:
        """Nothing is held in Exercise 5.4 (``_instrument`` asks every scene)."""
        return None

    def _write_begins(self) -> None:
        self.deleted_at_write = len(self.deleted)

    async def _committed(self, user_id: int) -> None:
        self.deleted_at_commit = len(self.deleted)
        keys = self.filled.get(user_id, [])
        self.cached_at_commit = [key for key in keys if await self.raw.exists(key)]

    async def _present(self) -> set[str]:
        """The keys under ``ex05:`` that Redis holds now."""
        return {key.decode("utf-8", "replace") async for key in self.raw.scan_iter(match=_NAMESPACE)}

    async def get(self, user_id: int) -> Any:
        before, since = await self._present(), len(self.writes_by)
        result = self.answer.get_profile(self.redis, self.db, user_id)
        expect(
            inspect.isawaitable(result),
            "an awaitable: `get_profile` defined with `async def`",
            f"a plain function that returned {short(result)}",
            "It awaits Redis and the database, so it must be `async def get_profile(…)`.",
        )
        value = await result
        # A key that appeared in Redis during the read, through no command noted then, was stored by
        # get_profile all the same: inside a script (EVAL), a function (FCALL), a transaction.
        noted = {key for key, _ in self.writes_by[since:]}
        for key in sorted(await self._present() - before - noted):
            self.written.append(key)
            self.writes_by.append((key, None))
        return value

    async def warm(self, user_id: int) -> list[str]:
        """Read ``user_id``'s profile with nothing else running; the keys get_profile wrote then."""
        before = len(self.written)
        await self.get(user_id)
        keys = list(dict.fromkeys(self.written[before:]))
        self.filled.setdefault(user_id, [])
        self.filled[user_id] += [key for key in keys if key not in self.filled[user_id]]
        return keys

    async def job(self, update: dict[str, Any]) -> None:
        """The learner's job body, run as the worker runs it (its Redis commands noted as the job's)."""
        self.by_writer.clear()
        token = _WRITER.set("job")
        try:
            result = self.answer.job(self.redis, self.db, update)
            expect(
                inspect.isawaitable(result),
                "an awaitable: `apply_update_and_invalidate` defined with `async def`",
                f"a plain function that returned {short(result)}",
                "It awaits the database and Redis, so it must be `async def apply_update_and_invalidate(…)`.",
            )
            await result
        finally:
            _WRITER.reset(token)

    def fills(self) -> list[str]:
        """Every key get_profile wrote (not the job), in order."""
        return list(dict.fromkeys(key for key, writer in self.writes_by if writer is None))

    def job_wrote(self) -> list[str]:
        return list(dict.fromkeys(key for key, writer in self.writes_by if writer == "job"))

    async def cached(self, keys: list[str]) -> list[_Entry]:
        found = []
        for key in keys:
            kind = await self.raw.type(key)
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind != "none":
                raw = await self.raw.get(key) if kind == "string" else None
                ttl = await self.raw.ttl(key)
                if ttl != -2:  # -2: deleted since TYPE answered
                    found.append(_Entry(key, kind, raw, ttl))
        return found


async def _settle() -> None:
    """Let what a job left running (a task nobody awaited) land, in a step that is about something else:
    the step that a job's return leaves the entry gone (``_job_invalidates``) is where that is judged."""
    await asyncio.sleep(0.05)


def _profile_scenario(answer: _ProfileAnswer, body: Callable[[_ProfileScene], Awaitable[T]], name: str) -> T:
    """Run ``body`` on a fresh loop with a fresh database, clients of the check's own, and clean keys."""

    async def main() -> T:
        _quiet_loop()
        client = redis_client(decode_responses=True)
        raw = redis_client()
        scene = _ProfileScene(client, raw, _ProfileDatabase(), answer)
        _instrument(client, scene)
        try:
            await delete_keys(raw, _NAMESPACE)
            return await body(scene)
        finally:
            try:
                await asyncio.sleep(0.05)  # what the answer left running lands before the keys go
                outside = [k for k in set(scene.written) if not k.startswith("ex05:")]
                if outside:
                    await raw.delete(*outside)
                await delete_keys(raw, _NAMESPACE)
            finally:
                await client.aclose()
                await raw.aclose()

    try:
        return in_fresh_loop(main, timeout=5, name=f"check-5.4-{name}")
    except NoReturn as late:
        raise _late(
            late,
            "get_profile and apply_update_and_invalidate to return within a second or so",
            "Does your code wait for something that never comes (a lock, an event, a loop that never "
            "ends)? Each function makes a few Redis calls and at most one database call.",
        ) from None
    except redis.exceptions.DataError as refused:
        raise Mismatch(
            "a value Redis can store: the profile as a JSON string",
            f"redis-py refused it: {refused}",
            [
                "Redis stores strings and bytes, not dicts or None: serialise the profile first.",
                _FILL_HINT + " A user who does not exist (None) is not stored at all.",
            ],
        ) from None


def _cached_elsewhere(keys: list[str]) -> list[str]:
    """Which of ``keys`` exist, asked from another loop with a client of its own while this loop is
    held: what the job left running on this loop (a task nobody awaited) cannot land before that."""

    async def main() -> list[str]:
        client = redis_client()
        try:
            return [key for key in keys if await client.exists(key)]
        finally:
            await client.aclose()

    return in_fresh_loop(main, timeout=3, name="check-5.4-other-instance")


def _profile_seen(value: Any) -> str:
    if isinstance(value, dict) and set(value) >= set(_CHANGES):
        return f"display_name {short(value['display_name'])}, city {short(value['city'])}"
    return short(value)


def _check_profile_key(profile_key: Callable[[int], Any]) -> None:
    ada, ben, again = profile_key(_ADA), profile_key(_BEN), profile_key(_ADA)
    expect(
        isinstance(ada, str),
        f"a str such as {_PROFILE_SHOWN!r}",
        short(ada),
        "`profile_key` returns the key itself, a str: "
        '`return f"ex05:profile:v1:{user_id}"` (a plain `def`: it needs no await).',
    )
    expect(
        ada == again,
        f"the same key each time for user {_ADA}",
        f"{short(ada)}, then {short(again)}",
        "The job must find the entry get_profile wrote: the key depends on the user id only, nothing "
        "that changes from call to call (a time, a random value).",
    )
    expect(
        ada.startswith("ex05:"),
        f"a key in this exercise's namespace, such as {_PROFILE_SHOWN!r}",
        short(ada),
        "A key without a namespace collides with everything else cached in the same Redis, and cannot be "
        "found or cleared as a family.",
        'Start it with `ex05:profile:`: `f"ex05:profile:v1:{user_id}"`.',
    )
    expect(
        ada != ben,
        f"different keys for users {_ADA} and {_BEN}",
        f"both get {short(ada)}: the key leaves out the user id, so every user would be served the profile "
        "cached first",
        "A cache key holds everything the cached value depends on: here, whose profile it is.",
        'Put the id in the key: `f"ex05:profile:v1:{user_id}"`.',
    )
    expect(
        re.search(rf"(?<!\d){_ADA}(?!\d)", ada) is not None,
        f"user {_ADA}'s id, {_ADA}, in its key",
        short(ada),
        "Anyone reading Redis (or deleting one user's entry by hand) should see whose entry it is: put "
        "the id itself in the key.",
        'f"ex05:profile:v1:{user_id}"',
    )
    expect(
        _VERSION_PART.search(ada) is not None,
        f"a schema version as a part of the key, such as 'v1' in {_PROFILE_SHOWN!r}",
        short(ada),
        "When the shape of a cached profile changes (a field added, renamed), the new code must not "
        "decode entries the old code wrote: it moves to `v2`, and never reads a `v1` entry.",
        'f"ex05:profile:v1:{user_id}"',
    )


async def _profile_hits(scene: _ProfileScene) -> str | None:
    first = await scene.get(_ADA)
    reads = scene.db.reads[_ADA]
    expect(
        first == _PROFILES[_ADA],
        f"user {_ADA}'s profile, {_PROFILES[_ADA]}",
        short(first),
        "On a miss, read the database, `profile = await db.read(user_id)`, and return what it gave.",
    )
    expect(
        reads == 1,
        "1 database read for a first call, with nothing cached yet",
        f"{reads}",
        "Read the database once, on a miss: `profile = await db.read(user_id)`.",
    )
    keys = list(dict.fromkeys(scene.written))
    scene.filled[_ADA] = keys
    expect(
        keys,
        "the profile stored in Redis by the first call (a miss)",
        "get_profile stored no key in Redis",
        "Cache-aside fills the cache on a miss: after reading the database, store what you read.",
        _FILL_HINT,
    )
    second = await scene.get(_ADA)
    expect(
        scene.db.reads[_ADA] == 1,
        "1 database read for two calls: the second served from Redis",
        f"{scene.db.reads[_ADA]} reads: the second call read the database again",
        "Look in Redis first: `cached = await redis.get(key)`; if it is not None, return "
        "`json.loads(cached)` without touching the database.",
    )
    expect(
        second == _PROFILES[_ADA],
        f"the second call (a hit) to return the profile, {_PROFILES[_ADA]}",
        short(second),
        "Decode what Redis gives back: `return json.loads(cached)`.",
    )
    key = scene.answer.profile_key(_ADA)
    expect(
        key in keys,
        f"the profile cached under profile_key({_ADA}), {short(key)}",
        f"get_profile wrote {', '.join(map(repr, keys))}",
        "The job finds the entry by `profile_key(user_id)`: get_profile must store it under that very key.",
        "`key = profile_key(user_id)` in get_profile, and the same call in the job.",
    )
    return key


async def _two_users(scene: _ProfileScene) -> None:
    ada_keys = await scene.warm(_ADA)
    ben = await scene.get(_BEN)
    shared = ben == _PROFILES[_ADA]
    expect(
        ben == _PROFILES[_BEN],
        f"user {_BEN}'s profile, read after user {_ADA}'s: {_PROFILES[_BEN]}",
        f"user {_ADA}'s, {short(ben)}: users {_ADA} and {_BEN} shared one entry"
        + (f", {ada_keys[0]!r}" if ada_keys else "")
        if shared
        else short(ben),
        "A cache key holds everything the cached value depends on: here, whose profile it is. A key that "
        "leaves the user out serves everyone the profile cached first.",
        'Put the id in the key, `f"ex05:profile:v1:{user_id}"`, and use `profile_key` in both functions.',
    )
    again = await scene.get(_ADA)
    expect(
        again == _PROFILES[_ADA] and scene.db.reads[_BEN] == 1,
        f"each user's own profile, from Redis, on a second read: user {_ADA}'s {_PROFILES[_ADA]}",
        f"user {_ADA} got {short(again)}; user {_BEN}'s profile was read {scene.db.reads[_BEN]} times",
        "Each user's entry lives under a key of its own, and a second read of it is a hit.",
        "`key = profile_key(user_id)` in get_profile, with the user id in the key.",
    )


async def _bounded(scene: _ProfileScene, path: str, bound: int = _STALE_FOR) -> None:
    """Each of get_profile's entries in Redis expires within ``bound`` seconds."""
    entries = await scene.cached(scene.fills())
    expect(
        entries,
        f"user {_ADA}'s profile cached after {path}",
        "no key get_profile wrote was there",
        "On a miss, store what you read: " + _FILL_HINT,
    )
    job_keys = scene.job_wrote()
    for entry in entries:
        by = " (last written by the job)" if entry.key in job_keys else ""
        if entry.ttl == -1:
            raise Mismatch(
                f"the entry to expire within {_STALE_FOR} s after {path}: the most a profile may be stale",
                f"{entry.key!r} has no TTL{by}: if an invalidation is ever missed, the old profile is "
                "served for ever",
                [
                    "The TTL is what bounds staleness when the delete does not happen, or a race puts an "
                    f"old profile back: the text allows {_STALE_FOR} s at most.",
                    _FILL_HINT,
                ],
            )
        if bound == _STALE_FOR:
            expect(
                0 < entry.ttl <= bound,
                f"the entry to expire within {_STALE_FOR} s after {path}: the most a profile may be stale",
                f"a TTL of {entry.ttl:,} s on {entry.key!r}{by}: a missed invalidation, or the race the "
                f"order of the job leaves open, would serve an old profile that long, past the "
                f"{_STALE_FOR} s allowed",
                "The TTL is the bound on staleness: an entry lives at most that long, whatever happens to "
                f"its invalidation. Here the bound is {_STALE_FOR} s.",
                "`ex=STALE_AT_MOST` (or less) when get_profile stores the profile.",
            )
        else:
            expect(
                0 < entry.ttl <= bound,
                f"a hit to leave the entry's TTL alone: {bound} s left before the hit, at most that after",
                f"{entry.ttl:,} s after the hit: reading the entry set its TTL again, so a profile read more "
                f"often than once every {_STALE_FOR} s never expires",
                "A TTL that each hit renews no longer bounds staleness for a profile that is read often.",
                "On a hit, only read: `cached = await redis.get(key)`; the TTL is set when the entry is "
                "stored.",
            )


async def _ttl_paths(scene: _ProfileScene) -> None:
    """A first fill, a hit, then a refill after a job: every entry expires within the bound."""
    await scene.warm(_ADA)
    await _bounded(scene, "a first fill")
    for entry in await scene.cached(scene.fills()):
        await scene.raw.expire(entry.key, _CUT_TTL)  # as if it had been cached a while ago
    await scene.get(_ADA)
    await _bounded(scene, "a hit", bound=_CUT_TTL)
    await scene.job(_job())
    await _settle()
    await scene.get(_ADA)
    await _bounded(scene, "a refill after a job")


async def _late_fill(scene: _ProfileScene) -> None:
    """The race the order leaves: a read takes the old row before the job's commit and stores it after
    the job's delete. What it leaves must expire within the bound."""
    release = asyncio.Event()
    scene.db.slow_next_read = release
    reader = asyncio.ensure_future(scene.get(_ADA))
    try:
        await _until(scene.db.slowed, reader)
        await scene.job(_job())
        await _settle()
    finally:
        release.set()
        await asyncio.wait([reader], timeout=2)
    reader.result()
    await _bounded(
        scene, "a late fill (a read that took the old row before a job's commit and stored it after)"
    )


async def _missing_user(scene: _ProfileScene) -> None:
    """A read of a user who does not exist: None, and whatever it stored expires within the bound."""
    since = len(scene.written)
    value = await scene.get(_NOBODY)
    expect(
        value is None,
        f"None for user {_NOBODY}, who does not exist (the database read gives None)",
        short(value),
        "On a miss, return what the database gave: for a user it does not hold, `None`.",
    )
    for entry in await scene.cached(list(dict.fromkeys(scene.written[since:]))):
        if 0 < entry.ttl <= _STALE_FOR:
            continue
        held = f"{entry.key!r}" + (
            f", holding {short(entry.raw.decode('utf-8', 'replace'))}," if entry.raw else ""
        )
        raise Mismatch(
            f"whatever a read of user {_NOBODY}, who does not exist, stores to expire within {_STALE_FOR} s "
            "too (or nothing stored for them)",
            f"{held} has no TTL: found profiles expire, but this entry never does, so a user {_NOBODY} "
            "created later stays missing for ever"
            if entry.ttl == -1
            else f"a TTL of {entry.ttl:,} s on {held} past the {_STALE_FOR} s allowed: a user {_NOBODY} "
            "created later stays missing that long",
            [
                "The rule holds for every entry get_profile stores, a missing user's too: an expiry on one "
                "path and not the other leaves entries that outlive it.",
                "Store nothing for a missing user (`if profile is not None:` around the SET), or store it "
                "with the same `ex=STALE_AT_MOST` as a profile.",
            ],
        )
    again = await scene.get(_NOBODY)
    expect(
        again is None,
        f"None again for user {_NOBODY} on a second read",
        short(again),
        'Whatever you cache for a missing user must read back as None: `json.loads("null")` is None.',
    )


def _still_cached_seen(scene: _ProfileScene, key: str, since: int, calls: int, landed_later: bool) -> str:
    """Why ``key`` was still in Redis when the job returned."""
    seen = f"{key!r} was still cached when the job returned"
    deleted = list(dict.fromkeys(scene.deleted[since:]))
    if key in scene.job_wrote():
        written = sorted(scene.by_writer & _WRITES)
        return (
            seen + f": the job stored the profile again itself ({', '.join(written)}), so the next read was "
            "served by Redis, not the database"
        )
    if scene.by_writer & _EXPIRES and key not in deleted:
        return (
            seen + f": the job gave it a short TTL ({', '.join(sorted(scene.by_writer & _EXPIRES))}) instead "
            "of deleting it, and until that runs out every read gets the old profile"
        )
    if landed_later:
        return seen + "; its delete reached Redis only later (a task that nobody awaited)"
    if not deleted and scene.delete_calls > calls:
        return seen + ": the job called redis.delete without `await`, so it never ran"
    if not deleted:
        return seen + ", and the job deleted no key: the next read serves the old profile until the TTL"
    return (
        seen + f": the job deleted {', '.join(map(repr, deleted))}, but the profile is cached under {key!r}"
    )


async def _job_invalidates(scene: _ProfileScene) -> None:
    """Ada and Ben cached; a job for Ada: her entry gone when it returns, her next read from the
    database, and Ben's still a hit."""
    ada_keys = await scene.warm(_ADA)
    ben_keys = await scene.warm(_BEN)
    ada_reads, ben_reads = scene.db.reads[_ADA], scene.db.reads[_BEN]
    since, calls = len(scene.deleted), scene.delete_calls
    await scene.job(_job())
    if scene.db.profile(_ADA) != _UPDATED:
        await asyncio.sleep(0.2)  # a write left running commits now: seen only to name the flaw
        raise Mismatch(
            "the job to write the update to the database before it returns",
            "the database still held the old profile when the job returned"
            + (
                "; the write committed only later (a task that nobody awaited)"
                if scene.db.commits[_ADA]
                else ""
            ),
            [
                "The worker counts the job done when your function returns, so the write must have "
                "committed by then: a write left in a task may still be running, or fail where nobody sees "
                "it.",
                "`await apply_profile_update(db, update)`, not `asyncio.ensure_future(…)` or a call without "
                "`await`; then the delete.",
            ],
        )
    left = _cached_elsewhere(ada_keys)  # holds this loop: what the job left running waits
    await asyncio.sleep(0.05)  # and lands now: seen only to name the flaw
    if left:
        landed_later = not await scene.raw.exists(left[0]) and left[0] not in scene.job_wrote()
        raise Mismatch(
            f"user {_ADA}'s entry gone when the job returns, so that the next read loads the new profile "
            "from the database",
            _still_cached_seen(scene, left[0], since, calls, landed_later),
            [
                "The job is done when the entry is gone: the next read may come a moment later, on any "
                "instance of the service, and must go to the database.",
                "Invalidate, do not refill: the job deletes the key after its write, and the next "
                "get_profile loads the new profile (an import touches many users, most of whom nobody "
                "reads before the TTL).",
                _JOB_HINT,
            ],
        )
    after = await scene.get(_ADA)
    expect(
        after == _UPDATED and scene.db.reads[_ADA] == ada_reads + 1,
        f"user {_ADA}'s next read to come from the database with the new profile, {_profile_seen(_UPDATED)}",
        f"{_profile_seen(after)}, with {scene.db.reads[_ADA] - ada_reads} database reads",
        "Once the entry is gone, the next read misses, reads the database once, and stores the new profile.",
        'Delete the very key get_profile stores the profile under: `profile_key(update["user_id"])`.',
    )
    ben = await scene.get(_BEN)
    deleted = list(dict.fromkeys(scene.deleted[since:]))
    ben_deleted = [key for key in ben_keys if key in deleted]
    expect(
        scene.db.reads[_BEN] == ben_reads and ben == _PROFILES[_BEN],
        f"user {_BEN}'s entry left alone by a job for user {_ADA}: a hit, with no database read",
        f"user {_BEN}'s profile was read from the database again"
        + (
            f": the job deleted {', '.join(map(repr, ben_deleted))} too"
            if ben_deleted
            else f", after the job deleted {', '.join(map(repr, deleted))}"
            if deleted
            else ""
        ),
        "An update to one user invalidates that user's entry only: deleting other entries (a whole "
        "namespace, every profile) turns each of their next reads into a database read, and an import of "
        "many users into a stampede on the database.",
        "Delete one key, the updated user's: " + _JOB_HINT,
    )


async def _read_during_write(scene: _ProfileScene) -> None:
    """A read while the job's write is half-done: after a delete before the write, it refills the old
    profile."""
    await scene.warm(_ADA)
    scene.db.hold = asyncio.Event()
    job = asyncio.ensure_future(scene.job(_job()))
    try:
        await _until(scene.db.writing, job)
        expect(
            scene.db.writing.is_set(),
            "the job to write to the database (the check pauses that write half-way)",
            "no database write within 2 s",
            "The job's body applies the update: the given `apply_profile_update` writes it.",
            "`await apply_profile_update(db, update)`.",
        )
        await scene.get(_ADA)  # while the write is half-done
        scene.db.hold.set()
        await asyncio.wait_for(job, 2)
    finally:
        scene.db.hold.set()
        if not job.done():
            job.cancel()
        await asyncio.gather(job, return_exceptions=True)
    await _settle()
    missed_during = scene.db.reads[_ADA] > 1  # the warm-up read, and one during the write
    after = await scene.get(_ADA)
    before_write = scene.deleted_at_write or 0
    after_commit = len(scene.deleted) - (scene.deleted_at_commit or 0)
    how = (
        "the job deleted the key before its write, a read during the write missed, read the old row and "
        "cached it again"
        if before_write and missed_during
        else "a read during the write left the old profile cached"
    )
    expect(
        after == _UPDATED,
        f"the new profile ({_profile_seen(_UPDATED)}) once the job has returned, even with a read during "
        "the write",
        f"{_profile_seen(after)}: {how}"
        + (" (it was in Redis when the write committed)" if scene.cached_at_commit else "")
        + (
            ", and the job deleted nothing after its commit, so it stays stale until the TTL"
            if not after_commit
            else ""
        ),
        "Until the write commits, the database still holds the old row: a read that misses in between puts "
        "the old profile straight back into the cache.",
        "Delete after the write: " + _JOB_HINT,
    )


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


async def _failed_job(scene: _ProfileScene, *, expect_raise: bool = True) -> bool:
    """Run the job with its write failing; whether it raised (an error of its own is raised again)."""
    scene.db.fail_writes = 1
    try:
        await scene.job(_job())
    except Exception as error:
        if not _caused_by(error, _WriteFailed):
            raise
        return True
    finally:
        scene.db.fail_writes = 0
    if expect_raise:
        raise Mismatch(
            "the job to raise when its write fails, as the write did",
            "it returned normally: the worker counts the job done and never retries it, so the update is "
            "lost",
            [
                "A job reports failure by raising: that is how the worker knows to retry it (chapter 2).",
                "Let the write's exception propagate: no `try`/`except` around "
                "`await apply_profile_update(db, update)`, or `raise` again at the end of the `except`.",
            ],
        )
    return False


async def _write_fails(scene: _ProfileScene) -> None:
    """Ada cached; a job whose write fails: it raises, and Ada's entry stays (no needless miss)."""
    keys = await scene.warm(_ADA)
    reads, since = scene.db.reads[_ADA], len(scene.deleted)
    await _failed_job(scene)
    gone = [key for key in keys if key in scene.deleted[since:]]
    left = [key for key in keys if await scene.raw.exists(key)]
    value = await scene.get(_ADA)
    when = (
        "before its write, which then failed"
        if scene.deleted_at_write is not None and scene.deleted_at_write > since
        else "although its write failed"
    )
    expect(
        left and scene.db.reads[_ADA] == reads and value == _PROFILES[_ADA],
        f"user {_ADA}'s cached profile left in place: the write failed, so the database, and the cache, "
        "still hold the old profile, and the next read is a hit",
        (f"the job deleted {', '.join(map(repr, gone))} {when}" if gone else "the entry was gone")
        + f": the next read missed and went to the database ({scene.db.reads[_ADA] - reads} database "
        + ("read)" if scene.db.reads[_ADA] - reads == 1 else "reads)"),
        "When the write fails, nothing changed in the database, so the cached profile is still right: "
        "deleting it only costs a miss. And a failing import is retried, often while the database is "
        "struggling: each attempt would send it more reads.",
        "Delete only once the write has returned: after `await apply_profile_update(db, update)`, not before "
        "it or in a `finally:`; an exception from the write then skips the delete.",
    )


async def _run_twice(scene: _ProfileScene) -> None:
    """A job that wrote, run again (its acknowledgement was lost): no error, the new profile."""
    await scene.warm(_ADA)
    await scene.warm(_BEN)
    await scene.job(_job())
    await _settle()
    await scene.get(_ADA)  # refilled with the new profile
    try:
        await scene.job(_job())
        await _settle()
    except Exception as error:
        raise Mismatch(
            "a job run a second time, after it wrote (a retry), to succeed and change nothing",
            f"the second run raised {type(error).__name__}: {short(str(error), 100)}: the worker counts it "
            "failed and retries it again, until it gives up and reports an update that was applied as lost",
            [
                "Workers deliver a job at least once: a job whose acknowledgement is lost runs again. Its "
                "body must be safe to repeat: writing the same values again and deleting a key that is "
                "already gone are both harmless.",
                "Let a repeat run do the same thing again, or return early if you record finished jobs, "
                "but do not raise: " + _JOB_HINT,
            ],
        ) from None
    after = await scene.get(_ADA)
    expect(
        after == _UPDATED,
        f"user {_ADA}'s new profile ({_profile_seen(_UPDATED)}) after the job ran twice",
        _profile_seen(after),
        "A repeated job must leave what the first run left: the new profile in the database, and no "
        "old one in the cache.",
        _JOB_HINT,
    )


async def _retry_after_failure(scene: _ProfileScene) -> None:
    """A job whose write failed, retried: the retry must apply the update."""
    await scene.warm(_ADA)
    await _failed_job(scene, expect_raise=False)
    commits = scene.db.commits[_ADA]
    await scene.job(_job())
    await _settle()
    expect(
        scene.db.commits[_ADA] > commits and scene.db.profile(_ADA) == _UPDATED,
        "the retry of a job whose write failed to write the update",
        "the retry returned without writing: the database still holds the old profile"
        + (
            f"; the job recorded itself as done ({', '.join(scene.job_wrote())}) before its write, so the "
            "retry took it for a repeat"
            if scene.job_wrote()
            else ""
        ),
        "A job is done when its write has committed and the entry is gone: whatever marks it done must "
        "come after both, or a failed attempt is taken for a finished one and the update is lost.",
        "Record a finished job (if you do) only after the write and the delete, e.g. "
        "`await redis.set(f\"ex05:done:{update['job_id']}\", 1, ex=86_400)` as the last line.",
    )
    after = await scene.get(_ADA)
    expect(
        after == _UPDATED,
        f"user {_ADA}'s new profile ({_profile_seen(_UPDATED)}) after the retry",
        _profile_seen(after),
        "The retry that wrote must delete the entry too, like any run that wrote.",
        _JOB_HINT,
    )


def check_profile_cache(
    profile_key: Callable[[int], str],
    get_profile: Callable[..., Awaitable[Any]],
    apply_update_and_invalidate: Callable[..., Awaitable[None]],
) -> None:
    """Check Exercise 5.4: a profile cache, invalidated by an import job after its write commits.

    ``profile_key(41)`` must be a str under ``ex05:``, with the id and a version part (``v1``), and
    differ from ``profile_key(42)``. Each scenario then runs on a fresh loop, with a database of the
    check's own (the notebook's ``ProfileDatabase``: 10 ms a read, reads and commits counted per user,
    users 41 and 42) and a Redis client of its own (``decode_responses=True``); keys under ``ex05:``, and
    any other key the answer wrote, are deleted before and after. The job is called as a worker calls
    it, with the update ``{"job_id", "user_id": 41, "changes"}``. A first read of 41 reads the database
    once, a second is a hit, and the entry is under ``profile_key(41)``; users 41 and 42 get their own
    profiles; every entry get_profile leaves expires within 60 s: after a first fill, after a hit (the
    check cuts the TTL to 5 s first: the hit must not set it back up), after a refill following a job,
    and after a late fill (a read that took the old row before the job's commit, answered only after the
    job returned: the race the order leaves, which the TTL bounds); a read of user 43, who does not
    exist, returns None, and whatever it stores expires within 60 s too (storing nothing is fine). What
    get_profile stored is what its commands wrote and any key under ``ex05:`` that appeared in Redis
    during the call (a fill inside a script, ``EVAL``, is one). After a job for 41: the write has
    committed when it returns, the entry is gone (asked from another loop while the check's is held, so
    a delete left in a task nobody awaited has not landed), 41's next read comes from the database with
    the new profile, and 42's is still a hit (the other scenarios give what a job left running 50 ms to
    land before they read on). A read made while the job's write is half-done (the check pauses it)
    must not leave the old profile cached (rejects deleting before the write; the database notes what
    had been deleted when the write began and committed, and what Redis held then). A job whose write
    fails must raise (the write's error, or one caused by it) and leave 41's entry in place. A job run
    twice must not raise and leaves the new profile; a failed job retried must write it.
    """
    with exercise("5.4", "Cache a profile whose writes arrive through a background job", SOLUTION) as ex:
        functions = (
            ("profile_key", profile_key),
            ("get_profile", get_profile),
            ("apply_update_and_invalidate", apply_update_and_invalidate),
        )
        for name, function in functions:
            expect(
                callable(function),
                f"the function `{name}`",
                short(function),
                "Call the check as "
                "`check_profile_cache(profile_key, get_profile, apply_update_and_invalidate)`.",
            )
        answer = _ProfileAnswer(profile_key, get_profile, apply_update_and_invalidate)

        def scene(body: Callable[[_ProfileScene], Awaitable[Any]], name: str) -> Callable[[], Any]:
            return lambda: _profile_scenario(answer, body, name)

        ex.step(
            f"profile_key gives each user a key of their own, with the id and a version ({_PROFILE_SHOWN})",
            lambda: _check_profile_key(profile_key),
        )
        ex.require(
            "get_profile reads the database once, then serves the profile from Redis",
            scene(_profile_hits, "hits"),
        )
        hangs: list[str] = []

        def both(*bodies: tuple[Callable[[_ProfileScene], Awaitable[None]], str]) -> Callable[[], None]:
            def run() -> None:
                for body, name in bodies:
                    _profile_scenario(answer, body, name)

            return _watch(hangs, run)

        for description, run in (
            (
                f"users {_ADA} and {_BEN} each get their own profile",
                _watch(hangs, scene(_two_users, "two-users")),
            ),
            (
                f"every entry expires within {_STALE_FOR} s: after a first fill, a hit, a refill after a "
                "job, a late fill that raced a job, and a read of a user who does not exist",
                both((_ttl_paths, "ttl"), (_late_fill, "late-fill"), (_missing_user, "missing-user")),
            ),
            (
                f"after a job for user {_ADA}, its next read comes from the database with the new profile, "
                f"and user {_BEN}'s entry is still a hit",
                _watch(hangs, scene(_job_invalidates, "job")),
            ),
            (
                "the job deletes the entry after its write commits: a read during the write leaves nothing "
                "stale",
                _watch(hangs, scene(_read_during_write, "read-during-write")),
            ),
            (
                "a job whose write fails raises, and leaves the cached profile in place",
                _watch(hangs, scene(_write_fails, "write-fails")),
            ),
            (
                "a retried job is harmless: run again after it wrote, or after it failed, it leaves the new "
                "profile",
                both((_run_twice, "run-twice"), (_retry_after_failure, "retry")),
            ),
        ):
            if not ex.step(description, run) and hangs:
                return
