"""KvRouter: pick the worker that serves a prompt at the lowest cost.

The cost is Dynamo's KV router's, made tier-aware. For worker W and a prompt of T tokens
(block size B, ``n = ceil(T / B)`` blocks), with ``held[m]`` leading blocks matched on W in
medium m (:meth:`KvIndexer.find_matches`)::

    new_blocks     = (T - B * sum(held)) / B        # computed from scratch (a partial block too)
    prefill_blocks = new_blocks + sum(weight[m] * held[m])
    decode_blocks  = W.active_blocks + n            # Dynamo's "potential decode blocks"
    cost           = prefill_weight * prefill_blocks + decode_blocks
                     + request_weight * W.active_requests

A block on the GPU costs ``gpu_weight`` (0: free), one on disk ``disk_weight`` of a
recompute, and so on (:class:`~kvbm.router.config.CostConfig`). With ``temperature`` 0 the
cheapest worker wins (ties broken at random with the configured seed, or by name); above 0
a worker is drawn with probability proportional to ``exp(-normalized_cost / temperature)``.

Bounded shares. The cost alone lets a prefix pull requests onto the workers that hold it
for as long as the prefill it saves outweighs their decode load; the more of the cache a
router sees (a tier-aware one sees G2 and G3 as well as G1, so a conversation's history
keeps pulling long after it left the GPU), the stronger that pull, and the less even the
traffic. So, as in consistent hashing with bounded loads (Mirrokni, Thorup and
Zadimoghaddam, 2018), the candidates are first cut to the workers with room, and the cost
ranks those. The load bounded is the router's own record of where requests went: of its
last ``share_window * n`` picks, ``k`` went to the ``n`` candidates; one that got
``ceil((1 + eps) * (k + 1) / n)`` of them or more is full (``eps``: ``share_bound``). The
unit is the request, the unit of the balance to keep (max / mean requests per worker), and
the record is the router's, so it counts a request from the moment it is routed, before
any load report can show it. (Bounding the requests a worker is running instead does not
keep shares even: a worker whose prefills hits cut short finishes its requests sooner and
is given more; in bench/router_replay.py it also cost the tier-aware router far more of
its savings.) Over any run of picks no worker gets more than about ``1 +
eps`` times its share, whatever the pull; the cost still decides every pick among the
workers below the bound, so a prefix goes to its holder unless the holder has had more
than its share. Some worker always has room (the least picked got at most ``k / n``), so
the bound never refuses a request; a full worker's score is still reported, with ``full``
set. A worker new to the router is credited with the mean record of the others, spread
through the window (an empty record would have it take every request until the window
forgot the others' picks: thousands in a row at the default window). The bound is the same
for every router built on this class, whatever its index sees: a GPU-only router and a
tier-aware one differ only in what they know is held.
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvbm.errors import InvalidArgumentError, TokenError
from kvbm.hashing import as_token_array
from kvbm.medium import Medium
from kvbm.router.config import CostConfig, TieBreak
from kvbm.router.indexer import KvIndexer

#: Costs closer than this (relative) are a tie.
_TIE = 1e-9


def _count(where: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgumentError(f"{where} must be an int >= 0, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What a worker is busy with: the KV blocks of its running requests, and how many."""

    active_blocks: int = 0
    active_requests: int = 0

    def __post_init__(self) -> None:
        _count("WorkerLoad.active_blocks", self.active_blocks)
        _count("WorkerLoad.active_requests", self.active_requests)


@dataclass(frozen=True, slots=True)
class WorkerScore:
    """One worker's cost for a prompt, term by term (see the module's formula)."""

    cost: float
    #: leading blocks of the prompt the worker holds, each in its fastest medium
    matched: dict[Medium, int]
    new_blocks: float
    prefill_blocks: float
    decode_blocks: int
    active_requests: int
    #: the worker had its share of the router's recent picks: not a candidate this time
    full: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"cost": self.cost, "matched": {m.value: n for m, n in self.matched.items()},
                "matched_blocks": sum(self.matched.values()), "new_blocks": self.new_blocks,
                "prefill_blocks": self.prefill_blocks, "decode_blocks": self.decode_blocks,
                "active_requests": self.active_requests, "full": self.full}


