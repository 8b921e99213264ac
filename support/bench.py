"""How good are the course's instruments? ``python course.py bench`` prints the figures.

- ``serve()``: start and stop times over repeated cycles.
- ``load()`` against the ideal: N concurrent requests to an endpoint that sleeps L finish in ~L.
- ``load()`` against wrk (a C load generator in its own process) on the same in-process server,
  and against an ``httpx.AsyncClient`` loop, the client people reach for first.

Every figure is the median of several runs with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from fastapi import FastAPI

from support.loadgen import load
from support.server import Server, serve

__all__ = ["Figure", "bench_app", "httpx_rps", "ideal_walls", "load_rps", "serve_cycle_times", "wrk_rps"]


@dataclass(frozen=True)
class Figure:
    """A measured quantity: its runs, with median and range for printing."""

    name: str
    runs: Sequence[float]
    unit: str

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def __str__(self) -> str:
        lo, hi = (_fmt(v) for v in (min(self.runs), max(self.runs)))
        return f"{self.name}: {_fmt(self.median)} {self.unit} (median of {len(self.runs)}; {lo}–{hi})"


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def bench_app() -> FastAPI:
    """``/ping`` answers at once; ``/sleep?s=0.1`` awaits ``asyncio.sleep(s)``."""
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/sleep")
    async def sleep(s: float = 0.1) -> dict[str, float]:
        await asyncio.sleep(s)
        return {"slept": s}

    return app


def serve_cycle_times(cycles: int = 20) -> tuple[Figure, Figure]:
    """Start and stop a server ``cycles`` times: start and stop durations in milliseconds."""
    app = bench_app()
    starts, stops = [], []
    for _ in range(cycles):
        t = time.perf_counter()
        server = serve(app, name="bench-cycle")
        starts.append((time.perf_counter() - t) * 1000)
        httpx.get(server.url + "/ping").raise_for_status()
        t = time.perf_counter()
        server.stop()
        stops.append((time.perf_counter() - t) * 1000)
    return Figure("serve() start", starts, "ms"), Figure("server.stop()", stops, "ms")


async def ideal_walls(server: Server, runs: int = 5, n: int = 200, delay: float = 0.1) -> Figure:
    """Wall time of ``n`` concurrent requests that each sleep ``delay``, divided by ``delay``."""
    ratios = []
    for _ in range(runs):
        result = await load(server, f"/sleep?s={delay}", requests=n, concurrency=n)
        ratios.append(result.wall / delay)
    return Figure(f"load(): {n} concurrent {delay * 1000:.0f} ms requests, wall / ideal", ratios, "×")


async def load_rps(server: Server, runs: int = 3, n: int = 5000, concurrency: int = 50) -> Figure:
    values = []
    for _ in range(runs):
        values.append((await load(server, "/ping", requests=n, concurrency=concurrency)).rps)
    return Figure(f"load() on /ping, concurrency {concurrency}", values, "req/s")


async def httpx_rps(server: Server, runs: int = 3, n: int = 600, concurrency: int = 50) -> Figure:
    async def once() -> float:
        async with httpx.AsyncClient(
            base_url=server.url, limits=httpx.Limits(max_connections=concurrency)
        ) as c:
            todo = iter(range(n))

            async def worker() -> None:
                for _ in todo:
                    (await c.get("/ping")).raise_for_status()

            t = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return n / (time.perf_counter() - t)

    return Figure(
        f"httpx.AsyncClient on /ping, concurrency {concurrency}", [await once() for _ in range(runs)], "req/s"
    )


def wrk_rps(server: Server, runs: int = 3, seconds: int = 3, concurrency: int = 50) -> Figure | None:
    """wrk's requests/s on ``/ping``, or None when wrk is not installed."""
    if shutil.which("wrk") is None:
        return None
    values = []
    for _ in range(runs):
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", server.url + "/ping"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        match = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if match is None:
            raise RuntimeError(f"could not read wrk's output:\n{out}")
        values.append(float(match.group(1)))
    return Figure(f"wrk on /ping, concurrency {concurrency}", values, "req/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    args = parser.parse_args(argv)
    start, stop = serve_cycle_times(20)
    print(start, stop, sep="\n", flush=True)
    server = serve(bench_app(), name="bench")
    try:

        async def measure() -> None:
            print(await ideal_walls(server, runs=args.runs), flush=True)
            ours = await load_rps(server, runs=args.runs)
            print(ours, flush=True)
            wrk = wrk_rps(server, runs=args.runs)
            if wrk is None:
                print("wrk: not installed (Debian/Ubuntu: apt-get install wrk; macOS: brew install wrk)")
            else:
                print(wrk)
                print(f"load() / wrk: {ours.median / wrk.median:.0%} of wrk's requests/s")
            theirs = await httpx_rps(server, runs=args.runs)
            print(theirs)
            print(f"load() / httpx: {ours.median / theirs.median:.1f}×")

        asyncio.run(measure())
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
