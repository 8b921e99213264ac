"""The objectives report: what a scenario run measured, against what the shop promises.

    run = await run_scenario(system)
    report(run)            # a table in the notebook; report(run).plot() draws p99 per route

Why each threshold is where it is: measured on the course's 2-core machine, ``seconds=4``; "healthy"
is six runs (``faults=[]``, and seed 0 with every fault fixed), each fault three runs alone; median
[range], milliseconds unless said:

    objective                     target       healthy              the fault meant to break it
    GET /products/{id} p50        ≤ 100 ms     8 [8–10]             ch3-export-on-request-path 455 [452–471]
    GET /products/{id} p99        ≤ 1000 ms    112 [95–137]         -
    PUT /products/{id}/price p50  ≤ 100 ms     15 [14–19]           ch4-session-held 545 [521–548]
    PUT /products/{id}/price p99  ≤ 800 ms     25 [20–28]           -
    POST /orders p50              ≤ 1000 ms    511 [511–516]        -
    POST /orders p99              ≤ 2000 ms    533 [526–589]        -
    GET /orders p50               ≤ 100 ms     21 [19–23]           ch4-n-plus-one 269 [252–315]
    GET /orders p99               ≤ 1000 ms    38 [27–52]           -
    GET /quote/{id} p50           ≤ 300 ms     143 [140–145]        -
    GET /quote/{id} p99           ≤ 1000 ms    159 [156–166]        -
    errors                        ≤ 1 %        0.0 [0.0–0.0]        -
    jobs lost                     ≤ 0          0 [0–0]              ch2-swallowed-failure 4 [4–4]
                                                                    ch2-no-retries 4 [4–4]
    jobs traceable                ≥ 95 %       100.0 [100.0–100.0]  ch2-no-request-id 0.0 [0.0–0.0]
    logs correlated               ≥ 95 %       100.0 [100.0–100.0]  ch3-request-id-dropped 0.0 [0.0–0.0]
    stale reads                   ≤ 5 %        0.0 [0.0–0.0]        ch5-no-invalidation 50.0 [46.6–50.0]
    wrong-currency reads          ≤ 0          0 [0–0]              ch5-key-without-currency 36 [27–37]
    heavy client admitted         ≤ 1 × limit  1.00 [0.96–1.00]     ch6-per-process-limiter 2.00 [2.00–2.00]
    spoofing client admitted      ≤ 1 × limit  0.92 [0.88–1.00]     ch6-spoofable-key 2.00 [2.00–2.00]
    gateway loop lag p99          ≤ 50 ms      5 [4–7]              -
    orders loop lag p99           ≤ 60 ms      3 [2–4]              ch1-blocking-sdk 122 [122–124]

Where an objective can be a count of a mechanism (jobs lost, log lines that lost their request ID,
wrong-currency reads, requests admitted beyond the limit) it is one: counts do not depend on how fast
the machine is. A client's bound is its limit times the windows its requests touched, so a
shared, atomic counter can never pass it. Stale reads are the exception, a count of a race: a read that
missed just before a price change can put the old price back in the cache after the change deleted it
(invalidate-on-write narrows the window, the TTL bounds what slips through: chapter 5), and the page
stays stale until the next change. The pricing tool starts after the cache is warm; healthy runs served
none at rest (6 runs) nor beside three CPU-bound processes (6 runs, 87–119 pages each), but one in the
full test suite served 2 of about 120 (1.7 %). So the objective allows 5 %, nine times below the fault
that breaks it, and a check that sees only it fail runs the scenario again, as for a latency.

Latency objectives are set for a busy machine, not a quiet one. The table's runs had the machine to
themselves (load average 1–2); with two CPU-bound processes beside the kernel (as under the test
suite's parallel workers) two healthy runs still met every objective: product pages p50 14–24 ms and
p99 182–231, price changes p50 24–28, account pages p50 34–41 and p99 158–200, quotes p99 262–265,
loop lag p99 11–20. Earlier runs of a burstier traffic shape (with two such processes, or at load
average 2.5–4.5) reached product pages p50 49 and p99 517, price changes p50 41, account pages p50 68,
loop lag p99 38. So an objective a fault is meant to break sits 1.5–2.4× above the worst healthy value
seen on any busy machine and 2–5× below that fault's best: product pages p50 100 (49 / 452), price
changes p50 100 (41 / 521), account pages p50 100 (68 / 252), orders loop lag 60 (38 / 122). The
others sit about 2× above the worst busy value (a p99 of ~170 requests is the second-slowest request:
the machine's hiccups land there). The loop lag is the heartbeat's p99, not its worst: one sample is
hostage to the machine (the OS descheduling the process), 1 % are not.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from support.incident.scenario import ROUTES, ScenarioRun, Sent
from support.loadgen import LoadResult

__all__ = ["THRESHOLDS", "Objective", "Report", "report"]

# objective key: (threshold, "max" or "min", unit, what it promises)
THRESHOLDS: dict[str, tuple[float, str, str, str]] = {
    "GET /products/{id} p50": (100.0, "max", "ms", "half of the product pages within 100 ms"),
    "GET /products/{id} p99": (1000.0, "max", "ms", "99 % of the product pages within 1 s"),
    "PUT /products/{id}/price p50": (100.0, "max", "ms", "half of the price changes within 100 ms"),
    "PUT /products/{id}/price p99": (800.0, "max", "ms", "99 % of the price changes within 800 ms"),
    "POST /orders p50": (1000.0, "max", "ms", "half of the orders within 1 s (a 500 ms payment call)"),
    "POST /orders p99": (2000.0, "max", "ms", "99 % of the orders within 2 s"),
    "GET /orders p50": (100.0, "max", "ms", "half of the account pages within 100 ms"),
    "GET /orders p99": (1000.0, "max", "ms", "99 % of the account pages within 1 s"),
    "GET /quote/{id} p50": (300.0, "max", "ms", "half of the quotes within 300 ms (a 130 ms vendor call)"),
    "GET /quote/{id} p99": (1000.0, "max", "ms", "99 % of the shipping quotes within 1 s"),
    "errors": (1.0, "max", "%", "at most 1 % of the admitted requests fail (5xx or no answer)"),
    "jobs lost": (0, "max", "", "every order's confirmation is sent (within 10 s of the traffic's end)"),
    "jobs traceable": (95.0, "min", "%", "the worker's lines name the request that placed the order"),
    "logs correlated": (95.0, "min", "%", "the orders service's lines carry the gateway's request ID"),
    "stale reads": (
        5.0,
        "max",
        "%",
        "at most 5 % of the product pages show a price older than the last change",
    ),
    "wrong-currency reads": (0, "max", "", "no product page in another currency than asked"),
    "heavy client admitted": (
        1.0,
        "max",
        "× limit",
        "a client gets at most its limit per window through (counted over the windows it used)",
    ),
    "spoofing client admitted": (1.0, "max", "× limit", "an anonymous client gets at most its limit through"),
    "gateway loop lag p99": (50.0, "max", "ms", "the gateways' loops wake within 50 ms, 99 % of the time"),
    "orders loop lag p99": (
        60.0,
        "max",
        "ms",
        "the orders service's loop wakes within 60 ms, 99 % of the time",
    ),
}


@dataclass(frozen=True)
class Objective:
    """One objective: what it promises, what was measured, whether it held."""

    key: str
    promise: str
    measured: float
    threshold: float
    direction: str  # "max": measured must be ≤ threshold; "min": ≥
    unit: str
    detail: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.measured):
            return False
        return self.measured <= self.threshold if self.direction == "max" else self.measured >= self.threshold

    def _format(self, value: float) -> str:
        if math.isnan(value):
            return "n/a"
        if self.unit == "ms":
            return f"{value:.0f} ms"
        if self.unit == "%":
            return f"{value:.1f} %"
        if self.unit == "× limit":
            return f"{value:.2f} × limit"
        return f"{value:.0f}"

    @property
    def measured_text(self) -> str:
        return self._format(self.measured)

    @property
    def target_text(self) -> str:
        return ("≤ " if self.direction == "max" else "≥ ") + self._format(self.threshold)

    def __str__(self) -> str:
        mark = "✅" if self.passed else "❌"
        return (
            f"{mark} {self.key}: {self.measured_text} (objective {self.target_text}) {self.detail}".rstrip()
        )


class Report:
    """The objectives of one run; ``passed`` when all hold. Renders as a table; ``plot()`` draws p99s."""

    def __init__(self, objectives: list[Objective], run: ScenarioRun) -> None:
        self.objectives = objectives
        self.run = run
        self._by_key = {o.key: o for o in objectives}

    def __getitem__(self, key: str) -> Objective:
        try:
            return self._by_key[key]
        except KeyError:
            raise KeyError(f"no objective {key!r}; the objectives are: {', '.join(self._by_key)}") from None

    def __iter__(self) -> Iterator[Objective]:
        return iter(self.objectives)

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.objectives)

    def failed(self) -> list[Objective]:
        """The objectives that did not hold."""
        return [o for o in self.objectives if not o.passed]

    def summary(self) -> dict[str, float]:
        """Objective key → measured value."""
        return {o.key: o.measured for o in self.objectives}

    def __str__(self) -> str:
        width = max(len(o.key) for o in self.objectives)
        head = f"{'':10} {'objective':{width}}  {'measured':>14}  {'target':>16}  detail"
        lines = [self._headline(), head]
        for o in self.objectives:
            mark = "✅ met   " if o.passed else "❌ failed"
            lines.append(f"{mark} {o.key:{width}}  {o.measured_text:>14}  {o.target_text:>16}  {o.detail}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"<Report {len(self.objectives) - len(self.failed())} of {len(self.objectives)} objectives met>"
        )

    def _headline(self) -> str:
        run = self.run
        failed = len(self.failed())
        verdict = (
            "all objectives met" if not failed else f"{failed} of {len(self.objectives)} objectives failed"
        )
        return f"{len(run.requests)} requests in {run.traffic_wall:.1f} s: {verdict}"

    def _repr_html_(self) -> str:
        rows = []
        for o in self.objectives:
            colour = "#e6f4ea" if o.passed else "#fce8e6"
            cells = [
                "✅ met" if o.passed else "❌ failed",  # words too: not every browser has an emoji font
                html.escape(o.key),
                html.escape(o.measured_text),
                html.escape(o.target_text),
                html.escape(o.detail),
            ]
            rows.append(
                f'<tr style="background:{colour}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
            )
        head = "".join(f"<th>{h}</th>" for h in ("", "objective", "measured", "target", "detail"))
        return f"<b>{html.escape(self._headline())}</b><table><tr>{head}</tr>{''.join(rows)}</table>"

    def plot(self, ax: Any = None, *, title: str | None = None) -> Any:
        """p99 latency per route (bars) against its objective (a tick); failing routes in red."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(8, 3.2), constrained_layout=True)
        routes = [r for r in ROUTES if f"{r} p99" in self._by_key]
        values = [self[f"{r} p99"].measured for r in routes]
        targets = [self[f"{r} p99"].threshold for r in routes]
        colours = ["tab:blue" if self[f"{r} p99"].passed else "tab:red" for r in routes]
        positions = range(len(routes))
        ax.barh(positions, values, color=colours, height=0.6, label="p99 measured")
        ax.scatter(targets, positions, marker="|", s=600, color="black", zorder=3, label="objective")
        ax.set_yticks(list(positions), routes)
        ax.invert_yaxis()
        ax.set_xlabel("p99 latency (ms)")
        ax.set_title(title or self._headline())
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        return ax


