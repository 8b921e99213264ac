"""Checks for chapter 2's exercises: background task processing.

Each check counts what happened instead of timing it: which request ID each queued job worked for,
how many emails the provider sent, how many requests a full queue accepted and refused. Where a
race is the point (Exercise 2.2), the check makes it happen rather than hoping for it: its Redis
client takes a millisecond per command, as a Redis across a network does, so a read followed by a
write leaves room for another job in between; and it expires a claim mid-send and lets another copy
take it over, which a slow send does in production.

The learner's coroutines run on a fresh event loop in a thread of the check's own (as in chapter 1),
and every server and worker a check starts is stopped before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import redis.asyncio

from support.backends import delete_keys, redis_client
from support.checks import Mismatch, exercise, expect
from support.checks.running import NoReturn, find_route, in_fresh_loop, joins_new_threads, serve_answer, short
from support.queues import job_queue, start_worker
from support.server import Server
from support.thirdparty import EmailProvider, ProviderError

__all__ = ["check_bounded_queue", "check_idempotent_job", "check_request_id_in_jobs"]

_SERVE_FAILED = (
    "The app's lifespan failed before `yield`: fix its error, run the cell again, then this check."
)
SOLUTION = "solutions/02_background_tasks_exercises.ipynb"


# ---------------------------------------------------------------------------------------------------
# Plumbing shared by the checks
# ---------------------------------------------------------------------------------------------------


def _raise_server_error(server: Server, statuses: list[int], what: str) -> None:
    """After a 5xx: re-raise what the app raised (a placeholder, or the learner's own error)."""
    raised = server.wait_for_exception()
    if raised is not None:
        raise raised
    raise Mismatch(what, f"statuses {dict(Counter(statuses))}")


async def _clear(*patterns: str) -> None:
    client = redis_client()
    try:
        for pattern in patterns:
            await delete_keys(client, pattern)
    finally:
        await client.aclose()


# ---------------------------------------------------------------------------------------------------
# Exercise 2.1: carry the request ID into a queued job
# ---------------------------------------------------------------------------------------------------

_ORDERS = 20
_ORDER_PATH = "/orders/{order_id}"
_CALL_2_1 = "Call the check as `check_request_id_in_jobs(orders_app, process_order, worked_for, QUEUE)`."
_JOBS_WITHIN = 5.0


def _order_ids() -> dict[str, str]:
    """Order id → the X-Request-ID of the request that places it."""
    return {f"o-{i:02d}": f"ex21-req-{i:02d}" for i in range(_ORDERS)}


@dataclass
class _OrdersRun:
    statuses: list[int] = field(default_factory=list)
    queued: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)  # the kwargs of each job the worker ran
    finished: int = 0
    errors: list[BaseException] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)


async def _place_orders(server: Server, run: _OrdersRun) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10, trust_env=False) as http:
        responses = await asyncio.gather(
            *(
                http.post(f"/orders/{order}", headers={"X-Request-ID": request_id})
                for order, request_id in _order_ids().items()
            )
        )
    run.statuses = [r.status_code for r in responses]


async def _count_queued(queue_name: str, within: float = 1.0) -> int:
    """How many jobs wait on the queue, allowing ``within`` seconds for late enqueues to land."""
    queue = job_queue(queue_name)
    try:
        deadline = time.monotonic() + within
        while (queued := await queue.count("queued")) < _ORDERS and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return queued
    finally:
        await queue.disconnect()


def _check_orders_accepted(server: Server, queue_name: str, run: _OrdersRun) -> None:
    in_fresh_loop(lambda: _place_orders(server, run), timeout=20, name="check-2.1-requests")
    if any(status >= 500 for status in run.statuses):
        _raise_server_error(server, run.statuses, f"{_ORDERS} responses with status 202")
    expect(
        all(200 <= status < 300 for status in run.statuses),
        f"{_ORDERS} responses with status 202 (accepted)",
        f"statuses {dict(Counter(run.statuses))}",
        f"Keep the route `POST {_ORDER_PATH}` and its parameter `order_id: str`.",
    )
    run.queued = in_fresh_loop(lambda: _count_queued(queue_name), timeout=10, name="check-2.1-count")
    expect(
        run.queued == _ORDERS,
        f"{_ORDERS} jobs waiting on the queue {queue_name!r}, one per request",
        f"{run.queued}",
        "Enqueue one job per request: "
        '`await request.app.state.queue.enqueue("process_order", order_id=order_id, …)`.',
    )


