"""Offload bandwidth of each tier path, next to its raw ceiling measured in the same run.

Every figure moves real pages through the path the block manager uses, and is printed next
to the best the same memories / filesystem / endpoint do with one plain large transfer of
the same bytes, measured in the same run (a shared machine drifts by tens of percent
between runs; a ratio taken within one run does not):

======================  =========================================  ============================
path                    figure                                     ceiling
======================  =========================================  ============================
G1->G2, G2->G1          ``kvbm.pool.copy_blocks`` DevicePool <->   one ``copy_`` of all the
                        HostPool, all pages in one call            bytes between the same two
                                                                   memories (pinned host <->
                                                                   cuda; plain CPU without one)
G2->G3 write            host pages -> OffloadEngine -> DiskStore   ``O_DIRECT`` sequential
                        ``put`` (durable: fdatasync + index        write of the same bytes to
                        commit), in requests of                    one file in the same
                        ``request_pages``                          directory + ``fdatasync``
G3->G2 read (cold)      DiskStore ``get`` through the engine into  ``O_DIRECT`` sequential
                        host pages, after dropping the page cache  read of that file
G2->G4 put, G4->G2 get  S3Store through the engine                 one boto3 ``put_object`` /
                                                                   ``get_object`` of the same
                                                                   size (``measure_raw_s3``)
======================  =========================================  ============================

Method: one warm-up round (page faults, CUDA context, slab preallocation, first-extent
allocation, connection set-up), then ``repeats`` rounds, each running the figure and its
ceiling back to back; each figure and each ceiling is the **best** of its rounds (the least
disturbed by other load). The disk tier is measured in its steady state: pages of a round
are deleted after it, so the next round overwrites the slots the warm-up allocated, as the
raw ceiling overwrites its file. Every round checks the data that came back (a wrong copy
is an error, never a figure).

``GB/s`` is 10**9 bytes of page payload per second (headers and padding not counted).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from kvbm.errors import KvbmError
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.offload import OffloadEngine, TransferHandle, TransferKind, TransferStatus
from kvbm.pool import DevicePool, HostPool, copy_blocks

if TYPE_CHECKING:
    import torch

    from kvbm.storage.base import PageStore

MiB = 1 << 20
ALIGN = 4096  # O_DIRECT alignment of memory, offsets and lengths

G1_G2, G2_G1 = "G1->G2", "G2->G1"
G2_G3, G3_G2 = "G2->G3", "G3->G2"
G2_G4, G4_G2 = "G2->G4", "G4->G2"
PATHS = (G1_G2, G2_G1, G2_G3, G3_G2, G2_G4, G4_G2)

#: Bytes moved per measurement by default: big enough to dwarf per-call overheads and the
#: disk's caches, small enough that a full run of two layouts takes a minute or two. The
#: object path gets less: a local moto server uploads at ~160 MiB/s.
DEFAULT_MEMORY_BYTES = 512 * MiB
DEFAULT_DISK_BYTES = 512 * MiB
DEFAULT_OBJECT_BYTES = 128 * MiB
#: Pages per submitted transfer: one request of 1,024 tokens at 16-token blocks, as the
#: manager submits a committed request's pages in one handle.
DEFAULT_REQUEST_PAGES = 64
#: The engine coalesces queued requests into tier calls of up to this many bytes
#: (``OffloadEngine(batch_bytes=...)``): one durable commit, or one set of concurrent pack
#: uploads, per call.
DEFAULT_DISK_BATCH_BYTES = 128 * MiB
DEFAULT_OBJECT_BATCH_BYTES = 256 * MiB
#: Chunk of the raw sequential disk ceiling (one pwrite / preadv each).
DEFAULT_RAW_CHUNK_BYTES = 64 * MiB


class BandwidthError(KvbmError, RuntimeError):
    """A measured transfer failed or brought back wrong data."""


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One measured path: the figure, its ceiling from the same run, and their ratio."""

    path: str  # "G1->G2", "G2->G1", "G2->G3", "G3->G2", "G2->G4", "G4->G2"
    op: str  # "copy", "write", "read", "put", "get"
    page_bytes: int
    pages: int
    gbps: float  # payload GB/s (10**9 bytes per second)
    ceiling_gbps: float
    ratio: float  # gbps / ceiling_gbps

    @classmethod
    def of(cls, path: str, op: str, page_bytes: int, pages: int, gbps: float,
           ceiling_gbps: float) -> Row:
        ratio = gbps / ceiling_gbps if ceiling_gbps > 0 else math.nan
        return cls(path, op, page_bytes, pages, gbps, ceiling_gbps, ratio)

    @classmethod
    def timed(cls, path: str, op: str, page_bytes: int, pages: int, seconds: float,
              ceiling_seconds: float) -> Row:
        """A row from the best times of the figure and of its ceiling (same bytes)."""
        nbytes = page_bytes * pages
        return cls.of(path, op, page_bytes, pages, nbytes / seconds / 1e9,
                      nbytes / ceiling_seconds / 1e9)

    @property
    def nbytes(self) -> int:
        return self.page_bytes * self.pages

    def to_json(self) -> dict[str, Any]:
        """``{path, op, page_bytes, pages, gbps, ceiling_gbps, ratio}``."""
        d = dataclasses.asdict(self)
        for k in ("gbps", "ceiling_gbps"):
            d[k] = round(d[k], 4)
        d["ratio"] = round(d["ratio"], 4)
        return d


