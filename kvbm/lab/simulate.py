"""A policy-level model of :func:`kvbm.lab.replay.replay`: the same policy calls, without pages.

``replay`` drives the real BlockManager (hashing, index, pools, copies) and takes 15–40 s per
12,000-request trace; most of that is the manager's per-block work, not the policy's. For
exploring policies this module makes exactly the calls the manager makes on its two tiers
— G1 with ``lineage``, the host tier with the policy under test, eager offload tail first
(or write-back of G1's victims), the lineage rule on eviction — on the block hashes the
manager would compute, so it gets *the same hit ratio* (tests compare the two on every
policy), about 5× faster.

It models the replay's request cycle only (``match_prefix`` -> ``onboard`` -> ``allocate``
-> ``commit`` -> ``release``, no failures, no lower tiers). When the manager's call
sequence changes, ``tests/test_policy_replay.py`` says so and this module has to follow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from kvbm.policies import make_admission, make_eviction
from kvbm.policies.base import AdmissionPolicy, EvictionPolicy


class _Tiers:
    """Residency of G1 and the host tier, the prefix tree, and the lineage rule."""

    def __init__(self, g1: EvictionPolicy, g2: EvictionPolicy, g1_cap: int, g2_cap: int,
                 *, write_back: bool = False, admission: AdmissionPolicy | None = None
                 ) -> None:
        self.g1, self.g2 = g1, g2
        self.g1_cap, self.g2_cap = g1_cap, g2_cap
        #: ``eager_offload`` off: the host tier is fed by G1's victims (through ``admission``).
        self.write_back = write_back
        self.admission = admission
        #: Host-tier blocks pinned as copy sources while G1 makes room for an onboard.
        self.g2_pinned = 0
        self.in1: set[int] = set()
        self.in2: set[int] = set()
        self.parent: dict[int, int | None] = {}
        self.children: dict[int, set[int]] = {}

    def forget(self, key: int) -> None:
        """Drop ``key`` and everything under it from the index and both tiers."""
        p = self.parent.get(key)
        if p is not None and p in self.children:
            self.children[p].discard(key)
        stack = [key]
        while stack:
            x = stack.pop()
            stack.extend(self.children.pop(x, ()))
            self.parent.pop(x, None)
            if x in self.in1:
                self.in1.discard(x)
                self.g1.remove(x)
            if x in self.in2:
                self.in2.discard(x)
                self.g2.remove(x)

    def evict1(self) -> None:
        if not self.write_back:
            self._evict(self.g1, self.in1, self.in2)
            return
        # The manager's write-back: a G1 victim the host tier lacks is copied down first
        # (admission and room permitting); the host tier's evictions may drop it meanwhile.
        k = self.g1.victim()
        assert k is not None, "every block of G1 is pinned"
        if k not in self.in2 and (self.admission is None or self.admission.admit(k)) \
                and self.g2_cap - self.g2_pinned >= 1:
            while len(self.in2) >= self.g2_cap:
                self.evict2()
            if k in self.parent:
                self.in1.discard(k)
                self.in2.add(k)
                self.g2.insert(k, self.parent[k], pinned=False)
                return
        self.in1.discard(k)
        if k in self.parent and k not in self.in2:
            self.forget(k)

    def evict2(self) -> None:
        self._evict(self.g2, self.in2, self.in1)

    def _evict(self, policy: EvictionPolicy, resident: set[int], other: set[int]) -> None:
        """One victim leaves a tier; the lineage rule drops it (and what hangs under it)
        when the other tier does not hold it either."""
        k = policy.victim()
        assert k is not None, "every block of the tier is pinned"
        resident.discard(k)
        if k not in other:
            self.forget(k)


def _request(t: _Tiers, ids: Sequence[int], admission: AdmissionPolicy | None) -> int:
    """One request through the model; returns its prefix-hit blocks."""
    g1, g2, in1, in2, parent = t.g1, t.g2, t.in1, t.in2, t.parent
    n = len(ids)
    h = 0
    while h < n and (ids[h] in in1 or ids[h] in in2):
        h += 1
    hit = list(ids[:h])
    # onboard: hold G1-resident blocks, copy host-only ones up (held in the host meanwhile)
    for k in hit:
        if k in in1:
            g1.pin(k)
    up = [k for k in hit if k not in in1]
    for k in up:
        g2.pin(k)
    t.g2_pinned = len(up)
    while len(in1) + len(up) > t.g1_cap:
        t.evict1()
    t.g2_pinned = 0
    for k in up:
        g2.unpin(k)
        if k in parent:
            in1.add(k)
            g1.insert(k, parent[k], pinned=True)
    hit = [k for k in hit if k in parent]
    for k in reversed(hit):   # the leaf first: the root ends up the most recent
        if k in in1:
            g1.access(k)
        if k in in2:
            g2.access(k)
    # allocate + commit the new blocks, root first
    new = list(ids[h:])
    while len(in1) + len(new) > t.g1_cap:
        t.evict1()
    par = ids[h - 1] if h and ids[h - 1] in parent else None
    for k in new:
        parent[k] = par
        if par is not None:
            t.children.setdefault(par, set()).add(k)
        in1.add(k)
        g1.insert(k, par, pinned=True)
        par = k
    for k in reversed(new):
        g1.access(k)
    # eager offload to the host tier, admission first, tail first
    todo = [] if t.write_back else [k for k in new if k not in in2]
    if admission is not None:
        todo = [k for k in todo if admission.admit(k)]
    # Nothing is pinned in the host tier here, so all of it is room; a run longer than the
    # tier keeps its root end, which stays matchable (as the manager does).
    todo = todo[:t.g2_cap]
    while len(in2) + len(todo) > t.g2_cap:
        t.evict2()
    for k in reversed([k for k in todo if k in parent]):
        in2.add(k)
        g2.insert(k, parent[k], pinned=False)
    # release, tail first
    for k in reversed(hit + new):
        if k in in1:
            g1.unpin(k)
    return h


def simulate(keys: Sequence[Sequence[int]], capacity: int, eviction: str,
             admission: str | AdmissionPolicy | None = None, *,
             device_blocks: int | None = None,
             before_request: Callable[[int], None] | None = None,
             eager_offload: bool = True, **params: Any) -> dict[str, Any]:
    """Hit ratio of ``eviction`` (+ ``admission``) as host-tier policy for ``keys`` (a trace
    from :func:`kvbm.lab.replay.manager_keys`), with G1 as in :func:`kvbm.lab.replay.replay`.
    ``params`` go to the eviction policy (e.g. ``sample=4`` for ``predictive``).
    ``admission`` is a policy name or an instance (bench/goal_bounds.py passes oracles that
    know the trace); ``before_request(i)`` is called before the ``i``-th request of
    ``keys``. ``eager_offload`` off: the manager's write-back mode (the host tier receives
    G1's victims, not new blocks at commit)."""
    g1_cap = device_blocks or max((len(ids) for ids in keys), default=1)
    cap = max(capacity, 1)
    adm = (admission if isinstance(admission, AdmissionPolicy) or admission is None
           else make_admission(admission, capacity=cap))
    tiers = _Tiers(make_eviction("lineage", max(g1_cap, 1)), make_eviction(eviction, cap, **params),
                   max(g1_cap, 1), cap, write_back=not eager_offload, admission=adm)
    hits = total = 0
    for i, ids in enumerate(keys):
        if before_request is not None:
            before_request(i)
        if ids:
            total += len(ids)
            hits += _request(tiers, ids, adm)
    return {"hit_ratio": hits / total if total else 0.0, "hits": hits, "blocks": total,
            "device_blocks": g1_cap, "policy": tiers.g2}