def _ms(seconds: float) -> float:
    return seconds * 1000


def _windows(run: ScenarioRun, sent: list[Sent]) -> int:
    """How many rate-limit windows the requests' lifetimes touch (the server decides within them)."""
    if not sent:
        return 0
    window = run.settings.rate_window
    first = math.floor((run.t0 + run.clock_offset + min(r.start for r in sent)) / window)
    last = math.floor((run.t0 + run.clock_offset + max(r.end for r in sent)) / window)
    return last - first + 1


def _admitted(run: ScenarioRun, client: str) -> tuple[float, str]:
    sent = [r for r in run.requests if r.client == client]
    admitted = sum(r.status != 429 and r.status != 0 for r in sent)
    limit, windows = run.settings.rate_limit, _windows(run, sent)
    bound = limit * windows
    ratio = admitted / bound if bound else math.nan
    return ratio, f"{admitted} of {len(sent)} admitted; limit {limit}/window × {windows} windows = {bound}"


def _stale_reads(run: ScenarioRun) -> tuple[int, int]:
    """(stale reads, product reads judged): a read is stale if it returns a price older than a change
    whose answer came back before the read was sent."""
    writes: dict[int, list[tuple[float, int]]] = {}
    for r in run.requests:
        if r.call.route == "PUT /products/{id}/price" and r.status == 200 and r.call.product_id is not None:
            writes.setdefault(r.call.product_id, []).append((r.end, r.call.price_cents or 0))
    stale = judged = 0
    for r in run.requests:
        if r.call.route != "GET /products/{id}" or r.status != 200:
            continue
        body = r.json()
        if not isinstance(body, dict) or "price_cents" not in body:
            continue
        judged += 1
        committed = [price for end, price in writes.get(r.call.product_id or -1, []) if end < r.start]
        if committed and body["price_cents"] < max(committed):
            stale += 1
    return stale, judged


