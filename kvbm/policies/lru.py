"""Least recently used."""

from __future__ import annotations

from collections import OrderedDict

from kvbm.policies.base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    """Evicts the unpinned key whose last use is the oldest.

    Unpinned keys live in one ``OrderedDict`` in recency order (oldest first): it is a
    C-implemented doubly linked list plus hash map, so every operation is O(1) without a
    Python-level node object per key. Pinned keys are taken out of the order while pinned
    (vLLM's free-queue trick: a block in use is never a candidate, so ``victim`` never has
    to skip over one) and re-enter as most recent when unpinned: a pin always brackets a
    use, so the unpin is the key's latest use.
    """

    __slots__ = ("_order", "_pinned")

    name = "lru"

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self._order: OrderedDict[int, None] = OrderedDict()
        self._pinned: set[int] = set()

    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        if pinned:
            self._pinned.add(key)
        else:
            self._order[key] = None

    def access(self, key: int) -> None:
        # A pinned key is not in the order; it is placed when unpinned.
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: int) -> None:
        if key in self._order:
            del self._order[key]
        else:
            self._pinned.discard(key)

    def pin(self, key: int) -> None:
        if key in self._order:
            del self._order[key]
            self._pinned.add(key)

    def unpin(self, key: int) -> None:
        if key in self._pinned:
            self._pinned.remove(key)
            self._order[key] = None

    def victim(self) -> int | None:
        if not self._order:
            return None
        return self._order.popitem(last=False)[0]

    def __len__(self) -> int:
        return len(self._order) + len(self._pinned)

    def __contains__(self, key: object) -> bool:
        return key in self._order or key in self._pinned
