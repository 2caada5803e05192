"""G3 disk tier: the PageStore conformance suite, restart, capacity, crash and torn pages."""

from __future__ import annotations

import asyncio
import gc
import json
import mmap
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.errors import ConfigError, LayoutMismatchError, StorageError
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.storage.base import RemovalReason, TierListener
from kvbm.storage.disk import DiskStore, DiskTierConfig, Durability
from kvbm.storage.disk import runs as runs_mod
from kvbm.storage.disk import slabs as slab_io
from kvbm.storage.disk.directory import ALIGN, header_area_for, slots_within
from kvbm.storage.page import PageHeader, parse_header, payload_checksum
from kvbm.testing import PageStoreTests, RecordingListener, page_payload

LAYOUT = PageStoreTests.layout
PAGE = LAYOUT.bytes_per_block
SHM = Path("/dev/shm")
CRASH_WRITER = Path(__file__).with_name("crash_writer.py")


def cfg(path: Path, **kw: Any) -> DiskTierConfig:
    kw.setdefault("capacity_bytes", 64 << 20)
    kw.setdefault("slab_bytes", 4 << 20)
    return DiskTierConfig(path=path, **kw)


def slot_offset(store: DiskStore, key: int) -> tuple[Path, int]:
    """The slab file and file offset of the payload of ``key`` (its header lives apart in
    the slab's header area: :func:`header_offset`; storage/disk/directory.py)."""
    g = store.geometry
    slab, offset = g.locate(store._index_db.slot_of(store._index[key]))
    return store._slabs.path(slab), g.payload_offset(offset)


def header_offset(store: DiskStore, key: int) -> int:
    """The file offset of the header of ``key`` in its slab's header area."""
    g = store.geometry
    return g.header_offset(g.locate(store._index_db.slot_of(store._index[key]))[1])


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)  # buffered on purpose: the store must cope
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the conformance suite, on the real filesystem and on tmpfs -----------------------------
class TestDiskStoreConformance(PageStoreTests[DiskStore]):
    async def open_store(self, layout: KVLayout, listener: TierListener | None) -> DiskStore:
        return await DiskStore.open(layout, cfg(self.tmp_path / "g3"), listener=listener)

    async def corrupt(self, store: DiskStore, key: int) -> None:
        path, offset = slot_offset(store, key)
        write_at(path, offset + 1000, b"\xff\x00\xff")  # bit rot in the payload

    async def plant_page(self, store: DiskStore, key: int, stored: bytes) -> None:
        # ``stored`` is header + payload (storage/page.py); a slab keeps them apart
        path, offset = slot_offset(store, key)
        write_at(path, offset, stored[64:])
        write_at(path, header_offset(store, key), stored[:64])


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
class TestDiskStoreConformanceTmpfsBuffered(TestDiskStoreConformance):
    """Buffered I/O (the fallback where O_DIRECT is refused) on tmpfs."""

    @pytest.fixture(autouse=True)
    def _shm_dir(self, tmp_path: Path) -> Any:
        d = SHM / f"kvbm-test-{os.getpid()}-{tmp_path.name}"
        d.mkdir()
        self.tmp_path = d
        yield
        subprocess.run(["rm", "-rf", str(d)], check=False)

    async def open_store(self, layout: KVLayout, listener: TierListener | None) -> DiskStore:
        store = await DiskStore.open(layout, cfg(self.tmp_path / "g3", direct_io=False),
                                     listener=listener)
        assert not store.direct_io
        return store


# -- helpers for the tier-specific tests ----------------------------------------------------
def run(coro: Any) -> Any:
    return asyncio.run(coro)


def keys_(n: int, start: int = 0) -> list[int]:
    return PageStoreTests.make_keys(n, start)


async def put(store: DiskStore, keys: list[int]) -> list[bool]:
    return await store.put([(k, page_payload(k, PAGE)) for k in keys])


async def served(store: DiskStore, keys: list[int]) -> list[bool]:
    bufs = [np.zeros(PAGE, np.uint8) for _ in keys]
    hits = await store.get(list(zip(keys, bufs, strict=True)))
    for k, hit, buf in zip(keys, hits, bufs, strict=True):
        if hit:
            assert np.array_equal(buf, page_payload(k, PAGE)), f"wrong bytes for {k:#x}"
    return hits


def tree(path: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime)
            for p in sorted(path.rglob("*"))}


# -- direct I/O, restart, identity, lock ----------------------------------------------------
def test_uses_direct_io_where_supported(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path / "g3"))
        try:
            assert store.direct_io == bool(getattr(os, "O_DIRECT", 0))
            assert store.stats().extra["direct_io"] == int(store.direct_io)
        finally:
            await store.close()
    run(body())


