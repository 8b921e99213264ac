"""support.checks.ch05: chapter 5's checks pass right answers and name each plausible wrong one.

Every answer here is written the way a learner would write it in the exercise cell; the database
(`ProductDatabase`) and the Redis client are the check's own, as in the notebook.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import pickle
import re
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from support.checks import forget_answers, placeholder_message
from support.checks.ch05 import (
    check_cache_aside,
    check_coalescer,
    check_profile_cache,
    check_recommendations_key,
)
from tests.checking import fresh_and_leaves_nothing_running, rejected


@pytest.fixture(autouse=True)
def _fresh_and_leaves_nothing_running(redis_backend: str) -> Iterator[None]:
    """Every test runs on fakeredis and on a real Redis (tests/backends.py)."""
    with fresh_and_leaves_nothing_running(redis_pattern="ex05:*", redis_keys=("7", "404")):
        yield


# ---------------------------------------------------------------------------------------------------
# Exercise 5.1: cache-aside, invalidated on write
# ---------------------------------------------------------------------------------------------------


def cache_answer(variant: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``get_product`` and ``update_price`` as a learner might write them."""
    ttl = {"no-ttl": None, "year-ttl": 365 * 86_400}.get(variant, 300)

    def product_key(product_id: int) -> str:
        if variant == "hard-coded-key":  # the id of the example in the text, written in
            return "ex05:product:v1:7"
        if variant == "bare-key":
            return str(product_id)
        if variant == "no-version":
            return f"ex05:product:{product_id}"
        return f"ex05:product:v1:{product_id}"

    async def get_product(redis: Any, db: Any, product_id: int) -> dict | None:
        if variant == "placeholder":
            raise NotImplementedError(placeholder_message("5.1"))
        key = product_key(product_id)
        if variant == "waits-for-fill":  # as with the lesson's lock: wait for someone else to fill it
            while (cached := await redis.get(key)) is None:
                await asyncio.sleep(0.02)
            return json.loads(cached)
        if variant == "getex":  # "keep hot products warm": every hit sets the TTL again
            if (cached := await redis.getex(key, ex=ttl)) is not None:
                return json.loads(cached)
        elif variant != "never-hits" and (cached := await redis.get(key)) is not None:
            return pickle.loads(cached) if variant == "pickle" else json.loads(cached)
        product = await db.read(product_id)
        if product is None:
            if variant == "negative-forever":  # "remember that it is missing"
                await redis.set(key, "null")
            elif variant == "negative-ttl":  # right too: a miss cached briefly
                await redis.set(key, "null", ex=30)
            return None
        value: Any = json.dumps(product)
        if variant == "pipeline":  # right too: SET and EXPIRE in one MULTI/EXEC
            async with redis.pipeline(transaction=True) as pipe:
                pipe.set(key, value)
                pipe.expire(key, ttl)
                await pipe.execute()
            return product
        if variant == "pickle":
            value = pickle.dumps(product)
        elif variant == "repr":
            value = str(product)
        elif variant == "unserialised":
            value = product
        await redis.set(key, value, ex=ttl)
        return product

    async def update_price(redis: Any, db: Any, product_id: int, price_cents: int) -> None:
        if variant == "placeholder-update":
            raise NotImplementedError(placeholder_message("5.1"))
        key = product_key(product_id)
        if variant == "delete-before":
            await redis.delete(key)
            await db.write(product_id, price_cents)
            return
        if variant == "double-delete":  # right too: before the write, and again after the commit
            await redis.delete(key)
        if variant == "write-not-awaited":  # "return fast": the write goes on in a task
            asyncio.ensure_future(db.write(product_id, price_cents))  # noqa: RUF006 (the mistake under test)
            await redis.delete(key)
            return
        await db.write(product_id, price_cents)
        if variant == "delete-not-awaited":
            redis.delete(key)  # a coroutine, created and never run
            return
        if variant == "fire-and-forget":  # "do not make the writer wait for Redis"
            asyncio.ensure_future(redis.delete(key))  # noqa: RUF006 (the mistake under test)
            return
        if variant == "patch":  # write-through: the cached copy updated in place
            if (cached := await redis.get(key)) is not None:
                await redis.set(key, json.dumps({**json.loads(cached), "price_cents": price_cents}), ex=ttl)
            return
        if variant == "no-invalidation":
            return
        if variant == "rewarm":  # "so the next visitor gets a hit"
            await redis.delete(key)
            await get_product(redis, db, product_id)
            return
        if variant == "rewarm-if-absent":  # the same, with SET NX "so as not to overwrite a newer entry"
            await redis.delete(key)
            await redis.set(key, json.dumps(await db.read(product_id)), ex=ttl, nx=True)
            return
        if variant == "wrong-key":
            await redis.delete(f"ex05:product:{product_id}")
        elif variant == "write-through":  # the new value read back and written over the old one
            await redis.set(key, json.dumps(await db.read(product_id)), ex=ttl)
        else:
            await redis.delete(key)

    return get_product, update_price


@pytest.mark.parametrize("variant", ["right", "negative-ttl", "double-delete", "pipeline"])
def test_5_1_cache_aside_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_cache_aside(*cache_answer(variant))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 5.1 · Cache-aside, invalidated on write\n")
    assert "  ✅ passed: it is cached under a namespaced, versioned key (ex05:product:v1:7)\n" in out
    assert (
        "  ✅ passed: update_price deletes the key after the write: a read during the write leaves "
        "nothing stale\n"
    ) in out
    assert out.endswith("Exercise 5.1: passed ✅ (11 of 11 checks)\n")


@pytest.mark.parametrize("variant", ["placeholder", "placeholder-update"])
def test_5_1_placeholder_is_not_started(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer(variant))
    assert "⬜ not started: Exercise 5.1's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 5.1: not started")


