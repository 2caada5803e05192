"""The block mover (kvbm.memory.mover) across tensor-parallel ranks, and when pages are not
what a plan expects: tags, bad ids, malformed plans. Ranks are fake (no vLLM): each has its
own shard tensors; the two-process test spawns real processes attached to one shared pool
by name."""

from __future__ import annotations

import multiprocessing
import secrets

import numpy as np
import pytest
import torch

from kvbm import KVLayout
from kvbm.core.plans import BlockCopy, CopyStatus, Direction, TransferPlan
from kvbm.errors import InvalidArgumentError, LayoutMismatchError
from kvbm.layout import KVKind
from kvbm.memory.engine_kv import EngineKV, TPShard
from kvbm.memory.mover import BlockMover, LoadHandle
from kvbm.memory.shm import SharedHostPool
from kvbm.pool import HostPool

N, T, D, L = 5, 16, 8, 2
#: 4 KV heads over 2 ranks: 2 each
MHA = KVLayout(L, 4, D, T, "bfloat16", model_id="tp-test")
MLA = KVLayout(L, 1, 24, T, "bfloat16", model_id="tp-test", kind=KVKind.MLA)
SPAWN = multiprocessing.get_context("spawn")
#: The longest a test waits for a child (a guard against hangs, not a timing assertion).
WAIT_S = 120


def _pool(layout: KVLayout, columns: int, slots: int = 6) -> SharedHostPool:
    return SharedHostPool.create(layout, slots, tag_columns=columns,
                                 prefix=f"kvbmtest{secrets.token_hex(4)}")


def _full_kv(seed: int) -> list[torch.Tensor]:
    """Per layer, the whole model's KV of every block in flash format [2, N, T, 4, D]."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((2, N, T, 4, D), generator=g).to(torch.bfloat16) for _ in range(L)]


def _shard(full: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    return [x[:, :, :, 2 * rank:2 * rank + 2].clone() for x in full]


def _rank(layers: list[torch.Tensor], rank: int, layout: KVLayout = MHA) -> EngineKV:
    return EngineKV(layers, layout, shard=TPShard(rank, 2))


def _plan(direction: Direction, pairs, plan_id: int = 1) -> TransferPlan:
    return TransferPlan(plan_id, direction, tuple(BlockCopy(b, s, h) for b, s, h in pairs))


# -- tensor parallelism ---------------------------------------------------------------------
def test_two_ranks_fill_one_page_and_load_their_own_heads():
    full = _full_kv(1)
    with _pool(MHA, columns=2) as pool:
        ranks = [_rank(_shard(full, r), r) for r in range(2)]
        save = _plan(Direction.SAVE, [(3, 1, 77)])
        # rank 0 alone: the page is not whole, nobody may load it
        assert BlockMover(ranks[0], pool).save(save).ok
        assert pool.tags[1].tolist() == [77, 0]
        probe = _rank([torch.full_like(x, 9) for x in _shard(full, 0)], 0)
        res = BlockMover(probe, pool).load(_plan(Direction.LOAD, [(0, 1, 77)]))
        assert res.statuses == (CopyStatus.MISMATCH,)
        assert bool((probe.plane(0, 0) == 9).all())  # G1 left as it was
        assert BlockMover(ranks[1], pool).save(save).ok
        assert pool.tags[1].tolist() == [77, 77]
        for li in range(L):  # the page holds all 4 heads, canonical [planes, T, H, D]
            assert torch.equal(pool.buffer[1, li], full[li][:, 3])
        for r in range(2):
            dst = _rank([torch.zeros_like(x) for x in _shard(full, r)], r)
            res = BlockMover(dst, pool).load(_plan(Direction.LOAD, [(4, 1, 77)]))
            assert res.ok and res.rank == r
            for li in range(L):
                assert torch.equal(dst.planes(li)[0][4, 0, :, :, 0],
                                   full[li][0, 3, :, 2 * r:2 * r + 2])
                assert torch.equal(dst.planes(li)[1][4, 0, :, :, 0],
                                   full[li][1, 3, :, 2 * r:2 * r + 2])


def _child_rank(name: str, layout: dict, rank: int, seed: int, conn) -> None:
    """One fake TP rank in its own process: save its shard of blocks 0 and 2, wait for the
    other rank's tags, load both pages into fresh tensors and report what matched."""
    lay = KVLayout.from_dict(layout)
    pool = SharedHostPool.attach(name, lay)
    full = _full_kv(seed)
    kv = _rank(_shard(full, rank), rank, lay)
    mover = BlockMover(kv, pool)
    saved = mover.save(_plan(Direction.SAVE, [(0, 4, 1001), (2, 5, 1002)]))
    conn.send(("saved", [s.value for s in saved.statuses]))
    conn.recv()  # the parent saw both ranks' saves
    dst = _rank([torch.zeros_like(x) for x in _shard(full, rank)], rank, lay)
    loaded = BlockMover(dst, pool).load(_plan(Direction.LOAD, [(1, 4, 1001), (3, 5, 1002)]))
    same = all(torch.equal(dst.planes(li)[p][[1, 3]], kv.planes(li)[p][[0, 2]])
               for li in range(L) for p in range(2))
    pool.close()
    conn.send(("loaded", [s.value for s in loaded.statuses], same))


