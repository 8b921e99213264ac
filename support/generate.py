"""Generate the exercise notebooks from the solved ones: ``solutions/*.ipynb`` → ``exercises/``.

In a code cell, the lines from ``# BEGIN SOLUTION`` to ``# END SOLUTION`` become one line raising
``NotImplementedError`` that names the exercise (from the nearest heading above that says
"Exercise N.M"); markdown cells tagged ``solution`` are dropped; outputs and execution counts go.

    python -m support.generate          # write exercises/
    python -m support.generate --check  # exit 1 if exercises/ is not what solutions/ generates
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from support._nbformat import nbformat
from support.checks import placeholder_message

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN SOLUTION\s*$")
END = re.compile(r"^\s*# END SOLUTION\s*$")
HEADING = re.compile(r"^#+ .*?Exercise (?P<id>\d+\.\d+)", re.MULTILINE)
HEADER_ID = "generated-header"


class GenerateError(ValueError):
    """A solution notebook that cannot be turned into an exercise (with the cell that is wrong)."""


def strip_solution(source: str, exercise_id: str) -> str:
    """Replace each solution region of a code cell's source with the placeholder line."""
    out: list[str] = []
    inside = False
    for number, line in enumerate(source.splitlines(), 1):
        begin = BEGIN.match(line)
        if begin:
            if inside:
                raise GenerateError(f"line {number}: BEGIN SOLUTION inside another solution region")
            inside = True
            message = placeholder_message(exercise_id)
            out.append(f'{begin["indent"]}raise NotImplementedError("{message}")')
        elif END.match(line):
            if not inside:
                raise GenerateError(f"line {number}: END SOLUTION without BEGIN SOLUTION")
            inside = False
        elif not inside:
            out.append(line)
    if inside:
        raise GenerateError("BEGIN SOLUTION without END SOLUTION")
    return "\n".join(out)


def header_cell(solution: Path) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_markdown_cell(
        f"> **Exercises.** Replace each `raise NotImplementedError(…)` with your code, run the cell, "
        f"then run the check cell below it. `python course.py progress` checks every exercise from a "
        f"terminal; `python course.py reset {solution.stem.split('_')[0]}` starts this notebook again.\n"
        f">\n"
        f"> *Generated from `solutions/{solution.name}`; maintainers edit that notebook and run "
        f"`python course.py generate`.*"
    )
    cell.id = HEADER_ID
    cell.metadata["tags"] = ["generated"]
    return cell


def generate(solution: Path) -> nbformat.NotebookNode:
    """The exercise notebook that ``solution`` generates."""
    nb = nbformat.read(solution, as_version=4)
    cells = [header_cell(solution)]
    exercise_id: str | None = None
    for index, cell in enumerate(nb.cells):
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "markdown":
            headings = HEADING.findall(cell.source)
            if headings:
                exercise_id = headings[-1]
            if "solution" in tags:
                continue
        elif cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            if "# BEGIN SOLUTION" in cell.source:
                if exercise_id is None:
                    raise GenerateError(f"{solution.name}, cell {index}: no 'Exercise N.M' heading above it")
                try:
                    cell.source = strip_solution(cell.source, exercise_id)
                except GenerateError as exc:
                    raise GenerateError(f"{solution.name}, cell {index}: {exc}") from None
        cells.append(cell)
    nb.cells = cells
    return nb


def exercise_path(solution: Path, root: Path = ROOT) -> Path:
    return root / "exercises" / solution.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only check that exercises/ is up to date")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    stale = []
    for solution in sorted((args.root / "solutions").glob("*.ipynb")):
        text = nbformat.writes(generate(solution)) + "\n"
        target = exercise_path(solution, args.root)
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        if args.check:
            stale.append(target)
        else:
            target.parent.mkdir(exist_ok=True)
            target.write_text(text, encoding="utf-8")
            print(f"wrote {target.relative_to(args.root)}")
    if stale:
        names = ", ".join(str(p.relative_to(args.root)) for p in stale)
        print(f"out of date with solutions/: {names}\nrun: python course.py generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
