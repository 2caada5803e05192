"""The page index: block hash -> where the page lives, in lmdb.

lmdb commits are atomic and (with ``sync``) durable, and its copy-on-write B-tree never
needs recovery: after ``kill -9`` the index is exactly the last committed transaction.
One record per page::

    key    u64 big-endian block hash (big-endian so that lmdb's byte order is numeric order)
    value  <slab u32, offset u64, length u32, checksum 16s, last_access_ns u64,
            frequency u32, has_parent u8, parent u64>   (53 bytes, little-endian)
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import lmdb

from kvbm.errors import StorageError
from kvbm.storage.disk.directory import Geometry

_KEY = struct.Struct(">Q")
_REC = struct.Struct("<IQI16sQIBQ")
_DB_NAME = b"pages"


class Entry:
    """One stored page, in memory (the store keeps one per page, hence ``__slots__``)."""

    __slots__ = ("checksum", "freq", "last_access", "parent", "slot")

    def __init__(self, slot: int, checksum: bytes, last_access: int, freq: int,
                 parent: int | None) -> None:
        self.slot = slot
        self.checksum = checksum
        self.last_access = last_access
        self.freq = freq
        self.parent = parent


#: An index mutation: ``(key, entry)`` stores or rewrites ``key``, ``(key, None)`` deletes it.
IndexOp = tuple[int, Entry | None]


class PageIndex:
    """The lmdb environment under ``ROOT/index``. Writers are serialised by the caller
    (storage/disk/commit.py); reads happen only at open."""

    def __init__(self, path: Path, geometry: Geometry, page_bytes: int, *, sync: bool) -> None:
        self.geometry = geometry
        self.page_bytes = page_bytes
        # map_size is an address-space reservation, not disk: the file grows as needed.
        # ~4x the record size per slot leaves room for B-tree overhead and free pages.
        map_size = max(64 << 20, geometry.max_slots * 4 * (_KEY.size + _REC.size + 16))
        try:
            self.env = lmdb.open(str(path), subdir=True, map_size=map_size, max_dbs=1,
                                 sync=sync, metasync=sync, readahead=False, lock=True)
            self.db = self.env.open_db(_DB_NAME)
        except lmdb.Error as e:
            raise StorageError(f"cannot open the page index at {path}: {e}") from e

    def _pack(self, e: Entry) -> bytes:
        slab, offset = self.geometry.locate(e.slot)
        parent = e.parent if e.parent is not None else 0
        return _REC.pack(slab, offset, self.page_bytes, e.checksum, e.last_access, e.freq,
                         e.parent is not None, parent)

    def load(self) -> tuple[dict[int, Entry], list[int]]:
        """Every valid entry, and the keys of records that cannot be (to be dropped)."""
        entries: dict[int, Entry] = {}
        bad: list[int] = []
        with self.env.begin(db=self.db) as txn:
            for kb, vb in txn.cursor():
                (key,) = _KEY.unpack(kb)
                if len(vb) != _REC.size:
                    bad.append(key)
                    continue
                slab, offset, length, checksum, last, freq, has_parent, parent = \
                    _REC.unpack(vb)
                g = self.geometry
                if (length != self.page_bytes or offset % g.slot_bytes
                        or offset // g.slot_bytes >= g.slab_slots):
                    bad.append(key)
                    continue
                entries[key] = Entry(g.slot_of(slab, offset), checksum, last, freq,
                                     parent if has_parent else None)
        return entries, bad

    def apply(self, ops: Sequence[IndexOp]) -> None:
        """Apply ``ops`` in order, in one transaction (durable on return when ``sync``)."""
        try:
            with self.env.begin(write=True, db=self.db) as txn:
                for key, entry in ops:
                    kb = _KEY.pack(key)
                    if entry is None:
                        txn.delete(kb)
                    else:
                        txn.put(kb, self._pack(entry))
        except lmdb.Error as e:
            raise StorageError(f"page index commit failed: {e}") from e

    def close(self) -> None:
        self.env.close()