def test_5_1_no_invalidation_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("no-invalidation"))
    assert (
        "❌ not yet: after update_price returns, the next read (here or on another instance) has the new "
        "price\n"
        "       expected: the next read after update_price to return the new price, 2499\n"
        "       seen:     price_cents 1999: the cache still held the old price, and update_price deleted "
        "no key\n"
        "       hint:     The write went to the database only"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 7 of 8 checks pass")


def test_5_1_deleting_the_wrong_key_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("wrong-key"))
    assert (
        "seen:     price_cents 1999: the cache still held the old price; update_price deleted "
        "'ex05:product:7', but it is cached under 'ex05:product:v1:7'\n"
        "       hint:     update_price must delete the very key that get_product stores the product under.\n"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 7 of 8 checks pass")


def test_5_1_deleting_before_the_write_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("delete-before"))
    assert (
        "❌ not yet: update_price deletes the key after the write: a read during the write leaves "
        "nothing stale\n"
        "       expected: the price 2499 once update_price has returned, even with a read during the write\n"
        "       seen:     price_cents 1999: a read during the write missed (the key was already deleted), "
        "read the old row, and cached it again; nothing deleted it after the write, so it stays stale until "
        "the TTL\n"
    ) in out
    assert "hint:     Until the write commits, the database still holds the old row" in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    answer = cache_answer("delete-before")
    first = rejected(capsys, check_cache_aside, *answer)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_cache_aside, *answer)
    assert "Delete after the write:" not in first
    assert "hint:     Delete after the write: `await db.write(product_id, price_cents)` first" in second


def test_5_1_no_ttl_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("no-ttl"))
    assert (
        "❌ not yet: the cached value expires: a TTL of at most a day\n"
        "       expected: the entry to expire on its own: a TTL of at most a day\n"
        "       seen:     'ex05:product:v1:7' has no TTL: if an invalidation is ever missed"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_a_ttl_of_a_year_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("year-ttl"))
    assert "       seen:     a TTL of 31,536,000 s (about 365 days)" in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_pickle_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("pickle"))
    assert (
        "❌ not yet: the cached value is JSON\n"
        "       expected: JSON under 'ex05:product:v1:7'\n"
        "       seen:     a pickle, b'\\x80"
    ) in out
    assert "hint:     Unpickling runs code" in out
    assert out.endswith("Exercise 5.1: not yet — 3 of 4 checks pass")


def test_5_1_a_python_repr_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("repr"))
    assert "not JSON but Python's repr, `str(product)`" in out
    assert out.endswith("Exercise 5.1: not yet — 3 of 4 checks pass")


def test_5_1_a_dict_stored_as_it_is_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("unserialised"))
    assert (
        "❌ not yet: a first call returns the product, read from the database\n"
        "       expected: a value Redis can store: the product as a JSON string\n"
        "       seen:     redis-py refused it: Invalid input of type: 'dict'."
    ) in out
    assert "your code raised" not in out
    assert out.endswith("Exercise 5.1: not yet — 0 of 1 checks pass")


@pytest.mark.parametrize(("variant", "written"), [("bare-key", "'7'"), ("no-version", "'ex05:product:7'")])
def test_5_1_a_key_without_namespace_or_version_is_rejected(
    variant: str, written: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer(variant))
    assert (
        "❌ not yet: it is cached under a namespaced, versioned key (ex05:product:v1:7)\n"
        "       expected: the product cached under 'ex05:product:v1:7': the namespace ex05:product, a "
        "version, the id\n"
        f"       seen:     written: {written}\n"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_a_miss_cached_for_ever_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("negative-forever"))
    assert (
        "❌ not yet: a product that does not exist gives None, and is not cached for ever\n"
        "       expected: nothing cached for ever about product 404, which does not exist\n"
        "       seen:     'ex05:product:v1:404' = b'null' with no TTL"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_a_cache_never_read_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("never-hits"))
    assert (
        "❌ not yet: a second call is a hit: no database read\n"
        "       expected: 1 database read for two calls: the second served from Redis\n"
        "       seen:     2 reads: the second call read the database again\n"
    ) in out
    assert re.search(
        r"       seen:     (299|300) s after the hit: the second call was no hit: it read the", out
    )
    assert out.endswith("Exercise 5.1: not yet — 9 of 11 checks pass")


