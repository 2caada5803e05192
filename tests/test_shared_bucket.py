"""The object tier as a cluster-wide cache: workers sharing a bucket find each other's pages
while they run (storage/objectdiscovery.py), and trust nothing another writer wrote.

Run as a script (``python tests/test_shared_bucket.py writer ARGS_JSON``) it is the writer
process of the two-process test: a block manager that stores prefixes, flushes them to the
bucket, prints their hashes and waits for a line on stdin before it closes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, Medium
from kvbm.config import ManagerConfig
from kvbm.errors import ConfigError
from kvbm.layout import KVLayout
from kvbm.storage.objecthead import (
    HEAD_SIZE,
    RECORD_SIZE,
    HeadError,
    decode_header,
    decode_records,
    encode_head,
)
from kvbm.storage.objectindex import Announced
from kvbm.storage.objectstore import PACK_SUFFIX, PackedObjectStore
from kvbm.storage.s3 import S3Store, S3TierConfig
from kvbm.testing.pages import TEST_LAYOUT, RecordingListener, make_keys, page_payload

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")
OTHER_LAYOUT = KVLayout(2, 2, 4, BS, "float32", model_id="another-model")
PAGE = TEST_LAYOUT.bytes_per_block
HERE = Path(__file__).resolve()


# -- helpers shared by the test and the writer process --------------------------------------
def toks(n_blocks: int, base: int) -> np.ndarray:
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


def fill_value(seq_hash: int, shape: tuple[int, ...]) -> Any:
    """The content a block of this hash holds: random, derived from the hash alone."""
    import torch

    rng = np.random.default_rng(seq_hash)
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def store_request(mgr: BlockManager, tokens: np.ndarray) -> list[int]:
    """Compute (fill) and commit every block of ``tokens``; the sequence hashes."""
    m = mgr.match_prefix(tokens)
    ids = mgr.onboard(m)
    new = mgr.allocate(len(m.hashes) - len(ids))
    for i, b in enumerate(new):
        view = mgr.block_view(b)
        view.copy_(fill_value(m.hashes.sequence[len(ids) + i], tuple(view.shape)))
    ids += mgr.commit(new, tokens, start_block=len(ids), hashes=m.hashes)
    mgr.release(ids)
    return list(m.hashes.sequence)


def manager_config(endpoint: str, bucket: str, prefix: str, index: str, *,
                   salt: str | None = None, **s3: Any) -> ManagerConfig:
    return ManagerConfig(
        device=DeviceTierConfig(8, device="cpu"), host=HostTierConfig(16), salt=salt,
        s3=S3TierConfig(bucket=bucket, prefix=prefix, endpoint_url=endpoint, index_path=index,
                        **s3))


def writer_main(args: dict[str, Any]) -> None:
    """The writer process: first the foreign writers (another layout, another salt), each
    closed before the next starts, then the main writer, which stays open until told."""
    ep, bucket, prefix, root = args["endpoint"], args["bucket"], args["prefix"], args["root"]
    foreign = toks(args["blocks"], args["foreign_base"])
    with BlockManager(OTHER_LAYOUT, manager_config(ep, bucket, prefix, f"{root}/w-layout")) as m:
        store_request(m, foreign)
        store_request(m, toks(args["blocks"], args["base"]))
        m.flush()
    with BlockManager(LAYOUT, manager_config(ep, bucket, prefix, f"{root}/w-salt",
                                             salt="another-tenant")) as m:
        store_request(m, foreign)
        store_request(m, toks(args["blocks"], args["base"]))
        m.flush()
    with BlockManager(LAYOUT, manager_config(ep, bucket, prefix, f"{root}/w-main")) as m:
        first = store_request(m, toks(args["blocks"], args["base"]))
        m.flush()
        second = store_request(m, toks(args["blocks"], args["base2"]))
        m.flush()
        print(json.dumps({"first": first, "second": second}), flush=True)
        sys.stdin.readline()  # both run until the test has checked what it needs


# -- two managers, two processes, one bucket ------------------------------------------------
def _lower_extra(mgr: BlockManager) -> dict[str, int]:
    return dict(mgr.stats().lower_tiers[Medium.OBJECT][0].extra)


def _wait_for(what: str, cond: Any, timeout: float = 60.0) -> None:
    # A bound on a wait, not a timing assertion: the condition is what is tested.
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_two_managers_in_two_processes_share_pages_while_running(tmp_path, moto_endpoint,
                                                                 s3_bucket):
    prefix = f"shared/{tmp_path.name}/"
    cfg = manager_config(moto_endpoint, s3_bucket, prefix, str(tmp_path / "reader"),
                         discovery_interval_s=0.2, discovery_min_interval_s=0.05)
    blocks = 5
    with BlockManager(LAYOUT, cfg) as mgr:
        # The reader has pages of its own in the bucket, so its index is not empty.
        store_request(mgr, toks(3, 90_000))
        mgr.flush()
        assert len(mgr._engine.run(mgr._lower[0].store.keys())) == 3
        args = {"endpoint": moto_endpoint, "bucket": s3_bucket, "prefix": prefix,
                "root": str(tmp_path), "blocks": blocks, "base": 0, "base2": 50_000,
                "foreign_base": 70_000}
        writer = subprocess.Popen([sys.executable, str(HERE), "writer", json.dumps(args)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                  cwd=HERE.parent.parent)
        try:
            assert writer.stdout is not None and writer.stdin is not None
            line = writer.stdout.readline()
            assert line, f"the writer died (exit code {writer.wait()})"
            written = json.loads(line)
            # Found by the running reader: the main writer's two prefixes, and the salted
            # writer's two (same layout, so the same folder; other hashes).
            _wait_for("discovery", lambda: _lower_extra(mgr)["discovered_pages"] >= 4 * blocks)
            assert _lower_extra(mgr)["discovered_pages"] == 4 * blocks
            assert _lower_extra(mgr)["discovery_garbage"] == 0

            m = mgr.match_prefix(toks(blocks, 0))
            assert m.by_medium == {Medium.OBJECT: blocks}
            assert list(m.sequence_hashes) == written["first"]
            ids = mgr.onboard(m)
            assert len(ids) == blocks
            for b, h in zip(ids, m.sequence_hashes, strict=True):
                view = mgr.block_view(b)
                assert bool((view == fill_value(h, tuple(view.shape))).all()), "wrong page"
            mgr.release(ids)
            assert mgr.stats().onboarded_blocks[Medium.OBJECT] == blocks

            # Another salt's and another layout's pages of the same tokens: never matched.
            assert mgr.match_prefix(toks(blocks, 70_000)).num_blocks == 0

            # A pack deleted under the reader: a miss, then recomputed, never wrong data.
            store = mgr._lower[0].store
            m2 = mgr.match_prefix(toks(blocks, 50_000))
            assert m2.by_medium == {Medium.OBJECT: blocks}
            where = store.locate(m2.sequence_hashes[0])
            assert where is not None
            import boto3

            boto3.client("s3", endpoint_url=moto_endpoint).delete_object(Bucket=s3_bucket,
                                                                         Key=where[0])
            assert mgr.onboard(m2) == []
            assert store_request(mgr, toks(blocks, 50_000)) == written["second"]
            m3 = mgr.match_prefix(toks(blocks, 50_000))
            assert m3.num_blocks == blocks and Medium.OBJECT not in m3.by_medium
            ids = mgr.onboard(m3)
            for b, h in zip(ids, m3.sequence_hashes, strict=True):
                view = mgr.block_view(b)
                assert bool((view == fill_value(h, tuple(view.shape))).all())
            mgr.release(ids)
            mgr.check_invariants()
        finally:
            if writer.stdin is not None:
                writer.stdin.close()
            assert writer.wait(120) == 0


# -- stores (one process, separate indexes: separate writers) ----------------------------------
def s3_store(endpoint: str, bucket: str, prefix: str, index: Path, *,
             layout: KVLayout = TEST_LAYOUT, listener: Any = None, **kw: Any) -> S3Store:
    kw.setdefault("discovery_interval_s", 0.0)  # looks only when the test asks
    return S3Store(layout, S3TierConfig(bucket=bucket, prefix=prefix, endpoint_url=endpoint,
                                        index_path=str(index), **kw), listener=listener)


class Found(RecordingListener):
    """Records removals and the pages a tier discovered."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[int] = []

    def on_discovered(self, medium: Medium, keys: list[int]) -> None:
        assert medium is Medium.OBJECT
        with self._lock:
            self.found.extend(keys)


