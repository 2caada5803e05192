"""Leaf-first LRU that turns probation-first when that measurably wins (set dueling)."""

from __future__ import annotations

from kvbm.errors import PolicyError
from kvbm.policies.admission import FrequencyAdmission
from kvbm.policies.leaves import LeafFirstPolicy
from kvbm.policies.shadows import EvictionOrder, ShadowLRU, ShadowProbation

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_PROBATION, _MAIN = 0, 1
#: Largest sketch row (counters); 4 rows of this are 16 MiB, for tiers of ~1M blocks.
_MAX_WIDTH = 1 << 22


class AdaptivePolicy(LeafFirstPolicy):
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

    Leaf bookkeeping is :class:`~kvbm.policies.leaves.LeafFirstPolicy`'s (child counts,
    per-segment heaps of ``(stamp, key)`` with lazy deletion, an LRU fallback when every leaf
    is pinned): O(log n) amortised.
    """

    __slots__ = ("_sample_bits", "_score", "_shadow_lru", "_shadow_prob", "_sketch", "margin",
                 "memory")

    name = "adaptive"

    def __init__(self, capacity: int, *, window: float = 4.0, sample: int = 8,
                 memory: float = 0.995, margin: float = 16.0) -> None:
        super().__init__(capacity, 2)
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
        self._shadow_lru = ShadowLRU(cap)
        self._shadow_prob = ShadowProbation(cap)
        self._score = 0.0

    # ------------------------------------------------------------------------- dueling --
    @property
    def mode(self) -> EvictionOrder:
        """The eviction order in force: ``LRU`` or ``PROBATION``."""
        return EvictionOrder.PROBATION if self._score > self.margin else EvictionOrder.LRU

    def _duel(self, key: int, seen: bool) -> None:
        # The top bits of a multiplicative hash pick an unbiased 1-in-2**bits sample, even
        # of structured keys (small consecutive ints, not only xxh3 hashes).
        bits = self._sample_bits
        if bits and ((key * _GOLDEN) & _M64) >> (64 - bits):
            return
        a = self._shadow_lru.ref(key)
        b = self._shadow_prob.ref(key, seen)
        if a != b:   # only references where the two orders disagree carry information
            self._score = self._score * self.memory + (1.0 if b else -1.0)

    # ---------------------------------------------------------------------- interface --
    def _place(self, key: int, parent: int | None) -> int:
        seen = self._sketch.admit(key)   # True when this is not the first recent sighting
        self._duel(key, seen)
        return _MAIN if seen else _PROBATION

    def _use(self, key: int) -> int:
        self._duel(key, True)
        return _MAIN   # used while resident: out of probation

    def victim(self) -> int | None:
        prob = self._top(_PROBATION)
        main = self._top(_MAIN)
        if prob is not None and (main is None or self._score > self.margin
                                 or self._stamp[prob] < self._stamp[main]):
            return self._take(_PROBATION)
        if main is not None:
            return self._take(_MAIN)
        return self._fallback()   # every unpinned key has a resident child

    def in_probation(self, key: int) -> bool:
        """Whether a resident key is still on probation (not seen before, not used since)."""
        return self._seg.get(key) == _PROBATION
