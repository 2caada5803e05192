"""Fixed-page pools: an O(1) slot allocator and the tensors behind G1 and G2.

:class:`SlotAllocator` hands out page slots ``0..N-1``. It is pure Python and on the hot path
of every request, so it avoids per-call allocations: the free list is *intrusive* (two int
lists indexed by slot, no node objects) and *doubly linked* around one sentinel, which makes
taking a particular slot out of the middle O(1) and lets a batch of slots be unlinked or
spliced in with a constant number of pointer writes.

:class:`DevicePool` (G1) and :class:`HostPool` (G2) own the memory. G1 is a torch tensor on
``cuda`` when available, else on ``cpu``; G2 is pinned when CUDA is present, plain otherwise
(``pin_memory=True`` raises on a CPU-only torch). Both check that their pages fit in what the
machine can still give before allocating anything (:mod:`kvbm.capacity`).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kvbm.capacity import (
    allocation_errors,
    check_pool_fits,
    device_available_bytes,
    host_available_bytes,
)
from kvbm.deps import require
from kvbm.errors import (
    BlockIdError,
    BlockIdTypeError,
    BlockStateError,
    ConfigError,
    PoolExhaustedError,
)
from kvbm.layout import Arrangement, KVLayout

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _check_num_blocks(num_blocks: Any) -> None:
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
        raise ConfigError(f"a pool needs a positive number of blocks, got {num_blocks!r}")


class SlotAllocator:
    """Free list + refcounts of ``num_slots`` pages.

    A slot is *free* (on the list, refcount 0), or *held* (refcount >= 1). What a held slot
    contains is the owner's business; a slot whose refcount drops to 0 is not freed here
    (the owner may keep it cached) but only by :meth:`free`.
    """

    __slots__ = ("_free", "_next", "_num_free", "_prev", "_refs", "_sentinel", "num_slots")

    def __init__(self, num_slots: int) -> None:
        _check_num_blocks(num_slots)
        self.num_slots = num_slots
        s = num_slots  # the sentinel is one extra node after the last slot: no None checks
        self._sentinel = s
        # next/prev of a circular list through the sentinel; initially 0 -> 1 -> ... -> N-1.
        self._next = [*range(1, num_slots + 1), 0]
        self._prev = [s, *range(num_slots)]
        self._refs = [0] * num_slots
        self._free = bytearray(b"\x01") * num_slots  # O(1) membership, catches double frees
        self._num_free = num_slots

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return self._num_free

    def is_free(self, slot: int) -> bool:
        return bool(self._free[slot])

    def refcount(self, slot: int) -> int:
        return self._refs[slot]

    def check(self, slot: Any) -> int:
        """Validate a slot id from outside; returns it as int."""
        if type(slot) is int and 0 <= slot < self.num_slots:
            return slot
        if isinstance(slot, bool):  # an int subclass, but never meant as an id
            raise BlockIdTypeError(f"block id must be an int, got {slot!r}")
        if not isinstance(slot, int):
            try:
                slot = int(slot.__index__())
            except (AttributeError, TypeError):
                raise BlockIdTypeError(f"block id must be an int, got {slot!r}") from None
        if not 0 <= slot < self.num_slots:
            raise BlockIdError(f"block id {slot} out of range [0, {self.num_slots})")
        return int(slot)

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free slots (refcount 1 each), oldest-freed first."""
        if n > self._num_free:
            raise PoolExhaustedError(f"{n} blocks requested, {self._num_free} free")
        if n <= 0:
            return []
        nxt, refs, free = self._next, self._refs, self._free
        out = [0] * n
        s = nxt[self._sentinel]
        for i in range(n):
            out[i] = s
            refs[s] = 1
            free[s] = 0
            s = nxt[s]
        # the taken run is contiguous at the head: unlink it with two writes
        nxt[self._sentinel] = s
        self._prev[s] = self._sentinel
        self._num_free -= n
        return out

    def take(self, slot: int) -> None:
        """Take one particular free slot (refcount 1), O(1)."""
        if not self._free[slot]:
            raise BlockStateError(f"block {slot} is not free")
        p, n = self._prev[slot], self._next[slot]
        self._next[p] = n
        self._prev[n] = p
        self._free[slot] = 0
        self._refs[slot] = 1
        self._num_free -= 1

    def free(self, slots: Iterable[int]) -> None:
        """Return slots to the tail of the free list (refcounts reset to 0).

        Slots go to the tail so that a freed page is reused last: its memory is the least
        likely to still be read by an in-flight copy.
        """
        slots = list(slots)
        nxt, prv, refs, free = self._next, self._prev, self._refs, self._free
        # Validate the whole batch before linking anything, so a bad id changes nothing.
        for i, s in enumerate(slots):
            if free[s]:
                for t in slots[:i]:
                    free[t] = 0
                raise BlockStateError(f"block {s} freed twice")
            free[s] = 1
        sentinel = self._sentinel
        tail = prv[sentinel]
        for s in slots:
            refs[s] = 0
            nxt[tail] = s
            prv[s] = tail
            tail = s
        nxt[tail] = sentinel
        prv[sentinel] = tail
        self._num_free += len(slots)

    def incref(self, slot: int) -> int:
        r = self._refs[slot] + 1
        self._refs[slot] = r
        return r

    def decref(self, slot: int) -> int:
        r = self._refs[slot] - 1
        if r < 0:
            raise BlockStateError(f"block {slot} released more often than held")
        self._refs[slot] = r
        return r

    def free_slots(self) -> list[int]:
        """The free list in order (for tests and invariant checks)."""
        out = []
        s = self._next[self._sentinel]
        while s != self._sentinel:
            out.append(s)
            s = self._next[s]
        return out


