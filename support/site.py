"""The course as a static site: every lesson and solved exercise, executed, with the plots of that run.

    python course.py site            execute each notebook once and write the site to _site/
    python course.py site --out DIR  somewhere else

Each page is rendered by nbconvert (the Jupyter project's own converter: offline, no theme to
download) from a notebook executed in a fresh kernel; a cell that fails stops the build with the
notebook and the error. The test suite renders every page from the run it already makes of each
notebook (tests/test_notebooks_rerun.py), so CI checks the pages without executing anything again.
"""

from __future__ import annotations

import argparse
import copy
import html
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from support._nbformat import nbformat
from support.kernels import notebook_client

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
TITLE = "Async, Background Tasks, and Observability in FastAPI"
STYLE = """
<style>
  .course-nav { font: 15px/1.4 system-ui, sans-serif; padding: 10px 24px; border-bottom: 1px solid #ddd;
                display: flex; gap: 18px; flex-wrap: wrap; background: #fafafa; }
  .course-nav a { color: #1a5fb4; text-decoration: none; }
  .course-nav .here { font-weight: 600; }
</style>
"""


@dataclass(frozen=True)
class Page:
    """One notebook of the site: where it comes from and where its page goes."""

    source: Path  # e.g. notebooks/01_async_correctness.ipynb
    kind: str  # "lesson" or "solutions"

    @property
    def href(self) -> str:
        return f"{self.source.parent.name}/{self.source.stem}.html"

    @property
    def label(self) -> str:
        number = self.source.name[:2]
        if self.kind == "solutions":
            return f"{number} exercises, solved"
        return "Start here" if number == "00" else f"{number} lesson"


def pages(root: Path = ROOT) -> list[Page]:
    """The lessons (start-here first), then the solved exercises, in chapter order."""
    lessons = [Page(p, "lesson") for p in sorted((root / "notebooks").glob("*.ipynb"))]
    solved = [Page(p, "solutions") for p in sorted((root / "solutions").glob("*.ipynb"))]
    return lessons + solved


KERNEL_DIED = "Kernel died before replying to kernel_info"


def started_twice(start: Callable[[], T]) -> T:
    """``start()``, once more if its kernel died before its first reply.

    jupyter_client picks a kernel's TCP ports by binding them and letting them go; with many kernels
    and servers starting at once (the test suite's workers), another process can take one before the
    kernel binds it (``ZMQError: Address already in use`` in the kernel's log). A fresh start picks
    fresh ports. Kernels from ``support.kernels`` use IPC files instead where Unix sockets exist, so
    this matters where they cannot (Windows). Any other error, and a second failure, are raised.
    """
    try:
        return start()
    except RuntimeError as error:
        if KERNEL_DIED not in str(error):
            raise
    return start()


def execute(path: Path, timeout: int = 300) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel; raises CellExecutionError on a failing cell."""

    def run() -> nbformat.NotebookNode:
        nb = nbformat.read(path, as_version=4)
        client = notebook_client(nb, timeout=timeout, resources={"metadata": {"path": str(path.parent)}})
        client.execute()
        return nb

    return started_twice(run)


def errors(nb: nbformat.NotebookNode) -> list[str]:
    """Error outputs and printed tracebacks in an executed notebook (a page must have none)."""
    found = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                found.append(f"cell {index}: {output.get('ename')}: {output.get('evalue')}")
            elif output.get("output_type") == "stream" and "Traceback (most recent call last)" in output.get(
                "text", ""
            ):
                found.append(f"cell {index}: a traceback was printed")
    return found


def figures(nb: nbformat.NotebookNode) -> int:
    """How many images the executed notebook shows."""
    return sum(
        "image/png" in output.get("data", {}) or "image/svg+xml" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )


def _links_to_pages(body: str) -> str:
    """Notebook links become page links; exercise notebooks are shown solved on the site."""
    body = re.sub(r'href="\.\./exercises/([^"#]+)\.ipynb', r'href="../solutions/\1.html', body)
    body = re.sub(r'href="([^":#]+)\.ipynb', r'href="\1.html', body)
    return body


def _for_readers(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy without the outputs meant for tools (a check's verdict data), which HTML cannot show."""
    from support.checks import VERDICT_MIME

    shown = copy.deepcopy(nb)
    for cell in shown.cells:
        if "outputs" in cell:
            cell.outputs = [o for o in cell.outputs if set(o.get("data", {})) != {VERDICT_MIME}]
    return shown


