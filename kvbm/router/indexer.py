"""KvIndexer: which worker holds which prefix, in which medium.

The indexer computes the hashes of its nodes itself from each event's ``token_ids`` (kvbm's
chained, seeded xxh3, DESIGN.md §4; ``lora_name`` seeds them as kvbm does), so vLLM's
sha256-named GPU events and kvbm's lower-tier events for the same tokens land on the same
nodes (see :mod:`kvbm.router.table` for the structure). A store's ``parent_block_hash`` is
found through the worker's map of publisher hashes (or, for a kvbm publisher whose hashes are
sequence hashes already, as a node); an unknown parent means a lost event: the stored blocks
are dropped and counted as ``unknown_parents`` (see :class:`IndexerStats`).

A worker's ``AllBlocksCleared`` clears its GPU medium only by default (:class:`ClearScope`):
vLLM sends it when its GPU prefix cache is reset, while the lower tiers keep their blocks and
announce their removals themselves. Resets of the router's own (``AllMediaCleared``,
:meth:`KvIndexer.clear_worker`: lost events, restarts) clear every medium.
"""

from __future__ import annotations

import array
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain as _chain_iters
from typing import Any

import xxhash

from kvbm.errors import InvalidArgumentError, InvalidKeyError, KvbmError, TokenError
from kvbm.events.records import AllBlocksCleared, AllMediaCleared, BlockRemoved, BlockStored
from kvbm.hashing import (
    as_token_array,
    chain,
    check_lora_name,
    hash_blocks,
    local_block_hashes,
    root_seeds,
)
from kvbm.medium import MEDIUM_BY_BIT, Medium
from kvbm.router.config import ClearScope
from kvbm.router.table import MEDIUM_INDEX, PROBE_MIN_BLOCKS, NodeTable, Worker

_GPU = MEDIUM_INDEX[Medium.GPU]
_flat = _chain_iters.from_iterable
_U64 = (1 << 64) - 1
#: find_matches of tokens hashes this many blocks first, the rest only where they all match
#: (a prompt that shares little with the index costs little hashing)
_HEAD_BLOCKS = 32


@dataclass(frozen=True, slots=True)
class IndexerStats:
    """Counters since the indexer was made (``nodes`` and ``workers`` are current)."""

    events_applied: int
    blocks_stored: int
    blocks_removed: int
    #: stores whose parent this worker never announced (a lost event: the blocks are dropped)
    unknown_parents: int
    #: removals of a hash (or a medium of it) the worker does not hold (a lost store)
    unknown_removals: int
    #: events refused by :meth:`KvIndexer.apply` (bad fields, another block size)
    rejected_events: int
    #: a publisher hash announced again for other tokens (the old blocks were dropped)
    conflicts: int
    clears: int
    nodes: int
    workers: int


def _check_worker(worker: object) -> str:
    if not isinstance(worker, str) or not worker:
        raise InvalidArgumentError(f"a worker is named by a non-empty str, got {worker!r}")
    return worker


def _check_hashes(hashes: object, what: str) -> array.array[int]:
    if not isinstance(hashes, list | tuple):
        raise InvalidKeyError(f"{what} must be a list of ints in [0, 2**64), got "
                              f"{type(hashes).__name__}")
    try:  # array('Q') refuses negative, too large and non-integer values in C
        return array.array("Q", hashes)
    except (OverflowError, TypeError) as e:
        raise InvalidKeyError(f"{what} must be ints in [0, 2**64): {e}") from None


def _check_scope(scope: object) -> ClearScope:
    if not isinstance(scope, ClearScope):
        raise InvalidArgumentError(f"a clear scope is a ClearScope "
                                   f"({', '.join(s.name for s in ClearScope)}), got {scope!r}")
    return scope


def _extra_media(ev: BlockStored) -> dict[int, list[int]] | None:
    """vLLM's per-block ``extra_keys`` (media, cache salt ...) folded into the hash as one
    media hash per block, so those blocks never match a query of bare tokens (the router
    cannot know the media of a prompt from its tokens)."""
    extra = getattr(ev, "extra_keys", None)
    if not extra:
        return None
    out: dict[int, list[int]] = {}
    for i, keys in enumerate(extra):
        if not keys:
            continue
        keys = tuple(keys)
        if ev.lora_name is not None and keys[:1] == (ev.lora_name,):
            keys = keys[1:]  # vLLM lists the LoRA name first; it already seeds the hash
        if keys:
            out[i] = [xxhash.xxh3_64_intdigest(repr(keys).encode("utf-8", "replace"))]
    return out or None