def dma_memory(nbytes: int) -> mmap.mmap:
    """``nbytes`` (at least one byte) of zeroed, page-aligned, private anonymous memory, in
    transparent huge pages where the kernel allows.

    For buffers that O_DIRECT reads and writes: huge pages make a buffer physically
    contiguous in 2 MiB pieces, so the kernel hands the device a few large segments per
    request instead of one per 4 KiB page; O_DIRECT then runs 1.6-2x faster than from
    ``mmap.mmap(-1, n)`` (shared memory, 4 KiB pages) on the development VM. Private, so
    that the kernel may back it with huge pages (it does not for shared anonymous memory
    unless shmem THP is enabled system-wide); a forked child gets a copy-on-write view.
    """
    buf = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(AttributeError, OSError):  # no THP: 4 KiB pages, still correct
        buf.madvise(mmap.MADV_HUGEPAGE)
    return buf


def page_aligned_bytes(nbytes: int) -> torch.Tensor:
    """A zeroed, page-aligned, pre-faulted uint8 CPU tensor of ``nbytes`` (:func:`dma_memory`).

    Page alignment lets the disk tier do O_DIRECT I/O straight from and into host pages
    (no staging copy), and huge pages make that I/O faster; pre-faulting makes the first
    copy into the pool run at memcpy speed instead of page-fault speed (about half as fast
    otherwise).
    """
    import numpy as np
    import torch

    buf = dma_memory(nbytes)
    arr = np.frombuffer(buf, dtype=np.uint8)[:nbytes]  # the array keeps the mapping alive
    arr[:: mmap.PAGESIZE] = 0  # touch every page now (after madvise: huge pages if any)
    return torch.from_numpy(arr)