def test_two_processes_attached_by_name_share_pages():
    full = _full_kv(5)
    with _pool(MHA, columns=2) as pool:
        conns, procs = [], []
        for r in range(2):
            parent, child = SPAWN.Pipe()
            p = SPAWN.Process(target=_child_rank, args=(pool.name, MHA.to_dict(), r, 5, child))
            p.start()
            conns.append(parent)
            procs.append(p)
        try:
            for c in conns:
                assert c.poll(WAIT_S), "a rank did not answer"
                assert c.recv() == ("saved", ["done", "done"])
            assert pool.tags[4:6].tolist() == [[1001, 1001], [1002, 1002]]
            for li in range(L):
                assert torch.equal(pool.buffer[4, li], full[li][:, 0])
                assert torch.equal(pool.buffer[5, li], full[li][:, 2])
            for c in conns:
                c.send("go")
            for c in conns:
                assert c.poll(WAIT_S), "a rank did not answer"
                assert c.recv() == ("loaded", ["done", "done"], True)
        finally:
            for p in procs:
                p.join(WAIT_S)
                if p.is_alive():
                    p.kill()
        assert [p.exitcode for p in procs] == [0, 0]


def test_mla_page_is_written_once_by_rank_zero_and_read_by_every_rank():
    g = torch.Generator().manual_seed(2)
    lat = [torch.randn((N, T, 24), generator=g).to(torch.bfloat16) for _ in range(L)]
    with _pool(MLA, columns=1) as pool:
        r0 = _rank([x.clone() for x in lat], 0, MLA)
        r1 = _rank([torch.full_like(x, 3) for x in lat], 1, MLA)  # differs: must not be stored
        save = _plan(Direction.SAVE, [(2, 0, 55)])
        assert BlockMover(r1, pool).save(save).ok  # nothing to do on rank 1
        assert pool.tags[0, 0] == 0 and not pool.buffer[0].any()
        assert BlockMover(r0, pool).save(save).ok
        assert BlockMover(r1, pool).save(save).ok
        assert pool.tags[0, 0] == 55
        for li in range(L):
            assert torch.equal(pool.buffer[0, li, 0, :, 0], lat[li][2])  # rank 0's, not 3s
        for r in range(2):
            dst = _rank([torch.zeros_like(x) for x in lat], r, MLA)
            assert BlockMover(dst, pool).load(_plan(Direction.LOAD, [(4, 0, 55)])).ok
            for li in range(L):
                assert torch.equal(dst.plane(li, 0)[4, :, 0], lat[li][2])


# -- pages that are not the block's, bad ids, bad plans -------------------------------------
def _one_rank(full: list[torch.Tensor]) -> EngineKV:
    return EngineKV([x.clone() for x in full], MHA)


@pytest.mark.parametrize("damage", ["overwritten", "empty", "half", "slot", "block"])
def test_a_page_that_is_not_the_blocks_is_never_loaded(damage):
    full = _full_kv(3)
    with _pool(MHA, columns=1, slots=4) as pool:
        src = _one_rank(full)
        mover = BlockMover(src, pool)
        assert mover.save(_plan(Direction.SAVE, [(0, 0, 10), (1, 1, 11), (2, 2, 12)])).ok
        dst = _one_rank([torch.full_like(x, 7) for x in full])
        pairs = [(3, 0, 10), (4, 1, 11), (2, 2, 12)]
        if damage == "overwritten":  # another block saved into slot 1 since
            mover.save(_plan(Direction.SAVE, [(4, 1, 99)], 2))
        elif damage == "empty":
            pool.tags[1, 0] = 0
        elif damage == "half":  # a writer that died between tag 0 and its copy
            pool.tags[1, 0] = 0
            pool.buffer[1].zero_()
        elif damage == "slot":
            pairs[1] = (4, 4, 11)  # beyond the pool
        else:
            pairs[1] = (N, 1, 11)  # beyond the engine
        res = BlockMover(dst, pool).load(_plan(Direction.LOAD, pairs, 3))
        bad = CopyStatus.FAILED if damage in ("slot", "block") else CopyStatus.MISMATCH
        assert res.statuses == (CopyStatus.DONE, bad, CopyStatus.DONE)
        assert not res.ok
        for li in range(L):
            for p in range(2):
                got = dst.planes(li)[p][:, 0, :, :, 0]
                assert torch.equal(got[3], full[li][p, 0])
                assert torch.equal(got[2], full[li][p, 2])
                # the failed block keeps what it had: nothing of the page reached G1
                assert bool((got[4] == 7).all())


