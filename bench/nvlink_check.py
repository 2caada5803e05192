"""The nvlink backend (CUDA IPC) on a GPU machine: device<->device and device<->host GB/s
between two processes, next to a plain ``copy_`` of the same sizes in the same run.

A ``prefill`` agent in another process (kvbm.testing.nvlink_peer) holds a GPU region and a
pinned host region; this process's ``decode`` agent READs into and WRITEs from its own GPU
memory over nvlink: d<-d, d->d, d<-h, d->h. The reference is ``copy_`` in this process
(GPU to GPU, pinned host to GPU and back), timed the same way (median of ``--repeat`` runs
of back-to-back copies, each run ending in a synchronize). Without CUDA it says so and
exits 0. ``--tests`` first runs the ``gpu``-marked transport tests.

Runs from a checkout without installing kvbm (the device machine): kvbm.storage and
kvbm.transports are then linked into a temporary folder put on ``sys.path``.

    python bench/nvlink_check.py [--json] [--sizes 16M,256M] [--repeat N] [--tests]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def ensure_kvbm() -> str:
    """Make ``import kvbm.transports`` work from this checkout; the PYTHONPATH to give the
    child processes."""
    try:
        import kvbm.transports  # noqa: F401
        return os.environ.get("PYTHONPATH", "")
    except ImportError:
        pass
    farm = Path(tempfile.mkdtemp(prefix="kvbm-farm-"))
    (farm / "kvbm").mkdir()
    for f in (ROOT / "kvbm").iterdir():
        (farm / "kvbm" / f.name).symlink_to(f)
    (farm / "kvbm" / "storage").symlink_to(ROOT / "storage")
    (farm / "kvbm" / "transports").symlink_to(ROOT / "transports")
    sys.path.insert(0, str(farm))
    return os.pathsep.join(p for p in (str(farm), os.environ.get("PYTHONPATH", "")) if p)


PYTHONPATH = ensure_kvbm()  # before the imports below, which need kvbm

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta  # noqa: E402
from transfer_bandwidth import parse_sizes  # noqa: E402

PATHS = (("d<-d", "READ", "dev"), ("d->d", "WRITE", "dev"), ("d<-h", "READ", "host"),
         ("d->h", "WRITE", "host"))


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    ap.add_argument("--sizes", type=parse_sizes, default="16M,256M",
                    help="transfer sizes, comma-separated (K, M, G suffixes)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs per point; the median is reported")
    ap.add_argument("--tests", action="store_true",
                    help="first run the gpu-marked transport tests (pytest)")
    return ap


def timed_runs(fn: Callable[[], None], sync: Callable[[], None], iters: int, repeat: int
               ) -> float:
    """Median seconds of one call, over ``repeat`` runs of ``iters`` calls and a sync."""
    fn()
    sync()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        runs.append((time.perf_counter() - t0) / iters)
    return statistics.median(runs)


def references(dev: Any, dev2: Any, host: Any) -> dict[str, tuple[Callable[[], None], ...]]:
    """The plain copies of each path (READ, WRITE) for the same bytes in this process."""
    def d2d() -> None:
        dev.copy_(dev2, non_blocking=True)

    def h2d() -> None:
        dev.copy_(host, non_blocking=True)

    def d2h() -> None:
        host.copy_(dev, non_blocking=True)

    return {"dev": (d2d, d2d), "host": (h2d, d2h)}


def measure(sizes: list[int], repeat: int, pythonpath: str) -> list[dict[str, Any]]:
    import secrets

    import torch

    from kvbm.config import config_to_dict
    from kvbm.transports import Agent, Op, TransportConfig

    cfg = TransportConfig(secret=secrets.token_hex(16), backends="nvlink,tcp",
                          io_timeout_s=60.0)
    big = max(sizes)
    env = {**os.environ, "PYTHONPATH": pythonpath}
    peer = subprocess.Popen([sys.executable, "-m", "kvbm.testing.nvlink_peer",
                             json.dumps(config_to_dict(cfg))], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)

    def call(cmd: str, **kw: Any) -> Any:
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        peer.stdin.flush()
        return json.loads(peer.stdout.readline())["ok"]

    rows = []
    try:
        address = call("address")
        call("register", name="dev", size=big, device="cuda", seed=1)
        call("register", name="host", size=big, device="cpu", seed=2)
        local = torch.empty(big, dtype=torch.uint8, device="cuda")
        other = torch.empty(big, dtype=torch.uint8, device="cuda")
        pinned = torch.empty(big, dtype=torch.uint8).pin_memory()
        with Agent("decode", cfg) as agent:
            peer_info = agent.connect(*address).info
            loc = agent.register(local)
            for n in sizes:
                iters = max(2, min(50, (2 << 30) // n))
                copies = references(local[:n], other[:n], pinned[:n])
                for path, op, remote in PATHS:
                    descs = [((loc, 0, n), (peer_info.region(remote), 0, n))]

                    def one(op: str = op, descs: Any = descs) -> None:
                        h = agent.transfer(peer_info.name, Op[op], descs, require="nvlink")
                        h.wait(120)

                    t = timed_runs(one, lambda: None, iters, repeat)
                    ref = copies[remote][0 if op == "READ" else 1]
                    c = timed_runs(ref, torch.cuda.synchronize, iters, repeat)
                    rows.append({"path": path, "bytes": n, "nvlink_gbps": round(n / t / 1e9, 2),
                                 "copy_gbps": round(n / c / 1e9, 2),
                                 "ratio": round(c / t, 3)})
    finally:
        if peer.stdin is not None:
            peer.stdin.close()
        peer.wait(60)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    sizes = args.sizes if isinstance(args.sizes, list) else parse_sizes(args.sizes)
    pythonpath = PYTHONPATH
    import torch

    doc: dict[str, Any] = {"device": None, "rows": [], "tests": None}
    if not torch.cuda.is_available():
        doc["skipped"] = "no CUDA device: nothing to measure"
    else:
        doc["device"] = torch.cuda.get_device_name(0)
        if args.tests:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu",
                                   "-p", "no:cacheprovider", "-rs",
                                   "tests/test_transport_nvlink.py"], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": pythonpath},
                                  capture_output=True, text=True, check=False)
            doc["tests"] = {"returncode": proc.returncode,
                            "tail": (proc.stdout + proc.stderr)[-3000:]}
        doc["rows"] = measure(sizes, args.repeat, pythonpath)
    if args.json:
        doc["meta"] = _meta.run_meta(None)
        print(json.dumps(doc))
        return 0
    if doc.get("skipped"):
        print(doc["skipped"])
        return 0
    if doc["tests"] is not None:
        print(doc["tests"]["tail"])
    print(f"device: {doc['device']}")
    print(f"{'path':<6}{'size':>10}{'nvlink GB/s':>13}{'copy_ GB/s':>12}{'x copy_':>9}")
    for r in doc["rows"]:
        print(f"{r['path']:<6}{r['bytes'] >> 20:>6} MiB{r['nvlink_gbps']:>13.2f}"
              f"{r['copy_gbps']:>12.2f}{r['ratio']:>9.2f}")
    print("d<-d: READ into this GPU from the peer's GPU memory; d<-h: from its pinned host "
          "memory; -> the WRITEs. copy_: the same bytes in this process.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
