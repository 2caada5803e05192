"""``kvbm router`` as a subprocess on a free port: /select, /dump, /healthz, /metrics, and bad
input on the HTTP service (it answers 4xx and keeps serving)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("zmq")

from router_pubs import WAIT_S, ScriptedPublisher, wait_until

from kvbm.events import BlockStored
from kvbm.hashing import hash_blocks
from kvbm.medium import Medium

BS = 4
TOKENS = list(range(100, 100 + 6 * BS))
SEQ = hash_blocks(TOKENS, BS).sequence


class Router:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kvbm", "router", "--port", "0",
                                      *args], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert "listening on" in line, line
        self.url = line.split("listening on ", 1)[1].split()[0]
        self.host, port = self.url.removeprefix("http://").rsplit(":", 1)
        self.port = int(port)

    def request(self, method: str, path: str, body: Any = None,
                raw: bytes | None = None) -> tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(req, timeout=WAIT_S) as r:
                status, text, ctype = r.status, r.read().decode(), r.headers["Content-Type"]
        except urllib.error.HTTPError as e:
            status, text, ctype = e.code, e.read().decode(), e.headers["Content-Type"]
        return status, json.loads(text) if ctype == "application/json" else text

    def raw(self, head: bytes) -> bytes:
        """Send raw bytes, return everything the service answers."""
        with socket.create_connection((self.host, self.port), timeout=WAIT_S) as s:
            s.sendall(head)
            s.shutdown(socket.SHUT_WR)
            return s.makefile("rb").read()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(WAIT_S)


@pytest.fixture
def pubs() -> Iterator[tuple[ScriptedPublisher, ScriptedPublisher]]:
    a, b = ScriptedPublisher(), ScriptedPublisher()
    yield a, b
    a.close()
    b.close()


@pytest.fixture
def router(pubs: tuple[ScriptedPublisher, ScriptedPublisher]) -> Iterator[Router]:
    a, b = pubs
    r = Router("--worker", f"a={a.endpoint},{a.replay_endpoint}",
               "--worker", f"b={b.endpoint},{b.replay_endpoint}", "--block-size", str(BS))
    yield r
    if r.proc.poll() is None:
        r.stop()


def held(router: Router, worker: str) -> dict[str, int]:
    return router.request("GET", "/dump")[1]["workers"][worker]["blocks"]


def test_select_dump_healthz_metrics(pubs: tuple[ScriptedPublisher, ScriptedPublisher],
                                     router: Router) -> None:
    a, _ = pubs
    a.wait_subscriber()  # from here on a live batch reaches it (or its first replay has it)
    a.batch(0, [BlockStored(SEQ[:4], None, TOKENS[:4 * BS], BS, Medium.GPU),
                BlockStored(SEQ[:6], None, TOKENS, BS, Medium.DISK)])
    wait_until(lambda: held(router, "a").get("DISK") == 6, what="a's blocks")
    assert held(router, "a") == {"GPU": 4, "CPU_PINNED": 0, "DISK": 6, "OBJECT": 0}
    status, sel = router.request("POST", "/select", {"token_ids": TOKENS})
    assert status == 200 and sel["worker"] == "a"
    assert sel["scores"]["a"]["matched"] == {"GPU": 4, "DISK": 2}
    assert sel["scores"]["b"]["matched"] == {} and sel["scores"]["b"]["new_blocks"] == 6
    status, sel = router.request("POST", "/select", {"token_ids": TOKENS,
                                                     "loads": {"a": 100, "b": 0}})
    assert sel["worker"] == "b"
    status, sel = router.request("POST", "/select", {
        "hashes": SEQ, "loads": {"a": {"active_blocks": 1, "active_requests": 2}}})
    assert status == 200 and list(sel["scores"]) == ["a"]
    assert sel["scores"]["a"]["active_requests"] == 2
    dump = router.request("GET", "/dump")[1]
    sub = dump["workers"]["a"]["subscriber"]
    assert sub["complete"] and sub["next_seq"] == 1 and dump["block_size"] == BS
    assert router.request("GET", "/healthz") == (200, {"status": "ok", "workers": 2})
    status, text = router.request("GET", "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert 'kvbm_router_worker_blocks{worker="a",medium="DISK"} 6' in lines
    assert "kvbm_router_events_applied_total 2" in lines
    assert "kvbm_router_selections_total 3" in lines
    assert 'kvbm_router_worker_complete{worker="a"} 1' in lines
    assert "# TYPE kvbm_router_gaps_total counter" in lines
    assert router.stop() == 0


def test_bad_input_gets_4xx_and_the_service_keeps_running(router: Router) -> None:
    cases: list[tuple[str, str, Any, bytes | None, int]] = [
        ("POST", "/select", None, b"{not json", 400),
        ("POST", "/select", None, b"\xff\xfe", 400),
        ("POST", "/select", None, b"[" * 100_000 + b"]" * 100_000, 400),
        ("POST", "/select", [1, 2], None, 400),
        ("POST", "/select", {"token_ids": "abc"}, None, 400),
        ("POST", "/select", {"token_ids": [1.5, 2]}, None, 400),
        ("POST", "/select", {"token_ids": [True, 2]}, None, 400),
        ("POST", "/select", {"token_ids": [-1, 2]}, None, 400),
        ("POST", "/select", {"token_ids": [2**40]}, None, 400),
        ("POST", "/select", {"token_ids": [1], "hashes": [1]}, None, 400),
        ("POST", "/select", {"hashes": [2**64]}, None, 400),
        ("POST", "/select", {}, None, 400),
        ("POST", "/select", {"token_ids": [1], "extra": 1}, None, 400),
        ("POST", "/select", {"token_ids": [1], "loads": [1]}, None, 400),
        ("POST", "/select", {"token_ids": [1], "loads": {"a": -3}}, None, 400),
        ("POST", "/select", {"token_ids": [1], "loads": {"a": {"busy": 1}}}, None, 400),
        ("POST", "/select", {"token_ids": [1], "loads": {"": 1}}, None, 400),
        ("POST", "/select", {"token_ids": [1], "lora_name": 5}, None, 400),
        ("GET", "/select", None, None, 405),
        ("POST", "/dump", {}, None, 405),
        ("DELETE", "/healthz", None, None, 405),
        ("GET", "/nope", None, None, 404),
        ("GET", "/" + "x" * 5000, None, None, 404),
    ]
    for method, path, body, raw, want in cases:
        status, answer = router.request(method, path, body, raw)
        assert status == want, (method, path, body, raw and raw[:20], answer)
        assert isinstance(answer, dict) and answer["error"]
    # a huge body is refused from its header, unread
    assert b" 413 " in router.raw(b"POST /select HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 999999999999\r\n\r\n")
    assert b" 411 " in router.raw(b"POST /select HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b" 411 " in router.raw(b"POST /select HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert b" 400 " in router.raw(b"POST /select HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: -5\r\n\r\n")
    assert b" 400 " in router.raw(b"POST /select HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Length: 100\r\n\r\n{\"token")  # cut short
    assert b"400" in router.raw(b"garbage\r\n\r\n")  # http.server's own answer
    router.raw(b"")  # connect and leave
    assert router.request("GET", "/healthz")[0] == 200
    status, sel = router.request("POST", "/select", {"token_ids": TOKENS})
    assert status == 200 and sel["worker"] in ("a", "b")
    status, text = router.request("GET", "/metrics")
    assert 'kvbm_router_http_errors_total{code="400"}' in text
    assert router.proc.poll() is None


def test_object_groups_and_config_file(tmp_path: Any,
                                       pubs: tuple[ScriptedPublisher, ScriptedPublisher]
                                       ) -> None:
    a, b = pubs
    cfg = tmp_path / "router.toml"
    cfg.write_text(f"""
