"""``kvbm router``'s HTTP service: the subscriber, the indexer and the router behind HTTP.

Endpoints (JSON unless said otherwise):

- ``POST /select`` ``{"token_ids": [...]}`` or ``{"hashes": [...]}``, optional ``"loads":
  {"worker": 12 | {"active_blocks": 12, "active_requests": 1}}`` and ``"lora_name"``: the
  worker to send the request to and every candidate's score (:class:`~kvbm.router.Selection`).
- ``GET /dump``: per worker, its blocks per medium, object group and subscription state.
- ``GET /healthz``: 200 while the subscriber runs, else 503.
- ``GET /metrics``: Prometheus text format.

Bad requests (not JSON, wrong types, a body over ``max_body_bytes``, unknown paths or
methods) get a 4xx answer with a message, and the service goes on.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kvbm.errors import ClosedError, ConfigError, InvalidArgumentError
from kvbm.events.nats_consumer import JetStreamConsumer
from kvbm.router.config import RouterConfig
from kvbm.router.cost import KvRouter, WorkerLoad
from kvbm.router.indexer import KvIndexer
from kvbm.router.metrics import jetstream_text, prometheus_text
from kvbm.router.subscriber import Subscriber

log = logging.getLogger(__name__)

#: A client that sends nothing for this long is dropped (a slow client holds one thread).
_CLIENT_TIMEOUT_S = 30.0


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RouterService:
    """The subscriber, indexer and router of ``config``, served over HTTP on
    ``config.service.host:port`` (port 0: one the system picks, see :attr:`url`)."""

    def __init__(self, config: RouterConfig) -> None:
        if not isinstance(config, RouterConfig):
            raise InvalidArgumentError(f"config must be a RouterConfig, got "
                                       f"{type(config).__name__}")
        self.config = config
        self.indexer = KvIndexer(config.block_size, salt=config.salt,
                                 clear_scope=config.clear_scope)
        self.router = KvRouter(self.indexer, config.cost)
        self.subscriber = Subscriber(self.indexer, config.subscriber)
        #: the JetStream consumer of ``config.nats`` (made by start(): it connects at once)
        self.jetstream: JetStreamConsumer | None = None
        for w in config.workers:
            self.indexer.add_worker(w.name)
            if w.object_group is not None:
                self.indexer.set_object_group(w.name, w.object_group)
            self.subscriber.add_worker(w.name, w.endpoint, w.replay)
        self.selections = 0
        self.http_errors: dict[int, int] = {}
        self._count_lock = threading.Lock()
        handler = type("Handler", (_Handler,), {"service": self})
        try:
            self._httpd = ThreadingHTTPServer((config.service.host, config.service.port),
                                              handler)
        except OSError as e:
            self.subscriber.close()
            raise ConfigError(f"cannot listen on {config.service.host}:"
                              f"{config.service.port}: {e}") from None
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = host if isinstance(host, str) else host.decode()
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> None:
        """Subscribe and serve, each on a thread of its own."""
        if self._closed:
            raise ClosedError("the router service is closed")
        self.subscriber.start()
        if self.config.nats is not None and self.jetstream is None:
            self.jetstream = JetStreamConsumer(self.config.nats, self.indexer.apply)
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever,
                                            name="kvbm-router-http", daemon=True)
            self._thread.start()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._httpd.shutdown()
        self._httpd.server_close()
        self.subscriber.close()
        if self.jetstream is not None:
            self.jetstream.close()  # checkpoints (durable) before it goes

    def __enter__(self) -> RouterService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------- handlers --
    def select(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _HttpError(400, "the body must be a JSON object")
        unknown = set(body) - {"token_ids", "hashes", "loads", "lora_name"}
        if unknown:
            raise _HttpError(400, f"unknown field(s) {sorted(unknown)}; expected token_ids "
                                  f"or hashes, and optionally loads, lora_name")
        tokens, hashes = body.get("token_ids"), body.get("hashes")
        for name, value in (("token_ids", tokens), ("hashes", hashes)):
            if value is not None and (not isinstance(value, list) or
                                      not all(type(v) is int for v in value)):
                raise _HttpError(400, f"{name} must be a list of integers")
        loads = _loads(body.get("loads"))
        candidates = loads or dict.fromkeys(self.indexer.workers(), WorkerLoad())
        if not candidates:
            raise _HttpError(503, "no worker is known yet")
        try:
            sel = self.router.select(tokens, candidates, hashes=hashes,
                                     lora_name=body.get("lora_name"))
        except InvalidArgumentError as e:
            raise _HttpError(400, str(e)) from None
        with self._count_lock:
            self.selections += 1
        return sel.to_dict()

    def dump(self) -> dict[str, Any]:
        status = self.subscriber.status()
        counts = self.indexer.block_counts()
        js = self.jetstream
        cursors = js.cursors() if js is not None else {}
        workers: dict[str, Any] = {}
        for name in sorted(set(counts) | set(status) | set(cursors)):
            st = status.get(name)
            workers[name] = {
                "blocks": {m.value: n for m, n in counts.get(name, {}).items()},
                "object_group": self.indexer.object_group(name),
                "subscriber": None if st is None else {
                    "endpoint": st.endpoint, "replay_endpoint": st.replay_endpoint,
                    "state": st.state, "next_seq": st.next_seq, "complete": st.complete,
                    **st.counters},
            }
            if js is not None:
                cur = cursors.get(name)
                workers[name]["jetstream"] = None if cur is None else _asdict(cur)
        out = {"block_size": self.indexer.block_size, "workers": workers,
               "indexer": _asdict(self.indexer.stats())}
        if js is not None:
            out["jetstream"] = {"durable": js.durable, **_asdict(js.stats())}
        return out

    def healthy(self) -> bool:
        return (self.subscriber.running and not self._closed
                and (self.jetstream is None or self.jetstream.running))

    def metrics(self) -> str:
        with self._count_lock:
            errors = dict(self.http_errors)
            selections = self.selections
        text = prometheus_text(self.indexer.stats(), self.indexer.block_counts(),
                               self.subscriber.status(), self.subscriber.totals(),
                               selections, errors)
        if self.jetstream is not None:
            text += jetstream_text(self.jetstream.stats())
        return text

    def count_error(self, status: int) -> None:
        with self._count_lock:
            self.http_errors[status] = self.http_errors.get(status, 0) + 1


def _asdict(obj: Any) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(obj)


def _loads(raw: Any) -> dict[str, WorkerLoad]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _HttpError(400, "loads must map worker names to an int of active blocks or "
                              "{\"active_blocks\": N, \"active_requests\": N}")
    out: dict[str, WorkerLoad] = {}
    for w, v in raw.items():
        try:
            if isinstance(v, dict):
                extra = set(v) - {"active_blocks", "active_requests"}
                if extra:
                    raise InvalidArgumentError(f"unknown load field(s) {sorted(extra)}")
                out[w] = WorkerLoad(v.get("active_blocks", 0), v.get("active_requests", 0))
            else:
                out[w] = WorkerLoad(v)
        except InvalidArgumentError as e:
            raise _HttpError(400, f"loads[{w!r}]: {e}") from None
    return out


class _Handler(BaseHTTPRequestHandler):
    service: RouterService
    timeout = _CLIENT_TIMEOUT_S
    server_version = "kvbm-router"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:  # http.server calls do_<METHOD>
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        routes = {"/select": "POST", "/dump": "GET", "/healthz": "GET", "/metrics": "GET"}
        path = self.path.split("?", 1)[0]
        try:
            want = routes.get(path)
            if want is None:
                raise _HttpError(404, f"no such path {path[:100]!r}; try POST /select, GET "
                                      f"/dump, /healthz, /metrics")
            if method != want:
                raise _HttpError(405, f"{path} takes {want}, not {method}")
            if path == "/select":
                self._json(200, self.service.select(self._body()))
            elif path == "/dump":
                self._json(200, self.service.dump())
            elif path == "/healthz":
                ok = self.service.healthy()
                self._json(200 if ok else 503, {"status": "ok" if ok else "stopped",
                                                "workers": len(self.service.indexer.workers())})
            else:
                self._send(200, self.service.metrics().encode(),
                           "text/plain; version=0.0.4; charset=utf-8")
        except _HttpError as e:
            self.service.count_error(e.status)
            if e.status == 413:
                self.close_connection = True  # the body was not read
            self._json(e.status, {"error": str(e)})
        except Exception:  # a bug: answer 500 and keep serving
            log.exception("router service: error on %s %s", method, path)
            self.service.count_error(500)
            self._json(500, {"error": "internal error (see the router's log)"})

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None or length is None:
            self.close_connection = True
            raise _HttpError(411, "a Content-Length header is required")
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise _HttpError(400, f"bad Content-Length {length[:40]!r}")
        if n > self.service.config.service.max_body_bytes:
            raise _HttpError(413, f"body of {n} bytes; at most "
                                  f"{self.service.config.service.max_body_bytes} accepted")
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise _HttpError(400, "the body ended before Content-Length bytes")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise _HttpError(400, f"the body is not JSON: {str(e)[:200]}") from None

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

