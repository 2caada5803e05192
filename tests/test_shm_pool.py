"""The shared-memory host pool (G2 mapped by vLLM's scheduler and its workers): real files,
real processes started with multiprocessing's "spawn", only a name and a layout dict crossing."""

from __future__ import annotations

import mmap
import multiprocessing
import os
import secrets
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from kvbm import KVLayout
from kvbm.errors import (
    BlockIdError,
    BlockIdTypeError,
    ClosedError,
    ConfigError,
    InvalidArgumentError,
    LayoutMismatchError,
    StorageError,
)
from kvbm.memory import shm_file
from kvbm.memory.shm import SharedHostPool
from kvbm.memory.shm_file import HEADER, PoolHeader, pid_namespace, shm_directory
from kvbm.pool import DevicePool, HostPool, copy_blocks

#: 2 layers × 2 planes × 4 tokens × 2 heads × 8 dims × 2 bytes = 512-byte pages
LAYOUT = KVLayout(2, 2, 8, 4, "bfloat16", model_id="shm-test")
SPAWN = multiprocessing.get_context("spawn")
#: The longest a test waits for a child's message before failing (a guard against hangs).
WAIT_S = 120


def _pattern(slot: int, seed: int) -> bytes:
    return np.random.default_rng([seed, slot]).integers(
        0, 256, LAYOUT.bytes_per_block, dtype=np.uint8).tobytes()


def _prefix() -> str:
    return f"kvbmtest{secrets.token_hex(4)}"


def _files(prefix: str) -> set[str]:
    return {p.name for p in shm_directory().glob(f"{prefix}-*")}


def _recv(conn):
    assert conn.poll(WAIT_S), "the child process did not answer"
    return conn.recv()


# -- children (top level: spawn imports this module in the child) ---------------------------
def _child_attach_and_write(name: str, layout: dict, conn) -> None:
    pool = SharedHostPool.attach(name, KVLayout.from_dict(layout))
    seen = [bytes(pool.page(s)) for s in range(3)]
    tags = pool.tags.tolist()
    for slot in (3, 4):  # the writer's protocol: tag 0, copy, tag = hash
        pool.tags[slot, 0] = 0
        pool.page(slot)[:] = _pattern(slot, 2)
        pool.tags[slot, 0] = 1000 + slot
    pool.tags[4, 1] = 2**64 - 1
    pool.block_view(5).fill_(1.5)  # through the torch view
    pool.close()
    conn.send((seen, tags, pool.path.exists()))


#: Keeps a child's pool referenced to its end: only the exit handler can remove its file.
_KEEP: list[SharedHostPool] = []


def _child_create(prefix: str, how: str, conn) -> None:
    pool = SharedHostPool.create(LAYOUT, 2, prefix=prefix)
    _KEEP.append(pool)
    pool.page(1)[:] = _pattern(1, 9)
    conn.send(pool.name)
    if how == "killed":
        os._exit(0)  # no atexit, no finalizer: the file stays behind
    if how == "live":
        conn.recv()  # until told to go; then exits normally, without close()


# -- tests -----------------------------------------------------------------------------------
def test_pages_and_tags_cross_processes_both_ways():
    with SharedHostPool.create(LAYOUT, 6, tag_columns=2, prefix=_prefix()) as pool:
        assert pool.owner and pool.path == shm_directory() / pool.name
        assert pool.tags.shape == (6, 2) and pool.tags.dtype == np.uint64
        assert not pool.tags.any() and not pool.raw.numpy().any()  # zeroed
        for slot in range(3):
            pool.page(slot)[:] = _pattern(slot, 1)
            pool.tags[slot, 0] = 0xDEAD0000 + slot
        parent, child = SPAWN.Pipe()
        p = SPAWN.Process(target=_child_attach_and_write, args=(pool.name, LAYOUT.to_dict(),
                                                                 child))
        p.start()
        seen, tags, exists_after_attacher_close = _recv(parent)
        p.join(WAIT_S)
        assert p.exitcode == 0
        assert seen == [_pattern(s, 1) for s in range(3)]
        assert [t[0] for t in tags[:3]] == [0xDEAD0000 + s for s in range(3)]
        assert exists_after_attacher_close  # an attacher never removes the file
        for slot in (3, 4):
            assert bytes(pool.page(slot)) == _pattern(slot, 2)
            assert int(pool.tags[slot, 0]) == 1000 + slot
        assert int(pool.tags[4, 1]) == 2**64 - 1
        assert bool((pool.block_view(5) == 1.5).all())
        assert not pool.tags[5].any()
        path = pool.path
    assert not path.exists()  # the creator's close removes it


