"""MLA layouts (DeepSeek-V3/R1): one latent vector per token and layer instead of K and V."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvbm import Arrangement, BlockManager, DeviceTierConfig, HostTierConfig, KVKind, KVLayout
from kvbm.config import ManagerConfig
from kvbm.errors import KvbmError, LayoutError, LayoutMismatchError
from kvbm.layout import PRESETS
from kvbm.medium import Medium
from kvbm.pool import DevicePool, HostPool, copy_blocks
from kvbm.storage.disk import DiskTierConfig

BS = 4
#: 2 layers, a latent 12 wide: 2 x 1 x 4 x 1 x 12 float32 = 384 bytes a page.
MLA = KVLayout(2, 1, 12, BS, "float32", kind=KVKind.MLA)
#: An MHA layout with the very same page size (2 x 2 x 4 x 1 x 6).
MHA_SAME_BYTES = KVLayout(2, 1, 6, BS, "float32")


def test_mla_shapes_and_bytes():
    lay = PRESETS["deepseek-v3"]
    assert lay.kind is KVKind.MLA and lay.kv_planes == 1
    assert lay.layer_shape == (1, 64, 1, 576)
    assert lay.block_shape == (61, 1, 64, 1, 576)
    assert lay.bytes_per_block == 61 * 64 * 576 * 2
    assert lay.bytes_per_layer_block == 64 * 576 * 2
    assert lay.replicated_across_tp_ranks
    mha = KVLayout(61, 1, 576, 64, "bfloat16")
    assert mha.kind is KVKind.MHA and mha.kv_planes == 2
    assert mha.bytes_per_block == 2 * lay.bytes_per_block
    assert not mha.replicated_across_tp_ranks
    assert MLA.bytes_per_block == MHA_SAME_BYTES.bytes_per_block == 384


def test_kind_takes_part_in_the_fingerprint():
    a = KVLayout(4, 1, 8, 16, "float16", kind=KVKind.MLA)
    b = KVLayout(4, 1, 8, 16, "float16")
    assert a.fingerprint != b.fingerprint
    assert a != b
    assert MLA.fingerprint != MHA_SAME_BYTES.fingerprint
    # the device arrangement still does not change the page format
    assert KVLayout(4, 1, 8, 16, "float16", Arrangement.LAYER_SEPARATE,
                    kind="mla").fingerprint == a.fingerprint


def test_mha_fingerprints_are_those_from_before_kinds_existed():
    # Computed before KVLayout had a kind: disk stores written then must stay readable.
    assert KVLayout(32, 8, 128, 16, "bfloat16", model_id="llama3-8b").fingerprint \
        == 0x8bc07cf3108a3fb9
    assert KVLayout(2, 1, 576, 64, "bfloat16").fingerprint == 0xf527f7ffc82587c1
    assert KVLayout(2, 2, 64, 16, "float16", kind=KVKind.MHA).fingerprint == 0x7e8bec0a7ad5f5f9


def test_dict_round_trip():
    lay = KVLayout(3, 1, 576, 64, "bf16", "layer_separate", "ds", KVKind.MLA)
    d = lay.to_dict()
    assert d["kind"] == "mla"
    assert KVLayout.from_dict(d) == lay
    assert KVLayout.from_dict(d).fingerprint == lay.fingerprint
    mha = KVLayout(2, 2, 4, 8)
    assert KVLayout.from_dict(mha.to_dict()) == mha
    # a dict written before kinds existed has no "kind": it is MHA
    old = {k: v for k, v in mha.to_dict().items() if k != "kind"}
    assert KVLayout.from_dict(old).kind is KVKind.MHA


@pytest.mark.parametrize("kwargs", [
    dict(num_layers=2, num_kv_heads=2, head_dim=576, block_size=64, kind=KVKind.MLA),
    dict(num_layers=2, num_kv_heads=8, head_dim=576, block_size=64, kind="mla"),
    dict(num_layers=2, num_kv_heads=1, head_dim=576, block_size=64, kind="gqa"),
    dict(num_layers=2, num_kv_heads=1, head_dim=576, block_size=64, kind=2),
    dict(num_layers=2, num_kv_heads=1, head_dim=576, block_size=64, kind=None),
])
def test_bad_kinds_raise_layout_error(kwargs):
    with pytest.raises(LayoutError) as e:
        KVLayout(**kwargs)
    assert isinstance(e.value, ValueError) and isinstance(e.value, KvbmError)
    assert str(e.value)
    with pytest.raises(LayoutError):
        KVLayout.from_dict({**kwargs, "kind": getattr(kwargs["kind"], "value", kwargs["kind"])})


@pytest.mark.parametrize("src_arr", list(Arrangement))
@pytest.mark.parametrize("dst_arr", list(Arrangement))
def test_pools_hold_and_copy_mla_blocks(src_arr, dst_arr):
    n = 6
    dev = DevicePool(KVLayout(3, 1, 8, 4, "bfloat16", src_arr, kind=KVKind.MLA), n, "cpu")
    host = HostPool(KVLayout(3, 1, 8, 4, "bfloat16", kind=KVKind.MLA), n)
    lay = host.layout
    assert host.buffer.shape == (n, 3, 1, 4, 1, 8)
    assert len(host.page(0)) == lay.bytes_per_block == 3 * 4 * 8 * 2
    ref = torch.randn((n, *lay.block_shape)).to(torch.bfloat16)
    for s in range(n):
        v = dev.block_view(s)
        if isinstance(v, list):
            assert len(v) == 3 and all(t.shape == lay.layer_shape for t in v)
            for i, t in enumerate(v):
                t.copy_(ref[s, i])
        else:
            assert v.shape == lay.block_shape
            v.copy_(ref[s])
    src, dst = [0, 1, 2, 5], [3, 4, 5, 0]
    copy_blocks(dev, src, host, dst)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(host.block_view(d), ref[s])
    back = DevicePool(KVLayout(3, 1, 8, 4, "bfloat16", dst_arr, kind=KVKind.MLA), n, "cpu")
    copy_blocks(host, dst, back, src)
    for s in src:
        v = back.block_view(s)
        assert torch.equal(torch.stack(list(v)) if isinstance(v, list) else v, ref[s])


def _toks(n_blocks: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


def _page(seq_hash: int) -> torch.Tensor:
    """A block's content, different in every element and from block to block."""
    start = float(seq_hash % 9_973)
    return torch.arange(MLA.elements_per_block, dtype=torch.float32).add_(start * 1000) \
        .view(MLA.block_shape)


