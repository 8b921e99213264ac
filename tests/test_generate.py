"""support.generate: solutions → exercises, and exercises/ is in step with solutions/."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from support.generate import GenerateError, generate, main, strip_solution


def test_a_region_becomes_the_placeholder_at_its_indentation() -> None:
    source = "def f():\n    x = 1\n    # BEGIN SOLUTION\n    return x + 1\n    # END SOLUTION\n"
    assert strip_solution(source, "1.2") == (
        'def f():\n    x = 1\n    raise NotImplementedError("Exercise 1.2: replace this line with your code")'
    )


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("# BEGIN SOLUTION\nx = 1\n", "without END"),
        ("x = 1\n# END SOLUTION\n", "without BEGIN"),
        ("# BEGIN SOLUTION\n# BEGIN SOLUTION\n# END SOLUTION\n", "inside another"),
    ],
)
def test_unbalanced_markers_are_refused(source: str, message: str) -> None:
    with pytest.raises(GenerateError, match=message):
        strip_solution(source, "1.1")


def write_solution(root: Path, cells: list[nbformat.NotebookNode]) -> Path:
    (root / "solutions").mkdir()
    nb = nbformat.v4.new_notebook(cells=cells)
    path = root / "solutions" / "07_demo_exercises.ipynb"
    nbformat.write(nb, path)
    return path


def demo_cells() -> list[nbformat.NotebookNode]:
    code = nbformat.v4.new_code_cell(
        "def answer():\n    # BEGIN SOLUTION\n    return 42\n    # END SOLUTION\n"
    )
    code.outputs = [nbformat.v4.new_output("stream", text="42\n")]
    code.execution_count = 3
    explanation = nbformat.v4.new_markdown_cell("Why 42: …")
    explanation.metadata["tags"] = ["solution"]
    return [nbformat.v4.new_markdown_cell("### Exercise 7.1: the answer"), code, explanation]


def test_generate_strips_solutions_outputs_and_solution_cells(tmp_path: Path) -> None:
    nb = generate(write_solution(tmp_path, demo_cells()))
    sources = [c.source for c in nb.cells]
    assert "Generated from `solutions/07_demo_exercises.ipynb`" in sources[0]
    assert "python course.py reset 07" in sources[0]
    assert sources[1] == "### Exercise 7.1: the answer"
    assert (
        sources[2]
        == 'def answer():\n    raise NotImplementedError("Exercise 7.1: replace this line with your code")'
    )
    assert nb.cells[2].outputs == [] and nb.cells[2].execution_count is None
    assert not any("Why 42" in s for s in sources)


def test_a_region_needs_an_exercise_heading(tmp_path: Path) -> None:
    with pytest.raises(GenerateError, match=re.escape("no 'Exercise N.M' heading")):
        generate(write_solution(tmp_path, demo_cells()[1:]))


def test_check_mode_finds_a_stale_exercise(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_solution(tmp_path, demo_cells())
    assert main(["--root", str(tmp_path), "--check"]) == 1
    assert "out of date with solutions/: exercises/07_demo_exercises.ipynb" in capsys.readouterr().err
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--root", str(tmp_path), "--check"]) == 0


def test_the_repository_exercises_are_in_step_with_the_solutions() -> None:
    assert main(["--check"]) == 0, "run: python course.py generate"
