"""How long a notebook takes a learner: an estimate from its text, so stated minutes can be defended.

The model, deliberately simple so anyone can check it by hand:

- prose at ``WORDS_PER_MINUTE`` (technical reading, slower than the ~240 words a minute of everyday
  non-fiction);
- code read at ``SECONDS_PER_CODE_LINE`` per non-blank line (skimmed, not studied);
- ``SECONDS_PER_CODE_CELL`` per code cell, to run it and look at what it printed or drew, plus the
  cell's own run time where the caller knows it (``run_seconds``).

Sections whose heading (``##`` or ``###``) says "going further" or "(optional)" are counted apart,
up to the next heading of the same or a higher level: the header of a chapter states the core
minutes, and the optional ones beside them.
``python -m support.pacing`` prints the estimate for every lesson and exercise notebook.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from support._nbformat import nbformat

__all__ = ["Estimate", "estimate", "is_optional", "main", "stated_minutes"]

WORDS_PER_MINUTE = 200
SECONDS_PER_CODE_LINE = 4
SECONDS_PER_CODE_CELL = 15
_WORD = re.compile(r"\w+")
_OPTIONAL = re.compile(r"going further|\(optional\)", re.IGNORECASE)
_STATED = re.compile(r"\*\*Teaching:\*\*\s*(?:about\s*)?(\d+)\s*min(?:\s*\(\+\s*(\d+)\s*min)?")


@dataclass(frozen=True)
class Estimate:
    """Minutes for a notebook: its core path and its optional sections."""

    core: float
    optional: float
    words: int
    code_lines: int
    code_cells: int

    @property
    def total(self) -> float:
        return self.core + self.optional


def is_optional(heading: str) -> bool:
    """Whether a ``## `` section heading marks its section as optional."""
    return bool(_OPTIONAL.search(heading))


def _cell_minutes(cell: nbformat.NotebookNode) -> tuple[float, int, int, int]:
    if cell.cell_type == "markdown":
        words = len(_WORD.findall(cell.source))
        return words / WORDS_PER_MINUTE, words, 0, 0
    if cell.cell_type != "code":
        return 0.0, 0, 0, 0
    lines = sum(1 for line in cell.source.splitlines() if line.strip())
    return (lines * SECONDS_PER_CODE_LINE + SECONDS_PER_CODE_CELL) / 60, 0, lines, 1


def estimate(path: Path | str, run_seconds: float = 0.0) -> Estimate:
    """The estimate for one notebook; ``run_seconds`` (its Restart & Run All time) counts as core."""
    notebook = nbformat.read(path, as_version=4)
    core = optional = 0.0
    words = lines = cells = 0
    optional_level = 0  # the level of the optional heading we are under (0: none)
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                level = len(line) - len(line.lstrip("#"))
                if level not in (2, 3) or not line[level:].startswith(" "):
                    continue
                if optional_level and level <= optional_level:
                    optional_level = 0
                if not optional_level and is_optional(line):
                    optional_level = level
        in_optional = bool(optional_level)
        minutes, w, n, c = _cell_minutes(cell)
        words, lines, cells = words + w, lines + n, cells + c
        if in_optional:
            optional += minutes
        else:
            core += minutes
    return Estimate(core + run_seconds / 60, optional, words, lines, cells)


def stated_minutes(path: Path | str) -> tuple[int, int] | None:
    """The (core, optional) teaching minutes a chapter's first cell states, if it states them."""
    notebook = nbformat.read(path, as_version=4)
    found = _STATED.search(notebook.cells[0].source) if notebook.cells else None
    if found is None:
        return None
    return int(found.group(1)), int(found.group(2) or 0)


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    paths = [Path(p) for p in (argv if argv is not None else sys.argv[1:])] or [
        *sorted((root / "notebooks").glob("0*.ipynb")),
        *sorted((root / "solutions").glob("0*.ipynb")),
    ]
    print(f"{'notebook':48} {'words':>6} {'lines':>6} {'cells':>6} {'core':>6} {'optional':>9} {'stated':>8}")
    for path in paths:
        est = estimate(path)
        stated = stated_minutes(path)
        said = f"{stated[0]}+{stated[1]}" if stated else "—"
        print(
            f"{path.name:48} {est.words:6} {est.code_lines:6} {est.code_cells:6} "
            f"{est.core:5.0f}m {est.optional:8.0f}m {said:>8}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
