"""Keep what a background thread logs on the handle of whatever runs on that thread, unprinted.

Output printed from a server's or a worker's thread would land in whichever notebook cell happens to
be running (or be lost), so records are routed by the name of the thread that emitted them to the
handle that owns the thread (``server.log``, ``worker.log``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

__all__ = ["capture", "route", "unroute"]

Sink = Callable[[logging.LogRecord, str], None]


class _ThreadLogRouter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.sinks: dict[str, Sink] = {}

    def emit(self, record: logging.LogRecord) -> None:
        sink = self.sinks.get(record.threadName or "")
        if sink is not None:
            sink(record, self.format(record))


_router = _ThreadLogRouter()


def capture(logger_names: tuple[str, ...], level: int = logging.INFO) -> None:
    """Route these loggers' records through the router (and no longer to the root logger)."""
    for name in logger_names:
        logger = logging.getLogger(name)
        if _router not in logger.handlers:
            logger.addHandler(_router)
        logger.propagate = False
        if logger.level == logging.NOTSET or logger.level > level:
            logger.setLevel(level)


def route(thread_name: str, sink: Sink) -> None:
    """Send records emitted on ``thread_name`` to ``sink(record, formatted_line)``."""
    _router.sinks[thread_name] = sink


def unroute(thread_name: str, sink: Sink | None = None) -> None:
    """Stop routing ``thread_name`` (only if it still goes to ``sink``, when one is given)."""
    if sink is None or _router.sinks.get(thread_name) == sink:
        _router.sinks.pop(thread_name, None)