class _WriterStrikes(SharedHostPool):
    """A shared pool where another writer changes one slot's tag the moment a mover reaches
    for the pages, i.e. between a load's tag check before its copy and the one after."""

    strike: tuple[int, int] | None = None

    @property
    def buffer(self) -> torch.Tensor:
        buf = SharedHostPool.buffer.fget(self)  # type: ignore[attr-defined]
        if self.strike is not None:
            slot, tag = self.strike
            self.strike = None
            self.tags[slot, 0] = tag
        return buf

    @buffer.setter
    def buffer(self, value: torch.Tensor) -> None:
        SharedHostPool.buffer.fset(self, value)  # type: ignore[attr-defined]


@pytest.mark.parametrize("race", ["overwritten_during_copy", "finished_during_copy"])
def test_a_page_that_changes_while_it_is_copied_is_never_loaded(race):
    full = _full_kv(10)
    pool = _WriterStrikes.create(MHA, 4, tag_columns=1, prefix=f"kvbmtest{secrets.token_hex(4)}")
    with pool:
        assert BlockMover(_one_rank(full), pool).save(
            _plan(Direction.SAVE, [(0, 0, 10), (1, 1, 11)])).ok
        if race == "overwritten_during_copy":  # tag right before, another block's after
            pool.strike = (1, 99)
        else:  # tag 0 (being written) before, the right one after: the copy may be torn
            pool.tags[1, 0] = 0
            pool.strike = (1, 11)
        dst = _one_rank([torch.full_like(x, 7) for x in full])
        res = BlockMover(dst, pool).load(_plan(Direction.LOAD, [(2, 0, 10), (3, 1, 11)]))
        assert pool.strike is None  # the writer did strike
        assert res.statuses == (CopyStatus.DONE, CopyStatus.MISMATCH)
        assert bool((dst.planes(0)[0][3] == 7).all())
        assert torch.equal(dst.planes(0)[0][2, 0, :, :, 0], full[0][0, 0])


def test_a_large_load_is_staged_in_chunks_through_one_buffer(monkeypatch):
    from kvbm.memory import mover as mover_module

    full = _full_kv(11)
    with _pool(MHA, columns=1) as pool:
        assert BlockMover(_one_rank(full), pool).save(
            _plan(Direction.SAVE, [(b, b, 100 + b) for b in range(5)])).ok
        pool.tags[2, 0] = 0
        # two blocks a chunk: chunks (4, 3), (2, 1), (0)
        monkeypatch.setattr(mover_module, "_STAGE_BYTES", 2 * MHA.bytes_per_block)
        dst = _one_rank([torch.full_like(x, 7) for x in full])
        res = BlockMover(dst, pool).load(_plan(Direction.LOAD, [(b, 4 - b, 104 - b)
                                                                 for b in range(5)]))
        assert res.statuses == (CopyStatus.DONE,) * 2 + (CopyStatus.MISMATCH,) \
            + (CopyStatus.DONE,) * 2
        for li in range(L):
            for b in (0, 1, 3, 4):
                assert torch.equal(dst.planes(li)[1][b, 0, :, :, 0], full[li][1, 4 - b])
            assert bool((dst.planes(li)[0][2] == 7).all())


def test_bad_ids_in_a_save_fail_alone_and_leave_no_tag():
    full = _full_kv(4)
    with _pool(MHA, columns=1, slots=4) as pool:
        mover = BlockMover(_one_rank(full), pool)
        res = mover.save(_plan(Direction.SAVE, [(0, 0, 1), (N, 1, 2), (1, 9, 3), (2, 2, 4)]))
        assert res.statuses == (CopyStatus.DONE, CopyStatus.FAILED, CopyStatus.FAILED,
                                CopyStatus.DONE)
        assert pool.tags[:, 0].tolist() == [1, 0, 4, 0]
        assert not pool.buffer[1].any()