def test_5_1_a_ttl_renewed_on_every_hit_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("getex"))
    assert (
        "❌ not yet: a hit leaves the TTL alone: the entry still expires on time\n"
        "       expected: a hit to leave the entry's TTL alone: 100 s left before the hit, at most that "
        "after\n"
    ) in out
    assert re.search(
        r"       seen:     (299|300) s after the hit: reading the entry set its TTL again \(GETEX, EXPIRE or "
        r"a new SET\), so a product read more often than once a TTL never expires\n",
        out,
    )
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_a_delete_nobody_awaits_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("fire-and-forget"))
    assert (
        "❌ not yet: after update_price returns, the next read (here or on another instance) has the new "
        "price\n"
        "       expected: a read right after update_price returned, on another instance, to get the new "
        "price, 2499\n"
        "       seen:     price_cents 1999: the entry was still cached when update_price returned; its "
        "delete reached Redis only later (a task that nobody awaited)\n"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 7 of 8 checks pass")


def test_5_1_a_write_nobody_awaits_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("write-not-awaited"))
    assert (
        "       expected: update_price to write price_cents 2499 to the database before it returns\n"
        "       seen:     the database still held 1999 when update_price returned; the write committed only "
        "later (a task that nobody awaited)\n"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 7 of 8 checks pass")


def test_5_1_a_delete_never_awaited_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.warns(RuntimeWarning, match="never awaited"):
        out = rejected(capsys, check_cache_aside, *cache_answer("delete-not-awaited"))
        gc.collect()
    assert (
        "       seen:     price_cents 1999: the cache still held the old price: update_price called "
        "redis.delete without `await`, so it never ran\n"
        "       hint:     Calling an async method only creates a coroutine"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 7 of 8 checks pass")


@pytest.mark.parametrize("variant", ["write-through", "patch"])
def test_5_1_writing_the_new_value_instead_of_deleting_is_rejected(
    variant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer(variant))
    assert (
        "❌ not yet: two updates at once leave the newer price: the entry is deleted, not overwritten or "
        "refilled\n"
        "       expected: after two updates at once (2499, then 2999), the price the database holds, 2999\n"
        "       seen:     price_cents 2499: update_price wrote the price into the cache (SET), and the first "
        "writer's copy landed after the second's\n"
        "       hint:     Writing the new value into the cache (write-through) races"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_a_key_that_leaves_out_the_id_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("hard-coded-key"))
    assert (
        "❌ not yet: each product has an entry of its own: products 7 and 8, read and updated\n"
        "       expected: product 8, read after product 7: {'id': 8, 'name': 'office chair', 'price_cents': "
        "8999}\n"
        "       seen:     product 7, {'id': 7, 'name': 'desk lamp', 'price_cents': 1999}: products 7 and 8 "
        "shared one entry, 'ex05:product:v1:7': the key does not depend on the id\n"
        "       hint:     A cache key holds everything the cached value depends on"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_refilling_the_entry_in_update_price_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("rewarm"))
    assert (
        "❌ not yet: two updates at once leave the newer price: the entry is deleted, not overwritten or "
        "refilled\n"
        "       expected: after two updates at once (2499, then 2999), the price the database holds, 2999\n"
        "       seen:     price_cents 2499: after its delete, update_price read the product again and cached "
        "it (a re-warm): the first writer's read got 2499, before the second writer's commit, and its SET "
        "landed after the second writer's delete\n"
        "       hint:     When update_price returns, the entry must be gone"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_refilling_the_entry_only_if_absent_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("rewarm-if-absent"))
    assert (
        "❌ not yet: two updates at once leave the newer price: the entry is deleted, not overwritten or "
        "refilled\n"
        "       expected: the entry gone once both updates have returned: the next read loads it from the "
        "database\n"
        "       seen:     'ex05:product:v1:7' was cached again by update_price\n"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 10 of 11 checks pass")


def test_5_1_an_answer_that_never_returns_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_cache_aside, *cache_answer("waits-for-fill"))
    assert (
        "❌ not yet: a first call returns the product, read from the database\n"
        "       expected: get_product and update_price to return within a second or so\n"
        "       seen:     no return within 5 s\n"
    ) in out
    assert out.endswith("Exercise 5.1: not yet — 0 of 1 checks pass")


# ---------------------------------------------------------------------------------------------------
# Exercise 5.2: coalesce concurrent loads
# ---------------------------------------------------------------------------------------------------


def coalescer_answer(variant: str) -> type:
    """``Coalescer`` as a learner might write it."""

    class Coalescer:
        def __init__(self) -> None:
            if variant == "placeholder":
                raise NotImplementedError(placeholder_message("5.2"))
            self._loads: dict[Any, Any] = {}
            self._lock = asyncio.Lock()
            self._waiting: Counter[Any] = Counter()
            self._results: dict[Any, Any] = {}
            self._task: asyncio.Future | None = None

        async def run(self, key: Any, load: Callable[[], Any]) -> Any:
            if variant == "no-coalescing":
                return await load()
            if variant == "never-resolves":  # the waiters' Future is never given the result
                if key in self._loads:
                    return await self._loads[key]
                self._loads[key] = asyncio.get_running_loop().create_future()
                return await load()
            if variant == "global-lock":  # one lock; results kept while anyone waits
                self._waiting[key] += 1
                try:
                    async with self._lock:
                        if key not in self._results:
                            self._results[key] = await load()
                        return self._results[key]
                finally:
                    self._waiting[key] -= 1
                    if not self._waiting[key]:
                        self._results.pop(key, None)
            if variant == "one-flight":  # one load at a time, whatever the key
                if self._task is None:
                    self._task = asyncio.ensure_future(load())
                    self._task.add_done_callback(lambda _: setattr(self, "_task", None))
                return await asyncio.shield(self._task)
            if variant == "leader-future":  # the first caller loads, the others wait on a Future
                if key in self._loads:
                    return await self._loads[key]
                future = asyncio.get_running_loop().create_future()
                self._loads[key] = future
                try:
                    result = await load()
                except Exception as error:
                    future.set_exception(error)
                    raise
                else:
                    future.set_result(result)
                    return result
                finally:
                    del self._loads[key]
            if variant == "leader-task":  # right too: the task forgets itself in `finally`
                if key not in self._loads:

                    async def leader() -> Any:
                        try:
                            return await load()
                        finally:
                            del self._loads[key]

                    self._loads[key] = asyncio.ensure_future(leader())
                return await asyncio.shield(self._loads[key])
            if variant == "starter-forgets":  # the caller that started the load removes it in `finally`
                if key in self._loads:
                    return await asyncio.shield(self._loads[key])
                self._loads[key] = asyncio.ensure_future(load())
                try:
                    return await asyncio.shield(self._loads[key])
                finally:
                    self._loads.pop(key, None)
            if variant == "str-key":  # "so that unhashable keys work too"
                key = str(key)
            task = self._loads.get(key)
            if task is None:
                task = asyncio.ensure_future(load())
                self._loads[key] = task
                if variant not in ("memo", "keep-failures"):
                    task.add_done_callback(lambda _: self._loads.pop(key, None))
            if variant == "no-shield":
                return await task
            if variant == "keep-failures":  # forgotten after a success only
                result = await asyncio.shield(task)
                self._loads.pop(key, None)
                return result
            return await asyncio.shield(task)

    return Coalescer


@pytest.mark.parametrize("variant", ["right", "leader-task"])
def test_5_2_a_coalescer_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_coalescer(coalescer_answer(variant))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 5.2 · Coalesce concurrent loads (single-flight)\n")
    assert "  ✅ passed: 100 concurrent calls for one key: 1 load, and all 100 get its result\n" in out
    assert (
        "  ✅ passed: cancelling the first caller leaves the load running, and shared, for the others\n"
        in out
    )
    assert out.endswith("Exercise 5.2: passed ✅ (5 of 5 checks)\n")


def test_5_2_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("placeholder"))
    assert "⬜ not started: Exercise 5.2's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 5.2: not started")


