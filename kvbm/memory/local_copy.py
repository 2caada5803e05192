"""Copies between kvbm's own G1 and G2 (standalone mode), off the control thread.

The manager decides which pages move; a :class:`LocalCopier` moves them and hands back a
:class:`CopyTicket` the manager polls (``done()``) from its drain loop. Until a ticket is
done the manager keeps the pages on both sides held, and only then makes the copy visible
to anything that reads G2 from the host (the tiers below, events).

Three engines (:class:`kvbm.config.CopyEngine`):

* **inline**: the copy runs inside ``submit``. A CPU G1 is host memory: the copy is a
  memcpy, nothing to overlap with a device.
* **thread**: one copy thread, first in first out. Offloads of committed blocks overlap the
  engine's own work; ``order_consumer`` copies (the engine reads or rewrites the pages next)
  are waited for, since a CPU engine has no stream to order after them.
* **stream**: a CUDA side stream. The side stream first waits for the engine's current
  stream (the pages it computed are written), the copy is queued, an event recorded; with
  ``order_consumer`` the engine's current stream waits for that event on the device. The
  host never waits: ``done()`` is ``event.query()``.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvbm.config import CopyEngine
from kvbm.errors import TransferError
from kvbm.pool import DevicePool, HostPool, copy_blocks

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Pool = DevicePool | HostPool


class CopyTicket(abc.ABC):
    """One submitted batch of page copies."""

    @abc.abstractmethod
    def done(self) -> bool:
        """Whether the copy has landed (never blocks)."""

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until the copy has landed; :class:`~kvbm.errors.TransferError` if it
        failed."""


class LocalCopier(abc.ABC):
    """Moves pages between two pools of one process."""

    engine: CopyEngine

    @abc.abstractmethod
    def submit(self, src: Pool, src_slots: Sequence[int], dst: Pool, dst_slots: Sequence[int],
               *, order_consumer: bool) -> CopyTicket:
        """Start copying ``src[src_slots[i]]`` to ``dst[dst_slots[i]]``. ``order_consumer``:
        the engine will read or overwrite these pages next, so its work must come after the
        copy (device-side ordering where there is a device)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Wait for every copy submitted, then stop (idempotent)."""


class _Landed(CopyTicket):
    """A copy already complete when submit returned."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


_LANDED = _Landed()


class InlineCopier(LocalCopier):
    engine = CopyEngine.INLINE

    def submit(self, src: Pool, src_slots: Sequence[int], dst: Pool, dst_slots: Sequence[int],
               *, order_consumer: bool) -> CopyTicket:
        copy_blocks(src, src_slots, dst, dst_slots)
        return _LANDED

    def close(self) -> None:
        return None


class _ThreadTicket(CopyTicket):
    __slots__ = ("_event", "error")

    def __init__(self) -> None:
        self._event = threading.Event()
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        self._event.wait()
        if self.error is not None:
            raise TransferError(f"a G1/G2 page copy failed: {self.error}") from self.error


class ThreadCopier(LocalCopier):
    """One daemon thread runs the copies in submission order."""

    engine = CopyEngine.THREAD

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[_ThreadTicket, tuple[Any, ...]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name="kvbm-copy", daemon=True)
        self._closed = False
        self._last: _ThreadTicket | None = None
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            ticket, args = item
            try:
                copy_blocks(*args)
            except BaseException as e:  # handed to the waiter: the thread must live on
                log.error("G1/G2 page copy failed: %s", e)
                ticket.error = e
            ticket._event.set()

    def submit(self, src: Pool, src_slots: Sequence[int], dst: Pool, dst_slots: Sequence[int],
               *, order_consumer: bool) -> CopyTicket:
        if self._closed:
            raise TransferError("the copy thread is closed")
        ticket = _ThreadTicket()
        self._queue.put((ticket, (src, list(src_slots), dst, list(dst_slots))))
        self._last = ticket
        if order_consumer:
            # A CPU engine has no stream to queue its next step behind the copy.
            ticket.wait()
        return ticket

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join()


class _StreamTicket(CopyTicket):
    __slots__ = ("_event",)

    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def done(self) -> bool:
        return bool(self._event.query())  # type: ignore[no-untyped-call]

    def wait(self) -> None:
        self._event.synchronize()


class StreamCopier(LocalCopier):
    """Copies on a CUDA side stream of G1's device, completed through events."""

    engine = CopyEngine.STREAM

    def __init__(self, device: torch.device) -> None:
        import torch

        self._torch = torch
        self._device = device
        self._stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
        self._last: _StreamTicket | None = None

    def submit(self, src: Pool, src_slots: Sequence[int], dst: Pool, dst_slots: Sequence[int],
               *, order_consumer: bool) -> CopyTicket:
        torch = self._torch
        engine_stream = torch.cuda.current_stream(self._device)
        side = self._stream
        # The engine's stream wrote the pages being offloaded (or last read the ones being
        # overwritten): the side stream starts after everything queued there so far.
        side.wait_stream(engine_stream)
        with torch.cuda.stream(side):
            copy_blocks(src, src_slots, dst, dst_slots, sync=False)
        event = torch.cuda.Event()
        event.record(side)
        if order_consumer:
            engine_stream.wait_event(event)
        ticket = _StreamTicket(event)
        self._last = ticket
        return ticket

    def close(self) -> None:
        self._stream.synchronize()


def make_copier(engine: CopyEngine, device: torch.device) -> LocalCopier:
    """The copier ``engine`` names for a G1 on ``device`` (AUTO: stream on CUDA)."""
    if engine is CopyEngine.AUTO:
        engine = CopyEngine.STREAM if device.type == "cuda" else CopyEngine.INLINE
    if engine is CopyEngine.STREAM:
        if device.type != "cuda":
            from kvbm.errors import ConfigError

            raise ConfigError(f"device.copies = \"stream\" needs G1 on a CUDA device; it is "
                              f"on {device}")
        return StreamCopier(device)
    if engine is CopyEngine.THREAD:
        return ThreadCopier()
    return InlineCopier()