def _watched(job: Callable[..., Any], run: _OrdersRun) -> Callable[..., Any]:
    """``job`` as the check's worker runs it: noting each job's arguments, and what it raised."""

    @functools.wraps(job)
    async def watched(ctx: dict[str, Any], **kwargs: Any) -> Any:
        run.calls.append(dict(kwargs))
        try:
            result = job(ctx, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as exc:
            run.errors.append(exc)
            raise
        finally:
            run.finished += 1

    return watched


def _check_jobs_run(job: Callable[..., Any], queue_name: str, run: _OrdersRun) -> None:
    with joins_new_threads():
        watched = _watched(job, run)
        names = {getattr(job, "__name__", "job"), getattr(job, "__qualname__", "job")}  # as SAQ would
        functions = [(name, watched) for name in names]
        worker = start_worker(queue_name, functions, concurrency=10, name="check-2.1-worker")
        try:
            deadline = time.monotonic() + _JOBS_WITHIN
            while time.monotonic() < deadline:
                # each job the worker could not even start (an unknown name) logs one error
                if run.finished >= _ORDERS or run.finished - len(run.errors) + len(worker.errors) >= _ORDERS:
                    break
                time.sleep(0.01)
        finally:
            worker.stop()
    run.worker_errors = list(worker.errors)
    if run.errors:
        raise run.errors[0]  # the placeholder ("not started") or the learner's own error, as one line
    if run.finished < _ORDERS and run.worker_errors:
        last_line = run.worker_errors[0].strip().splitlines()[-1]
        raise Mismatch(
            f"the worker to run the {_ORDERS} jobs",
            f"{run.finished} ran; the worker reported {last_line[:120]}",
            [
                "Enqueue the job by the name of your job function: "
                '`await request.app.state.queue.enqueue("process_order", …)`.',
            ],
        )
    expect(
        run.finished == _ORDERS,
        f"the worker to run the {_ORDERS} jobs within {_JOBS_WITHIN:g} s",
        f"{run.finished} ran",
        "Does each job finish? It should call `await fulfil(order_id)` and return.",
    )


def _check_request_ids(worked_for: dict[str, Any], run: _OrdersRun) -> None:
    expected = _order_ids()
    recorded = dict(worked_for)
    wrong = {order: recorded.get(order) for order, rid in expected.items() if recorded.get(order) != rid}
    if not wrong:
        return
    missing = [order for order in wrong if order not in recorded]
    if missing:
        raise Mismatch(
            f"an entry in `worked_for` for each of the {_ORDERS} orders",
            f"{len(missing)} orders without one (e.g. {missing[0]!r})",
            ["The job must do the work: `await fulfil(order_id)` records the order in `worked_for`."],
        )
    sent_ids = set(expected.values())
    foreign = {order: seen for order, seen in wrong.items() if seen not in sent_ids}
    if foreign:
        order, seen = next(iter(foreign.items()))
        right = expected[order]
        kwargs = next((c for c in run.calls if c.get("order_id") == order), {})
        example = f"the job for {order!r} ran with request_id_var = {seen!r}, not {right!r}"
        if right in kwargs.values():
            name = next(k for k, v in kwargs.items() if v == right)
            raise Mismatch(
                f"each job to work for the request that enqueued it ({_ORDERS} of {_ORDERS})",
                f"{len(foreign)} of {_ORDERS} jobs worked for no request: {example}. The job received "
                f"the ID ({name}={right!r}) but did not put it back in the context variable, which in "
                "the worker holds only its default",
                [
                    "The worker runs each job in a context of its own: nothing the request set is in it.",
                    "Set the variable in the job around the work: `token = request_id_var.set(request_id)`, "
                    "`await fulfil(order_id)`, then `request_id_var.reset(token)` in a `finally:`.",
                ],
            )
        raise Mismatch(
            f"each job to work for the request that enqueued it ({_ORDERS} of {_ORDERS})",
            f"{len(foreign)} of {_ORDERS} jobs worked for no request: {example}. The job's arguments "
            f"({', '.join(sorted(kwargs)) or 'none'}) did not carry the request's ID, and a context "
            "variable does not travel through the queue: in the worker it holds only its default",
            [
                "The job runs later, on the worker, in another context: the request's context "
                "variables are not there. Only the job's arguments travel with it.",
                'Pass the ID when you enqueue: `enqueue("process_order", order_id=order_id, '
                "request_id=request_id_var.get())`, and in the job set `request_id_var` from it.",
            ],
        )
    order, seen = next(iter(wrong.items()))
    if len(set(recorded.values())) == 1:
        how = f"all {_ORDERS} worked for {seen!r}, the request that came last"
    else:
        how = f"e.g. the job for {order!r} worked for {seen!r}, not {expected[order]!r}"
    raise Mismatch(
        f"each job to work for the request that enqueued it ({_ORDERS} of {_ORDERS})",
        f"{len(wrong)} of {_ORDERS} jobs worked for another request's ID: {how}. A value shared by all "
        "requests (a module-level variable, `app.state`) was overwritten before the jobs ran",
        [
            "Jobs run after the requests that enqueued them, while other requests arrive: anything "
            "stored outside the request itself is overwritten by the next one.",
            'Put the ID in the job\'s own arguments: `enqueue("process_order", order_id=order_id, '
            "request_id=request_id_var.get())`.",
        ],
    )


def check_request_id_in_jobs(
    app: Any, process_order: Callable[..., Any], worked_for: dict[str, Any], queue_name: str
) -> None:
    """Check Exercise 2.1: every queued job works for the request ID of the request that enqueued it.

    Serves ``app``, sends 20 ``POST /orders/{order_id}`` at once, each with its own ``X-Request-ID``,
    and counts the jobs on ``queue_name``; then starts a SAQ worker running ``process_order`` (only
    then, so every job runs after all the requests), waits for the 20 jobs, and compares
    ``worked_for`` (order id → the request ID ``fulfil`` saw) with the IDs sent. It also notes the
    arguments each job received, to tell "not passed" from "passed but not set in the job".
    """
    with exercise("2.1", "Carry the request ID into a queued job", SOLUTION) as ex:

        def arguments() -> None:
            find_route(app, "POST", _ORDER_PATH, "orders_app")
            expect(
                callable(process_order),
                "the job function `process_order`",
                short(process_order),
                _CALL_2_1,
            )
            expect(
                isinstance(worked_for, dict),
                "the dict `worked_for` that `fulfil` records into",
                type(worked_for).__name__,
                _CALL_2_1,
            )
            expect(
                isinstance(queue_name, str) and queue_name.startswith("ch02"),
                "the queue's name, starting with 'ch02' (QUEUE)",
                short(queue_name),
                _CALL_2_1,
            )

        if not ex.step(f"the app has a POST {_ORDER_PATH} endpoint", arguments):
            return
        run = _OrdersRun()
        worked_for.clear()
        in_fresh_loop(
            lambda: _clear(f"saq:{queue_name}:*", f"saq:job:{queue_name}:*"), timeout=10, name="check-2.1"
        )
        with joins_new_threads(), serve_answer(app, "check-2.1", "2.1", _SERVE_FAILED) as server:
            accepted = ex.step(
                f"{_ORDERS} requests at once, each with its own X-Request-ID, enqueue {_ORDERS} jobs",
                lambda: _check_orders_accepted(server, queue_name, run),
            )
        if not accepted:
            return
        if not ex.step(
            f"a worker started afterwards runs the {_ORDERS} jobs",
            lambda: _check_jobs_run(process_order, queue_name, run),
        ):
            return
        ex.step(
            "every job worked for the request that enqueued it", lambda: _check_request_ids(worked_for, run)
        )


# ---------------------------------------------------------------------------------------------------
# Exercise 2.2: an idempotent job
# ---------------------------------------------------------------------------------------------------

_TOKEN = "ex22-"  # in every user id and email the check uses: its keys are cleared by this pattern
_SEND_DELAY = 0.05
_COMMAND_LATENCY = 0.001  # a network round trip: without it, fakeredis never interleaves a GET and a SET
_COPIES = 10


def _email(user: str) -> str:
    return f"{_TOKEN}{user}@example.com"


class _CheckProvider(EmailProvider):
    """The course's fake email API, failing the next ``fail_next`` calls and able to look around.

    ``during_send`` (if set) runs at the start of every send, while the job waits for the provider.
    """

    def __init__(self) -> None:
        super().__init__(delay=_SEND_DELAY)
        self.fail_next = 0
        self.during_send: Callable[[str], Awaitable[None]] | None = None

    async def send(self, to: str, subject: str = "Welcome!", *, idempotency_key: str | None = None) -> None:
        fails = self.fail_next > 0  # decided when the call starts: other sends may run in during_send
        self.fail_next = max(0, self.fail_next - 1)
        if self.during_send is not None:
            await self.during_send(to)
        self.fail_every = 1 if fails else 0  # read by super().send before its first await
        await super().send(to, subject, idempotency_key=idempotency_key)


@dataclass
class _Scene:
    redis: redis.asyncio.Redis
    provider: _CheckProvider
    job: Callable[..., Any]

    async def run(self, user: str) -> None:
        result = self.job(self.redis, self.provider, f"{_TOKEN}{user}", _email(user))
        expect(
            inspect.isawaitable(result),
            "an awaitable: `send_welcome_once` defined with `async def`",
            f"a plain function that returned {short(result)}",
            "It awaits Redis and the provider, so it must be `async def send_welcome_once(…)`.",
        )
        await result

    def sent(self, user: str) -> int:
        return self.provider.sent_to(_email(user))


def _scenario(job: Callable[..., Any], body: Callable[[_Scene], Awaitable[None]], name: str) -> None:
    """Run ``body`` on a fresh loop with a fresh provider, the check's Redis client, and clean keys."""

    async def main() -> None:
        client = redis_client(decode_responses=True, latency=_COMMAND_LATENCY)
        try:
            await delete_keys(client, f"*{_TOKEN}*")
            await body(_Scene(client, _CheckProvider(), job))
        finally:
            await delete_keys(client, f"*{_TOKEN}*")
            await client.aclose()

    try:
        in_fresh_loop(main, timeout=5, name=f"check-2.2-{name}")
    except NoReturn as late:
        raise Mismatch(
            "each run of `send_welcome_once` to return within a second or so",
            f"no return within {late.seconds:g} s"
            + (" (and it still holds its thread: restart the kernel)" if late.stuck else ""),
            [
                "Does it wait for a claim to be released, or retry in a loop? A job that finds the "
                "email sent or being sent should simply return.",
            ],
        ) from None


_CLAIM_HINT = (
    'Claim the user atomically before sending: `await redis.set(key, "sending", nx=True, ex=60)` '
    "returns None if the key exists; then return without sending."
)


async def _once(scene: _Scene) -> None:
    await scene.run("ada")
    sent = scene.sent("ada")
    expect(
        sent == 1,
        f"1 email to {_email('ada')}",
        f"{sent}",
        "Send with `await provider.send(email)` when the claim is yours.",
    )


async def _twice(scene: _Scene) -> None:
    await scene.run("ada")
    try:
        await scene.run("ada")
    except Mismatch:
        raise
    except Exception as exc:
        raise Mismatch(
            "the second run to return quietly: the email is sent, there is nothing to do",
            f"it raised {type(exc).__name__}: {short(str(exc))}",
            ["A duplicate is not an error: return, and the queue marks the job done."],
        ) from None
    sent = scene.sent("ada")
    expect(
        sent == 1,
        f"1 email to {_email('ada')} after the same job ran twice",
        f"{sent}: the second run sent again",
        "Before sending, look in Redis for a record that this user's email is taken care of; "
        "after sending, leave one there.",
        _CLAIM_HINT,
    )


async def _two_users(scene: _Scene) -> None:
    await scene.run("ada")
    await scene.run("grace")
    counts = {_email(u): scene.sent(u) for u in ("ada", "grace")}
    expect(
        list(counts.values()) == [1, 1],
        "1 email to each of two users",
        ", ".join(f"{n} to {to}" for to, n in counts.items()),
        'Each user needs a key of their own: put `user_id` in it, e.g. `f"ch02:welcome:{user_id}"`.',
    )


async def _retry(scene: _Scene) -> None:
    scene.provider.fail_next = 1
    try:
        await scene.run("alan")
    except ProviderError:
        pass
    else:
        sent = scene.sent("alan")
        expect(
            sent == 1,
            "the failed attempt to raise (the provider's ProviderError), so that the queue retries it",
            "it returned normally without sending: the queue would mark the job done and never run "
            "it again, so the email would be lost",
            "Do not swallow the provider's error: undo your claim, then let the error propagate (`raise`).",
        )
    retried = scene.sent("alan")
    if retried == 1:
        return
    await scene.run("alan")
    sent = scene.sent("alan")
    if sent == 0:
        raise Mismatch(
            f"1 email to {_email('alan')} once the retry ran",
            "0: the first attempt failed, and its claim was still there when the retry ran, so the "
            "retry skipped the user; the email is lost",
            [
                'A claim says "someone is sending": when the send fails, nobody is, so give the claim up.',
                "Release it on failure, then re-raise: `except Exception:` delete your claim (only if the "
                "key still holds your token, as the last step explains), then `raise`.",
            ],
        )
    expect(sent == 1, f"1 email to {_email('alan')} once the retry ran", f"{sent}", _CLAIM_HINT)


async def _concurrent(scene: _Scene) -> None:
    results = await asyncio.gather(*(scene.run("edsger") for _ in range(_COPIES)), return_exceptions=True)
    sent = scene.sent("edsger")
    errors = [r for r in results if isinstance(r, BaseException)]
    if sent == 0 and errors:
        raise errors[0]
    expect(
        sent == 1,
        f"1 email to {_email('edsger')} from {_COPIES} copies of the job run at once",
        f"{sent}: the copies all looked before any of them marked the user" if sent > 1 else f"{sent}",
        "Looking (GET) and marking (SET) are two round trips: all the copies can look before any marks.",
        'Look and mark in one atomic command: `await redis.set(key, "sending", nx=True, ex=60)` '
        "succeeds for exactly one caller.",
    )


async def _claim_expires(scene: _Scene) -> None:
    seen: list[tuple[str, int]] = []

    async def look(_: str) -> None:
        async for key in scene.redis.scan_iter(match=f"*{_TOKEN}*"):
            seen.append((key, await scene.redis.ttl(key)))

    scene.provider.during_send = look
    await scene.run("barbara")
    expect(
        seen,
        "a key in Redis that claims the user while the email is being sent",
        "no key mentioning the user existed during the send: it is written after sending, or never",
        "Claim before you send, so that a copy running at the same time sees the claim.",
        _CLAIM_HINT,
    )
    forever = [key for key, ttl in seen if ttl == -1]
    expect(
        not forever,
        "the claim to expire on its own (a TTL) while the email is being sent",
        f"{forever[0] if forever else ''} had no expiry: if the worker crashed mid-send, the claim would "
        "stay for ever, and no retry would ever send",
        "A crashed worker cannot release its claim; an expiry releases it for it.",
        'Claim with `ex=`: `await redis.set(key, "sending", nx=True, ex=60)`; after a successful send, '
        'overwrite it with a permanent `await redis.set(key, "sent")`.',
    )


_RELEASE_HINT = (
    "Claim with a value of your own, `token = uuid.uuid4().hex`: `redis.set(key, token, nx=True, ex=60)`; "
    "release only if the key still holds it, in one step: "
    "`await redis.eval(RELEASE_IF_MINE, 1, key, token)`, a Lua script that runs "
    "`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`."
)


@dataclass
class _Takeover:
    """Copy A's claim expires mid-send; copy B claims and holds it while A fails and releases."""

    scene: _Scene
    user: str = "grace"
    calls: int = 0
    expired: list[str] = field(default_factory=list)  # A's claim keys, expired by the check
    b_sending: asyncio.Event = field(default_factory=asyncio.Event)
    a_done: asyncio.Event = field(default_factory=asyncio.Event)
    b_task: asyncio.Task[None] | None = None

    async def during_send(self, _: str) -> None:
        self.calls += 1
        if self.calls == 1:  # copy A, holding its claim: the claim lapses, copy B starts
            redis = self.scene.redis
            async for key in redis.scan_iter(match=f"*{_TOKEN}{self.user}*"):
                if await redis.pttl(key) > 0:
                    self.expired.append(key)
                    await redis.pexpire(key, 1)
            while self.expired and await redis.exists(*self.expired):
                await asyncio.sleep(0.002)
            if self.expired:
                self.b_task = asyncio.create_task(self.scene.run(self.user))
                await _wait(self.b_sending, 1.0)
        elif self.calls == 2:  # copy B, holding its own claim: it sends once A has given up
            self.b_sending.set()
            await _wait(self.a_done, 2.0)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


async def _release_only_yours(scene: _Scene) -> None:
    story = _Takeover(scene)
    scene.provider.during_send = story.during_send
    scene.provider.fail_next = 1  # copy A's send fails, after its claim has lapsed
    try:
        await scene.run(story.user)  # copy A
    except Mismatch:
        raise
    except Exception:  # expected: A's send failed (or its release refused: the claim is not A's)
        pass
    expect(
        story.expired,
        "a claim with an expiry while the email is being sent (this step lets it lapse)",
        "none: no key naming the user had a TTL during the send",
        "Claim with `ex=`, as the step above asks; this step then checks how you release it.",
    )
    try:
        held = [key async for key in scene.redis.scan_iter(match=f"*{_TOKEN}{story.user}*")]
        await scene.run(story.user)  # copy C, while B is still sending
    finally:
        story.a_done.set()  # copy B may send now
        if story.b_task is not None:
            await asyncio.wait([story.b_task])
    if story.b_task is not None and story.b_task.exception() is not None:
        raise story.b_task.exception()  # the learner's own error, in copy B
    sent = scene.sent(story.user)
    if sent > 1 and not held:
        raise Mismatch(
            f"1 email to {_email(story.user)}: a copy whose claim lapsed must not remove the claim "
            "another copy took over",
            f"{sent}: copy A's claim expired while its send was slow, copy B claimed the user; when A's "
            "send failed, A deleted the key, B's claim with it, so copy C, run while B was still "
            "sending, claimed the user and sent again",
            [
                "A plain `DELETE` removes whatever claim is there now, and after a slow send that may "
                "be another copy's: release only the claim that is still yours.",
                _RELEASE_HINT,
            ],
        )
    expect(sent == 1, f"1 email to {_email(story.user)} from copies A, B and C", f"{sent}", _RELEASE_HINT)


def check_idempotent_job(send_welcome_once: Callable[..., Awaitable[None]]) -> None:
    """Check Exercise 2.2: ``send_welcome_once(redis, provider, user_id, email)`` sends at most once.

    Each scenario runs on a fresh loop with a fresh ``EmailProvider`` (50 ms per send) and a Redis
    client that takes 1 ms per command: the same job twice (1 email); two users (1 each); a first
    attempt whose send raises ``ProviderError``, then a retry (exactly 1, and the failure must
    propagate); 10 copies at once (1); while sending, every key naming the user expires; and a
    takeover: copy A's claim lapses mid-send (the check expires it), copy B claims the user and sends
    slowly, A's send fails and A releases, then copy C runs while B is sending: 1 email in all, which
    a release by plain ``DELETE`` (removing B's claim, so C sends) does not give.
    Keys containing "ex22-" (the check's users) are deleted before and after each scenario.
    """
    with exercise("2.2", "Make a job idempotent", SOLUTION) as ex:
        steps = [
            ("one run sends one welcome email", _once, "once"),
            ("the same job run twice sends one email", _twice, "twice"),
            ("two users get one email each", _two_users, "users"),
            ("after a failed attempt (ProviderError), the retry sends the email, once", _retry, "retry"),
            (f"{_COPIES} copies of the job at once send one email", _concurrent, "concurrent"),
            ("the claim held while sending expires on its own", _claim_expires, "ttl"),
            (
                "a copy whose claim lapsed mid-send releases only its own claim, not a newer copy's",
                _release_only_yours,
                "takeover",
            ),
        ]
        for number, (description, body, name) in enumerate(steps):
            passed = ex.step(
                description, lambda body=body, name=name: _scenario(send_welcome_once, body, name)
            )
            if number == 0 and not passed:
                return


# ---------------------------------------------------------------------------------------------------
# Exercise 2.3: bound a queue with a proper 503
# ---------------------------------------------------------------------------------------------------

_JOB_PATH = "/jobs/{job_id}"
_SPIKE = 30
_ANSWER_WITHIN = 1.5
_PROCESSED_WITHIN = 3.0
_RETRY_AFTER = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True)
class _Answer:
    job: str
    status: int  # 0: no answer within _ANSWER_WITHIN seconds
    retry_after: str | None
    latency: float