def test_restart_finds_pages_and_keeps_recency(tmp_path: Path) -> None:
    keys = keys_(20)

    async def first() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, eviction="lru"))
        assert await put(store, keys) == [True] * 20
        await served(store, keys[:5])  # the first five are now the most recent
        await store.close()

    async def second() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, eviction="lru"))
        assert sorted(await store.keys()) == sorted(keys)
        assert await served(store, keys) == [True] * 20
        assert store.used_bytes == 20 * PAGE
        await served(store, keys[:5])  # most recent again: the next session must know
        await store.close()

    async def shrunk() -> None:
        # Recency survived: a store too small for all of them keeps the recent ones.
        slot = store_slot_bytes()
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, eviction="lru",
                                                 capacity_bytes=room(25, 4 << 20 // slot)))
        await put(store, keys_(20, start=100))
        assert await store.exists(keys[:5]) == [True] * 5
        await store.close()

    run(first())
    run(second())
    run(shrunk())


def store_slot_bytes() -> int:
    from kvbm.storage.disk.directory import geometry_for

    return geometry_for(LAYOUT, 1 << 30, 1 << 20).slot_bytes


def room(n: int, slab_slots: int | None = None) -> int:
    """A capacity of exactly ``n`` slots: their payloads and the header areas of their slabs
    (one slab of ``n`` slots unless ``slab_slots`` is smaller)."""
    slot = store_slot_bytes()
    if slab_slots is None or slab_slots >= n:
        return n * slot + header_area_for(n)
    return n * slot + -(-n // slab_slots) * header_area_for(slab_slots)


def test_other_fingerprint_is_refused_and_untouched(tmp_path: Path) -> None:
    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16,
                     dtype="float16", model_id="another-model")

    async def write() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        await put(store, keys_(3))
        await store.close()

    run(write())
    before = tree(tmp_path)
    time.sleep(0.01)
    with pytest.raises(LayoutMismatchError, match=r"another-model"):
        DiskStore(other, cfg(tmp_path))
    assert tree(tmp_path) == before

    async def reread() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert await served(store, keys_(3)) == [True] * 3
        await store.close()

    run(reread())


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("not a store")
    with pytest.raises(StorageError, match="neither empty nor"):
        DiskStore(LAYOUT, cfg(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["precious.txt"]


def test_store_of_an_older_format_is_refused_and_untouched(tmp_path: Path) -> None:
    # What kvbm-disk-v1 (header first in each slot) left behind: its slots must never be
    # read with another layout.
    (tmp_path / "kvbm-disk.json").write_text(json.dumps(
        {"format": "kvbm-disk-v1", "fingerprint": f"{LAYOUT.fingerprint:016x}",
         "layout": LAYOUT.to_dict(), "page_bytes": PAGE, "slot_bytes": 20480,
         "slab_slots": 204}))
    (tmp_path / "slabs").mkdir()
    (tmp_path / "slabs" / "000000.slab").write_bytes(b"v1 pages")
    before = tree(tmp_path)
    with pytest.raises(StorageError, match=r"'kvbm-disk-v1'.*reads 'kvbm-disk-v4'.*remove"):
        DiskStore(LAYOUT, cfg(tmp_path))
    assert tree(tmp_path) == before


def test_damaged_identity_is_repaired(tmp_path: Path) -> None:
    # The identity file only guards against foreign directories and other layouts: a
    # damaged one in a directory of this layout's store is rewritten, and the pages stay
    # (tests/test_disk_damage.py covers other damage).
    async def create() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        await put(store, keys_(3))
        await store.close()

    run(create())
    meta_path = tmp_path / "kvbm-disk.json"
    meta = json.loads(meta_path.read_text())
    del meta["header_area"]
    meta_path.write_text(json.dumps(meta))

    async def reopen() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert store.stats().extra["identity_repairs"] == 1
        assert await served(store, keys_(3)) == [True] * 3
        await store.close()

    run(reopen())
    assert "header_area" in json.loads(meta_path.read_text())


def test_slab_holds_headers_then_payloads(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        k0, k = keys_(2)
        await put(store, [k0, k])
        g = store.geometry
        assert g.slot_bytes == PAGE  # a whole number of ALIGN blocks: no padding
        assert g.header_area == (g.slab_slots * 64 + 4095) // 4096 * 4096
        path, offset = slot_offset(store, k)
        data = path.read_bytes()
        assert offset == g.header_area + PAGE  # slot 1: right after slot 0's payload
        payload = page_payload(k, PAGE).tobytes()
        assert data[offset:offset + PAGE] == payload
        assert header_offset(store, k) == 64
        header = parse_header(data[64:128])
        assert isinstance(header, PageHeader)
        assert (header.seq_hash, header.fingerprint) == (k, LAYOUT.fingerprint)
        assert header.checksum == payload_checksum(payload)
        assert data[128:g.header_area] == bytes(g.header_area - 128)  # no slot there yet
        # In memory, an entry is bytes: no object for the cyclic GC to track per page.
        assert not gc.is_tracked(store._index[k])
        await store.close()

    run(body())


@pytest.mark.parametrize("direct", [True, False])
def test_concurrent_puts_sharing_a_header_block(tmp_path: Path, direct: bool) -> None:
    """Puts into adjacent slots, whose headers share one header block, racing each other:
    each rewrites the whole block, and none may drop another's header."""
    if direct and not slab_io.probe_direct_io(tmp_path):
        pytest.skip("no O_DIRECT here")
    keys = keys_(48)

    async def write() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, direct_io=direct, io_threads=4))
        # One page per put, all at once: adjacent slots 0..47, headers all in block 0.
        results = await asyncio.gather(*(put(store, [k]) for k in keys))
        assert results == [[True]] * len(keys)
        slots = sorted(map(store._index_db.slot_of, store._index.values()))
        assert slots == list(range(len(keys)))
        assert {header_offset(store, k) // 4096 for k in keys} == {0}
        # Freed slots reused in the same block while their neighbours stay put.
        assert await store.delete(keys[::2]) == len(keys) // 2
        again = keys_(len(keys) // 2, start=500)
        assert await asyncio.gather(*(put(store, [k]) for k in again)) == \
            [[True]] * len(again)
        await store.close()

    async def reread() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, direct_io=direct))
        stored = keys[1::2] + keys_(len(keys) // 2, start=500)
        assert sorted(await store.keys()) == sorted(stored)
        assert await served(store, stored) == [True] * len(stored)
        assert store.stats().corrupt == 0
        await store.close()

    run(write())
    run(reread())


def test_second_opener_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        try:
            with pytest.raises(StorageError, match="already open"):
                DiskStore(LAYOUT, cfg(tmp_path))
            # ... also from another process
            proc = subprocess.run(
                [sys.executable, "-c",
                 "import sys; from kvbm.storage.disk import DiskStore, DiskTierConfig;"
                 "from kvbm.testing import PageStoreTests as T;"
                 f"DiskStore(T.layout, DiskTierConfig({str(tmp_path)!r}, 64 << 20))"],
                capture_output=True, text=True, timeout=60)
            assert proc.returncode != 0 and "already open" in proc.stderr
        finally:
            await store.close()
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))  # free again once closed
        await store.close()

    run(body())


def test_closed_store_refuses_calls(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        await store.close()
        with pytest.raises(StorageError, match="closed"):
            await put(store, keys_(1))
        with pytest.raises(StorageError, match="closed"):
            await store.exists(keys_(1))

    run(body())


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        DiskTierConfig(tmp_path, capacity_bytes=0)
    with pytest.raises(ConfigError):
        DiskTierConfig(tmp_path, capacity_bytes=1 << 20, durability="sometimes")  # type: ignore[arg-type]
    assert DiskTierConfig(tmp_path, 1 << 20, durability="process_crash"  # type: ignore[arg-type]
                          ).durability is Durability.PROCESS_CRASH
    with pytest.raises(ConfigError, match="less than one"):
        DiskStore(LAYOUT, DiskTierConfig(tmp_path / "x", capacity_bytes=PAGE))  # no headers
    assert not (tmp_path / "x").exists()


# -- capacity, eviction, slot reuse ----------------------------------------------------------
def test_capacity_eviction_and_slot_reuse(tmp_path: Path) -> None:
    slot = store_slot_bytes()

    async def body() -> None:
        listener = RecordingListener()
        store = await DiskStore.open(
            LAYOUT, cfg(tmp_path, capacity_bytes=room(10, 4), slab_bytes=4 * slot,
                        eviction="lru"), listener=listener)
        assert store.capacity_bytes == 10 * PAGE
        first = keys_(10)
        assert await put(store, first) == [True] * 10
        await served(store, first[:3])  # used recently: survive the next batch
        second = keys_(4, start=50)
        assert await put(store, second) == [True] * 4
        evicted = listener.removed(RemovalReason.EVICTED)
        assert sorted(evicted) == sorted(first[3:7])
        assert store.stats().evicted == 4
        assert store.used_bytes == 10 * PAGE
        assert await served(store, first[:3] + first[7:] + second) == [True] * 10
        assert await store.exists(first[3:7]) == [False] * 4
        # Every page sits in one of the 10 slots: evicted slots were reused, no slab grew.
        slots = sorted(map(store._index_db.slot_of, store._index.values()))
        assert slots == list(range(10))
        assert sorted(p.name for p in (tmp_path / "slabs").iterdir()) == \
            ["000000.slab", "000001.slab", "000002.slab"]
        assert (tmp_path / "slabs" / "000002.slab").stat().st_size == \
            store.geometry.header_area + 2 * slot
        # Deleted slots are reused too.
        assert await store.delete(second) == 4
        assert await put(store, keys_(4, start=80)) == [True] * 4
        assert sorted(map(store._index_db.slot_of, store._index.values())) == list(range(10))
        await store.close()

    run(body())


def test_batch_larger_than_capacity_stores_what_fits(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, capacity_bytes=room(8)))
        got = await put(store, keys_(12))
        assert sum(got) >= 8 and len(await store.keys()) == 8
        stored = [k for k in keys_(12) if k in await store.keys()]
        assert await served(store, stored) == [True] * 8
        await store.close()

    run(body())


def test_lineage_eviction_uses_parents(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, capacity_bytes=room(4),
                                                 eviction="lineage"))
        a, b, c, d, e = keys_(5)
        # a <- b <- c is a chain; d is alone. a is oldest but has children: leaves first.
        items = [(k, page_payload(k, PAGE)) for k in (a, b, c, d)]
        assert await store.put(items, parents=[None, a, b, None]) == [True] * 4
        await served(store, [a, b])
        assert await put(store, [e]) == [True]
        assert await store.exists([a, b, c, d]) == [True, True, False, True] or \
            await store.exists([a, b, c, d]) == [True, True, True, False]
        await store.close()

    run(body())


