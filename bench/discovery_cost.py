"""What the object tier's discovery costs: requests and bytes of one reader's looks at a
bucket shared with N writers (storage/objectdiscovery.py), against a local moto server.

    python bench/discovery_cost.py [--writers 1,8,64] [--json]

For each N: N writer stores and one reader share a bucket, a prefix and a layout. The
reader's requests are counted on its S3 client (request count per operation, and response
body bytes; HTTP headers, a few hundred bytes per request, are not counted):

* ``catch-up``: the reader's first look, after every writer uploaded 3 packs (heads, then
  the full list of packs, then one manifest read per pack);
* ``idle``: a look with nothing new (one LIST);
* ``1 new pack each``: every writer uploaded one more pack;
* ``40 new packs each``: more than a head's first read holds (32), so a second GET per head.

The writers' side is one PUT of the head per put that uploaded packs: its size is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
from collections import Counter
from typing import Any

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _meta import parser as make_parser
from _meta import run_meta


def build_parser() -> argparse.ArgumentParser:
    ap = make_parser(__doc__)
    ap.add_argument("--writers", default="1,8,64",
                    help="comma-separated numbers of writers sharing the bucket")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    return ap


class RequestCounter:
    """Counts the requests of one boto3 client and the body bytes of their answers."""

    def __init__(self, client: Any) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.bytes = 0
        client.meta.events.register("after-call.s3", self._after)

    def _after(self, http_response: Any = None, model: Any = None, **_: Any) -> None:
        n = int((http_response.headers if http_response is not None else {})
                .get("content-length", 0) or 0)
        with self._lock:
            self.requests[model.name if model is not None else "?"] += 1
            self.bytes += n

    def take(self) -> tuple[dict[str, int], int]:
        with self._lock:
            out = (dict(self.requests), self.bytes)
            self.requests.clear()
            self.bytes = 0
        return out


async def measure(n_writers: int, endpoint: str, bucket: str, root: str) -> dict[str, Any]:
    from kvbm.storage.s3 import S3Store, S3TierConfig, make_client
    from kvbm.testing.pages import TEST_LAYOUT, make_keys, page_payload

    page = TEST_LAYOUT.bytes_per_block
    prefix = f"bench/{n_writers}/"

    def config(name: str) -> S3TierConfig:
        return S3TierConfig(bucket=bucket, prefix=prefix, endpoint_url=endpoint,
                            index_path=f"{root}/{n_writers}-{name}", discovery_interval_s=0.0,
                            max_workers=2)

    writers = [S3Store(TEST_LAYOUT, config(f"w{i}")) for i in range(n_writers)]
    rcfg = config("reader")
    client = make_client(rcfg)
    counter = RequestCounter(client)
    reader = S3Store(TEST_LAYOUT, rcfg, client=client)
    next_key = 0

    async def upload(packs_each: int) -> None:
        nonlocal next_key
        for _ in range(packs_each):
            batch = []
            for w in writers:
                ks = make_keys(2, start=next_key)
                next_key += 2
                batch.append(w.put([(k, page_payload(k, page)) for k in ks]))
            await asyncio.gather(*batch)

    rows: list[dict[str, Any]] = []
    try:
        counter.take()  # the reader's open
        for label, packs_each in (("catch-up", 3), ("idle", 0), ("1 new pack each", 1),
                                  ("40 new packs each", 40)):
            await upload(packs_each)
            pages = await reader.refresh()
            requests, nbytes = counter.take()
            rows.append({"writers": n_writers, "look": label, "pages_found": pages,
                         "requests": sum(requests.values()), "by_operation": requests,
                         "response_bytes": nbytes})
        w = writers[0].stats().extra
        head_put = w["announce_bytes"] // max(1, w["announces"])
    finally:
        await reader.close()
        await asyncio.gather(*(w.close() for w in writers))
    return {"rows": rows, "head_put_bytes": head_put}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.writers.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--writers takes numbers like 1,8,64, got {args.writers!r}")
    if not counts or min(counts) < 1:
        ap.error("--writers needs at least one number >= 1")

    from kvbm.testing.servers import AWS_TEST_ENV, moto_server

    os.environ.update(AWS_TEST_ENV)
    import boto3

    server = moto_server()
    server.start()
    results: list[dict[str, Any]] = []
    try:
        bucket = "kvbm-bench"
        boto3.client("s3", endpoint_url=server.endpoint).create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory() as root:
            for n in counts:
                results.append(asyncio.run(measure(n, server.endpoint, bucket, root)))
    finally:
        server.stop()
    if args.json:
        print(json.dumps({"meta": run_meta(None), "results": results}, indent=1))
        return 0
    print(f"{'writers':>7}  {'look':<18} {'pages':>6} {'requests':>8}  {'body bytes':>10}  "
          f"operations")
    for res in results:
        for r in res["rows"]:
            ops = ", ".join(f"{k} {v}" for k, v in sorted(r["by_operation"].items()))
            print(f"{r['writers']:>7}  {r['look']:<18} {r['pages_found']:>6} "
                  f"{r['requests']:>8}  {r['response_bytes']:>10}  {ops}")
        print(f"{'':>7}  a writer's head PUT: {res['head_put_bytes']} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
