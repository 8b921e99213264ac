"""The confirmation worker: a SAQ worker on its own thread and loop (``support.start_worker``).

The job function SAQ runs is ``send_confirmation(ctx, *, order_id, email, request_id=None)``. It
restores the request's ID (when the job carries one) so that the worker's log lines name the request
that placed the order, counts the attempt, and calls the seam ``worker.send_confirmation``. An
exception from the seam fails the attempt: SAQ retries the job while it has attempts left
(``retries``), else the job has failed for good.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from support.incident.context import Settings, WorkerContext
from support.incident.instruments import QueueCounters
from support.incident.instruments import request_id as REQUEST_ID
from support.thirdparty import EmailProvider

__all__ = ["make_job"]


def make_job(
    *, seams: Mapping[str, Any], settings: Settings, emails: EmailProvider, counters: QueueCounters
) -> Callable[..., Awaitable[None]]:
    """The job function the worker registers (SAQ finds it by its name, ``send_confirmation``)."""
    log = logging.getLogger("ch07.worker")

    async def send_confirmation(
        ctx: dict, *, order_id: int, email: str, request_id: str | None = None
    ) -> None:
        saq_job = ctx.get("job")
        token = REQUEST_ID.set(request_id or "-")
        counters.add(attempts=1)
        try:
            worker_ctx = WorkerContext(emails, settings, seams, log, saq_job)
            await seams["worker.send_confirmation"](worker_ctx, order_id, email)
        except Exception:
            if saq_job is not None and saq_job.retryable:
                counters.add(retried=1)
            else:
                counters.add(failed=1)
                log.error("confirmation failed for good", extra={"order_id": order_id})
            raise
        else:
            counters.add(done=1)
        finally:
            REQUEST_ID.reset(token)

    send_confirmation.__qualname__ = "send_confirmation"  # SAQ registers a function by its qualified name
    return send_confirmation