def test_5_2_no_coalescing_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("no-coalescing"))
    assert (
        "❌ not yet: 100 concurrent calls for one key: 1 load, and all 100 get its result\n"
        "       expected: 1 load for 100 concurrent calls of run('ex05:item:1', load)\n"
        "       seen:     100 loads: every caller ran its own\n"
        "       hint:     The first caller for a key starts the load"
    ) in out
    assert "       seen:     10 loads: each caller ran its own, at the same time\n" in out
    assert "       seen:     5 loads: each caller ran its own\n" in out
    assert out.endswith("Exercise 5.2: not yet — 2 of 5 checks pass")


def test_5_2_a_global_lock_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("global-lock"))
    assert "  ✅ passed: 100 concurrent calls for one key: 1 load, and all 100 get its result\n" in out
    assert (
        "❌ not yet: two different keys (7 and '7' too) load at the same time, each getting its own result\n"
        "       expected: the loads of two different keys to run at the same time (2 in flight)\n"
        "       seen:     at most 1 at a time: the load for 'ex05:item:b' waited for the load for "
        "'ex05:item:a' to finish\n"
        "       hint:     One lock for every key makes each key wait for all the others"
    ) in out
    assert (
        "       expected: 1 load for the 10 callers, failure included\n"
        "       seen:     10 loads: the callers loaded again, one after another, after the first failed\n"
    ) in out
    assert "       seen:     2 loads: the first caller's load stopped when it was cancelled" in out
    assert out.endswith("Exercise 5.2: not yet — 2 of 5 checks pass")


def test_5_2_one_load_for_every_key_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("one-flight"))
    assert (
        "       seen:     'ex05:item:b' got the result of the load for 'ex05:item:a': one load for every "
        "key\n"
    ) in out
    assert out.endswith("Exercise 5.2: not yet — 4 of 5 checks pass")


def test_5_2_results_kept_for_ever_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("memo"))
    assert (
        "❌ not yet: once a load is done, the next call loads again: single-flight, not a cache\n"
        "       expected: a second load for a call made after the first load finished (2 loads in all for "
        "'ex05:item:2')\n"
        "       seen:     1 load: the later call got the first load's result, {'key': 'ex05:item:2', "
        "'load': 1}. run keeps results for ever"
    ) in out
    assert "seen:     it raised the earlier failure again, without loading (1 load in all)" in out
    assert out.endswith("Exercise 5.2: not yet — 3 of 5 checks pass")


def test_5_2_a_failure_kept_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("keep-failures"))
    assert (
        "❌ not yet: a failing load raises in every waiting caller, and the next call loads again\n"
        "       expected: the next call, after the failure, to load again\n"
        "       seen:     it raised the earlier failure again, without loading (1 load in all): the failed "
        "load was kept, and every later call for this key fails\n"
    ) in out
    assert out.endswith("Exercise 5.2: not yet — 4 of 5 checks pass")


def test_5_2_no_shield_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("no-shield"))
    assert (
        "❌ not yet: cancelling the first caller leaves the load running, and shared, for the others\n"
        "       expected: the other 4 callers to get the load's result when the first is cancelled\n"
        "       seen:     4 of 4 were cancelled too: cancelling the caller cancelled the load they all "
        "shared\n"
    ) in out
    assert out.endswith("Exercise 5.2: not yet — 4 of 5 checks pass")


def test_5_2_a_load_run_by_the_first_caller_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("leader-future"))
    assert (
        "       seen:     4 of 4 still waiting 2 s after the load could finish: the first caller ran the "
        "load itself, and when it was cancelled, nobody finished it\n"
    ) in out
    assert out.endswith("Exercise 5.2: not yet — 4 of 5 checks pass")


def test_5_2_forgetting_the_load_when_its_starter_is_cancelled_is_rejected(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("starter-forgets"))
    assert (
        "❌ not yet: cancelling the first caller leaves the load running, and shared, for the others\n"
        "       expected: a call made after the first caller was cancelled, while the load still ran, to "
        "share that load\n"
        "       seen:     it started load 2: the entry was removed when the caller that started the load was "
        "cancelled, while its load ran on, so two loads of one key ran at once\n"
    ) in out
    assert out.endswith("Exercise 5.2: not yet — 4 of 5 checks pass")


def test_5_2_keys_compared_as_strings_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("str-key"))
    assert (
        "❌ not yet: two different keys (7 and '7' too) load at the same time, each getting its own result\n"
        "       expected: keys 7 and '7' (not equal: two different keys) to load separately, each getting "
        "its own result\n"
        "       seen:     1 load for both; results [{'key': '7', 'load': 1}, {'key': '7', 'load': 1}]: the "
        "loads were looked up by something other than the key itself (str(key)?)\n"
    ) in out
    assert out.endswith("Exercise 5.2: not yet — 4 of 5 checks pass")


def test_5_2_an_answer_that_never_returns_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_coalescer, coalescer_answer("never-resolves"))
    assert (
        "❌ not yet: 100 concurrent calls for one key: 1 load, and all 100 get its result\n"
        "       expected: every call of run to return once its load is done (a load here takes 20 ms)\n"
        "       seen:     no return within 5 s\n"
        "       hint:     A caller that waits for something nobody will ever finish"
    ) in out
    assert out.endswith("Exercise 5.2: not yet — 0 of 1 checks pass")


# ---------------------------------------------------------------------------------------------------
# Exercise 5.3: a safe cache key
# ---------------------------------------------------------------------------------------------------

PLACEHOLDER_5_3 = placeholder_message("5.3")  # a constant: the check copies the function's names
SPACES = re.compile(r"\s+")


