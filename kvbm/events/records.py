"""Event records (the fields of vLLM's KV events, plus the local hashes routers match on)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvbm.medium import Medium


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Blocks became resident in ``medium``. ``block_hashes`` are sequence hashes of a run of
    consecutive blocks; ``parent_block_hash`` is the sequence hash of the block before the
    first one (``None`` at the start of a sequence)."""

    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    medium: Medium
    lora_name: str | None = None
    lora_id: int | None = None
    #: Local hashes (DESIGN.md §4) where the publisher knows them. They do not travel on the
    #: wire (vLLM's format has no field for them): a subscriber recomputes them from
    #: ``token_ids``, so a decoded event has ``[]`` here.
    local_hashes: list[int] = field(default_factory=list)
    # vLLM's optional fields, carried through unchanged and omitted from the wire when None:
    #: per block, the extra keys of its hash (LoRA name, (mm id, offset) pairs, cache salt)
    extra_keys: list[list[object] | None] | None = None
    group_idx: int | None = None  # KV cache group (hybrid models)
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None  # "LOCAL" / "REMOTE" relative to the publisher
    ownership: str | None = None  # secondary offloading tier that produced the event
    session_id: str | None = None  # request context that triggered the store


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left ``medium`` (they may still be resident in other media)."""

    block_hashes: list[int]
    medium: Medium
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """The worker's cache was emptied. On vLLM's wire this is vLLM's event, sent by its GPU
    block pool's ``reset_prefix_cache``: the GPU medium only (kvbm's connector inside vLLM
    keeps its lower tiers and announces their removals one by one, as kvbm's own
    :meth:`~kvbm.BlockManager.clear` does)."""


@dataclass(frozen=True, slots=True)
class AllMediaCleared(AllBlocksCleared):
    """A reset that a consumer makes itself (a lost stream, a restarted publisher): every
    block of the worker in every medium is forgotten. A router's indexer may read a plain
    ``AllBlocksCleared`` as "the GPU prefix cache was reset" (vLLM's ``reset_prefix_cache``)
    and keep the lower tiers; this one always clears them. kvbm's JetStream publishers
    begin an epoch and a resync with it: there it travels as an ``AllBlocksCleared`` map
    with ``"every_medium": true`` (a key vLLM's decoder ignores); elsewhere, and in
    :func:`~kvbm.events.wire.event_to_wire` unless asked, as a plain ``AllBlocksCleared``."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
