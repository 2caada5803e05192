"""A run of adjacent slots, read or written with one vectored system call.

Slot format: storage/disk/directory.py (payload first, then the page header).

Zero-copy: a payload whose memory the kernel may transfer directly is its own iovec entry:
with buffered I/O any buffer; with O_DIRECT one that is ALIGN-aligned in memory with
``page_bytes`` a multiple of ALIGN (HostPool pages are). Any other payload is copied
through a slot-shaped staging buffer. Headers (and padding) always come from that staging
buffer, at their place in the slot image, so a run of n slots is one ``pwritev``/``preadv``
of at most ``2n + 1`` entries (payload 0, header block 0, payload 1, ...), and a run that is
staged entirely is one contiguous buffer.

Write staging buffers are only ever written at payload and header positions: their padding
stays zero (anonymous memory starts zeroed) without being cleared page by page. Reads use
their own buffers, which end up holding whatever the slots held.

Per page this costs one xxh3-128 of the payload (the only pass over its bytes when it is
zero-copy) and one header packed; a read compares the stored header with the one expected
from the index entry (one bytes comparison covers magic, version, layout, key, length and
checksum) and the payload's hash with the entry's checksum, so a slot that mixes a new
header with an old payload, or the reverse, is never served.

Pages come and go as parallel lists, and the iovec entries of the header blocks are views
made once per staging buffer: a batch allocates no Python object per page that outlives the
call. (Thousands of such objects per batch are promoted by the cyclic GC and trigger full
collections, which in a process that holds torch cost ~100 ms each.)
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from xxhash import xxh3_128_digest

from kvbm.storage.disk.directory import ALIGN, Geometry
from kvbm.storage.disk.slabs import IOV_MAX, SlabFiles
from kvbm.storage.page import HEADER_SIZE, PageFault, PageHeader, pack_header, parse_header

#: Most slots in one run: each may take two iovec entries, plus one for staged bytes.
MAX_RUN_SLOTS = (IOV_MAX - 1) // 2


@dataclass(frozen=True, slots=True)
class Run:
    """Adjacent slots of one slab, read or written with one system call: positions
    ``start:stop`` of a batch's lists, which are in slot order."""

    slab: int
    offset: int
    start: int
    stop: int


def cut_runs(slots: Sequence[int], geometry: Geometry, limit: int) -> list[Run]:
    """Cut ascending ``slots`` into runs of adjacent slots of one slab, ``limit`` at most."""
    runs: list[Run] = []
    start = 0
    for j in range(1, len(slots) + 1):
        if (j == len(slots) or slots[j] != slots[j - 1] + 1 or j - start == limit
                or slots[j] % geometry.slab_slots == 0):
            slab, offset = geometry.locate(slots[start])
            runs.append(Run(slab, offset, start, j))
            start = j
    return runs


def _dma_buffer(nbytes: int) -> mmap.mmap:
    """Zeroed, page-aligned private memory, in transparent huge pages where the kernel allows.

    Huge pages make a buffer physically contiguous in 2 MiB pieces: the kernel then hands the
    device a few large segments per request instead of one per 4 KiB page, and O_DIRECT runs
    about twice as fast as from ``mmap.mmap(-1, n)`` (shared memory, 4 KiB pages) on the
    development VM.
    """
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no THP: plain pages, still correct
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


class _Staging:
    """A slot-shaped buffer for one run (:func:`_dma_buffer`), and views of each slot's part
    after the payload (padding + header block), made once."""

    def __init__(self, slots: int, geometry: Geometry) -> None:
        slot, pb = geometry.slot_bytes, geometry.header_offset
        self.map = _dma_buffer(slots * slot)
        self.image = memoryview(self.map)
        self.tails = [self.image[j * slot + pb:(j + 1) * slot] for j in range(slots)]


class _StagingPool:
    """Staging buffers kept for reuse: fresh memory page-faults on first touch, at about
    half of memcpy speed."""

    def __init__(self, slots: int, geometry: Geometry, keep: int) -> None:
        self._slots = slots
        self._geometry = geometry
        self._keep = keep
        self._free: list[_Staging] = []
        self._lock = threading.Lock()

    def acquire(self) -> _Staging:
        with self._lock:
            if self._free:
                return self._free.pop()
        return _Staging(self._slots, self._geometry)

    def release(self, buf: _Staging) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


