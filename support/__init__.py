"""The course's plumbing: start apps in-process, fire load at them, plot and check the results."""

from support.loadgen import LoadResult, RequestRecord, load
from support.logs import LogCollector, collect_logs
from support.server import Server, ServerFailedToStart, running, serve, stop_all

__all__ = [
    "LoadResult",
    "LogCollector",
    "RequestRecord",
    "Server",
    "ServerFailedToStart",
    "collect_logs",
    "load",
    "running",
    "serve",
    "stop_all",
]
