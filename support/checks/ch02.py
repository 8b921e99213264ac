"""Checks for chapter 2's exercises: background task processing.

Each check counts what happened rather than timing it: which request ID each queued job worked for,
how many emails the provider sent, how many requests a full queue accepted and refused, whether a
refusal waited before answering (it awaited room on the full queue, a timer it set went off first, it
called `time.sleep`, a run of its own code kept the loop, it suspended over and over); whether a 202
went out before its job was on the queue. Where a
race is the point (Exercise 2.2), the check makes it happen rather than hoping for it: its Redis
client takes a millisecond per command, as a Redis across a network does, so a read followed by a
write leaves room for another job in between; it expires a claim mid-send and lets another copy
take it over, which a slow send does in production; and it runs a copy between two commands of one
that has sent. Elsewhere it notes the instant that matters instead of racing for it: what each job
carried as it was enqueued (Exercise 2.1), which jobs entered the queue (Exercise 2.3). Exercise 2.4's
check holds the builds back rather than timing them, so an answer that waits for one never comes, and
a status is asked while the check knows which builds are in progress; it restarts the app between
requests as a deploy does, with what the process remembered put back as it was, so only what is in
Redis is still known. "At once" is asserted by what a POST did before answering (it listened for its
job to finish, or an enqueue it started returned after the response), with a duration only as a
backstop, net of the moments the server's loop could not run.

The learner's coroutines run on a fresh event loop in a thread of the check's own (as in chapter 1),
and every server and worker a check starts is stopped before it returns.
"""

from __future__ import annotations

import asyncio
import builtins
import collections
import contextlib
import contextvars
import copy
import functools
import inspect
import re
import statistics
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis.asyncio
from starlette.datastructures import State

from support.backends import delete_keys, redis_client
from support.checks import Mismatch, exercise, expect
from support.checks.running import NoReturn, find_route, in_fresh_loop, joins_new_threads, serve_answer, short
from support.queues import job_queue, start_worker
from support.server import Server
from support.thirdparty import EmailProvider, ProviderError
from support.workers import running_workers

__all__ = ["check_async_exports", "check_bounded_queue", "check_idempotent_job", "check_request_id_in_jobs"]

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
_ENQUEUE_LATENCY = 0.1  # the check's enqueue takes this long, as a Redis across a network may
_DIRECT_ID = "ex21-direct-call"
_SANE = 16  # the first 16 requests send a sane X-Request-ID; the rest none, or one the middleware refuses


def _sent_headers() -> dict[str, str | None]:
    """Order id → the X-Request-ID header its request sends (None: no header at all)."""
    sent: dict[str, str | None] = {f"o-{i:02d}": f"ex21-req-{i:02d}" for i in range(_SANE)}
    sent.update({"o-16": None, "o-17": None, "o-18": "ex21 req 18; drop", "o-19": "ex21-" + "x" * 70})
    return sent


def _order_ids() -> dict[str, str]:
    """Order id → the X-Request-ID of the requests that send a sane one."""
    return {order: str(rid) for order, rid in list(_sent_headers().items())[:_SANE]}


@dataclass
class _OrdersRun:
    statuses: list[int] = field(default_factory=list)
    announced: dict[str, str] = field(default_factory=dict)  # order → the ID in its response's X-Request-ID
    answered_at: dict[str, float] = field(default_factory=dict)  # order → when its response came
    stored_at: dict[str, float] = field(default_factory=dict)  # order → when its enqueue finished
    enqueued_with: dict[str, str] = field(default_factory=dict)  # order → what its enqueue call passed
    enqueued_args: dict[str, str] = field(default_factory=dict)  # order → the job's arguments, as shown
    state_added: list[str] = field(default_factory=list)  # app.state attributes the requests added
    queued: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)  # the kwargs of each job the worker ran
    ctx: dict[str, Any] = field(default_factory=dict)  # the ctx of a job the worker ran
    finished: int = 0
    finished_orders: set[str] = field(default_factory=set)  # the check's orders whose job ran to its end
    errors: list[BaseException] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)

    def expected(self) -> dict[str, str]:
        """Order → the ID its job must work for: the one the middleware announced in the response."""
        sent = _sent_headers()
        return {order: self.announced.get(order) or sent[order] or "-" for order in sent}


class _TimedQueue:
    """The app's SAQ queue as the check serves it: each enqueue takes a network round trip, and the
    check notes when each order's job is stored (to compare with when its 202 was sent)."""

    def __init__(self, queue: Any, run: _OrdersRun) -> None:
        self._queue, self._run = queue, run

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    async def enqueue(self, job_or_func: Any, **kwargs: Any) -> Any:
        arguments = getattr(job_or_func, "kwargs", None) or kwargs.get("kwargs") or kwargs
        order = arguments.get("order_id") if isinstance(arguments, dict) else None
        if order is not None:  # what the job carries as it is stored: a worker may take it at once
            carried = [kwargs] + [getattr(job_or_func, name, None) for name in ("kwargs", "meta", "key")]
            self._run.enqueued_with[str(order)] = repr(carried)
            self._run.enqueued_args[str(order)] = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
        await asyncio.sleep(_ENQUEUE_LATENCY)
        job = await self._queue.enqueue(job_or_func, **kwargs)
        if order is not None:
            self._run.stored_at[str(order)] = time.monotonic()
        return job


def _state_keys(app: Any) -> set[str]:
    return set(getattr(getattr(app, "state", None), "_state", {}) or {})


async def _place_orders(server: Server, run: _OrdersRun) -> None:
    async def post(http: httpx.AsyncClient, order: str, header: str | None) -> httpx.Response:
        response = await http.post(f"/orders/{order}", headers={"X-Request-ID": header} if header else {})
        run.answered_at[order] = time.monotonic()
        return response

    async with httpx.AsyncClient(base_url=server.url, timeout=10, trust_env=False) as http:
        sent = _sent_headers()
        responses = await asyncio.gather(*(post(http, order, header) for order, header in sent.items()))
    run.statuses = [r.status_code for r in responses]
    for order, response in zip(sent, responses, strict=True):
        if response.headers.get("x-request-id"):
            run.announced[order] = response.headers["x-request-id"]


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
    late = sorted(o for o, at in run.stored_at.items() if o in run.answered_at and at > run.answered_at[o])
    if late:
        lag = run.stored_at[late[0]] - run.answered_at[late[0]]
        raise Mismatch(
            "each 202 sent once its job is stored in Redis (a 202 promises the job is queued)",
            f"{len(late)} of {_ORDERS} answered 202 before their job was stored (the job of {late[0]!r} "
            f"was stored {lag * 1000:.0f} ms after its 202): the enqueue ran on its own, after the "
            "response; had it failed, or the server stopped first, the job would be lost and "
            "nobody told",
            [
                "`asyncio.create_task(…enqueue(…))` returns at once: the endpoint answers before the job "
                "exists, and an error in the enqueue is lost with the task.",
                "Await the enqueue in the endpoint, before returning: "
                '`await request.app.state.queue.enqueue("process_order", …)`.',
            ],
        )


async def _find_ids(queue_name: str, ids: dict[str, str]) -> dict[str, bool]:
    """For each order, whether its ID is anywhere in Redis: in the job's record, or in another key."""
    client = redis_client(decode_responses=True)
    found = dict.fromkeys(ids, False)
    try:
        texts = [await client.get(key) or "" async for key in client.scan_iter(f"saq:job:{queue_name}:*")]
        others = 0
        async for key in client.scan_iter(count=500):
            if all(found.values()) or others > 5000:
                break
            if key.startswith("saq:"):
                continue
            others += 1
            kind = await client.type(key)
            if kind == "string":
                texts.append(await client.get(key) or "")
            elif kind == "hash":
                texts.append(repr(await client.hgetall(key)))
            elif kind == "list":
                texts.append(repr(await client.lrange(key, 0, -1)))
            elif kind == "set":
                texts.append(repr(await client.smembers(key)))
            elif kind == "zset":
                texts.append(repr(await client.zrange(key, 0, -1)))
            found = {order: any(rid in text for text in texts) for order, rid in ids.items()}
        return {order: any(rid in text for text in texts) for order, rid in ids.items()}
    finally:
        await client.aclose()


def _check_ids_stored(queue_name: str, run: _OrdersRun) -> None:
    expected = run.expected()
    found = in_fresh_loop(lambda: _find_ids(queue_name, expected), timeout=10, name="check-2.1-ids")
    missing = [order for order, there in found.items() if not there]
    if not missing:
        _check_ids_enqueued(run, expected)
        return
    sent = _sent_headers()
    if all(order not in _order_ids() for order in missing):
        order = missing[0]
        how = "no X-Request-ID" if sent[order] is None else f"X-Request-ID {sent[order]!r}, which is not sane"
        raise Mismatch(
            "each job to carry the ID the middleware gave its request (the response's X-Request-ID)",
            f"the {len(missing)} requests sent without a sane X-Request-ID did not: the job of {order!r} "
            f"(sent with {how}) carried something else than its ID {expected[order]!r}. The endpoint read "
            "the raw header, not the ID the middleware chose",
            [
                "The middleware refuses a missing or unsafe header and makes a new ID: the request's ID is "
                "the one in `request_id_var`, not the header.",
                "Pass `request_id=request_id_var.get()` when you enqueue, not the header.",
            ],
        )
    memory = ""
    if run.state_added:
        names = ", ".join(f"app.state.{name}" for name in run.state_added)
        memory = (
            f" The endpoint kept something in the app's memory ({names}): a worker in another "
            "process does not share it"
        )
    raise Mismatch(
        "each job to carry its request's ID in Redis, with the job: all a worker in another process "
        "(or after a restart) can see",
        f"{len(missing)} of {_ORDERS} requests' IDs were nowhere in Redis once the requests were "
        f"answered (e.g. {expected[missing[0]]!r}, the ID of the request for {missing[0]!r}).{memory}",
        [
            "A worker is another process, possibly on another machine, perhaps started after a "
            "restart: what the endpoint leaves in its own memory never reaches it. Only the job's "
            "arguments travel with it, stored in Redis.",
            'Pass the ID when you enqueue: `enqueue("process_order", order_id=order_id, '
            "request_id=request_id_var.get())`, and in the job set `request_id_var` from it.",
        ],
    )


def _check_ids_enqueued(run: _OrdersRun, expected: dict[str, str]) -> None:
    """Each job must carry its request's ID in the enqueue itself: a running worker takes it at once."""
    added = [
        order
        for order, carried in run.enqueued_with.items()
        if order in expected and expected[order] not in carried
    ]
    if not added:
        return
    order = sorted(added)[0]
    raise Mismatch(
        "each job to carry its request's ID from the moment it is enqueued (a worker may take a job "
        "the instant it is stored)",
        f"{len(added)} of {_ORDERS} jobs were enqueued without their request's ID (e.g. the job for "
        f"{order!r} was enqueued with {run.enqueued_args[order]} only, without {expected[order]!r}); the ID "
        "reached Redis only afterwards, with a second command. A worker already running can take the "
        "job in between and run it under '-'",
        [
            "A worker waiting on the queue takes a job as soon as it is stored, before the endpoint's "
            "next line runs: whatever the job needs must be in it when it is enqueued.",
            "Pass the ID in the enqueue itself, not in a `job.update(…)` after it: "
            '`await request.app.state.queue.enqueue("process_order", order_id=order_id, '
            "request_id=request_id_var.get())`.",
        ],
    )


def _watched(job: Callable[..., Any], run: _OrdersRun) -> Callable[..., Any]:
    """``job`` as the check's worker runs it: noting each job's arguments, and what it raised."""

    @functools.wraps(job)
    async def watched(ctx: dict[str, Any], **kwargs: Any) -> Any:
        run.calls.append(dict(kwargs))
        run.ctx = ctx
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
            # each order once, whatever the argument's name: a job run twice (SAQ's sweep can retry a job
            # just taken off the queue) or left in a real Redis by an earlier run counts once
            run.finished_orders.update(
                v for v in kwargs.values() if isinstance(v, str) and v in _sent_headers()
            )

    return watched


def _check_jobs_run(app: Any, job: Callable[..., Any], queue_name: str, run: _OrdersRun) -> None:
    # the worker runs as a deployment's would: not in the app's process, so without the app's memory
    state = getattr(app, "state", None)
    with joins_new_threads():
        watched = _watched(job, run)
        names = {getattr(job, "__name__", "job"), getattr(job, "__qualname__", "job")}  # as SAQ would
        functions = [(name, watched) for name in names]
        if state is not None:
            app.state = State()
        try:
            worker = start_worker(queue_name, functions, concurrency=10, name="check-2.1-worker")
            try:
                deadline = time.monotonic() + _JOBS_WITHIN
                while time.monotonic() < deadline:
                    # each job the worker could not even start (an unknown name) logs one error
                    done = len(run.finished_orders) - len(run.errors) + len(worker.errors)
                    if len(run.finished_orders) >= _ORDERS or done >= _ORDERS:
                        break
                    time.sleep(0.01)
            finally:
                worker.stop()
        finally:
            if state is not None:
                app.state = state
    run.worker_errors = list(worker.errors)
    if run.errors:
        raise run.errors[0]  # the placeholder ("not started") or the learner's own error, as one line
    if len(run.finished_orders) < _ORDERS and run.worker_errors:
        last_line = run.worker_errors[0].strip().splitlines()[-1]
        raise Mismatch(
            f"the worker to run the {_ORDERS} jobs",
            f"{run.finished} ran; the worker reported {last_line[:120]}",
            [
                "Enqueue the job by the name of your job function: "
                '`await request.app.state.queue.enqueue("process_order", …)`.',
            ],
        )
    ours = len(run.finished_orders)
    expect(
        ours == _ORDERS,
        f"the worker to run the {_ORDERS} jobs within {_JOBS_WITHIN:g} s",
        f"{ours} ran" + (f" ({run.finished} runs in all)" if run.finished != ours else ""),
        "Does each job finish? It should call `await fulfil(order_id)` and return.",
    )