def target_ratio(row: Row, *, cuda: bool) -> float | None:
    """The ratio the issue asks of a path (``None``: no target for it here).

    G2<->G3: 0.8 with large pages (>= 1 MiB), 0.5 with small ones. G2<->G4: 0.8 with large
    pages. G1<->G2: 0.8, on a GPU only (on a CPU-only machine G1 is host memory too).
    """
    large = row.page_bytes >= MiB
    if row.path in (G2_G3, G3_G2):
        return 0.8 if large else 0.5
    if row.path in (G2_G4, G4_G2):
        return 0.8 if large else None
    if row.path in (G1_G2, G2_G1):
        return 0.8 if cuda else None
    return None


def ceiling_names(*, cuda: bool, direct_io: bool = True) -> dict[str, str]:
    """What each path's ceiling is, in words."""
    mem = "one copy_ pinned<->cuda" if cuda else "one copy_ cpu->cpu"
    disk = "O_DIRECT" if direct_io else "buffered+fadvise"
    return {G1_G2: mem, G2_G1: mem,
            G2_G3: f"{disk} seq write+fdatasync", G3_G2: f"{disk} seq read",
            G2_G4: "boto3 put_object, 1 object", G4_G2: "boto3 get_object, 1 object"}


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            v = n / (1 << shift)
            return f"{v:g} {unit}"
    return f"{n} B"


def format_table(rows: Sequence[Row], *, cuda: bool = False, direct_io: bool = True) -> str:
    """A text table: one line per row, with the ceiling's name and the target."""
    names = ceiling_names(cuda=cuda, direct_io=direct_io)
    # Two spaces at least between columns: "GB/s ceil GB/s ratio x" read as one header.
    head = (f"{'path':7} {'op':5} {'page':>8}  {'pages':>6}  {'GB/s':>7}  {'ceil GB/s':>9}  "
            f"{'ratio x':>7}  {'target x':>10}  ceiling measured as")
    lines = [head, "-" * len(head)]
    for r in rows:
        t = target_ratio(r, cuda=cuda)
        mark = "-" if t is None else f">={t:.1f} " + ("ok" if r.ratio >= t else "MISS")
        lines.append(f"{r.path:7} {r.op:5} {_size(r.page_bytes):>8}  {r.pages:>6}  "
                     f"{r.gbps:7.2f}  {r.ceiling_gbps:9.2f}  {r.ratio:7.2f}  {mark:>10}  "
                     f"{names.get(r.path, '')}")
    return "\n".join(lines)


