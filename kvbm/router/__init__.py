"""The router side of cache events: who holds which prefix, and where to send a request.

:class:`KvIndexer` keeps, per worker and medium, the blocks the workers announced;
:class:`KvRouter` scores workers for a prompt; :class:`Subscriber` feeds an indexer from the
workers' ZMQ publishers, healing sequence gaps; :class:`RouterService` serves all three over
HTTP (``kvbm router``; docs/router.md). Nothing here imports torch or lmdb; pyzmq is imported
when a subscriber is made.
"""

from kvbm.router.config import (
    ClearScope,
    CostConfig,
    RouterConfig,
    ServiceConfig,
    SubscriberConfig,
    TieBreak,
    WorkerEndpoints,
)
from kvbm.router.cost import KvRouter, Selection, WorkerLoad, WorkerScore
from kvbm.router.indexer import IndexerStats, KvIndexer
from kvbm.router.peer import WorkerStatus
from kvbm.router.service import RouterService
from kvbm.router.subscriber import Subscriber

__all__ = ["ClearScope", "CostConfig", "IndexerStats", "KvIndexer", "KvRouter", "RouterConfig",
           "RouterService", "Selection", "ServiceConfig", "Subscriber", "SubscriberConfig",
           "TieBreak", "WorkerEndpoints", "WorkerLoad", "WorkerScore", "WorkerStatus"]
