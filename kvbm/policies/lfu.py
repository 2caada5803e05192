"""Least frequently used, with exponentially decaying counts."""

from __future__ import annotations

import heapq
import math

from kvbm.errors import PolicyError
from kvbm.policies.base import EvictionPolicy

_LN2 = math.log(2.0)


class LFUPolicy(EvictionPolicy):
    """Evicts the unpinned key with the smallest *decayed* use count.

    Every use adds 1 to a key's count and every count halves each ``half_life`` ticks of
    the policy's clock (one tick per insert or access), so popularity that stopped fades
    and a block that was hot an hour ago does not squat in the tier forever. ``half_life``
    defaults to ``capacity`` uses: a count survives about as long as it takes to cycle
    the tier once. ``half_life=inf`` is plain LFU.

    Decaying every count at every tick would be O(n). Instead a count is stored in the
    units of tick 0: a use at tick ``t`` adds ``2**(t/half_life)``; all keys decay by the
    same factor, so comparing stored values compares current decayed counts. The stored
    value grows without bound, so it is kept as a logarithm (``log(sum)``, updated with a
    log-add-exp), which never overflows. Ordering is a heap of ``(score, stamp, key)`` with
    lazy deletion (stale entries are skipped when popped, the heap is rebuilt when they
    outnumber live keys). Equal scores go to the least recent key.
    """

    __slots__ = ("_clock", "_heap", "_pinned", "_rate", "_score", "_stamp", "half_life")

    name = "lfu"

    def __init__(self, capacity: int, *, half_life: float | None = None) -> None:
        super().__init__(capacity)
        hl = float(max(capacity, 1) if half_life is None else half_life)
        if not hl > 0:
            raise PolicyError(f"lfu half_life must be > 0, got {half_life!r}")
        self.half_life = hl
        #: ln(2)/half_life: the log-domain weight of one tick (0 for plain LFU).
        self._rate = 0.0 if math.isinf(hl) else _LN2 / hl
        self._clock = 0
        #: Resident key -> ln(sum of 2**(t_i/half_life)) over its uses t_i.
        self._score: dict[int, float] = {}
        #: Resident key -> tick of its last use; identifies the key's live heap entry.
        self._stamp: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._heap: list[tuple[float, int, int]] = []

    def _bump(self, key: int) -> None:
        t = self._clock = self._clock + 1
        w = t * self._rate
        old = self._score.get(key)
        if old is None:
            s = w if self._rate else 0.0
        elif self._rate:
            # log(e**old + e**w) without overflow.
            s = old + math.log1p(math.exp(w - old)) if old > w else \
                w + math.log1p(math.exp(old - w))
        else:
            s = math.log(math.exp(old) + 1.0)
        self._score[key] = s
        self._stamp[key] = t
        if key not in self._pinned:
            self._push(key)

    def _push(self, key: int) -> None:
        heap = self._heap
        heapq.heappush(heap, (self._score[key], self._stamp[key], key))
        if len(heap) > 2 * len(self._stamp) + 64:
            pinned = self._pinned
            self._heap = [(self._score[k], s, k) for k, s in self._stamp.items()
                          if k not in pinned]
            heapq.heapify(self._heap)

    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        if pinned:
            self._pinned.add(key)
        self._bump(key)

    def access(self, key: int) -> None:
        self._bump(key)

    def remove(self, key: int) -> None:
        if key in self._stamp:
            del self._stamp[key]
            del self._score[key]
            self._pinned.discard(key)

    def pin(self, key: int) -> None:
        self._pinned.add(key)  # the heap entry goes stale; the count is kept

    def unpin(self, key: int) -> None:
        if key in self._pinned:
            self._pinned.remove(key)
            self._push(key)

    def victim(self) -> int | None:
        heap, stamp, pinned = self._heap, self._stamp, self._pinned
        while heap:
            _, s, key = heapq.heappop(heap)
            if stamp.get(key) == s and key not in pinned:
                del stamp[key]
                del self._score[key]
                return key
        return None

    def __len__(self) -> int:
        return len(self._stamp)

    def __contains__(self, key: object) -> bool:
        return key in self._stamp

    def count(self, key: int) -> float:
        """The key's current decayed use count (``0.0`` when absent)."""
        s = self._score.get(key)
        if s is None:
            return 0.0
        return math.exp(s - self._clock * self._rate) if self._rate else math.exp(s)
