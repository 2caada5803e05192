"""Which slots of the slabs are free, in use, being read, or waiting to be reusable.

Not thread-safe: the store calls it under its state lock.

A slot that leaves the index (delete, eviction, corruption) is not free at once. It first
waits in *limbo* until (a) the index deletion that released it is committed, so that after a
crash no index entry can point at a slot that has since been overwritten, and (b) no reader
is still copying the old page out of it. Only then is it handed out again.

A slab whose writes fail (a slab file replaced by something else, a failing device region,
no space to preallocate it) is *retired*: its slots are not handed out again while this
process runs, so that the next puts go elsewhere instead of failing on the same lowest free
slots over and over. Pages already in it are still read.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from kvbm.storage.disk.directory import Geometry


class SlotAllocator:
    def __init__(self, geometry: Geometry, used: Iterable[int], existing_slots: int) -> None:
        self.max_slots = geometry.max_slots
        self._slab_slots = geometry.slab_slots
        self._retired: set[int] = set()  # slabs
        in_use = set(used)
        # Fresh slots (never written in this store's life) are handed out in order from a
        # bump pointer, so a filling store writes its slabs front to back.
        self._fresh = min(existing_slots, self.max_slots)
        # Freed slots come back lowest first: writes stay packed toward the slab starts,
        # and a batch often gets runs of adjacent slots (one write each).
        self._free = [s for s in range(self._fresh) if s not in in_use]
        heapq.heapify(self._free)
        self._readers: dict[int, int] = {}
        # Keyed by commit ticket, so that settling costs one comparison per commit rather
        # than per slot (a delete of a big batch puts thousands of slots here at once).
        self._limbo: dict[int, list[int]] = {}
        self._in_limbo = 0
        #: Committed, but still being read: free when the last reader ends.
        self._held: set[int] = set()

    def available(self) -> int:
        """Slots that can be handed out now or once their commit and readers are done."""
        return (len(self._free) + (self.max_slots - self._fresh) + self._in_limbo
                + len(self._held))

    def settle(self, done: int) -> None:
        """Free the limbo slots of every commit ticket ``<= done`` (readers permitting)."""
        for ticket in [t for t in self._limbo if t <= done]:
            slots = self._limbo.pop(ticket)
            self._in_limbo -= len(slots)
            readers = self._readers
            self._add_free([s for s in slots if s not in readers])
            self._held.update(s for s in slots if s in readers)

    def _add_free(self, slots: list[int]) -> None:
        if self._retired:
            slots = [s for s in slots if s // self._slab_slots not in self._retired]
        # A big batch (a delete of thousands of pages) re-heapifies in one linear pass
        # rather than paying a push each.
        if len(slots) * 8 > len(self._free):
            self._free += slots
            heapq.heapify(self._free)
        else:
            for s in slots:
                heapq.heappush(self._free, s)

    def take(self, n: int) -> list[int]:
        """Up to ``n`` free slots, ascending."""
        free = self._free
        if n * 4 >= len(free):
            # A sorted list is a heap: one sort beats n pops when n is a good part of it.
            free.sort()
            out = free[:n]
            del free[:n]
        else:
            out = [heapq.heappop(free) for _ in range(n)]
        while len(out) < n and self._fresh < self.max_slots:
            end = min(self.max_slots, self._fresh + n - len(out))
            if self._retired:
                slab = self._fresh // self._slab_slots
                if slab in self._retired:
                    self._fresh = min(self.max_slots, (slab + 1) * self._slab_slots)
                    continue
                end = min(end, (slab + 1) * self._slab_slots)
            out += range(self._fresh, end)
            self._fresh = end
        return out

    def retire(self, slabs: Iterable[int]) -> None:
        """Hand out no slot of ``slabs`` again (their writes fail); see the module
        docstring."""
        self._retired.update(slabs)
        ss, retired = self._slab_slots, self._retired
        self._free = [s for s in self._free if s // ss not in retired]
        heapq.heapify(self._free)

    def give_back(self, slots: Iterable[int]) -> None:
        """Slots taken but never committed to the index: free again at once."""
        self._add_free(list(slots))

    def release(self, slots: Iterable[int], ticket: int) -> None:
        """Slots whose pages left the index in commit ``ticket``."""
        slots = list(slots)
        if slots:
            self._limbo.setdefault(ticket, []).extend(slots)
            self._in_limbo += len(slots)

    def pending(self) -> int:
        """Limbo slots: free as soon as their commit is (unless a read still holds one)."""
        return self._in_limbo

    def start_read(self, slot: int) -> None:
        self._readers[slot] = self._readers.get(slot, 0) + 1

    def end_read(self, slot: int) -> None:
        n = self._readers[slot] - 1
        if n:
            self._readers[slot] = n
            return
        del self._readers[slot]
        if slot in self._held:
            self._held.remove(slot)
            if slot // self._slab_slots not in self._retired:
                heapq.heappush(self._free, slot)
