"""support.collect_logs keeps records from any thread until the notebook prints them."""

from __future__ import annotations

import logging
import threading

import pytest

import support


def test_collects_from_other_threads_at_the_level_asked(capfd: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("course.test")
    logger.propagate = False
    with support.collect_logs("course.test") as logs:
        worker = threading.Thread(
            target=lambda: (logger.info("quiet"), logger.warning("slow step: %d ms", 42))
        )
        worker.start()
        worker.join()
        assert logs.messages() == ["slow step: 42 ms"]
        logs.clear()
        assert logs.records == []
    logger.warning("after close")
    assert logs.records == []
    assert logs not in logger.handlers


def test_formats_on_the_logging_thread_and_rerun_replaces_the_collector() -> None:
    from contextvars import ContextVar

    request_id: ContextVar[str] = ContextVar("request_id", default="-")

    class WithId(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return f"{request_id.get()} {record.getMessage()}"

    logger = logging.getLogger("course.test.fmt")
    logger.propagate = False
    first = support.collect_logs("course.test.fmt", logging.INFO, formatter=WithId(), key="cell-1")
    second = support.collect_logs("course.test.fmt", logging.INFO, formatter=WithId(), key="cell-1")
    assert first not in logger.handlers and second in logger.handlers

    def in_request() -> None:
        request_id.set("req-7")
        logger.info("hello")

    worker = threading.Thread(target=in_request)
    worker.start()
    worker.join()
    assert second.lines() == ["req-7 hello"]  # the request's value, read when the line was logged
    second.close()
    with support.collect_logs("course.test.fmt") as plain, pytest.raises(ValueError, match="formatter"):
        plain.lines()


def test_a_filter_on_the_collector_stamps_records_where_they_are_logged() -> None:
    from contextvars import ContextVar

    request_id: ContextVar[str] = ContextVar("request_id", default="-")

    class Stamp(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.request_id = request_id.get()
            return True

    logger = logging.getLogger("course.test.filter")
    logger.propagate = False
    with support.collect_logs(
        "course.test.filter", logging.INFO, formatter=logging.Formatter("%(request_id)s %(message)s")
    ) as logs:
        logs.addFilter(Stamp())

        def in_request() -> None:
            request_id.set("req-9")
            logger.info("hello")

        worker = threading.Thread(target=in_request)
        worker.start()
        worker.join()
        assert logs.lines() == ["req-9 hello"]
        assert logs.records[0].request_id == "req-9"
