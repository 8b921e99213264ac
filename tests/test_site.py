"""support.site: the rendered course. Pages of the real notebooks are checked in test_notebooks_rerun."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from support import site

ROOT = Path(__file__).resolve().parent.parent
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def executed(*outputs: dict) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell(
            "See [the exercises](../exercises/01_x_exercises.ipynb) and [ch 2](02_y.ipynb)."
        ),
        nbformat.v4.new_code_cell("plot()", outputs=[nbformat.from_dict(o) for o in outputs]),
    ]
    return nb


def test_every_lesson_and_solution_has_a_page_start_here_first() -> None:
    all_pages = site.pages(ROOT)
    sources = [p.source for p in all_pages]
    assert sources[0].name == "00_start_here.ipynb"
    assert set(sources) == {*ROOT.glob("notebooks/*.ipynb"), *ROOT.glob("solutions/*.ipynb")}
    assert len({p.href for p in all_pages}) == len(all_pages)


def test_a_page_has_its_figure_the_course_bar_and_links_to_pages(tmp_path: Path) -> None:
    all_pages = site.pages(ROOT)
    page = all_pages[1]
    image = {"output_type": "display_data", "data": {"image/png": PNG}, "metadata": {}}
    written = site.write_page(executed(image), page, tmp_path, all_pages)
    text = written.read_text()
    assert written == tmp_path / "notebooks" / f"{page.source.stem}.html"
    assert "data:image/png" in text and 'class="course-nav"' in text
    assert 'href="../solutions/01_x_exercises.html"' in text and 'href="02_y.html"' in text
    assert all(f'href="../{p.href}"' in text for p in all_pages)


@pytest.mark.parametrize(
    "output",
    [
        {"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": []},
        {"output_type": "stream", "name": "stderr", "text": "Traceback (most recent call last):\n  ..."},
    ],
)
def test_a_notebook_with_error_output_gets_no_page(tmp_path: Path, output: dict) -> None:
    all_pages = site.pages(ROOT)
    with pytest.raises(RuntimeError, match="has error output: cell 1"):
        site.write_page(executed(output), all_pages[1], tmp_path, all_pages)
    assert not (tmp_path / all_pages[1].href).exists()


def test_the_front_page_has_the_chapter_table_linking_to_every_lesson() -> None:
    all_pages = site.pages(ROOT)
    front = site.index(all_pages, ROOT)
    assert site.TITLE in front and "<table>" in front
    for number in ("01", "02", "03", "04", "05", "06"):
        (lesson,) = [p for p in all_pages if p.kind == "lesson" and p.source.name.startswith(number)]
        assert f'href="{lesson.href}"' in front
    assert ".ipynb" not in front.split("<main>")[1].split("Chapters")[1]


def test_the_pages_workflow_builds_with_course_py_and_publishes_the_site() -> None:
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "site.yml").read_text())
    steps = workflow["jobs"]["build"]["steps"]
    assert {"run": "python course.py site"} in steps
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_site"
    assert "_site/" in (ROOT / ".gitignore").read_text().splitlines()
    assert "python course.py site" in (ROOT / "README.md").read_text()


def test_a_checks_verdict_data_is_left_out_of_the_page(tmp_path: Path) -> None:
    """The verdict output is for tools (progress); HTML has no way to show it, and must not try."""
    from support.checks import VERDICT_MIME

    all_pages = site.pages(ROOT)
    verdict = {"output_type": "display_data", "data": {VERDICT_MIME: {"status": "passed"}}, "metadata": {}}
    printed = {"output_type": "stream", "name": "stdout", "text": "Exercise 1.1: passed ✅ (3 of 3 checks)\n"}
    text = site.write_page(executed(printed, verdict), all_pages[1], tmp_path, all_pages).read_text()
    assert "Exercise 1.1: passed ✅" in text and VERDICT_MIME not in text


def test_a_kernel_that_died_before_its_first_reply_is_started_once_more() -> None:
    calls = []

    def start() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError(f"{site.KERNEL_DIED}: ZMQError: Address already in use")
        return "started"

    assert site.started_twice(start) == "started" and len(calls) == 2

    def always_dies() -> str:
        raise RuntimeError(site.KERNEL_DIED)

    with pytest.raises(RuntimeError, match="Kernel died"):
        site.started_twice(always_dies)

    def broken() -> str:
        calls.append(1)
        raise RuntimeError("something else")

    calls.clear()
    with pytest.raises(RuntimeError, match="something else"):
        site.started_twice(broken)
    assert len(calls) == 1, "only a kernel's failed start is tried again"
