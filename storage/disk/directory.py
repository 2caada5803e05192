"""The store directory: its identity file, its lock, and the geometry of its slabs.

::

    ROOT/
      kvbm-disk.json   identity: format, layout and fingerprint, slot and slab geometry
      LOCK             flock'ed by the one process that has the store open
      index/           lmdb environment (storage/disk/index.py)
      slabs/NNNNNN.slab

The identity file is checked *before* anything is created or opened for writing, so a
store opened with another layout, or written in another on-disk format, leaves the directory
exactly as it found it.

Slot format (``kvbm-disk-v2`` and ``-v3``): the payload at the slot's start, then the 64-byte
page header (storage/page.py), then zeros up to the next ALIGN boundary::

    [0, page_bytes)                            payload
    [page_bytes, page_bytes + 64)              header (``header_offset`` = page_bytes)
    [page_bytes + 64, slot_bytes)              zeros; slot_bytes = align_up(page_bytes + 64)

With page_bytes a multiple of ALIGN (any real model's page) the payload is aligned and the
header sits alone in the slot's last ALIGN block, so O_DIRECT can move the payload straight
between the device and an aligned caller page (storage/disk/runs.py). ``kvbm-disk-v1`` had
the header first; ``kvbm-disk-v2`` keyed its index by block hash, where ``-v3`` keys it by
slot (storage/disk/index.py). Stores of other formats are refused, never misread.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbm.errors import LayoutMismatchError, StorageError
from kvbm.layout import KVLayout
from kvbm.storage.page import HEADER_SIZE

log = logging.getLogger(__name__)

FORMAT = "kvbm-disk-v3"
#: Every format of this store is named with this prefix, so an older (or newer) store is
#: told apart from a directory that is no store at all.
_FORMAT_FAMILY = "kvbm-disk-"
META_NAME = "kvbm-disk.json"
LOCK_NAME = "LOCK"
#: O_DIRECT needs file offsets, lengths and memory aligned to the logical block size;
#: 4096 covers every current device (512e and 4Kn) and the page size.
ALIGN = 4096


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Geometry:
    """Where slot ``s`` lives: slab ``s // slab_slots``, offset ``s % slab_slots * slot_bytes``;
    its header at ``header_offset`` within the slot (see the module docstring)."""

    slot_bytes: int
    slab_slots: int
    max_slots: int
    header_offset: int

    def locate(self, slot: int) -> tuple[int, int]:
        slab, i = divmod(slot, self.slab_slots)
        return slab, i * self.slot_bytes

    def slot_of(self, slab: int, offset: int) -> int:
        return slab * self.slab_slots + offset // self.slot_bytes

    def slab_count(self) -> int:
        return -(-self.max_slots // self.slab_slots)

    def slots_in_slab(self, slab: int) -> int:
        return min(self.slab_slots, self.max_slots - slab * self.slab_slots)


def geometry_for(layout: KVLayout, capacity_bytes: int, slab_bytes: int) -> Geometry:
    """The payload, then the header, rounded up to ALIGN (see the module docstring)."""
    header_offset = layout.bytes_per_block
    slot = align_up(header_offset + HEADER_SIZE)
    return Geometry(slot_bytes=slot, slab_slots=max(1, slab_bytes // slot),
                    max_slots=capacity_bytes // slot, header_offset=header_offset)


def _read_meta(root: Path) -> dict[str, Any] | None:
    try:
        text = (root / META_NAME).read_text()
    except FileNotFoundError:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        raise StorageError(f"{root / META_NAME} is not valid JSON; not opening {root}") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if isinstance(fmt, str) and fmt.startswith(_FORMAT_FAMILY) and fmt != FORMAT:
        # Never guess at another format's slots: its pages would be misread or torn.
        raise StorageError(f"disk store {root} is in on-disk format {fmt!r}, and this kvbm "
                           f"reads {FORMAT!r} only; remove the directory to discard its "
                           f"pages (the tier is a cache), or use another path")
    if not isinstance(meta, dict) or fmt != FORMAT:
        raise StorageError(f"{root} is not a {FORMAT} store (format {fmt!r})")
    return meta


def check_identity(root: Path, layout: KVLayout) -> dict[str, Any] | None:
    """The identity of an existing store at ``root`` (``None`` if there is none yet).

    Raises :class:`LayoutMismatchError` when it was written under another layout, and
    :class:`StorageError` when ``root`` is a non-empty directory that is not a store.
    Touches nothing.
    """
    if not root.exists():
        return None
    if not root.is_dir():
        raise StorageError(f"disk store path {root} exists and is not a directory")
    meta = _read_meta(root)
    if meta is None:
        if any(p.name != LOCK_NAME for p in root.iterdir()):
            raise StorageError(f"{root} is neither empty nor a kvbm disk store "
                               f"(no {META_NAME}); refusing to write into it")
        return None
    if meta.get("fingerprint") != f"{layout.fingerprint:016x}":
        raise LayoutMismatchError(
            f"disk store {root} holds pages of layout {meta.get('layout')} (fingerprint "
            f"{meta.get('fingerprint')}), not of {layout.to_dict()} (fingerprint "
            f"{layout.fingerprint:016x}); use another path for this model, or remove the "
            f"directory to discard its pages")
    return meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_identity(root: Path, layout: KVLayout, geometry: Geometry) -> dict[str, Any]:
    """Write the identity file of a new store: to a temporary name, fsync, rename."""
    meta = {"format": FORMAT, "fingerprint": f"{layout.fingerprint:016x}",
            "layout": layout.to_dict(), "page_bytes": layout.bytes_per_block,
            "slot_bytes": geometry.slot_bytes, "slab_slots": geometry.slab_slots,
            "header_offset": geometry.header_offset}
    tmp = root / (META_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / META_NAME)
    _fsync_dir(root)
    return meta


def stored_geometry(meta: dict[str, Any], wanted: Geometry, capacity_bytes: int) -> Geometry:
    """The geometry of an existing store: its slot and slab sizes win over the config's
    (slabs already on disk have them); the capacity is the config's."""
    try:
        slot, slab_slots = int(meta["slot_bytes"]), int(meta["slab_slots"])
        header_offset = int(meta["header_offset"])
    except (KeyError, TypeError, ValueError) as e:
        raise StorageError(f"disk store identity file is damaged ({e!r})") from None
    # The slot shape follows from the layout, whose fingerprint matched: anything else is a
    # damaged identity file, and reading slots at the wrong offsets would serve nothing.
    if (slot, header_offset) != (wanted.slot_bytes, wanted.header_offset):
        raise StorageError(f"disk store identity says slots of {slot} bytes with the header "
                           f"at {header_offset}; the layout needs {wanted.slot_bytes} and "
                           f"{wanted.header_offset}")
    if slab_slots != wanted.slab_slots:
        log.info("disk store keeps its slab size of %d slots (config asks for %d)",
                 slab_slots, wanted.slab_slots)
    return Geometry(slot_bytes=slot, slab_slots=slab_slots, max_slots=capacity_bytes // slot,
                    header_offset=header_offset)


class DirectoryLock:
    """An exclusive ``flock`` on ROOT/LOCK for as long as the store is open.

    flock locks belong to an open file description, so a second opener is refused
    whether it is another process or the same one; the kernel drops the lock when the
    holder dies, so a crashed process never leaves a stale lock behind.
    """

    def __init__(self, root: Path) -> None:
        self.path = root / LOCK_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StorageError(f"disk store {root} is already open (lock {self.path} held "
                               f"by pid {holder}); a directory serves one store at a time"
                               ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
