"""Hypothesis stateful test of the block manager's invariants.

Random requests over a small vocabulary of prefixes, random early releases, explicit
offloads and clears, with tiny pools so that eviction, lineage cascades, deduplication and
write-back happen all the time. After every step: the manager's own invariant check, the
refcounts equal what the model holds, and every block the engine holds carries the KV of
the block it is named after (never a wrong page).
"""

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout, ManagerConfig, Medium
from kvbm.config import OffloadConfig
from kvbm.errors import PoolExhaustedError
from kvbm.storage.base import RemovalReason
from kvbm.storage.disk import DiskTierConfig

BS = 2
LAYOUT = KVLayout(1, 1, 2, BS, "float32")
POLICIES = ["lru", "lineage", "lfu", "arc", "s3fifo", "adaptive", "predictive"]


def tokens_for(prefix_id: int, n_blocks: int) -> np.ndarray:
    # Requests share prefixes: sequence k of family f is blocks f*100 + [0..n)
    return np.repeat(np.arange(prefix_id * 100, prefix_id * 100 + n_blocks, dtype=np.uint32), BS)


def value_of(seq_hash: int) -> float:
    return float(seq_hash % 1_000_003)


class _EngineRules:
    """What an engine does around an onboard, shared by both machines: check the onboarded
    pages, compute and commit the rest, release requests (whole, or a prefix early)."""

    mgr: BlockManager
    holds: Counter[int]
    requests: list[tuple[list[int], list[int]]]  # (ids, seq hashes)

    def _compute_rest(self, m, ids, toks):
        mgr = self.mgr
        for b, h in zip(ids, m.hashes.sequence, strict=False):
            assert bool((mgr.block_view(b) == value_of(h)).all()), "onboarded a wrong page"
        try:
            new = mgr.allocate(len(m.hashes) - len(ids))
        except PoolExhaustedError:
            mgr.release(ids)
            return
        for i, b in enumerate(new):
            mgr.block_view(b).fill_(value_of(m.hashes.sequence[len(ids) + i]))
        final = mgr.commit(new, toks, start_block=len(ids), hashes=m.hashes)
        all_ids = ids + final
        self.holds.update(all_ids)
        self.requests.append((all_ids, list(m.hashes.sequence)))

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def finish(self, data):
        i = data.draw(st.integers(0, len(self.requests) - 1))
        ids, _ = self.requests.pop(i)
        self.mgr.release(ids)
        self.holds.subtract(ids)

    @precondition(lambda self: self.requests)
    @rule(data=st.data())
    def release_prefix_early(self, data):
        # An engine may drop holds on the first blocks of a request and keep the tail.
        i = data.draw(st.integers(0, len(self.requests) - 1))
        ids, hashes = self.requests[i]
        k = data.draw(st.integers(0, len(ids)))
        self.mgr.release(ids[:k])
        self.holds.subtract(ids[:k])
        self.requests[i] = (ids[k:], hashes[k:])


class ManagerMachine(_EngineRules, RuleBasedStateMachine):
    @initialize(g1=st.integers(3, 8), g2=st.integers(0, 10), eager=st.booleans(),
                ev1=st.sampled_from(POLICIES), ev2=st.sampled_from(POLICIES),
                adm=st.sampled_from([None, "frequency"]))
    def setup(self, g1, g2, eager, ev1, ev2, adm):
        host = HostTierConfig(g2, eviction=ev2, admission=adm, eager_offload=eager) if g2 else None
        self.mgr = BlockManager(LAYOUT, ManagerConfig(
            device=DeviceTierConfig(g1, device="cpu", eviction=ev1), host=host))
        self.holds: Counter[int] = Counter()
        self.requests: list[tuple[list[int], list[int]]] = []  # (ids, seq hashes)

    @rule(fam=st.integers(0, 3), n=st.integers(1, 4))
    def request(self, fam, n):
        mgr = self.mgr
        toks = tokens_for(fam, n)
        m = mgr.match_prefix(toks)
        try:
            ids = mgr.onboard(m)
        except PoolExhaustedError:
            return
        self._compute_rest(m, ids, toks)

    @rule()
    def offload(self):
        if self.mgr.host_pool is not None:
            self.mgr.offload()

    @precondition(lambda self: not self.requests)
    @rule()
    def clear(self):
        self.mgr.clear()

    @rule(n=st.integers(0, 3))
    def scratch(self, n):
        try:
            ids = self.mgr.allocate(n)
        except PoolExhaustedError:
            return
        self.mgr.release(ids)

    @invariant()
    def consistent(self):
        if not hasattr(self, "mgr"):
            return
        self.mgr.check_invariants()
        alloc = self.mgr.device_pool.allocator
        for slot in range(alloc.num_slots):
            assert alloc.refcount(slot) == self.holds[slot], f"refcount of {slot}"
        for ids, hashes in self.requests:
            for b, h in zip(ids, hashes[len(hashes) - len(ids):], strict=True):
                assert bool((self.mgr.block_view(b) == value_of(h)).all()), "held page changed"
        _ = torch  # pages are torch tensors


ManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                            deadline=None)
TestManagerStateful = ManagerMachine.TestCase


# -- with a disk tier ------------------------------------------------------------------------
def _corrupt_slabs(root: Path, modulus: int, residue: int) -> int:
    """Flip the first byte of some written 4 KiB blocks of the slab files: a page's payload
    starts a block (its header lives in the header area, also hit). Returns how many."""
    n = 0
    for slab in sorted(root.rglob("*")):
        if not (slab.is_file() and "slab" in slab.name):
            continue
        data = bytearray(slab.read_bytes())
        for i, off in enumerate(range(0, len(data), 4096)):
            if i % modulus == residue and any(data[off: off + 4096]):
                data[off] ^= 0xFF
                n += 1
        slab.write_bytes(bytes(data))
    return n


