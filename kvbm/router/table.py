"""The node table under :class:`kvbm.router.KvIndexer`: residency bitmasks per prefix.

The index is a radix tree flattened by its own keys: a node is named by the *sequence hash*
of its block (DESIGN.md §4), which already encodes the whole prefix, so a child needs no
pointer to its parent and a prompt is matched by walking its sequence hashes from the root
until one is missing.

A node is one tuple ``(gpu, cpu_pinned, disk, object, any)`` of worker bitmasks (bit i is
the worker with index i), not one object per (worker, block). Tuples are interned: the nodes
of a prefix that a set of workers stored together share one tuple, which keeps the table
small and lets a prompt walk compare nodes by identity (one dict lookup per block, equal
consecutive nodes collapsing into one run, in C).

Publishers name blocks by their own hashes, and removals carry only those: each worker keeps
a map ``publisher hash -> sequence hash`` per medium (the values are the int objects of the
nodes' keys: a store allocates no int per block for its map, a removal pops one entry). Not
thread-safe: the indexer holds its lock around every call.
"""

from __future__ import annotations

import array
from collections.abc import Iterable, Sequence
from itertools import groupby, repeat
from types import ModuleType

import numpy as np

from kvbm.medium import MEDIUM_BY_BIT, Medium
from kvbm.router.probe import ProbeIndex

_native: ModuleType | None  # kvbm/_xxh3.c: whole prompt walks in C; None: not built
try:
    from kvbm import _xxh3 as _native
except ImportError:  # the numpy walk gives the same runs
    _native = None

N_MEDIA = len(MEDIUM_BY_BIT)
_ANY = N_MEDIA  # index of the union mask in a node
_OBJ = Medium.OBJECT.bit.bit_length() - 1
#: medium -> its index in a node
MEDIUM_INDEX = {m: i for i, m in enumerate(MEDIUM_BY_BIT)}
#: The intern table is forgotten beyond this many residency patterns (nodes keep theirs; the
#: patterns seen since are shared again). Bounds the patterns that nothing uses any more.
_INTERN_MAX = 1 << 16
#: Prompts of at least this many blocks are walked through the numpy copy of the table
#: (:mod:`kvbm.router.probe`); shorter ones through the dict (numpy's per-call cost wins
#: only on long walks).
PROBE_MIN_BLOCKS = 64

Row = tuple[int, int, int, int, int]
#: (node, workers still matching, blocks) for a run of equal consecutive nodes of a prompt
Run = tuple[Row, int, int]


class Worker:
    __slots__ = ("bit", "dups", "fresh", "group", "idx", "media", "name")

    def __init__(self, name: str, idx: int) -> None:
        self.name = name
        self.idx = idx
        self.bit = 1 << idx
        #: per medium, publisher hash -> sequence hash of the blocks resident there (a hash
        #: in several media names one node in each: a store that says otherwise replaces it)
        self.media: list[dict[int, int]] = [{} for _ in range(N_MEDIA)]
        #: (sequence hash << 2 | medium index) -> extra publisher hashes of this worker that
        #: name the same node in that medium (two vLLM hashes for one token prefix, e.g.
        #: different cache salts): a removal of one of them must not clear the bit
        self.dups: dict[int, int] = {}
        #: per medium, the row of a node that only this worker holds, only there
        self.fresh: list[Row | None] = [None] * N_MEDIA
        self.group: str | None = None


