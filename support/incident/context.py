"""What a seam receives: the service's resources, in one object per service.

Every seam of a service takes that service's context as its first argument (the gateway's client-key
seam takes only the request), so a learner's replacement can reach the same database sessions, Redis
client, queue and vendor clients as the code it replaces, and call the service's other seams through
``ctx.seams["…"]``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import async_sessionmaker

from support.incident.instruments import CacheCounters, current_request_id
from support.incident.vendor import PaymentsClient, ShippingClient
from support.thirdparty import EmailProvider

__all__ = ["Decision", "GatewayContext", "OrdersContext", "Settings", "WorkerContext"]


@dataclass(frozen=True)
class Settings:
    """The system's fixed numbers (the same for every seed)."""

    rate_limit: int = 5  # requests a client may make per window, on the gateways
    rate_window: int = 1  # seconds
    cache_ttl: int = 60  # seconds a cached product lives
    pool_size: int = 2  # database connections of the orders service (max_overflow=0)
    pool_timeout: float = 1.0  # seconds a request waits for a connection before the service answers 503
    orders_listed: int = 250  # the most orders an account page lists
    job_retries: int = 6  # attempts a confirmation job gets (SAQ's retries)
    email_fail_every: int = 5  # the email provider fails every 5th call
    email_delay: float = 0.02  # seconds per email sent
    upstream_timeout: float = 3.0  # seconds the gateway waits for the orders service


@dataclass(frozen=True)
class Decision:
    """A rate limiter's answer for one request."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float  # seconds until the client's quota frees up


@dataclass
class GatewayContext:
    """One gateway instance's resources. There are two instances (``gateway-a``, ``gateway-b``) behind
    one address in production; here each has its own URL."""

    instance: str
    redis: Redis  # the course's Redis, shared by both instances
    orders: Any  # an httpx.AsyncClient on the orders service, traced
    settings: Settings
    seams: Mapping[str, Callable[..., Any]]
    log: logging.Logger
    memory: dict[str, Any] = field(default_factory=dict)  # this instance's own memory

    def request_id(self) -> str:
        """The ID of the request being served."""
        return current_request_id()


@dataclass
class OrdersContext:
    """The orders service's resources."""

    sessions: async_sessionmaker  # async_sessionmaker(engine, expire_on_commit=False)
    redis: Redis  # the product cache (decode_responses=True)
    queue: Any  # the SAQ queue of confirmation jobs (support.queues.CourseQueue)
    shipping: ShippingClient
    payments: PaymentsClient
    settings: Settings
    seams: Mapping[str, Callable[..., Any]]
    log: logging.Logger
    cache: CacheCounters = field(default_factory=CacheCounters)

    def request_id(self) -> str:
        """The ID of the request being served."""
        return current_request_id()


@dataclass
class WorkerContext:
    """The confirmation worker's resources."""

    emails: EmailProvider
    settings: Settings
    seams: Mapping[str, Callable[..., Any]]
    log: logging.Logger
    job: Any = None  # the SAQ job being run (attempts, retries)
