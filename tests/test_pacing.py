"""support.pacing: every chapter states the minutes its text takes, by the estimate's model."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from support.pacing import estimate, is_optional, stated_minutes

ROOT = Path(__file__).resolve().parent.parent
LESSONS = sorted((ROOT / "notebooks").glob("0[1-9]_*.ipynb"))


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_stated_minutes_match_the_estimate(path: Path) -> None:
    stated = stated_minutes(path)
    assert stated is not None, "the first cell says **Teaching:** about N min"
    est = estimate(path)
    core, optional = stated
    assert abs(core - est.core) <= max(5, 0.1 * est.core), f"core: stated {core}, estimated {est.core:.0f}"
    assert abs(optional - est.optional) <= 5, (
        f"going further: stated {optional}, estimated {est.optional:.0f}"
    )


def test_optional_sections_are_counted_apart_until_the_next_heading_of_their_level(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    words = " ".join(["word"] * 200)  # one minute at 200 words a minute
    nb.cells = [
        nbformat.v4.new_markdown_cell(f"## 1. Core\n{words}"),
        nbformat.v4.new_markdown_cell(f"### A detail (going further)\n{words}"),
        nbformat.v4.new_code_cell("x = 1\ny = 2"),  # 2 lines × 4 s + 15 s = 23 s
        nbformat.v4.new_markdown_cell(f"### Back to the core\n{words}"),
        nbformat.v4.new_markdown_cell(f"## 2. Production (optional)\n{words}"),
        nbformat.v4.new_markdown_cell(f"### Still optional\n{words}"),
    ]
    path = tmp_path / "demo.ipynb"
    nbformat.write(nb, path)
    est = estimate(path)
    assert 2.0 < est.core < 2.1  # two paragraphs of 200 words, and their headings' few words
    assert 3.38 < est.optional < 3.5  # three paragraphs and the code cell's 23 s
    assert is_optional("## 6. Graceful shutdown (going further)") and not is_optional(
        "## 6. Graceful shutdown"
    )
