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
"""

from __future__ import annotations

import math
import random
import threading
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

    def to_dict(self) -> dict[str, Any]:
        return {"cost": self.cost, "matched": {m.value: n for m, n in self.matched.items()},
                "matched_blocks": sum(self.matched.values()), "new_blocks": self.new_blocks,
                "prefill_blocks": self.prefill_blocks, "decode_blocks": self.decode_blocks,
                "active_requests": self.active_requests}


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
        self._rng_lock = threading.Lock()

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
        scores = {w: self._score(matches.get(w, {}), load, n_tokens, bs or 1)
                  for w, load in cands.items()}
        return Selection(self._pick(scores), scores)

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

    def _score(self, held: dict[Medium, int], load: WorkerLoad, n_tokens: int, bs: int
               ) -> WorkerScore:
        c = self.config
        matched_tokens = min(sum(held.values()) * bs, n_tokens)
        new_blocks = (n_tokens - matched_tokens) / bs
        prefill = new_blocks + sum(c.weight(m) * n for m, n in held.items())
        decode = load.active_blocks + -(-n_tokens // bs)
        cost = c.prefill_weight * prefill + decode + c.request_weight * load.active_requests
        return WorkerScore(cost, dict(held), new_blocks, prefill, decode, load.active_requests)

    def _pick(self, scores: dict[str, WorkerScore]) -> str:
        names = sorted(scores)
        costs = [scores[w].cost for w in names]
        low, high = min(costs), max(costs)
        t = self.config.temperature
        with self._rng_lock:
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
