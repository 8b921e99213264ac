"""Start an exercise notebook again: ``python course.py reset 01`` (or ``--all``).

The fresh notebook is generated from ``solutions/``. A notebook with your work in it is replaced
only with ``--force``, and even then your version is first copied to ``exercises/.backup/``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from support._nbformat import nbformat
from support.generate import ROOT, exercise_path, generate


def _code(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """What counts as the learner's work: the cells' types and sources (not outputs or counts)."""
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def has_work(current: Path, fresh: nbformat.NotebookNode) -> bool:
    return _code(nbformat.read(current, as_version=4)) != _code(fresh)


def reset(solution: Path, root: Path, force: bool) -> str:
    target = exercise_path(solution, root)
    fresh = generate(solution)
    if target.exists() and has_work(target, fresh):
        if not force:
            return f"kept   {target.relative_to(root)}: it has your changes (add --force to replace it)"
        backup = root / "exercises" / ".backup" / f"{target.stem}-{time.strftime('%Y%m%d-%H%M%S')}.ipynb"
        backup.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(target, backup)
        target.write_text(nbformat.writes(fresh) + "\n", encoding="utf-8")
        return f"reset  {target.relative_to(root)} (your version: {backup.relative_to(root)})"
    target.write_text(nbformat.writes(fresh) + "\n", encoding="utf-8")
    return f"reset  {target.relative_to(root)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("chapters", nargs="*", help="chapter numbers, e.g. 01")
    parser.add_argument("--all", action="store_true", help="every exercise notebook")
    parser.add_argument("--force", action="store_true", help="replace notebooks that have your changes")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    solutions = sorted((args.root / "solutions").glob("*.ipynb"))
    if not args.all:
        if not args.chapters:
            parser.error("name a chapter (e.g. 01) or use --all")
        solutions = [s for s in solutions if s.name.split("_")[0] in args.chapters]
        if not solutions:
            parser.error(f"no exercise notebook for chapter(s) {' '.join(args.chapters)}")
    lines = [reset(s, args.root, args.force) for s in solutions]
    print("\n".join(lines))
    return 1 if any(line.startswith("kept") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
