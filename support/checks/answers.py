"""What the learner's answer is, as a hash: hints move on when the answer changes, not on every run.

A check is called with the learner's answer: functions, classes, an app whose routes and middleware
are the learner's functions, a few numbers. ``fingerprint`` hashes the *code* reachable from those
arguments (never data, which a check run changes: a list the check fills, a client's counters):

- a function or class defined in a notebook cell counts as the whole text of that cell, so a constant
  changed next to the function (``TTL = 30``) is a changed answer too, while running the cell again
  unchanged is not;
- a function or class from a file counts as its source (``inspect.getsource``);
- objects (a FastAPI app, a middleware list, ``Annotated[…, Depends(…)]``) are searched, a bounded
  number of steps deep, for the learner's functions and classes; library code is never hashed;
- numbers and strings passed to the check directly count as their ``repr``.

When nothing of the learner's is found, the fallback is the previous different input of the IPython
session (the exercise cell the learner ran before the check), else the arguments' ``repr`` with
memory addresses removed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import linecache
import marshal
import os
import re
import sys
import sysconfig
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["fingerprint", "is_cell_file", "is_learner_file", "previous_input"]

_MAX_DEPTH = 9
_MAX_NODES = 4000
_MAX_ITEMS = 100
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
# Objects of these packages hold no learner code worth the walk (and some hold a great deal of state).
_NOT_SEARCHED = (
    "_pytest",
    "pytest",
    "pluggy",
    "IPython",
    "ipykernel",
    "jupyter_client",
    "zmq",
    "tornado",
    "traitlets",
    "logging",
    "threading",
    "asyncio",
    "concurrent",
    "multiprocessing",
    "socket",
    "ssl",
    "selectors",
    "sqlalchemy",
)


def is_cell_file(filename: str) -> bool:
    """Whether ``filename`` is the pseudo-file of a notebook cell (ipykernel, IPython, or Python's REPL)."""
    return "ipykernel_" in filename or filename.startswith(("<ipython-input", "<cell"))


@functools.cache
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths[key] for key in ("stdlib", "platstdlib", "purelib", "platlib") if key in paths}
    roots.add(str(Path(__file__).resolve().parent.parent))  # support/: the course's plumbing
    return tuple(os.path.realpath(root) + os.sep for root in roots)


@functools.cache
def is_learner_file(filename: str) -> bool:
    """Whether code from ``filename`` is the learner's: not the standard library's, a package's or ours."""
    if is_cell_file(filename):
        return True
    if filename.startswith("<"):  # <string>, <frozen …>: generated or built-in code
        return False
    return not os.path.realpath(filename).startswith(_library_roots())


def _is_learner_class(cls: type) -> bool:
    module = sys.modules.get(cls.__module__)
    if cls.__module__ == "__main__" or module is None:
        return cls.__module__ not in ("builtins",)
    filename = getattr(module, "__file__", None)
    return filename is not None and is_learner_file(filename)


def _code_text(function: types.FunctionType) -> str:
    filename = function.__code__.co_filename
    if is_cell_file(filename):
        lines = linecache.getlines(filename)
        if lines:
            return "".join(lines)
    try:
        return inspect.getsource(function)
    except (OSError, TypeError):
        return hashlib.sha256(marshal.dumps(function.__code__)).hexdigest()


def _class_text(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):  # a class from a notebook cell: its methods bring in the cell's text
        annotations = {k: _ADDRESS.sub("", repr(v)) for k, v in vars(cls).get("__annotations__", {}).items()}
        return f"class {cls.__qualname__}{[b.__qualname__ for b in cls.__bases__]} {annotations}"


def _global_names(code: types.CodeType) -> Iterable[str]:
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _instance_values(value: Any) -> list[Any]:
    """The attribute values of an instance, read without running any of its code."""
    values: list[Any] = []
    try:
        attributes = object.__getattribute__(value, "__dict__")
    except (AttributeError, TypeError):
        attributes = None
    if isinstance(attributes, dict):
        values += list(attributes.values())[:_MAX_ITEMS]
    for klass in type(value).__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            with contextlib.suppress(AttributeError, TypeError):
                values.append(object.__getattribute__(value, name))
    return values


