"""Adversarial review of the vLLM connector: each test here once failed against the code it
names. The two sides run in this process over small fake KV tensors (the harness of
test_connector_sides); vLLM's side of each contract is quoted where it matters."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from test_connector_sides import (  # noqa: E402
    BS,
    MHA,
    WAIT_S,
    CachedReqs,
    Engine,
    NewReq,
    Req,
    SchedOut,
    canonical_page,
    gate_disk,
    save_prompt,
    saved_on_disk,
    seqs,
    settings,
    toks,
)

from kvbm.medium import Medium  # noqa: E402


def g2_idle(eng: Engine) -> bool:
    """No G2 page is held, reserved or in flight: every used page is a cached block."""
    t = eng.sched.mgr.stats(drain=False).tiers[Medium.CPU_PINNED]
    return t.pinned_blocks == 0 and t.used_blocks == t.cached_blocks


def test_an_async_load_aborted_midway_is_still_reported_received_once(tmp_path):
    """vLLM's finish_requests for a request in WAITING_FOR_REMOTE_KVS keeps its blocks
    (delay_free) until a worker reports it in finished_recving, whatever request_finished
    answers; a finished_sending as well would free them twice (vLLM asserts). So an aborted
    asynchronous load must still end in exactly one finished_recving, and its G2 holds must
    be given back."""
    tokens = toks(3 * BS + 6, 31)
    s, _, _ = saved_on_disk(tmp_path, tokens)
    with Engine(s) as eng:
        gate = gate_disk(eng)
        try:
            r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 32)])
            assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)
            eng.step()
            # vLLM sets num_computed_tokens to the promised hit while the load runs.
            r2.num_computed_tokens = 3 * BS
            eng.sched.request_finished(r2, [8, 9, 10, 11])  # the client went away
        finally:
            gate.set()
        recving = sending = 0
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            step = eng.step()
            recving += sum("r2" in r.recving for r in step.ranks)
            sending += sum("r2" in r.sending for r in step.ranks)
            if recving and g2_idle(eng):
                break
            time.sleep(0.01)
        for _ in range(3):  # and never again
            step = eng.step()
            recving += sum("r2" in r.recving for r in step.ranks)
            sending += sum("r2" in r.sending for r in step.ranks)
        assert (recving, sending) == (1, 0)
        assert g2_idle(eng)
        eng.sched.mgr.check_invariants()
        assert eng.sched.reset()  # nothing of r2 is held any more


def _damage_pool_header(eng: Engine) -> None:
    with open(eng.sched.pool.path, "r+b") as f:  # the creator's mapping does not re-read it
        f.seek(40)
        f.write(b"\xff" * 8)


@pytest.mark.parametrize("damage", ["corrupt_header", "missing_file"])
def test_a_worker_that_cannot_attach_the_pool_fails_its_plans_and_still_reports(tmp_path,
                                                                                damage):
    """A pool a worker cannot map (a damaged header, the file gone) is garbage from the other
    side: the worker must not raise into vLLM's execute_model (that takes the engine down),
    and the step's promises still hold: the async request is reported received with its
    blocks as load errors, the saves are reported failed, so that no G2 page stays held."""
    tokens = toks(3 * BS + 6, 33)
    s, _, _ = saved_on_disk(tmp_path, tokens)
    with Engine(s) as eng:
        if damage == "corrupt_header":
            _damage_pool_header(eng)
        else:
            eng.sched.pool.unlink()
        r2 = Req("r2", [*tokens[:3 * BS], *toks(8, 34)])
        assert eng.admit(r2, [8, 9, 10, 11]) == (3 * BS, True)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            step = eng.step()  # raised StorageError out of start_load
            if step.plan.recv_done:
                break
            time.sleep(0.01)
        assert step.plan.recv_done == ["r2"]
        assert step.ranks[0].recving == {"r2"}
        assert step.ranks[0].errors == {8, 9, 10}
        assert eng.sched.counters.load_errors == 3
        # a save planned on such a pool fails, and its reserved pages are given back
        r3 = Req("r3", toks(2 * BS + 3, 35))
        assert eng.admit(r3, [0, 1, 2]) == (0, False)
        step = eng.prefill(r3, [0, 1, 2], 0)
        assert [p.direction.value for p in step.plan.plans] == ["save"]
        assert eng.sched.counters.failed_saves == 2
        assert g2_idle(eng)
        eng.sched.mgr.check_invariants()


# -- KV computed on top of a block that failed to load ------------------------------------------
def _shared_prefix_requests(eng: Engine) -> tuple[list[int], Req, list[int]]:
    """r1 saves 3 blocks; returns its hashes, and r2: r1's first 2 blocks, then 2 blocks and
    a tail of its own (4 full blocks), with r2's hashes."""
    tokens = toks(3 * BS + 4, 41)
    h1 = save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
    r2 = Req("r2", [*tokens[:2 * BS], *toks(2 * BS + 5, 42)])
    return h1, r2, seqs(r2.all_token_ids, eng.s)


