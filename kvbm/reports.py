"""What the manager reports: counters (:class:`ManagerStats`) and flush results."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvbm.medium import Medium

if TYPE_CHECKING:
    from kvbm.offload import TierQueueStats
    from kvbm.storage.base import TierStats


@dataclass(frozen=True)
class FlushResult:
    """What :meth:`BlockManager.flush` did."""

    #: committed blocks copied from G1 to G2 on their way down (write-back mode)
    to_host: int
    #: pages stored in each tier below host memory while the flush ran (its own stores and
    #: the offloads it waited for)
    stored: dict[Medium, int]
    #: committed blocks that no tier below host memory holds afterwards (refused by an
    #: admission policy or a full tier, failed, or not reached in time): gone with the process
    volatile: int
    #: pages whose store transfer failed (the tier raised) or was cancelled
    failed: int = 0
    #: false when the time ran out first (:meth:`BlockManager.flush` then raises instead)
    complete: bool = True


@dataclass(frozen=True)
class TierUsage:
    medium: Medium
    capacity_blocks: int
    used_blocks: int  # holding a page (cached or in use)
    free_blocks: int
    pinned_blocks: int  # in use (refcount > 0)
    cached_blocks: int  # committed, in the index
    evictions: int
    admission_rejected: int
    offload_skipped: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (the medium as its wire name)."""
        from kvbm.plain import to_plain

        d: dict[str, Any] = to_plain(self)
        return d


@dataclass(frozen=True)
class ManagerStats:
    """A snapshot of counters. Hit counts are in blocks."""

    lookups: int
    query_blocks: int
    hit_blocks: int
    hits_by_medium: dict[Medium, int]
    committed_blocks: int
    deduplicated_blocks: int
    onboarded_blocks: dict[Medium, int]
    offloaded_blocks: int
    indexed_blocks: int
    events_dropped: int
    tiers: dict[Medium, TierUsage] = field(default_factory=dict)
    #: tiers below host memory: the store's counters and its offload queue's
    lower_tiers: dict[Medium, tuple[TierStats, TierQueueStats]] = field(default_factory=dict)
    #: pages found in persistent tiers whose prefix is not (yet) in the index
    unlinked_pages: int = 0
    #: onboards cut short because G2 had no free page to stage a disk/object load into (all
    #: held or in flight to a slow tier): those blocks were a miss instead of an error
    staging_misses: int = 0
    #: G1/G2 page copies submitted and not landed yet (standalone mode; their pages are held
    #: meanwhile, and G2 copies reach the tiers below and the events once landed)
    copies_in_flight: int = 0

    @property
    def hit_ratio(self) -> float:
        return self.hit_blocks / self.query_blocks if self.query_blocks else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: media keys as their wire names, each lower tier as
        ``{"store": TierStats, "queue": TierQueueStats}`` dicts, plus ``hit_ratio``."""
        from kvbm.plain import to_plain

        d: dict[str, Any] = to_plain(self)
        d["lower_tiers"] = {m.value: {"store": to_plain(s), "queue": to_plain(q)}
                            for m, (s, q) in self.lower_tiers.items()}
        d["hit_ratio"] = self.hit_ratio
        return d
