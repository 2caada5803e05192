"""Bringing a damaged store back up: its identity file and its page index.

The tier is a cache, so damage must cost pages, never the process: a damaged index is
moved aside (to ``ROOT/index.damaged``, within the store) and rebuilt from the slab headers
(storage/disk/scan.py); a damaged identity file is rewritten once the directory is known to
be a store of this layout (only files kvbm writes, and slab headers of this layout or
none). What cannot be interpreted is discarded, and only files of the store itself are
ever removed. Everything done is logged and counted (``TierStats.index_rebuilds``,
``pages_recovered``, ``corrupt``; ``extra["identity_repairs"]``).

Crash safety: the new index is built under ``ROOT/index.new`` and renamed into place, so a
kill -9 at any point leaves either the old index (damaged: rebuilt again next time), none
(rebuilt from the slabs) or the new one.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from kvbm.errors import LayoutMismatchError, StorageError
from kvbm.layout import KVLayout
from kvbm.storage.base import TierStats
from kvbm.storage.disk.directory import (
    Geometry,
    create_identity,
    fsync_dir,
    header_area_for,
    slots_within,
)
from kvbm.storage.disk.index import Entry, PageIndex
from kvbm.storage.disk.probe import IndexHealth, check_index
from kvbm.storage.disk.scan import SlabShape, scan_slabs, slab_ids, slab_path

log = logging.getLogger(__name__)

INDEX, INDEX_NEW, INDEX_DAMAGED, SLABS = "index", "index.new", "index.damaged", "slabs"
#: Records per transaction while rebuilding.
_BATCH = 1 << 16


@dataclass(frozen=True)
class OpenIndex:
    index: PageIndex
    #: What :meth:`PageIndex.load` returned.
    entries: dict[int, Entry]
    bad: list[int]


def _shape(g: Geometry) -> SlabShape:
    return SlabShape(g.slot_bytes, g.slab_slots, g.header_area)


def _remove_own(path: Path) -> None:
    """Remove ``path``, a name of the store's own inside its directory (a symlink is
    removed as a link: what it points at is not ours)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# -- the identity file ----------------------------------------------------------------------
def geometry_from_slabs(root: Path, layout: KVLayout, wanted: Geometry,
                        capacity_bytes: int) -> Geometry | None:
    """The geometry the slabs of ``root`` were written with, read-only (for a store whose
    identity file is damaged): ``wanted`` when there are no slabs, ``None`` when their
    sizes fit no geometry. Raises :class:`LayoutMismatchError` when their headers were
    written under another layout: those pages are another model's, and are left alone."""
    slab_dir = root / SLABS
    ids = slab_ids(slab_dir)
    if not ids:
        return wanted
    slot = wanted.slot_bytes
    # Every slab but the last one of the capacity is full, and the first one is full
    # unless the whole tier is smaller than one slab: so the largest slab file is
    # header_area_for(n) + k * slot for the store's n slots per slab and some k <= n.
    size = max(slab_path(slab_dir, s).stat().st_size for s in ids)
    guess = size // (slot + 64)
    found = None
    for n in (wanted.slab_slots, *range(max(1, guess - 2), guess + 3)):
        area = header_area_for(n)
        rest = size - area
        if rest >= 0 and rest % slot == 0 and rest // slot <= n:
            found = n
            break
    if found is None:
        return None
    area = header_area_for(found)
    scan = scan_slabs(slab_dir, SlabShape(slot, found, area), fingerprint=layout.fingerprint,
                      page_bytes=layout.bytes_per_block, stop_at_first=True)
    if scan.foreign and not scan.pages:
        raise LayoutMismatchError(
            f"the identity file of disk store {root} is damaged, and its slabs hold pages of "
            f"another layout (fingerprint {min(scan.foreign):016x}), not of "
            f"{layout.to_dict()} ({layout.fingerprint:016x}); use another path for this "
            f"model, or remove the directory to discard its pages")
    return Geometry(slot_bytes=slot, slab_slots=found,
                    max_slots=slots_within(capacity_bytes, slot, found, area),
                    header_area=area)


