"""An open-addressing hash table from u64 keys to int32 values, in two numpy arrays.

Bucketised linear probing: slots come in aligned buckets of :data:`BUCKET` (8 keys: one
64-byte cache line); a key's probe starts at the first slot of its home bucket and runs on slot by
slot, without wrap-around (it may spill into :data:`PAD` spare slots past the last bucket;
a run that would go further makes the caller rebuild a larger table). Keys are spread by
Fibonacci hashing, so that clustered keys (0, 1, 2 ...) land in different buckets. Values
are >= 0; -1 marks an empty slot and -2 a deleted one (a tombstone, until the next rebuild).

Lookups of many keys are vectorised, one bucket per key and round: a whole bucket is copied
per key (``np.take`` of 64-byte rows, several times faster than gathering windows), and at
most half full a bucket holds the key, or an empty slot proving it absent, nearly always.
The caller keeps the table at most half full (:meth:`U64Table.crowded`).
"""

from __future__ import annotations

import array

import numpy as np

from kvbm.errors import InvalidKeyError

U64 = (1 << 64) - 1
BUCKET = 8  # slots per bucket: 8 bools of a bucket read as one u64 (prefix, lookup)
PAD = 8 * BUCKET  # spare slots past the last bucket
MIN_BITS = 4
EMPTY, DELETED = -1, -2
_GOLDEN = 0x9E3779B97F4A7C15
_GOLDEN_U64 = np.uint64(_GOLDEN)


def as_key(value: object, name: str = "seq_hash") -> int:
    """A key (block hash): an int in ``[0, 2**64)``, else :class:`~kvbm.errors.InvalidKeyError`."""
    if type(value) is int and 0 <= value <= U64:
        return value
    if isinstance(value, np.integer) and not isinstance(value, np.bool_) and 0 <= value <= U64:
        return int(value)
    raise InvalidKeyError(f"{name}: a block hash must be an int in [0, 2**64), got {value!r}")


def as_keys(values: object, name: str) -> np.ndarray:
    """Keys (block hashes) as a u64 array: from a 1-D integer array, or a list or tuple of
    ints; anything else is an :class:`~kvbm.errors.InvalidKeyError`."""
    if isinstance(values, np.ndarray):
        if values.ndim != 1 or (values.size and values.dtype.kind not in "iu"):
            raise InvalidKeyError(f"{name} must be a 1-D array of block hashes, got "
                                  f"{values.dtype} of shape {values.shape}")
        if values.dtype.kind == "i" and values.size and values.min() < 0:
            raise InvalidKeyError(f"{name}: a block hash must be an int in [0, 2**64)")
        return values.astype(np.uint64, copy=False)
    if not isinstance(values, list | tuple):
        raise InvalidKeyError(f"{name} must be a list of block hashes, got "
                              f"{type(values).__name__}")
    try:  # array('Q') converts and range-checks at C speed (it refuses floats and strings)
        out = np.frombuffer(array.array("Q", values), dtype=np.uint64)
    except (TypeError, OverflowError):
        out = None
    # It takes True and False too: only an entry equal to 0 or 1 can be one.
    if out is None or ((out <= 1).any() and any(
            type(values[i]) is bool for i in np.flatnonzero(out <= 1).tolist())):
        bad = next(v for v in values if isinstance(v, bool) or not isinstance(
            v, int | np.integer) or isinstance(v, np.bool_) or not 0 <= v <= U64)
        raise InvalidKeyError(f"{name}: a block hash must be an int in [0, 2**64), got {bad!r}")
    return out


