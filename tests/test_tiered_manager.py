"""The block manager with tiers below host memory: offload cascade, onboard from disk and
object storage, restart, corruption, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from kvbm import BlockManager, BlockRemoved, BlockStored, DeviceTierConfig, HostTierConfig, Medium
from kvbm.config import ManagerConfig, OffloadConfig
from kvbm.errors import ConfigError, LayoutMismatchError, TierUnavailableError
from kvbm.layout import KVLayout
from kvbm.offload import OffloadEngine, TransferHandle, TransferKind, TransferStatus
from kvbm.storage.base import Capability
from kvbm.storage.disk import DiskStore, DiskTierConfig
from kvbm.storage.s3 import S3TierConfig

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")


def toks(n_blocks: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


def value(seq_hash: int) -> float:
    return float(seq_hash % 999_983)


def run(mgr: BlockManager, tokens: np.ndarray) -> list[int]:
    """One request; every computed block is filled with a value derived from its hash, and
    every onboarded block is checked against it. Returns the media the prefix came from."""
    m = mgr.match_prefix(tokens)
    ids = mgr.onboard(m)
    for b, h in zip(ids, m.hashes.sequence, strict=False):
        assert bool((mgr.block_view(b) == value(h)).all()), "served a wrong page"
    new = mgr.allocate(len(m.hashes) - len(ids))
    for i, b in enumerate(new):
        mgr.block_view(b).fill_(value(m.hashes.sequence[len(ids) + i]))
    ids += mgr.commit(new, tokens, start_block=len(ids), hashes=m.hashes)
    mgr.release(ids)
    mgr.check_invariants()
    return m.mediums


def disk_cfg(tmp_path, **kw) -> DiskTierConfig:
    return DiskTierConfig(tmp_path / "g3", capacity_bytes=kw.pop("capacity_bytes", 1 << 22),
                          slab_bytes=1 << 20, **kw)


def config(tmp_path, g1=4, g2=8, **kw) -> ManagerConfig:
    kw.setdefault("disk", disk_cfg(tmp_path))
    return ManagerConfig(device=DeviceTierConfig(g1, device="cpu"), host=HostTierConfig(g2),
                         **kw)


def test_cascade_to_disk_and_onboard_back(tmp_path):
    with BlockManager(LAYOUT, config(tmp_path)) as mgr:
        run(mgr, toks(3))
        for i in range(1, 6):  # push the first request out of G1 and G2
            run(mgr, toks(3, 1000 * i))
            mgr._quiesce()
        assert run(mgr, toks(3)) == [Medium.DISK] * 3
        st = mgr.stats()
        assert st.onboarded_blocks[Medium.DISK] == 3
        assert st.lower_tiers[Medium.DISK][0].hits == 3
        events = mgr.take_events()
        disk_stored = {h for e in events if isinstance(e, BlockStored) and e.medium is Medium.DISK
                       for h in e.block_hashes}
        assert set(mgr.match_prefix(toks(3)).sequence_hashes) <= disk_stored


def test_restart_finds_pages_and_other_layout_is_refused(tmp_path):
    cfg = config(tmp_path)
    with BlockManager(LAYOUT, cfg) as mgr:
        run(mgr, toks(4))
        mgr._quiesce()
    with BlockManager(LAYOUT, cfg) as mgr:
        assert mgr.stats().unlinked_pages == 4
        m = mgr.match_prefix(toks(4))
        assert m.num_blocks == 4 and m.by_medium == {Medium.DISK: 4}
        assert run(mgr, toks(4)) == [Medium.DISK] * 4
        assert mgr.stats().unlinked_pages == 0
    other = KVLayout(2, 2, 4, BS, "float32", model_id="another-model")
    with pytest.raises(LayoutMismatchError):
        BlockManager(other, cfg)
    with BlockManager(LAYOUT, cfg) as mgr:  # the refused directory was left intact
        assert mgr.match_prefix(toks(4)).num_blocks == 4


def test_unreachable_disk_pages_relink_when_their_prefix_returns(tmp_path):
    cfg = config(tmp_path)
    with BlockManager(LAYOUT, cfg) as mgr:
        run(mgr, toks(4))
        mgr._quiesce()
    with BlockManager(LAYOUT, cfg) as mgr:
        # a prefix that only shares the first 2 blocks links exactly those
        t = np.concatenate([toks(2), toks(2, 5000)])
        assert mgr.match_prefix(t).num_blocks == 2
        assert mgr.stats().unlinked_pages == 2
        assert mgr.match_prefix(toks(4)).num_blocks == 4


def test_corrupt_disk_page_is_a_miss_never_data(tmp_path):
    cfg = config(tmp_path)
    with BlockManager(LAYOUT, cfg) as mgr:
        run(mgr, toks(4))
        mgr._quiesce()
    # flip byte 100 of every written 4 KiB block of the slabs: whatever the slot format,
    # that lands in every page's payload (pages here are 256 bytes, headers 64)
    for slab in (tmp_path / "g3").rglob("*"):
        if slab.is_file() and "slab" in slab.name:
            data = bytearray(slab.read_bytes())
            for off in range(0, len(data), 4096):
                if any(data[off: off + 4096]):
                    data[off + 100] ^= 0xFF
            slab.write_bytes(bytes(data))
    with BlockManager(LAYOUT, cfg) as mgr:
        m = mgr.match_prefix(toks(4))
        assert m.num_blocks == 4  # the index still lists them ...
        ids = mgr.onboard(m)
        assert ids == []  # ... but nothing corrupt is served
        mgr.check_invariants()
        assert mgr.stats().lower_tiers[Medium.DISK][0].corrupt >= 1
        removed = [e for e in mgr.take_events() if isinstance(e, BlockRemoved)]
        assert any(e.medium is Medium.DISK for e in removed)
        assert mgr.match_prefix(toks(4)).num_blocks == 0
        assert run(mgr, toks(4)) == []  # recomputed and cached again


class GatedStore(DiskStore):
    """A real disk store whose puts wait for a gate: makes 'the tier is slow' deterministic."""

    gate: threading.Event

    async def put(self, items, *, parents=None):  # type: ignore[override]
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
        return await super().put(items, parents=parents)


def test_backpressure_skips_offloads_and_never_blocks(tmp_path):
    engine = OffloadEngine(max_inflight_pages=4)
    try:
        store = engine.run(DiskStore.open(LAYOUT, disk_cfg(tmp_path)))
        store.__class__ = GatedStore
        store.gate = threading.Event()
        engine.add_tier(store)
        page = bytearray(LAYOUT.bytes_per_block)
        first = engine.submit(TransferHandle(TransferKind.STORE, Medium.DISK, [1, 2, 3],
                                             [page] * 3))
        second = engine.submit(TransferHandle(TransferKind.STORE, Medium.DISK, [4, 5],
                                              [page] * 2))
        assert second.status is TransferStatus.SKIPPED and second.done()
        assert not first.done()
        assert engine.stats(Medium.DISK).skipped == 1
        store.gate.set()
        assert first.wait(10) and first.status is TransferStatus.DONE
        assert first.results == [True, True, True]
    finally:
        engine.shutdown()


def test_shutdown_without_flush_cancels_queued(tmp_path):
    engine = OffloadEngine()
    store = engine.run(DiskStore.open(LAYOUT, disk_cfg(tmp_path)))
    store.__class__ = GatedStore
    store.gate = threading.Event()
    engine.add_tier(store)
    page = bytearray(LAYOUT.bytes_per_block)
    running = engine.submit(TransferHandle(TransferKind.STORE, Medium.DISK, [1], [page]))
    queued = engine.submit(TransferHandle(TransferKind.STORE, Medium.DISK, [2], [page]))
    threading.Timer(0.2, store.gate.set).start()
    engine.shutdown(flush=False)
    assert running.done() and queued.done()
    assert queued.status in (TransferStatus.CANCELLED, TransferStatus.DONE)
    assert running.status is TransferStatus.DONE


def test_manager_backpressure_with_a_slow_disk(tmp_path):
    cfg = config(tmp_path, g2=16, offload=OffloadConfig(max_inflight_pages=2))
    mgr = BlockManager(LAYOUT, cfg)
    store = mgr._lower[0].store
    store.__class__ = GatedStore
    store.gate = threading.Event()
    for i in range(4):
        run(mgr, toks(2, 100 * i))  # never blocks although the disk does not move
    # Over the in-flight bound the stores wait (nothing is refused and lost), unpinned.
    assert mgr.stats().lower_tiers[Medium.DISK][1].skipped == 0
    assert len(mgr._lower[0].deferred) >= 1
    mgr.check_invariants()
    store.gate.set()
    mgr._quiesce()
    assert mgr.flush(30).complete
    assert not mgr._lower[0].deferred
    assert mgr.stats().lower_tiers[Medium.DISK][1].pages_stored == 8  # every block got there
    mgr.check_invariants()
    mgr.close()


class GatedLoadStore(DiskStore):
    """A real disk store whose gets wait for a gate: holds staging pages in G2 on purpose."""

    gate: threading.Event

    async def get(self, items):  # type: ignore[override]
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
        return await super().get(items)


def test_no_g2_page_to_stage_a_load_is_a_miss_not_an_error(tmp_path):
    # G2 of 8 pages moves at most 4 in flight to disk, so each request adds at most 4 blocks
    mgr = BlockManager(LAYOUT, config(tmp_path, g1=8, g2=8))
    for n, base in ((4, 0), (4, 1000), (8, 1000), (4, 2000), (4, 3000)):
        run(mgr, toks(n, base))  # A (4 blocks) and B (8) end up on disk only
        mgr._quiesce()
    a, b = mgr.match_prefix(toks(4, 0)), mgr.match_prefix(toks(8, 1000))
    assert a.mediums == [Medium.DISK] * 4 and b.mediums == [Medium.DISK] * 8
    store = mgr._lower[0].store
    store.__class__ = GatedLoadStore
    store.gate = threading.Event()
    try:
        loading = mgr.onboard_async(a)  # holds 4 G2 pages to stage A's loads
        assert not loading.done()
        assert mgr.onboard(b) == []  # 4 pages left for 8 loads: a miss, no exception
        assert mgr.stats().staging_misses == 1
        mgr.check_invariants()
    finally:
        store.gate.set()
    ids = loading.wait(10)
    assert len(ids) == 4
    for blk, h in zip(ids, a.sequence_hashes, strict=True):
        assert bool((mgr.block_view(blk) == value(h)).all()), "served a wrong page"
    mgr.release(ids)
    assert run(mgr, toks(8, 1000)) == [Medium.DISK] * 8  # B is still there, served later
    mgr.check_invariants()
    mgr.close()


def test_config_validation_for_lower_tiers(tmp_path):
    with pytest.raises(ConfigError, match="host tier"):
        ManagerConfig(device=DeviceTierConfig(4), disk=disk_cfg(tmp_path))
    with pytest.raises(ConfigError, match="at most one"):
        ManagerConfig(device=DeviceTierConfig(4), host=HostTierConfig(4),
                      s3=S3TierConfig(bucket="b"),
                      gcs=__import__("kvbm.storage.gcs", fromlist=["x"]).GCSTierConfig(bucket="b"))
    cfg = ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "4", "KVBM_HOST_NUM_BLOCKS": "4",
                                  "KVBM_DISK_PATH": str(tmp_path / "d"),
                                  "KVBM_DISK_CAPACITY_BYTES": "1048576"})
    assert cfg.disk is not None and cfg.disk.capacity_bytes == 1 << 20


def test_object_tier_through_the_manager_promotes_to_disk(tmp_path, moto_endpoint, s3_bucket):
    s3 = S3TierConfig(bucket=s3_bucket, endpoint_url=moto_endpoint, prefix="mgr-test/",
                      index_path=str(tmp_path / "s3index"), pack_bytes=1 << 16)
    cfg = config(tmp_path, s3=s3)
    with BlockManager(LAYOUT, cfg) as mgr:
        run(mgr, toks(3))
        mgr._quiesce()
        assert mgr.stats().lower_tiers[Medium.OBJECT][0].puts >= 3
    # a new machine: no disk, same bucket and object index
    cfg2 = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8),
                         disk=DiskTierConfig(tmp_path / "g3b", capacity_bytes=1 << 22,
                                             slab_bytes=1 << 20), s3=s3)
    with BlockManager(LAYOUT, cfg2) as mgr:
        assert run(mgr, toks(3)) == [Medium.OBJECT] * 3
        mgr._quiesce()
        m = mgr.match_prefix(toks(3))
        rec = mgr.lookup(m.sequence_hashes[0])
        assert rec is not None and rec.mask & Medium.DISK.bit  # promoted G4 -> G3


def test_dead_object_store_degrades_to_misses(tmp_path, aws_test_env):
    """The object server dies: onboarding its blocks is a miss (recompute), nothing hangs,
    and offloads to it fail without blocking the engine."""
    import boto3

    from kvbm.testing.servers import moto_server

    server = moto_server()
    server.start()
    try:
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket="dying")
        s3 = S3TierConfig(bucket="dying", endpoint_url=server.endpoint,
                          index_path=str(tmp_path / "idx"), connect_timeout_s=0.5,
                          read_timeout_s=1.0)
        cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8),
                            s3=s3)
        with BlockManager(LAYOUT, cfg) as mgr:
            run(mgr, toks(3))
            mgr._quiesce()
        server.stop()
        # Opening against a dead server is an error, unless the operator chose to start
        # degraded (misses until the server answers).
        with pytest.raises(TierUnavailableError, match="start_degraded"):
            BlockManager(LAYOUT, cfg)
        cfg = dataclasses.replace(cfg, s3=dataclasses.replace(s3, start_degraded=True))
        with BlockManager(LAYOUT, cfg) as mgr:
            m = mgr.match_prefix(toks(3))
            assert m.by_medium == {Medium.OBJECT: 3}  # the local index still lists them
            assert mgr.onboard(m) == []  # ... but the server is gone: a miss, not a hang
            for i in range(3):
                run(mgr, toks(3, 100 * (i + 1)))  # offloads to the dead tier fail quietly
            mgr._quiesce()
            mgr.check_invariants()
            assert mgr.stats().lower_tiers[Medium.OBJECT][0].puts == 0
    finally:
        server.stop()


def test_object_tier_outage_keeps_its_blocks_for_later(tmp_path, moto_endpoint, s3_bucket):
    """While the object server is unreachable its blocks are misses, but they stay in the
    index (the tier says which misses are definite): once it answers they are hits again."""
    from urllib.parse import urlsplit

    from objstore_servers import Fault, FaultProxy

    from kvbm.storage.objectstore import PACK_SUFFIX
    from kvbm.storage.resilience import BreakerConfig, RetryPolicy

    proxy = FaultProxy(int(urlsplit(moto_endpoint).port or 0))
    try:
        s3 = S3TierConfig(bucket=s3_bucket, prefix="outage", endpoint_url=proxy.endpoint,
                          index_path=str(tmp_path / "idx"), read_timeout_s=1.0,
                          retry=RetryPolicy(max_attempts=2, base_delay_s=0.01),
                          breaker=BreakerConfig(failure_threshold=2, cooldown_s=0.2,
                                                max_cooldown_s=0.2))
        cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8),
                            s3=s3)
        with BlockManager(LAYOUT, cfg) as mgr:
            run(mgr, toks(3))
            mgr._quiesce()
        with BlockManager(LAYOUT, cfg) as mgr:  # G1 and G2 empty: the pages are in G4 only
            proxy.inject(Fault.RESET, match=PACK_SUFFIX)
            for _ in range(3):  # failed reads, then the breaker opens: misses every time
                m = mgr.match_prefix(toks(3))
                assert m.mediums == [Medium.OBJECT] * 3
                assert mgr.onboard(m) == []
            assert not any(isinstance(e, BlockRemoved) for e in mgr.take_events())
            proxy.clear()
            deadline = time.monotonic() + 10
            while True:  # the breaker re-arms after its cool-down; then the pages are served
                mediums = run(mgr, toks(3))
                if mediums or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert mediums == [Medium.OBJECT] * 3
            mgr.check_invariants()
    finally:
        proxy.close()


def test_object_tier_reports_definite_misses(tmp_path, moto_endpoint, s3_bucket):
    """A page the object tier no longer holds is taken out of the index on the failed load
    (RemovalReason.MISSING), so it is not matched again."""
    cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8),
                        s3=S3TierConfig(bucket=s3_bucket, prefix="missing",
                                        endpoint_url=moto_endpoint,
                                        index_path=str(tmp_path / "idx")))
    with BlockManager(LAYOUT, cfg) as mgr:
        run(mgr, toks(3))
        mgr._quiesce()
    with BlockManager(LAYOUT, cfg) as mgr:
        m = mgr.match_prefix(toks(3))
        assert m.mediums == [Medium.OBJECT] * 3
        store = mgr._lower[0].store
        assert store.capabilities & Capability.REPORTS_MISSES
        mgr._engine.run(store.delete([m.sequence_hashes[1]]))  # behind the manager's back
        assert len(mgr.onboard(m)) == 1  # the prefix ends where the page went missing
        removed = [e for e in mgr.take_events() if isinstance(e, BlockRemoved)]
        # the missing page, then (lineage rule) its child that nothing can reach any more
        assert [(e.block_hashes, e.medium) for e in removed] == [
            ([m.sequence_hashes[1]], Medium.OBJECT), ([m.sequence_hashes[2]], Medium.OBJECT)]
        assert mgr.match_prefix(toks(3)).num_blocks == 1
        mgr.check_invariants()


def test_recomputed_blocks_whose_parent_left_the_disk_take_back_their_disk_copies(tmp_path):
    """A parent block leaves the disk while its child is still stored there: the child is
    unlinked (orphan). Recomputing and committing both must link the child's disk copy into
    its new record (one residency, no orphan left, a BlockStored event for the disk)."""
    from kvbm.storage.base import RemovalReason

    cfg = config(tmp_path)
    with BlockManager(LAYOUT, cfg) as mgr:
        run(mgr, toks(3))
        mgr._quiesce()
    with BlockManager(LAYOUT, cfg) as mgr:  # G1 and G2 empty: the pages are on disk only
        m = mgr.match_prefix(toks(3))
        assert m.mediums == [Medium.DISK] * 3
        parent, child, grandchild = m.sequence_hashes
        store = mgr._lower[0].store
        mgr._engine.run(store.delete([parent]))
        mgr.on_removed(Medium.DISK, [parent], RemovalReason.DELETED)  # as the tier reports
        assert mgr.match_prefix(toks(3)).num_blocks == 0
        # child and grandchild are still on disk: unlinked (their removal announced), or
        # still compacted (their announcement standing: without the parent no router or
        # match reaches them anyway)
        for h in (child, grandchild):
            rec = mgr.lookup(h)
            assert ((rec is not None and rec.mask & Medium.DISK.bit)
                    or mgr.stats().unlinked_pages == 2)
        stream = mgr.take_events()
        new = mgr.allocate(3)
        for b, h in zip(new, m.sequence_hashes, strict=True):
            mgr.block_view(b).fill_(value(h))
        ids = mgr.commit(new, toks(3), hashes=m.hashes)
        mgr.check_invariants()
        assert mgr.stats().unlinked_pages == 0
        for h in (child, grandchild):
            rec = mgr.lookup(h)
            assert rec is not None and rec.mask & Medium.DISK.bit
        # what a subscriber of this manager's events knows of their disk copies: announced
        disk: set[int] = set()
        for e in stream + mgr.take_events():
            if isinstance(e, BlockStored) and e.medium is Medium.DISK:
                disk.update(e.block_hashes)
            elif isinstance(e, BlockRemoved) and e.medium is Medium.DISK:
                disk.difference_update(e.block_hashes)
        assert child in disk and grandchild in disk
        mgr.release(ids)
        mgr._quiesce()
        mgr.check_invariants()
        assert mgr.lookup(parent).mask & Medium.DISK.bit  # written down again
    with BlockManager(LAYOUT, cfg) as mgr:
        assert mgr.match_prefix(toks(3)).mediums == [Medium.DISK] * 3
