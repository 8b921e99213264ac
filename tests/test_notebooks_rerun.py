"""Every notebook runs twice in one kernel, and leaves nothing running.

The second run uses the ``spawn`` start method for process pools, as macOS and Windows do (Linux's
default is ``fork``; Python 3.14 moved it to ``forkserver``): code that only works when a child
inherits the parent's memory fails there.

Lessons and solved exercises run here, and only here: a failing cell fails the test, as does anything
left running after the last cell or growing from one run to the next.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.notebooks

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted([*(ROOT / "notebooks").glob("*.ipynb"), *(ROOT / "solutions").glob("*.ipynb")])
PROBE = """
import json, multiprocessing, os, threading, support
print(json.dumps({"start": multiprocessing.get_start_method(),
                  "servers": len(support.running()), "workers": len(support.running_workers()),
                  "threads": threading.active_count(),
                  "fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0}))
"""
SPAWN = 'import multiprocessing; multiprocessing.set_start_method("spawn", force=True)'


def leftovers(client: NotebookClient, probe: nbformat.NotebookNode, index: int) -> dict[str, int | str]:
    probe.outputs = []
    client.execute_cell(probe, index)
    return json.loads(probe.outputs[-1]["text"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_runs_twice_in_one_kernel_and_cleans_up(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    lesson = list(nb.cells)
    probe = nbformat.v4.new_code_cell(PROBE)
    spawn = nbformat.v4.new_code_cell(SPAWN)
    nb.cells += [probe, spawn]
    client = NotebookClient(
        nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(path.parent)}}
    )
    after = []
    with client.setup_kernel():
        for run in range(2):
            if run == 1:
                client.execute_cell(spawn, len(lesson) + 1)
            for index, cell in enumerate(lesson):
                client.execute_cell(cell, index)  # raises CellExecutionError on the first failing cell
            after.append(leftovers(client, probe, len(lesson)))
    first, second = after
    assert second["start"] == "spawn", "the second run uses spawn, as macOS and Windows do"
    assert first["servers"] == second["servers"] == 0, "the last cell must stop every server"
    assert first["workers"] == second["workers"] == 0, "the last cell must stop every worker"
    assert second["threads"] <= first["threads"], f"threads grew from one run to the next: {after}"
    assert second["fds"] <= first["fds"] + 2, f"file descriptors grew from one run to the next: {after}"