def _aligned(n: int, dtype: type, fill: int) -> np.ndarray:
    """``n`` items filled with ``fill``, starting on a 64-byte boundary (a bucket is then
    one cache line of keys)."""
    size = np.dtype(dtype).itemsize
    buf: np.ndarray = np.full(n + 64 // size, fill, dtype=dtype)
    off = (-buf.ctypes.data % 64) // size
    return buf[off: off + n]


class U64Table:
    """u64 key -> int32 value >= 0. Keys are put only when absent (the caller checks)."""

    __slots__ = ("_kb", "_keys", "_last", "_shift", "_ushift", "_vals", "_vb", "bits", "tombs")

    def __init__(self, bits: int) -> None:
        self.bits, self.tombs = bits, 0
        self._shift = 64 - bits + 3  # the top bits of the spread key pick the bucket
        self._ushift = np.uint64(self._shift)
        self._keys = _aligned((1 << bits) + PAD, np.uint64, 0)
        self._vals = _aligned((1 << bits) + PAD, np.int32, EMPTY)
        self._kb = self._keys.reshape(-1, BUCKET)
        self._vb = self._vals.reshape(-1, BUCKET)
        self._last = len(self._kb) - 1  # the last bucket a run may reach

    @staticmethod
    def bits_for(n: int) -> int:
        """Table size (log2) for ``n`` keys, at most half full."""
        return max(MIN_BITS, (2 * n - 1).bit_length())

    @classmethod
    def build(cls, keys: np.ndarray, vals: np.ndarray, extra: int = 0) -> U64Table:
        """A table of absent-from-each-other ``keys`` with room for ``extra`` more."""
        bits = cls.bits_for(keys.size + extra)
        while True:
            table = cls(bits)
            if table.put(keys, vals):
                return table
            bits += 1  # pragma: no cover - a run of PAD slots past the end

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._vals.nbytes

    def crowded(self, live: int, more: int) -> bool:
        """Whether ``more`` keys beside ``live`` ones would make it over half full."""
        return 2 * (live + self.tombs + more) > (1 << self.bits)

    def _homes(self, q: np.ndarray) -> np.ndarray:
        """Home buckets of keys ``q`` (int64: below 2**61, so a view of the u64s)."""
        return ((q * _GOLDEN_U64) >> self._ushift).view(np.int64)

    def probe(self, h: int, pos: int = -1) -> tuple[int, int]:
        """(value, slot) of key ``h``, searching from its home bucket (or slot ``pos``);
        (-1, -1) when absent."""
        vals, keys, end = self._vals, self._keys, len(self._vals)
        if pos < 0:
            pos = (((h * _GOLDEN) & U64) >> self._shift) * BUCKET
        while pos < end:
            v = vals.item(pos)
            if v == EMPTY:
                break
            if keys.item(pos) == h:
                # A key's live slot comes before any deleted slot of the same key (a put
                # takes the first free slot of the run): a deleted match means absent.
                return (v, pos) if v >= 0 else (-1, -1)
            pos += 1
        return -1, -1

    def prefix(self, q: np.ndarray) -> np.ndarray:
        """Values (int64) of the longest leading run of keys ``q`` that are present: the hot
        path of a prefix match, a dozen numpy calls over the whole query."""
        if not q.size or self.probe(int(q[0]))[0] < 0:  # a miss from the first block on:
            return np.empty(0, dtype=np.int64)  # common, and one probe tells
        b = self._homes(q)
        eq = np.take(self._kb, b, axis=0) == q[:, None]
        v: np.ndarray = np.take(self._vals, b * BUCKET + eq.argmax(axis=1)).astype(np.int64)
        # A bucket's 8 bools read as one u64: "any" without a slow axis reduction.
        seen = eq.view(np.uint64).ravel() != 0
        ok = seen & (v >= 0)
        if ok.all():  # the common case: every key in its home bucket
            return v
        for i in np.flatnonzero(~ok).tolist():
            if seen[i]:  # a deleted first match: absent (see probe)
                return v[:i]
            v[i] = self.probe(int(q[i]))[0]  # past its home bucket (rare), or absent
            if v[i] < 0:
                return v[:i]
        return v

    def lookup(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values and slots of keys ``q`` (int64, -1 where absent)."""
        vals = np.full(q.size, -1, dtype=np.int64)
        slots = np.full(q.size, -1, dtype=np.int64)
        idx, b = np.arange(q.size), self._homes(q)
        while idx.size:  # one round per bucket; a second one is rare, a third rarer
            eq = np.take(self._kb, b, axis=0) == q[idx, None]
            seen = eq.view(np.uint64).ravel() != 0
            at = b * BUCKET + eq.argmax(axis=1)
            v = self._vals[at]
            ok = seen & (v >= 0)  # a deleted first match means absent (see probe)
            vals[idx[ok]], slots[idx[ok]] = v[ok], at[ok]
            # Not in the bucket and no empty slot in it: the run goes on in the next one.
            go = ~seen
            go[go] = (np.take(self._vb, b[go], axis=0) == EMPTY).view(np.uint64).ravel() == 0
            go &= b < self._last
            idx, b = idx[go], b[go] + 1
        return vals, slots

    def put(self, q: np.ndarray, vals: np.ndarray) -> bool:
        """Insert absent, distinct keys ``q``; False if a run would pass the end of the
        table (some keys may then be in, some not: the caller rebuilds a larger table)."""
        t, pos, end = self._vals, self._homes(q) * BUCKET, len(self._vals)
        pending = np.arange(q.size)
        while pending.size:
            p = pos[pending]
            if int(p.max()) >= end:
                return False
            free = t[p] < 0
            cand, cp = pending[free], p[free]
            # Several keys may want one slot: each writes its mark, whose mark stays wins.
            tomb = t[cp] == DELETED
            marks = -3 - cand
            t[cp] = marks
            won = t[cp] == marks
            self.tombs -= int(np.count_nonzero(tomb[won]))
            self._keys[cp[won]] = q[cand[won]]
            t[cp[won]] = vals[cand[won]]  # each marked slot had a winner: none stays marked
            pending = np.concatenate([pending[~free], cand[~won]])
            pos[pending] += 1
        return True

    def put_one(self, h: int, val: int) -> bool:
        """Insert one absent key; False if its run would pass the end of the table."""
        t, end = self._vals, len(self._vals)
        pos = (((h * _GOLDEN) & U64) >> self._shift) * BUCKET
        while pos < end:
            v = t.item(pos)
            if v < 0:
                self.tombs += -1 if v == DELETED else 0
                self._keys[pos], t[pos] = h, val
                return True
            pos += 1
        return False

    def delete(self, slots: np.ndarray) -> None:
        """Delete the entries in ``slots`` (as :meth:`lookup` returned them)."""
        self._vals[slots] = DELETED
        self.tombs += int(slots.size)

    def check(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Assert that the table holds exactly ``keys`` -> ``vals`` (tests; O(size))."""
        live = self._vals >= 0
        assert int(np.count_nonzero(live)) == keys.size, "table entries"
        assert int(np.count_nonzero(self._vals == DELETED)) == self.tombs, "tombstones"
        assert (self.lookup(keys)[0] == vals).all(), "table values"
