#!/usr/bin/env python3
"""One entry point for the course. Needs only Python 3.11+; it sets up ``.venv`` on first use.

    python course.py lab        install what is needed and open the course in JupyterLab
    python course.py install    only install what is needed (Codespaces runs this when it is created)
    python course.py test       install what is needed and run the whole test suite
    python course.py progress   run your exercise notebooks and print which checks pass
    python course.py reset 01   start chapter 1's exercise notebook again (--force to discard work)
    python course.py generate   regenerate exercises/ from solutions/ (maintainers)
    python course.py bench      measure the load generator against wrk and the ideal (maintainers)
    python course.py gallery    run every chapter and save its headline figure to docs/gallery (maintainers)
    python course.py site       execute every lesson and solution and write the course's site to _site/

If the Python running this already has every pinned package (Binder, a conda environment made from
environment.yml), that Python is used and nothing is installed. Learners get requirements.txt only;
`test` (and the other maintainer commands) also install requirements-dev.txt.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
STAMP = VENV / ".course-installed"
LEARNER = "requirements.txt"
MAINTAINER = "requirements-dev.txt"
MINIMUM_PYTHON = (3, 11)
COMMANDS = {
    "lab": None,
    "install": None,
    "test": None,
    "progress": "support.progress",
    "reset": "support.reset",
    "generate": "support.generate",
    "bench": "support.bench",
    "gallery": "support.gallery",
    "site": "support.site",
}
MAINTAINER_COMMANDS = {"test", "bench", "gallery"}


def _venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _requirement_files(maintainer: bool) -> list[str]:
    return [LEARNER, MAINTAINER] if maintainer else [LEARNER]


def _install_digest(files: list[str], venv_version: str) -> str:
    """What the stamp records: the pin files, pyproject.toml and the version the venv's Python runs."""
    text = b"".join((ROOT / name).read_bytes() for name in [*files, "pyproject.toml"])
    return hashlib.sha256(text + venv_version.encode()).hexdigest()


_PROBE = "import sys, importlib.util as u; print(sys.version.split()[0], bool(u.find_spec('pip')))"


def _probe_venv(python: Path) -> tuple[str, bool]:
    """The version the venv's Python runs ("" if it does not run) and whether it has pip.

    Asked of the interpreter itself, not read from pyvenv.cfg: a base Python upgraded in place leaves
    the file as it was while the venv's Python changes under it.
    """
    if not python.exists():
        return "", False
    probe = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        return "", False
    version, has_pip = probe.stdout.split()
    return version, has_pip == "True"


def _pins(files: list[str] | None = None) -> dict[str, str]:
    """Package name → pinned version, from the learner's pins (and the maintainer's, if asked)."""
    pins = {}
    for name in files or [LEARNER]:
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#")[0].strip()
            if not line or line.startswith("-"):
                continue
            spec, _, marker = line.partition(";")
            if "win32" in marker and ("!=" in marker) == (sys.platform == "win32"):
                continue
            package, _, version = spec.partition("==")
            pins[package.split("[")[0].strip().lower()] = version.strip()
    return pins


def _current_python_has_everything(files: list[str] | None = None) -> bool:
    from importlib import metadata

    try:
        installed = all(metadata.version(name) == version for name, version in _pins(files).items())
        return installed and metadata.version("fastapi-async-course") is not None
    except metadata.PackageNotFoundError:
        return False


def _check_python() -> None:
    if sys.version_info[:2] < MINIMUM_PYTHON:
        raise SystemExit(
            f"The course needs Python {'.'.join(map(str, MINIMUM_PYTHON))} or newer; this is "
            f"{sys.version.split()[0]} ({sys.executable}). Run it with a newer Python, e.g. "
            "`python3.11 course.py lab` (on Windows: `py -3.11 course.py lab`)."
        )


def _create_venv() -> None:
    print(f"creating .venv with Python {sys.version.split()[0]} …", flush=True)
    try:
        venv.create(VENV, with_pip=True, clear=VENV.exists())
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"could not create .venv ({exc}).\n"
            "On Debian or Ubuntu, Python's venv module is a separate package: "
            "sudo apt install python3-venv, then run this command again."
        ) from None