class RunIO:
    """Vectored reads and writes of runs of slots of one store (thread-safe)."""

    def __init__(self, slabs: SlabFiles, geometry: Geometry, page_bytes: int, fingerprint: int,
                 *, max_run_slots: int, keep_buffers: int) -> None:
        self._slabs = slabs
        self.slot_bytes = geometry.slot_bytes
        self.page_bytes = page_bytes
        self.fingerprint = fingerprint
        self._direct = slabs.direct
        #: With O_DIRECT, only pages of a whole number of ALIGN blocks can go zero-copy.
        self._direct_size_ok = page_bytes % ALIGN == 0
        self._write_buffers = _StagingPool(max_run_slots, geometry, keep_buffers)
        self._read_buffers = _StagingPool(max_run_slots, geometry, keep_buffers)

    def zero_copy(self, buf: memoryview) -> bool:
        """Whether ``buf`` (one page) can be an iovec entry of this store's I/O as it is."""
        if not self._direct:
            return True
        if not self._direct_size_ok:
            return False
        try:
            address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        except TypeError:  # read-only memory: ctypes cannot tell where it is, so stage it
            return False
        return address % ALIGN == 0

    def _iov(self, staging: _Staging, bufs: Sequence[memoryview], direct: Sequence[bool]
             ) -> list[memoryview]:
        """The iovec of a run: each zero-copy page's buffer and the rest of its slot from
        ``staging``; the slots of staged pages from ``staging`` whole, adjacent ones merged."""
        slot, image, tails = self.slot_bytes, staging.image, staging.tails
        iov: list[memoryview] = []
        start = -1  # first byte of a stretch of staged slots not yet in ``iov``
        for j, buf in enumerate(bufs):
            if direct[j]:
                if start >= 0:
                    iov.append(image[start:j * slot])
                    start = -1
                iov.append(buf)
                iov.append(tails[j])
            elif start < 0:
                start = j * slot
        if start >= 0:
            iov.append(image[start:len(bufs) * slot])
        return iov

    def write(self, slab: int, offset: int, keys: Sequence[int],
              payloads: Sequence[memoryview]) -> tuple[list[bytes], int]:
        """Write pages (parallel lists) to the adjacent slots from ``offset`` on.

        Returns each page's payload checksum, and how many pages were staged (copied).
        """
        slot, pb, fp = self.slot_bytes, self.page_bytes, self.fingerprint
        staging = self._write_buffers.acquire()
        try:
            image, buf = staging.image, staging.map
            direct = [self.zero_copy(p) for p in payloads]
            checksums = [xxh3_128_digest(p) for p in payloads]
            for j, key in enumerate(keys):
                head = j * slot + pb
                buf[head:head + HEADER_SIZE] = pack_header(fp, key, pb, checksums[j])
                if not direct[j]:
                    image[head - pb:head] = payloads[j]
            self._slabs.writev(slab, offset, self._iov(staging, payloads, direct))
            return checksums, len(keys) - sum(direct)
        finally:
            self._write_buffers.release(staging)

    def read(self, slab: int, offset: int, keys: Sequence[int], dests: Sequence[memoryview],
             checksums: Sequence[bytes]) -> tuple[list[str | None], int]:
        """Read pages (parallel lists) from the adjacent slots from ``offset`` on into their
        destinations, and verify each against its key and the checksum its index entry holds.

        Returns, per page, ``None`` when it verified (its payload is then in its destination)
        or why not (a destination's content is then unspecified); and how many were staged.
        """
        slot, pb, fp = self.slot_bytes, self.page_bytes, self.fingerprint
        staging = self._read_buffers.acquire()
        try:
            image, buf = staging.image, staging.map
            direct = [self.zero_copy(d) for d in dests]
            got = self._slabs.readv(slab, offset, self._iov(staging, dests, direct))
            faults: list[str | None] = []
            for j, key in enumerate(keys):
                head = j * slot + pb
                if got < head + HEADER_SIZE:
                    faults.append(PageFault.TRUNCATED.value)  # the slab ends early: torn
                    continue
                stored = buf[head:head + HEADER_SIZE]
                payload = dests[j] if direct[j] else image[head - pb:head]
                if stored != pack_header(fp, key, pb, checksums[j]):
                    faults.append(self._header_fault(stored, key))
                elif xxh3_128_digest(payload) != checksums[j]:
                    faults.append(PageFault.BAD_CHECKSUM.value)
                else:
                    if not direct[j]:
                        dests[j][:] = payload
                    faults.append(None)
            return faults, len(keys) - sum(direct)
        finally:
            self._read_buffers.release(staging)

    def _header_fault(self, stored: bytes, key: int) -> str:
        """Why a stored header is not the expected one (for the log)."""
        parsed = parse_header(stored)
        if not isinstance(parsed, PageHeader):
            return parsed.value
        if parsed.fingerprint != self.fingerprint:
            return PageFault.WRONG_LAYOUT.value
        if parsed.seq_hash != key:
            return PageFault.WRONG_HASH.value
        if parsed.payload_len != self.page_bytes:
            return PageFault.BAD_LENGTH.value
        # A valid header of this key, but not of the payload the index committed: an older
        # page of the key in a slot never reused since, or a new header over an old payload.
        return "stale"
