"""Slab files: preallocated files of fixed-size slots, read and written with positional I/O.

One fd per slab serves every thread (``pread``/``pwrite`` carry their own offset). With
O_DIRECT the kernel DMA's straight between our aligned buffers and the device: no page
cache pollution from a tier whose working set is far larger than RAM, and cold reads
really are cold. Where the filesystem refuses O_DIRECT the same code runs buffered.
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


class BufferPool:
    """Reusable aligned staging buffers of one size.

    Fresh anonymous memory page-faults on first touch at about half of memcpy speed, so
    buffers are kept and reused rather than allocated per I/O.
    """

    def __init__(self, nbytes: int, keep: int) -> None:
        self.nbytes = nbytes
        self._keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def acquire(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return aligned_buffer(self.nbytes)

    def release(self, buf: mmap.mmap) -> None:
        # Past ``keep``, the buffer is just dropped: views of it may still be alive in the
        # caller's frame, and the mmap unmaps itself once the last one goes.
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


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
        size = self.geometry.slots_in_slab(slab) * self.geometry.slot_bytes
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

    def write(self, slab: int, offset: int, data: memoryview) -> None:
        """Write all of ``data`` at ``offset`` (aligned, for O_DIRECT)."""
        fd = self._fd(slab, for_write=True)
        assert fd is not None
        done, n = 0, data.nbytes
        while done < n:
            wrote = os.pwrite(fd, data[done:], offset + done)
            if wrote <= 0:
                raise StorageError(f"short write to {self.path(slab)} at {offset + done}")
            done += wrote

    def read(self, slab: int, offset: int, into: memoryview) -> int:
        """Read up to ``into.nbytes`` from ``offset``; the count is short at end of file."""
        fd = self._fd(slab, for_write=False)
        if fd is None:
            return 0
        done, n = 0, into.nbytes
        while done < n:
            got = os.preadv(fd, [into[done:]], offset + done)
            if got <= 0:
                break
            done += got
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
