"""``kvbm demo`` (``make demo``): the main job on the embedded default, no external server.

1. Generates a multi-turn chat workload (shared system prompts, conversations, one-shot
   requests) and replays it through a BlockManager with G1, G2 and a G3 disk tier in a
   directory under ``.kvbm/``; prints per-tier hit counts and the events routers would see.
2. Reopens the disk tier as a restarted worker would and shows its pages served again.
3. Compares the eviction policies of the host tier (and Belady's optimum) on the workload.
4. Measures G1<->G2 and G2<->G3 bandwidth against the ceilings of this machine.
"""

from __future__ import annotations

import collections
import shutil
import time
from pathlib import Path

from kvbm.config import DeviceTierConfig, HostTierConfig, ManagerConfig
from kvbm.deps import require
from kvbm.errors import InvalidArgumentError, StorageError
from kvbm.events import BlockRemoved, BlockStored
from kvbm.lab.replay import distinct_blocks, format_table, run, trace_tokens
from kvbm.lab.workload import generate
from kvbm.layout import PRESETS
from kvbm.manager import BlockManager
from kvbm.medium import Medium
from kvbm.metrics import tier_display_names
from kvbm.storage.disk import DiskTierConfig

BLOCK_TOKENS = 16
#: What the demo writes under ``<dir>/demo``: a folder holding anything else is not ours to
#: clear (``kvbm demo --dir ~`` must not wipe ``~/demo``).
_OWN_NAMES = frozenset({"g3", "bw"})


def _fresh_root(out_dir: str | Path) -> Path:
    """``<out_dir>/demo``, emptied of an earlier demo's data, or an error saying why not."""
    root = Path(out_dir) / "demo"
    try:
        if root.is_dir():
            foreign = sorted(p.name for p in root.iterdir() if p.name not in _OWN_NAMES)
            if foreign:
                raise InvalidArgumentError(
                    f"{root} exists and was not made by kvbm demo (it holds "
                    f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                    f"choose another --dir")
            shutil.rmtree(root)
        root.mkdir(parents=True)
    except OSError as e:
        raise StorageError(f"cannot use {root} for the demo's data ({e.strerror or e}); "
                           f"choose another --dir") from None
    return root


def _tiered_replay(trace: list[list[int]], mgr: BlockManager) -> dict[str, int]:
    events: collections.Counter[str] = collections.Counter()
    for ids in trace:
        tokens = trace_tokens(ids, BLOCK_TOKENS)
        m = mgr.match_prefix(tokens)
        held = mgr.onboard(m)
        new = mgr.allocate(len(m.hashes) - len(held))
        for b in new:  # stands in for the engine's forward pass writing the KV
            view = mgr.block_view(b)
            for t in view if isinstance(view, list) else [view]:
                t.fill_(1.0)
        held += mgr.commit(new, tokens, start_block=len(held), hashes=m.hashes)
        mgr.release(held)
        for e in mgr.take_events():
            if isinstance(e, BlockStored | BlockRemoved):
                events[f"{type(e).__name__}({e.medium.value})"] += len(e.block_hashes)
    mgr.flush()  # the stores still in flight, so that the counts below are final
    for e in mgr.take_events():
        if isinstance(e, BlockStored | BlockRemoved):
            events[f"{type(e).__name__}({e.medium.value})"] += len(e.block_hashes)
    return dict(events)


def _hit_table(mgr: BlockManager) -> str:
    st = mgr.stats()
    # Human names say where G1 is a CPU tensor or G2 is not pinned; events keep wire names.
    names = tier_display_names(mgr)
    w = max(12, *(len(n) for n in names.values()))
    lines = [f"{'tier':<{w}} {'hit blocks':>10} {'share':>7}"]
    for m, name in names.items():
        c = st.hits_by_medium.get(m, 0)
        lines.append(f"{name:<{w}} {c:>10} {c / max(st.query_blocks, 1):>7.1%}")
    lines.append(f"{'all tiers':<{w}} {st.hit_blocks:>10} {st.hit_ratio:>7.1%}   "
                 f"of {st.query_blocks} requested blocks ({st.lookups} requests)")
    return "\n".join(lines)


def run_demo(*, requests: int = 3000, seed: int = 7, out_dir: str | Path = ".kvbm") -> int:
    if type(requests) is not int or requests < 1:
        raise InvalidArgumentError(f"--requests must be a positive integer, got {requests!r}")
    if type(seed) is not int or seed < 0:
        raise InvalidArgumentError(f"--seed must be an integer >= 0, got {seed!r}")
    torch = require("torch", "engine", "kvbm demo")
    require("lmdb", "disk", "kvbm demo (its disk tier)")

    from kvbm.lab.bandwidth import quick_report

    root = _fresh_root(out_dir)
    t0 = time.perf_counter()
    records = generate(requests, seed=seed, family="chat")
    trace = [r["hash_ids"] for r in records]
    distinct = distinct_blocks(trace)
    longest = max(len(t) for t in trace)
    print(f"workload: {len(trace)} requests of a multi-turn chat service, "
          f"{sum(map(len, trace))} block references, {distinct} "
          f"distinct blocks of {BLOCK_TOKENS} tokens; G1 on "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")

    layout = PRESETS["tiny"]
    g2 = max(1, distinct * 3 // 100)
    disk = DiskTierConfig(root / "g3", capacity_bytes=distinct * 4096 * 3 // 10,
                          slab_bytes=64 << 20)
    cfg = ManagerConfig(device=DeviceTierConfig(longest * 2, device="auto"),
                        host=HostTierConfig(g2), disk=disk)
    print(f"\n== 1. tiered replay: G1 {longest * 2} blocks, G2 {g2} blocks (3% of distinct), "
          f"G3 disk {disk.capacity_bytes >> 20} MiB at {disk.path} ==")
    with BlockManager(layout, cfg) as mgr:
        events = _tiered_replay(trace, mgr)
        print(_hit_table(mgr))
        print("events for routers (blocks):",
              ", ".join(f"{k} {v}" for k, v in sorted(events.items())))
        d = mgr.stats().lower_tiers[Medium.DISK]
        print(f"disk tier: {d[0].puts} pages written, {d[0].hits} read, {d[0].evicted} "
              f"evicted, {d[1].skipped} offload batches skipped under backpressure")

    print("\n== 2. restart: a new manager on the same disk directory ==")
    with BlockManager(layout, cfg) as again:
        found = again.stats().unlinked_pages
        sample = trace[-200:]
        hits = 0
        for ids in sample:
            m = again.match_prefix(trace_tokens(ids, BLOCK_TOKENS))
            hits += m.by_medium.get(Medium.DISK, 0)
            again.release(again.onboard(m))
        print(f"{found} pages found on disk; the last {len(sample)} requests hit {hits} blocks "
              f"on disk right after the restart")

    print("\n== 3. host-tier policies at 3% of distinct blocks (hit ratio, prefix semantics) ==")
    doc = run(trace, 0.03, None, block_size=BLOCK_TOKENS)
    print(format_table(doc))

    print("\n== 4. bandwidth of this machine (same-run ceilings) ==")
    _, table = quick_report([(n, PRESETS[n]) for n in ("llama3-8b", "small")], root / "bw")
    print(table)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; data under {root}")
    print("next: kvbm inside vLLM, as its KV connector (kvbm.integrations.vllm.KvbmConnector):"
          " see docs/vllm.md; a short run with a tiny model: "
          "python bench/vllm_offload.py --quick")
    return 0