def ensure_environment(maintainer: bool = False) -> Path:
    """The Python to run the course with: this one if it has everything, else ``.venv`` (made once).

    A venv without pip (an earlier ``ensurepip`` failed) or running another Python version than this
    one is made again; the install stamp records the pin files and the venv Python's version.
    """
    _check_python()
    files = _requirement_files(maintainer)
    if _current_python_has_everything(files):
        return Path(sys.executable)
    python = _venv_python()
    version, has_pip = _probe_venv(python)
    if STAMP.exists() and STAMP.read_text() == _install_digest(files, version):
        return python
    this = sys.version.split()[0]
    if not has_pip or version.split(".")[:2] != this.split(".")[:2]:
        _create_venv()
        version, has_pip = _probe_venv(python)
        if not has_pip:
            raise SystemExit(f"{python} has no pip after creating .venv; delete .venv and try again.")
    what = "the learner's and the maintainer's" if maintainer else "the course's"
    print(f"installing {what} pinned packages into .venv (a few minutes the first time) …", flush=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    requirements = [arg for name in files for arg in ("-r", name)]
    subprocess.run([*pip, *requirements, "-e", "."], check=True, cwd=ROOT)
    STAMP.write_text(_install_digest(files, version))
    return python


def _cores() -> float:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2)."""
    cores: float = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, int(quota) / int(period))
    except (OSError, ValueError):
        pass
    return max(1.0, cores)


def _busy_cores(seconds: float = 0.5) -> float | None:
    """How many cores' worth of CPU the machine is using now (Linux's /proc/stat), or None."""
    import time

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as stat:
            fields = [int(n) for n in stat.readline().split()[1:9]]  # guest time is in user's already
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / max(1, total1 - total0))


def worker_count(cores: float | None = None, busy: float | None = None) -> int:
    """Three test workers per free core, from 2 to 8. The checks mostly wait on sleeps and sockets, so
    more workers than cores overlap: on 2 idle cores six took 297-334 s where three took 541-561 s.
    Eight, with at most three whole notebooks at a time (tests/conftest.py), took 317-338 s for the
    README's command, but made the machine busy enough for chapter 4's check to time out on
    PostgreSQL in CI (its pool of 2 waits at most 1 s). A core that something else keeps busy
    (another build, a CPU hog) leaves room for fewer."""
    cores = cores or _cores()
    busy = _busy_cores() if busy is None else busy
    free = max(0.0, min(cores, cores - (busy or 0.0)))
    return max(2, min(8, round(3 * free)))


def run_child(args: list[str]) -> int:
    """Run a command in the foreground and let it handle Ctrl+C itself.

    The terminal sends Ctrl+C to the child too; JupyterLab then asks whether to shut down and pytest
    prints its summary. This process only waits (a no-op handler, reset in the child at exec), and
    reports an interrupted child as exit status 130 without a traceback.
    """
    previous = signal.signal(signal.SIGINT, lambda *_: None)
    try:
        code = subprocess.run(args, cwd=ROOT).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    return 130 if code == -signal.SIGINT else code


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    try:
        python = str(ensure_environment(maintainer=command in MAINTAINER_COMMANDS))
    except KeyboardInterrupt:
        print("\ninterrupted while installing; run the command again to finish.", file=sys.stderr)
        return 130
    if command == "install":
        print(f"ready: {python}")
        return 0
    if command == "lab":
        args = [python, "-m", "jupyterlab", "--notebook-dir", str(ROOT), *rest]
        if hasattr(os, "geteuid") and os.geteuid() == 0:  # containers often run as root; JupyterLab refuses
            args.append("--allow-root")
    elif command == "test":
        # Workers by the cores free now (see worker_count), each with a PostgreSQL database of its own.
        # `--dist loadgroup` tops each worker up a test or two at a time as it frees up (plain `load`
        # sends batches up front, and one worker was left with several whole chapters). `-n 0`, or
        # plain `pytest`, runs serially.
        workers = worker_count()
        args = [python, "-m", "pytest", "-n", str(workers), "--dist", "loadgroup", *rest]
    else:
        args = [python, "-m", COMMANDS[command], *rest]
    return run_child(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
