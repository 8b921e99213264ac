"""Kernels for running notebooks from code: the tests, ``course.py progress``, the site and gallery.

jupyter_client chooses a kernel's five TCP ports by binding port 0 and closing the sockets; the kernel
binds them a moment later. Anything else that binds port 0 in between can take one of them, and the
kernel dies before it replies ("Kernel died before replying to kernel_info", seen once in a run of
the test suite, whose workers start servers on free ports all the time). Where the platform has Unix
sockets, the kernels started here talk over IPC files in a private directory instead: there is no
port to race for. Elsewhere (Windows) they use TCP as usual.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from typing import Any

from support._nbformat import nbformat  # before nbclient, which imports nbformat too

# isort: split
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

__all__ = ["IPC", "PrivateKernelManager", "notebook_client"]

IPC = os.name == "posix"
_directory: str | None = None


def _ipc_directory() -> str:
    """One private directory per process for the kernels' socket files (removed when it exits).

    Short, so that a socket's path stays under the 104-108 bytes Unix sockets allow.
    """
    global _directory
    if _directory is None:
        # a long TMPDIR (some macOS set-ups) would leave no room for the file names
        parent = None if len(tempfile.gettempdir()) <= 60 else "/tmp"
        _directory = tempfile.mkdtemp(prefix="kernels-", dir=parent)
        atexit.register(shutil.rmtree, _directory, ignore_errors=True)
    return _directory


class PrivateKernelManager(AsyncKernelManager):
    """A kernel manager whose kernel listens on IPC files of its own (on POSIX), not on TCP ports."""

    def __init__(self, **kwargs: Any) -> None:
        if IPC:
            kwargs.setdefault("transport", "ipc")
        if kwargs.get("transport") == "ipc":
            kwargs.setdefault("ip", os.path.join(_ipc_directory(), uuid.uuid4().hex[:12]))
        super().__init__(**kwargs)


def notebook_client(nb: nbformat.NotebookNode, **kwargs: Any) -> NotebookClient:
    """An nbclient ``NotebookClient`` for ``nb`` on the python3 kernel, by ``PrivateKernelManager``."""
    kwargs.setdefault("kernel_name", "python3")
    return NotebookClient(nb, kernel_manager_class=PrivateKernelManager, **kwargs)
