"""Interfaces of eviction and admission policies.

An *eviction policy* belongs to one tier and decides which resident block leaves it. An
*admission policy* decides whether a block enters a (lower) tier at all. They are separate,
pluggable and selected by name (``kvbm.policies.make_eviction`` / ``make_admission``).

Keys are block sequence hashes (u64 ints). The block manager drives a policy with the
calls below; it guarantees that ``insert`` is called only for absent keys and ``access``,
``pin``, ``unpin`` only for present ones. Pins do not nest at this level: the manager keeps
refcounts and calls ``pin`` on 0 -> 1 and ``unpin`` on 1 -> 0.
"""

from __future__ import annotations

import abc
from typing import ClassVar


class EvictionPolicy(abc.ABC):
    """Chooses which resident block leaves one tier."""

    name: ClassVar[str]

    def __init__(self, capacity: int) -> None:
        #: The number of blocks the tier holds; policies with ghost lists size them from it.
        self.capacity = capacity

    @abc.abstractmethod
    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        """``key`` became resident. ``parent`` is the key of its prefix parent (``None`` for a
        first block), which may or may not be resident in this tier."""

    @abc.abstractmethod
    def access(self, key: int) -> None:
        """A resident key was used (a prefix hit). It may be pinned."""

    @abc.abstractmethod
    def remove(self, key: int) -> None:
        """``key`` left the tier for a reason other than :meth:`victim` (lineage cascade,
        corruption, explicit delete). A no-op for an absent key."""

    @abc.abstractmethod
    def pin(self, key: int) -> None:
        """``key`` is in use and must not be returned by :meth:`victim` until unpinned."""

    @abc.abstractmethod
    def unpin(self, key: int) -> None:
        """``key`` is no longer in use (it stays resident)."""

    @abc.abstractmethod
    def victim(self) -> int | None:
        """Choose an unpinned resident key, forget it and return it; ``None`` if every
        resident key is pinned (or there is none)."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of resident keys, pinned or not."""

    @abc.abstractmethod
    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is resident."""


class AdmissionPolicy(abc.ABC):
    """Decides whether a block may enter a tier."""

    name: ClassVar[str]

    @abc.abstractmethod
    def admit(self, key: int) -> bool:
        """Record one sighting of ``key`` and say whether it may enter the tier now."""
