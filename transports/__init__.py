"""Transports between processes and machines (importable as ``kvbm.transports``).

An :class:`Agent` registers memory regions, authenticates its peers with a shared secret
and moves bytes between its regions and theirs with asynchronous READ / WRITE transfers
over the best backend both run (nvlink > ucx > tcp). See docs/transports.md.
"""

from kvbm.transports.agent import Agent, Peer
from kvbm.transports.backend import Backend, available_backends, register_backend
from kvbm.transports.config import TransportConfig
from kvbm.transports.descriptors import Desc, Op
from kvbm.transports.handle import TransferHandle, TransferStatus
from kvbm.transports.inbox import Notification
from kvbm.transports.metadata import PeerInfo
from kvbm.transports.regions import ALL_PEERS, Access, DeviceKind, RegionHandle, RemoteRegion
from kvbm.transports.stats import StatsSnapshot

__all__ = [
    "ALL_PEERS",
    "Access",
    "Agent",
    "Backend",
    "Desc",
    "DeviceKind",
    "Notification",
    "Op",
    "Peer",
    "PeerInfo",
    "RegionHandle",
    "RemoteRegion",
    "StatsSnapshot",
    "TransferHandle",
    "TransferStatus",
    "TransportConfig",
    "available_backends",
    "register_backend",
]
