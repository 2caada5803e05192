"""Residency events: what routers learn about the blocks of a worker.

Every change of residency in any tier is recorded as :class:`BlockStored`,
:class:`BlockRemoved` or :class:`AllBlocksCleared`, with its medium. The block manager queues
them; ``BlockManager.take_events()`` drains the queue.
"""

from kvbm.events.records import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbm.events.wire import EventBatch, decode_batch, encode_batch

__all__ = ["AllBlocksCleared", "BlockRemoved", "BlockStored", "EventBatch", "KVEvent",
           "decode_batch", "encode_batch"]