def test_admission_policy_filters_puts(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, admission="frequency"))
        (k,) = keys_(1)
        assert await put(store, [k]) == [False]  # first sighting
        assert await put(store, [k]) == [True]
        await store.close()

    run(body())


# -- torn and damaged pages ------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate", "zero_header", "half_written", "remove_slab"])
def test_torn_page_is_a_miss(tmp_path: Path, damage: str) -> None:
    keys = keys_(6)

    async def write() -> tuple[Path, int, int]:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        await put(store, keys)
        path, offset = slot_offset(store, keys[-1])
        head = header_offset(store, keys[-1])
        await store.close()
        return path, offset, head

    path, offset, head = run(write())
    if damage == "truncate":
        os.truncate(path, offset + PAGE // 2)
    elif damage == "zero_header":
        write_at(path, head, bytes(64))
    elif damage == "half_written":  # a newer page's second half over the old one
        write_at(path, offset + PAGE // 2, page_payload(123, PAGE // 2).tobytes())
    else:
        path.unlink()

    async def reread() -> None:
        listener = RecordingListener()
        store = await DiskStore.open(LAYOUT, cfg(tmp_path), listener=listener)
        hits = await served(store, keys)
        assert hits[-1] is False
        if damage != "remove_slab":
            assert hits[:-1] == [True] * 5
        assert keys[-1] in listener.removed(RemovalReason.CORRUPT)
        assert store.stats().corrupt >= 1
        assert keys[-1] not in await store.keys()
        await store.close()

    run(reread())


@pytest.mark.parametrize("mix", ["new_header_old_payload", "old_header_new_payload"])
def test_slot_mixing_two_writes_is_a_miss(tmp_path: Path, mix: str) -> None:
    """A crash while a freed slot is rewritten can leave one write's header with the other's
    payload (they are not written atomically): neither may be served."""
    old_key, new_key = keys_(2)

    async def body() -> None:
        listener = RecordingListener()
        store = await DiskStore.open(LAYOUT, cfg(tmp_path), listener=listener)
        await put(store, [old_key])
        path, offset = slot_offset(store, old_key)
        head = header_offset(store, old_key)
        data = path.read_bytes()
        old_payload, old_header = data[offset:offset + PAGE], data[head:head + 64]
        assert await store.delete([old_key]) == 1
        await put(store, [new_key])
        assert slot_offset(store, new_key) == (path, offset)  # the freed slot, reused
        if mix == "new_header_old_payload":
            write_at(path, offset, old_payload)
        else:
            write_at(path, head, old_header)
        assert await served(store, [new_key]) == [False]
        assert listener.removed(RemovalReason.CORRUPT) == [new_key]
        await store.close()

    run(body())


def test_listener_gets_disk_medium(tmp_path: Path) -> None:
    async def body() -> None:
        listener = RecordingListener()
        store = await DiskStore.open(LAYOUT, cfg(tmp_path), listener=listener)
        (k,) = keys_(1)
        await put(store, [k])
        path, offset = slot_offset(store, k)
        write_at(path, offset, b"\x00" * 8)
        assert await served(store, [k]) == [False]
        assert listener.events == [(Medium.DISK, [k], RemovalReason.CORRUPT)]
        await store.close()

    run(body())


# -- big pages, many pages, concurrency --------------------------------------------------------
def test_two_mib_pages_round_trip(tmp_path: Path) -> None:
    layout = KVLayout(32, 8, 128, 16, "bfloat16", model_id="llama3-8b")
    pb = layout.bytes_per_block

    async def body() -> None:
        store = await DiskStore.open(layout, DiskTierConfig(tmp_path, 64 << 20,
                                                            slab_bytes=16 << 20))
        keys = keys_(12)
        bufs = [page_payload(k, pb) for k in keys]
        assert await store.put(list(zip(keys, bufs, strict=True))) == [True] * 12
        outs = [np.zeros(pb, np.uint8) for _ in keys]
        assert await store.get(list(zip(keys, outs, strict=True))) == [True] * 12
        assert all(np.array_equal(a, b) for a, b in zip(bufs, outs, strict=True))
        await store.close()

    run(body())


def aligned_pages(n: int, nbytes: int = PAGE) -> list[np.ndarray]:
    """``n`` pages in one page-aligned buffer (as HostPool's)."""
    buf = np.frombuffer(mmap.mmap(-1, n * nbytes), dtype=np.uint8)
    return [buf[i * nbytes:(i + 1) * nbytes] for i in range(n)]


@pytest.mark.skipif(not getattr(os, "O_DIRECT", 0), reason="no O_DIRECT")
def test_aligned_pages_go_zero_copy_and_others_are_staged(tmp_path: Path) -> None:
    """Writes and reads alike: aligned pages go zero-copy, others through staging."""
    keys = keys_(12)

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert store.direct_io
        staged = lambda: store.stats().extra["staged_pages"]  # noqa: E731
        # Aligned sources and destinations: nothing copied.
        src = aligned_pages(4)
        for k, page in zip(keys[:4], src, strict=True):
            page[:] = page_payload(k, PAGE)
        assert await store.put(list(zip(keys[:4], src, strict=True))) == [True] * 4
        dst = aligned_pages(4)
        assert await store.get(list(zip(keys[:4], dst, strict=True))) == [True] * 4
        assert all(np.array_equal(d, page_payload(k, PAGE)) for k, d in zip(keys[:4], dst,
                                                                             strict=True))
        assert staged() == 0
        # Unaligned (numpy's own memory, offset by a byte) and read-only ones are staged;
        # mixed with aligned ones in one batch.
        mixed = []
        for i, k in enumerate(keys[4:]):
            page = aligned_pages(1)[0] if i % 2 else np.zeros(PAGE + 1, np.uint8)[1:]
            page[:] = page_payload(k, PAGE)
            if i == 2:
                page.flags.writeable = False
            mixed.append(page)
        assert await store.put(list(zip(keys[4:], mixed, strict=True))) == [True] * 8
        assert staged() == 4
        outs = [aligned_pages(1)[0] if i % 2 else np.zeros(PAGE + 1, np.uint8)[1:]
                for i in range(8)]
        assert await store.get(list(zip(keys[4:], outs, strict=True))) == [True] * 8
        assert staged() == 4 + 4
        assert all(np.array_equal(o, page_payload(k, PAGE)) for k, o in zip(keys[4:], outs,
                                                                             strict=True))
        await store.close()

    run(body())


@pytest.mark.parametrize("direct", [None, False])
def test_pages_of_no_whole_number_of_blocks(tmp_path: Path, direct: bool | None) -> None:
    layout = KVLayout(1, 1, 8, 16, "float16", model_id="tiny")  # 512-byte pages
    pb = layout.bytes_per_block
    keys = keys_(40)

    async def body() -> None:
        store = await DiskStore.open(layout, cfg(tmp_path, direct_io=direct))
        assert store.geometry.slot_bytes == 4096
        assert await store.put([(k, page_payload(k, pb)) for k in keys]) == [True] * 40
        await store.close()
        listener = RecordingListener()
        store = await DiskStore.open(layout, cfg(tmp_path, direct_io=direct), listener=listener)
        outs = [np.zeros(pb, np.uint8) for _ in keys]
        assert await store.get(list(zip(keys, outs, strict=True))) == [True] * 40
        assert all(np.array_equal(o, page_payload(k, pb)) for k, o in zip(keys, outs,
                                                                           strict=True))
        path, offset = slot_offset(store, keys[7])
        write_at(path, offset + 100, b"\x00\x01")
        assert await store.get([(keys[7], outs[7])]) == [False]
        assert listener.removed(RemovalReason.CORRUPT) == [keys[7]]
        await store.close()

    run(body())


def test_short_transfers_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel may move fewer bytes than asked (signals, odd filesystems): the rest of
    the vector follows, from the right buffer and offset."""
    real_writev, real_readv = os.pwritev, os.preadv

    def short(real: Any) -> Any:
        def call(fd: int, iov: list[memoryview], offset: int) -> int:
            budget, cut = 5000, []
            for b in iov:  # at most ``budget`` bytes, ending mid-buffer
                cut.append(b[:budget])
                budget -= cut[-1].nbytes
                if budget <= 0:
                    break
            return int(real(fd, cut, offset))
        return call

    monkeypatch.setattr(slab_io.os, "pwritev", short(real_writev))
    monkeypatch.setattr(slab_io.os, "preadv", short(real_readv))

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, direct_io=False))
        keys = keys_(10)
        assert await put(store, keys) == [True] * 10
        assert await served(store, keys) == [True] * 10
        await store.close()

    run(body())


def test_a_failed_commit_is_reported_to_its_submitter(tmp_path: Path) -> None:
    """Whoever drives a group commit (here a flush), a failure goes to each ticket's own
    waiter, so that a put never publishes pages whose index entries did not commit."""
    from kvbm.storage.disk.commit import GroupCommitter

    class FailingIndex:
        def apply(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("disk gone")

    committer = GroupCommitter(FailingIndex(), None, sync_data=False)  # type: ignore[arg-type]
    ticket = committer.submit([1], [b"record"])
    committer.flush()  # drives the failing commit, raises nothing itself
    with pytest.raises(StorageError, match="disk gone"):
        committer.wait(ticket)
    committer.close()


def test_reads_do_not_commit(tmp_path: Path) -> None:
    """Access times ride along with the next commit: a get waits for no disk sync."""
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        keys = keys_(8)
        await put(store, keys)
        commits = store.group_commits
        for _ in range(3):
            assert await served(store, keys) == [True] * 8
        assert store.group_commits == commits
        await store.close()

    run(body())


def test_concurrent_puts_of_the_same_keys(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        keys = keys_(32)
        results = await asyncio.gather(*(put(store, keys) for _ in range(6)))
        assert all(r == [True] * 32 for r in results)
        assert store.stats().puts == 32
        assert store.used_bytes == 32 * PAGE
        assert await served(store, keys) == [True] * 32
        await store.close()

    run(body())


def test_reads_racing_evictions_never_return_wrong_bytes(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, capacity_bytes=room(16),
                                                 eviction="lru"))
        rng = random.Random(3)
        written: list[int] = []
        for round_ in range(20):
            new = keys_(8, start=8 * round_)
            reads = [served(store, rng.sample(written, min(8, len(written))))
                     for _ in range(3)] if written else []
            await asyncio.gather(put(store, new), *reads)  # served() checks the bytes
            written += new
        assert store.stats().corrupt == 0
        await store.close()

    run(body())


def test_process_crash_durability_mode(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, durability=Durability.PROCESS_CRASH))
        await put(store, keys_(4))
        await store.close()
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert await served(store, keys_(4)) == [True] * 4
        await store.close()

    run(body())


def test_drop_page_cache(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path, direct_io=False))
        await put(store, keys_(4))
        store.drop_page_cache()
        assert await served(store, keys_(4)) == [True] * 4
        await store.close()

    run(body())


# -- kill -9 at random moments ---------------------------------------------------------------
CRASH_CAPACITY = 4 << 30  # never reached (see crash_writer.py); slabs grow only as filled


def _crash_iteration(root: Path, seed: int, rng: random.Random) -> tuple[set[int], set[int]]:
    """Run the writer, kill -9 it at a random moment; the keys it acknowledged and the
    keys it announced deleting."""
    for attempt in range(2):
        proc = subprocess.Popen(
            [sys.executable, str(CRASH_WRITER), str(root), str(seed), str(CRASH_CAPACITY)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        if proc.stdout.readline().startswith(b"ready"):
            break
        proc.kill()
        err = proc.communicate(timeout=30)[1].decode()[-2000:]
        # One retry: a fresh interpreter can trip over a package being reinstalled
        # (editable installs rebuild their link tree) while the test runs.
        if attempt:
            pytest.fail(f"crash writer did not start: {err}")
        time.sleep(1.0)
    time.sleep(rng.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    acked: set[int] = set()
    gone: set[int] = set()
    for line in out.decode().splitlines():
        tag, *keys, end = line.split() or [""]
        assert end == "end", f"torn protocol line {line!r}"
        (acked if tag == "ok" else gone).update(int(k, 16) for k in keys)
    return acked, gone


def test_kill_9_never_loses_an_acknowledged_page_nor_serves_a_torn_one(tmp_path: Path) -> None:
    rng = random.Random(2026)
    acked: set[int] = set()
    deadline = time.monotonic() + 20
    iterations = 0
    while iterations < 30 and time.monotonic() < deadline:
        new, gone = _crash_iteration(tmp_path, iterations, rng)
        acked = (acked | new) - gone
        iterations += 1

        async def check(new: set[int] = new, acked: set[int] = acked) -> None:
            store = await DiskStore.open(LAYOUT, cfg(tmp_path, capacity_bytes=CRASH_CAPACITY))
            try:
                present = set(await store.keys())
                missing = acked - present
                assert not missing, f"{len(missing)} acknowledged pages lost"
                # Read back what this run wrote (acknowledged or committed just before the
                # kill) and a sample of older pages: served() fails on wrong bytes, so a
                # torn page could only show up as a miss, and there must be none.
                unacked = present - acked
                older = sorted(present - new - unacked)
                sample = sorted((new & present) | unacked) + rng.sample(older, min(200, len(older)))
                hits = await served(store, sample)
                assert all(hits), f"{hits.count(False)} indexed pages failed verification"
                assert store.stats().corrupt == 0
            finally:
                await store.close()

        run(check())
    print(f"crash iterations: {iterations}, acknowledged pages: {len(acked)}")
    assert iterations >= 10
    assert acked, "the writer never got a put through"


# -- the per-page work of writes: native == Python, bit for bit ------------------------------
def _seal_case(page_bytes: int, n: int, align: int, seed: int
               ) -> tuple[list[memoryview], list[int], int]:
    """``n`` pages of random bytes: some 4 KiB-aligned, some not, one read-only."""
    rng = np.random.default_rng(seed)
    stride = (page_bytes + 8 + 4095) // 4096 * 4096
    store = np.frombuffer(mmap.mmap(-1, n * stride), dtype=np.uint8)
    pages: list[memoryview] = []
    for j in range(n):
        start = j * stride + (8 if j % 3 == 0 else 0)  # every third one unaligned
        arr = store[start:start + page_bytes]
        arr[:] = rng.integers(0, 256, page_bytes, dtype=np.uint8)
        if j == n - 1:
            arr = arr.copy()
            arr.flags.writeable = False
        pages.append(memoryview(arr).cast("B"))
    keys = [int(k) for k in rng.integers(0, 2**63, n, dtype=np.int64)]
    keys[0] = 2**64 - 1
    return pages, keys, int(rng.integers(0, 2**63))


@pytest.mark.skipif(runs_mod._native_seal is None, reason="kvbm._xxh3 was not built")
@pytest.mark.parametrize("page_bytes", [241, 1000, 1024, 1025, 4096, 4160, 32768, 65536 + 17])
@pytest.mark.parametrize("align", [0, 4096, -1])
def test_native_seal_equals_python(page_bytes: int, align: int) -> None:
    n = 7
    slot = (page_bytes + 4095) // 4096 * 4096
    pages, keys, fp = _seal_case(page_bytes, n, align, seed=page_bytes + align)
    images = [mmap.mmap(-1, n * slot) for _ in range(2)]
    heads = [bytearray(b"\x5a" * (n * 64 + 64)) for _ in range(2)]
    for image in images:  # what a reused staging buffer holds, which both must overwrite
        image[:] = b"\xa5" * len(image)
    native = runs_mod._native_seal(pages, keys, runs_mod.HEADER_PREFIX, fp, page_bytes,
                                   images[0], slot, memoryview(heads[0]), align)
    python = runs_mod.seal_pages_py(pages, keys, runs_mod.HEADER_PREFIX, fp, page_bytes,
                                    images[1], slot, memoryview(heads[1]), align)
    assert native == python
    assert images[0][:] == images[1][:]
    assert heads[0] == heads[1]
    assert heads[0][n * 64:] == b"\x5a" * 64  # nothing past the run's headers
    checksums, zero_copy = native
    for j, page in enumerate(pages):
        assert checksums[j] == payload_checksum(page)
        head = bytes(heads[0][j * 64:(j + 1) * 64])
        assert parse_header(head) == PageHeader(fp, keys[j], page_bytes, checksums[j])
        assert zero_copy[j] == runs_mod._zero_copy(page, align)
        if not zero_copy[j]:
            assert images[0][j * slot:j * slot + page_bytes] == page.tobytes()
    assert zero_copy[-1] == (align == 0)  # read-only: staged, unless buffered
    assert zero_copy[0] == (align == 0)  # unaligned: zero-copy only where any will do
    assert zero_copy[1] == (align >= 0)  # aligned and writable


@pytest.mark.skipif(runs_mod._native_seal is None, reason="kvbm._xxh3 was not built")
def test_native_seal_refuses_bad_arguments() -> None:
    seal = runs_mod._native_seal
    assert seal is not None
    page = memoryview(bytearray(4096))
    image = mmap.mmap(-1, 8192)
    heads = memoryview(bytearray(128))
    prefix = runs_mod.HEADER_PREFIX
    with pytest.raises(ValueError, match="exceed"):
        seal([memoryview(bytearray(240))], [1], prefix, 0, 240, image, 4096, heads, 0)
    with pytest.raises(ValueError, match="hold it"):
        seal([page], [1], prefix, 0, 4096, image, 4000, heads, 0)
    with pytest.raises(ValueError, match="not 4096"):
        seal([memoryview(bytearray(4000))], [1], prefix, 0, 4096, image, 8192, heads, 0)
    with pytest.raises(ValueError, match="keys"):
        seal([page], [1, 2], prefix, 0, 4096, image, 8192, heads, 0)
    with pytest.raises(ValueError, match="slots"):
        seal([page, page], [1, 2], prefix, 0, 4096, image, 8192, heads, 0)
    with pytest.raises(ValueError, match="headers"):
        seal([page, page], [1, 2], prefix, 0, 4096, image, 4096, heads[:64], 0)
    with pytest.raises(ValueError, match="prefix"):
        seal([page], [1], prefix[:8], 0, 4096, image, 8192, heads, 0)
    with pytest.raises(OverflowError):
        seal([page], [-1], prefix, 0, 4096, image, 8192, heads, 0)
    with pytest.raises(TypeError):
        seal([page], [1], prefix, 0, 4096, bytes(8192), 8192, heads, 0)  # read-only image
    with pytest.raises(TypeError):
        seal([page], [1], prefix, 0, 4096, image, 8192, bytes(128), 0)  # read-only heads
    assert seal([], [], prefix, 0, 4096, image, 8192, heads, 0) == ([], b"")


def test_python_sealer_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback where the extension is not built: pages it writes read back."""
    monkeypatch.setattr(runs_mod, "_native_seal", None)
    keys = keys_(24)

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert store._runio._seal is runs_mod.seal_pages_py
        assert await put(store, keys) == [True] * len(keys)
        await store.close()
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert await served(store, keys) == [True] * len(keys)
        await store.close()

    run(body())


# -- the index: keyed by slot ------------------------------------------------------------------
def _index_records(root: Path) -> dict[int, bytes]:
    """slot -> record, read straight from the lmdb of a closed store."""
    import lmdb

    env = lmdb.open(str(root / "index"), subdir=True, max_dbs=1, readonly=True, lock=False)
    try:
        db = env.open_db(b"pages", create=False)
        with env.begin(db=db) as txn:
            return {int.from_bytes(k, "big"): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def _write_records(root: Path, records: dict[int, bytes]) -> None:
    import lmdb

    env = lmdb.open(str(root / "index"), subdir=True, max_dbs=1)
    try:
        db = env.open_db(b"pages")
        with env.begin(write=True, db=db) as txn:
            for slot, rec in records.items():
                txn.put(slot.to_bytes(8, "big"), rec)
    finally:
        env.close()


def test_index_is_keyed_by_slot_and_survives_deletes(tmp_path: Path) -> None:
    from kvbm.storage.disk.index import key_of

    keys = keys_(12)

    async def body() -> dict[int, int]:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert await put(store, keys) == [True] * 12
        assert await store.delete(keys[:4]) == 4
        slots = {k: store._index_db.slot_of(store._index[k]) for k in keys[4:]}
        await store.close()
        return slots

    slots = run(body())
    records = _index_records(tmp_path)
    assert {slot: key_of(rec) for slot, rec in records.items()} == {
        s: k for k, s in slots.items()}

    async def reopen() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert await served(store, keys) == [False] * 4 + [True] * 8
        await store.close()

    run(reopen())


@pytest.mark.parametrize("second", ["older", "newer"])
def test_index_drops_a_second_slot_of_a_block_and_misplaced_records(tmp_path: Path,
                                                                    second: str) -> None:
    """Two slots naming one block (what a failed removal commit followed by a new put of
    the block leaves): the most recently used one is kept, the other dropped durably; so is
    a record filed under another slot than the one it describes."""
    from kvbm.storage.disk import index as index_mod

    keys = keys_(4)

    async def first() -> tuple[int, int, Any]:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert await put(store, keys) == [True] * 4
        slots = [store._index_db.slot_of(store._index[k]) for k in keys]
        await store.close()
        return slots[0], max(slots), store.geometry

    slot0, top, geometry = run(first())
    records = _index_records(tmp_path)
    rec = records[slot0]
    last_access, freq = index_mod.use_of(rec)
    # keys[0] again, in a slot past the others (never written: it cannot verify)
    used = last_access - 1 if second == "older" else last_access + 1
    dup = index_mod._REC.pack(*geometry.locate(top + 1), PAGE, index_mod.checksum_of(rec),
                              used, freq, False, 0, keys[0])
    # a record of slot top + 2 filed under slot top + 5
    misplaced = index_mod._REC.pack(*geometry.locate(top + 2), PAGE, bytes(16), 0, 1,
                                    False, 0, 12345)
    _write_records(tmp_path, {top + 1: dup, top + 5: misplaced})
    kept = slot0 if second == "older" else top + 1

    async def reopen() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert store._index_db.slot_of(store._index[keys[0]]) == kept
        assert 12345 not in store._index
        await store.close()

    run(reopen())
    # the dropped slot of keys[0] and the misplaced record are gone from lmdb too
    assert set(_index_records(tmp_path)) == (set(records) - {slot0}) | {kept}
    if second == "older":

        async def served_all() -> None:
            store = await DiskStore.open(LAYOUT, cfg(tmp_path))
            assert await served(store, keys) == [True] * 4
            await store.close()

        run(served_all())


@pytest.mark.skipif(runs_mod._native_check is None, reason="kvbm._xxh3 was not built")
@pytest.mark.parametrize("page_bytes", [241, 1025, 4096, 32768])
def test_native_check_equals_python(page_bytes: int) -> None:
    """Pages as read (some straight into their destinations), some damaged: the native
    checker and the Python one give the same verdicts and leave the same bytes."""
    n = 8
    slot = (page_bytes + 4095) // 4096 * 4096
    pages, keys, fp = _seal_case(page_bytes, n, 0, seed=page_bytes)
    image = mmap.mmap(-1, n * slot)
    heads = memoryview(bytearray(n * 64))
    checksums, _ = runs_mod.seal_pages_py(pages, keys, runs_mod.HEADER_PREFIX, fp,
                                          page_bytes, image, slot, heads, -1)  # all staged
    zero_copy = bytes([j % 2 for j in range(n)])
    sums = list(checksums)
    sums[3] = bytes(16)  # the index expects another payload: the header differs
    image[2 * slot + 5] ^= 0xFF  # bit rot in a staged payload
    keys = list(keys)
    keys[4] ^= 1  # read under another name
    got = 6  # the read ended before page 6 (or its header) was whole: two torn pages
    results = []
    for check in (runs_mod._native_check, runs_mod.check_pages_py):
        assert check is not None
        dests = [np.zeros(page_bytes, np.uint8) for _ in range(n)]
        for j in range(n):
            if zero_copy[j]:  # what the read put straight there (page 5 damaged)
                dests[j][:] = np.frombuffer(pages[j], np.uint8)
        dests[5][7] ^= 0xFF
        status = check([memoryview(d) for d in dests], keys, runs_mod.HEADER_PREFIX, fp,
                       page_bytes, image, slot, heads, sums, zero_copy, got)
        results.append((status, [d.tobytes() for d in dests]))
    assert results[0] == results[1]
    status, dests_bytes = results[0]
    assert list(status) == [runs_mod.CHECK_OK, runs_mod.CHECK_OK, runs_mod.CHECK_CHECKSUM,
                            runs_mod.CHECK_HEADER, runs_mod.CHECK_HEADER,
                            runs_mod.CHECK_CHECKSUM, runs_mod.CHECK_TRUNCATED,
                            runs_mod.CHECK_TRUNCATED]
    assert dests_bytes[0] == pages[0].tobytes()  # staged, verified: copied out
    assert dests_bytes[1] == pages[1].tobytes()


def test_scalar_hash_path_matches(tmp_path: Path) -> None:
    """The portable loop of kvbm._xxh3 (KVBM_XXH3_SCALAR=1), where the AVX2 one is the
    default: both must give xxhash's digests."""
    if runs_mod._native_seal is None:
        pytest.skip("kvbm._xxh3 was not built")
    code = (
        "import mmap, os, xxhash\n"
        "from kvbm.storage.disk import runs\n"
        "for n in (241, 1024, 1025, 4096, 32768, 100003):\n"
        "    p = memoryview(bytearray(os.urandom(n)))\n"
        "    img = mmap.mmap(-1, n + 4160)\n"
        "    sums, _ = runs._native_seal([p], [1], runs.HEADER_PREFIX, 2, n, img, n + 4160,\n"
        "                                bytearray(64), 0)\n"
        "    assert sums == [xxhash.xxh3_128_digest(p)], n\n"
    )
    env = {**os.environ, "KVBM_XXH3_SCALAR": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# -- through the offload engine ---------------------------------------------------------------
def test_put_mixes_stored_in_flight_and_repeated_keys(tmp_path: Path) -> None:
    """The claim's slow path (a batch that is not all new pages) stores each key once."""
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        old, new = keys_(8), keys_(8, start=100)
        assert await put(store, old) == [True] * 8
        batch = [*old[:4], *new, new[0], new[3]]
        assert await put(store, batch) == [True] * len(batch)
        s = store.stats()
        assert s.puts == 16 and s.put_skipped == 6
        assert await served(store, [*old, *new]) == [True] * 16
        assert store._pending == {}  # every claim released
        await store.close()

    run(body())


def test_engine_overlaps_batches_and_keeps_store_before_load(tmp_path: Path) -> None:
    """Batches of one kind may run at once (OffloadEngine.concurrent_batches), but a load
    submitted after a store of the same pages finds them."""
    from kvbm.offload import OffloadEngine, PagePairs, TransferHandle, TransferKind, TransferStatus

    engine = OffloadEngine(batch_bytes=4 * PAGE, concurrent_batches=2)
    try:
        store = engine.run(DiskStore.open(LAYOUT, cfg(tmp_path)))
        engine.add_tier(store)
        keys = keys_(64)
        src = [memoryview(page_payload(k, PAGE)) for k in keys]
        dst = [memoryview(bytearray(PAGE)) for _ in keys]
        handles = [engine.submit(TransferHandle(TransferKind.STORE, Medium.DISK,
                                                keys[i:i + 4], src[i:i + 4]))
                   for i in range(0, 64, 4)]
        handles += [engine.submit(TransferHandle(TransferKind.LOAD, Medium.DISK,
                                                 keys[i:i + 8], dst[i:i + 8]))
                    for i in range(0, 64, 8)]
        for h in handles:
            assert h.wait(30) and h.status is TransferStatus.DONE and all(h.results)
        assert all(d == s for d, s in zip(dst, src, strict=True))
        assert engine.stats(Medium.DISK).pages_ok == 128
    finally:
        engine.shutdown()
    pairs = PagePairs([1, 2, 3], ["a", "b", "c"])
    assert list(pairs) == [(1, "a"), (2, "b"), (3, "c")] and pairs[1] == (2, "b")
    assert list(pairs[1:]) == [(2, "b"), (3, "c")] and len(pairs) == 3
    with pytest.raises(Exception, match="one buffer per key"):
        PagePairs([1], [])


def test_a_batch_holds_no_tracked_object_per_page(tmp_path: Path) -> None:
    """While a batch is in the store, the engine and the store hold no GC-tracked object
    per page (a tuple per page was one): thousands of them per batch get promoted and set
    off full collections, ~100 ms each in a process that holds torch."""
    from kvbm.offload import OffloadEngine, TransferHandle, TransferKind

    n = 2048
    engine = OffloadEngine(max_inflight_pages=n)
    try:
        store = engine.run(DiskStore.open(LAYOUT, cfg(tmp_path)))
        engine.add_tier(store)
        keys = keys_(n)
        buffers = [memoryview(page_payload(k, PAGE)) for k in keys]
        seen: list[int] = []
        inner = store._write_and_commit

        def counted(*args: Any) -> Any:  # runs while the whole batch is being handled
            seen.append(len(gc.get_objects()))
            return inner(*args)

        store._write_and_commit = counted  # type: ignore[method-assign]
        gc.collect()
        before = len(gc.get_objects())
        h = engine.submit(TransferHandle(TransferKind.STORE, Medium.DISK, keys, buffers))
        assert h.wait(60) and all(h.results)
        assert seen and seen[0] - before < n // 4, (before, seen)
    finally:
        engine.shutdown()


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 1 << 34), slot_blocks=st.integers(1, 512),
       slab_slots=st.integers(1, 4096))
def test_slots_within_is_the_most_that_fit(capacity: int, slot_blocks: int,
                                           slab_slots: int) -> None:
    slot = slot_blocks * ALIGN
    area = header_area_for(slab_slots)

    def disk_bytes(n: int) -> int:  # slab files holding n slots, the last one partial
        full, part = divmod(n, slab_slots)
        return full * (slab_slots * slot + area) + (area + part * slot if part else 0)

    n = slots_within(capacity, slot, slab_slots, area)
    assert disk_bytes(n) <= capacity < disk_bytes(n + 1)


def test_slab_files_stay_within_the_capacity(tmp_path: Path) -> None:
    capacity = 5 * PAGE + 3 * PAGE // 2  # slabs of 2 slots: 3 slabs, the last one partial

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path / "g3", capacity_bytes=capacity,
                                                 slab_bytes=2 * PAGE))
        keys = keys_(16)
        await store.put([(k, page_payload(k, PAGE)) for k in keys])
        assert len(await store.keys()) == store.geometry.max_slots
        await store.close()

    asyncio.run(body())
    used = sum(p.stat().st_size for p in (tmp_path / "g3").rglob("*.slab"))
    assert 0 < used <= capacity