def items(ks: list[int]) -> list[tuple[int, Any]]:
    return [(k, page_payload(k, PAGE)) for k in ks]


async def read_back(store: PackedObjectStore, ks: list[int]) -> list[bool]:
    bufs = [np.zeros(PAGE, np.uint8) for _ in ks]
    got = await store.get(list(zip(ks, bufs, strict=True)))
    for ok, k, b in zip(got, ks, bufs, strict=True):
        if ok:
            assert np.array_equal(b, page_payload(k, PAGE)), "a hit with wrong data"
    return got


@pytest.fixture
def where(tmp_path, moto_endpoint, s3_bucket) -> dict[str, Any]:
    return {"endpoint": moto_endpoint, "bucket": s3_bucket, "prefix": f"shared/{tmp_path.name}/"}


@pytest.fixture
def raw(moto_endpoint, s3_bucket) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=moto_endpoint)


def test_a_running_store_finds_another_writers_pages(tmp_path, where):
    async def body() -> None:
        found = Found()
        reader = s3_store(**where, index=tmp_path / "r", listener=found,
                          discovery_interval_s=0.1, discovery_min_interval_s=0.01)
        writer = s3_store(**where, index=tmp_path / "w")
        try:
            own = make_keys(4, start=500)
            assert all(await reader.put(items(own)))
            ks = make_keys(40)
            assert all(await writer.put(items(ks)))
            # The reader's own thread finds them: nobody calls refresh().
            deadline = time.monotonic() + 60
            while len(found.found) < 40:
                assert time.monotonic() < deadline, "not discovered"
                await asyncio.sleep(0.05)
            assert sorted(found.found) == sorted(ks)
            assert sorted(await reader.keys()) == sorted(ks + own)
            assert await read_back(reader, ks) == [True] * 40
            s = reader.stats().extra
            assert s["discovered_pages"] == 40 and s["discovered_packs"] == 1
            assert reader.used_bytes == 44 * PAGE
            # A put of pages another writer stored uploads nothing.
            assert all(await reader.put(items(ks)))
            assert reader.stats().extra["packs_put"] == 1
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(body())


