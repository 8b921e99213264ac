"""Predict, then measure: every chapter asks for guesses before it measures, and compares them after.

A cell tagged ``predict`` assigns ``None`` to the learner's guess (so Restart & Run All works untouched);
a later code cell passes that variable to ``support.predict``'s ``compare`` or ``compare_choice``.
This test only reads the notebooks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "notebooks").glob("0[1-6]_*.ipynb"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
COMPARERS = {"compare", "compare_choice"}
MAX_LINES = 25  # the course's limit for a lesson code cell
PREDICT_LINES = 4


def code_cells(path: Path) -> list[nbformat.NotebookNode]:
    return [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]


def parse(source: str) -> ast.Module:
    """A cell's code as Python: IPython magics and shell lines dropped, top-level await allowed."""
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    return compile(code, "<cell>", "exec", flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def guesses(cell: nbformat.NotebookNode) -> list[str]:
    """The names a predict cell sets to ``None``."""
    return [
        target.id
        for node in parse(cell.source).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value is None
        for target in node.targets
        if isinstance(target, ast.Name)
    ]


def predict_names(cells: list[nbformat.NotebookNode]) -> tuple[set[str], set[str]]:
    """What the notebook calls support.predict by: (names of the module, names of its two functions)."""
    modules, functions = set(), set()
    for cell in cells:
        for node in ast.walk(parse(cell.source)):
            if isinstance(node, ast.ImportFrom) and node.module == "support":
                modules |= {a.asname or a.name for a in node.names if a.name == "predict"}
            elif isinstance(node, ast.ImportFrom) and node.module == "support.predict":
                functions |= {a.asname or a.name for a in node.names if a.name in COMPARERS}
    return modules, functions


def compared(cell: nbformat.NotebookNode, modules: set[str], functions: set[str]) -> set[str]:
    """The variables this cell passes, as the guess, to support.predict's compare or compare_choice."""
    found = set()
    for node in ast.walk(parse(cell.source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        by_name = isinstance(func, ast.Name) and func.id in functions
        by_module = (
            isinstance(func, ast.Attribute)
            and func.attr in COMPARERS
            and (
                (isinstance(func.value, ast.Name) and func.value.id in modules)
                or ast.unparse(func.value) == "support.predict"
            )
        )
        if not (by_name or by_module):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        guess = node.args[0] if node.args else keywords.get("guess")
        if isinstance(guess, ast.Name):
            found.add(guess.id)
    return found


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.name)
def test_each_lesson_asks_for_two_predictions_and_compares_them(path: Path) -> None:
    cells = code_cells(path)
    modules, functions = predict_names(cells)
    predicts = [i for i, c in enumerate(cells) if "predict" in c.metadata.get("tags", [])]
    assert len(predicts) >= 2, f"{path.name}: {len(predicts)} cells tagged 'predict', expected at least 2"
    for index in predicts:
        cell = cells[index]
        names = guesses(cell)
        assert names, f"{path.name}, cell {cell.get('id')}: a predict cell assigns its guess to None"
        assert len(cell.source.splitlines()) <= PREDICT_LINES, f"{cell.get('id')}: keep a question short"
        later = set().union(*(compared(c, modules, functions) for c in cells[index + 1 :]))
        for name in names:
            assert name in later, f"{path.name}: no later cell passes {name} to compare or compare_choice"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_lesson_code_cell_is_over_the_limit(path: Path) -> None:
    long = {c.get("id"): n for c in code_cells(path) if (n := len(c.source.splitlines())) > MAX_LINES}
    assert long == {}, f"{path.name}: code cells over {MAX_LINES} lines (id: lines): {long}"


def test_a_guess_compared_nowhere_is_caught() -> None:
    ask = nbformat.v4.new_code_cell("predicted = None", metadata={"tags": ["predict"]})
    plots = nbformat.v4.new_code_cell("from support.plots import compare\ncompare(predicted)")
    right = nbformat.v4.new_code_cell("from support import predict\npredict.compare(predicted, 1.0)")
    assert guesses(ask) == ["predicted"]
    assert compared(plots, *predict_names([plots])) == set(), "support.plots.compare is not a comparison"
    assert compared(right, *predict_names([right])) == {"predicted"}
