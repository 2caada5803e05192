"""Leaf-first eviction by expected reuse, learned online per structural class of block."""

from __future__ import annotations

import math
from collections import OrderedDict

from kvbm.errors import PolicyError
from kvbm.policies.admission import FrequencyAdmission
from kvbm.policies.leaves import LeafFirstPolicy
from kvbm.policies.shadows import EvictionOrder, ShadowLRU, ShadowProbation

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
#: Largest row (counters) of the run-fanout sketch; 4 rows of this are 16 MiB.
_MAX_WIDTH = 1 << 22
#: Largest row of the insertion sketch; 4 rows of this are 64 MiB, for tiers of ~500k blocks.
_MAX_SEEN_WIDTH = 1 << 24

# Classes (segments). A *run* is a sequence of consecutive insertions each the parent (tail
# first) or the child (root first) of the one before; the manager offloads a request's new
# blocks to the host tier as one run, tail first, and commits them to G1 root first.
TAIL = 0       #: the deepest block of a run (a prompt's last, usually partial, block)
HIT = 1        #: used once while resident
HOT = 2        #: used twice or more while resident
SEEN = 3       #: inserted again soon after it left (the tier lost it and it came back)
PENDING = 4    #: inserted, its run not complete yet
# The other blocks of a run, by its attach point: how many runs hung under the parent of
# its first block recently, or none for a run from a first block.
FIRST = 5      #: the first run under its parent (a conversation's next turn)
SECOND = 6     #: the second run under its parent
FEW = 7        #: the third or fourth
MANY = 8       #: a run under a parent with 4+ earlier runs (a shared prompt or document)
ROOT = 9       #: a run from a first block
NSEG = 10
CLASS_NAMES = ("tail", "hit", "hot", "seen", "pending", "first", "second", "few", "many",
               "root")
#: Classes no use has confirmed yet (the probation-first order evicts them first).
_UNPROVEN = (TAIL, PENDING, FIRST, SECOND, FEW, MANY, ROOT)
_PROVEN = (HIT, HOT, SEEN)


class _ShadowScored:
    """Keys only: what scored eviction would hold for the sampled keys (no leaf rule)."""

    __slots__ = ("cap", "n", "owner", "where")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.n = 0
        self.where: dict[int, int] = {}
        self.owner: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(NSEG)]

    def ref(self, key: int, seg: int, now: int, logp: list[float], tau: float) -> bool:
        where, segs = self.where, self.owner
        old = where.get(key)
        if old is not None:
            del segs[old][key]
            self.n -= 1
        segs[seg][key] = now
        where[key] = seg
        self.n += 1
        while self.n > self.cap:
            best = -1
            low = math.inf
            for s, od in enumerate(segs):
                if od:
                    score = logp[s] - (now - next(iter(od.values()))) / tau
                    if score < low:
                        low, best = score, s
            k, _ = segs[best].popitem(last=False)
            del where[k]
            self.n -= 1
        return old is not None


