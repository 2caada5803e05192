"""The other processes of bench/transfer_bandwidth.py, and the timing both sides share.

    python bench/_transfer_roles.py socket SIZE            # raw-socket server
    python bench/_transfer_roles.py kvbm SIZE CONFIG_JSON  # kvbm agent serving one region
    python bench/_transfer_roles.py nixl-target SIZE       # NIXL agent holding the remote buffer
    python bench/_transfer_roles.py nixl-initiator SIZE    # NIXL agent timing transfers

Each talks JSON lines on stdin/stdout. Answers start with ``@@ `` so that whatever a library
prints on stdout (UCX, NIXL) cannot be taken for one. A server runs until stdin closes.
NIXL runs only here, in processes of its own: it brings its own UCX, which must not meet
the UCX of kvbm's ucx backend in one process.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import numpy as np

MARK = "@@ "
#: Raw-socket request: op (0 read, 1 write), number of pieces; then (offset, length) each.
_HEAD = struct.Struct(">BI")
_PIECE = struct.Struct(">QQ")
_IOV = 512


def answer(obj: Any, out: IO[str] = sys.stdout) -> None:
    out.write(MARK + json.dumps(obj) + "\n")
    out.flush()


def read_answer(stream: IO[str]) -> Any:
    """The next ``@@`` line of a child's stdout (other lines are a library's chatter)."""
    for line in stream:
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError("the benchmark's helper process exited without answering")


def timed(fn: Callable[[], None], iters: int) -> list[float]:
    """Seconds each of ``iters`` back-to-back calls of ``fn`` took."""
    out = []
    clock = time.perf_counter
    for _ in range(iters):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


# -- raw sockets ----------------------------------------------------------------------------------
def _views(buf: np.ndarray[Any, np.dtype[np.uint8]], pieces: list[tuple[int, int]]
           ) -> list[memoryview]:
    return [buf.data[o:o + n] for o, n in pieces]


def _sendv(sock: socket.socket, views: list[memoryview]) -> None:
    i = 0
    views = list(views)
    while i < len(views):
        sent = sock.sendmsg(views[i:i + _IOV])
        while sent:
            if sent >= views[i].nbytes:
                sent -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def _recvv(sock: socket.socket, views: list[memoryview]) -> None:
    i = 0
    views = list(views)
    while i < len(views):
        got = sock.recvmsg_into(views[i:i + _IOV], 0, socket.MSG_WAITALL)[0]
        if got == 0:
            raise ConnectionError("peer closed")
        while got:
            if got >= views[i].nbytes:
                got -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][got:]
                got = 0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recvv(sock, [memoryview(buf)])
    return bytes(buf)


def socket_request(sock: socket.socket, buf: np.ndarray[Any, np.dtype[np.uint8]], op: str,
                   pieces: list[list[int]]) -> Callable[[], None]:
    """One raw-socket transfer of ``pieces`` (the client side): the function to time."""
    head = _HEAD.pack(0 if op == "READ" else 1, len(pieces)) + b"".join(
        _PIECE.pack(r, n) for _, r, n in pieces)
    local = _views(buf, [(lo, n) for lo, _, n in pieces])
    ack = bytearray(1)

    def run() -> None:
        if op == "READ":
            sock.sendall(head)
            _recvv(sock, local)
        else:
            _sendv(sock, [memoryview(head), *local])
            _recvv(sock, [memoryview(ack)])

    return run


def serve_socket(size: int) -> None:
    buf = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    lsock = socket.create_server(("127.0.0.1", 0))
    answer({"port": lsock.getsockname()[1]})
    conn, _ = lsock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        while True:
            head = conn.recv(_HEAD.size, socket.MSG_WAITALL)
            if len(head) < _HEAD.size:
                return
            op, count = _HEAD.unpack(head)
            raw = _recv_exact(conn, count * _PIECE.size)
            pieces = [_PIECE.unpack_from(raw, i * _PIECE.size) for i in range(count)]
            views = _views(buf, pieces)
            if op == 0:
                _sendv(conn, views)
            else:
                _recvv(conn, views)
                conn.sendall(b"k")


# -- a kvbm agent serving one region --------------------------------------------------------------
def serve_kvbm(size: int, config_json: str) -> None:
    from kvbm.transports import ALL_PEERS, Agent, TransportConfig

    cfg = TransportConfig.from_mapping(json.loads(config_json))
    buf = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    with Agent("prefill", cfg) as agent:
        agent.register(buf, name="kv", expose_to=ALL_PEERS)
        answer({"address": list(agent.address), "backends": list(agent.backends)})
        for _ in sys.stdin:
            pass


# -- NIXL (UCX backend, DRAM) ---------------------------------------------------------------------
def _nixl() -> Any:
    try:
        from nixl_cu12._api import nixl_agent, nixl_agent_config
    except ImportError:
        from nixl._api import nixl_agent, nixl_agent_config  # the meta-package's name
    return nixl_agent, nixl_agent_config


def _nixl_agent(name: str, size: int, seed: int) -> tuple[Any, np.ndarray[Any, Any]]:
    nixl_agent, nixl_agent_config = _nixl()
    # No progress thread: NIXL's spins for the agent's whole life, and on a machine with
    # few cores it takes one from every system measured meanwhile. The initiator
    # progresses as it polls; the target spins only while NIXL is timed (nixl_target).
    agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=["UCX"]))
    buf = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    agent.register_memory([(buf.ctypes.data, buf.nbytes, 0, "")], "DRAM")
    return agent, buf


def nixl_target(size: int) -> None:
    agent, buf = _nixl_agent("target", size, 3)
    answer({"meta": agent.get_agent_metadata().hex(), "addr": buf.ctypes.data})
    peer = json.loads(sys.stdin.readline())
    agent.add_remote_agent(bytes.fromhex(peer["meta"]))
    answer({"ok": True})
    # What NIXL's progress thread would do, but only while told to ("spin" until the next
    # line, answered at both ends): a thread spinning for the whole run would take one of
    # the machine's few cores from every other system measured meanwhile.
    import select

    for line in sys.stdin:
        if line.strip() != '"spin"':
            continue
        answer("spinning")
        while not select.select([sys.stdin], [], [], 0)[0]:
            agent.get_new_notifs()
        if not sys.stdin.readline():
            return
        answer("idle")


def nixl_initiator(size: int) -> None:
    """Times transfers on command: ``{prep: [op, pieces]}`` makes a transfer (and runs it
    once) and answers its key; ``{time: [key, iters]}`` answers the seconds of each of
    ``iters`` back-to-back runs of it."""
    agent, buf = _nixl_agent("initiator", size, 4)
    answer({"meta": agent.get_agent_metadata().hex()})
    target = json.loads(sys.stdin.readline())
    name = agent.add_remote_agent(bytes.fromhex(target["meta"]))
    raddr, laddr = int(target["addr"]), buf.ctypes.data
    handles: list[Any] = []
    runs: list[Callable[[], None]] = []

    def one(op: str, pieces: list[list[int]], notify: bool = False) -> Callable[[], None]:
        local = agent.get_xfer_descs([(laddr + lo, n, 0) for lo, _, n in pieces], "DRAM")
        remote = agent.get_xfer_descs([(raddr + ro, n, 0) for _, ro, n in pieces], "DRAM")
        h = agent.initialize_xfer(op, local, remote, name, b"handoff done" if notify else b"")
        handles.append(h)

        def run() -> None:
            # Without a progress thread (see _nixl_agent) asking for the state progresses.
            state = agent.transfer(h)
            while state == "PROC":
                state = agent.check_xfer_state(h)
            if state != "DONE":
                raise RuntimeError(f"NIXL transfer failed: {state}")

        return run

    # The first transfer waits for the UCX wire-up to the target: retry until it is there.
    deadline = time.monotonic() + 30
    while True:
        try:
            one("READ", [[0, 0, 4096]])()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    answer({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        if "prep" in req:
            fn = one(*req["prep"])
            fn()
            runs.append(fn)
            answer(len(runs) - 1)
        else:
            key, iters = req["time"]
            answer(timed(runs[key], iters))
    for h in handles:
        agent.release_xfer_handle(h)


def main(argv: list[str]) -> None:
    os.environ.setdefault("UCX_LOG_FILE", "stderr")
    role, size = argv[0], int(argv[1])
    if role == "socket":
        serve_socket(size)
    elif role == "kvbm":
        serve_kvbm(size, argv[2])
    elif role == "nixl-target":
        nixl_target(size)
    elif role == "nixl-initiator":
        nixl_initiator(size)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
