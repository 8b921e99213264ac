"""Every notebook runs twice in one kernel, and leaves nothing running.

The second run uses the ``spawn`` start method for process pools, as macOS and Windows do (Linux's
default is ``fork``; Python 3.14 moved it to ``forkserver``): code that only works when a child
inherits the parent's memory fails there.

Lessons and solved exercises run here, and only here: a failing cell fails the test, as does anything
left running after the last cell or growing from one run to the next.
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from support import site
from support.kernels import notebook_client

pytestmark = [pytest.mark.notebooks, pytest.mark.whole_notebook]

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted([*(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "solutions").glob("*.ipynb")])
PROBE = """
import asyncio, collections, gc, json, multiprocessing, os, threading, support
gc.collect()  # an object in a reference cycle still holds its socket until the collector runs
# the kernel's own event loop keeps a thread pool for asyncio.to_thread, grown on demand up to its cap
# and reused by every run: its idle threads are not left behind by the notebook, its busy ones are
_pool = getattr(asyncio.get_running_loop(), "_default_executor", None)
_pool_threads = set(getattr(_pool, "_threads", ()))
_pool_busy = len(_pool_threads) - (_pool._idle_semaphore._value if _pool_threads else 0)
_threads = [t for t in threading.enumerate() if t not in _pool_threads]
def _fd_kinds():  # "socket", "pipe", "anon_inode", a file's path: what grew
    kinds = collections.Counter()
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            kinds[os.readlink(f"/proc/self/fd/{fd}").split(":[")[0]] += 1
        except OSError:
            pass
    return dict(kinds)
print(json.dumps({"fd_kinds": _fd_kinds(), "start": multiprocessing.get_start_method(),
                  "servers": len(support.running()), "workers": len(support.running_workers()),
                  "threads": len(_threads), "thread_names": sorted(t.name for t in _threads),
                  "pool_busy": _pool_busy,
                  "fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0}))
"""
SPAWN = 'import multiprocessing; multiprocessing.set_start_method("spawn", force=True)'
# pyzmq starts its garbage-collector thread, with 7 file descriptors, the first time the kernel sends a
# message of 64 KB or more (its copy threshold) (a big figure): started here, before the first run, so that a
# figure of the second run does not look like something the notebook left open
WARM_UP = 'print("·" * 100_000)'


def leftovers(client: NotebookClient, probe: nbformat.NotebookNode, index: int) -> dict[str, int | str]:
    probe.outputs = []
    client.execute_cell(probe, index)
    # one print can arrive as several stream outputs on a loaded machine (the JSON, then its newline)
    return json.loads("".join(o.get("text", "") for o in probe.outputs if o.get("output_type") == "stream"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_runs_twice_in_one_kernel_and_cleans_up(path: Path, tmp_path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    lesson = list(nb.cells)
    probe = nbformat.v4.new_code_cell(PROBE)
    spawn = nbformat.v4.new_code_cell(SPAWN)
    warm_up = nbformat.v4.new_code_cell(WARM_UP)
    nb.cells += [probe, spawn, warm_up]
    stack = contextlib.ExitStack()

    def start() -> NotebookClient:
        client = notebook_client(nb, timeout=300, resources={"metadata": {"path": str(path.parent)}})
        stack.enter_context(client.setup_kernel())
        return client

    after = []
    with stack:
        client = site.started_twice(start)
        client.execute_cell(warm_up, len(lesson) + 2)
        for run in range(2):
            if run == 1:
                client.execute_cell(spawn, len(lesson) + 1)
            for index, cell in enumerate(lesson):
                client.execute_cell(cell, index)  # raises CellExecutionError on the first failing cell
            after.append(leftovers(client, probe, len(lesson)))
            if run == 0:
                first_run = copy.deepcopy(nb)
                first_run.cells = first_run.cells[: len(lesson)]
    first, second = after
    assert second["start"] == "spawn", "the second run uses spawn, as macOS and Windows do"
    assert first["servers"] == second["servers"] == 0, "the last cell must stop every server"
    assert first["workers"] == second["workers"] == 0, "the last cell must stop every worker"
    assert second["threads"] <= first["threads"], f"threads grew from one run to the next: {after}"
    assert second["pool_busy"] <= first["pool_busy"], (
        f"a to_thread job of the first run never returned: {after}"
    )
    assert second["fds"] <= first["fds"] + 2, f"file descriptors grew from one run to the next: {after}"
    check_site_page(first_run, path, tmp_path)


def check_site_page(executed: nbformat.NotebookNode, path: Path, out: Path) -> None:
    """The site's page for this notebook, from the first run: no error output, and a lesson's plots."""
    all_pages = site.pages(ROOT)
    (page,) = [p for p in all_pages if p.source == path]
    written = site.write_page(executed, page, out, all_pages)  # raises on error output
    text = written.read_text()
    if page.kind == "lesson":
        assert site.figures(executed) >= 1 and "data:image/png" in text, "a lesson page shows its plots"
    assert 'href="../index.html"' in text, "the course bar links back to the front page"
    assert not re.search(r'href="[^":#]+\.ipynb', text), "links to notebooks point at their pages"