def test_gcs_store_finds_another_writers_pages(tmp_path, gcs_endpoint, gcs_bucket):
    from kvbm.storage.gcs import GCSStore, GCSTierConfig

    def store(index: str, listener: Any = None) -> GCSStore:
        return GCSStore(TEST_LAYOUT, GCSTierConfig(
            bucket=gcs_bucket, prefix=f"shared/{tmp_path.name}/",
            index_path=str(tmp_path / index), discovery_interval_s=0.0), listener=listener)

    async def body() -> None:
        found = Found()
        reader, writer = store("r", found), store("w")
        try:
            assert await reader.refresh() == 0
            ks = make_keys(10)
            assert all(await writer.put(items(ks[:6])))
            await writer.close()  # its head is written by then
            assert await reader.refresh() == 6
            writer = store("w")  # the same writer again: its log goes on
            assert all(await writer.put(items(ks[6:])))
            await writer.close()
            assert await reader.refresh() == 4
            assert reader.stats().extra["discovery_rescans"] == 1  # the first look only
            assert sorted(found.found) == sorted(ks)
            assert await read_back(reader, ks) == [True] * 10
            assert await reader.refresh() == 0
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(body())


def test_a_layout_of_another_model_is_never_seen(tmp_path, where, raw):
    async def body() -> None:
        found = Found()
        reader = s3_store(**where, index=tmp_path / "r", listener=found)
        foreign = s3_store(**where, index=tmp_path / "f", layout=KVLayout(
            2, 2, 64, 16, "float16", model_id="another-model"))
        try:
            assert await reader.refresh() == 0
            ks = make_keys(5)
            assert all(await foreign.put(items(ks)))
            await foreign.close()
            assert await reader.refresh() == 0
            assert await reader.keys() == [] and found.found == []
            # Its head, copied into this layout's folder, does not pass for one of ours.
            heads = [o["Key"] for o in raw.list_objects_v2(
                Bucket=where["bucket"], Prefix=where["prefix"])["Contents"]
                if o["Key"].endswith(".kvhead")]
            (head,) = heads
            mine = f"{where['prefix']}{TEST_LAYOUT.fingerprint:016x}/heads/"
            raw.copy_object(Bucket=where["bucket"], CopySource={
                "Bucket": where["bucket"], "Key": head}, Key=mine + head.rsplit("/", 1)[1])
            assert await reader.refresh() == 0
            assert reader.stats().extra["discovery_garbage"] == 1
            assert await reader.keys() == [] and found.found == []
        finally:
            await reader.close()
            await foreign.close()

    asyncio.run(body())


