"""``kvbm stats``: a running manager's metrics endpoint as a table or JSON, a disk tier
directory described without writing to it, and clear errors (exit 2, no traceback)."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, Medium
from kvbm.cli import main
from kvbm.config import ManagerConfig
from kvbm.storage.disk import DiskTierConfig

pytest.importorskip("prometheus_client")

from engine_flow import LAYOUT, run, toks

from kvbm.cli.stats import parse, quantile, summarize, table
from kvbm.metrics import start_metrics_server


def config(tmp_path: Path) -> ManagerConfig:
    disk = DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20)
    return ManagerConfig(device=DeviceTierConfig(4, device="cpu"), host=HostTierConfig(8),
                         disk=disk)


@pytest.fixture
def served(tmp_path) -> Iterator[tuple[BlockManager, str]]:
    with BlockManager(LAYOUT, config(tmp_path)) as mgr, start_metrics_server(mgr, 0) as srv:
        yield mgr, srv.url


def settle(mgr: BlockManager) -> None:
    """Wait (public API only) until no page is in flight to the disk tier."""
    deadline = time.monotonic() + 30
    while mgr.stats().lower_tiers[Medium.DISK][1].inflight_pages:
        assert time.monotonic() < deadline, "offloads did not finish"
        time.sleep(0.01)


def stats(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["stats", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- --url ----------------------------------------------------------------------------------------
def test_url_json_follows_the_manager(served, capsys):
    mgr, url = served
    rc, out, _ = stats(capsys, "--url", url, "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["lookups"] == 0 and list(doc["tiers"]) == ["GPU", "CPU_PINNED", "DISK"]
    run(mgr, toks(3))
    run(mgr, toks(3))
    rc, out, _ = stats(capsys, "--url", url, "--json")
    doc = json.loads(out)
    st = mgr.stats()
    assert doc["lookups"] == st.lookups == 2
    assert doc["query_blocks"] == st.query_blocks and doc["hit_blocks"] == st.hit_blocks == 3
    gpu = doc["tiers"]["GPU"]
    assert gpu["hit_blocks"] == st.hits_by_medium[Medium.GPU]
    assert gpu["used_pages"] == st.tiers[Medium.GPU].used_blocks
    host = doc["tiers"]["CPU_PINNED"]
    assert host["pages_moved"] == st.offloaded_blocks == 3
    assert host["bytes_moved"] == 3 * LAYOUT.bytes_per_block
    disk = doc["tiers"]["DISK"]
    assert disk["breaker"] is None  # a disk tier has none
    assert disk["inflight_pages"] is not None


def test_url_json_counts_are_integers(served, capsys):
    # Prometheus carries every value as a float; a count printed as 3.0 reads as a ratio.
    mgr, url = served
    run(mgr, toks(3))
    rc, out, _ = stats(capsys, "--url", url, "--json")
    assert rc == 0
    doc = json.loads(out)
    counts = [doc["lookups"], doc["query_blocks"], doc["hit_blocks"], *doc["totals"].values()]
    for row in doc["tiers"].values():
        counts += [row[k] for k in ("hit_blocks", "used_pages", "pages_moved", "bytes_moved",
                                    "inflight_pages") if row[k] is not None]
    assert counts and all(type(v) is int for v in counts), counts
    assert isinstance(doc["hit_ratio"], float)


def test_url_table_names_the_hardware(served, capsys):
    mgr, url = served
    run(mgr, toks(2))
    rc, out, err = stats(capsys, "--url", url)
    assert rc == 0 and not err
    lines = out.splitlines()
    assert "1 lookups" in lines[0]
    assert lines[1].split()[0] == "tier"
    rows = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert "GPU (CPU tensor)" in rows  # G1 is a CPU tensor here
    host = mgr.host_pool
    assert host is not None
    assert ("CPU_PINNED" if host.pinned else "CPU_PINNED (not pinned)") in rows
    assert "DISK" in rows


def test_url_table_columns_stand_apart(served, capsys):
    # Two spaces at least between headers: "hit blocks used pages pages moved" read as one.
    _, url = served
    rc, out, _ = stats(capsys, "--url", url)
    assert rc == 0
    header = re.split(r"\s{2,}", out.splitlines()[1].strip())
    assert header == ["tier", "hit blocks", "used pages", "pages moved", "bytes moved",
                      "in flight", "breaker", "load p50/p99 ms", "store p50/p99 ms"], header


def test_url_latency_quantiles_after_a_disk_round_trip(served, capsys):
    mgr, url = served
    run(mgr, toks(3))
    for i in range(1, 6):  # push the first request down to disk
        run(mgr, toks(3, 1000 * i))
        settle(mgr)
    m = mgr.match_prefix(toks(3))
    assert m.by_medium.get(Medium.DISK) == 3
    mgr.release(mgr.onboard(m))
    rc, out, _ = stats(capsys, "--url", url, "--json")
    assert rc == 0
    disk = json.loads(out)["tiers"]["DISK"]
    for key in ("load_p50_s", "load_p99_s", "store_p50_s", "store_p99_s"):
        assert disk[key] is not None and disk[key] >= 0
    assert disk["load_p50_s"] <= disk["load_p99_s"]


def test_quantile_estimates():
    inf = float("inf")
    b = [(0.1, 0.0), (1.0, 10.0), (10.0, 10.0), (inf, 10.0)]
    assert quantile(b, 0.5) == pytest.approx(0.55)  # halfway through (0.1, 1.0]
    assert quantile(b, 0.99) == pytest.approx(0.1 + 0.9 * 0.99)
    assert quantile([(1.0, 0.0), (inf, 0.0)], 0.5) is None
    assert quantile([(1.0, 0.0), (inf, 4.0)], 0.5) == 1.0  # in +Inf: the highest bound
    assert quantile([(0.5, 2.0), (inf, 2.0)], 0.5) == pytest.approx(0.25)


def test_summary_of_an_object_tier_in_trouble():
    """Breaker and degraded state as a process with an object tier exposes them."""
    text = "\n".join([
        'kvbm_lookups_total 4', 'kvbm_query_blocks_total 8',
        'kvbm_hit_blocks_total{medium="GPU"} 2', 'kvbm_hit_blocks_total{medium="OBJECT"} 1',
        'kvbm_breaker_state{medium="OBJECT"} 2', 'kvbm_tier_degraded{medium="OBJECT"} 0',
        'kvbm_tier_info{medium="GPU",device="cuda:0",display="GPU"} 1',
        'kvbm_tier_info{medium="OBJECT",display="OBJECT"} 1', ""])
    doc = summarize(parse(text))
    assert doc["hit_blocks"] == 3 and doc["hit_ratio"] == 3 / 8
    assert list(doc["tiers"]) == ["GPU", "OBJECT"]
    assert doc["tiers"]["OBJECT"]["breaker"] == "open"
    rows = table(doc, "x").splitlines()[2:]
    assert rows[1].split()[0] == "OBJECT" and " open " in rows[1]
    degraded = summarize(parse(text.replace('degraded{medium="OBJECT"} 0',
                                            'degraded{medium="OBJECT"} 1')))
    assert degraded["tiers"]["OBJECT"]["degraded"] is True
    assert " degraded " in table(degraded, "x").splitlines()[-1]


def test_the_installed_command(served):
    _, url = served
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    p = subprocess.run([sys.executable, "-m", "kvbm", "stats", "--url", url], env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "GPU (CPU tensor)" in p.stdout


# -- errors ---------------------------------------------------------------------------------
def test_unreachable_url_is_a_clear_error(capsys):
    rc, out, err = stats(capsys, "--url", f"http://127.0.0.1:{free_port()}/metrics",
                         "--timeout", "5")
    assert rc == 2 and not out
    assert err.startswith("kvbm: error: cannot reach http://127.0.0.1:")
    assert "Traceback" not in err


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://127.0.0.1/metrics",
                                 "127.0.0.1:9400/metrics", "http://"])
def test_non_http_urls_are_refused(capsys, url):
    rc, out, err = stats(capsys, "--url", url)
    assert rc == 2 and not out and "http:// or https://" in err


@pytest.mark.parametrize("argv", [[], ["some/dir", "--url", "http://127.0.0.1:1/metrics"],
                                  ["--url", "http://127.0.0.1:1/", "--timeout", "nan"],
                                  ["--url", "http://127.0.0.1:1/", "--timeout", "0"]])
def test_bad_arguments(capsys, argv):
    rc, _, err = stats(capsys, *argv)
    assert rc == 2 and err.startswith("kvbm: error:")


class _Garbage(http.server.BaseHTTPRequestHandler):
    body = b"<html>not metrics</html>"
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("status", "body", "message"), [
    (200, b"<html>not metrics</html>", "did not answer Prometheus text"),
    (200, b"other_metric 1\n", "has no kvbm metrics"),
    (404, b"", "answered HTTP 404"),
])
def test_an_endpoint_that_is_not_kvbm(capsys, status, body, message):
    handler = type("H", (_Garbage,), {"status": status, "body": body})
    httpd = http.server.HTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        rc, out, err = stats(capsys, "--url", f"http://127.0.0.1:{httpd.server_port}/m")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert rc == 2 and not out
    assert message in err and "Traceback" not in err


# -- PATH ---------------------------------------------------------------------------------------
def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root``: (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def filled_disk_tier(tmp_path: Path) -> tuple[Path, int]:
    """A disk tier written through the public API; returns its path and pages stored."""
    cfg = config(tmp_path)
    with BlockManager(LAYOUT, cfg) as mgr:
        for i in range(6):
            run(mgr, toks(3, 1000 * i))
            settle(mgr)
        st = mgr.stats().lower_tiers[Medium.DISK][0]
        stored = st.puts - st.evicted - st.deleted
    assert cfg.disk is not None
    return Path(cfg.disk.path), stored


def test_path_json_describes_the_store_without_writing(tmp_path, capsys):
    path, stored = filled_disk_tier(tmp_path)
    assert stored > 0
    before = tree(path)
    rc, out, err = stats(capsys, str(path), "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["path"] == str(path.absolute())
    assert d["pages"] == stored
    assert d["bytes"] == stored * LAYOUT.bytes_per_block
    assert int(d["layout_fingerprint"], 16) == LAYOUT.fingerprint
    assert isinstance(d["format_version"], int) and d["slabs"] >= 1
    assert tree(path) == before  # nothing created, written or touched


def test_path_table(tmp_path, capsys):
    path, stored = filled_disk_tier(tmp_path)
    rc, out, _ = stats(capsys, str(path))
    assert rc == 0
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["pages"] == str(stored)
    assert "format version" in rows and "layout fingerprint" in rows and "slab files" in rows


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_path_that_is_not_a_store(tmp_path, capsys, make):
    target = tmp_path / "x"
    if make == "empty":
        target.mkdir()
    elif make == "file":
        target.write_bytes(b"not a store")
    rc, out, err = stats(capsys, str(target))
    assert rc == 2 and not out
    assert err.startswith("kvbm: error:") and "not a kvbm disk store" in err
    assert "Traceback" not in err
