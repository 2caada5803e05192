"""The data plane between the engine's KV tensors (G1) and the host pool (G2).

A :class:`BlockMover` runs in the engine's worker process (one per tensor-parallel rank) and
executes the :class:`~kvbm.core.plans.TransferPlan`\\ s the control plane sends. A page is
kvbm's canonical ``[layers, planes, block_size, heads, head_dim]`` with the heads of every
rank; each rank copies its own heads (:attr:`EngineKV.head_range`).

Tags (see :mod:`kvbm.memory.shm`) make a page trustworthy: a save sets the rank's tag to 0,
copies, waits for the copy (a GPU one too), then sets the tag to the block's hash. A load
reads the pages into a private staging buffer, checks every writer's tag before and after,
and only then copies the blocks that passed into the engine. So a block reported
:attr:`~CopyStatus.MISMATCH` (or ``FAILED`` for a bad id or slot) is left in G1 as it was:
nothing of a page that failed its check ever reaches the engine. (A device error in the
middle of a plan fails the whole plan; its blocks may then be partly written, and are
recomputed like every block not ``DONE``.)

On CUDA the copies run on a side stream of their own: a save first waits for the engine's
current stream (the KV just computed), a load records one event per layer, and
:meth:`LoadHandle.wait_layer` makes the engine's stream wait for that layer only, so a
layer's attention can start while later layers are still being copied. A mover is used by
one thread (the worker's).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.core.plans import CopyStatus, Direction, PlanResult, TransferPlan
from kvbm.errors import InvalidArgumentError, LayoutMismatchError
from kvbm.layout import KVLayout
from kvbm.memory.engine_kv import EngineKV, Tile

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Rows copied one ``copy_`` per run of adjacent ids when the runs are this long on average
#: (a memcpy each); shorter runs go through one gather (``index_select``) and one scatter.
_MIN_AVG_RUN = 4
#: A CPU load stages at most this much at a time (its buffer is kept between loads).
_STAGE_BYTES = 32 << 20


def _runs(ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(position, first id, length)`` of the runs of consecutive ids."""
    runs: list[tuple[int, int, int]] = []
    for pos, i in enumerate(ids):
        if runs and i == runs[-1][1] + runs[-1][2]:
            p, s, n = runs[-1]
            runs[-1] = (p, s, n + 1)
        else:
            runs.append((pos, i, 1))
    return runs