def test_garbage_heads_and_manifests_are_skipped_and_counted(tmp_path, where, raw):
    async def body() -> None:
        found = Found()
        reader = s3_store(**where, index=tmp_path / "r", listener=found)
        writer = s3_store(**where, index=tmp_path / "w")
        heads = f"{where['prefix']}{TEST_LAYOUT.fingerprint:016x}/heads/"
        bucket = where["bucket"]
        fp = TEST_LAYOUT.fingerprint
        try:
            assert await reader.refresh() == 0
            # 1. random bytes under a head's name; 2. a head whose id is not its name's;
            # 3. a valid head naming a pack whose manifest is garbage; 4. a head of a valid
            # header whose record was altered; 5. a name that is not a head's.
            w1, w2, w3, w4 = (bytes([i]) * 16 for i in range(1, 5))
            raw.put_object(Bucket=bucket, Key=f"{heads}{w1.hex()}.kvhead",
                           Body=os.urandom(500))
            raw.put_object(Bucket=bucket, Key=f"{heads}{w2.hex()}.kvhead",
                           Body=encode_head(fp, w1, 1, [Announced(b"p" * 16, 1000, 100)]))
            bad_pack = b"\x07" * 16
            raw.put_object(Bucket=bucket, Key=reader.object_key(bad_pack),
                           Body=os.urandom(4096))
            raw.put_object(Bucket=bucket, Key=f"{heads}{w3.hex()}.kvhead",
                           Body=encode_head(fp, w3, 1, [Announced(bad_pack, 4096, 100)]))
            altered = bytearray(encode_head(fp, w4, 1, [Announced(b"q" * 16, 1000, 100)]))
            altered[HEAD_SIZE + 3] ^= 1
            raw.put_object(Bucket=bucket, Key=f"{heads}{w4.hex()}.kvhead", Body=bytes(altered))
            raw.put_object(Bucket=bucket, Key=f"{heads}not-hex.kvhead", Body=b"x")
            # ... and an honest writer, found in the same look.
            ks = make_keys(8)
            assert all(await writer.put(items(ks)))
            await writer.close()
            assert await reader.refresh() == 8
            s = reader.stats().extra
            assert s["discovery_garbage"] == 5  # four heads and one manifest
            assert s["discovery_errors"] == 0
            assert sorted(found.found) == sorted(ks)
            assert await read_back(reader, ks) == [True] * 8
            # Unchanged garbage is not read again.
            before = s["discovery_requests"]
            assert await reader.refresh() == 0
            assert reader.stats().extra["discovery_garbage"] == 5
            assert reader.stats().extra["discovery_requests"] == before + 1  # the LIST
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(body())


