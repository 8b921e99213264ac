"""Running a learner's code from a check: on a fresh event loop, bounded in time, tidy afterwards."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

__all__ = [
    "NoReturn",
    "find_route",
    "in_fresh_loop",
    "joins_new_threads",
    "run_in_fresh_loop",
    "serve_answer",
    "short",
]

T = TypeVar("T")


class NoReturn(Exception):
    """The learner's coroutine did not finish in time (``stuck``: it did not even give its thread back)."""

    def __init__(self, seconds: float, *, stuck: bool) -> None:
        super().__init__(f"no return within {seconds:g} s")
        self.seconds, self.stuck = seconds, stuck


@contextmanager
def joins_new_threads(grace: float = 3.0) -> Iterator[None]:
    """Wait (up to ``grace`` seconds in all) for threads started inside the block to finish."""
    before = set(threading.enumerate())
    try:
        yield
    finally:
        deadline = time.monotonic() + grace
        for thread in threading.enumerate():
            if thread not in before and thread is not threading.current_thread():
                _join(thread, deadline)


def _join(thread: threading.Thread, deadline: float) -> None:
    """Join ``thread`` until ``deadline``; one that ``start()`` has listed but not yet begun (a thread
    pool adding a worker at that moment) cannot be joined yet: wait for it to begin."""
    while True:
        try:
            thread.join(max(0.0, deadline - time.monotonic()))
            return
        except RuntimeError:  # "cannot join thread before it is started"
            if time.monotonic() >= deadline:
                return
            time.sleep(0.001)


def run_in_fresh_loop(main: Callable[[], Awaitable[T]], *, timeout: float, name: str) -> T:
    """Run ``main()`` with ``asyncio.run`` in a new thread; return its result or raise its exception.

    A notebook's kernel already runs an event loop in the main thread, so ``asyncio.run`` cannot run
    there; a thread of our own gives the learner's coroutine a loop that nothing else shares.
    Raises ``NoReturn`` when ``main()`` takes longer than ``timeout`` seconds. Callers wrap it in
    ``joins_new_threads()`` to wait for the worker threads the loop started.
    """
    box: dict[str, Any] = {}

    async def bounded() -> T:
        scope = asyncio.timeout(timeout)
        try:
            async with scope:
                return await main()
        except TimeoutError:
            if scope.expired():
                raise NoReturn(timeout, stuck=False) from None
            raise

    def target() -> None:
        try:
            box["result"] = asyncio.run(bounded())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join(timeout + 10)
    if thread.is_alive():  # the learner's code holds the loop and never gives it back
        raise NoReturn(timeout, stuck=True)
    if "error" in box:
        raise box["error"]
    return box["result"]


def short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def find_route(app: Any, method: str, path: str, app_name: str) -> Any:
    """The endpoint function of ``method path`` in the learner's app; a ``Mismatch`` if it has none."""
    from support.checks import Mismatch, expect

    routes = getattr(app, "routes", None)
    expect(
        routes is not None,
        "a FastAPI app",
        f"{type(app).__name__} (no routes)",
        f"Pass `{app_name}`, the app the exercise defines.",
        "The check serves the object you pass and sends it requests, so it must be the app itself: "
        "the object your endpoints are registered on, with their routes.",
    )
    paths = []
    for route in routes:
        route_path = getattr(route, "path", None)
        paths.append(route_path)
        if route_path == path and method in (getattr(route, "methods", None) or ()):
            return route.endpoint
    raise Mismatch(
        f"a {method} {path} endpoint",
        f"routes {sorted(p for p in paths if p)}",
        [
            f'Keep the decorator `@{app_name}.{method.lower()}("{path}", …)` from the exercise cell.',
            "FastAPI adds a route when the decorator runs, that is when the cell defining the endpoint "
            "runs: the method and the path must be the exercise's, and that cell must have run since "
            "the app was made.",
        ],
    )


def in_fresh_loop(main: Callable[[], Awaitable[Any]], *, timeout: float, name: str) -> Any:
    """``run_in_fresh_loop``, failing if the learner's code leaves a new thread running."""
    with joins_new_threads():
        return run_in_fresh_loop(main, timeout=timeout, name=name)


def serve_answer(app: Any, name: str, exercise_id: str, failed_hint: str) -> Any:
    """``serve(app)`` for a check: a placeholder that stops the app from starting reads as "not started"."""
    from support.checks import Mismatch, placeholder_message
    from support.server import ServerFailedToStart, serve

    try:
        return serve(app, name=name, graceful_timeout=1.0)
    except ServerFailedToStart as failed:
        if placeholder_message(exercise_id) in str(failed):
            raise NotImplementedError(placeholder_message(exercise_id)) from None
        raise Mismatch("the app to start", str(failed), [failed_hint]) from None
