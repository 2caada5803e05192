"""G3 disk tier under damage: a damaged or missing index, a damaged identity file, a kill -9
during the first open, bad arguments, and describing a store without opening it.

Every open of a damaged store runs in a child process (:func:`open_in_child`): what is
tested is that the process survives (lmdb can SIGBUS or abort it), so a crash must fail
the test rather than take pytest down with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from kvbm.errors import StorageError
from kvbm.storage.disk import DiskStore, DiskTierConfig
from kvbm.storage.disk.inspect import describe
from kvbm.testing import PageStoreTests, page_payload

LAYOUT = PageStoreTests.layout
PAGE = LAYOUT.bytes_per_block
N = 40  # pages in the stores these tests damage


def cfg(path: Path, **kw: Any) -> DiskTierConfig:
    kw.setdefault("capacity_bytes", 64 << 20)
    kw.setdefault("slab_bytes", 4 << 20)
    return DiskTierConfig(path=path, **kw)


def keys_(n: int, start: int = 0) -> list[int]:
    return PageStoreTests.make_keys(n, start)


def make_store(root: Path, n: int = N, deleted: int = 5) -> list[int]:
    """A closed store at ``root`` holding ``n`` pages (after putting ``deleted`` more and
    deleting them, so that the index has free pages and stale headers exist); its keys."""

    async def body() -> list[int]:
        store = await DiskStore.open(LAYOUT, cfg(root))
        keys = keys_(n + deleted)
        got = await store.put([(k, page_payload(k, PAGE)) for k in keys])
        assert all(got)
        assert await store.delete(keys[n:]) == deleted
        await store.close()
        return keys[:n]

    return asyncio.run(body())


def snapshot(root: Path) -> dict[str, str]:
    """Every name under ``root`` with the sha256 of its bytes (``"dir"`` for folders)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# -- describe() -------------------------------------------------------------------------------
def test_describe_reports_a_store_and_changes_nothing(tmp_path: Path) -> None:
    keys = make_store(tmp_path)
    before = snapshot(tmp_path)
    info = describe(tmp_path)
    assert snapshot(tmp_path) == before  # nothing written, created, locked or repaired
    assert json.loads(json.dumps(info)) == info  # JSON-able as it is
    assert info["path"] == str(tmp_path.absolute())
    assert info["format_version"] == 4
    assert info["layout_fingerprint"] == f"{LAYOUT.fingerprint:016x}"
    assert info["layout"] == LAYOUT.to_dict()
    assert (info["pages"], info["bytes"]) == (len(keys), len(keys) * PAGE)
    assert (info["index"], info["pages_from"]) == ("ok", "index")
    assert info["slabs"] == 1 and info["slab_file_bytes"] > 0
    assert info["open_by_pid"] is None


def test_describe_an_open_store(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        await store.put([(k, page_payload(k, PAGE)) for k in keys_(7)])
        info = describe(tmp_path)
        assert (info["pages"], info["index"]) == (7, "ok")
        if Path("/proc/locks").exists():
            assert info["open_by_pid"] == os.getpid()
        await store.close()

    asyncio.run(body())


@pytest.mark.parametrize("damage", ["truncated", "missing", "empty_file"])
def test_describe_a_damaged_or_missing_index(tmp_path: Path, damage: str) -> None:
    keys = make_store(tmp_path)
    data = tmp_path / "index" / "data.mdb"
    if damage == "truncated":
        os.truncate(data, data.stat().st_size // 2)
    elif damage == "missing":
        shutil.rmtree(tmp_path / "index")
    else:
        os.truncate(data, 0)
    before = snapshot(tmp_path)
    info = describe(tmp_path)
    assert snapshot(tmp_path) == before
    assert info["index"] == ("damaged" if damage == "truncated" else "missing")
    assert info["pages_from"] == "slab_headers"
    # Headers of deleted pages are stale, not cleared: the headers count them too.
    assert len(keys) <= info["pages"] <= len(keys) + 5
    assert info["damaged_headers"] == 0


def test_describe_refuses_what_is_no_store(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no such directory"):
        describe(tmp_path / "nothing")
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StorageError, match="not a directory"):
        describe(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match="not a kvbm disk store"):
        describe(tmp_path / "empty")
    make_store(tmp_path / "store", n=2)
    (tmp_path / "store" / "kvbm-disk.json").write_bytes(b"\xff{\"format\":")
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="damaged"):
        describe(tmp_path / "store")
    assert snapshot(tmp_path) == before