class KvIndexer:
    """Per worker, which blocks are resident in which medium, matched by prefix.

    ``block_size``: the block size of the events and queries; ``None`` adopts the first
    event's (events of another block size are refused and counted). ``salt``: kvbm's
    namespace salt (``ManagerConfig.salt``), which must match the workers' for kvbm's own
    hashes and :meth:`find_matches`' ``hashes`` to agree. ``clear_scope``: what a worker's
    ``AllBlocksCleared`` clears (its GPU blocks, or everything; see
    :meth:`set_clear_scope` for one worker). Thread-safe.
    """

    def __init__(self, block_size: int | None = None, *, salt: str | bytes | int | None = None,
                 clear_scope: ClearScope = ClearScope.GPU) -> None:
        if block_size is not None and (type(block_size) is not int or block_size <= 0):
            raise InvalidArgumentError(f"block_size must be a positive int or None, "
                                       f"got {block_size!r}")
        hash_blocks([], 1, salt=salt)  # refuses a bad salt now, not at the first event
        self._block_size = block_size
        self._salt = salt
        self._scope = _check_scope(clear_scope)
        self._scopes: dict[str, ClearScope] = {}  # per-worker overrides
        self._lock = threading.RLock()
        self._t = NodeTable()
        self._n = dict.fromkeys(("events", "unknown_parents", "rejected"), 0)

    # ----------------------------------------------------------------------- workers --
    @property
    def block_size(self) -> int | None:
        return self._block_size

    def workers(self) -> list[str]:
        """Every known worker (announced anything, or added), sorted."""
        with self._lock:
            return sorted(self._t.workers)

    def add_worker(self, worker: str) -> None:
        """Make ``worker`` known (a candidate for routing) before it announces anything."""
        with self._lock:
            self._t.worker(_check_worker(worker))

    def remove_worker(self, worker: str) -> None:
        """Forget ``worker`` and everything it held (no-op for an unknown worker)."""
        _check_worker(worker)
        with self._lock:
            self._scopes.pop(worker, None)
            w = self._t.workers.get(worker)
            if w is not None:
                self._t.drop_worker(w)

    @property
    def clear_scope(self) -> ClearScope:
        """What a worker's ``AllBlocksCleared`` clears, unless set for that worker."""
        return self._scope

    def set_clear_scope(self, worker: str, scope: ClearScope | None) -> None:
        """What ``worker``'s ``AllBlocksCleared`` clears (``None``: the indexer's scope)."""
        _check_worker(worker)
        if scope is not None:
            _check_scope(scope)
        with self._lock:
            if scope is None:
                self._scopes.pop(worker, None)
            else:
                self._scopes[worker] = scope

    def clear_scope_of(self, worker: str) -> ClearScope:
        with self._lock:
            return self._scopes.get(_check_worker(worker), self._scope)

    def clear_worker(self, worker: str) -> None:
        """Drop every block of ``worker`` in every medium (what ``AllMediaCleared`` does, and
        ``AllBlocksCleared`` under :attr:`ClearScope.ALL`); it stays known."""
        _check_worker(worker)
        with self._lock:
            w = self._t.workers.get(worker)
            if w is not None:
                self._t.clear(w)

    def set_object_group(self, worker: str, group: str | None) -> None:
        """Put ``worker`` in an object group (workers sharing a bucket, layout and salt) or
        take it out (``None``). A block in the OBJECT tier of any worker of a group counts as
        an OBJECT hit for every worker of the group (it loads the page from the bucket)."""
        _check_worker(worker)
        if group is not None and (not isinstance(group, str) or not group):
            raise InvalidArgumentError(f"an object group is a non-empty str or None, "
                                       f"got {group!r}")
        with self._lock:
            if group is not None or worker in self._t.workers:
                self._t.set_group(self._t.worker(worker), group)

    def object_group(self, worker: str) -> str | None:
        with self._lock:
            w = self._t.workers.get(_check_worker(worker))
            return None if w is None else w.group

    # ------------------------------------------------------------------------ events --
    def apply(self, worker: str, events: Iterable[Any]) -> None:
        """Apply one worker's events in order. Every event is checked first: a malformed one
        (or one of another block size) raises :class:`~kvbm.errors.InvalidArgumentError` and
        nothing of the call is applied (the subscriber then applies the others one by one)."""
        _check_worker(worker)
        if isinstance(events, BlockStored | BlockRemoved | AllBlocksCleared):
            raise InvalidArgumentError("apply takes an iterable of events, got one event")
        try:
            evs = list(events)
        except TypeError:
            raise InvalidArgumentError(f"events must be an iterable of KV events, got "
                                       f"{type(events).__name__}") from None
        with self._lock:
            bs = self._block_size
            try:
                for ev in evs:
                    bs = self._check_event(ev, bs)
                local = self._local_hashes(evs, bs)
            except KvbmError:
                self._n["rejected"] += 1
                raise
            self._block_size = bs
            w = self._t.worker(worker)
            for ev, loc in zip(evs, local, strict=True):
                if loc is not None:
                    self._store(w, ev, loc)
                elif isinstance(ev, BlockRemoved):
                    self._t.remove(w, ev.block_hashes, MEDIUM_INDEX[ev.medium])
                elif (type(ev) is AllMediaCleared
                      or self._scopes.get(worker, self._scope) is ClearScope.ALL):
                    self._t.clear(w)
                else:
                    self._t.clear_medium(w, _GPU)
            self._n["events"] += len(evs)

    def _check_event(self, ev: object, bs: int | None) -> int | None:
        """Check one event's fields; the block size of the indexer after it."""
        if isinstance(ev, BlockStored):
            if type(ev.block_size) is not int or ev.block_size <= 0:
                raise InvalidArgumentError(f"BlockStored.block_size must be a positive int, "
                                           f"got {ev.block_size!r}")
            if bs is not None and ev.block_size != bs:
                raise InvalidArgumentError(f"BlockStored of block_size {ev.block_size}; this "
                                           f"indexer indexes blocks of {bs}")
            bs = ev.block_size
            if not isinstance(ev.medium, Medium):
                raise InvalidArgumentError(f"BlockStored.medium must be a Medium, got "
                                           f"{ev.medium!r}")
            hs = _check_hashes(ev.block_hashes, "BlockStored.block_hashes")
            p = ev.parent_block_hash
            if p is not None and not (type(p) is int and 0 <= p <= _U64):
                _check_hashes([p], "BlockStored.parent_block_hash")
            tokens = ev.token_ids
            if not isinstance(tokens, list | tuple) or len(tokens) != len(hs) * bs:
                n = len(tokens) if isinstance(tokens, list | tuple) else type(tokens).__name__
                raise InvalidArgumentError(f"BlockStored has {len(hs)} block(s) of {bs} "
                                           f"tokens but {n} token_ids")
            check_lora_name(ev.lora_name)
        elif isinstance(ev, BlockRemoved):
            if not isinstance(ev.medium, Medium):
                raise InvalidArgumentError(f"BlockRemoved.medium must be a Medium, got "
                                           f"{ev.medium!r}")
            _check_hashes(ev.block_hashes, "BlockRemoved.block_hashes")
        elif not isinstance(ev, AllBlocksCleared):
            raise InvalidArgumentError(f"not a KV event: {type(ev).__name__}")
        return bs

    def _local_hashes(self, evs: list[Any], bs: int | None) -> list[list[int] | None]:
        """The local hashes of each store's blocks (``None`` for other events), computed
        before anything changes so that bad tokens refuse the whole call. Stores that need
        no salt or media are hashed together, one call per LoRA name: the per-call cost of
        hashing is most of a 16-block store's."""
        out: list[list[int] | None] = [None] * len(evs)
        together: dict[str | None, list[int]] = {}
        salt = self._salt
        try:
            for i, ev in enumerate(evs):
                if not isinstance(ev, BlockStored):
                    continue
                assert bs is not None  # _check_event set it from the store
                extra = _extra_media(ev) if ev.extra_keys else None
                if extra is None and (salt is None or ev.parent_block_hash is not None):
                    together.setdefault(ev.lora_name, []).append(i)
                else:
                    out[i] = hash_blocks(ev.token_ids, bs, lora_name=ev.lora_name,
                                         mm_hashes=extra,
                                         salt=salt if ev.parent_block_hash is None else None
                                         ).local
            for lora, idxs in together.items():
                assert bs is not None  # there were stores
                tokens = list(_flat(evs[i].token_ids for i in idxs))
                local = local_block_hashes(tokens, bs, lora_name=lora)
                at = 0
                for i in idxs:
                    n = len(evs[i].block_hashes)
                    out[i] = local[at:at + n]
                    at += n
        except TokenError as e:
            raise InvalidArgumentError(f"BlockStored.token_ids: {e}") from None
        return out

    def _store(self, w: Worker, ev: BlockStored, local: list[int]) -> None:
        parent = ev.parent_block_hash
        pseq: int | None = None
        if parent is not None:
            pseq = self._t.seq_of(w, parent, MEDIUM_INDEX[ev.medium])
            if pseq is None:
                if parent not in self._t.rows:
                    self._n["unknown_parents"] += 1
                    return
                pseq = parent  # a kvbm publisher: its hashes are sequence hashes already
        self._t.store(w, ev.block_hashes, chain(local, pseq), ev.medium)

    # ------------------------------------------------------------------------ queries --
    def sequence_hashes(self, token_ids: Any, *, lora_name: str | None = None) -> list[int]:
        """The sequence hashes of ``token_ids``' full blocks, as this indexer names nodes."""
        bs = self._block_size
        if bs is None:
            raise InvalidArgumentError("the indexer has no block size yet (none given and "
                                       "no event seen): query by hashes, or give block_size")
        try:
            return hash_blocks(token_ids, bs, lora_name=lora_name, salt=self._salt).sequence
        except TokenError as e:  # one class for every bad argument of the router's calls
            raise InvalidArgumentError(str(e)) from None

    def find_matches(self, token_ids: Any = None, *, hashes: Sequence[int] | None = None,
                     lora_name: str | None = None) -> dict[str, dict[Medium, int]]:
        """Per worker, how many leading blocks of the prompt it can serve, by medium.

        Worker W matches the longest prefix of blocks 0..L-1 each resident on W in some
        medium (in OBJECT also when another worker of W's object group holds it there).
        Each of those blocks counts once, in its fastest medium on W (GPU before CPU_PINNED
        before DISK before OBJECT). Workers matching no block are left out. The prompt is
        given as ``token_ids`` (hashed here; a trailing partial block is ignored) or as
        this indexer's sequence ``hashes`` (kvbm's ``MatchResult.sequence_hashes``).
        """
        if (token_ids is None) == (hashes is None):
            raise InvalidArgumentError("find_matches takes token_ids or hashes (one of them)")
        if hashes is None:
            return self._match_tokens(token_ids, lora_name)
        if lora_name is not None:
            raise InvalidArgumentError("lora_name applies to token_ids, not to hashes "
                                       "(they were computed with it already)")
        seqs = _check_hashes(hashes if isinstance(hashes, list | tuple)
                             else list(hashes) if isinstance(hashes, Sequence) else hashes,
                             "hashes")
        with self._lock:
            return self._t.tally(self._t.runs(seqs))

    def _match_tokens(self, token_ids: Any, lora_name: str | None
                      ) -> dict[str, dict[Medium, int]]:
        """:meth:`find_matches` of tokens, hashed only as far as a worker may match: the
        first blocks, then (where some worker holds all of them) the rest of the chain."""
        bs = self._block_size
        if bs is None:
            raise InvalidArgumentError("the indexer has no block size yet (none given and "
                                       "no event seen): query by hashes, or give block_size")
        try:
            arr = as_token_array(token_ids)  # every token is checked, hashed or not
            n = arr.size // bs
            if n >= PROBE_MIN_BLOCKS:
                # a long prompt is hashed and walked in one native call, as far as it is found
                seed, first_seed = root_seeds(lora_name, self._salt)
                with self._lock:
                    runs = self._t.token_runs(arr, bs, seed, first_seed)
                    if runs is not None:
                        return self._t.tally(runs)
            head = hash_blocks(arr[:_HEAD_BLOCKS * bs], bs, lora_name=lora_name,
                               salt=self._salt).sequence
        except TokenError as e:  # one class for every bad argument of the router's calls
            raise InvalidArgumentError(str(e)) from None
        with self._lock:
            runs = self._t.runs(head)
            if n <= len(head) or sum(r[2] for r in runs) < len(head):
                return self._t.tally(runs)
        rest = hash_blocks(arr[len(head) * bs:n * bs], bs, lora_name=lora_name,
                           parent_hash=head[-1]).sequence
        with self._lock:  # the whole walk again: the index may have changed meanwhile
            return self._t.tally(self._t.runs(head + rest))

    # -------------------------------------------------------------------- inspection --
    def worker_blocks(self, worker: str) -> dict[int, frozenset[Medium]]:
        """``worker``'s blocks as its publisher named them: hash -> media holding it."""
        with self._lock:
            w = self._t.workers.get(_check_worker(worker))
            return {} if w is None else self._t.blocks(w)

    def block_counts(self) -> dict[str, dict[Medium, int]]:
        """Per worker, its publisher hashes resident per medium (every known worker)."""
        with self._lock:
            return {name: {m: len(d) for m, d in zip(MEDIUM_BY_BIT, w.media, strict=True)}
                    for name, w in sorted(self._t.workers.items())}

    def stats(self) -> IndexerStats:
        with self._lock:
            n, t = self._n, self._t.n
            return IndexerStats(n["events"], t["stored"], t["removed"], n["unknown_parents"],
                                t["unknown_removals"], n["rejected"], t["conflicts"],
                                t["clears"], len(self._t.rows), len(self._t.workers))
