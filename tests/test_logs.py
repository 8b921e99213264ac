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
