"""Run your exercise notebooks and print which exercises pass: ``python course.py progress [01 …]``.

Each notebook in ``exercises/`` runs top to bottom in a fresh kernel (errors do not stop it), then
every check cell (tagged ``check``) is read for the verdict its check records as a display output
(``support.checks.VERDICT_MIME``): passed, not yet, or not started. A check cell without one (it
raised before its check ran, say) is an error row that says so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from support._nbformat import nbformat
from support.checks import MARKS, RAISE_ENV, VERDICT_MIME, Verdict
from support.kernels import notebook_client

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    chapter: str
    exercise: str
    status: str
    detail: str


def verdicts(cell: nbformat.NotebookNode) -> list[Verdict]:
    """The verdicts a check cell's outputs carry, in order (the last run of each exercise wins)."""
    found: dict[str, Verdict] = {}
    for output in cell.get("outputs", []):
        if output.get("output_type") not in ("display_data", "execute_result"):
            continue
        data = output.get("data", {}).get(VERDICT_MIME)
        if isinstance(data, dict) and "exercise" in data and "status" in data:
            verdict = Verdict.from_json(data)
            found.pop(verdict.exercise, None)
            found[verdict.exercise] = verdict
    return list(found.values())


def _error(cell: nbformat.NotebookNode) -> str | None:
    """The error the cell ended with (``Name: value``), if any."""
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return f"{output.get('ename')}: {output.get('evalue')}"
    return None


def _detail(verdict: Verdict) -> str:
    if verdict.status == "not started":
        return "replace the `raise NotImplementedError` line in its cell"
    failing = [step for step in verdict.steps if step.status == "not yet"]
    if verdict.status == "not yet" and failing:
        return f"failing: {failing[0].description}"
    return ""


def read_checks(nb: nbformat.NotebookNode, chapter: str) -> list[Row]:
    """One row per exercise checked in an executed notebook; an error row for a check cell without one."""
    rows = []
    for number, cell in enumerate(c for c in nb.cells if "check" in c.get("metadata", {}).get("tags", [])):
        found = verdicts(cell)
        if not found:
            error = _error(cell)
            detail = (
                f"no verdict: the check cell raised {error} before its check ran"
                if error
                else "no verdict: the check cell did not run its check; run it in the notebook to see why"
            )
            rows.append(Row(chapter, f"check {number + 1}", "error", detail))
            continue
        rows += [Row(chapter, v.exercise, v.status, _detail(v)) for v in found]
    return rows


def run_notebook(path: Path, timeout: int = 300) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = notebook_client(
        nb,
        timeout=timeout,
        allow_errors=True,
        resources={"metadata": {"path": str(path.parent)}},
    )
    # The kernel's own stderr (ipykernel's start-up warnings) would clutter the table's terminal. The
    # verdicts are read from the outputs, so a check that did not pass need not raise (as in JupyterLab).
    client.execute(stderr=subprocess.DEVNULL, env={**os.environ, RAISE_ENV: "0"})
    return nb


def table(rows: list[Row]) -> str:
    header = ("chapter", "exercise", "status", "details")
    lines = [(r.chapter, r.exercise, MARKS.get(r.status, r.status), r.detail) for r in rows]
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(3)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0], strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths) + "  -------")
    out += ["  ".join(c.ljust(w) for c, w in zip(line, [*widths, 0], strict=True)).rstrip() for line in lines]
    return "\n".join(out)


def _saved(path: Path, now: float | None = None) -> str:
    """When the file was last saved, e.g. "saved 14:02, 3 min ago": unsaved work is not in it."""
    mtime = path.stat().st_mtime
    ago = max(0, int(((now if now is not None else time.time()) - mtime) // 60))
    when = time.strftime("%H:%M", time.localtime(mtime))
    return f"saved {when}, " + ("just now" if ago == 0 else f"{ago} min ago")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("chapters", nargs="*", help="chapter numbers, e.g. 01 03 (default: all)")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    notebooks = sorted((args.root / "exercises").glob("*.ipynb"))
    if args.chapters:
        notebooks = [nb for nb in notebooks if nb.name.split("_")[0] in args.chapters]
    if not notebooks:
        print(
            "no exercise notebooks found"
            + (f" for chapter(s) {' '.join(args.chapters)}" if args.chapters else "")
        )
        return 2
    print("Progress reads the saved notebook files: save your work in JupyterLab (Ctrl+S) first.")
    rows: list[Row] = []
    for path in notebooks:
        print(f"running {path.relative_to(args.root)} ({_saved(path)}) …", flush=True)
        rows += read_checks(run_notebook(path), path.name.split("_")[0])
    print()
    print(table(rows))
    passed = sum(r.status == "passed" for r in rows)
    print(f"\n{passed} of {len(rows)} exercises pass.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
