"""G3 disk tier under damage: a damaged or missing index, a damaged identity file, a kill -9
during the first open, bad arguments, and describing a store without opening it.

Every open of a damaged store runs in a child process (:func:`open_in_child`): what is
tested is that the process survives (lmdb can SIGBUS or abort it), so a crash must fail
the test rather than take pytest down with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm.errors import (
    ConfigError,
    InvalidArgumentError,
    InvalidKeyError,
    LayoutMismatchError,
    StorageError,
)
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.storage.base import RemovalReason
from kvbm.storage.disk import DiskStore, DiskTierConfig
from kvbm.storage.disk.inspect import describe
from kvbm.testing import PageStoreTests, RecordingListener, page_payload

LAYOUT = PageStoreTests.layout
PAGE = LAYOUT.bytes_per_block
N = 40  # pages in the stores these tests damage
CRASH_WRITER = Path(__file__).with_name("crash_writer.py")
CRASH_CAPACITY = 4 << 30  # never reached (see crash_writer.py); slabs grow only as filled


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


def test_describe_a_store_another_process_is_writing(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(CRASH_WRITER), str(tmp_path), "5",
                             str(CRASH_CAPACITY)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"ready")
        for _ in range(5):
            info = describe(tmp_path)
            assert info["index"] == "ok" and info["pages_from"] == "index"
            if Path("/proc/locks").exists():
                assert info["open_by_pid"] == proc.pid
        assert proc.poll() is None  # the writer never noticed
    finally:
        proc.kill()
        proc.communicate(timeout=30)


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


# -- opening a damaged store, in a child process -----------------------------------------------
_OPEN = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    from kvbm.storage.disk import DiskStore, DiskTierConfig
    from kvbm.testing import PageStoreTests, page_payload

    LAYOUT = PageStoreTests.layout
    PAGE = LAYOUT.bytes_per_block

    async def one_open(root, keys):
        store = await DiskStore.open(LAYOUT, DiskTierConfig(root, 64 << 20,
                                                            slab_bytes=4 << 20))
        bufs = [np.zeros(PAGE, np.uint8) for _ in keys]
        hits = await store.get(list(zip(keys, bufs)))
        wrong = [k for k, hit, buf in zip(keys, hits, bufs)
                 if hit and not np.array_equal(buf, page_payload(k, PAGE))]
        # The store takes new pages too.
        fresh = PageStoreTests.make_keys(3, start=10_000)
        stored = await store.put([(k, page_payload(k, PAGE)) for k in fresh])
        await store.delete(fresh)
        s = store.stats()
        out = {"served": [k for k, hit in zip(keys, hits) if hit], "wrong": wrong,
               "stored": all(stored), "rebuilds": s.index_rebuilds,
               "recovered": s.pages_recovered, "corrupt": s.corrupt,
               "identity_repairs": s.extra.get("identity_repairs", 0)}
        await store.close()
        return out

    async def main(root, keys):
        first = await one_open(root, keys)
        second = await one_open(root, keys)  # whatever the first open repaired holds
        print(json.dumps({"first": first, "second": second}))

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
""")


