"""Locks the test workers share: a few slots for whole notebooks, one for chapter 7's whole system.

pytest-xdist's workers are separate processes, so these are lock files (``flock`` on POSIX, ``msvcrt``
on Windows) in a directory of this user's own. A lock goes with the process that held it, so a killed
worker frees its slot.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt


def lock_directory() -> Path:
    """A directory of this user's own: in a shared /tmp, another user's lock file of the same name
    could not be opened for writing."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (some containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    directory = Path(tempfile.gettempdir()) / f"fastapi-async-course-locks-{user}"
    directory.mkdir(exist_ok=True)
    return directory


def _try_lock(lock: IO[str]) -> bool:
    """Take ``lock``'s file for this process without waiting; False if another holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError, or Windows' PermissionError
        return False
    return True


def _unlock(lock: IO[str]) -> None:
    if fcntl is not None:
        fcntl.flock(lock, fcntl.LOCK_UN)
    else:  # Windows frees a lock left at close only eventually
        lock.seek(0)
        msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)


@contextlib.contextmanager
def held(name: str, slots: int = 1, directory: Path | None = None) -> Iterator[None]:
    """Hold one of ``slots`` locks called ``name``, waiting (polling) until one is free."""
    directory = directory or lock_directory()
    while True:
        for n in range(slots):
            with open(directory / f"{name}-{n}.lock", "w") as lock:
                if not _try_lock(lock):
                    continue
                try:
                    yield
                finally:
                    _unlock(lock)
                return
        time.sleep(0.1)