def _check_request_ids(worked_for: dict[str, Any], run: _OrdersRun) -> None:
    expected = run.expected()
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
    sent = _sent_headers()
    if all(order not in _order_ids() for order in wrong):
        order, seen = next(iter(wrong.items()))
        how = "no X-Request-ID" if sent[order] is None else f"X-Request-ID {sent[order]!r}, which is not sane"
        raise Mismatch(
            f"each job to work for the request that enqueued it ({_ORDERS} of {_ORDERS})",
            f"the {len(wrong)} requests sent without a sane X-Request-ID did not: the job for {order!r} "
            f"(sent with {how}) worked for {seen!r}, not the ID the middleware gave the request and its "
            f"response ({expected[order]!r}). The endpoint read the raw header, not `request_id_var`",
            [
                "The middleware refuses a missing or unsafe header and makes a new ID: the request's ID is "
                "the one in `request_id_var`, not the header.",
                "Pass `request_id=request_id_var.get()` when you enqueue, not the header.",
            ],
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
            "variable does not travel through the queue, nor does the app's memory: in the worker the "
            "variable holds only its default",
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


class _WorkFailed(Exception):
    """The check's stand-in for the job's work failing (a provider down, say): the queue retries."""


def _request_id_var(job: Callable[..., Any]) -> tuple[str, contextvars.ContextVar[Any]] | None:
    """The context variable the job sets, and its name: `request_id_var` where the job's code finds it."""
    function = inspect.unwrap(job)
    found: list[tuple[str, contextvars.ContextVar[Any]]] = []
    for name, value in (getattr(function, "__globals__", None) or {}).items():
        if isinstance(value, contextvars.ContextVar):
            found.append((name, value))
    code = getattr(function, "__code__", None)
    cells = getattr(function, "__closure__", None) or ()
    for name, cell in zip(getattr(code, "co_freevars", ())[: len(cells)], cells, strict=True):
        with contextlib.suppress(ValueError):  # an empty cell
            if isinstance(cell.cell_contents, contextvars.ContextVar):
                found.append((name, cell.cell_contents))
    for wanted in (lambda name, var: name == "request_id_var", lambda name, var: var.name == "request_id"):
        chosen = [(name, var) for name, var in found if wanted(name, var)]
        if chosen:
            return chosen[-1]
    return found[0] if len(found) == 1 else None


@contextlib.contextmanager
def _swapped(job: Callable[..., Any], name: str, replacement: Any) -> Any:
    """``name`` as the job's code finds it (a global, or a variable of an enclosing function), replaced
    by ``replacement`` for the block; yields whether it could be."""
    function = inspect.unwrap(job)
    code = getattr(function, "__code__", None)
    freevars = getattr(code, "co_freevars", ())
    namespace = getattr(function, "__globals__", None)
    cells = getattr(function, "__closure__", None) or ()
    if name in freevars[: len(cells)]:
        cell = cells[freevars.index(name)]
        try:
            original = cell.cell_contents
        except ValueError:  # an empty cell: nothing to swap
            yield False
            return
        cell.cell_contents = replacement
        try:
            yield True
        finally:
            cell.cell_contents = original
    elif isinstance(namespace, dict) and name in namespace:
        original = namespace[name]
        namespace[name] = replacement
        try:
            yield True
        finally:
            namespace[name] = original
    else:
        yield False


_OUTER_ID = "ex21-outer-request"  # the ID of whatever called the job directly
_FAILING_ID = "ex21-failing-call"


def _check_context_restored(job: Callable[..., Any], worked_for: dict[str, Any], run: _OrdersRun) -> None:
    """Run the job once more, directly in the check's own task: it must leave no ID behind; then run it
    where `request_id_var` already holds another ID, once succeeding and once with its work failing:
    each time its work runs under its own ID, and afterwards the variable holds the caller's again."""
    expected = run.expected()
    call = next((c for c in run.calls if expected.get(str(c.get("order_id"))) in c.values()), None)
    if call is None:
        return
    right = expected[str(call["order_id"])]

    def arguments(request_id: str, order: str) -> dict[str, Any]:
        return {**{k: (request_id if v == right else v) for k, v in call.items()}, "order_id": order}

    async def run_job(kwargs: dict[str, Any]) -> None:
        result = job(dict(run.ctx), **kwargs)
        if inspect.isawaitable(result):
            await result

    async def main() -> list[str]:
        await run_job(arguments(_DIRECT_ID, "ex21-direct"))
        return [var.name for var, value in contextvars.copy_context().items() if value == _DIRECT_ID]

    try:
        leaked = in_fresh_loop(main, timeout=5, name="check-2.1-direct")
    finally:
        worked_for.pop("ex21-direct", None)
    expect(
        not leaked,
        "the job to leave the context as it found it: after it returns, no variable holds its request's ID",
        f"after `await process_order(ctx, …)` returned, `{leaked[0] if leaked else ''}` still held "
        f"{_DIRECT_ID!r}, the ID of the job just run: whatever runs next in that context (the code that "
        "called the job, the next job run in the same task) works under another request's ID",
        "A context variable set and never reset keeps its value for the rest of the task that set it.",
        "Keep the token that `set` returns and reset in a `finally:`: "
        "`token = request_id_var.set(request_id)`, `try: await fulfil(order_id)`, "
        "`finally: request_id_var.reset(token)`.",
    )
    found = _request_id_var(job)
    if found is None:
        return
    name, var = found

    async def under_outer_id(kwargs: dict[str, Any], failing: bool = False) -> tuple[Any, bool]:
        """Run the job where the variable holds the caller's ID: (its value afterwards, whether it raised)."""
        token = var.set(_OUTER_ID)
        try:
            try:
                await run_job(kwargs)
            except Exception:
                if not failing:
                    raise
                return var.get(), True
            return var.get(), False
        finally:
            var.reset(token)

    try:
        after, _ = in_fresh_loop(
            lambda: under_outer_id(arguments(_DIRECT_ID, "ex21-direct")), timeout=5, name="check-2.1-outer"
        )
        worked = worked_for.get("ex21-direct")
    finally:
        worked_for.pop("ex21-direct", None)
    expect(
        worked == _DIRECT_ID,
        f"the job's work to run under the job's own ID ({_DIRECT_ID!r}), whatever its caller's ID",
        f"called where `{name}` held {_OUTER_ID!r}, the job's work ran under {short(worked)}",
        "The job must set the variable to its own `request_id` for its work, whatever it held before.",
    )
    restore_hints = (
        "Keep the token that `set` returns: `request_id_var.reset(token)` puts back exactly the value "
        "the variable held before the `set`, whatever it was.",
        "`token = request_id_var.set(request_id)`, `try: await fulfil(order_id)`, "
        "`finally: request_id_var.reset(token)`.",
    )
    expect(
        after == _OUTER_ID,
        f"the job to leave the context as it found it: called where `{name}` held {_OUTER_ID!r} (the "
        "caller's own request), the variable back to that once the job returns",
        f"after `await process_order(ctx, …)` returned, `{name}` held {short(after)}, not the caller's "
        f"{_OUTER_ID!r}: the job put a value of its own there instead of restoring the one it found, so "
        "the code that called it (a test, the next job run in the same task) lost its request's ID",
        "Setting the variable to '-' (or any value) after the work is not undoing your `set`: the "
        "caller may have held an ID of its own.",
        *restore_hints,
    )
    seen_by_work: list[Any] = []

    async def failing_fulfil(*args: Any, **kwargs: Any) -> None:
        seen_by_work.append(var.get())
        raise _WorkFailed("the work failed (the check made it fail)")

    with _swapped(job, "fulfil", failing_fulfil) as swapped:
        if not swapped:
            return
        after, failed = in_fresh_loop(
            lambda: under_outer_id(arguments(_FAILING_ID, "ex21-failing"), failing=True),
            timeout=5,
            name="check-2.1-fails",
        )
    worked_for.pop("ex21-failing", None)
    if not seen_by_work:
        return  # the job does not call `fulfil` by that name: nothing to judge
    expect(
        seen_by_work[0] == _FAILING_ID,
        f"the job's work to run under the job's own ID ({_FAILING_ID!r})",
        f"called where `{name}` held {_OUTER_ID!r}, the job's work ran under {short(seen_by_work[0])}",
        "The job must set the variable to its own `request_id` for its work, whatever it held before.",
    )
    expect(
        after == _OUTER_ID,
        f"the variable restored even when the work raises: called where `{name}` held {_OUTER_ID!r}, "
        "back to that once the failed job has raised",
        f"the check made `fulfil` raise (as a failed attempt does, which the queue retries); afterwards "
        f"`{name}` still held {short(after)}, not the caller's {_OUTER_ID!r}"
        + (
            ": the exception skipped the line that resets it, and the job's ID leaked to whatever runs "
            "next in that context"
            if after == _FAILING_ID
            else ""
        )
        + ("" if failed else " (and the job swallowed the error)"),
        "An exception skips every line after the `await` that raised it: a reset written after the "
        "work does not run when the work fails.",
        "Reset in a `finally:`, which runs whether the work returns or raises: "
        "`token = request_id_var.set(request_id)`, `try: await fulfil(order_id)`, "
        "`finally: request_id_var.reset(token)`.",
    )


def check_request_id_in_jobs(
    app: Any, process_order: Callable[..., Any], worked_for: dict[str, Any], queue_name: str
) -> None:
    """Check Exercise 2.1: every queued job works for the request ID of the request that enqueued it.

    Serves ``app``, its queue's enqueue slowed by a 0.1 s round trip, and sends 20
    ``POST /orders/{order_id}`` at once: 16 with a sane ``X-Request-ID`` of their own, 2 without one
    and 2 with one the middleware refuses (the request's ID is then the one its response announces).
    Each 202 must come once its job is stored; each request's ID must then be in Redis (in the job's
    record, or any other key), all a worker in another process can see, and in the arguments of the
    enqueue call itself (the check notes them as it is called: an ID added by a later command is too
    late for a worker already running). Then, with the server stopped and the app's ``state`` emptied
    (a worker process has its own), a SAQ worker runs ``process_order``; ``worked_for`` (order id → the
    request ID ``fulfil`` saw) must match the IDs announced. Last, the job is called directly, in the
    check's own task: afterwards no context variable may still hold the ID it was given; then where
    ``request_id_var`` already holds a caller's ID, once as it is and once with ``fulfil`` made to
    raise (swapped for the call, where the job's code finds it): each time the work runs under the
    job's ID, and afterwards the variable holds the caller's ID again (set, then reset in ``finally``).
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
            queue = getattr(getattr(app, "state", None), "queue", None)
            if callable(getattr(queue, "enqueue", None)):
                app.state.queue = _TimedQueue(queue, run)
            before = _state_keys(app)
            try:
                accepted = ex.step(
                    f"{_ORDERS} requests at once, with and without an X-Request-ID, each answered 202 "
                    "once its job is stored",
                    lambda: _check_orders_accepted(server, queue_name, run),
                )
            finally:
                run.state_added = sorted(_state_keys(app) - before)
                if isinstance(getattr(app.state, "queue", None), _TimedQueue):
                    app.state.queue = queue
        if not accepted:
            return
        ex.step(
            "each job carries its request's ID in Redis from the moment it is enqueued (a worker in another "
            "process sees only Redis)",
            lambda: _check_ids_stored(queue_name, run),
        )
        if not ex.step(
            f"a worker started afterwards, without the app's memory, runs the {_ORDERS} jobs",
            lambda: _check_jobs_run(app, process_order, queue_name, run),
        ):
            return
        if not ex.step(
            "every job worked for the request that enqueued it", lambda: _check_request_ids(worked_for, run)
        ):
            return
        ex.step(
            "the job restores the variable as it found it, whether its work returns or raises",
            lambda: _check_context_restored(process_order, worked_for, run),
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


_after_command: contextvars.ContextVar[Callable[[str], Awaitable[None]] | None] = contextvars.ContextVar(
    "check_2_2_after_command", default=None
)
"""What the check does after each Redis command of the job running in this context, given the command's
name (None: nothing)."""


def _job_client() -> redis.asyncio.Redis:
    """The Redis client the job gets: 1 ms per round trip, and the check's look after each command."""
    client = redis_client(decode_responses=True, latency=_COMMAND_LATENCY)
    execute = client.execute_command

    async def execute_then_look(*args: Any, **options: Any) -> Any:
        result = await execute(*args, **options)
        if (hook := _after_command.get()) is not None:
            await hook(str(args[0]).upper() if args else "")
        return result

    client.execute_command = execute_then_look  # type: ignore[method-assign]
    make_pipeline = client.pipeline

    def pipeline(*args: Any, **options: Any) -> Any:
        pipe = make_pipeline(*args, **options)
        run = pipe.execute

        async def execute_pipe(*run_args: Any, **run_options: Any) -> Any:
            result = await run(*run_args, **run_options)
            if (hook := _after_command.get()) is not None:
                await hook("MULTI/EXEC" if getattr(pipe, "is_transaction", False) else "pipeline")
            return result

        pipe.execute = execute_pipe
        return pipe

    client.pipeline = pipeline  # type: ignore[method-assign]
    return client


@dataclass
class _Scene:
    redis: redis.asyncio.Redis
    provider: _CheckProvider
    job: Callable[..., Any]
    look: redis.asyncio.Redis  # the check's own client: no latency, no hook

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

    async def keys(self, user: str) -> dict[str, int]:
        """The keys naming ``user``, each with its time to live in ms (-1: none)."""
        return {
            key: await self.look.pttl(key) async for key in self.look.scan_iter(match=f"*{_TOKEN}{user}*")
        }


def _scenario(job: Callable[..., Any], body: Callable[[_Scene], Awaitable[None]], name: str) -> None:
    """Run ``body`` on a fresh loop with a fresh provider, the check's Redis client, and clean keys."""

    async def main() -> None:
        client = _job_client()
        look = redis_client(decode_responses=True)
        try:
            await delete_keys(look, f"*{_TOKEN}*")
            await body(_Scene(client, _CheckProvider(), job, look))
        finally:
            await delete_keys(look, f"*{_TOKEN}*")
            await client.aclose()
            await look.aclose()

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
    # every copy's first command waits until each copy has sent its own: the copies interleave as they
    # do when a round trip is slower than running Python between commands, on any machine
    arrived, all_in = 0, asyncio.Event()

    async def copy() -> None:
        nonlocal arrived
        first = True

        async def after_command(_: str) -> None:
            nonlocal first, arrived
            if first:
                first, arrived = False, arrived + 1
                if arrived >= _COPIES:
                    all_in.set()
                await _wait(all_in, 1.0)

        _after_command.set(after_command)
        try:
            await scene.run("edsger")
        finally:
            if first:  # finished without a command: nobody waits for it
                first, arrived = False, arrived + 1
                if arrived >= _COPIES:
                    all_in.set()

    results = await asyncio.gather(*(copy() for _ in range(_COPIES)), return_exceptions=True)
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


_CLAIM_MS = (1_000, 3_600_000)  # a claim must outlast a send by far, and lapse within the hour


async def _claim_expires(scene: _Scene) -> None:
    before_send: list[tuple[str, int]] = []  # (key, ms to live) after each command, until the send is done
    during: list[tuple[str, int]] = []

    async def after_command(_: str) -> None:
        if scene.sent("barbara") == 0:
            before_send.extend((await scene.keys("barbara")).items())

    async def look(_: str) -> None:
        during.extend((await scene.keys("barbara")).items())

    scene.provider.during_send = look
    _after_command.set(after_command)
    try:
        await scene.run("barbara")
    finally:
        _after_command.set(None)
    expect(
        during,
        "a key in Redis that claims the user while the email is being sent",
        "no key mentioning the user existed during the send: it is written after sending, or never",
        "Claim before you send, so that a copy running at the same time sees the claim.",
        _CLAIM_HINT,
    )
    forever = [key for key, ttl in during if ttl == -1]
    expect(
        not forever,
        "the claim to expire on its own (a TTL) while the email is being sent",
        f"{forever[0] if forever else ''} had no expiry: if the worker crashed mid-send, the claim would "
        "stay for ever, and no retry would ever send",
        "A crashed worker cannot release its claim; an expiry releases it for it.",
        'Claim with `ex=`: `await redis.set(key, "sending", nx=True, ex=60)`; after a successful send, '
        'overwrite it with a permanent `await redis.set(key, "sent")`.',
    )
    unexpiring = [key for key, ttl in before_send if ttl == -1]
    expect(
        not unexpiring,
        "the claim to have its expiry from the moment it exists (claim and expiry in one command)",
        f"{unexpiring[0] if unexpiring else ''} existed without an expiry between two of your commands, "
        "before the send: a worker that crashed right then (between the claim and its EXPIRE) would "
        "leave a claim that never lapses, and the user would never get the email",
        "A crash can come between any two commands: the claim and its expiry must be one command.",
        "`SET` takes both: `await redis.set(key, token, nx=True, ex=CLAIM_SECONDS)` (not `setnx`, then "
        "`expire`).",
    )
    low, high = _CLAIM_MS
    odd = [(key, ttl) for key, ttl in during if ttl >= 0 and not low <= ttl <= high]
    if odd:
        key, ttl = odd[0]
        short_or_long = "shorter than a second" if ttl < low else "longer than an hour"
        raise Mismatch(
            "a claim that outlasts a send by far (at least a second) and lapses within the hour "
            "(CLAIM_SECONDS, 60 s)",
            f"{key} had {ttl} ms to live as the send began, {short_or_long}"
            + (
                ": it lapses during an ordinary send, and another copy takes over and sends again"
                if ttl < low
                else ": after a crash, the user waits that long for the email"
            ),
            [
                "`ex=` is in seconds, `px=` in milliseconds: `px=CLAIM_SECONDS` is 60 ms.",
                "Claim with `ex=CLAIM_SECONDS` (or `px=CLAIM_SECONDS * 1000`).",
            ],
        )


async def _after_expiry(scene: _Scene) -> None:
    await scene.run("ada")
    keys = await scene.keys("ada")
    lapsing = {key: ttl for key, ttl in keys.items() if ttl >= 0}
    for key in lapsing:  # a minute later: every key with a time to live has gone
        await scene.look.delete(key)
    await scene.run("ada")
    sent = scene.sent("ada")
    if sent > 1 and lapsing:
        key, ttl = next(iter(lapsing.items()))
        raise Mismatch(
            f"1 email to {_email('ada')}: the mark left after sending lasts for good",
            f"{sent}: after the send, every key naming the user had an expiry ({key}: {ttl / 1000:.0f} s "
            "left); the check let them lapse, as a minute does, and the next copy sent again",
            [
                "The claim expires so that a crash does not block the user; the mark that the email went "
                "out must not expire with it.",
                'Mark with a plain `await redis.set(key, "sent")`: a SET without `ex=` (and without '
                "`keepttl=True`) also clears the claim's expiry.",
            ],
        )
    expect(
        sent == 1,
        f"1 email to {_email('ada')} from a copy run a minute after the first",
        f"{sent}",
        "After sending, leave a mark that does not expire.",
    )


async def _slow_send_succeeds(scene: _Scene) -> None:
    user = "katherine"

    async def lapse(_: str) -> None:  # the send is slower than the claim: the claim lapses meanwhile
        for key, ttl in (await scene.keys(user)).items():
            if ttl > 0:
                await scene.look.delete(key)

    scene.provider.during_send = lapse
    await scene.run(user)
    scene.provider.during_send = None
    await scene.run(user)
    sent = scene.sent(user)
    expect(
        sent == 1,
        f"1 email to {_email(user)}: an email that went out is marked sent, even after a slow send",
        f"{sent}: the first copy's claim lapsed during its send, which then went through; its mark "
        "was not left (it marked only if the claim was still its own), so the next copy sent again",
        "The email went out whatever became of the claim: say so for good.",
        'After a successful send, mark unconditionally: `await redis.set(key, "sent")`.',
    )


async def _slow_copy(scene: _Scene) -> None:
    user, a_done, b_waiting = "hedy", asyncio.Event(), asyncio.Event()
    b_task: asyncio.Task[None] | None = None

    async def b_copy() -> None:
        async def after_command(_: str) -> None:  # copy B is held up after each command until A is done
            b_waiting.set()
            await _wait(a_done, 2.0)

        _after_command.set(after_command)
        await scene.run(user)

    async def start_b(_: str) -> None:
        nonlocal b_task
        if b_task is None:  # copy A is sending: copy B starts and looks
            b_task = asyncio.create_task(b_copy())
            await _wait(b_waiting, 1.0)

    scene.provider.during_send = start_b
    try:
        await scene.run(user)  # copy A
    finally:
        a_done.set()
        if b_task is not None:
            await asyncio.wait([b_task])
    if b_task is not None and b_task.exception() is not None:
        raise b_task.exception()  # the learner's own error, in copy B
    sent = scene.sent(user)
    expect(
        sent == 1,
        f"1 email to {_email(user)} from copy A and a copy B held up between its commands",
        f"{sent}: copy B looked while A was sending and found no mark; B was then held up (a slow "
        "network, a pause) while A sent, marked the user and released its claim; B then claimed the "
        "free user and sent again",
        "Between two commands of one copy, another copy may finish entirely: a look before the claim "
        "is out of date once the claim is yours.",
        'Keep one key that goes from your claim to "sent" without ever being absent (overwrite the '
        "claim with the mark, do not delete it after success), or look for the mark again once the "
        "claim is yours.",
    )


async def _copy_after_send(scene: _Scene) -> None:
    user = "mary"
    copies: list[tuple[str, list[str], asyncio.Task[None]]] = []  # (after which command, keys then, copy)

    async def copy() -> None:
        _after_command.set(None)  # the copy's own commands: no copies of copies
        await scene.run(user)

    async def after_command(command: str) -> None:  # between two commands of the job, once it has sent
        if scene.sent(user) == 0 or len(copies) >= 5:
            return
        keys = sorted(await scene.keys(user))
        task = asyncio.create_task(copy())
        copies.append((command, keys, task))
        await asyncio.wait([task], timeout=1.0)  # a copy that waits for this one must not stall it

    _after_command.set(after_command)
    try:
        await scene.run(user)
    finally:
        _after_command.set(None)
        if copies:
            await asyncio.wait([task for *_, task in copies])
    for *_, task in copies:
        if task.exception() is not None:
            raise task.exception()  # the learner's own error, in a copy
    sent = scene.sent(user)
    if sent <= 1 or not copies:
        return
    command, keys, _ = copies[0]
    raise Mismatch(
        f"1 email to {_email(user)}: once the email is sent, a copy arriving between two of the job's "
        "commands finds it sent (or still being sent)",
        f"{sent}: after the send succeeded, the check ran another copy right after your {command}, "
        + (
            "when no key named the user any more"
            if not keys
            else f"when the keys naming the user were {', '.join(keys)}"
        )
        + "; the copy found the user free and sent a second email. Between that command and the next "
        "one, nothing said the email was sent or being sent",
        [
            "Releasing the claim after a successful send opens a gap before the mark exists: between two "
            "of your commands another copy can run.",
            "Do not release after success: overwrite the claim with the mark, "
            '`await redis.set(key, "sent")`, and release only when the send fails (in `except`, not '
            "`finally`); with a separate mark key, write the mark first, then release the claim.",
        ],
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
    client that takes 1 ms per command and lets the check act after each command: the same job twice
    (1 email); two users (1 each); a first attempt whose send raises ``ProviderError``, then a retry
    (exactly 1, and the failure must propagate); 10 copies at once, each copy's first command held
    until all have sent theirs (1); the user's keys after each command before the send (none without
    an expiry: claim and expiry in one command) and during it (an expiry of 1 s to 1 h); a copy run
    after every key with an expiry has lapsed (1: the mark lasts); a send that outlasts its claim and
    succeeds, then another copy (1: marked anyway); a copy B held up after each of its commands while
    copy A sends, marks and releases (1); a copy run to its end after each command of a copy that has
    sent (1: no instant without a claim or a mark); and a takeover: copy A's claim lapses mid-send (the check
    expires it), copy B claims the user and sends slowly, A's send fails and A releases, then copy C
    runs while B is sending: 1 email in all, which a release by plain ``DELETE`` does not give.
    Keys containing "ex22-" (the check's users) are deleted before and after each scenario.
    """
    with exercise("2.2", "Make a job idempotent", SOLUTION) as ex:
        steps = [
            ("one run sends one welcome email", _once, "once"),
            ("the same job run twice sends one email", _twice, "twice"),
            ("two users get one email each", _two_users, "users"),
            ("after a failed attempt (ProviderError), the retry sends the email, once", _retry, "retry"),
            (f"{_COPIES} copies of the job at once send one email", _concurrent, "concurrent"),
            (
                "the claim expires on its own, from the moment it is taken, and outlasts a send",
                _claim_expires,
                "ttl",
            ),
            ("a copy run after the claim would have expired does not send again", _after_expiry, "later"),
            (
                "when the claim lapses during a send that succeeds, the email is still marked sent",
                _slow_send_succeeds,
                "slow-send",
            ),
            (
                "a copy held up between its commands while another sends does not send again",
                _slow_copy,
                "slow-copy",
            ),
            (
                "once the email is sent, a copy run between two of the job's commands does not send again",
                _copy_after_send,
                "after-send",
            ),
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
_RETRY_AFTER_MAX = (
    10  # the queue empties in about half a second: a client told to wait longer waits for nothing
)
_JOB_SECONDS = 0.1  # the consumer's time per job, as the exercise gives it
_PROBES = 3
# a refusal's own longest run on the event loop before its 503 (the median of all of them): a blocking
# wait makes it long; a right answer's steps take a fraction of a millisecond
_STEP_AT_MOST = 0.01
# … and how many times it let the loop go on before its 503 (the median): polling for room with
# `sleep(0)` does so at every turn; a thread hop or a middleware a few times
_SUSPENSIONS_AT_MOST = 50


class _Pause:
    """Holds the app's consumers back (their next ``queue.get()`` waits), so a full queue stays full;
    and notes each job put on the queue (``put`` goes through ``put_nowait``), with whether the
    consumers were held back then, the most jobs waiting just after a put, and when each wait of a
    ``put`` on the full queue ended (``waits_for_room``), until ``stop``."""

    def __init__(self, queue: Any) -> None:
        self.queue, self.go = queue, threading.Event()
        self.put: list[tuple[Any, bool]] = []  # (job, put while the consumers were held back)
        self.most_waiting = 0
        self.waits_for_room: list[float] = []  # when each wait of a `put` on the full queue ended
        self.stored: list[Any] = []  # every job that entered the queue, in order
        get, put_nowait, store = type(queue).get, type(queue).put_nowait, type(queue)._put
        noted = self.waits_for_room

        class Putters(collections.deque):  # type: ignore[type-arg]
            """``asyncio.Queue.put`` parks a future here whenever the queue is full, whatever the way in
            (the method, ``asyncio.Queue.put(queue, …)``, a subclass): note when each wait ends, done
            or given up (a timeout around it cancels it)."""

            def append(self, putter: Any) -> None:
                putter.add_done_callback(lambda _: noted.append(time.perf_counter()))
                super().append(putter)

        async def held_get() -> Any:
            while not self.go.is_set():
                await asyncio.sleep(0.01)
            return await get(queue)

        def noted_put_nowait(item: Any) -> None:
            put_nowait(queue, item)  # raises QueueFull: nothing put
            self.put.append((item, not self.go.is_set()))

        def counted_put(item: Any) -> None:  # every put ends here, whatever the way in
            store(queue, item)
            self.stored.append(item)
            self.most_waiting = max(self.most_waiting, queue.qsize())

        queue.get, queue.put_nowait, queue._put = held_get, noted_put_nowait, counted_put
        queue._putters = Putters(queue._putters)

    def release(self) -> None:
        self.go.set()
        with contextlib.suppress(AttributeError):
            del self.queue.get

    def stop(self) -> None:
        self.release()
        with contextlib.suppress(AttributeError):
            del self.queue.put_nowait
        self.queue._putters = collections.deque(self.queue._putters)
        with contextlib.suppress(AttributeError):
            del self.queue._put


@dataclass
class _JobTrace:
    """One ``POST /jobs/{job}`` as the served app handled it."""

    job: str
    entered: float = field(default_factory=time.perf_counter)  # when the app was called
    answered: float | None = None  # when its response started
    status: int | None = None  # … and with which status
    retry_after: str | None = None  # … and Retry-After
    steps: int = 0  # runs of its own code on the event loop before the response started (``_Stepped``)
    longest: float = 0.0  # the longest of them, in seconds
    queued_first: bool | None = None  # for a 2xx: whether its job was on the queue by then
    waits: list[tuple[str, float]] = field(default_factory=list)  # (what, seconds), before it answered

    @property
    def in_app(self) -> float | None:
        return None if self.answered is None else self.answered - self.entered


class _Stepped:
    """Awaits a coroutine one step at a time, timing each run of its code on the event loop (until it
    suspends) while ``trace`` has not answered: what the request itself did, whatever else the loop
    and the machine were doing between its steps."""

    def __init__(self, coro: Any, trace: _JobTrace) -> None:
        self.coro, self.trace = coro, trace

    def __await__(self) -> Any:
        steps, trace = self.coro.__await__(), self.trace
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                start = time.perf_counter()
                try:
                    suspended = steps.throw(error) if error is not None else steps.send(value)
                except StopIteration as done:
                    return done.value
                finally:
                    if trace.answered is None or trace.answered >= start:  # a step before it answered
                        trace.steps += 1
                        trace.longest = max(trace.longest, (trace.answered or time.perf_counter()) - start)
                try:
                    value, error = (yield suspended), None
                except BaseException as raised:  # cancelled, or a thrown error: pass it in
                    value, error = None, raised
        finally:
            steps.close()


_JOB_TRACE: contextvars.ContextVar[_JobTrace | None] = contextvars.ContextVar("check_2_3_job", default=None)
_NOTED = "_check_2_3_noted"  # marks a timer callback the check already wraps
_ABSENT = object()


class _Watched:
    """The app as check 2.3 serves it the second time: each ``POST /jobs/{job}`` runs with a
    ``_JobTrace`` in ``_JOB_TRACE`` (which tasks it creates, and ``to_thread``, inherit), noting its
    status, for a 2xx whether its job was already on the queue (``queued``, once the check can tell),
    and each wait it made before its response started: a timer set on the event loop from its context
    that went off before then (a sleep, a timeout around any wait: ``wait_for``, ``asyncio.timeout``,
    anyio's scopes, ``asyncio.wait(timeout=…)``), and each ``time.sleep`` from its context. A timer set
    and cancelled, or still pending when the response starts, is no wait. The app is awaited one step
    at a time (``_Stepped``), so the request's own runs on the loop are counted and timed."""

    _TIMERS = ("call_later", "call_at")
    _WRAPPED = (*_TIMERS, "run_in_executor")

    def __init__(self, app: Any) -> None:
        self.app = app
        self.traces: list[_JobTrace] = []
        self.queued: Callable[[str], bool] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._saved: dict[str, Any] = {}
        self._sleep: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = str(scope.get("path", ""))
        if scope.get("type") != "http" or scope.get("method") != "POST" or not path.startswith("/jobs/"):
            await self.app(scope, receive, send)
            return
        self._watch(asyncio.get_running_loop())
        trace = _JobTrace(path.removeprefix("/jobs/"))
        self.traces.append(trace)

        async def traced_send(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start" and trace.status is None:
                trace.answered = time.perf_counter()
                trace.status = int(message.get("status", 0))
                for name, value in message.get("headers", []):
                    if bytes(name).lower() == b"retry-after":
                        trace.retry_after = bytes(value).decode("latin-1")
                if 200 <= trace.status < 300 and self.queued is not None:
                    trace.queued_first = self.queued(trace.job)
            await send(message)

        token = _JOB_TRACE.set(trace)
        try:
            await _Stepped(self.app(scope, receive, traced_send), trace)
        finally:
            _JOB_TRACE.reset(token)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wrap ``loop``'s ``call_later`` and ``call_at`` (asyncio's goes from the first to the second,
        uvloop's the other way: a callback is wrapped once) and ``time.sleep``, noting the waits of a
        request that has not answered yet."""
        if self._loop is loop:
            return
        self.unwatch()
        own = getattr(loop, "__dict__", {})
        self._loop, self._saved = loop, {n: own.get(n, _ABSENT) for n in self._WRAPPED}
        for name in self._TIMERS:
            original = getattr(loop, name)

            def noting(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                trace = _JOB_TRACE.get()
                if trace is None or trace.status is not None or len(args) < 2 or hasattr(args[1], _NOTED):
                    return _original(*args, **kwargs)
                at, callback, *rest = args
                delay = float(at - loop.time() if _name == "call_at" else at)

                def fired(*callback_args: Any) -> Any:
                    if trace.status is None and delay > 0:
                        trace.waits.append(("a timer", delay))
                    return callback(*callback_args)

                setattr(fired, _NOTED, True)
                return _original(at, fired, *rest, **kwargs)

            with contextlib.suppress(AttributeError, TypeError):  # a loop that takes no attribute
                setattr(loop, name, noting)
        run_in_executor = loop.run_in_executor

        def in_context(executor: Any, func: Any, *args: Any) -> Any:
            """``run_in_executor`` with the request's context, as ``asyncio.to_thread`` has: its
            ``time.sleep`` is noted too."""
            if _JOB_TRACE.get() is None:
                return run_in_executor(executor, func, *args)
            return run_in_executor(executor, functools.partial(contextvars.copy_context().run, func, *args))

        with contextlib.suppress(AttributeError, TypeError):
            loop.run_in_executor = in_context  # type: ignore[method-assign]
        if self._sleep is None:
            self._sleep = sleep = time.sleep

            def noted_sleep(seconds: float) -> None:
                trace = _JOB_TRACE.get()
                if trace is not None and trace.status is None and seconds > 0:
                    trace.waits.append(("`time.sleep`", float(seconds)))
                sleep(seconds)

            time.sleep = noted_sleep

    def unwatch(self) -> None:
        """Put back what ``_watch`` replaced (from any thread: the loop may have closed)."""
        loop, self._loop = self._loop, None
        for name, saved in self._saved.items():
            with contextlib.suppress(AttributeError, TypeError):
                if saved is _ABSENT:
                    vars(loop).pop(name, None)
                else:
                    setattr(loop, name, saved)
        self._saved = {}
        if self._sleep is not None:
            time.sleep, self._sleep = self._sleep, None

    def waited_refusals(self) -> list[_JobTrace]:
        """The refusals (answered, not 2xx) that waited before answering."""
        return [t for t in self.refusals() if t.waits]

    def refusals(self) -> list[_JobTrace]:
        return [t for t in self.traces if t.status is not None and not 200 <= t.status < 300]

    def answered_before_queued(self) -> list[_JobTrace]:
        return [t for t in self.traces if t.queued_first is False]


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
    paused: bool = False  # the consumers were held back during the spike
    # the most jobs in the app's queue as the spike's went in (None: it could not be read)
    waiting: int | None = None

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


def _check_restarted(server: Server, processed: list[Any], first_queue: Any, app: Any) -> None:
    processed.clear()
    (answer,) = in_fresh_loop(lambda: _post_jobs(server, ["again"]), timeout=10, name="check-2.3-again")
    if answer.status >= 500:
        _raise_server_error(server, [answer.status], "status 202 for one job after a restart")
    expect(
        200 <= answer.status < 300,
        "status 202 (accepted) for one job, the app started a second time",
        f"status {answer.status}" if answer.status else f"no answer within {_ANSWER_WITHIN:g} s",
        "Create the queue in the lifespan, at each start: "
        "`app.state.queue = asyncio.Queue(maxsize=QUEUE_SIZE)`.",
    )
    _wait_processed(processed, {"again"}, _PROCESSED_WITHIN)
    if "again" in processed:
        return
    same = first_queue is not None and getattr(app.state, "queue", None) is first_queue
    raise Mismatch(
        "the job to be processed after the app started a second time (a new server, a new event loop)",
        f"not processed within {_PROCESSED_WITHIN:g} s"
        + (
            ": the second start kept the first start's queue (`app.state.queue` is the same object). An "
            "`asyncio.Queue` belongs to the event loop that first waited on it, so the new start's "
            "consumer could not wait on it, and it still held whatever the first start left in it"
            if same
            else ""
        ),
        [
            "Each start of the app runs on its own event loop, with consumers of its own: it needs a "
            "queue of its own too.",
            "Create the queue unconditionally in the lifespan: `app.state.queue = "
            "asyncio.Queue(maxsize=QUEUE_SIZE)`.",
        ],
    )


def _check_spike_answered(server: Server, processed: list[Any], spike: _Spike, watched: _Watched) -> None:
    processed.clear()
    jobs = [f"j-{i:02d}" for i in range(_SPIKE)]
    spike.answers = in_fresh_loop(lambda: _post_jobs(server, jobs), timeout=30, name="check-2.3-spike")
    spike.processed_by_then = len(processed)
    spike.answers = _as_served(spike.answers, watched)
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


def _expect_queued_before_202(spike: _Spike, watched: _Watched) -> None:
    """Each 2xx went out once its job was on the queue (the order of two events on the server's loop)."""
    early = watched.answered_before_queued()
    expect(
        not early,
        "each 202 sent once its job is on the queue (a 202 promises the job is queued)",
        f"{len(early)} of {len(spike.accepted)} 202s went out before their job was on the queue (e.g. "
        f"{early[0].job!r}): the put came after the response, if at all"
        if early
        else "",
        "Until the put has succeeded, nothing is promised: the queue may fill meanwhile, and the put "
        "fail after the client was told its job was accepted.",
        "Put the job on the queue in the endpoint, before returning: `queue.put_nowait(job_id)`, then "
        "return 202; no BackgroundTasks or task for the put.",
    )


def _as_served(answers: list[_Answer], watched: _Watched) -> list[_Answer]:
    """The spike's answers, where the client gave up on one the app answered (a machine too busy to
    carry 30 answers back in time) within 2 s more, taken from the server's record of it: its status
    and Retry-After, its time in the app. One still unanswered then waits for something that does not
    come while the consumers are held back (room in the queue); how long a refusal waited is judged
    by its mechanism in the step after next."""
    late = {a.job for a in answers if a.status == 0}
    deadline = time.monotonic() + 2.0  # the server may still be sending them
    while late and time.monotonic() < deadline:
        served = {t.job: t for t in watched.traces if t.job in late}
        if len(served) == len(late) and all(t.status is not None for t in served.values()):
            break
        time.sleep(0.02)
    served = {t.job: t for t in watched.traces if t.job in late and t.in_app is not None}
    return [
        _Answer(a.job, t.status or 0, t.retry_after, t.in_app or 0.0)
        if a.status == 0 and (t := served.get(a.job)) is not None
        else a
        for a in answers
    ]


def _check_refused(spike: _Spike, queue_size: int, consumers: int, watched: _Watched) -> None:
    _expect_queued_before_202(spike, watched)  # accepted first, queued (or not) later: say so first
    statuses = Counter(a.status for a in spike.answers)
    accepted = len(spike.accepted)
    finished = 0 if spike.paused else spike.processed_by_then
    bound = queue_size + consumers + finished
    why = f"QUEUE_SIZE {queue_size} waiting + {consumers} consumer(s)'s job in progress" + (
        "" if spike.paused else f" + {finished} finished meanwhile"
    )
    shown = ", ".join(f"{n} × {status}" for status, n in sorted(statuses.items()))
    if accepted == _SPIKE:
        raise Mismatch(
            f"some 503s: at most {bound} of {_SPIKE} accepted ({why})",
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
    waiting = f", up to {spike.waiting} of them waiting in the queue" if spike.waiting is not None else ""
    # the queue's own count, where it can be read, decides: whether a consumer took a job before it was
    # held back depends on timing (one already waiting in `get()` may run before the queue fills, or after)
    expect(
        accepted <= bound and (spike.waiting is None or spike.waiting <= queue_size),
        f"at most {bound} of {_SPIKE} accepted ({why})"
        + (f", at most {queue_size} of them waiting" if spike.waiting is not None else ""),
        f"{accepted} accepted{waiting}: more than QUEUE_SIZE jobs waited",
        "`maxsize` counts the jobs waiting in the queue; a job a consumer has taken (`get()`) has left it. "
        "So `maxsize=QUEUE_SIZE`, nothing added; and a hand-made test of `qsize()` is easily one off.",
        f"Create the queue with `asyncio.Queue(maxsize=QUEUE_SIZE)` and let `put_nowait` say when it is "
        f"full; start {consumers} consumer(s).",
    )
    others = sorted(status for status in statuses if not 200 <= status < 300 and status != 503)
    expect(
        not others,
        "503 (Service Unavailable) for the requests refused",
        shown,
        "503 says the server is overloaded right now; 429 would blame the client's own rate.",
        '`raise HTTPException(503, "queue full", headers={"Retry-After": "1"})`.',
    )


def _check_refused_at_once(server: Server, spike: _Spike, pause: _Pause, watched: _Watched) -> None:
    """The refusals, of the spike and of probes sent while the queue stays full, come without waiting:
    no ``queue.put`` awaited on the full queue, no timer from their code that went off before the 503,
    no ``time.sleep`` (mechanisms, whatever the machine); no blocking call: the median refusal's longest
    run of its own code on the loop within ``_STEP_AT_MOST`` (a busy loop, ``threading.Event.wait``);
    no polling: the median refusal suspended at most ``_SUSPENSIONS_AT_MOST`` times (``sleep(0)`` in a
    loop). No duration of a whole request is judged: a client's latency, or a request's time in the
    app, depends on the machine (a loaded one took 0.39 s for a right answer's probes; a right answer
    with a thread hop spent up to 0.78 s in the app with another thread holding the GIL)."""
    # The spike can end with one slot free (a consumer took its job after the last answer came):
    # fill the queue one request at a time until a 503, so that the probes meet a full queue.
    for n in range(4):
        (answer,) = in_fresh_loop(
            lambda job=f"top-up-{n}": _post_jobs(server, [job]), timeout=10, name="check-2.3-top-up"
        )
        spike.answers.append(answer)
        if answer.status == 503:
            break
    probes = [f"probe-{i}" for i in range(_PROBES)]
    pause.waits_for_room.clear()
    sent = time.perf_counter()
    answers = in_fresh_loop(lambda: _post_jobs(server, probes), timeout=10, name="check-2.3-probes")
    taken = [a for a in answers if 200 <= a.status < 300]
    expect(
        not taken,
        "503 for every job sent while the queue is full and no consumer takes a job",
        f"{len(taken)} of {_PROBES} accepted (202)",
        "Refuse when the queue is full: `queue.put_nowait(job_id)` raises `asyncio.QueueFull`.",
    )
    # a wait that ended before the last answer held a request (a put still waiting after it, in a task
    # of its own, held none: that answer is judged by what happens to its job)
    answered = time.perf_counter()  # every answer is in
    waited = sum(sent <= ended <= answered for ended in list(pause.waits_for_room))
    slow = watched.waited_refusals()
    refusals = watched.refusals()
    in_app = statistics.median(t.in_app or 0.0 for t in refusals) if refusals else 0.0
    longest = statistics.median(t.longest for t in refusals) if refusals else 0.0
    suspended = statistics.median(t.steps - 1 for t in refusals) if refusals else 0
    blocked, polled = longest > _STEP_AT_MOST, suspended > _SUSPENSIONS_AT_MOST
    expect(
        not waited and not slow and not blocked and not polled,
        "a refusal at once, with no wait for room: no `await queue.put(…)` on the full queue, no sleep or "
        "timeout that runs out before the 503, no blocking call, no polling",
        (
            f"{waited} `await queue.put(…)` on the full queue ended before the answers to the {_PROBES} "
            "requests sent while it stayed full: the endpoint waited for room"
            if waited
            else f"{len(slow)} of {len(refusals)} refusals waited before answering: job {slow[0].job!r} "
            f"waited for {_waits(slow[0])} before its 503"
            if slow
            else f"the median refusal ran for {longest:.3f} s at a stretch before its 503, without letting "
            "the event loop run anything else: a blocking call (`time.sleep`, `threading.Event.wait`, a busy "
            "loop) in an `async def` endpoint, during which the whole server stands still"
            if blocked
            else f"the median refusal let the event loop go on {suspended:.0f} times before its 503: it "
            "polled for room (`await asyncio.sleep(0)` in a loop, or the like)"
        )
        + f" (the median refusal took {in_app:.3f} s in the app)"
        + ", holding the client (and a request's worth of the server) exactly when the server is overloaded",
        "A full queue is the answer: refuse then, and let `Retry-After` say when to come back.",
        "`queue.put_nowait(job_id)` raises `asyncio.QueueFull` at once; no `wait_for` around `put`, no "
        "sleep (`asyncio`'s or `time`'s), no loop that tries again.",
    )


def _waits(trace: _JobTrace) -> str:
    """What a request waited for, e.g. "a timer of 0.050 s (3 times)"."""
    counted = Counter((what, round(seconds, 3)) for what, seconds in trace.waits)
    return ", ".join(
        f"{what} of {seconds:.3f} s" + (f" ({n} times)" if n > 1 else "")
        for (what, seconds), n in counted.items()
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
    bad += [a.retry_after for a in refused if not bad and int(str(a.retry_after)) > _RETRY_AFTER_MAX]
    expect(
        not bad,
        f"Retry-After as a whole number of seconds, at least 1 and about when there is room again "
        f'(at most {_RETRY_AFTER_MAX}; e.g. "1")',
        (f"Retry-After: {bad[0]!r}" if bad else "")
        + (
            ", while the queue empties in about half a second"
            if bad and _RETRY_AFTER.fullmatch(str(bad[0]).strip())
            else ""
        ),
        'HTTP allows only whole seconds (or a date): clients cannot read "0.5" or "1.0", and "0" '
        "asks them to retry at once.",
        "Round the expected wait up: `str(max(1, math.ceil(seconds)))`.",
    )


def _check_all_processed(
    processed: list[Any], spike: _Spike, queue: Any, pause: _Pause | None, watched: _Watched
) -> None:
    _expect_queued_before_202(spike, watched)
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
    # counted where they enter the queue: a refused job processed last may still be in progress now
    queued_then = [
        job for job, held in (pause.put if pause is not None else []) if held and job not in accepted
    ]
    if queued_then:
        first = sorted(queued_then)[0]
        raise Mismatch(
            "no job left on the queue by a request answered 503: a refused job is not queued",
            f"{len(queued_then)} of the {len(spike.refused)} requests answered 503 had put their job on "
            f"the queue first (e.g. {first!r}): the job that took the last slot was refused, yet stays "
            "queued and gets processed, and its client, told to retry, sends it again",
            [
                "Whether there was room is known only from the put itself: `put_nowait` either queues the "
                "job, then answer 202, or raises QueueFull and queues nothing, then 503. A look at "
                "`full()` after a put that succeeded sees the slot your own job just took.",
                "`try: queue.put_nowait(job_id)` / `except asyncio.QueueFull: raise HTTPException(503, …)`; "
                "otherwise 202, with no second test of the queue.",
            ],
        )
    refused = sorted(set(done) - accepted)
    put_later = sorted({job for job, _ in (pause.put if pause is not None else [])} - accepted - set(done))
    left = queue.qsize() if isinstance(queue, asyncio.Queue) else 0
    expect(
        not refused and not put_later and not left,
        "only accepted jobs processed, and nothing else in the queue once they are done",
        "; ".join(
            ([f"{len(refused)} refused jobs processed too (e.g. {refused[0]!r})"] if refused else [])
            + (
                [
                    f"{len(put_later)} refused jobs put on the queue once there was room "
                    f"(e.g. {put_later[0]!r})"
                ]
                if put_later
                else []
            )
            + ([f"{left} more jobs waiting in the queue once every accepted one was done"] if left else [])
        )
        + ": jobs answered 503 were put on the queue anyway",
        "Answer 503 only for a job you did not put on the queue, and then do not put it there later: "
        "the client, told to retry, sends it again, and a hidden backlog of waiting puts grows.",
        "In `except asyncio.QueueFull:` only refuse: no `put`, no task that puts it later.",
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

    Serves ``app``; posts one job (accepted, then processed); serves it again (a second start, a new
    event loop) and posts another (processed: a queue of its own). Then, with the consumers held back
    (their next ``queue.get()`` waits, so the queue stays full), a spike of 30
    ``POST /jobs/{job_id}`` at once: every request answered within 1.5 s and none with 500; some
    accepted (2xx), at most ``queue_size + consumers``; the rest 503, each with ``Retry-After`` in
    whole seconds from 1 to 10, and every 2xx sent once its job is on the queue; 3 more requests, sent
    while the queue is still full, refused without awaiting ``queue.put`` on it; no refusal of the
    spike or after it may wait before it answers (a timer from its code that went off first, a
    ``time.sleep``: ``_Watched``), block the event loop (its longest own step, median 10 ms at most)
    or poll (suspended 50 times at most, median). No refused job may have
    entered the queue (counted as each is put, while the consumers are held back). Released, the
    consumers must process every accepted job (``processed`` lists the job ids done), once, and no
    refused one.
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
            first_queue = getattr(app.state, "queue", None)
        watched = _Watched(app)
        try:
            with joins_new_threads(), serve_answer(watched, "check-2.3", "2.3", _SERVE_FAILED) as server:
                if not ex.step(
                    "started again (a new server, a new event loop), the app accepts and processes a job",
                    lambda: _check_restarted(server, processed, first_queue, app),
                ):
                    return
                queue = getattr(app.state, "queue", None)
                pause = _Pause(queue) if isinstance(queue, asyncio.Queue) else None
                spike.paused = pause is not None
                if pause is not None:
                    stored = pause.stored
                    watched.queued = lambda job: job in stored
                try:
                    _bounded_queue_steps(
                        ex, server, processed, spike, queue, pause, watched, queue_size, consumers
                    )
                finally:
                    if pause is not None:
                        pause.stop()
        finally:
            watched.unwatch()


def _bounded_queue_steps(
    ex: Any,
    server: Server,
    processed: list[Any],
    spike: _Spike,
    queue: Any,
    pause: _Pause | None,
    watched: _Watched,
    queue_size: int,
    consumers: int,
) -> None:
    """Check 2.3's steps from the spike on (the caller removes ``pause``'s wrappers however they end)."""
    try:
        if not ex.step(
            f"a spike of {_SPIKE} requests at once (the consumers held back): each answered "
            f"within {_ANSWER_WITHIN:g} s, none with 500",
            lambda: _check_spike_answered(server, processed, spike, watched),
        ):
            return
        if pause is not None:
            # the queue's own count as each job went in: read after the spike, it depends on
            # whether a consumer already waiting in `get()` has run since (late, on a loaded machine)
            spike.waiting = pause.most_waiting if pause.most_waiting or not spike.accepted else None
        if not ex.step(
            "once the queue is full, the rest are refused with 503 (each 202 sent once its job is queued)",
            lambda: _check_refused(spike, queue_size, consumers, watched),
        ):
            return
        if pause is not None:
            ex.step(
                "while the queue stays full, a refusal comes at once, with no wait for room",
                lambda: _check_refused_at_once(server, spike, pause, watched),
            )
        ex.step(
            f"every 503 carries Retry-After: whole seconds, at least 1, at most {_RETRY_AFTER_MAX}",
            lambda: _check_retry_after(spike),
        )
    finally:
        if pause is not None:
            pause.release()
    ex.step(
        "every accepted job is processed, once, and no refused one",
        lambda: _check_all_processed(processed, spike, queue, pause, watched),
    )


# ---------------------------------------------------------------------------------------------------
# Exercise 2.4: an export that answers at once and can be asked how it went
# ---------------------------------------------------------------------------------------------------

_EXPORTS_PATH = "/exports"
_EXPORT_PATH = "/exports/{export_id}"
_CALL_2_4 = "Call the check as `check_async_exports(reports_app, run_export, EXPORTS_QUEUE)`."
_STATES = ("queued", "running", "done", "failed")
_SLOTS = 4  # the check's worker builds at most this many exports at once
_POST_WITHIN = 1.0  # each POST answered within this, while every build is held back
_SETTLE_WITHIN = 2.0  # after POSTs got no answer in time, how long the check waits to see why
_STARTED_WITHIN = 3.0
_BUILD_SECONDS_2_4 = 0.1  # a build's time once the check lets it go (the notebook's takes 0.5 s)
_HELD_AT_MOST = 15.0  # a build held back longer than this goes on anyway: nothing waits for ever
_SETTLED_WITHIN = 10.0  # for every export to end done or failed (retries with backoff included)
_IDLE_WITHIN = 3.0
_QUEUE_LATENCY = 0.05  # each `job` and `enqueue` of the app's queue: a round trip to a Redis elsewhere
_ATTEMPTS_AT_MOST = 5  # a build that fails the same way every time, tried more often, is retried for ever
_FAILURE = "the warehouse timed out building refunds for 2026-01"
_UNKNOWN_ID = "ex24-no-such-export"
_WAITED_AT_MOST = 0.25  # a POST's time in the endpoint beyond its queue calls and the server's stalls
_TICK = 0.005  # the server's event loop is looked at this often while POSTs are in flight
_KEPT_AT_LEAST = 30  # seconds a finished export's job must still have in Redis (SAQ's default ttl: 600)


@dataclass(frozen=True)
class _Export:
    label: str
    report: str
    month: str
    rows: int | None  # None: its build fails
    key: bool = False  # sent with the run's Idempotency-Key

    @property
    def params(self) -> dict[str, str]:
        return {"report": self.report, "month": self.month}

    @property
    def what(self) -> str:
        return f"{self.report} {self.month}"


_SENT = (
    _Export("sales-jan", "sales", "2026-01", 1204),
    _Export("sales-feb", "sales", "2026-02", 1187),
    _Export("stock-jan", "stock", "2026-01", 312),
    _Export("refunds-jan", "refunds", "2026-01", None),
    _Export("visits-a", "visits", "2026-01", 5890),  # the same body twice, no key: two exports
    _Export("visits-b", "visits", "2026-01", 5890),
    _Export("orders-1", "orders", "2026-01", 2075, key=True),  # the same body twice, one key: one export
    _Export("orders-2", "orders", "2026-01", 2075, key=True),
)
_FAILING = next(e for e in _SENT if e.rows is None)
_KEYED = next(e for e in _SENT if e.key)


def _what(params: Any) -> str:
    """What a build was asked for, as the check names its exports ("sales 2026-01")."""
    if isinstance(params, dict):
        return f"{params.get('report')} {params.get('month')}"
    return short(params, 40)


class _ExportFailedStandIn(Exception):
    """What the check's build raises when the job's code has no `ExportFailed` of its own."""


@dataclass
class _Build:
    what: str
    thread: str
    outcome: str = "building"  # then "done", "failed" or "cancelled"


class _Warehouse:
    """The check's ``build_export``: each build is noted (what, in which thread), held back until
    ``go`` is set, then takes 0.1 s; the refunds export fails with the notebook's ``ExportFailed``."""

    def __init__(self, failure: type[BaseException]) -> None:
        self.failure = failure
        self.go = threading.Event()
        self.builds: list[_Build] = []
        self._lock = threading.Lock()

    async def build_export(self, params: dict[str, Any]) -> int:
        build = _Build(_what(params), threading.current_thread().name)
        with self._lock:
            self.builds.append(build)
        try:
            held_until = time.monotonic() + _HELD_AT_MOST
            while not self.go.is_set() and time.monotonic() < held_until:
                await asyncio.sleep(0.01)
            await asyncio.sleep(_BUILD_SECONDS_2_4)
        except asyncio.CancelledError:
            build.outcome = "cancelled"
            raise
        if build.what == _FAILING.what:
            build.outcome = "failed"
            raise self.failure(_FAILURE)
        build.outcome = "done"
        return next((e.rows for e in _SENT if e.what == build.what and e.rows), 1)

    def count(self, what: str) -> int:
        return sum(b.what == what for b in list(self.builds))

    def building(self) -> Counter[str]:
        return Counter(b.what for b in list(self.builds) if b.outcome == "building")


def _name_in(function: Any, name: str) -> Any:
    """``name`` as ``function``'s code finds it (a variable of an enclosing function, or a global)."""
    function = inspect.unwrap(function)
    code = getattr(function, "__code__", None)
    cells = getattr(function, "__closure__", None) or ()
    for free, cell in zip(getattr(code, "co_freevars", ())[: len(cells)], cells, strict=True):
        if free == name:
            with contextlib.suppress(ValueError):
                return cell.cell_contents
    return (getattr(function, "__globals__", None) or {}).get(name)


_CONTAINERS = (dict, list, set, deque)


class _Memory:
    """The process's memory as the learner's functions reach it: the dicts, lists and sets in their
    module's globals and their closures (and their helpers' closures). ``forget()`` puts back what each
    held when the check began, as a restarted process would find them, and names those that changed."""

    def __init__(self, *functions: Any) -> None:
        self._saved: dict[int, tuple[str, Any, Any]] = {}
        self.forgotten: list[str] = []
        for function in functions:
            function = inspect.unwrap(function)
            for name, value in (getattr(function, "__globals__", None) or {}).items():
                self._note(name, value)
            for name, value in self._closure(function):
                self._note(name, value)
                if inspect.isfunction(value):
                    for inner, held in self._closure(value):
                        self._note(inner, held)

    @staticmethod
    def _closure(function: Any) -> list[tuple[str, Any]]:
        code = getattr(function, "__code__", None)
        cells = getattr(function, "__closure__", None) or ()
        found = []
        for name, cell in zip(getattr(code, "co_freevars", ())[: len(cells)], cells, strict=True):
            with contextlib.suppress(ValueError):  # an empty cell
                found.append((name, cell.cell_contents))
        return found

    def _note(self, name: str, value: Any) -> None:
        if name.startswith("_") or name in ("In", "Out") or not isinstance(value, _CONTAINERS):
            return
        if id(value) not in self._saved:
            with contextlib.suppress(Exception):
                self._saved[id(value)] = (name, value, copy.copy(value))

    def forget(self) -> list[str]:
        """Put every container back as it was; returns the names of those that had changed."""
        changed = []
        for name, container, saved in self._saved.values():
            try:
                same = bool(container == saved)
            except Exception:
                same = False
            if same:
                continue
            changed.append(name)
            if isinstance(container, list):
                container[:] = saved
            elif isinstance(container, deque):
                container.clear()
                container.extend(saved)
            else:
                container.clear()
                container.update(saved)
        self.forgotten += [name for name in changed if name not in self.forgotten]
        return changed


@dataclass
class _PostTrace:
    """One ``POST /exports`` as the served app handled it, timed on the server's own event loop."""

    started: float
    answered: float | None = None  # when its response started
    in_queue: float = 0.0  # seconds spent, before answering, in the check's slowed `job` and `enqueue`
    enqueues: list[list[float | None]] = field(default_factory=list)  # [called, returned] per enqueue
    listened: bool = False  # waited, before answering, for a job to change state (`queue.listen`)

    def late_enqueues(self) -> int:
        """How many enqueues this request started returned only after its response had gone out."""
        if self.answered is None:
            return 0
        return sum(returned is None or returned > self.answered for _, returned in self.enqueues)


_TRACE: contextvars.ContextVar[_PostTrace | None] = contextvars.ContextVar("check_2_4_post", default=None)


def _in_queue(called: float) -> None:
    """Count the time since ``called`` (up to the response) as the current POST's time in the queue."""
    trace = _TRACE.get()
    if trace is not None:
        until = time.monotonic() if trace.answered is None else min(time.monotonic(), trace.answered)
        trace.in_queue += max(0.0, until - called)


class _RemoteQueue:
    """The app's SAQ queue as the check serves it: ``job`` and ``enqueue`` each take a round trip to a
    Redis elsewhere, so two requests sent together both look before either enqueues; and the check
    notes the options of each enqueue, and for the POST that made it, its time and when it returned."""

    def __init__(self, queue: Any, enqueued: list[dict[str, Any]]) -> None:
        self._queue, self._enqueued = queue, enqueued

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    async def job(self, *args: Any, **kwargs: Any) -> Any:
        called = time.monotonic()
        try:
            await asyncio.sleep(_QUEUE_LATENCY)
            return await self._queue.job(*args, **kwargs)
        finally:
            _in_queue(called)

    async def enqueue(self, job_or_func: Any, **kwargs: Any) -> Any:
        self._enqueued.append(kwargs)
        call: list[float | None] = [time.monotonic(), None]
        trace = _TRACE.get()
        if trace is not None:  # the POST's context: a task it started to enqueue has a copy of it
            trace.enqueues.append(call)
        try:
            await asyncio.sleep(_QUEUE_LATENCY)
            job = await self._queue.enqueue(job_or_func, **kwargs)
        finally:
            _in_queue(float(call[0] or 0.0))
        call[1] = time.monotonic()
        return job


def _nothing() -> None:
    pass


def _watch_listen(queue: Any) -> Callable[[], None]:
    """Note which POSTs wait, before answering, for a job to change state: SAQ's ``listen``, which
    ``job.refresh(until_complete=…)`` and ``queue.apply`` use (through the queue itself, not the app's
    slowed one); returns what undoes it."""
    listen = getattr(queue, "listen", None)
    if not callable(listen):
        return _nothing

    async def listening(*args: Any, **kwargs: Any) -> Any:
        trace = _TRACE.get()
        if trace is not None and trace.answered is None:
            trace.listened = True
        return await listen(*args, **kwargs)

    try:
        queue.listen = listening
    except Exception:  # a queue of the learner's own that takes no attribute
        return _nothing

    def unwatch() -> None:
        if getattr(queue, "__dict__", {}).get("listen") is listening:
            with contextlib.suppress(Exception):
                del queue.listen

    return unwatch


class _LoopStalls:
    """When the server's event loop could not run (the machine busy, another thread holding the GIL):
    a ticker on that loop, every 5 ms while POSTs are in flight, notes how late it woke. What a POST's
    time owes to those moments is not the endpoint's doing."""

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float, float]] = []  # (from, to, seconds late)
        self._in_flight = 0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def enter(self) -> None:
        self._in_flight += 1
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._tick())

    def leave(self) -> None:
        self._in_flight -= 1

    async def _tick(self) -> None:
        while self._in_flight > 0:
            before = time.monotonic()
            await asyncio.sleep(_TICK)
            late = time.monotonic() - before - _TICK
            if late > _TICK:
                self.stalls.append((before, before + _TICK + late, late))

    def during(self, start: float, end: float) -> float:
        """Seconds the loop could not run between ``start`` and ``end``."""
        return sum(min(late, max(0.0, min(end, to) - max(start, since))) for since, to, late in self.stalls)

    def stop(self) -> None:
        """From the check's thread, before the server stops: end the ticker if it still runs."""
        task, loop = self._task, self._loop
        if task is not None and loop is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # the loop has closed: so has the task
                loop.call_soon_threadsafe(task.cancel)


class _Traced:
    """The app as the check serves it: each ``POST /exports`` gets a ``_PostTrace`` (in ``_TRACE``, so
    the check's queue finds it), and the server's stalls are noted while POSTs are in flight."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.traces: list[_PostTrace] = []
        self.stalls = _LoopStalls()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") != _EXPORTS_PATH:
            await self.app(scope, receive, send)
            return
        trace = _PostTrace(time.monotonic())
        self.traces.append(trace)

        async def traced_send(message: dict[str, Any]) -> None:
            if message.get("type") == "http.response.start" and trace.answered is None:
                trace.answered = time.monotonic()
            await send(message)

        token = _TRACE.set(trace)
        self.stalls.enter()
        try:
            await self.app(scope, receive, traced_send)
        finally:
            self.stalls.leave()
            _TRACE.reset(token)

    def settle(self, within: float) -> None:
        """From the check's thread: wait up to ``within`` s for the POSTs still listening for their job to
        answer (their waits run out); after 0.3 s, not for POSTs doing anything else (one that awaits its
        held-back build never answers)."""
        start = time.monotonic()
        while (now := time.monotonic()) < start + within:
            pending = [t for t in self.traces if t.answered is None]
            if not pending or (now > start + 0.3 and not any(t.listened for t in pending)):
                return
            time.sleep(0.02)

    def waited(self, trace: _PostTrace) -> float:
        """A POST's time in the endpoint beyond its queue calls and the moments the server could not run."""
        if trace.answered is None:
            return 0.0
        spent = trace.answered - trace.started
        return spent - trace.in_queue - self.stalls.during(trace.started, trace.answered)


def _salted_per_process(value: Any) -> bool:
    """Whether ``hash(value)`` differs from process to process: str and bytes are salted (PYTHONHASHSEED)."""
    if isinstance(value, str | bytes):
        return True
    return isinstance(value, tuple | frozenset) and any(_salted_per_process(v) for v in value)


class _SaltedHash:
    """Python's ``hash()`` as another process computes it: a str's or bytes' hash is salted anew in each
    process, so each time the check serves the app (a new process, as after a deploy) the app's code
    finds a ``hash`` with a salt of its own; what it hashed is noted."""

    def __init__(self) -> None:
        self.salt = uuid.uuid4().hex
        self.hashed: list[str] = []

    def renew(self) -> None:
        self.salt = uuid.uuid4().hex

    def __call__(self, value: Any, /) -> int:
        plain = builtins.hash(value)  # unhashable: the same TypeError as the builtin's
        if not _salted_per_process(value):
            return plain
        if len(self.hashed) < 100:
            self.hashed.append(repr(value)[:400])
        return builtins.hash((self.salt, value))


@contextlib.contextmanager
def _hash_salted(functions: tuple[Any, ...], salted: _SaltedHash) -> Any:
    """``salted`` as ``hash`` where the learner's functions look it up (their module's globals)."""
    namespaces = {}
    for function in functions:
        namespace = getattr(inspect.unwrap(function), "__globals__", None)
        if isinstance(namespace, dict) and "hash" not in namespace:  # a `hash` of their own: left alone
            namespaces[id(namespace)] = namespace
    for namespace in namespaces.values():
        namespace["hash"] = salted
    try:
        yield
    finally:
        for namespace in namespaces.values():
            if namespace.get("hash") is salted:
                del namespace["hash"]


@dataclass(frozen=True)
class _Answer24:
    status: int  # 0: no answer in time
    body: Any = None
    location: str | None = None
    latency: float = 0.0

    @property
    def state(self) -> Any:
        return self.body.get("status") if isinstance(self.body, dict) else None

    @property
    def export_id(self) -> Any:
        return self.body.get("export_id") if isinstance(self.body, dict) else None


@dataclass
class _ExportsRun:
    queue_name: str
    key: str  # the Idempotency-Key of the keyed pair
    warehouse: _Warehouse
    memory: _Memory
    posts: dict[str, _Answer24] = field(default_factory=dict)  # label → the answer to its POST
    enqueued: list[dict[str, Any]] = field(default_factory=list)
    job_errors: list[BaseException] = field(default_factory=list)
    worker_errors: list[str] = field(default_factory=list)
    settled: dict[str, _Answer24] = field(default_factory=dict)  # export id → its last GET
    functions: tuple[Any, ...] = ()  # the learner's endpoints and job
    served: _Traced | None = None  # the app as the check serves it now
    salted: _SaltedHash = field(default_factory=_SaltedHash)
    kept: dict[str, int] = field(default_factory=dict)  # export id → ms its finished job had left in Redis
    recorded: set[str] = field(default_factory=set)  # export ids seen as a job's key in Redis
    vanished: set[str] = field(default_factory=set)  # … whose job was then deleted

    def ids(self, export: _Export) -> str | None:
        answer = self.posts.get(export.label)
        value = answer.export_id if answer is not None else None
        return str(value) if value not in (None, "") else None

    def exports(self) -> dict[str, _Export]:
        """Each distinct export id → what the check sent for it."""
        found: dict[str, _Export] = {}
        for export in _SENT:
            export_id = self.ids(export)
            if export_id is not None:
                found.setdefault(export_id, export)
        return found

    def forgotten(self) -> str:
        names = ", ".join(f"`{name}`" for name in self.memory.forgotten)
        return f" ({names}, changed during the requests: gone with the restart)" if names else ""


async def _post_export(
    http: httpx.AsyncClient, params: dict[str, Any], key: str | None, timeout: float
) -> _Answer24:
    start = time.perf_counter()
    try:
        response = await http.post(
            _EXPORTS_PATH, json=params, headers={"Idempotency-Key": key} if key else {}, timeout=timeout
        )
    except httpx.TimeoutException:
        return _Answer24(0, latency=time.perf_counter() - start)
    return _Answer24(
        response.status_code, _json(response), response.headers.get("location"), time.perf_counter() - start
    )


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:200]


async def _get_export(http: httpx.AsyncClient, export_id: str) -> _Answer24:
    try:
        response = await http.get(f"/exports/{export_id}", timeout=5)
    except httpx.TimeoutException:
        return _Answer24(0)
    return _Answer24(response.status_code, _json(response))


def _client(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, trust_env=False, limits=httpx.Limits(max_connections=20))


def _server_error(server: Server, statuses: list[int], what: str) -> Mismatch | BaseException:
    raised = server.wait_for_exception()
    if raised is None:
        return Mismatch(what, f"statuses {dict(Counter(statuses))}")
    return raised


def _none_job(raised: BaseException) -> bool:
    """Whether the app failed on a job that was None (``enqueue`` refused a key, ``job`` found none)."""
    return isinstance(raised, AttributeError | TypeError) and "NoneType" in str(raised)


def _not_found(raised: BaseException) -> bool:
    """Whether the app failed on an export it could not find: a job that was None, a missing entry."""
    return _none_job(raised) or isinstance(raised, KeyError)


@contextlib.contextmanager
def _exports_served(app: Any, run: _ExportsRun) -> Any:
    """Serve ``app`` (a new server, on a new event loop), its queue's round trips slowed as a remote
    Redis's are; afterwards, the app restarted as a new process finds it: an empty ``app.state``, and
    the memory its code reaches back to what it held when the check began."""
    run.salted.renew()  # a new process: `hash()` of a string changes
    run.served = traced = _Traced(app)
    with (
        _hash_salted(run.functions, run.salted),
        joins_new_threads(),
        serve_answer(traced, "check-2.4", "2.4", _SERVE_FAILED) as server,
    ):
        queue = getattr(app.state, "queue", None)
        slowed = callable(getattr(queue, "enqueue", None)) and callable(getattr(queue, "job", None))
        if slowed:
            app.state.queue = _RemoteQueue(queue, run.enqueued)
        unwatch = _watch_listen(queue) if slowed else _nothing
        try:
            yield server
        finally:
            traced.stalls.stop()
            unwatch()
            if any(b.thread.startswith("serve:") for b in run.warehouse.builds):
                run.warehouse.go.set()  # builds held in the web server: let them end before it stops
    app.state = State()
    run.memory.forget()


def _check_posts(server: Server, run: _ExportsRun) -> None:
    async def main() -> list[_Answer24]:
        async with _client(server) as http:
            return list(
                await asyncio.gather(
                    *(_post_export(http, e.params, run.key if e.key else None, _POST_WITHIN) for e in _SENT)
                )
            )

    answers = in_fresh_loop(main, timeout=20, name="check-2.4-posts")
    run.posts = {e.label: a for e, a in zip(_SENT, answers, strict=True)}
    statuses = [a.status for a in answers]
    late = [e for e, a in zip(_SENT, answers, strict=True) if a.status == 0]
    if late and run.served is not None:
        run.served.settle(_SETTLE_WITHIN)  # the late POSTs go on: see what they were waiting for
        if listened := _listened(run.served, late=len(late)):
            raise listened  # the cause, whichever POSTs it made late on a slow machine
    if late:
        inline = [b for b in run.warehouse.builds if not b.thread.startswith("worker:")]
        raise Mismatch(
            f"an answer to each POST within {_POST_WITHIN:g} s, while the check held every build back (a "
            "build takes 0.5 s or more): the 202 says the export is accepted, not built",
            f"{len(late)} of {len(_SENT)} got no answer in time"
            + (f"; {len(inline)} builds had started in the web server itself" if inline else "")
            + ": the endpoint waited for the build, as the service did before, so a large export still "
            "outlasts the client's timeout",
            [
                "The endpoint's only work is to put the export on the queue and say where to ask about it; "
                "the worker, another process, builds it.",
                'Enqueue and answer: `job = await request.app.state.queue.enqueue("run_export", '
                "params=params)`, then return `job.key` as the export_id, without awaiting the build.",
            ],
        )
    broken = [(e, a) for e, a in zip(_SENT, answers, strict=True) if a.status >= 500]
    if broken:
        raised = _server_error(server, statuses, f"status 202 for each of the {len(_SENT)} POSTs")
        if isinstance(raised, Mismatch):
            raise raised
        if all(e.key for e, _ in broken) and _none_job(raised):
            raise Mismatch(
                "one export for two POSTs with the same Idempotency-Key, sent together: both answered "
                "with its export_id",
                f"one of the two answered {broken[0][1].status}: your code raised {type(raised).__name__}: "
                f"{short(str(raised), 100)}. Both requests looked for the key before either had enqueued; "
                "the second `enqueue(…, key=…)` then found the first's job waiting, and returned None",
                [
                    "SAQ refuses a second job with the key of one that is waiting or running: `enqueue` "
                    "returns None instead of a job. Between your look-up and your enqueue, another request "
                    "with the same key can enqueue first.",
                    "When `enqueue` returns None, the job is there already: `job = await queue.enqueue(…, "
                    "key=export_id) or await queue.job(export_id)`.",
                ],
            )
        raise raised
    plain = [(e, a) for e, a in zip(_SENT, answers, strict=True) if not e.key]
    wrong = [a.status for _, a in plain if a.status != 202]
    expect(
        not wrong,
        "status 202 (Accepted) for each new export: accepted now, built later",
        f"statuses {dict(Counter(a.status for _, a in plain))}",
        "A 200 says the request is done; this one only starts the work, and the client comes back to ask.",
        '`@reports_app.post("/exports", status_code=202)`, as given, or `JSONResponse(…, status_code=202)`.',
    )
    not_ok = [a.status for e, a in zip(_SENT, answers, strict=True) if not 200 <= a.status < 300]
    expect(
        not not_ok,
        "a 2xx answer to each POST sent with an Idempotency-Key",
        f"statuses {dict(Counter(statuses))}",
        "A POST repeated with the same key gets the same answer as the first: the same export.",
    )
    nameless = [a for a in answers if not isinstance(a.export_id, str) or not a.export_id]
    expect(
        not nameless,
        'a JSON body with the export\'s id in each 202, e.g. {"export_id": "…", "status": "queued"}',
        f"{len(nameless)} of {len(_SENT)} without a string `export_id`"
        + (f", e.g. {short(nameless[0].body)}" if nameless else ""),
        "The client needs the id to ask about its export later.",
        'Return `{"export_id": job.key, "status": "queued"}` (with SAQ\'s job key as the id).',
    )
    elsewhere = [a for a in answers if urlsplit(a.location or "").path != f"/exports/{a.export_id}"]
    expect(
        not elsewhere,
        "a Location header on each 202: /exports/{export_id}, where the client asks how it went",
        f"{len(elsewhere)} of {len(_SENT)} without it"
        + (
            f", e.g. Location {elsewhere[0].location!r} for export_id {elsewhere[0].export_id!r}"
            if elsewhere and elsewhere[0].location
            else ""
        ),
        "A 202 points at where the result will be: the Location header, which HTTP clients follow.",
        'Take `response: Response` as a parameter and set `response.headers["Location"] = '
        'f"/exports/{export_id}"` (or pass `headers=` to a JSONResponse).',
    )
    if run.served is not None:
        _check_answered_at_once(run.served)
        _check_stored_before_answer(run.served)


def _at_once_hints() -> list[str]:
    return [
        "The endpoint's work ends when the export is on the queue, however quick its build might be: the "
        "client asks `GET /exports/{id}` for the rest.",
        "Return right after the `enqueue` (202, the id, Location): no `job.refresh(until_complete=…)`, "
        "`queue.apply(…)`, sleep or polling of the job in the POST.",
    ]


def _listened(served: _Traced, late: int = 0) -> Mismatch | None:
    """The failure of POSTs that listened for their job to change state before answering, if any did:
    counted over every POST, answered in time or not (on a slow machine the wait can outlast the
    client's: ``late`` of them got no answer in time)."""
    listened = [t for t in served.traces if t.listened]
    if not listened:
        return None
    waits = [served.waited(t) for t in listened if t.answered is not None]
    return Mismatch(
        "each POST answered as soon as its export is on the queue: the 202 says accepted, not built",
        f"{len(listened)} of {len(_SENT)} POSTs waited for their job to finish before answering "
        "(listening for its status, as `job.refresh(until_complete=…)` does)"
        + (f", up to {max(waits):.2f} s beyond their queue calls" if waits else "")
        + (f", and {late} got no answer within {_POST_WITHIN:g} s" if late else "")
        + ": the check held every build back, so each waited until its wait ran out. Every client is held "
        "that long, and what it gets depends on how fast the build was",
        _at_once_hints(),
    )


def _check_answered_at_once(served: _Traced) -> None:
    """No POST waits for its export's build before answering: none listens for its job to change state
    (what ``job.refresh(until_complete=…)`` and ``queue.apply`` do), and at most a few spend more than
    ``_WAITED_AT_MOST`` s in the endpoint beyond their queue calls and the server's own stalls."""
    if listened := _listened(served):
        raise listened
    answered = [t for t in served.traces if t.answered is not None]
    hints = _at_once_hints()
    slow = sorted((served.waited(t) for t in answered), reverse=True)
    slow = [w for w in slow if w > _WAITED_AT_MOST]
    if answered and len(slow) * 2 >= len(answered):
        raise Mismatch(
            "each POST answered as soon as its export is on the queue: the 202 says accepted, not built",
            f"{len(slow)} of {len(answered)} POSTs spent {slow[-1]:.2f} s or more in the endpoint (up to "
            f"{slow[0]:.2f} s) beyond their queue calls (each `job` and `enqueue` takes "
            f"{_QUEUE_LATENCY * 1000:.0f} ms here) and beyond any moment the server could not run: they "
            "waited for something before answering",
            hints,
        )


def _check_stored_before_answer(served: _Traced) -> None:
    """Each enqueue a POST starts has returned before its response goes out (the order of two events on
    the server's own loop, not a duration)."""
    answered = [t for t in served.traces if t.answered is not None]
    late = [t for t in answered if t.late_enqueues()]
    if not late:
        return
    raise Mismatch(
        "each 202 sent once its job is stored in Redis (a 202 promises the export is queued)",
        f"{len(late)} of {len(answered)} POSTs answered before the `enqueue` they had started returned: the "
        "enqueue ran on its own, after the response. Had it failed, or the server stopped first, the client "
        "would hold an export_id that is never built, and that answers 404",
        [
            "`asyncio.create_task(…enqueue(…))` (or `BackgroundTasks`) returns at once: the endpoint answers "
            "before the job exists, and an error in the enqueue is lost with the task.",
            "Await the enqueue in the endpoint, before returning: "
            '`await request.app.state.queue.enqueue("run_export", …)`.',
        ],
    )


def _export_job(job: Callable[..., Any], run: _ExportsRun) -> Callable[..., Any]:
    """``job`` as the check's worker runs it, noting what it raises other than the build's failure."""

    @functools.wraps(job)
    async def watched(ctx: dict[str, Any], **kwargs: Any) -> Any:
        try:
            result = job(ctx, **kwargs)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception as exc:
            if not isinstance(exc, run.warehouse.failure):
                run.job_errors.append(exc)
            raise

    return watched


def _check_builds_on_worker(run: _ExportsRun, worker: Any) -> None:
    expected = min(_SLOTS, len(run.exports()))
    deadline = time.monotonic() + _STARTED_WITHIN
    while len(run.warehouse.builds) < expected and time.monotonic() < deadline:
        if run.job_errors or worker.errors:
            time.sleep(0.1)  # the other jobs' errors, logged
            break
        time.sleep(0.01)
    run.worker_errors = list(worker.errors)
    inline = [b for b in run.warehouse.builds if not b.thread.startswith("worker:")]
    if inline:
        raise Mismatch(
            "each export built by the queue's worker, not by the web server",
            f"{len(inline)} builds ran in the web server's own thread ({inline[0].what} first): work left "
            "to `BackgroundTasks` or `asyncio.create_task` answers at once, but dies with the web process at "
            "the next deploy, and no worker can report on it",
            [
                "The lesson's section 2 measured it: work in the web process is lost when the process stops. "
                "A durable queue keeps the export in Redis until a worker has built it.",
                'Enqueue the export and nothing else: `await request.app.state.queue.enqueue("run_export", '
                "params=params)`; the job calls `build_export`.",
            ],
        )
    if run.warehouse.builds:
        return
    if run.job_errors:
        raise run.job_errors[0]  # the placeholder ("not started"), or the learner's own error
    if run.worker_errors:
        last_line = run.worker_errors[0].strip().splitlines()[-1]
        raise Mismatch(
            f"the worker to start building the exports (up to {_SLOTS} at once)",
            f"no build started; the worker reported {last_line[:120]}",
            [
                "The worker runs a job by the name it was enqueued with: the name of your job function.",
                'Enqueue `"run_export"`, with the export\'s parameters: '
                '`enqueue("run_export", params=params)`.',
            ],
        )
    raise Mismatch(
        f"the worker to start building the exports within {_STARTED_WITHIN:g} s",
        f"no build started, and {len(run.enqueued)} enqueue calls were seen"
        + ("" if run.enqueued else ": nothing was put on the app's queue"),
        [
            "The check's worker reads EXPORTS_QUEUE, the queue the app's lifespan connects to; the job "
            "must call `build_export(params)`.",
            '`await request.app.state.queue.enqueue("run_export", params=params)` in the endpoint, and '
            "`return await build_export(params)` in the job.",
        ],
    )


async def _get_all(server: Server, ids: list[str]) -> dict[str, _Answer24]:
    async with _client(server) as http:
        answers = await asyncio.gather(*(_get_export(http, export_id) for export_id in ids))
    return dict(zip(ids, answers, strict=True))


def _check_status_answers(server: Server, seen: dict[str, _Answer24], run: _ExportsRun, when: str) -> None:
    """Every GET answered 200 with one of the four states (else a Mismatch naming what went wrong)."""
    exports = run.exports()
    broken = [i for i, a in seen.items() if a.status >= 500]
    raised_then = ""
    if broken:
        raised = _server_error(server, [a.status for a in seen.values()], "status 200 for each GET")
        if isinstance(raised, Mismatch) or not _not_found(raised):
            raise raised
        raised_then = f" (your code raised {type(raised).__name__}: {short(str(raised), 60)})"
    unknown = [i for i, a in seen.items() if a.status != 200]
    if unknown:
        export_id = unknown[0]
        answer = seen[export_id]
        raise Mismatch(
            f"200 for each export accepted before the restart, {when}: its status comes from Redis, which "
            "outlives the process",
            f"{len(unknown)} of {len(seen)} answered "
            + ", ".join(f"{s or 'nothing'}" for s in sorted({seen[i].status for i in unknown}))
            + raised_then
            + f" (e.g. {exports[export_id].what}, export_id {export_id!r}: {short(answer.body)}): the app "
            f"knew them only from its memory{run.forgotten()}",
            [
                "A restart (a deploy, a crash) starts a new process with none of the old one's memory, and "
                "two instances behind a balancer never shared it. Redis outlives them all, and SAQ already "
                "keeps each job there, with its status, its result and its error.",
                "Make the export_id the SAQ job's key (`job.key`, or `enqueue(…, key=export_id)`), and in "
                "GET look the job up: `job = await request.app.state.queue.job(export_id)`; None is a 404.",
            ],
        )
    odd = [i for i, a in seen.items() if a.state not in _STATES]
    if odd:
        states = sorted({short(seen[i].state, 30) for i in odd})
        raw = {"new", "active", "complete", "aborted", "aborting", "Status.QUEUED", "Status.ACTIVE"}
        raise Mismatch(
            'a JSON body with "status" one of "queued", "running", "done", "failed": the words the API '
            "promises its clients",
            f"status {', '.join(states)} ({len(odd)} of {len(seen)}, e.g. {short(seen[odd[0]].body)})"
            + (
                ": SAQ's own words for the job, not the API's"
                if raw & {str(seen[i].state) for i in odd}
                else ""
            ),
            [
                "SAQ's statuses are its own (`queued`, `active`, `complete`, `failed`, `aborted`, …); your "
                "clients read four words, whatever queue runs the exports.",
                'Map them: `{"new": "queued", "queued": "queued", "active": "running", "complete": "done", '
                '"failed": "failed", "aborted": "failed"}[job.status.value]`.',
            ],
        )


def _check_in_progress(server: Server, run: _ExportsRun) -> None:
    exports = run.exports()
    building = run.warehouse.building()
    seen = in_fresh_loop(lambda: _get_all(server, list(exports)), timeout=20, name="check-2.4-progress")
    changed = building != run.warehouse.building()
    _check_status_answers(server, seen, run, "asked while the builds were held back")
    finished = [i for i, a in seen.items() if a.state in ("done", "failed")]
    expect(
        not finished,
        "no export done or failed while the check held every build back",
        f"{len(finished)} said so, e.g. {exports[finished[0]].what}: {short(seen[finished[0]].body)}"
        if finished
        else "",
        "An export is done when its build has returned, and only then: ask the job.",
    )
    if changed:
        return  # a build started between the look and the GETs: nothing to compare
    for what in {e.what for e in exports.values()}:
        ids = [i for i, e in exports.items() if e.what == what]
        running = [i for i in ids if seen[i].state == "running"]
        if len(running) == building[what]:
            continue
        if len(running) < building[what]:
            export_id = next(i for i in ids if seen[i].state != "running")
            raise Mismatch(
                '"running" for each export whose build is in progress',
                f"{what}, export_id {export_id!r}, said {seen[export_id].state!r} while the worker was "
                "building it (the check held its build mid-way)",
                [
                    "SAQ marks a job `active` as soon as a worker takes it: that is your running.",
                    'Map `active` to "running" (and `queued`, `new` to "queued").',
                ],
            )
        export_id = running[0]
        raise Mismatch(
            f'"queued" for each export still waiting on the queue (the worker builds {_SLOTS} at once, '
            "and every build was held back)",
            f"{what}, export_id {export_id!r}, said 'running' while its job was still waiting: no build of "
            "it had started",
            [
                "Only a job a worker has taken is running; the others wait in the queue.",
                'Map SAQ\'s `queued` (and `new`) to "queued", and only `active` to "running".',
            ],
        )


def _settle(server: Server, run: _ExportsRun) -> None:
    """Let the builds go; ask about every export until each is done or failed, nothing is left to do
    (the queue idle and no build in progress for three looks running), a build has failed more than
    ``_ATTEMPTS_AT_MOST`` times, or ``_SETTLED_WITHIN`` seconds have passed."""
    ids = list(run.exports())
    run.warehouse.go.set()

    async def main() -> dict[str, _Answer24]:
        queue = job_queue(run.queue_name)
        deadline, quiet = time.monotonic() + _SETTLED_WITHIN, 0
        try:
            async with _client(server) as http:
                while True:
                    answers = await asyncio.gather(*(_get_export(http, export_id) for export_id in ids))
                    seen = dict(zip(ids, answers, strict=True))
                    await _note_expiry(queue, seen, run)
                    if all(a.state in ("done", "failed") for a in answers):
                        return seen
                    idle = not run.warehouse.building() and await queue.count("incomplete") == 0
                    quiet = quiet + 1 if idle else 0
                    runaway = run.warehouse.count(_FAILING.what) > _ATTEMPTS_AT_MOST
                    if quiet >= 3 or runaway or time.monotonic() > deadline:
                        return seen
                    await asyncio.sleep(0.05)
        finally:
            await queue.disconnect()

    run.settled = in_fresh_loop(main, timeout=_SETTLED_WITHIN + 10, name="check-2.4-settle")


async def _note_expiry(queue: Any, seen: dict[str, _Answer24], run: _ExportsRun) -> None:
    """For each export whose id is a job's key: how long Redis still keeps its job once it is finished,
    and whether the job was deleted."""
    for export_id, answer in seen.items():
        left = await queue.redis.pttl(queue.job_id(export_id))
        if left == -2:  # no such key
            if export_id in run.recorded:
                run.vanished.add(export_id)
            continue
        run.recorded.add(export_id)
        if left >= 0 and answer.state in ("done", "failed"):
            run.kept[export_id] = min(left, run.kept.get(export_id, left))


def _check_kept(run: _ExportsRun) -> None:
    exports = run.exports()
    brief = {i: ms for i, ms in run.kept.items() if i in exports and ms < _KEPT_AT_LEAST * 1000}
    gone = sorted(i for i in run.vanished if i in exports)
    if not brief and not gone:
        return
    ttls = sorted({repr(options["ttl"]) for options in run.enqueued if "ttl" in options})
    how = f" (enqueued with ttl={', '.join(ttls)})" if ttls else ""
    if brief:
        export_id, left = min(brief.items(), key=lambda item: item[1])
        what = f"had {left / 1000:.1f} s left in Redis once finished{how}"
    else:
        export_id = gone[0]
        what = f"was deleted from Redis as soon as it finished{how}"
    others = len(set(brief) | set(gone)) - 1
    raise Mismatch(
        "each finished export kept in Redis for minutes at least (SAQ keeps a finished job 10 minutes by "
        "default): clients ask about an export, and retry its POST, well after it is done",
        f"the job of {exports[export_id].what} (export_id {export_id!r}) {what}"
        + (f", as did {others} more" if others else "")
        + ": after that its id answers 404, and a POST retried with its Idempotency-Key builds the export "
        "again",
        [
            "SAQ keeps a finished job, with its status, result and error, for the job's `ttl` seconds, then "
            "deletes it: nothing in Redis remembers the export any more.",
            "Leave `ttl` out (600 s), or make it longer: `enqueue(…, ttl=3600)`; `ttl=0` keeps the job for "
            "ever.",
        ],
    )


def _check_done(server: Server, run: _ExportsRun) -> None:
    _settle(server, run)
    _check_kept(run)
    exports = {i: e for i, e in run.exports().items() if e.rows is not None}
    seen = {i: run.settled[i] for i in exports}
    _check_status_answers(server, seen, run, "once released")
    failed = [i for i, a in seen.items() if a.state == "failed"]
    if failed:
        if run.job_errors:
            raise run.job_errors[0]  # the learner's own error, in the job
        raise Mismatch(
            "done for each export whose build returned",
            f"{len(failed)} said failed, e.g. {exports[failed[0]].what}: {short(seen[failed[0]].body, 160)}",
            ["Report failed only for a job that failed: SAQ's `failed` (or `aborted`)."],
        )
    stuck = [i for i, a in seen.items() if a.state != "done"]
    if stuck:
        export_id = stuck[0]
        built = run.warehouse.count(exports[export_id].what)
        idle = not run.warehouse.building()
        raise Mismatch(
            f"each export done within {_SETTLED_WITHIN:g} s once its build could go (a build takes "
            f"{_BUILD_SECONDS_2_4:g} s here)",
            f"{len(stuck)} of {len(seen)} still not done, e.g. {exports[export_id].what}: "
            f"{short(seen[export_id].body)}"
            + (
                f", although its build had returned {exports[export_id].rows} rows and the queue had nothing "
                "left to do: the answer did not follow the job"
                if built and idle
                else f" ({built} builds of it started)"
            ),
            [
                "Read the state from the job each time you are asked: SAQ updates it in Redis as the worker "
                "takes the job and finishes it.",
                "`job = await request.app.state.queue.job(export_id)`, then map `job.status`; `complete` is "
                '"done". If it hung: `support.running_workers()`, and the job\'s `status` in Redis.',
            ],
        )
    wrong = [
        i for i, a in seen.items() if not isinstance(a.body, dict) or a.body.get("rows") != exports[i].rows
    ]
    if wrong:
        export_id = wrong[0]
        raise Mismatch(
            'the row count of each export that is done, as "rows": what `build_export` returned',
            f"{exports[export_id].what}: {short(seen[export_id].body)}, where its build returned "
            f"{exports[export_id].rows} rows",
            [
                "What the job returns, SAQ keeps with the job: `job.result`.",
                'Return the build\'s row count from the job, and in GET add `"rows": job.result` when it '
                "is done.",
            ],
        )


def _check_failed(run: _ExportsRun) -> None:
    export_id = run.ids(_FAILING)
    if export_id is None or export_id not in run.settled:
        return
    answer = run.settled[export_id]
    builds = run.warehouse.count(_FAILING.what)
    if answer.state == "done":
        raise Mismatch(
            f"failed for the export whose build raised ExportFailed ({_FAILING.what})",
            f"done: {short(answer.body, 160)}. The job caught the error and returned, so the queue counted "
            "it a success, and the client is told its export is ready; the failure is lost",
            [
                "A job reports failure by raising: SAQ then marks it `failed` and keeps the error.",
                "Let `ExportFailed` propagate out of the job (no `except` around `build_export`, or `raise` "
                "in it).",
            ],
        )
    if answer.state != "failed":
        retries = [o["retries"] for o in run.enqueued if isinstance(o.get("retries"), int)]
        if builds > _ATTEMPTS_AT_MOST:
            how = (
                f"the queue's retries (enqueued with retries={max(retries)})"
                if retries and max(retries) > _ATTEMPTS_AT_MOST
                else "the job's own loop (not the queue's retries)"
            )
            raise Mismatch(
                f"failed for the export whose build raises ExportFailed every time ({_FAILING.what}), after "
                f"at most {_ATTEMPTS_AT_MOST} attempts",
                f"{answer.state!r} after {builds} builds of it, and going on, by {how}: retried for ever, it "
                "holds a worker slot and never tells the client",
                [
                    "A build that failed the same way will most likely fail again: a few retries at most, "
                    "then let the job fail, and report it.",
                    "SAQ makes `retries` attempts in all (1 by default) and then marks the job `failed`: "
                    "no loop around `build_export`, and a small `retries=` if any.",
                ],
            )
        raise Mismatch(
            f"failed, within {_SETTLED_WITHIN:g} s, for the export whose build raised ExportFailed "
            f"({_FAILING.what})",
            f"{short(answer.body)} after {builds} build(s) of it, all failed"
            + (", and the queue had nothing left to do" if not run.warehouse.building() else ""),
            [
                "A job whose attempts are spent is `failed` in SAQ (`aborted` when a worker died during "
                "the last): both are failed for the client.",
                'Map `failed` and `aborted` to "failed"; if the job is still waiting for a retry, it is '
                '"queued".',
            ],
        )
    error = answer.body.get("error") if isinstance(answer.body, dict) else None
    expect(
        isinstance(error, str) and _FAILURE in error,
        f'the error with it, as "error": what went wrong ({_FAILURE!r})',
        f"{short(answer.body, 160)}",
        "SAQ keeps the traceback of the failed attempt on the job: `job.error`; its last line names the "
        "exception and its message.",
        'Add `"error": job.error.strip().splitlines()[-1]` when the job failed.',
    )


def _check_counts(run: _ExportsRun) -> None:
    twins = [run.ids(e) for e in _SENT if e.report == "visits"]
    if len(set(twins)) < 2:
        raise Mismatch(
            "two exports for two POSTs of the same body without an Idempotency-Key",
            f"one export ({twins[0]!r}) for both: the second was skipped, though the data may have "
            "changed since, or the client wants a second copy",
            [
                "Only the Idempotency-Key says that two requests are one, a retry: two requests without "
                "it are two exports, even with the same body.",
                "Derive the export's id from the Idempotency-Key when there is one, and otherwise make a "
                "new one (`uuid.uuid4().hex`, or SAQ's own job key); never from the body.",
            ],
        )
    keyed = [run.ids(e) for e in _SENT if e.key]
    if len(set(keyed)) > 1:
        raise Mismatch(
            "one export for two POSTs with the same Idempotency-Key, sent together (a client's retry)",
            f"two exports ({keyed[0]!r}, {keyed[1]!r}), built {run.warehouse.count(_KEYED.what)} times: "
            "the second request did not find the first's export",
            [
                "Both requests looked before either had stored anything. The look-up and the claim of the "
                "key must be one step that only one request wins.",
                "Let SAQ claim it: derive the job's key from the Idempotency-Key "
                '(`key=f"export-{digest}"`): `enqueue` returns None to the second request, which then '
                "answers with `await queue.job(key)`.",
            ],
        )
    counts = {e.what: run.warehouse.count(e.what) for e in _SENT if e.rows is not None}
    expected = {e.what: sum(x.what == e.what for x in _SENT if not x.key) or 1 for e in _SENT if e.rows}
    wrong = {what: n for what, n in counts.items() if n != expected[what]}
    if wrong:
        what, n = next(iter(wrong.items()))
        raise Mismatch(
            "each export built once: "
            + ", ".join(f"{w} {n}×" for w, n in expected.items())
            + " (two POSTs without a key, two builds; two with one key, one build)",
            ", ".join(f"{w} {n}×" for w, n in counts.items()) + f": {what} built {n} time(s)",
            [
                "One export, one job: enqueue once per new export, and never for a key already seen.",
                "A job with SAQ's default `retries=1` runs once, unless its worker is stopped mid-way.",
            ],
        )


def _check_retry(server: Server, run: _ExportsRun) -> None:
    first = run.ids(_KEYED)
    before = run.warehouse.count(_KEYED.what)

    async def main() -> tuple[_Answer24, _Answer24 | None]:
        queue = job_queue(run.queue_name)
        try:
            async with _client(server) as http:
                waiting = await queue.count("incomplete")  # jobs left over (a failing one retried, say)
                answer = await _post_export(http, _KEYED.params, run.key, 5.0)
                # a job the retry enqueued is incomplete until its build is done: wait for it
                deadline = time.monotonic() + _IDLE_WITHIN
                while time.monotonic() < deadline and (
                    run.warehouse.building()[_KEYED.what] or await queue.count("incomplete") > waiting
                ):
                    await asyncio.sleep(0.02)
                again = await _get_export(http, first) if first else None
                return answer, again
        finally:
            await queue.disconnect()

    answer, again = in_fresh_loop(main, timeout=20, name="check-2.4-retry")
    if answer.status >= 500:
        raised = _server_error(server, [answer.status], "a 2xx answer to the retry")
        raise raised
    hashed = [value for value in run.salted.hashed if run.key in value]
    if answer.export_id and answer.export_id != first and hashed:
        shown = hashed[0] if len(hashed[0]) <= 60 else hashed[0][:59] + "…"
        raise Mismatch(
            f"the same export ({first!r}) for the same POST sent again with its Idempotency-Key, after a "
            "restart and once it is done",
            f"status {answer.status}, export_id {short(answer.export_id)}: a new export. Its id came from "
            f"Python's `hash()` of the key (`hash({shown})`), and `hash()` of a string is salted anew in "
            "each process (PYTHONHASHSEED): the restarted app, like any other instance, computed another id "
            "for the same key",
            [
                "An id that another instance, or the app after a deploy, must find again has to be computed "
                "the same way in every process: `hash()` is stable only within one.",
                "Use a digest that does not depend on the process: "
                "`hashlib.sha256(idempotency_key.encode()).hexdigest()`, or "
                "`uuid.uuid5(uuid.NAMESPACE_URL, idempotency_key).hex`.",
            ],
        )
    expect(
        200 <= answer.status < 300 and answer.export_id == first,
        f"the same export ({first!r}) for the same POST sent again with its Idempotency-Key, after a "
        "restart and once it is done",
        f"status {answer.status}, export_id {short(answer.export_id)}: "
        + ("a new export" if answer.export_id else short(answer.body))
        + (
            f". The app no longer knew the key: it was kept in memory{run.forgotten()}"
            if answer.export_id and answer.export_id != first
            else ""
        ),
        "The key must outlive the process, as the export does: keep it in Redis, where every instance and "
        "every restart finds it.",
        "Derive the export's id from the Idempotency-Key and look for it first: `job = await "
        "queue.job(export_id)`; enqueue only if there is none.",
    )
    built = run.warehouse.count(_KEYED.what) - before
    expect(
        built == 0,
        "no build for a retry of an export already done",
        f"{built} more build(s) of {_KEYED.what}: the export was built again. SAQ refuses a key only while "
        "its job is waiting or running; once the job is finished, `enqueue(…, key=…)` stores a new job "
        "under that key",
        "A retry can come after the export is done (the client's answer was lost): look for the export "
        "first, whatever its state.",
        "`job = await queue.job(export_id)`; only if it is None, `await queue.enqueue(…, key=export_id)`.",
    )
    expect(
        again is not None and again.state == "done" and (again.body or {}).get("rows") == _KEYED.rows,
        f"GET still done, with its {_KEYED.rows} rows",
        short(again.body if again is not None else None),
        "The retry must leave the finished export as it was.",
    )


def _check_unknown(server: Server) -> None:
    async def main() -> _Answer24:
        async with _client(server) as http:
            return await _get_export(http, f"{_UNKNOWN_ID}-{uuid.uuid4().hex[:8]}")

    answer = in_fresh_loop(main, timeout=10, name="check-2.4-unknown")
    if answer.status >= 500:
        raised = _server_error(server, [answer.status], "404 for an unknown export")
        if isinstance(raised, Mismatch) or not _not_found(raised):
            raise raised
        raise Mismatch(
            "404 (Not Found) for an export id nobody was given",
            f"{answer.status}: your code raised {type(raised).__name__}: {short(str(raised), 100)}",
            [
                "`queue.job(export_id)` returns None when Redis has no such job (and a dict has no entry).",
                'If it is None: `raise HTTPException(404, "no such export")`.',
            ],
        )
    expect(
        answer.status == 404,
        "404 (Not Found) for an export id nobody was given",
        f"{answer.status}: {short(answer.body)}",
        "An id Redis does not know is not an export waiting to start: say so.",
        "`job = await request.app.state.queue.job(export_id)`; if it is None, `raise HTTPException(404, "
        '"no such export")`.',
    )


def check_async_exports(app: Any, run_export: Callable[..., Any], queue_name: str) -> None:
    """Check Exercise 2.4: exports accepted at once, built by a worker, asked about from Redis.

    Replaces ``build_export`` where the app's endpoints and ``run_export`` find it with the check's own:
    each build noted (what, and in which thread), held back until the check lets it go, then 0.1 s;
    ``refunds 2026-01`` raises the notebook's ``ExportFailed``. Starts a SAQ worker on ``queue_name``
    running ``run_export``, 4 jobs at once, and serves ``app``, whose queue's ``job`` and ``enqueue``
    take 50 ms each (a Redis elsewhere). Sends 8 ``POST /exports`` at once: 5 reports, one of them
    twice without a key, and one twice with one ``Idempotency-Key``; each must be answered within 1 s
    while every build is held (202 for the new ones, an ``export_id``, ``Location: /exports/{id}``),
    and answered at once: no POST may wait for its job to finish (SAQ's ``listen``, which
    ``job.refresh(until_complete=…)`` and ``queue.apply`` use, called before the response), and no more
    than half may spend over 0.25 s in the endpoint beyond their queue calls and the moments a 5 ms
    ticker on the server's loop saw it stalled (a busy machine slows the ticker as much as the POST,
    so no baseline has to be measured again); and each enqueue a POST started must have returned
    before its response went out (an order of two events on the server's loop, not a duration, so
    ``asyncio.create_task(queue.enqueue(…))`` fails whatever the machine). The builds must start on
    the worker. Restarts the app as a new process: a new server, an empty ``app.state``, the dicts,
    lists and sets its code reaches (globals, closures) back to what they held before, and a ``hash``
    salted anew in the module globals of the app's code. ``hash()`` of a str is salted per process
    (PYTHONHASHSEED), so an id derived with it from the ``Idempotency-Key`` is stable in one kernel
    and differs after a real restart; the id derivation sits inline in the learner's endpoint, out of
    reach of a subprocess with another seed, and a look at the source would miss a helper or an alias,
    so the check gives the restarted app what a new process gives it. Then ``GET /exports/{id}`` must
    say "running" for the 4 being built and "queued" for the rest. Lets the builds go: each export
    done with its ``rows``, the refunds one failed with its ``error`` (at most 5 attempts), and the
    job of each finished export, where its id is the job's key, still kept in Redis for 30 s or more
    (or for ever); two exports for the two POSTs without a key, one (built once) for the two with it.
    Restarts again, and sends the keyed POST once more: the same export, done, nothing built. An
    unknown id must be a 404. Deletes the queue's SAQ keys and those under ``ch02:exports:`` before
    and after, and stops every server and worker it started.
    """
    with exercise("2.4", "An export that answers at once and can be asked how it went", SOLUTION) as ex:

        def arguments() -> None:
            find_route(app, "POST", _EXPORTS_PATH, "reports_app")
            find_route(app, "GET", _EXPORT_PATH, "reports_app")
            expect(callable(run_export), "the job function `run_export`", short(run_export), _CALL_2_4)
            expect(
                isinstance(queue_name, str) and queue_name.startswith("ch02"),
                "the queue's name, starting with 'ch02' (EXPORTS_QUEUE)",
                short(queue_name),
                _CALL_2_4,
            )

        if not ex.step(f"the app has POST {_EXPORTS_PATH} and GET {_EXPORT_PATH}", arguments):
            return
        endpoints = [find_route(app, "POST", _EXPORTS_PATH, ""), find_route(app, "GET", _EXPORT_PATH, "")]
        failure = _name_in(run_export, "ExportFailed")
        if not (isinstance(failure, type) and issubclass(failure, Exception)):
            failure = _ExportFailedStandIn
        run = _ExportsRun(
            queue_name, f"ex24-{uuid.uuid4().hex[:12]}", _Warehouse(failure), _Memory(*endpoints, run_export)
        )
        run.functions = (*endpoints, run_export)
        patterns = (f"saq:{queue_name}:*", f"saq:job:{queue_name}:*", "ch02:exports:*")
        in_fresh_loop(lambda: _clear(*patterns), timeout=10, name="check-2.4-clear")
        state, workers = getattr(app, "state", None), set(running_workers())
        names = {getattr(run_export, "__name__", "run_export"), getattr(run_export, "__qualname__", "")}
        try:
            with contextlib.ExitStack() as swaps, joins_new_threads():
                for function in (*endpoints, run_export):
                    swaps.enter_context(_swapped(function, "build_export", run.warehouse.build_export))
                watched = _export_job(run_export, run)
                worker = start_worker(
                    queue_name,
                    [(n, watched) for n in names if n],
                    concurrency=_SLOTS,
                    name="check-2.4-worker",
                )
                try:
                    _exports_steps(ex, app, run, worker)
                finally:
                    run.warehouse.go.set()
                    worker.stop()
        finally:
            for started in set(running_workers()) - workers:
                started.stop()
            if state is not None:
                app.state = state
            in_fresh_loop(lambda: _clear(*patterns), timeout=10, name="check-2.4-tidy")


def _exports_steps(ex: Any, app: Any, run: _ExportsRun, worker: Any) -> None:
    with _exports_served(app, run) as server:
        if not ex.step(
            f"{len(_SENT)} POSTs at once, every build held back: each answered within {_POST_WITHIN:g} s, "
            "202 with its export_id and Location",
            lambda: _check_posts(server, run),
        ):
            return
        if not ex.step(
            "the exports are built by the queue's worker, not by the web server",
            lambda: _check_builds_on_worker(run, worker),
        ):
            return
    with _exports_served(app, run) as server:
        if not ex.step(
            "restarted (a new process: no memory of the last), GET /exports/{id} says running for the "
            f"{_SLOTS} being built and queued for the rest",
            lambda: _check_in_progress(server, run),
        ):
            return
        if not ex.step(
            "released, each export is done, with its row count, and stays in Redis once done",
            lambda: _check_done(server, run),
        ):
            return
        ex.step(
            "the export whose build raises ExportFailed is failed, with its error: not done, not stuck",
            lambda: _check_failed(run),
        )
        ex.step(
            "two POSTs of one body without a key make two exports; two with one Idempotency-Key, one, "
            "built once",
            lambda: _check_counts(run),
        )
    with _exports_served(app, run) as server:
        ex.step(
            "restarted again, the POST sent once more with its Idempotency-Key gets the same export, done, "
            "and builds nothing",
            lambda: _check_retry(server, run),
        )
        ex.step("GET /exports/{id} of an unknown id answers 404", lambda: _check_unknown(server))
