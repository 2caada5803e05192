"""Adaptive Replacement Cache (Megiddo & Modha, FAST 2003)."""

from __future__ import annotations

from collections import OrderedDict

from kvbm.policies.base import EvictionPolicy

_T1, _T2 = 1, 2


class ARCPolicy(EvictionPolicy):
    """Balances recency (``T1``: seen once) against frequency (``T2``: seen again).

    ``B1`` / ``B2`` remember the keys recently evicted from ``T1`` / ``T2`` (keys only, no
    data). A re-insert of a ``B1`` key means ``T1`` was too small, so its target size ``p``
    grows; a ``B2`` key shrinks it. A scan of one-time keys only churns ``T1`` and leaves
    ``T2`` alone, which is what makes ARC scan resistant.

    The manager separates "choose a victim" from "insert the new key", so the replacement
    rule uses the classic test ``|T1| > p`` without knowing the incoming key (the paper's
    tie case ``x in B2 and |T1| == p`` cannot be evaluated; it only matters at equality).

    Pinned keys leave the ``T1``/``T2`` order (so ``victim`` never scans past them) but keep
    their list membership in ``_pinned``, and still count toward ``|T1|``/``|T2|``: they
    return to the most recent end of their own list when unpinned.
    """

    __slots__ = ("_b1", "_b2", "_pinned", "_pinned_t1", "_t1", "_t2", "p")

    name = "arc"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        # OrderedDicts: O(1) move-to-end and pop-oldest, i.e. linked lists with a hash map.
        self._t1: OrderedDict[int, None] = OrderedDict()
        self._t2: OrderedDict[int, None] = OrderedDict()
        self._b1: OrderedDict[int, None] = OrderedDict()
        self._b2: OrderedDict[int, None] = OrderedDict()
        #: Pinned key -> the list it belongs to (``_T1`` or ``_T2``).
        self._pinned: dict[int, int] = {}
        self._pinned_t1 = 0
        #: Target size of T1.
        self.p = 0.0

    def _size_t1(self) -> int:
        return len(self._t1) + self._pinned_t1

    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        c = max(self.capacity, 1)
        if key in self._b1:
            # T1 was too small: it would have kept this key.
            self.p = min(float(c), self.p + max(len(self._b2) / len(self._b1), 1.0))
            del self._b1[key]
            where = _T2
        elif key in self._b2:
            self.p = max(0.0, self.p - max(len(self._b1) / len(self._b2), 1.0))
            del self._b2[key]
            where = _T2
        else:
            where = _T1
            # Keep the ghost lists within the paper's bounds: |T1|+|B1| <= c, all four <= 2c.
            if self._size_t1() + len(self._b1) >= c and self._b1:
                self._b1.popitem(last=False)
            elif (len(self) + len(self._b1) + len(self._b2) >= 2 * c and self._b2):
                self._b2.popitem(last=False)
        if pinned:
            self._pinned[key] = where
            self._pinned_t1 += where == _T1
        elif where == _T1:
            self._t1[key] = None
        else:
            self._t2[key] = None

    def access(self, key: int) -> None:
        where = self._pinned.get(key)
        if where is not None:
            if where == _T1:  # a second use promotes it; it re-enters T2 when unpinned
                self._pinned[key] = _T2
                self._pinned_t1 -= 1
            return
        if key in self._t1:
            del self._t1[key]
            self._t2[key] = None
        else:
            self._t2.move_to_end(key)

    def remove(self, key: int) -> None:
        where = self._pinned.pop(key, None)
        if where is not None:
            self._pinned_t1 -= where == _T1
        elif key in self._t1:
            del self._t1[key]
        elif key in self._t2:
            del self._t2[key]

    def pin(self, key: int) -> None:
        if key in self._pinned:
            return
        if key in self._t1:
            del self._t1[key]
            self._pinned[key] = _T1
            self._pinned_t1 += 1
        else:
            del self._t2[key]
            self._pinned[key] = _T2

    def unpin(self, key: int) -> None:
        where = self._pinned.pop(key, None)
        if where == _T1:
            self._pinned_t1 -= 1
            self._t1[key] = None
        elif where == _T2:
            self._t2[key] = None

    def victim(self) -> int | None:
        t1, t2 = self._t1, self._t2
        if t1 and (self._size_t1() > self.p or not t2):
            key = t1.popitem(last=False)[0]
            self._b1[key] = None
            c = max(self.capacity, 1)
            if len(self._b1) > c:
                self._b1.popitem(last=False)
            return key
        if t2:
            key = t2.popitem(last=False)[0]
            self._b2[key] = None
            if len(self._b2) > 2 * max(self.capacity, 1):
                self._b2.popitem(last=False)
            return key
        return None

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2) + len(self._pinned)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2 or key in self._pinned

    def in_t2(self, key: int) -> bool:
        """Whether a resident key is in the frequency list (seen at least twice)."""
        return key in self._t2 or self._pinned.get(key) == _T2
