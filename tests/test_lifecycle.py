"""The manager's lifecycle: flush(), close(), calls after close, and what is durable when a
process exits (with or without close(), or killed right after flush())."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from kvbm import BlockManager, BlockStored, DeviceTierConfig, FlushResult, HostTierConfig, Medium
from kvbm.config import ManagerConfig, OffloadConfig
from kvbm.errors import ClosedError, ConfigError, InvalidArgumentError, KvbmError, TransferError
from kvbm.layout import KVLayout
from kvbm.storage.disk import DiskStore, DiskTierConfig

BS = 4
LAYOUT = KVLayout(2, 2, 4, BS, "float32")
REPO = Path(__file__).resolve().parents[1]


def toks(n_blocks: int, base: int = 0) -> np.ndarray:
    return np.arange(base, base + n_blocks * BS, dtype=np.uint32)


def value(seq_hash: int) -> float:
    return float(seq_hash % 999_983)


def compute(mgr: BlockManager, tokens: np.ndarray, *, release: bool = True) -> list[int]:
    """One request: onboard the cached prefix, compute the rest (KV derived from each block's
    hash), commit. Returns the ids (released unless ``release`` is false)."""
    m = mgr.match_prefix(tokens)
    ids = mgr.onboard(m)
    new = mgr.allocate(len(m.hashes) - len(ids))
    for i, b in enumerate(new):
        mgr.block_view(b).fill_(value(m.hashes.sequence[len(ids) + i]))
    ids += mgr.commit(new, tokens, start_block=len(ids), hashes=m.hashes)
    if release:
        mgr.release(ids)
    return ids


def config(tmp_path: Path, *, g1: int = 32, g2: int = 8, eager: bool = True,
           **offload: object) -> ManagerConfig:
    return ManagerConfig(
        device=DeviceTierConfig(g1, device="cpu"),
        host=HostTierConfig(g2, eager_offload=eager),
        disk=DiskTierConfig(tmp_path / "g3", capacity_bytes=1 << 22, slab_bytes=1 << 20),
        offload=OffloadConfig(**offload))  # type: ignore[arg-type]


def served_from_disk(cfg: ManagerConfig, tokens: np.ndarray) -> int:
    """Blocks of ``tokens`` a fresh manager on the same disk directory matches on disk and
    serves from there, each checked against the KV it was computed with."""
    assert cfg.disk is not None
    fresh = ManagerConfig(device=DeviceTierConfig(64, device="cpu"), host=HostTierConfig(64),
                          disk=cfg.disk)
    with BlockManager(LAYOUT, fresh) as mgr:
        m = mgr.match_prefix(tokens)
        ids = mgr.onboard(m)
        for b, h in zip(ids, m.sequence_hashes, strict=False):
            assert bool((mgr.block_view(b) == value(h)).all()), "served a wrong page"
        mgr.release(ids)
        mgr.check_invariants()
        return sum(1 for md in m.mediums[: len(ids)] if md is Medium.DISK)


# -- write-back mode: close() and flush() write the blocks that live only in G1 ----------------
@pytest.mark.parametrize("explicit_offload", [False, True])
def test_close_in_write_back_mode_writes_g1_blocks_to_disk(tmp_path, explicit_offload):
    """The issue's conversation: 24 blocks committed with eager_offload off live only in G1
    (which is larger than G2); close() must write them down so a restart matches 24 of 24."""
    cfg = config(tmp_path, eager=False)
    conv = toks(24)
    mgr = BlockManager(LAYOUT, cfg)
    compute(mgr, conv)
    if explicit_offload:
        mgr.offload()
    assert mgr.stats().unlinked_pages == 0
    mgr.close()
    assert served_from_disk(cfg, conv) == 24


def test_flush_writes_everything_committed_parents_first(tmp_path):
    cfg = config(tmp_path, eager=False, max_inflight_pages=2)  # G2 of 8, two pages in flight
    with BlockManager(LAYOUT, cfg) as mgr:
        ids = compute(mgr, toks(24), release=False)  # still held by the engine: flushed too
        mgr.take_events()
        result = mgr.flush()
        assert isinstance(result, FlushResult)
        assert result.complete and result.to_host == 24 and result.failed == 0
        assert result.stored == {Medium.DISK: 24} and result.volatile == 0
        hashes = mgr.match_prefix(toks(24)).sequence_hashes
        for h in hashes:
            rec = mgr.lookup(h)
            assert rec is not None and rec.mask & Medium.DISK.bit
        stored = [h for e in mgr.take_events()
                  if isinstance(e, BlockStored) and e.medium is Medium.DISK
                  for h in e.block_hashes]
        assert sorted(stored) == sorted(hashes)
        assert stored.index(hashes[0]) < stored.index(hashes[-1])  # parents first
        again = mgr.flush()  # nothing left to write
        assert again.to_host == 0 and again.stored == {Medium.DISK: 0} and again.complete
        mgr.release(ids)
        mgr.check_invariants()


def test_flush_writes_offloads_deferred_by_backpressure(tmp_path):
    """Eager mode: offloads over the in-flight bound wait for room (none is refused);
    flush() writes them all."""
    cfg = config(tmp_path, g1=8, g2=32, max_inflight_pages=2)
    with BlockManager(LAYOUT, cfg) as mgr:
        compute(mgr, toks(8))
        result = mgr.flush()
        assert result.complete and result.volatile == 0
        assert mgr.stats().lower_tiers[Medium.DISK][1].skipped == 0
    assert served_from_disk(cfg, toks(8)) == 8


def test_flush_without_lower_tiers_is_a_no_op():
    cfg = ManagerConfig(device=DeviceTierConfig(8, device="cpu"),
                        host=HostTierConfig(4, eager_offload=False))
    with BlockManager(LAYOUT, cfg) as mgr:
        compute(mgr, toks(4))
        result = mgr.flush()
        assert result == FlushResult(to_host=0, stored={}, volatile=4, failed=0, complete=True)
        assert mgr.stats().tiers[Medium.CPU_PINNED].used_blocks == 0  # G2 untouched


class GatedStore(DiskStore):
    """A real disk store whose puts wait for a gate: 'the tier is slow', deterministically."""

    gate: threading.Event

    async def put(self, items, *, parents=None):  # type: ignore[override]
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait)
        return await super().put(items, parents=parents)


def gate(mgr: BlockManager) -> threading.Event:
    store = mgr._lower[0].store
    store.__class__ = GatedStore
    store.gate = threading.Event()  # type: ignore[attr-defined]
    return store.gate  # type: ignore[attr-defined]


def test_flush_that_runs_out_of_time_raises_and_changes_nothing_it_should_not(tmp_path):
    cfg = config(tmp_path, g1=8, g2=16)
    mgr = BlockManager(LAYOUT, cfg)
    opened = gate(mgr)
    try:
        compute(mgr, toks(4))
        with pytest.raises(TransferError, match="flush"):
            mgr.flush(timeout=0.2)
        mgr.check_invariants()
    finally:
        opened.set()
    result = mgr.flush()
    assert result.complete and result.volatile == 0
    mgr.close()
    assert served_from_disk(cfg, toks(4)) == 4


def test_close_with_a_stuck_tier_is_bounded_and_still_closes(tmp_path, caplog):
    cfg = config(tmp_path, g1=8, g2=16, close_timeout_s=0.3)
    mgr = BlockManager(LAYOUT, cfg)
    opened = gate(mgr)
    compute(mgr, toks(4))
    threading.Timer(1.0, opened.set).start()  # the put finishes after close gave up waiting
    mgr.close()
    assert mgr.closed
    assert any("flush" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    opened.set()


# -- after close ------------------------------------------------------------------------------
def _public_calls(mgr: BlockManager, m, held):
    return {
        "match_prefix": lambda: mgr.match_prefix(toks(2)),
        "match_hashes": lambda: mgr.match_hashes(m.hashes),
        "onboard": lambda: mgr.onboard(m),
        "onboard_async": lambda: mgr.onboard_async(m),
        "allocate": lambda: mgr.allocate(1),
        "commit": lambda: mgr.commit(held, toks(2, 500)),
        "release": lambda: mgr.release(held),
        "offload": lambda: mgr.offload(),
        "clear": lambda: mgr.clear(),
        "block_view": lambda: mgr.block_view(0),
        "kv_caches": lambda: mgr.kv_caches,
        "device_pool": lambda: mgr.device_pool,
        "host_pool": lambda: mgr.host_pool,
        "lookup": lambda: mgr.lookup(m.sequence_hashes[0]),
        "poll": lambda: mgr.poll(),
        "flush": lambda: mgr.flush(),
        "enter": lambda: mgr.__enter__(),
    }


@pytest.mark.parametrize("tiers", ["standalone", "host", "disk"])
def test_every_call_after_close_raises_closed_error(tmp_path, tiers):
    if tiers == "disk":
        cfg = config(tmp_path, g1=8, g2=8)
    else:
        cfg = ManagerConfig(device=DeviceTierConfig(8, device="cpu"),
                            host=HostTierConfig(8) if tiers == "host" else None)
    mgr = BlockManager(LAYOUT, cfg)
    compute(mgr, toks(2))
    m = mgr.match_prefix(toks(2))
    held = mgr.allocate(2)
    before = mgr.stats()
    assert not mgr.closed
    mgr.close()
    assert mgr.closed
    mgr.close()  # idempotent
    for name, call in _public_calls(mgr, m, held).items():
        if name == "offload" and tiers == "standalone":
            continue  # no host tier: a ConfigError whatever the state
        with pytest.raises(ClosedError, match="closed") as e:
            call()
        assert isinstance(e.value, KvbmError), name
    after = mgr.stats()  # still readable, with the counters it had
    assert after.committed_blocks == before.committed_blocks == 2
    assert after.indexed_blocks == before.indexed_blocks == 2
    assert after.tiers[Medium.GPU] == before.tiers[Medium.GPU]  # (G2's stores finished)
    if tiers == "disk":
        store, queue = after.lower_tiers[Medium.DISK]
        assert store.puts >= 2 and queue.submitted >= 1
    assert isinstance(mgr.take_events(), list)  # events of the close itself can be drained


def test_onboard_after_close_pins_nothing(tmp_path):
    cfg = config(tmp_path, g1=4, g2=8)
    mgr = BlockManager(LAYOUT, cfg)
    compute(mgr, toks(3))
    m = mgr.match_prefix(toks(3))
    mgr.close()
    with pytest.raises(ClosedError):
        mgr.onboard(m)
    usage = mgr.stats().tiers
    assert usage[Medium.GPU].pinned_blocks == 0 and usage[Medium.CPU_PINNED].pinned_blocks == 0


def test_pending_onboard_ends_at_close(tmp_path):
    cfg = config(tmp_path, g1=4, g2=8)
    with BlockManager(LAYOUT, cfg) as mgr:
        compute(mgr, toks(3))
    mgr = BlockManager(LAYOUT, cfg)  # the pages are on disk only
    handle = mgr.onboard_async(mgr.match_prefix(toks(3)))
    mgr.close()
    assert handle.done()
    ids = handle.wait()  # finished by close: returns at once
    assert isinstance(ids, list)
    assert mgr.stats().tiers[Medium.CPU_PINNED].pinned_blocks == 0


def test_close_and_flush_validate_their_arguments(tmp_path):
    with BlockManager(LAYOUT, config(tmp_path)) as mgr:
        for bad in (math.nan, math.inf, -1.0, "1", True, [1], 10**400):
            with pytest.raises(InvalidArgumentError):
                mgr.flush(timeout=bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidArgumentError):
                mgr.close(timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError):
            mgr.close(flush="yes")  # type: ignore[arg-type]
        assert not mgr.closed


@pytest.mark.parametrize("field,bad", [
    ("close_timeout_s", math.nan), ("close_timeout_s", math.inf), ("close_timeout_s", 0.0),
    ("close_timeout_s", -1.0), ("close_timeout_s", "5"), ("exit_flush_timeout_s", math.nan),
    ("exit_flush_timeout_s", -1.0), ("exit_flush_timeout_s", math.inf),
    ("exit_flush_timeout_s", True)])
def test_offload_timeouts_are_validated(field, bad):
    with pytest.raises(ConfigError, match=field):
        OffloadConfig(**{field: bad})


# -- process exit -----------------------------------------------------------------------------
CHILD = """
import sys
import numpy as np
from kvbm import BlockManager, DeviceTierConfig, HostTierConfig, KVLayout, ManagerConfig
from kvbm.config import OffloadConfig
from kvbm.storage.disk import DiskTierConfig

