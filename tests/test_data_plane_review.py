"""Adversarial review of the data plane under the vLLM connector (kvbm.memory.shm, engine_kv,
mover, core.plans): each test is a way a page that is not the block's could reach the engine,
or a copy could be reported done without happening."""

from __future__ import annotations

import secrets

import pytest
import torch

from kvbm import KVLayout
from kvbm.core.plans import BlockCopy, CopyStatus, Direction, TransferPlan
from kvbm.errors import InvalidArgumentError, LayoutError
from kvbm.memory.engine_kv import EngineKV, TPShard
from kvbm.memory.mover import BlockMover
from kvbm.memory.shm import SharedHostPool

N, T, D, L = 5, 16, 8, 2
MHA = KVLayout(L, 4, D, T, "bfloat16", model_id="review")


def _pool(columns: int) -> SharedHostPool:
    return SharedHostPool.create(MHA, 4, tag_columns=columns,
                                 prefix=f"kvbmreview{secrets.token_hex(4)}")


def _plan(direction: Direction, pairs) -> TransferPlan:
    return TransferPlan(1, direction, tuple(BlockCopy(b, s, h) for b, s, h in pairs))


def test_a_mover_of_another_tp_degree_than_the_pools_writers_is_refused():
    """A pool written by 2 ranks (2 tag columns) read by a TP=1 mover: it would check column
    0 only and load heads 2-3, which rank 1 never wrote for this block."""
    g = torch.Generator().manual_seed(3)
    full = [torch.randn((2, N, T, 4, D), generator=g).to(torch.bfloat16) for _ in range(L)]
    with _pool(columns=2) as pool:
        rank0 = EngineKV([x[:, :, :, 0:2].clone() for x in full], MHA, shard=TPShard(0, 2))
        assert BlockMover(rank0, pool).save(_plan(Direction.SAVE, [(1, 2, 99)])).ok
        assert pool.tags[2].tolist() == [99, 0]  # rank 1's half is not there
        whole = EngineKV([torch.zeros_like(x) for x in full], MHA)
        with pytest.raises(InvalidArgumentError, match="tag_columns"):
            BlockMover(whole, pool)


def test_kv_tensors_without_storage_are_refused():
    """Meta tensors hold no bytes: a load "into" them would be reported DONE with nothing
    copied, a save would store whatever the page held."""
    meta = [torch.empty((2, N, T, 4, D), dtype=torch.bfloat16, device="meta") for _ in range(L)]
    with pytest.raises(LayoutError):
        EngineKV(meta, MHA)


def test_a_load_never_reports_done_for_a_page_it_did_not_copy():
    """Control: an ordinary TP=1 round trip still works under the stricter checks."""
    g = torch.Generator().manual_seed(4)
    full = [torch.randn((2, N, T, 4, D), generator=g).to(torch.bfloat16) for _ in range(L)]
    with _pool(columns=1) as pool:
        src = EngineKV([x.clone() for x in full], MHA)
        assert BlockMover(src, pool).save(_plan(Direction.SAVE, [(3, 0, 7)])).ok
        dst_t = [torch.zeros_like(x) for x in full]
        res = BlockMover(EngineKV(dst_t, MHA), pool).load(
            _plan(Direction.LOAD, [(1, 0, 7), (2, 1, 7 + 1)]))
        assert res.statuses == (CopyStatus.DONE, CopyStatus.MISMATCH)
        for li in range(L):
            assert torch.equal(dst_t[li][:, 1], full[li][:, 3])
            assert not dst_t[li][:, 2].any()


@pytest.mark.parametrize("shape", [(2, 1, T, 4, D), (1, 4, T, 2 * D)])
def test_kv_tensors_whose_blocks_alias_each_other_are_refused(shape):
    """An expanded tensor (stride 0 over blocks): a load of one block would write every
    block, and report DONE."""
    full = (2, N, T, 4, D) if len(shape) == 5 else (N, 4, T, 2 * D)
    layers = [torch.zeros(shape, dtype=torch.bfloat16).expand(full) for _ in range(L)]
    with pytest.raises(LayoutError, match="overlap"):
        EngineKV(layers, MHA)
