"""Describing a disk-tier directory without opening it (``kvbm stats PATH``).

Nothing is written, created, locked or repaired: the identity file and the slab header areas
are read with plain reads, and the lmdb index is checked and counted by
storage/disk/probe.py in a child process that opens it read-only without its lock file. So
a store can be described while another process has it open (its figures are then a moment's
snapshot), and a damaged one is described rather than repaired (opening it with
:class:`~kvbm.storage.disk.DiskStore` repairs it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvbm.errors import InvalidArgumentError, StorageError
from kvbm.storage.disk.directory import (
    FORMAT,
    LOCK_NAME,
    META_NAME,
    IdentityState,
    format_version,
    read_identity,
)
from kvbm.storage.disk.probe import IndexHealth, check_index
from kvbm.storage.disk.scan import SlabShape, scan_slabs

_PROC_LOCKS = Path("/proc/locks")


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What the disk store at ``path`` holds, as JSON-able data:

    ``path`` (absolute), ``format`` and ``format_version``, ``layout`` and
    ``layout_fingerprint`` (16 hex digits), ``page_bytes``, ``slot_bytes``, ``slab_slots``,
    ``pages`` (pages held) and ``bytes`` (their payload bytes), ``pages_from`` (``"index"``,
    or ``"slab_headers"`` when the index is damaged or missing: those also count pages
    deleted since their slot was last written), ``damaged_headers`` (counted only when
    scanning headers), ``slabs`` (slab files) and ``slab_file_bytes``, ``index`` (``"ok"``,
    ``"damaged"``, ``"missing"`` or ``"unchecked"``: lmdb is not installed), ``index_problem``
    (what is wrong, or why it was not checked), ``index_file_bytes`` and
    ``open_by_pid`` (the process holding the store's lock, where ``/proc/locks`` tells).

    Raises :class:`StorageError` when ``path`` is not a kvbm disk store of this format.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise InvalidArgumentError(f"describe() needs a directory path, got {path!r}")
    root = Path(os.fspath(path)).absolute()
    if not root.is_dir():
        raise StorageError(f"{root} is not a kvbm disk store: "
                           f"{'not a directory' if root.exists() else 'no such directory'}")
    ident = read_identity(root)  # raises for a store of another on-disk format
    if ident.state is IdentityState.ABSENT:
        raise StorageError(f"{root} is not a kvbm disk store (it has no {META_NAME})")
    if ident.state is IdentityState.DAMAGED:
        raise StorageError(f"{root / META_NAME} is damaged ({ident.problem}); opening the "
                           f"store with its model's layout repairs it")
    meta = ident.meta
    assert meta is not None
    page_bytes = meta["page_bytes"]
    shape = SlabShape(meta["slot_bytes"], meta["slab_slots"], meta["header_area"])
    holder = _lock_holder(root / LOCK_NAME)
    check = check_index(root / "index")
    for _ in range(2):
        if check.health is not IndexHealth.DAMAGED or holder is None:
            break
        # The check reads without lmdb's lock: while another process commits, a page it
        # frees and reuses mid-read can look damaged. Real damage is there every time.
        check = check_index(root / "index")
    out: dict[str, Any] = {
        "path": str(root), "format": FORMAT, "format_version": format_version(FORMAT),
        "layout": meta["layout"], "layout_fingerprint": meta["fingerprint"],
        "page_bytes": page_bytes, "slot_bytes": shape.slot_bytes,
        "slab_slots": shape.slab_slots,
        "index": check.health.value, "index_problem": check.problem or None,
        "index_file_bytes": check.size,
    }
    if check.health is IndexHealth.OK and check.entries >= 0:
        pages, source, damaged = check.entries, "index", None
    else:
        try:
            scan = scan_slabs(root / "slabs", shape, fingerprint=int(meta["fingerprint"], 16),
                              page_bytes=page_bytes)
        except OSError as e:
            raise StorageError(f"cannot read the slab files of {root}: {e}") from e
        pages, source, damaged = len(scan.pages), "slab_headers", scan.damaged
    slab_files = [p for p in (root / "slabs").glob("*.slab") if p.is_file()]
    out.update({
        "pages": pages, "bytes": pages * page_bytes, "pages_from": source,
        "damaged_headers": damaged, "slabs": len(slab_files),
        "slab_file_bytes": sum(p.stat().st_size for p in slab_files),
        "open_by_pid": holder,
    })
    return out


def _lock_holder(lock: Path) -> int | None:
    """The pid holding a flock on ``lock``, from /proc/locks (read-only: taking the lock to
    test it would make a process opening the store at that moment fail)."""
    try:
        st = lock.stat()
        lines = _PROC_LOCKS.read_text().splitlines()
    except OSError:
        return None
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" (blocked waiters have "->")
        if "FLOCK" in fields and "->" not in fields and dev in fields:
            i = fields.index(dev)
            if fields[i - 1].isdigit():
                return int(fields[i - 1])
    return None
