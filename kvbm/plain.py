"""Plain data (dicts, lists, str, numbers) from kvbm's stats dataclasses, for JSON and logs.

Generic over :func:`dataclasses.fields`, so a counter added to a stats class later is
converted too without anyone remembering to list it here.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


def to_plain(obj: Any) -> Any:
    """``obj`` as JSON-able data: dataclasses become dicts of their fields, enums their
    values (a :class:`~kvbm.medium.Medium` its wire name), dict keys that are enums their
    values, tuples and sets lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return to_plain(obj.value)
    if isinstance(obj, dict):
        return {_key(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [to_plain(v) for v in obj]
    return obj


def _key(k: Any) -> Any:
    # JSON object keys are strings; ints and the like json.dumps converts by itself.
    return k.value if isinstance(k, enum.Enum) else k
