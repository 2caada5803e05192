"""Conformance suite of the :class:`kvbm.storage.PageStore` contract (storage/base.py).

Modelled on zarr-python's ``StoreTests``: a tier's test module subclasses
:class:`PageStoreTests`, says how to open a store and how to damage a stored page, and
inherits every test::

    class TestMyStore(PageStoreTests[MyStore]):
        async def open_store(self, layout, listener):
            return MyStore(layout, root=self.tmp_path / "store", listener=listener)

        async def corrupt(self, store, key):
            ...  # flip a byte of the stored page, tier-specific

Tests are plain synchronous pytest tests that drive a coroutine with ``asyncio.run``, so no
asyncio plugin is needed, and every test opens (and closes) its stores inside its own event
loop: a tier may bind loop-affine resources when it is opened.

Conventions the suite relies on (and thereby pins down where storage/base.py is silent):

* ``open_store`` may be called several times in one test; every call of one test opens the
  *same location* (so a ``PERSISTENT`` tier finds its pages again after ``close``), and
  different tests get fresh, empty locations (``self.tmp_path`` is per test).
* The store must hold at least ``2 * batch_pages`` pages of :attr:`PageStoreTests.layout`.
* ``TierStats`` counters count pages, not calls. A corrupt page counts as a miss *and* in
  ``corrupt``. An explicit ``delete`` is not reported to the listener (the caller knows).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar, cast

import numpy as np
import pytest

from kvbm.errors import LayoutError, LayoutMismatchError
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.storage.base import Capability, PageStore, RemovalReason, TierListener
from kvbm.storage.page import PageHeader, make_header, payload_checksum
from kvbm.testing.pages import (
    MASK64,
    TEST_LAYOUT,
    RecordingListener,
    U8Array,
    make_keys,
    page_payload,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

S = TypeVar("S", bound=PageStore)

def pairs(keys: Sequence[int], arrays: Sequence[U8Array]) -> list[tuple[int, Buffer]]:
    """``(key, array)`` items for ``put``/``get``. Arrays go in as they are; the cast only
    tells mypy what numpy's stubs declare for Python 3.12+ alone (the buffer protocol)."""
    return [(k, cast("Buffer", a)) for k, a in zip(keys, arrays, strict=True)]


StoreBody = Callable[[S, RecordingListener], Awaitable[None]]