[router]
block_size = {BS}
[router.cost]
tie_break = "name"
[router.workers]
a = {{ endpoint = "{a.endpoint}", replay = "{a.replay_endpoint}", object_group = "bucket" }}
""")
    r = Router("--config", str(cfg), "--worker", f"b={b.endpoint},{b.replay_endpoint}",
               "--object-group", "b=bucket")
    try:
        a.wait_subscriber()
        a.batch(0, [BlockStored(SEQ, None, TOKENS, BS, Medium.OBJECT)])
        wait_until(lambda: held(r, "a").get("OBJECT") == 6, what="a's blocks")
        dump = r.request("GET", "/dump")[1]["workers"]
        assert dump["a"]["object_group"] == dump["b"]["object_group"] == "bucket"
        status, sel = r.request("POST", "/select", {"token_ids": TOKENS,
                                                    "loads": {"a": 50, "b": 0}})
        assert status == 200 and sel["worker"] == "b"
        assert sel["scores"]["b"]["matched"] == {"OBJECT": 6}
    finally:
        r.stop()


@pytest.mark.parametrize("args", [
    ["--worker", "nonsense"],
    ["--worker", "a=http://x:1"],
    ["--worker", "a=tcp://127.0.0.1:1", "--worker", "a=tcp://127.0.0.1:2"],
    ["--object-group", "ghost=g"],
    ["--port", "70000"],
    ["--block-size", "0"],
])
def test_bad_command_lines_exit_2(args: list[str]) -> None:
    p = subprocess.run([sys.executable, "-m", "kvbm", "router", *args], capture_output=True,
                       text=True, timeout=WAIT_S)
    assert p.returncode == 2 and "kvbm: error:" in p.stderr, p.stderr