def nav(current: Page | None, all_pages: list[Page], prefix: str) -> str:
    links = [f'<a href="{prefix}index.html"{" class=here" if current is None else ""}>Course</a>']
    for page in all_pages:
        here = " class=here" if page == current else ""
        links.append(f'<a href="{prefix}{page.href}"{here}>{html.escape(page.label)}</a>')
    return f'{STYLE}<nav class="course-nav">{"".join(links)}</nav>'


def render(nb: nbformat.NotebookNode, page: Page, all_pages: list[Page]) -> str:
    """The page's HTML: nbconvert's lab template with the plots inline, a course bar on top."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(_for_readers(nb))
    body = _links_to_pages(body)
    return re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + nav(page, all_pages, "../"), body, count=1)


def index(all_pages: list[Page], root: Path = ROOT) -> str:
    """The front page: the README's introduction and chapter table, with links to the pages."""
    from nbconvert.filters import markdown2html

    readme = (root / "README.md").read_text()
    intro = readme.split("## Start")[0].split("\n", 1)[1]
    # badges and the link to this very site are for GitHub's page, not the site's own
    for_github = ("[![", "**[Read it online]")
    intro = "\n".join(line for line in intro.splitlines() if not line.startswith(for_github))
    table = readme.split("## Chapters")[1].split("\n### ")[0]
    text = f"# {TITLE}\n{intro}\n## Chapters\n{table}"
    text = re.sub(r"\]\(notebooks/([^)]+)\.ipynb\)", r"](notebooks/\1.html)", text)
    text = re.sub(r"\]\(exercises/([^)]+)\.ipynb\)", r"](solutions/\1.html)", text)
    body = markdown2html(text)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(TITLE)}</title>"
        "<style>body{font:16px/1.5 system-ui,sans-serif;margin:0}main{max-width:1100px;margin:auto;"
        "padding:0 24px}table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:6px;"
        f"vertical-align:top}}</style></head><body>{nav(None, all_pages, '')}<main>{body}</main>"
        "</body></html>"
    )


def write_page(nb: nbformat.NotebookNode, page: Page, out: Path, all_pages: list[Page]) -> Path:
    """Check an executed notebook (no errors) and write its page; returns the page's path."""
    problems = errors(nb)
    if problems:
        raise RuntimeError(f"{page.source.name} has error output: {'; '.join(problems)}")
    target = out / page.href
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render(nb, page, all_pages), encoding="utf-8")
    return target


def build(out: Path, root: Path = ROOT) -> list[Path]:
    """Execute every page's notebook once and write the whole site to ``out``."""
    all_pages = pages(root)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    written = []
    for number, page in enumerate(all_pages, 1):
        start = time.perf_counter()
        print(f"[{number}/{len(all_pages)}] {page.source.relative_to(root)} …", end=" ", flush=True)
        nb = execute(page.source)
        written.append(write_page(nb, page, out, all_pages))
        print(f"{time.perf_counter() - start:.0f} s, {figures(nb)} figures", flush=True)
    (out / "index.html").write_text(index(all_pages, root), encoding="utf-8")
    (out / ".nojekyll").write_text("")  # GitHub Pages: serve the files as they are
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "_site", help="where to write the site")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    written = build(args.out)
    print(f"\n{len(written)} pages and an index in {args.out} ({time.perf_counter() - start:.0f} s).")
    print(f"Open {args.out / 'index.html'} in a browser.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
