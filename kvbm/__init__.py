"""kvbm: a KV-cache block manager across memory tiers.

G1 device memory, G2 host memory, G3 local disk, G4 object storage; blocks are named by
chained xxh3 hashes of their tokens (compatible with Dynamo's KV router) and indexed in one
prefix index. See docs/ and DESIGN.md.
"""

import os as _os

# pyproject's package-dir maps the top-level folders storage/ and transports/ to kvbm.storage
# and kvbm.transports. Installed copies have them inside this package; a source checkout run
# from its root (``python -m kvbm``, ``python -c``) finds them through this path entry.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "storage")) and _os.path.isfile(
        _os.path.join(_root, "storage", "base.py")):
    __path__.append(_root)

from kvbm.config import DeviceTierConfig, HostTierConfig, ManagerConfig  # noqa: E402
from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored  # noqa: E402
from kvbm.hashing import BlockHashes, hash_blocks  # noqa: E402
from kvbm.index import MatchResult  # noqa: E402
from kvbm.layout import Arrangement, KVLayout  # noqa: E402
from kvbm.manager import BlockManager, ManagerStats  # noqa: E402
from kvbm.medium import Medium  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "AllBlocksCleared",
    "Arrangement",
    "BlockHashes",
    "BlockManager",
    "BlockRemoved",
    "BlockStored",
    "DeviceTierConfig",
    "HostTierConfig",
    "KVLayout",
    "ManagerConfig",
    "ManagerStats",
    "MatchResult",
    "Medium",
    "hash_blocks",
]