def test_a_pack_deleted_under_the_reader_is_a_miss(tmp_path, where, raw):
    async def body() -> None:
        found = Found()
        reader = s3_store(**where, index=tmp_path / "r", listener=found)
        writer = s3_store(**where, index=tmp_path / "w")
        try:
            assert await reader.refresh() == 0
            ks = make_keys(6)
            assert all(await writer.put(items(ks[:3])))
            assert all(await writer.put(items(ks[3:])))
            await writer.close()
            assert await reader.refresh() == 6
            # The other writer's garbage collection (or a lifecycle rule) takes a pack.
            gone = reader.locate(ks[0])
            assert gone is not None
            raw.delete_object(Bucket=where["bucket"], Key=gone[0])
            assert await read_back(reader, ks) == [False] * 3 + [True] * 3
            from kvbm.storage.base import RemovalReason

            assert sorted(found.removed(RemovalReason.CORRUPT)) == sorted(ks[:3])
            assert sorted(await reader.keys()) == sorted(ks[3:])
            assert reader.used_bytes == 3 * PAGE
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(body())


def test_an_announced_pack_already_gone_is_skipped(tmp_path, where, raw):
    async def body() -> None:
        reader = s3_store(**where, index=tmp_path / "r")
        writer = s3_store(**where, index=tmp_path / "w")
        try:
            assert await reader.refresh() == 0
            ks = make_keys(4)
            assert all(await writer.put(items(ks)))
            pack = writer.locate(ks[0])
            await writer.close()
            assert pack is not None
            raw.delete_object(Bucket=where["bucket"], Key=pack[0])
            assert await reader.refresh() == 0
            s = reader.stats().extra
            assert s["discovery_gone"] == 1 and s["discovery_garbage"] == 0
            assert s["discovery_errors"] == 0
            assert await reader.keys() == []
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(body())


def test_a_reader_that_falls_behind_lists_every_pack_once(tmp_path, where):
    async def body() -> None:
        reader = s3_store(**where, index=tmp_path / "r")
        writer = s3_store(**where, index=tmp_path / "w", announce_packs=2)
        try:
            assert await reader.refresh() == 0
            assert reader.stats().extra["discovery_rescans"] == 1
            ks = make_keys(10)
            for i in range(0, 10, 2):  # five packs; the head lists the newest two
                assert all(await writer.put(items(ks[i:i + 2])))
            await writer.close()
            assert await reader.refresh() == 10
            assert reader.stats().extra["discovery_rescans"] == 2
            assert sorted(await reader.keys()) == sorted(ks)
            # Caught up: the next pack comes through the head alone.
            writer = s3_store(**where, index=tmp_path / "w", announce_packs=2)
            more = make_keys(2, start=100)
            assert all(await writer.put(items(more)))
            await writer.close()
            assert await reader.refresh() == 2
            assert reader.stats().extra["discovery_rescans"] == 2
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(body())


def test_request_refresh_and_a_miss_trigger_a_look(tmp_path, where):
    async def body() -> None:
        found = Found()
        # A period far too long to matter: only the hint and the miss start looks.
        reader = s3_store(**where, index=tmp_path / "r", listener=found,
                          discovery_interval_s=3600.0, discovery_min_interval_s=0.0)
        writer = s3_store(**where, index=tmp_path / "w")
        try:
            ks = make_keys(6)
            assert all(await writer.put(items(ks[:3])))
            await writer.close()
            reader.request_refresh()
            deadline = time.monotonic() + 60
            while len(found.found) < 3:
                assert time.monotonic() < deadline, "the hint started no look"
                await asyncio.sleep(0.05)
            writer = s3_store(**where, index=tmp_path / "w")
            assert all(await writer.put(items(ks[3:])))
            await writer.close()
            assert await read_back(reader, ks[3:4]) == [False]  # not known yet: a miss ...
            while len(found.found) < 6:  # ... that asks for a look
                assert time.monotonic() < deadline, "the miss started no look"
                await asyncio.sleep(0.05)
            assert await read_back(reader, ks) == [True] * 6
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(body())


