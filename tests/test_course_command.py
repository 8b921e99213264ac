"""course.py, the one entry point: its help, its reading of the pins, and its set-up errors."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path
from unittest import mock

import pytest

import course


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert course.main([]) == 0
    out = capsys.readouterr().out
    for command in ("lab", "test", "progress", "reset", "generate", "bench"):
        assert f"python course.py {command}" in out
    assert course.main(["nonsense"]) == 2


def test_pins_follow_platform_markers() -> None:
    pins = course._pins()
    assert pins["fastapi"] and pins["sqlalchemy"]  # extras are dropped from the name
    assert ("uvloop" in pins) == (sys.platform != "win32")


def test_this_environment_is_used_as_it_is() -> None:
    assert course._current_python_has_everything()


def test_a_missing_venv_module_gets_an_actionable_message(tmp_path: Path) -> None:
    failing = mock.patch.object(venv, "create", side_effect=subprocess.CalledProcessError(1, ["ensurepip"]))
    with (
        mock.patch.object(course, "VENV", tmp_path / ".venv"),
        mock.patch.object(course, "_current_python_has_everything", return_value=False),
        failing,
        pytest.raises(SystemExit, match="sudo apt install python3-venv"),
    ):
        course.ensure_environment()


def test_an_old_python_is_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "version_info", (3, 10, 14, "final", 0))
    with pytest.raises(SystemExit, match=r"needs Python 3\.11 or newer"):
        course.ensure_environment()


def test_a_venv_left_without_pip_is_made_again(tmp_path: Path) -> None:
    """A failed ensurepip leaves .venv/bin/python behind: the next run must not trust it."""
    probes = iter([("3.11.7", False), ("3.11.7", True)])
    with (
        mock.patch.object(course, "VENV", tmp_path / ".venv"),
        mock.patch.object(course, "STAMP", tmp_path / ".venv" / ".stamp"),
        mock.patch.object(course, "_current_python_has_everything", return_value=False),
        mock.patch.object(course, "_probe_venv", side_effect=lambda _: next(probes)),
        mock.patch.object(course, "_create_venv") as create,
        mock.patch.object(sys, "version", "3.11.7 (main)"),
        mock.patch.object(subprocess, "run") as pip,
    ):
        (tmp_path / ".venv").mkdir()
        course.ensure_environment()
    create.assert_called_once()
    assert any("-r" in call.args[0] for call in pip.call_args_list), "then installs the pins"
    assert (tmp_path / ".venv" / ".stamp").exists()


def test_the_install_stamp_changes_with_the_python_version_and_the_pin_files() -> None:
    learner = course._install_digest([course.LEARNER], "3.11.7")
    assert learner != course._install_digest([course.LEARNER], "3.12.1")
    assert learner != course._install_digest([course.LEARNER, course.MAINTAINER], "3.11.7")


def test_learners_get_only_the_learner_pins_and_test_gets_both() -> None:
    assert course._requirement_files(False) == ["requirements.txt"]
    assert course._requirement_files(True) == ["requirements.txt", "requirements-dev.txt"]
    assert "pytest" not in course._pins() and "pytest" in course._pins(course._requirement_files(True))
    assert "test" in course.MAINTAINER_COMMANDS and "lab" not in course.MAINTAINER_COMMANDS


CHILD = """
import signal, sys, time
if sys.argv[1] == "handles":
    signal.signal(signal.SIGINT, lambda *_: (print("child: shutting down cleanly", flush=True), sys.exit(0)))
else:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
print("ready", flush=True)
time.sleep(20)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
@pytest.mark.parametrize(("child", "code"), [("handles", 0), ("dies", 130)])
def test_ctrl_c_goes_to_the_child_and_course_py_exits_quietly(child: str, code: int) -> None:
    """As a terminal does: SIGINT to the whole foreground group (course.py and its child)."""
    import os
    import signal

    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, course; sys.exit(course.run_child(sys.argv[1:]))",
            sys.executable,
            "-c",
            CHILD,
            child,
        ],
        cwd=Path(course.__file__).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert parent.stdout is not None
    assert parent.stdout.readline().strip() == "ready"
    os.killpg(parent.pid, signal.SIGINT)
    out, err = parent.communicate(timeout=20)
    assert parent.returncode == code
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    if child == "handles":
        assert "shutting down cleanly" in out


@pytest.mark.parametrize(
    ("cores", "busy", "workers"),
    [(2, 0.0, 6), (2, 0.2, 5), (2, 1.0, 3), (2, 1.7, 2), (2, 2.0, 2), (1, 0.0, 3), (16, 3.0, 8), (4, 3.5, 2)],
)
def test_the_suite_runs_three_workers_per_free_core(cores: int, busy: float, workers: int) -> None:
    assert course.worker_count(cores, busy) == workers


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux's /proc/stat")
def test_busy_cores_are_measured_from_proc_stat() -> None:
    busy = course._busy_cores(0.1)
    assert busy is not None and 0.0 <= busy <= (os.cpu_count() or 1) + 0.01


def test_the_cores_are_what_this_process_may_use() -> None:
    assert 1.0 <= course._cores() <= (os.cpu_count() or 1)
