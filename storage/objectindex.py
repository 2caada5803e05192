"""The object tiers' local index: where each page lives, and the log of this writer's packs.

An lmdb environment with four sub-databases:

* ``pages``: ``fingerprint || seq_hash -> (pack id, offset, length, pack size)``;
* ``members``: ``pack_id || seq_hash``, to know when a pack holds no live page and to drop
  every page of a lost pack;
* ``announced``: ``fingerprint || seq -> (pack id, pack size, tail length)``, the last packs
  this index's writer uploaded, numbered 1, 2, ... per fingerprint. Other writers sharing
  the bucket learn of them from the writer's *head* object (storage/objectdiscovery.py),
  which lists the newest of them. The log lives here, committed with the pages' entries,
  so that a head written after a restart still names the packs uploaded just before it;
* ``meta``: the location the index belongs to, and the writer id (16 random bytes, made
  once per index): a restarted writer keeps its head object and its numbering.

Writes commit synchronously: one commit per pack.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbm.errors import ConfigError

#: Index entry: pack id (16 bytes), offset, length (header + payload), pack object size.
_ENTRY = struct.Struct("<16sQQQ")
#: Log entry: pack id, pack object size, tail length (manifest + trailer).
_ANNOUNCED = struct.Struct("<16sQQ")
_U64BE = struct.Struct(">Q")


@dataclass(frozen=True, slots=True)
class Location:
    """Where one page lives: which pack, at which offset, how long (header + payload)."""

    pack_id: bytes
    offset: int
    length: int
    pack_size: int


@dataclass(frozen=True, slots=True)
class Announced:
    """One pack as a writer announces it: enough to read its manifest with one ranged GET."""

    pack_id: bytes
    size: int
    #: bytes at the pack's end holding the manifest and the trailer
    tail: int


class PackIndex:
    """Local lmdb index: ``fingerprint||seq_hash -> Location``, pack membership, and the log
    of the packs this index's writer uploaded (see the module docstring)."""

    def __init__(self, path: Path, *, location: str, map_size: int) -> None:
        # Imported here: kvbm.config imports the object-store modules for their configs, and
        # a core install (router, hashing) has no lmdb; the s3/gcs extras bring it.
        import lmdb

        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=map_size, max_dbs=4, subdir=True,
                              sync=True, metasync=True)
        self._pages = self._env.open_db(b"pages")
        self._members = self._env.open_db(b"members")
        self._announced = self._env.open_db(b"announced")
        meta = self._env.open_db(b"meta")
        with self._env.begin(write=True, db=meta) as txn:
            stored = txn.get(b"location")
            if stored is None:
                txn.put(b"location", location.encode())
            elif stored.decode() != location:
                raise ConfigError(f"object index {path} belongs to {stored.decode()!r}, not "
                                  f"{location!r}; use another index_path")
            writer = txn.get(b"writer")
            if writer is None or len(writer) != 16:
                writer = os.urandom(16)
                txn.put(b"writer", writer)
        #: This index's writer id: names its head object in the bucket.
        self.writer_id = bytes(writer)

    @staticmethod
    def page_key(fingerprint: int, seq_hash: int) -> bytes:
        return _U64BE.pack(fingerprint) + _U64BE.pack(seq_hash)

    def lookup(self, fingerprint: int, keys: Iterable[int]) -> list[Location | None]:
        out: list[Location | None] = []
        with self._env.begin(db=self._pages) as txn:
            for k in keys:
                raw = txn.get(self.page_key(fingerprint, k))
                out.append(None if raw is None else Location(*_ENTRY.unpack(raw)))
        return out

    def keys(self, fingerprint: int) -> list[int]:
        prefix = _U64BE.pack(fingerprint)
        out: list[int] = []
        with self._env.begin(db=self._pages) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k in cur.iternext(keys=True, values=False):
                    if k[:8] != prefix:
                        break
                    out.append(_U64BE.unpack_from(k, 8)[0])
        return out

    def has_pack(self, pack_id: bytes) -> bool:
        with self._env.begin(db=self._members) as txn:
            cur = txn.cursor()
            return bool(cur.set_range(pack_id)) and cur.key()[:16] == pack_id

    def add(self, fingerprint: int, entries: Sequence[tuple[int, Location]], *,
            announce: Announced | None = None, keep: int = 0) -> list[int]:
        """Insert entries not yet present (create-only); returns the keys added.

        With ``announce`` (a pack this writer uploaded) and at least one entry added, the
        pack is appended to the writer's log in the same commit, which keeps the newest
        ``keep`` packs."""
        added: list[int] = []
        with self._env.begin(write=True) as txn:
            for k, loc in entries:
                value = _ENTRY.pack(loc.pack_id, loc.offset, loc.length, loc.pack_size)
                if txn.put(self.page_key(fingerprint, k), value, overwrite=False,
                           db=self._pages):
                    txn.put(loc.pack_id + _U64BE.pack(k), b"", db=self._members)
                    added.append(k)
            if announce is not None and added:
                self._append(txn, fingerprint, announce, keep)
        return added

    def _append(self, txn: Any, fingerprint: int, pack: Announced, keep: int) -> None:
        prefix = _U64BE.pack(fingerprint)
        cur = txn.cursor(db=self._announced)
        # This fingerprint's newest entry: the one before the first key past its range (a
        # seq never reaches 2**64 - 1).
        found = cur.prev() if cur.set_range(prefix + b"\xff" * 8) else cur.last()
        seq = _U64BE.unpack_from(cur.key(), 8)[0] if found and cur.key()[:8] == prefix else 0
        seq += 1
        cur.put(prefix + _U64BE.pack(seq), _ANNOUNCED.pack(pack.pack_id, pack.size, pack.tail))
        # Keep the newest ``keep``: delete() steps to the next entry by itself.
        if cur.set_range(prefix):
            while cur.key()[:8] == prefix and _U64BE.unpack_from(cur.key(), 8)[0] <= seq - keep:
                if not cur.delete():
                    break

    def announced(self, fingerprint: int) -> tuple[int, list[Announced]]:
        """This writer's log for ``fingerprint``: the number of its newest pack (0: none) and
        the packs kept, newest first."""
        prefix = _U64BE.pack(fingerprint)
        out: list[Announced] = []
        seq = 0
        with self._env.begin(db=self._announced) as txn:
            cur = txn.cursor()
            if cur.set_range(prefix):
                for k, v in cur.iternext(keys=True, values=True):
                    if k[:8] != prefix:
                        break
                    seq = _U64BE.unpack_from(k, 8)[0]
                    out.append(Announced(*_ANNOUNCED.unpack(v)))
        out.reverse()
        return seq, out

    def remove(self, fingerprint: int, keys: Iterable[int],
               expect: dict[int, bytes] | None = None) -> tuple[list[int], list[bytes]]:
        """Remove entries; with ``expect``, only those still in the given pack (so a page
        re-put elsewhere meanwhile is kept). Returns the keys removed and the packs left
        without any live page."""
        removed: list[int] = []
        touched: set[bytes] = set()
        with self._env.begin(write=True) as txn:
            for k in keys:
                pk = self.page_key(fingerprint, k)
                raw = txn.get(pk, db=self._pages)
                if raw is None:
                    continue
                pack_id = raw[:16]
                if expect is not None and expect.get(k) != pack_id:
                    continue
                txn.delete(pk, db=self._pages)
                txn.delete(pack_id + _U64BE.pack(k), db=self._members)
                removed.append(k)
                touched.add(pack_id)
            cur = txn.cursor(db=self._members)
            empty = [p for p in touched if not (cur.set_range(p) and cur.key()[:16] == p)]
        return removed, empty

    def pack_members(self, pack_id: bytes) -> list[int]:
        out: list[int] = []
        with self._env.begin(db=self._members) as txn:
            cur = txn.cursor()
            if cur.set_range(pack_id):
                for k in cur.iternext(keys=True, values=False):
                    if k[:16] != pack_id:
                        break
                    out.append(_U64BE.unpack_from(k, 16)[0])
        return out

    def close(self) -> None:
        self._env.close()
