"""UCX plumbing of the ``ucx`` backend: the lazy ucxx import, one UCX context per process,
workers driven in blocking mode, and region ranges as ucxx buffers.

Progress is *blocking* (``progress_worker_event``: epoll on the worker's wake-up fd), never
a polling thread: on a machine with few cores a spinning progress loop competes with the
peer process for the CPU, and sm transfers of 2 MiB ran ~20x slower that way (0.37 vs 7.9
GB/s measured on the 2-core development machine). A worker is progressed by one thread at
a time (whoever holds its link: the link pool's lock, or the start of the thread a
transfer is handed to, orders them), so ucxx needs no locks of ours.

Memory safety without UCX's error handling: on one host every byte a worker moves into
local memory is copied by that worker's own progress calls (sm copies, CMA reads, tcp
receives). A transfer that is abandoned (cancelled, timed out, peer gone) therefore stops
touching local memory the moment its worker is no longer progressed; the worker and its
pending requests are then dropped, and the request objects keep the buffers referenced.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

import numpy as np

from kvbm.errors import TransportError, TransportTimeoutError
from kvbm.transports.handle import TransferCancelled
from kvbm.transports.regions import DeviceKind, RegionHandle

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Per transfer, descriptor ``i`` travels with tag ``base | i``; ``base`` is a per-link
#: sequence number shifted past the index (descriptors per transfer: at most 2**20).
TAG_INDEX_BITS = 20
TAG_INDEX_MASK = (1 << TAG_INDEX_BITS) - 1
#: The index of a transfer's answer message (WRITE: every range landed); above any
#: descriptor's index (``MAX_DESCRIPTORS`` is 2**18).
ANSWER = TAG_INDEX_MASK
#: Coalescing (see :mod:`kvbm.transports.ucx`): a run of host ranges each shorter than
#: SMALL_BYTES travels as one message of at most GROUP_BYTES, staged through a buffer of
#: the link's (each side holds at most STAGING_BYTES of it per link). A message per range
#: cost ~20-50 us of Python and UCX each; a copy of 32 KiB costs ~3 us.
SMALL_BYTES = 256 << 10
GROUP_BYTES = 1 << 20
STAGING_BYTES = 16 << 20
#: A UCX worker address is ~50-300 bytes; anything larger from a peer is refused.
MAX_ADDRESS_BYTES = 64 << 10
#: Header byte and worker id at least.
_MIN_ADDRESS_BYTES = 9
#: The address format's version: the low bits of its first byte (UCX's address.c).
_ADDRESS_VERSION_BITS = 0x0F
#: Longest single wait in the progress loop: cancellation and a dead socket are seen
#: within this time.
_SLICE_MS = 50

_lock = threading.Lock()
_contexts: dict[tuple[Any, ...], Any] = {}



def ucxx() -> Any:
    """The ``ucxx._lib.libucxx`` module (imported on first use: ~1.5 s, and it sets a few
    ``UCX_*`` defaults in the environment)."""
    # ucxx sets UCX_RNDV_FRAG_MEM_TYPE=cuda even without CUDA; UCX then warns on every
    # context that the variable is unused. Silence that unless the user chose otherwise,
    # and send UCX's own log to stderr (its default, stdout, is where `--json` benches
    # and command loops write their answers).
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    os.environ.setdefault("UCX_LOG_FILE", "stderr")
    import ucxx._lib.libucxx as lib

    return lib


def as_array(obj: object) -> Any:
    from ucxx._lib.arr import Array

    return Array(obj)


def context(options: dict[str, str], rma: bool = False) -> Any:
    """The process's UCX context for ``options`` (UCX config keys without the ``UCX_``
    prefix; ``UCX_*`` environment variables apply as usual), created on first use. Only
    ``rma`` contexts (:mod:`kvbm.transports.ucx_rma`) have UCX's RMA feature: with it, a
    peer's endpoint could write this process's memory without a serving-side check."""
    # UCX reads UCX_* variables when a context is made: a change (a test switching
    # UCX_TLS) needs a context of its own.
    key = (rma, *sorted(options.items()), *sorted(
        (k, v) for k, v in os.environ.items() if k.startswith("UCX_")))
    with _lock:
        ctx = _contexts.get(key)
        if ctx is None:
            lib = ucxx()
            features = (lib.Feature.TAG, lib.Feature.WAKEUP) + ((lib.Feature.RMA,) if rma
                                                                else ())
            ctx = _contexts[key] = lib.UCXContext(dict(options), feature_flags=features)
            log.info("ucx: UCX %s context (TLS=%s, NET_DEVICES=%s)",
                     ".".join(map(str, lib.get_ucx_version())),
                     ctx.config.get("TLS", "?"), ctx.config.get("NET_DEVICES", "?"))
        return ctx


class Worker:
    """A UCX worker and one endpoint to the peer's worker (see the module)."""

    def __init__(self, ctx: Any) -> None:
        lib = ucxx()
        self._lib = lib
        self.worker = lib.UCXWorker(ctx)
        self.worker.init_blocking_progress_mode()
        self.ep: Any = None
        self.cuda = bool(ctx.cuda_support)

    @property
    def address(self) -> bytes:
        return bytes(self.worker.address.tobytes())

    def connect(self, address: object) -> None:
        """Connect the endpoint to a peer's worker ``address``.

        UCX *asserts* on a malformed address (the process aborts), so what the peer sent
        is checked first: a byte string of sane length whose header has the address
        version of our own UCX (random bytes, or a peer on another UCX, are refused).
        Deliberately crafted addresses can still reach UCX: the peer is authenticated,
        and one that holds the secret is trusted not to forge UCX's wire format."""
        mine = self.address
        if (not isinstance(address, bytes) or not _MIN_ADDRESS_BYTES <= len(address)
                <= MAX_ADDRESS_BYTES or (address[0] ^ mine[0]) & _ADDRESS_VERSION_BITS):
            raise TransportError("peer sent something that is no UCX worker address of "
                                 "this UCX version")
        try:
            addr = self._lib.UCXAddress.create_from_buffer(address)
            # No error handling: it would make UCX drop its shared-memory transports, and a
            # dead peer is noticed on the socket and by timeouts instead (module docstring).
            self.ep = self._lib.UCXEndpoint.create_from_worker_address(
                self.worker, addr, endpoint_error_handling=False)
        except Exception as e:  # the peer's worker is gone, or the address is not UCX's
            raise TransportError(f"ucx: cannot reach the peer's worker: {e}") from None

    def send(self, buf: Any, tag: int) -> Any:
        return self.ep.tag_send(as_array(buf), tag=self._lib.UCXXTag(tag))

    def recv(self, buf: Any, tag: int) -> Any:
        # Endpoint-level (not worker-level) receives: the endpoint tracks them. Matching is
        # by tag alone, and only this link's peer knows this worker's address.
        return self.ep.tag_recv(as_array(buf), tag=self._lib.UCXXTag(tag))

    def flush(self) -> None:
        """Progress without blocking (acknowledgements of finished transfers)."""
        self.worker.progress()

    def drive(self, reqs: Sequence[Any], timeout: float, *,
              cancelled: Callable[[], bool] | None = None, sock: socket.socket | None = None,
              tolerate: Callable[[BaseException], bool] | None = None) -> None:
        """Progress until every request of ``reqs`` completed; raise the first error (one
        ``tolerate`` accepts is ignored). :class:`TransportTimeoutError` when none completed
        for ``timeout`` s, :class:`TransferCancelled` once ``cancelled()`` says so,
        :class:`TransportError` when ``sock`` is closed by the peer meanwhile."""
        finish(self.drive_steps(reqs, timeout, cancelled=cancelled, sock=sock,
                                tolerate=tolerate))

    def drive_steps(self, reqs: Sequence[Any], timeout: float, *,
                    cancelled: Callable[[], bool] | None = None,
                    sock: socket.socket | None = None,
                    tolerate: Callable[[BaseException], bool] | None = None,
                    hold: float = 0.0) -> Generator[None, None, None]:
        """:meth:`drive` in steps: it sleeps in this thread for ``hold`` s at most, then
        yields once (its consumer may go on with it in another thread), then goes on."""
        i, n = 0, len(reqs)
        now = time.monotonic()
        deadline, held = now + timeout, (now + hold if hold > 0 else 0.0)
        while True:
            self.worker.progress()
            start = i
            while i < n and reqs[i].completed:
                i += 1
            if i == n and all(r.completed for r in reqs):
                break
            now = time.monotonic()
            if i != start:
                deadline = now + timeout
            if cancelled is not None and cancelled():
                raise TransferCancelled("cancelled")
            if now > deadline:
                raise TransportTimeoutError(f"ucx: no progress for {timeout} s "
                                            f"({i} of {n} operations done)")
            if sock is not None and peer_closed(sock):
                raise TransportError("ucx: the peer closed the connection mid-transfer")
            if held and now >= held:
                held = 0.0
                yield
                continue
            wait = _SLICE_MS if not held else max(1, min(_SLICE_MS, int((held - now) * 1e3)))
            self.worker.progress_worker_event(wait)
        for r in reqs:
            try:
                r.check_error()
            except Exception as e:
                if tolerate is not None and tolerate(e):
                    continue
                raise TransportError(f"ucx: {type(e).__name__}: {e}") from None

    def arrived(self, tag: int) -> bool:
        """Whether a message tagged ``tag`` waits to be received (its data, or UCX's
        rendezvous request for it, is here; the message stays queued)."""
        return bool(self.worker.tag_probe(self._lib.UCXXTag(tag)).matched)

    def wait_readable(self, sock: socket.socket, timeout: float,
                      cancelled: Callable[[], bool] | None = None, *,
                      tag: int | None = None) -> bool:
        """Progress (blocking on the worker's wake-up fd) until ``sock`` is readable
        (``False``) or, with ``tag``, a message so tagged arrived first (``True``)."""
        return finish(self.wait_steps(sock, timeout, cancelled, tag=tag))

    def wait_steps(self, sock: socket.socket, timeout: float,
                   cancelled: Callable[[], bool] | None = None, *, tag: int | None = None,
                   hold: float = 0.0) -> Generator[None, None, bool]:
        """:meth:`wait_readable` in steps (``hold``: as in :meth:`drive_steps`)."""
        epfd = self.worker.epoll_file_descriptor
        now = time.monotonic()
        deadline, held = now + timeout, (now + hold if hold > 0 else 0.0)
        while True:
            self.worker.progress()
            if tag is not None and self.arrived(tag):
                return True
            if readable(sock, 0):
                return False
            if cancelled is not None and cancelled():
                raise TransferCancelled("cancelled")
            now = time.monotonic()
            if now > deadline:
                raise TransportTimeoutError(f"ucx: the peer did not answer within {timeout} s")
            if held and now >= held:
                held = 0.0
                yield
                continue
            if self.worker.arm():  # nothing pending: sleep until UCX or the socket wakes us
                readable(sock, _SLICE_MS / 1000 if not held else min(_SLICE_MS / 1000,
                                                                      held - now), epfd)

    def progress_until_readable(self, sock: socket.socket) -> None:
        """Progress this worker until ``sock`` is readable (or closed), sleeping on both in
        between, with no timeout: what a one-sided link's serving side does between
        requests, as UCX emulates RMA with messages that need its progress where no
        transport of its does RMA (tcp)."""
        epfd = self.worker.epoll_file_descriptor
        while True:
            self.worker.progress()
            if readable(sock, 0):
                return
            if self.worker.arm():
                readable(sock, None, epfd)

    def close(self) -> None:
        """Close the endpoint (bounded: a dead peer does not hold it up) and drop both."""
        ep, self.ep = self.ep, None
        if ep is not None:
            try:
                req = ep.close()
                end = time.monotonic() + 0.5
                while not req.completed and time.monotonic() < end:
                    self.worker.progress_worker_event(_SLICE_MS)
            except Exception as e:  # closing is best effort; the worker goes either way
                log.debug("ucx: closing an endpoint: %s", e)
        self.worker = None


