"""Collect log records from any thread, to print them later from the notebook.

A server's event loop runs on its own thread; what it logs (asyncio's debug-mode warnings, an app's
own log lines) would be printed into whichever cell happens to be running. A collector keeps the
records instead, and the notebook prints them when it chooses.
"""

from __future__ import annotations

import logging

__all__ = ["LogCollector", "collect_logs"]


class LogCollector(logging.Handler):
    """A logging handler that keeps records in ``.records``; ``close()`` detaches it from its logger."""

    def __init__(self, logger: logging.Logger, level: int) -> None:
        super().__init__(level=level)
        self.logger = logger
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]

    def clear(self) -> None:
        self.records.clear()

    def close(self) -> None:
        self.logger.removeHandler(self)
        super().close()

    def __enter__(self) -> LogCollector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def collect_logs(name: str, level: int = logging.WARNING) -> LogCollector:
    """Start collecting what logger ``name`` (and its children) log at ``level`` or above.

    Use it as a context manager, or call ``.close()`` when done.
    """
    logger = logging.getLogger(name)
    collector = LogCollector(logger, level)
    logger.addHandler(collector)
    return collector
