"""OffloadEngine: background workers that move pages between host memory and the tiers below.

The block manager is single-owner and must never wait on a slow tier, so every transfer to or
from a :class:`~kvbm.storage.base.PageStore` runs here, on one asyncio loop in a daemon thread
("kvbm-offload"). The manager *prepares* a transfer (pins the host pages it reads or writes),
submits it and gets a :class:`TransferHandle`; when the transfer finishes, the handle is put
on :attr:`OffloadEngine.completions`, which the manager drains on its own thread to *complete*
it (unpin, update residency, emit events). Pages stay pinned in between, so nothing can
overwrite a buffer a worker is reading or writing.

Each tier's queued transfers are coalesced into batches (one store call each), and up to
``concurrent_batches`` batches of one kind run at once, so that one batch's fixed costs (a
disk put's durable commit) overlap the next one's I/O; a batch of the other kind waits for
them, so a load never overtakes a store submitted before it.

Backpressure: each tier has a bound on pages in flight. A store submitted over the bound is
refused at once (:attr:`TransferStatus.SKIPPED`, counted): the engine is never blocked on a
slow tier, it only offloads less. Loads are never refused (the engine asked for them).
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import dataclasses
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from kvbm.checks import as_seconds, os_wait
from kvbm.errors import InvalidArgumentError, TransferError
from kvbm.medium import Medium

if TYPE_CHECKING:
    from kvbm.storage.base import PageStore

log = logging.getLogger(__name__)


class TransferKind(enum.Enum):
    STORE = "store"  # host pages -> tier
    LOAD = "load"  # tier -> host pages


class TransferStatus(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # ran; per-page results in ``results``
    FAILED = "failed"  # the tier raised; ``error`` says why, every page counts as failed
    CANCELLED = "cancelled"  # cancelled before it ran
    SKIPPED = "skipped"  # refused at submit time (backpressure)

    @property
    def finished(self) -> bool:
        return self not in (TransferStatus.QUEUED, TransferStatus.RUNNING)


@dataclass(eq=False)
class TransferHandle:
    """One batch of page transfers between host memory and one tier.

    ``keys[i]`` moves between the tier and ``buffers[i]`` (a host page). ``results[i]`` is
    ``True`` when that page was stored / loaded and verified. ``context`` is the submitter's
    own bookkeeping (the manager keeps the records and pages it pinned there).
    """

    kind: TransferKind
    medium: Medium
    keys: list[int]
    buffers: list[Any]
    context: Any = None
    #: for stores: each page's prefix parent (``None`` for a first block), so a tier's
    #: lineage-aware eviction knows the tree
    parents: list[int | None] | None = None
    status: TransferStatus = TransferStatus.QUEUED
    results: list[bool] = field(default_factory=list)
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    _event: threading.Event = field(default_factory=threading.Event, repr=False)
    _cancel: bool = field(default=False, repr=False)

    def done(self) -> bool:
        """Whether the transfer finished (in any way)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished (at most ``timeout`` seconds, finite and >= 0; ``None``: no
        limit); returns :meth:`done`."""
        return self._event.wait(os_wait(as_seconds(timeout, "timeout")))

    def cancel(self) -> bool:
        """Ask not to run it. True when it had not started (it will end CANCELLED)."""
        self._cancel = True
        return self.status is TransferStatus.QUEUED

    @property
    def ok_keys(self) -> list[int]:
        return [k for k, ok in zip(self.keys, self.results, strict=False) if ok]

    def _finish(self, status: TransferStatus, results: list[bool] | None = None,
                error: BaseException | None = None) -> None:
        self.status = status
        self.results = results if results is not None else [False] * len(self.keys)
        self.error = error
        self.finished_at = time.monotonic()
        self._event.set()


class PagePairs(Sequence[tuple[int, Any]]):
    """``(key, buffer)`` pairs kept as two parallel lists, made into tuples only as they
    are read (:meth:`PageStore.put` and ``get`` take a sequence of pairs).

    A batch is thousands of pages, and a list of tuples would hold one tracked object per
    page for the whole transfer (a tuple holding a memoryview stays tracked): the cyclic GC
    promotes them and, a few batches on, runs full collections, which cost ~100 ms each in
    a process that holds torch. Iterating zips the lists, and ``zip`` reuses its tuple when
    the consumer drops it (as ``for key, buf in pairs`` does), so reading them allocates
    nothing per page either. Stores that know the type read :attr:`keys` and
    :attr:`buffers` directly.
    """

    __slots__ = ("buffers", "keys")

    def __init__(self, keys: list[int], buffers: list[Any]) -> None:
        if len(keys) != len(buffers):
            raise TransferError("a transfer needs one buffer per key")
        self.keys = keys
        self.buffers = buffers

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        return zip(self.keys, self.buffers, strict=True)

    @overload
    def __getitem__(self, i: int) -> tuple[int, Any]: ...
    @overload
    def __getitem__(self, i: slice) -> PagePairs: ...
    def __getitem__(self, i: int | slice) -> tuple[int, Any] | PagePairs:
        if isinstance(i, slice):
            return PagePairs(self.keys[i], self.buffers[i])
        return self.keys[i], self.buffers[i]


#: Upper bounds (seconds) of the transfer latency buckets. Fixed, so that histograms of
#: several processes and restarts add up; from a page cache hit on local disk (~1 ms) to an
#: object store answering late (tens of seconds). An implied +Inf bucket is ``count``.
LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                      0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class LatencyHistogram:
    """Latencies of finished transfers, as a Prometheus histogram keeps them:
    ``buckets[i]`` counts those that took at most ``bounds[i]`` seconds (cumulative)."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS
    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    count: int = 0
    sum_seconds: float = 0.0

    def observe(self, seconds: float) -> None:
        # One observation per transfer (a batch of pages), not per page: a dozen increments
        # are nothing next to the I/O.
        b = self.buckets
        for i in range(bisect.bisect_left(self.bounds, seconds), len(b)):
            b[i] += 1
        self.count += 1
        self.sum_seconds += seconds

    def copy(self) -> LatencyHistogram:
        return LatencyHistogram(self.bounds, list(self.buckets), self.count, self.sum_seconds)


