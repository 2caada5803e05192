"""The page-store interface every tier below host memory implements.

A store keeps whole pages (one block's KV, contiguous, ``layout.bytes_per_block`` bytes)
under their sequence hash. Operations are batched and asynchronous (asyncio): a tier does
its blocking I/O on its own threads, so one event loop can drive several tiers at once.

Contract, checked by the shared conformance suite ``kvbm.testing.PageStoreTests``:

* ``put`` is create-only and idempotent: putting a key that exists is a success that
  writes nothing. When ``put`` returns, the pages it reports stored are durable to the
  tier's promise (``Capability.DURABLE``: they survive a crash of this process).
* ``get`` reads into caller-provided buffers (no extra copy of the payload where the tier
  can avoid it) and verifies every page (storage/page.py). A missing, torn or corrupt page
  is a *miss*: the buffer's content is then unspecified, the page is dropped, counted in
  ``stats().corrupt`` and reported to the listener as removed.
* Pages a tier drops on its own (eviction at capacity, corruption) are reported through
  ``TierListener.on_removed`` so the block manager can update its index and emit events.
* A tier with ``Capability.REPORTS_MISSES`` also reports a ``get`` of a page it does not
  hold (``RemovalReason.MISSING``); its other misses (server unreachable, circuit breaker
  open) are then known to be transient, and the block manager keeps the page's residency
  so that it is served again once the tier answers. Without the flag, the manager takes
  every failed load as proof that the page is gone.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from kvbm.errors import InvalidArgumentError, LayoutError
from kvbm.layout import KVLayout
from kvbm.medium import Medium

if TYPE_CHECKING:  # collections.abc.Buffer is 3.12+
    from typing_extensions import Buffer


class Capability(enum.Flag):
    NONE = 0
    #: pages whose put returned survive a crash of the process
    DURABLE = enum.auto()
    #: data leaves the machine (object stores): the engine should expect latency
    REMOTE = enum.auto()
    #: the tier enforces a capacity and evicts by itself
    EVICTS = enum.auto()
    #: pages survive a restart and are found again by a new instance on the same location
    PERSISTENT = enum.auto()
    #: a get miss on a page the tier does not hold is reported (RemovalReason.MISSING), so
    #: any other miss is transient (see the module docstring)
    REPORTS_MISSES = enum.auto()


class RemovalReason(enum.Enum):
    EVICTED = "evicted"
    CORRUPT = "corrupt"
    DELETED = "deleted"
    #: a get asked for a page the tier does not hold (any more)
    MISSING = "missing"


class TierListener(Protocol):
    def on_removed(self, medium: Medium, keys: Sequence[int], reason: RemovalReason) -> None:
        """Pages left the tier without the caller asking for it (or were found corrupt)."""


@dataclass
class TierStats:
    """Counters of one tier (monotonic, since the store was opened)."""

    puts: int = 0
    put_bytes: int = 0
    put_skipped: int = 0  # already present (create-only)
    gets: int = 0
    hits: int = 0
    misses: int = 0
    get_bytes: int = 0
    corrupt: int = 0
    evicted: int = 0
    deleted: int = 0
    errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    #: A flag, not a counter: 1 while the tier runs degraded (its location failed a check,
    #: e.g. a missing bucket, and it answers misses until the location answers again).
    degraded: int = 0
    #: Times the tier found its index damaged or missing at open and rebuilt it from the
    #: pages' own headers (the disk tier), and the pages that rebuild found again.
    index_rebuilds: int = 0
    pages_recovered: int = 0


def check_store_args(layout: object, listener: object, config: object = None,
                     config_type: type | None = None) -> None:
    """The arguments every store's constructor takes, checked before anything is opened:
    :class:`InvalidArgumentError` for the wrong kind of thing."""
    if not isinstance(layout, KVLayout):
        raise InvalidArgumentError(f"layout must be a KVLayout, got {type(layout).__name__}")
    if config_type is not None and not isinstance(config, config_type):
        raise InvalidArgumentError(f"config must be a {config_type.__name__}, got "
                                   f"{type(config).__name__}")
    if listener is not None and not callable(getattr(listener, "on_removed", None)):
        raise InvalidArgumentError(f"listener must have an on_removed method, got "
                                   f"{type(listener).__name__}")


class PageStore(abc.ABC):
    """An asynchronous, batched store of verified pages."""

    medium: Medium
    capabilities: Capability = Capability.NONE

    def __init__(self, layout: KVLayout, *, listener: TierListener | None = None) -> None:
        check_store_args(layout, listener)
        self.layout = layout
        self.page_bytes = layout.bytes_per_block
        self.fingerprint = layout.fingerprint
        self.listener = listener
        self._stats = TierStats()

    # -- data -------------------------------------------------------------------------------
    @abc.abstractmethod
    async def put(self, items: Sequence[tuple[int, Buffer]], *,
                  parents: Sequence[int | None] | None = None) -> list[bool]:
        """Store ``(seq_hash, payload)`` pairs; payloads are ``page_bytes`` long.

        ``parents`` (optional, one per item) names each block's prefix parent; a tier with
        lineage-aware eviction keeps it, others ignore it.

        Returns, per item, whether the page is in the store afterwards (stored now or
        already present). A page the tier could not take (full of pinned data, admission,
        I/O error) is ``False``; nothing is partially visible.
        """

    @abc.abstractmethod
    async def get(self, items: Sequence[tuple[int, Buffer]]) -> list[bool]:
        """Read pages into the given writable buffers; per item, ``True`` on a verified hit."""

    @abc.abstractmethod
    async def exists(self, keys: Sequence[int]) -> list[bool]:
        """Whether each key is stored (without verifying its payload)."""

    @abc.abstractmethod
    async def delete(self, keys: Sequence[int]) -> int:
        """Remove pages; returns how many existed."""

    @abc.abstractmethod
    async def keys(self) -> list[int]:
        """Every stored key (for restart and tests; may be slow on big stores)."""

    # -- accounting -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int | None:
        """The most payload bytes the tier will hold; ``None`` when unbounded."""

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int:
        """Payload bytes held now."""

    def stats(self) -> TierStats:
        return self._stats

    async def close(self) -> None:  # noqa: B027 - optional hook, most stores need it
        """Flush and release resources; the store is unusable afterwards."""

    # -- helpers for implementations ---------------------------------------------------------
    def _notify_removed(self, keys: Sequence[int], reason: RemovalReason) -> None:
        if keys and self.listener is not None:
            self.listener.on_removed(self.medium, list(keys), reason)

    def _check_payload(self, key: int, buf: Buffer) -> memoryview:
        try:
            mv = memoryview(buf).cast("B")
        except ValueError as e:  # a released view, a closed mmap
            raise InvalidArgumentError(f"page {key:#x}: the buffer cannot be used ({e})"
                                       ) from None
        if mv.nbytes != self.page_bytes:
            raise LayoutError(f"page {key:#x} has {mv.nbytes} bytes, the layout needs "
                              f"{self.page_bytes}")
        return mv