def open_in_child(root: Path, keys: list[int]) -> dict[str, Any]:
    """Open the store at ``root`` twice in a child process, reading ``keys`` each time;
    what each open served and counted. Fails the test if the child dies."""
    proc = subprocess.run([sys.executable, "-c", _OPEN, str(root), json.dumps(keys)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, (
        f"opening the damaged store killed the process (status {proc.returncode}):\n"
        f"{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    for run in ("first", "second"):
        assert out[run]["wrong"] == [], "wrong bytes served"
        assert out[run]["stored"]
    assert out["second"]["rebuilds"] == 0 and out["second"]["identity_repairs"] == 0
    assert out["second"]["served"] == out["first"]["served"]
    return out


def damage_and_open(root: Path, keys: list[int]) -> dict[str, Any]:
    out = open_in_child(root, keys)
    assert sorted(out["first"]["served"]) == sorted(keys), "pages lost"
    return out["first"]


@pytest.mark.parametrize("size", ["0", "1", "4095", "half", "minus_page", "minus_byte"])
def test_truncated_index(tmp_path: Path, size: str) -> None:
    keys = make_store(tmp_path)
    data = tmp_path / "index" / "data.mdb"
    full = data.stat().st_size
    new = {"0": 0, "1": 1, "4095": 4095, "half": full // 2, "minus_page": full - 4096,
           "minus_byte": full - 1}[size]
    os.truncate(data, new)
    first = damage_and_open(tmp_path, keys)
    if new < full - 4096:  # what remains cannot hold the index: rebuilt from the slabs
        assert first["rebuilds"] == 1 and first["recovered"] >= len(keys)


def flip_bytes(data: bytearray, seed: int) -> None:
    """Flip 1 to 3 bytes of an lmdb file where damage matters most (page headers and node
    pointers at the start of pages, nodes at their end, the meta records) or anywhere."""
    rng = random.Random(seed)
    pages = len(data) // 4096
    for _ in range(1 + seed % 3):
        page = rng.randrange(pages) * 4096
        where = rng.choice(["head", "tail", "meta", "any"])
        if where == "head":
            offset = page + rng.randrange(64)
        elif where == "tail":
            offset = page + 4095 - rng.randrange(1024)
        elif where == "meta":
            offset = rng.randrange(2) * 4096 + 16 + rng.randrange(144)
        else:
            offset = rng.randrange(len(data))
        data[offset] ^= rng.randrange(1, 256)


@pytest.mark.parametrize("seed", range(24))
def test_flipped_bytes_in_the_index(tmp_path: Path, seed: int) -> None:
    keys = make_store(tmp_path)
    data = tmp_path / "index" / "data.mdb"
    raw = bytearray(data.read_bytes())
    flip_bytes(raw, seed)
    data.write_bytes(bytes(raw))
    out = open_in_child(tmp_path, keys)
    # A flip the checks cannot see (inside a record's value, or in unused bytes) costs at
    # most the pages whose records it hit: their reads are misses, never wrong bytes.
    assert len(out["first"]["served"]) >= len(keys) - 3


@pytest.mark.parametrize("lock", [b"", b"garbage", bytes(range(256)) * 40])
def test_garbage_lock_file(tmp_path: Path, lock: bytes) -> None:
    keys = make_store(tmp_path)
    (tmp_path / "index" / "lock.mdb").write_bytes(lock)
    first = damage_and_open(tmp_path, keys)
    assert first["rebuilds"] == 0


def test_index_replaced_by_a_directory_or_file(tmp_path: Path) -> None:
    keys = make_store(tmp_path)
    data = tmp_path / "index" / "data.mdb"
    data.unlink()
    data.mkdir()
    assert damage_and_open(tmp_path, keys)["rebuilds"] == 1
    shutil.rmtree(tmp_path / "index")
    (tmp_path / "index").write_bytes(b"not a directory")
    assert damage_and_open(tmp_path, keys)["rebuilds"] == 1


def test_a_rebuilt_index_serves_what_survived_and_misses_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys = make_store(tmp_path)
    torn_payload, torn_header = keys[3], keys[7]

    async def locate() -> tuple[Path, int, int, int]:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        g = store.geometry
        places = []
        for key in (torn_payload, torn_header):
            slab, offset = g.locate(store._index_db.slot_of(store._index[key]))
            places.append((store._slabs.path(slab), offset))
        await store.close()
        (path, a), (_, b) = places
        return path, g.payload_offset(a), g.header_offset(b), g.slot_bytes

    slab, payload_at, header_at, _ = asyncio.run(locate())
    with open(slab, "r+b") as f:
        f.seek(payload_at + 100)
        f.write(b"\x00\xff\x00")  # its header still matches its record: a miss when read
        f.seek(header_at + 30)
        f.write(b"\xee")  # fails its header checksum: dropped by the rebuild
    os.truncate(tmp_path / "index" / "data.mdb", 1)

    async def reopen() -> None:
        listener = RecordingListener()
        store = await DiskStore.open(LAYOUT, cfg(tmp_path), listener=listener)
        s = store.stats()
        assert (s.index_rebuilds, s.corrupt) == (1, 1)
        # The deleted pages' headers were never cleared: they come back, with their bytes.
        assert s.pages_recovered == len(keys) - 1 + 5
        bufs = [np.zeros(PAGE, np.uint8) for _ in keys]
        hits = await store.get(list(zip(keys, bufs, strict=True)))
        for key, hit, buf in zip(keys, hits, bufs, strict=True):
            if key in (torn_payload, torn_header):
                assert not hit
            else:
                assert hit and np.array_equal(buf, page_payload(key, PAGE))
        assert s.corrupt == 2  # the torn payload, found by the read
        assert listener.events == [(Medium.DISK, [torn_payload], RemovalReason.CORRUPT)]
        await store.close()

    with caplog.at_level(logging.WARNING, logger="kvbm.storage.disk"):
        asyncio.run(reopen())
    assert "rebuilt it from the headers" in caplog.text
    assert "index.damaged" in caplog.text
    # The damaged index was kept aside, within the store, for a post-mortem.
    assert (tmp_path / "index.damaged" / "data.mdb").stat().st_size == 1


# -- the identity file --------------------------------------------------------------------------
def _damage_identity(meta_path: Path, how: str) -> None:
    raw = meta_path.read_bytes()
    meta = json.loads(raw)
    if how == "non_utf8":
        meta_path.write_bytes(raw[:5] + b"\xff" + raw[6:])
    elif how == "truncated":
        meta_path.write_bytes(raw[:len(raw) // 2])
    elif how == "empty":
        meta_path.write_bytes(b"")
    elif how in ("list", "string", "number", "null"):
        meta_path.write_text({"list": "[1, 2]", "string": '"kvbm"', "number": "42",
                              "null": "null"}[how])
    elif how == "fingerprint_digit":
        fp = meta["fingerprint"]
        meta["fingerprint"] = fp[:-1] + ("0" if fp[-1] != "0" else "1")
        meta_path.write_text(json.dumps(meta))
    elif how == "wrong_type":
        meta["slab_slots"] = str(meta["slab_slots"])
        meta_path.write_text(json.dumps(meta))
    elif how == "format_garbled":
        meta["format"] = "kvbm-disk-v\x04"
        meta_path.write_text(json.dumps(meta))
    elif how == "layout_garbled":
        meta["layout"]["num_layers"] = "two"
        meta_path.write_text(json.dumps(meta))
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["non_utf8", "truncated", "empty", "list", "string", "number",
                                 "null", "fingerprint_digit", "wrong_type", "format_garbled",
                                 "layout_garbled"])
def test_damaged_identity_is_repaired(tmp_path: Path, how: str) -> None:
    keys = make_store(tmp_path)
    _damage_identity(tmp_path / "kvbm-disk.json", how)
    first = damage_and_open(tmp_path, keys)
    assert (first["identity_repairs"], first["rebuilds"]) == (1, 0)
    assert describe(tmp_path)["layout_fingerprint"] == f"{LAYOUT.fingerprint:016x}"


def test_damaged_identity_next_to_foreign_files_is_refused_untouched(tmp_path: Path) -> None:
    make_store(tmp_path, n=3)
    (tmp_path / "notes.txt").write_text("mine")
    _damage_identity(tmp_path / "kvbm-disk.json", "non_utf8")
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match=r"damaged.*notes\.txt.*refusing"):
        DiskStore(LAYOUT, cfg(tmp_path))
    assert snapshot(tmp_path) == before


def test_damaged_identity_over_another_layouts_pages_is_refused_untouched(
        tmp_path: Path) -> None:
    other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16,
                     dtype="float16", model_id="another-model")

    async def write() -> None:
        store = await DiskStore.open(other, cfg(tmp_path))
        await store.put([(k, page_payload(k, PAGE)) for k in keys_(3)])
        await store.close()

    asyncio.run(write())
    _damage_identity(tmp_path / "kvbm-disk.json", "truncated")
    before = snapshot(tmp_path)
    with pytest.raises(LayoutMismatchError, match="another layout"):
        DiskStore(LAYOUT, cfg(tmp_path))
    assert snapshot(tmp_path) == before


def test_identity_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    make_store(tmp_path, n=2)
    (tmp_path / "kvbm-disk.json").unlink()
    (tmp_path / "kvbm-disk.json").mkdir()
    (tmp_path / "kvbm-disk.json" / "keep").write_text("x")
    before = snapshot(tmp_path)
    with pytest.raises(StorageError, match="not a regular file"):
        DiskStore(LAYOUT, cfg(tmp_path))
    assert snapshot(tmp_path) == before


def test_damaged_identity_and_slabs_that_fit_nothing_start_empty(tmp_path: Path) -> None:
    keys = make_store(tmp_path)
    os.truncate(tmp_path / "slabs" / "000000.slab", 12345)
    _damage_identity(tmp_path / "kvbm-disk.json", "empty")
    out = open_in_child(tmp_path, keys)
    assert out["first"]["served"] == [] and out["first"]["identity_repairs"] == 1


# -- creating a store is crash-safe -------------------------------------------------------------
def test_half_written_identity_of_a_first_open(tmp_path: Path) -> None:
    # What a kill -9 between writing the temporary identity file and renaming it leaves.
    (tmp_path / "LOCK").touch()
    (tmp_path / "kvbm-disk.json.tmp").write_text('{"format":\n')

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert await store.put([(k, page_payload(k, PAGE)) for k in keys_(2)]) == [True] * 2
        await store.close()

    asyncio.run(body())
    assert not (tmp_path / "kvbm-disk.json.tmp").exists()
    assert describe(tmp_path)["pages"] == 2


def _kill_during_open(root: Path, delay_s: float, capacity: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(CRASH_WRITER), str(root), "7", str(capacity), "--announce-open"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith(b"opening"), proc.communicate(timeout=30)[1].decode()[-2000:]
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def test_kill_9_during_the_first_open(tmp_path: Path) -> None:
    rng = random.Random(10)
    # Creating a store takes a few ms to a few tens of ms after "opening" (development VM):
    # kills every 2 ms land in each of its steps, and a few more during the first puts.
    delays = [i * 0.002 for i in range(24)] + [rng.uniform(0.05, 0.25) for _ in range(4)]
    for i, delay in enumerate(delays):
        root = tmp_path / f"s{i}"
        _kill_during_open(root, delay, CRASH_CAPACITY)

        async def reopen(root: Path = root) -> None:
            store = await DiskStore.open(LAYOUT, cfg(root, capacity_bytes=CRASH_CAPACITY))
            present = await store.keys()
            bufs = [np.zeros(PAGE, np.uint8) for _ in present]
            hits = await store.get(list(zip(present, bufs, strict=True)))
            for key, hit, buf in zip(present, hits, bufs, strict=True):
                assert not hit or np.array_equal(buf, page_payload(key, PAGE))
            assert await store.put([(k, page_payload(k, PAGE)) for k in keys_(2)]) == [True] * 2
            await store.close()

        asyncio.run(reopen())


def test_kill_9_while_rebuilding_the_index(tmp_path: Path) -> None:
    keys = make_store(tmp_path, n=600, deleted=0)
    rng = random.Random(11)
    for _ in range(6):
        os.truncate(tmp_path / "index" / "data.mdb", 4096)
        _kill_during_open(tmp_path, rng.uniform(0.0, 0.2), 64 << 20)
    out = open_in_child(tmp_path, keys)
    assert sorted(out["first"]["served"]) == sorted(keys)


# -- a path the process cannot write ------------------------------------------------------------
def test_a_path_under_a_file_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(StorageError, match=r"disk\.path") as info:
        DiskStore(LAYOUT, cfg(tmp_path / "file" / "store"))
    assert isinstance(info.value.__cause__, NotADirectoryError)


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot write, holding a store ("store"), an empty
    directory ("empty") and nothing else. Root ignores permission bits, so as root it is a
    read-only bind mount (skipped where mounting is not allowed)."""
    src = tmp_path / "src"
    src.mkdir()
    make_store(src / "store", n=3)
    (src / "empty").mkdir()
    if os.geteuid() != 0:
        for p in [src, *src.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
        yield src
        for p in [src, *src.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True,
                      check=False).returncode:
        pytest.skip("cannot make a read-only directory here (no bind mounts as root)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True,
                          check=False).returncode:
            pytest.skip("cannot remount a bind mount read-only here")
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=False)


@pytest.mark.parametrize("which", ["store", "empty", "new"])
def test_read_only_directory_is_a_storage_error(read_only_dir: Path, which: str) -> None:
    before = snapshot(read_only_dir)
    with pytest.raises(StorageError, match=r"disk\.path") as info:
        DiskStore(LAYOUT, cfg(read_only_dir / which))
    assert isinstance(info.value.__cause__, OSError)
    assert snapshot(read_only_dir) == before
    if which == "store":  # describing needs no write access
        assert describe(read_only_dir / which)["pages"] == 3


# -- arguments ----------------------------------------------------------------------------------
BAD_KEYS = [-1, 2**64, "abc", 1.0, True, None, float("nan"), b"\x01"]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_bad_keys_are_refused_before_anything_changes(tmp_path: Path, bad: Any) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        kept, new = keys_(3), keys_(1, start=100)[0]
        await store.put([(k, page_payload(k, PAGE)) for k in kept])
        before = (sorted(await store.keys()), dataclasses.asdict(store.stats()))
        payload = page_payload(new, PAGE)
        with pytest.raises(InvalidKeyError):
            await store.put([(new, payload), (bad, payload)])
        if bad is not None:  # a parent may be None (a block without one)
            with pytest.raises(InvalidKeyError):
                await store.put([(new, payload)], parents=[bad])
        with pytest.raises(InvalidKeyError):
            await store.get([(kept[0], np.zeros(PAGE, np.uint8)), (bad, np.zeros(PAGE, np.uint8))])
        with pytest.raises(InvalidKeyError):
            await store.exists([kept[0], bad])
        with pytest.raises(InvalidKeyError):
            await store.delete([kept[0], bad])
        assert (sorted(await store.keys()), dataclasses.asdict(store.stats())) == before
        await store.close()

    asyncio.run(body())


def test_numpy_integer_keys_are_their_value(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        key = keys_(1)[0]
        assert await store.put([(np.uint64(key), page_payload(key, PAGE))]) == [True]
        assert await store.exists([key]) == [True]
        assert await store.keys() == [key] and type((await store.keys())[0]) is int
        await store.close()

    asyncio.run(body())


def test_malformed_batches_are_refused(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        key = keys_(1)[0]
        payload = page_payload(key, PAGE)
        for items in ([key], [(key,)], [(key, payload, 1)], "abc", None, 5, {key: payload}):
            with pytest.raises(InvalidArgumentError):
                await store.put(items)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentError):
                await store.get(items)  # type: ignore[arg-type]
        for keys in (None, 5, "abc", {key}, {key: 1}):
            with pytest.raises(InvalidArgumentError):
                await store.exists(keys)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentError):
                await store.delete(keys)  # type: ignore[arg-type]
        for buf in (None, 5, "x" * PAGE):
            with pytest.raises(InvalidArgumentError):
                await store.put([(key, buf)])  # type: ignore[list-item]
        with pytest.raises(InvalidArgumentError):
            await store.put([(key, payload)], parents=[None, None])
        with pytest.raises(InvalidArgumentError):
            await store.put([(key, payload)], parents=5)  # type: ignore[arg-type]
        assert await store.keys() == [] and store.stats().puts == 0
        await store.close()

    asyncio.run(body())


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError):
        DiskStore("llama", cfg(tmp_path))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        DiskStore(LAYOUT, {"path": str(tmp_path)})  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        DiskStore(LAYOUT, cfg(tmp_path), listener=object())  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field", ["capacity_bytes", "slab_bytes", "io_threads",
                                   "io_chunk_bytes"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), -1, 0, 1.5,
                                   "1", True, None], ids=repr)
def test_config_numbers_must_be_positive_ints(tmp_path: Path, field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=field):
        cfg(tmp_path, **{field: value})


@pytest.mark.parametrize("path", ["", "a\0b", 5, None], ids=repr)
def test_config_path_must_be_a_path(path: Any) -> None:
    with pytest.raises(ConfigError, match=r"disk\.path"):
        DiskTierConfig(path=path, capacity_bytes=1 << 30)


def test_damage_is_found_where_no_checking_process_can_start(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Embedded interpreters may have no usable sys.executable: lmdb's verifier then runs
    # in this process (pure Python, plain reads: it cannot crash on the file).
    keys = make_store(tmp_path)
    os.truncate(tmp_path / "index" / "data.mdb", 3 * 4096)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        assert store.stats().index_rebuilds == 1
        assert set(keys) <= set(await store.keys())
        await store.close()

    asyncio.run(body())
