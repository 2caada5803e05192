"""Defects found by an adversarial sweep of the public API (beyond tests/test_bad_input.py):
each call raises a kvbm.errors class, never a bare builtin, and changes nothing; values a
config accepts work where they are used."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout, ManagerConfig, Medium
from kvbm.config import OffloadConfig
from kvbm.errors import (
    BlockIdError,
    ConfigError,
    InvalidArgumentError,
    InvalidKeyError,
    KvbmError,
    LayoutError,
    PolicyError,
    TokenError,
    TransferError,
)
from kvbm.hashing import as_token_array, chain, hash_blocks
from kvbm.policies import make_admission, make_eviction
from kvbm.storage.disk import DiskTierConfig

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")


def toks(n_blocks: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


def disk_config(root: Path, **offload: Any) -> ManagerConfig:
    return ManagerConfig(device=DeviceTierConfig(8, device="cpu"), host=HostTierConfig(16),
                         disk=DiskTierConfig(root, capacity_bytes=1 << 22, slab_bytes=1 << 20),
                         offload=OffloadConfig(**offload))


def snapshot(mgr: BlockManager) -> tuple[Any, ...]:
    """What a refused call must leave as it was (counters aside from lookups)."""
    mgr.check_invariants()
    g1 = mgr.device_pool.allocator
    index = sorted((r.seq_hash, r.mask, r.g1, r.g2, len(r.tokens)) for r in mgr._index)
    st = mgr.stats()
    return (st.tiers, st.committed_blocks, [g1.refcount(s) for s in range(g1.num_slots)],
            g1.num_free, index, mgr.take_events())


def seed_disk(root: Path, n_blocks: int = 3) -> None:
    with BlockManager(LAYOUT, disk_config(root)) as mgr:
        mgr.release(mgr.commit(mgr.allocate(n_blocks), toks(n_blocks)))


# -- waits: a finite timeout longer than the OS can wait for is a wait without limit ----------
HUGE = [1e10, float(2**64), 2**64, 10**300]


@pytest.mark.parametrize("huge", HUGE, ids=str)
def test_huge_finite_timeouts_wait_instead_of_overflowing(tmp_path, huge):
    """flush/wait/close took any finite timeout, then handed it to a queue wait that raised a
    bare OverflowError past ~9.2e9 s; close() then left the disk tier open (its lock held)."""
    root = tmp_path / "g3"
    seed_disk(root)
    mgr = BlockManager(LAYOUT, disk_config(root))
    m = mgr.match_prefix(toks(3))
    assert m.mediums == [Medium.DISK] * 3
    handle = mgr.onboard_async(m)
    assert len(handle.wait(huge)) == 3
    mgr.release(handle.block_ids)
    mgr.release(mgr.commit(mgr.allocate(2), toks(2, 100)))
    assert mgr.flush(huge).complete
    mgr.close(timeout=huge)
    with BlockManager(LAYOUT, disk_config(root)) as again:  # the lock was let go
        assert again.match_prefix(toks(2, 100)).num_blocks == 2


def test_huge_config_timeouts_work(tmp_path):
    root = tmp_path / "g3"
    seed_disk(root)
    mgr = BlockManager(LAYOUT, disk_config(root, load_timeout_s=1e12, close_timeout_s=1e12,
                                           exit_flush_timeout_s=1e12))
    ids = mgr.onboard(mgr.match_prefix(toks(3)))
    assert len(ids) == 3
    mgr.release(ids)
    mgr.close()
    assert mgr.closed


# -- OffloadConfig: what it accepts must work where it is used ---------------------------------
@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0, 0, "5", None, True, [1]],
                         ids=repr)
def test_offload_load_timeout_must_be_finite_seconds(bad):
    """inf was accepted, and then every onboard of a disk block raised InvalidArgumentError
    (after pinning its pages); a string or None raised a bare TypeError."""
    with pytest.raises(ConfigError, match="load_timeout_s"):
        OffloadConfig(load_timeout_s=bad)


@pytest.mark.parametrize("text", ["inf", "1e400", "-inf", "nan", "9" * 400])
def test_offload_load_timeout_from_mapping_and_env_must_be_finite(text):
    data = {"device": {"num_blocks": 4, "device": "cpu"}, "offload": {"load_timeout_s": text}}
    with pytest.raises(ConfigError, match="load_timeout_s"):
        ManagerConfig.from_mapping(data)
    with pytest.raises(ConfigError, match="load_timeout_s"):
        ManagerConfig.from_env({"KVBM_DEVICE_NUM_BLOCKS": "4", "KVBM_DEVICE_DEVICE": "cpu",
                                "KVBM_OFFLOAD_LOAD_TIMEOUT_S": text})


@pytest.mark.parametrize("bad", ["yes", None, 1, np.bool_(True)], ids=repr)
def test_offload_flush_on_close_must_be_a_bool(bad):
    with pytest.raises(ConfigError, match="flush_on_close"):
        OffloadConfig(flush_on_close=bad)


@pytest.mark.parametrize("make_path", [
    lambda d: None, lambda d: 5, lambda d: bytes(d / "c.toml"), lambda d: d / "binary.toml",
    lambda d: str(d / "x\ud800.toml"), lambda d: str(d / "x\x00.toml"), lambda d: d],
    ids=["None", "int", "bytes", "not UTF-8", "surrogate", "NUL", "a directory"])
def test_from_toml_of_an_unreadable_path_is_a_config_error(tmp_path, make_path):
    (tmp_path / "binary.toml").write_bytes(b"\xff\xfe[device]\n")
    with pytest.raises(ConfigError):
        ManagerConfig.from_toml(make_path(tmp_path), env={})


@pytest.mark.parametrize("env", [
    {"KVBM_DEVICE_NUM_BLOCKS": 4}, {"KVBM_DEVICE_NUM_BLOCKS": None},
    {"KVBM_DEVICE_NUM_BLOCKS": b"4"}, 5, ["KVBM_DEVICE_NUM_BLOCKS=4"]], ids=repr)
def test_from_env_with_values_that_are_not_strings_is_a_config_error(env):
    with pytest.raises(ConfigError):
        ManagerConfig.from_env(env)


def test_from_env_ignores_names_that_are_not_strings():
    cfg = ManagerConfig.from_env({5: "x", "KVBM_DEVICE_NUM_BLOCKS": "4"})  # type: ignore[dict-item]
    assert cfg.device.num_blocks == 4


# -- layouts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "block_size"])
@pytest.mark.parametrize("value", [2**64, 2**200])
def test_layout_dimensions_beyond_range_are_a_layout_error(field, value):
    args = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 4, "block_size": 4, field: value}
    with pytest.raises(LayoutError, match=field):
        KVLayout(**args)


def test_layout_model_id_must_have_a_utf8_form():
    with pytest.raises(LayoutError, match="model_id"):
        KVLayout(2, 2, 4, 4, model_id="m-\ud800")


@pytest.mark.parametrize("bad", [None, 5, "x", [("num_layers", 2)], {1: 2, "a": 3}], ids=repr)
def test_layout_from_dict_needs_a_mapping(bad):
    with pytest.raises(LayoutError):
        KVLayout.from_dict(bad)


# -- hashing ------------------------------------------------------------------------------------
def test_block_hashes_index_with_an_int_is_refused():
    """hashes[0] made a "computed" BlockHashes holding two ints, which the manager trusts
    without checking: match_hashes / commit then died with a bare TypeError."""
    h = hash_blocks(toks(3), BS)
    for key in (0, -1, 99, "x", None, 1.5):
        with pytest.raises(InvalidArgumentError):
            h[key]  # type: ignore[index]
    assert h[1:].sequence == h.sequence[1:]
    assert h[:0].sequence == []


@pytest.mark.parametrize("local,parent", [
    (None, None), (5, None), ("ab", None), ([1, -1], None), ([2**64], None), ([1.5], None),
    (["a"], None), ([None], None), ([1], -1), ([1], 2**64), ([1], 1.5), ([1], "x")], ids=repr)
def test_chain_validates_its_arguments(local, parent):
    with pytest.raises(InvalidKeyError):
        chain(local, parent)


@pytest.mark.parametrize("make", [
    lambda: torch.arange(8).to(torch.bfloat16),
    lambda: torch.arange(8).to(torch.float8_e4m3fn),
    lambda: torch.arange(8).to_sparse(),
    lambda: torch.empty(8, dtype=torch.int64, device="meta"),
    lambda: bytearray(b"abcdefgh"),
    lambda: memoryview(b"abcdefgh"),
], ids=["bfloat16", "float8", "sparse", "meta", "bytearray", "memoryview-bytes"])
def test_tokens_of_unusable_kinds_are_a_token_error(make):
    """Tensors numpy cannot take raised bare TypeError/NotImplementedError; bytes-likes other
    than ``bytes`` were read as one token per byte, while ``bytes`` is refused."""
    with pytest.raises(TokenError):
        as_token_array(make())


@pytest.mark.parametrize("tokens", [None, 5, 1.5, object(), "abc", b"abcd", [1.5] * 8,
                                    ["1"] * 8, [None] * 8, np.full(8, 1.5),
                                    torch.arange(8.0)], ids=repr)
def test_tokens_of_the_wrong_kind_are_also_a_type_error(tokens):
    """A caller checking argument types catches TypeError: tokens that are not a sequence of
    integers raise a TokenError that is one too (out-of-range ones stay a ValueError)."""
    with pytest.raises(TokenError):
        as_token_array(tokens)
    with pytest.raises(TypeError):
        as_token_array(tokens)
    with pytest.raises(TypeError):
        hash_blocks(toks(2), BS, mm_hashes=5)  # type: ignore[arg-type]


def test_block_ids_that_are_not_ints_are_also_a_type_error(mgr):
    held = mgr.allocate(1)
    for bad in ("0", None, 1.5, True, [0]):
        with pytest.raises(BlockIdError):
            mgr.release([bad])
        with pytest.raises(TypeError):
            mgr.release([bad])
        with pytest.raises(TypeError):
            mgr.block_view(bad)
    with pytest.raises(BlockIdError) as e:
        mgr.release([99])
    assert not isinstance(e.value, TypeError)  # out of range: an IndexError only
    mgr.release(held)


def test_integer_tensors_and_buffers_of_u32_are_tokens():
    expected = np.arange(8, dtype=np.uint32)
    for t in (torch.arange(8, dtype=torch.int32), torch.arange(8).to(torch.uint16),
              torch.arange(16)[::2] // 2, memoryview(expected)):
        assert as_token_array(t).tolist() == expected.tolist()


# -- policies -----------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: make_admission("frequency", width=2**64),
    lambda: make_eviction("predictive", 16, horizon=1e308),
], ids=["frequency width 2**64", "predictive horizon 1e308"])
def test_policy_options_their_arithmetic_cannot_take_are_a_policy_error(make):
    with pytest.raises(PolicyError):
        make()


# -- the manager ----------------------------------------------------------------------------------
@pytest.fixture
def mgr():
    m = BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(8, device="cpu"),
                                           host=HostTierConfig(8)))
    m.release(m.commit(m.allocate(3), toks(3)))
    m.take_events()
    yield m
    m.close()


class _BadIterable:
    def __iter__(self):
        raise TypeError("not today")


@pytest.mark.parametrize("ids", [torch.tensor(1), np.array(1), _BadIterable()],
                         ids=["0-d tensor", "0-d array", "iter raises TypeError"])
def test_release_and_offload_of_a_non_collection_is_refused(mgr, ids):
    held = mgr.allocate(1)
    before = snapshot(mgr)
    for call in (mgr.release, mgr.offload):
        with pytest.raises(InvalidArgumentError):
            call(ids)
    assert snapshot(mgr) == before
    mgr.release(held)


@pytest.mark.parametrize("drain", ["yes", None, 1, [True]], ids=repr)
def test_stats_drain_must_be_a_bool(mgr, drain):
    with pytest.raises(InvalidArgumentError, match="drain"):
        mgr.stats(drain=drain)


def test_match_hashes_with_tokens_shorter_than_the_hashes_is_refused(mgr):
    """The tokens fill the events of blocks linked back from persistent tiers: fewer
    tokens than hashed blocks would put short token lists in those events."""
    h = hash_blocks(toks(3), BS)
    before = snapshot(mgr)
    with pytest.raises(TokenError):
        mgr.match_hashes(h, tokens=toks(2))
    assert snapshot(mgr) == before
    assert mgr.match_hashes(h, tokens=toks(3)).num_blocks == 3
    assert mgr.match_hashes(h, tokens=np.arange(3 * BS + 2, dtype=np.uint32)).num_blocks == 3


def test_commit_checks_mm_hashes_when_hashes_are_given(mgr):
    new = mgr.allocate(2)
    h = hash_blocks(toks(2, 500), BS)
    before = snapshot(mgr)
    for bad in ("garbage", {0: [-1]}, 5):
        with pytest.raises(KvbmError):
            mgr.commit(new, toks(2, 500), hashes=h, mm_hashes=bad)
    assert snapshot(mgr) == before
    mgr.release(mgr.commit(new, toks(2, 500), hashes=h))


def test_pool_views_validate_the_slot(mgr):
    dev, host = mgr.device_pool, mgr.host_pool
    assert host is not None
    for bad in (-1, 8, 2**64, "0", 1.5, None, True):
        with pytest.raises(BlockIdError):
            dev.block_view(bad)
        with pytest.raises(BlockIdError):
            host.block_view(bad)
        with pytest.raises(BlockIdError):
            host.page(bad)
    assert dev.block_view(np.int64(7)).shape == LAYOUT.block_shape
    assert len(host.page(7)) == LAYOUT.bytes_per_block


# -- the offload engine ---------------------------------------------------------------------------
def test_offload_engine_validates_its_arguments():
    from kvbm.offload import OffloadEngine

    for kw in ({"concurrent_batches": 0}, {"concurrent_batches": "2"},
               {"max_inflight_pages": -1}, {"max_inflight_pages": 1.5},
               {"batch_bytes": 0}, {"batch_bytes": None}, {"on_complete": 5}):
        with pytest.raises(InvalidArgumentError):
            OffloadEngine(**kw)
    engine = OffloadEngine()
    try:
        for call in (engine.stats, engine.inflight_pages, engine.store_room, engine.store):
            with pytest.raises(TransferError):
                call(Medium.DISK)  # no such tier
            with pytest.raises(InvalidArgumentError):
                call("DISK")  # type: ignore[arg-type]
    finally:
        engine.shutdown(timeout=1e12)


# -- metrics ---------------------------------------------------------------------------------------
def test_metrics_server_address_without_a_host_form_is_refused(mgr):
    pytest.importorskip("prometheus_client")
    from kvbm.metrics import start_metrics_server

    for addr in ("\ud800", "local\x00host"):
        with pytest.raises(InvalidArgumentError):
            start_metrics_server(mgr, 0, addr)


def test_one_registry_takes_one_kvbm_collector(mgr):
    """Two collectors in one registry exposed every family twice (a scrape Prometheus
    refuses): the second registration is refused and the first keeps working."""
    pc = pytest.importorskip("prometheus_client")
    from kvbm.metrics import KvbmCollector, start_metrics_server

    reg = pc.CollectorRegistry()
    KvbmCollector(mgr, registry=reg)
    with pytest.raises(InvalidArgumentError, match="registry"):
        KvbmCollector(mgr, registry=reg)
    with pytest.raises(InvalidArgumentError, match="registry"):
        start_metrics_server(mgr, 0, registry=reg)
    text = pc.generate_latest(reg).decode()
    assert text.count("# TYPE kvbm_lookups") == 1
