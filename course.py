#!/usr/bin/env python3
"""One entry point for the course. Needs only Python 3.11+; it sets up ``.venv`` on first use.

    python course.py lab        install what is needed and open the course in JupyterLab
    python course.py test       install what is needed and run the whole test suite
    python course.py progress   run your exercise notebooks and print which checks pass
    python course.py reset 01   start chapter 1's exercise notebook again (--force to discard work)
    python course.py generate   regenerate exercises/ from solutions/ (maintainers)
    python course.py bench      measure the load generator against wrk and the ideal (maintainers)
    python course.py gallery    run every chapter and save its headline figure to docs/gallery (maintainers)

If the Python running this already has every pinned package (Binder, a conda environment made from
environment.yml), that Python is used and nothing is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".course-installed"
COMMANDS = {
    "lab": None,
    "test": None,
    "progress": "support.progress",
    "reset": "support.reset",
    "generate": "support.generate",
    "bench": "support.bench",
    "gallery": "support.gallery",
}


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _requirements_digest() -> str:
    text = (ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
    return hashlib.sha256(text).hexdigest()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        spec, _, marker = line.partition(";")
        if "win32" in marker and ("!=" in marker) == (sys.platform == "win32"):
            continue
        name, _, version = spec.partition("==")
        pins[name.split("[")[0].strip().lower()] = version.strip()
    return pins


def _current_python_has_everything() -> bool:
    from importlib import metadata

    try:
        installed = all(metadata.version(name) == version for name, version in _pins().items())
        return installed and metadata.version("fastapi-async-course") is not None
    except metadata.PackageNotFoundError:
        return False


def ensure_environment() -> Path:
    """The Python to run the course with: this one if it has everything, else ``.venv`` (made once)."""
    if _current_python_has_everything():
        return Path(sys.executable)
    python = _venv_python()
    if not python.exists():
        print("creating .venv …", flush=True)
        try:
            venv.create(VENV, with_pip=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(
                f"could not create .venv ({exc}).\n"
                "On Debian or Ubuntu, Python's venv module is a separate package: "
                "sudo apt install python3-venv, then run this command again."
            ) from None
    if not STAMP.exists() or STAMP.read_text() != _requirements_digest():
        print("installing the pinned packages into .venv (a few minutes the first time) …", flush=True)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        subprocess.run([*pip, "--upgrade", "pip"], check=True)
        subprocess.run([*pip, "-r", "requirements.txt", "-e", "."], check=True, cwd=ROOT)
        STAMP.write_text(_requirements_digest())
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    python = str(ensure_environment())
    if command == "lab":
        args = [python, "-m", "jupyterlab", "--notebook-dir", str(ROOT), *rest]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root; JupyterLab refuses
            args.append("--allow-root")
    elif command == "test":
        args = [python, "-m", "pytest", *rest]
    else:
        args = [python, "-m", COMMANDS[command], *rest]
    return subprocess.run(args, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