def resolve_device(device: str) -> str:
    """``"auto"`` -> ``"cuda"`` when torch sees a GPU, else ``"cpu"``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but torch sees no CUDA device")
    return device


class DevicePool:
    """G1: the pages the engine computes into, in the layout's arrangement."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: str = "auto") -> None:
        require("torch", "engine", "the device tier (G1)")
        import torch

        _check_num_blocks(num_blocks)
        self.layout = layout
        self.device = torch.device(resolve_device(device))
        tier = f"device tier ({self.device})"
        page = layout.bytes_per_block
        check_pool_fits(tier, num_blocks, page, host_available_bytes()
                        if self.device.type == "cpu" else device_available_bytes(self.device),
                        "device.num_blocks")
        self.allocator = SlotAllocator(num_blocks)
        dtype = layout.torch_dtype()
        self.layers: list[torch.Tensor]
        with allocation_errors(tier, num_blocks, page, "device.num_blocks"):
            if layout.arrangement is Arrangement.FULLY_CONTIGUOUS:
                self.buffer: torch.Tensor | None = torch.zeros(
                    (num_blocks, *layout.block_shape), dtype=dtype, device=self.device)
                self.layers = [self.buffer[:, i] for i in range(layout.num_layers)]
            else:
                self.buffer = None
                self.layers = [torch.zeros((num_blocks, *layout.layer_shape), dtype=dtype,
                                           device=self.device)
                               for _ in range(layout.num_layers)]
        log.debug("G1 pool: %d blocks of %d bytes on %s (%s)", num_blocks,
                  layout.bytes_per_block, self.device, layout.arrangement.value)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_slots

    def block_view(self, slot: int) -> torch.Tensor | list[torch.Tensor]:
        """One block's KV: ``[layers, kv_planes, block_size, heads, head_dim]`` when
        contiguous, else one ``[kv_planes, block_size, heads, head_dim]`` view per layer
        (``kv_planes`` is 2, K and V, for MHA and 1, the latent, for MLA)."""
        slot = self.allocator.check(slot)  # a negative index would be another block
        if self.buffer is not None:
            return self.buffer[slot]
        return [layer[slot] for layer in self.layers]


class HostPool:
    """G2: one contiguous page per block, byte-addressable for the tiers below."""

    def __init__(self, layout: KVLayout, num_blocks: int, pin_memory: bool | None = None) -> None:
        require("torch", "engine", "the host tier (G2)")
        import torch

        cuda = torch.cuda.is_available()
        if pin_memory and not cuda:
            raise ConfigError("host.pin_memory=True needs CUDA; this torch sees no GPU "
                              "(leave it unset to pin only where CUDA is present)")
        self.pinned = cuda if pin_memory is None else pin_memory
        self.layout = layout
        _check_num_blocks(num_blocks)
        page = layout.bytes_per_block
        check_pool_fits("host tier", num_blocks, page, host_available_bytes(),
                        "host.num_blocks")
        self.allocator = SlotAllocator(num_blocks)
        # Raw bytes first: numpy has no bfloat16, and the disk/object tiers want bytes anyway.
        with allocation_errors("host tier", num_blocks, page, "host.num_blocks"):
            if self.pinned:  # cudaHostAlloc memory is page-aligned already
                raw = torch.zeros((num_blocks, page), dtype=torch.uint8, pin_memory=True)
            else:
                raw = page_aligned_bytes(num_blocks * page).view(num_blocks, page)
        self._adopt(raw)

    def _adopt(self, raw: torch.Tensor) -> None:
        """Take ``raw`` (``[num_blocks, page]`` uint8 on the CPU) as the pages and derive
        their views; the shared-memory pool (:mod:`kvbm.memory.shm`) maps its own."""
        layout = self.layout
        self.raw = raw
        self.buffer = raw.view(layout.torch_dtype()).view(raw.shape[0], *layout.block_shape)
        self._np = raw.numpy()
        # Pages are slices of one flat view: a slice is a single object, where indexing the
        # array made an ndarray and a memoryview of it per page (GC pressure in transfers).
        self._flat = self._np.reshape(-1).data
        self._page_bytes = layout.bytes_per_block

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_slots

    def page(self, slot: int) -> memoryview:
        """The bytes of one page, zero-copy (writable)."""
        slot = self.allocator.check(slot)
        n = self._page_bytes
        return self._flat[slot * n:(slot + 1) * n]

    def block_view(self, slot: int) -> torch.Tensor:
        return self.buffer[self.allocator.check(slot)]


