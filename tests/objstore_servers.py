"""Local object-store servers for tests: moto (S3) and gcp-storage-emulator (GCS) as
subprocesses on 127.0.0.1, and a fault-injecting HTTP proxy to put in front of either.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A test server in a subprocess, restartable on the same port (to kill it mid-test)."""

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


def moto_server(port: int | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess([str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], port,
                         name="moto_server")


def gcs_emulator(port: int | None = None) -> ServerProcess:
    port = port or free_port()
    return ServerProcess([str(BIN / "gcp-storage-emulator"), "start", "--host", HOST,
                          "--port", str(port), "--in-memory"], port,
                         name="gcp-storage-emulator")


AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1",
                # Never read the developer's real profile or endpoint.
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}


# -- fault-injecting proxy ------------------------------------------------------------------------
class Fault(enum.Enum):
    PASS = "pass"
    ERROR_500 = "error_500"  # answer 500 InternalError without asking upstream
    ERROR_503 = "error_503"  # answer 503 SlowDown
    HANG = "hang"  # read the request, answer nothing for `hang_s`, then drop the connection
    TRUNCATE = "truncate"  # forward, then send the full Content-Length but half the body
    CORRUPT = "corrupt"  # forward, flip one byte in the middle of the body
    RESET = "reset"  # drop the connection without answering


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of a test server, injecting faults on demand.

    ``inject(fault, count, methods, match)`` applies ``fault`` to the next ``count`` requests
    whose method is in ``methods`` (all methods when empty) and whose path contains ``match``;
    other requests pass through. (``match`` keeps faults off requests a client library makes
    on its own, such as google-cloud-storage's background bucket-metadata fetch.)
    """

    def __init__(self, upstream_port: int, *, hang_s: float = 2.0) -> None:
        self.upstream_port = upstream_port
        self.hang_s = hang_s
        self._lock = threading.Lock()
        self._fault = Fault.PASS
        self._remaining = 0
        self._methods: frozenset[str] = frozenset()
        self._match = ""
        self.injected = 0
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _any(self) -> None:
                proxy._handle(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

        self._server = ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def inject(self, fault: Fault, count: int = 1_000_000, methods: tuple[str, ...] = (),
               match: str = "") -> None:
        with self._lock:
            self._fault, self._remaining = fault, count
            self._methods = frozenset(methods)
            self._match = match

    def clear(self) -> None:
        self.inject(Fault.PASS, 0)

    def _take(self, method: str, path: str) -> Fault:
        with self._lock:
            self.seen.append((method, path))
            if (self._fault is Fault.PASS or self._remaining <= 0
                    or (self._methods and method not in self._methods)
                    or self._match not in path):
                return Fault.PASS
            self._remaining -= 1
            self.injected += 1
            return self._fault

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        if "chunked" in (h.headers.get("Transfer-Encoding") or ""):
            body = _read_chunked(h)
        fault = self._take(h.command, h.path)
        if fault is Fault.RESET:
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is Fault.HANG:
            time.sleep(self.hang_s)
            h.close_connection = True
            return
        if fault in (Fault.ERROR_500, Fault.ERROR_503):
            status, code = (500, "InternalError") if fault is Fault.ERROR_500 else \
                (503, "SlowDown")
            msg = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                   f"<Message>injected</Message></Error>").encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(msg)))
            h.end_headers()
            h.wfile.write(msg)
            return
        conn = http.client.HTTPConnection(HOST, self.upstream_port, timeout=30)
        try:
            headers = {k: v for k, v in h.headers.items()
                       if k.lower() not in ("transfer-encoding", "content-length")}
            headers["Content-Length"] = str(len(body))
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out_headers = [(k, v) for k, v in resp.getheaders()
                           if k.lower() not in ("transfer-encoding", "content-length",
                                                "connection")]
            status = resp.status
        finally:
            conn.close()
        if fault is Fault.CORRUPT and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        h.send_response(status)
        for k, v in out_headers:
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        if fault is Fault.TRUNCATE:
            h.send_header("Connection", "close")
        h.end_headers()
        if h.command != "HEAD":
            if fault is Fault.TRUNCATE:
                h.wfile.write(data[: len(data) // 2])
                h.wfile.flush()
                h.close_connection = True
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RDWR)
                return
            h.wfile.write(data)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _read_chunked(h: BaseHTTPRequestHandler) -> bytes:
    out = bytearray()
    while True:
        size = int(h.rfile.readline().strip().split(b";")[0], 16)
        if size == 0:
            h.rfile.readline()
            return bytes(out)
        out += h.rfile.read(size)
        h.rfile.readline()
