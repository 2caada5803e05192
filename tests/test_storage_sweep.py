"""What an independent fault and bad-input sweep of the storage tiers still broke.

Each test here is a defect the sweep found (kills, damaged files, odd inputs) that the other
test modules did not reach; the object-tier ones live in tests/objstore_contract.py, so that
they run against both S3 and GCS. Opens of a damaged store that could take the process down
(lmdb) are not among them: every case here damages only what kvbm itself reads, so they run
in-process, and each one that could hang runs against a deadline in a child process.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvbm.config import HostTierConfig
from kvbm.errors import ConfigError, InvalidArgumentError, StorageError
from kvbm.storage.disk import DiskStore, DiskTierConfig
from kvbm.storage.disk.inspect import describe
from kvbm.storage.gcs import GCSTierConfig
from kvbm.storage.s3 import S3TierConfig
from kvbm.testing import TEST_LAYOUT, make_keys, page_payload

LAYOUT = TEST_LAYOUT
PAGE = LAYOUT.bytes_per_block
SLAB = 256 << 10  # 16 slots of 16 KiB pages: a few pages fill a slab


def cfg(root: Path, **kw: Any) -> DiskTierConfig:
    kw.setdefault("capacity_bytes", 4 << 20)
    kw.setdefault("slab_bytes", SLAB)
    return DiskTierConfig(root, **kw)


def make_store(root: Path, n: int) -> list[int]:
    """A closed store at ``root`` holding ``n`` pages; their keys."""

    async def body() -> list[int]:
        store = await DiskStore.open(LAYOUT, cfg(root))
        ks = make_keys(n)
        assert await store.put([(k, page_payload(k, PAGE)) for k in ks]) == [True] * n
        await store.close()
        return ks

    return asyncio.run(body())


async def served(store: DiskStore, ks: list[int]) -> list[bool]:
    """Which of ``ks`` the store serves; fails on a page served with wrong bytes."""
    bufs = [np.zeros(PAGE, np.uint8) for _ in ks]
    hits = await store.get(list(zip(ks, bufs, strict=True)))
    for k, hit, buf in zip(ks, hits, bufs, strict=True):
        assert not hit or np.array_equal(buf, page_payload(k, PAGE)), "wrong bytes served"
    return hits


# -- a slab that cannot be written -------------------------------------------------------------
def test_a_slab_that_cannot_be_written_is_retired_not_retried_forever(tmp_path: Path) -> None:
    # Slab 0 replaced by a directory (the same goes for a slab on a failing sector), and an
    # index rebuilt without its pages: its slots are free, and the lowest free slots are
    # what every put takes first. Before, every later put failed on them, for good.
    make_store(tmp_path, 3)
    slab = tmp_path / "slabs" / "000000.slab"
    slab.unlink()
    slab.mkdir()
    (slab / "keep").write_text("not ours")
    shutil.rmtree(tmp_path / "index")

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        try:
            fresh = make_keys(4, start=100)
            items = [(k, page_payload(k, PAGE)) for k in fresh]
            assert await store.put(items) == [True] * 4  # slab 0 failed, then elsewhere
            assert await served(store, fresh) == [True] * 4
            assert store.stats().extra["retired_slabs"] == 1
            assert store.stats().errors > 0
        finally:
            await store.close()

    asyncio.run(body())
    assert (slab / "keep").read_text() == "not ours"


_REBUILD_AS = textwrap.dedent("""
    import asyncio, json, sys
    import numpy as np
    from kvbm.storage.disk import DiskStore, DiskTierConfig
    from kvbm.testing import TEST_LAYOUT, make_keys, page_payload
    PAGE = TEST_LAYOUT.bytes_per_block

    async def main(root, keys):
        store = await DiskStore.open(TEST_LAYOUT, DiskTierConfig(root, 4 << 20,
                                                                 slab_bytes=256 << 10))
        bufs = [np.zeros(PAGE, np.uint8) for _ in keys]
        hits = await store.get(list(zip(keys, bufs)))
        assert all(np.array_equal(b, page_payload(k, PAGE))
                   for k, h, b in zip(keys, hits, bufs) if h)
        fresh = make_keys(3, start=500)
        stored = await store.put([(k, page_payload(k, PAGE)) for k in fresh])
        print(json.dumps({"served": sum(hits), "stored": sum(stored),
                          "rebuilds": store.stats().index_rebuilds}))
        await store.close()

    asyncio.run(main(sys.argv[1], json.loads(sys.argv[2])))
