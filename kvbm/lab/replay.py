"""Replaying a Mooncake-format trace through the BlockManager to compare host-tier policies.

The command line is ``bench/policy_replay.py``; ``kvbm demo`` uses :func:`run` too.

Each trace record (JSON lines: ``timestamp``, ``input_length``, ``output_length``,
``hash_ids``) is one request; each hash id is one block. A request hits the longest cached
run of its leading blocks (prefix semantics). Every request goes through the real manager,
as an engine would drive it: ``match_prefix`` -> ``onboard`` -> ``allocate`` -> ``commit``
-> ``release``, with committed blocks offloaded eagerly to the host tier.

* Tokens: hash id ``h`` becomes ``block_size`` tokens equal to ``h mod 2**32``; the chained
  block hashes then reproduce the trace's prefix identity. The layout is tiny (one layer,
  one head, head_dim 4) because this measures policy, not bytes.
* Host tier (G2): ``capacity-fraction`` x the trace's distinct blocks, with the policy under
  test (``EVICTION[+ADMISSION]``, e.g. ``lineage+frequency``).
* Device tier (G1): as small as the manager allows, i.e. the largest request's block count
  (a request pins its whole prefix there), with ``lineage`` eviction in every run so that
  only the host policy varies. G1 also serves hits, so Belady is computed for host + G1
  capacity, which keeps it an upper bound of every replay.
* Belady: furthest-next-use over the same trace, computed here: blocks never used again
  bypass the cache, ties go to the deeper block (its next use can be no earlier than its
  parent's, so the simulated cache stays prefix-closed and a cached block is a hit).

The hit ratio is hit blocks / requested blocks. Without ``--json`` a table shows each
policy next to LRU and the fraction of the LRU -> Belady gap it closes; with ``--json`` one
JSON document: ``{"capacity_fraction", "blocks", "hit_ratio": {name: x, ..., "belady": y},
"default": name, ...}``.
"""

from __future__ import annotations

import heapq
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kvbm.config import (
    DEFAULT_EVICTION,
    DEFAULT_HOST_ADMISSION,
    DeviceTierConfig,
    HostTierConfig,
    ManagerConfig,
)
from kvbm.errors import ConfigError, PolicyError
from kvbm.hashing import hash_blocks
from kvbm.lab.simulate import simulate
from kvbm.lab.workload import generate
from kvbm.layout import KVLayout
from kvbm.manager import BlockManager
from kvbm.policies import ADMISSION_POLICIES, EVICTION_POLICIES

#: Policies replayed when no --policy is given: every eviction policy, plus the configured
#: default when it is a combination with an admission filter.
STANDARD = tuple(EVICTION_POLICIES)
_ADMISSION_ALIASES = {"freq": "frequency"}
_U32 = 0xFFFFFFFF


def default_name() -> str:
    """The configured default of the host tier, as a policy spec."""
    adm = DEFAULT_HOST_ADMISSION
    return DEFAULT_EVICTION if adm is None else f"{DEFAULT_EVICTION}+{adm}"


def parse_policy(spec: str) -> tuple[str, str | None]:
    """``"lineage+frequency"`` -> ``("lineage", "frequency")``; validates both names."""
    ev, _, adm = spec.strip().lower().partition("+")
    if ev not in EVICTION_POLICIES:
        raise PolicyError(f"unknown eviction policy {ev!r}; valid: {sorted(EVICTION_POLICIES)}")
    if not adm:
        return ev, None
    adm = _ADMISSION_ALIASES.get(adm, adm)
    if adm not in ADMISSION_POLICIES:
        raise PolicyError(f"unknown admission policy {adm!r}; "
                          f"valid: {sorted(ADMISSION_POLICIES)}")
    return ev, adm


def spec_name(ev: str, adm: str | None) -> str:
    return ev if adm is None else f"{ev}+{adm}"


