"""support.kernels: notebooks run from code get kernels that need no TCP ports (on POSIX)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from support import kernels

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.notebooks
def test_a_kernel_runs_over_ipc_files_and_leaves_none_behind() -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6 * 7)")])
    client = kernels.notebook_client(nb, timeout=60)
    with client.setup_kernel():
        client.execute_cell(nb.cells[0], 0)
        assert client.km is not None
        transport, ip = client.km.transport, client.km.ip
        files = os.listdir(kernels._ipc_directory()) if kernels.IPC else []
    assert nb.cells[0].outputs[0]["text"] == "42\n"
    if kernels.IPC:
        # no port chosen by binding port 0 and closing it, for another process to take meanwhile
        assert transport == "ipc" and ip.startswith(kernels._ipc_directory())
        assert len(files) == 5, f"one socket file per channel: {files}"
        assert os.listdir(kernels._ipc_directory()) == [], "the kernel's socket files are removed"
    else:
        assert transport == "tcp"


@pytest.mark.parametrize("module", ["support.kernels", "support.progress", "support.site", "support.reset"])
def test_reading_notebooks_skips_the_slow_iri_checker_and_still_validates(module: str) -> None:
    code = (
        f"import sys, {module}, nbformat\n"
        "assert sys.modules.get('rfc3987_syntax', 'absent') is None, sys.modules.get('rfc3987_syntax')\n"
        "nb = nbformat.read('notebooks/00_start_here.ipynb', as_version=4)\n"
        "nbformat.validate(nb)\n"
        "del nb.cells[0]['source']\n"
        "try:\n"
        "    nbformat.validate(nb)\n"
        "except nbformat.ValidationError:\n"
        "    print('rejected')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "rejected", "a broken notebook must still fail validation"