def test_two_mappings_in_one_process_share_bytes():
    with SharedHostPool.create(LAYOUT, 4, prefix=_prefix()) as a, \
            SharedHostPool.attach(a.name, LAYOUT) as b:
        assert not b.owner and b.num_blocks == 4 and b.tags.shape == (4, 1)
        b.page(2)[:] = _pattern(2, 3)
        b.tags[2, 0] = 77
        assert bytes(a.page(2)) == _pattern(2, 3) and int(a.tags[2, 0]) == 77
        assert a.raw.data_ptr() != b.raw.data_ptr()  # two mappings, one memory


def test_attach_with_another_layout_is_refused():
    with SharedHostPool.create(LAYOUT, 2, prefix=_prefix()) as pool:
        others = [KVLayout(2, 2, 16, 4, "bfloat16", model_id="shm-test"),  # page size
                  KVLayout(2, 2, 8, 4, "bfloat16", model_id="other"),  # same size, other model
                  KVLayout(2, 2, 8, 4, "float16", model_id="shm-test")]  # dtype
        for other in others:
            with pytest.raises(LayoutMismatchError, match="not of the given layout"):
                SharedHostPool.attach(pool.name, other)
        with pytest.raises(InvalidArgumentError, match="KVLayout"):
            SharedHostPool.attach(pool.name, LAYOUT.to_dict())  # type: ignore[arg-type]
        # the arrangement is not part of the page format
        alt = KVLayout.from_dict({**LAYOUT.to_dict(), "arrangement": "layer_separate"})
        SharedHostPool.attach(pool.name, alt).close()


def _write(name: str, data: bytes) -> Path:
    path = shm_directory() / name
    path.write_bytes(data)
    return path


def _header(**changes) -> bytes:
    h = PoolHeader.new(LAYOUT, 2, 1)
    fields = {**h.__dict__, **changes}
    return PoolHeader(**fields).pack()


def _repack(raw: bytes, version: int) -> bytes:
    body = bytearray(raw[:HEADER.size])
    struct.pack_into("<I", body, 8, version)
    return bytes(body) + struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(body)))


@pytest.mark.parametrize(("content", "match"), [
    (b"", "not a kvbm shared host pool"),
    (os.urandom(8192), "not a kvbm shared host pool"),
    (b"\x7fELF" + bytes(8188), "not a kvbm shared host pool"),
    ("flipped", "checksum"),
    ("version", "format version 2"),
    ("sizes", "do not add up"),
    ("short", "truncated"),
])
def test_garbage_short_or_foreign_files_are_refused(content, match):
    prefix = _prefix()
    name = f"{prefix}-file"
    good = _header()
    total = PoolHeader.new(LAYOUT, 2, 1).total_bytes
    data = {"flipped": good[:20] + bytes([good[20] ^ 1]) + good[21:] + bytes(total - len(good)),
            "version": _repack(good, 2) + bytes(total - len(good)),
            "sizes": _header(num_blocks=3) + bytes(total - len(good)),
            "short": good + bytes(total - len(good) - 1)}.get(content, content)
    path = _write(name, data)
    try:
        with pytest.raises(StorageError, match=match):
            SharedHostPool.attach(name, LAYOUT)
        assert path.read_bytes() == data  # refused, untouched
    finally:
        path.unlink()


def test_a_well_formed_file_attaches():
    # The control of the test above: the same construction, unaltered, is accepted.
    name = f"{_prefix()}-file"
    good = _header()
    path = _write(name, good + bytes(PoolHeader.new(LAYOUT, 2, 1).total_bytes - len(good)))
    try:
        with SharedHostPool.attach(name, LAYOUT) as pool:
            assert pool.num_blocks == 2 and not any(pool.page(1))
    finally:
        path.unlink()


def test_missing_files_links_and_bad_names_are_refused(tmp_path):
    with pytest.raises(StorageError, match="no shared host pool"):
        SharedHostPool.attach(f"{_prefix()}-none", LAYOUT)
    link = shm_directory() / f"{_prefix()}-link"
    with SharedHostPool.create(LAYOUT, 2, prefix=_prefix()) as pool:
        link.symlink_to(pool.path)
        try:
            with pytest.raises(StorageError, match="cannot open"):  # O_NOFOLLOW
                SharedHostPool.attach(link.name, LAYOUT)
        finally:
            link.unlink()
    for bad in ("", "../etc/passwd", "a/b", ".hidden", "-x", "x" * 256, "a\x00b", "a b", 5,
                None, b"kvbm"):
        with pytest.raises(InvalidArgumentError, match="name"):
            SharedHostPool.attach(bad, LAYOUT)  # type: ignore[arg-type]


