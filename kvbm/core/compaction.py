"""Blocks held only below host memory leave :class:`~kvbm.BlockManager`'s Python index for its
compact table of unlinked pages (a few bytes each) and are linked back when a match reaches
them; and the residency snapshot a publisher's resync re-announces.

Methods of :class:`~kvbm.BlockManager`, written as functions of the manager (``mgr``) and
assigned in its class body: one state, one class, modules of one job each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvbm.core.event_sink import runs
from kvbm.core.tier_state import ANNOUNCED, GPU_BIT, HOST_BIT, LOWER_BITS
from kvbm.errors import InvalidKeyError
from kvbm.events import BlockStored
from kvbm.hashing import BlockHashes, as_token_array
from kvbm.index import BlockRecord, MatchResult
from kvbm.medium import Medium, mediums_of

if TYPE_CHECKING:
    from kvbm.manager import BlockManager


def _relink(mgr: BlockManager, recs: list[BlockRecord], hashes: BlockHashes, tokens: Any,
            lora_name: str | None, limit: int | None = None) -> None:
    """Extend a match with unlinked pages of persistent tiers (lineage: only right after
    a linked parent, or at the start of a sequence), up to ``limit`` blocks."""
    seq, bs = hashes.sequence, mgr.block_size
    end = len(seq) if limit is None else min(limit, len(seq))
    tok = None if tokens is None else as_token_array(tokens)
    k = len(recs)
    announce: list[BlockRecord] = []
    while k < end and seq[k] in mgr._orphans:
        piece = (b"" if tok is None or tok.size < (k + 1) * bs
                 else tok[k * bs: (k + 1) * bs].tobytes())
        rec = BlockRecord(seq[k], hashes.local[k], recs[-1] if recs else None, piece,
                          lora_name)
        if mgr._unorphan(rec):
            announce.append(rec)
        mgr._index.insert(rec)
        recs.append(rec)
        if not rec.mask & (GPU_BIT | HOST_BIT):  # announced now: compacted again if unused
            mgr._compactable.append(rec)
        k += 1
    mgr._emit_relinked(announce)


def _unorphan(mgr: BlockManager, rec: BlockRecord) -> bool:
    """Give ``rec`` the residency of its unlinked pages; whether they must be announced
    (a compacted block's events still stand)."""
    mask = mgr._orphans.pop(rec.seq_hash, 0)
    rec.mask = mask & LOWER_BITS
    if mask & ANNOUNCED:
        mgr._announced -= 1
        return False
    return True


def _linked(mgr: BlockManager, hashes: BlockHashes, n: int, tokens: Any,
            lora_name: str | None) -> list[BlockRecord]:
    """Records of the longest cached prefix of the first ``n`` blocks, linking the
    unlinked and compacted pages of persistent tiers back into the index."""
    recs = mgr._index.match(hashes.sequence[:n])
    if mgr._orphans and len(recs) < n:
        mgr._relink(recs, hashes, tokens, lora_name, n)
    return recs


def _matched(mgr: BlockManager, match: MatchResult) -> list[BlockRecord]:
    """The records of a match's prefix as cached now (onboard, stage)."""
    try:
        recs = mgr._index.match(match.sequence_hashes)
    except TypeError:  # an unhashable "hash" put into a match's list after the fact
        raise InvalidKeyError("match.sequence_hashes holds something that is not a block "
                              "hash") from None
    n = len(match.sequence_hashes)
    if mgr._orphans and len(recs) < n and len(match.hashes) >= n:
        mgr._relink(recs, match.hashes, getattr(match, "_tokens", None), match.lora_name,
                     n)
    return recs


def _parent_of(mgr: BlockManager, hashes: BlockHashes, start_block: int, tokens: Any,
               lora_name: str | None) -> BlockRecord | None:
    """The record of block ``start_block - 1``, linked back if it was compacted."""
    rec = mgr._index.get(hashes.sequence[start_block - 1])
    if rec is None and mgr._orphans:
        chain = mgr._linked(hashes, start_block, tokens, lora_name)
        rec = chain[-1] if len(chain) == start_block else None
    return rec


def _unbusy(mgr: BlockManager, recs: Sequence[BlockRecord]) -> None:
    busy = mgr._busy
    for r in recs:
        left = busy[r.seq_hash] - 1
        if left > 0:
            busy[r.seq_hash] = left
        else:
            del busy[r.seq_hash]
        if not r.mask & (GPU_BIT | HOST_BIT):
            mgr._compactable.append(r)


def _compact(mgr: BlockManager) -> None:
    """Records resident only below host memory, with no child in the index, leave the
    index for the table of unlinked pages (``ANNOUNCED``: nothing is announced; a
    match reads them there, onboard and stage link them back). The index then holds a
    Python record only for blocks of G1 and G2 and their ancestors: a disk or bucket
    tier of tens of millions of pages costs the table's bytes per page, not a record's.
    """
    todo, mgr._compactable = mgr._compactable, []
    index, orphans, busy = mgr._index, mgr._orphans, mgr._busy
    for leaf in todo:
        rec: BlockRecord | None = leaf
        while (rec is not None and rec.mask and not rec.mask & (GPU_BIT | HOST_BIT)
               and not rec.children and rec.seq_hash not in busy
               and index.get(rec.seq_hash) is rec):
            parent = rec.parent
            index.remove_subtree(rec)  # a leaf: itself
            orphans[rec.seq_hash] = rec.mask | ANNOUNCED
            mgr._announced += 1
            rec.mask = 0
            rec = parent


def _emit_relinked(mgr: BlockManager, recs: Sequence[BlockRecord]) -> None:
    """BlockStored for the persistent-tier copies of ``recs``, linked back into the index
    (a BlockRemoved was emitted for each when it was unlinked)."""
    if not recs:
        return
    linked: dict[Medium, list[BlockRecord]] = {}
    for rec in recs:
        for m in mediums_of(rec.mask & LOWER_BITS):
            linked.setdefault(m, []).append(rec)
    for m, rs in linked.items():
        mgr._sink.emit_stored(rs, m)


def _residency_snapshot(mgr: BlockManager) -> list[BlockStored]:
    """Every block resident now, per medium, parents first (owner thread): what a
    publisher re-announces after the ``AllBlocksCleared`` of a resync. Compacted blocks
    lose their announcement (their tokens are not kept): a match links and announces
    them again."""
    if mgr._announced:
        mgr._orphans.and_all(LOWER_BITS)
        mgr._announced = 0
    recs = mgr._parents_first(list(mgr._index))
    return [mgr._sink.stored_event(run, medium) for medium in Medium
            for run in runs([r for r in recs if r.mask & medium.bit])]