@dataclass(frozen=True, slots=True)
class Selection:
    """The chosen worker, and every candidate's score."""

    worker: str
    scores: dict[str, WorkerScore] = field(default_factory=dict)

    @property
    def cost(self) -> float:
        return self.scores[self.worker].cost

    def to_dict(self) -> dict[str, Any]:
        return {"worker": self.worker, "cost": self.cost,
                "scores": {w: s.to_dict() for w, s in self.scores.items()}}


class KvRouter:
    """Scores workers for a prompt from what ``indexer`` knows they hold. Thread-safe."""

    def __init__(self, indexer: KvIndexer, config: CostConfig | None = None) -> None:
        if not isinstance(indexer, KvIndexer):
            raise InvalidArgumentError(f"KvRouter needs a KvIndexer, got "
                                       f"{type(indexer).__name__}")
        config = CostConfig() if config is None else config
        if not isinstance(config, CostConfig):
            raise InvalidArgumentError(f"config must be a CostConfig, got "
                                       f"{type(config).__name__}")
        self.indexer = indexer
        self.config = config
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()  # the draws and the record of picks
        self._picks: deque[str] = deque()  # recent picks, oldest first
        self._picked: dict[str, int] = {}  # worker -> its picks in ``_picks``
        self._seen: set[str] = set()  # every candidate so far

    def select(self, token_ids: Any = None, loads: Mapping[str, WorkerLoad | int] | None = None,
               *, hashes: Sequence[int] | None = None, lora_name: str | None = None
               ) -> Selection:
        """The worker to send the prompt to (``token_ids``, or the indexer's sequence
        ``hashes`` of its full blocks). ``loads``: the candidates and their load (a
        :class:`WorkerLoad`, or an int of active blocks); ``None`` or empty: every worker the
        indexer knows, idle. Raises :class:`~kvbm.errors.InvalidArgumentError` for bad
        arguments or when there is no candidate."""
        cands = self._candidates(loads)
        if (token_ids is None) == (hashes is None):
            raise InvalidArgumentError("select takes token_ids or hashes (one of them)")
        bs = self.indexer.block_size
        if hashes is not None:
            matches = self.indexer.find_matches(hashes=hashes, lora_name=lora_name)
            n_tokens = len(hashes) * (bs or 0)
        else:
            tokens = _tokens(token_ids)
            n_tokens = len(tokens)
            # nothing announced yet: nothing is held (and no unit to count blocks in)
            matches = {} if bs is None else self.indexer.find_matches(tokens,
                                                                      lora_name=lora_name)
        with self._lock:
            full = self._full(cands)
            scores = {w: self._score(matches.get(w, {}), load, n_tokens, bs or 1, w in full)
                      for w, load in cands.items()}
            worker = self._pick({w: s for w, s in scores.items() if not s.full})
            self._record(worker, len(cands))
        return Selection(worker, scores)

    def _full(self, cands: Mapping[str, WorkerLoad]) -> set[str]:
        """The candidates that had their share of the recent picks (bounded shares)."""
        eps = self.config.share_bound
        if eps is None:
            return set()
        new = [w for w in cands if w not in self._seen]
        if new:
            self._credit(new, [w for w in cands if w in self._seen])
            self._seen.update(new)
        self._forget(self.config.share_window * len(cands))
        got = {w: self._picked.get(w, 0) for w in cands}
        # the slack keeps a product that is an integer in exact arithmetic from rounding
        # up past it
        cap = math.ceil((1.0 + eps) * (sum(got.values()) + 1) / len(cands) - 1e-9)
        return {w for w, k in got.items() if k >= cap}

    def _credit(self, new: list[str], old: list[str]) -> None:
        """Credit workers the router has not seen before with the mean record of those it
        has, spread evenly through the window so that it ages out as theirs does: with an
        empty record a newcomer would take every request until the window forgot the
        others' picks."""
        if not old or not self._picks:
            return
        mean = round(sum(self._picked.get(w, 0) for w in old) / len(old))
        if mean == 0:
            return
        picks = list(self._picks)
        extra = sorted((j * len(picks) // mean, i, w) for i, w in enumerate(new)
                       for j in range(mean))
        merged: list[str] = []
        at = 0
        for pos, _, w in extra:
            merged.extend(picks[at:pos])
            at = max(at, pos)
            merged.append(w)
        merged.extend(picks[at:])
        self._picks = deque(merged)
        for w in new:
            self._picked[w] = self._picked.get(w, 0) + mean

    def _record(self, worker: str, n: int) -> None:
        if self.config.share_bound is None:
            return
        self._picks.append(worker)
        self._picked[worker] = self._picked.get(worker, 0) + 1
        self._forget(self.config.share_window * n)

    def _forget(self, keep: int) -> None:
        while len(self._picks) > keep:
            w = self._picks.popleft()
            left = self._picked[w] - 1
            if left:
                self._picked[w] = left
            else:
                del self._picked[w]

    def _candidates(self, loads: Mapping[str, WorkerLoad | int] | None
                    ) -> dict[str, WorkerLoad]:
        if loads is None or (isinstance(loads, Mapping) and not loads):
            workers = self.indexer.workers()
            if not workers:
                raise InvalidArgumentError("no worker to choose from: the indexer knows none "
                                           "and no loads were given")
            return dict.fromkeys(workers, WorkerLoad())
        if not isinstance(loads, Mapping):
            raise InvalidArgumentError(f"loads must map worker names to a WorkerLoad or an "
                                       f"int, got {type(loads).__name__}")
        out: dict[str, WorkerLoad] = {}
        for w, load in loads.items():
            if not isinstance(w, str) or not w:
                raise InvalidArgumentError(f"a worker is named by a non-empty str, got {w!r}")
            if isinstance(load, WorkerLoad):
                out[w] = load
            else:
                out[w] = WorkerLoad(_count(f"the load of {w!r}", load))
        return out

    def _score(self, held: dict[Medium, int], load: WorkerLoad, n_tokens: int, bs: int,
               full: bool) -> WorkerScore:
        c = self.config
        matched_tokens = min(sum(held.values()) * bs, n_tokens)
        new_blocks = (n_tokens - matched_tokens) / bs
        prefill = new_blocks + sum(c.weight(m) * n for m, n in held.items())
        decode = load.active_blocks + -(-n_tokens // bs)
        cost = c.prefill_weight * prefill + decode + c.request_weight * load.active_requests
        return WorkerScore(cost, dict(held), new_blocks, prefill, decode, load.active_requests,
                           full)

    def _pick(self, scores: dict[str, WorkerScore]) -> str:
        names = sorted(scores)
        costs = [scores[w].cost for w in names]
        low, high = min(costs), max(costs)
        t = self.config.temperature
        if t > 0 and high > low:
            weights = [math.exp(-(c - low) / (high - low) / t) for c in costs]
            return self._rng.choices(names, weights)[0]
        ties = [w for w, c in zip(names, costs, strict=True)
                if c - low <= _TIE * max(1.0, abs(low))]
        if self.config.tie_break is TieBreak.NAME or len(ties) == 1:
            return ties[0]
        return self._rng.choice(ties)


def _tokens(token_ids: Any) -> np.ndarray:
    try:
        return as_token_array(token_ids)
    except TokenError as e:  # one class for every bad argument of the router's calls
        raise InvalidArgumentError(str(e)) from None