def finish(steps: Generator[None, None, T]) -> T:
    """Run ``steps`` to the end in this thread; what it returns."""
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


def readable(sock: socket.socket, timeout: float | None, *more: int) -> bool:
    """Whether ``sock`` is readable within ``timeout`` s (``None``: however long it takes;
    ``more`` fds also end the wait)."""
    try:
        fd = sock.fileno()
        ready = select.select([fd, *more], [], [], timeout)[0]
    except (OSError, ValueError):
        return True  # a closed socket: the read that follows says what happened
    return fd in ready


def peer_closed(sock: socket.socket) -> bool:
    """Whether the peer closed ``sock`` (readable with nothing to read), without waiting."""
    try:
        readable = select.select([sock], [], [], 0)[0]
        return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


def truncated(e: BaseException) -> bool:
    """A receive into a buffer shorter than the message (how refused WRITEs are drained)."""
    return "Truncated" in type(e).__name__


def group(lengths: Sequence[int], host: Sequence[bool]) -> list[int]:
    """How many consecutive ranges each message carries: runs of small host ranges
    (``host[i]``: host memory on both sides) coalesced, every other range alone."""
    counts: list[int] = []
    run = run_bytes = 0
    for n, ok in zip(lengths, host, strict=True):
        if ok and n < SMALL_BYTES:
            if run and run_bytes + n <= GROUP_BYTES:
                run, run_bytes = run + 1, run_bytes + n
                continue
            if run:
                counts.append(run)
            run, run_bytes = 1, n
            continue
        if run:
            counts.append(run)
            run = run_bytes = 0
        counts.append(1)
    if run:
        counts.append(run)
    return counts


