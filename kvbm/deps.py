"""Optional dependencies: imported on first use, with an error that names the extra.

The core install (hashing, config, events, the router side) needs none of them; an engine
needs torch (``kvtier[engine]``), a disk or object tier needs lmdb and its client library.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from kvbm.errors import MissingDependencyError


def require(module: str, extra: str, what: str) -> ModuleType:
    """``import module``, or :class:`~kvbm.errors.MissingDependencyError` saying that
    ``what`` needs it and which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name is not None and e.name != module and not module.startswith(e.name + "."):
            raise  # the module is there but one of its own imports is broken: show that
        raise MissingDependencyError(
            f"{what} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'kvtier[{extra}]'") from e
