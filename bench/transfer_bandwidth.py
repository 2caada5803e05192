"""Transfer bandwidth between two processes for each kvbm transport backend, next to a raw
socket and NIXL measured in the same run.

For each size (default 32 KiB ... 64 MiB) and each backend this machine runs (``tcp``,
``ucx`` where ucxx is installed, and ``ucx-rma``: ucx between two agents with
``transport.ucx_rma``, one-sided like NIXL), a kvbm agent in this process READs from and WRITEs to a
region of an agent in another process; each figure is the median over ``--repeat`` runs of
back-to-back transfers of one size. In the same run and the same way: plain sockets (one
connection, ``sendmsg`` / ``recvmsg_into``; the ``ceiling`` column) and NIXL (its UCX
backend, DRAM, no progress thread; ``nixl-cu12`` when installed, said when not). The
systems take turns point by point, so a machine whose load drifts weighs on all alike.
Then the p50/p99 latency of one
2 MiB transfer, and the handoff of one request's KV: ``--handoff-tokens`` tokens of
``--layout`` pages scattered over a pool on both sides, moved as one transfer of
block-sized descriptors (prefill done -> decode has it), against the same bytes over the
raw socket. ``UCX_TLS`` / ``UCX_NET_DEVICES`` apply to ucx and NIXL alike (the default
here: ``UCX_NET_DEVICES=lo``).

    python bench/transfer_bandwidth.py [--json] [--sizes 32K,2M,64M] [--backend ucx]
                                       [--repeat N] [--budget-mib N] [--no-nixl]

``--json`` prints one document: ``rows`` of ``{backend, op, bytes, gbps, ceiling_gbps,
ratio, nixl_gbps}``, ``latency``, ``handoff``, ``nixl`` (measured or why not) and ``meta``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # loaded by path (tests)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _meta
import _transfer_roles as roles

from kvbm.layout import PRESETS

HERE = Path(__file__).resolve().parent
DEFAULT_SIZES = "32K,128K,512K,2M,8M,32M,64M"
#: The system label of ucx in one-sided mode (``transport.ucx_rma`` on both agents).
RMA = "ucx-rma"
LATENCY_BYTES = 2 << 20
OPS = ("READ", "WRITE")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip().upper().removesuffix("IB").removesuffix("B")
        mult = _UNITS.get(part[-1:], 1)
        try:
            n = int(part[:-1] if part[-1:] in _UNITS else part) * mult
        except ValueError:
            n = 0
        if not 0 < n <= 1 << 32:
            raise argparse.ArgumentTypeError(
                f"sizes are bytes like 32K,2M,64M (each 1 B .. 4 GiB), got {text!r}")
        out.append(n)
    return sorted(set(out))


def positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected an integer > 0, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = _meta.parser(__doc__)
    ap.add_argument("--json", action="store_true", help="print one JSON document only")
    ap.add_argument("--sizes", type=parse_sizes, default=DEFAULT_SIZES,
                    help="transfer sizes, comma-separated (K, M, G suffixes)")
    ap.add_argument("--backend", action="append", choices=("tcp", "ucx", "ucx-rma"),
                    help="kvbm backend to measure (repeatable; default: every one "
                         "available here; ucx-rma: ucx with transport.ucx_rma, one-sided)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per point; the median is reported")
    ap.add_argument("--budget-mib", type=positive, default=256,
                    help="bytes moved per run of a point (at least 3, at most 1000 transfers)")
    ap.add_argument("--latency-iters", type=positive, default=200,
                    help="2 MiB transfers timed one by one for p50/p99")
    ap.add_argument("--layout", choices=sorted(PRESETS), default="llama3-8b",
                    help="page layout of the KV handoff")
    ap.add_argument("--handoff-tokens", type=positive, default=1024,
                    help="tokens of one request's KV in the handoff")
    ap.add_argument("--seed", type=_meta.seed, default=0,
                    help="seed of the handoff's block placement")
    ap.add_argument("--no-nixl", action="store_true", help="do not measure NIXL")
    ap.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return ap


# -- the plan every system runs -------------------------------------------------------------------
def make_plan(args: argparse.Namespace) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """The plan of :func:`run_all`, the region size both sides need, the handoff facts."""
    sizes: list[int] = (args.sizes if isinstance(args.sizes, list)
                        else parse_sizes(args.sizes))
    budget = args.budget_mib << 20
    points = [[op, n, max(3, min(1000, budget // n))] for op in OPS for n in sizes]
    layout = PRESETS[args.layout]
    block = layout.bytes_per_block
    blocks = -(-args.handoff_tokens // layout.block_size)
    rng = np.random.default_rng(args.seed)
    slots = 2 * blocks  # each side's pool: the request's blocks lie scattered in it
    lslots, rslots = rng.permutation(slots)[:blocks], rng.permutation(slots)[:blocks]
    pieces = [[int(a) * block, int(b) * block, block] for a, b in zip(lslots, rslots,
                                                                       strict=True)]
    plan = {"points": points, "repeat": args.repeat,
            "latency": [["READ", LATENCY_BYTES, args.latency_iters],
                        ["WRITE", LATENCY_BYTES, args.latency_iters]],
            "handoff": {"pieces": pieces, "repeat": max(3, args.repeat)}}
    region = max(max(sizes), LATENCY_BYTES, slots * block)
    return plan, region, {"layout": args.layout, "blocks": blocks, "block_bytes": block,
                          "bytes": blocks * block, "tokens": args.handoff_tokens}


# -- helper processes -----------------------------------------------------------------------------
#: The environment helper processes get: this process's as ``main`` found it. Loading ucxx
#: (kvbm's ucx backend) sets UCX_* defaults in os.environ, UCX_RNDV_THRESH=8192 among
#: them, under which NIXL's one-sided transfers wait on the target (2 MiB: 12 ms, 0.09 ms
#: without): NIXL must run with UCX's own defaults, as its users do.
CHILD_ENV: dict[str, str] = {}


@contextmanager
def child(*args: str) -> Iterator[subprocess.Popen[str]]:
    env = {**(CHILD_ENV or os.environ), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, str(HERE / "_transfer_roles.py"), *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        yield p
    finally:
        if p.stdin is not None:
            p.stdin.close()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(30)
        if p.stdout is not None:
            p.stdout.close()


def _send(p: subprocess.Popen[str], obj: Any) -> None:
    assert p.stdin is not None
    p.stdin.write(json.dumps(obj) + "\n")
    p.stdin.flush()


def _recv(p: subprocess.Popen[str]) -> Any:
    assert p.stdout is not None
    return roles.read_answer(p.stdout)


class Local:
    """A system timed in this process: ``one(op, pieces)`` makes a transfer function."""

    def __init__(self, one: Callable[[str, list[list[int]], bool], Callable[[], None]]
                 ) -> None:
        self._one = one

    def prep(self, op: str, pieces: list[list[int]], notify: bool = False) -> Any:
        fn = self._one(op, pieces, notify)
        fn()  # warm-up: connections, registration, page faults
        return fn

    def time(self, key: Any, iters: int) -> list[float]:
        return roles.timed(key, iters)


class Remote:
    """A system timed in its own process: NIXL's initiator, with its target progressing
    only while the initiator runs (see _transfer_roles.py)."""

    def __init__(self, p: subprocess.Popen[str], target: subprocess.Popen[str]) -> None:
        self._p = p
        self._target = target

    def _call(self, obj: Any) -> Any:
        _send(self._target, "spin")
        _recv(self._target)
        try:
            _send(self._p, obj)
            return _recv(self._p)
        finally:
            _send(self._target, "idle")
            _recv(self._target)

    def prep(self, op: str, pieces: list[list[int]], notify: bool = False) -> Any:
        return self._call({"prep": [op, pieces, notify]})

    def time(self, key: Any, iters: int) -> list[float]:
        return list(self._call({"time": [key, iters]}))


def open_socket(stack: ExitStack, region: int) -> Local:
    buf = np.random.default_rng(5).integers(0, 256, region, dtype=np.uint8)  # as NIXL's
    p = stack.enter_context(child("socket", str(region)))
    sock = stack.enter_context(socket.create_connection(("127.0.0.1", _recv(p)["port"])))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # The socket's answers already tell the other side: no notification to add.
    return Local(lambda op, pieces, _: roles.socket_request(sock, buf, op, pieces))


def open_kvbm(stack: ExitStack, region: int, backends: list[str]) -> dict[str, Local]:
    """A kvbm system per backend: ``ucx-rma`` is ucx between two agents with
    ``transport.ucx_rma`` (one-sided), the others share one pair of agents."""
    plain = [b for b in backends if b != RMA]
    out = _kvbm_pair(stack, region, plain, False) if plain else {}
    if RMA in backends:
        out[RMA] = _kvbm_pair(stack, region, ["ucx"], True)["ucx"]
    return {b: out[b] for b in backends}


def _kvbm_pair(stack: ExitStack, region: int, backends: list[str], rma: bool
               ) -> dict[str, Local]:
    from kvbm.config import config_to_dict
    from kvbm.transports import Agent, Op, TransportConfig

    cfg = TransportConfig(secret=secrets.token_hex(16), backends=",".join(backends),
                          ucx_rma=rma)
    buf = np.random.default_rng(5).integers(0, 256, region, dtype=np.uint8)  # as NIXL's
    p = stack.enter_context(child("kvbm", str(region), json.dumps(config_to_dict(cfg))))
    agent = stack.enter_context(Agent("decode", cfg))
    peer = agent.connect(*_recv(p)["address"])
    remote = peer.info.region("kv")
    loc = agent.register(buf)

    def system(backend: str) -> Local:
        def one(op: str, pieces: list[list[int]], notify: bool) -> Callable[[], None]:
            descs = [((loc, lo, n), (remote, ro, n)) for lo, ro, n in pieces]
            note = b"handoff done" if notify else None

            def run() -> None:
                agent.transfer(peer, Op[op], descs, notify=note, require=backend).wait(120)

            return run

        return Local(one)

    return {b: system(b) for b in backends}


def nixl_missing() -> str | None:
    for mod in ("nixl_cu12", "nixl"):
        try:
            if importlib.util.find_spec(mod) is not None:
                return None
        except (ImportError, ValueError):
            continue
    return "not installed (pip install torch==<your torch> nixl-cu12)"


def open_nixl(stack: ExitStack, region: int) -> Remote:
    t = stack.enter_context(child("nixl-target", str(region)))
    i = stack.enter_context(child("nixl-initiator", str(region)))
    target, initiator = _recv(t), _recv(i)
    _send(t, initiator)
    _recv(t)
    _send(t, "spin")  # the connection's wire-up needs the target's progress
    _recv(t)
    _send(i, target)
    _recv(i)  # ready: connected to the target
    _send(t, "idle")
    _recv(t)
    return Remote(i, t)


def run_all(plan: dict[str, Any], systems: dict[str, Local | Remote],
            say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every system through the same plan, interleaved: each repeat of each point runs on
    every system in turn (the first one rotating), so that a machine whose load drifts
    during the run weighs on all of them alike."""
    names = list(systems)
    handoff = plan["handoff"]["pieces"]
    keys = {n: {"points": [s.prep(op, [[0, 0, size]]) for op, size, _ in plan["points"]],
                "latency": {op: s.prep(op, [[0, 0, size]]) for op, size, _ in plan["latency"]},
                # a handoff ends with the peer told (prefill may free, decode may use)
                "handoff": {op: s.prep(op, handoff, True) for op in OPS}}
            for n, s in systems.items()}
    out: dict[str, dict[str, Any]] = {
        n: {"points": [[] for _ in plan["points"]], "latency": {},
            "handoff": {op: [] for op in OPS}} for n in names}
    for r in range(plan["repeat"]):
        say(f"run {r + 1} of {plan['repeat']}")
        order = names[r % len(names):] + names[:r % len(names)]
        for i, (_, _, iters) in enumerate(plan["points"]):
            for n in order:
                out[n]["points"][i].append(sum(systems[n].time(keys[n]["points"][i], iters)))
    say("latency")
    for op, _, iters in plan["latency"]:
        for n in names:
            out[n]["latency"][op] = systems[n].time(keys[n]["latency"][op], iters)
    say("handoff")
    for r in range(plan["handoff"]["repeat"]):
        for op in OPS:
            for n in names[r % len(names):] + names[:r % len(names)]:
                out[n]["handoff"][op] += systems[n].time(keys[n]["handoff"][op], 1)
    return out


