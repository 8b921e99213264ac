"""Durable job queues (SAQ) on the course's Redis, with the worker in-process.

The chapters use SAQ ("Simple Async Queue"): asyncio-native, maintained, and durable in the way that
matters here. A job lives in Redis from ``enqueue`` until a worker *finishes* it; a worker that dies
mid-job leaves it marked active, and another worker's periodic sweep finds it stuck (past its
``timeout`` or ``heartbeat``). The sweep runs it again only if the job has attempts left
(``job.retryable``: ``retries > attempts``); otherwise it finishes the job as ABORTED with the error
"swept". ``retries`` counts attempts and defaults to 1, so a job enqueued with SAQ's defaults is
*not* re-run after a crash: give ``retries=2`` or more to jobs that must survive one. Retries with
exponential backoff are built in.

A worker that is *stopped* (SIGTERM, not a crash) behaves differently: SAQ cancels the jobs it is
running and puts each back on the queue (``job.retry("cancelled")`` in ``Worker.process``, whatever
the job's ``retries``), so the next worker runs it again at once, with one attempt more.

Three adjustments, all plumbing:

- fakeredis has no ``INFO`` command, which SAQ uses only to learn the server's version. The queue
  reports 6.0 there: from 6.2 on SAQ waits for jobs with ``BLMOVE``, which fakeredis answers at once
  instead of blocking (an idle worker then spins a whole core); below it, SAQ uses ``BRPOPLPUSH``,
  which blocks.
- fakeredis keeps a blocked ``BRPOPLPUSH`` alive after its caller was cancelled and its connection
  dropped, where Redis forgets a closed connection's command. Left alone, at a worker's stop the job
  SAQ puts back on the queue is moved straight into the active list by one of the stopping worker's
  own abandoned waits, and stays there until a sweep (which aborts it if ``retries=1``).
  ``dequeue`` drops the blocked command when its caller goes, as Redis does.
- When the sweep finds a stuck job it first asks the job's worker to abort it and waits for an
  answer (5 s by default). A crashed worker never answers; the wait here is shorter
  (``abort_wait``) so that crash recovery fits in a notebook cell.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from saq import Worker
from saq.job import TERMINAL_STATUSES, Job
from saq.queue.redis import RedisQueue

from support.backends import redis_client, redis_url
from support.registry import caller_key
from support.workers import BackgroundLoop, start_in_thread

__all__ = ["CourseQueue", "finished_job", "job_queue", "start_worker"]


class CourseQueue(RedisQueue):
    """SAQ's Redis queue, working on fakeredis too, with a configurable sweep abort wait.

    ``sweeps=False`` makes its ``sweep`` do nothing: a worker on it never sweeps.
    """

    def __init__(self, *args: Any, abort_wait: float = 0.1, sweeps: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.abort_wait = abort_wait
        self.sweeps = sweeps

    async def version(self) -> tuple[int, ...]:
        if redis_url() is None:
            return (6, 0, 0)  # fakeredis has no INFO, and its BLMOVE does not block: see above
        return await super().version()

    async def sweep(self, lock: int = 60, abort: float | None = None) -> list[str]:
        if not self.sweeps:
            return []
        return await super().sweep(lock, abort=self.abort_wait if abort is None else abort)

    async def dequeue(self, timeout: float = 0.0, poll_interval: float = 0.0) -> Job | None:
        if redis_url() is not None:
            return await super().dequeue(timeout, poll_interval)
        pool = self.redis.connection_pool
        connection = await pool.get_connection()
        blocked = connection._sock  # the embedded server's end of this connection
        try:
            await connection.send_command("BRPOPLPUSH", self._queued, self._active, timeout)
            job_id = await connection.read_response()
        except BaseException:
            _drop_blocked_command(blocked)
            raise
        finally:
            await pool.release(connection)
        return None if job_id is None else await self._get_job_by_id(job_id)


def _drop_blocked_command(sock: Any) -> None:
    """What Redis does when a blocked client goes away: its command is dropped and moves nothing.

    fakeredis runs a blocked command in a task of its own that outlives the caller; marking the
    socket unblocked (as ``CLIENT UNBLOCK`` does) makes that task answer "nothing" when it wakes,
    instead of moving a job into the active list for nobody (fakeredis internals, pinned version).
    """
    server = getattr(sock, "_server", None)
    if server is None:
        return
    with server.lock:
        if sock._blocked:
            sock._unblock_reason = b"timeout"
            sock._db.wake_all()


def job_queue(name: str, *, abort_wait: float = 0.1, sweeps: bool = True) -> CourseQueue:
    """A SAQ queue called ``name`` on the course's Redis, for the event loop that uses it.

    Create one per event loop (the app's lifespan, the notebook, each worker): they share the jobs
    through Redis. ``await queue.connect()`` before use and ``await queue.disconnect()`` after.
    """
    return CourseQueue(redis_client(), name=name, abort_wait=abort_wait, sweeps=sweeps)


async def _whereabouts(queue: RedisQueue, key: str) -> str:
    """Where job ``key`` is: in the queue's active or queued list, or only in its incomplete set (waiting
    for a retry's delay or a scheduled time). A job marked active or aborting in none of them is lost."""
    job_id = queue.job_id(key)
    async with queue.redis.pipeline(transaction=True) as pipe:  # one snapshot: a job may move meanwhile
        active, queued, incomplete = await (
            pipe.lrange(queue._active, 0, -1).lrange(queue._queued, 0, -1).zscore(queue._incomplete, job_id)
        ).execute()
    for name, listed in (("active", active), ("queued", queued)):
        if job_id in {x.decode() if isinstance(x, bytes) else x for x in listed}:
            return f"in the queue's {name} list"
    if incomplete is not None:
        return "waiting in the queue's incomplete set (a retry's delay, or a scheduled time)"
    return "in neither the queued nor the active list (no sweep will find it)"


async def finished_job(queue: RedisQueue, key: str, timeout: float = 30.0) -> Job:
    """Wait until the job ``key`` has finished (complete, failed or aborted); returns the job.

    ``timeout`` is generous, so that a slow machine does not reach it: a job that has not finished
    by then is lost or stuck, and the error says where the job is (in which of the queue's lists).

    It polls the job in Redis. SAQ's ``job.refresh(until_complete=...)`` waits on pub/sub instead,
    which lagged about half a second behind on the embedded Redis. Raises ``TimeoutError``.
    """
    deadline = time.perf_counter() + timeout
    while (job := await queue.job(key)) is None or job.status not in TERMINAL_STATUSES:
        if time.perf_counter() > deadline:
            state = "missing" if job is None else f"still {job.status.value}"
            raise TimeoutError(f"job {key} {state} after {timeout} s, {await _whereabouts(queue, key)}")
        await asyncio.sleep(0.02)
    return job


def start_worker(
    queue_name: str,
    functions: Iterable[Callable[..., Any]],
    *,
    concurrency: int = 10,
    sweep_every: int | None = 60,
    name: str | None = None,
    **worker_options: Any,
) -> BackgroundLoop:
    """Start a SAQ worker for ``queue_name`` on its own thread and event loop.

    ``functions`` are the job functions (``async def job(ctx, **kwargs)``), registered by name.
    ``sweep_every`` (seconds) is how often this worker looks for the stuck jobs of crashed workers
    (SAQ's default, 60). Sweeping often recovers them sooner, but SAQ's sweep can also catch a job
    that a live worker has just taken and not yet marked active, and run it a second time (SAQ
    issues #124 and #277): with frequent sweeps, expect duplicates, and make jobs idempotent. A
    sweep also locks out the other workers' sweeps of the queue for ``sweep_every`` seconds.
    ``sweep_every=None``: this worker never sweeps (a worker about to be crashed on purpose: a sweep of
    its own that met a job it was just taking could leave that job marked active or aborting in none
    of the queue's lists, where no later sweep finds it).
    Other keyword arguments go to ``saq.Worker``. The handle's ``stop()`` shuts the worker down as
    SIGTERM would: SAQ cancels the jobs in progress (after ``shutdown_grace_period_s``, if given) and
    puts them back on the queue, whatever their ``retries``. ``kill()`` crashes it: a job in progress
    stays in Redis, marked active, until a sweep finds it: re-queued if ``retries`` exceeds its
    attempts so far, else finished as ABORTED ("swept"), which is what happens to a job enqueued
    with the default ``retries=1``.
    """
    # Without sweeps, SAQ's upkeep still calls the queue's sweep every 60 s, which then does nothing.
    timers = {"sweep": sweep_every or 60, "schedule": 1, "abort": 1}
    timers.update(worker_options.pop("timers", {}))
    if (sweep_every is not None and not sweep_every > 0) or not all(
        seconds > 0 for seconds in timers.values()
    ):
        raise ValueError(
            f"sweep_every is a number of seconds above 0, or None for no sweeps, and every timer is above 0; "
            f"got sweep_every={sweep_every!r}, timers={timers!r}"
        )
    key = name or caller_key()
    functions = list(functions)

    async def main() -> None:
        queue = job_queue(queue_name, sweeps=sweep_every is not None)
        await queue.connect()
        worker = Worker(queue, functions=functions, concurrency=concurrency, timers=timers, **worker_options)
        worker.SIGNALS = ()  # type: ignore[misc]  # signal handlers belong to the main thread
        try:
            await worker.start()
        finally:
            await queue.disconnect()

    return start_in_thread(main, key=key, loggers=("saq",))
