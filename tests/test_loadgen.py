"""support.load, the course's measuring instrument: correct records, and it does not add latency."""

from __future__ import annotations

import asyncio
import itertools
import shutil
import statistics

import pytest

import support
from support.bench import httpx_rps, load_rps, wrk_rps


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_records_one_entry_per_request(server: support.Server) -> None:
    result = run(support.load(server, "/ping", requests=30, concurrency=5))
    assert len(result.records) == len(result.latencies) == 30
    assert [r.index for r in result.records] == list(range(30))
    assert result.statuses == {200: 30} and result.ok == 30
    assert all(0 <= r.start <= r.end <= result.wall for r in result.records)


def test_latency_matches_an_endpoint_of_known_delay(server: support.Server) -> None:
    result = run(support.load(server, "/sleep?s=0.05", requests=10, concurrency=1))
    # a 50 ms sleep under uvloop was seen ending at 49.86 ms (its clock is cached per loop turn)
    assert min(result.latencies) >= 0.048
    assert result.p50 < 10 * 0.05  # generous: the instrument's overhead is measured by the bench tests
    # concurrency 1: each request starts only after the one before it ended
    assert all(a.end <= b.start for a, b in itertools.pairwise(result.records))
    assert result.wall >= sum(result.latencies) >= 0.48


def test_a_blocked_server_shows_a_staircase(server: support.Server) -> None:
    """Ten concurrent requests to a handler that blocks the loop 50 ms finish one after another."""
    result = run(support.load(server, "/block?s=0.05", requests=10, concurrency=10))
    ends = sorted(result.ends)
    gaps = [b - a for a, b in itertools.pairwise(ends)]
    assert result.wall >= 0.45
    assert statistics.median(gaps) >= 0.04


def test_concurrent_requests_are_all_in_flight_at_once(server: support.Server) -> None:
    """200 requests at concurrency 200: every one is sent before any answer comes back.

    That is the mechanism behind "N concurrent requests of latency L finish in about L"; how close to
    L (1.38× the ideal, median of 5 on 2 cores) is `python course.py bench`'s figure, since a loaded
    machine moves it.
    """
    result = run(support.load(server, "/sleep?s=0.5", requests=200, concurrency=200))
    assert result.ok == 200
    assert max(result.starts) < min(result.ends), "some requests waited for others to finish"
    assert result.wall < 10 * 0.5


@pytest.mark.performance
def test_it_is_much_faster_than_an_httpx_loop(server: support.Server) -> None:
    ours = run(load_rps(server, runs=3, n=2000))
    theirs = run(httpx_rps(server, runs=1, n=300))
    assert ours.median > 4 * theirs.median, (ours, theirs)


@pytest.mark.performance
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_it_reaches_a_good_share_of_wrk(server: support.Server) -> None:
    """Target ≥ 40 % of wrk's requests/s on the same in-process server (reached on a quiet machine);
    asserted at 15 %, which an httpx loop (~5 %) cannot reach. On a busy machine the in-process client
    loses more than wrk (it shares the process, and so the GIL, with the server; wrk is a C program of
    its own): 19 % was seen with the suite on eight workers. So the two take turns, three rounds, and
    the best round of each is compared: the machine's bursts do not land on one side only."""
    ours, wrk = [], []
    for _ in range(3):
        ours += run(load_rps(server, runs=1, n=3000)).runs
        theirs = wrk_rps(server, runs=1, seconds=2)
        assert theirs is not None
        wrk += theirs.runs
    assert max(ours) >= 0.15 * max(wrk), (ours, wrk)


def test_statuses_and_errors_are_counted(server: support.Server) -> None:
    result = run(
        support.load(server, lambda i: f"/status/{404 if i % 2 else 503}", requests=10, concurrency=2)
    )
    assert result.statuses == {404: 5, 503: 5}
    assert result.ok == 0


def test_a_timeout_is_recorded_not_raised(server: support.Server) -> None:
    result = run(support.load(server, "/sleep?s=1", requests=2, concurrency=2, timeout=0.1))
    assert result.statuses == {0: 2}
    assert "no response within 0.1 s" in next(iter(result.errors))


def test_connection_close_responses_reconnect(server: support.Server) -> None:
    result = run(support.load(server, "/close", requests=20, concurrency=2))
    assert result.statuses == {200: 20}


def test_json_body_headers_and_bodies(server: support.Server) -> None:
    result = run(support.load(server, "/echo", method="POST", json={"a": 1}, requests=3, keep_bodies=True))
    assert {r.body for r in result.records} == {b'{"a":1}'}
    result = run(
        support.load(
            server, "/headers", headers=lambda i: {"X-Client": f"c{i}"}, requests=3, keep_bodies=True
        )
    )
    assert [r.body for r in result.records] == [b'{"client":"c0"}', b'{"client":"c1"}', b'{"client":"c2"}']


def test_interval_paces_requests(server: support.Server) -> None:
    result = run(support.load(server, "/ping", requests=11, concurrency=1, interval=0.02))
    assert result.wall >= 0.2
    starts = result.starts
    assert min(b - a for a, b in itertools.pairwise(starts)) >= 0.015


def test_a_stopped_server_gives_a_clear_error(server: support.Server) -> None:
    server.stop()
    with pytest.raises(ConnectionError, match="is the server running"):
        run(support.load(server, "/ping"))


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="http:// URL or a server handle"):
        run(support.load("localhost:8000", "/"))
    with pytest.raises(ValueError, match="at least 1"):
        run(support.load("http://127.0.0.1:9", "/", requests=0))
    with pytest.raises(ValueError, match="does not send HEAD"):
        run(support.load("http://127.0.0.1:9", "/", method="head"))


def test_summary_and_display(server: support.Server) -> None:
    result = run(support.load(server, "/ping", requests=20, concurrency=4, label="ping"))
    summary = result.summary()
    assert summary["requests"] == 20 and summary["statuses"] == {200: 20}
    assert summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert str(result).startswith("ping: 20 requests at concurrency 4")
    assert "<table>" in result._repr_html_() and "20×200" in result._repr_html_()


def test_percentiles_are_nearest_rank() -> None:
    records = [support.RequestRecord(i, 0.0, (i + 1) / 100, 200) for i in range(100)]
    result = support.LoadResult("x", 1, 1.0, records)
    assert result.p50 == pytest.approx(0.50)
    assert result.p99 == pytest.approx(0.99)
    assert result.max == pytest.approx(1.0)


def test_progress_line_is_plain_text_and_ends_as_a_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shown raw (no string quotes), updated in place, and left as a summary rather than an empty output."""
    import IPython.display

    from support.loadgen import _Progress

    shown: list[tuple[str, dict, dict]] = []

    class Handle:
        def update(self, obj: dict, **options: object) -> None:
            shown.append(("update", obj, options))

    def fake_display(obj: dict, **options: object) -> Handle:
        shown.append(("display", obj, options))
        return Handle()

    monkeypatch.setattr(IPython.display, "display", fake_display)
    progress = _Progress("blocking call", 40)
    progress.enabled = True
    progress.update(3, 0.5)  # under a second: nothing shown
    progress.update(14, 1.5)
    progress.update(30, 2.0)
    progress.close(40, 2.4)
    assert [kind for kind, _, _ in shown] == ["display", "update", "update"]
    assert all(options.get("raw") is True for _, _, options in shown)
    assert shown[0][1] == {"text/plain": "blocking call: 14/40 requests · 1.5 s"}
    assert shown[-1][1] == {"text/plain": "blocking call: 40 requests in 2.4 s"}
