"""Third parties the orders service calls: a shipping-rates SDK and a payments API (both stand-ins).

``ShippingClient`` is written like many vendor SDKs: an ``async def quote`` that looks asynchronous,
and a synchronous flavour, ``quote_blocking``, for scripts. Both call the SDK's own helper
``zone_for``, which reads the vendor's bundled rate tables with a plain, synchronous file read (here a
``time.sleep``): nothing in ``quote``'s signature says that it blocks the thread that awaits it.

``PaymentsClient.authorize`` is an honest asynchronous HTTP call that takes a while (a card network
behind it).

Both record their calls (``calls``, and for shipping whether the blocking read ran on a thread that
was running an event loop), so that tests and checks can count what happened instead of timing it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from support.workloads import on_event_loop_thread

__all__ = ["PaymentsClient", "ShippingClient", "zone_for"]

RATE_TABLE_READ = 0.12  # seconds: how long zone_for's synchronous read of the rate tables takes
SHIPPING_ROUND_TRIP = 0.01  # seconds: the vendor's API answering a quote
PAYMENT_ROUND_TRIP = 0.5  # seconds: the card network authorising a payment

_reads_on_loop = 0
_reads = 0
_reads_lock = threading.Lock()


def zone_for(postcode: str) -> int:
    """The shipping zone (1–5) of ``postcode``, from the SDK's bundled rate tables.

    (In the real SDK: open the tables file, parse it, look the prefix up. Synchronous.)
    """
    global _reads, _reads_on_loop
    # a read that holds a service's event loop (the servers' threads are named serve:…); a loop of
    # the caller's own, in a worker thread, blocks nobody else
    on_loop = on_event_loop_thread() and threading.current_thread().name.startswith("serve:")
    time.sleep(RATE_TABLE_READ)
    with _reads_lock:
        _reads += 1
        _reads_on_loop += on_loop
    return 1 + sum(map(ord, postcode)) % 5


@dataclass
class ShippingClient:
    """The vendor's SDK: ``await client.quote(weight, postcode)``, or ``client.quote_blocking(...)``."""

    round_trip: float = SHIPPING_ROUND_TRIP
    calls: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _price(self, weight_grams: int, zone: int) -> dict[str, int]:
        with self._lock:
            self.calls += 1
        return {"zone": zone, "shipping_cents": 300 + zone * 150 + weight_grams // 10}

    async def quote(self, weight_grams: int, postcode: str) -> dict[str, int]:
        """The shipping price of a parcel to ``postcode``: the vendor's asynchronous API."""
        zone = zone_for(postcode)
        await asyncio.sleep(self.round_trip)
        return self._price(weight_grams, zone)

    def quote_blocking(self, weight_grams: int, postcode: str) -> dict[str, int]:
        """The same quote, synchronously: blocks the calling thread until the vendor answers."""
        zone = zone_for(postcode)
        time.sleep(self.round_trip)
        return self._price(weight_grams, zone)

    @staticmethod
    def rate_table_reads() -> tuple[int, int]:
        """(reads of the rate tables so far, how many of them held a service's event loop)."""
        with _reads_lock:
            return _reads, _reads_on_loop

    @staticmethod
    def reset_reads() -> None:
        global _reads, _reads_on_loop
        with _reads_lock:
            _reads = _reads_on_loop = 0


@dataclass
class PaymentsClient:
    """A payments API: ``await payments.authorize(customer, amount)`` takes ``round_trip`` seconds."""

    round_trip: float = PAYMENT_ROUND_TRIP
    calls: int = 0

    async def authorize(self, customer: str, amount_cents: int) -> str:
        """Authorise a card payment; returns the authorisation's ID."""
        self.calls += 1
        await asyncio.sleep(self.round_trip)
        return f"auth-{customer}-{self.calls}"