def load_trace(path: str | Path) -> list[list[int]]:
    """The ``hash_ids`` of each record of a Mooncake-format JSON-lines file, in file order."""
    out: list[list[int]] = []
    with open(path) as fp:
        for n, line in enumerate(fp, 1):
            line = line.strip()
            if not line:
                continue
            try:
                ids = json.loads(line)["hash_ids"]
                if not isinstance(ids, list):
                    raise TypeError(f"hash_ids is a {type(ids).__name__}, not a list")
                out.append([_hash_id(h) for h in ids])
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{n}: not a Mooncake trace record ({e})") from None
    return out


def _hash_id(h: Any) -> int:
    if isinstance(h, bool) or not isinstance(h, int) or h < 0:
        raise ValueError(f"hash id {h!r} is not a non-negative integer")
    return h


def generated_trace(requests: int, seed: int, family: str) -> list[list[int]]:
    """The ``hash_ids`` of a generated trace (kvbm.lab.workload)."""
    return [r["hash_ids"] for r in generate(requests, seed=seed, family=family)]


def trace_tokens(ids: Sequence[int], block_size: int) -> np.ndarray:
    """Tokens standing for a trace request: ``block_size`` copies of each hash id (mod 2**32),
    so that the chained block hashes reproduce the trace's prefix identity."""
    return np.repeat(np.asarray(ids, dtype=np.int64) & _U32, block_size).astype(np.uint32)


