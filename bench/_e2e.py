"""The end-to-end figures of bench/events_throughput.py: a publisher process and a subscriber
process (bench/_events_procs.py) per transport, and a ``nats-server`` for JetStream.

Each pair is warmed up first (the subscriber has received a batch, so the measured stream
starts with every socket connected), then the publisher is told ``go`` and the subscriber
the count it must reach; the figure is the stream's events (or blocks) over the time from
the first publish call to the subscriber's count reaching the end.
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from _events_procs import blocks_in, workload
from _figures import row as _row

HERE = Path(__file__).resolve().parent
_HOST = "127.0.0.1"
#: Waits of the orchestration (process start, warm-up); a stream gets _RUN_S.
_START_S, _RUN_S = 120.0, 900.0


class Proc:
    """One role of _events_procs.py, spoken to line by line (stderr kept in a file)."""

    def __init__(self, role: str, args: dict[str, Any]) -> None:
        self.role = role
        self.err: IO[str] = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed in close)
        self.p = subprocess.Popen([sys.executable, str(HERE / "_events_procs.py"), role,
                                   json.dumps(args)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=self.err, text=True,
                                  bufsize=1)

    def send(self, cmd: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def read(self, timeout: float = _START_S) -> dict[str, Any]:
        assert self.p.stdout is not None
        if not select.select([self.p.stdout], [], [], timeout)[0]:
            self._fail(f"no answer in {timeout:.0f} s")
        line = self.p.stdout.readline()
        if not line:
            self._fail(f"exited with {self.p.wait()}")
        out: dict[str, Any] = json.loads(line)
        return out

    def ask(self, cmd: str, timeout: float = _START_S) -> dict[str, Any]:
        self.send(cmd)
        return self.read(timeout)

    def _fail(self, why: str) -> None:
        self.err.seek(0)
        raise RuntimeError(f"{self.role}: {why}\n{self.err.read()[-3000:]}")

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.send("quit")
                self.p.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait(10)
        self.err.close()


def _warm(pub: Proc, sub: Proc, *, healed: bool) -> int:
    """Warm events until the subscriber has one; its count once settled. ``healed``: the
    subscriber replays missed batches, so it must reach every warm event published."""
    for _ in range(200):
        sent = pub.ask("warm")["warm"]
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            have = sub.ask("count")["count"]
            if have >= (sent if healed else 1):
                time.sleep(0.2)
                return int(sub.ask("count")["count"])
            time.sleep(0.02)
    raise RuntimeError(f"{sub.role}: no warm-up event arrived")


def _measure(pub: Proc, sub: Proc, base: int, units: int) -> tuple[dict[str, Any],
                                                                    dict[str, Any]]:
    pub.send("go")
    sub.send(f"target {base + units}")
    return pub.read(_RUN_S), sub.read(_RUN_S)


def _rate(n: int, t0: float, t1: float) -> float:
    return n / max(t1 - t0, 1e-9)


def _pair(pub_role: str, sub_role: str, pub_args: dict[str, Any]
          ) -> tuple[Proc, Proc, dict[str, Any]]:
    """The publisher (its first line: where it listens), then the subscriber told that."""
    pub = Proc(pub_role, pub_args)
    try:
        hello = pub.read()
        sub = Proc(sub_role, {**pub_args, **hello})
    except BaseException:
        pub.close()
        raise
    return pub, sub, hello


def zmq_rows(n: int, seed: int) -> list[dict[str, Any]]:
    events = workload(n, seed=seed)
    blocks = blocks_in(events)
    pub, sub, _ = _pair("zmq-pub", "zmq-sub", {"events": n, "seed": seed})
    try:
        sub.read()
        base = _warm(pub, sub, healed=True)
        p, s = _measure(pub, sub, base, n)
    finally:
        sub.close()
        pub.close()
    st = p["stats"]
    per_batch = max(1, round(st["events_sent"] / max(1, st["batches_sent"])))
    raw_pub, raw_sub, _ = _pair("raw-pub", "raw-sub",
                                {"events": n, "seed": seed, "per_batch": per_batch})
    try:
        raw_sub.read()
        base = _warm(raw_pub, raw_sub, healed=False)
        msgs = -(-n // per_batch)
        rp, rs = _measure(raw_pub, raw_sub, base, msgs)
    finally:
        raw_sub.close()
        raw_pub.close()
    # kvbm's subscriber side alone: fed by the plain PUB (sends cost it almost nothing)
    sub_pub, sub_only, _ = _pair("raw-pub", "zmq-sub",
                                 {"events": n, "seed": seed, "per_batch": per_batch})
    try:
        sub_only.read()
        base = _warm(sub_pub, sub_only, healed=False)
        op, os_ = _measure(sub_pub, sub_only, base, n)
    finally:
        sub_only.close()
        sub_pub.close()
    ref = _rate(n, rp["t0"], rs["t_done"])
    extra = {"transport": "zmq", "events_per_batch": per_batch,
             "subscriber": s.get("subscriber"), "publisher": st}
    return [
        _row("ZMQ: ZmqEventPublisher.publish() calls (engine thread)", "events/s",
             _rate(n, p["t0"], p["t_called"]), reference=_rate(n, rp["t0"], rp["t_called"]),
             reference_name=f"pyzmq PUB send, same batches ({per_batch} events)",
             transport="zmq"),
        _row("ZMQ: ZmqEventPublisher sends", "events/s", _rate(n, p["t0"], p["t_sent"]),
             reference=_rate(n, rp["t0"], rp["t_sent"]),
             reference_name=f"pyzmq PUB send, same batches ({per_batch} events)",
             transport="zmq"),
        _row("ZMQ end to end: publisher -> Subscriber -> KvIndexer", "events/s",
             _rate(n, p["t0"], s["t_done"]), reference=ref,
             reference_name="pyzmq PUB -> SUB, same batches, not decoded", **extra),
        _row("ZMQ end to end, blocks applied", "blocks/s", _rate(blocks, p["t0"], s["t_done"]),
             target=1e6, reference=_rate(blocks, rp["t0"], rs["t_done"]),
             reference_name="pyzmq PUB -> SUB, same batches, not decoded", transport="zmq"),
        _row("ZMQ: plain PUB -> Subscriber -> KvIndexer (subscriber side)", "events/s",
             _rate(n, op["t0"], os_["t_done"]), reference=ref,
             reference_name="pyzmq PUB -> SUB, same batches, not decoded", transport="zmq",
             subscriber=os_.get("subscriber")),
        _row("ZMQ: plain PUB -> Subscriber -> KvIndexer, blocks applied", "blocks/s",
             _rate(blocks, op["t0"], os_["t_done"]), target=1e6,
             reference=_rate(blocks, rp["t0"], rs["t_done"]),
             reference_name="pyzmq PUB -> SUB, same batches, not decoded", transport="zmq"),
    ]


# -------------------------------------------------------------------------- JetStream --
def nats_binary() -> str | None:
    local = Path(sys.executable).parent / "nats-server"
    return str(local) if local.exists() else shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((_HOST, 0))
        return int(s.getsockname()[1])


def _start_nats(tmp: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = nats_binary()
    assert binary is not None
    port = _free_port()
    proc = subprocess.Popen([binary, "-js", "-sd", str(Path(tmp) / "js"), "-a", _HOST,
                             "-p", str(port), "-l", str(Path(tmp) / "nats.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection((_HOST, port), timeout=1.0) as s:
                if s.recv(4096).startswith(b"INFO "):
                    return proc, f"nats://{_HOST}:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"nats-server did not start on port {port}")


def nats_rows(n: int, seed: int, tmp: str) -> list[dict[str, Any]]:
    events = workload(n, seed=seed)
    blocks = blocks_in(events)
    server, url = _start_nats(tmp)
    try:
        pub, sub, _ = _pair("nats-pub", "nats-sub", {"events": n, "seed": seed, "url": url})
        try:
            sub.read()
            base = _warm(pub, sub, healed=True)
            p, s = _measure(pub, sub, base, n)
        finally:
            sub.close()
            pub.close()
        st = p["stats"]
        per_msg = max(1, round(st["published_events"] / max(1, st["published_msgs"])))
        raw_pub, raw_sub, _ = _pair("rawnats-pub", "rawnats-sub",
                                    {"events": n, "seed": seed, "url": url,
                                     "per_batch": per_msg})
        try:
            raw_sub.read()
            base = _warm_raw_nats(raw_sub)
            msgs = -(-n // per_msg)
            rp, rs = _measure(raw_pub, raw_sub, base, msgs)
        finally:
            raw_sub.close()
            raw_pub.close()
    finally:
        server.terminate()
        server.wait(20)
    ref_name = f"nats-py publish + pull fetch, same batches ({per_msg} events a message)"
    return [
        _row("JetStream: NatsEventPublisher sends (acked)", "events/s",
             _rate(n, p["t0"], p["t_sent"]), reference=_rate(n, rp["t0"], rp["t_sent"]),
             reference_name=f"nats-py publish, acked, same batches ({per_msg} events)",
             transport="jetstream"),
        _row("JetStream end to end: publisher -> consumer -> KvIndexer", "events/s",
             _rate(n, p["t0"], s["t_done"]), reference=_rate(n, rp["t0"], rs["t_done"]),
             reference_name=ref_name, transport="jetstream", events_per_msg=per_msg,
             consumer=s.get("consumer"), publisher=st),
        _row("JetStream end to end, blocks applied", "blocks/s",
             _rate(blocks, p["t0"], s["t_done"]), target=1e6,
             reference=_rate(blocks, rp["t0"], rs["t_done"]), reference_name=ref_name,
             transport="jetstream"),
    ]


def _warm_raw_nats(sub: Proc) -> int:
    """The raw publisher sent one message at start: wait for the consumer to have it."""
    deadline = time.monotonic() + _START_S
    while time.monotonic() < deadline:
        have = int(sub.ask("count")["count"])
        if have >= 1:
            return have
        time.sleep(0.05)
    raise RuntimeError("rawnats-sub: the first message never arrived")
