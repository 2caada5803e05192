"""The GCS tier against gcp-storage-emulator: the PageStore conformance suite, the
object-store tests (tests/objstore_contract.py) and GCS specifics."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest
from objstore_contract import LAYOUT, ObjectStoreTests, buffers, keys, payloads
from objstore_servers import Fault, FaultProxy, ServerProcess, gcs_emulator

from kvbm.errors import ConfigError
from kvbm.layout import KVLayout
from kvbm.storage.base import TierListener
from kvbm.storage.objectstore import PACK_SUFFIX
from kvbm.storage.resilience import FaultKind
from kvbm.testing import PageStoreTests

storage = pytest.importorskip("google.cloud.storage")

from kvbm.storage.gcs import (  # noqa: E402
    GCSBackend,
    GCSStore,
    GCSTierConfig,
    crc32c_b64,
    without_bucket_lookups,
)


class TestGCSStore(ObjectStoreTests, PageStoreTests[GCSStore]):
    @pytest.fixture(autouse=True)
    def _bind_server(self, gcs_endpoint: str, gcs_bucket: str) -> None:
        self.endpoint = gcs_endpoint
        self.bucket_name = gcs_bucket
        # The raw clients skip the library's background lookups too (see the test below):
        # one left retrying against a stopped server would outlive its test.
        self.bucket = without_bucket_lookups(storage.Client()).bucket(gcs_bucket)

    def config(self, endpoint: str | None = None, index: str = "index",
               **kw: Any) -> GCSTierConfig:
        kw.setdefault("pack_bytes", self.pack_bytes)
        # The shared emulator is found through STORAGE_EMULATOR_HOST (set by the fixture),
        # as the library expects; a proxy or a private server is named explicitly.
        kw.setdefault("prefix", self.prefix)
        kw.setdefault("bucket", self.bucket_name)
        return GCSTierConfig(endpoint=endpoint, index_path=str(self.tmp_path / index), **kw)

    def store_for(self, layout: KVLayout, listener: TierListener | None, *,
                  endpoint: str | None = None, index: str = "index", **kw: Any) -> GCSStore:
        return GCSStore(layout, self.config(endpoint, index, **kw), listener=listener)

    def raw_create_bucket(self, name: str) -> None:
        self.bucket.client.create_bucket(name)

    def raw_delete_bucket(self, name: str) -> None:
        self.bucket.client.bucket(name).delete(force=True)

    def raw_read(self, key: str) -> bytes:
        data: bytes = self.bucket.blob(key).download_as_bytes()
        return data

    def raw_write(self, key: str, data: bytes) -> None:
        self.bucket.blob(key).upload_from_string(data)

    def raw_delete(self, key: str) -> None:
        self.bucket.blob(key).delete()

    def raw_list(self, prefix: str) -> list[str]:
        return [b.name for b in self.bucket.client.list_blobs(self.bucket_name, prefix=prefix)]

    def server_port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def own_server(self) -> ServerProcess:
        return gcs_emulator()

    def prepare_server(self, server: ServerProcess) -> None:
        client = without_bucket_lookups(
            storage.Client(client_options={"api_endpoint": server.endpoint}))
        client.create_bucket(self.bucket_name)

    # -- GCS specifics ---------------------------------------------------------------------
    def test_client_makes_no_background_bucket_lookups(self, proxy: FaultProxy) -> None:
        # google-cloud-storage 3.x looks each bucket up in a thread of its own (to label
        # tracing spans, even with tracing off) and retries that for minutes when the
        # endpoint goes away; the tier's clients must not. The proxy holds such a lookup,
        # so a thread that made one is still alive when the store is done.
        lookup = f"/b/{self.bucket_name}?"
        proxy.inject(Fault.HANG, methods=("GET",), match=lookup)

        async def body() -> None:
            store = self.store_for(LAYOUT, None, endpoint=proxy.endpoint, **self.fast())
            try:
                ks = keys(2)
                await store.put(list(zip(ks, payloads(ks), strict=True)))
                bufs = buffers(2)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True, True]
            finally:
                await store.close()

        asyncio.run(body())
        assert [t.name for t in threading.enumerate() if "_background" in t.name] == []
        assert [path for _, path in proxy.seen if lookup in path] == []

    def test_upload_carries_crc32c(self) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None)
            try:
                ks = keys(3)
                await store.put(list(zip(ks, payloads(ks), strict=True)))
                where = store.locate(ks[0])
                assert where is not None
                blob = self.bucket.get_blob(where[0])
                assert blob.crc32c == crc32c_b64(self.raw_read(where[0]))
            finally:
                await store.close()

        asyncio.run(body())

    def test_whole_pack_reads_are_crc32c_checked(self, proxy: FaultProxy) -> None:
        async def body() -> None:
            store = self.store_for(LAYOUT, None, endpoint=proxy.endpoint, **self.fast())
            try:
                ks = keys(2)
                await store.put(list(zip(ks, payloads(ks), strict=True)))
                proxy.inject(Fault.CORRUPT, count=1, methods=("GET",), match=PACK_SUFFIX)
                bufs = buffers(2)
                assert await store.get(list(zip(ks, bufs, strict=True))) == [True, True]
                assert np.array_equal(bufs[0], payloads(ks[:1])[0])
                # The library's CRC32C check caught it (a retry), before page verification.
                assert store.stats().extra["retries"] == 1
                assert store.stats().extra["reread"] == 0
            finally:
                await store.close()

        asyncio.run(body())

    def test_create_only_put(self) -> None:
        backend = GCSBackend(self.config())
        key = f"{self.prefix}probe"
        backend.put(key, bytearray(b"first"), create_only=True)
        try:
            backend.put(key, bytearray(b"second"), create_only=True)
        except Exception as e:  # real GCS: 412 for ifGenerationMatch=0 on an existing object
            assert backend.classify(e) is FaultKind.EXISTS
            assert self.raw_read(key) == b"first"
        else:
            # gcp-storage-emulator ignores ifGenerationMatch; the store stays correct anyway
            # because a pack's name is its content's hash (same name, same bytes).
            assert self.raw_read(key) == b"second"

    def test_classification(self) -> None:
        backend = GCSBackend(self.config())
        with pytest.raises(Exception) as err:
            backend.read(f"{self.prefix}absent", 0, 10, whole=False)
        assert backend.classify(err.value) is FaultKind.MISSING
        key = f"{self.prefix}short"
        self.raw_write(key, b"0123456789")
        assert backend.read(key, 5, 100, whole=False) == b"56789"
        assert backend.read(key, 0, 10, whole=True) == b"0123456789"

    def test_config(self) -> None:
        cfg = GCSTierConfig.from_env({"KVBM_GCS_BUCKET": "b1", "KVBM_GCS_PREFIX": "p/"},
                                     project="proj")
        assert (cfg.bucket, cfg.key_prefix, cfg.project) == ("b1", "p/", "proj")
        with pytest.raises(ConfigError):
            GCSTierConfig.from_env({})
        with pytest.raises(ConfigError):
            GCSTierConfig(bucket="b", anonymous=True, credentials_file="/x.json")