def manager_keys(trace: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """The trace with every hash id replaced by the sequence hash the manager computes for it
    (policies hash and sample keys, so the keys must be the same to get the same result)."""
    out: list[list[int]] = []
    for ids in trace:
        if not ids:
            out.append([])
            continue
        seq = hash_blocks(trace_tokens(ids, block_size), block_size).sequence
        out.append([int(h) for h in seq])
    return out


def distinct_blocks(trace: Iterable[Sequence[int]]) -> int:
    seen: set[int] = set()
    for ids in trace:
        seen.update(ids)
    return len(seen)


# ------------------------------------------------------------------------------- Belady --
def belady(trace: Sequence[Sequence[int]], capacity: int) -> float:
    """Hit ratio of furthest-next-use replacement with bypass, under prefix semantics."""
    inf = math.inf
    # Next use of every occurrence, by a backward pass.
    nxt: list[list[float]] = [[]] * len(trace)
    last: dict[int, float] = {}
    for i in range(len(trace) - 1, -1, -1):
        ids = trace[i]
        nxt[i] = [last.get(k, inf) for k in ids]
        for k in ids:
            last[k] = i
    cache: dict[int, float] = {}   # key -> its next use
    heap: list[tuple[float, int, int]] = []   # (-next use, -depth, key), lazily deleted
    hits = total = 0
    for i, ids in enumerate(trace):
        n = len(ids)
        total += n
        h = 0
        while h < n and ids[h] in cache:
            h += 1
        hits += h
        for depth, (k, nu) in enumerate(zip(ids, nxt[i], strict=True)):
            if nu == inf:
                cache.pop(k, None)   # never used again: bypass, or free its slot
                continue
            cache[k] = nu
            heapq.heappush(heap, (-nu, -depth, k))
        while len(cache) > capacity:
            neg_nu, _, k = heapq.heappop(heap)
            if cache.get(k) == -neg_nu:
                del cache[k]
    return hits / total if total else 0.0


# ------------------------------------------------------------------------------- replay --
def replay(trace: Sequence[Sequence[int]], capacity: int, eviction: str,
           admission: str | None, *, block_size: int = 16, device_blocks: int | None = None,
           progress: bool = False, eager_offload: bool = True) -> dict[str, Any]:
    """Replay ``trace`` through a BlockManager whose host tier holds ``capacity`` blocks
    (offloading at commit, or with ``eager_offload`` off only when G1 evicts)."""
    g1 = device_blocks or max((len(ids) for ids in trace), default=1)
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, block_size=block_size,
                      dtype="float16")
    mgr = BlockManager(layout, ManagerConfig(
        device=DeviceTierConfig(num_blocks=max(g1, 1), device="cpu", eviction="lineage"),
        host=HostTierConfig(num_blocks=max(capacity, 1), eviction=eviction,
                            admission=admission, eager_offload=eager_offload)))
    hits = total = 0
    t0 = time.perf_counter()
    step = max(1, len(trace) // 50)
    for i, ids in enumerate(trace):
        n = len(ids)
        if n == 0:
            continue
        tokens = trace_tokens(ids, block_size)
        match = mgr.match_prefix(tokens)
        hits += match.num_blocks
        total += n
        held = mgr.onboard(match)
        new = mgr.allocate(n - len(held))
        final = mgr.commit(new, tokens, start_block=len(held), hashes=match.hashes)
        mgr.release(held + final)
        if progress and i % step == 0:
            _bar(i / len(trace), spec_name(eviction, admission))
    if progress:
        _bar(1.0, spec_name(eviction, admission), end=True)
    stats = mgr.stats()
    return {"hit_ratio": hits / total if total else 0.0, "hits": hits, "blocks": total,
            "hits_by_medium": {m.value: c for m, c in stats.hits_by_medium.items() if c},
            "device_blocks": g1, "seconds": time.perf_counter() - t0}


def _bar(frac: float, label: str, *, end: bool = False) -> None:
    width = 30
    fill = int(frac * width)
    sys.stderr.write(f"\r  {label:<22} [{'#' * fill}{'.' * (width - fill)}] {frac:4.0%}")
    if end:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run(trace: Sequence[Sequence[int]], fraction: float, policies: Sequence[str] | None = None,
        *, block_size: int = 16, progress: bool = False, model: bool = False,
        eager_offload: bool = True) -> dict[str, Any]:
    """Replay every policy (default: every eviction policy and the configured default; LRU
    always included) and Belady; the ``--json`` document of bench/policy_replay.py. With
    ``model``, through :mod:`kvbm.lab.simulate` instead of the manager: the same hit ratios,
    faster, without per-medium hit counts. ``eager_offload`` off: the host tier receives
    blocks only when G1 evicts them (write-back)."""
    if policies is None:
        policies = list(dict.fromkeys([*STANDARD, default_name()]))
    distinct = distinct_blocks(trace)
    capacity = max(1, int(distinct * fraction))
    device = max((len(ids) for ids in trace), default=1)
    specs = [parse_policy(p) for p in policies]
    if ("lru", None) not in specs:
        specs.insert(0, ("lru", None))
    ratios: dict[str, float] = {}
    seconds: dict[str, float] = {}
    by_medium: dict[str, dict[str, int]] = {}
    keys = manager_keys(trace, block_size) if model else None
    for ev, adm in dict.fromkeys(specs):
        name = spec_name(ev, adm)
        if keys is not None:
            t0 = time.perf_counter()
            ratios[name] = simulate(keys, capacity, ev, adm, device_blocks=device,
                                    eager_offload=eager_offload)["hit_ratio"]
            seconds[name] = round(time.perf_counter() - t0, 2)
            continue
        r = replay(trace, capacity, ev, adm, block_size=block_size, device_blocks=device,
                   progress=progress, eager_offload=eager_offload)
        ratios[name] = r["hit_ratio"]
        seconds[name] = round(r["seconds"], 2)
        by_medium[name] = r["hits_by_medium"]
    t0 = time.perf_counter()
    ratios["belady"] = belady(trace, capacity + device)
    seconds["belady"] = round(time.perf_counter() - t0, 2)
    return {"capacity_fraction": fraction, "blocks": capacity, "hit_ratio": ratios,
            "default": default_name(), "distinct_blocks": distinct, "device_blocks": device,
            "requests": len(trace), "block_refs": sum(len(t) for t in trace),
            "hits_by_medium": by_medium, "seconds": seconds,
            "engine": "model" if model else "manager", "eager_offload": eager_offload}


def parse_fractions(text: str) -> list[float]:
    """``"0.02,0.05"`` -> ``[0.02, 0.05]``: host-tier sizes for the bench scripts' command
    lines; ValueError unless each is a number in (0, 1]."""
    try:
        out = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"not a list of numbers: {text!r}") from None
    if not out or any(not 0 < f <= 1 for f in out):
        raise ValueError(f"fractions must be in (0, 1]: {text!r}")
    return out


