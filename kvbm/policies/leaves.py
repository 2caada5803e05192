"""Leaf-first bookkeeping shared by ``lineage``, ``adaptive`` and ``predictive``.

A block is only useful while its whole prefix is cached, so these policies evict *leaves*
(keys no resident key of the tier names as its parent) and let a chain shrink from its
tail. :class:`LeafFirstPolicy` keeps, per key, the stamp of its last use, its parent, its
number of resident children and its *segment* (a small int the subclass chooses: probation
/ main, a reuse class, ...), and one binary heap of ``(stamp, key)`` per segment holding
its unpinned leaves.

Heap entries are never removed in place (a heap cannot find them): an entry is *stale*
when its key is gone, pinned, has children, moved to another segment or has been used
since, and :meth:`LeafFirstPolicy._top` drops stale entries as it meets them. Every
unpinned leaf has at least one live entry, in its segment's heap. A heap is rebuilt from
the live state when it outgrows twice the number of keys, which keeps its size O(n) and
every operation O(log n) amortised. When the last resident child of a key leaves, the key
becomes a candidate again at the rank its own last use gives it (not as if just used).

If every unpinned key has a resident child (all leaves pinned: rare, a pinned leaf
normally has pinned ancestors), :meth:`LeafFirstPolicy._fallback` gives the least recently
used unpinned key, so that ``victim`` only returns ``None`` when everything is pinned.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from kvbm.policies.base import EvictionPolicy


class LeafFirstPolicy(EvictionPolicy):
    """Base class: leaf bookkeeping over ``nseg`` segments; subclasses choose segments
    (``_place``, ``_use``) and the victim among the segments' oldest leaves (``victim``,
    using ``_top`` / ``_take`` / ``_fallback``). On its own (one segment) it is ``lineage``.
    """

    __slots__ = ("_clock", "_heaps", "_nchild", "_parent", "_pinned", "_recency", "_seg",
                 "_stamp")

    def __init__(self, capacity: int, nseg: int = 1) -> None:
        super().__init__(capacity)
        self._clock = 0
        #: Resident key -> stamp of its last use.
        self._stamp: dict[int, int] = {}
        #: Resident key -> its segment.
        self._seg: dict[int, int] = {}
        #: Resident key -> its parent (``None`` for a first block).
        self._parent: dict[int, int | None] = {}
        #: Key -> number of resident keys whose parent it is. Kept for absent parents too,
        #: so a parent inserted after its children knows at once that it is not a leaf.
        self._nchild: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._heaps: list[list[tuple[int, int]]] = [[] for _ in range(nseg)]
        #: Unpinned keys, least recent first; only consulted by ``_fallback``.
        self._recency: OrderedDict[int, None] = OrderedDict()

    # ------------------------------------------------------------------------- hooks --
    def _place(self, key: int, parent: int | None) -> int:
        """Segment of a key being inserted (called before it is recorded)."""
        return 0

    def _use(self, key: int) -> int:
        """Segment of a resident key being used (called before its stamp moves)."""
        return self._seg[key]

    def _forgotten(self, key: int) -> None:
        """``key`` left the tier (victim or remove); its records are gone already."""

    # -------------------------------------------------------------------- bookkeeping --
    def _push(self, key: int) -> None:
        heap = self._heaps[self._seg[key]]
        heapq.heappush(heap, (self._stamp[key], key))
        if len(heap) > 2 * len(self._stamp) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        heaps: list[list[tuple[int, int]]] = [[] for _ in self._heaps]
        nchild, pinned, seg = self._nchild, self._pinned, self._seg
        for k, s in self._stamp.items():
            if k not in pinned and not nchild.get(k):
                heaps[seg[k]].append((s, k))
        for h in heaps:
            heapq.heapify(h)
        self._heaps = heaps

    def _top(self, which: int) -> int | None:
        """The live entry at the top of a segment's heap (stale ones are dropped)."""
        heap = self._heaps[which]
        stamp, seg, pinned, nchild = self._stamp, self._seg, self._pinned, self._nchild
        while heap:
            s, key = heap[0]
            if (stamp.get(key) == s and seg[key] == which and key not in pinned
                    and not nchild.get(key)):
                return key
            heapq.heappop(heap)
        return None

    def _take(self, which: int) -> int:
        """Evict the key ``_top(which)`` just returned."""
        key = heapq.heappop(self._heaps[which])[1]
        del self._recency[key]
        self._forget(key)
        return key

    def _fallback(self) -> int | None:
        """Evict the least recently used unpinned key (every unpinned key has a child)."""
        if not self._recency:
            return None
        key = self._recency.popitem(last=False)[0]
        self._forget(key)
        return key

    def _forget(self, key: int) -> None:
        del self._stamp[key]
        del self._seg[key]
        parent = self._parent.pop(key)
        if parent is not None:
            left = self._nchild[parent] - 1
            if left:
                self._nchild[parent] = left
            else:
                del self._nchild[parent]
                if parent in self._stamp and parent not in self._pinned:
                    self._push(parent)   # a leaf again, ranked by its own last use
        self._forgotten(key)

    def _resegment(self, key: int, which: int) -> None:
        """Move a resident key to segment ``which`` keeping its stamp."""
        if self._seg[key] != which:
            self._seg[key] = which
            if key not in self._pinned and not self._nchild.get(key):
                self._push(key)

    # ---------------------------------------------------------------------- interface --
    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        seg = self._place(key, parent)
        self._clock += 1
        self._stamp[key] = self._clock
        self._seg[key] = seg
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
        self._seg[key] = self._use(key)
        self._clock += 1
        self._stamp[key] = self._clock   # older heap entries of the key go stale
        if key in self._pinned:
            return
        self._recency.move_to_end(key)
        if not self._nchild.get(key):
            self._push(key)

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
            del self._recency[key]   # its heap entries go stale: ``_top`` checks pins

    def unpin(self, key: int) -> None:
        if key in self._pinned:
            self._pinned.remove(key)
            # A pin brackets a use of the key, so the unpin is its latest use.
            self._clock += 1
            self._stamp[key] = self._clock
            self._recency[key] = None
            if not self._nchild.get(key):
                self._push(key)

    def victim(self) -> int | None:
        if self._top(0) is not None:
            return self._take(0)
        return self._fallback()

    def __len__(self) -> int:
        return len(self._stamp)

    def __contains__(self, key: object) -> bool:
        return key in self._stamp

    def is_leaf(self, key: int) -> bool:
        """Whether no resident key of this tier names ``key`` as its parent."""
        return not self._nchild.get(key)