# -- figures --------------------------------------------------------------------------------------
def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def point_gbps(plan: dict[str, Any], res: dict[str, Any]) -> dict[tuple[str, int], float]:
    """(op, bytes) -> GB/s: the median over the repeats of each point."""
    return {(op, n): _gbps(n * iters, statistics.median(runs))
            for (op, n, iters), runs in zip(plan["points"], res["points"], strict=True)}


def _pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def build_doc(plan: dict[str, Any], handoff: dict[str, Any], results: dict[str, Any],
              nixl_note: str) -> dict[str, Any]:
    socket_g = point_gbps(plan, results["socket"])
    nixl = results.get("nixl")
    nixl_g = point_gbps(plan, nixl) if nixl else {}
    rows = []
    for backend, res in results["kvbm"].items():
        for (op, n), g in point_gbps(plan, res).items():
            ceiling = socket_g[(op, n)]
            rows.append({"backend": backend, "op": op, "bytes": n, "gbps": round(g, 3),
                         "ceiling_gbps": round(ceiling, 3), "ratio": round(g / ceiling, 3),
                         "nixl_gbps": round(nixl_g[(op, n)], 3) if nixl else None})
    systems = {**results["kvbm"], "socket": results["socket"], **({"nixl": nixl} if nixl else {})}
    latency = [{"backend": name, "op": op, "bytes": LATENCY_BYTES,
                "p50_ms": round(_pct(s, 0.5) * 1e3, 3), "p99_ms": round(_pct(s, 0.99) * 1e3, 3)}
               for name, res in systems.items() for op, s in res["latency"].items()]
    raw = {op: statistics.median(s) for op, s in results["socket"]["handoff"].items()}
    hand = []
    for name, res in systems.items():
        if name == "socket":
            continue
        for op, s in res["handoff"].items():
            t = statistics.median(s)
            hand.append({"backend": name, "op": op, "bytes": handoff["bytes"],
                         "blocks": handoff["blocks"], "ms": round(t * 1e3, 3),
                         "gbps": round(_gbps(handoff["bytes"], t), 3),
                         "socket_ms": round(raw[op] * 1e3, 3),
                         "vs_socket": round(raw[op] / t, 3)})
    return {"rows": rows, "latency": latency, "handoff": hand, "handoff_request": handoff,
            "nixl": nixl_note, "ucx_env": {k: v for k, v in sorted(os.environ.items())
                                            if k in ("UCX_TLS", "UCX_NET_DEVICES")}}


