"""Opening the page stores of the tiers below host memory from their configs."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvbm.deps import require
from kvbm.errors import ConfigError
from kvbm.layout import KVLayout

if TYPE_CHECKING:
    from kvbm.storage.base import PageStore, TierListener


async def open_store(config: Any, layout: KVLayout, listener: TierListener) -> PageStore:
    """The store a tier config describes (disk, S3 or GCS), opened. Client libraries are
    imported here, lazily: they are extras."""
    from kvbm.storage.disk import DiskTierConfig
    from kvbm.storage.gcs import GCSTierConfig
    from kvbm.storage.s3 import S3TierConfig

    # Each tier keeps an lmdb index; the object tiers also need their client library.
    if isinstance(config, DiskTierConfig | S3TierConfig | GCSTierConfig):
        require("lmdb", "disk", "a disk or object tier")
    if isinstance(config, S3TierConfig):
        require("boto3", "s3", "the S3 tier")
    if isinstance(config, GCSTierConfig):
        require("google.cloud.storage", "gcs", "the GCS tier")

    if isinstance(config, DiskTierConfig):
        from kvbm.storage.disk import DiskStore

        return await DiskStore.open(layout, config, listener=listener)
    from kvbm.storage.s3 import S3Store

    if isinstance(config, S3TierConfig):
        return S3Store(layout, config, listener=listener)
    from kvbm.storage.gcs import GCSStore

    if isinstance(config, GCSTierConfig):
        return GCSStore(layout, config, listener=listener)
    raise ConfigError(f"not a tier config: {type(config).__name__}")
