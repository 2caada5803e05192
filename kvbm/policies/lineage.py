"""Leaf-first LRU: least recently used among the keys no resident key depends on."""

from __future__ import annotations

from kvbm.policies.leaves import LeafFirstPolicy


class LineagePolicy(LeafFirstPolicy):
    """LRU restricted to *leaves*: keys with no resident child in this tier.

    A block is only useful while its whole prefix is cached, so evicting an interior
    block strands every descendant; evicting leaves first keeps the tier prefix-closed
    and lets a chain shrink from its tail. When the last resident child of a key leaves,
    the key becomes a candidate again at the position its own last use gives it (not as
    if it had just been used), so an old conversation's trunk is next in line after its
    branches are gone.

    The bookkeeping (one heap of ``(stamp, key)`` with lazy deletion, O(log n) amortised,
    and the LRU fallback when every leaf is pinned) is :class:`LeafFirstPolicy`'s with a
    single segment.
    """

    __slots__ = ()

    name = "lineage"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity, 1)
