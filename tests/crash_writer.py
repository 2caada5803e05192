"""Child process of the kill -9 test in test_disk_store.py (run as a script, never imported).

Usage: ``python crash_writer.py ROOT SEED CAPACITY_BYTES [--announce-open]``. Opens the disk
store at ROOT and writes pages forever from three concurrent writers, with an occasional
delete. Protocol on stdout, one whole line per event, flushed at once:

* ``opening`` (with ``--announce-open`` only) when everything is imported and the store is
  about to be opened, so that the parent can kill -9 the open itself
  (tests/test_disk_damage.py);
* ``ready`` once the store is open;
* ``ok KEY... end`` when a put returned, listing the keys it reported stored;
* ``gone KEY... end`` *before* pages are deleted (the delete may or may not have reached
  the disk when the parent kills us), and when the store evicts pages. The parent sizes
  the store so that it never evicts: an eviction can commit before its line is written.

Each line is one ``write`` of less than PIPE_BUF bytes, so it reaches the pipe whole or
not at all.

Payloads are ``kvbm.testing.page_payload(key, ...)``, so the parent can check bytes. Some
puts hand them over from page-aligned memory, some from ``bytes`` and some mixed, so that a
kill lands in both of the store's write paths: zero-copy O_DIRECT from the caller's buffer,
and copy-through-staging (storage/disk/runs.py).
"""

from __future__ import annotations

import asyncio
import mmap
import random
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from kvbm.medium import Medium
from kvbm.storage.base import RemovalReason
from kvbm.storage.disk import DiskStore, DiskTierConfig
from kvbm.testing import TEST_LAYOUT, make_keys, page_payload

_out = threading.Lock()


def emit(tag: str, keys: Sequence[int]) -> None:
    line = f"{tag} {' '.join(f'{k:x}' for k in keys)} end\n"
    with _out:
        sys.stdout.write(line)
        sys.stdout.flush()


class Listener:
    def on_removed(self, medium: Medium, keys: Sequence[int], reason: RemovalReason) -> None:
        emit("gone", keys)


def config(root: Path, capacity: int) -> DiskTierConfig:
    return DiskTierConfig(root, capacity, slab_bytes=4 << 20, eviction="lru")


def payloads(keys: Sequence[int], page_bytes: int, mode: int) -> list[memoryview]:
    """The keys' payloads: ``mode`` 0 as ``bytes`` (staged), 1 each in its own slice of a
    page-aligned anonymous mapping (zero-copy), 2 alternating the two within the put."""
    out = [memoryview(page_payload(k, page_bytes)) for k in keys]
    if mode == 0:
        return out
    aligned = mmap.mmap(-1, len(keys) * page_bytes)  # page-aligned by construction
    view = memoryview(aligned)
    for j, data in enumerate(out):
        if mode == 1 or j % 2 == 0:
            view[j * page_bytes:(j + 1) * page_bytes] = data
            out[j] = view[j * page_bytes:(j + 1) * page_bytes]
    return out


async def writer(store: DiskStore, seed: int, lane: int) -> None:
    rng = random.Random(seed * 31 + lane)
    layout = TEST_LAYOUT
    counter = 0
    mine: list[int] = []
    while True:
        n = rng.choice([1, 2, 8, 32, 64])
        keys = make_keys(n, start=(seed * 8 + lane) * 1_000_000 + counter)
        counter += n
        bufs = payloads(keys, layout.bytes_per_block, rng.randrange(3))
        got = await store.put(list(zip(keys, bufs, strict=True)))
        stored = [k for k, ok in zip(keys, got, strict=True) if ok]
        emit("ok", stored)
        mine += stored
        if mine and rng.random() < 0.1:
            doomed = rng.sample(mine, min(len(mine), 4))
            emit("gone", doomed)
            await store.delete(doomed)
            mine = [k for k in mine if k not in doomed]


async def main(root: Path, seed: int, capacity: int, announce: bool) -> None:
    if announce:
        with _out:
            sys.stdout.write("opening\n")
            sys.stdout.flush()
    store = await DiskStore.open(TEST_LAYOUT, config(root, capacity),
                                 listener=Listener())
    with _out:
        sys.stdout.write("ready\n")
        sys.stdout.flush()
    await asyncio.gather(*(writer(store, seed, lane) for lane in range(3)))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                     "--announce-open" in sys.argv[4:]))