def test_create_validates_everything_before_creating_anything():
    prefix = _prefix()
    bad_calls = [
        (ConfigError, dict(num_blocks=0)), (ConfigError, dict(num_blocks=-1)),
        (ConfigError, dict(num_blocks=True)), (ConfigError, dict(num_blocks=2.0)),
        (ConfigError, dict(num_blocks=1 << 50)),  # more than this machine holds
        (InvalidArgumentError, dict(tag_columns=0)),
        (InvalidArgumentError, dict(tag_columns=1025)),
        (InvalidArgumentError, dict(tag_columns=True)),
        (InvalidArgumentError, dict(tag_columns="2")),
        (InvalidArgumentError, dict(prefix="a/b")), (InvalidArgumentError, dict(prefix="")),
        (InvalidArgumentError, dict(prefix="-x")), (InvalidArgumentError, dict(prefix="x" * 65)),
        (InvalidArgumentError, dict(prefix=3)), (InvalidArgumentError, dict(pin_memory="yes")),
        (InvalidArgumentError, dict(layout={"num_layers": 2})),
    ]
    for exc, change in bad_calls:
        kw = {"layout": LAYOUT, "num_blocks": 2, "prefix": prefix, **change}
        with pytest.raises(exc):
            SharedHostPool.create(kw.pop("layout"), kw.pop("num_blocks"), **kw)
    with pytest.raises(ConfigError, match=r"lower host\.num_blocks"):
        SharedHostPool.create(LAYOUT, 1 << 50, prefix=prefix)
    with pytest.raises(InvalidArgumentError, match="create"):
        SharedHostPool(LAYOUT, 2)
    assert _files(prefix) == set()


def test_pin_memory_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    prefix = _prefix()
    with pytest.raises(ConfigError, match="needs CUDA"):
        SharedHostPool.create(LAYOUT, 2, prefix=prefix, pin_memory=True)
    assert _files(prefix) == set()
    with SharedHostPool.create(LAYOUT, 2, prefix=prefix) as pool:
        assert not pool.pinned
        with pytest.raises(ConfigError, match="needs CUDA"):
            SharedHostPool.attach(pool.name, LAYOUT, pin_memory=True)


def test_close_is_idempotent_and_guards_every_view():
    pool = SharedHostPool.create(LAYOUT, 3, prefix=_prefix())
    att = SharedHostPool.attach(pool.name, LAYOUT)
    held = pool.page(1)  # a view that outlives close(): stays readable, never dangles
    held[:] = _pattern(1, 4)
    att.close()
    att.close()
    assert pool.path.exists() and att.closed
    pool.close()
    pool.close()
    assert not pool.path.exists() and pool.closed
    assert bytes(held) == _pattern(1, 4)
    for p in (pool, att):
        with pytest.raises(ClosedError):
            p.page(0)
        with pytest.raises(ClosedError):
            p.block_view(0)
        for attr in ("raw", "buffer", "tags"):
            with pytest.raises(ClosedError):
                getattr(p, attr)
    with pytest.raises(StorageError, match="no shared host pool"):
        SharedHostPool.attach(pool.name, LAYOUT)


def test_explicit_unlink_keeps_mappings_but_stops_attaches():
    with SharedHostPool.create(LAYOUT, 2, prefix=_prefix()) as pool:
        att = SharedHostPool.attach(pool.name, LAYOUT)
        att.unlink()
        att.unlink()
        assert not pool.path.exists()
        att.page(0)[:] = _pattern(0, 5)
        assert bytes(pool.page(0)) == _pattern(0, 5)
        with pytest.raises(StorageError):
            SharedHostPool.attach(pool.name, LAYOUT)
        att.close()


def test_stale_files_of_dead_creators_are_swept_and_nothing_else():
    prefix = _prefix()
    conns, procs = {}, {}
    for how in ("live", "killed", "exited"):
        conns[how], child = SPAWN.Pipe()
        procs[how] = SPAWN.Process(target=_child_create, args=(prefix, how, child))
        procs[how].start()
    names = {how: _recv(c) for how, c in conns.items()}
    for how in ("killed", "exited"):
        procs[how].join(WAIT_S)
        assert procs[how].exitcode == 0
    assert not (shm_directory() / names["exited"]).exists()  # removed at its normal exit
    killed = shm_directory() / names["killed"]
    assert killed.exists()
    dead = procs["killed"].pid
    # Files the sweep must leave alone although the name fits and the pid is dead.
    good = PoolHeader.new(LAYOUT, 2, 1)
    foreign = {
        f"{prefix}-{dead}-{'0' * 16}": b"not a pool" * 100,  # not a pool file
        f"{prefix}-{dead}-{'1' * 16}": _header(creator_pidns=pid_namespace() + 1),  # other ns
        f"{prefix}-{dead}-{'2' * 16}": _header(creator_pid=dead + 1),  # header names another
        f"{prefix}x-{dead}-{'3' * 16}": killed.read_bytes(),  # another prefix
        f"{prefix}-{dead}-{'4' * 15}": killed.read_bytes(),  # not the pattern
    }
    assert good.creator_pid == os.getpid()
    paths = [_write(n, d) for n, d in foreign.items()]
    try:
        with SharedHostPool.create(LAYOUT, 2, prefix=prefix) as mine:
            assert not killed.exists()  # swept
            assert (shm_directory() / names["live"]).exists()  # its creator lives
            assert all(p.exists() for p in paths)
            assert mine.path.exists()
        conns["live"].send("go")
        procs["live"].join(WAIT_S)
        assert procs["live"].exitcode == 0
        assert not (shm_directory() / names["live"]).exists()
    finally:
        for p in paths:
            p.unlink(missing_ok=True)  # a broken sweep may have removed it
        for p in procs.values():
            if p.is_alive():
                p.kill()