class NodeTable:
    """Nodes, workers and object groups; counters of what stores and removals found."""

    def __init__(self) -> None:
        self.rows: dict[int, Row] = {}
        self._intern: dict[Row, Row] = {}
        self.workers: dict[str, Worker] = {}
        self._by_idx: dict[int, Worker] = {}
        self._groups: dict[str, int] = {}  # object group -> worker bitmask
        self._expand: dict[int, int] = {}  # object mask -> mask with its groups, cached
        self.n = dict.fromkeys(("stored", "removed", "unknown_removals", "conflicts",
                                "clears"), 0)
        #: the walk's copy of ``rows`` and the nodes changed since it was brought up to date
        #: (both None until a long walk wants it, or after too many changes: rebuilt then)
        self._probe: ProbeIndex | None = None
        self._dirty: set[int] | None = None

    def _note(self, seqs: Iterable[int]) -> None:
        """The rows of ``seqs`` changed (call only while ``_dirty`` is not None)."""
        d = self._dirty
        assert d is not None
        d.update(seqs)
        if len(d) > max(4096, len(self.rows) >> 2):  # cheaper to rebuild at the next walk
            self._probe = self._dirty = None

    # ----------------------------------------------------------------------- workers --
    def worker(self, name: str) -> Worker:
        """The worker named ``name``, made on first use (it takes the lowest free bit)."""
        w = self.workers.get(name)
        if w is None:
            idx = next(i for i in range(len(self._by_idx) + 1) if i not in self._by_idx)
            w = self.workers[name] = self._by_idx[idx] = Worker(name, idx)
        return w

    def drop_worker(self, w: Worker) -> None:
        self.clear(w)
        self.set_group(w, None)
        del self.workers[w.name], self._by_idx[w.idx]

    def clear(self, w: Worker) -> None:
        rows, bit, nbit = self.rows, w.bit, ~w.bit
        seqs = [s for d in w.media for s in d.values()]
        if self._dirty is not None:
            self._note(seqs)
        old: Row | None = None
        new: Row | None = None
        for s in seqs:
            row = rows.get(s)
            if row is None or not row[_ANY] & bit:
                continue  # another publisher hash of this worker for the node: done already
            if row is not old:
                old = row
                new = self._intern_row(tuple(m & nbit for m in row)) if row[_ANY] & nbit \
                    else None
            if new is None:
                del rows[s]
            else:
                rows[s] = new
        w.media = [{} for _ in range(N_MEDIA)]
        w.dups.clear()
        self.n["clears"] += 1

    def clear_medium(self, w: Worker, mi: int) -> None:
        """Drop ``w``'s blocks in medium ``mi`` alone (one pass over its map, as
        :meth:`clear`; nodes sharing a residency share one transition)."""
        bit, nbit, rows = w.bit, ~w.bit, self.rows
        if w.media[mi]:
            gone = list(w.media[mi].values())
            if self._dirty is not None:
                self._note(gone)
            w.media[mi] = {}
            old: Row | None = None
            new: Row | None = None
            for s in gone:
                row = rows.get(s)
                if row is None or not row[mi] & bit:
                    continue  # another publisher hash of this worker for the node: done already
                if row is not old:
                    old = row
                    cells = list(row)
                    cells[mi] &= nbit
                    if not (cells[0] | cells[1] | cells[2] | cells[3]) & bit:
                        cells[_ANY] &= nbit
                    new = self._intern_row(tuple(cells)) if cells[_ANY] else None
                if new is None:
                    del rows[s]
                else:
                    rows[s] = new
            if w.dups:
                w.dups = {k: n for k, n in w.dups.items() if k & 3 != mi}
        self.n["clears"] += 1

    def _intern_row(self, row: tuple[int, ...]) -> Row:
        t: Row = row  # type: ignore[assignment]
        out = self._intern.setdefault(t, t)
        if len(self._intern) > _INTERN_MAX:
            self._intern.clear()
        return out

    def set_group(self, w: Worker, group: str | None) -> None:
        if w.group is not None:
            left = self._groups[w.group] & ~w.bit
            if left:
                self._groups[w.group] = left
            else:
                del self._groups[w.group]
        w.group = group
        if group is not None:
            self._groups[group] = self._groups.get(group, 0) | w.bit
        self._expand.clear()

    def _expand_obj(self, mask: int) -> int:
        """``mask`` plus every worker sharing an object group with a worker in it."""
        out = self._expand.get(mask)
        if out is None:
            out, m = mask, mask
            while m:
                low = m & -m
                g = self._by_idx[low.bit_length() - 1].group
                if g is not None:
                    out |= self._groups[g]
                m ^= low
            if len(self._expand) > 4096:  # bounded: masks churn as residency changes
                self._expand.clear()
            self._expand[mask] = out
        return out

    # ------------------------------------------------------------------------ events --
    def store(self, w: Worker, hs: list[int], seqs: list[int], medium: Medium) -> None:
        """``w`` holds the blocks named ``hs`` by its publisher, ``seqs`` here, in ``medium``."""
        mi = MEDIUM_INDEX[medium]
        bit, rows, media = w.bit, self.rows, w.media
        mine = media[mi]
        if mine.keys().isdisjoint(hs) and len(set(hs)) == len(hs) and self._unknown(w, hs, mi):
            # the common case, all new to this worker: one C-level update
            mine.update(zip(hs, seqs, strict=True))
            new_seqs = seqs
        else:
            new_seqs = self._store_known(w, hs, seqs, mi)
        fresh = w.fresh[mi]
        if fresh is None:
            template = [0] * (N_MEDIA + 1)
            template[mi] = template[_ANY] = bit
            fresh = w.fresh[mi] = self._intern_row(tuple(template))
        if rows.keys().isdisjoint(new_seqs):  # all new to the index: one C-level update
            rows.update(zip(new_seqs, repeat(fresh)))
        else:
            self._store_rows(w, new_seqs, list(map(rows.get, new_seqs)), mi, fresh)
        self.n["stored"] += len(new_seqs)
        if self._dirty is not None:
            self._note(new_seqs)

    def _store_rows(self, w: Worker, seqs: list[int], olds: list[Row | None], mi: int,
                    fresh: Row) -> None:
        """Set ``w``'s bit in medium ``mi`` of the nodes ``seqs`` (rows ``olds`` before)."""
        rows, bit = self.rows, w.bit
        # the blocks of one event mostly share their old residency: one transition for all
        # (a node new to the index is the transition None -> fresh)
        old: Row | None = None
        new = fresh
        for s, row in zip(seqs, olds, strict=True):
            if row is old:
                rows[s] = new
            elif row is None:
                rows[s] = fresh
            elif row[mi] & bit:
                key = (s << 2) | mi
                w.dups[key] = w.dups.get(key, 0) + 1
            else:
                old = row
                cells = list(row)
                cells[mi] |= bit
                cells[_ANY] |= bit
                rows[s] = new = self._intern_row(tuple(cells))

    @staticmethod
    def _unknown(w: Worker, hs: list[int], mi: int) -> bool:
        """None of ``hs`` is resident on ``w`` in a medium other than ``mi``."""
        for i, d in enumerate(w.media):
            if i != mi and d and not d.keys().isdisjoint(hs):
                return False
        return True

    @staticmethod
    def seq_of(w: Worker, h: int, mi: int) -> int | None:
        """The sequence hash ``w``'s publisher hash ``h`` names (medium ``mi`` looked at
        first), or None where ``w`` holds no such block."""
        s = w.media[mi].get(h)
        if s is None:
            for d in w.media:
                s = d.get(h)
                if s is not None:
                    break
        return s

    def _store_known(self, w: Worker, hs: list[int], seqs: list[int], mi: int) -> list[int]:
        """Record a store of hashes some of which the worker announced before; the sequence
        hashes that became resident in the medium (not those already there)."""
        media, out = w.media, []
        mine = media[mi]
        for h, s in zip(hs, seqs, strict=True):
            cur = self.seq_of(w, h, mi)
            if cur is not None and cur != s:  # the publisher reused a hash for other tokens:
                self.n["conflicts"] += 1  # trust the news
                for i in range(N_MEDIA):
                    if h in media[i]:
                        self.remove(w, [h], i)
            elif cur is not None and h in mine:
                continue  # already resident there: a store is idempotent
            mine[h] = s
            out.append(s)
        return out

    def remove(self, w: Worker, hashes: Iterable[int], mi: int) -> None:
        mine, dups, rows, bit = w.media[mi], w.dups, self.rows, w.bit
        removed = unknown = 0
        old: Row | None = None
        new: Row | None = None
        changed: list[int] | None = None if self._dirty is None else []
        pop = mine.pop
        for h in hashes:
            s = pop(h, None)
            if s is None:
                unknown += 1
                continue
            removed += 1
            if changed is not None:
                changed.append(s)
            if dups:
                key = (s << 2) | mi
                n = dups.get(key)
                if n is not None:
                    if n > 1:
                        dups[key] = n - 1
                    else:
                        del dups[key]
                    continue
            row = rows[s]
            if row is not old:
                old = row
                cells = list(row)
                cells[mi] &= ~bit
                if not (cells[0] | cells[1] | cells[2] | cells[3]) & bit:
                    cells[_ANY] &= ~bit
                new = self._intern_row(tuple(cells)) if cells[_ANY] else None
            if new is None:
                del rows[s]
            else:
                rows[s] = new
        self.n["removed"] += removed
        self.n["unknown_removals"] += unknown
        if changed and self._dirty is not None:
            self._note(changed)

    # ------------------------------------------------------------------------ queries --
    def runs(self, seqs: Sequence[int]) -> list[Run]:
        """Walk the prompt: (node, workers still matching, blocks) per run of consecutive
        nodes with equal residency (within a run the set of matching workers is fixed)."""
        if len(seqs) >= PROBE_MIN_BLOCKS:
            return self._probe_runs(seqs)
        groups = bool(self._groups)
        runs: list[Run] = []
        active = -1
        # groupby and map run in C: a run of equal nodes costs one lookup and one list
        # comparison per block, no Python bytecode
        for row, run in groupby(map(self.rows.get, seqs)):
            if row is None:
                break
            any_ = row[_ANY]
            if groups and row[_OBJ]:
                any_ |= self._expand_obj(row[_OBJ])
            active &= any_
            if not active:
                break
            runs.append((row, active, len(list(run))))
        return runs

    def _synced_probe(self) -> ProbeIndex:
        """The numpy copy of the table, brought up to date (built on first use)."""
        probe = self._probe
        if probe is None or probe.stale():
            probe = self._probe = ProbeIndex(self.rows)
            self._dirty = set()
        elif self._dirty:
            probe.update(self._dirty, self.rows)
            self._dirty.clear()
        return probe

    def _probe_runs(self, seqs: Sequence[int]) -> list[Run]:
        """:meth:`runs` through the numpy copy: the same runs, except that two equal rows
        that are distinct objects may start two runs (the tally is the same)."""
        probe = self._synced_probe()
        keys = seqs if isinstance(seqs, array.array) else array.array("Q", seqs)
        if _native is not None:
            return self._node_runs(probe, _native.walk_hashes(probe.table, probe.cap - 1, keys))
        rids = probe.lookup(np.frombuffer(keys, np.uint64))
        miss = np.flatnonzero(rids < 0)
        if miss.size:
            rids = rids[:miss[0]]
        if not rids.size:
            return []
        cuts = (np.flatnonzero(rids[1:] != rids[:-1]) + 1).tolist()
        starts = [0, *cuts]
        counts = np.diff([*starts, int(rids.size)]).tolist()
        return self._node_runs(probe, zip(rids[starts].tolist(), counts, strict=True))

    def token_runs(self, tokens: np.ndarray, block_size: int, seed: int, first_seed: int
                   ) -> list[Run] | None:
        """:meth:`runs` of the sequence hashes of ``tokens`` (little-endian u32) from the
        root, hashed in C as far as they are found; None where kvbm._xxh3 is not built."""
        if _native is None:
            return None
        probe = self._synced_probe()
        return self._node_runs(probe, _native.walk_tokens(probe.table, probe.cap - 1, tokens,
                                                          block_size, seed, first_seed))

    def _node_runs(self, probe: ProbeIndex, id_runs: Iterable[tuple[int, int]]) -> list[Run]:
        """Runs of (row id, blocks) as :meth:`runs` gives them, ended where no worker
        matches every block so far."""
        by_id = probe.rows
        groups = bool(self._groups)
        runs: list[Run] = []
        active = -1
        for rid, n in id_runs:
            row = by_id[rid]
            any_ = row[_ANY]
            if groups and row[_OBJ]:
                any_ |= self._expand_obj(row[_OBJ])
            active &= any_
            if not active:
                break
            runs.append((row, active, n))
        return runs

    def tally(self, runs: list[Run]) -> dict[str, dict[Medium, int]]:
        per_mask: list[dict[int, int]] = [{} for _ in range(N_MEDIA)]
        groups = bool(self._groups)
        for row, active, n in runs:
            taken = 0
            for i in range(N_MEDIA):
                m = row[i]
                if i == _OBJ and groups and m:
                    m = self._expand_obj(m)
                m &= active & ~taken
                if m:
                    taken |= m
                    d = per_mask[i]
                    d[m] = d.get(m, 0) + n
        out: dict[str, dict[Medium, int]] = {}
        by_idx = self._by_idx
        for i, d in enumerate(per_mask):
            medium = MEDIUM_BY_BIT[i]
            for m, n in d.items():
                while m:
                    low = m & -m
                    name = by_idx[low.bit_length() - 1].name
                    per = out.get(name)
                    if per is None:
                        per = out[name] = {}
                    per[medium] = per.get(medium, 0) + n
                    m ^= low
        return out

    def blocks(self, w: Worker) -> dict[int, frozenset[Medium]]:
        bits: dict[int, int] = {}
        for i, d in enumerate(w.media):
            b = 1 << i
            for h in d:
                bits[h] = bits.get(h, 0) | b
        return {h: _MEDIA_SETS[m] for h, m in bits.items()}


_MEDIA_SETS: tuple[frozenset[Medium], ...] = tuple(
    frozenset(m for i, m in enumerate(MEDIUM_BY_BIT) if mask >> i & 1)
    for mask in range(1 << N_MEDIA))
