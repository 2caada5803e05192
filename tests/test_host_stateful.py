"""Hypothesis stateful test of the engine-owned-G1 mode (``device = None``) with a real disk.

The machine plays the engine and its mover: it saves runs of blocks of a few token
sequences that share prefixes (reserve_host, the mover writes each page with a value
derived from its block's hash, commit_host; or release_host, a failed save, possibly after
a half-written page), stages matched prefixes (ready at once from G2, or loading from disk
in the background: waited, polled, cancelled, or left pending across steps), damages or
deletes pages on disk behind the manager's back, flushes, polls and restarts on the same
directory. G2 is small and the in-flight bound is 2 pages, so evictions, lineage cascades
and deferred stores happen all the time.

After every step: the manager's invariants; every G2 page that is held is held by exactly
what the model knows of (reservations, stage handles, loads under way; stores under way
only add holds) - no leaked page; every held page still carries the KV it was written or
staged with (held pages are never evicted or reused); every cached G2 page carries the KV
of the block it is named after (never a wrong page); a stage that has to load a page known
to be damaged on disk is cut before it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvbm import BlockManager, HostTierConfig, KVLayout, ManagerConfig, Medium
from kvbm.config import OffloadConfig
from kvbm.hashing import hash_blocks
from kvbm.manager import OnboardStatus, StageHandle
from kvbm.storage.base import RemovalReason
from kvbm.storage.disk import DiskTierConfig

BS = 2
LAYOUT = KVLayout(1, 1, 2, BS, "float32")
DISK = Medium.DISK.bit
GARBAGE = -1.0  # what a failed save leaves in a page

# Draws. Hypothesis tries the rules with fewer arguments first and most often (the first
# one about a third of the time): the engine's requests and saves take one argument each,
# the rest two. No draw depends on the manager's state, which depends on the timing of the
# background transfers: a replay must draw the same.
FAM, BRANCH, N = st.integers(0, 1), st.integers(0, 1), st.integers(1, 5)
START = st.sampled_from([0, 0, 0, 1, 2, 4])  # mostly whole sequences
HOW = st.sampled_from(["wait", "poll", "cancel", "leave"])
PICK = st.integers(0, 15)  # an index into a list of the model, taken modulo its length
#: (fam, branch, n, start, blind): see HostMachine._reserve
SAVE = st.tuples(FAM, BRANCH, N, START, st.sampled_from([False, False, False, True]))
#: (partial, k, garbage): with partial == 0, only the first k pages are committed (the
#: rest failed, and are half-written when garbage)
FATE = st.tuples(st.integers(0, 3), st.integers(0, 5), st.booleans())
#: (fam, branch, n, pick, start, how, keep, compute): see HostMachine.request
REQUEST = st.tuples(FAM, BRANCH, N, PICK, START, HOW, st.booleans(),
                    st.sampled_from([True, True, True, False]))
ALL = (1, 0, False)  # a FATE: every page committed


def tokens_for(fam: int, branch: int, n_blocks: int) -> np.ndarray:
    """Blocks 0-1 are shared by the branches of a family; the rest are the branch's own."""
    blocks = [fam * 1000 + (i if i < 2 else 100 * (branch + 1) + i) for i in range(n_blocks)]
    return np.repeat(np.array(blocks, dtype=np.uint32), BS)


def value_of(seq_hash: int) -> float:
    return float(1 + seq_hash % 1_000_003)  # never 0: a page of zeros is not findable


class _Save:
    """A reservation the mover has written and the engine has not committed yet."""

    def __init__(self, slots: list[int], toks: np.ndarray, start: int, hashes) -> None:
        self.slots, self.toks, self.start, self.hashes = slots, toks, start, hashes

    def value(self, i: int) -> float:
        return value_of(self.hashes.sequence[self.start + i])


class _Stage:
    """A stage handle the engine holds, and what the model expects of it."""

    def __init__(self, h: StageHandle, expected: list[int], cut_by: int | None) -> None:
        self.h, self.expected, self.cut_by = h, expected, cut_by


class HostMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="kvbm-host-stateful-"))
        self.mgr: BlockManager | None = None

    def _open(self) -> None:
        self.mgr = BlockManager(LAYOUT, self.cfg)
        self.saves: list[_Save] = []
        self.stages: list[_Stage] = []  # held by the engine (not released)
        self.loading: list[StageHandle] = []  # with loads under way (released or not)

    @initialize(g2=st.integers(4, 8), ev=st.sampled_from(["lru", "lineage", "predictive",
                                                           "s3fifo"]),
                adm=st.sampled_from([None, None, "frequency"]),
                prefill=st.lists(st.tuples(FAM, BRANCH, N), max_size=4))
    def setup(self, g2, ev, adm, prefill):
        self.cfg = ManagerConfig(
            device=None, host=HostTierConfig(g2, eviction=ev, admission=adm),
            # room for every block of the vocabulary: the disk never evicts on its own
            disk=DiskTierConfig(self.root / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20),
            offload=OffloadConfig(max_inflight_pages=2))
        self.bad: set[int] = set()  # pages damaged or lost on disk, not read since
        self.damaged: set[int] = set()  # pages damaged on disk (read since or not)
        self.saved: set[tuple[int, int, int]] = set()  # sequences saved (fam, branch, n)
        self._open()
        if prefill:  # a run before this one left pages on disk; G2 starts empty
            for fam, branch, n in prefill:
                for _ in range(2):  # (the second time past a frequency admission)
                    sv = self._reserve(fam, branch, n, 0, False)
                    if sv is not None:
                        self.mgr.commit_host(sv.slots, sv.toks, hashes=sv.hashes)
                self.saved.add((fam, branch, n))
            self.mgr.close()
            self._open()

    # -- helpers ---------------------------------------------------------------------------
    @property
    def store(self):
        return self.mgr._lower[0].store

    def view(self, slot: int):
        return self.mgr.host_pool.block_view(slot)

    def holds(self, slot: int, value: float) -> bool:
        return bool((self.view(slot) == value).all())

    def quiet(self) -> bool:
        """No transfer whose completion could still change the index."""
        self._prune()
        return not self.loading and not any(lt.inflight for lt in self.mgr._lower)

    def _prune(self) -> None:
        self.loading = [h for h in self.loading if h._pending > 0]

    def _settle(self, wait_s: float = 0.5) -> None:
        self.mgr.poll()  # removals reported meanwhile
        for _ in range(400):
            if self.quiet():
                break
            self.mgr._drain(block=True, timeout=wait_s)
        assert self.quiet()

    def _check_done(self, s: _Stage) -> None:
        h = s.h
        assert h.done()
        n = len(h.slots)
        assert n <= len(s.expected)
        event(f"stage done: cut {n < len(s.expected)}, {h.status.value}")
        assert h.sequence_hashes == s.expected[:n], "staged blocks are not the prefix"
        if s.cut_by is not None and h.status is OnboardStatus.DONE:
            assert n <= s.cut_by, "served (or went past) a page damaged on disk"
        for slot, sh in zip(h.slots, h.sequence_hashes, strict=True):
            assert self.holds(slot, value_of(sh)), "staged a wrong page"

    def _release(self, s: _Stage) -> None:
        if s.h.done():
            self._check_done(s)
        s.h.release()
        self.stages.remove(s)

    # -- saves -----------------------------------------------------------------------------
    def _reserve(self, fam: int, branch: int, n: int, start: int, blind: bool) -> _Save | None:
        """Reserve pages for blocks ``start..n`` and write them. An engine saves from where
        the cached prefix ends; ``blind`` saves from ``start`` whatever is cached (a block
        whose parent is not cached cannot be kept)."""
        mgr = self.mgr
        toks = tokens_for(fam, branch, n)
        m = mgr.match_prefix(toks)
        start = min(start if blind else min(start, m.num_blocks), n - 1)
        want = m.hashes.sequence[start:]
        slots = mgr.reserve_host(want)
        assert len(slots) <= len(want) and len(set(slots)) == len(slots)
        for i, s in enumerate(slots):
            assert mgr.host_pool.allocator.refcount(s) == 1
            self.view(s).fill_(value_of(want[i]))
        return _Save(slots, toks, start, m.hashes) if slots else None

    @rule(req=SAVE)
    def reserve(self, req):
        """A save whose mover runs in the background: committed in a later step."""
        sv = self._reserve(*req)
        if sv is not None:
            self.saves.append(sv)

    @rule(req=st.tuples(SAVE, FATE))
    def save(self, req):
        """The common save: reserve, write, commit at once."""
        (fam, branch, n, start, blind), fate = req
        self.saved.add((fam, branch, n))
        sv = self._reserve(fam, branch, n, start, blind)
        if sv is not None:
            self._commit(sv, fate)

    @rule(pick=PICK, fate=FATE)
    def finish_save(self, pick, fate):
        if self.saves:
            self._commit(self.saves.pop(pick % len(self.saves)), fate)

    def _commit(self, sv: _Save, fate: tuple[int, int, bool]) -> None:
        """Commit the first k pages the mover wrote (mostly all); the rest failed."""
        mgr = self.mgr
        partial, k, garbage = fate
        k = min(k, len(sv.slots)) if partial == 0 else len(sv.slots)
        if garbage:
            for s in sv.slots[k:]:
                self.view(s).fill_(GARBAGE)  # half-written before it failed
        if k < len(sv.slots):
            mgr.release_host(sv.slots[k:])
        mgr.poll()
        predicted = None
        if self.quiet():  # nothing can change the index between here and the commit
            predicted = []
            seq = sv.hashes.sequence
            linked = sv.start == 0 or mgr.lookup(seq[sv.start - 1]) is not None
            for i in range(k):
                rec = mgr.lookup(seq[sv.start + i])
                predicted.append(linked and (rec is None or rec.g2 < 0))
        kept = mgr.commit_host(sv.slots[:k], sv.toks, start_block=sv.start, hashes=sv.hashes)
        assert len(kept) == k
        event(f"commit: {sum(kept)} kept of {k}, {len(sv.slots) - k} failed")
        event(f"deferred stores: {min(3, len(mgr._lower[0].deferred))}")
        if predicted is not None:
            assert kept == predicted
        alloc = mgr.host_pool.allocator
        for i, (s, ok) in enumerate(zip(sv.slots, kept, strict=False)):
            if ok:
                rec = mgr.lookup(sv.hashes.sequence[sv.start + i])
                assert rec is not None and rec.g2 == s
            else:
                assert alloc.is_free(s), "a page not kept was not given back"
        for s in sv.slots[k:]:
            assert alloc.is_free(s), "release_host did not free the page"

    # -- stages ----------------------------------------------------------------------------
    @rule(req=REQUEST)
    def request(self, req):
        """What an engine does for a request: match, stage the prefix from ``start`` (mostly
        of a sequence saved before, likely cached somewhere), then wait, poll, cancel, or
        leave it loading; keep the handle (released in a later step) or release it now;
        ``compute``: save the blocks past the matched prefix, as if computed meanwhile."""
        fam, branch, n, pick, start, how, keep, compute = req
        if self.saved and pick < 12:
            seqs = sorted(self.saved)
            if pick < 4:  # one through a page damaged or lost on disk, if any
                seqs = [q for q in seqs if self.bad & set(
                    hash_blocks(tokens_for(*q), BS).sequence)] or seqs
            fam, branch, n = seqs[pick % len(seqs)]
        mgr = self.mgr
        m = mgr.match_prefix(tokens_for(fam, branch, n))
        h = mgr.stage(m, start)
        event(f"stage of {sorted((k.value, v) for k, v in m.by_medium.items())}")
        assert h.start_block == start
        expected = m.sequence_hashes[start:]
        # Positions loaded from below whose page is known to be damaged: the prefix must
        # end before the first. (Read once: a damaged page is dropped when read.)
        hit = [i for i in h._staged if h._recs[i].seq_hash in self.bad]
        for i in h._staged:
            self.bad.discard(h._recs[i].seq_hash)
        s = _Stage(h, expected, min(hit) if hit else None)
        event(f"stage: {min(len(h._staged), 2)}+ loads, {how}, damaged {bool(hit)}")
        if not h.done():
            assert h.loading_from and sum(h.loading_from.values()) == len(h._staged)
            self.loading.append(h)
            if how == "wait":
                h.wait(30)
            elif how == "poll":
                for _ in range(3):
                    h.poll()
            elif how == "cancel":
                h.cancel()
        if h.done():
            self._check_done(s)
        self.stages.append(s)
        if not keep:
            self._release(s)
        if compute and m.num_blocks < n:
            sv = self._reserve(fam, branch, n, m.num_blocks, False)
            if sv is not None:
                self._commit(sv, ALL)

    @precondition(lambda self: self.stages)
    @rule(pick=PICK, how=st.sampled_from(["wait", "poll", "cancel", "release"]))
    def drive_stage(self, pick, how):
        s = self.stages[pick % len(self.stages)]
        if how == "wait":
            s.h.wait(30)
        elif how == "poll":
            s.h.poll()
        elif how == "cancel":
            s.h.cancel()
        else:
            self._release(s)
            return
        if s.h.done():
            self._check_done(s)

    # -- the disk behind the manager's back ------------------------------------------------
    @rule(pick=st.integers(0, 1 << 16), how=st.sampled_from(["damage", "lose", "drop"]))
    def harm_disk(self, pick, how):
        """A page on disk (mostly one G2 lacks, so that a request loads it) is damaged in
        place (a byte of its payload flipped in the slab files, every copy of it), lost
        without a word (a load of it misses), or dropped as the disk's own eviction would
        report it."""
        mgr = self.mgr
        mgr._quiesce()  # no store under way that could race the change
        keys = sorted(mgr._engine.run(self.store.keys()))
        below = [k for k in keys if (r := mgr.lookup(k)) is None or r.g2 < 0]
        keys = below if below and pick % 4 else keys
        if not keys:
            return
        k = keys[pick % len(keys)]
        event(f"harm: {how}")
        if how != "damage":
            mgr._engine.run(self.store.delete([k]))
            self.damaged.discard(k)
            if how == "drop":
                mgr.on_removed(Medium.DISK, [k], RemovalReason.DELETED)
                self.bad.discard(k)
            else:
                self.bad.add(k)
            return
        numel = self.view(0).numel()
        pattern = np.full(numel, value_of(k), dtype=np.float32).tobytes()
        hit = False
        for slab in sorted((self.root / "g3").rglob("*")):
            if not (slab.is_file() and "slab" in slab.name):
                continue
            data = slab.read_bytes()
            at = data.find(pattern)
            while at >= 0:
                with slab.open("r+b") as f:
                    f.seek(at)
                    f.write(bytes([data[at] ^ 0xFF]))
                hit = True
                at = data.find(pattern, at + len(pattern))
        # (Not found: damaged before, its first byte flipped already.)
        assert hit or k in self.damaged, "a page on disk was not found in the slab files"
        self.damaged.add(k)
        self.bad.add(k)

    # -- housekeeping ----------------------------------------------------------------------
    @rule(times=st.integers(1, 3), events=st.booleans())
    def poll(self, times, events):
        """An idle engine polls (or drains the events, which polls too)."""
        for _ in range(times):
            if events:
                self.mgr.take_events()
            else:
                self.mgr.poll()

    @rule(wait_s=st.sampled_from([0.05, 0.5]), events=st.booleans())
    def settle(self, wait_s, events):
        """Let every transfer finish: a store deferred for want of room must have gone down
        by then (room came back), not be stuck until the next flush."""
        mgr = self.mgr
        self._settle(wait_s)
        if events:
            mgr.take_events()
        for lt in mgr._lower:
            stuck = [r for r in lt.deferred.values() if r.g2 >= 0 and not r.mask & lt.bit
                     and mgr.lookup(r.seq_hash) is r]
            assert not stuck, f"{len(stuck)} deferred stores never submitted"

    @rule(timeout=st.sampled_from([None, 60.0]), settle_first=st.booleans())
    def flush(self, timeout, settle_first):
        mgr = self.mgr
        if settle_first:
            self._settle()
        loads = not self.quiet()
        result = mgr.flush(timeout=timeout)
        assert result.complete and result.failed == 0
        assert result.volatile == sum(1 for r in mgr._index if not r.mask & DISK)
        if not loads:  # (a load failing meanwhile may drop a G2 block's disk copy)
            g2 = mgr._g2
            assert all(r.mask & DISK for r in g2.owner if r is not None), "flush left a page"

    @rule(tidy=st.booleans(), flush=st.booleans())
    def restart(self, tidy, flush):
        """Close and reopen on the same directory: what was on disk is found again. Tidy:
        the engine gives its pages back first; else close() with handles and reservations
        outstanding (a release after close is a no-op). Without flush, what only G2 held is
        lost."""
        mgr = self.mgr
        if tidy:
            for s in list(self.stages):
                self._release(s)
            for sv in self.saves:
                mgr.release_host(sv.slots)
        self._settle()
        before = {r.seq_hash for r in mgr._index if r.mask & DISK}
        before |= {k for k, mask in mgr._orphans.items() if mask & DISK}
        mgr.close(flush=flush)
        for s in self.stages:
            s.h.release()
        self._open()
        found = set(self.mgr._engine.run(self.store.keys()))
        assert self.mgr.stats().unlinked_pages == len(found)
        assert before - self.bad <= found, "pages on disk were not found again"

    # -- after every step ------------------------------------------------------------------
    @invariant()
    def consistent(self):
        mgr = self.mgr
        if mgr is None:
            return
        mgr.check_invariants()
        self._prune()
        g2 = mgr._g2
        alloc = g2.alloc
        expect: Counter[int] = Counter()
        for sv in self.saves:
            expect.update(sv.slots)
            for i, s in enumerate(sv.slots):
                assert g2.owner[s] is None and self.holds(s, sv.value(i)), "reserved page moved"
        live = {id(s.h) for s in self.stages}
        handles = {id(s.h): s.h for s in self.stages} | {id(h): h for h in self.loading}
        for key, h in handles.items():
            if h._pending > 0:  # staging pages: the manager's until their loads finish
                expect.update(h._staged.values())
            if key not in live:
                continue
            if h.done():
                expect.update(h.slots)
            else:
                expect.update(s for i, s in enumerate(h._slots) if i not in h._staged)
        for s in self.stages:
            if s.h.done():
                for slot, sh in zip(s.h.slots, s.h.sequence_hashes, strict=True):
                    rec = g2.owner[slot]
                    assert rec is None or rec.seq_hash == sh, "a held page was evicted"
                    assert self.holds(slot, value_of(sh)), "a held page changed"
        storing = any(lt.inflight for lt in mgr._lower)
        for slot in range(alloc.num_slots):
            refs = alloc.refcount(slot)
            if storing:  # a store under way holds its page once more
                assert refs >= expect[slot], f"G2 page {slot}: {refs} < {expect[slot]} holds"
            else:
                assert refs == expect[slot], f"G2 page {slot}: {refs} holds, {expect[slot]} known"
            rec = g2.owner[slot]
            if rec is not None:
                assert self.holds(slot, value_of(rec.seq_hash)), "a cached page is wrong"
        for lt in mgr._lower:
            assert not set(lt.deferred) & lt.inflight, "a store both deferred and in flight"

    def teardown(self):
        if self.mgr is not None:
            self.mgr.close()
        shutil.rmtree(self.root, ignore_errors=True)


HostMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30,
                                         deadline=None, derandomize=True, database=None)
TestHostStateful = HostMachine.TestCase


# -- regressions found by the machine ---------------------------------------------------------
def _save_now(mgr: BlockManager, toks: np.ndarray) -> list[int]:
    m = mgr.match_prefix(toks)
    hashes = m.hashes.sequence
    slots = mgr.reserve_host(hashes)
    for s, h in zip(slots, hashes, strict=False):
        mgr.host_pool.block_view(s).fill_(value_of(h))
    assert all(mgr.commit_host(slots, toks, hashes=m.hashes))
    return hashes


def test_stores_deferred_behind_loads_go_down_once_the_loads_finish(tmp_path) -> None:
    """Loads count against a tier's in-flight bound: a store committed while a stage loads
    from disk is deferred. When the loads finish, the room is back and the store must go
    down then (it went down only when some other store finished, or at a flush: an idle
    engine's new blocks stayed in G2 only, evictable and lost with it)."""
    cfg = ManagerConfig(
        device=None, host=HostTierConfig(16),
        disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20),
        offload=OffloadConfig(max_inflight_pages=2))
    old = tokens_for(0, 0, 2)
    with BlockManager(LAYOUT, cfg) as mgr:
        _save_now(mgr, old)
    seen = 0
    for attempt in range(20):  # the loads must still be running when the commit comes
        with BlockManager(LAYOUT, cfg) as mgr:  # a restart: `old` is on disk only
            h = mgr.stage(mgr.match_prefix(old))
            assert h.loading_from == {Medium.DISK: 2}
            new = _save_now(mgr, tokens_for(10 + attempt, 0, 2))
            lt = mgr._lower[0]
            deferred = bool(lt.deferred)
            assert len(h.wait(30)) == 2
            h.release()
            while mgr._transfers_in_flight() or lt.inflight:  # (nothing else will come)
                mgr._drain(block=True, timeout=1.0)
            mgr.take_events()
            if not deferred:
                continue
            seen += 1
            missing = [x for x in new if not mgr.lookup(x).mask & DISK]
            assert not missing, f"{len(missing)} deferred stores never went down"
            mgr.check_invariants()
            break
    assert seen, "the loads always finished before the commit: nothing was deferred"