def test_a_block_loaded_twice_in_one_plan_fails_the_second():
    full = _full_kv(6)
    with _pool(MHA, columns=1) as pool:
        mover = BlockMover(_one_rank(full), pool)
        assert mover.save(_plan(Direction.SAVE, [(0, 0, 1), (1, 1, 2)])).ok
        res = mover.load(_plan(Direction.LOAD, [(3, 0, 1), (3, 1, 2)]))
        assert res.statuses == (CopyStatus.DONE, CopyStatus.FAILED)


def test_malformed_plans_and_pools_are_refused():
    full = _full_kv(7)
    kv = _one_rank(full)
    with _pool(MHA, columns=1) as pool:
        mover = BlockMover(kv, pool)
        for bad in (None, "plan", [BlockCopy(0, 0, 1)], _plan(Direction.SAVE, []).to_plain()):
            with pytest.raises(InvalidArgumentError):
                mover.save(bad)
            with pytest.raises(InvalidArgumentError):
                mover.load(bad)
        with pytest.raises(InvalidArgumentError, match="load plan"):
            mover.save(_plan(Direction.LOAD, [(0, 0, 1)]))
        with pytest.raises(InvalidArgumentError, match="save plan"):
            mover.start_load(_plan(Direction.SAVE, [(0, 0, 1)]))
        assert not pool.tags.any()
        with pytest.raises(InvalidArgumentError):
            BlockMover("kv", pool)
    with pytest.raises(InvalidArgumentError, match="tags"):
        BlockMover(kv, HostPool(MHA, 2))  # a pool without tags
    other = KVLayout(L, 4, D, T, "bfloat16", model_id="another model")
    with _pool(other, columns=1) as pool, pytest.raises(LayoutMismatchError):
        BlockMover(kv, pool)
    two = _rank(_shard(full, 1), 1)
    with _pool(MHA, columns=1) as pool, pytest.raises(InvalidArgumentError, match="tag_columns=2"):
        BlockMover(two, pool)  # a rank's column is missing


def test_load_handle_waits_and_finishes_once():
    full = _full_kv(8)
    with _pool(MHA, columns=1) as pool:
        mover = BlockMover(_one_rank(full), pool)
        assert mover.save(_plan(Direction.SAVE, [(0, 0, 1)])).ok
        dst = _one_rank([torch.zeros_like(x) for x in full])
        h = BlockMover(dst, pool).start_load(_plan(Direction.LOAD, [(2, 0, 1)]))
        assert isinstance(h, LoadHandle)
        for li in range(L):
            h.wait_layer(li)
        for bad in (-1, L, 0.0, None):
            with pytest.raises(InvalidArgumentError):
                h.wait_layer(bad)
        assert h.finish() is h.finish()
        assert h.finish().ok
        assert torch.equal(dst.planes(1)[0][2, 0, :, :, 0], full[1][0, 0])


# -- CUDA -----------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
def test_flash_on_cuda_round_trip_layer_by_layer(packed):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    full = _full_kv(9)
    if packed:  # vLLM 0.32's [N, H, T, 2D]: per token and head, K then V
        layers = [torch.cat([x[0], x[1]], dim=-1).transpose(1, 2).contiguous().cuda()
                  for x in full]
    else:
        layers = [x.cuda() for x in full]
    with _pool(MHA, columns=1) as pool:
        src = EngineKV(layers, MHA)
        assert src.device.type == "cuda"
        pairs = [(0, 2, 5), (1, 3, 6), (4, 0, 7)]
        assert BlockMover(src, pool).save(_plan(Direction.SAVE, pairs)).ok
        for li in range(L):
            for b, s, _ in pairs:
                assert torch.equal(pool.buffer[s, li], full[li][:, b])
        pool.tags[0, 0] = 0  # block 4's page: must not reach G1
        dst_layers = [torch.full_like(x, 7) for x in layers]
        dst = EngineKV(dst_layers, MHA)
        h = BlockMover(dst, pool).start_load(_plan(Direction.LOAD, [(3, 2, 5), (2, 3, 6),
                                                                     (1, 0, 7)]))
        for li in range(L):
            h.wait_layer(li)
            for p in range(2):  # read on the engine's stream, after the wait
                got = dst.planes(li)[p][:, 0, :, :, 0]
                assert torch.equal(got[3].cpu(), full[li][p, 0])
                assert torch.equal(got[2].cpu(), full[li][p, 1])
                assert bool((got[1] == 7).all())
        assert h.finish().statuses == (CopyStatus.DONE, CopyStatus.DONE, CopyStatus.MISMATCH)
        assert np.all(pool.tags[2:4, 0] == [5, 6])
