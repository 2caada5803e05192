"""Engine-owned G1 (kvbm.memory.engine_kv): the engine's KV tensors in each format, registered
as views, round-tripped through pages of a shared host pool by the block mover.

Engine tensors are built from known K and V ([blocks, tokens, heads, dims]) the way the
engine's kernels write them: by vLLM's own CPU kernel where vLLM is installed, otherwise by
the layouts measured from it (written out here by hand, independently of the module)."""

from __future__ import annotations

import secrets

import pytest
import torch

from kvbm import KVLayout
from kvbm.core.plans import BlockCopy, CopyStatus, Direction, TransferPlan
from kvbm.errors import BlockIdError, BlockIdTypeError, InvalidArgumentError, LayoutError
from kvbm.layout import KVKind
from kvbm.memory.engine_kv import (
    CpuPacking,
    EngineKV,
    EngineKVFormat,
    TPShard,
    tag_columns_needed,
)
from kvbm.memory.mover import BlockMover
from kvbm.memory.shm import SharedHostPool

N, T, H, D, L = 6, 32, 2, 64, 3
MHA_FORMATS = ["cpu_vec", "cpu_amx", "flash", "flash_packed_hnd", "flash_packed_nhd"]


def _layout(dtype: str, kind: KVKind = KVKind.MHA, heads: int = H, d: int = D) -> KVLayout:
    return KVLayout(L, 1 if kind is KVKind.MLA else heads, d, T, dtype, kind=kind,
                    model_id="engine-kv-test")


def _pool(layout: KVLayout, slots: int = 8, columns: int = 1) -> SharedHostPool:
    return SharedHostPool.create(layout, slots, tag_columns=columns,
                                 prefix=f"kvbmtest{secrets.token_hex(4)}")


