"""A run of adjacent slots, read or written with one vectored system call for the payloads
and one small one for their headers.

Slab format: storage/disk/directory.py (``kvbm-disk-v4``: the headers of a slab's slots in
its header area, the payloads back to back after it).

Zero-copy: a payload whose memory the kernel may transfer directly is its own iovec entry:
with buffered I/O any buffer; with O_DIRECT one that is ALIGN-aligned in memory with
``page_bytes`` a multiple of ALIGN (HostPool pages are). Any other payload is copied
through a slot-shaped staging buffer. The payloads of a run are contiguous on disk, so a
run of n slots is one ``pwritev``/``preadv`` of at most ``n + 1`` entries (more only when
slots are padded, which pages of a whole number of ALIGN blocks never are), and a run that
is staged entirely is one contiguous buffer. (Under ``kvbm-disk-v3``, whose zero-copy I/O
reached the device as two segments per page, reads of small pages were staged whole on
purpose; with contiguous payloads zero-copy reads are faster.)

Headers: a write packs the run's headers into a small buffer and copies them into the
in-memory image of its slab's header area (:class:`HeaderAreas`, loaded from the slab on
first use); once all the runs of a put are written, the ALIGN blocks that cover their
headers are written from the image (one write per stretch), under the slab's lock: a header
block is shared by ALIGN / 64 slots, and rewriting it whole from the image keeps every other
slot's header as its own put last wrote it. A read preads those blocks
from the slab (never the image: what is verified is what the device holds).

Write staging buffers are only ever written at payload positions: their padding stays zero
(anonymous memory starts zeroed) without being cleared page by page. Reads use their own
buffers, which end up holding whatever the slots held.

Per page this costs one xxh3-128 of the payload (the only pass over its bytes when it is
zero-copy) and one header packed; a read compares the stored header with the one expected
from the index entry (one bytes comparison covers magic, version, layout, key, length and
checksum) and the payload's hash with the entry's checksum, so a slot that mixes a new
header with an old payload, or the reverse, is never served. That work, and any staging
copy, runs in ``kvbm._xxh3`` (``seal_pages``, ``check_pages``) without the GIL, so one
run's hashing overlaps the others' Python as well as their system calls;
:func:`seal_pages_py` and :func:`check_pages_py` are the pure-Python reference, used where
the extension was not built.

Pages come and go as parallel lists, and the iovec entries of the padding are views made
once per staging buffer: a batch allocates no Python object per page that outlives the
call. (Thousands of such objects per batch are promoted by the cyclic GC and trigger full
collections, which in a process that holds torch cost ~100 ms each.)
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from xxhash import xxh3_64_intdigest, xxh3_128_digest

from kvbm.pool import dma_memory
from kvbm.storage.disk.directory import ALIGN, Geometry, align_up
from kvbm.storage.disk.slabs import IOV_MAX, SlabFiles, aligned_buffer
from kvbm.storage.page import HEADER_SIZE, PageFault, PageHeader, pack_header, parse_header

#: Most slots in one run: each may take two iovec entries (payload, padding), plus one for
#: staged bytes.
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


#: A header (storage/page.py) is this prefix (magic, version, reserved: the same in every
#: header), then _FIELDS, then _SUM (xxh3-64 of the two, and padding).
HEADER_PREFIX = pack_header(0, 0, 0, bytes(16))[:12]
_FIELDS = struct.Struct("<QQQ16s")  # fingerprint, key, payload length, checksum
_SUM = struct.Struct("<Q4x")
#: The native hash covers long inputs only (xxh3's > 240-byte path): no page is shorter.
_NATIVE_MIN_PAGE = 241


class Sealer(Protocol):
    def __call__(self, payloads: Sequence[memoryview], keys: Sequence[int], prefix: bytes,
                 fingerprint: int, page_bytes: int, image: mmap.mmap, slot_bytes: int,
                 heads: memoryview, align: int, /) -> tuple[list[bytes], bytes]: ...


class Checker(Protocol):
    def __call__(self, dests: Sequence[memoryview], keys: Sequence[int], prefix: bytes,
                 fingerprint: int, page_bytes: int, image: mmap.mmap, slot_bytes: int,
                 heads: memoryview, checksums: Sequence[bytes], zero_copy: bytes, got: int,
                 /) -> bytes: ...


_native_seal: Sealer | None
_native_check: Checker | None
try:  # the native per-page loops (kvbm/_xxh3.c): same results, no GIL held
    from kvbm._xxh3 import check_pages as _native_check
    from kvbm._xxh3 import seal_pages as _native_seal
except ImportError:  # pragma: no cover - exercised when the extension was not built
    _native_seal = _native_check = None


def _zero_copy(buf: memoryview, align: int) -> bool:
    """Whether ``buf`` may be an iovec entry as it is: any buffer when ``align`` is 0
    (buffered I/O), a writable one whose address ``align`` divides when it is > 0, none when
    it is < 0."""
    if align <= 0:
        return align == 0
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    except TypeError:  # read-only memory: ctypes cannot tell where it is, so stage it
        return False
    return address % align == 0


def seal_pages_py(payloads: Sequence[memoryview], keys: Sequence[int], prefix: bytes,
                  fingerprint: int, page_bytes: int, image: mmap.mmap, slot_bytes: int,
                  heads: memoryview, align: int, /) -> tuple[list[bytes], bytes]:
    """The per-page work of a write, in Python (the reference of ``kvbm._xxh3.seal_pages``,
    which does the same without holding the GIL): each payload's checksum; its header
    (``prefix`` then the fields, storage/page.py) at ``heads[64 * j]``; the payload itself
    at ``image[j * slot_bytes]`` unless it goes zero-copy. Returns the checksums, and per
    page 1 (zero-copy) or 0 (staged)."""
    checksums = [xxh3_128_digest(p) for p in payloads]
    flags = bytearray(len(payloads))
    for j, key in enumerate(keys):
        heads[j * HEADER_SIZE:(j + 1) * HEADER_SIZE] = _header(prefix, fingerprint, key,
                                                               page_bytes, checksums[j])
        if _zero_copy(payloads[j], align):
            flags[j] = 1
        else:
            image[j * slot_bytes:j * slot_bytes + page_bytes] = payloads[j]
    return checksums, bytes(flags)


#: What :func:`check_pages_py` (and ``kvbm._xxh3.check_pages``) say of each page read.
CHECK_OK, CHECK_TRUNCATED, CHECK_HEADER, CHECK_CHECKSUM = range(4)


def _header(prefix: bytes, fingerprint: int, key: int, page_bytes: int,
            checksum: bytes) -> bytes:
    body = prefix + _FIELDS.pack(fingerprint, key, page_bytes, checksum)
    return body + _SUM.pack(xxh3_64_intdigest(body))


def check_pages_py(dests: Sequence[memoryview], keys: Sequence[int], prefix: bytes,
                   fingerprint: int, page_bytes: int, image: mmap.mmap, slot_bytes: int,
                   heads: memoryview, checksums: Sequence[bytes], zero_copy: bytes, got: int,
                   /) -> bytes:
    """The per-page work of a read, in Python (the reference of ``kvbm._xxh3.check_pages``,
    which does the same without holding the GIL). ``image`` holds the payloads as read,
    ``slot_bytes`` apart, except those of pages whose ``zero_copy`` flag is set, which went
    straight to their destinations; ``heads`` the headers, 64 bytes apart; only the first
    ``got`` pages were read whole. Per page: CHECK_OK (verified, and now in its
    destination), CHECK_TRUNCATED (the read ended before the page or its header did),
    CHECK_HEADER (not the header expected of it) or CHECK_CHECKSUM (its payload does not
    match)."""
    status = bytearray(len(dests))
    for j, key in enumerate(keys):
        if j >= got:
            status[j] = CHECK_TRUNCATED
        elif heads[j * HEADER_SIZE:(j + 1) * HEADER_SIZE] != _header(
                prefix, fingerprint, key, page_bytes, checksums[j]):
            status[j] = CHECK_HEADER
        else:
            start = j * slot_bytes
            payload = dests[j] if zero_copy[j] else memoryview(image)[start:start + page_bytes]
            if xxh3_128_digest(payload) != checksums[j]:
                status[j] = CHECK_CHECKSUM
            elif not zero_copy[j]:
                dests[j][:] = payload
    return bytes(status)


def sealer_for(page_bytes: int) -> Sealer:
    """The native sealer where it was built and the page is long enough, else Python."""
    if _native_seal is not None and page_bytes >= _NATIVE_MIN_PAGE:
        return _native_seal
    return seal_pages_py


def checker_for(page_bytes: int) -> Checker:
    """The native checker where it was built and the page is long enough, else Python."""
    if _native_check is not None and page_bytes >= _NATIVE_MIN_PAGE:
        return _native_check
    return check_pages_py


class _Staging:
    """A slot-shaped buffer for one run's payloads (:func:`kvbm.pool.dma_memory`: huge
    pages where the kernel allows, which O_DIRECT moves much faster), views of each slot's
    padding after the payload (none when slots are not padded), made once, and room for the
    run's headers: for a write, packed 64 bytes apart; for a read, the ALIGN blocks of the
    header area that cover them."""

    def __init__(self, slots: int, geometry: Geometry, page_bytes: int) -> None:
        slot = geometry.slot_bytes
        self.map = dma_memory(slots * slot)
        self.image = memoryview(self.map)
        self.tails: list[memoryview | None] = [
            self.image[j * slot + page_bytes:(j + 1) * slot] if slot > page_bytes else None
            for j in range(slots)]
        # A run's headers start anywhere in a block: one block more than they fill.
        self.head_map = aligned_buffer(align_up(slots * HEADER_SIZE) + ALIGN)
        self.heads = memoryview(self.head_map)


class _StagingPool:
    """Staging buffers kept for reuse: fresh memory page-faults on first touch, at about
    half of memcpy speed."""

    def __init__(self, slots: int, geometry: Geometry, page_bytes: int, keep: int) -> None:
        self._slots = slots
        self._geometry = geometry
        self._page_bytes = page_bytes
        self._keep = keep
        self._free: list[_Staging] = []
        self._lock = threading.Lock()

    def acquire(self) -> _Staging:
        with self._lock:
            if self._free:
                return self._free.pop()
        return _Staging(self._slots, self._geometry, self._page_bytes)

    def release(self, buf: _Staging) -> None:
        with self._lock:
            if len(self._free) < self._keep:
                self._free.append(buf)


class HeaderAreas:
    """The in-memory image of each slab's header area (loaded from the slab on first use),
    and a lock per slab that serialises updating it and writing its blocks out: a header
    block is shared by ALIGN / 64 slots, and is only ever written whole from the image, so
    one put's header write never drops another's header."""

    def __init__(self, slabs: SlabFiles, geometry: Geometry) -> None:
        self._slabs = slabs
        self._geometry = geometry
        self._images: dict[int, tuple[threading.Lock, mmap.mmap]] = {}
        self._lock = threading.Lock()

    def _image(self, slab: int) -> tuple[threading.Lock, mmap.mmap]:
        with self._lock:
            held = self._images.get(slab)
            fresh = held is None
            if held is None:
                held = (threading.Lock(), aligned_buffer(self._geometry.header_area))
                self._images[slab] = held
                held[0].acquire()  # loaded below, before anyone else may use it
        if fresh:
            try:
                # The headers of slots committed before this process: kept as they are.
                self._slabs.readv(slab, 0, [memoryview(held[1])])
            finally:
                held[0].release()
        return held

    def put(self, slab: int, first: int, heads: memoryview) -> None:
        """Put ``heads`` (packed, 64 bytes each) in place in the image from slot ``first`` of
        ``slab`` on (its index within the slab); :meth:`write` writes them out."""
        lock, image = self._image(slab)
        start = first * HEADER_SIZE
        with lock:
            image[start:start + heads.nbytes] = heads

    def write(self, slab: int, first: int, stop: int) -> None:
        """Write the blocks that cover the headers of slots ``first:stop`` of ``slab``, whole,
        from the image."""
        lock, image = self._image(slab)
        lo, hi = first * HEADER_SIZE // ALIGN * ALIGN, align_up(stop * HEADER_SIZE)
        with lock:
            self._slabs.writev(slab, lo, [memoryview(image)[lo:hi]])


class RunIO:
    """Vectored reads and writes of runs of slots of one store (thread-safe)."""

    def __init__(self, slabs: SlabFiles, geometry: Geometry, page_bytes: int, fingerprint: int,
                 *, max_run_slots: int, keep_buffers: int) -> None:
        self._slabs = slabs
        self._geometry = geometry
        self.slot_bytes = geometry.slot_bytes
        self.page_bytes = page_bytes
        self.fingerprint = fingerprint
        self._direct = slabs.direct
        #: Which pages go zero-copy (see _zero_copy): with O_DIRECT, ALIGN-aligned ones, and
        #: only pages of a whole number of ALIGN blocks; buffered, any.
        self._align = (ALIGN if page_bytes % ALIGN == 0 else -1) if self._direct else 0
        self._seal = sealer_for(page_bytes)
        self._check = checker_for(page_bytes)
        self._headers = HeaderAreas(slabs, geometry)
        self._write_buffers = _StagingPool(max_run_slots, geometry, page_bytes, keep_buffers)
        self._read_buffers = _StagingPool(max_run_slots, geometry, page_bytes, keep_buffers)

    def zero_copy(self, buf: memoryview) -> bool:
        """Whether ``buf`` (one page) can be an iovec entry of this store's I/O as it is."""
        return _zero_copy(buf, self._align)

    def _iov(self, staging: _Staging, bufs: Sequence[memoryview], direct: Sequence[int]
             ) -> list[memoryview]:
        """The iovec of a run's payloads: each zero-copy page's buffer (and its slot's
        padding, if any, from ``staging``); the slots of staged pages from ``staging`` whole,
        adjacent ones merged."""
        slot, image, tails = self.slot_bytes, staging.image, staging.tails
        iov: list[memoryview] = []
        start = -1  # first byte of a stretch of staged slots not yet in ``iov``
        for j, buf in enumerate(bufs):
            if direct[j]:
                if start >= 0:
                    iov.append(image[start:j * slot])
                    start = -1
                iov.append(buf)
                tail = tails[j]
                if tail is not None:
                    iov.append(tail)
            elif start < 0:
                start = j * slot
        if start >= 0:
            iov.append(image[start:len(bufs) * slot])
        return iov

    def write(self, slab: int, offset: int, keys: Sequence[int],
              payloads: Sequence[memoryview]) -> tuple[list[bytes], int]:
        """Write pages (parallel lists) to the adjacent slots from slot position ``offset``
        on: the payloads; their headers go to the image of the slab's header area, for
        :meth:`write_headers` to write out once the batch's runs are done (one write per
        stretch of header blocks rather than one per run).

        Returns each page's payload checksum, and how many pages were staged (copied).
        """
        g = self._geometry
        staging = self._write_buffers.acquire()
        try:
            heads = staging.heads[:len(keys) * HEADER_SIZE]
            checksums, direct = self._seal(payloads, keys, HEADER_PREFIX, self.fingerprint,
                                           self.page_bytes, staging.map, self.slot_bytes,
                                           heads, self._align)
            self._slabs.writev(slab, g.payload_offset(offset),
                               self._iov(staging, payloads, direct))
            self._headers.put(slab, offset // self.slot_bytes, heads)
            return checksums, len(keys) - sum(direct)
        finally:
            self._write_buffers.release(staging)

    def write_headers(self, runs: Sequence[tuple[int, int, int]]) -> None:
        """Write the header blocks of written runs, ``(slab, slot position, slots)`` each, in
        slot order: one write per stretch of adjacent runs of a slab."""
        slot = self.slot_bytes
        pending: tuple[int, int, int] | None = None  # slab, first, stop (slot indices)
        for slab, offset, n in runs:
            first = offset // slot
            if pending is not None and pending[0] == slab and pending[2] == first:
                pending = (slab, pending[1], first + n)
                continue
            if pending is not None:
                self._headers.write(*pending)
            pending = (slab, first, first + n)
        if pending is not None:
            self._headers.write(*pending)

    def read(self, slab: int, offset: int, keys: Sequence[int], dests: Sequence[memoryview],
             checksums: Sequence[bytes]) -> tuple[list[str | None], int]:
        """Read pages (parallel lists) from the adjacent slots from slot position ``offset``
        on into their destinations, and verify each against its key and the checksum its
        index entry holds.

        Returns, per page, ``None`` when it verified (its payload is then in its destination)
        or why not (a destination's content is then unspecified); and how many were staged.
        """
        g, slot, pb, n = self._geometry, self.slot_bytes, self.page_bytes, len(keys)
        staging = self._read_buffers.acquire()
        try:
            direct = bytes(self.zero_copy(d) for d in dests)
            start = g.header_offset(offset)
            lo, hi = start // ALIGN * ALIGN, align_up(start + n * HEADER_SIZE)
            hgot = self._slabs.readv(slab, lo, [staging.heads[:hi - lo]])
            got = self._slabs.readv(slab, g.payload_offset(offset),
                                    self._iov(staging, dests, direct))
            # The pages read whole, header and payload (a slab that ends early: torn).
            whole = min(n, (got + slot - pb) // slot, max(0, hgot - (start - lo)) // HEADER_SIZE)
            heads = staging.heads[start - lo:start - lo + n * HEADER_SIZE]
            status = self._check(dests, keys, HEADER_PREFIX, self.fingerprint, pb,
                                 staging.map, slot, heads, checksums, direct, whole)
            faults: list[str | None] = []
            for j, code in enumerate(status):
                if code == CHECK_OK:
                    faults.append(None)
                elif code == CHECK_TRUNCATED:
                    faults.append(PageFault.TRUNCATED.value)  # the slab ends early: torn
                elif code == CHECK_HEADER:
                    faults.append(self._header_fault(
                        bytes(heads[j * HEADER_SIZE:(j + 1) * HEADER_SIZE]), keys[j]))
                else:
                    faults.append(PageFault.BAD_CHECKSUM.value)
            return faults, n - sum(direct)
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