@dataclass
class TierQueueStats:
    """Counters of one tier's offload queue (monotonic), and its depth when taken."""

    submitted: int = 0
    skipped: int = 0  # refused by backpressure
    cancelled: int = 0
    failed: int = 0  # the tier raised
    pages_ok: int = 0
    pages_failed: int = 0
    bytes: int = 0
    busy_seconds: float = 0.0
    #: pages and bytes that arrived, per direction (host -> tier, tier -> host)
    pages_stored: int = 0
    bytes_stored: int = 0
    pages_loaded: int = 0
    bytes_loaded: int = 0
    #: at the time of the snapshot: pages submitted and not finished, transfers waiting
    inflight_pages: int = 0
    queued_transfers: int = 0
    #: seconds from submit to finish of the transfers that ran (done or failed)
    store_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    load_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class _TierWorker:
    """The queue and worker task of one tier (lives on the engine's loop)."""

    def __init__(self, store: PageStore, max_inflight_pages: int, batch_pages: int,
                 concurrent_batches: int) -> None:
        self.store = store
        self.max_inflight_pages = max_inflight_pages
        self.batch_pages = batch_pages
        self.concurrent_batches = concurrent_batches
        self.running: set[asyncio.Task[None]] = set()  # its batches being run
        self.running_kind: TransferKind | None = None
        self.busy_since = 0.0  # perf_counter() when ``running`` last became non-empty
        self.inflight_pages = 0  # guarded by the engine lock
        self.queue: asyncio.Queue[TransferHandle | None] = asyncio.Queue()
        self.stats = TierQueueStats()
        self.task: asyncio.Task[None] | None = None


