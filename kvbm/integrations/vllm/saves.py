"""The save path of the connector's scheduler side: which newly computed blocks go to G2,
and their commit once the workers wrote them.

A SAVE plan covers the full blocks of a request that kvbm does not hold yet (nor has a save
of in flight), in runs of consecutive blocks, each run on G2 pages reserved for it (G2's
admission and room permitting: what does not fit is skipped, counted, and everything after
it too, since it could not be matched without its parent). Once every writing worker
reported, the longest prefix of each run whose copies are DONE and whose pages carry the
block's tag in every writer's column is committed; the rest is given back.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm.core.plans import BlockCopy, Direction, TransferPlan
from kvbm.hashing import BlockHashes, hash_blocks
from kvbm.integrations.vllm.stats import ConnectorCounters
from kvbm.manager import BlockManager


@dataclass
class SaveRun:
    """Consecutive blocks ``start ..`` of one request on reserved G2 pages."""

    start: int
    slots: list[int]
    hashes: BlockHashes
    tokens: np.ndarray
    lora_name: str | None = None


@dataclass
class SaveJob:
    plan: TransferPlan
    runs: list[SaveRun] = field(default_factory=list)


class SaltedRoots:
    """The first block of each request hashed with vLLM's ``cache_salt``, with its salt.

    vLLM's own events mark such a block with ``extra_keys=[(salt,), None, ...]`` so that a
    router folds the salt into its hash (and never matches the tenant's blocks for a bare
    prompt); kvbm's events for the same blocks in its tiers must say the same, and kvbm's
    records do not keep the salt. Only roots need it (a router chains the rest). Bounded,
    oldest forgotten first: events of a root forgotten here lose the mark, so keep the bound
    well above the number of distinct salted prefixes that stay cached.
    """

    def __init__(self, limit: int = 1 << 18) -> None:
        self._limit = limit
        self._salts: collections.OrderedDict[int, str] = collections.OrderedDict()

    def note(self, request: Any, first_hash: int) -> None:
        salt = getattr(request, "cache_salt", None)
        if salt is None:
            return
        self._salts[first_hash] = str(salt)
        self._salts.move_to_end(first_hash)
        if len(self._salts) > self._limit:
            self._salts.popitem(last=False)

    def extra_keys(self, block_hashes: list[int], parent: int | None
                   ) -> list[tuple[Any, ...] | None] | None:
        """vLLM's ``extra_keys`` for a BlockStored of ``block_hashes`` under ``parent``."""
        if parent is not None or not block_hashes:
            return None
        salt = self._salts.get(block_hashes[0])
        if salt is None:
            return None
        return [(salt,)] + [None] * (len(block_hashes) - 1)


class SavePlanner:
    """Plans saves and commits them (see the module docstring)."""

    def __init__(self, mgr: BlockManager, pool: Any, writers: int, counters: ConnectorCounters,
                 salt: str | None) -> None:
        self.mgr = mgr
        self.pool = pool
        self.writers = writers
        self.counters = counters
        self.salt = salt
        self.block_size = mgr.block_size
        self.roots = SaltedRoots()
        #: hashes with a save in flight (not planned twice)
        self.saving: set[int] = set()

    def plan(self, plan_id: int, request: Any, block_ids: list[int], first: int, full: int
             ) -> SaveJob | None:
        """Blocks [first, full) of ``request`` (in vLLM's blocks ``block_ids``)."""
        bs = self.block_size
        key = hash_key(request, self.salt)
        if key is None:
            return None
        salt, lora = key
        tokens = np.asarray(request.all_token_ids[: full * bs], dtype=np.uint32)
        hashes = hash_blocks(tokens, bs, lora_name=lora, salt=salt)
        seq = hashes.sequence
        if seq:
            self.roots.note(request, seq[0])
        todo = [i for i in range(first, full)
                if seq[i] not in self.saving and self.mgr.lookup(seq[i]) is None]
        runs: list[SaveRun] = []
        copies: list[BlockCopy] = []
        for run in _contiguous(todo):
            slots = self.mgr.reserve_host([seq[i] for i in run])
            if len(slots) < len(run):
                self.counters.skipped_saves += len(run) - len(slots)
            if not slots:
                break
            runs.append(SaveRun(run[0], slots, hashes, tokens, lora))
            for i, s in zip(run, slots, strict=False):
                copies.append(BlockCopy(block_ids[i], s, seq[i]))
                self.saving.add(seq[i])
            if len(slots) < len(run):
                break  # G2 is full: what follows could not be matched anyway
        if not copies:
            return None
        return SaveJob(TransferPlan(plan_id, Direction.SAVE, tuple(copies),
                                    request.request_id), runs)

    def finish(self, job: SaveJob, ok: list[bool]) -> None:
        """Every writer reported: ``ok[i]`` says copy ``i`` was DONE on all of them."""
        tags = self.pool.tags
        w = self.writers
        pos = 0
        for run in job.runs:
            n = len(run.slots)
            good = 0
            for j in range(n):
                c = job.plan.copies[pos + j]
                if not ok[pos + j] or not bool((tags[c.g2_slot, :w] == c.seq_hash).all()):
                    break
                good += 1
            for j in range(n):
                self.saving.discard(job.plan.copies[pos + j].seq_hash)
            if good:
                kept = self.mgr.commit_host(run.slots[:good], run.tokens,
                                            start_block=run.start, hashes=run.hashes,
                                            lora_name=run.lora_name)
                self.counters.saved_blocks += sum(kept)
            if good < n:
                self.mgr.release_host(run.slots[good:])
                self.counters.failed_saves += n - good
            pos += n


    def abandon(self, job: SaveJob) -> None:
        """A save whose report was lost: its pages go back, nothing is committed."""
        for run in job.runs:
            self.mgr.release_host(run.slots)
        for c in job.plan.copies:
            self.saving.discard(c.seq_hash)
        self.counters.failed_saves += len(job.plan.copies)


def _contiguous(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def hash_key(request: Any, salt: str | None) -> tuple[str | None, str | None] | None:
    """``(salt, lora name)`` that ``request``'s blocks hash with, or ``None`` when kvbm must
    not cache them: its KV depends on more than its token ids (images or other media,
    prompt embeddings), which kvbm's hashes do not cover, so a hit could be another
    request's KV. vLLM's per-request ``cache_salt`` (tenant isolation) joins the salt."""
    if getattr(request, "mm_features", None) or getattr(request, "prompt_embeds", None) \
            is not None:
        return None
    cache_salt = getattr(request, "cache_salt", None)
    if cache_salt is not None:
        salt = f"{salt or ''}\x1fcache_salt\x1f{cache_salt}"
    return salt, lora_name(request)


def lora_name(request: Any) -> str | None:
    """The LoRA adapter a vLLM request runs with (its blocks hash with it)."""
    lora = getattr(request, "lora_request", None)
    return None if lora is None else str(lora.lora_name)
