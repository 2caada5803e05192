"""The serving side of the transport conformance suite: an agent in this process (a
:class:`ThreadSide`) or in a process of its own (a :class:`ProcessSide`, driven over its
stdin/stdout by :func:`serve_commands`, one JSON object per line).

Both offer the same calls, so one test body runs against either: register a region filled
with a known pattern, read or write its bytes behind the transport's back, expose,
deregister, collect notifications, pause (a slow peer) and kill (a dead one).
"""

from __future__ import annotations

import base64
import enum
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from kvbm.transports import (
    ALL_PEERS,
    Access,
    Agent,
    Peer,
    RegionHandle,
    TransferHandle,
    TransferStatus,
    TransportConfig,
)

MiB = 1 << 20


def pattern(seed: int, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """``size`` pseudo-random bytes, the same for the same seed in every process."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def config_to_json(cfg: TransportConfig) -> str:
    from kvbm.config import config_to_dict

    return json.dumps(config_to_dict(cfg))


class _Commands:
    """What both sides can be asked (the process side runs it behind its command loop)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.buffers: dict[str, np.ndarray[Any, np.dtype[np.uint8]]] = {}
        self.handles: dict[str, RegionHandle] = {}

    def register(self, name: str, size: int, seed: int = 0, expose_to: Any = ALL_PEERS,
                 access: int = 3, readonly: bool = False) -> dict[str, Any]:
        buf = pattern(seed, size)
        if readonly:
            buf.flags.writeable = False
        h = self.agent.register(buf, name=name, access=Access(access),
                                expose_to=expose_to, meta={"seed": seed})
        self.buffers[name], self.handles[name] = buf, h
        return {"id": h.id}

    def read(self, name: str, offset: int, length: int) -> bytes:
        return self.buffers[name][offset:offset + length].tobytes()

    def write(self, name: str, offset: int, data: bytes) -> None:
        self.buffers[name][offset:offset + len(data)] = np.frombuffer(data, np.uint8)

    def deregister(self, name: str) -> None:
        self.agent.deregister(self.handles.pop(name))

    def expose(self, name: str, to: Any, access: int = 3) -> None:
        self.agent.expose(self.handles[name], to=to, access=Access(access))

    def notifications(self, count: int, timeout: float) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        while len(out) < count:
            n = self.agent.next_notification(timeout)
            if n is None:
                break
            out.append((n.peer, n.data))
        return out

    def stats(self) -> dict[str, int]:
        return dict(self.agent.stats.snapshot().events)


class ThreadSide:
    """A serving agent in this process."""

    def __init__(self, name: str, config: TransportConfig) -> None:
        self.name = name
        self._c = _Commands(Agent(name, config))
        self.agent = self._c.agent

    @property
    def address(self) -> tuple[str, int]:
        return self.agent.address

    def __getattr__(self, cmd: str) -> Callable[..., Any]:
        return getattr(self._c, cmd)  # type: ignore[no-any-return]

    def pause(self) -> None:
        import pytest

        pytest.skip("an agent in this process cannot be paused")

    def resume(self) -> None:
        pass

    def kill(self) -> None:
        self.agent.close()

    def close(self) -> None:
        self.agent.close()

    def __enter__(self) -> ThreadSide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is stopped (Linux /proc; elsewhere: True)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in tasks]
    except OSError:
        return True
    return all(st in ("T", "t") for st in states)


class ProcessSide:
    """A serving agent in a process of its own, running ``script`` (which calls
    :func:`serve_commands`)."""

    def __init__(self, name: str, config: TransportConfig, script: Path) -> None:
        self.name = name
        env = dict(os.environ)
        self._p = subprocess.Popen([sys.executable, str(script), name, config_to_json(config)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env=env)
        self._lock = threading.Lock()
        host, port = self._call("address")
        self.address = (str(host), int(port))

    def _call(self, cmd: str, **kw: Any) -> Any:
        assert self._p.stdin is not None and self._p.stdout is not None
        with self._lock:
            self._p.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
            self._p.stdin.flush()
            line = self._p.stdout.readline()
        if not line:
            raise RuntimeError(f"transport peer {self.name} exited ({self._p.poll()})")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"transport peer {self.name}: {out['error']}")
        return _decode(out["ok"])

    def __getattr__(self, cmd: str) -> Callable[..., Any]:
        if cmd.startswith("_"):
            raise AttributeError(cmd)
        return lambda *a, **kw: self._call(cmd, args=_encode(list(a)), kwargs=_encode(kw))

    def pause(self) -> None:
        self._p.send_signal(signal.SIGSTOP)
        # The stop lands asynchronously: wait (up to 10 s) until every thread has stopped,
        # else a request sent right after may still be served.
        for _ in range(1000):
            if _stopped(self._p.pid):
                return
            threading.Event().wait(0.01)

    def resume(self) -> None:
        self._p.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self._p.kill()
        self._p.wait(30)

    def close(self) -> None:
        if self._p.poll() is None:
            self._p.send_signal(signal.SIGCONT)
            assert self._p.stdin is not None
            try:
                self._p.stdin.close()
                self._p.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self._p.kill()
                self._p.wait(30)
        if self._p.stdout is not None:
            self._p.stdout.close()

    def __enter__(self) -> ProcessSide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def cancel_while_paused(side: ProcessSide, start: Callable[[], TransferHandle]) -> None:
    """Pause ``side``, run ``start`` (which returns the handle of a transfer that needs the
    paused peer), check the handle is still pending after the call returned and can be
    released (CANCELLED), and resume ``side`` whatever happened."""
    import pytest

    from kvbm.errors import TransportTimeoutError

    side.pause()
    try:
        h = start()
        assert not h.done()
        with pytest.raises(TransportTimeoutError):
            h.wait(0.2)
        h.release()
        assert h.status is TransferStatus.CANCELLED
    finally:
        side.resume()


