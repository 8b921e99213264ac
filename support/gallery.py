"""Each chapter's headline figure, from a real run: ``python course.py gallery [01 …]``.

Every chapter notebook has one code cell tagged ``headline``: the plot that shows, broken beside
fixed, what the chapter proves. This command runs each chapter in a fresh kernel (as Restart & Run
All would), and saves that cell's figure to ``docs/gallery/<chapter>.png``, which the
README shows. Run it after changing a chapter, and commit the images it wrote.
"""

from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

from support._nbformat import nbformat
from support.kernels import notebook_client

ROOT = Path(__file__).resolve().parent.parent
GALLERY = ROOT / "docs" / "gallery"
TAG = "headline"

__all__ = ["chapters", "headline_cell", "main", "render"]


def chapters(root: Path = ROOT) -> list[Path]:
    """The chapter notebooks (01_… to 06_…), not the start-here notebook."""
    return sorted(p for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb") if not p.name.startswith("00"))


def headline_cell(notebook: nbformat.NotebookNode) -> int:
    """The index of the one code cell tagged ``headline``."""
    tagged = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and TAG in cell.get("metadata", {}).get("tags", [])
    ]
    if len(tagged) != 1:
        raise ValueError(f"expected one code cell tagged {TAG!r}, found {len(tagged)}")
    return tagged[0]


def render(path: Path) -> bytes:
    """Run the whole notebook, as Restart & Run All does; return the PNG its headline cell drew."""
    notebook = nbformat.read(path, as_version=4)
    index = headline_cell(notebook)
    notebook_client(notebook, timeout=300, resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = notebook.cells[index].outputs
    images = [o["data"]["image/png"] for o in outputs if "image/png" in o.get("data", {})]
    if not images:
        raise ValueError(f"{path.name}: the headline cell drew no figure")
    return base64.b64decode(images[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python course.py gallery", description=__doc__.splitlines()[0])
    parser.add_argument("chapters", nargs="*", help="chapter numbers, e.g. 01 04 (default: all)")
    args = parser.parse_args(argv)
    GALLERY.mkdir(parents=True, exist_ok=True)
    selected = [p for p in chapters() if not args.chapters or p.name[:2] in args.chapters]
    for n, path in enumerate(selected, start=1):
        print(f"[{n}/{len(selected)}] {path.name}: running the chapter …", flush=True)
        start = time.monotonic()
        png = render(path)
        target = GALLERY / f"{path.stem}.png"
        target.write_bytes(png)
        seconds = time.monotonic() - start
        print(f"      saved {target.relative_to(ROOT)} ({len(png) // 1024} kB) in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
