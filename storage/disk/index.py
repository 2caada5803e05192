"""The page index: which page each slot holds, in lmdb.

lmdb commits are atomic and (with ``sync``) durable, and its copy-on-write B-tree never
needs recovery: after ``kill -9`` the index is exactly the last committed transaction.
One record per occupied slot::

    key    u64 big-endian slot number (big-endian so that lmdb's byte order is numeric order)
    value  <slab u32, offset u64, length u32, checksum 16s, last_access_ns u64,
            frequency u32, has_parent u8, parent u64, block hash u64>
           (61 bytes, little-endian)

Keyed by slot, not by block hash, because a put fills runs of adjacent slots: its records
land side by side in a few B-tree leaves, where records keyed by (random) hashes would
touch one leaf each, and a commit copies and writes every leaf it touches. With a million
pages indexed, committing 4,096 records took ~63 ms keyed by hash and ~5 ms keyed by slot
(development VM). Lookups by hash never read lmdb: the store loads the whole index into a
dict at open (:meth:`PageIndex.load`) and serves from that.

In memory, the store keeps each page's record as it is (an :data:`Entry`), and reads its
fields with the functions below.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import lmdb

from kvbm.errors import StorageError
from kvbm.storage.disk.directory import Geometry

_KEY = struct.Struct(">Q")
_REC = struct.Struct("<IQI16sQIBQQ")
_WHERE = struct.Struct("<IQ")  # slab, offset: the record's head
_USE = struct.Struct("<QI")  # last_access_ns, frequency
_USE_AT = 32  # where they sit in the record
_PARENT = struct.Struct("<BQ")  # has_parent, parent
_PARENT_AT = 44
_HASH = struct.Struct("<Q")
_HASH_AT = 53
_DB_NAME = b"pages"

#: One stored page in memory: its index record, bytes. Not a tuple or an object, because the
#: cyclic GC does not track bytes: a store holds one per page (millions), and puts and reads
#: make thousands of new ones per batch; tracked, they would set off full collections, which
#: also walk all of them (~100 ms each in a process that holds torch). An access replaces the
#: record; the slot tells whether a page is still the same one.
Entry = bytes


def checksum_of(e: Entry) -> bytes:
    return e[16:32]


def parent_of(e: Entry) -> int | None:
    has_parent, parent = _PARENT.unpack_from(e, _PARENT_AT)
    return parent if has_parent else None


def use_of(e: Entry) -> tuple[int, int]:
    """``(last_access_ns, frequency)``."""
    last_access, freq = _USE.unpack_from(e, _USE_AT)
    return last_access, freq


def touched(e: Entry, now: int) -> Entry:
    """``e`` accessed once more, at ``now``."""
    freq = _USE.unpack_from(e, _USE_AT)[1]
    return e[:_USE_AT] + _USE.pack(now, freq + 1) + e[_USE_AT + _USE.size:]


def key_of(e: Entry) -> int:
    """The block hash of the page."""
    key: int = _HASH.unpack_from(e, _HASH_AT)[0]
    return key


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

    def record(self, key: int, slab: int, offset: int, checksum: bytes, last_access: int,
               freq: int, parent: int | None) -> Entry:
        """The record of page ``key`` in the slot at ``offset`` in ``slab``."""
        return _REC.pack(slab, offset, self.page_bytes, checksum, last_access, freq,
                         parent is not None, parent or 0, key)

    def slot_of(self, e: Entry) -> int:
        slab: int
        offset: int
        slab, offset = _WHERE.unpack_from(e)
        return slab * self.geometry.slab_slots + offset // self.geometry.slot_bytes

    def load(self) -> tuple[dict[int, Entry], list[int]]:
        """Every valid entry by block hash, and the slots whose records are to be dropped:
        unreadable ones, and all but the most recently used of two slots holding one block
        (which only a failed removal commit followed by a new put of the block can leave).

        Raises :class:`StorageError` when the index cannot be read (storage/disk/recover.py
        then rebuilds it)."""
        entries: dict[int, Entry] = {}
        slots: dict[int, int] = {}  # block hash -> its slot in ``entries``
        bad: list[int] = []
        g = self.geometry
        try:
            with self.env.begin(db=self.db) as txn:
                for kb, vb in txn.cursor():
                    if len(kb) != _KEY.size:
                        # Not a record this store wrote, and it cannot be named by slot to
                        # be dropped: the index is damaged.
                        raise StorageError(f"the page index holds a key of {len(kb)} bytes")
                    (slot,) = _KEY.unpack(kb)
                    if len(vb) != _REC.size:
                        bad.append(slot)
                        continue
                    e = bytes(vb)
                    slab, offset, length = _REC.unpack(e)[:3]
                    if (length != self.page_bytes or offset % g.slot_bytes
                            or offset // g.slot_bytes >= g.slab_slots
                            or g.slot_of(slab, offset) != slot):
                        bad.append(slot)
                        continue
                    key = key_of(e)
                    other = entries.get(key)
                    if other is not None:
                        if use_of(other) >= use_of(e):
                            bad.append(slot)
                            continue
                        bad.append(slots[key])
                    entries[key] = e
                    slots[key] = slot
        except lmdb.Error as e:
            raise StorageError(f"cannot read the page index: {e}") from e
        return entries, bad

    def apply(self, slots: Sequence[int], records: Sequence[bytes | None], *,
              before_commit: Callable[[], object] | None = None) -> None:
        """Store ``records[i]`` (from :meth:`record`) as the page in slot ``slots[i]``, or
        empty the slot where it is ``None``, in order, in one transaction (durable on return
        when ``sync``). ``before_commit`` runs once the transaction is filled, before it
        commits; if it raises, nothing is committed.

        Records are packed by whoever makes the change, typically an I/O thread while other
        I/O is in flight, so that the commit, which every waiting put sits behind, only
        copies bytes into lmdb.
        """
        try:
            with self.env.begin(write=True, db=self.db) as txn:
                put, delete, pack = txn.put, txn.delete, _KEY.pack
                for slot, record in zip(slots, records, strict=True):
                    if record is None:
                        delete(pack(slot))
                    else:
                        put(pack(slot), record)
                if before_commit is not None:
                    before_commit()
        except lmdb.Error as e:
            raise StorageError(f"page index commit failed: {e}") from e

    def close(self) -> None:
        self.env.close()
