"""support.queues: SAQ on the course's Redis, a worker in-process; retries, crash and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest
from saq.job import Status

from support.backends import delete_keys, redis_client
from support.queues import finished_job, job_queue, start_worker

QUEUE = "tests-queue"
runs: Counter[str] = Counter()
runs_lock = threading.Lock()
started = threading.Event()


async def flaky(ctx: dict, *, name: str) -> str:
    with runs_lock:
        runs[name] += 1
    if ctx["job"].attempts < 3:
        raise RuntimeError("third party down")
    return name


async def slow(ctx: dict, *, name: str) -> str:
    with runs_lock:
        runs[name] += 1
    started.set()
    await asyncio.sleep(0.3)
    return name


async def clear() -> None:
    client = redis_client()
    await delete_keys(client, f"saq:*{QUEUE}*")
    await client.aclose()


async def final_statuses(queue, jobs, timeout: float) -> list[Status]:
    return [(await finished_job(queue, job.key, timeout)).status for job in jobs]


def setup_function() -> None:
    runs.clear()
    started.clear()
    asyncio.run(clear())


def test_the_queue_version_works_without_info_on_fakeredis() -> None:
    async def scenario() -> tuple[int, ...]:
        queue = job_queue(QUEUE)
        await queue.connect()
        try:
            return await queue.version()
        finally:
            await queue.disconnect()

    assert asyncio.run(scenario()) >= (6, 0, 0)


def test_an_idle_worker_waits_without_spinning() -> None:
    worker = start_worker(QUEUE, [slow], name="idle")
    time.sleep(0.2)
    cpu = time.process_time()
    time.sleep(1.0)
    used = time.process_time() - cpu
    worker.stop()
    assert used < 0.3, f"an idle worker used {used:.2f} s of CPU in 1 s: it polls instead of blocking"


def test_a_flaky_job_is_retried_until_it_succeeds() -> None:
    worker = start_worker(QUEUE, [flaky], name="retries")

    async def scenario() -> list[Status]:
        queue = job_queue(QUEUE)
        await queue.connect()
        jobs = [await queue.enqueue("flaky", name=f"job{i}", retries=5) for i in range(3)]
        statuses = await final_statuses(queue, jobs, 10)
        await queue.disconnect()
        return statuses

    assert asyncio.run(scenario()) == [Status.COMPLETE] * 3
    assert runs == {"job0": 3, "job1": 3, "job2": 3}
    assert any("Retrying" in line for line in worker.log), worker.log[-5:]
    worker.stop()


def test_jobs_of_a_killed_worker_are_run_again_by_the_next_one() -> None:
    first = start_worker(QUEUE, [slow], name="first", sweep_every=None)  # crashed on purpose: no sweeps

    async def enqueue() -> list:
        queue = job_queue(QUEUE)
        await queue.connect()
        jobs = [await queue.enqueue("slow", name=f"job{i}", retries=3, timeout=1) for i in range(4)]
        await queue.disconnect()
        return jobs

    jobs = asyncio.run(enqueue())
    deadline = time.monotonic() + 5
    while sum(runs.values()) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    first.kill()
    assert sum(runs.values()) == 4  # all four were in progress when the worker died
    start_worker(QUEUE, [slow], name="second", sweep_every=1)

    async def outcome() -> list[Status]:
        queue = job_queue(QUEUE)
        await queue.connect()
        statuses = await final_statuses(queue, jobs, 15)
        await queue.disconnect()
        return statuses

    assert asyncio.run(outcome()) == [Status.COMPLETE] * 4, "a job of the killed worker was lost"
    # at least once: each ran again; a frequent sweep may even run one a third time (SAQ #277)
    assert sorted(runs) == [f"job{i}" for i in range(4)]
    assert min(runs.values()) >= 2


def test_a_killed_workers_job_with_default_retries_is_aborted_by_the_sweep_not_run_again() -> None:
    # SAQ's sweep re-queues a stuck job only `if job.retryable` (retries > attempts); `retries`
    # defaults to 1, so the one attempt the dead worker started was the job's last.
    first = start_worker(QUEUE, [slow], name="first", sweep_every=None)  # crashed on purpose: no sweeps

    async def enqueue() -> list:
        queue = job_queue(QUEUE)
        await queue.connect()
        jobs = [await queue.enqueue("slow", name=f"job{i}", timeout=1) for i in range(2)]
        await queue.disconnect()
        return jobs

    jobs = asyncio.run(enqueue())
    assert jobs[0].retries == 1, "SAQ's default changed: revisit chapter 2's crash section"
    deadline = time.monotonic() + 5
    while sum(runs.values()) < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    first.kill()
    start_worker(QUEUE, [slow], name="second", sweep_every=1)

    async def outcome() -> list:
        queue = job_queue(QUEUE)
        await queue.connect()
        finished = [await finished_job(queue, job.key, 60) for job in jobs]
        await queue.disconnect()
        return finished

    finished = asyncio.run(outcome())
    assert [(job.status, job.error) for job in finished] == [(Status.ABORTED, "swept")] * 2
    assert runs == {"job0": 1, "job1": 1}, "a job without attempts left must not run again"


def test_a_job_in_progress_at_a_graceful_stop_is_queued_again_whatever_its_retries() -> None:
    # SAQ's stop() cancels the job and calls job.retry("cancelled") without looking at `retries`
    # (saq/worker.py): the job goes straight back on the queue, as on a real Redis, and the next
    # worker runs it. A crash (the test above) leaves it to the sweep, which honours `retries`.
    first = start_worker(QUEUE, [slow], name="first")

    async def enqueue():
        queue = job_queue(QUEUE)
        await queue.connect()
        job = await queue.enqueue("slow", name="job", retries=1, timeout=10)
        await queue.disconnect()
        return job

    async def status_of(job) -> tuple[Status, str | None]:
        queue = job_queue(QUEUE)
        await queue.connect()
        fresh = await queue.job(job.key)
        await queue.disconnect()
        return fresh.status, fresh.error

    job = asyncio.run(enqueue())
    assert started.wait(5)
    first.stop()
    assert asyncio.run(status_of(job)) == (Status.QUEUED, "cancelled"), "re-queued at once by the stop"
    start_worker(QUEUE, [slow], name="second")

    async def outcome() -> list[Status]:
        queue = job_queue(QUEUE)
        await queue.connect()
        statuses = await final_statuses(queue, [job], 10)
        await queue.disconnect()
        return statuses

    assert asyncio.run(outcome()) == [Status.COMPLETE]
    assert runs["job"] == 2, "run again although retries=1: a stop is not a failure"


def test_finished_job_says_what_it_was_waiting_for() -> None:
    async def scenario() -> None:
        queue = job_queue(QUEUE)
        await queue.connect()
        try:
            job = await queue.enqueue("slow", name="never-run")  # no worker
            await finished_job(queue, job.key, timeout=0.1)
        finally:
            await queue.disconnect()

    with pytest.raises(TimeoutError, match=r"job .* still queued after 0\.1 s, in the queue's queued list"):
        asyncio.run(scenario())


def test_a_queue_without_sweeps_leaves_a_stuck_job_to_the_others() -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        quiet, sweeping = job_queue(QUEUE, sweeps=False), job_queue(QUEUE)
        await quiet.connect()
        await sweeping.connect()
        try:
            await quiet.enqueue("slow", name="stuck")
            await quiet.redis.lmove(quiet._queued, quiet._active, "RIGHT", "LEFT")  # as a dequeue leaves it
            return await quiet.sweep(1), await sweeping.sweep(1)
        finally:
            await quiet.disconnect()
            await sweeping.disconnect()

    ignored, swept = asyncio.run(scenario())
    assert ignored == [] and len(swept) == 1


@pytest.mark.parametrize("sweep_every, sweeps", [(None, False), (1, True)])
def test_start_worker_hands_its_queue_sweeps_only_when_it_sweeps(monkeypatch, sweep_every, sweeps) -> None:
    made: list[bool] = []

    def spy(name: str, **options):
        queue = job_queue(name, **options)
        made.append(queue.sweeps)
        return queue

    monkeypatch.setattr("support.queues.job_queue", spy)
    worker = start_worker(QUEUE, [slow], name="spied", sweep_every=sweep_every)
    try:
        deadline = time.monotonic() + 10
        while not made and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        worker.stop()
    assert made == [sweeps]


@pytest.mark.parametrize(
    ("sweep_every", "timers"), [(0, {}), (-1, {}), (60, {"sweep": 0}), (60, {"abort": 0})]
)
def test_start_worker_refuses_a_sweep_interval_or_timer_that_is_not_above_zero(sweep_every, timers) -> None:
    with pytest.raises(ValueError, match="above 0, or None"):
        start_worker(QUEUE, [slow], name="refused", sweep_every=sweep_every, timers=timers)