def _engine_tensor(fmt: str, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One layer in ``fmt`` holding K and V (each ``[N, T, H, D]``), written by hand from the
    format's definition."""
    n, t, h, d = k.shape
    if fmt == "flash":  # [2, N, T, H, D]
        return torch.stack([k, v])
    if fmt.startswith("flash_packed"):  # [N, H, T, 2D]: per token and head, K then V
        if fmt.endswith("hnd"):
            x = torch.empty((n, h, t, 2 * d), dtype=k.dtype)
        else:  # token-major memory, the same logical shape
            x = torch.empty((n, t, h, 2 * d), dtype=k.dtype).transpose(1, 2)
        x.transpose(1, 2)[..., :d] = k
        x.transpose(1, 2)[..., d:] = v
        return x
    x = torch.empty((n, h, t, 2 * d), dtype=k.dtype)
    flat = x.view(n, h, 2, t * d)  # per block and head: the K area, then the V area
    if fmt == "cpu_vec":  # K as [D, T], V as [T, D]
        flat[:, :, 0] = k.permute(0, 2, 3, 1).reshape(n, h, -1)
        flat[:, :, 1] = v.permute(0, 2, 1, 3).reshape(n, h, -1)
    else:  # cpu_amx: K as [T/16, D/2, 16, 2], V as [D/16, T/2, 16, 2]
        kk = k.permute(0, 2, 1, 3).reshape(n, h, t // 16, 16, d // 2, 2)
        flat[:, :, 0] = kk.permute(0, 1, 2, 4, 3, 5).reshape(n, h, -1)
        vv = v.permute(0, 2, 1, 3).reshape(n, h, t // 2, 2, d // 16, 16)
        flat[:, :, 1] = vv.permute(0, 1, 4, 2, 5, 3).reshape(n, h, -1)
    return x


def _engine(fmt: str, layers: list[torch.Tensor], layout: KVLayout, **kw) -> EngineKV:
    if fmt.startswith("cpu"):
        kw["cpu_packing"] = CpuPacking.VEC if fmt == "cpu_vec" else CpuPacking.AMX
    elif fmt.startswith("flash_packed"):
        kw["kv_format"] = EngineKVFormat.FLASH_PACKED  # on a CPU tensor: named, not detected
    return EngineKV(layers, layout, **kw)


def _kv(dtype: torch.dtype, seed: int, heads: int = H, d: int = D):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn((N, T, heads, d), generator=g).to(dtype),
             torch.randn((N, T, heads, d), generator=g).to(dtype)) for _ in range(L)]


def _plan(direction: Direction, pairs, plan_id: int = 1) -> TransferPlan:
    return TransferPlan(plan_id, direction, tuple(BlockCopy(b, s, h) for b, s, h in pairs))


# -- formats --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", MHA_FORMATS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mha_round_trip_and_canonical_pages(fmt, dtype):
    lay = _layout(dtype)
    kv = _kv(lay.torch_dtype(), seed=1)
    src = _engine(fmt, [_engine_tensor(fmt, k, v) for k, v in kv], lay)
    assert src.num_blocks == N and src.local_heads == H and src.head_range == slice(0, H)
    assert src.format.value == fmt.split("_")[0] + ("_packed" if "packed" in fmt else "")
    # blocks 4, 1, 2 -> slots 3, 0, 7: scattered on both sides (the gather/scatter path)
    pairs = [(4, 3, 11), (1, 0, 12), (2, 7, 13)]
    with _pool(lay) as pool:
        mover = BlockMover(src, pool)
        assert mover.save(_plan(Direction.SAVE, pairs)).statuses == (CopyStatus.DONE,) * 3
        assert pool.tags[[3, 0, 7], 0].tolist() == [11, 12, 13]
        for li, (k, v) in enumerate(kv):
            for b, s, _ in pairs:
                assert torch.equal(pool.buffer[s, li, 0], k[b])  # canonical [T, H, D]
                assert torch.equal(pool.buffer[s, li, 1], v[b])
        # One element by hand, from the engine's raw memory: a transposition would differ.
        raw = _engine_tensor(fmt, *kv[2]).contiguous()
        b, t, h, d = 4, 5, 1, 9
        want_k, want_v = kv[2][0][b, t, h, d], kv[2][1][b, t, h, d]
        if fmt == "cpu_vec":
            assert raw.view(-1)[((b * H + h) * 2 + 0) * T * D + d * T + t] == want_k
            assert raw.view(-1)[((b * H + h) * 2 + 1) * T * D + t * D + d] == want_v
        elif fmt == "flash":
            assert raw[0, b, t, h, d] == want_k and raw[1, b, t, h, d] == want_v
        elif fmt.startswith("flash_packed"):
            assert raw[b, h, t, d] == want_k and raw[b, h, t, D + d] == want_v
        assert pool.buffer[3, 2, 0, t, h, d] == want_k
        assert pool.buffer[3, 2, 1, t, h, d] == want_v
        # back into other blocks of a zeroed engine
        dst_layers = [torch.zeros_like(_engine_tensor(fmt, k, v)) for k, v in kv]
        dst = _engine(fmt, dst_layers, lay)
        back = [(0, 3, 11), (5, 0, 12), (3, 7, 13)]
        res = BlockMover(dst, pool).load(_plan(Direction.LOAD, back, 2))
        assert res.ok and res.rank == 0
        for li, (k, v) in enumerate(kv):
            assert torch.equal(dst.plane(li, 0)[[0, 5, 3]], k[[4, 1, 2]])
            assert torch.equal(dst.plane(li, 1)[[0, 5, 3]], v[[4, 1, 2]])
            assert not dst.plane(li, 0)[[1, 2, 4]].any()  # nothing else written


def test_cpu_format_one_local_head_with_a_degenerate_stride():
    # TP rank 1 of 2 with 2 KV heads holds one head; a size-1 dim may carry any stride.
    lay = _layout("float16")
    kv = _kv(torch.float16, seed=4, heads=1)
    layers = []
    for k, v in kv:
        dense = _engine_tensor("cpu_vec", k, v)
        odd = torch.empty((N * T * 2 * D,), dtype=torch.float16).as_strided(
            (N, 1, T, 2 * D), (T * 2 * D, 1, 2 * D, 1))
        odd.copy_(dense)
        layers.append(odd)
    e = EngineKV(layers, lay, shard=TPShard(1, 2), cpu_packing=CpuPacking.VEC)
    assert e.head_range == slice(1, 2)
    with _pool(lay, columns=2) as pool:
        assert BlockMover(e, pool).save(_plan(Direction.SAVE, [(5, 2, 8)])).ok
        assert pool.tags[2].tolist() == [0, 8]
        assert torch.equal(pool.buffer[2, 1, 0, :, 1], kv[1][0][5, :, 0])
        assert torch.equal(pool.buffer[2, 1, 1, :, 1], kv[1][1][5, :, 0])
        assert not pool.buffer[2, :, :, :, 0].any()  # rank 0's head: not this rank's to write


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("extra_dim", [False, True])
def test_mla_round_trip(dtype, extra_dim):
    lay = _layout(dtype, KVKind.MLA, d=96)
    g = torch.Generator().manual_seed(2)
    lat = [torch.randn((N, T, 96), generator=g).to(lay.torch_dtype()) for _ in range(L)]
    layers = [x.unsqueeze(1).clone() if extra_dim else x.clone() for x in lat]
    src = EngineKV(layers, lay)
    assert src.format is EngineKVFormat.MLA and src.tiles == ((1, T, 1, 96),)
    with _pool(lay) as pool:
        # adjacent blocks to adjacent slots: the run (memcpy) path
        pairs = [(1, 4, 21), (2, 5, 22), (3, 6, 23)]
        assert BlockMover(src, pool).save(_plan(Direction.SAVE, pairs)).ok
        for li in range(L):
            assert torch.equal(pool.buffer[4:7, li, 0, :, 0], lat[li][1:4])
        assert pool.buffer[5, 1, 0, 7, 0, 33] == lat[1][2, 7, 33]
        dst = EngineKV([torch.zeros_like(x) for x in layers], lay)
        assert BlockMover(dst, pool).load(_plan(Direction.LOAD, pairs, 2)).ok
        for li in range(L):
            assert torch.equal(dst.plane(li, 0)[1:4, :, 0], lat[li][1:4])


@pytest.mark.parametrize("packing,isa", [(CpuPacking.VEC, "vec"), (CpuPacking.AMX, "amx")])
def test_cpu_views_match_what_vllms_kernel_writes(packing, isa):
    # The ground truth: vLLM's own cache-write kernel (its AMX packing runs without AMX).
    ops = pytest.importorskip("vllm._custom_ops")
    lay = KVLayout(1, H, D, T, "bfloat16")
    kv = torch.zeros((N, H, T, 2 * D), dtype=torch.bfloat16)
    kc, vc = kv.view(N, H, 2 * T, D).chunk(2, dim=2)  # as vLLM's CPU backend does
    g = torch.Generator().manual_seed(3)
    key = torch.randn((N * T, H, D), generator=g).to(torch.bfloat16)
    val = torch.randn((N * T, H, D), generator=g).to(torch.bfloat16)
    ops.cpu_attn_reshape_and_cache(key, val, kc, vc, torch.arange(N * T), isa)
    e = EngineKV([kv], lay, cpu_packing=packing)
    assert torch.equal(e.plane(0, 0).reshape(N * T, H, D), key)
    assert torch.equal(e.plane(0, 1).reshape(N * T, H, D), val)
    # and the other packing reads something else: the check can fail
    other = CpuPacking.AMX if packing is CpuPacking.VEC else CpuPacking.VEC
    assert not torch.equal(EngineKV([kv], lay, cpu_packing=other).plane(0, 0).reshape(
        N * T, H, D), key)


def test_cpu_packing_names_and_detection():
    assert CpuPacking.for_vllm_isa("vec16") is CpuPacking.VEC
    assert CpuPacking.for_vllm_isa("amx") is CpuPacking.AMX
    with pytest.raises(LayoutError, match="neon"):
        CpuPacking.for_vllm_isa("neon")
    lay = _layout("float16")  # fp16 never takes vLLM's AMX kernel
    e = EngineKV([torch.zeros((N, H, T, 2 * D), dtype=torch.float16) for _ in range(L)], lay)
    assert e.format is EngineKVFormat.CPU and e.cpu_packing is CpuPacking.VEC


def test_views_are_zero_copy_and_names_index_layers():
    lay = _layout("bfloat16")
    layers = {f"model.layers.{i}.attn": torch.zeros((2, N, T, H, D), dtype=torch.bfloat16)
              for i in range(L)}
    e = EngineKV(layers, lay)
    assert e.format is EngineKVFormat.FLASH and e.names == tuple(layers)
    assert e.layer_index("model.layers.2.attn") == 2
    e.planes(1)[1][3, 0, 5, 1, 0, 7] = 2.5
    assert layers["model.layers.1.attn"][1, 3, 5, 1, 7] == 2.5
    with pytest.raises(InvalidArgumentError):
        e.layer_index("nope")
    for bad in (-1, L, 1.0, True):
        with pytest.raises(InvalidArgumentError):
            e.planes(bad)


# -- what is refused ------------------------------------------------------------------------
@pytest.mark.parametrize("shape,match", [
    ((N, T, H, D), r"shape \(6, 32, 2, 64\)"),               # no K/V dim at all
    ((2, N, T, H + 1, D), r"expected \[N, 2, 32, 128\]"),    # wrong head count
    ((N, H, T, D), r"2, 32, 64\)"),                          # packed, half the width
    ((3, N, T, H, D), r"\[2, N, 32, 2, 64\]"),               # not K and V
    ((N, H, 16, 2 * D), "block_size 32"),                    # another block size
])
def test_unknown_shapes_raise_layout_error_naming_seen_and_expected(shape, match):
    lay = _layout("bfloat16")
    with pytest.raises(LayoutError, match=match):
        EngineKV([torch.zeros(shape, dtype=torch.bfloat16) for _ in range(L)], lay)


def test_dtype_count_mixed_layers_and_heads_are_refused():
    lay = _layout("bfloat16")

    def t(*shape, dtype=torch.bfloat16):
        return torch.zeros(shape, dtype=dtype)

    with pytest.raises(LayoutError, match="dtype"):
        EngineKV([t(2, N, T, H, D, dtype=torch.float16) for _ in range(L)], lay)
    with pytest.raises(LayoutError, match="2 KV tensors given, the layout has 3"):
        EngineKV([t(2, N, T, H, D) for _ in range(L - 1)], lay)
    with pytest.raises(LayoutError, match="all layers must agree"):
        EngineKV([t(2, N, T, H, D), t(2, N + 1, T, H, D), t(2, N, T, H, D)], lay)
    with pytest.raises(LayoutError, match="all layers must agree"):
        EngineKV([t(2, N, T, H, D), t(N, H, T, 2 * D), t(2, N, T, H, D)], lay)
    with pytest.raises(LayoutError, match="do not split evenly"):
        EngineKV([t(2, N, T, 1, D) for _ in range(L)], _layout("bfloat16", heads=3),
                 shard=TPShard(0, 2))
    with pytest.raises(LayoutError, match="dense within a block"):  # the CPU kernel's rule
        EngineKV([t(N, H, 2 * T, 2 * D)[:, :, :T] for _ in range(L)], lay)
    with pytest.raises(LayoutError, match="no blocks"):
        EngineKV([t(0, H, T, 2 * D) for _ in range(L)], lay)
    with pytest.raises(LayoutError, match=r"\[N, 32, 64\] or \[N, 1, 32, 64\]"):
        EngineKV([t(2, N, T, 1, D) for _ in range(L)], _layout("bfloat16", KVKind.MLA))
    with pytest.raises(LayoutError, match="verified for block_size and head_dim"):
        EngineKV([t(N, H, 16, 2 * D) for _ in range(L)], KVLayout(L, H, D, 16, "bfloat16"),
                 cpu_packing=CpuPacking.AMX)
    with pytest.raises(LayoutError, match="on CUDA"):  # a packed shape named flash: refused
        EngineKV([t(2, N, T, H, D) for _ in range(L)], lay,
                 kv_format=EngineKVFormat.FLASH_PACKED)


@pytest.mark.parametrize("kwargs", [
    dict(layers="abc"), dict(layers=[1, 2, 3]), dict(layers={1: None}),
    dict(layout="layout"), dict(shard=(0, 1)), dict(kv_format="flash"),
    dict(cpu_packing="vec"),
])
def test_bad_arguments_are_invalid_argument_errors(kwargs):
    args = dict(layers=[torch.zeros((2, N, T, H, D), dtype=torch.bfloat16)] * L,
                layout=_layout("bfloat16"))
    args.update(kwargs)
    layers, layout = args.pop("layers"), args.pop("layout")
    with pytest.raises(InvalidArgumentError):
        EngineKV(layers, layout, **args)


@pytest.mark.parametrize("rank,world", [(-1, 2), (2, 2), (0, 0), (True, 2), (0, 1.0)])
def test_tp_shard_validation(rank, world):
    with pytest.raises(InvalidArgumentError):
        TPShard(rank, world)


def test_tp_properties():
    mha, mla = _layout("bfloat16", heads=4), _layout("bfloat16", KVKind.MLA)
    assert tag_columns_needed(mha, 4) == 4 and tag_columns_needed(mla, 4) == 1
    r1 = EngineKV([torch.zeros((2, N, T, 2, D), dtype=torch.bfloat16)] * L, mha,
                  shard=TPShard(1, 2))
    assert r1.head_range == slice(2, 4) and r1.tag_column == 1 and r1.writes_pages
    assert r1.tag_columns == (0, 1)
    m1 = EngineKV([torch.zeros((N, T, D), dtype=torch.bfloat16)] * L, mla, shard=TPShard(1, 2))
    assert m1.head_range == slice(0, 1) and m1.tag_column == 0 and not m1.writes_pages
    assert m1.tag_columns == (0,)


def test_check_block_ids():
    e = EngineKV([torch.zeros((2, N, T, H, D), dtype=torch.bfloat16)] * L, _layout("bfloat16"))
    assert e.check_block_ids([0, N - 1]) == [0, N - 1]
    with pytest.raises(BlockIdError):
        e.check_block_ids([N])
    with pytest.raises(BlockIdError):
        e.check_block_ids([-1])
    for bad in (1.0, True, "1", None):
        with pytest.raises(BlockIdTypeError):
            e.check_block_ids([bad])