class PageStoreTests(abc.ABC, Generic[S]):
    """Base class of every tier's conformance tests; see the module docstring."""

    #: Small pages (16 KiB) keep the suite fast; a subclass may choose another layout.
    layout: ClassVar[KVLayout] = TEST_LAYOUT
    #: Same page size, another fingerprint (another model).
    other_layout: ClassVar[KVLayout] = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64,
                                                block_size=16, dtype="float16",
                                                model_id="kvbm-conformance-other")
    #: Pages written by the batched tests.
    batch_pages: ClassVar[int] = 64

    #: A fresh directory per test (pytest's ``tmp_path``), for tiers that need one.
    tmp_path: Path

    @pytest.fixture(autouse=True)
    def _kvbm_bind_tmp_path(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    # -- what a tier's test class provides -------------------------------------------------
    @abc.abstractmethod
    async def open_store(self, layout: KVLayout, listener: TierListener | None) -> S:
        """Open a store on this test's location (see the module docstring)."""

    @abc.abstractmethod
    async def corrupt(self, store: S, key: int) -> None:
        """Damage the stored bytes of page ``key`` (present in ``store``) behind its back, the
        way the medium can (bit rot, torn write), so that its next ``get`` must fail
        verification."""

    async def plant_page(self, store: S, key: int, stored: bytes) -> None:
        """Optional: make ``stored`` (64-byte header + payload, storage/page.py's format) the
        stored bytes of page ``key``, present in ``store``, as a foreign writer could. Tests
        that need it are skipped when a tier does not provide it."""
        pytest.skip(f"{type(self).__name__} does not implement plant_page")

    # -- helpers ---------------------------------------------------------------------------
    def run(self, body: StoreBody[S], *, layout: KVLayout | None = None) -> None:
        """Open a store, run ``body(store, listener)`` in a fresh event loop, close it."""

        async def main() -> None:
            listener = RecordingListener()
            store = await self.open_store(layout or self.layout, listener)
            try:
                await body(store, listener)
            finally:
                await store.close()

        asyncio.run(main())

    make_keys = staticmethod(make_keys)

    def payload(self, key: int, salt: int = 0) -> U8Array:
        return page_payload(key, self.layout.bytes_per_block, salt=salt)

    def buffer(self) -> U8Array:
        return np.zeros(self.layout.bytes_per_block, dtype=np.uint8)

    async def put_pages(self, store: S, keys: Sequence[int]) -> None:
        assert await store.put(pairs(keys, [self.payload(k) for k in keys])) == [True] * len(keys)

    async def assert_served(self, store: S, keys: Sequence[int]) -> None:
        bufs = [self.buffer() for _ in keys]
        assert await store.get(pairs(keys, bufs)) == [True] * len(keys)
        for k, buf in zip(keys, bufs, strict=True):
            assert np.array_equal(buf, self.payload(k)), f"page {k:#x} came back different"

    # -- identity ----------------------------------------------------------------------------
    def test_identity(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            assert isinstance(store.medium, Medium)
            assert isinstance(store.capabilities, Capability)
            assert store.page_bytes == self.layout.bytes_per_block
            assert store.fingerprint == self.layout.fingerprint
            cap = store.capacity_bytes
            assert cap is None or cap >= 2 * self.batch_pages * store.page_bytes, \
                "the test store must hold 2 * batch_pages pages"
            assert store.used_bytes == 0
            assert await store.keys() == []

        self.run(body)

    def test_empty_batches(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            assert await store.put([]) == []
            assert await store.get([]) == []
            assert await store.exists([]) == []
            assert await store.delete([]) == 0

        self.run(body)

    # -- round trips -------------------------------------------------------------------------
    def test_round_trip_numpy(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            keys = self.make_keys(3)
            await self.put_pages(store, keys)
            await self.assert_served(store, keys)

        self.run(body)

    def test_round_trip_bytes_and_bytearray(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            k1, k2 = self.make_keys(2)
            p1, p2 = self.payload(k1).tobytes(), bytearray(self.payload(k2).tobytes())
            items: list[tuple[int, Buffer]] = [(k1, p1), (k2, p2)]
            assert await store.put(items) == [True, True]
            out1 = bytearray(store.page_bytes)
            out2 = bytearray(store.page_bytes)
            dests: list[tuple[int, Buffer]] = [(k1, out1), (k2, memoryview(out2))]
            assert await store.get(dests) == [True, True]
            assert out1 == p1
            assert out2 == p2

        self.run(body)

    def test_extreme_keys(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            keys = [0, 1, 1 << 63, MASK64]
            await self.put_pages(store, keys)
            assert sorted(await store.keys()) == sorted(keys)
            await self.assert_served(store, keys)

        self.run(body)

    def test_put_many_in_one_batch(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            keys = self.make_keys(self.batch_pages)
            await self.put_pages(store, keys)
            shuffled = list(keys)
            random.Random(7).shuffle(shuffled)
            await self.assert_served(store, shuffled)
            assert sorted(await store.keys()) == sorted(keys)

        self.run(body)

    def test_get_unknown_is_a_miss(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            known, unknown = self.make_keys(2)
            await self.put_pages(store, [known])
            bufs = [self.buffer(), self.buffer()]
            assert await store.get(pairs([unknown, known], bufs)) == [False, True]
            assert np.array_equal(bufs[1], self.payload(known))
            assert store.stats().corrupt == 0
            # Only a tier that reports definite misses says anything (storage/base.py).
            expected = ([unknown] if store.capabilities & Capability.REPORTS_MISSES else [])
            assert listener.removed(RemovalReason.MISSING) == expected
            assert len(listener.events) == len(expected)

        self.run(body)

    def test_mixed_hits_and_misses_keep_their_order(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            keys = self.make_keys(8)
            present = keys[::2]
            await self.put_pages(store, present)
            bufs = [self.buffer() for _ in keys]
            hits = await store.get(pairs(keys, bufs))
            assert hits == [k in present for k in keys]
            for k, buf in zip(keys, bufs, strict=True):
                if k in present:
                    assert np.array_equal(buf, self.payload(k))
            assert await store.exists(keys) == hits

        self.run(body)

    # -- create-only put ---------------------------------------------------------------------
    def test_put_is_create_only_and_idempotent(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            (k,) = self.make_keys(1)
            await self.put_pages(store, [k])
            before = store.stats().put_skipped
            assert await store.put(pairs([k], [self.payload(k, salt=1)])) == [True]
            assert store.stats().put_skipped == before + 1
            await self.assert_served(store, [k])  # the first payload, not the second
            assert store.used_bytes == store.page_bytes

        self.run(body)

    def test_duplicate_key_in_one_batch(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            (k,) = self.make_keys(1)
            first, second = self.payload(k), self.payload(k, salt=1)
            assert await store.put(pairs([k, k], [first, second])) == [True, True]
            buf = self.buffer()
            assert await store.get(pairs([k], [buf])) == [True]
            # Either one may win, but it must be one of them, whole.
            assert np.array_equal(buf, first) or np.array_equal(buf, second)
            assert await store.keys() == [k]
            assert store.used_bytes == store.page_bytes

        self.run(body)

    # -- exists / delete / keys --------------------------------------------------------------
    def test_exists_delete_keys(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            keys = self.make_keys(5)
            await self.put_pages(store, keys[:4])
            assert await store.exists(keys) == [True, True, True, True, False]
            assert await store.delete([keys[0], keys[1], keys[4]]) == 2
            assert store.stats().deleted == 2
            assert await store.exists(keys) == [False, False, True, True, False]
            assert sorted(await store.keys()) == sorted(keys[2:4])
            assert await store.get(pairs([keys[0]], [self.buffer()])) == [False]
            assert await store.delete([keys[0]]) == 0
            await self.assert_served(store, keys[2:4])
            # A delete the caller asked for is not reported; the miss on it only as MISSING.
            assert [e for e in listener.events if e[2] is not RemovalReason.MISSING] == []

        self.run(body)

    def test_put_again_after_delete(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            (k,) = self.make_keys(1)
            await self.put_pages(store, [k])
            assert await store.delete([k]) == 1
            new = self.payload(k, salt=2)
            assert await store.put(pairs([k], [new])) == [True]
            buf = self.buffer()
            assert await store.get(pairs([k], [buf])) == [True]
            assert np.array_equal(buf, new)

        self.run(body)

    # -- bad arguments -----------------------------------------------------------------------
    def test_wrong_payload_size_stores_nothing(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            good, bad = self.make_keys(2)
            for size in (store.page_bytes - 1, store.page_bytes + 1, 0):
                with pytest.raises(LayoutError):
                    await store.put(pairs([good, bad], [self.payload(good),
                                                       np.zeros(size, dtype=np.uint8)]))
                assert await store.exists([good, bad]) == [False, False]
                assert await store.keys() == []
                assert store.used_bytes == 0

        self.run(body)

    def test_wrong_buffer_size_on_get(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            (k,) = self.make_keys(1)
            await self.put_pages(store, [k])
            with pytest.raises(LayoutError):
                await store.get(pairs([k], [np.zeros(store.page_bytes - 1, dtype=np.uint8)]))
            await self.assert_served(store, [k])  # a caller's mistake is not corruption

        self.run(body)

    def test_read_only_buffer_on_get_drops_nothing(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            (k,) = self.make_keys(1)
            await self.put_pages(store, [k])
            frozen: list[tuple[int, Buffer]] = [(k, bytes(store.page_bytes))]
            # Refusing (preferred) or a miss are both fine; treating it as corruption is not.
            with contextlib.suppress(TypeError, ValueError):
                assert await store.get(frozen) == [False]
            assert store.stats().corrupt == 0
            assert listener.events == []
            await self.assert_served(store, [k])

        self.run(body)

    # -- verification ------------------------------------------------------------------------
    def test_corrupt_page_is_a_miss_and_dropped(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            bad, good = self.make_keys(2)
            await self.put_pages(store, [bad, good])
            await self.corrupt(store, bad)
            before = store.stats()
            corrupt0, misses0 = before.corrupt, before.misses
            bufs = [self.buffer(), self.buffer()]
            assert await store.get(pairs([bad, good], bufs)) == [False, True]
            assert np.array_equal(bufs[1], self.payload(good))
            assert store.stats().corrupt == corrupt0 + 1
            assert store.stats().misses == misses0 + 1
            assert listener.events == [(store.medium, [bad], RemovalReason.CORRUPT)]
            # The page is gone: not listed, not counted, and a second read is a plain miss.
            assert await store.exists([bad, good]) == [False, True]
            assert await store.keys() == [good]
            assert store.used_bytes == store.page_bytes
            assert await store.get(pairs([bad], [self.buffer()])) == [False]
            assert store.stats().corrupt == corrupt0 + 1
            assert listener.removed(RemovalReason.CORRUPT) == [bad]  # not reported again
            # The key can be stored again.
            await self.put_pages(store, [bad])
            await self.assert_served(store, [bad])

        self.run(body)

    def test_other_layout_is_never_served(self) -> None:
        (k,) = self.make_keys(1)

        async def write(store: S, listener: RecordingListener) -> None:
            await self.put_pages(store, [k])

        async def read_other(store: S, listener: RecordingListener) -> None:
            assert store.fingerprint == self.other_layout.fingerprint
            assert await store.get(pairs([k], [self.buffer()])) == [False]

        async def read_own(store: S, listener: RecordingListener) -> None:
            if Capability.PERSISTENT in store.capabilities:
                # Opening as another model must not have destroyed this model's pages.
                await self.assert_served(store, [k])

        assert self.other_layout.bytes_per_block == self.layout.bytes_per_block
        self.run(write)
        # Refusing the location outright is as good as a miss.
        with contextlib.suppress(LayoutMismatchError):
            self.run(read_other, layout=self.other_layout)
        self.run(read_own)

    def _planted(self, *, fingerprint: int, seq_hash: int, payload: U8Array,
                 declared_len: int | None = None) -> bytes:
        mv = memoryview(payload.tobytes())
        if declared_len is None:
            head = make_header(fingerprint, seq_hash, mv)
        else:
            head = PageHeader(fingerprint, seq_hash, declared_len, payload_checksum(mv)).pack()
        return head + payload.tobytes()

    def test_planted_foreign_pages_are_misses(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            k_layout, k_hash, k_good = self.make_keys(3)
            await self.put_pages(store, [k_layout, k_hash, k_good])
            # Valid pages in every respect but one: another model, another block.
            await self.plant_page(store, k_layout, self._planted(
                fingerprint=self.other_layout.fingerprint, seq_hash=k_layout,
                payload=self.payload(k_layout)))
            await self.plant_page(store, k_hash, self._planted(
                fingerprint=self.layout.fingerprint, seq_hash=k_good,
                payload=self.payload(k_good)))
            bufs = [self.buffer() for _ in range(3)]
            got = await store.get(pairs([k_layout, k_hash, k_good], bufs))
            assert got == [False, False, True]
            assert np.array_equal(bufs[2], self.payload(k_good))

        self.run(body)

    # -- accounting --------------------------------------------------------------------------
    def test_used_bytes_accounting(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            keys = self.make_keys(6)
            assert store.used_bytes == 0
            await self.put_pages(store, keys[:4])
            assert store.used_bytes == 4 * store.page_bytes
            await self.put_pages(store, keys[2:6])  # two new, two already present
            assert store.used_bytes == 6 * store.page_bytes
            assert await store.delete(keys[:3]) == 3
            assert store.used_bytes == 3 * store.page_bytes
            cap = store.capacity_bytes
            assert cap is None or store.used_bytes <= cap

        self.run(body)

    def test_stats_count_pages(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            a, b, c = self.make_keys(3)
            s0 = store.stats()
            puts0, put_bytes0, gets0 = s0.puts, s0.put_bytes, s0.gets
            hits0, misses0, get_bytes0 = s0.hits, s0.misses, s0.get_bytes
            await self.put_pages(store, [a, b])
            s = store.stats()
            assert (s.puts - puts0, s.put_bytes - put_bytes0) == (2, 2 * store.page_bytes)
            bufs = [self.buffer() for _ in range(3)]
            assert await store.get(pairs([a, b, c], bufs)) == [True, True, False]
            s = store.stats()
            assert s.gets - gets0 == 3
            assert (s.hits - hits0, s.misses - misses0) == (2, 1)
            assert s.get_bytes - get_bytes0 == 2 * store.page_bytes

        self.run(body)

    # -- concurrency -------------------------------------------------------------------------
    def test_concurrent_batches(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            groups = [self.make_keys(8, start=8 * i) for i in range(8)]
            await asyncio.gather(*(self.put_pages(store, g) for g in groups[:4]))
            # Reads of old pages race with writes of new ones.
            await asyncio.gather(*(self.assert_served(store, g) for g in groups[:4]),
                                 *(self.put_pages(store, g) for g in groups[4:]))
            await asyncio.gather(*(self.assert_served(store, g) for g in groups))
            assert len(await store.keys()) == 64

        self.run(body)

    # -- lifecycle ---------------------------------------------------------------------------
    def test_close_is_idempotent(self) -> None:
        async def body(store: S, listener: RecordingListener) -> None:
            await self.put_pages(store, self.make_keys(2))
            await store.close()

        self.run(body)  # run() closes a second time

    def test_reopen_finds_pages_when_persistent(self) -> None:
        keys = self.make_keys(5)

        async def write(store: S, listener: RecordingListener) -> None:
            if Capability.PERSISTENT not in store.capabilities:
                pytest.skip("tier is not PERSISTENT")
            await self.put_pages(store, keys)
            assert await store.delete([keys[0]]) == 1

        async def read(store: S, listener: RecordingListener) -> None:
            assert sorted(await store.keys()) == sorted(keys[1:])
            assert store.used_bytes == 4 * store.page_bytes
            await self.assert_served(store, keys[1:])
            assert await store.get(pairs([keys[0]], [self.buffer()])) == [False]

        self.run(write)
        self.run(read)
