"""Run an async worker on its own thread and event loop, as a stand-in for a separate worker process.

A queue worker normally runs in its own process. In a notebook it runs here instead: on a background
thread with its own event loop, so the kernel stays free and the worker shares nothing with the app
but the store (Redis) they both talk to. Two ways to end it:

- ``stop()`` is a graceful shutdown: the worker's main task is cancelled and its cleanup runs, as on
  SIGTERM.
- ``kill()`` is a crash, as on ``kill -9``: the loop halts between two steps and nothing else the
  worker would have done runs, no ``except``, no ``finally``, no last write to Redis. Its tasks are
  abandoned (kept referenced, so garbage collection never runs their cleanup either).

Like ``serve()``, a worker is registered under a key (the notebook cell by default): starting another
under the same key stops the old one first.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from support import threadlog
from support.registry import Registry, caller_key

__all__ = ["BackgroundLoop", "on_kill", "running_workers", "start_in_thread", "stop_workers"]

_workers: Registry[BackgroundLoop] = Registry()
# Tasks of killed loops. Holding them means their coroutines are never closed, so no cleanup code
# of a "crashed" worker ever runs, not even at garbage collection.
_abandoned: list[Any] = []
_kill_hooks: list[Callable[[asyncio.AbstractEventLoop], None]] = []


def on_kill(hook: Callable[[asyncio.AbstractEventLoop], None]) -> None:
    """Call ``hook(loop)`` after a worker's loop is killed: where the operating system would close a
    dead process's connections, an in-process store must forget the dead loop's clients itself."""
    if hook not in _kill_hooks:
        _kill_hooks.append(hook)


class BackgroundLoop:
    """A handle on ``main()`` running on its own thread and event loop.

    ``log`` and ``errors`` hold what the worker logged (on the loggers named at start), one
    formatted line per record.
    """

    def __init__(self, main: Callable[[], Awaitable[Any]], key: str) -> None:
        self.key = key
        self.log: list[str] = []
        self.errors: list[str] = []
        self._main = main
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[Any] | None = None
        self._killed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"worker:{key}", daemon=True)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._task = loop.create_task(self._main_wrapper())
        self._task.add_done_callback(lambda _: loop.stop())
        loop.run_forever()
        if not self._killed:
            try:
                self._clean_up(loop)
            except RuntimeError:  # "Event loop stopped before Future completed": killed during the clean-up
                if not self._killed:
                    raise
        if self._killed:
            abandoned = list(asyncio.all_tasks(loop))
            for task in abandoned:
                task._log_destroy_pending = False  # type: ignore[attr-defined]  # a crash says nothing
            _abandoned.append(abandoned)
            for hook in _kill_hooks:
                hook(loop)
        loop.close()

    @staticmethod
    def _clean_up(loop: asyncio.AbstractEventLoop) -> None:
        """A graceful end: cancel what is left and let it finish, as a process does on SIGTERM."""
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())

    async def _main_wrapper(self) -> None:
        try:
            await self._main()
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc

    def _record(self, record: logging.LogRecord, line: str) -> None:
        self.log.append(line)
        if record.levelno >= logging.ERROR:
            self.errors.append(line)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._killed

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown: cancel the main task, let its cleanup run, close the loop.

        The cancel goes to the loop as a callback, not to the task: called right after the start, the
        worker's thread may not have made its task yet (a busy machine can hold a new thread back), and
        a callback queued before the loop runs still runs first, once the task is made.
        """
        self._call_in_loop(self._cancel_main)
        self._finish(timeout)

    def kill(self, timeout: float = 10.0) -> None:
        """Crash: halt the loop where it is; none of the worker's remaining code runs."""
        # also while the clean-up of a worker that ended by itself runs: it may hang
        if self._thread.is_alive() and not self._loop.is_closed():
            self._killed = True  # before the loop stops: its thread reads it then
            self._call_in_loop(self._loop.stop)
        self._finish(timeout)

    def _cancel_main(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _call_in_loop(self, callback: Callable[[], object]) -> None:
        """Queue ``callback`` on the worker's loop, unless the loop has closed (the worker has ended)."""
        with contextlib.suppress(RuntimeError):  # closed, or closed meanwhile
            self._loop.call_soon_threadsafe(callback)

    def _finish(self, timeout: float) -> None:
        if threading.current_thread() is self._thread:  # from the worker itself: it ends once this returns
            _workers.discard(self.key, self)
            threadlog.unroute(self._thread.name, self._record)
            return
        self._thread.join(timeout)
        _workers.discard(self.key, self)
        if not self._thread.is_alive():
            threadlog.unroute(self._thread.name, self._record)
        if self._thread.is_alive():
            raise RuntimeError(f"worker {self.key!r} did not stop within {timeout} s")

    def __enter__(self) -> BackgroundLoop:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "killed" if self._killed else "running" if self.running else "stopped"
        return f"<BackgroundLoop {self.key!r} {state}>"


def start_in_thread(
    main: Callable[[], Awaitable[Any]],
    *,
    name: str | None = None,
    key: str | None = None,
    loggers: tuple[str, ...] = (),
) -> BackgroundLoop:
    """Run ``main()`` on a new thread with its own event loop; returns the handle.

    ``name`` keys the worker (default: the calling notebook cell), so re-running a cell replaces
    the worker it started. ``key`` is for callers that compute the key themselves. Records the
    thread logs on ``loggers`` are kept on the handle instead of being printed.
    """
    threadlog.capture(loggers)
    key = name or key or caller_key()
    _workers.stop_old(key)
    worker = BackgroundLoop(main, key)
    _workers.add(key, worker)
    threadlog.route(worker._thread.name, worker._record)
    worker._thread.start()
    return worker


def running_workers() -> list[BackgroundLoop]:
    """The workers started by ``start_in_thread()`` that have not been stopped or killed."""
    return _workers.handles()


def stop_workers() -> int:
    """Stop every running worker gracefully; returns how many were stopped."""
    return _workers.stop_all()


atexit.register(stop_workers)
