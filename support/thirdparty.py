"""Stand-ins for third-party services a request handler calls: slow, and failing on a schedule.

They record every call, so notebooks and checks can count what happened (sent, failed, sent twice)
instead of reading it off a clock. Failures are deterministic (every ``fail_every``-th call), so a
run shows the same story every time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

__all__ = ["EmailProvider", "ProviderError", "SentEmail"]


class ProviderError(RuntimeError):
    """The third party failed (a 5xx, a timeout): the caller may retry."""


@dataclass(frozen=True)
class SentEmail:
    to: str
    subject: str
    idempotency_key: str | None
    at: float  # time.perf_counter() when the provider accepted it


class EmailProvider:
    """A fake email API: each ``send`` takes ``delay`` seconds; every ``fail_every``-th call fails.

    ``fail_after_send=True`` makes the failing calls fail *after* the email went out (the provider
    accepted it but the response was lost): the caller sees an error although the email was sent,
    which is what makes blind retries send twice. ``dedupe=True`` makes the provider honour
    idempotency keys, as payment APIs do (Stripe's ``Idempotency-Key`` header) and a few email APIs
    (Resend's): a repeated key is accepted without sending again. Many email APIs have no such key.
    """

    def __init__(
        self,
        delay: float = 0.2,
        *,
        fail_every: int = 0,
        fail_after_send: bool = False,
        dedupe: bool = False,
    ) -> None:
        if delay < 0 or fail_every < 0:
            raise ValueError("delay and fail_every must be >= 0")
        self.delay = delay
        self.fail_every = fail_every
        self.fail_after_send = fail_after_send
        self.dedupe = dedupe
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every call (keep the settings).

        A call begun before the reset no longer counts when it ends (a killed worker's calls never
        end at all): each call remembers the generation it began in.
        """
        with self._lock:
            self.generation = getattr(self, "generation", 0) + 1
            self.calls = 0
            self.failures = 0
            self.sent: list[SentEmail] = []
            self.in_flight = 0
            self.max_in_flight = 0

    def _begin(self) -> tuple[int, int]:
        """Count a new call; returns its generation and its number if it is one of the scheduled
        failures (else 0)."""
        with self._lock:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            failing = self.calls if self.fail_every and self.calls % self.fail_every == 0 else 0
            return self.generation, failing

    def _record(self, generation: int, to: str, subject: str, key: str | None) -> None:
        with self._lock:
            if generation != self.generation:  # begun before a reset(): no longer counted
                return
            if self.dedupe and key is not None and any(m.idempotency_key == key for m in self.sent):
                return
            self.sent.append(SentEmail(to, subject, key, time.perf_counter()))

    def _complete(self, generation: int, failing_call: int, to: str, subject: str, key: str | None) -> None:
        if failing_call and not self.fail_after_send:
            self._failed(generation)
            raise ProviderError(f"email provider unavailable (call {failing_call})")
        self._record(generation, to, subject, key)
        if failing_call:
            self._failed(generation)
            raise ProviderError(f"email provider timed out after accepting the message (call {failing_call})")

    def _failed(self, generation: int) -> None:
        with self._lock:
            if generation == self.generation:
                self.failures += 1

    def _end(self, generation: int) -> None:
        with self._lock:
            if generation == self.generation:
                self.in_flight -= 1

    async def send(self, to: str, subject: str = "Welcome!", *, idempotency_key: str | None = None) -> None:
        """Send one email (asynchronously); raises ``ProviderError`` on the scheduled failures."""
        generation, failing_call = self._begin()
        try:
            await asyncio.sleep(self.delay)
            self._complete(generation, failing_call, to, subject, idempotency_key)
        finally:
            self._end(generation)

    def send_blocking(
        self, to: str, subject: str = "Welcome!", *, idempotency_key: str | None = None
    ) -> None:
        """The same call through a synchronous SDK: blocks the calling thread for ``delay`` s."""
        generation, failing_call = self._begin()
        try:
            time.sleep(self.delay)
            self._complete(generation, failing_call, to, subject, idempotency_key)
        finally:
            self._end(generation)

    def sent_to(self, to: str) -> int:
        """How many emails went to ``to``."""
        with self._lock:
            return sum(1 for m in self.sent if m.to == to)

    def duplicates(self) -> int:
        """Emails beyond the first to the same recipient with the same subject."""
        with self._lock:
            keys = [(m.to, m.subject) for m in self.sent]
        return len(keys) - len(set(keys))

    def __repr__(self) -> str:
        return (
            f"<EmailProvider calls={self.calls} sent={len(self.sent)} failures={self.failures} "
            f"duplicates={self.duplicates()}>"
        )
