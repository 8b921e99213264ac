"""The course's plumbing: start apps in-process, fire load at them, plot and check the results."""

from support.backends import delete_keys, describe_redis, redis_client, redis_url
from support.loadgen import LoadResult, RequestRecord, load
from support.logs import LogCollector, collect_logs
from support.queues import job_queue, start_worker
from support.server import Server, ServerFailedToStart, running, serve
from support.server import stop_all as stop_servers
from support.telemetry import Tracing, running_tracing, stop_tracing, tracing
from support.thirdparty import EmailProvider, ProviderError
from support.workers import BackgroundLoop, running_workers, start_in_thread, stop_workers


def stop_all() -> int:
    """Stop every worker, server and tracer provider the notebook started; returns how many."""
    return stop_workers() + stop_servers() + stop_tracing()


__all__ = [
    "BackgroundLoop",
    "EmailProvider",
    "LoadResult",
    "LogCollector",
    "ProviderError",
    "RequestRecord",
    "Server",
    "ServerFailedToStart",
    "Tracing",
    "collect_logs",
    "delete_keys",
    "describe_redis",
    "job_queue",
    "load",
    "redis_client",
    "redis_url",
    "running",
    "running_tracing",
    "running_workers",
    "serve",
    "start_in_thread",
    "start_worker",
    "stop_all",
    "stop_servers",
    "stop_tracing",
    "stop_workers",
    "tracing",
]