# -- progress -----------------------------------------------------------------------------------
class Progress:
    """A one-line progress bar redrawn in place on a text stream (stderr by default).

    Measurements call :meth:`begin` at the start of each step; the bar counts finished
    steps against ``total`` (see :func:`memory_steps` and friends). Disabled, it only counts.
    """

    def __init__(self, total: int, *, stream: TextIO | None = None, enabled: bool = True,
                 width: int = 28) -> None:
        self.total = max(1, total)
        self.done = 0
        self.prefix = ""
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._width = width
        self._running = False
        self._start = time.monotonic()
        self._last_len = 0

    def begin(self, label: str) -> None:
        """Mark the running step finished and show that ``label`` runs now."""
        if self._running:
            self.done += 1
        self._running = True
        self._draw(f"{self.prefix} {label}".strip())

    def note(self, label: str) -> None:
        """Show ``label`` (setting up, say) without counting a step."""
        self._draw(f"{self.prefix} {label}".strip())

    def close(self) -> None:
        if self._running:
            self.done += 1
            self._running = False
        if self._enabled and self._last_len:
            self._draw("done")
            self._stream.write("\n")
            self._stream.flush()
            self._last_len = 0

    def _draw(self, label: str) -> None:
        if not self._enabled:
            return
        frac = min(1.0, self.done / self.total)
        fill = round(frac * self._width)
        elapsed = time.monotonic() - self._start
        line = (f"[{'#' * fill}{'.' * (self._width - fill)}] {frac * 100:3.0f}% "
                f"{elapsed:5.1f}s {label}")[:118]
        pad = max(0, self._last_len - len(line))
        self._stream.write("\r" + line + " " * pad)
        self._stream.flush()
        self._last_len = len(line)


def memory_steps(repeats: int) -> int:
    """Progress steps :func:`measure_memory` takes."""
    return 4 * (repeats + 1)


def disk_steps(repeats: int) -> int:
    """Progress steps :func:`measure_disk` takes."""
    return 4 * (repeats + 1)


def object_steps(repeats: int) -> int:
    """Progress steps :func:`measure_object` takes."""
    return 3 * (repeats + 1)


def _begin(progress: Progress | None, label: str) -> None:
    if progress is not None:
        progress.begin(label)


