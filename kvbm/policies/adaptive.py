"""Leaf-first LRU that turns probation-first when that measurably wins (set dueling)."""

from __future__ import annotations

import heapq
from collections import OrderedDict

from kvbm.errors import PolicyError
from kvbm.policies.admission import FrequencyAdmission
from kvbm.policies.base import EvictionPolicy

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_PROBATION, _MAIN = 0, 1
#: Largest sketch row (counters); 4 rows of this are 16 MiB, for tiers of ~1M blocks.
_MAX_WIDTH = 1 << 22


class _ShadowLRU:
    """Keys only: what plain LRU would hold, for the sampled keys."""

    __slots__ = ("cap", "keys")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.keys: OrderedDict[int, None] = OrderedDict()

    def ref(self, key: int, seen: bool) -> bool:
        keys = self.keys
        if key in keys:
            keys.move_to_end(key)
            return True
        keys[key] = None
        if len(keys) > self.cap:
            keys.popitem(last=False)
        return False


class _ShadowProbation:
    """Keys only: what probation-first eviction would hold, for the sampled keys."""

    __slots__ = ("cap", "main", "probation")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.probation: OrderedDict[int, None] = OrderedDict()
        self.main: OrderedDict[int, None] = OrderedDict()

    def ref(self, key: int, seen: bool) -> bool:
        prob, main = self.probation, self.main
        if key in main:
            main.move_to_end(key)
            return True
        if key in prob:
            del prob[key]
            main[key] = None
            return True
        (main if seen else prob)[key] = None
        if len(prob) + len(main) > self.cap:
            (prob if prob else main).popitem(last=False)
        return False


