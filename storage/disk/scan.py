"""Reading the page headers of the slab files directly, without the index.

Every slot of a slab has its 64-byte page header (storage/page.py) in the slab's header
area (storage/disk/directory.py): magic, layout fingerprint, block hash, payload length and
the xxh3-128 of the payload, self-checked by a header checksum. That is enough to rebuild
the index when it is damaged or gone (storage/disk/recover.py), and to describe a store
without opening it (storage/disk/inspect.py).

Only the header areas are read (64 bytes per slot, 0.2% of the slabs for 32 KiB pages), not
the payloads: a rebuilt entry carries the checksum its header holds, and every read checks
the payload against it (storage/disk/runs.py), so a torn payload is a miss when it is read,
as it would have been with an intact index. Reading every payload at open would take
minutes on a multi-terabyte tier.

Headers of free slots may be stale (a delete does not clear them): a rebuild can bring back
pages that were deleted or evicted. Their bytes are still what their headers say they are,
so serving them is correct; they are just older than the index was.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from kvbm.storage.page import HEADER_SIZE, PageFault, parse_header

_EMPTY = bytes(HEADER_SIZE)
#: Header areas are read in pieces of at most this many bytes.
_READ_BYTES = 4 << 20


@dataclass(frozen=True)
class SlabShape:
    """The part of a store's geometry a scan needs (from its identity file)."""

    slot_bytes: int
    slab_slots: int
    header_area: int


@dataclass
class SlabScan:
    """What the header areas hold."""

    #: ``(slot, block hash, checksum)`` of each page whose header is intact, of the
    #: layout and page size asked for, and whose payload lies within its slab file; one per
    #: block hash (the lowest slot), in slot order.
    pages: list[tuple[int, int, bytes]] = field(default_factory=list)
    #: Headers that are not all zero and fail their self-check, name another page size,
    #: or whose payload lies past the end of the (truncated) slab file.
    damaged: int = 0
    #: Fingerprints of intact headers written under another layout.
    foreign: set[int] = field(default_factory=set)
    #: Slab files read, and their total size in bytes.
    slabs: int = 0
    slab_bytes: int = 0
    #: Slab files that could not be read (permissions, I/O errors): their pages are lost.
    unreadable: list[int] = field(default_factory=list)


def slab_ids(slab_dir: Path) -> list[int]:
    """The ids of the slab files (``NNNNNN.slab``) in ``slab_dir``, ascending."""
    out = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for p in slab_dir.iterdir():
            if p.suffix == ".slab" and p.stem.isdigit() and p.is_file():
                out.append(int(p.stem))
    return sorted(out)


def slab_path(slab_dir: Path, slab: int) -> Path:
    return slab_dir / f"{slab:06d}.slab"


def scan_slabs(slab_dir: Path, shape: SlabShape, *, fingerprint: int, page_bytes: int,
               max_slots: int | None = None, stop_at_first: bool = False) -> SlabScan:
    """Read the header areas of the slab files in ``slab_dir`` (read-only).

    ``max_slots`` leaves out slots beyond a capacity; ``stop_at_first`` ends the scan at the
    first intact header of any layout (enough to learn which layout wrote the pages).
    A slab that cannot be read is listed in ``unreadable`` and skipped: one bad file must
    not cost the others' pages.
    """
    out = SlabScan()
    seen: set[int] = set()
    for slab in slab_ids(slab_dir):
        first = slab * shape.slab_slots
        if max_slots is not None and first >= max_slots:
            continue
        n = shape.slab_slots
        if max_slots is not None:
            n = min(n, max_slots - first)
        try:
            fd = os.open(slab_path(slab_dir, slab), os.O_RDONLY | os.O_NONBLOCK)
            try:
                size = os.fstat(fd).st_size
                area = _read(fd, min(size, n * HEADER_SIZE, shape.header_area))
            finally:
                os.close(fd)
        except OSError:
            out.unreadable.append(slab)
            continue
        out.slabs += 1
        out.slab_bytes += size
        for i in range(min(n, len(area) // HEADER_SIZE)):
            raw = area[i * HEADER_SIZE:(i + 1) * HEADER_SIZE]
            if raw == _EMPTY:
                continue  # a slot never written
            head = parse_header(raw)
            if isinstance(head, PageFault):
                out.damaged += 1
                continue
            if head.fingerprint != fingerprint:
                out.foreign.add(head.fingerprint)
            elif (head.payload_len != page_bytes
                    or shape.header_area + i * shape.slot_bytes + page_bytes > size):
                out.damaged += 1
            elif head.seq_hash not in seen:
                seen.add(head.seq_hash)
                out.pages.append((first + i, head.seq_hash, head.checksum))
            if stop_at_first:
                return out
    return out


def _read(fd: int, n: int) -> bytes:
    parts = []
    done = 0
    while done < n:
        got = os.pread(fd, min(_READ_BYTES, n - done), done)
        if not got:
            break
        parts.append(got)
        done += len(got)
    return b"".join(parts)
