"""Binder builds the course from environment.yml: checked with repo2docker's own planner.

``jupyter-repo2docker --no-build --debug`` prints the Dockerfile it would build, without Docker.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def build_plan() -> str:
    repo2docker = shutil.which("jupyter-repo2docker", path=str(Path(sys.executable).parent))
    assert repo2docker, "jupyter-repo2docker is pinned in requirements.txt"
    result = subprocess.run(
        [repo2docker, "--no-build", "--debug", str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout + result.stderr


def test_binder_builds_from_environment_yml_after_copying_the_repository() -> None:
    plan = build_plan()
    update = re.search(r'env update -p \$\{NB_PYTHON_PREFIX\} --file "environment.yml"', plan)
    assert update, "the build installs environment.yml"
    copy = plan.index("COPY --chown=0:0 src/ ${REPO_DIR}/")
    assert copy < update.start(), "copied first, so `-r requirements.txt` and `-e .` resolve"


def test_environment_yml_installs_everything_the_notebooks_import() -> None:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert pip == ["-r requirements.txt", "-e ."]  # every import is pinned there (test_repository)
    python = next(d for d in environment["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python == "python=3.11", "the oldest Python the course supports, as tested here"


def test_the_badge_opens_the_start_here_notebook() -> None:
    readme = (ROOT / "README.md").read_text()
    badge = re.search(r"\(https://mybinder\.org/v2/gh/[^)]+\)", readme)
    assert badge and badge.group(0).endswith("?urlpath=lab/tree/notebooks/00_start_here.ipynb)")
    assert (ROOT / "notebooks" / "00_start_here.ipynb").exists()
