"""kvbm: a KV-cache block manager across memory tiers.

G1 device memory, G2 host memory, G3 local disk, G4 object storage; blocks are named by
chained xxh3 hashes of their tokens (compatible with Dynamo's KV router) and indexed in one
prefix index. See docs/.
"""

import importlib as _importlib
import os as _os
from typing import TYPE_CHECKING

# pyproject's package-dir maps the top-level folders storage/ and transports/ to kvbm.storage
# and kvbm.transports. Installed copies have them inside this package; a source checkout run
# from its root (``python -m kvbm``, ``python -c``) finds them through this path entry.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "storage")) and _os.path.isfile(
        _os.path.join(_root, "storage", "base.py")):
    __path__.append(_root)

if TYPE_CHECKING:
    from kvbm.config import CopyEngine, DeviceTierConfig, HostTierConfig, ManagerConfig
    from kvbm.events import AllBlocksCleared, AllMediaCleared, BlockRemoved, BlockStored
    from kvbm.hashing import BlockHashes, hash_blocks
    from kvbm.index import MatchResult
    from kvbm.layout import Arrangement, KVKind, KVLayout
    from kvbm.manager import BlockManager
    from kvbm.medium import Medium
    from kvbm.reports import FlushResult, ManagerStats, TierUsage

__version__ = "0.1.0"

__all__ = [
    "AllBlocksCleared",
    "AllMediaCleared",
    "Arrangement",
    "BlockHashes",
    "BlockManager",
    "BlockRemoved",
    "BlockStored",
    "CopyEngine",
    "DeviceTierConfig",
    "FlushResult",
    "HostTierConfig",
    "KVKind",
    "KVLayout",
    "ManagerConfig",
    "ManagerStats",
    "MatchResult",
    "Medium",
    "TierUsage",
    "hash_blocks",
]

#: Public name -> the module that defines it. Loaded on first use (PEP 562): ``import kvbm``
#: stays cheap, and a router that only hashes never loads the manager, its policies and
#: tiers (nor, through them, anything an engine install alone brings).
_EXPORTS = {
    "AllBlocksCleared": "kvbm.events",
    "AllMediaCleared": "kvbm.events",
    "Arrangement": "kvbm.layout",
    "BlockHashes": "kvbm.hashing",
    "BlockManager": "kvbm.manager",
    "BlockRemoved": "kvbm.events",
    "BlockStored": "kvbm.events",
    "CopyEngine": "kvbm.config",
    "DeviceTierConfig": "kvbm.config",
    "FlushResult": "kvbm.reports",
    "HostTierConfig": "kvbm.config",
    "KVKind": "kvbm.layout",
    "KVLayout": "kvbm.layout",
    "ManagerConfig": "kvbm.config",
    "ManagerStats": "kvbm.reports",
    "MatchResult": "kvbm.index",
    "Medium": "kvbm.medium",
    "TierUsage": "kvbm.reports",
    "hash_blocks": "kvbm.hashing",
}

if not TYPE_CHECKING:  # mypy reads the imports above; a __getattr__ would hide typos
    def __getattr__(name: str) -> object:
        module = _EXPORTS.get(name)
        if module is None:
            raise AttributeError(f"module 'kvbm' has no attribute {name!r}")
        value = getattr(_importlib.import_module(module), name)
        globals()[name] = value  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_EXPORTS})
