"""Tiers (media) a block can reside in."""

from __future__ import annotations

import enum


class Medium(enum.Enum):
    """Where a copy of a block lives. Values are the names used in events.

    The order of declaration is the order of preference when onboarding: a block resident
    in several tiers is served from the first one listed here.
    """

    GPU = "GPU"  # G1: device memory (a CPU tensor where no GPU exists)
    CPU_PINNED = "CPU_PINNED"  # G2: host memory (pinned where CUDA is present)
    DISK = "DISK"  # G3: local disk / NVMe
    OBJECT = "OBJECT"  # G4: object storage (S3, GCS)

    @property
    def bit(self) -> int:
        """The bit of this medium in a residency mask."""
        return _BITS[self]

    @property
    def tier(self) -> int:
        """1 for G1 ... 4 for G4."""
        return _BITS[self].bit_length()


_BITS: dict[Medium, int] = {m: 1 << i for i, m in enumerate(Medium)}

#: Mediums by bit position, so a residency mask can be decoded without a dict lookup.
MEDIUM_BY_BIT: tuple[Medium, ...] = tuple(Medium)


def mediums_of(mask: int) -> list[Medium]:
    """The media set in a residency mask, best first."""
    return [m for i, m in enumerate(MEDIUM_BY_BIT) if mask >> i & 1]


#: The fastest medium of each residency mask (index: mask), for hot loops. Entry 0 is never
#: read: a block resident nowhere is not in the index.
BEST_MEDIUM: tuple[Medium, ...] = tuple(
    MEDIUM_BY_BIT[(mask & -mask).bit_length() - 1] if mask else Medium.GPU
    for mask in range(1 << len(MEDIUM_BY_BIT)))


def display_name(medium: Medium, *, cpu_tensor: bool = False, pinned: bool = True) -> str:
    """The tier's name for human output: its wire name, plus what it really is where that
    differs from the name (``GPU (CPU tensor)`` without a GPU, ``CPU_PINNED (not pinned)``).
    Events and metrics labels keep the wire names."""
    if medium is Medium.GPU and cpu_tensor:
        return "GPU (CPU tensor)"
    if medium is Medium.CPU_PINNED and not pinned:
        return "CPU_PINNED (not pinned)"
    return medium.value