def _run(mgr: BlockManager, tokens: np.ndarray) -> list[Medium]:
    m = mgr.match_prefix(tokens)
    ids = mgr.onboard(m)
    for b, h in zip(ids, m.hashes.sequence, strict=False):
        assert torch.equal(mgr.block_view(b), _page(h)), "served a wrong page"
    new = mgr.allocate(len(m.hashes) - len(ids))
    for i, b in enumerate(new):
        view = mgr.block_view(b)
        assert isinstance(view, torch.Tensor)
        view.copy_(_page(m.hashes.sequence[len(ids) + i]))
    ids += mgr.commit(new, tokens, start_block=len(ids), hashes=m.hashes)
    mgr.release(ids)
    mgr.check_invariants()
    return m.mediums


def test_manager_with_an_mla_layout_offloads_to_disk_and_restarts(tmp_path):
    cfg = ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8),
                        disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 22,
                                            slab_bytes=1 << 20))
    with BlockManager(MLA, cfg) as mgr:
        _run(mgr, _toks(3))
        for i in range(1, 6):  # push the first request out of G1 and G2
            _run(mgr, _toks(3, 1000 * i))
            mgr._quiesce()
        assert _run(mgr, _toks(3)) == [Medium.DISK] * 3
        mgr._quiesce()
    with BlockManager(MLA, cfg) as mgr:
        m = mgr.match_prefix(_toks(3))
        assert m.num_blocks == 3 and m.by_medium == {Medium.DISK: 3}
        assert _run(mgr, _toks(3)) == [Medium.DISK] * 3  # the same bytes, checked in _run
    # An MHA layout with pages of the same size never reads the MLA pages.
    with pytest.raises(LayoutMismatchError):
        BlockManager(MHA_SAME_BYTES, cfg)