class _Rows:
    """One side of a copy: row ids, as runs or as an index tensor, whichever is cheaper."""

    def __init__(self, ids: Sequence[int], device: torch.device) -> None:
        import torch

        runs = _runs(ids)
        self.runs: list[tuple[int, int, int]] | None = (
            runs if len(runs) * _MIN_AVG_RUN <= len(ids) or len(runs) == 1 else None)
        self.index = (None if self.runs is not None
                      else torch.tensor(list(ids), dtype=torch.long, device=device))

    def gather(self, src: torch.Tensor, out: torch.Tensor) -> None:
        """``out[k] = src[ids[k]]``."""
        import torch

        if self.index is not None:
            torch.index_select(src, 0, self.index, out=out)
            return
        for p, s, n in self.runs or ():
            out[p:p + n].copy_(src[s:s + n])

    def scatter(self, dst: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> None:
        """``dst[ids[k]] = src[k]``."""
        if self.index is not None:
            dst.index_copy_(0, self.index, src)
            return
        for p, s, n in self.runs or ():
            dst[s:s + n].copy_(src[p:p + n], non_blocking=non_blocking)


def _split(x: torch.Tensor, tile: Tile) -> torch.Tensor:
    """``[n, T, H, D]`` -> the tiled ``[n, Ta, Tb, H, Da, Db]`` (a view, any strides)."""
    ta, tb, da, db = tile
    return x.view(x.shape[0], ta, tb, x.shape[2], da, db)  # splitting a dim: any strides


class LoadHandle:
    """A load in flight: :meth:`wait_layer` before a layer's attention, :meth:`finish` at the
    end (idempotent; returns the plan's result)."""

    def __init__(self, result: PlanResult, num_layers: int, events: list[Any] | None = None,
                 stream: Any = None, device: Any = None, keep: Any = None) -> None:
        self._result, self._num_layers = result, num_layers
        self._events, self._stream, self._device, self._keep = events, stream, device, keep
        self._finished = events is None

    def wait_layer(self, layer_index: int) -> None:
        """Order the engine's current stream after layer ``layer_index``'s copies (CUDA);
        nothing to wait for on the CPU, where :meth:`BlockMover.start_load` copied all."""
        if (isinstance(layer_index, bool) or not isinstance(layer_index, int)
                or not 0 <= layer_index < self._num_layers):
            raise InvalidArgumentError(f"layer index must be an int in [0, {self._num_layers}), "
                                       f"got {layer_index!r}")
        if self._events is not None and not self._finished:
            import torch

            torch.cuda.current_stream(self._device).wait_event(self._events[layer_index])

    def finish(self) -> PlanResult:
        if not self._finished:
            import torch

            self._finished = True
            events, self._events = self._events, None
            try:
                self._stream.synchronize()
                cur = torch.cuda.current_stream(self._device)
                for ev in events or ():
                    cur.wait_event(ev)
            except RuntimeError as e:  # a device error: nothing of this plan can be trusted
                log.error("kvbm: load plan %d failed on the device: %s", self._result.plan_id, e)
                self._result = PlanResult(self._result.plan_id, self._result.rank,
                                          tuple(CopyStatus.FAILED for _ in self._result.statuses))
            self._keep = None
        return self._result


class BlockMover:
    """Executes transfer plans between ``engine_kv`` (G1) and ``pool`` (G2): a host pool
    with ``tags`` (:class:`~kvbm.memory.shm.SharedHostPool`) of the same layout."""

    def __init__(self, engine_kv: EngineKV, pool: Any) -> None:
        if not isinstance(engine_kv, EngineKV):
            raise InvalidArgumentError(f"engine_kv must be an EngineKV, got "
                                       f"{type(engine_kv).__name__}")
        layout = getattr(pool, "layout", None)
        if not isinstance(layout, KVLayout):
            raise InvalidArgumentError(f"pool must be a host pool, got {type(pool).__name__}")
        if layout.fingerprint != engine_kv.layout.fingerprint:
            raise LayoutMismatchError(f"the pool holds pages of layout {layout}, the engine's "
                                      f"KV is {engine_kv.layout}")
        tags = getattr(pool, "tags", None)
        need = len(engine_kv.tag_columns)
        if (not isinstance(tags, np.ndarray) or tags.dtype != np.uint64 or tags.ndim != 2
                or tags.shape[0] != pool.num_blocks or tags.shape[1] != need):
            # Exactly: a pool's columns are its writers; a reader checking fewer would take
            # the heads of a writer whose column it never looked at.
            raise InvalidArgumentError(f"the pool needs uint64 tags [num_blocks, {need}] "
                                       f"(a SharedHostPool created with tag_columns={need})")
        self.engine_kv, self.pool = engine_kv, pool
        self._cuda = engine_kv.device.type == "cuda"
        self._stream: Any = None
        self._scratch: torch.Tensor | None = None
        self._local_block_bytes = (engine_kv.layout.bytes_per_block // engine_kv.layout.num_kv_heads
                                   * engine_kv.local_heads)
        if self._cuda:
            import torch

            self._stream = torch.cuda.Stream(engine_kv.device)  # type: ignore[no-untyped-call]

    # -- plans ------------------------------------------------------------------------------
    def save(self, plan: TransferPlan) -> PlanResult:
        """Copy the plan's blocks into their pages (this rank's heads) and tag them."""
        statuses, good = self._sort(plan, Direction.SAVE)
        kv = self.engine_kv
        if good and kv.writes_pages:
            g1 = [plan.copies[i].g1_block for i in good]
            slots = np.array([plan.copies[i].g2_slot for i in good], dtype=np.int64)
            hashes = np.array([plan.copies[i].seq_hash for i in good], dtype=np.uint64)
            tags, col = self.pool.tags, kv.tag_column
            tags[slots, col] = 0  # the page is being written: no reader takes it
            try:
                self._save_copy(g1, slots.tolist())
            except RuntimeError as e:  # a device error; the pages stay tagged empty
                log.error("kvbm: save plan %d failed on rank %d: %s", plan.plan_id,
                          kv.shard.rank, e)
                for i in good:
                    statuses[i] = CopyStatus.FAILED
                good = []
            else:
                tags[slots, col] = hashes  # only now: the bytes are all there
        for i in good:
            statuses[i] = CopyStatus.DONE
        return self._result(plan, statuses)

    def load(self, plan: TransferPlan) -> PlanResult:
        """Copy the plan's pages into the engine's blocks, all layers; wait for them."""
        return self.start_load(plan).finish()

    def start_load(self, plan: TransferPlan) -> LoadHandle:
        """Verify and stage the plan's pages, start copying them into the engine (on CUDA,
        layer by layer on the side stream). A page whose tags are not all the block's hash,
        before or after staging, is ``MISMATCH`` and not copied."""
        statuses, good = self._sort(plan, Direction.LOAD)
        kv, nl = self.engine_kv, self.engine_kv.layout.num_layers
        # The CPU copies all now, through a reused staging buffer, a bounded chunk at a time;
        # CUDA stages the whole plan (pinned) so that each layer's copies can follow at once.
        step = len(good) or 1 if self._cuda else max(1, _STAGE_BYTES // self._local_block_bytes)
        events: list[Any] | None = None
        stage: torch.Tensor | None = None
        for k in range(0, len(good), step):
            part, stage = self._stage(plan, good[k:k + step], statuses)
            if not part:
                continue
            try:
                events = self._scatter(stage, _Rows([plan.copies[i].g1_block for i in part],
                                                    kv.device))
            except RuntimeError as e:
                log.error("kvbm: load plan %d failed on rank %d: %s", plan.plan_id,
                          kv.shard.rank, e)
                statuses = [CopyStatus.FAILED if s is None or s is CopyStatus.DONE else s
                            for s in statuses]
                return LoadHandle(self._result(plan, statuses), nl)
            for i in part:
                statuses[i] = CopyStatus.DONE
        if events is None:
            return LoadHandle(self._result(plan, statuses), nl)
        return LoadHandle(self._result(plan, statuses), nl, events, self._stream, kv.device,
                          stage)

    # -- internals --------------------------------------------------------------------------
    def _sort(self, plan: Any, direction: Direction) -> tuple[list[CopyStatus | None], list[int]]:
        """Statuses with ``FAILED`` for copies that cannot run (bad id or slot, a block
        loaded twice), and the positions of the others."""
        if not isinstance(plan, TransferPlan):
            raise InvalidArgumentError(f"expected a TransferPlan, got {type(plan).__name__}")
        if plan.direction is not direction:
            raise InvalidArgumentError(f"plan {plan.plan_id} is a {plan.direction.value} plan, "
                                       f"not {direction.value}")
        nb, ns = self.engine_kv.num_blocks, self.pool.num_blocks
        statuses: list[CopyStatus | None] = [None] * len(plan.copies)
        good, seen = [], set()
        for i, c in enumerate(plan.copies):
            if c.g1_block >= nb or c.g2_slot >= ns or c.g1_block in seen:
                log.warning("kvbm: plan %d: block %d -> slot %d cannot be copied (%d blocks, "
                            "%d slots, or the block twice)", plan.plan_id, c.g1_block,
                            c.g2_slot, nb, ns)
                statuses[i] = CopyStatus.FAILED
                continue
            seen.add(c.g1_block)
            good.append(i)
        return statuses, good

    def _verified(self, plan: TransferPlan, positions: list[int],
                  statuses: list[CopyStatus | None]) -> list[int]:
        """The positions whose pages carry the block's hash in every writer's column; the
        others are marked ``MISMATCH``."""
        if not positions:
            return []
        slots = np.array([plan.copies[i].g2_slot for i in positions], dtype=np.int64)
        hashes = np.array([plan.copies[i].seq_hash for i in positions], dtype=np.uint64)
        cols = list(self.engine_kv.tag_columns)
        seen = self.pool.tags[slots][:, cols]  # one snapshot of the tags
        ok = (seen == hashes[:, None]).all(axis=1)
        out = []
        for i, good in zip(positions, ok.tolist(), strict=True):
            if good:
                out.append(i)
            else:
                statuses[i] = CopyStatus.MISMATCH
        if len(out) < len(positions):
            log.info("kvbm: plan %d: %d page(s) not the block's (overwritten, empty or being "
                     "written): recomputed", plan.plan_id, len(positions) - len(out))
        return out

    def _stage(self, plan: TransferPlan, positions: list[int],
               statuses: list[CopyStatus | None]) -> tuple[list[int], torch.Tensor]:
        """Copy the pages of ``positions`` (this rank's heads) into a staging buffer between
        two tag checks; returns the positions that passed both and their staged rows
        ``[layers, planes, n, T, H, D]``."""
        import torch

        kv, layout = self.engine_kv, self.engine_kv.layout
        good = self._verified(plan, positions, statuses)
        shape = (layout.num_layers, layout.kv_planes, len(good), layout.block_size,
                 kv.local_heads, layout.head_dim)
        if self._cuda:
            stage = torch.empty(shape, dtype=layout.torch_dtype(), pin_memory=True)
        else:  # reused: a fresh large buffer costs a page fault per 4 KiB on first touch
            n = len(good) * self._local_block_bytes // layout.itemsize
            if self._scratch is None or self._scratch.numel() < n:
                self._scratch = torch.empty(n, dtype=layout.torch_dtype())
            stage = self._scratch[:n].view(shape)
        if not good:
            return good, stage
        rows = _Rows([plan.copies[i].g2_slot for i in good], torch.device("cpu"))
        buf = self.pool.buffer
        for li in range(layout.num_layers):
            for p in range(layout.kv_planes):
                rows.gather(buf[:, li, p, :, kv.head_range], stage[li, p])
        after = self._verified(plan, good, statuses)  # the page may have changed meanwhile
        if len(after) < len(good):
            where = {i: k for k, i in enumerate(good)}
            stage = stage[:, :, [where[i] for i in after]]
        return after, stage

    def _page_planes(self) -> list[list[torch.Tensor]]:
        """Per layer and plane, this rank's heads of every page: ``[slots, T, H, D]``."""
        buf, hr = self.pool.buffer, self.engine_kv.head_range
        return [[buf[:, li, p, :, hr] for p in range(self.engine_kv.layout.kv_planes)]
                for li in range(self.engine_kv.layout.num_layers)]

    def _save_copy(self, g1: list[int], slots: list[int]) -> None:
        import torch

        kv, layout = self.engine_kv, self.engine_kv.layout
        pages, tiles = self._page_planes(), kv.tiles
        dst = _Rows(slots, torch.device("cpu"))
        if not self._cuda:
            src = _Rows(g1, kv.device)
            pairs = None  # runs adjacent on both sides: one memcpy-like copy each
            if (src.runs is not None and dst.runs is not None
                    and [(p, n) for p, _, n in src.runs] == [(p, n) for p, _, n in dst.runs]):
                pairs = [(s, d, n) for (_, s, n), (_, d, _) in zip(src.runs, dst.runs,
                                                                   strict=True)]
            for li in range(layout.num_layers):
                for p, e in enumerate(kv.planes(li)):
                    page = _split(pages[li][p], tiles[p])
                    if pairs is not None:
                        for s, d, n in pairs:
                            page[d:d + n].copy_(e[s:s + n])
                    else:
                        rows = torch.empty((len(g1), *e.shape[1:]), dtype=e.dtype)
                        src.gather(e, rows)
                        dst.scatter(page, rows)
            return
        # CUDA: gather on the GPU after the engine's stream, one DMA per layer and plane into
        # pinned staging, and only once that stream is done, scatter into the pages.
        stage = torch.empty((layout.num_layers, layout.kv_planes, len(g1), layout.block_size,
                             kv.local_heads, layout.head_dim), dtype=layout.torch_dtype(),
                            pin_memory=True)
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record(torch.cuda.current_stream(kv.device))
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)
            idx = torch.tensor(g1, dtype=torch.long, device=kv.device)
            for li in range(layout.num_layers):
                for p, e in enumerate(kv.planes(li)):
                    _split(stage[li, p], tiles[p]).copy_(e.index_select(0, idx),
                                                         non_blocking=True)
        self._stream.synchronize()
        for li in range(layout.num_layers):
            for p in range(layout.kv_planes):
                dst.scatter(pages[li][p], stage[li, p])

    def _scatter(self, stage: torch.Tensor, rows: _Rows) -> list[Any] | None:
        """Copy the staged pages into the engine: synchronously on the CPU; on CUDA on the
        side stream, returning one event per layer."""
        import torch

        kv, tiles = self.engine_kv, self.engine_kv.tiles
        if not self._cuda:
            for li in range(kv.layout.num_layers):
                for p, e in enumerate(kv.planes(li)):
                    rows.scatter(e, _split(stage[li, p], tiles[p]))
            return None
        events = []
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record(torch.cuda.current_stream(kv.device))
        if rows.index is not None:  # made on the engine's stream, used on ours until done
            rows.index.record_stream(self._stream)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)  # nothing the engine queued still uses these blocks
            for li in range(kv.layout.num_layers):
                for p, e in enumerate(kv.planes(li)):
                    part = stage[li, p].to(kv.device, non_blocking=True)
                    rows.scatter(e, _split(part, tiles[p]), non_blocking=True)
                ev = torch.cuda.Event()  # type: ignore[no-untyped-call]
                ev.record(self._stream)
                events.append(ev)
        return events

    def _result(self, plan: TransferPlan, statuses: list[CopyStatus | None]) -> PlanResult:
        return PlanResult(plan.plan_id, self.engine_kv.shard.rank,
                          tuple(s if s is not None else CopyStatus.FAILED for s in statuses))