class TieredManagerMachine(_EngineRules, RuleBasedStateMachine):
    """G1, G2 and a small real disk tier: requests onboard synchronously or asynchronously
    (polled, waited or cancelled), offloads, flushes, pages removed from the disk behind the
    manager's back, corrupt pages (a failed load is a miss), clears and restarts on the same
    directory. After every step: the invariants, the holds, and the KV of held pages."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="kvbm-stateful-"))
        self.mgr: BlockManager | None = None

    def _open(self) -> None:
        self.mgr = BlockManager(LAYOUT, self.cfg)
        self.holds: Counter[int] = Counter()
        self.requests: list[tuple[list[int], list[int]]] = []

    @initialize(g1=st.integers(3, 6), g2=st.integers(2, 6), eager=st.booleans(),
                disk_pages=st.integers(4, 24), inflight=st.integers(1, 4),
                ev_disk=st.sampled_from(["lineage", "lru", "predictive"]))
    def setup(self, g1, g2, eager, disk_pages, inflight, ev_disk):
        self.cfg = ManagerConfig(
            device=DeviceTierConfig(g1, device="cpu"),
            host=HostTierConfig(g2, eager_offload=eager),
            disk=DiskTierConfig(self.root / "g3", capacity_bytes=(disk_pages + 1) * 4096
                                + disk_pages * 64, slab_bytes=1 << 20, eviction=ev_disk),
            offload=OffloadConfig(max_inflight_pages=inflight))
        self._open()

    @property
    def store(self):
        return self.mgr._lower[0].store

    @rule(burst=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5), st.sampled_from(
        ["sync", "wait", "poll", "cancel"])), min_size=1, max_size=3))
    def requests_(self, burst):
        for fam, n, how in burst:
            self.request(fam, n, how)

    def request(self, fam, n, how):
        mgr = self.mgr
        toks = tokens_for(fam, n)
        m = mgr.match_prefix(toks)
        try:
            if how == "sync":
                ids = mgr.onboard(m)
            else:
                h = mgr.onboard_async(m)
                if how == "poll":
                    for _ in range(3):
                        h.poll()
                elif how == "cancel":
                    h.cancel()
                    # The staging pages of the cut loads stay held by the manager until the
                    # loads finish (their buffers are in use): let them, so that the holds
                    # checked below are the engine's only.
                    while mgr._transfers_in_flight():
                        mgr._drain(block=True, timeout=1.0)
                ids = h.wait(30)
        except PoolExhaustedError:
            return
        assert len(ids) <= m.num_blocks
        self._compute_rest(m, ids, toks)

    @rule()
    def offload(self):
        self.mgr.offload()

    @rule()
    def flush(self):
        mgr = self.mgr
        result = mgr.flush(timeout=60)
        assert result.complete and result.failed == 0
        # Nothing in flight now: every page on disk is known, in the index or unlinked (no
        # residency lost). The converse may lag: a batch's eviction of a page that another
        # batch, running at the same time, just stored can be reported before that store's
        # completion; the page is then taken for resident until a load misses it.
        on_disk = set(mgr._engine.run(self.store.keys()))
        known = {r.seq_hash for r in mgr._index if r.mask & Medium.DISK.bit}
        known |= {k for k, mask in mgr._orphans.items() if mask & Medium.DISK.bit}
        assert on_disk <= known
        assert result.volatile == sum(1 for r in mgr._index if not r.mask & Medium.DISK.bit)

    @rule(pick=st.integers(0, 1 << 16))
    def drop_from_disk(self, pick):
        """The disk loses a page (as its own eviction would report it)."""
        self.mgr._quiesce()  # a store of that page finishing after the removal would race it
        keys = sorted(self.mgr._engine.run(self.store.keys()))
        if not keys:
            return
        k = keys[pick % len(keys)]  # (drawn whatever the keys: draws must not depend on them)
        self.mgr._engine.run(self.store.delete([k]))
        self.mgr.on_removed(Medium.DISK, [k], RemovalReason.DELETED)

    @rule(modulus=st.integers(1, 3), residue=st.integers(0, 2))
    def corrupt_disk(self, modulus, residue):
        self.mgr._quiesce()  # no write under way that could race the damage
        _corrupt_slabs(self.root / "g3", modulus, residue % modulus)

    def _finish_all(self):
        for ids, _ in self.requests:
            self.mgr.release(ids)
        self.requests.clear()
        self.holds.clear()

    @rule()
    def clear(self):
        self._finish_all()
        self.mgr.clear()

    @rule()
    def restart(self):
        self._finish_all()
        self.mgr.close()
        self._open()
        assert self.mgr.stats().unlinked_pages == len(self.mgr._engine.run(self.store.keys()))

    @invariant()
    def consistent(self):
        mgr = self.mgr
        if mgr is None:
            return
        mgr.check_invariants()
        alloc = mgr.device_pool.allocator
        for slot in range(alloc.num_slots):
            assert alloc.refcount(slot) == self.holds[slot], f"refcount of {slot}"
        for ids, hashes in self.requests:
            for b, h in zip(ids, hashes[len(hashes) - len(ids):], strict=True):
                assert bool((mgr.block_view(b) == value_of(h)).all()), "held page changed"

    def teardown(self):
        if self.mgr is not None:
            self.mgr.close()
        shutil.rmtree(self.root, ignore_errors=True)


TieredManagerMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=40,
                                                  deadline=None)
TestTieredManagerStateful = TieredManagerMachine.TestCase
