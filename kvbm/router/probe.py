"""A read-side copy of the node table for prompt walks: sequence hash -> row id, in numpy.

A prompt walk looks up one sequence hash per block. In a dict of a million nodes each lookup
is a few cache misses one after the other (index, entry, key object): ~100-150 ns a block,
most of a 1,000-block walk. Here the keys live in one open-addressing array (linear probing;
the hashes are xxh3 outputs, so their low bits are the slot), and a whole prompt is looked
up in a few vectorised gathers whose misses overlap.

The dict stays the truth (events update it); this copy is brought up to date before a walk,
from the set of hashes whose row changed since (or rebuilt whole when too many did).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

EMPTY = -1  # a slot never used
TOMB = -2  # a slot whose key was deleted (probes go on past it)
_MIN_CAP = 1 << 12
_WINDOW = np.arange(1, 9, dtype=np.uint64)  # the slots after the home slot


class ProbeIndex:
    """``key (u64) -> row id (>= 0)``; ``rows[id]`` is the row object."""

    def __init__(self, table: Mapping[int, Any]) -> None:
        n = len(table)
        cap = _MIN_CAP
        while cap < 4 * n:  # load <= 1/4 after a build: short probes
            cap <<= 1
        self.cap = cap
        self.mask = np.uint64(cap - 1)
        # a slot's key and row id side by side: a probe touches one cache line, not two
        tab = np.zeros((cap, 2), np.int64)
        tab[:, 1] = EMPTY
        #: the (key, row id) pairs as one int64 array (kvbm._xxh3's walks read it whole)
        self.table = tab
        self.keys = tab.view(np.uint64)[:, 0]
        self.vals = tab[:, 1]
        self.used = 0  # live keys + tombstones
        #: row ids: one per distinct row object (rows are interned, so few)
        self.rows: list[Any] = []
        self._ids: dict[int, int] = {}  # id(row) -> row id (rows kept alive in self.rows)
        if n:
            keys = np.fromiter(table.keys(), np.uint64, n)
            # row ids by identity, every loop in C (a million rows, a few thousand distinct)
            distinct = {id(r): r for r in table.values()}
            self.rows = list(distinct.values())
            self._ids = {k: i for i, k in enumerate(distinct)}
            vals = np.fromiter(map(self._ids.__getitem__, map(id, table.values())), np.int64,
                               n)
            # linear probing of keys inserted in the order of their home slots, at once:
            # key i goes to max(its home, the slot after key i-1's)
            home = (keys & self.mask).astype(np.int64)
            order = np.argsort(home)  # any order of equal homes will do
            keys, vals = keys[order], vals[order]
            i = np.arange(n)
            pos = np.maximum.accumulate(home[order] - i) + i
            fit = pos < cap
            self.keys[pos[fit]] = keys[fit]
            self.vals[pos[fit]] = vals[fit]
            self.used = int(fit.sum())
            if not fit.all():  # past the last slot: they wrap around, one by one
                self.upsert(keys[~fit], vals[~fit])
        self.built_rows = len(self.rows)

    def row_id(self, row: Any) -> int:
        rid = self._ids.get(id(row))
        if rid is None:
            rid = self._ids[id(row)] = len(self.rows)
            self.rows.append(row)
        return rid

    def stale(self) -> bool:
        """Worth rebuilding: too full of tombstones, or of row ids nothing uses any more."""
        return 2 * self.used > self.cap or len(self.rows) > 2 * self.built_rows + 4096

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The row id of each key, ``EMPTY`` where absent."""
        mask, vals_a, keys_a = self.mask, self.vals, self.keys
        # the home slot of every key in one gather (most keys are found there, or seen
        # absent); the few displaced ones look at the next slots in one gather, a window
        # each; what is left (long clusters) probes on one slot at a time
        slot = keys & mask
        pair = np.take(self.table, slot.view(np.int64), axis=0)  # slot < cap: a valid index
        v = pair[:, 1]
        hit = pair[:, 0] == keys.view(np.int64)
        hit &= v >= 0
        out = np.where(hit, v, EMPTY)
        todo = np.flatnonzero(~hit & (v != EMPTY))
        if not todo.size:
            return out
        win = (slot[todo][:, None] + _WINDOW) & mask
        v = vals_a[win]
        whit = (v >= 0) & (keys_a[win] == keys[todo][:, None])
        found = whit.any(axis=1)
        out[todo[found]] = v[found, whit[found].argmax(axis=1)]
        go = ~found & (v != EMPTY).all(axis=1)
        todo = todo[go]
        slot = (slot[todo] + np.uint64(_WINDOW.size + 1)) & mask
        while todo.size:
            v = vals_a[slot]
            hit = (v >= 0) & (keys_a[slot] == keys[todo])
            out[todo[hit]] = v[hit]
            go = ~hit & (v != EMPTY)
            todo, slot = todo[go], (slot[go] + np.uint64(1)) & mask
        return out

    def _locate(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each key: its slot and whether it is there (else the slot of the EMPTY
        that ended its probe)."""
        slot = keys & self.mask
        found = np.zeros(keys.size, bool)
        todo = np.arange(keys.size)
        cur = slot.copy()
        vals_a, keys_a = self.vals, self.keys
        while todo.size:
            v = vals_a[cur]
            hit = (v >= 0) & (keys_a[cur] == keys[todo])
            done = hit | (v == EMPTY)
            slot[todo[done]] = cur[done]
            found[todo[hit]] = True
            go = ~done
            todo, cur = todo[go], (cur[go] + np.uint64(1)) & self.mask
        return slot, found

    def upsert(self, keys: np.ndarray, vals: np.ndarray) -> None:
        """Set ``keys`` (distinct) to ``vals``; a negative val deletes the key."""
        slot, found = self._locate(keys)
        new = vals[found]
        self.vals[slot[found]] = np.where(new >= 0, new, TOMB)
        add = ~found & (vals >= 0)
        keys, vals, cur = keys[add], vals[add], slot[add]
        self.used += int(keys.size)
        while keys.size:
            # several new keys may end their probe on one free slot: the first takes it,
            # the others probe on for the next free one (they are known to be absent)
            _, first = np.unique(cur, return_index=True)
            self.keys[cur[first]] = keys[first]
            self.vals[cur[first]] = vals[first]
            rest = np.ones(keys.size, bool)
            rest[first] = False
            keys, vals = keys[rest], vals[rest]
            cur = (cur[rest] + np.uint64(1)) & self.mask
            while cur.size:
                busy = self.vals[cur] >= 0
                if not busy.any():
                    break
                cur[busy] = (cur[busy] + np.uint64(1)) & self.mask

    def update(self, changed: Iterable[int], table: Mapping[int, Any]) -> None:
        """Bring the keys in ``changed`` (distinct) to what ``table`` holds for them now."""
        changed = list(changed)
        if not changed:
            return
        get, row_id = table.get, self.row_id
        vals = np.fromiter((EMPTY if r is None else row_id(r)
                            for r in map(get, changed)), np.int32, len(changed))
        self.upsert(np.fromiter(changed, np.uint64, len(changed)), vals)