class AdaptivePolicy(EvictionPolicy):
    """Leaf-first LRU (as ``lineage``) or *probation-first*, whichever is winning now.

    A block enters *probation* on its first sighting and *main* when it was seen recently
    before (a count-min sketch of insertions over the last ``window`` x capacity of them,
    the same filter as :class:`FrequencyAdmission`) or is used while resident. The two
    eviction orders:

    * ``lru``: the least recent leaf of either segment, i.e. exactly ``lineage``;
    * ``probation``: the least recent leaf of probation first, main only when probation is
      empty. Blocks used once (single-shot prompts, the last turn of a conversation) then
      never push out blocks that were reused: the effect of a second-sighting admission
      filter, which wins big in a small tier and loses the first reuse of every block in a
      large one.

    Which order is better depends on the tier size and the workload, so the policy measures
    it (*set dueling*, as in adaptive CPU caches): for one key in ``sample`` (by a hash of
    the key), two key-only shadow caches of ``capacity / sample`` entries replay the tier's
    references, one per order. A score, decayed by ``memory`` per decisive reference (so at
    most ``1 / (1 - memory)`` = 200 in size), moves toward the shadow that hit when only one
    of them did. The tier evicts probation-first only while the score exceeds ``margin``:
    leaf-first LRU is the safe order, and in a large tier, where the two shadows rarely
    disagree, a few lucky references must not flip it. Shadows and sketch cost
    O(capacity / sample) keys and a fixed array.

    Leaf bookkeeping is ``lineage``'s (child counts, per-segment heaps of ``(stamp, key)``
    with lazy deletion, an LRU fallback when every leaf is pinned): O(log n) amortised.
    """

    __slots__ = ("_clock", "_heaps", "_nchild", "_parent", "_pinned", "_recency", "_sample_bits",
                 "_score", "_seg", "_shadow_lru", "_shadow_prob", "_sketch", "_stamp", "margin",
                 "memory")

    name = "adaptive"

    def __init__(self, capacity: int, *, window: float = 4.0, sample: int = 8,
                 memory: float = 0.995, margin: float = 16.0) -> None:
        super().__init__(capacity)
        if not window > 0:
            raise PolicyError(f"adaptive window must be > 0, got {window!r}")
        if not isinstance(sample, int) or sample < 1 or sample & (sample - 1):
            raise PolicyError(f"adaptive sample must be a power of two, got {sample!r}")
        if not 0.0 < memory < 1.0:
            raise PolicyError(f"adaptive memory must be in (0, 1), got {memory!r}")
        if not 0.0 <= margin < 1.0 / (1.0 - memory):
            raise PolicyError(f"adaptive margin must be in [0, 1/(1-memory)), got {margin!r}")
        self.memory = memory
        self.margin = margin
        win = max(16, min(int(window * max(capacity, 1)), _MAX_WIDTH // 2))
        # Twice as many counters per row as sightings per window keeps false "seen before"
        # answers rare (see FrequencyAdmission).
        width = min(_MAX_WIDTH, 1 << (2 * win - 1).bit_length())
        self._sketch = FrequencyAdmission(window=win, width=width)
        self._sample_bits = sample.bit_length() - 1
        cap = max(1, capacity // sample)
        self._shadow_lru = _ShadowLRU(cap)
        self._shadow_prob = _ShadowProbation(cap)
        self._score = 0.0
        self._clock = 0
        self._stamp: dict[int, int] = {}
        self._seg: dict[int, int] = {}
        self._parent: dict[int, int | None] = {}
        self._nchild: dict[int, int] = {}
        self._pinned: set[int] = set()
        self._heaps: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
        self._recency: OrderedDict[int, None] = OrderedDict()

    # ------------------------------------------------------------------------- dueling --
    @property
    def mode(self) -> str:
        """The eviction order in force: ``"lru"`` or ``"probation"``."""
        return "probation" if self._score > self.margin else "lru"

    def _duel(self, key: int, seen: bool) -> None:
        # The top bits of a multiplicative hash pick an unbiased 1-in-2**bits sample, even
        # of structured keys (small consecutive ints, not only xxh3 hashes).
        bits = self._sample_bits
        if bits and ((key * _GOLDEN) & _M64) >> (64 - bits):
            return
        a = self._shadow_lru.ref(key, seen)
        b = self._shadow_prob.ref(key, seen)
        if a != b:   # only references where the two orders disagree carry information
            self._score = self._score * self.memory + (1.0 if b else -1.0)

    # ---------------------------------------------------------------------- bookkeeping --
    def _push(self, key: int) -> None:
        heap = self._heaps[self._seg[key]]
        heapq.heappush(heap, (self._stamp[key], key))
        if len(heap) > 2 * len(self._stamp) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        heaps: tuple[list[tuple[int, int]], list[tuple[int, int]]] = ([], [])
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

    def _forget(self, key: int) -> None:
        del self._stamp[key]
        del self._seg[key]
        parent = self._parent.pop(key)
        if parent is None:
            return
        left = self._nchild[parent] - 1
        if left:
            self._nchild[parent] = left
            return
        del self._nchild[parent]
        if parent in self._stamp and parent not in self._pinned:
            self._push(parent)   # a leaf again, ranked by its own last use

    # ---------------------------------------------------------------------- interface --
    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        seen = self._sketch.admit(key)   # True when this is not the first recent sighting
        self._duel(key, seen)
        self._clock += 1
        self._stamp[key] = self._clock
        self._seg[key] = _MAIN if seen else _PROBATION
        self._parent[key] = parent
        if parent is not None:
            self._nchild[parent] = self._nchild.get(parent, 0) + 1
        if pinned:
            self._pinned.add(key)
            return
        self._recency[key] = None
        if not self._nchild.get(key):
            self._push(key)

    def access(self, key: int) -> None:
        self._duel(key, True)
        self._clock += 1
        self._stamp[key] = self._clock
        self._seg[key] = _MAIN   # used while resident: out of probation
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
            del self._recency[key]

    def unpin(self, key: int) -> None:
        if key in self._pinned:
            self._pinned.remove(key)
            self._clock += 1
            self._stamp[key] = self._clock   # a pin brackets a use
            self._recency[key] = None
            if not self._nchild.get(key):
                self._push(key)

    def victim(self) -> int | None:
        prob = self._top(_PROBATION)
        main = self._top(_MAIN)
        if prob is not None and (main is None or self._score > self.margin
                                 or self._stamp[prob] < self._stamp[main]):
            key = prob
            heapq.heappop(self._heaps[_PROBATION])
        elif main is not None:
            key = main
            heapq.heappop(self._heaps[_MAIN])
        elif self._recency:   # every unpinned key has a resident child: oldest of them
            key = next(iter(self._recency))
        else:
            return None
        del self._recency[key]
        self._forget(key)
        return key

    def __len__(self) -> int:
        return len(self._stamp)

    def __contains__(self, key: object) -> bool:
        return key in self._stamp

    def in_probation(self, key: int) -> bool:
        """Whether a resident key is still on probation (not seen before, not used since)."""
        return self._seg.get(key) == _PROBATION
