"""S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO and a ghost FIFO."""

from __future__ import annotations

from collections import OrderedDict

from kvbm.errors import PolicyError
from kvbm.policies.base import EvictionPolicy

_SMALL, _MAIN = 0, 1
_MAX_FREQ = 3


class S3FIFOPolicy(EvictionPolicy):
    """Most blocks are used once; S3-FIFO finds that out cheaply and evicts them early.

    New keys enter the small queue ``S`` (``small_fraction`` of the tier). At the head of
    ``S`` a key that was used again (``freq >= move_threshold``) moves to the main queue
    ``M``; one that was not is evicted and remembered in the ghost queue ``G`` (keys
    only). A key re-inserted while in ``G`` goes straight to ``M``. At the head of ``M`` a
    key with ``freq > 0`` is reinserted at the tail with ``freq - 1`` (a 2-bit CLOCK),
    otherwise evicted. Every queue operation is O(1); the reinsertion loop is paid for by
    the accesses that raised ``freq`` (amortised O(1)).

    Pinned keys leave their queue (so the loop never meets one) but keep their queue and
    ``freq`` in ``_pinned``; they rejoin the tail of their queue when unpinned.
    """

    __slots__ = ("_freq", "_ghost", "_main", "_pinned", "_small", "move_threshold",
                 "small_target")

    name = "s3fifo"

    def __init__(self, capacity: int, *, small_fraction: float = 0.1,
                 move_threshold: int = 1) -> None:
        super().__init__(capacity)
        if not 0.0 < small_fraction < 1.0:
            raise PolicyError(f"s3fifo small_fraction must be in (0, 1), got {small_fraction!r}")
        if not 1 <= move_threshold <= _MAX_FREQ:
            raise PolicyError(f"s3fifo move_threshold must be in [1, {_MAX_FREQ}], "
                              f"got {move_threshold!r}")
        self.small_target = max(1, int(capacity * small_fraction))
        self.move_threshold = move_threshold
        # FIFO queues as OrderedDicts: O(1) append, pop-oldest and delete-by-key.
        self._small: OrderedDict[int, None] = OrderedDict()
        self._main: OrderedDict[int, None] = OrderedDict()
        self._ghost: OrderedDict[int, None] = OrderedDict()
        #: Resident key -> uses since insert, saturating at 3.
        self._freq: dict[int, int] = {}
        #: Pinned key -> the queue it returns to.
        self._pinned: dict[int, int] = {}

    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            where = _MAIN
        else:
            where = _SMALL
        if pinned:
            self._pinned[key] = where
        elif where == _MAIN:
            self._main[key] = None
        else:
            self._small[key] = None

    def access(self, key: int) -> None:
        f = self._freq[key]
        if f < _MAX_FREQ:
            self._freq[key] = f + 1

    def remove(self, key: int) -> None:
        if self._freq.pop(key, None) is None:
            return
        if key in self._pinned:
            del self._pinned[key]
        elif key in self._small:
            del self._small[key]
        else:
            del self._main[key]

    def pin(self, key: int) -> None:
        if key in self._pinned:
            return
        if key in self._small:
            del self._small[key]
            self._pinned[key] = _SMALL
        else:
            del self._main[key]
            self._pinned[key] = _MAIN

    def unpin(self, key: int) -> None:
        where = self._pinned.pop(key, None)
        if where == _SMALL:
            self._small[key] = None
        elif where == _MAIN:
            self._main[key] = None

    def _remember(self, key: int) -> None:
        ghost = self._ghost
        ghost[key] = None
        # The ghost remembers about as many keys as the main queue can hold.
        if len(ghost) > self.capacity:
            ghost.popitem(last=False)

    def victim(self) -> int | None:
        small, main, freq = self._small, self._main, self._freq
        while small or main:
            if small and (len(small) >= self.small_target or not main):
                key = small.popitem(last=False)[0]
                if freq[key] >= self.move_threshold:
                    main[key] = None  # keeps its freq: a busy key gets extra rounds in M
                    continue
                del freq[key]
                self._remember(key)
                return key
            key = main.popitem(last=False)[0]
            f = freq[key]
            if f:
                freq[key] = f - 1
                main[key] = None
                continue
            del freq[key]
            return key
        return None

    def __len__(self) -> int:
        return len(self._freq)

    def __contains__(self, key: object) -> bool:
        return key in self._freq
