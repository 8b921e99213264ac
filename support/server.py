"""Run an ASGI app under uvicorn on a background thread of the current process.

The course's chapters start their apps inside the Jupyter kernel, so that the app, the load and the
plots live in one notebook. A server here is bound to 127.0.0.1 on a free port, and is registered
under a key: starting another server under the same key (re-running the same cell) stops the old one
first, so re-running cells never fails with "address already in use" and never leaks a server.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import socket
import sys
import threading
import time
from typing import Any

import uvicorn

from support import threadlog
from support.registry import Registry, caller_key

__all__ = ["Server", "ServerFailedToStart", "running", "serve", "stop_all"]

_LOGGER_NAMES = ("uvicorn", "uvicorn.error", "uvicorn.access")
# uvicorn closes a keep-alive connection whose next request has not arrived 5 s after the last
# response. The load generator shares this process (and its GIL) with the server: on a starved
# machine a load run once left four connections idle that long, the timer closed them as their next
# requests were sent, and those failed with "connection closed by the server" (chapter 3's span
# counts came out short). Idle connections still close at once when the server stops.
KEEP_ALIVE_TIMEOUT = 60.0
_servers: Registry[Server] = Registry()


class ServerFailedToStart(RuntimeError):
    """The app did not start, most often because its lifespan raised."""


def _install_log_router() -> None:
    threadlog.capture(_LOGGER_NAMES)


class _Uvicorn(uvicorn.Server):
    """uvicorn's server with a main loop that wakes as soon as it is asked to stop.

    uvicorn polls ``should_exit`` every 100 ms; waking on an event makes ``stop()`` prompt.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=0.1)

    def request_exit(self) -> None:
        self.should_exit = True
        loop, wake = self.loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(wake.set)


class Server:
    """A handle on a running app: ``.url``, ``.stop()``, and what the server logged.

    Use it at top level (``server = serve(app)`` … ``server.stop()``) or as a context manager
    (``with serve(app) as server: …``).
    """

    def __init__(
        self,
        app: Any,
        key: str,
        *,
        log: bool,
        graceful_timeout: float,
        loop: str,
        http: str = "auto",
        proxy_headers: bool = False,
    ) -> None:
        self.app = app
        self.key = key
        self.echo_log = log
        self.log: list[str] = []
        self.errors: list[str] = []
        self._exceptions: list[BaseException] = []
        self._raised = threading.Event()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # IPPROTO_TCP (not 0) matters: asyncio sets TCP_NODELAY on accepted connections only when the
        # listening socket says it is TCP; without it keep-alive requests can stall ~40 ms (Nagle).
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=log,
            timeout_graceful_shutdown=graceful_timeout,
            timeout_keep_alive=KEEP_ALIVE_TIMEOUT,
            backlog=4096,
            loop=loop,
            http=http,
            # uvicorn's own default is True with 127.0.0.1 trusted: every in-process client is
            # 127.0.0.1, so X-Forwarded-For would be applied before the app saw the request.
            proxy_headers=proxy_headers,
        )
        self._uvicorn = _Uvicorn(config)
        self._thread = threading.Thread(target=self._run, name=f"serve:{key}:{self.port}", daemon=True)
        self._exit: BaseException | None = None

    def _run(self) -> None:
        try:
            self._uvicorn.run(sockets=[self._sock])
        except BaseException as exc:  # SystemExit from a failed lifespan, or anything else
            self._exit = exc

    def _record(self, record: logging.LogRecord, line: str) -> None:
        self.log.append(line)
        if record.levelno >= logging.ERROR:
            self.errors.append(line)
            if record.exc_info and record.exc_info[1] is not None:
                self._exceptions.append(record.exc_info[1])
                self._raised.set()
        if self.echo_log:
            print(line, file=sys.stderr)

    @property
    def exceptions(self) -> list[BaseException]:
        """Exceptions the app raised while serving (uvicorn logged them; nothing was printed)."""
        return list(self._exceptions)

    def wait_for_exception(self, timeout: float = 2.0) -> BaseException | None:
        """The latest exception the app raised, waiting up to ``timeout`` s for one (else None).

        A client sees the 500 before uvicorn logs the exception behind it, so a check that has just
        received a 500 waits here rather than reading ``exceptions`` at once.
        """
        self._raised.wait(timeout)
        return self._exceptions[-1] if self._exceptions else None

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._uvicorn.should_exit

    def _start(self, timeout: float) -> None:
        threadlog.route(self._thread.name, self._record)
        self._thread.start()
        deadline = time.perf_counter() + timeout
        while not self._uvicorn.started and self._thread.is_alive():
            if time.perf_counter() > deadline:
                self.stop()
                raise ServerFailedToStart(f"the app did not start within {timeout:.0f} s")
            time.sleep(0.001)
        if not self._uvicorn.started:
            self._thread.join()
            self._sock.close()
            threadlog.unroute(self._thread.name, self._record)
            raise ServerFailedToStart(f"the app failed to start: {self._failure_reason()}")

    def _failure_reason(self) -> str:
        """The last line of the last traceback uvicorn logged, e.g. ``ValueError: no database``."""
        for entry in reversed(self.errors):
            lines = [line for line in entry.splitlines() if line.strip()]
            if len(lines) > 1:
                return f"{lines[-1].strip()} (raised by the app during start-up)"
        return f"uvicorn exited with {self._exit!r}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving: wait for in-flight requests (bounded by ``graceful_timeout``), then close."""
        self._uvicorn.request_exit()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._sock.close()
        threadlog.unroute(self._thread.name, self._record)
        _servers.discard(self.key, self)
        if self._thread.is_alive():
            raise RuntimeError(f"server {self.key!r} did not stop within {timeout} s")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Server {self.key!r} {state} at {self.url}>"


def serve(
    app: Any,
    *,
    name: str | None = None,
    log: bool = False,
    graceful_timeout: float = 5.0,
    start_timeout: float = 30.0,
    loop: str = "auto",
    http: str = "auto",
    proxy_headers: bool = False,
) -> Server:
    """Start ``app`` under uvicorn on a background thread, on 127.0.0.1 and a free port.

    ``name`` keys the server; by default the key is the calling notebook cell (or source line), so
    re-running a cell replaces the server it started. ``log=True`` echoes uvicorn's log and access
    log to stderr; by default they are kept on the handle (``server.log``, ``server.errors``).
    ``graceful_timeout`` bounds how long ``stop()`` waits for in-flight requests and background tasks.
    ``loop`` is uvicorn's: ``"auto"`` (uvloop where installed) or ``"asyncio"``; so is ``http``:
    ``"auto"`` (httptools where installed) or ``"h11"`` (the pure-Python parser).
    ``proxy_headers`` is off by default, so the app sees the real peer address: uvicorn's own default
    (on, trusting 127.0.0.1) would rewrite ``request.client`` from ``X-Forwarded-For`` for every
    in-process client. Pass ``True`` to get uvicorn's behaviour.
    """
    _install_log_router()
    key = name or caller_key()
    _servers.stop_old(key)
    server = Server(
        app,
        key,
        log=log,
        graceful_timeout=graceful_timeout,
        loop=loop,
        http=http,
        proxy_headers=proxy_headers,
    )
    server._start(start_timeout)
    _servers.add(key, server)
    return server


def running() -> list[Server]:
    """The servers started by ``serve()`` that have not been stopped."""
    return _servers.handles()


def stop_all() -> int:
    """Stop every server started by ``serve()``; returns how many were stopped."""
    return _servers.stop_all()


atexit.register(stop_all)