#: With a GPU on one side, a run of adjacent pages is one DMA (``copy_``) when the runs
#: average at least this many bytes; below that, per-copy launch costs exceed those of one
#: gather + one transfer + one scatter.
_MIN_RUN_BYTES_CUDA = 256 << 10


def _runs(src_slots: Sequence[int], dst_slots: Sequence[int]) -> list[list[int]]:
    """``[src_start, dst_start, length]`` of the runs of slots adjacent in both pools."""
    runs: list[list[int]] = []
    last: list[int] = [-2, -2, 0]
    for s, d in zip(src_slots, dst_slots, strict=True):
        if s == last[0] + last[2] and d == last[1] + last[2]:
            last[2] += 1
        else:
            last = [int(s), int(d), 1]
            runs.append(last)
    return runs


def copy_blocks(src: DevicePool | HostPool, src_slots: Sequence[int],
                dst: DevicePool | HostPool, dst_slots: Sequence[int], *,
                sync: bool = True) -> None:
    """Copy whole blocks between pools, batched per layer, whatever the arrangements.

    Pages adjacent in both pools are copied as one run with one ``copy_`` (a memcpy, or one
    DMA between pinned host memory and the GPU): a gather (``index_select``) on a CPU tensor
    runs at a small fraction of memcpy speed, and a GPU transfer wants large copies. Many
    tiny runs to or from a GPU go through one gather on each side instead.

    ``sync=False`` (a caller that orders the copy itself, on its own CUDA stream with an
    event): runs only, queued on the current stream and not waited for. The gather would
    stage through temporaries that must outlive the copy, and a device-to-host gather has to
    wait for the device before the host scatters it.
    """
    import torch

    if not src_slots:
        return
    src_dev = getattr(src, "device", torch.device("cpu"))
    dst_dev = getattr(dst, "device", torch.device("cpu"))
    cuda = src_dev.type == "cuda" or dst_dev.type == "cuda"
    src_buf = src.buffer if src.buffer is not None else None
    dst_buf = dst.buffer if dst.buffer is not None else None
    # (source, destination) tensors indexed by slot: the whole buffers, or one per layer.
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    if src_buf is not None and dst_buf is not None:
        pairs = [(src_buf, dst_buf)]
    else:
        pairs = [(src_buf[:, layer] if src_buf is not None else src.layers[layer],  # type: ignore[union-attr]
                  dst_buf[:, layer] if dst_buf is not None else dst.layers[layer])  # type: ignore[union-attr]
                 for layer in range(src.layout.num_layers)]
    runs = _runs(src_slots, dst_slots)
    copy_bytes = len(src_slots) * src.layout.bytes_per_block / (len(runs) * len(pairs))
    if not cuda or not sync or copy_bytes >= _MIN_RUN_BYTES_CUDA:
        for s_t, d_t in pairs:
            for s, d, n in runs:
                d_t[d:d + n].copy_(s_t[s:s + n], non_blocking=cuda)
    else:
        si = torch.tensor(src_slots, dtype=torch.long, device=src_dev)
        di = torch.tensor(dst_slots, dtype=torch.long, device=dst_dev)
        # A device-to-host copy must be complete before the CPU scatters it: only a copy
        # to the GPU may be asynchronous here (the GPU orders it before the scatter).
        to_gpu = dst_dev.type == "cuda"
        for s_t, d_t in pairs:
            part = s_t.index_select(0, si).to(dst_dev, non_blocking=to_gpu)
            d_t.index_copy_(0, di, part)
    if cuda and sync:
        # Correctness first: the copy must be complete before either page is reused. The
        # offload engine overlaps copies with compute on its own stream.
        torch.cuda.synchronize(src_dev if src_dev.type == "cuda" else dst_dev)