def gap_closed(x: float, lru: float, opt: float) -> float | None:
    """Fraction of the LRU -> Belady gap that hit ratio ``x`` closes (None: no gap)."""
    return None if opt - lru <= 1e-12 else (x - lru) / (opt - lru)


def format_table(doc: dict[str, Any]) -> str:
    ratios = doc["hit_ratio"]
    lru, opt = ratios["lru"], ratios["belady"]
    lines = [f"capacity {doc['blocks']} blocks = {doc['capacity_fraction']:.1%} of "
             f"{doc['distinct_blocks']} distinct ({doc['requests']} requests, "
             f"{doc['block_refs']} block refs; G1 {doc['device_blocks']} blocks"
             f"{'' if doc.get('eager_offload', True) else '; write-back offload'})",
             # Two spaces between columns: "x LRU" and "gap closed" must not read as one.
             f"{'policy':<22} {'hit ratio':>9}  {'x LRU':>7}  {'gap closed':>10}  "
             f"{'time s':>7}"]
    for name, x in ratios.items():
        g = gap_closed(x, lru, opt)
        mark = "  <- default" if name == doc["default"] else ""
        lines.append(f"{name:<22} {x:9.4f}  {x / lru if lru else float('nan'):7.3f}  "
                     f"{'-' if g is None else f'{g:10.1%}':>10}  "
                     f"{doc['seconds'].get(name, 0.0):7.1f}{mark}")
    return "\n".join(lines)


def format_sweep(name: str, docs: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of one trace replayed at several sizes (``run`` documents): each
    policy's hit ratio and ratio to LRU per size, Belady, and the share of the LRU -> Belady
    gap the configured default closes. The layout of docs/policies.md."""
    if not docs:
        raise ValueError("format_sweep needs at least one document")
    docs = sorted(docs, key=lambda d: d["capacity_fraction"])
    first = docs[0]
    policies: list[str] = []
    for d in docs:
        policies += [p for p in d["hit_ratio"] if p not in policies and p != "belady"]
    default = first["default"]
    lines = [f"#### {name}: {first['requests']:,} requests, {first['block_refs']:,} block "
             f"references, {first['distinct_blocks']:,} distinct blocks; "
             f"G1 = {first['device_blocks']} blocks"
             f"{'' if first.get('eager_offload', True) else '; write-back offload'}. "
             f"Columns: host tier size in % of the distinct blocks; cells: hit ratio (× LRU)",
             "",
             "| policy | " + " | ".join(f"{100 * d['capacity_fraction']:g}%" for d in docs)
             + " |",
             "|---|" + "---:|" * len(docs)]
    for p in [*policies, "belady"]:
        cells = []
        for d in docs:
            r = d["hit_ratio"]
            x = r.get(p)
            if x is None:
                cells.append("—")
            elif p in ("lru", "belady") or not r.get("lru"):
                cells.append(f"{x:.4f}")
            else:
                cells.append(f"{x:.4f} ({x / r['lru']:.3f}×)")
        label = p
        if p == default:
            label = f"**{p}**"
            cells = [c if c == "—" else f"**{c}**" for c in cells]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    gaps = []
    for d in docs:
        r = d["hit_ratio"]
        g = gap_closed(r[default], r["lru"], r["belady"]) if default in r else None
        gaps.append("—" if g is None else f"{g:.0%}")
    lines.append(f"| {default}: gap closed | " + " | ".join(gaps) + " |")
    return "\n".join(lines)