def key_answer(variant: str) -> Callable[[str, str, str], Any]:
    """``recommendations_key`` as a learner might write it."""

    def normalise(query: str) -> str:
        return SPACES.sub(" ", query).strip().casefold()

    def recommendations_key(user_id: str, query: str, lang: str) -> Any:
        if variant == "placeholder":
            raise NotImplementedError(PLACEHOLDER_5_3)
        if variant == "helper":  # right too: a helper function, a compiled pattern, another digest
            parts = json.dumps([user_id, normalise(query), lang]).encode()
            return f"ex05:recs:v1:{hashlib.blake2b(parts, digest_size=20).hexdigest()}"
        normalised = query if variant == "no-normalise" else query.strip().casefold()
        if variant == "lower":
            normalised = query.strip().lower()
        elif variant == "no-inner-space":
            normalised = "".join(query.split()).casefold()
        elif variant == "user-folded":  # every field normalised, the user id too
            user_id, lang = user_id.strip().casefold(), lang.strip().casefold()
        if variant == "ascii-ignore":  # "keys must be ASCII"
            raw = json.dumps([user_id, normalised, lang], ensure_ascii=False).encode("ascii", "ignore")
            return "ex05:recs:v1:" + hashlib.sha256(raw).hexdigest()
        if variant == "uuid5":  # right too: a name-based UUID, 122 bits of SHA-1
            return (
                f"ex05:recs:v1:{uuid.uuid5(uuid.NAMESPACE_URL, json.dumps([user_id, normalised, lang])).hex}"
            )
        if variant == "raw":
            return f"ex05:recs:v1:{user_id}:{query}:{lang}"
        if variant == "python-hash":
            return f"ex05:recs:v1:{hash((user_id, normalised, lang))}"
        if variant == "per-part":  # right too: a fixed-length digest of each part
            digests = [hashlib.sha256(part.encode()).hexdigest()[:20] for part in (user_id, normalised, lang)]
            return "ex05:recs:v1:" + ":".join(digests)
        if variant == "slug":  # user and language hashed; the query cleaned and cut
            slug = re.sub(r"[^a-z0-9]+", "-", normalised)[:50]
            return (
                f"ex05:recs:v1:{hashlib.sha256(json.dumps([user_id, lang]).encode()).hexdigest()[:32]}:{slug}"
            )
        if variant == "omit-user":
            parts = json.dumps([normalised, lang])
        elif variant == "joined":
            parts = f"{user_id}:{normalised}:{lang}"
        else:
            parts = json.dumps([user_id, normalised, lang])
        digest = hashlib.sha256(parts.encode()).hexdigest()
        if variant == "no-namespace":
            return digest
        if variant == "short-digest":  # "short keys": 8 hex digits, 32 bits
            return f"ex05:recs:v1:{digest[:8]}"
        if variant == "bytes":
            return f"ex05:recs:v1:{digest}".encode()
        return f"ex05:recs:v1:{digest}"

    return recommendations_key


@pytest.mark.parametrize("variant", ["right", "per-part", "helper", "uuid5"])
def test_5_3_a_hashed_key_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_recommendations_key(key_answer(variant))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 5.3 · A safe cache key\n")
    assert "  ✅ passed: the key is the same in another Python process (no hash())\n" in out
    assert out.endswith("Exercise 5.3: passed ✅ (7 of 7 checks)\n")


def test_5_3_placeholder_is_not_started(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("placeholder"))
    assert "⬜ not started: Exercise 5.3's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 5.3: not started")


def test_5_3_a_key_without_the_user_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("omit-user"))
    assert (
        "❌ not yet: the same inputs give the same key; another user, query or language, another key\n"
        "       expected: different keys for different users\n"
        "       seen:     ('alice', 'red shoes', 'en') and ('bob', 'red shoes', 'en') share 'ex05:recs:v1:"
    ) in out
    assert ": bob would be served alice's recommendations\n" in out
    assert out.endswith("Exercise 5.3: not yet — 6 of 7 checks pass")


def test_5_3_raw_input_in_the_key_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("raw"))
    assert (
        "❌ not yet: queries that differ only in case or surrounding whitespace share a key\n"
        "       expected: one key for 'red shoes', 'Red Shoes', '  RED SHOES\\t', 'red shoes ': the same "
        "search\n"
        "       seen:     'Red Shoes' gets 'ex05:recs:v1:alice:Red Shoes:en', 'red shoes' gets "
        "'ex05:recs:v1:alice:red shoes:en'\n"
    ) in out
    assert (
        "       expected: a key of at most 100 characters for a 10 kB query\n"
        "       seen:     a key of 10,022 characters: every request can store a key that size"
    ) in out
    assert "the parts were joined with ':', which can appear inside them" in out
    assert out.endswith("Exercise 5.3: not yet — 3 of 6 checks pass")


def test_5_3_pythons_hash_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("python-hash"))
    assert (
        "❌ not yet: the key is the same in another Python process (no hash())\n"
        "       expected: the same key in every process of the service (here, and with PYTHONHASHSEED 1 "
        "and 2)\n"
        "       seen:     for ('alice', 'red shoes', 'en'), this process made 'ex05:recs:v1:"
    ) in out
    assert "hint:     Python's `hash()` of a str is salted with a random seed per process" in out
    assert out.endswith("Exercise 5.3: not yet — 5 of 7 checks pass")


def test_5_3_parts_joined_with_a_colon_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("joined"))
    assert (
        "❌ not yet: the parts cannot run into each other: ('a', 'b:c') and ('a:b', 'c') get different keys\n"
        "       expected: different keys whenever the user, query or language differ\n"
        "       seen:     ('a', 'b:c', 'en') and ('a:b', 'c', 'en') share 'ex05:recs:v1:"
    ) in out
    assert out.endswith("Exercise 5.3: not yet — 6 of 7 checks pass")


def test_5_3_no_namespace_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("no-namespace"))
    assert (
        "❌ not yet: it returns a str under 'ex05:recs:v1:'\n"
        "       expected: a key starting with 'ex05:recs:v1:': the namespace, the kind of entry, a version\n"
    ) in out
    assert out.endswith("Exercise 5.3: not yet — 6 of 7 checks pass")