@dataclass
class _Spike:
    answers: list[_Answer] = field(default_factory=list)
    processed_by_then: int = 0  # jobs the consumers had finished when the last answer came

    @property
    def accepted(self) -> list[str]:
        return [a.job for a in self.answers if 200 <= a.status < 300]

    @property
    def refused(self) -> list[_Answer]:
        return [a for a in self.answers if a.status >= 300 or a.status == 0]


async def _post_jobs(server: Server, jobs: list[str]) -> list[_Answer]:
    limits = httpx.Limits(max_connections=len(jobs), max_keepalive_connections=len(jobs))
    async with httpx.AsyncClient(
        base_url=server.url, timeout=_ANSWER_WITHIN, limits=limits, trust_env=False
    ) as http:

        async def post(job: str) -> _Answer:
            start = time.perf_counter()
            try:
                response = await http.post(f"/jobs/{job}")
            except httpx.TimeoutException:
                return _Answer(job, 0, None, time.perf_counter() - start)
            return _Answer(
                job, response.status_code, response.headers.get("retry-after"), time.perf_counter() - start
            )

        return list(await asyncio.gather(*(post(job) for job in jobs)))


def _wait_processed(processed: list[Any], jobs: set[str], within: float) -> None:
    deadline = time.monotonic() + within
    while not jobs <= set(processed) and time.monotonic() < deadline:
        time.sleep(0.01)