def repair_identity(root: Path, layout: KVLayout, wanted: Geometry, capacity_bytes: int,
                    problem: str, stats: TierStats) -> Geometry:
    """Rewrite the damaged identity file of ``root`` (directory lock held). Where the slabs
    fit no geometry, they are discarded with the index: the store starts empty."""
    geometry = geometry_from_slabs(root, layout, wanted, capacity_bytes)
    if geometry is None:
        ids = slab_ids(root / SLABS)
        log.warning("disk store %s: identity file damaged (%s) and the sizes of its %d slab "
                    "files fit no geometry; discarding its pages and starting empty",
                    root, problem, len(ids))
        for s in ids:
            slab_path(root / SLABS, s).unlink()
        _move_aside(root)
        geometry = wanted
    else:
        log.warning("disk store %s: identity file damaged (%s); rewritten from the layout "
                    "and the slab files (%d slots per slab)", root, problem,
                    geometry.slab_slots)
    create_identity(root, layout, geometry)
    stats.extra["identity_repairs"] = stats.extra.get("identity_repairs", 0) + 1
    return geometry


# -- the page index -------------------------------------------------------------------------
def open_index(root: Path, geometry: Geometry, layout: KVLayout, *, sync: bool,
               stats: TierStats) -> OpenIndex:
    """Open and load the page index of ``root`` (directory lock held), rebuilding it from
    the slab headers first where it is damaged, or missing while slabs exist."""
    page_bytes = layout.bytes_per_block
    check = check_index(root / INDEX)
    reason = ""
    if check.health is IndexHealth.DAMAGED:
        reason = f"is damaged ({check.problem})"
    elif check.health is IndexHealth.MISSING and slab_ids(root / SLABS):
        reason = "is missing"
    if not reason:
        try:
            index = PageIndex(root / INDEX, geometry, page_bytes, sync=sync)
        except StorageError as e:
            reason = f"cannot be opened ({e})"
        else:
            try:
                entries, bad = index.load()
                return OpenIndex(index, entries, bad)
            except StorageError as e:
                index.close()
                reason = f"cannot be read ({e})"
    rebuild_index(root, geometry, layout, reason, stats)
    index = PageIndex(root / INDEX, geometry, page_bytes, sync=sync)
    try:
        entries, bad = index.load()
    except BaseException:
        index.close()
        raise
    return OpenIndex(index, entries, bad)


def _move_aside(root: Path) -> Path | None:
    """Move the index to ``index.damaged`` (replacing an older one); where it went."""
    index, aside = root / INDEX, root / INDEX_DAMAGED
    if not (index.exists() or index.is_symlink()):
        return None
    _remove_own(aside)
    os.replace(index, aside)
    return aside


def rebuild_index(root: Path, geometry: Geometry, layout: KVLayout, reason: str,
                  stats: TierStats) -> None:
    """Replace the index of ``root`` with one rebuilt from the slab headers."""
    page_bytes = layout.bytes_per_block
    scan = scan_slabs(root / SLABS, _shape(geometry), fingerprint=layout.fingerprint,
                      page_bytes=page_bytes, max_slots=geometry.max_slots)
    new = root / INDEX_NEW
    _remove_own(new)  # a rebuild cut short
    index = PageIndex(new, geometry, page_bytes, sync=True)
    try:
        now = time.time_ns()
        for start in range(0, len(scan.pages), _BATCH):
            batch = scan.pages[start:start + _BATCH]
            records: list[bytes | None] = []
            for slot, key, checksum in batch:
                slab, offset = geometry.locate(slot)
                records.append(index.record(key, slab, offset, checksum, now, 1, None))
            index.apply([slot for slot, _, _ in batch], records)
    finally:
        index.close()
    aside = _move_aside(root)
    os.replace(new, root / INDEX)
    fsync_dir(root)
    stats.index_rebuilds += 1
    stats.pages_recovered += len(scan.pages)
    stats.corrupt += scan.damaged
    log.warning("disk store %s: the page index %s; %s, and rebuilt it from the headers of "
                "%d slab files: %d pages recovered, %d damaged headers dropped%s", root, reason,
                f"moved it to {aside}" if aside else "nothing to move aside", scan.slabs,
                len(scan.pages), scan.damaged,
                f"; slab files {scan.unreadable} could not be read (their pages are lost)"
                if scan.unreadable else "")
