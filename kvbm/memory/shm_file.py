"""The file behind a shared host pool: where it lives, its name, its header, its sizes, and
the removal of files whose creator died (see :mod:`kvbm.memory.shm` for the pool itself).

Format, all integers little-endian:

- bytes ``[0, HEADER_BYTES)``: the header, :data:`HEADER` (``magic``, ``version``, header
  size, layout fingerprint, bytes per block, number of blocks, tag columns, offsets of the tags
  and of the pages, total size, creator pid, creator pid namespace), then an xxh3-64 of the
  preceding header bytes; the rest of the 4 KiB is zero;
- from ``tags_offset`` (= ``HEADER_BYTES``): the tags, ``uint64[num_blocks, tag_columns]``;
- from ``pages_offset`` (the end of the tags rounded up to the OS page size): the pages,
  ``num_blocks × bytes_per_block``, page-aligned (O_DIRECT can read and write them);
- ``total_bytes`` = ``pages_offset + num_blocks × bytes_per_block``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import re
import stat
import struct
import tempfile
from dataclasses import astuple, dataclass
from pathlib import Path

import xxhash

from kvbm.errors import InvalidArgumentError, StorageError
from kvbm.layout import KVLayout

log = logging.getLogger(__name__)

#: Where pools live when it is a writable directory (else the temporary directory).
SHM_DIR = "/dev/shm"
MAGIC = b"KVBM-G2\x00"
VERSION = 1
#: magic, version, header bytes, then the nine u64 fields of :class:`PoolHeader`.
HEADER = struct.Struct("<8sII9Q")
_CHECKSUM = struct.Struct("<Q")
HEADER_BYTES = 4096
MAX_TAG_COLUMNS = 1024
#: More blocks than any machine holds; bounds what a damaged header can make us compute.
MAX_BLOCKS = 1 << 40
_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")


def shm_directory() -> Path:
    """:data:`SHM_DIR` where it is a writable directory, else ``tempfile.gettempdir()``."""
    d = Path(SHM_DIR)
    if d.is_dir() and os.access(d, os.W_OK | os.X_OK):
        return d
    return Path(tempfile.gettempdir())


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise InvalidArgumentError(f"prefix must be 1-64 letters, digits, '_', '.' or '-', "
                                   f"starting with a letter or digit; got {prefix!r}")
    return prefix


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(f"a shared pool name is 1-255 letters, digits, '_', '.' "
                                   f"or '-' (a name, not a path), got {name!r}")
    return name


def pid_namespace() -> int:
    """This process's pid namespace (an inode number; 0 where /proc does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process, or no such pid value
        return True
    return True


def pool_sizes(page: int, num_blocks: int, tag_columns: int) -> tuple[int, int, int]:
    """``(tags_offset, pages_offset, total_bytes)`` of a pool."""
    tags = HEADER_BYTES
    pages = -(-(tags + num_blocks * tag_columns * 8) // mmap.PAGESIZE) * mmap.PAGESIZE
    return tags, pages, pages + num_blocks * page


@dataclass(frozen=True)
class PoolHeader:
    """What a pool file says of itself (after its magic, version and header size)."""

    fingerprint: int
    bytes_per_block: int
    num_blocks: int
    tag_columns: int
    tags_offset: int
    pages_offset: int
    total_bytes: int
    creator_pid: int
    creator_pidns: int

    @classmethod
    def new(cls, layout: KVLayout, num_blocks: int, tag_columns: int) -> PoolHeader:
        page = layout.bytes_per_block
        return cls(layout.fingerprint, page, num_blocks, tag_columns,
                   *pool_sizes(page, num_blocks, tag_columns), os.getpid(), pid_namespace())

    def pack(self) -> bytes:
        body = HEADER.pack(MAGIC, VERSION, HEADER_BYTES, *astuple(self))
        return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))

    @classmethod
    def read(cls, fd: int, what: str) -> PoolHeader:
        """The header of an open file; :class:`StorageError` when it is not a pool's header
        of this version, is damaged, or its sizes do not add up."""
        n = HEADER.size + _CHECKSUM.size
        raw = os.pread(fd, n, 0)
        if len(raw) < n or raw[:len(MAGIC)] != MAGIC:
            raise StorageError(f"{what} is not a kvbm shared host pool (no kvbm header)")
        _, version, hdr, *fields = HEADER.unpack(raw[:HEADER.size])
        if version != VERSION:
            raise StorageError(f"{what} has format version {version}; this kvbm reads "
                               f"{VERSION}")
        if _CHECKSUM.unpack(raw[HEADER.size:])[0] != xxhash.xxh3_64_intdigest(raw[:HEADER.size]):
            raise StorageError(f"{what}: its header fails its checksum (damaged)")
        h = cls(*fields)
        if (hdr != HEADER_BYTES or not 0 < h.num_blocks <= MAX_BLOCKS or h.bytes_per_block <= 0
                or not 1 <= h.tag_columns <= MAX_TAG_COLUMNS
                or pool_sizes(h.bytes_per_block, h.num_blocks, h.tag_columns)
                != (h.tags_offset, h.pages_offset, h.total_bytes)):
            raise StorageError(f"{what}: the sizes in its header do not add up")
        return h


def _stale(path: str, name: str, pid: int, ns: int) -> bool:
    """Whether ``path`` is a regular file of this user with a valid pool header whose creator
    is ``pid`` in pid namespace ``ns``."""
    st = os.stat(path, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        h = PoolHeader.read(fd, name)
    finally:
        os.close(fd)
    return h.creator_pid == pid and h.creator_pidns == ns


def sweep_stale(prefix: str) -> list[str]:
    """Remove the pool files of ``prefix`` whose creator died without removing them; returns
    their names. Only files named ``{prefix}-{pid}-{16 hex digits}``, of this user, whose
    valid header names that pid in this pid namespace (another container's pid 42 is not
    ours), and no live process has that pid. Anything else is left alone."""
    check_prefix(prefix)
    pattern = re.compile(re.escape(prefix) + r"-([0-9]{1,10})-[0-9a-f]{16}")
    me, ns, removed = os.getpid(), pid_namespace(), []
    with contextlib.suppress(OSError):
        for entry in os.scandir(shm_directory()):
            m = pattern.fullmatch(entry.name)
            if m is None:
                continue
            pid = int(m.group(1))
            if pid == me or pid_alive(pid):
                continue
            try:
                if not _stale(entry.path, entry.name, pid, ns):
                    continue
                os.unlink(entry.path)
            except (OSError, StorageError):  # not a pool of ours, or removed meanwhile
                continue
            log.info("removed the stale shared host pool %s (creator pid %d is gone)",
                     entry.name, pid)
            removed.append(entry.name)
    return removed
