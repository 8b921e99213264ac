"""Codespaces / dev containers: the configuration is valid and runs the README's own commands."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = json.loads((ROOT / ".devcontainer" / "devcontainer.json").read_text())


def readme_commands() -> set[str]:
    """The ``python course.py …`` commands the README shows in its code blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    return {line.split("#")[0].strip() for b in blocks for line in b.splitlines() if "course.py" in line}


def test_image_is_a_supported_python() -> None:
    image = CONFIG["image"]
    match = re.fullmatch(r"mcr\.microsoft\.com/devcontainers/python:(?:\d+-)?3\.(\d+)(?:-\w+)?", image)
    assert match and int(match.group(1)) >= 11, image


def test_it_installs_and_opens_the_course_with_the_readmes_commands() -> None:
    commands = readme_commands()
    assert CONFIG["onCreateCommand"] in commands, (CONFIG["onCreateCommand"], commands)
    lab = CONFIG["postAttachCommand"]
    assert lab.startswith("python course.py lab ") and "python course.py lab" in commands
    assert "--port=8888" in lab and "--no-browser" in lab
    assert "notebooks/00_start_here.ipynb" in lab
    assert (ROOT / "notebooks" / "00_start_here.ipynb").exists()


def test_jupyterlab_port_is_forwarded_and_labelled_and_two_cores_are_asked_for() -> None:
    assert 8888 in CONFIG["forwardPorts"]
    assert CONFIG["portsAttributes"]["8888"]["label"] == "JupyterLab"
    assert CONFIG["hostRequirements"]["cpus"] == 2
    assert CONFIG["customizations"]["codespaces"]["openFiles"] == ["notebooks/00_start_here.ipynb"]
