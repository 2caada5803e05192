"""A compact map from 64-bit block hashes to residency masks (one byte each).

The manager keeps pages of persistent tiers that are not linked into its prefix index (after
a restart every page on disk or in the bucket is one) in this map. A Python ``dict`` of them
costs about 100 bytes per page (an int key, an int value and the table slot): tens of GB for
a disk tier of tens of millions of pages. This table keeps 9 bytes per slot (the key, 8
bytes, in an ``array('Q')``; the mask, 1 byte, in a ``bytearray``) at a load factor of at
most one half, so 18 to 36 bytes per page.

Open addressing with linear probing and backward-shift deletion (no tombstones). A mask of 0
marks an empty slot: a key whose mask becomes 0 leaves the table, as it left the dict.
Slots come from Fibonacci hashing of the key, so keys that are not already random (small
test hashes) spread as well.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

import numpy as np

_U64 = (1 << 64) - 1
_FIB = 0x9E3779B97F4A7C15
_MIN_BITS = 4


class MaskTable:
    """``dict[int, int]``-like: block hash -> non-zero residency mask (< 256)."""

    __slots__ = ("_bits", "_keys", "_len", "_masks", "_shift")

    def __init__(self, capacity: int = 0) -> None:
        bits = _MIN_BITS
        while (1 << bits) < 2 * capacity:
            bits += 1
        self._alloc(bits)
        self._len = 0

    def _alloc(self, bits: int) -> None:
        self._bits = bits
        self._shift = 64 - bits
        self._keys = array("Q", bytes(8 << bits))
        self._masks = bytearray(1 << bits)

    def _home(self, key: int) -> int:
        return ((key * _FIB) & _U64) >> self._shift

    def _find(self, key: int) -> int:
        """The slot holding ``key``, or the empty slot where it would go (negated - 1)."""
        masks, keys = self._masks, self._keys
        cap1 = (1 << self._bits) - 1
        i = ((key * _FIB) & _U64) >> self._shift
        while masks[i]:
            if keys[i] == key:
                return i
            i = (i + 1) & cap1
        return -i - 1

    # ------------------------------------------------------------------------- mapping --
    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and 0 <= key <= _U64 and self._find(key) >= 0

    def get(self, key: int, default: int = 0) -> int:
        i = self._find(key)
        return self._masks[i] if i >= 0 else default

    def __getitem__(self, key: int) -> int:
        i = self._find(key)
        if i < 0:
            raise KeyError(key)
        return self._masks[i]

    def __setitem__(self, key: int, mask: int) -> None:
        if not 0 <= mask < 256:
            raise ValueError(f"a residency mask is a byte, got {mask}")
        if mask == 0:
            self.pop(key, 0)
            return
        i = self._find(key)
        if i >= 0:
            self._masks[i] = mask
            return
        if 2 * (self._len + 1) > (1 << self._bits):
            self._grow(self._bits + 1)
            i = self._find(key)
        i = -i - 1
        self._keys[i] = key
        self._masks[i] = mask
        self._len += 1

    def __delitem__(self, key: int) -> None:
        i = self._find(key)
        if i < 0:
            raise KeyError(key)
        self._remove(i)

    def pop(self, key: int, default: int = 0) -> int:
        i = self._find(key)
        if i < 0:
            return default
        mask = self._masks[i]
        self._remove(i)
        return mask

    def __iter__(self) -> Iterator[int]:
        keys, masks = self._keys, self._masks
        return iter([keys[i] for i in range(len(masks)) if masks[i]])

    def items(self) -> list[tuple[int, int]]:
        keys, masks = self._keys, self._masks
        return [(keys[i], masks[i]) for i in range(len(masks)) if masks[i]]

    def clear(self) -> None:
        self._alloc(_MIN_BITS)
        self._len = 0

    def nbytes(self) -> int:
        """Bytes of the table itself (what it costs per page: ``nbytes() / len()``)."""
        return len(self._keys) * 8 + len(self._masks)

    # ------------------------------------------------------------------------- in bulk --
    def or_many(self, keys: Iterable[int], bit: int) -> None:
        """``self[k] = self.get(k, 0) | bit`` for every key (a tier's pages at open)."""
        if not 0 < bit < 256:
            raise ValueError(f"a residency bit is a byte, got {bit}")
        arr = np.unique(np.fromiter(keys, dtype=np.uint64))
        if arr.size == 0:
            return
        for k in arr.tolist():  # the probe loop itself stays scalar (a few hundred ns each)
            i = self._find(k)
            if i >= 0:
                self._masks[i] |= bit
            else:
                if 2 * (self._len + 1) > (1 << self._bits):
                    self._grow(self._bits + 1)
                    i = self._find(k)
                i = -i - 1
                self._keys[i] = k
                self._masks[i] = bit
                self._len += 1

    def get_many(self, keys: np.ndarray) -> np.ndarray:
        """The masks of many keys at once (uint8, 0 where absent): the probe loop runs over
        the whole batch per step, so a 1,000-block prompt costs a few array operations."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.zeros(keys.size, dtype=np.uint8)
        if not self._len or not keys.size:
            return out
        karr = np.frombuffer(self._keys, dtype=np.uint64)
        marr = np.frombuffer(self._masks, dtype=np.uint8)
        cap1 = np.uint64((1 << self._bits) - 1)
        slots = (keys * np.uint64(_FIB)) >> np.uint64(self._shift)  # wraps mod 2**64
        pending = np.arange(keys.size)
        while pending.size:
            s = slots[pending]
            m = marr[s]
            hit = (m != 0) & (karr[s] == keys[pending])
            out[pending[hit]] = m[hit]
            more = (m != 0) & ~hit
            pending = pending[more]
            slots[pending] = (s[more] + np.uint64(1)) & cap1
        return out

    def with_flag(self, flag: int) -> tuple[np.ndarray, np.ndarray]:
        """The keys (uint64) and masks (uint8) of the entries with ``flag`` set, as copies."""
        masks = np.frombuffer(self._masks, dtype=np.uint8)
        sel = np.flatnonzero(masks & flag)
        return np.frombuffer(self._keys, dtype=np.uint64)[sel].copy(), masks[sel].copy()

    def and_all(self, keep: int) -> None:
        """``self[k] &= keep`` for every key; a mask left 0 would mean an empty slot, so
        ``keep`` must leave every entry non-zero (clearing a flag bit beside the tiers')."""
        masks = np.frombuffer(self._masks, dtype=np.uint8)
        kept = masks & keep
        if ((masks != 0) & (kept == 0)).any():
            raise ValueError(f"and_all({keep:#x}) would empty entries")
        masks[:] = kept

    # ------------------------------------------------------------------------ internals --
    def _grow(self, bits: int) -> None:
        old = self.items()
        self._alloc(bits)
        self._len = 0
        cap1 = (1 << bits) - 1
        keys, masks, shift = self._keys, self._masks, self._shift
        for k, m in old:
            i = ((k * _FIB) & _U64) >> shift
            while masks[i]:
                i = (i + 1) & cap1
            keys[i] = k
            masks[i] = m
        self._len = len(old)

    def _remove(self, i: int) -> None:
        """Empty slot ``i`` and shift back the entries after it that probed past it."""
        keys, masks = self._keys, self._masks
        cap1 = (1 << self._bits) - 1
        masks[i] = 0
        self._len -= 1
        j = i
        while True:
            j = (j + 1) & cap1
            if not masks[j]:
                return
            home = self._home(keys[j])
            # Entry j may move to the hole at i unless its home lies cyclically in (i, j].
            if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
                keys[i], masks[i] = keys[j], masks[j]
                masks[j] = 0
                i = j
