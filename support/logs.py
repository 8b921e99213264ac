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

    def __init__(self, logger: logging.Logger, level: int, key: str | None = None) -> None:
        super().__init__(level=level)
        self.logger = logger
        self.key = key
        self.records: list[logging.LogRecord] = []
        self.lines_: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.formatter is not None:
            # Formatted now, so .lines() shows each line as it was when logged. A handler behind a
            # QueueListener formats later, on the listener's thread, outside the request's context:
            # stamp context variables onto the record with a logging.Filter (chapter 3), not here.
            try:
                self.lines_.append(self.format(record))
            except Exception:
                self.handleError(record)

    def messages(self) -> list[str]:
        return [record.getMessage() for record in self.records]

    def lines(self) -> list[str]:
        """The records as the collector's formatter wrote them (``collect_logs(..., formatter=...)``)."""
        if self.formatter is None:
            raise ValueError("this collector has no formatter; pass formatter= to collect_logs()")
        return list(self.lines_)

    def clear(self) -> None:
        self.records.clear()
        self.lines_.clear()

    def close(self) -> None:
        self.logger.removeHandler(self)
        super().close()

    def __enter__(self) -> LogCollector:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def collect_logs(
    name: str,
    level: int = logging.WARNING,
    formatter: logging.Formatter | None = None,
    key: str | None = None,
) -> LogCollector:
    """Start collecting what logger ``name`` (and its children) log at ``level`` or above.

    With a ``formatter``, each record is also formatted as it is logged (``.lines()``). With a
    ``key``, an earlier collector with the same key on the same logger is closed first, so re-running
    the cell that made it does not leave two collectors attached. Use it as a context manager, or call
    ``.close()`` when done.
    """
    logger = logging.getLogger(name)
    if key is not None:
        for handler in list(logger.handlers):
            if isinstance(handler, LogCollector) and handler.key == key:
                handler.close()
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    collector = LogCollector(logger, level, key)
    if formatter is not None:
        collector.setFormatter(formatter)
    logger.addHandler(collector)
    return collector
