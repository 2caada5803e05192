"""Smoke tests of the bandwidth measurements (kvbm/lab/bandwidth.py, bench/offload_bandwidth.py):
tiny page counts, shapes and bookkeeping only, no timing assertions."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.lab import bandwidth as bw
from kvbm.layout import PRESETS

SMALL = PRESETS["small"]
FIELDS = {"path", "op", "page_bytes", "pages", "gbps", "ceiling_gbps", "ratio"}
BENCH = Path(__file__).resolve().parent.parent / "bench" / "offload_bandwidth.py"


def check_rows(rows: list[bw.Row], expect: list[tuple[str, str]], pages: int) -> None:
    assert [(r.path, r.op) for r in rows] == expect
    for r in rows:
        assert r.page_bytes == SMALL.bytes_per_block and r.pages == pages
        assert r.gbps > 0 and r.ceiling_gbps > 0
        assert math.isclose(r.ratio, r.gbps / r.ceiling_gbps)
        doc = r.to_json()
        assert set(doc) == FIELDS
        assert json.loads(json.dumps(doc)) == doc


def test_row_and_targets() -> None:
    r = bw.Row.timed(bw.G2_G3, "write", 2 << 20, 10, seconds=2.0, ceiling_seconds=1.0)
    assert r.nbytes == 20 << 20
    assert math.isclose(r.ratio, 0.5)
    assert bw.target_ratio(r, cuda=False) == 0.8
    small = bw.Row.of(bw.G3_G2, "read", 32 << 10, 4, 1.0, 4.0)
    assert bw.target_ratio(small, cuda=False) == 0.5
    mem = bw.Row.of(bw.G1_G2, "copy", 2 << 20, 4, 1.0, 1.0)
    assert bw.target_ratio(mem, cuda=False) is None
    assert bw.target_ratio(mem, cuda=True) == 0.8
    assert bw.target_ratio(bw.Row.of(bw.G2_G4, "put", 32 << 10, 4, 1.0, 1.0), cuda=False) is None
    table = bw.format_table([r, small, mem])
    assert "G2->G3" in table and "MISS" in table and "ok" not in table.split("\n")[-1]
    assert "32 KiB" in table and "2 MiB" in table


def test_progress_bar_counts_steps() -> None:
    out = io.StringIO()
    p = bw.Progress(3, stream=out)
    p.prefix = "x"
    for label in ("a", "b", "c"):
        p.begin(label)
    assert p.done == 2
    p.close()
    assert p.done == 3
    text = out.getvalue()
    assert "\r" in text and "100%" in text and text.endswith("\n")
    quiet = io.StringIO()
    q = bw.Progress(1, stream=quiet, enabled=False)
    q.begin("a")
    q.close()
    assert quiet.getvalue() == ""


def test_measure_memory() -> None:
    p = bw.Progress(bw.memory_steps(1), enabled=False)
    rows = bw.measure_memory(SMALL, 8, repeats=1, progress=p)
    check_rows(rows, [(bw.G1_G2, "copy"), (bw.G2_G1, "copy")], 8)
    p.close()
    assert p.done == bw.memory_steps(1)


def test_measure_disk(tmp_path: Path) -> None:
    p = bw.Progress(bw.disk_steps(1), enabled=False)
    rows = bw.measure_disk(SMALL, 16, tmp_path / "bw", repeats=1, request_pages=5,
                           batch_bytes=8 * SMALL.bytes_per_block, progress=p)
    check_rows(rows, [(bw.G2_G3, "write"), (bw.G3_G2, "read")], 16)
    p.close()
    assert p.done == bw.disk_steps(1)
    assert list((tmp_path / "bw").iterdir()) == []  # the store and raw file are removed


def test_measure_object(moto_endpoint: str, s3_bucket: str) -> None:
    import boto3

    p = bw.Progress(bw.object_steps(1), enabled=False)
    rows = bw.measure_object(SMALL, 8, moto_endpoint, s3_bucket, repeats=1, request_pages=3,
                             progress=p)
    check_rows(rows, [(bw.G2_G4, "put"), (bw.G4_G2, "get")], 8)
    p.close()
    assert p.done == bw.object_steps(1)
    left = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(
        Bucket=s3_bucket, Prefix="kvbm-bandwidth/")
    assert left.get("KeyCount", 0) == 0  # packs and the raw object are deleted


def test_quick_report(tmp_path: Path) -> None:
    results, text = bw.quick_report([("small", SMALL)], tmp_path, nbytes=8 * SMALL.bytes_per_block)
    (name, rows), = results
    assert name == "small" and [r.path for r in rows] == [bw.G1_G2, bw.G2_G1, bw.G2_G3, bw.G3_G2]
    assert "small:" in text and "G3->G2" in text


def test_bench_json_is_one_document(tmp_path: Path) -> None:
    pytest.importorskip("boto3")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--json", "--layout", "small", "--block-size", "8",
         "--memory-mib", "1", "--disk-mib", "1", "--object-mib", "1", "--repeat", "1",
         "--object-repeat", "1", "--dir", str(tmp_path / "bench")],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one JSON document, nothing else
    assert set(doc) == {"meta", "rows"}
    assert [(r["path"], r["op"]) for r in doc["rows"]] == [
        (bw.G1_G2, "copy"), (bw.G2_G1, "copy"), (bw.G2_G3, "write"), (bw.G3_G2, "read"),
        (bw.G2_G4, "put"), (bw.G4_G2, "get")]
    page = SMALL.bytes_per_block // 2  # --block-size 8 halves the 16-token page
    for r in doc["rows"]:
        assert set(r) == FIELDS
        assert r["page_bytes"] == page and r["pages"] == (1 << 20) // page
    assert doc["meta"]["layouts"]["small/bs8"]["block_size"] == 8
