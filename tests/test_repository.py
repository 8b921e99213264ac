"""The repository itself: exact pins, one environment for pip and conda, clean notebooks, lint."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml

import course

ROOT = Path(__file__).resolve().parent.parent

NOTEBOOKS = sorted(p for d in ("notebooks", "solutions", "exercises") for p in (ROOT / d).glob("*.ipynb"))


PIN_FILES = [course.LEARNER, course.MAINTAINER]


def requirement_lines(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


@pytest.mark.parametrize("name", PIN_FILES)
def test_every_requirement_is_pinned_exactly(name: str) -> None:
    for line in requirement_lines(name):
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[\w.]+(; .+)?", line), (
            f"not an exact pin: {line}"
        )


def test_learner_and_maintainer_pins_are_disjoint() -> None:
    learner, maintainer = (set(course._pins([name])) for name in PIN_FILES)
    assert learner and maintainer
    assert not learner & maintainer, f"pinned in both files: {sorted(learner & maintainer)}"


def test_the_running_environment_has_the_pinned_versions() -> None:
    for name, version in course._pins(PIN_FILES).items():
        assert metadata.version(name) == version, (
            f"{name}: installed {metadata.version(name)}, pinned {version}"
        )


def test_environment_yml_installs_the_same_pins() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip_section == ["-r requirements.txt", "-e ."]
    conda = [d for d in deps if isinstance(d, str)]
    python = next(d for d in conda if d.startswith("python="))
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python == "python=" + requires.removeprefix(">=")
    pinned = set(course._pins())
    assert not [d for d in conda if d.split("=")[0] in pinned], "pin these once, in requirements.txt"


def third_party_imports(source: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"support", "tests", "course", "__future__"}


def notebook_code(path: Path) -> str:
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    code = ("".join(c["source"]) if isinstance(c["source"], list) else c["source"] for c in cells)
    return "\n".join(
        line for c in code for line in c.splitlines() if not line.lstrip().startswith(("%", "!"))
    )


def canonical(name: str) -> str:
    """A distribution's name as PEP 503 compares them (prometheus_client == prometheus-client)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def unpinned_imports(sources: list[str], files: list[str]) -> list[str]:
    distributions = metadata.packages_distributions()
    pinned = {canonical(name) for name in course._pins(files)}
    missing = set()
    for module in set().union(*(third_party_imports(s) for s in sources)):
        names = {canonical(d) for d in distributions.get(module, [module])}
        if not names & pinned:
            missing.add(f"{module} (from {', '.join(sorted(names))})")
    return sorted(missing)


def test_what_a_learner_runs_is_pinned_in_the_learner_file() -> None:
    """support/ and every notebook import only what requirements.txt pins (Binder installs only that)."""
    sources = [p.read_text() for p in ROOT.glob("support/**/*.py")]
    sources += [notebook_code(p) for p in NOTEBOOKS]
    assert unpinned_imports(sources, [course.LEARNER]) == [], "pin these in requirements.txt"


def test_what_the_tests_import_is_pinned_in_one_of_the_two_files() -> None:
    sources = [p.read_text() for p in ROOT.glob("tests/*.py")] + [(ROOT / "course.py").read_text()]
    assert unpinned_imports(sources, PIN_FILES) == [], "pin these in requirements-dev.txt"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebooks_are_committed_without_outputs(path: Path) -> None:
    for index, cell in enumerate(json.loads(path.read_text())["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {index} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_notebooks_stop_what_they_started(path: Path) -> None:
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    last = "".join(code[-1]["source"])
    assert "support.stop_all()" in last, "the last code cell must stop every server the notebook started"


def test_no_stray_files() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    stray = [
        f for f in tracked.splitlines() if "Untitled" in f or ".ipynb_checkpoints" in f or "__pycache__" in f
    ]
    assert stray == []


def test_chapters_have_matching_exercises() -> None:
    chapters = {p.name.split("_")[0] for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")} - {"00"}
    solved = {p.name.split("_")[0] for p in (ROOT / "solutions").glob("*.ipynb")}
    assert chapters == solved


def test_ruff_is_clean() -> None:
    ruff = [sys.executable, "-m", "ruff"]
    lint = subprocess.run([*ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    fmt = subprocess.run(
        [*ruff, "format", "--check", "support", "tests", "course.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout


def test_readme_links_point_at_files() -> None:
    readme = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(((?!https?:|#)[^)#]+)", readme):
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"


def test_ci_and_forks_run_the_readme_test_command() -> None:
    assert "python course.py test" in (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().endswith("exec python3 course.py test")
    assert "export COURSE_REAL_REDIS=required" in ci and "export COURSE_REAL_POSTGRES=required" in ci
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "test.yml").read_text())
    linux = workflow["jobs"]["linux"]
    assert {"run": ".ci/run"} in linux["steps"]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert linux["strategy"]["matrix"]["python"][0] == requires.removeprefix(">="), "the oldest supported"
    others = workflow["jobs"]["other-platforms"]
    assert {o.split("-")[0] for o in others["strategy"]["matrix"]["os"]} == {"macos", "windows"}
    (command,) = [step["run"] for step in others["steps"] if "run" in step]
    assert command.startswith("python course.py test tests/test_notebooks_rerun.py")
    checks = {p.name for p in (ROOT / "tests").glob("test_checks_ch*.py")}
    assert checks <= {word.removeprefix("tests/") for word in command.split()}, "every chapter's checks"