""")


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory another user can reach (pytest's tmp_path lies under a 0700 one)."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="kvbm-sweep-"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_slab_that_cannot_be_read_costs_its_pages_not_the_store(shared_dir: Path) -> None:
    # The index is rebuilt from the slab headers; one slab file cannot be read (its
    # permissions, say, after a restore). Before, the whole open failed.
    root = shared_dir / "store"
    ks = make_store(root, 40)  # slabs of 16 pages: 16 + 16 + 8
    shutil.rmtree(root / "index")
    (root / "slabs" / "000000.slab").chmod(0)
    argv = [sys.executable, "-c", _REBUILD_AS, str(root), json.dumps(ks)]
    if os.geteuid() == 0:  # root reads anything: open it as nobody
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("no setpriv to drop root's rights with")
        for p in [root, *root.rglob("*")]:
            os.chown(p, 65534, 65534)
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"served": 40 - 16, "stored": 3, "rebuilds": 1}


# -- the identity file ---------------------------------------------------------------------------
_OPEN_AND_DESCRIBE = textwrap.dedent("""
    import sys
    from kvbm.errors import KvbmError
    from kvbm.storage.disk import DiskStore, DiskTierConfig
    from kvbm.storage.disk.inspect import describe
    from kvbm.testing import TEST_LAYOUT
    root = sys.argv[1]
    for what, call in (("describe", lambda: describe(root)),
                       ("open", lambda: DiskStore(TEST_LAYOUT, DiskTierConfig(
                           root, 4 << 20, slab_bytes=256 << 10)).__class__)):
        try:
            call()
            print(what, "ok")
        except KvbmError as e:
            print(what, type(e).__name__, str(e).replace(chr(10), " "))
