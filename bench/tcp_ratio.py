"""kvbm's tcp backend against a raw socket, same run, two processes on 127.0.0.1.

``python bench/tcp_ratio.py [--json] [--sizes 2M,8M,64M] [--seconds 2] [--rounds 16]``
(``KVBM_TRANSPORT_*`` variables set kvbm's side, e.g. ``KVBM_TRANSPORT_PARALLEL_CONNECTIONS``)

For each size and op, the raw figure is one connection, an 11-byte request and
``sendall``/``recv_into`` of preallocated buffers (READ: the server sends; WRITE: the client
sends, the data page-aligned in the stream as kvbm aligns it, and waits for a 1-byte ack);
kvbm's is ``Agent.transfer(...).wait()`` of one descriptor of that size, one transfer at a
time. Both are GB/s of payload over the time of
back-to-back repetitions, in rounds that pair the two; ``ratio`` is the median over the
rounds of kvbm / raw.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import time

import numpy as np

_REQ = struct.Struct(">cQH")  # op, bytes, padding that follows (before a WRITE's data)
_SECRET = "tcp-ratio-benchmark-secret"
_MAX = 64 << 20


def _config() -> object:
    """kvbm's settings: KVBM_TRANSPORT_* variables apply (tcp only, the benchmark's secret)."""
    import dataclasses

    from kvbm.transports import TransportConfig

    return dataclasses.replace(TransportConfig.from_env(), secret=_SECRET, backends="tcp")


def _size(s: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * units[s[-1].upper()] if s[-1].upper() in units else int(s)


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < view.nbytes:  # MSG_WAITALL, as kvbm does: one call, fewer wake-ups
        k = sock.recv_into(view[got:], 0, socket.MSG_WAITALL)
        if not k:
            raise ConnectionError("closed")
        got += k


def serve_raw() -> None:
    buf = memoryview(bytearray(_MAX))
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = memoryview(bytearray(_REQ.size))
    scratch = memoryview(bytearray(4096))
    while True:
        try:
            _recv_exact(conn, req)
        except ConnectionError:
            return
        op, n, pad = _REQ.unpack(req)
        if op == b"r":
            conn.sendall(buf[:n])
        else:
            if pad:
                _recv_exact(conn, scratch[:pad])
            _recv_exact(conn, buf[:n])
            conn.sendall(b"k")


def serve_agent() -> None:
    from kvbm.transports import ALL_PEERS, Agent

    agent = Agent("bench-server", _config())  # type: ignore[arg-type]
    agent.register(np.zeros(_MAX, np.uint8), name="buf", expose_to=ALL_PEERS)
    print(agent.address[1], flush=True)
    sys.stdin.read()  # until the parent closes stdin
    agent.close()


def _spawn(role: str) -> tuple[subprocess.Popen[str], int]:
    p = subprocess.Popen([sys.executable, __file__, "--serve", role], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


def _timed(fn: object, nbytes: int, seconds: float) -> float:
    assert callable(fn)
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and reps >= 3:
            return reps * nbytes / dt / 1e9


def run(sizes: list[int], seconds: float, rounds: int) -> list[dict[str, object]]:
    from kvbm.transports import Agent, Op

    raw_p, raw_port = _spawn("raw")
    ag_p, ag_port = _spawn("agent")
    rows: list[dict[str, object]] = []
    try:
        sock = socket.create_connection(("127.0.0.1", raw_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = memoryview(bytearray(_MAX))
        ack = memoryview(bytearray(1))
        tx = [0]  # bytes sent on the raw socket
        agent = Agent("bench-client", _config())  # type: ignore[arg-type]
        local = agent.register(np.zeros(_MAX, np.uint8))
        peer = agent.connect("127.0.0.1", ag_port)
        remote = peer.info.region("buf")
        for n in sizes:
            for op in (Op.READ, Op.WRITE):
                def raw(n: int = n, op: Op = op) -> None:
                    if op is Op.READ:
                        sock.sendall(_REQ.pack(b"r", n, 0))
                        _recv_exact(sock, buf[:n])
                        tx[0] += _REQ.size
                    else:  # the data starts page-aligned in the stream, as kvbm's does
                        pad = -(tx[0] + _REQ.size) % 4096
                        sock.sendmsg([_REQ.pack(b"w", n, pad), bytes(pad), buf[:n]])
                        tx[0] += _REQ.size + pad + n
                        _recv_exact(sock, ack)

                def kv(n: int = n, op: Op = op) -> None:
                    agent.transfer(peer, op, [((local, 0, n), (remote, 0, n))]).wait(60)

                # Paired rounds, each a short run of both back to back: the machine is
                # shared and its speed drifts by tens of percent within seconds, so each
                # round compares the two under the same load; the ratio is the median of
                # the rounds' ratios (``ratio_best``: best round of each, as a cross-check).
                raws, kvs = [], []
                for _ in range(rounds):
                    raws.append(_timed(raw, n, seconds / rounds))
                    kvs.append(_timed(kv, n, seconds / rounds))
                paired = sorted(k / r for k, r in zip(kvs, raws, strict=True))
                rows.append({"backend": "tcp", "op": op.value, "bytes": n,
                             "gbps": round(statistics.median(kvs), 3),
                             "ceiling_gbps": round(statistics.median(raws), 3),
                             "ratio": round(statistics.median(paired), 3),
                             "ratio_best": round(max(kvs) / max(raws), 3)})
        agent.close()
        sock.close()
    finally:
        for p in (raw_p, ag_p):
            if p.stdin:
                p.stdin.close()
            p.terminate()
            p.wait(10)
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--sizes", default="2M,8M,64M", help="transfer sizes, comma-separated")
    ap.add_argument("--seconds", type=float, default=2.0, help="per size and op, each side")
    ap.add_argument("--rounds", type=int, default=16, help="paired rounds per size and op")
    ap.add_argument("--serve", choices=("raw", "agent"), help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    if args.serve:
        (serve_raw if args.serve == "raw" else serve_agent)()
        return
    rows = run([_size(s) for s in args.sizes.split(",")], args.seconds, args.rounds)
    load = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps({"rows": rows, "cpus": os.cpu_count(), "load": load}))
        return
    print(f"load average {load[0]} {load[1]} {load[2]} on {os.cpu_count()} CPUs; GB/s are "
          f"medians of the rounds, ratio the median of the rounds' ratios")
    print(f"{'op':6} {'bytes':>10} {'raw GB/s':>9} {'tcp GB/s':>9} {'ratio':>6} {'best':>6}")
    for r in rows:
        print(f"{r['op']:6} {r['bytes']:>10} {r['ceiling_gbps']:>9} {r['gbps']:>9} "
              f"{r['ratio']:>6} {r['ratio_best']:>6}")


if __name__ == "__main__":
    main()
