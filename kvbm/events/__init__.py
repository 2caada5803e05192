"""Residency events: what routers learn about the blocks of a worker.

Every change of residency in any tier is recorded as :class:`BlockStored`,
:class:`BlockRemoved` or :class:`AllBlocksCleared` (vLLM's reset of its GPU cache;
:class:`AllMediaCleared` for a clean slate of every medium), with its medium. The block
manager queues them; ``BlockManager.take_events()`` drains the queue.
"""

from kvbm.events.records import (
    AllBlocksCleared,
    AllMediaCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from kvbm.events.wire import EventBatch, decode_batch, encode_batch

__all__ = ["AllBlocksCleared", "AllMediaCleared", "BlockRemoved", "BlockStored", "EventBatch",
           "KVEvent", "decode_batch", "encode_batch"]
