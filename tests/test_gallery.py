"""The gallery: one headline figure per chapter, from a real run, shown in the README."""

from __future__ import annotations

import nbformat
import pytest

from support.gallery import GALLERY, ROOT, chapters, headline_cell


@pytest.mark.parametrize("path", chapters(), ids=lambda p: p.stem)
def test_each_chapter_has_one_headline_figure_in_the_readme(path) -> None:
    notebook = nbformat.read(path, as_version=4)
    source = notebook.cells[headline_cell(notebook)].source
    assert any(name in source for name in ("compare(", "plot_", "subplots(")), "the headline cell draws"
    image = GALLERY / f"{path.stem}.png"
    assert image.read_bytes().startswith(b"\x89PNG"), f"run `python course.py gallery {path.name[:2]}`"
    assert f"(docs/gallery/{path.stem}.png)" in (ROOT / "README.md").read_text()


def test_a_notebook_without_a_headline_is_refused() -> None:
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    with pytest.raises(ValueError, match="expected one code cell tagged 'headline', found 0"):
        headline_cell(notebook)