def _wrong_currency(run: ScenarioRun) -> tuple[int, int]:
    wrong = judged = 0
    for r in run.requests:
        if r.call.route != "GET /products/{id}" or r.status != 200 or r.call.currency is None:
            continue
        body = r.json()
        if isinstance(body, dict) and "currency" in body:
            judged += 1
            wrong += body["currency"] != r.call.currency
    return wrong, judged


def _lag(run: ScenarioRun, services: tuple[str, ...]) -> tuple[float, float]:
    """(p99, worst) lag in ms over the services' heartbeats."""
    lags = sorted(lag for s in services for _, lag in run.loop_lag.get(s, []))
    if not lags:
        return math.nan, math.nan
    rank = max(1, math.ceil(0.99 * len(lags)))
    return _ms(lags[rank - 1]), _ms(lags[-1])


def measure(run: ScenarioRun) -> dict[str, tuple[float, str]]:
    """Every objective's measured value (in the objective's unit) and a detail line."""
    values: dict[str, tuple[float, str]] = {}
    routes: dict[str, LoadResult] = run.by_route()
    for route in ROUTES:
        result = routes.get(route)
        if result is None or not result.records:
            p50 = p99 = math.nan
            detail = "no requests"
        else:
            p50, p99 = _ms(result.p50), _ms(result.p99)
            detail = f"{len(result.records)} requests, p50 {p50:.0f} ms, max {_ms(result.max):.0f} ms"
        if f"{route} p50" in THRESHOLDS:
            values[f"{route} p50"] = (p50, f"{len(result.records) if result else 0} requests")
        values[f"{route} p99"] = (p99, detail)

    admitted = [r for r in run.requests if r.status != 429]
    failed = [r for r in admitted if r.status == 0 or r.status >= 500]
    statuses: dict[int, int] = {}
    for r in failed:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    shown = ", ".join(f"{n}×{'no answer' if s == 0 else s}" for s, n in sorted(statuses.items())) or "none"
    values["errors"] = (
        100 * len(failed) / len(admitted) if admitted else math.nan,
        f"{len(failed)} of {len(admitted)}: {shown}",
    )

    placed = {}
    for r in run.requests:
        if r.call.route == "POST /orders" and r.status == 201:
            body = r.json()
            if isinstance(body, dict) and "order_id" in body:
                placed[body["order_id"]] = r
    lost = len(set(placed) - run.emails_sent)
    jobs = run.jobs
    values["jobs lost"] = (
        lost,
        f"{len(placed)} orders, {len(set(placed) & run.emails_sent)} emails sent; queue: "
        + ", ".join(f"{jobs[k]} {k}" for k in ("enqueued", "done", "retried", "failed")),
    )

    placing = {
        line.fields["order_id"]: line.request_id
        for line in run.logs
        if line.service == "orders" and line.message == "order placed" and "order_id" in line.fields
    }
    worker_lines = [line for line in run.logs if line.service == "worker" and "order_id" in line.fields]
    orders_seen = {line.fields["order_id"] for line in worker_lines}
    traced = {
        line.fields["order_id"]
        for line in worker_lines
        if line.request_id != "-" and placing.get(line.fields["order_id"]) == line.request_id
    }
    values["jobs traceable"] = (
        100 * len(traced) / len(orders_seen) if orders_seen else math.nan,
        f"{len(traced)} of {len(orders_seen)} jobs' lines name their order's request",
    )

    gateway_ids = {line.request_id for line in run.logs if line.service.startswith("gateway")}
    orders_lines = [line for line in run.logs if line.service == "orders" and line.request_id != "-"]
    correlated = sum(line.request_id in gateway_ids for line in orders_lines)
    values["logs correlated"] = (
        100 * correlated / len(orders_lines) if orders_lines else math.nan,
        f"{correlated} of {len(orders_lines)} orders lines carry a gateway request ID",
    )

    stale, judged = _stale_reads(run)
    values["stale reads"] = (
        100 * stale / judged if judged else math.nan,
        f"{stale} of {judged} product pages",
    )
    wrong, judged = _wrong_currency(run)
    values["wrong-currency reads"] = (wrong, f"{wrong} of {judged} product pages")

    values["heavy client admitted"] = _admitted(run, "heavy")
    values["spoofing client admitted"] = _admitted(run, "spoofer")

    for key, services in (
        ("gateway loop lag p99", ("gateway-a", "gateway-b")),
        ("orders loop lag p99", ("orders",)),
    ):
        p99, worst = _lag(run, services)
        values[key] = (p99, f"worst {worst:.0f} ms")
    return values


def report(run: ScenarioRun, thresholds: dict[str, tuple[float, str, str, str]] | None = None) -> Report:
    """The objectives report of ``run``: each objective passed or failed, with the measured value."""
    limits = thresholds or THRESHOLDS
    values = measure(run)
    objectives = []
    for key, (threshold, direction, unit, promise) in limits.items():
        measured, detail = values[key]
        objectives.append(Objective(key, promise, float(measured), threshold, direction, unit, detail))
    return Report(objectives, run)