def _check_one_job(server: Server, processed: list[Any]) -> None:
    (answer,) = in_fresh_loop(lambda: _post_jobs(server, ["first"]), timeout=10, name="check-2.3-first")
    if answer.status >= 500:
        _raise_server_error(server, [answer.status], "status 202 for one job")
    expect(
        200 <= answer.status < 300,
        "status 202 (accepted) for one job on an idle queue",
        f"status {answer.status}" if answer.status else f"no answer within {_ANSWER_WITHIN:g} s",
        f"Keep the route `POST {_JOB_PATH}`; put the job on the queue and return at once.",
    )
    _wait_processed(processed, {"first"}, _PROCESSED_WITHIN)
    expect(
        "first" in processed,
        "the job to be processed (by the consumer started in the lifespan)",
        f"not processed within {_PROCESSED_WITHIN:g} s; processed: {short(list(processed))}",
        "Put the job id on `app.state.queue`, the queue the consumer reads: `queue.put_nowait(job_id)`.",
    )


def _check_spike_answered(server: Server, processed: list[Any], spike: _Spike) -> None:
    processed.clear()
    jobs = [f"j-{i:02d}" for i in range(_SPIKE)]
    spike.answers = in_fresh_loop(lambda: _post_jobs(server, jobs), timeout=30, name="check-2.3-spike")
    spike.processed_by_then = len(processed)
    statuses = Counter(a.status for a in spike.answers)
    unanswered = statuses.get(0, 0)
    if unanswered:
        slowest = max((a.latency for a in spike.answers if a.status), default=0.0)
        raise Mismatch(
            f"an answer to each request within {_ANSWER_WITHIN:g} s (a full queue refuses at once)",
            f"{unanswered} of {_SPIKE} got no answer in time"
            + (f", and the answered ones took up to {slowest:.1f} s" if slowest else "")
            + ": the endpoint waited for room in the full queue",
            [
                "`await queue.put(…)` waits while the queue is full, and the client waits with it: "
                "the queue is bounded, but the waiting requests are not.",
                "`queue.put_nowait(job_id)` raises `asyncio.QueueFull` at once when the queue is full: "
                "answer 503 then.",
            ],
        )
    errors = sum(n for status, n in statuses.items() if status >= 500 and status != 503)
    if errors:
        raised = server.wait_for_exception()
        if isinstance(raised, asyncio.QueueFull):
            raise Mismatch(
                "no 500 (Internal Server Error): a 503 when the queue is full",
                f"{errors} of {_SPIKE} got 500: `put_nowait` raised asyncio.QueueFull and nothing caught it",
                [
                    "A full queue is expected under a spike; it is the client's cue to come back later.",
                    '`except asyncio.QueueFull: raise HTTPException(503, "queue full", '
                    'headers={"Retry-After": "1"})`.',
                ],
            )
        if raised is not None:
            raise raised
        raise Mismatch("no 500 (Internal Server Error)", f"statuses {dict(statuses)}")