class OffloadEngine:
    """Runs page transfers of several tiers on one background asyncio loop."""

    def __init__(self, *, max_inflight_pages: int = 4096, batch_bytes: int = 128 << 20,
                 concurrent_batches: int = 2,
                 on_complete: Callable[[TransferHandle], None] | None = None) -> None:
        for name, value in (("max_inflight_pages", max_inflight_pages),
                            ("batch_bytes", batch_bytes),
                            ("concurrent_batches", concurrent_batches)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be an int >= 1, got {value!r}")
        if on_complete is not None and not callable(on_complete):
            raise InvalidArgumentError(f"on_complete must be a callable or None, got "
                                       f"{on_complete!r}")
        self.max_inflight_pages = max_inflight_pages
        #: batches of one kind a tier runs at once. Two keep a tier's device busy: while
        #: one batch's call is in its fixed costs (a disk put's durable commit and
        #: publishing its pages, a get's bookkeeping), the next one's I/O is running. A
        #: batch of the other kind waits until they are all done, so a load never
        #: overtakes a store submitted before it.
        self.concurrent_batches = concurrent_batches
        #: queued transfers of a tier are coalesced into calls of up to this many bytes (one
        #: durable commit, one set of pack uploads per call); by bytes, not pages, so that
        #: small and large pages both make calls of a useful size
        self.batch_bytes = batch_bytes
        #: finished handles, for the owner thread to complete (thread-safe; its size is
        #: bounded by the transfers in flight). Unused when ``on_complete`` is given.
        self.completions: queue.SimpleQueue[TransferHandle] = queue.SimpleQueue()
        self._on_complete = on_complete or self.completions.put
        self._lock = threading.Lock()
        self._workers: dict[Medium, _TierWorker] = {}
        self._loop = asyncio.new_event_loop()
        self._closed = False
        self._thread = threading.Thread(target=self._run_loop, name="kvbm-offload", daemon=True)
        self._thread.start()

    # -- lifecycle ---------------------------------------------------------------------------
    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def run(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the engine's loop from another thread and wait for it."""
        if self._closed:
            raise TransferError("the offload engine is shut down")
        try:
            limit = os_wait(as_seconds(timeout, "timeout"))
        except InvalidArgumentError:
            if asyncio.iscoroutine(coro):
                coro.close()  # never to run: no "was never awaited" warning later
            raise
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(limit)

    def add_tier(self, store: PageStore, *, max_inflight_pages: int | None = None,
                 batch_bytes: int | None = None) -> None:
        w = _TierWorker(store, max_inflight_pages or self.max_inflight_pages,
                        max(1, (batch_bytes or self.batch_bytes) // store.page_bytes),
                        self.concurrent_batches)

        async def start() -> None:
            w.queue = asyncio.Queue()
            w.task = asyncio.get_running_loop().create_task(self._work(w))

        self.run(start())
        self._workers[store.medium] = w

    def tiers(self) -> list[Medium]:
        return list(self._workers)

    def _worker(self, medium: Medium) -> _TierWorker:
        try:
            return self._workers[medium]
        except (KeyError, TypeError):  # TypeError: unhashable
            if not isinstance(medium, Medium):
                raise InvalidArgumentError(f"medium must be a Medium, got {medium!r}") from None
            raise TransferError(f"no {medium.value} tier in the offload engine") from None

    def store(self, medium: Medium) -> PageStore:
        return self._worker(medium).store

    def stats(self, medium: Medium) -> TierQueueStats:
        """A snapshot of the tier's queue counters (safe from any thread, also after
        shutdown); the histograms are copied under the lock they are recorded under."""
        w = self._worker(medium)
        with self._lock:
            return dataclasses.replace(
                w.stats, inflight_pages=w.inflight_pages, queued_transfers=w.queue.qsize(),
                store_latency=w.stats.store_latency.copy(),
                load_latency=w.stats.load_latency.copy())

    def inflight_pages(self, medium: Medium) -> int:
        return self._worker(medium).inflight_pages

    def store_room(self, medium: Medium) -> int:
        """Pages a store to ``medium`` submitted now may have without being refused
        (:attr:`TransferStatus.SKIPPED`); loads in flight count against the bound too."""
        w = self._worker(medium)
        return 0 if self._closed else w.max_inflight_pages - w.inflight_pages

    def shutdown(self, *, flush: bool = True, timeout: float | None = 60.0) -> None:
        """Stop the workers. ``flush``: finish every queued transfer first; otherwise queued
        transfers end CANCELLED (running ones still finish: their buffers are in use).
        Closes the stores. Idempotent.

        Waits at most ``timeout`` seconds (``None``: as long as it takes); past it, the loop
        is stopped anyway, transfers still under way never finish and the stores are left
        unclosed, and :class:`~kvbm.errors.TransferError` says so."""
        if self._closed:
            return
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, int | float)
                                    or not 0 <= timeout < float("inf")):
            raise InvalidArgumentError(f"timeout must be a finite number of seconds >= 0 or "
                                       f"None, got {timeout!r}")

        async def stop() -> None:
            for w in self._workers.values():
                if not flush:
                    while not w.queue.empty():
                        h = w.queue.get_nowait()
                        if h is not None:
                            self._finish(w, h, TransferStatus.CANCELLED)
                await w.queue.put(None)
            for w in self._workers.values():
                if w.task is not None:
                    await w.task
            for w in self._workers.values():
                try:
                    await w.store.close()
                except Exception:
                    log.exception("closing the %s tier failed", w.store.medium.value)

        try:
            self.run(stop(), timeout)  # (run takes a huge timeout as no limit)
        except (TimeoutError, concurrent.futures.TimeoutError):  # one class from 3.11 on
            raise TransferError(f"the offload workers did not stop within {timeout} s (a tier "
                                f"is stuck); their transfers were abandoned") from None
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(os_wait(timeout))

    # -- submission (any thread) ---------------------------------------------------------------
    def submit(self, handle: TransferHandle) -> TransferHandle:
        """Queue a transfer. A store over the tier's in-flight bound ends SKIPPED at once."""
        if not isinstance(handle, TransferHandle):
            raise InvalidArgumentError(f"submit needs a TransferHandle, got "
                                       f"{type(handle).__name__}")
        w = self._workers.get(handle.medium)
        if w is None:
            raise TransferError(f"no {handle.medium.value} tier in the offload engine")
        if len(handle.keys) != len(handle.buffers):
            raise TransferError("a transfer needs one buffer per key")
        n = len(handle.keys)
        with self._lock:
            refused = TransferStatus.CANCELLED if self._closed else None
            if (refused is None and handle.kind is TransferKind.STORE
                    and w.inflight_pages + n > w.max_inflight_pages):
                w.stats.skipped += 1
                refused = TransferStatus.SKIPPED
            if refused is None:
                w.inflight_pages += n
                w.stats.submitted += 1
        if refused is not None:
            handle._finish(refused)
            self._on_complete(handle)
            return handle
        self._loop.call_soon_threadsafe(w.queue.put_nowait, handle)
        return handle

    # -- workers (engine loop) -------------------------------------------------------------------
    async def _work(self, w: _TierWorker) -> None:
        try:
            while True:
                h = await w.queue.get()
                if h is None:
                    return
                batch = [h]
                # Coalesce queued transfers of the same kind into one call: a tier batches
                # better (one fsync, one pack object) than many small calls.
                pages = len(h.keys)
                stop = False
                while pages < w.batch_pages and not w.queue.empty():
                    nxt = w.queue.get_nowait()
                    if nxt is None:
                        stop = True
                        break
                    if nxt.kind is not h.kind:
                        await self._launch(w, batch)
                        batch, h, pages = [nxt], nxt, 0
                    else:
                        batch.append(nxt)
                    pages += len(nxt.keys)
                await self._launch(w, batch)
                if stop:
                    return
        finally:
            await self._drain(w)

    async def _launch(self, w: _TierWorker, batch: list[TransferHandle]) -> None:
        """Start running ``batch`` once the tier has room for it: fewer than
        ``concurrent_batches`` running, all of its kind."""
        kind = batch[0].kind
        if kind is not w.running_kind:
            await self._drain(w)
            w.running_kind = kind
        while len(w.running) >= w.concurrent_batches:
            await asyncio.wait(w.running, return_when=asyncio.FIRST_COMPLETED)
        if not w.running:
            w.busy_since = time.perf_counter()
        task = asyncio.get_running_loop().create_task(self._run_batch(w, batch))
        w.running.add(task)
        task.add_done_callback(lambda t: self._batch_done(w, t))

    def _batch_done(self, w: _TierWorker, task: asyncio.Task[None]) -> None:
        w.running.discard(task)
        if not w.running:
            # Busy time is wall time with a batch running, however many overlapped.
            w.stats.busy_seconds += time.perf_counter() - w.busy_since
        if not task.cancelled() and task.exception() is not None:
            log.error("%s transfer worker failed", w.store.medium.value,
                      exc_info=task.exception())

    async def _drain(self, w: _TierWorker) -> None:
        """Wait for every batch of ``w`` being run."""
        while w.running:
            await asyncio.wait(list(w.running))

    async def _run_batch(self, w: _TierWorker, batch: list[TransferHandle]) -> None:
        live = []
        for h in batch:
            if h._cancel:
                self._finish(w, h, TransferStatus.CANCELLED)
            else:
                h.status = TransferStatus.RUNNING
                live.append(h)
        if not live:
            return
        # Flat lists of keys and buffers, not a tuple per page (see PagePairs).
        if len(live) == 1:
            items = PagePairs(live[0].keys, live[0].buffers)
        else:
            items = PagePairs([k for h in live for k in h.keys],
                              [b for h in live for b in h.buffers])
        try:
            if live[0].kind is TransferKind.STORE:
                parents = None
                if all(h.parents is not None for h in live):
                    parents = [p for h in live for p in (h.parents or ())]
                results = await w.store.put(items, parents=parents)
            else:
                results = await w.store.get(items)
        except Exception as e:
            w.stats.failed += len(live)
            log.warning("%s %s of %d pages failed: %s", w.store.medium.value,
                        live[0].kind.value, len(items), e)
            for h in live:
                self._finish(w, h, TransferStatus.FAILED, error=e)
            return
        i = 0
        for h in live:
            res = [bool(x) for x in results[i: i + len(h.keys)]]
            i += len(h.keys)
            ok = sum(res)
            w.stats.pages_ok += ok
            w.stats.pages_failed += len(res) - ok
            w.stats.bytes += ok * w.store.page_bytes
            if h.kind is TransferKind.STORE:
                w.stats.pages_stored += ok
                w.stats.bytes_stored += ok * w.store.page_bytes
            else:
                w.stats.pages_loaded += ok
                w.stats.bytes_loaded += ok * w.store.page_bytes
            self._finish(w, h, TransferStatus.DONE, res)

    def _finish(self, w: _TierWorker, h: TransferHandle, status: TransferStatus,
                results: list[bool] | None = None, error: BaseException | None = None) -> None:
        with self._lock:
            w.inflight_pages -= len(h.keys)
            if status is TransferStatus.DONE or status is TransferStatus.FAILED:
                hist = (w.stats.store_latency if h.kind is TransferKind.STORE
                        else w.stats.load_latency)
                hist.observe(time.monotonic() - h.submitted_at)
        if status is TransferStatus.CANCELLED:
            w.stats.cancelled += 1
        h._finish(status, results, error)
        self._on_complete(h)
