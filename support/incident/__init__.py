"""Chapter 7, the 2 a.m. incident: a small shop, with faults from the six chapters planted in it.

    from support.incident import start_system, run_scenario, report

    system = start_system(seed=0)          # two gateways, an orders service, a database, Redis, a worker
    run = await run_scenario(system)       # ~4 s of traffic: reads, writes, orders, a heavy client, a burst
    report(run)                            # the objectives, passed or failed, with what was measured
    print(system.seam_source("orders.get_product"))          # read the code of a seam
    system = start_system(seed=0, overrides={"orders.get_product": my_get_product})   # try a fix

The system's code is a set of named, replaceable functions, the *seams* (``SEAMS``; each takes its
service's context as first argument, see ``support.incident.context``). A seed plants five faults from
a pool of twelve (``plan(seed)``), one each from five chapters; the learner finds them with the
course's instruments, all on ``System`` (``traces()``, ``pool``, ``cache``, ``jobs``, ``emails``,
``collector``, ``logs()``, ``loop_lag()``) and on the report (per-route percentiles), and fixes each by
overriding its seam. Which faults a system has is on ``System.answer_key()``: for instructors and checks.

Layout: ``system`` (start/stop, instruments), ``gateway`` and ``orders`` and ``worker`` (the services),
``seams`` (the seam table), ``healthy`` and ``faulty`` (the seams' versions), ``faults`` (the pool and
the plan), ``scenario`` (the traffic), ``report`` (the objectives), ``instruments``, ``vendor`` (the
third parties), ``model`` (the tables), ``context`` (what a seam receives).
"""

from support.incident.context import (
    Decision,
    GatewayContext,
    OrdersContext,
    Settings,
    WorkerContext,
)
from support.incident.faults import POOL, Fault, fault, plan
from support.incident.findings import INSTRUMENTS, Finding, describe_instruments
from support.incident.report import THRESHOLDS, Objective, Report, report
from support.incident.scenario import ROUTES, ScenarioRun, run_scenario
from support.incident.seams import SEAMS, Seam
from support.incident.system import System, running_system, start_system

__all__ = [
    "INSTRUMENTS",
    "POOL",
    "ROUTES",
    "SEAMS",
    "THRESHOLDS",
    "Decision",
    "Fault",
    "Finding",
    "GatewayContext",
    "Objective",
    "OrdersContext",
    "Report",
    "ScenarioRun",
    "Seam",
    "Settings",
    "System",
    "WorkerContext",
    "describe_instruments",
    "fault",
    "plan",
    "report",
    "run_scenario",
    "running_system",
    "start_system",
]