def _check_refused(spike: _Spike, queue_size: int, consumers: int) -> None:
    statuses = Counter(a.status for a in spike.answers)
    accepted = len(spike.accepted)
    bound = queue_size + consumers + spike.processed_by_then
    shown = ", ".join(f"{n} × {status}" for status, n in sorted(statuses.items()))
    if accepted == _SPIKE:
        raise Mismatch(
            f"some 503s: at most {bound} of {_SPIKE} accepted (QUEUE_SIZE {queue_size} + {consumers} "
            f"consumer(s) + {spike.processed_by_then} finished meanwhile)",
            f"{shown}: the queue took every job",
            [
                "An `asyncio.Queue()` without `maxsize` never fills: under a spike it grows without "
                "bound, and so does the wait of the last job in it.",
                "In the lifespan: `app.state.queue = asyncio.Queue(maxsize=QUEUE_SIZE)` (0 means no bound).",
            ],
        )
    expect(
        accepted >= 1,
        "some requests accepted (202) before the queue is full",
        shown,
        "Accept while there is room: `queue.put_nowait(job_id)`, then return 202.",
    )
    expect(
        accepted <= bound,
        f"at most {bound} of {_SPIKE} accepted (QUEUE_SIZE {queue_size} + {consumers} consumer(s) + "
        f"{spike.processed_by_then} finished meanwhile)",
        f"{accepted} accepted",
        f"Create the queue with `asyncio.Queue(maxsize=QUEUE_SIZE)` and start {consumers} consumer(s).",
    )
    others = sorted(status for status in statuses if not 200 <= status < 300 and status != 503)
    expect(
        not others,
        "503 (Service Unavailable) for the requests refused",
        shown,
        "503 says the server is overloaded right now; 429 would blame the client's own rate.",
        '`raise HTTPException(503, "queue full", headers={"Retry-After": "1"})`.',
    )


