"""support.workers: a worker on its own thread and loop; stop() is graceful, kill() is a crash."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
import time

import pytest

import support
from support.workers import start_in_thread


def open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def wait_until(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def make_main(events: dict[str, threading.Event]):
    async def main() -> None:
        events["started"].set()
        try:
            await asyncio.sleep(3600)
        finally:
            events["cleaned_up"].set()

    return main


def fresh_events() -> dict[str, threading.Event]:
    return {"started": threading.Event(), "cleaned_up": threading.Event()}


def test_runs_on_its_own_thread_and_loop() -> None:
    seen: dict[str, object] = {}

    async def main() -> None:
        seen["thread"] = threading.current_thread().name
        seen["loop"] = asyncio.get_running_loop()

    worker = start_in_thread(main, name="own-loop")
    assert wait_until(lambda: not worker._thread.is_alive())
    assert seen["thread"] == "worker:own-loop"
    assert seen["loop"] is not None
    assert worker.error is None


def test_stop_lets_the_cleanup_run() -> None:
    events = fresh_events()
    worker = start_in_thread(make_main(events), name="graceful")
    assert events["started"].wait(5)
    worker.stop()
    assert events["cleaned_up"].is_set()
    assert not worker.running
    assert support.running_workers() == []


def test_kill_runs_none_of_the_remaining_code_not_even_at_garbage_collection() -> None:
    events = fresh_events()
    worker = start_in_thread(make_main(events), name="crash")
    assert events["started"].wait(5)
    worker.kill()
    gc.collect()
    assert not worker._thread.is_alive()
    assert not events["cleaned_up"].is_set()
    assert "killed" in repr(worker)
    assert support.running_workers() == []


def test_kill_and_stop_leak_no_thread_or_descriptor() -> None:
    threads, fds = threading.active_count(), open_fds()
    for _ in range(5):
        events = fresh_events()
        worker = start_in_thread(make_main(events), name="leaks")
        assert events["started"].wait(5)
        worker.kill()
        events = fresh_events()
        worker = start_in_thread(make_main(events), name="leaks")
        assert events["started"].wait(5)
        worker.stop()
    assert threading.active_count() == threads
    assert open_fds() <= fds


def test_same_key_replaces_and_stop_all_stops_workers() -> None:
    first, second = fresh_events(), fresh_events()
    start_in_thread(make_main(first), name="same")
    assert first["started"].wait(5)
    start_in_thread(make_main(second), name="same")
    assert first["cleaned_up"].wait(5), "the replaced worker was not stopped"
    assert second["started"].wait(5)
    assert len(support.running_workers()) == 1
    assert support.stop_all() == 1
    assert second["cleaned_up"].is_set()


def test_an_exception_in_main_is_kept_on_the_handle() -> None:
    async def main() -> None:
        raise ValueError("no queue")

    worker = start_in_thread(main, name="fails")
    assert wait_until(lambda: not worker._thread.is_alive())
    assert isinstance(worker.error, ValueError)


def test_the_worker_threads_log_is_kept_on_the_handle_not_printed(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("tests.worker")

    async def main() -> None:
        log.info("working")
        log.error("job failed")

    worker = start_in_thread(main, name="logs", loggers=("tests.worker",))
    assert wait_until(lambda: not worker._thread.is_alive())
    assert worker.log == ["INFO tests.worker: working", "ERROR tests.worker: job failed"]
    assert worker.errors == ["ERROR tests.worker: job failed"]
    assert capsys.readouterr().err == ""


def test_stop_right_after_start_stops_a_worker_whose_thread_starts_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy machine can hold a new thread back until after stop() is called: stop() must still find the
    worker's task and cancel it, not wait out its timeout and fail."""
    set_event_loop = asyncio.set_event_loop

    def held_back(loop: asyncio.AbstractEventLoop | None) -> None:
        time.sleep(0.3)  # the worker's thread, before it makes its task
        set_event_loop(loop)

    monkeypatch.setattr(asyncio, "set_event_loop", held_back)
    worker = start_in_thread(make_main(fresh_events()), name="held-back")
    started = time.perf_counter()
    worker.stop(timeout=5.0)
    assert not worker._thread.is_alive()
    assert time.perf_counter() - started < 2.5, "stop() found the task once the thread made it"


def test_stop_from_the_worker_itself_ends_it_without_an_error() -> None:
    stopped: list[str] = []
    handle: list[support.workers.BackgroundLoop] = []

    async def main() -> None:
        while not handle:  # until start_in_thread has returned it
            await asyncio.sleep(0.01)
        handle[0].stop(timeout=1.0)  # queues the cancel of this very task
        try:
            await asyncio.sleep(3600)
        finally:
            stopped.append("cleaned up")

    worker = start_in_thread(main, name="stops-itself")
    handle.append(worker)
    assert wait_until(lambda: not worker._thread.is_alive())
    assert worker.error is None, worker.error
    assert stopped == ["cleaned up"]


def test_kill_after_the_worker_ended_by_itself_is_quiet() -> None:
    async def main() -> None:
        return None

    worker = start_in_thread(main, name="ended")
    assert wait_until(lambda: not worker._thread.is_alive())
    worker.kill(timeout=1.0)
    assert "stopped" in repr(worker)


def test_kill_ends_a_worker_whose_clean_up_hangs() -> None:
    """The main task has returned, but a leftover task ignores its cancel: kill() still crashes it."""

    async def main() -> None:
        async def stubborn() -> None:
            while True:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(3600)

        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0.05)

    worker = start_in_thread(main, name="stubborn")
    assert wait_until(lambda: worker._task is not None and worker._task.done())
    worker.kill(timeout=2.0)
    assert not worker._thread.is_alive()
    assert "killed" in repr(worker)
