"""Local object-store servers for tests: moto (S3) and gcp-storage-emulator (GCS) as
subprocesses on 127.0.0.1, and a fault-injecting HTTP proxy to put in front of either.

Nothing here talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import enum
import http.client
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The servers themselves live in the library (kvbm/testing/servers.py), where the benchmarks
# use them too; they are re-exported here for the tests.
from kvbm.testing.servers import (
    AWS_TEST_ENV,
    HOST,
    ServerProcess,
    free_port,
    gcs_emulator,
    moto_server,
)

__all__ = ["AWS_TEST_ENV", "HOST", "Fault", "FaultProxy", "ServerProcess", "free_port",
           "gcs_emulator", "moto_server"]


# -- fault-injecting proxy ------------------------------------------------------------------------
class Fault(enum.Enum):
    PASS = "pass"
    ERROR_500 = "error_500"  # answer 500 InternalError without asking upstream
    ERROR_503 = "error_503"  # answer 503 SlowDown
    HANG = "hang"  # read the request, answer nothing for `hang_s`, then drop the connection
    TRUNCATE = "truncate"  # forward, then send the full Content-Length but half the body
    CORRUPT = "corrupt"  # forward, flip one byte in the middle of the body
    RESET = "reset"  # drop the connection without answering
    #: forward, then send the full Content-Length but the body one byte every `trickle_s`
    #: (each read of the client gets something before its timeout; the whole never ends)
    TRICKLE = "trickle"


class FaultProxy:
    """An HTTP/1.1 proxy on 127.0.0.1 in front of a test server, injecting faults on demand.

    ``inject(fault, count, methods, match)`` applies ``fault`` to the next ``count`` requests
    whose method is in ``methods`` (all methods when empty) and whose path contains ``match``;
    other requests pass through. (``match`` keeps faults off requests a client library makes
    on its own, such as google-cloud-storage's background bucket-metadata fetch.)
    """

    def __init__(self, upstream_port: int, *, hang_s: float = 2.0, trickle_s: float = 0.1,
                 trickle_max_s: float = 10.0) -> None:
        self.upstream_port = upstream_port
        self.hang_s = hang_s
        self.trickle_s = trickle_s
        self.trickle_max_s = trickle_max_s
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
        if fault is Fault.TRICKLE:
            self._trickle(h, data)
            return
        if h.command != "HEAD":
            if fault is Fault.TRUNCATE:
                h.wfile.write(data[: len(data) // 2])
                h.wfile.flush()
                h.close_connection = True
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RDWR)
                return
            h.wfile.write(data)

    def _trickle(self, h: BaseHTTPRequestHandler, data: bytes) -> None:
        h.close_connection = True
        deadline = time.monotonic() + self.trickle_max_s
        with contextlib.suppress(OSError):
            for i in range(len(data)):
                if time.monotonic() > deadline:
                    break
                h.wfile.write(data[i:i + 1])
                h.wfile.flush()
                time.sleep(self.trickle_s)
            h.connection.shutdown(socket.SHUT_RDWR)

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