def _check_retry_after(spike: _Spike) -> None:
    refused = spike.refused
    missing = [a for a in refused if a.retry_after is None]
    expect(
        not missing,
        "a Retry-After header on every 503",
        f"{len(missing)} of {len(refused)} 503s without one",
        "Retry-After tells a client (and its retry library) when to try again, instead of at once.",
        '`raise HTTPException(503, "queue full", headers={"Retry-After": "1"})`.',
    )
    bad = [a.retry_after for a in refused if not _RETRY_AFTER.fullmatch((a.retry_after or "").strip())]
    expect(
        not bad,
        'Retry-After as a whole number of seconds, at least 1 (e.g. "1")',
        f"Retry-After: {bad[0]!r}" if bad else "",
        'HTTP allows only whole seconds (or a date): clients cannot read "0.5" or "1.0", and "0" '
        "asks them to retry at once.",
        "Round the expected wait up: `str(max(1, math.ceil(seconds)))`.",
    )


def _check_all_processed(processed: list[Any], spike: _Spike) -> None:
    accepted = set(spike.accepted)
    _wait_processed(processed, accepted, _PROCESSED_WITHIN)
    done = list(processed)
    missing = sorted(accepted - set(done))
    expect(
        not missing,
        f"each of the {len(accepted)} accepted jobs processed within {_PROCESSED_WITHIN:g} s",
        f"{len(missing)} not processed (e.g. {missing[0]!r})" if missing else "",
        "Put each accepted job on the queue the consumer reads, before answering 202.",
    )
    refused = sorted(set(done) - accepted)
    expect(
        not refused,
        "only accepted jobs processed",
        f"{len(refused)} refused jobs processed too (e.g. {refused[0]!r})" if refused else "",
        "Answer 503 only for a job you did not put on the queue.",
    )
    repeated = [job for job, n in Counter(done).items() if n > 1]
    expect(
        not repeated,
        "each accepted job processed once",
        f"{len(repeated)} processed more than once (e.g. {repeated[0]!r})" if repeated else "",
        "Put each job on the queue once.",
    )


