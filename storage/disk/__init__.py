"""G3: the local disk / NVMe tier (``kvbm.storage.disk``).

Pages in large preallocated slab files, written with O_DIRECT where the filesystem allows,
indexed in lmdb, durable when ``put`` returns; see storage/disk/store.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvbm.storage.disk.config import DiskTierConfig, Durability

if TYPE_CHECKING:
    from kvbm.storage.disk.store import DiskStore

__all__ = ["DiskStore", "DiskTierConfig", "Durability"]


def __getattr__(name: str) -> Any:
    # The store (lmdb, policies, threads) loads on first use: kvbm.config imports the
    # config class from here, and must not pull the whole tier in with it.
    if name == "DiskStore":
        from kvbm.storage.disk.store import DiskStore

        return DiskStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
