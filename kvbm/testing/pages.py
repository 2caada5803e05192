"""Deterministic test pages and a recording listener: no pytest needed (crash-test children
import this in a fresh interpreter, where every 100 ms of start-up counts)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.storage.base import RemovalReason

MASK64 = (1 << 64) - 1
#: Odd 64-bit constant (golden ratio): multiples of it spread test keys over all 64 bits,
#: so tiers are exercised with keys that have the top bit set.
_KEY_STRIDE = 0x9E3779B97F4A7C15

U8Array = npt.NDArray[np.uint8]

#: The conformance suite's default layout: small pages (16 KiB) keep tests fast.
TEST_LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_size=16,
                       dtype="float16", model_id="kvbm-conformance")


def make_keys(n: int, start: int = 0) -> list[int]:
    """``n`` distinct u64 keys spread over the whole 64-bit range (``start`` shifts them)."""
    return [(_KEY_STRIDE * (i + start + 1)) & MASK64 for i in range(n)]


def page_payload(key: int, nbytes: int, *, salt: int = 0) -> U8Array:
    """A deterministic pseudo-random payload for page ``key`` (a fresh, writable array).

    Derived from the key alone, so a process that reopens a store (after a crash, say) can
    check what it reads without having kept what was written.
    """
    rng = np.random.default_rng([key & MASK64, salt & MASK64])
    return np.frombuffer(bytearray(rng.bytes(nbytes)), dtype=np.uint8)


class RecordingListener:
    """A :class:`~kvbm.storage.TierListener` that records every notification (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[Medium, list[int], RemovalReason]] = []

    def on_removed(self, medium: Medium, keys: Sequence[int], reason: RemovalReason) -> None:
        with self._lock:
            self.events.append((medium, list(keys), reason))

    def removed(self, reason: RemovalReason) -> list[int]:
        """Every key reported with ``reason``, in order of notification."""
        with self._lock:
            return [k for _, keys, r in self.events if r is reason for k in keys]
