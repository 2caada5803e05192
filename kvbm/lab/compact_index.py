"""A compact prefix index: sequence hash -> row of numpy columns, with lineage and residency.

What :class:`kvbm.index.PrefixIndex` knows, without one Python object per block, so that an
index of tens of millions of blocks (a disk or bucket tier) costs tens of bytes per block
rather than a kilobyte:

* **Rows**, a struct of arrays with one entry per block: ``seq_hash``, ``local_hash`` (u64);
  ``parent`` (i32 row, -1 for a root); lineage links ``first_child``, ``next_sibling``,
  ``prev_sibling`` (i32: subtree removal walks them, no per-node sets); residency ``mask``
  (u8, bit :attr:`kvbm.medium.Medium.bit` per tier); ``g1`` / ``g2`` slots (i32, -1 absent);
  ``last_access`` / ``frequency`` (u32); ``lora`` (u16 into a small interned table of
  adapter names). Rows of removed blocks are reused (a free stack): a row number is valid
  only while its block is indexed. Capacity doubles as needed; unused capacity is never
  touched, so it is not resident.
* **A hash table** from sequence hash to row, :class:`kvbm.lab.hash_table.U64Table`
  (vectorised probing; rebuilt larger, or smaller after mass removals).
* **Tokens** of a block (for BlockStored events) are kept only while it is resident in G1 or
  G2, in a side dict keyed by row: bounded by those pools, not by the index. A block only in
  lower tiers has none (the query that links it back supplies them). A mask without the G1
  and G2 bits drops them.

Every public call takes and returns ints (or numpy arrays of them), and checks its arguments
before it changes anything, raising only :mod:`kvbm.errors` classes. The index does not apply
the lineage rule itself: the manager removes a subtree when a block leaves every tier.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from kvbm.errors import BlockStateError, InvalidArgumentError, UnknownBlockError
from kvbm.hashing import check_lora_name
from kvbm.lab.hash_table import U64Table, as_key, as_keys
from kvbm.medium import Medium

_FREE = -2  # ``parent`` of an unused row
_MAX_MASK = (1 << len(Medium)) - 1
_MEMORY_BITS = Medium.GPU.bit | Medium.CPU_PINNED.bit  # tiers whose blocks keep their tokens
_COLUMNS = (("_seq", np.uint64), ("_local", np.uint64), ("_parent", np.int32),
            ("_child", np.int32), ("_next", np.int32), ("_prev", np.int32),
            ("_mask", np.uint8), ("_g1", np.int32), ("_g2", np.int32), ("_last", np.uint32),
            ("_freq", np.uint32), ("_lora", np.uint16), ("_free", np.int32))
_MAX_ROWS = (1 << 31) - 1
_MAX_U32 = (1 << 32) - 1
_MAX_LORAS = 1 << 16


def _int(value: object, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer) \
            or not lo <= value <= hi:
        raise InvalidArgumentError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return int(value)


def _tokens(tokens: object, mask: int) -> None:
    if tokens is not None and (not isinstance(tokens, bytes) or not mask & _MEMORY_BITS):
        raise InvalidArgumentError(f"tokens are bytes, kept for blocks in G1 or G2 only (mask "
                                   f"{mask:#x}), got {type(tokens).__name__}")


class CompactIndex:
    """Sequence hash -> row; see the module docstring."""

    _seq: np.ndarray
    _local: np.ndarray
    _parent: np.ndarray
    _child: np.ndarray
    _next: np.ndarray
    _prev: np.ndarray
    _mask: np.ndarray
    _g1: np.ndarray
    _g2: np.ndarray
    _last: np.ndarray
    _freq: np.ndarray
    _lora: np.ndarray
    _free: np.ndarray  # the free stack: rows to reuse, the last one first

    def __init__(self, capacity: int = 1024) -> None:
        self._reset(_int(capacity, "capacity", 1, _MAX_ROWS))

    def _reset(self, capacity: int) -> None:
        for name, dt in _COLUMNS:  # np.empty: capacity is resident only once written
            setattr(self, name, np.empty(capacity, dtype=dt))
        self._hw = 0  # rows ever used (the high-water mark)
        self._nfree = 0  # rows on the free stack
        self._live = 0
        self._tokens: dict[int, bytes] = {}
        self._lora_names: list[str | None] = [None]
        self._lora_ids: dict[str | None, int] = {None: 0}
        self._table = U64Table(U64Table.bits_for(capacity))

    # ---------------------------------------------------------------------- internals --
    def _rehash(self, extra: int) -> None:
        live = self.live_rows()
        self._table = U64Table.build(self._seq[live], live, extra)

    def _grow(self, rows: int) -> None:
        cap = min(_MAX_ROWS, max(2 * len(self._seq), rows))
        for name, dt in _COLUMNS:
            old, new = getattr(self, name), np.empty(cap, dtype=dt)
            used = self._nfree if name == "_free" else self._hw
            new[:used] = old[:used]
            setattr(self, name, new)

    def _alloc(self, n: int) -> np.ndarray:
        k = min(n, self._nfree)
        reused = self._free[self._nfree - k: self._nfree][::-1].astype(np.int64)
        self._nfree -= k
        if self._hw + n - k > len(self._seq):
            self._grow(self._hw + n - k)
        fresh = np.arange(self._hw, self._hw + n - k, dtype=np.int64)
        self._hw += n - k
        return np.concatenate([reused, fresh])

    def _row(self, row: object) -> int:
        if isinstance(row, bool | np.bool_) or not isinstance(row, int | np.integer):
            raise InvalidArgumentError(f"a row must be an int, got {row!r}")
        if not 0 <= row < self._hw or self._parent.item(int(row)) == _FREE:
            raise UnknownBlockError(f"row {row} holds no indexed block")
        return int(row)

    def _rows(self, rows: object) -> np.ndarray:
        a: np.ndarray = np.asarray(rows)
        if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
            raise InvalidArgumentError("rows must be a 1-D sequence of ints")
        if a.size and (a.min() < 0 or a.max() >= self._hw or (self._parent[a] == _FREE).any()):
            raise UnknownBlockError("a row holds no indexed block")
        return a

    def _lora_id(self, lora_name: str | None) -> int:
        check_lora_name(lora_name)
        got = self._lora_ids.get(lora_name)
        if got is None:
            if len(self._lora_names) >= _MAX_LORAS:
                raise InvalidArgumentError(f"more than {_MAX_LORAS - 1} LoRA adapter names")
            got = self._lora_ids[lora_name] = len(self._lora_names)
            self._lora_names.append(lora_name)
        return got

    def _parent_row(self, parent_hash: object) -> int:
        if parent_hash is None:
            return -1
        prow = self.get(parent_hash)
        if prow < 0:
            raise UnknownBlockError(f"parent {as_key(parent_hash):#x} is not indexed")
        return prow

    # ------------------------------------------------------------------------- lookups --
    def __len__(self) -> int:
        return self._live

    def __contains__(self, seq_hash: object) -> bool:
        return self.get(seq_hash) >= 0

    def __iter__(self) -> Iterator[int]:
        """The indexed sequence hashes (a snapshot)."""
        return iter(self._seq[self.live_rows()].tolist())

    def get(self, seq_hash: object) -> int:
        """The row of ``seq_hash``, or -1."""
        return self._table.probe(as_key(seq_hash))[0]

    def rows_of(self, seq_hashes: object) -> np.ndarray:
        """Rows of many hashes (int64; -1 where absent)."""
        q = as_keys(seq_hashes, "seq_hashes")
        return self._table.lookup(q)[0]

    def match_rows(self, sequence_hashes: object) -> np.ndarray:
        """Rows of the longest leading run of ``sequence_hashes`` that is indexed (int64).
        All the hashes are probed at once: only the first missing one bounds the result."""
        q = as_keys(sequence_hashes, "sequence_hashes")
        return self._table.prefix(q)

    def match(self, sequence_hashes: object) -> int:
        """How many leading ``sequence_hashes`` are indexed."""
        return len(self.match_rows(sequence_hashes))

    def live_rows(self) -> np.ndarray:
        """The rows in use (int64, ascending)."""
        return np.flatnonzero(self._parent[: self._hw] != _FREE)

    def children(self, row: object) -> Iterator[int]:
        """Rows of the children of ``row``'s block (newest first)."""
        c = self._child.item(self._row(row))
        while c >= 0:
            yield c
            c = self._next.item(c)

    # ------------------------------------------------------------------------- changes --
    def insert(self, seq_hash: object, local_hash: object, parent_hash: object, mask: object,
               lora_name: str | None = None, tokens: bytes | None = None) -> int:
        """Index one block under ``parent_hash`` (``None``: a root); its row."""
        h, loc = as_key(seq_hash), as_key(local_hash, "local_hash")
        m = _int(mask, "mask", 0, _MAX_MASK)
        _tokens(tokens, m)
        prow, lid = self._parent_row(parent_hash), self._lora_id(lora_name)
        if self._table.probe(h)[0] >= 0:
            raise BlockStateError(f"{h:#x} is already indexed")
        if self._live >= _MAX_ROWS:
            raise InvalidArgumentError(f"the index holds {_MAX_ROWS} blocks at most")
        if self._table.crowded(self._live, 1):
            self._rehash(1)
        if self._nfree:
            self._nfree -= 1
            row = int(self._free[self._nfree])
        else:
            if self._hw == len(self._seq):
                self._grow(self._hw + 1)
            row, self._hw = self._hw, self._hw + 1
        self._seq[row], self._local[row], self._mask[row], self._lora[row] = h, loc, m, lid
        self._g1[row] = self._g2[row] = self._child[row] = -1
        self._last[row] = self._freq[row] = 0
        self._link(row, prow)
        self._live += 1
        if not self._table.put_one(h, row):
            self._rehash(0)  # pragma: no cover - a run of PAD slots past the end
        if tokens is not None:
            self._tokens[row] = tokens
        return row

    def insert_chain(self, seq_hashes: object, local_hashes: object, parent_hash: object,
                     mask: object, lora_name: str | None = None) -> np.ndarray:
        """Index a chain of new blocks, each the parent of the next, the first under
        ``parent_hash`` (``None``: a root), in one vectorised step; their rows (int64)."""
        q = as_keys(seq_hashes, "seq_hashes")
        loc = as_keys(local_hashes, "local_hashes")
        n = q.size
        if loc.size != n:
            raise InvalidArgumentError(f"{n} sequence hashes but {loc.size} local hashes")
        m = _int(mask, "mask", 0, _MAX_MASK)
        prow, lid = self._parent_row(parent_hash), self._lora_id(lora_name)
        if not n:
            return np.empty(0, dtype=np.int64)
        if np.unique(q).size != n:
            raise InvalidArgumentError("the chain holds a sequence hash twice")
        if (self._table.lookup(q)[0] >= 0).any():
            raise BlockStateError("a block of the chain is already indexed")
        if self._live + n > _MAX_ROWS:
            raise InvalidArgumentError(f"the index holds {_MAX_ROWS} blocks at most")
        if self._table.crowded(self._live, n):
            self._rehash(n)
        rows = self._alloc(n)
        self._seq[rows], self._local[rows], self._mask[rows], self._lora[rows] = q, loc, m, lid
        self._g1[rows] = self._g2[rows] = self._next[rows] = self._prev[rows] = -1
        self._last[rows] = self._freq[rows] = 0
        self._parent[rows[1:]] = rows[:-1]
        self._child[rows[:-1]] = rows[1:]
        self._child[rows[-1]] = -1
        self._link(int(rows[0]), prow)
        self._live += n
        if not self._table.put(q, rows):
            self._rehash(0)  # pragma: no cover - a run of PAD slots past the end
        return rows

    def _link(self, row: int, prow: int) -> None:
        """Make ``row`` the first child of ``prow`` (O(1): siblings are a linked list)."""
        self._parent[row] = prow
        self._prev[row] = -1
        head = self._child.item(prow) if prow >= 0 else -1
        self._next[row] = head
        if head >= 0:
            self._prev[head] = row
        if prow >= 0:
            self._child[prow] = row

    def subtree(self, seq_hash: object) -> np.ndarray:
        """Rows of ``seq_hash``'s block and all its descendants, leaves first (each child
        before its parent; the block itself last). Iterative: chains run thousands deep."""
        h = as_key(seq_hash)
        row = self._table.probe(h)[0]
        if row < 0:
            raise UnknownBlockError(f"{h:#x} is not indexed")
        child, nxt = self._child, self._next
        order, stack = [], [row]
        while stack:
            r = stack.pop()
            order.append(r)
            c = child.item(r)
            while c >= 0:
                stack.append(c)
                c = nxt.item(c)
        return np.array(order[::-1], dtype=np.int64)

    def remove_subtree(self, seq_hash: object) -> list[int]:
        """Remove a block and all its descendants; their hashes, leaves first."""
        rows = self.subtree(seq_hash)
        root = int(rows[-1])
        p, prev, nxt = self._parent.item(root), self._prev.item(root), self._next.item(root)
        if prev >= 0:
            self._next[prev] = nxt
        elif p >= 0:
            self._child[p] = nxt
        if nxt >= 0:
            self._prev[nxt] = prev
        keys = self._seq[rows]
        self._table.delete(self._table.lookup(keys)[1])
        self._parent[rows] = _FREE
        self._free[self._nfree: self._nfree + rows.size] = rows
        self._nfree += rows.size
        self._live -= rows.size
        if self._tokens:
            gone = (rows.tolist() if rows.size < len(self._tokens) else
                    [r for r in self._tokens if self._parent.item(r) == _FREE])
            for r in gone:
                self._tokens.pop(r, None)
        if self._table.bits > U64Table.bits_for(4 * self._live + 1):
            self._rehash(0)  # mostly empty now: give the table's memory back
        return [int(k) for k in keys.tolist()]

    def clear(self) -> None:
        """Forget every block (and give the memory back)."""
        self._reset(1024)

    # ---------------------------------------------------------------- row accessors --
    def seq_hash(self, row: object) -> int:
        return int(self._seq[self._row(row)])

    def local_hash(self, row: object) -> int:
        return int(self._local[self._row(row)])

    def parent(self, row: object) -> int:
        """The parent's row, -1 for a root."""
        return int(self._parent[self._row(row)])

    def parent_hash(self, row: object) -> int | None:
        p = self.parent(row)
        return None if p < 0 else int(self._seq[p])

    def lora_name(self, row: object) -> str | None:
        return self._lora_names[int(self._lora[self._row(row)])]

    def mask(self, row: object) -> int:
        return int(self._mask[self._row(row)])

    def set_mask(self, row: object, mask: object) -> None:
        r, m = self._row(row), _int(mask, "mask", 0, _MAX_MASK)
        self._mask[r] = m
        if not m & _MEMORY_BITS:
            self._tokens.pop(r, None)

    def g1(self, row: object) -> int:
        return int(self._g1[self._row(row)])

    def set_g1(self, row: object, slot: object) -> None:
        r, s = self._row(row), _int(slot, "slot", -1, _MAX_ROWS)
        self._g1[r] = s

    def g2(self, row: object) -> int:
        return int(self._g2[self._row(row)])

    def set_g2(self, row: object, slot: object) -> None:
        r, s = self._row(row), _int(slot, "slot", -1, _MAX_ROWS)
        self._g2[r] = s

    def tokens(self, row: object) -> bytes | None:
        return self._tokens.get(self._row(row))

    def set_tokens(self, row: object, tokens: object) -> None:
        r = self._row(row)
        if tokens is None:
            raise InvalidArgumentError("tokens are bytes, got None")
        _tokens(tokens, self._mask.item(r))
        self._tokens[r] = tokens  # type: ignore[assignment]

    def last_access(self, row: object) -> int:
        return int(self._last[self._row(row)])

    def frequency(self, row: object) -> int:
        return int(self._freq[self._row(row)])

    def masks(self, rows: object) -> np.ndarray:
        """Residency masks (u8) of many rows, e.g. those of :meth:`match_rows`."""
        out: np.ndarray = self._mask[self._rows(rows)]
        return out

    def touch(self, rows: object, tick: object) -> None:
        """``rows`` were used at ``tick``: set their last access, count one more use each
        (frequencies saturate at 2**32 - 1)."""
        r, t = self._rows(rows), _int(tick, "tick", 0, _MAX_U32)
        self._last[r] = t
        self._freq[r] = np.minimum(self._freq[r].astype(np.uint64) + 1, _MAX_U32)

    def memory_bytes(self) -> int:
        """Bytes allocated by the arrays (capacity never written is not resident) and the
        tokens kept."""
        cols = sum(int(getattr(self, name).nbytes) for name, _ in _COLUMNS)
        return cols + self._table.nbytes + sum(len(t) for t in self._tokens.values())

    def check_invariants(self) -> None:
        """Assert the structure is consistent (tests; O(size))."""
        live = self.live_rows()
        assert live.size == self._live, "live count"
        self._table.check(self._seq[live], live)
        free = self._free[: self._nfree]
        assert np.unique(free).size == free.size == self._hw - self._live, "free stack"
        assert (self._parent[free] == _FREE).all(), "a free row in use"
        for r in live.tolist():
            p = self._parent.item(r)
            assert p == -1 or (0 <= p < self._hw and self._parent.item(p) != _FREE), "parent"
            if p >= 0:
                assert r in self.children(p), "child link"
            nxt = self._next.item(r)
            assert nxt == -1 or self._prev.item(nxt) == r, "sibling links"
            assert self._tokens.get(r) is None or self._mask.item(r) & _MEMORY_BITS, "tokens"
        assert all(self._parent.item(r) != _FREE for r in self._tokens), "tokens of a free row"