class _Walk:
    def __init__(self) -> None:
        self.texts: set[str] = set()
        self.seen: set[int] = set()
        self.nodes = 0

    def visit(self, value: Any, depth: int = 0) -> None:
        if depth > _MAX_DEPTH or self.nodes >= _MAX_NODES or isinstance(value, _SCALARS):
            return
        if id(value) in self.seen:
            return
        self.seen.add(id(value))
        self.nodes += 1
        deeper = depth + 1
        if isinstance(value, types.FunctionType):
            self._function(value, deeper)
        elif isinstance(value, types.MethodType):
            self.visit(value.__func__, deeper)
            self.visit(value.__self__, deeper)
        elif isinstance(value, functools.partial):
            for item in (value.func, *value.args, *value.keywords.values()):
                self.visit(item, deeper)
        elif isinstance(value, staticmethod | classmethod):
            self.visit(value.__func__, deeper)
        elif isinstance(value, property):
            for accessor in (value.fget, value.fset, value.fdel):
                self.visit(accessor, deeper)
        elif isinstance(value, type):
            self._class(value, deeper)
        elif isinstance(value, Mapping):
            for item in list(value.values())[:_MAX_ITEMS]:
                self.visit(item, deeper)
        elif isinstance(value, list | tuple | set | frozenset):
            for item in list(value)[:_MAX_ITEMS]:
                self.visit(item, deeper)
        elif isinstance(value, types.ModuleType | types.CodeType | types.FrameType):
            return
        elif type(value).__module__ == "typing" or isinstance(value, types.GenericAlias):
            for item in (*typing.get_args(value), *getattr(value, "__metadata__", ())):
                self.visit(item, deeper)
        else:
            self.visit(type(value), deeper)
            if not type(value).__module__.startswith(_NOT_SEARCHED):
                for item in _instance_values(value):
                    self.visit(item, deeper)

    def _function(self, function: types.FunctionType, depth: int) -> None:
        learner = is_learner_file(function.__code__.co_filename)
        if learner:
            self.texts.add(_code_text(function))
        cells = function.__closure__ or ()
        for cell in cells:
            with contextlib.suppress(ValueError):  # an empty cell
                self.visit(cell.cell_contents, depth)
        self.visit(function.__dict__, depth)  # functools.wraps' __wrapped__, among others
        if not learner:
            return
        for item in (*(function.__defaults__ or ()), *(function.__kwdefaults__ or {}).values()):
            self.visit(item, depth)
        self.visit(function.__annotations__, depth)
        for name in _global_names(function.__code__):
            found = function.__globals__.get(name)
            if isinstance(found, types.FunctionType | type):
                self.visit(found, depth)

    def _class(self, cls: type, depth: int) -> None:
        if not _is_learner_class(cls):
            return
        self.texts.add(_class_text(cls))
        for item in list(vars(cls).values())[: _MAX_ITEMS * 2]:
            self.visit(item, depth)


def previous_input() -> str | None:
    """The latest input of this IPython session that differs from the one running now, if any."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    history = shell.user_ns.get("In") if shell is not None else None
    if not history:
        return None
    current = history[-1]
    for entry in reversed(history[:-1]):
        if entry.strip() and entry != current:
            return str(entry)
    return None


def fingerprint(arguments: Iterable[Any]) -> str:
    """A short hash of the learner's answer: the code reachable from the arguments of a check."""
    walk = _Walk()
    scalars = []
    arguments = list(arguments)
    for argument in arguments:
        if isinstance(argument, _SCALARS):
            scalars.append(repr(argument))
        else:
            walk.visit(argument)
    parts = sorted(walk.texts)
    if not parts:
        fallback = previous_input()
        if fallback is not None:
            parts = [fallback]
        else:
            parts = [_ADDRESS.sub("", repr(a)) for a in arguments if not isinstance(a, _SCALARS)]
    digest = hashlib.sha256("\0".join([*scalars, "\1", *parts]).encode("utf-8", "replace"))
    return digest.hexdigest()[:16]
