"""The S3 tier against a moto server: the PageStore conformance suite, the object-store
tests (tests/objstore_contract.py) and S3 specifics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from objstore_contract import LAYOUT, ObjectStoreTests
from objstore_servers import ServerProcess, moto_server

from kvbm.errors import ConfigError
from kvbm.layout import KVLayout
from kvbm.storage.base import TierListener
from kvbm.storage.resilience import FaultKind
from kvbm.testing import PageStoreTests

boto3 = pytest.importorskip("boto3")

from kvbm.lab.raw_s3 import measure_raw_s3  # noqa: E402
from kvbm.storage.s3 import S3Backend, S3Store, S3TierConfig  # noqa: E402


class TestS3Store(ObjectStoreTests, PageStoreTests[S3Store]):
    @pytest.fixture(autouse=True)
    def _bind_server(self, moto_endpoint: str, s3_bucket: str) -> None:
        self.endpoint = moto_endpoint
        self.bucket = s3_bucket
        self.client = boto3.client("s3", endpoint_url=moto_endpoint)

    def config(self, endpoint: str | None = None, index: str = "index",
               **kw: Any) -> S3TierConfig:
        kw.setdefault("pack_bytes", self.pack_bytes)
        kw.setdefault("prefix", self.prefix)
        kw.setdefault("bucket", self.bucket)
        return S3TierConfig(endpoint_url=endpoint or self.endpoint,
                            index_path=str(self.tmp_path / index), **kw)

    def store_for(self, layout: KVLayout, listener: TierListener | None, *,
                  endpoint: str | None = None, index: str = "index", **kw: Any) -> S3Store:
        return S3Store(layout, self.config(endpoint, index, **kw), listener=listener)

    def raw_create_bucket(self, name: str) -> None:
        self.client.create_bucket(Bucket=name)

    def raw_delete_bucket(self, name: str) -> None:
        for o in self.client.list_objects_v2(Bucket=name).get("Contents", []):
            self.client.delete_object(Bucket=name, Key=o["Key"])
        self.client.delete_bucket(Bucket=name)

    def raw_read(self, key: str) -> bytes:
        data: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return data

    def raw_write(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def raw_delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def raw_list(self, prefix: str) -> list[str]:
        resp = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for o in resp.get("Contents", [])]

    def server_port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def own_server(self) -> ServerProcess:
        return moto_server()

    def prepare_server(self, server: ServerProcess) -> None:
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=self.bucket)

    # -- S3 specifics ----------------------------------------------------------------------
    def test_create_only_put_is_refused_by_the_server(self) -> None:
        # moto honours If-None-Match: * on PutObject, as S3 does (since 2024).
        backend = S3Backend(self.config(), self.client)
        key = f"{self.prefix}probe"
        backend.put(key, bytearray(b"first"), create_only=True)
        with pytest.raises(Exception) as err:
            backend.put(key, bytearray(b"second"), create_only=True)
        assert backend.classify(err.value) is FaultKind.EXISTS
        assert self.raw_read(key) == b"first"
        backend.put(key, bytearray(b"third"), create_only=False)
        assert self.raw_read(key) == b"third"

    def test_classification(self) -> None:
        backend = S3Backend(self.config(), self.client)
        with pytest.raises(Exception) as err:
            backend.read(f"{self.prefix}absent", 0, 10, whole=False)
        assert backend.classify(err.value) is FaultKind.MISSING
        key = f"{self.prefix}short"
        self.raw_write(key, b"0123456789")
        assert backend.read(key, 5, 100, whole=False) == b"56789"
        assert backend.read(key, 50, 10, whole=False) == b""  # range past the end
        bad = S3Backend(S3TierConfig(bucket="no-such-bucket-kvbm", endpoint_url=self.endpoint))
        with pytest.raises(Exception) as err:
            bad.put("k", bytearray(b"x"), create_only=False)
        assert bad.classify(err.value) is FaultKind.PERMANENT

    def test_config(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cfg = S3TierConfig.from_env({"KVBM_S3_BUCKET": "b1", "KVBM_S3_PREFIX": "p"},
                                    region="eu-west-1")
        assert (cfg.bucket, cfg.key_prefix, cfg.region) == ("b1", "p/", "eu-west-1")
        with pytest.raises(ConfigError):
            S3TierConfig.from_env({})
        with pytest.raises(ConfigError):
            S3TierConfig(bucket="b", pack_bytes=0)
        with pytest.raises(ConfigError):
            S3TierConfig(bucket="b", addressing_style="sideways")
        # Without endpoint_url, boto3's own environment decides, as its users expect.
        monkeypatch.setenv("AWS_ENDPOINT_URL", self.endpoint)
        backend = S3Backend(S3TierConfig(bucket=self.bucket))
        assert backend.location.endswith(self.endpoint)

    def test_raw_ceiling_helper(self) -> None:
        raw = measure_raw_s3(self.config(), nbytes=1 << 20, repeats=1)
        assert raw.nbytes == 1 << 20 and raw.put_gbps > 0 and raw.get_gbps > 0
        assert self.raw_list(self.prefix) == []  # cleaned up

    def test_index_belongs_to_one_location(self) -> None:
        store = S3Store(LAYOUT, self.config())
        asyncio.run(store.close())
        other = S3TierConfig(bucket=self.bucket, endpoint_url=self.endpoint, prefix="elsewhere",
                             index_path=str(self.tmp_path / "index"))
        with pytest.raises(ConfigError):
            S3Store(LAYOUT, other)
