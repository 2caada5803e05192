"""Tests every packed object-store tier (S3, GCS) passes beyond the PageStore contract:
packing, ranged reads, index rebuild, damaged packs, and fault handling against a real
server that is killed, or behind a proxy that returns errors, hangs, cuts or garbles replies.

A backend's test class mixes :class:`ObjectStoreTests` into ``PageStoreTests`` and supplies
the raw object access and servers (see tests/test_s3_store.py).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import mmap
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import msgpack
import numpy as np
import pytest
import xxhash
from objstore_servers import Fault, FaultProxy, ServerProcess

from kvbm.errors import (
    ConfigError,
    InvalidArgumentError,
    InvalidKeyError,
    LayoutError,
    TierUnavailableError,
)
from kvbm.layout import KVLayout
from kvbm.storage.base import RemovalReason, TierListener
from kvbm.storage.objectstore import PACK_SUFFIX, ObjectTierConfig, PackedObjectStore
from kvbm.storage.resilience import BreakerConfig, BreakerState, RetryPolicy
from kvbm.testing import RecordingListener, page_payload
from kvbm.testing import make_keys as keys

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16, dtype="float16",
                  model_id="kvbm-objstore-tests")
PAGE = LAYOUT.bytes_per_block

#: Fast fault handling, so the fault tests take a fraction of a second each.
FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05, deadline_s=5.0)
FAST_BREAKER = BreakerConfig(failure_threshold=3, cooldown_s=0.3, max_cooldown_s=1.0)
#: For the degraded-mode tests, which wait out a cool-down once or twice.
QUICK_BREAKER = BreakerConfig(failure_threshold=3, cooldown_s=0.1, max_cooldown_s=0.2)


def payloads(ks: list[int]) -> list[Any]:
    return [page_payload(k, PAGE) for k in ks]


def buffers(n: int) -> list[Any]:
    return [np.zeros(PAGE, dtype=np.uint8) for _ in range(n)]


class ObjectStoreTests(abc.ABC):
    """Mixed into a ``PageStoreTests`` subclass; the abstract methods name the backend."""

    tmp_path: Any
    #: 256 KiB packs hold 15 conformance pages: a batch of 64 spans several packs.
    pack_bytes = 256 * 1024

    # -- what a backend's test class provides ----------------------------------------------
    @abc.abstractmethod
    def store_for(self, layout: KVLayout, listener: TierListener | None, *,
                  endpoint: str | None = None, index: str = "index",
                  **config: Any) -> PackedObjectStore:
        """A store on this test's prefix, through ``endpoint`` (default: the shared server)."""

    @abc.abstractmethod
    def config(self, endpoint: str | None = None, index: str = "index",
               **kw: Any) -> ObjectTierConfig:
        """This backend's tier config on this test's prefix (``bucket=`` overrides)."""

    @abc.abstractmethod
    def raw_create_bucket(self, name: str) -> None:
        """Create a bucket on the shared server."""

    @abc.abstractmethod
    def raw_delete_bucket(self, name: str) -> None:
        """Delete a bucket of the shared server, and every object in it."""

    @abc.abstractmethod
    def raw_read(self, key: str) -> bytes: ...

    @abc.abstractmethod
    def raw_write(self, key: str, data: bytes) -> None: ...

    @abc.abstractmethod
    def raw_delete(self, key: str) -> None: ...

    @abc.abstractmethod
    def raw_list(self, prefix: str) -> list[str]: ...

    @abc.abstractmethod
    def server_port(self) -> int:
        """Port of the shared server (a proxy goes in front of it)."""

    @abc.abstractmethod
    def own_server(self) -> ServerProcess:
        """A fresh server of this backend, not started; :meth:`prepare_server` readies it."""

    @abc.abstractmethod
    def prepare_server(self, server: ServerProcess) -> None:
        """Create the bucket on a freshly (re)started server."""

    @property
    def prefix(self) -> str:
        return f"tests/{self.tmp_path.name}/"

    # -- the PageStoreTests hooks ----------------------------------------------------------
    async def open_store(self, layout: KVLayout, listener: TierListener | None
                         ) -> PackedObjectStore:
        return self.store_for(layout, listener)

    def _splice(self, store: PackedObjectStore, key: int, at: int, new: bytes) -> None:
        where = store.locate(key)
        assert where is not None, f"page {key:#x} is not stored"
        obj, offset, length = where
        assert at + len(new) <= length
        data = bytearray(self.raw_read(obj))
        data[offset + at: offset + at + len(new)] = new
        self.raw_write(obj, bytes(data))

    async def corrupt(self, store: PackedObjectStore, key: int) -> None:
        # Bit rot in the middle of the payload, the pack rewritten by someone else.
        where = store.locate(key)
        assert where is not None
        obj, offset, length = where
        data = bytearray(self.raw_read(obj))
        data[offset + length // 2] ^= 0x40
        self.raw_write(obj, bytes(data))

    async def plant_page(self, store: PackedObjectStore, key: int, stored: bytes) -> None:
        self._splice(store, key, 0, stored)

    # -- helpers ---------------------------------------------------------------------------
    @pytest.fixture
    def proxy(self) -> Iterator[FaultProxy]:
        p = FaultProxy(self.server_port(), hang_s=1.5, trickle_max_s=120.0)
        try:
            yield p
        finally:
            p.close()

    def fast(self, **kw: Any) -> dict[str, Any]:
        return {"retry": FAST_RETRY, "breaker": FAST_BREAKER, "connect_timeout_s": 0.5,
                "read_timeout_s": 0.5, "max_workers": 4, **kw}

    def packs(self, store: PackedObjectStore | None = None) -> list[str]:
        return [k for k in self.raw_list(self.prefix) if k.endswith(PACK_SUFFIX)]

    # -- packing ---------------------------------------------------------------------------
    def test_many_pages_few_requests(self) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None, pack_bytes=1 << 20)
            try:
                ks = keys(200)
                assert await store.put(list(zip(ks, payloads(ks), strict=True))) == [True] * 200
                per_pack = (1 << 20) // (PAGE + 64)
                n_packs = -(-200 // per_pack)
                assert store.stats().extra["packs_put"] == n_packs
                assert len(self.packs(store)) == n_packs
                bufs = buffers(200)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True] * 200
                # Adjacent pages of a pack are read with one request.
                assert store.stats().extra["ranged_gets"] == n_packs
                assert all(np.array_equal(b, p) for b, p in zip(bufs, payloads(ks),
                                                                strict=True))
            finally:
                await store.close()

        asyncio.run(body())

    def test_duplicate_get_destinations(self) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None)
            try:
                (k,) = keys(1)
                await store.put([(k, page_payload(k, PAGE))])
                a, b = buffers(2)
                assert await store.get([(k, a), (k, b)]) == [True, True]
                assert np.array_equal(a, b) and np.array_equal(a, page_payload(k, PAGE))
            finally:
                await store.close()

        asyncio.run(body())

    # -- damaged packs ---------------------------------------------------------------------
    def test_truncated_pack_serves_what_is_whole_and_drops_the_rest(self) -> None:
        async def body() -> None:
            listener = RecordingListener()
            store = self.store_for(LAYOUT, listener)
            try:
                ks = keys(6)
                await store.put(list(zip(ks, payloads(ks), strict=True)))
                (obj,) = self.packs(store)
                where = store.locate(ks[3])
                assert where is not None
                # Cut the pack in the middle of page 3: pages 0-2 are whole, 3-5 are not.
                self.raw_write(obj, self.raw_read(obj)[: where[1] + where[2] // 2])
                bufs = buffers(6)
                got = await store.get(list(zip(ks, bufs, strict=True)))
                assert got == [True] * 3 + [False] * 3
                for b, p in zip(bufs[:3], payloads(ks[:3]), strict=True):
                    assert np.array_equal(b, p)
                assert store.stats().corrupt == 3
                assert listener.removed(RemovalReason.CORRUPT) == ks[3:]
                assert sorted(await store.keys()) == sorted(ks[:3])
                assert store.used_bytes == 3 * PAGE
            finally:
                await store.close()

        asyncio.run(body())

    def test_get_of_an_unknown_page_is_reported_missing(self) -> None:
        async def body() -> None:
            listener = RecordingListener()
            store = self.store_for(LAYOUT, listener)
            try:
                ks = keys(3)
                await store.put([(ks[0], page_payload(ks[0], PAGE))])
                got = await store.get(list(zip(ks, buffers(3), strict=True)))
                assert got == [True, False, False]
                assert listener.removed(RemovalReason.MISSING) == ks[1:]
                assert listener.removed(RemovalReason.CORRUPT) == []
            finally:
                await store.close()

        asyncio.run(body())

    def test_lost_pack_drops_all_its_pages(self) -> None:
        async def body() -> None:
            listener = RecordingListener()
            store = self.store_for(LAYOUT, listener)
            try:
                ks = keys(4)
                await store.put(list(zip(ks, payloads(ks), strict=True)))
                (obj,) = self.packs(store)
                self.raw_delete(obj)
                assert await store.get([(ks[0], buffers(1)[0])]) == [False]
                # The other pages lived in the same object: gone too, reported at once.
                assert sorted(listener.removed(RemovalReason.CORRUPT)) == sorted(ks)
                assert await store.keys() == []
                assert await store.exists(ks) == [False] * 4
                assert store.used_bytes == 0
            finally:
                await store.close()

        asyncio.run(body())

    # -- index -----------------------------------------------------------------------------
    def test_rebuild_index_from_bucket(self) -> None:
        async def body() -> None:
            ks = keys(40)
            first = self.store_for(LAYOUT, None)
            other = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16,
                             dtype="float16", model_id="another-model")
            foreign = self.store_for(other, None, index="index-other")
            try:
                assert all(await first.put(list(zip(ks, payloads(ks), strict=True))))
                assert all(await foreign.put([(k, page_payload(k, PAGE, salt=9))
                                              for k in keys(3, start=100)]))
            finally:
                await first.close()
                await foreign.close()
            # A new machine: same bucket and prefix, empty local index.
            second = self.store_for(LAYOUT, None, index="index-fresh")
            try:
                assert sorted(await second.keys()) == sorted(ks)  # other model's not listed
                assert second.used_bytes == 40 * PAGE
                assert second.stats().extra["rebuilt_pages"] == 40
                bufs = buffers(40)
                assert await second.get(list(zip(ks, bufs, strict=True))) == [True] * 40
                assert all(np.array_equal(b, p) for b, p in zip(bufs, payloads(ks),
                                                                strict=True))
                assert await second.rebuild_index() == 0  # idempotent
            finally:
                await second.close()

        asyncio.run(body())

    def test_same_batch_from_two_writers_is_harmless(self) -> None:
        async def body() -> None:
            a = self.store_for(LAYOUT, None, index="index-a")
            b = self.store_for(LAYOUT, None, index="index-b")
            try:
                ks = keys(5)
                items = list(zip(ks, payloads(ks), strict=True))
                ra, rb = await asyncio.gather(a.put(items), b.put(items))
                assert ra == rb == [True] * 5
                # The pack's name is its content's hash: one object, written once or twice
                # with the same bytes, never a mix.
                assert len(self.packs(a)) == 1
                for s in (a, b):
                    bufs = buffers(5)
                    assert await s.get(list(zip(ks, bufs, strict=True))) == [True] * 5
                    assert all(np.array_equal(x, p) for x, p in zip(bufs, payloads(ks),
                                                                    strict=True))
            finally:
                await a.close()
                await b.close()

        asyncio.run(body())

    # -- faults through a proxy ------------------------------------------------------------
    def test_failed_upload_is_never_visible(self, proxy: FaultProxy) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None, endpoint=proxy.endpoint,
                                   **self.fast(breaker=BreakerConfig(failure_threshold=50)))
            try:
                ks = keys(3)
                proxy.inject(Fault.ERROR_500, methods=("PUT", "POST"))
                assert await store.put(list(zip(ks, payloads(ks), strict=True))) == [False] * 3
                s = store.stats()
                assert s.errors == 3 and s.puts == 0
                assert s.extra["retries"] == FAST_RETRY.max_attempts - 1
                assert await store.exists(ks) == [False] * 3
                assert await store.keys() == []
                assert store.used_bytes == 0
                proxy.clear()
                assert await store.put(list(zip(ks, payloads(ks), strict=True))) == [True] * 3
            finally:
                await store.close()

        asyncio.run(body())

    def test_transient_errors_are_retried(self, proxy: FaultProxy) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None, endpoint=proxy.endpoint, **self.fast())
            try:
                ks = keys(2)
                proxy.inject(Fault.ERROR_503, count=1, methods=("PUT", "POST"))
                assert await store.put(list(zip(ks, payloads(ks), strict=True))) == [True] * 2
                for fault in (Fault.ERROR_500, Fault.TRUNCATE, Fault.RESET):
                    proxy.inject(fault, count=1, methods=("GET",), match=PACK_SUFFIX)
                    bufs = buffers(2)
                    assert await store.get(list(zip(ks, bufs, strict=True))) == [True] * 2, fault
                    assert np.array_equal(bufs[1], page_payload(ks[1], PAGE))
                s = store.stats()
                assert s.extra["retries"] == 4 and proxy.injected == 4
                assert s.corrupt == 0 and s.errors == 0
                assert store.breaker.state is BreakerState.CLOSED
            finally:
                await store.close()

        asyncio.run(body())

    def test_garbled_transfer_is_read_again_not_dropped(self, proxy: FaultProxy) -> None:
        async def body() -> None:
            listener = RecordingListener()
            store = self.store_for(LAYOUT, listener, endpoint=proxy.endpoint, **self.fast())
            try:
                ks = keys(2)
                await store.put(list(zip(ks, payloads(ks), strict=True)))
                proxy.inject(Fault.CORRUPT, count=1, methods=("GET",), match=PACK_SUFFIX)
                bufs = buffers(2)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True, True]
                assert all(np.array_equal(b, p) for b, p in zip(bufs, payloads(ks),
                                                                strict=True))
                s = store.stats()
                # Caught by the object checksum (retried) or by the page check (re-read).
                assert s.extra["retries"] + s.extra["reread"] >= 1
                assert s.corrupt == 0 and listener.events == []
            finally:
                await store.close()

        asyncio.run(body())

    def test_hanging_server_times_out_into_misses(self, proxy: FaultProxy) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None, endpoint=proxy.endpoint, **self.fast(
                read_timeout_s=0.2, retry=RetryPolicy(max_attempts=2, base_delay_s=0.01)))
            try:
                ks = keys(2)
                await store.put(list(zip(ks, payloads(ks), strict=True)))
                proxy.inject(Fault.HANG, methods=("GET",), match=PACK_SUFFIX)
                assert await store.get(list(zip(ks, buffers(2), strict=True))) == [False] * 2
                assert proxy.injected == 2  # both pages in one ranged GET, tried twice
                assert store.stats().errors == 2 and store.stats().corrupt == 0
                proxy.clear()
                # The index was left alone: the pages are served once the server answers.
                assert await store.get(list(zip(ks, buffers(2), strict=True))) == [True] * 2
            finally:
                await store.close()

        asyncio.run(body())

    def test_a_server_that_trickles_its_answers_is_cut_off_at_the_deadline(
            self, proxy: FaultProxy) -> None:
        # Every read of the client gets a byte before its read timeout, and the answer never
        # ends: only the retry policy's deadline bounds the call.
        slow = self.fast(read_timeout_s=0.5, retry=RetryPolicy(
            max_attempts=2, base_delay_s=0.01, max_delay_s=0.02, deadline_s=0.8))

        async def body() -> None:
            store = self.store_for(LAYOUT, None, endpoint=proxy.endpoint, **slow)
            try:
                ks = keys(2)
                assert await store.put(list(zip(ks, payloads(ks), strict=True))) == [True] * 2
                proxy.inject(Fault.TRICKLE, methods=("GET",), match=PACK_SUFFIX)
                got = store.get(list(zip(ks, buffers(2), strict=True)))
                assert await asyncio.wait_for(got, 30) == [False] * 2
                assert store.stats().errors == 2 and store.stats().corrupt == 0
                proxy.clear()
                bufs = buffers(2)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True] * 2
                assert all(np.array_equal(b, p) for b, p in zip(bufs, payloads(ks),
                                                                strict=True))
            finally:
                await store.close()
            # The bucket check of an open, too.
            proxy.inject(Fault.TRICKLE, methods=("GET",))
            opening = asyncio.to_thread(self.store_for, LAYOUT, None, endpoint=proxy.endpoint,
                                        index="index-2", **slow)
            with pytest.raises(TierUnavailableError, match="does not answer"):
                await asyncio.wait_for(opening, 30)

        asyncio.run(body())

    def test_breaker_opens_fails_fast_and_rearms(self, proxy: FaultProxy) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None, endpoint=proxy.endpoint, **self.fast())
            try:
                ks = keys(4)
                await store.put(list(zip(ks[:2], payloads(ks[:2]), strict=True)))
                proxy.inject(Fault.RESET, match=PACK_SUFFIX)
                assert await store.get([(ks[0], buffers(1)[0])]) == [False]
                assert store.breaker.state is BreakerState.OPEN  # 3 failed attempts
                n_requests = len(proxy.seen)
                assert await store.get(list(zip(ks[:2], buffers(2), strict=True))) == [False] * 2
                assert await store.put([(ks[2], page_payload(ks[2], PAGE))]) == [False]
                assert await store.exists(ks[:2]) == [False, False]
                # Refused without a request (a client library's own requests aside).
                assert [p for _, p in proxy.seen[n_requests:] if PACK_SUFFIX in p] == []
                assert store.stats().extra["rejected_open"] == 3
                proxy.clear()
                await asyncio.sleep(FAST_BREAKER.cooldown_s + 0.05)
                # Half-open: the next call is the probe; it succeeds and closes the breaker.
                assert await store.get(list(zip(ks[:2], buffers(2), strict=True))) == [True] * 2
                assert store.breaker.state is BreakerState.CLOSED
                assert await store.put([(ks[2], page_payload(ks[2], PAGE))]) == [True]
            finally:
                await store.close()

        asyncio.run(body())

    # -- a real server killed mid-transfer -----------------------------------------------------
    def test_server_killed_mid_transfer(self) -> None:
        server = self.own_server()
        server.start()
        try:
            self.prepare_server(server)
            asyncio.run(self._killed_body(server))
        finally:
            server.stop()

    async def _killed_body(self, server: ServerProcess) -> None:
        big = KVLayout(num_layers=16, num_kv_heads=8, head_dim=128, block_size=16,
                       dtype="bfloat16", model_id="kill-test")  # 1 MiB pages
        page = big.bytes_per_block
        store = self.store_for(big, None, endpoint=server.endpoint, index="index-kill",
                               **self.fast(pack_bytes=8 << 20, max_workers=2,
                                           read_timeout_s=2.0))
        try:
            # 256 MiB: several times what the emulators take in the 50 ms before the kill,
            # so some packs are always still in flight when the server dies.
            ks = keys(256)
            items = [(k, page_payload(k, page)) for k in ks]
            put = asyncio.ensure_future(store.put(items))
            await asyncio.sleep(0.05)
            server.kill()
            # No exception, no hang (the bound only guards against one): what did not
            # land is False.
            got = await asyncio.wait_for(put, 60)
            assert False in got
            stored = [k for k, ok in zip(ks, got, strict=True) if ok]
            assert sorted(await store.keys()) == sorted(stored)
            # More calls against the dead server: each one that needs it fails, so the
            # breaker is open afterwards whether or not the put's failures opened it and
            # its cool-down has passed since (a probe then fails and re-opens it); then
            # calls fail fast. (Puts, not gets: a get of a page that never landed asks
            # nothing of the server.)
            for k in keys(3, start=5000):
                assert await store.put([(k, page_payload(k, page))]) == [False]
            assert store.breaker.state is BreakerState.OPEN
            rejected = store.stats().extra["rejected_open"]
            assert await store.put(items[:8]) == [False] * 8
            # refused by the open breaker without trying the dead server
            assert store.stats().extra["rejected_open"] == rejected + 8
            # A restarted (empty) server: after the cool-down a probe closes the breaker.
            server.start()
            self.prepare_server(server)
            await asyncio.sleep(FAST_BREAKER.max_cooldown_s + 0.05)
            fresh = keys(2, start=1000)
            assert await store.put([(k, page_payload(k, page)) for k in fresh]) == [True, True]
            assert store.breaker.state is BreakerState.CLOSED
            bufs = [np.zeros(page, dtype=np.uint8) for _ in range(2)]
            assert await store.get(list(zip(fresh, bufs, strict=True))) == [True, True]
        finally:
            await store.close()

    def test_an_outage_voids_what_the_store_saw_before_it(self) -> None:
        # Packs this process wrote are trusted by later puts without a request. A server
        # that went away and came back (empty: a restarted emulator, a restored bucket) may
        # not hold them any more: after an outage the breaker saw, they are checked again.
        server = self.own_server()
        server.start()
        try:
            self.prepare_server(server)
            asyncio.run(self._outage_body(server))
        finally:
            server.stop()

    async def _outage_body(self, server: ServerProcess) -> None:
        store = self.store_for(LAYOUT, None, endpoint=server.endpoint, index="index-outage",
                               **self.fast())
        try:
            ks = keys(8)
            items = list(zip(ks, payloads(ks), strict=True))
            assert await store.put(items) == [True] * 8
            server.kill()
            assert await store.get(list(zip(ks, buffers(8), strict=True))) == [False] * 8
            assert store.breaker.state is BreakerState.OPEN
            server.start()
            self.prepare_server(server)
            await asyncio.sleep(FAST_BREAKER.max_cooldown_s + 0.05)
            got = await store.put(items)
            hits = await store.get(list(zip(ks, buffers(8), strict=True)))
            claimed = [k for k, ok, hit in zip(ks, got, hits, strict=True) if ok and not hit]
            assert claimed == [], "put counted pages the restarted server does not hold"
            assert got == hits == [True] * 8
        finally:
            await store.close()

    # -- an index the bucket no longer backs (lifecycle expiry, a fresh server) ----------------
    async def _written_then_lost(self, ks: list[int], *, lose: int | None = None
                                 ) -> tuple[list[str], list[str]]:
        """Write ``ks`` through a store that is then closed, and delete its packs out of band
        (all of them, or only pack number ``lose``); returns the packs written and those
        deleted."""
        first = self.store_for(LAYOUT, None)
        try:
            assert await first.put(list(zip(ks, payloads(ks), strict=True))) == [True] * len(ks)
        finally:
            await first.close()
        packs = sorted(self.packs(first))
        assert len(packs) > 2
        lost = packs if lose is None else [packs[lose]]
        for obj in lost:
            self.raw_delete(obj)
        return packs, lost

    def test_put_does_not_trust_an_index_it_did_not_write(self) -> None:
        async def body() -> None:
            ks = keys(64)
            await self._written_then_lost(ks)
            assert self.packs() == []
            listener = RecordingListener()
            # The same local index, reopened: it lists all 64 pages; the bucket has none.
            store = self.store_for(LAYOUT, listener)
            try:
                # All but the first 4 pages (which share the first pack with others).
                again = ks[4:]
                got = await store.put(list(zip(again, payloads(again), strict=True)))
                assert got == [True] * 60
                assert store.stats().puts == 60  # really uploaded, not skipped
                assert self.packs() != []
                # The 4 pages not put again are gone: dropped and reported, not claimed.
                assert sorted(listener.removed(RemovalReason.MISSING)) == sorted(ks[:4])
                assert await store.exists(ks) == [False] * 4 + [True] * 60
                assert store.used_bytes == 60 * PAGE
            finally:
                await store.close()
            # Another machine (empty index) finds every page in the bucket and reads it.
            fresh = self.store_for(LAYOUT, None, index="index-fresh")
            try:
                assert sorted(await fresh.keys()) == sorted(again)
                bufs = buffers(60)
                assert await fresh.get(list(zip(again, bufs, strict=True))) == [True] * 60
                assert all(np.array_equal(b, p) for b, p in zip(bufs, payloads(again),
                                                                strict=True))
            finally:
                await fresh.close()

        asyncio.run(body())

    def test_put_checks_each_inherited_pack_once(self) -> None:
        async def body() -> None:
            ks = keys(64)
            written, (lost,) = await self._written_then_lost(ks, lose=0)
            store = self.store_for(LAYOUT, None)
            try:
                in_lost = [k for k in ks if (w := store.locate(k)) is not None and w[0] == lost]
                items = list(zip(ks, payloads(ks), strict=True))
                assert await store.put(items) == [True] * 64
                # One check per pack the index names; the lost one's pages were uploaded again.
                checks = store.stats().extra["pack_checks"]
                assert checks == len(written)
                assert store.stats().puts == len(in_lost)
                assert await store.put(items) == [True] * 64
                assert store.stats().extra["pack_checks"] == checks  # cached
                bufs = buffers(64)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True] * 64
            finally:
                await store.close()

        asyncio.run(body())

    def test_own_writes_need_no_check(self) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None)
            try:
                ks = keys(20)
                items = list(zip(ks, payloads(ks), strict=True))
                assert await store.put(items) == [True] * 20
                assert await store.put(items) == [True] * 20
                assert store.stats().extra["pack_checks"] == 0
                assert store.stats().put_skipped == 20
            finally:
                await store.close()

        asyncio.run(body())

    def test_read_miss_on_an_inherited_pack_drops_its_other_pages(self) -> None:
        async def body() -> None:
            ks = keys(64)
            _, (lost,) = await self._written_then_lost(ks, lose=1)
            listener = RecordingListener()
            store = self.store_for(LAYOUT, listener)
            try:
                in_lost = [k for k in ks if (w := store.locate(k)) is not None and w[0] == lost]
                assert len(in_lost) > 1
                assert await store.get([(in_lost[0], buffers(1)[0])]) == [False]
                assert sorted(listener.removed(RemovalReason.CORRUPT)) == sorted(in_lost)
                kept = [k for k in ks if k not in in_lost]
                assert await store.exists(in_lost) == [False] * len(in_lost)
                assert await store.exists(kept) == [True] * len(kept)
                assert sorted(await store.keys()) == sorted(kept)
                bufs = buffers(len(kept))
                assert await store.get(list(zip(kept, bufs, strict=True))) == [True] * len(kept)
                assert store.stats().errors == 0
            finally:
                await store.close()

        asyncio.run(body())

    # -- the bucket is checked at open -----------------------------------------------------
    def test_missing_bucket_fails_at_open(self) -> None:
        name = f"kvbm-absent-{uuid.uuid4().hex[:12]}"
        with pytest.raises(TierUnavailableError) as err:
            self.store_for(LAYOUT, None, bucket=name, **self.fast())
        msg = str(err.value)
        assert name in msg and "start_degraded" in msg
        # Said once: the bucket, its endpoint and the fix are not repeated.
        assert msg.count(name) == 1 and msg.count("does not exist") == 1, msg
        assert not (self.tmp_path / "index").exists()  # nothing created

    def test_missing_bucket_degraded_start(self, caplog: pytest.LogCaptureFixture) -> None:
        name = f"kvbm-late-{uuid.uuid4().hex[:12]}"

        async def body() -> None:
            listener = RecordingListener()
            with caplog.at_level(logging.WARNING, logger="kvbm.storage.objectstore"):
                store = self.store_for(LAYOUT, listener, bucket=name, start_degraded=True,
                                       **self.fast(breaker=QUICK_BREAKER))
            try:
                assert any(name in r.getMessage() and r.levelno >= logging.WARNING
                           for r in caplog.records)
                assert store.stats().degraded == 1
                ks = keys(3)
                items = list(zip(ks, payloads(ks), strict=True))
                assert await store.put(items) == [False] * 3
                assert await store.get(list(zip(ks, buffers(3), strict=True))) == [False] * 3
                assert await store.exists(ks) == [False] * 3
                assert listener.events == []  # unavailable, not missing
                self.raw_create_bucket(name)
                await asyncio.sleep(QUICK_BREAKER.max_cooldown_s + 0.05)
                assert await store.put(items) == [True] * 3
                assert store.stats().degraded == 0
                bufs = buffers(3)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True] * 3
                assert np.array_equal(bufs[2], page_payload(ks[2], PAGE))
            finally:
                await store.close()

        asyncio.run(body())

    def test_bucket_deleted_while_open_degrades(self, caplog: pytest.LogCaptureFixture
                                                 ) -> None:
        name = f"kvbm-gone-{uuid.uuid4().hex[:12]}"
        self.raw_create_bucket(name)

        async def body() -> None:
            store = self.store_for(LAYOUT, None, bucket=name,
                                   **self.fast(breaker=QUICK_BREAKER))
            try:
                ks = keys(4)
                items = list(zip(ks, payloads(ks), strict=True))
                assert await store.put(items[:2]) == [True] * 2
                assert store.stats().degraded == 0
                self.raw_delete_bucket(name)
                with caplog.at_level(logging.WARNING, logger="kvbm.storage.objectstore"):
                    assert await store.put(items[2:]) == [False] * 2
                assert store.stats().degraded == 1
                assert any("UNAVAILABLE" in r.getMessage() and name in r.getMessage()
                           for r in caplog.records)
                # Degraded: refused at once, no request (no second failed upload counted).
                errors = store.stats().errors
                assert await store.put(items[2:]) == [False] * 2
                assert store.stats().errors == errors
                self.raw_create_bucket(name)
                await asyncio.sleep(QUICK_BREAKER.max_cooldown_s + 0.05)
                assert await store.put(items[2:]) == [True] * 2
                assert store.stats().degraded == 0
            finally:
                await store.close()

        asyncio.run(body())

    # -- input validation ------------------------------------------------------------------
    def test_bad_keys_change_nothing(self) -> None:
        async def body() -> None:
            listener = RecordingListener()
            store = self.store_for(LAYOUT, listener)
            try:
                (k,) = keys(1)
                await store.put([(k, page_payload(k, PAGE))])
                before = (store.stats().puts, store.stats().deleted, sorted(self.packs()))
                for bad in (-1, 2**64, "abc", 1.5, None, True):
                    with pytest.raises(InvalidKeyError):
                        await store.put([(k, page_payload(k, PAGE)),
                                         (bad, page_payload(1, PAGE))])  # type: ignore[list-item]
                    with pytest.raises(InvalidKeyError):
                        await store.get([(k, buffers(1)[0]), (bad, buffers(1)[0])])  # type: ignore[list-item]
                    with pytest.raises(InvalidKeyError):
                        await store.exists([k, bad])  # type: ignore[list-item]
                    with pytest.raises(InvalidKeyError):
                        await store.delete([k, bad])  # type: ignore[list-item]
                    if bad is not None:  # None: a block without a parent
                        with pytest.raises(InvalidKeyError):
                            await store.put([(keys(1, start=7)[0], page_payload(1, PAGE))],
                                            parents=[bad])  # type: ignore[list-item]
                after = (store.stats().puts, store.stats().deleted, sorted(self.packs()))
                assert after == before and listener.events == []
                assert await store.exists([k]) == [True]
            finally:
                await store.close()

        asyncio.run(body())

    def test_read_only_buffer_is_a_layout_error(self) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None)
            try:
                (k,) = keys(1)
                await store.put([(k, page_payload(k, PAGE))])
                with pytest.raises(LayoutError):
                    await store.get([(k, bytes(PAGE))])
                assert store.stats().gets == 0
            finally:
                await store.close()

        asyncio.run(body())

    @pytest.mark.parametrize(("field", "value"), [
        ("pack_bytes", 0), ("pack_bytes", 1.5), ("pack_bytes", True), ("pack_bytes", 6 << 30),
        ("max_read_bytes", 0), ("max_read_bytes", float("nan")),
        ("index_map_bytes", 0), ("index_map_bytes", 1 << 70),
        ("max_workers", 0), ("max_workers", 10**6), ("max_workers", float("inf")),
        ("connect_timeout_s", float("nan")), ("connect_timeout_s", float("inf")),
        ("connect_timeout_s", 0.0), ("connect_timeout_s", "2"), ("connect_timeout_s", True),
        ("read_timeout_s", float("nan")), ("read_timeout_s", float("inf")),
        ("read_timeout_s", -1.0), ("read_timeout_s", 1e300),
        ("pack_check_interval_s", float("nan")), ("pack_check_interval_s", float("inf")),
        ("pack_check_interval_s", -1.0),
        ("retry", None), ("breaker", {"cooldown_s": 1.0}), ("prefix", 5),
        ("start_degraded", "yes"), ("conditional_writes", 1), ("rebuild_if_empty", None),
    ])
    def test_bad_config_values(self, field: str, value: Any) -> None:
        with pytest.raises(ConfigError):
            self.config(**{field: value})

    # -- found by the storage sweep: damage a reader cannot tell from data --------------------
    async def _two_batches(self, index: str) -> tuple[list[int], list[int], str, str]:
        """Two batches of 4 pages, one pack each (of the same size); their keys and packs."""
        store = self.store_for(LAYOUT, None, index=index)
        try:
            first, second = keys(4), keys(4, start=50)
            assert await store.put(list(zip(first, payloads(first), strict=True))) == [True] * 4
            (p1,) = self.packs()
            assert await store.put(list(zip(second, payloads(second), strict=True))) == [True] * 4
            (p2,) = [p for p in self.packs() if p != p1]
        finally:
            await store.close()
        return first, second, p1, p2

    def test_pages_filed_at_one_place_are_never_served_for_each_other(self) -> None:
        # A pack object replaced out of band by another one (here the second batch's bytes
        # under the first batch's name), then indexed by a rebuild: the index maps a page of
        # each batch to the same (pack, offset). A get of both must verify each page under
        # its own key, not read the place once and hand the bytes to both.
        async def body() -> None:
            first, second, p1, p2 = await self._two_batches("index-a")
            self.raw_write(p1, self.raw_read(p2))
            self.raw_delete(p2)
            store = self.store_for(LAYOUT, None, index="index-b")
            try:
                assert sorted(await store.keys()) == sorted(second)  # rebuilt: all in p1
                for ks in (first + second, second + first):
                    # The first batch again: its pack has the name p1 (a name is its
                    # content's hash), whatever the bucket now holds under it.
                    await store.put(list(zip(first, payloads(first), strict=True)))
                    bufs = buffers(8)
                    hits = await store.get(list(zip(ks, bufs, strict=True)))
                    wrong = [k for k, hit, b in zip(ks, hits, bufs, strict=True)
                             if hit and not np.array_equal(b, page_payload(k, PAGE))]
                    assert wrong == [], "a page was served under another page's key"
            finally:
                await store.close()

        asyncio.run(body())

    @pytest.mark.parametrize("damage", ["truncated", "empty", "same_size"])
    def test_a_put_replaces_a_damaged_pack_of_the_same_name(self, damage: str) -> None:
        # Every page of a pack is found damaged and dropped; putting the same batch again
        # builds a pack of the same name. Uploads are create-only, so the damaged object is
        # still there: the put must not count it as stored.
        async def body() -> None:
            store = self.store_for(LAYOUT, None)
            try:
                ks = keys(4)
                items = list(zip(ks, payloads(ks), strict=True))
                assert await store.put(items) == [True] * 4
                (obj,) = self.packs()
                data = self.raw_read(obj)
                self.raw_write(obj, {"truncated": data[:100], "empty": b"",
                                     "same_size": bytes(len(data))}[damage])
                assert await store.get(list(zip(ks, buffers(4), strict=True))) == [False] * 4
                assert await store.keys() == []
                assert await store.put(items) == [True] * 4
                bufs = buffers(4)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True] * 4
                assert all(np.array_equal(b, p) for b, p in zip(bufs, payloads(ks),
                                                                strict=True))
                assert self.raw_read(obj) == data
            finally:
                await store.close()

        asyncio.run(body())

    @pytest.mark.parametrize("damage", ["garbage", "another_pack"])
    def test_a_new_store_does_not_take_an_object_of_its_packs_name_on_trust(
            self, damage: str) -> None:
        # What a store that never read the object finds: the same batch builds a pack of the
        # same name, the create-only upload finds an object there of the same size, which
        # the index rebuild skipped (garbage) or took for what it is (another pack's bytes).
        async def body() -> None:
            first, _, p1, p2 = await self._two_batches("index-a")
            data = self.raw_read(p1)
            assert len(self.raw_read(p2)) == len(data)
            self.raw_write(p1, bytes(len(data)) if damage == "garbage" else self.raw_read(p2))
            store = self.store_for(LAYOUT, None, index="index-b")
            try:
                items = list(zip(first, payloads(first), strict=True))
                assert await store.put(items) == [True] * 4
                bufs = buffers(4)
                assert await store.get(list(zip(first, bufs, strict=True))) == [True] * 4
                assert all(np.array_equal(b, p) for b, p in zip(bufs, payloads(first),
                                                                strict=True))
                assert self.raw_read(p1) == data
            finally:
                await store.close()

        asyncio.run(body())

    def test_a_put_never_claims_pages_its_own_upload_just_overwrote(self) -> None:
        # The second batch's pack lives on only under the first batch's name (replaced out
        # of band), and a rebuild indexed it there. A put of both batches counts the second
        # one as stored, then uploads the first one's pack over that very object.
        async def body() -> None:
            first, second, p1, p2 = await self._two_batches("index-a")
            self.raw_write(p1, self.raw_read(p2))
            self.raw_delete(p2)
            listener = RecordingListener()
            store = self.store_for(LAYOUT, listener, index="index-b")
            try:
                assert sorted(await store.keys()) == sorted(second)
                ks = first + second
                got = await store.put(list(zip(ks, payloads(ks), strict=True)))
                hits = await store.get(list(zip(ks, buffers(8), strict=True)))
                claimed = [k for k, ok, hit in zip(ks, got, hits, strict=True) if ok and not hit]
                assert claimed == [], "put reported pages stored that the bucket lacks"
                assert got[:4] == [True] * 4
                assert sorted(listener.removed(RemovalReason.CORRUPT)) == sorted(second)
                # Put again, they are stored again.
                assert await store.put(list(zip(second, payloads(second), strict=True))) \
                    == [True] * 4
                assert await store.get(list(zip(second, buffers(4), strict=True))) == [True] * 4
            finally:
                await store.close()

        asyncio.run(body())

    @staticmethod
    def _crafted_pack(fingerprint: int, entries: Any, *, manifest: bytes | None = None,
                      body: bytes = b"") -> bytes:
        """A pack whose trailer and manifest checksum are valid, whatever the manifest says
        (another writer's bug, or a hostile bucket)."""
        raw = msgpack.packb([1, fingerprint, entries]) if manifest is None else manifest
        return body + raw + struct.pack("<8sQQ", b"KVBMPACK", len(raw),
                                        xxhash.xxh3_64_intdigest(raw))

    def test_rebuild_skips_manifests_that_make_no_sense(self) -> None:
        async def body() -> None:
            ks = keys(6)
            first = self.store_for(LAYOUT, None)
            try:
                assert await first.put(list(zip(ks, payloads(ks), strict=True))) == [True] * 6
            finally:
                await first.close()
            fp = LAYOUT.fingerprint
            folder = f"{self.prefix}{fp:016x}/"
            page = PAGE + 64
            body_ = bytes(page)
            crafted = [
                [[-1, 0, page]], [[7, -64, page]], [[2**64 - 1, 2**64 - page, page]],
                [[1.5, 0, page]], [["12", 0, page]], [[[1], 0, page]], [[1, 0]], {"a": 1},
                None, [[True, 0, page]], [[9, 0, page]] * 2 + [[10, page * 3, page]],
                [[11, 0, page]] * 5_000,
            ]
            blobs = [self._crafted_pack(fp, e, body=body_) for e in crafted]
            blobs += [self._crafted_pack(fp, None, manifest=m) for m in
                      (msgpack.packb(5), msgpack.packb([1, fp]), b"\xc1\xc1",
                       msgpack.packb([1, "fp", []]), msgpack.packb([1, -5, []]),
                       b"\x91" * 50_000)]
            for i, blob in enumerate(blobs):
                self.raw_write(f"{folder}{uuid.UUID(int=i + 1).hex}{PACK_SUFFIX}", blob)
            store = self.store_for(LAYOUT, None, index="index-fresh")
            try:
                assert await store.rebuild_index() == 6
                assert sorted(await store.keys()) == sorted(ks)
                bufs = buffers(6)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True] * 6
            finally:
                await store.close()
            # The rebuild a first call runs on its own also gets through (it is not tried
            # again and again, listing the bucket on every call).
            implicit = self.store_for(LAYOUT, None, index="index-implicit")
            try:
                assert await implicit.exists(ks) == [True] * 6
                lists = implicit.stats().extra["rebuilt_pages"]
                assert await implicit.exists(ks) == [True] * 6
                assert implicit.stats().extra["rebuilt_pages"] == lists == 6
            finally:
                await implicit.close()

        asyncio.run(body())

    def test_bad_constructor_arguments(self) -> None:
        store = self.store_for(LAYOUT, None)
        asyncio.run(store.close())
        cls: Any = type(store)
        good = self.config()

        class NoListener:
            pass

        for args, kw in [((None, good), {}), (("layout", good), {}), ((LAYOUT, None), {}),
                         ((LAYOUT, {"bucket": "b"}), {}),
                         ((LAYOUT, good), {"listener": NoListener()}),
                         ((LAYOUT, good), {"listener": 5})]:
            with pytest.raises(InvalidArgumentError):
                cls(*args, **kw)

    def test_malformed_batches_are_refused_before_anything_changes(self) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None)
            try:
                ks = keys(2)
                assert await store.put(list(zip(ks, payloads(ks), strict=True))) == [True] * 2
                before = (sorted(await store.keys()), store.stats().puts, self.packs())
                closed = mmap.mmap(-1, PAGE)
                closed.close()
                (new,) = keys(1, start=99)
                calls: list[Any] = []
                for batch in (None, 5, "ab", b"ab", {1: 2}, {1}, [(1, 2, 3)], [None]):
                    calls += [store.put(batch), store.get(batch), store.exists(batch),
                              store.delete(batch)]
                for parents in (5, "ab", {0: None}, {None}, []):
                    calls.append(store.put([(new, payloads([new])[0])], parents=parents))
                calls += [store.put([(new, closed)]), store.get([(ks[0], closed)])]
                for call in calls:
                    with pytest.raises(InvalidArgumentError):
                        await call
                assert (sorted(await store.keys()), store.stats().puts, self.packs()) == before
            finally:
                await store.close()

        asyncio.run(body())
