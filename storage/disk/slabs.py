"""Slab files: preallocated files of fixed-size slots, read and written with positional I/O.

One fd per slab serves every thread (``preadv``/``pwritev`` carry their own offset). With
O_DIRECT the kernel DMA's straight between aligned buffers (the caller's pages, or staging
buffers: storage/disk/runs.py) and the device: no page cache pollution from a tier whose
working set is far larger than RAM, and cold reads really are cold. Where the filesystem
refuses O_DIRECT the same code runs buffered.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from kvbm.errors import StorageError
from kvbm.storage.disk.directory import ALIGN, Geometry

log = logging.getLogger(__name__)

_O_DIRECT: int = getattr(os, "O_DIRECT", 0)

#: Most buffers one pwritev/preadv takes (the kernel's UIO_MAXIOV, 1024 on Linux).
IOV_MAX: int = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def _skip(iov: list[memoryview], n: int) -> list[memoryview]:
    """``iov`` without its first ``n`` bytes (after a short transfer)."""
    i = 0
    while n >= iov[i].nbytes:
        n -= iov[i].nbytes
        i += 1
    rest = iov[i:]
    rest[0] = rest[0][n:]
    return rest


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """``nbytes`` (rounded up to ALIGN) of anonymous memory, page-aligned as O_DIRECT needs."""
    return mmap.mmap(-1, (nbytes + ALIGN - 1) // ALIGN * ALIGN)


def probe_direct_io(directory: Path) -> bool:
    """Whether files in ``directory`` accept an aligned O_DIRECT write and read."""
    if not _O_DIRECT:
        return False
    probe = directory / f".direct-probe-{os.getpid()}-{threading.get_ident()}"
    buf = aligned_buffer(ALIGN)
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_TRUNC | _O_DIRECT, 0o600)
        try:
            return os.pwrite(fd, buf, 0) == ALIGN and os.preadv(fd, [buf], 0) == ALIGN
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise
        return False
    finally:
        buf.close()
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()


class SlabFiles:
    """The slab files of one store, opened lazily and preallocated on first write."""

    def __init__(self, directory: Path, geometry: Geometry, *, direct: bool) -> None:
        self.dir = directory
        self.geometry = geometry
        self.direct = direct
        self._fds: dict[int, int] = {}
        self._allocated: set[int] = set()
        self._lock = threading.Lock()
        directory.mkdir(exist_ok=True)

    def path(self, slab: int) -> Path:
        return self.dir / f"{slab:06d}.slab"

    def existing(self) -> list[int]:
        """Ids of the slab files on disk."""
        out = []
        for p in self.dir.glob("*.slab"):
            with contextlib.suppress(ValueError):
                out.append(int(p.stem))
        return sorted(out)

    def _fd(self, slab: int, *, for_write: bool) -> int | None:
        with self._lock:
            fd = self._fds.get(slab)
            if fd is None:
                flags = os.O_RDWR | (_O_DIRECT if self.direct else 0)
                try:
                    fd = os.open(self.path(slab), flags | (os.O_CREAT if for_write else 0), 0o644)
                except FileNotFoundError:
                    return None  # a slab that is gone reads as nothing: a torn page
                self._fds[slab] = fd
            if for_write and slab not in self._allocated:
                self._preallocate(slab, fd)
            return fd

    def _preallocate(self, slab: int, fd: int) -> None:
        # Reserve the whole slab now, so that a full disk shows up here as one clear
        # error instead of as a failed write in the middle of a batch, and so that the
        # slab is one extent that sequential writes stream into.
        size = self.geometry.slab_size(slab)
        if os.fstat(fd).st_size < size:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise StorageError(f"cannot preallocate {size} bytes for "
                                       f"{self.path(slab)}: {e}") from e
                os.ftruncate(fd, size)  # filesystems without fallocate: a sparse file
            # The new directory entry must be durable before any index entry points at it.
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._allocated.add(slab)

    def writev(self, slab: int, offset: int, iov: list[memoryview]) -> None:
        """Write all of ``iov`` (at most IOV_MAX buffers; with O_DIRECT each aligned in
        memory and length) contiguously from ``offset``."""
        fd = self._fd(slab, for_write=True)
        assert fd is not None
        left = sum(b.nbytes for b in iov)
        while left:
            wrote = os.pwritev(fd, iov, offset)
            if wrote <= 0:
                raise StorageError(f"short write to {self.path(slab)} at {offset}")
            left -= wrote
            offset += wrote
            if left:
                iov = _skip(iov, wrote)

    def readv(self, slab: int, offset: int, iov: list[memoryview]) -> int:
        """Fill ``iov`` from ``offset`` on; the count is short at the end of the file (0 for a
        slab that is gone)."""
        fd = self._fd(slab, for_write=False)
        if fd is None:
            return 0
        done, left = 0, sum(b.nbytes for b in iov)
        while left:
            got = os.preadv(fd, iov, offset + done)
            if got <= 0:
                break
            done += got
            left -= got
            if left:
                iov = _skip(iov, got)
        return done

    def sync(self, slabs: Iterable[int]) -> None:
        """Make written data durable (device cache flushed, extent metadata committed):
        O_DIRECT alone promises neither."""
        for slab in slabs:
            with self._lock:
                fd = self._fds.get(slab)
            if fd is not None:
                os.fdatasync(fd)

    def drop_cache(self) -> None:
        """Evict the slabs from the page cache (for cold-read benchmarks of buffered I/O;
        with O_DIRECT nothing of them is cached in the first place)."""
        with self._lock:
            fds = list(self._fds.values())
        for fd in fds:
            os.fdatasync(fd)  # DONTNEED skips dirty pages
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
