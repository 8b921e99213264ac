"""Run your exercise notebooks and print which exercises pass: ``python course.py progress [01 …]``.

Each notebook in ``exercises/`` runs top to bottom in a fresh kernel (errors do not stop it), then
every check cell (tagged ``check``) is read for its summary line: passed, not yet, or not started.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"Exercise (?P<id>\d+\.\d+): (?P<status>passed|not yet|not started)(?P<rest>.*)")
FAILED_LINE = re.compile(r"^\s*(❌|⬜)\s*(?P<text>.+)$", re.MULTILINE)


@dataclass(frozen=True)
class Row:
    chapter: str
    exercise: str
    status: str
    detail: str


def _text(cell: nbformat.NotebookNode) -> tuple[str, str | None]:
    """The cell's printed text, and the error it ended with (``Name: value``), if any."""
    printed, error = [], None
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            printed.append(output.text)
        elif output.output_type == "error":
            error = f"{output.ename}: {output.evalue}"
    return "".join(printed), error


def read_checks(nb: nbformat.NotebookNode, chapter: str) -> list[Row]:
    """One row per check cell of an executed notebook."""
    rows = []
    for number, cell in enumerate(c for c in nb.cells if "check" in c.get("metadata", {}).get("tags", [])):
        printed, error = _text(cell)
        match = None
        for candidate in SUMMARY.finditer(printed + "\n" + (error or "")):
            match = candidate
        if match is None:
            detail = error or "the check cell printed nothing; run it in the notebook to see why"
            rows.append(Row(chapter, f"check {number + 1}", "error", detail))
            continue
        first_failure = FAILED_LINE.search(printed)
        if match["status"] == "not started":
            detail = "replace the `raise NotImplementedError` line in its cell"
        elif match["status"] == "not yet" and first_failure:
            detail = f"failing: {first_failure['text'].strip()}"
        else:
            detail = ""
        rows.append(Row(chapter, match["id"], match["status"], detail))
    return rows


def run_notebook(path: Path, timeout: int = 300) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        allow_errors=True,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    # The kernel's own stderr (ipykernel's start-up warnings) would clutter the table's terminal.
    client.execute(stderr=subprocess.DEVNULL)
    return nb


def table(rows: list[Row]) -> str:
    marks = {
        "passed": "✅ passed",
        "not yet": "❌ not yet",
        "not started": "⬜ not started",
        "error": "⚠️ error",
    }
    header = ("chapter", "exercise", "status", "details")
    lines = [(r.chapter, r.exercise, marks.get(r.status, r.status), r.detail) for r in rows]
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