def test_announce_off_writes_no_head(tmp_path, where, raw):
    async def body() -> None:
        writer = s3_store(**where, index=tmp_path / "w", announce=False)
        try:
            assert all(await writer.put(items(make_keys(3))))
        finally:
            await writer.close()
        listed = raw.list_objects_v2(Bucket=where["bucket"], Prefix=where["prefix"])
        names = [o["Key"] for o in listed["Contents"]]
        assert len(names) == 1 and names[0].endswith(PACK_SUFFIX)

    asyncio.run(body())


# -- the head format ----------------------------------------------------------------------------
def test_head_round_trip_and_every_flipped_byte_is_caught():
    fp, writer = 0x1234_5678_9ABC_DEF0, bytes(range(16))
    packs = [Announced(bytes([i]) * 16, 10_000 + i, 100 + i) for i in range(3)]
    data = encode_head(fp, writer, 7, packs)
    assert len(data) == HEAD_SIZE + 3 * RECORD_SIZE
    info = decode_header(data, fingerprint=fp, writer=writer)
    assert (info.count, info.seq) == (3, 7)
    assert decode_records(data[HEAD_SIZE:], info=info, fingerprint=fp, writer=writer,
                          first=0) == packs
    # A part read on its own checks out too (records 1 and 2).
    assert decode_records(data[HEAD_SIZE + RECORD_SIZE:], info=info, fingerprint=fp,
                          writer=writer, first=1) == packs[1:]
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(HeadError):
            got = decode_header(bytes(bad), fingerprint=fp, writer=writer)
            decode_records(bytes(bad[HEAD_SIZE:]), info=got, fingerprint=fp, writer=writer,
                           first=0)
    with pytest.raises(HeadError):
        decode_header(data, fingerprint=fp + 1, writer=writer)
    with pytest.raises(HeadError):
        decode_header(data, fingerprint=fp, writer=bytes(16))
    with pytest.raises(HeadError):  # a record moved to another place in the log
        decode_records(data[HEAD_SIZE + RECORD_SIZE:], info=info, fingerprint=fp,
                       writer=writer, first=0)


@pytest.mark.parametrize(("field", "value"), [
    ("discovery_interval_s", float("nan")), ("discovery_interval_s", -1.0),
    ("discovery_interval_s", float("inf")), ("discovery_min_interval_s", -0.5),
    ("discovery_min_interval_s", "1"), ("announce", 1), ("announce", None),
    ("announce_packs", 0), ("announce_packs", 5000), ("announce_packs", 2.0)])
def test_bad_discovery_config(field, value):
    with pytest.raises(ConfigError, match=field):
        S3TierConfig(bucket="kvbm-test", **{field: value})


def test_discovery_keys_come_from_the_environment():
    cfg = ManagerConfig.from_env({
        "KVBM_DEVICE_NUM_BLOCKS": "8", "KVBM_DEVICE_DEVICE": "cpu",
        "KVBM_HOST_NUM_BLOCKS": "8", "KVBM_S3_BUCKET": "kvbm-test",
        "KVBM_S3_DISCOVERY_INTERVAL_S": "0", "KVBM_S3_DISCOVERY_MIN_INTERVAL_S": "0.5",
        "KVBM_S3_ANNOUNCE": "false", "KVBM_S3_ANNOUNCE_PACKS": "64"})
    assert cfg.s3 is not None
    assert (cfg.s3.discovery_interval_s, cfg.s3.discovery_min_interval_s, cfg.s3.announce,
            cfg.s3.announce_packs) == (0.0, 0.5, False, 64)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "writer":
        writer_main(json.loads(sys.argv[2]))
    else:
        sys.exit(f"usage: {sys.argv[0]} writer ARGS_JSON")