def _recompute_from(eng: Engine, req: Req, blocks: list[int], first: int) -> None:
    """vLLM after invalid blocks of a sync load: num_computed_tokens goes back to the first
    invalid block and the next step computes the rest again."""
    n = len(req.all_token_ids)
    so = SchedOut(scheduled_cached_reqs=CachedReqs([req.request_id], [None], [first * BS]),
                  num_scheduled_tokens={req.request_id: n - first * BS})
    hashes = seqs(req.all_token_ids, eng.s)
    eng.step(so, [(blocks[i], hashes[i]) for i in range(first, n // BS)])
    req.num_computed_tokens = n


def assert_saved(eng: Engine, hashes: list[int], in_g2: range) -> None:
    """Every full block is cached, those of ``in_g2`` in G2, and each G2 page is the
    block's."""
    for i, h in enumerate(hashes):
        rec = eng.sched.mgr.lookup(h)
        assert rec is not None, f"block {i} not saved after vLLM recomputed it"
        assert rec.g2 >= 0 or i not in in_g2, f"block {i} not in G2"
        if rec.g2 >= 0:
            assert torch.equal(eng.sched.pool.buffer[rec.g2], canonical_page(MHA, h))
    eng.sched.mgr.flush(timeout=WAIT_S)  # stores to disk hold their pages meanwhile
    assert g2_idle(eng)


def test_blocks_computed_after_a_failed_sync_load_are_not_saved_then(tmp_path):
    """A sync load whose block 1 fails its tag check: vLLM's forward pass of that step
    computes blocks 2 and 3 attending to whatever G1 block 1 held, so their KV is not the
    blocks' (vLLM throws that step's output away and recomputes from block 1). The step's
    SAVE of blocks 2 and 3 must not become cached blocks under their hashes; once vLLM
    recomputed them, they are saved. (With block 1 on disk too, dropping its G2 copy keeps
    it in the index, so the lineage rule does not stop that commit by chance.)"""
    with Engine(settings(disk=tmp_path / "g3")) as eng:
        h1, r2, h2 = _shared_prefix_requests(eng)
        pool, mgr = eng.sched.pool, eng.sched.mgr
        slot = mgr.lookup(h1[1]).g2

        def strike() -> None:
            pool.tags[slot, 0] = 0

        blocks = [8, 9, 10, 11, 12]
        eng.ranks[0].fill(blocks, -7.0)
        assert eng.admit(r2, blocks) == (2 * BS, False)
        step = eng.prefill(r2, blocks, 2 * BS, before_workers=strike)
        assert step.ranks[0].errors == {9}
        assert [p.direction.value for p in step.plan.plans] == ["load", "save"]
        assert mgr.lookup(h2[2]) is None, "KV computed on a failed load was cached"
        assert mgr.lookup(h2[3]) is None
        assert eng.sched.num_new_matched_tokens(Req("probe", r2.all_token_ids), 0)[0] < 3 * BS
        _recompute_from(eng, r2, blocks, 1)
        assert_saved(eng, h2, in_g2=range(2, 4))


def test_a_block_cut_from_a_sync_load_is_never_saved_from_g1_garbage():
    """The prefix kvbm promised shrinks before the load is planned (its G2 copy of block 1
    dropped, so block 1 left the index): block 1 is a load error, never copied into G1.
    The same step must not save G1 block 1 (whatever it held) as block 1's page, nor the
    blocks computed on top of it."""
    with Engine(settings()) as eng:
        h1, r2, h2 = _shared_prefix_requests(eng)
        pool, mgr = eng.sched.pool, eng.sched.mgr
        blocks = [8, 9, 10, 11, 12]
        eng.ranks[0].fill(blocks, -7.0)
        assert eng.sched.num_new_matched_tokens(r2, 0) == (2 * BS, False)
        assert mgr.discard_host([h1[1]]) == 1  # e.g. a lineage cut before the stage
        eng.sched.after_alloc(r2, blocks, 2 * BS)
        step = eng.prefill(r2, blocks, 2 * BS)
        assert step.ranks[0].errors == {9}
        for i in (1, 2, 3):
            rec = mgr.lookup(h2[i])
            assert rec is None or torch.equal(pool.buffer[rec.g2], canonical_page(MHA, h2[i])), \
                f"block {i}: G1 garbage saved as its page"
            assert rec is None, f"block {i} was saved from a step that computed it on garbage"
        _recompute_from(eng, r2, blocks, 1)
        assert_saved(eng, h2, in_g2=range(4))


@pytest.mark.parametrize("failure", ["mismatch", "cut", "pending"])
def test_with_async_scheduling_the_next_steps_saves_on_a_failed_load_are_not_kept(tmp_path,
                                                                                failure):
    """vLLM 0.32 schedules step N+1 before step N's output arrives (async scheduling, its
    default). A chunked prefill whose sync load of block 1 failed in step N computes blocks
    in step N+1 on top of it too, before vLLM learns of the invalid block and rolls back:
    those saves are not the blocks' KV either (nor is G1 block 1). Once vLLM recomputed
    from block 1, all is saved. The failures: block 1's tag (a worker's check); block 1 cut
    from the prefix before the load is planned; block 1's G2 copy gone so that the sync
    promise would need the disk (it cannot wait: vLLM computes in this step)."""
    disk = None if failure == "cut" else tmp_path / "g3"
    with Engine(settings(disk=disk)) as eng:
        h1, r2, h2 = _shared_prefix_requests(eng)
        pool, mgr = eng.sched.pool, eng.sched.mgr
        slot = mgr.lookup(h1[1]).g2
        blocks = [8, 9, 10, 11, 12]
        eng.ranks[0].fill(blocks, -7.0)
        assert eng.sched.num_new_matched_tokens(r2, 0) == (2 * BS, False)
        if failure != "mismatch":
            mgr.flush(timeout=WAIT_S)  # (pending: block 1 on disk, so it stays indexed)
            assert mgr.discard_host([h1[1]]) == 1
        eng.sched.after_alloc(r2, blocks, 2 * BS)

        def strike() -> None:
            if failure == "mismatch":
                pool.tags[slot, 0] = 0

        # step N: blocks 0, 1 promised, block 2 computed (a chunk of BS tokens)
        so = SchedOut([NewReq("r2", (blocks,), 2 * BS)], num_scheduled_tokens={"r2": BS})
        n = eng.step(so, [(blocks[2], h2[2])], deliver=False, before_workers=strike)
        # step N+1, planned before N's reports: the rest of the prompt (block 3 full)
        rest = len(r2.all_token_ids) - 3 * BS
        so = SchedOut(scheduled_cached_reqs=CachedReqs(["r2"], [None], [3 * BS]),
                      num_scheduled_tokens={"r2": rest})
        n1 = eng.step(so, [(blocks[3], h2[3])], deliver=False)
        assert n.ranks[0].errors == {9}
        eng.sched.on_worker_reports(n.reports)
        eng.sched.on_worker_reports(n1.reports)
        rec = mgr.lookup(h2[1])
        assert rec is None or rec.g2 < 0 or torch.equal(pool.buffer[rec.g2],
                                                        canonical_page(MHA, h2[1])), \
            "G1 block 1, never loaded, saved as its page"
        assert mgr.lookup(h2[2]) is None, "block 2 (step N) computed on a failed load kept"
        assert mgr.lookup(h2[3]) is None, "block 3 (step N+1) computed on a failed load kept"
        r2.num_computed_tokens = len(r2.all_token_ids)
        _recompute_from(eng, r2, blocks, 1)
        assert_saved(eng, h2, in_g2=range(2, 4))


def test_plans_whose_reports_never_arrive_give_their_pages_back_eventually():
    with Engine(settings()) as eng:
        tokens = toks(3 * BS + 4, 51)
        save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        r2 = Req("r2", [*tokens[:3 * BS], *toks(BS + 3, 52)])
        assert eng.admit(r2, [8, 9, 10, 11, 12]) == (3 * BS, False)
        eng.prefill(r2, [8, 9, 10, 11, 12], 3 * BS, deliver=False)  # the reports are lost
        assert not g2_idle(eng)
        for _ in range(20):  # vLLM goes on stepping, every later report arrives
            eng.step()
        assert g2_idle(eng)
        assert eng.sched.reset()


def test_a_page_that_lost_its_tag_is_not_stored_below(tmp_path):
    """A committed G2 page overwritten before its (deferred) store to disk: the disk's
    checksum would vouch for whatever it held. It is not stored, and its G2 copy goes."""
    import asyncio
    import threading

    from kvbm.config import OffloadConfig
    from kvbm.storage.disk import DiskStore

    class GatedPutStore(DiskStore):
        gate: threading.Event

        async def put(self, items, *, parents=None):  # type: ignore[override]
            await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
            return await super().put(items, parents=parents)

    s = settings(disk=tmp_path / "g3", offload=OffloadConfig(max_inflight_pages=1))
    with Engine(s) as eng:
        mgr = eng.sched.mgr
        store = mgr._lower[0].store  # test-only: hold the disk's writes
        store.__class__ = GatedPutStore
        store.gate = threading.Event()
        tokens = toks(3 * BS + 4, 61)
        hashes = save_prompt(eng, Req("r1", tokens), [0, 1, 2, 3])
        assert hashes[2] in mgr._lower[0].deferred  # waiting for room below
        eng.sched.pool.tags[mgr.lookup(hashes[2]).g2, 0] = 12345  # another block's now
        store.gate.set()
        mgr.flush(30)
        on_disk = mgr._engine.run(store.exists(hashes[:3]))
        assert on_disk == [True, True, False]
        assert mgr.lookup(hashes[2]) is None  # its G2 copy dropped
        assert mgr.lookup(hashes[1]) is not None
