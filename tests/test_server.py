"""support.serve: life cycle, replacement, leaks, quiet logs, failures, and its timing targets."""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import threading
import time
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI, Request

import support
from support.bench import serve_cycle_times
from tests.apps import make_app


def open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def test_serves_on_loopback_and_stops(server: support.Server) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert httpx.get(server.url + "/ping").json() == {"ok": True}
    server.stop()
    assert not server.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/ping")


def test_context_manager_stops_on_exit() -> None:
    with support.serve(make_app(), name="cm") as server:
        assert httpx.get(server.url + "/ping").status_code == 200
    assert not server.running
    assert support.running() == []


def test_same_key_replaces_the_old_server() -> None:
    first = support.serve(make_app(), name="same")
    second = support.serve(make_app(), name="same")
    assert not first.running and second.running
    assert support.running() == [second]


def test_default_key_is_the_calling_line() -> None:
    servers = [support.serve(make_app()) for _ in range(3)]  # one line: like re-running one cell
    assert [s.running for s in servers] == [False, False, True]
    other = support.serve(make_app())  # another line: another server
    assert servers[-1].running and other.running


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts file descriptors through /proc")
def test_twenty_cycles_leak_no_threads_or_sockets() -> None:
    serve_cycle_times(1)  # warm-up: first-use imports may open files for good
    threads, fds = threading.active_count(), open_fds()
    serve_cycle_times(20)
    assert threading.active_count() == threads
    assert open_fds() == fds


@pytest.mark.performance
def test_start_and_stop_meet_their_targets() -> None:
    start, stop = serve_cycle_times(10)
    # Targets: start ≤ 50 ms and stop ≤ 250 ms (median, `python course.py bench` prints them);
    # asserted at 5× the targets so that a loaded machine cannot fail it, only a lost wake-up (stop
    # then waits for uvicorn's polling) or a start that waits on something it should not.
    assert start.median < 250, start
    assert stop.median < 1250, stop


def test_nothing_is_printed_and_errors_are_kept(
    server: support.Server, capfd: pytest.CaptureFixture[str]
) -> None:
    assert httpx.get(server.url + "/boom").status_code == 500
    time.sleep(0.05)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert any("boom from the app" in line for line in server.errors)
    assert isinstance(server.exceptions[-1], RuntimeError)


def test_log_true_echoes_the_access_log(capfd: pytest.CaptureFixture[str]) -> None:
    with support.serve(make_app(), name="loud", log=True) as server:
        httpx.get(server.url + "/ping")
        time.sleep(0.05)
    assert "GET /ping" in capfd.readouterr().err


def test_failing_lifespan_raises_a_clear_error() -> None:
    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        raise ValueError("DATABASE_URL is not set")
        yield

    threads = threading.active_count()
    with pytest.raises(support.ServerFailedToStart, match="ValueError: DATABASE_URL is not set"):
        support.serve(FastAPI(lifespan=lifespan), name="bad")
    assert threading.active_count() == threads
    assert support.running() == []


def test_stop_waits_for_a_request_in_flight() -> None:
    app = FastAPI()
    started = threading.Event()

    @app.get("/slow")
    async def slow() -> dict[str, bool]:
        started.set()
        await asyncio.sleep(0.3)
        return {"done": True}

    server = support.serve(app, name="t-in-flight")
    results: list[int] = []
    client = threading.Thread(target=lambda: results.append(httpx.get(server.url + "/slow").status_code))
    client.start()
    assert started.wait(10), "the request never reached the app"
    server.stop()  # while the handler sleeps
    client.join()
    assert results == [200]


@pytest.mark.parametrize("loop", ["asyncio", "auto"])
def test_keep_alive_requests_are_not_delayed_by_nagle(loop: str) -> None:
    """Without IPPROTO_TCP on the listening socket, asyncio's loop left keep-alive requests at ~44 ms."""
    with (
        support.serve(make_app(), name="nagle", loop=loop) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        client.get("/ping")
        times = []
        for _ in range(20):
            t = time.perf_counter()
            client.post("/echo", json={"x": "y" * 2000})
            times.append(time.perf_counter() - t)
    # Nagle meeting delayed ACKs delays every request by ~40 ms; the lower quartile is immune to a
    # few requests slowed by a busy machine.
    quartile = sorted(times)[len(times) // 4]
    assert quartile < 0.02, f"lower quartile {quartile * 1000:.1f} ms"


def test_wait_for_exception_returns_what_the_app_raised(server: support.Server) -> None:
    assert server.wait_for_exception(timeout=0.05) is None
    assert httpx.get(server.url + "/boom").status_code == 500
    error = server.wait_for_exception()
    assert isinstance(error, RuntimeError) and str(error) == "boom from the app"


def _raw_status(server: support.Server, header_value: bytes) -> int:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Client: "
            + header_value
            + b"\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def test_http_chooses_the_parser_and_the_parsers_differ_on_control_characters() -> None:
    """Chapter 3 relies on this: httptools refuses an ESC in a header value, h11 passes it on."""
    with support.serve(make_app(), name="t-httptools") as default:
        assert _raw_status(default, b"abc\x1b[31m") == 400
        assert _raw_status(default, b"a" * 100_000) == 200  # no length limit
    with support.serve(make_app(), name="t-h11", http="h11") as h11:
        assert _raw_status(h11, b"abc\x1b[31m") == 200


def test_the_app_sees_the_real_peer_unless_proxy_headers_are_asked_for() -> None:
    """uvicorn's default trusts 127.0.0.1's X-Forwarded-For; serve() does not, unless told to."""
    app = FastAPI()

    @app.get("/peer")
    async def peer(request: Request) -> dict[str, str]:
        return {"host": request.client.host if request.client else ""}

    forged = {"X-Forwarded-For": "203.0.113.9"}
    with support.serve(app, name="t-peer") as plain:
        assert httpx.get(f"{plain.url}/peer", headers=forged).json() == {"host": "127.0.0.1"}
    with support.serve(app, name="t-peer-proxied", proxy_headers=True) as proxied:
        assert httpx.get(f"{proxied.url}/peer", headers=forged).json() == {"host": "203.0.113.9"}


def _second_request_after(server: support.Server, idle: float) -> int | None:
    """Two GET /ping on one keep-alive connection, ``idle`` s apart: the second's status (None: closed)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request("GET", "/ping")
        connection.getresponse().read()
        time.sleep(idle)
        try:
            connection.request("GET", "/ping")  # http.client does not retry on a new connection
            return connection.getresponse().status
        except (ConnectionError, http.client.RemoteDisconnected):
            return None
    finally:
        connection.close()


def test_the_keep_alive_timeout_outlasts_a_starved_load_generator(monkeypatch) -> None:
    """uvicorn's own 5 s: a starved run's requests once met connections its timer was closing."""
    assert support.server.KEEP_ALIVE_TIMEOUT >= 30
    monkeypatch.setattr(support.server, "KEEP_ALIVE_TIMEOUT", 0.1)  # the setting reaches uvicorn
    with support.serve(make_app(), name="keep-alive") as server:
        assert _second_request_after(server, 0.6) is None, "the server closed the idle connection"
