"""What a notebook started, by key, so that re-running a cell replaces instead of piling up.

Servers and workers are registered under a key: the notebook cell that started them by default
(``caller_key()``), or a name. Starting another under the same key stops the old one first, and the
last cell of a chapter stops them all.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Generic, Protocol, TypeVar

__all__ = ["Registry", "caller_key"]


class _Stoppable(Protocol):
    def stop(self) -> None: ...


H = TypeVar("H", bound=_Stoppable)


class Registry(Generic[H]):
    """Running handles by key; thread-safe."""

    def __init__(self) -> None:
        self._handles: dict[str, H] = {}
        self._lock = threading.Lock()

    def stop_old(self, key: str) -> None:
        """Stop the handle registered under ``key``, if any (before a new one takes the key)."""
        with self._lock:
            old = self._handles.pop(key, None)
        if old is not None:
            old.stop()

    def add(self, key: str, handle: H) -> None:
        with self._lock:
            self._handles[key] = handle

    def discard(self, key: str, handle: H) -> None:
        """Forget ``handle`` (a handle that stops itself), unless another has taken its key since."""
        with self._lock:
            if self._handles.get(key) is handle:
                del self._handles[key]

    def handles(self) -> list[H]:
        with self._lock:
            return list(self._handles.values())

    def stop_all(self) -> int:
        """Stop every registered handle; returns how many were stopped."""
        handles = self.handles()
        for handle in handles:
            handle.stop()
        return len(handles)


def caller_key() -> str:
    """A key for "the cell that called serve()" (or any starter that calls this directly): the
    notebook cell's id, else the caller's source location."""
    with contextlib.suppress(Exception):
        from IPython import get_ipython

        shell = get_ipython()
        parent = shell.kernel.get_parent() if shell is not None and hasattr(shell, "kernel") else None
        cell_id = (parent or {}).get("metadata", {}).get("cellId")
        if cell_id:
            return f"cell:{cell_id}"
    frame = sys._getframe(2)
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"