def test_sweep_control_a_copy_of_a_stale_file_under_the_dead_pid_is_removed():
    # The control of the foreign-file cases: a valid header of this namespace naming a dead
    # pid, under the exact pattern, is removed.
    prefix = _prefix()
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{prefix}-{dead.pid}-{'a' * 16}"
    _write(name, _header(creator_pid=dead.pid))
    assert shm_file.sweep_stale(prefix) == [name]
    assert _files(prefix) == set()


def test_behaves_as_a_host_pool_of_the_same_layout():
    host = HostPool(LAYOUT, 4)
    with SharedHostPool.create(LAYOUT, 4, prefix=_prefix()) as pool:
        assert isinstance(pool, HostPool)
        assert pool.num_blocks == host.num_blocks == pool.allocator.num_slots
        assert pool.pinned == host.pinned
        for attr in ("raw", "buffer"):
            a, b = getattr(pool, attr), getattr(host, attr)
            assert (a.shape, a.dtype, a.stride(), a.device) == (b.shape, b.dtype, b.stride(),
                                                               b.device)
        assert pool.block_view(1).shape == host.block_view(1).shape
        assert len(pool.page(3)) == len(host.page(3)) == LAYOUT.bytes_per_block
        assert pool.raw.data_ptr() % mmap.PAGESIZE == 0  # O_DIRECT can use the pages
        pool.page(2)[:] = _pattern(2, 6)
        assert pool.raw[2].numpy().tobytes() == _pattern(2, 6)
        assert bytes(pool.block_view(2).view(torch.uint8).numpy().tobytes()) == _pattern(2, 6)
        for bad, exc in ((-1, BlockIdError), (4, BlockIdError), ("1", BlockIdTypeError),
                         (True, BlockIdTypeError)):
            with pytest.raises(exc):
                pool.page(bad)
            with pytest.raises(exc):
                pool.block_view(bad)
        # copies with the device tier go through buffer, as with a HostPool
        dev = DevicePool(LAYOUT, 4, "cpu")
        dev.block_view(0).fill_(2.0)
        copy_blocks(dev, [0], pool, [3])
        copy_blocks(pool, [2], dev, [1])
        assert bool((pool.block_view(3) == 2.0).all())
        assert dev.block_view(1).view(torch.uint8).numpy().tobytes() == _pattern(2, 6)
        assert pool.allocator.allocate(2) == host.allocator.allocate(2)


def test_falls_back_to_the_temporary_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(shm_file, "SHM_DIR", str(tmp_path / "absent"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    with SharedHostPool.create(LAYOUT, 2, prefix=_prefix()) as pool:
        assert pool.path.parent == tmp_path / "tmp"
        assert (pool.path.stat().st_mode & 0o777) == 0o600
        with SharedHostPool.attach(pool.name, LAYOUT) as att:
            att.page(1)[:] = _pattern(1, 7)
        assert bytes(pool.page(1)) == _pattern(1, 7)
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.gpu
def test_pinned_with_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with SharedHostPool.create(LAYOUT, 4, prefix=_prefix()) as pool, \
            SharedHostPool.attach(pool.name, LAYOUT) as att:
        assert pool.pinned and pool.raw.is_pinned() and att.pinned and att.raw.is_pinned()
        dev = DevicePool(LAYOUT, 4, "cuda")
        dev.block_view(0).fill_(3)
        copy_blocks(dev, [0], att, [1])
        assert bool((pool.block_view(1) == 3).all())
        copy_blocks(pool, [1], dev, [2])
        assert bool((dev.block_view(2) == 3).all())
    with SharedHostPool.create(LAYOUT, 4, prefix=_prefix()) as again:  # unregistered on close
        assert again.pinned
