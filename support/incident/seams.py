"""The seams: the system's named, replaceable functions, and how a running system looks them up.

A seam's name is ``service.function``. The services call every seam through a mapping
(``ctx.seams["orders.get_product"](ctx, …)``), so replacing a seam, as a planted fault or as a
learner's fix (``start_system(overrides={...})``), changes what the running code does. More seams
exist than any seed plants faults in: reading the code of each is part of the drill.
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from support.incident import healthy

__all__ = ["SEAMS", "Seam", "SeamTable", "seam_source"]


@dataclass(frozen=True)
class Seam:
    """One seam: its name, the service it belongs to, what it does, and its healthy version."""

    name: str
    service: str
    signature: str
    summary: str
    healthy: Callable[..., Any]

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.healthy)


def _seam(name: str, summary: str) -> Seam:
    service, function = name.split(".")
    version = getattr(healthy, function)
    signature = str(inspect.signature(version)).replace("'", "")  # annotations are strings here
    return Seam(name, service, f"{function}{signature}", summary, version)


SEAMS: dict[str, Seam] = {
    seam.name: seam
    for seam in (
        _seam("gateway.client_key", "who a request's client is, for the rate limiter"),
        _seam("gateway.rate_limit", "the rate limiter's decision for one request of a client"),
        _seam("gateway.forward_headers", "the headers the gateway's call to the orders service carries"),
        _seam("gateway.export_spans", "how the gateway's finished spans reach the tracing collector"),
        _seam("orders.product_cache_key", "the Redis key of a cached product page"),
        _seam("orders.get_product", "a product page, through the Redis cache"),
        _seam("orders.update_price", "a price change"),
        _seam("orders.place_order", "an order: priced, paid, stored"),
        _seam("orders.list_orders", "a customer's latest orders with their lines"),
        _seam("orders.quote_shipping", "a shipping quote from the vendor's SDK"),
        _seam("orders.enqueue_confirmation", "queues an order's confirmation email"),
        _seam("worker.send_confirmation", "the worker's job: send one confirmation email"),
    )
}


class SeamTable(Mapping[str, Callable[..., Any]]):
    """The versions a running system calls, by seam name; what ``ctx.seams`` is."""

    def __init__(self, versions: Mapping[str, Callable[..., Any]]) -> None:
        self._versions = dict(versions)

    def __getitem__(self, name: str) -> Callable[..., Any]:
        try:
            return self._versions[name]
        except KeyError:
            raise KeyError(f"no seam {name!r}; the seams are {', '.join(SEAMS)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._versions)

    def __len__(self) -> int:
        return len(self._versions)


def check_replacement(name: str, function: Any) -> None:
    """Raise a ``TypeError``/``KeyError`` that says what is wrong with ``function`` as seam ``name``."""
    if name not in SEAMS:
        close = [seam for seam in SEAMS if seam.split(".")[-1] == name.split(".")[-1]]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"no seam {name!r}{hint}; the seams are: {', '.join(SEAMS)}")
    if not callable(function):
        raise TypeError(f"the replacement for {name!r} must be a function, got {function!r}")
    seam = SEAMS[name]
    if inspect.iscoroutinefunction(function) != seam.is_async:
        kind = "an async def" if seam.is_async else "a plain def"
        raise TypeError(f"{name!r} is called as {kind} function: {seam.signature}")
    try:
        wanted = len(inspect.signature(seam.healthy).parameters)
        inspect.signature(function).bind(*range(wanted))
    except TypeError:
        raise TypeError(
            f"the replacement for {name!r} must accept the seam's {wanted} arguments: {seam.signature}"
        ) from None
    except ValueError:  # no signature (a builtin): trust it
        pass


def seam_source(name: str, function: Callable[..., Any]) -> str:
    """The source of ``function``, shown under the seam's own function name when it is one of ours."""
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return f"# the source of {function!r} is not available (defined interactively?)"
    module = getattr(function, "__module__", "")
    if module.startswith("support.incident."):
        short = name.split(".")[-1]
        source = re.sub(r"^(async def |def )\w+", rf"\g<1>{short}", source, count=1, flags=re.M)
    return source
