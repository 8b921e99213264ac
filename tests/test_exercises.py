"""Exercise notebooks: unsolved, every check says "not started"; the progress and reset commands."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest

from support import progress, reset
from support.generate import main as generate_main

ROOT = Path(__file__).resolve().parent.parent
EXERCISES = sorted((ROOT / "exercises").glob("*.ipynb"))


@pytest.mark.notebooks
@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_unsolved_exercises_are_reported_not_started(path: Path) -> None:
    rows = progress.read_checks(progress.run_notebook(path), path.name[:2])
    assert rows, "an exercise notebook needs check cells (tagged 'check')"
    assert {r.status for r in rows} == {"not started"}, rows


@pytest.mark.parametrize("path", EXERCISES, ids=lambda p: p.name)
def test_every_exercise_has_a_placeholder_and_a_check(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    placeholders = sum(
        'raise NotImplementedError("Exercise' in c.source for c in nb.cells if c.cell_type == "code"
    )
    checks = sum("check" in c.metadata.get("tags", []) for c in nb.cells)
    assert placeholders >= 3 and checks >= 3


def make_course(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "solutions", tmp_path / "solutions")
    assert generate_main(["--root", str(tmp_path)]) == 0
    return tmp_path


@pytest.mark.notebooks
def test_progress_table_for_solved_notebooks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A learner who solved chapter 5 and has not started chapter 6 (two cheap chapters stand for all:
    every solution's checks pass in test_notebooks_rerun, every unsolved one is "not started" above)."""
    root = make_course(tmp_path)
    solved = next((root / "solutions").glob("05_*.ipynb"))
    shutil.copy(solved, root / "exercises" / solved.name)
    assert progress.main(["05", "06", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "save your work in JupyterLab (Ctrl+S) first" in out
    assert "(saved " in out
    done = [line for line in out.splitlines() if line.startswith("05 ")]
    todo = [line for line in out.splitlines() if line.startswith("06 ")]
    assert len(done) >= 3 and all("✅ passed" in r for r in done), done
    assert len(todo) >= 3 and all("not started" in r for r in todo), todo
    assert f"{len(done)} of {len(done) + len(todo)} exercises pass." in out


def test_reset_keeps_work_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_course(tmp_path)
    target = next((root / "exercises").glob("01_*.ipynb"))
    nb = nbformat.read(target, as_version=4)
    nb.cells[-1].source += "\n# my work"
    nbformat.write(nb, target)
    assert reset.main(["01", "--root", str(root)]) == 1
    assert "has your changes (add --force to replace it)" in capsys.readouterr().out
    assert "# my work" in target.read_text()
    assert reset.main(["01", "--force", "--root", str(root)]) == 0
    assert "# my work" not in target.read_text()
    backups = list((root / "exercises" / ".backup").glob("01_*.ipynb"))
    assert len(backups) == 1 and "# my work" in backups[0].read_text()


def test_reset_needs_a_chapter(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        reset.main(["--root", str(make_course(tmp_path))])
