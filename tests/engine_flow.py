"""A tiny engine's request, for tests that need traffic through a manager (metrics, stats)."""

from __future__ import annotations

import numpy as np

from kvbm import BlockManager, KVLayout

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")


def toks(n_blocks: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


def run(mgr: BlockManager, tokens: np.ndarray) -> None:
    """One request: match, onboard, compute the rest, commit, release."""
    m = mgr.match_prefix(tokens)
    ids = mgr.onboard(m)
    new = mgr.allocate(len(m.hashes) - len(ids))
    for b in new:
        mgr.block_view(b).fill_(1.0)
    ids += mgr.commit(new, tokens, start_block=len(ids), hashes=m.hashes)
    mgr.release(ids)