def test_5_3_a_query_not_normalised_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("no-normalise"))
    assert "❌ not yet: queries that differ only in case or surrounding whitespace share a key\n" in out
    assert "hint:     Normalise the query before it goes into the key" in out
    assert out.endswith("Exercise 5.3: not yet — 6 of 7 checks pass")


def test_5_3_a_truncated_query_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("slug"))
    assert (
        "       expected: different keys for two long queries that differ only at the end\n"
        "       seen:     both give 'ex05:recs:v1:"
    ) in out
    assert out.endswith("Exercise 5.3: not yet — 6 of 7 checks pass")


def test_5_3_bytes_are_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("bytes"))
    assert "       expected: a str\n       seen:     a value of type bytes: b'ex05:recs:v1:" in out
    assert out.endswith("Exercise 5.3: not yet — 0 of 1 checks pass")


@pytest.mark.parametrize(
    ("variant", "pair", "why"),
    [
        ("user-folded", "users 'Alice' and 'alice'", "the user id was normalised like the query"),
        ("no-inner-space", "queries 'red shoes' and 'redshoes'", "whitespace inside the query was removed"),
        ("ascii-ignore", "queries 'café' and 'caf'", "characters outside ASCII were dropped before hashing"),
    ],
)
def test_5_3_normalising_more_than_the_query_is_rejected(
    variant: str, pair: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer(variant))
    assert (
        "❌ not yet: the same inputs give the same key; another user, query or language, another key\n"
        f"       expected: different keys for {pair}\n"
        "       seen:     both give 'ex05:recs:v1:"
    ) in out
    assert f": {why}" in out
    assert out.endswith("Exercise 5.3: not yet — 6 of 7 checks pass")


def test_5_3_lower_instead_of_casefold_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("lower"))
    assert (
        "❌ not yet: queries that differ only in case or surrounding whitespace share a key\n"
        "       expected: one key for 'straße' and 'STRASSE': they differ only in letter case "
        "('straße'.upper() is 'STRASSE')\n"
        "       seen:     'straße' gets 'ex05:recs:v1:"
    ) in out
    assert ": lower() leaves ß as it is, so the two never meet\n" in out
    assert out.endswith("Exercise 5.3: not yet — 6 of 7 checks pass")


def test_5_3_a_digest_cut_short_is_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_recommendations_key, key_answer("short-digest"))
    assert (
        "❌ not yet: the digest is long enough never to collide in practice (32 hex digits or more)\n"
        "       expected: a digest long enough that two inputs never share a key in practice: 32 hex digits "
        "(128 bits) or more\n"
        "       seen:     keys such as 'ex05:recs:v1:"
    ) in out
    assert " carry about 32 bits: among about 65,536 different users and queries, two share a key" in out
    assert out.endswith("Exercise 5.3: not yet — 6 of 7 checks pass")


# ---------------------------------------------------------------------------------------------------
# Exercise 5.4: a profile cache whose writes arrive through a background job
# ---------------------------------------------------------------------------------------------------

PLACEHOLDER_5_4 = placeholder_message("5.4")


async def apply_profile_update(db: Any, update: dict) -> None:
    """The notebook's given coroutine: the import's write."""
    await db.write(update["user_id"], update["changes"])


def profile_answer(variant: str) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., Any]]:
    """``profile_key``, ``get_profile`` and ``apply_update_and_invalidate`` as a learner might write them."""
    ttl = {"ttl-300": 300, "pipeline": 30}.get(variant, 60)

    def profile_key(user_id: int) -> str:
        if variant == "placeholder":
            raise NotImplementedError(PLACEHOLDER_5_4)
        if variant == "shared-key":  # "one entry for the profile page"
            return "ex05:profile:v1"
        if variant == "no-version":
            return f"ex05:profile:{user_id}"
        return f"ex05:profile:v1:{user_id}"

    async def get_profile(redis: Any, db: Any, user_id: int) -> dict | None:
        if variant == "placeholder":
            raise NotImplementedError(PLACEHOLDER_5_4)
        key = profile_key(user_id)
        if variant == "getex":  # "keep active users' profiles warm": every hit sets the TTL again
            cached = await redis.getex(key, ex=ttl)
        else:
            cached = await redis.get(key)
        if cached is not None:
            return json.loads(cached)
        profile = await db.read(user_id)
        if variant == "eval":  # right too: the fill in a Lua script, a missing user cached as null
            fill = "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1"
            await redis.eval(fill, 1, key, json.dumps(profile), ttl)
            return profile
        if profile is None:
            if variant == "null-for-ever":  # "remember unknown users": found profiles expire, this never
                await redis.set(key, json.dumps(None))
            return None
        if variant == "no-ttl":  # "the job invalidates, so no TTL is needed"
            await redis.set(key, json.dumps(profile))
        elif variant == "pipeline":  # right too: SET and EXPIRE in one MULTI/EXEC, a shorter TTL
            async with redis.pipeline(transaction=True) as pipe:
                pipe.set(key, json.dumps(profile))
                pipe.expire(key, ttl)
                await pipe.execute()
        else:
            await redis.set(key, json.dumps(profile), ex=ttl)
        return profile

    async def apply_update_and_invalidate(redis: Any, db: Any, update: dict) -> None:
        if variant in ("placeholder", "placeholder-job"):
            raise NotImplementedError(PLACEHOLDER_5_4)
        key = profile_key(update["user_id"])
        marker = f"ex05:done:{update['job_id']}"
        if variant == "delete-before":
            await redis.delete(key)
            await apply_profile_update(db, update)
            return
        if variant == "double-delete":  # Exercise 5.1's double delete
            await redis.delete(key)
            await apply_profile_update(db, update)
            await redis.delete(key)
            return
        if variant == "finally-delete":  # "invalidate whatever happens, to be safe"
            try:
                await apply_profile_update(db, update)
            finally:
                await redis.delete(key)
            return
        if variant == "swallow":  # "a failed import must not crash the worker"
            try:
                await apply_profile_update(db, update)
            except Exception as error:
                print("import failed:", error)
                return
            await redis.delete(key)
            return
        if variant == "wrapped":  # right too: the failure raised as the job's own error, and GETDEL
            try:
                await apply_profile_update(db, update)
            except ConnectionError as error:
                raise RuntimeError(f"import {update['job_id']} failed") from error
            await redis.getdel(key)
            return
        if variant == "write-not-awaited":  # "return fast": the write goes on in a task
            asyncio.ensure_future(apply_profile_update(db, update))  # noqa: RUF006 (the mistake under test)
            await redis.delete(key)
            return
        # an idempotency key, claimed before the work
        if variant == "marker-first" and not await redis.set(marker, 1, nx=True, ex=86_400):
            return
        if variant in ("raise-on-retry", "marker-after") and await redis.exists(marker):
            if variant == "raise-on-retry":  # "refuse duplicates loudly"
                raise RuntimeError(f"job {update['job_id']} was already applied")
            return  # right too: a repeat recognised, and skipped
        await apply_profile_update(db, update)
        if variant == "no-invalidation":  # "the TTL will catch up"
            return
        if variant == "namespace":  # "an import changes profiles: drop them all"
            async for found in redis.scan_iter(match="ex05:profile:*"):
                await redis.delete(found)
        elif variant == "rewarm":  # "so the next visitor gets a hit"
            await redis.set(key, json.dumps(await db.read(update["user_id"])), ex=ttl)
        elif variant == "fire-and-forget":  # "do not make the job wait for Redis"
            asyncio.ensure_future(redis.delete(key))  # noqa: RUF006 (the mistake under test)
        elif variant == "expire-soon":  # "let it expire in a second instead"
            await redis.expire(key, 1)
        elif variant == "wrong-key":  # the key written out again, without the version
            await redis.delete(f"ex05:profile:{update['user_id']}")
        elif variant == "pipeline":
            await redis.unlink(key)
        else:
            await redis.delete(key)
        if variant in ("raise-on-retry", "marker-after"):
            await redis.set(marker, 1, ex=86_400)

    return profile_key, get_profile, apply_update_and_invalidate