""")


def open_and_describe(root: Path) -> dict[str, str]:
    """``describe`` and open ``root`` in a child with a deadline: what each came to."""
    proc = subprocess.run([sys.executable, "-c", _OPEN_AND_DESCRIBE, str(root)],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert set(out) == {"describe", "open"}, proc.stdout
    return out


def test_identity_that_is_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    make_store(tmp_path, 2)
    meta = tmp_path / "kvbm-disk.json"
    meta.unlink()
    os.mkfifo(meta)
    try:
        out = open_and_describe(tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("reading an identity file that is a FIFO hangs")
    for what in ("describe", "open"):
        assert out[what].startswith("StorageError") and "not a regular file" in out[what]
    assert meta.is_fifo()


def assert_repaired_and_served(root: Path, ks: list[int]) -> None:
    """The store opens, says it repaired its identity file once, and serves every page."""

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(root))
        try:
            assert store.stats().extra["identity_repairs"] == 1
            assert await served(store, ks) == [True] * len(ks)
        finally:
            await store.close()

    asyncio.run(body())


def test_deeply_nested_identity_is_damage_not_a_recursion_error(tmp_path: Path) -> None:
    ks = make_store(tmp_path, 3)
    (tmp_path / "kvbm-disk.json").write_text("[" * 100_000)
    with pytest.raises(StorageError, match="damaged"):
        describe(tmp_path)
    assert_repaired_and_served(tmp_path, ks)


def test_huge_identity_file_is_damage_and_not_read_whole(tmp_path: Path) -> None:
    ks = make_store(tmp_path, 3)
    with open(tmp_path / "kvbm-disk.json", "ab") as f:
        f.truncate(1 << 40)  # sparse: a terabyte that reads as zeros
    with pytest.raises(StorageError, match="damaged"):
        describe(tmp_path)
    assert_repaired_and_served(tmp_path, ks)


def test_lost_identity_file_of_a_store_is_repaired(tmp_path: Path) -> None:
    # Nothing but kvbm's own names in the directory, and slabs of this layout: a store
    # whose identity file was deleted. Before, it was "neither empty nor a kvbm disk
    # store" for good.
    ks = make_store(tmp_path, 3)
    (tmp_path / "kvbm-disk.json").unlink()
    assert_repaired_and_served(tmp_path, ks)
    assert describe(tmp_path)["pages"] == 3


def test_a_leftover_probe_that_is_a_directory_is_left_alone(tmp_path: Path) -> None:
    ks = make_store(tmp_path, 2)
    probe = tmp_path / ".direct-probe-123-456"
    probe.mkdir()
    (probe / "keep").write_text("x")

    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        try:
            assert await served(store, ks) == [True] * 2
        finally:
            await store.close()

    asyncio.run(body())
    assert (probe / "keep").read_text() == "x"


@pytest.mark.parametrize("name", ["slabs", "LOCK"])
def test_an_own_name_of_the_wrong_kind_is_named_in_the_error(tmp_path: Path, name: str) -> None:
    make_store(tmp_path, 2)
    path = tmp_path / name
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    if name == "slabs":
        path.write_text("a file where the slab directory belongs")
    else:
        path.mkdir()
    with pytest.raises(StorageError, match=rf"{name}\)"):
        DiskStore(LAYOUT, cfg(tmp_path))


# -- arguments ----------------------------------------------------------------------------------
def test_a_closed_buffer_is_an_invalid_argument(tmp_path: Path) -> None:
    async def body() -> None:
        store = await DiskStore.open(LAYOUT, cfg(tmp_path))
        try:
            (k,) = make_keys(1)
            closed = mmap.mmap(-1, PAGE)
            closed.close()
            with pytest.raises(InvalidArgumentError):
                await store.put([(k, closed)])
            with pytest.raises(InvalidArgumentError):
                await store.get([(k, closed)])
            assert await store.keys() == []
        finally:
            await store.close()

    asyncio.run(body())


# -- configuration that can never work fails at construction ---------------------------------
def test_a_disk_path_without_a_file_system_form_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"disk\.path"):
        DiskTierConfig(str(tmp_path / "x\ud800"), capacity_bytes=1 << 20)
    with pytest.raises(ConfigError, match=r"disk\.path"):
        DiskTierConfig(tmp_path / "x\ud800", capacity_bytes=1 << 20)


@pytest.mark.parametrize("none", ["none", "", " None "])
def test_disk_admission_none_is_none_as_for_the_host_tier(tmp_path: Path, none: str) -> None:
    assert DiskTierConfig(tmp_path, capacity_bytes=1 << 20, admission=none).admission is None
    assert HostTierConfig(num_blocks=4, admission=none).admission is None


def test_disk_durability_typo_names_the_key_and_the_closest_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"disk\.durability.*did you mean 'power_loss'"):
        DiskTierConfig(tmp_path, capacity_bytes=1 << 20, durability="power_los")


@pytest.mark.parametrize("key, value", [
    ("endpoint_url", "\ud800"), ("endpoint_url", "not a url"), ("endpoint_url", "ftp://h"),
    ("endpoint_url", "http://"), ("endpoint_url", "http://h\0"),
    ("bucket", ""), ("bucket", "kv/bm"), ("bucket", "kvbm_"), ("bucket", "b" * 256),
    ("bucket", "kv\0bm"), ("bucket", "kv\ud800"), ("bucket", "-kvbm"), ("bucket", "kv bm"),
    ("prefix", "p\0"), ("prefix", "p\ud800"), ("index_path", "/tmp/i\0"),
    ("index_path", "/tmp/i\ud800"), ("region", "eu\0"), ("region", "eu\ud800"),
    ("region", ""), ("profile", "p\ud800"), ("profile", "p\0"),
])
def test_s3_config_strings_are_checked_at_construction(key: str, value: str) -> None:
    kw: dict[str, Any] = {"bucket": "kvbm", key: value}
    with pytest.raises(ConfigError, match=rf"s3\.{key}"):
        S3TierConfig(**kw)


@pytest.mark.parametrize("key, value", [
    ("endpoint", "\ud800"), ("endpoint", "not a url"), ("bucket", ""), ("bucket", "Kvbm"),
    ("bucket", "b" * 223), ("bucket", "kv\0bm"), ("bucket", "kv\ud800"), ("bucket", "kv bm"),
    ("prefix", "p\0"), ("index_path", "/tmp/i\ud800"), ("project", "p\0"),
    ("project", "p\ud800"), ("credentials_file", "/k\0"), ("credentials_file", "/k\ud800"),
])
def test_gcs_config_strings_are_checked_at_construction(key: str, value: str) -> None:
    kw: dict[str, Any] = {"bucket": "kvbm", key: value}
    with pytest.raises(ConfigError, match=rf"gcs\.{key}"):
        GCSTierConfig(**kw)


def test_good_object_tier_configs_still_pass() -> None:
    S3TierConfig(bucket="b", endpoint_url="http://127.0.0.1:9000", region="eu-west-1",
                 profile="dev", prefix="kv/", index_path="/tmp/i")
    S3TierConfig(bucket="my.bucket-1", endpoint_url="https://s3.example.com/")
    S3TierConfig(bucket="arn:aws:s3:us-west-2:123456789012:accesspoint/kv")
    S3TierConfig(bucket="Legacy_Bucket")  # an older us-east-1 name: S3 still serves it
    GCSTierConfig(bucket="my_bucket.kv-1", endpoint="http://127.0.0.1:9023", project="p")


def test_s3_addressing_style_typo_names_the_key_and_the_closest_value() -> None:
    with pytest.raises(ConfigError, match=r"s3\.addressing_style.*did you mean 'path'"):
        S3TierConfig(bucket="kvbm", addressing_style="pth")


# -- describe() without lmdb -------------------------------------------------------------------
_DESCRIBE = """
import json, sys
# The index probe runs `sys.executable -I -c CODE ...`, which -I keeps from the blocker on
# PYTHONPATH: point it at an interpreter that lacks lmdb too.
sys.executable = sys.argv[2]
from kvbm.storage.disk.inspect import describe
print(json.dumps(describe(sys.argv[1])))
"""

#: An "interpreter" without lmdb for the probe child: runs ``-I -c CODE ARGS`` with the blocker.
_NO_LMDB_PYTHON = """#!{python}
import sys
{blocker}
code, sys.argv = sys.argv[3], ["-c", *sys.argv[4:]]
exec(compile(code, "<probe>", "exec"), {{"__name__": "__main__"}})
"""

_BLOCK_LMDB = '''
import sys

class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "lmdb":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _Blocked())
'''


def test_describe_without_lmdb_says_the_index_was_not_checked(tmp_path: Path) -> None:
    root = tmp_path / "store"
    make_store(root, 3)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_BLOCK_LMDB)
    python = site / "python-without-lmdb"
    python.write_text(_NO_LMDB_PYTHON.format(python=sys.executable, blocker=_BLOCK_LMDB))
    python.chmod(0o755)
    src = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(src)])
    proc = subprocess.run([sys.executable, "-c", _DESCRIBE, str(root), str(python)], env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["index"] == "unchecked"
    assert "lmdb" in (out["index_problem"] or "")
    assert out["pages"] == 3 and out["pages_from"] == "slab_headers"
