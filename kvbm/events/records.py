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
    local_hashes: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left ``medium`` (they may still be resident in other media)."""

    block_hashes: list[int]
    medium: Medium


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every cached block of the worker was dropped from every medium."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
