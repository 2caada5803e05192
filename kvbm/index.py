"""The prefix index: sequence hash -> block record, with lineage and residency.

One index serves every tier. A record is in the index exactly while at least one tier holds
a copy of its block (``mask != 0``) *and* its parent is in the index: a block reachable only
through a parent gone from every tier could never be matched again, so it is dropped with
its parent (the *lineage rule*; :meth:`PrefixIndex.remove_subtree`).

Blocks resident only below host memory with no child record are compacted out of this
index by the manager, into its compact table of unlinked pages (a few tens of bytes per
block instead of a record's kilobyte); matches read them there, onboards link them back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvbm.hashing import BlockHashes
from kvbm.medium import BEST_MEDIUM, Medium


class BlockRecord:
    """What the index knows about one block. ``__slots__``: there is one per cached block."""

    __slots__ = ("children", "frequency", "g1", "g2", "last_access", "local_hash", "lora_name",
                 "mask", "parent", "seq_hash", "tokens")

    def __init__(self, seq_hash: int, local_hash: int, parent: BlockRecord | None,
                 tokens: bytes, lora_name: str | None) -> None:
        self.seq_hash = seq_hash
        self.local_hash = local_hash
        self.parent = parent
        #: child records; ``None`` until the first child (most blocks are leaves)
        self.children: set[BlockRecord] | None = None
        #: residency: bit ``Medium.bit`` set when that tier holds a copy
        self.mask = 0
        #: slot in the G1 / G2 pool, -1 when not resident there
        self.g1 = -1
        self.g2 = -1
        self.last_access = 0
        self.frequency = 0
        #: the block's tokens as u32 LE bytes, for BlockStored events of lower tiers
        self.tokens = tokens
        self.lora_name = lora_name

    def __repr__(self) -> str:
        return (f"BlockRecord({self.seq_hash:#018x}, mask={self.mask:#x}, g1={self.g1}, "
                f"g2={self.g2})")

    @property
    def parent_hash(self) -> int | None:
        return None if self.parent is None else self.parent.seq_hash

    def best_medium(self) -> Medium:
        """The fastest tier holding the block (the lowest set bit)."""
        return BEST_MEDIUM[self.mask]


@dataclass(frozen=True, slots=True)
class MatchResult:
    """The longest cached prefix of a token sequence, across tiers."""

    #: number of leading full blocks found in some tier
    num_blocks: int
    #: how many of them are served from each medium (the fastest one holding each block)
    by_medium: dict[Medium, int]
    #: sequence hashes of the matched blocks
    sequence_hashes: list[int]
    #: hashes of *all* full blocks of the query (matched or not), for a later commit
    hashes: BlockHashes
    #: medium each matched block is served from, in order
    mediums: list[Medium] = field(default_factory=list)
    #: the LoRA adapter the query was hashed with
    lora_name: str | None = None
    #: made by the block manager, whose hashes are valid: ``onboard`` need not check them
    #: again (one built by hand, or by ``dataclasses.replace``, is checked)
    _checked: bool = field(default=False, init=False, repr=False, compare=False)
    #: the query's tokens (u32), for the records that onboard or stage link back
    _tokens: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_query_blocks(self) -> int:
        return len(self.hashes)


class PrefixIndex:
    """Sequence hash -> :class:`BlockRecord`."""

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: dict[int, BlockRecord] = {}

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, seq_hash: object) -> bool:
        return seq_hash in self._map

    def __iter__(self) -> Iterator[BlockRecord]:
        return iter(self._map.values())

    def get(self, seq_hash: int) -> BlockRecord | None:
        return self._map.get(seq_hash)

    def match(self, sequence_hashes: Sequence[int]) -> list[BlockRecord]:
        """Records of the longest prefix of ``sequence_hashes`` held in some tier."""
        get = self._map.get
        out: list[BlockRecord] = []
        append = out.append
        for h in sequence_hashes:
            rec = get(h)
            if rec is None:
                break
            append(rec)
        return out

    def insert(self, rec: BlockRecord) -> None:
        parent = rec.parent
        if parent is not None:
            if parent.children is None:
                parent.children = {rec}
            else:
                parent.children.add(rec)
        self._map[rec.seq_hash] = rec

    def remove_subtree(self, rec: BlockRecord) -> list[BlockRecord]:
        """Unlink ``rec`` and every descendant; returns them leaves first.

        Iterative (a conversation can be thousands of blocks deep).
        """
        order: list[BlockRecord] = []
        stack = [rec]
        while stack:
            r = stack.pop()
            order.append(r)
            if r.children:
                stack.extend(r.children)
        order.reverse()  # children before parents: events and frees go leaves-first
        for r in order:
            del self._map[r.seq_hash]
            r.children = None
        parent = rec.parent
        if parent is not None and parent.children is not None:
            parent.children.discard(rec)
            if not parent.children:
                parent.children = None
        return order
