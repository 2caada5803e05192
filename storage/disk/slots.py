"""Which slots of the slabs are free, in use, being read, or waiting to be reusable.

Not thread-safe: the store calls it under its state lock.

A slot that leaves the index (delete, eviction, corruption) is not free at once. It first
waits in *limbo* until (a) the index deletion that released it is committed, so that after a
crash no index entry can point at a slot that has since been overwritten, and (b) no reader
is still copying the old page out of it. Only then is it handed out again.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from kvbm.storage.disk.directory import Geometry


class SlotAllocator:
    def __init__(self, geometry: Geometry, used: Iterable[int], existing_slots: int) -> None:
        self.max_slots = geometry.max_slots
        in_use = set(used)
        # Fresh slots (never written in this store's life) are handed out in order from a
        # bump pointer, so a filling store writes its slabs front to back.
        self._fresh = min(existing_slots, self.max_slots)
        # Freed slots come back lowest first: writes stay packed toward the slab starts,
        # and a batch often gets runs of adjacent slots (one write each).
        self._free = [s for s in range(self._fresh) if s not in in_use]
        heapq.heapify(self._free)
        self._readers: dict[int, int] = {}
        self._limbo: dict[int, int] = {}  # slot -> ticket of the commit it waits for

    def available(self) -> int:
        """Slots that can be handed out now or once their commit and readers are done."""
        return len(self._free) + (self.max_slots - self._fresh) + len(self._limbo)

    def settle(self, is_done: Callable[[int], bool]) -> None:
        """Move limbo slots whose commit is done and that nobody reads to the free heap."""
        if not self._limbo:
            return
        ready = [s for s, t in self._limbo.items() if s not in self._readers and is_done(t)]
        for s in ready:
            del self._limbo[s]
            heapq.heappush(self._free, s)

    def take(self, n: int) -> list[int]:
        """Up to ``n`` free slots, ascending."""
        out: list[int] = []
        while len(out) < n and self._free:
            out.append(heapq.heappop(self._free))
        while len(out) < n and self._fresh < self.max_slots:
            out.append(self._fresh)
            self._fresh += 1
        out.sort()
        return out

    def give_back(self, slots: Iterable[int]) -> None:
        """Slots taken but never committed to the index: free again at once."""
        for s in slots:
            heapq.heappush(self._free, s)

    def release(self, slots: Iterable[int], ticket: int) -> None:
        """Slots whose pages left the index in commit ``ticket``."""
        for s in slots:
            self._limbo[s] = ticket

    def pending(self) -> int:
        """Limbo slots no reader holds (free as soon as their commit is)."""
        return sum(1 for s in self._limbo if s not in self._readers)

    def start_read(self, slot: int) -> None:
        self._readers[slot] = self._readers.get(slot, 0) + 1

    def end_read(self, slot: int) -> None:
        n = self._readers[slot] - 1
        if n:
            self._readers[slot] = n
        else:
            del self._readers[slot]