@pytest.mark.parametrize("variant", ["right", "marker-after", "pipeline", "wrapped", "eval"])
def test_5_4_a_profile_cache_passes(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    check_profile_cache(*profile_answer(variant))
    out = capsys.readouterr().out
    assert out.startswith("Exercise 5.4 · Cache a profile whose writes arrive through a background job\n")
    assert (
        "  ✅ passed: a job whose write fails raises, and leaves the cached profile in place\n"
        "  ✅ passed: a retried job is harmless: run again after it wrote, or after it failed, it leaves the "
        "new profile\n"
    ) in out
    assert out.endswith("Exercise 5.4: passed ✅ (8 of 8 checks)\n")


@pytest.mark.parametrize("variant", ["placeholder", "placeholder-job"])
def test_5_4_placeholder_is_not_started(variant: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = rejected(capsys, check_profile_cache, *profile_answer(variant))
    assert "⬜ not started: Exercise 5.4's cell still raises the placeholder NotImplementedError" in out
    assert out.endswith("Exercise 5.4: not started")


STEP_KEY = (
    "❌ not yet: profile_key gives each user a key of their own, with the id and a version "
    "(ex05:profile:v1:41)\n"
)
STEP_TTL = (
    "❌ not yet: every entry expires within 60 s: after a first fill, a hit, a refill after a job, a late "
    "fill that raced a job, and a read of a user who does not exist\n"
)
STEP_JOB = (
    "❌ not yet: after a job for user 41, its next read comes from the database with the new profile, and "
    "user 42's entry is still a hit\n"
)
STEP_ORDER = (
    "❌ not yet: the job deletes the entry after its write commits: a read during the write leaves nothing "
    "stale\n"
)
STEP_FAILS = "❌ not yet: a job whose write fails raises, and leaves the cached profile in place\n"
STEP_RETRY = (
    "❌ not yet: a retried job is harmless: run again after it wrote, or after it failed, it leaves the new "
    "profile\n"
)
GONE = (
    "       expected: user 41's entry gone when the job returns, so that the next read loads the new profile "
    "from the database\n"
)
LEFT_IN_PLACE = (
    "       expected: user 41's cached profile left in place: the write failed, so the database, and the "
    "cache, still hold the old profile, and the next read is a hit\n"
)
STALE_TTL = (
    "       expected: the entry to expire within 60 s after a first fill: the most a profile may be stale\n"
)

WRONG_5_4 = [
    # the job writes and leaves the old profile cached until the TTL
    (
        "no-invalidation",
        STEP_JOB + GONE + "       seen:     'ex05:profile:v1:41' was still cached when the job returned, and "
        "the job deleted no key: the next read serves the old profile until the TTL\n",
        5,
    ),
    # a read between the delete and the commit puts the old profile back
    (
        "delete-before",
        STEP_ORDER + "       expected: the new profile (display_name 'Ada Lovelace', city 'London') once the "
        "job has returned, even with a read during the write\n"
        "       seen:     display_name 'Ada', city 'Leeds': the job deleted the key before its write, a read "
        "during the write missed, read the old row and cached it again (it was in Redis when the write "
        "committed), and the job deleted nothing after its commit, so it stays stale until the TTL\n",
        6,
    ),
    # Exercise 5.1's double delete: a failing job evicts a correct entry on every attempt
    (
        "double-delete",
        STEP_FAILS
        + LEFT_IN_PLACE
        + "       seen:     the job deleted 'ex05:profile:v1:41' before its write, "
        "which then failed: the next read missed and went to the database (1 database read)\n",
        7,
    ),
    # the delete in `finally:` runs when the write failed too
    (
        "finally-delete",
        STEP_FAILS
        + LEFT_IN_PLACE
        + "       seen:     the job deleted 'ex05:profile:v1:41' although its write "
        "failed: the next read missed and went to the database (1 database read)\n",
        7,
    ),
    # the failure is logged and swallowed: the worker never retries, the update is lost
    (
        "swallow",
        STEP_FAILS + "       expected: the job to raise when its write fails, as the write did\n"
        "       seen:     it returned normally: the worker counts the job done and never retries it, so the "
        "update is lost\n",
        7,
    ),
    # every profile dropped: every other user's next read misses
    (
        "namespace",
        STEP_JOB
        + "       expected: user 42's entry left alone by a job for user 41: a hit, with no database "
        "read\n"
        "       seen:     user 42's profile was read from the database again: the job deleted "
        "'ex05:profile:v1:42' too\n",
        7,
    ),
    # the job fills the entry again: the next read is not the database's
    (
        "rewarm",
        STEP_JOB + GONE + "       seen:     'ex05:profile:v1:41' was still cached when the job returned: the "
        "job stored the profile again itself (SET), so the next read was served by Redis, not the database\n",
        7,
    ),
    # the delete runs in a task nobody awaits: the job returns with the entry still there
    (
        "fire-and-forget",
        STEP_JOB + GONE + "       seen:     'ex05:profile:v1:41' was still cached when the job returned; its "
        "delete reached Redis only later (a task that nobody awaited)\n",
        7,
    ),
    # a short TTL instead of a delete: reads get the old profile until it runs out
    (
        "expire-soon",
        STEP_JOB + GONE + "       seen:     'ex05:profile:v1:41' was still cached when the job returned: the "
        "job gave it a short TTL (EXPIRE) instead of deleting it, and until that runs out every read gets "
        "the old profile\n",
        5,
    ),
    # the job marked done before its write: a retry after a failure skips the update
    (
        "marker-first",
        STEP_RETRY + "       expected: the retry of a job whose write failed to write the update\n"
        "       seen:     the retry returned without writing: the database still holds the old profile; the "
        "job recorded itself as done (ex05:done:import-17/41) before its write, so the retry took it for a "
        "repeat\n",
        7,
    ),
    # a repeat refused by raising: the worker retries a job that had succeeded
    (
        "raise-on-retry",
        STEP_RETRY
        + "       expected: a job run a second time, after it wrote (a retry), to succeed and change "
        "nothing\n"
        "       seen:     the second run raised RuntimeError: 'job import-17/41 was already applied': the "
        "worker counts it failed and retries it again",
        7,
    ),
    # Exercise 5.1's TTL: past the 60 s the rule allows
    (
        "ttl-300",
        STEP_TTL
        + STALE_TTL
        + "       seen:     a TTL of 300 s on 'ex05:profile:v1:41': a missed invalidation, "
        "or the race the order of the job leaves open, would serve an old profile that long, past the 60 s "
        "allowed\n",
        7,
    ),
    # no TTL: a missed invalidation lasts for ever
    (
        "no-ttl",
        STEP_TTL + STALE_TTL + "       seen:     'ex05:profile:v1:41' has no TTL: if an invalidation is ever "
        "missed, the old profile is served for ever\n",
        7,
    ),
    # a missing user cached without the TTL found profiles get: that entry never runs out
    (
        "null-for-ever",
        STEP_TTL + "       expected: whatever a read of user 43, who does not exist, stores to expire within "
        "60 s too (or nothing stored for them)\n"
        "       seen:     'ex05:profile:v1:43', holding 'null', has no TTL: found profiles expire, but this "
        "entry never does, so a user 43 created later stays missing for ever\n",
        7,
    ),
    # GETEX renews the TTL on every hit: a profile read often never expires
    (
        "getex",
        STEP_TTL + "       expected: a hit to leave the entry's TTL alone: 5 s left before the hit, at most "
        "that after\n",
        7,
    ),
    # the key leaves out the user: every user gets the profile cached first
    (
        "shared-key",
        STEP_KEY + "       expected: different keys for users 41 and 42\n"
        "       seen:     both get 'ex05:profile:v1': the key leaves out the user id",
        5,
    ),
    # no schema version in the key
    (
        "no-version",
        STEP_KEY + "       expected: a schema version as a part of the key, such as 'v1' in "
        "'ex05:profile:v1:41'\n       seen:     'ex05:profile:41'\n",
        7,
    ),
    # the write left in a task: the job returns before the commit
    (
        "write-not-awaited",
        STEP_JOB + "       expected: the job to write the update to the database before it returns\n"
        "       seen:     the database still held the old profile when the job returned; the write committed "
        "only later (a task that nobody awaited)\n",
        5,
    ),
    # the key written out again in the job, and wrong
    (
        "wrong-key",
        STEP_JOB + GONE + "       seen:     'ex05:profile:v1:41' was still cached when the job returned: the "
        "job deleted 'ex05:profile:41', but the profile is cached under 'ex05:profile:v1:41'\n",
        5,
    ),
]


@pytest.mark.parametrize(("variant", "lines", "passing"), WRONG_5_4, ids=[w[0] for w in WRONG_5_4])
def test_5_4_a_wrong_answer_is_named(
    variant: str, lines: str, passing: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = rejected(capsys, check_profile_cache, *profile_answer(variant))
    assert lines in out
    assert out.endswith(f"Exercise 5.4: not yet — {passing} of 8 checks pass")


def test_5_4_hints_get_more_specific(capsys: pytest.CaptureFixture[str]) -> None:
    answer = profile_answer("double-delete")
    first = rejected(capsys, check_profile_cache, *answer)
    forget_answers()  # the learner changes their answer: the next hint
    second = rejected(capsys, check_profile_cache, *answer)
    assert "hint:     When the write fails, nothing changed in the database" in first
    assert "Delete only once the write has returned" not in first
    assert (
        "hint:     Delete only once the write has returned: after `await apply_profile_update(db, update)`"
        in (second)
    )