def messages(counts: Sequence[int], lengths: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(first range, end range, bytes)`` of each message. Raises ValueError when
    ``counts`` do not fit ``lengths`` or a group exceeds GROUP_BYTES (what a peer sent
    is checked with this)."""
    out: list[tuple[int, int, int]] = []
    lo = 0
    for c in counts:
        hi = lo + c
        if c < 1 or hi > len(lengths):
            raise ValueError("message counts do not add up to the ranges")
        nbytes = sum(lengths[lo:hi]) if c > 1 else lengths[lo]
        if c > 1 and nbytes > GROUP_BYTES:
            raise ValueError(f"a coalesced message of {nbytes} bytes (at most {GROUP_BYTES})")
        out.append((lo, hi, nbytes))
        lo = hi
    if lo != len(lengths):
        raise ValueError("message counts do not add up to the ranges")
    return out


def windows(msgs: Sequence[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Consecutive messages whose coalesced ones fit the staging buffer together: each side
    moves a window, waits for it and then reuses the buffer for the next. The two sides
    need not agree on them: each goes through the messages in order."""
    out: list[tuple[int, int]] = []
    start = staged = 0
    for m, (lo, hi, n) in enumerate(msgs):
        if hi - lo > 1:
            if staged + n > STAGING_BYTES:
                out.append((start, m))
                start, staged = m, 0
            staged += n
    out.append((start, len(msgs)))
    return out


def staged_bytes(msgs: Sequence[tuple[int, int, int]], first: int, end: int) -> int:
    """The staging bytes messages ``first`` to ``end`` need."""
    return sum(n for lo, hi, n in msgs[first:end] if hi - lo > 1)


class Staging:
    """A link's buffer for coalesced messages, allocated on first use, grown to at most
    STAGING_BYTES (a request still in flight keeps a replaced one alive)."""

    def __init__(self) -> None:
        self._buf = memoryview(b"")

    def get(self, n: int) -> memoryview:
        if len(self._buf) < n:
            size = min(STAGING_BYTES, max(n, 2 * len(self._buf), 1 << 20))
            self._buf = np.empty(max(size, n), np.uint8).data
        return self._buf


def drive_staged(w: Worker, reqs: Sequence[Any],
                 staged: Sequence[tuple[int, memoryview, Sequence[memoryview]]],
                 timeout: float, hold: Callable[[], float] = lambda: 0.0,
                 **kw: Any) -> Generator[None, None, None]:
    """:meth:`Worker.drive_steps` over ``reqs`` that scatters each received coalesced
    message (``staged``: ``(index in reqs, staging slice, ranges)``, in order) as soon as
    it is in, while the later ones are still on their way."""
    for k, src, views in staged:
        yield from w.drive_steps(reqs[:k + 1], timeout, hold=hold(), **kw)
        scatter(src, views)
    yield from w.drive_steps(reqs, timeout, hold=hold(), **kw)


def gather(views: Sequence[memoryview], dst: memoryview) -> None:
    o = 0
    for v in views:
        n = len(v)
        dst[o:o + n] = v
        o += n


def scatter(src: memoryview, views: Sequence[memoryview]) -> None:
    o = 0
    for v in views:
        n = len(v)
        v[:] = src[o:o + n]
        o += n


def buffer(region: RegionHandle, offset: int, length: int, cuda: bool) -> Any:
    """What ucxx sends from / receives into for ``length`` bytes of ``region`` at
    ``offset``: a zero-copy host view, or a device tensor slice when UCX reaches CUDA."""
    if region.device is DeviceKind.CPU:
        return region.view(offset, length)
    if not cuda or region.tensor is None:
        raise TransportError("ucx: this process's UCX cannot reach CUDA memory")
    return region.tensor[offset:offset + length]
