"""Admission filters: whether an offloaded block may enter a (lower) tier at all."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np

from kvbm.errors import PolicyError
from kvbm.policies.base import AdmissionPolicy

_sight: Callable[[memoryview, int, bytes, int, int], int] | None
try:  # the optional native step (kvbm/_sketch.c): same counters, ~5x faster per key
    from kvbm._sketch import sight as _sight
except ImportError:  # pragma: no cover - exercised when the extension was not built
    _sight = None

_M64 = (1 << 64) - 1
#: Sightings between halvings when the tier's capacity is not known.
_DEFAULT_WINDOW = 1 << 15
#: Largest row: 4 rows of 4M one-byte counters are 16 MiB, enough for ~1M-block tiers.
_MAX_WIDTH = 1 << 22
# Odd 64-bit multipliers, one per sketch row (digits of pi, e, sqrt 2, sqrt 3, phi, ...
# forced odd). Fixed, so a given key always lands on the same counters across runs.
_MULTIPLIERS = (
    0x243F6A8885A308D3, 0xB7E151628AED2A6B, 0x6A09E667F3BCC909, 0xBB67AE8584CAA73B,
    0x9E3779B97F4A7C15, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1, 0x510E527FADE682D1,
)


class FrequencyAdmission(AdmissionPolicy):
    """Admit a key once it has been seen ``threshold`` times recently (default: the second
    sighting), so blocks used once never push reusable ones out of a lower tier.

    Counts live in a count-min sketch: ``depth`` rows of ``width`` small counters; a key
    increments one counter per row (chosen by multiply-shift hashing of the key) and its
    estimate is the minimum of them. Collisions can only over-count, so the filter may
    admit a key early, never refuse one that really reached the threshold. Memory is
    ``depth * width`` bytes whatever the number of keys: there is no per-key state.

    * Conservative update: only the counters equal to the current minimum are raised,
      which keeps collision noise low without extra memory.
    * Decay: every ``window`` sightings all counters are halved (one vectorised numpy
      shift), so counts from long ago fade and a key must be seen again within about a
      window to be admitted. Counters saturate at ``max(threshold, 15)``: nothing needs
      more and the saturation keeps the halving meaningful.
    * Sizing: given the tier's ``capacity`` (blocks), ``window`` defaults to 4x it and
      ``width`` to the power of two >= 2x ``window`` (at most 4M); without it, 32768 and
      65536.
    * Per-call work touches ``depth`` counters through a ``memoryview`` of the numpy
      buffer: indexing it returns plain ints, much cheaper than numpy scalar indexing.
    """

    __slots__ = ("_cap", "_counts", "_mults", "_mv", "_rows", "_seen", "_shift", "_sight",
                 "depth", "threshold", "width", "window")

    name = "frequency"

    def __init__(self, *, threshold: int = 2, width: int | None = None, depth: int = 4,
                 window: int | None = None, capacity: int | None = None) -> None:
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise PolicyError(f"frequency threshold must be an int >= 1, got {threshold!r}")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or capacity < 0):
            raise PolicyError(f"frequency capacity must be an int >= 0, got {capacity!r}")
        if window is None:
            # A first sighting is remembered for about 4 tier-fulls of offloads: long enough to
            # catch a conversation's next turn, short enough to forget one-off traffic.
            # (Capped so that the sketch below stays within _MAX_WIDTH at a low error rate.)
            window = _DEFAULT_WINDOW if capacity is None else \
                max(16, min(4 * capacity, _MAX_WIDTH // 2))
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise PolicyError(f"frequency window must be an int >= 1, got {window!r}")
        if width is None:
            # Twice as many counters per row as sightings per window: at most about half of
            # them are set between two halvings, so false "seen before" answers stay rare.
            width = min(_MAX_WIDTH, 1 << max(1, (2 * window - 1).bit_length()))
        if isinstance(width, bool) or not isinstance(width, int) or width < 2 or \
                width & (width - 1):
            raise PolicyError(f"frequency width must be a power of two >= 2, got {width!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or \
                not 1 <= depth <= len(_MULTIPLIERS):
            raise PolicyError(f"frequency depth must be in [1, {len(_MULTIPLIERS)}], "
                              f"got {depth!r}")
        self.threshold = threshold
        self.width = width
        self.depth = depth
        self.window = window
        self._cap = max(threshold, 15)
        self._counts = np.zeros(depth * width, dtype=np.uint8)
        self._mv = self._counts.data  # a memoryview sharing the buffer
        # Multiply-shift: the top log2(width) bits of key * odd constant are a good index
        # even for structured keys (small consecutive ints in tests, not only hashes).
        self._shift = 64 - (width.bit_length() - 1)
        self._mults = tuple((m, row * width) for row, m in enumerate(_MULTIPLIERS[:depth]))
        # The same rows for the native step: (multiplier, first counter) as u64 pairs.
        self._rows = b"".join(struct.pack("<QQ", m, base) for m, base in self._mults)
        self._sight = _sight
        self._seen = 0

    def _slots(self, key: int) -> list[int]:
        shift = self._shift
        return [(((key * m) & _M64) >> shift) + base for m, base in self._mults]

    def estimate(self, key: int) -> int:
        """The current (decayed, over-approximated) count of ``key``, without a sighting."""
        if self._sight is not None:
            return self._sight(self._mv, key, self._rows, self._shift, 0)
        mv = self._mv
        return min(mv[i] for i in self._slots(key))

    def admit(self, key: int) -> bool:
        if self._sight is not None:
            low = self._sight(self._mv, key, self._rows, self._shift, self._cap)
        else:
            mv = self._mv
            slots = self._slots(key)
            low = min(mv[i] for i in slots)
            if low < self._cap:
                for i in slots:
                    if mv[i] == low:
                        mv[i] = low + 1
        self._seen += 1
        if self._seen >= self.window:
            self.decay()
        return low + 1 >= self.threshold

    def decay(self) -> None:
        """Halve every counter now (also done automatically every ``window`` sightings)."""
        self._counts >>= 1
        self._seen = 0

    @property
    def nbytes(self) -> int:
        """Memory held by the counters; independent of how many keys were seen."""
        return int(self._counts.nbytes)
