"""Leaf-first LRU: least recently used among the keys no resident key depends on."""

from __future__ import annotations

import heapq
from collections import OrderedDict

from kvbm.policies.base import EvictionPolicy


class LineagePolicy(EvictionPolicy):
    """LRU restricted to *leaves*: keys with no resident child in this tier.

    A block is only useful while its whole prefix is cached, so evicting an interior
    block strands every descendant; evicting leaves first keeps the tier prefix-closed
    and lets a chain shrink from its tail. When the last resident child of a key leaves,
    the key becomes a candidate again at the position its own last use gives it (not as
    if it had just been used), so an old conversation's trunk is next in line after its
    branches are gone.

    Candidates sit in a binary heap of ``(stamp, key)``, ``stamp`` a per-policy clock
    value of the key's last use. Entries are never removed in place (a heap cannot find
    them): an entry is *stale* when its key is gone, pinned, has children or has been
    used since, and ``victim`` drops stale entries as it pops them. Every unpinned leaf
    has at least one live entry. The heap is rebuilt from the live state when stale
    entries outnumber live keys, which keeps its size O(n) and every operation O(log n)
    amortised.

    If every unpinned key has a resident child (all leaves pinned: rare, a pinned leaf
    normally has pinned ancestors), ``victim`` falls back to the least recently used
    unpinned key so that it only returns ``None`` when everything is pinned; the caller
    then deals with the orphaned descendants as for any other removal.
    """

    __slots__ = ("_clock", "_heap", "_nchild", "_parent", "_pinned", "_recency", "_stamp")

    name = "lineage"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._clock = 0
        #: Resident key -> stamp of its last use.
        self._stamp: dict[int, int] = {}
        #: Resident key -> its parent (``None`` for a first block).
        self._parent: dict[int, int | None] = {}
        #: Key -> number of resident keys whose parent it is. Kept for absent parents too,
        #: so a parent inserted after its children knows at once that it is not a leaf.
        self._nchild: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._heap: list[tuple[int, int]] = []
        #: Unpinned keys, least recent first; only consulted by the fallback in ``victim``.
        self._recency: OrderedDict[int, None] = OrderedDict()

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _push(self, key: int) -> None:
        heap = self._heap
        heapq.heappush(heap, (self._stamp[key], key))
        if len(heap) > 2 * len(self._stamp) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        nchild, pinned = self._nchild, self._pinned
        self._heap = [(s, k) for k, s in self._stamp.items()
                      if k not in pinned and not nchild.get(k)]
        heapq.heapify(self._heap)

    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        self._stamp[key] = self._tick()
        self._parent[key] = parent
        if parent is not None:
            # The parent's heap entry (if any) goes stale by itself: it now has a child.
            self._nchild[parent] = self._nchild.get(parent, 0) + 1
        if pinned:
            self._pinned.add(key)
            return
        self._recency[key] = None
        if not self._nchild.get(key):
            self._push(key)

    def access(self, key: int) -> None:
        self._stamp[key] = self._tick()  # older heap entries of the key go stale
        if key in self._pinned:
            return
        self._recency.move_to_end(key)
        if not self._nchild.get(key):
            self._push(key)

    def _forget(self, key: int) -> None:
        del self._stamp[key]
        parent = self._parent.pop(key)
        if parent is None:
            return
        left = self._nchild[parent] - 1
        if left:
            self._nchild[parent] = left
            return
        del self._nchild[parent]
        # The parent is a leaf again, ranked by its own last use.
        if parent in self._stamp and parent not in self._pinned:
            self._push(parent)

    def remove(self, key: int) -> None:
        if key not in self._stamp:
            return
        if key in self._pinned:
            self._pinned.remove(key)
        else:
            del self._recency[key]
        self._forget(key)

    def pin(self, key: int) -> None:
        if key not in self._pinned:
            self._pinned.add(key)
            del self._recency[key]  # its heap entries go stale: ``victim`` checks pins

    def unpin(self, key: int) -> None:
        if key in self._pinned:
            self._pinned.remove(key)
            # A pin brackets a use of the key, so the unpin is its latest use.
            self._stamp[key] = self._tick()
            self._recency[key] = None
            if not self._nchild.get(key):
                self._push(key)

    def victim(self) -> int | None:
        heap, stamp, pinned, nchild = self._heap, self._stamp, self._pinned, self._nchild
        while heap:
            s, key = heapq.heappop(heap)
            if stamp.get(key) == s and key not in pinned and not nchild.get(key):
                del self._recency[key]
                self._forget(key)
                return key
        if not self._recency:
            return None
        key = self._recency.popitem(last=False)[0]
        self._forget(key)
        return key

    def __len__(self) -> int:
        return len(self._stamp)

    def __contains__(self, key: object) -> bool:
        return key in self._stamp

    def is_leaf(self, key: int) -> bool:
        """Whether no resident key of this tier names ``key`` as its parent."""
        return not self._nchild.get(key)