BS = {bs}
layout = KVLayout(2, 2, 4, BS, "float32")
cfg = ManagerConfig(device=DeviceTierConfig({g1}, device="cpu"),
                    host=HostTierConfig({g2}, eager_offload={eager}),
                    disk=DiskTierConfig(sys.argv[1], capacity_bytes=1 << 22, slab_bytes=1 << 20),
                    offload=OffloadConfig(max_inflight_pages=4))
mgr = BlockManager(layout, cfg)
tokens = np.arange(0, {n} * BS, dtype=np.uint32)
m = mgr.match_prefix(tokens)
for k in range(0, {n}, 4):  # a conversation, 4 blocks a turn: stores are in flight at the end
    new = mgr.allocate(4)
    for b, h in zip(new, m.hashes.sequence[k:k + 4]):
        mgr.block_view(b).fill_(float(h % 999_983))
    mgr.release(mgr.commit(new, tokens, start_block=k, hashes=m.hashes))
{tail}
"""


def run_child(tmp_path: Path, *, n: int, eager: bool, tail: str, g1: int = 64,
              g2: int = 64) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(CHILD).format(bs=BS, g1=g1, g2=g2, eager=eager, n=n, tail=tail)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVBM_")}
    return subprocess.run([sys.executable, "-c", code, str(tmp_path / "g3")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def child_cfg(tmp_path: Path) -> ManagerConfig:
    return config(tmp_path)


@pytest.mark.parametrize("eager", [True, False])
def test_exit_without_close_flushes_at_exit(tmp_path, eager):
    """A script that exits without close(): the exit flush writes every committed block
    down before the interpreter shuts the tiers' thread pools down (which made in-flight
    stores fail with 'cannot schedule new futures after interpreter shutdown')."""
    proc = run_child(tmp_path, n=40, eager=eager, tail="")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "cannot schedule" not in proc.stderr, proc.stderr
    assert "not closed" in proc.stderr  # the exit flush says that it had to step in
    assert served_from_disk(child_cfg(tmp_path), toks(40)) == 40


def test_exit_after_close_is_quiet(tmp_path):
    proc = run_child(tmp_path, n=8, eager=False, tail="mgr.close()")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert served_from_disk(child_cfg(tmp_path), toks(8)) == 8


def test_blocks_are_durable_once_flush_returned_even_under_kill_9(tmp_path):
    tail = ("r = mgr.flush(); assert r.complete, r\n"
            "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    proc = run_child(tmp_path, n=24, eager=False, tail=tail)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert served_from_disk(child_cfg(tmp_path), toks(24)) == 24


def test_exit_flush_can_be_disabled(tmp_path):
    """exit_flush_timeout_s = 0: nothing is written at exit (write-back blocks stay in G1)."""
    code = textwrap.dedent(CHILD).format(bs=BS, g1=64, g2=64, eager=False, n=8, tail="")
    code = code.replace("OffloadConfig(max_inflight_pages=4)",
                        "OffloadConfig(exit_flush_timeout_s=0)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "g3")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "not closed" not in proc.stderr
    assert served_from_disk(child_cfg(tmp_path), toks(8)) == 0


def test_exit_registration_is_weak_and_ends_at_close(tmp_path):
    import gc
    import weakref

    from kvbm.exitflush import exit_flush

    plain = BlockManager(LAYOUT, ManagerConfig(device=DeviceTierConfig(4, device="cpu")))
    assert plain not in exit_flush.managers()  # nothing durable to flush
    mgr = BlockManager(LAYOUT, config(tmp_path))
    assert mgr in exit_flush.managers()
    mgr.close()
    assert mgr not in exit_flush.managers()
    ref = weakref.ref(mgr)
    del mgr
    # The registry must not keep a closed manager alive. Threads that close() stopped may
    # still be unwinding their last frames on a loaded machine: give them a moment.
    for _ in range(200):
        gc.collect()
        if ref() is None:
            break
        time.sleep(0.05)
    alive = ref()
    assert alive is None, [type(r).__name__ for r in gc.get_referrers(alive)]
    plain.close()


def test_exit_flush_leaves_a_manager_alone_while_its_thread_runs(tmp_path):
    """The manager belongs to a thread that is still running when the main thread ends:
    flushing it from the main thread would break single ownership, so it is not touched."""
    code = textwrap.dedent(CHILD).format(bs=BS, g1=64, g2=64, eager=False, n=8, tail="")
    body = textwrap.indent(code.split("mgr = BlockManager(layout, cfg)\n", 1)[1], "    ")
    head = code.split("mgr = BlockManager(layout, cfg)\n", 1)[0]
    script = (head + "import threading, time\nready = threading.Event()\n"
              "def owner():\n    global mgr\n    mgr = BlockManager(layout, cfg)\n" + body
              + "    ready.set()\n    time.sleep(1.5)\n"
              "threading.Thread(target=owner).start()\nready.wait()\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "g3")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "still running" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