def pages_for(layout: KVLayout, nbytes: int) -> int:
    """How many pages of ``layout`` make about ``nbytes`` (at least one)."""
    return max(1, nbytes // layout.bytes_per_block)


# -- page contents ------------------------------------------------------------------------------
def _fill_pages(pages: torch.Tensor, seed: int) -> None:
    """Fill a ``[n, page_bytes]`` uint8 CPU tensor with pseudo-random bytes, each page
    distinct (random block tiled, then the page number stamped in the first bytes): much
    faster than generating every byte, and a misplaced page is still caught."""
    import torch

    n, pb = pages.shape
    gen = torch.Generator().manual_seed(seed)
    block_pages = max(1, min(n, (16 * MiB) // max(1, pb)))
    block = torch.randint(0, 256, (block_pages, pb), dtype=torch.uint8, generator=gen)
    for i in range(0, n, block_pages):
        k = min(block_pages, n - i)
        pages[i:i + k].copy_(block[:k])
    stamp = min(8, pb)
    ids = torch.arange(n, dtype=torch.int64).view(torch.uint8).view(n, 8)
    pages[:, :stamp].copy_(ids[:, :stamp])


def _device_page(pool: DevicePool, slot: int) -> torch.Tensor:
    """One G1 page as contiguous uint8 bytes on the CPU (for checks)."""
    import torch

    view = pool.block_view(slot)
    t = view if not isinstance(view, list) else torch.stack(view)
    return t.contiguous().reshape(-1).view(torch.uint8).cpu()


def _sample(n: int, k: int = 8) -> list[int]:
    """Up to ``k`` slots spread over ``0..n-1``: the ends, the middle, a few random."""
    picks = {0, n - 1, n // 2, *random.Random(n).sample(range(n), min(n, max(0, k - 3)))}
    return sorted(picks)


# -- G1 <-> G2 ----------------------------------------------------------------------------------
def measure_memory(layout: KVLayout, pages: int, *, repeats: int = 3, device: str = "auto",
                   progress: Progress | None = None) -> list[Row]:
    """G1->G2 and G2->G1 with ``copy_blocks`` between a DevicePool and a HostPool (all pages
    in one call), each next to one large ``copy_`` of the same bytes between the same
    memories (pinned host <-> cuda where CUDA is, plain CPU memory otherwise)."""
    import torch

    dev = DevicePool(layout, pages, device)
    host = HostPool(layout, pages)
    cuda = dev.device.type == "cuda"
    pb = layout.bytes_per_block
    nbytes = pages * pb

    staging = torch.empty((pages, pb), dtype=torch.uint8)
    _fill_pages(staging, seed=1)
    if dev.buffer is not None:
        dev.buffer.view(pages, -1).view(torch.uint8).copy_(staging.view(pages, -1))
    else:
        per_layer = layout.bytes_per_layer_block
        for i, layer in enumerate(dev.layers):
            src = staging.view(pages, layout.num_layers, per_layer)[:, i]
            layer.view(pages, -1).view(torch.uint8).copy_(src)
    del staging

    # The ceiling's two buffers: the pools' own memory where it is one flat buffer.
    if dev.buffer is not None:
        dev_flat = dev.buffer.view(-1).view(torch.uint8)
    else:
        dev_flat = torch.empty(nbytes, dtype=torch.uint8, device=dev.device)
    host_flat = host.raw.view(-1)
    if nbytes % 8 == 0:
        # Widest elements: torch's CPU copy_ of uint8 runs ~20% below memcpy, of int64 at it.
        dev_flat, host_flat = dev_flat.view(torch.int64), host_flat.view(torch.int64)
    slots = list(range(pages))
    checks = _sample(pages)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev.device)

    def timed(fn: Callable[[], object]) -> float:
        sync()
        t = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t

    def check(what: str) -> None:
        for s in checks:
            if not torch.equal(_device_page(dev, s), host.raw[s]):
                raise BandwidthError(f"{what}: page {s} differs after copy_blocks")

    best = dict.fromkeys(("d2h", "h2d", "ceil_d2h", "ceil_h2d"), math.inf)
    for rnd in range(repeats + 1):
        _begin(progress, f"{G1_G2} copy_blocks")
        host.raw[checks] = 0
        t_d2h = timed(lambda: copy_blocks(dev, slots, host, slots))
        check(G1_G2)
        _begin(progress, f"{G2_G1} copy_blocks")
        for s in checks:
            view = dev.block_view(s)
            for part in view if isinstance(view, list) else [view]:
                part.zero_()
        t_h2d = timed(lambda: copy_blocks(host, slots, dev, slots))
        check(G2_G1)
        _begin(progress, f"{G1_G2} ceiling copy_")
        t_cd2h = timed(lambda: host_flat.copy_(dev_flat, non_blocking=cuda))
        _begin(progress, f"{G2_G1} ceiling copy_")
        t_ch2d = timed(lambda: dev_flat.copy_(host_flat, non_blocking=cuda))
        if rnd == 0:
            continue  # warm-up
        for k, v in (("d2h", t_d2h), ("h2d", t_h2d), ("ceil_d2h", t_cd2h),
                     ("ceil_h2d", t_ch2d)):
            best[k] = min(best[k], v)
    return [Row.timed(G1_G2, "copy", pb, pages, best["d2h"], best["ceil_d2h"]),
            Row.timed(G2_G1, "copy", pb, pages, best["h2d"], best["ceil_h2d"])]


# -- helpers shared by the store paths ------------------------------------------------------------
def _ignore(_: TransferHandle) -> None:
    pass


def _keys(rng: random.Random, n: int) -> list[int]:
    keys: set[int] = set()
    while len(keys) < n:
        keys.add(rng.getrandbits(64))
    return list(keys)


def _transfer(engine: OffloadEngine, kind: TransferKind, medium: Medium, keys: list[int],
              buffers: list[memoryview], request_pages: int) -> float:
    """Submit ``keys`` in requests of ``request_pages``, wait for all; seconds taken."""
    t = time.perf_counter()
    handles = [engine.submit(TransferHandle(kind, medium, keys[i:i + request_pages],
                                            buffers[i:i + request_pages]))
               for i in range(0, len(keys), request_pages)]
    for h in handles:
        h.wait()
    elapsed = time.perf_counter() - t
    for h in handles:
        if h.status is not TransferStatus.DONE or not all(h.results):
            bad = len(h.results) - sum(h.results)
            raise BandwidthError(f"{medium.value} {kind.value} of {len(h.keys)} pages: "
                                 f"{h.status.value}, {bad} failed"
                                 + (f" ({h.error})" if h.error is not None else ""))
    return elapsed


def _check_loaded(host: HostPool, pages: int, what: str) -> None:
    """The second half of ``host`` must equal the first (what was stored); then clear it."""
    import torch

    if not torch.equal(host.raw[:pages], host.raw[pages:]):
        bad = [s for s in range(pages) if not torch.equal(host.raw[s], host.raw[pages + s])]
        raise BandwidthError(f"{what}: {len(bad)} page(s) came back different "
                             f"(first: {bad[:4]})")
    host.raw[pages:].zero_()


def _engine_for(store: PageStore, pages: int, batch_bytes: int) -> OffloadEngine:
    engine = OffloadEngine(max_inflight_pages=max(pages, 1), batch_bytes=batch_bytes,
                           on_complete=_ignore)
    try:
        engine.add_tier(store)
    except BaseException:
        engine.shutdown(flush=False)
        raise
    return engine


# -- G2 <-> G3 ----------------------------------------------------------------------------------
class _RawFile:
    """The disk ceiling: one file written and read sequentially in large chunks from an
    aligned buffer, ``O_DIRECT`` where the store uses it (buffered + fadvise otherwise)."""

    def __init__(self, path: Path, data: memoryview, *, direct: bool,
                 chunk_bytes: int) -> None:
        self.path = path
        self.view = data.cast("B")
        # O_DIRECT moves whole ALIGN blocks: a size that is not one (no real page's) leaves
        # out its last partial block, under 4 KiB of hundreds of MiB.
        self.nbytes = self.view.nbytes // ALIGN * ALIGN
        self.chunk = max(ALIGN, chunk_bytes // ALIGN * ALIGN)
        self.flags = getattr(os, "O_DIRECT", 0) if direct else 0

    def write(self) -> float:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | self.flags, 0o600)
        try:
            t = time.perf_counter()
            off = 0
            while off < self.nbytes:
                off += os.pwrite(fd, self.view[off:min(off + self.chunk, self.nbytes)], off)
            os.fdatasync(fd)  # what the store's put does before it returns
            return time.perf_counter() - t
        finally:
            os.close(fd)

    def read(self) -> float:
        fd = os.open(self.path, os.O_RDONLY | self.flags)
        try:
            if not self.flags:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t = time.perf_counter()
            off = 0
            while off < self.nbytes:
                got = os.preadv(fd, [self.view[off:min(off + self.chunk, self.nbytes)]], off)
                if got <= 0:
                    raise BandwidthError(f"raw read of {self.path} ended at {off}")
                off += got
            return time.perf_counter() - t
        finally:
            os.close(fd)


def measure_disk(layout: KVLayout, pages: int, directory: Path | str, *, repeats: int = 3,
                 request_pages: int = DEFAULT_REQUEST_PAGES,
                 batch_bytes: int = DEFAULT_DISK_BATCH_BYTES,
                 io_threads: int | None = None, io_chunk_bytes: int | None = None,
                 raw_chunk_bytes: int = DEFAULT_RAW_CHUNK_BYTES,
                 progress: Progress | None = None) -> list[Row]:
    """G2->G3 write and cold G3->G2 read through an OffloadEngine and a DiskStore created
    in a fresh directory under ``directory`` (removed afterwards), next to a raw sequential
    write (+ fdatasync) and read of the same bytes to one file there.

    ``io_threads`` / ``io_chunk_bytes``: the DiskTierConfig's (``None``: its defaults).
    """
    from kvbm.storage.disk import DiskStore, DiskTierConfig
    from kvbm.storage.disk.directory import geometry_for

    pb = layout.bytes_per_block
    base = Path(directory)
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bandwidth-", dir=base))
    engine: OffloadEngine | None = None
    raw: _RawFile | None = None
    try:
        host = HostPool(layout, 2 * pages)
        _fill_pages(host.raw[:pages], seed=2)
        # The ceiling's buffer is memory of the very kind the tier moves pages from and
        # into (pinned where the host pool is; else the pool's huge-page-backed anonymous
        # memory): O_DIRECT speed depends on it, by up to 2x, and a ceiling from slower
        # memory would flatter the figure.
        raw_pool = HostPool(layout, pages, pin_memory=host.pinned)
        raw_pool.raw.copy_(host.raw[:pages])

        kw: dict[str, Any] = {}
        if io_threads is not None:
            kw["io_threads"] = io_threads
        if io_chunk_bytes is not None:
            kw["io_chunk_bytes"] = io_chunk_bytes
        # Room for exactly the measured pages: every round after the warm-up rewrites the
        # same slots, the tier's steady state. The capacity counts the slabs' header areas
        # too (64 bytes a slot, in whole ALIGN blocks), which the slot padding of small
        # pages does not cover: grow it until the store's own geometry holds every page.
        capacity = pages * ((pb + ALIGN - 1) // ALIGN * ALIGN)
        slab_bytes = DiskTierConfig(path=root / "g3", capacity_bytes=capacity).slab_bytes
        while geometry_for(layout, capacity, slab_bytes).max_slots < pages:
            capacity += ALIGN
        store = DiskStore(layout, DiskTierConfig(path=root / "g3", capacity_bytes=capacity,
                                                 **kw))
        raw = _RawFile(root / "raw-ceiling.bin", raw_pool.raw.numpy().data,
                       direct=store.direct_io, chunk_bytes=raw_chunk_bytes)
        engine = _engine_for(store, pages, batch_bytes)
        src = [host.page(s) for s in range(pages)]
        dst = [host.page(pages + s) for s in range(pages)]
        # The views above are two tracked objects per page (memoryview, managed buffer),
        # tens of thousands: left young, their promotion sets off a full collection in the
        # middle of a timed transfer (~100 ms with torch loaded), which is this harness's
        # cost, not the tier's. One collection now settles them (GC settings untouched).
        gc.collect()
        rng = random.Random(3)
        best = dict.fromkeys(("w", "r", "raw_w", "raw_r"), math.inf)
        for rnd in range(repeats + 1):
            # Whatever the machine wrote before (an earlier step, the last round's index
            # commits) is flushed now, not in the middle of the next timed write.
            os.sync()
            _begin(progress, f"{G2_G3} raw write")
            t_raw_w = raw.write()
            _begin(progress, f"{G3_G2} raw read")
            t_raw_r = raw.read()
            keys = _keys(rng, pages)
            _begin(progress, f"{G2_G3} DiskStore put")
            t_w = _transfer(engine, TransferKind.STORE, Medium.DISK, keys, src, request_pages)
            store.drop_page_cache()
            _begin(progress, f"{G3_G2} DiskStore get (cold)")
            t_r = _transfer(engine, TransferKind.LOAD, Medium.DISK, keys, dst, request_pages)
            _check_loaded(host, pages, f"{G3_G2} read")
            engine.run(store.delete(keys))  # free the slots for the next round
            if rnd == 0:
                continue
            for k, v in (("w", t_w), ("r", t_r), ("raw_w", t_raw_w), ("raw_r", t_raw_r)):
                best[k] = min(best[k], v)
        return [Row.timed(G2_G3, "write", pb, pages, best["w"], best["raw_w"]),
                Row.timed(G3_G2, "read", pb, pages, best["r"], best["raw_r"])]
    finally:
        if engine is not None:
            engine.shutdown(flush=False)
        if raw is not None:
            raw.view.release()
        shutil.rmtree(root, ignore_errors=True)


def disk_direct_io(directory: Path | str) -> bool:
    """Whether files in ``directory`` (created if missing) accept O_DIRECT."""
    from kvbm.storage.disk.slabs import probe_direct_io

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    return probe_direct_io(d)


# -- G2 <-> G4 ----------------------------------------------------------------------------------
def measure_object(layout: KVLayout, pages: int, endpoint: str | None, bucket: str, *,
                   repeats: int = 2, request_pages: int = DEFAULT_REQUEST_PAGES,
                   batch_bytes: int = DEFAULT_OBJECT_BATCH_BYTES,
                   max_workers: int | None = None, pack_bytes: int | None = None,
                   progress: Progress | None = None, **s3_config: Any) -> list[Row]:
    """G2->G4 put and G4->G2 get through an OffloadEngine and an S3Store on ``bucket``
    (which must exist) at ``endpoint``, next to one raw boto3 put / get of an object of the
    same size (``measure_raw_s3``). Credentials come from boto3's usual chain. Objects go
    under a fresh prefix and are deleted afterwards; the local index lives in a temporary
    directory. Extra keyword arguments go to :class:`~kvbm.storage.s3.S3TierConfig`."""
    from kvbm.lab.raw_s3 import measure_raw_s3
    from kvbm.storage.s3 import S3Store, S3TierConfig

    pb = layout.bytes_per_block
    nbytes = pages * pb
    index_dir = Path(tempfile.mkdtemp(prefix="kvbm-bandwidth-index-"))
    # A private prefix, cleaned up after: no head object for other writers, no looks.
    kw: dict[str, Any] = {"addressing_style": "path", "announce": False,
                          "discovery_interval_s": 0.0, **s3_config}
    if max_workers is not None:
        kw["max_workers"] = max_workers
    if pack_bytes is not None:
        kw["pack_bytes"] = pack_bytes
    config = S3TierConfig(bucket=bucket, endpoint_url=endpoint,
                          prefix=f"kvbm-bandwidth/{uuid.uuid4().hex}/",
                          index_path=str(index_dir / "index"), rebuild_if_empty=False, **kw)
    engine: OffloadEngine | None = None
    try:
        host = HostPool(layout, 2 * pages)
        _fill_pages(host.raw[:pages], seed=4)
        store = S3Store(layout, config)
        engine = _engine_for(store, pages, batch_bytes)
        src = [host.page(s) for s in range(pages)]
        dst = [host.page(pages + s) for s in range(pages)]
        rng = random.Random(5)
        best = dict.fromkeys(("put", "get"), math.inf)
        best_raw = dict.fromkeys(("put", "get"), 0.0)
        for rnd in range(repeats + 1):
            _begin(progress, f"{G2_G4} raw boto3 put+get")
            raw = measure_raw_s3(config, nbytes=nbytes, repeats=1)
            keys = _keys(rng, pages)
            _begin(progress, f"{G2_G4} S3Store put")
            t_put = _transfer(engine, TransferKind.STORE, Medium.OBJECT, keys, src,
                              request_pages)
            _begin(progress, f"{G4_G2} S3Store get")
            t_get = _transfer(engine, TransferKind.LOAD, Medium.OBJECT, keys, dst,
                              request_pages)
            _check_loaded(host, pages, f"{G4_G2} get")
            engine.run(store.delete(keys))  # deletes the packs
            if rnd == 0:
                continue
            best["put"] = min(best["put"], t_put)
            best["get"] = min(best["get"], t_get)
            best_raw["put"] = max(best_raw["put"], raw.put_gbps)
            best_raw["get"] = max(best_raw["get"], raw.get_gbps)
        return [Row.of(G2_G4, "put", pb, pages, nbytes / best["put"] / 1e9, best_raw["put"]),
                Row.of(G4_G2, "get", pb, pages, nbytes / best["get"] / 1e9, best_raw["get"])]
    finally:
        if engine is not None:
            engine.shutdown(flush=False)
        shutil.rmtree(index_dir, ignore_errors=True)


# -- a short report (for the demo) --------------------------------------------------------------
def quick_report(layouts: Iterable[tuple[str, KVLayout]], directory: Path | str, *,
                 nbytes: int = 128 * MiB, repeats: int = 1,
                 progress: Progress | None = None) -> tuple[list[tuple[str, list[Row]]], str]:
    """G1<->G2 and G2<->G3 of each named layout with ``nbytes`` per measurement (a few
    seconds), and the table of it all. For ``kvbm demo``; ``bench/offload_bandwidth.py``
    is the full benchmark."""
    import torch

    cuda = torch.cuda.is_available()
    direct = disk_direct_io(directory)
    results: list[tuple[str, list[Row]]] = []
    parts: list[str] = []
    for name, layout in layouts:
        if progress is not None:
            progress.prefix = name
        n = pages_for(layout, nbytes)
        rows = [*measure_memory(layout, n, repeats=repeats, progress=progress),
                *measure_disk(layout, n, directory, repeats=repeats, progress=progress)]
        results.append((name, rows))
        parts.append(f"{name}: {_size(layout.bytes_per_block)} pages, {n} pages "
                     f"({_size(n * layout.bytes_per_block)}) per measurement\n"
                     + format_table(rows, cuda=cuda, direct_io=direct))
    if progress is not None:
        progress.close()
    return results, "\n\n".join(parts)