def _encode(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"b64": base64.b64encode(v).decode()}
    if isinstance(v, list | tuple):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {k: _encode(x) for k, x in v.items()}
    return v


def _decode(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"b64"}:
        return base64.b64decode(v["b64"])
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if isinstance(v, dict):
        return {k: _decode(x) for k, x in v.items()}
    return v


def serve_commands(name: str, config_json: str, stdin: IO[str] = sys.stdin,
                   stdout: IO[str] = sys.stdout) -> None:
    """The command loop of a :class:`ProcessSide`'s process; returns when stdin closes."""
    agent = Agent(name, TransportConfig.from_mapping(json.loads(config_json)))
    cmds = _Commands(agent)
    try:
        for line in stdin:
            req = json.loads(line)
            try:
                if req["cmd"] == "address":
                    result: Any = list(agent.address)
                else:
                    result = getattr(cmds, req["cmd"])(*_decode(req.get("args", [])),
                                                       **_decode(req.get("kwargs", {})))
                stdout.write(json.dumps({"ok": _encode(result)}) + "\n")
            except Exception as e:
                stdout.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
            stdout.flush()
    finally:
        agent.close()


def _fixture(fn: Callable[..., Any]) -> Any:
    import pytest  # the suite's own dependency: plain users of the sides need not have it

    return pytest.fixture(fn)


Side = ThreadSide | ProcessSide


class PeerMode(enum.Enum):
    """Where the serving agent of a conformance test runs."""

    THREAD = "thread"  # in the test's process
    PROCESS = "process"  # in a process of its own (peer_script)


class SuiteBase:
    """Settings and helpers of the conformance suite (kvbm.testing.transports)."""

    backend: ClassVar[str]
    #: The ``transport.backends`` setting of both agents (default: ``backend`` alone).
    backends: ClassVar[str | None] = None
    mode: ClassVar[PeerMode] = PeerMode.THREAD
    #: Transfers bypass the serving side (``transport.ucx_rma``): it counts no requests.
    one_sided: ClassVar[bool] = False
    #: The script a PROCESS-mode peer runs (tests/transport_peer.py).
    peer_script: ClassVar[Path | None] = None
    secret: ClassVar[str] = "kvbm-conformance-secret-0123456789"
    #: Sizes every READ / WRITE test moves (the largest exceeds the split threshold).
    sizes: ClassVar[tuple[int, ...]] = (1, 7, 4096, 65_539, MiB, 5 * MiB + 3)

    def config(self, **over: Any) -> TransportConfig:
        base: dict[str, Any] = dict(secret=self.secret, backends=self.backends or self.backend,
                                    require=self.backend, io_timeout_s=10.0,
                                    split_threshold_bytes=2 * MiB, parallel_connections=2)
        base.update(over)
        return TransportConfig(**base)

    def make_side(self, name: str = "server", **over: Any) -> Side:
        cfg = self.config(**over)
        if self.mode is PeerMode.PROCESS:
            assert self.peer_script is not None, "PROCESS mode needs peer_script"
            return ProcessSide(name, cfg, self.peer_script)
        return ThreadSide(name, cfg)

    @_fixture
    def agent(self) -> Iterator[Agent]:
        with Agent("client", self.config()) as a:
            yield a

    @_fixture
    def side(self) -> Iterator[Side]:
        s = self.make_side()
        try:
            yield s
        finally:
            s.close()

    def local(self, agent: Agent, size: int, fill: int = 0
              ) -> tuple[np.ndarray[Any, np.dtype[np.uint8]], RegionHandle]:
        buf = np.full(size, fill, dtype=np.uint8)
        return buf, agent.register(buf)

    def notes(self, side: Side, count: int, timeout: float) -> list[tuple[str, bytes]]:
        return [(str(p), bytes(d)) for p, d in side.notifications(count, timeout)]

    def connect(self, agent: Agent, side: Side) -> Peer:
        return agent.connect(*side.address)
