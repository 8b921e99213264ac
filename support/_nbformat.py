"""``nbformat``, imported without the second or so that ``jsonschema`` spends building parsers at import.

``nbformat`` validates notebooks with ``jsonschema``, whose format checkers import ``rfc3987_syntax``
when it is installed (it is, as ``jsonschema[format-nongpl]``): that module builds some thirty Lark
parsers for IRIs as it is imported, 1.2–1.7 s of CPU on a 2-core machine, paid by every test worker
and every ``course.py`` command that reads a notebook. No notebook schema uses an IRI format, so the
process that imports this module goes without that checker (``jsonschema`` skips a checker whose
module is missing). Kernels never import it: a learner's own ``jsonschema`` is untouched.
"""

from __future__ import annotations

import sys

if "jsonschema" not in sys.modules:
    sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]  # import fails: skipped

import nbformat

__all__ = ["nbformat"]
