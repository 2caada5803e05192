"""A worker's residency as its events describe it, compacted: what a re-announce sends.

:class:`Ledger` applies one worker's events (the publisher's own hashes, as on the wire) and
can say the same state again as a short list of events (:meth:`Ledger.snapshot_events`):
``AllBlocksCleared`` followed by stores. Whoever must re-announce a worker without asking it
uses one: the JetStream publisher after an overflow or when a consumer asks for a resync,
the bridge (vLLM cannot re-announce), and the router's checkpoints (its index, rebuilt after
a restart by applying a ledger's snapshot).

A consumer links a store to its parent through the parent's publisher hash, so a parent that
left every medium while a child stays must still be announced before the child: such a
*ghost* is kept (tokens, no media) while it has children, re-announced as a store followed by
a removal, and forgotten with its last child.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

from kvbm.errors import EventDecodeError
from kvbm.events.records import (
    AllBlocksCleared,
    AllMediaCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from kvbm.medium import MEDIUM_BY_BIT, Medium

# The fields of a store shared by its blocks (and by most blocks of a worker: interned).
Meta = tuple[int, str | None, int | None, int | None, str | None, int | None, str | None,
             str | None, str | None]
_META_FIELDS = ("block_size", "lora_name", "lora_id", "group_idx", "kv_cache_spec_kind",
                "kv_cache_spec_sliding_window", "locality", "ownership", "session_id")
_META_TYPES = (str, int, int, str, int, str, str, str)  # of the fields after block_size
_GHOST_MEDIUM = Medium.GPU  # the medium a ghost is re-announced in (then removed from)


def _tokens_bytes(tokens: list[int]) -> bytes:
    a = array("I", tokens)
    if sys.byteorder == "big":  # checkpoints are little-endian everywhere
        a.byteswap()
    return a.tobytes()


def _tokens_list(b: bytes) -> list[int]:
    a = array("I")
    a.frombytes(b)
    if sys.byteorder == "big":
        a.byteswap()
    return a.tolist()


class _Block:
    __slots__ = ("children", "extra", "media", "meta", "parent", "tokens")

    def __init__(self, parent: int | None, tokens: bytes, media: int, meta: Meta,
                 extra: list[object] | None) -> None:
        self.parent = parent
        self.tokens = tokens
        self.media = media  # Medium.bit mask; 0: a ghost kept for its children
        self.children = 0  # blocks of this ledger whose parent this is
        self.meta = meta
        self.extra = extra  # this block's vLLM extra_keys entry


class Ledger:
    """One worker's resident blocks, by the publisher's hashes. Not thread-safe."""

    def __init__(self) -> None:
        self._blocks: dict[int, _Block] = {}
        self._metas: dict[Meta, Meta] = {}

    def __len__(self) -> int:
        """Blocks resident in at least one medium."""
        return sum(1 for b in self._blocks.values() if b.media)

    def blocks(self) -> dict[int, frozenset[Medium]]:
        """hash -> media holding it (ghosts left out), as ``KvIndexer.worker_blocks``."""
        return {h: frozenset(m for m in MEDIUM_BY_BIT if b.media & m.bit)
                for h, b in self._blocks.items() if b.media}

    # ---------------------------------------------------------------------- events --
    def apply(self, events: Iterable[KVEvent]) -> None:
        for ev in events:
            if isinstance(ev, BlockStored):
                self._store(ev)
            elif isinstance(ev, BlockRemoved):
                bit = ev.medium.bit
                for h in ev.block_hashes:
                    b = self._blocks.get(h)
                    if b is not None and b.media & bit:
                        b.media &= ~bit
                        if not b.media:
                            self._maybe_forget(h, b)
            elif isinstance(ev, AllMediaCleared):
                self._blocks.clear()
            elif isinstance(ev, AllBlocksCleared):  # vLLM's reset: its GPU cache only
                self._drop_medium(Medium.GPU.bit)

    def _store(self, ev: BlockStored) -> None:
        bs = ev.block_size
        if bs <= 0 or len(ev.token_ids) != len(ev.block_hashes) * bs:
            return  # a consumer refuses it too: nothing to re-announce
        key: Meta = (bs, ev.lora_name, ev.lora_id, ev.group_idx, ev.kv_cache_spec_kind,
                     ev.kv_cache_spec_sliding_window, ev.locality, ev.ownership, ev.session_id)
        meta = self._metas.setdefault(key, key)
        bit = ev.medium.bit
        blocks = self._blocks
        parent = ev.parent_block_hash
        if parent is not None and not ((p := blocks.get(parent)) is not None and p.media):
            # a consumer drops a store whose parent the worker does not hold (a lost event,
            # or a parent removed since): so does the ledger
            return
        extra = ev.extra_keys
        raw = _tokens_bytes(ev.token_ids)  # one conversion, then a slice per block
        step = 4 * bs
        for i, h in enumerate(ev.block_hashes):
            tok = raw[i * step:(i + 1) * step]
            x = extra[i] if extra is not None and i < len(extra) else None
            b = blocks.get(h)
            if b is None:
                blocks[h] = _Block(parent, tok, bit, meta, x)
                self._link(parent)
            elif b.tokens != tok or b.parent != parent:
                # the publisher reused a hash for other tokens: the new block replaces the
                # old one in every medium (what an indexer does too)
                old = b.parent
                b.parent, b.tokens, b.media, b.meta, b.extra = parent, tok, bit, meta, x
                self._link(parent)
                self._unlink(old)
            else:
                b.media |= bit
            parent = h

    def _link(self, parent: int | None) -> None:
        if parent is None:
            return
        p = self._blocks.get(parent)
        if p is not None:
            p.children += 1

    def _unlink(self, parent: int | None) -> None:
        """A child of ``parent`` left; ghost ancestors left without children are forgotten
        (a loop, not recursion: a chain of ghosts can be as long as a prompt)."""
        blocks = self._blocks
        while parent is not None:
            p = blocks.get(parent)
            if p is None:
                return
            p.children -= 1
            if p.media or p.children:
                return
            del blocks[parent]
            parent = p.parent

    def _drop_medium(self, bit: int) -> None:
        """Every block leaves the medium of ``bit`` (those resident nowhere else go, unless
        children still need them)."""
        for h, b in list(self._blocks.items()):
            if b.media & bit and h in self._blocks:
                b.media &= ~bit
                self._maybe_forget(h, b)

    def _maybe_forget(self, h: int, b: _Block) -> None:
        """Drop ``h`` (resident nowhere) unless children still need it."""
        if not b.media and not b.children:
            del self._blocks[h]
            self._unlink(b.parent)

    # -------------------------------------------------------------------- snapshot --
    def _topological(self) -> Iterator[tuple[int, _Block]]:
        """Every block after its parent (when its parent is in the ledger)."""
        blocks = self._blocks
        done: set[int] = set()
        for h in blocks:
            if h in done:
                continue
            chain = [h]
            p = blocks[h].parent
            while p is not None and p not in done and p in blocks and p not in chain:
                chain.append(p)
                p = blocks[p].parent
            for c in reversed(chain):
                done.add(c)
                yield c, blocks[c]

    def snapshot_events(self) -> list[KVEvent]:
        """``AllBlocksCleared`` and the stores (then the ghosts' removals) that rebuild this
        state from nothing: a parent is always announced before its children."""
        out: list[KVEvent] = [AllMediaCleared()]
        order = list(self._topological())
        ghosts = [h for h, b in order if not b.media]
        # First pass: every block in one medium, so that each parent is known before any
        # child in any medium; then the other media of the blocks that have several.
        first = [(h, b, b.media & -b.media if b.media else _GHOST_MEDIUM.bit) for h, b in order]
        rest = [(h, b, m.bit) for h, b in order for m in MEDIUM_BY_BIT
                if b.media & m.bit and b.media & -b.media != m.bit]
        for items in (first, rest):
            out.extend(_runs(items))
        if ghosts:
            out.append(BlockRemoved(block_hashes=ghosts, medium=_GHOST_MEDIUM))
        return out

    # ------------------------------------------------------------------ checkpoint --
    def dump(self) -> dict[str, Any]:
        """A msgpack-able picture of the ledger (for a checkpoint)."""
        metas = {m: i for i, m in enumerate(dict.fromkeys(b.meta for b in self._blocks.values()))}
        return {"metas": [list(m) for m in metas],
                "blocks": [[h, b.parent, b.tokens, b.media, metas[b.meta], b.extra]
                           for h, b in self._topological()]}

    @classmethod
    def load(cls, obj: object) -> Ledger:
        """The ledger :meth:`dump` described; :class:`EventDecodeError` for anything else."""
        led = cls()
        try:
            assert isinstance(obj, dict)
            metas: list[Meta] = []
            for m in obj["metas"]:
                assert isinstance(m, list) and len(m) == len(_META_FIELDS)
                assert type(m[0]) is int and m[0] > 0
                assert all(v is None or type(v) is tp for v, tp in zip(m[1:], _META_TYPES,
                                                                        strict=True))
                meta: Meta = tuple(m)
                metas.append(led._metas.setdefault(meta, meta))
            blocks = led._blocks
            for h, parent, tok, media, mi, extra in obj["blocks"]:
                assert type(h) is int and 0 <= h < 1 << 64
                assert parent is None or (type(parent) is int and 0 <= parent < 1 << 64)
                assert isinstance(tok, bytes) and type(media) is int and 0 <= media < 16
                assert len(tok) == 4 * metas[mi][0] and (extra is None or type(extra) is list)
                blocks[h] = _Block(parent, tok, media, metas[mi], extra)
            for b in blocks.values():
                led._link(b.parent)
        except (AssertionError, KeyError, IndexError, TypeError, ValueError):
            raise EventDecodeError("not a ledger checkpoint") from None
        return led


def _runs(items: list[tuple[int, _Block, int]]) -> Iterator[BlockStored]:
    """Consecutive blocks chained parent to child, in one medium with one meta, as one
    store each (what a publisher would have sent)."""
    run: list[tuple[int, _Block]] = []
    bit = 0
    for h, b, m in items:
        if run and (m != bit or b.meta is not run[-1][1].meta or b.parent != run[-1][0]):
            yield _stored(run, bit)
            run = []
        run.append((h, b))
        bit = m
    if run:
        yield _stored(run, bit)


def _stored(run: list[tuple[int, _Block]], bit: int) -> BlockStored:
    first = run[0][1]
    meta = first.meta
    tokens: list[int] = []
    for _, b in run:
        tokens.extend(_tokens_list(b.tokens))
    extras = [b.extra for _, b in run]
    bs, lora_name, lora_id, group_idx, kind, window, locality, ownership, session = meta
    return BlockStored(
        block_hashes=[h for h, _ in run], parent_block_hash=first.parent, token_ids=tokens,
        block_size=bs, medium=MEDIUM_BY_BIT[bit.bit_length() - 1], lora_name=lora_name,
        lora_id=lora_id, extra_keys=extras if any(x is not None for x in extras) else None,
        group_idx=group_idx, kv_cache_spec_kind=kind, kv_cache_spec_sliding_window=window,
        locality=locality, ownership=ownership, session_id=session)
