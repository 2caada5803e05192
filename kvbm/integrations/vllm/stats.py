"""Counters of the vLLM connector (scheduler side), next to the block manager's own stats."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from kvbm.medium import Medium


@dataclass
class ConnectorCounters:
    """What the connector did since it started (monotonic counters)."""

    #: prefix queries answered (vLLM's get_num_new_matched_tokens)
    queries: int = 0
    #: tokens promised to vLLM, by the tier that held them
    hit_tokens: dict[str, int] = field(default_factory=dict)
    #: blocks copied into vLLM's memory (every worker's copy verified)
    loaded_blocks: int = 0
    #: blocks promised but not delivered (a failed or corrupt load, a timeout): recomputed
    load_errors: int = 0
    #: staged loads from disk or object storage that ran past offload.load_timeout_s
    load_timeouts: int = 0
    #: blocks saved into G2 (and then offered to the tiers below)
    saved_blocks: int = 0
    #: blocks not saved: G2 had no room (every page held) or admission refused them
    skipped_saves: int = 0
    #: saves a worker failed or whose page did not carry the block's tag
    failed_saves: int = 0
    #: G2 copies dropped because a worker found their tag wrong
    discarded_pages: int = 0

    def hit_tokens_by_medium_add(self, mediums: Iterable[Medium], block_size: int) -> None:
        for m in mediums:
            self.hit_tokens[m.value] = self.hit_tokens.get(m.value, 0) + block_size

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