def test_stage_after_start_block_survives_losing_the_unheld_prefix(tmp_path) -> None:
    """stage(match, start_block) holds only the blocks from ``start_block`` on. Making room
    for a load may evict a block before it that no other tier holds: the lineage rule then
    drops the held blocks too. The stage must end the prefix there and give back the pages
    it held (it raised StopIteration, and leaked the held page)."""
    cfg = ManagerConfig(
        device=None, host=HostTierConfig(4, eviction="lru"),
        disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20))
    seq = tokens_for(0, 0, 3)
    with BlockManager(LAYOUT, cfg) as mgr:
        p, a, _ = _save_now(mgr, seq)
    with BlockManager(LAYOUT, cfg) as mgr:  # a restart: all three on disk only
        with mgr.stage(mgr.match_prefix(seq[: 2 * BS])) as h:  # p and a back in G2
            assert len(h.wait(30)) == 2
        # p leaves the disk: G2 holds its only copy
        mgr._engine.run(mgr._lower[0].store.delete([p]))
        mgr.on_removed(Medium.DISK, [p], RemovalReason.DELETED)
        held = mgr.reserve_host([1, 2])  # G2 is full: p is the only page it can evict
        assert len(held) == 2
        m = mgr.match_prefix(seq)
        assert m.mediums == [Medium.CPU_PINNED, Medium.CPU_PINNED, Medium.DISK]
        h = mgr.stage(m, start_block=1)  # holds a, loads b: evicts p, so a and b go
        assert h.wait(30) == [] and h.sequence_hashes == []
        h.release()
        mgr.release_host(held)
        mgr.check_invariants()
        alloc = mgr.host_pool.allocator
        assert all(alloc.refcount(s) == 0 for s in range(alloc.num_slots)), "a page leaked"
        assert mgr.lookup(a) is None
