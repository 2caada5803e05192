"""Offload bandwidth of every tier path with realistic pages, next to raw ceilings.

Measures, in one run and for each layout (default: Llama-3-8B-like 2 MiB pages, and small
32 KiB pages): G1->G2 and G2->G1 (``copy_blocks``; on the GPU where there is one), G2->G3
write and cold G3->G2 read (OffloadEngine + DiskStore in a directory under ``--dir``), and
G2->G4 put / G4->G2 get (OffloadEngine + S3Store against a moto server this script starts on
a free 127.0.0.1 port). Each figure is printed next to its raw ceiling measured in the same
run (one large ``copy_``; raw O_DIRECT sequential write+fdatasync / read of the same bytes
in the same directory; one raw boto3 put / get of an object of the same size), as a ratio,
and against the issue's target ratio. Method and definitions: kvbm/lab/bandwidth.py.

    python bench/offload_bandwidth.py [--json] [--block-size N] [--layout NAME]
                                      [--dir DIR] [--skip-object] [--repeat N]

``--json`` documents carry ``meta`` (bench/_meta.py) with ``seed`` null: the pages hold fixed
pseudo-random bytes (kvbm/lab/bandwidth.py), there is no seed to choose.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from kvbm.lab import bandwidth as bw
from kvbm.layout import PRESETS, KVLayout

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta

DEFAULT_LAYOUTS = ("llama3-8b", "small")
BUCKET = "kvbm-bandwidth"


def build_layouts(names: list[str], block_size: int | None) -> list[tuple[str, KVLayout]]:
    out = []
    for name in names:
        layout = PRESETS[name]
        if block_size is not None and block_size != layout.block_size:
            layout = dataclasses.replace(layout, block_size=block_size)
            name = f"{name}/bs{block_size}"
        out.append((name, layout))
    return out


def start_moto() -> Any:
    """A moto server on a free 127.0.0.1 port, with fake credentials in this process's
    environment (boto3 reads them); returns the started server."""
    import boto3

    from kvbm.testing.servers import AWS_TEST_ENV, AWS_UNSET, moto_server

    os.environ.update(AWS_TEST_ENV)
    for k in AWS_UNSET:
        os.environ.pop(k, None)
    server = moto_server()
    server.start()
    try:
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=BUCKET)
    except BaseException:
        server.stop()
        raise
    return server


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    ap.add_argument("--layout", action="append", choices=sorted(PRESETS),
                    help="layout preset (repeatable; default: llama3-8b and small)")
    ap.add_argument("--block-size", type=int, help="tokens per block (default: the preset's)")
    ap.add_argument("--dir", default=".kvbm/bench",
                    help="directory for the disk tier and the raw disk ceiling")
    ap.add_argument("--skip-object", action="store_true", help="no G4 (moto) measurements")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed rounds of memory and disk (after one warm-up); best kept")
    ap.add_argument("--object-repeat", type=int, default=2, help="timed rounds of G4")
    ap.add_argument("--memory-mib", type=int, default=bw.DEFAULT_MEMORY_BYTES >> 20,
                    help="MiB copied per G1<->G2 measurement")
    ap.add_argument("--disk-mib", type=int, default=bw.DEFAULT_DISK_BYTES >> 20,
                    help="MiB written and read per G3 measurement")
    ap.add_argument("--object-mib", type=int, default=bw.DEFAULT_OBJECT_BYTES >> 20,
                    help="MiB put and got per G4 measurement")
    ap.add_argument("--io-threads", type=int,
                    help="DiskTierConfig.io_threads (default: the config's)")
    ap.add_argument("--io-chunk-mib", type=int,
                    help="DiskTierConfig.io_chunk_bytes, MiB (default: the config's)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.block_size is not None and args.block_size <= 0:
        ap.error("--block-size must be positive")
    if args.repeat < 1 or args.object_repeat < 1:
        ap.error("--repeat and --object-repeat must be >= 1")
    if min(args.memory_mib, args.disk_mib, args.object_mib) < 1:
        ap.error("--memory-mib, --disk-mib and --object-mib must be >= 1")
    if (args.io_threads is not None and args.io_threads < 1) or (
            args.io_chunk_mib is not None and args.io_chunk_mib < 1):
        ap.error("--io-threads and --io-chunk-mib must be >= 1")

    try:  # the disk measurements write here: say so now, not after the memory ones
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.dir).close()
    except OSError as e:
        ap.error(f"--dir {args.dir}: {e.strerror or e}")

    import torch

    layouts = build_layouts(args.layout or list(DEFAULT_LAYOUTS), args.block_size)
    cuda = torch.cuda.is_available()
    direct = bw.disk_direct_io(args.dir)
    steps = len(layouts) * (bw.memory_steps(args.repeat) + bw.disk_steps(args.repeat)
                            + (0 if args.skip_object else bw.object_steps(args.object_repeat)))
    progress = bw.Progress(steps, enabled=not args.no_progress and sys.stderr.isatty())

    server = None
    rows: list[bw.Row] = []
    sections: list[tuple[str, KVLayout, list[bw.Row]]] = []
    try:
        if not args.skip_object:
            progress.prefix = "moto"
            progress.note("starting moto_server")
            server = start_moto()
        for name, layout in layouts:
            progress.prefix = name
            got = [*bw.measure_memory(layout, bw.pages_for(layout, args.memory_mib << 20),
                                      repeats=args.repeat, progress=progress),
                   *bw.measure_disk(layout, bw.pages_for(layout, args.disk_mib << 20), args.dir,
                                    repeats=args.repeat, io_threads=args.io_threads,
                                    io_chunk_bytes=(args.io_chunk_mib << 20
                                                    if args.io_chunk_mib else None),
                                    progress=progress)]
            if server is not None:
                got += bw.measure_object(layout, bw.pages_for(layout, args.object_mib << 20),
                                         server.endpoint, BUCKET, repeats=args.object_repeat,
                                         progress=progress)
            rows += got
            sections.append((name, layout, got))
    finally:
        progress.close()
        if server is not None:
            server.stop()

    meta = {
        **_meta.run_meta(None), "torch": torch.__version__, "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dir": os.path.abspath(args.dir), "direct_io": direct,
        "repeats": args.repeat, "object_repeats": args.object_repeat,
        "method": "one warm-up round, then best of the timed rounds for the figure and for "
                  "its ceiling alike, both measured in this run",
        "layouts": {name: {"page_bytes": layout.bytes_per_block, **layout.to_dict()}
                    for name, layout in layouts},
        "ceilings": bw.ceiling_names(cuda=cuda, direct_io=direct),
        "targets": [{"path": r.path, "page_bytes": r.page_bytes,
                     "target_ratio": bw.target_ratio(r, cuda=cuda)} for r in rows],
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": [r.to_json() for r in rows]}))
        return 0
    print(f"device: {meta['device']}, {meta['machine']['cores']} cores; disk dir {meta['dir']} "
          f"({'O_DIRECT' if direct else 'buffered I/O'}); {meta['method']}")
    for name, layout, got in sections:
        print(f"\n{name}: {layout.bytes_per_block:,} B pages "
              f"({layout.num_layers} layers x 2 x {layout.block_size} tokens x "
              f"{layout.num_kv_heads} heads x {layout.head_dim} x {layout.dtype})")
        print(bw.format_table(got, cuda=cuda, direct_io=direct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