def check_bounded_queue(app: Any, processed: list[Any], queue_size: int, consumers: int) -> None:
    """Check Exercise 2.3: a full queue answers 503 with a valid Retry-After, at once.

    Serves ``app``; posts one job (accepted, then processed); then a spike of 30
    ``POST /jobs/{job_id}`` at once, against a consumer that takes 0.1 s per job. Every request must
    be answered within 1.5 s and none with 500; some accepted (2xx), at most ``queue_size +
    consumers`` + the jobs finished by then; the rest 503, each with ``Retry-After`` in whole seconds
    ≥ 1; and every accepted job processed (``processed`` lists the job ids done), once.
    """
    with exercise("2.3", "Bound a queue with a proper 503", SOLUTION) as ex:

        def arguments() -> None:
            find_route(app, "POST", _JOB_PATH, "jobs_app")
            expect(
                isinstance(processed, list),
                "the list `processed` that the consumer appends to",
                type(processed).__name__,
                "Call the check as `check_bounded_queue(jobs_app, processed, QUEUE_SIZE, CONSUMERS)`.",
            )
            sizes_ok = isinstance(queue_size, int) and isinstance(consumers, int) and consumers >= 1
            expect(
                sizes_ok and queue_size >= 1 and queue_size + consumers <= _SPIKE // 2,
                f"QUEUE_SIZE ≥ 1 and CONSUMERS ≥ 1, together at most {_SPIKE // 2} (a spike of {_SPIKE} "
                "must be able to fill the queue)",
                f"QUEUE_SIZE {short(queue_size)}, CONSUMERS {short(consumers)}",
                "Keep QUEUE_SIZE = 5 and CONSUMERS = 1, as given.",
            )

        if not ex.step(f"the app has a POST {_JOB_PATH} endpoint", arguments):
            return
        processed.clear()
        spike = _Spike()
        with joins_new_threads(), serve_answer(app, "check-2.3", "2.3", _SERVE_FAILED) as server:
            if not ex.step(
                "one job on an idle queue is accepted (202) and processed",
                lambda: _check_one_job(server, processed),
            ):
                return
            if not ex.step(
                f"a spike of {_SPIKE} requests at once: each answered within {_ANSWER_WITHIN:g} s, "
                "none with 500",
                lambda: _check_spike_answered(server, processed, spike),
            ):
                return
            if not ex.step(
                "once the queue is full, the rest are refused with 503",
                lambda: _check_refused(spike, queue_size, consumers),
            ):
                return
            ex.step(
                "every 503 carries Retry-After: whole seconds, at least 1", lambda: _check_retry_after(spike)
            )
            ex.step("every accepted job is processed, once", lambda: _check_all_processed(processed, spike))
