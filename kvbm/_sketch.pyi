"""Type stub for the optional native sketch step of :mod:`kvbm.policies.admission`
(``kvbm/_sketch.c``)."""

from typing import SupportsIndex

from typing_extensions import Buffer

def sight(counts: Buffer, key: int, rows: bytes, shift: SupportsIndex, cap: SupportsIndex, /
          ) -> int:
    """One sighting of ``key`` in a count-min sketch of one-byte counters (conservative
    update, capped at ``cap``; 0 only looks): its minimum count before the sighting."""