class PredictivePolicy(LeafFirstPolicy):
    """Leaf-first eviction of the block least likely to be used again soon.

    Every resident block belongs to a *class* given by where it sits in the prefix tree:

    * a run of new blocks (one offload) is classified by its attach point, the
      parent of its first block: how many runs attached under that parent recently (a
      count-min sketch over run roots' parents) or none (a run from a first block). A
      conversation's next turn is the first run under the block before the previous
      prompt's partial last block; a new conversation or a one-shot prompt hangs under a
      shared system prompt or document, which has had many;
    * the deepest block of a run (a prompt's partial last block: a longer prompt gets a
      different block there) is its own class; so are blocks used once / twice or more
      while resident, and blocks inserted again soon after they left.

    The policy learns each class's reuse probability ``p`` online: one key in ``sample``
    (by a hash of the key) is remembered, with the class it entered, in a ghost FIFO of
    ``horizon`` x capacity / ``sample`` entries; a later reference (use or re-insertion)
    while it is remembered counts as a reuse of that class. Counts are halved every
    ``capacity`` sampled entries, so ``p`` follows the workload.

    Three eviction orders, all leaf-first:

    * ``lru``: the least recent leaf, i.e. exactly ``lineage``;
    * ``probation``: the least recent leaf among classes no use has confirmed (runs, tails)
      first, used or re-inserted blocks only when there is none (``adaptive``'s order);
    * ``scored``: the oldest leaf of every class is a candidate and the one with the lowest
      ``log p - age / tau`` leaves: the expected reuse of its class, discounted
      exponentially with the time since its last use. ``tau`` is ``reach`` x the running
      mean of the reuse distances the ghosts observe (in clock ticks: insertions, uses and
      unpins). Within a class this is LRU.

    Which order is best depends on the tier size and the workload, so, like ``adaptive``,
    the policy replays the sampled keys through three key-only shadow caches of capacity /
    ``sample`` (one per order, without the leaf rule) and keeps one score per *pair* of
    orders, decayed by ``memory``, that moves when the pair's two shadows disagree: +1 for
    the one that hit. The tier starts as ``lineage`` and leaves its order only for one that
    leads it by more than ``margin`` (the better of two that do). Both the pairing and the
    stickiness matter because mixing two orders loses what either gains: a random mix of
    64 % probation-first and 36 % LRU evictions hits less often than pure LRU on a trace
    where pure probation-first wins by 9 %; and scores measured against LRU alone rank the
    other two by how often each wins a disagreement with LRU, not by how many hits it gains
    (docs/policies.md).

    Memory: the leaf bookkeeping, two sketches, and ghosts and shadows bounded by
    O(horizon x capacity / sample) keys. Every operation is O(log n) amortised plus a scan
    of the class heads in ``victim``.
    """

    __slots__ = ("_dist", "_ent", "_fanout", "_ghost", "_ghost_cap", "_logp", "_order",
                 "_pair_score", "_pending", "_prob_score", "_reuse", "_sample_bits", "_sampled_n",
                 "_scored_score", "_shadow_lru", "_shadow_prob", "_shadow_scored", "_sketch",
                 "_tau", "margin", "memory", "reach")

    name = "predictive"

    def __init__(self, capacity: int, *, sample: int = 8, horizon: float = 4.0,
                 reach: float = 2.0, memory: float = 0.995, margin: float = 16.0) -> None:
        super().__init__(capacity, NSEG)
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1 \
                or sample & (sample - 1):
            raise PolicyError(f"predictive sample must be a power of two, got {sample!r}")
        for what, x in (("horizon", horizon), ("reach", reach)):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 < x < math.inf:
                raise PolicyError(f"predictive {what} must be a number > 0, got {x!r}")
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) \
                or not 0.0 < memory < 1.0:
            raise PolicyError(f"predictive memory must be in (0, 1), got {memory!r}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
                or not 0.0 <= margin < 1.0 / (1.0 - memory):
            raise PolicyError(f"predictive margin must be in [0, 1/(1-memory)), got {margin!r}")
        self.memory = float(memory)
        self.margin = float(margin)
        self.reach = float(reach)
        cap = max(capacity, 1)
        win = max(16, min(4 * cap, _MAX_WIDTH // 2))
        # Run roots per parent: twice as many counters per row as sightings per window (see
        # FrequencyAdmission); a collision there only moves a run to a busier class.
        width = min(_MAX_WIDTH, 1 << (2 * win - 1).bit_length())
        self._fanout = FrequencyAdmission(window=win, width=width)
        # Keys inserted: asked on every insertion, and a wrong "seen before" files a block
        # as SEEN, i.e. proven. With 2 counters per sighting, collisions both answered yes
        # for some never-seen keys and inflated counts enough to survive the halving (6 %
        # more SEEN filings on chat seed 1 at 3 %); 8 per sighting make the counts all but
        # exact, worth 1-3 % of hit ratio in 2-5 % tiers (docs/policies.md).
        seen_width = min(_MAX_SEEN_WIDTH, 1 << (8 * win - 1).bit_length())
        self._sketch = FrequencyAdmission(window=win, width=seen_width)
        self._sample_bits = sample.bit_length() - 1
        #: Sampled key -> (class it entered, clock then), oldest first.
        self._ghost: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._ghost_cap = max(16, int(horizon * cap) // sample)
        self._ent = [0.0] * NSEG
        self._reuse = [0.0] * NSEG
        self._sampled_n = 0
        self._logp = [math.log(0.5)] * NSEG
        self._logp[TAIL] = math.log(0.05)   # until measured: a prompt's tail is rarely reused
        #: Running mean of the observed reuse distance (clock ticks), and tau from it.
        self._dist = float(cap)
        self._tau = self.reach * self._dist
        self._pending: list[int] = []
        scap = max(1, capacity // sample)
        self._shadow_lru = ShadowLRU(scap)
        self._shadow_prob = ShadowProbation(scap)
        self._shadow_scored = _ShadowScored(scap)
        #: How far probation-first / scored lead LRU, and scored leads probation-first.
        self._prob_score = 0.0
        self._scored_score = 0.0
        self._pair_score = 0.0
        #: The order chosen at the last score change (the state behind the stickiness).
        self._order = EvictionOrder.LRU

    # ---------------------------------------------------------------------- learning --
    @property
    def mode(self) -> EvictionOrder:
        """The eviction order in force: the last one chosen, unless another leads it by more
        than ``margin`` in the shadows (then that one, or the better of two that do)."""
        now, margin = self._order, self.margin
        better = [o for o in EvictionOrder if o is not now and self._lead(o, now) > margin]
        if len(better) == 2:
            a, b = better
            return a if self._lead(a, b) >= 0.0 else b
        return better[0] if better else now

    def _lead(self, a: EvictionOrder, b: EvictionOrder) -> float:
        """How far order ``a`` leads order ``b`` in the shadows (negative: it trails)."""
        if a is b:
            return 0.0
        if b is EvictionOrder.LRU:
            return self._prob_score if a is EvictionOrder.PROBATION else self._scored_score
        if a is EvictionOrder.LRU:
            return -self._lead(b, a)
        return self._pair_score if a is EvictionOrder.SCORED else -self._pair_score

    @property
    def tau(self) -> float:
        """The current time scale (clock ticks) of the age discount."""
        return self._tau

    def reuse_probability(self) -> dict[str, float]:
        """The current estimate of ``p`` per class."""
        return {CLASS_NAMES[s]: math.exp(self._logp[s]) for s in range(NSEG) if s != PENDING}

    def class_of(self, key: int) -> str:
        """The class of a resident key (classifying the pending run first, as if it ended)."""
        if self._pending:
            self._resolve()
        return CLASS_NAMES[self._seg[key]]

    def _sampled(self, key: int) -> bool:
        # The top bits of a multiplicative hash pick an unbiased 1-in-2**bits sample, even
        # of structured keys (small consecutive ints, not only xxh3 hashes).
        bits = self._sample_bits
        return not bits or not ((key * _GOLDEN) & _M64) >> (64 - bits)

    def _observe(self, key: int, seg: int) -> None:
        """A sampled key was referenced (used or inserted) and is now in class ``seg``."""
        ghost = self._ghost
        now = self._clock
        old = ghost.pop(key, None)
        if old is not None:   # a reuse of the class it entered last time
            self._reuse[old[0]] += 1.0
            self._update(old[0])
            self._dist += (now - old[1] - self._dist) * 0.002
            self._tau = max(1.0, self.reach * self._dist)
        ghost[key] = (seg, now)
        if len(ghost) > self._ghost_cap:
            ghost.popitem(last=False)   # not reused within the horizon
        self._ent[seg] += 1.0
        self._update(seg)
        self._sampled_n += 1
        if self._sampled_n >= max(64, self.capacity):
            self._sampled_n = 0
            self._ent = [x / 2 for x in self._ent]
            self._reuse = [x / 2 for x in self._reuse]
        # Duel: the same reference in every shadow; only disagreements carry information.
        a = self._shadow_lru.ref(key)
        b = self._shadow_scored.ref(key, seg, now, self._logp, self._tau)
        c = self._shadow_prob.ref(key, seg in _PROVEN)
        mem = self.memory
        if a != b:
            self._scored_score = self._scored_score * mem + (1.0 if b else -1.0)
        if a != c:
            self._prob_score = self._prob_score * mem + (1.0 if c else -1.0)
        if b != c:
            self._pair_score = self._pair_score * mem + (1.0 if b else -1.0)
        if a != b or a != c:
            self._order = self.mode

    def _update(self, seg: int) -> None:
        # A weak prior (2 references at p = 1/2) keeps empty classes neutral; halving can
        # leave more reuses than entries for a moment, hence the clamp.
        self._logp[seg] = math.log(min(1.0, (self._reuse[seg] + 1.0) / (self._ent[seg] + 2.0)))

    # ------------------------------------------------------------------------ classes --
    def _resolve(self) -> None:
        """Classify the pending run now that it is complete."""
        run = self._pending
        self._pending = []
        stamp, seg, parent = self._stamp, self._seg, self._parent
        if len(run) > 1 and parent.get(run[1]) == run[0]:
            run.reverse()   # inserted root first: make it tail first
        root = run[-1]
        rp = parent.get(root)
        if rp is None:
            cls = ROOT
        else:
            self._fanout.admit(rp)
            n = self._fanout.estimate(rp)
            cls = FIRST if n <= 1 else SECOND if n == 2 else FEW if n <= 4 else MANY
        for i, key in enumerate(run):
            if key not in stamp or seg[key] != PENDING:
                continue
            c = TAIL if i == 0 else cls
            self._resegment(key, c)
            if self._sampled(key):
                self._observe(key, c)

    def _place(self, key: int, parent: int | None) -> int:
        pending = self._pending
        if pending and self._parent.get(pending[-1]) != key and parent != pending[-1]:
            self._resolve()   # neither parent nor child of the last key: a new run starts
        if self._sketch.admit(key):
            if self._sampled(key):
                self._observe(key, SEEN)
            return SEEN
        self._pending.append(key)
        return PENDING

    def insert(self, key: int, parent: int | None, *, pinned: bool = False) -> None:
        super().insert(key, parent, pinned=pinned)
        pending = self._pending
        if len(pending) > 1 and pending[-1] == key and self._parent[pending[-2]] == key \
                and (parent is None or parent in self._stamp):
            self._resolve()   # inserted tail first, the run reached a resident block

    def _use(self, key: int) -> int:
        if self._pending:
            self._resolve()
        seg = HOT if self._seg[key] in (HIT, HOT) else HIT
        if self._sampled(key):
            self._observe(key, seg)
        return seg

    # ---------------------------------------------------------------------- interface --
    def remove(self, key: int) -> None:
        if self._pending:
            self._resolve()
        super().remove(key)

    def pin(self, key: int) -> None:
        if self._pending:
            self._resolve()
        super().pin(key)

    def unpin(self, key: int) -> None:
        if self._pending:
            self._resolve()
        super().unpin(key)

    def victim(self) -> int | None:
        if self._pending:
            self._resolve()
        top, stamp = self._top, self._stamp
        best = -1
        mode = self.mode
        if mode is EvictionOrder.SCORED:
            now, tau, logp = self._clock, self._tau, self._logp
            low = math.inf
            for s in range(NSEG):
                k = top(s)
                if k is not None:
                    score = logp[s] - (now - stamp[k]) / tau
                    if score < low:
                        low, best = score, s
        else:
            groups = (_UNPROVEN, _PROVEN) if mode is EvictionOrder.PROBATION else (range(NSEG),)
            for group in groups:
                oldest = math.inf
                for s in group:
                    k = top(s)
                    if k is not None and stamp[k] < oldest:
                        oldest, best = stamp[k], s
                if best >= 0:
                    break
        if best >= 0:
            return self._take(best)
        return self._fallback()   # every unpinned key has a resident child
