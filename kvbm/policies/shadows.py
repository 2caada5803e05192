"""Key-only shadow caches for set dueling: what another eviction order would hold, replayed
on a sample of the keys so that a policy can measure it against the order it runs."""

from __future__ import annotations

import enum
from collections import OrderedDict


class EvictionOrder(enum.Enum):
    """The eviction order a duelling policy (``adaptive``, ``predictive``) runs now."""

    LRU = "lru"  # leaf-first LRU, i.e. ``lineage``
    PROBATION = "probation"  # unconfirmed blocks first
    SCORED = "scored"  # lowest expected reuse first (``predictive``)


class ShadowLRU:
    """Keys only: what plain LRU would hold, for the sampled keys."""

    __slots__ = ("cap", "keys")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.keys: OrderedDict[int, None] = OrderedDict()

    def ref(self, key: int) -> bool:
        keys = self.keys
        if key in keys:
            keys.move_to_end(key)
            return True
        keys[key] = None
        if len(keys) > self.cap:
            keys.popitem(last=False)
        return False


class ShadowProbation:
    """Keys only: what probation-first eviction would hold, for the sampled keys."""

    __slots__ = ("cap", "main", "probation")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.probation: OrderedDict[int, None] = OrderedDict()
        self.main: OrderedDict[int, None] = OrderedDict()

    def ref(self, key: int, proven: bool) -> bool:
        prob, main = self.probation, self.main
        if key in main:
            main.move_to_end(key)
            return True
        if key in prob:
            del prob[key]
            main[key] = None
            return True
        (main if proven else prob)[key] = None
        if len(prob) + len(main) > self.cap:
            (prob if prob else main).popitem(last=False)
        return False