def _size(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def format_doc(doc: dict[str, Any]) -> str:
    lines = [f"{'backend':<9}{'op':<7}{'size':>9}{'GB/s':>9}{'socket GB/s':>13}"
             f"{'x socket':>10}{'NIXL GB/s':>11}{'x NIXL':>8}"]
    for r in doc["rows"]:
        nixl = r["nixl_gbps"]
        lines.append(f"{r['backend']:<9}{r['op']:<7}{_size(r['bytes']):>9}{r['gbps']:>9.2f}"
                     f"{r['ceiling_gbps']:>13.2f}{r['ratio']:>10.2f}"
                     + (f"{nixl:>11.2f}{r['gbps'] / nixl:>8.2f}" if nixl else f"{'-':>11}"
                        f"{'-':>8}"))
    lines += ["", f"NIXL (UCX backend, DRAM): {doc['nixl']}", "",
              f"latency of one {_size(LATENCY_BYTES)} transfer",
              f"{'backend':<9}{'op':<7}{'p50 ms':>9}{'p99 ms':>9}"]
    lines += [f"{r['backend']:<9}{r['op']:<7}{r['p50_ms']:>9.3f}{r['p99_ms']:>9.3f}"
              for r in doc["latency"]]
    h = doc["handoff_request"]
    lines += ["", f"KV handoff of one request: {h['tokens']} tokens of {h['layout']} = "
                  f"{h['blocks']} blocks of {_size(h['block_bytes'])} ({_size(h['bytes'])}), "
                  f"scattered, one transfer",
              f"{'backend':<9}{'op':<7}{'ms':>9}{'GB/s':>9}{'socket ms':>11}{'x socket':>10}"]
    lines += [f"{r['backend']:<9}{r['op']:<7}{r['ms']:>9.2f}{r['gbps']:>9.2f}"
              f"{r['socket_ms']:>11.2f}{r['vs_socket']:>10.2f}" for r in doc["handoff"]]
    env = ", ".join(f"{k}={v}" for k, v in doc["ucx_env"].items())
    lines += ["", f"x socket: GB/s over a plain socket's in the same run (> 1: faster); "
                  f"UCX environment: {env or 'UCX defaults'}"]
    if any(r["backend"] == RMA for r in doc["rows"]):
        lines.append(f"{RMA}: ucx with transport.ucx_rma on both agents (one-sided, as NIXL; "
                     f"for peers that trust each other); ucx checks each range where it is "
                     f"served")
    return "\n".join(lines)


def available(wanted: list[str] | None) -> tuple[list[str], dict[str, str]]:
    from kvbm.transports import available_backends

    wanted = wanted or ["tcp", "ucx", RMA]
    found = available_backends({"ucx" if n == RMA else n for n in wanted})
    ok = [n for n in ("tcp", "ucx", RMA) if n in wanted
          and not isinstance(found["ucx" if n == RMA else n], str)]
    return ok, {n: str(v) for n, v in found.items() if isinstance(v, str)}


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    # One host: UCX (kvbm's and NIXL's) on loopback unless the caller chose; its log on
    # stderr, never in the --json document.
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    os.environ.setdefault("UCX_LOG_FILE", "stderr")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    CHILD_ENV.update(os.environ)
    plan, region, handoff = make_plan(args)
    backends, missing = available(args.backend)
    if not backends:
        ap.error(f"no backend to measure: {missing}")
    progress: IO[str] | None = None if (args.json or args.no_progress) else sys.stderr

    def say(msg: str) -> None:
        if progress is not None:
            print(f"... {msg}", file=progress, flush=True)

    note = "skipped (--no-nixl)" if args.no_nixl else nixl_missing()
    with ExitStack() as stack:
        say("starting: raw socket, kvbm (" + ", ".join(backends) + ")"
            + (", NIXL" if note is None else ""))
        systems: dict[str, Local | Remote] = {"socket": open_socket(stack, region)}
        systems.update(open_kvbm(stack, region, backends))
        if note is None:
            try:
                systems["nixl"] = open_nixl(stack, region)
                note = "measured in this run"
            except Exception as e:  # a NIXL failure costs its column, not the run
                note = f"failed to start: {e}"
        res = run_all(plan, systems, say)
    results: dict[str, Any] = {"socket": res.pop("socket"), "nixl": res.pop("nixl", None),
                               "kvbm": res}
    doc = build_doc(plan, handoff, results, note)
    doc["backends_missing"] = missing
    if args.json:
        doc["meta"] = _meta.run_meta(args.seed)
        print(json.dumps(doc))
    else:
        print(format_doc(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
