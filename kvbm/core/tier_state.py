"""The per-tier bookkeeping of :class:`~kvbm.BlockManager` and the records its owner thread
receives from the tiers' workers; the residency bits it keeps beside the tiers'."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.config import ManagerConfig
from kvbm.core.handles import OnboardHandle, StageHandle
from kvbm.errors import ConfigError, LayoutError
from kvbm.index import BlockRecord
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.memory.local_copy import CopyTicket
from kvbm.policies.base import AdmissionPolicy, EvictionPolicy
from kvbm.pool import DevicePool, HostPool, SlotAllocator

if TYPE_CHECKING:
    from kvbm.storage.base import PageStore

GPU_BIT = Medium.GPU.bit
HOST_BIT = Medium.CPU_PINNED.bit
LOWER_BITS = Medium.DISK.bit | Medium.OBJECT.bit
#: In the table of unlinked pages: a block compacted out of the index (resident only below
#: host memory, no child in the index) whose BlockStored events still stand. Without it the
#: page is unlinked and unannounced (after a restart, or its prefix left every tier).
ANNOUNCED = 0x80
#: Hashes per BlockRemoved of clear(): a cleared million-block index is withdrawn in
#: messages of a size every subscriber takes in stride.
CLEAR_EVENT_BLOCKS = 4096


class MemTier:
    """One in-memory tier: its pool, the record owning each slot, and its policies."""

    __slots__ = ("admission", "alloc", "bit", "evictions", "is_g1", "medium", "owner", "pinned",
                 "policy", "pool", "rejected", "skipped")

    def __init__(self, medium: Medium, pool: DevicePool | HostPool, policy: EvictionPolicy,
                 admission: AdmissionPolicy | None) -> None:
        self.medium = medium
        self.bit = medium.bit
        self.is_g1 = medium is Medium.GPU
        self.pool = pool
        self.alloc: SlotAllocator = pool.allocator
        self.owner: list[BlockRecord | None] = [None] * pool.num_blocks
        self.policy = policy
        self.admission = admission
        #: committed blocks of this tier with a refcount > 0 (resident but not evictable)
        self.pinned = 0
        self.evictions = 0
        self.rejected = 0  # refused by admission
        self.skipped = 0  # no room (every page pinned)

    def slot(self, rec: BlockRecord) -> int:
        return rec.g1 if self.is_g1 else rec.g2

    def set_slot(self, rec: BlockRecord, slot: int) -> None:
        if self.is_g1:
            rec.g1 = slot
        else:
            rec.g2 = slot

    def evictable(self) -> int:
        return len(self.policy) - self.pinned


class StoreTier:
    """A tier below host memory: its store runs on the offload engine."""

    __slots__ = ("bit", "deferred", "failed", "inflight", "medium", "store", "stored")

    def __init__(self, store: PageStore) -> None:
        self.store = store
        self.medium = store.medium
        self.bit = store.medium.bit
        #: keys with a store transfer under way (not submitted twice)
        self.inflight: set[int] = set()
        #: G2 pages waiting for room under the tier's in-flight bound (oldest first)
        self.deferred: dict[int, BlockRecord] = {}
        self.stored = 0  # pages stored (monotonic; flush() reports the difference)
        self.failed = 0  # pages whose store transfer failed or was cancelled


@dataclass(frozen=True, slots=True)
class Removal:
    """A tier dropped pages on its own (eviction, corruption); from a tier's thread."""

    medium: Medium
    keys: list[int]


@dataclass(frozen=True, slots=True)
class Discovered:
    """A shared tier found pages another writer stored (storage/objectdiscovery.py); from
    a tier's thread."""

    medium: Medium
    keys: list[int]


@dataclass(frozen=True, slots=True)
class StoreContext:
    """What a store transfer carries back to the manager: the tier, and each page's record
    with the G2 slot it was read from (the record may have moved or gone meanwhile)."""

    tier: StoreTier
    pages: list[tuple[BlockRecord, int]]


@dataclass(frozen=True, slots=True)
class LocalCopy:
    """A G1/G2 copy in flight (standalone mode): the pages it holds until it lands."""

    ticket: CopyTicket
    #: G1 -> G2: each block with the G2 page it is being copied to (empty for G2 -> G1)
    offloaded: list[tuple[BlockRecord, int]]
    g1_holds: list[int]  # G1 pages held as sources
    g2_holds: list[int]  # G2 pages held (destinations of an offload, sources of an onboard)


@dataclass(frozen=True, slots=True)
class LoadContext:
    """What a load transfer carries back: the onboard or stage it serves, the tier it reads
    from and the positions of its blocks in that handle's prefix."""

    handle: OnboardHandle | StageHandle
    medium: Medium
    positions: list[int]


def check_host_pool(pool: Any, layout: KVLayout, config: ManagerConfig) -> None:
    """A host pool handed in (a shared-memory one) must be the one the config describes."""
    if not isinstance(pool, HostPool):
        raise ConfigError(f"host_pool must be a HostPool, got {type(pool).__name__}")
    if config.host is None:
        raise ConfigError("host_pool given but the config has no host tier (config.host)")
    if pool.layout.fingerprint != layout.fingerprint:
        raise LayoutError("host_pool was made for another layout")
    if pool.num_blocks != config.host.num_blocks:
        raise ConfigError(f"host_pool holds {pool.num_blocks} pages but host.num_blocks is "
                          f"{config.host.num_blocks}")


class FlushTimeout(Exception):
    """Internal: a flush ran out of time (flush() raises TransferError, close() warns)."""
