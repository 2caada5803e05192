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

Slab format (``kvbm-disk-v4``): the 64-byte page headers (storage/page.py) of all the slab's
slots first, then the payloads back to back::

    [0, header_area)                           header of slot i at i * 64;
                                               header_area = align_up(slab_slots * 64)
    [header_area + i * slot_bytes, +page_bytes) payload of slot i;
                                               slot_bytes = align_up(page_bytes)

With page_bytes a multiple of ALIGN (any real model's page) slots are exactly page_bytes, so
a run of adjacent slots is one contiguous stretch of the file: O_DIRECT moves it straight
between the device and the caller's aligned pages as one ``pwritev``/``preadv``, plus one
small I/O for the ALIGN blocks of the header area that cover the run's headers
(storage/disk/runs.py). A page that is not a multiple of ALIGN gets its slot rounded up (zero
padding after the payload) and is staged. A header block is shared by ALIGN / 64 slots: it is
rewritten whole from an in-memory copy of the slab's header area, under a per-slab lock, so
concurrent puts never drop each other's headers. Headers of free slots may be stale: the
index (storage/disk/index.py) is the authority, and a read compares header and payload with
what the index committed.

On the development VM (bench/offload_bandwidth.py, medians of 12 alternated runs) this took
32 KiB page writes from 0.425 to 0.530 of the raw O_DIRECT ceiling and reads from 0.688
to 0.716, with 2 MiB pages unchanged within noise (writes 0.851 -> 0.847, reads
0.934 -> 0.925): docs/tiers.md, "G3 bandwidth".

Index entries name a slot by its slab and its *slot position* ``i * slot_bytes`` (the
payload's offset within the payload area; ``Geometry.locate``); the file offsets follow from
``Geometry.payload_offset`` and ``Geometry.header_offset``.

Older formats: ``kvbm-disk-v1`` had the header first in each slot, ``-v2`` and ``-v3`` after
the payload in the slot's last ALIGN block (two segments per page on the device, 12.5% more
bytes for 32 KiB pages); ``-v2`` keyed its index by block hash, where ``-v3`` and later key it
by slot (storage/disk/index.py). Stores of other formats are refused, never misread.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvbm.errors import LayoutError, LayoutMismatchError, StorageError
from kvbm.layout import KVLayout
from kvbm.storage.page import HEADER_SIZE

log = logging.getLogger(__name__)

FORMAT = "kvbm-disk-v4"
#: Every format of this store is named with this prefix, so an older (or newer) store is
#: told apart from a directory that is no store at all.
_FORMAT_FAMILY = "kvbm-disk-"
META_NAME = "kvbm-disk.json"
#: An identity file is a few hundred bytes; one larger than this is damaged, not read whole.
_META_MAX_BYTES = 1 << 16
LOCK_NAME = "LOCK"
#: O_DIRECT needs file offsets, lengths and memory aligned to the logical block size;
#: 4096 covers every current device (512e and 4Kn) and the page size.
ALIGN = 4096


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class Geometry:
    """Where slot ``s`` lives: slab ``s // slab_slots``, at slot position ``i * slot_bytes``
    (``i = s % slab_slots``), its payload at file offset ``header_area + i * slot_bytes``
    and its header at ``i * HEADER_SIZE`` (see the module docstring)."""

    slot_bytes: int
    slab_slots: int
    max_slots: int
    header_area: int

    def locate(self, slot: int) -> tuple[int, int]:
        """The slab of ``slot`` and its slot position in it."""
        slab, i = divmod(slot, self.slab_slots)
        return slab, i * self.slot_bytes

    def slot_of(self, slab: int, offset: int) -> int:
        return slab * self.slab_slots + offset // self.slot_bytes

    def payload_offset(self, offset: int) -> int:
        """The file offset of the payload of the slot at slot position ``offset``."""
        return self.header_area + offset

    def header_offset(self, offset: int) -> int:
        """The file offset of the header of the slot at slot position ``offset``."""
        return offset // self.slot_bytes * HEADER_SIZE

    def slab_size(self, slab: int) -> int:
        return self.header_area + self.slots_in_slab(slab) * self.slot_bytes

    def slots_in_slab(self, slab: int) -> int:
        return min(self.slab_slots, self.max_slots - slab * self.slab_slots)


def header_area_for(slab_slots: int) -> int:
    return align_up(slab_slots * HEADER_SIZE)


def slots_within(capacity_bytes: int, slot_bytes: int, slab_slots: int,
                 header_area: int) -> int:
    """The most slots whose slab files (payloads and header areas) fit in
    ``capacity_bytes``: the configured capacity bounds what the tier puts on disk."""
    full = slab_slots * slot_bytes + header_area
    n, rest = divmod(capacity_bytes, full)
    return n * slab_slots + min(slab_slots - 1, max(0, rest - header_area) // slot_bytes)


def geometry_for(layout: KVLayout, capacity_bytes: int, slab_bytes: int) -> Geometry:
    """Payload slots rounded up to ALIGN, headers apart (see the module docstring). The
    capacity counts both: the header areas take 64 bytes per slot (0.2% for 32 KiB pages)."""
    slot = align_up(layout.bytes_per_block)
    # A tier smaller than one slab gets one slab of its size, not a header area sized for
    # slots it can never have.
    slab_slots = max(1, min(slab_bytes // slot, capacity_bytes // (slot + HEADER_SIZE)))
    area = header_area_for(slab_slots)
    return Geometry(slot_bytes=slot, slab_slots=slab_slots,
                    max_slots=slots_within(capacity_bytes, slot, slab_slots, area),
                    header_area=area)


class IdentityState(enum.Enum):
    ABSENT = "absent"
    OK = "ok"
    #: The identity file is there but unreadable or inconsistent (storage/disk/recover.py
    #: repairs it when the directory is provably a store of this layout).
    DAMAGED = "damaged"


@dataclass(frozen=True)
class Identity:
    state: IdentityState
    meta: dict[str, Any] | None = None
    #: What is wrong with a damaged identity file.
    problem: str = ""


#: Names kvbm itself writes in a store directory (a directory holding anything else is not
#: one we may repair or write into).
OWN_NAMES = frozenset({META_NAME, META_NAME + ".tmp", LOCK_NAME, "index", "index.new",
                       "index.damaged", "slabs"})
_PROBE_PREFIX = ".direct-probe-"  # storage/disk/slabs.py, left behind by a kill -9


def is_own_name(name: str) -> bool:
    return name in OWN_NAMES or name.startswith(_PROBE_PREFIX)


def format_version(fmt: str) -> int | None:
    """4 for ``kvbm-disk-v4``; ``None`` when ``fmt`` names no format of this store."""
    m = re.fullmatch(re.escape(_FORMAT_FAMILY) + r"v([0-9]{1,6})", fmt)
    return int(m.group(1)) if m else None


def _read_meta(path: Path, root: Path) -> bytes | None:
    """The bytes of the identity file (at most ``_META_MAX_BYTES + 1``), ``None`` when there
    is none. Opened without blocking and checked to be a regular file before it is read: a
    FIFO or a device under that name would block or never end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno != errno.EISDIR:
            raise StorageError(f"cannot read {path}: {e}; check the permissions of the "
                               f"disk store directory") from e
        fd = -1
    try:
        if fd < 0 or not stat.S_ISREG(os.fstat(fd).st_mode):
            # Not something kvbm writes: whatever it is, it is not ours to replace.
            raise StorageError(f"{path} is not a regular file; refusing to touch {root}: "
                               f"remove the directory if it is a kvbm disk store, or use "
                               f"another path")
        return os.read(fd, _META_MAX_BYTES + 1)
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot read {path}: {e}; check the permissions of the "
                           f"disk store directory") from e
    finally:
        if fd >= 0:
            os.close(fd)


def read_identity(root: Path) -> Identity:
    """The identity file of ``root``, read-only. Raises :class:`StorageError` for a store
    of another on-disk format (never guessed at) or a file that cannot be read at all."""
    raw = _read_meta(root / META_NAME, root)
    if raw is None:
        return Identity(IdentityState.ABSENT)
    if len(raw) > _META_MAX_BYTES:
        return Identity(IdentityState.DAMAGED, problem=f"larger than {_META_MAX_BYTES} bytes")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError included
        return Identity(IdentityState.DAMAGED, problem=f"not UTF-8 JSON ({e})")
    if not isinstance(meta, dict):
        return Identity(IdentityState.DAMAGED, problem=f"not a JSON object ({type(meta)})")
    fmt = meta.get("format")
    if fmt != FORMAT:
        if isinstance(fmt, str) and format_version(fmt) is not None:
            # Never guess at another format's slots: its pages would be misread or torn.
            raise StorageError(f"disk store {root} is in on-disk format {fmt!r}, and this "
                               f"kvbm reads {FORMAT!r} only; remove the directory to "
                               f"discard its pages (the tier is a cache), or use another "
                               f"path")
        return Identity(IdentityState.DAMAGED, problem=f"format {fmt!r}")
    problem = _meta_problem(meta)
    if problem:
        return Identity(IdentityState.DAMAGED, problem=problem)
    return Identity(IdentityState.OK, meta)


def _meta_problem(meta: dict[str, Any]) -> str:
    """What makes ``meta`` (of this format) inconsistent; ``""`` when nothing does."""
    fields = {}
    for name in ("page_bytes", "slot_bytes", "slab_slots", "header_area"):
        value = meta.get(name)
        if type(value) is not int or value <= 0:
            return f"{name} is {value!r}"
        fields[name] = value
    fp = meta.get("fingerprint")
    if not isinstance(fp, str) or not re.fullmatch(r"[0-9a-f]{16}", fp):
        return f"fingerprint is {fp!r}"
    layout = meta.get("layout")
    try:
        if not isinstance(layout, dict):
            raise LayoutError(f"not a JSON object: {layout!r}")
        stored = KVLayout.from_dict(layout)
    except (LayoutError, ValueError, TypeError) as e:
        return f"layout is unreadable ({e})"
    # The fingerprint is derived from the layout: a mismatch is damage, not another model.
    if f"{stored.fingerprint:016x}" != fp:
        return f"fingerprint {fp} is not that of its layout ({stored.fingerprint:016x})"
    if fields["page_bytes"] != stored.bytes_per_block:
        return f"page_bytes {fields['page_bytes']} is not that of its layout"
    if fields["slot_bytes"] != align_up(stored.bytes_per_block):
        return f"slot_bytes {fields['slot_bytes']} does not fit its layout"
    if fields["header_area"] != header_area_for(fields["slab_slots"]):
        return (f"header_area {fields['header_area']} does not fit slab_slots "
                f"{fields['slab_slots']}")
    return ""


def check_identity(root: Path, layout: KVLayout) -> Identity:
    """The identity of a store at ``root`` (``ABSENT`` if there is none yet).

    Raises :class:`LayoutMismatchError` when it was written under another layout, and
    :class:`StorageError` when ``root`` is a non-empty directory that is not a store.
    Touches nothing. A ``DAMAGED`` identity is returned only for a directory that holds
    nothing but what kvbm writes (storage/disk/recover.py decides what it held).
    """
    if not root.exists():
        return Identity(IdentityState.ABSENT)
    if not root.is_dir():
        raise StorageError(f"disk store path {root} exists and is not a directory")
    ident = read_identity(root)
    if ident.state is IdentityState.ABSENT:
        names = {p.name for p in root.iterdir()}
        # A kill -9 during the first open can leave the lock and a half-written
        # temporary identity file behind: that is still an empty store.
        if names <= {LOCK_NAME, META_NAME + ".tmp"}:
            return ident
        if not all(map(is_own_name, names)):
            raise StorageError(f"{root} is neither empty nor a kvbm disk store "
                               f"(no {META_NAME}); refusing to write into it")
        # Nothing but what kvbm writes, its identity file lost: damaged, and repaired like
        # any damaged one (storage/disk/recover.py reads the slabs' layout first).
        ident = Identity(IdentityState.DAMAGED, problem=f"{META_NAME} is missing")
    if ident.state is IdentityState.DAMAGED:
        foreign = sorted(p.name for p in root.iterdir() if not is_own_name(p.name))
        if foreign:
            raise StorageError(f"{root / META_NAME} is damaged ({ident.problem}) and {root} "
                               f"holds files kvbm does not write ({', '.join(foreign[:4])}); "
                               f"refusing to touch it: remove the directory if it is a "
                               f"kvbm disk store, or use another path")
        return ident
    meta = ident.meta
    assert meta is not None
    if meta["fingerprint"] != f"{layout.fingerprint:016x}":
        raise LayoutMismatchError(
            f"disk store {root} holds pages of layout {meta.get('layout')} (fingerprint "
            f"{meta.get('fingerprint')}), not of {layout.to_dict()} (fingerprint "
            f"{layout.fingerprint:016x}); use another path for this model, or remove the "
            f"directory to discard its pages")
    return ident


def fsync_dir(path: Path) -> None:
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
            "header_area": geometry.header_area}
    tmp = root / (META_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / META_NAME)
    fsync_dir(root)
    return meta


def stored_geometry(meta: dict[str, Any], wanted: Geometry, capacity_bytes: int) -> Geometry:
    """The geometry of an existing store (an identity :func:`read_identity` found
    consistent): its slot and slab sizes win over the config's (slabs already on disk have
    them); the capacity is the config's."""
    slot, slab_slots = int(meta["slot_bytes"]), int(meta["slab_slots"])
    header_area = int(meta["header_area"])
    if slab_slots != wanted.slab_slots:
        log.info("disk store keeps its slab size of %d slots (config asks for %d)",
                 slab_slots, wanted.slab_slots)
    return Geometry(slot_bytes=slot, slab_slots=slab_slots,
                    max_slots=slots_within(capacity_bytes, slot, slab_slots, header_area),
                    header_area=header_area)


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
