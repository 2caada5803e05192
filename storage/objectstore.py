"""G4 machinery shared by the object-store tiers: packing, a local index, ranged reads.

Object stores charge per request and take tens of milliseconds per request, so storing each
page as its own object would make a put of 1,000 pages 1,000 requests. Instead a ``put``
packs its pages into *pack objects* of up to ``pack_bytes`` each, uploaded concurrently, and
a local lmdb index (storage/objectindex.py) records where each page lives (pack, offset,
length). A ``get`` looks the pages up and reads them with ranged GETs, one per run of
adjacent pages. Stores sharing a bucket, prefix and layout find each other's packs while
they run (storage/objectdiscovery.py: each writer's *head* object lists its newest packs).

Pack object ``{prefix}{fingerprint:016x}/{pack_id}.kvpack``::

    page 0: 64-byte header (storage/page.py) + payload
    page 1: ...
    manifest: msgpack [PACK_VERSION, fingerprint, [[seq_hash, offset, length], ...]]
    trailer (24 bytes): b"KVBMPACK", u64 manifest length, u64 xxh3-64 of the manifest

* The pack id is the xxh3-128 of the page headers (which hold each payload's checksum), so a
  pack's name is a function of its content. Writes are create-only (the backend's
  conditional put): a retried upload that had in fact landed, or a second writer of the very
  same batch, finds the object there and that is a success, never an overwrite. Unless the
  object there is damaged (pages of it failed verification, or its size is not the pack's):
  then it is overwritten with the bytes its name stands for.
* The manifest is validated like data from a stranger: a pack whose entries do not fit
  (keys or offsets out of range, pages past the manifest) is skipped whole by a rebuild.
* A page becomes visible only after its pack upload succeeded *and* its index entry was
  committed (lmdb, synchronous commit): an entry never points at a pack that is not whole.
* Index keys are ``fingerprint || seq_hash``: stores of different models on the same bucket
  and prefix share nothing, and never drop each other's pages.
* The manifest lets a store with an empty local index rebuild it by listing the packs of
  its fingerprint (:meth:`PackedObjectStore.rebuild_index`). Deleted pages are not recorded
  remotely, so a rebuild resurrects deleted pages whose pack still holds live ones (they are
  valid data; a cache can afford that).
* A pack object is deleted when the last page the local index has in it is deleted. Stores
  on different machines sharing a bucket and prefix keep separate indexes, so one may delete
  a pack another still points at (identical batches even share a pack name): the other then
  finds the pack gone and drops its pages. That costs misses, never wrong data; give each
  writer its own prefix where that matters (it then finds no other writer's pages).
* Every read is verified (page header + xxh3-128 of the payload). A page that fails is read
  once more on its own (a transfer can be damaged in flight); failing again, it is a miss,
  counted ``corrupt``, dropped from the index and reported to the listener. A pack object
  that is gone drops all of its pages the same way. Network failures are misses too, but
  leave the index alone: the data is probably still there.
* The local index is not the truth: the bucket may have lost packs it lists (lifecycle
  expiry, a new or wiped bucket). A put counts a page the index lists as stored only when
  its pack was seen in the bucket by this process lately (written, read, listed, or checked
  with one metadata request), and not before the last outage (circuit breaker opening);
  a pack found gone loses all its entries, and the put uploads those pages again.
* Every request goes through :func:`~kvbm.storage.resilience.call_with_retry` (timeouts,
  bounded retries, a circuit breaker). While the breaker is open, ``get`` and ``exists``
  report misses and ``put`` returns ``False`` at once, without touching the network.
* Opening checks the bucket (a listing of at most one object): a missing bucket, refused
  credentials or no answer raise :class:`TierUnavailableError`, unless the config says
  ``start_degraded``: then the tier is *degraded* (a warning, ``TierStats.degraded``, the
  breaker held open) and checks again after each cool-down. A bucket lost while open
  degrades the tier the same way.
"""

from __future__ import annotations

import abc
import asyncio
import enum
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, TypeVar

import xxhash

from kvbm.errors import (
    ConfigError,
    InvalidArgumentError,
    LayoutError,
    StorageError,
    TierUnavailableError,
)
from kvbm.layout import KVLayout
from kvbm.medium import Medium
from kvbm.storage.args import check_items, check_key, check_keys, check_parents
from kvbm.storage.base import Capability, PageStore, RemovalReason, TierListener, TierStats
from kvbm.storage.confcheck import check_path, check_text
from kvbm.storage.objectdiscovery import Discovery, DiscoverySettings, Taken
from kvbm.storage.objecthead import HEADS_DIR, MAX_HEAD_PACKS
from kvbm.storage.objectindex import Announced, Location, PackIndex
from kvbm.storage.objectpack import (
    MAX_PACK_BYTES,
    PACK_SUFFIX,
    BuiltPack,
    ManifestError,
    build_pack,
    parse_manifest,
)
from kvbm.storage.objectpack import TRAILER as _TRAILER
from kvbm.storage.page import HEADER_SIZE, verify_page
from kvbm.storage.resilience import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    DeadlineRunner,
    FaultKind,
    RetryPolicy,
    call_with_retry,
    check_bool,
    check_int,
    check_number,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20
#: Bytes read from a pack's end when rebuilding: holds the manifest of ~3,000 pages at once.
_TAIL_GUESS = 64 * 1024


#: Breaker states as numbers for ``TierStats.extra["breaker_state"]`` (metrics want a gauge).
_BREAKER_CODE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


# -- configuration -----------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class ObjectTierConfig:
    """Settings every object-store tier shares; S3TierConfig / GCSTierConfig extend it."""

    #: Key prefix of every object this tier writes ("folder" in the bucket).
    prefix: str = "kvbm/"
    #: Target size of one pack object; a page larger than this gets a pack of its own.
    pack_bytes: int = 32 * MiB
    #: Largest single ranged GET when adjacent pages are read together.
    max_read_bytes: int = 16 * MiB
    #: Directory of the local lmdb index (where each page lives: pack, offset, length);
    #: ``None``: ``$XDG_CACHE_HOME/kvbm/object-index/<xxh3-64 of bucket, endpoint and
    #: prefix>`` (``~/.cache`` without XDG_CACHE_HOME). One index serves one location.
    index_path: str | None = None
    #: Most bytes the lmdb index may grow to (a sparse file; ~100 bytes per page).
    index_map_bytes: int = 1 << 30
    #: Threads doing transfers (and so concurrent requests).
    max_workers: int = 8
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 20.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)
    #: Send create-only conditions on uploads (S3 ``If-None-Match: *``, GCS
    #: ``ifGenerationMatch=0``). Turn off only for S3-compatible servers that reject them.
    conditional_writes: bool = True
    #: With an empty local index, list the bucket's packs and rebuild it on first use.
    rebuild_if_empty: bool = True
    #: What to do when the bucket cannot be used at open (missing, credentials refused,
    #: server unreachable). ``False``: fail (TierUnavailableError). ``True``: start anyway,
    #: log a warning, set ``TierStats.degraded`` and answer misses until the bucket answers
    #: (it is checked again after each circuit-breaker cool-down).
    start_degraded: bool = False
    #: How long a pack seen in the bucket (written, read, listed or checked by this process)
    #: is trusted by a put of a page it holds; after that, or for a pack only the local index
    #: knows (written before this process started), the put checks that the pack is still
    #: there (one metadata request per pack) and uploads its pages again if it is not.
    pack_check_interval_s: float = 3600.0
    #: Seconds between two looks for the packs that other writers sharing the bucket, the
    #: prefix and the layout uploaded since the last look (storage/objectdiscovery.py: one
    #: LIST request when nothing is new); their pages are then served like this writer's
    #: own. 0: no look on the tier's own (``refresh()`` and ``request_refresh()`` still do).
    discovery_interval_s: float = 5.0
    #: Least seconds between two looks the tier starts on its own: a read of a page it does
    #: not know, or ``request_refresh()`` (a hint from outside), asks for one sooner than
    #: ``discovery_interval_s``, but not sooner than this after the last.
    discovery_min_interval_s: float = 1.0
    #: After uploads, rewrite this writer's head object (the list of its newest packs,
    #: one small PUT) so that other writers find its pages while running.
    announce: bool = True
    #: How many of its newest packs a head lists: a reader that falls further behind than
    #: this lists every pack of the layout once to catch up.
    announce_packs: int = 256

    #: The config section's name, for error messages.
    section: ClassVar[str] = "object"

    def __post_init__(self) -> None:
        o = self.section
        check_text(o, "prefix", self.prefix)
        if self.prefix.startswith("/"):
            raise ConfigError(f"{o}.prefix must not start with '/', got {self.prefix!r}")
        check_int(o, "pack_bytes", self.pack_bytes, low=1, high=MAX_PACK_BYTES)
        check_int(o, "max_read_bytes", self.max_read_bytes, low=1, high=MAX_PACK_BYTES)
        if self.index_path is not None and not isinstance(self.index_path, str):
            raise ConfigError(f"{o}.index_path must be a path or None, got "
                              f"{self.index_path!r}")
        check_path(o, "index_path", self.index_path, optional=True)
        # lmdb needs a few pages; 16 TiB of index is ~10**11 pages, past any bucket we serve.
        check_int(o, "index_map_bytes", self.index_map_bytes, low=MiB, high=1 << 44)
        check_int(o, "max_workers", self.max_workers, low=1, high=256)
        for name in ("connect_timeout_s", "read_timeout_s"):
            check_number(o, name, getattr(self, name), low=0.0, high=3600.0, low_open=True)
        check_number(o, "pack_check_interval_s", self.pack_check_interval_s, low=0.0,
                     high=30 * 86_400.0)
        check_number(o, "discovery_interval_s", self.discovery_interval_s, low=0.0,
                     high=86_400.0)
        check_number(o, "discovery_min_interval_s", self.discovery_min_interval_s, low=0.0,
                     high=3600.0)
        check_int(o, "announce_packs", self.announce_packs, low=1, high=MAX_HEAD_PACKS)
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigError(f"{o}.retry must be a RetryPolicy, got {self.retry!r}")
        if not isinstance(self.breaker, BreakerConfig):
            raise ConfigError(f"{o}.breaker must be a BreakerConfig, got {self.breaker!r}")
        for name in ("conditional_writes", "rebuild_if_empty", "start_degraded", "announce"):
            check_bool(o, name, getattr(self, name))

    @property
    def key_prefix(self) -> str:
        """The prefix as a folder: empty, or ending with ``/``."""
        p = self.prefix
        return p if not p or p.endswith("/") else p + "/"


def default_index_path(location: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvbm" / "object-index" / f"{xxhash.xxh3_64_hexdigest(location.encode())}"


# -- the backend a tier plugs in ------------------------------------------------------------------
class ObjectBackend(abc.ABC):
    """The few object-store requests a packed store needs; synchronous and thread-safe.

    Implementations raise their client library's exceptions; :meth:`classify` tells the
    retry loop what each one means.
    """

    #: Where the objects live, e.g. ``s3://bucket`` plus the endpoint: names the default
    #: index directory and is checked when an index is reopened.
    location: str

    @abc.abstractmethod
    def put(self, key: str, data: bytearray, *, create_only: bool) -> None:
        """Upload a whole object; with ``create_only`` an existing object raises (EXISTS)."""

    @abc.abstractmethod
    def read(self, key: str, offset: int, length: int, *, whole: bool) -> bytes:
        """Up to ``length`` bytes from ``offset``; fewer when the object is shorter.

        ``whole`` says the range is the entire object, so a backend may read it without a
        range and verify the object's stored checksum.
        """

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """The size of an object, from its metadata alone; raises (MISSING) when absent."""

    @abc.abstractmethod
    def check(self, prefix: str) -> None:
        """One cheap request proving that the bucket exists and that the credentials may list
        it (a listing of at most one object under ``prefix``); raises when not."""

    def explain(self, exc: BaseException) -> str:
        """What a failed :meth:`check` (or any request) means, and what to do, for a log."""
        return repr(exc)

    def bucket_missing(self, exc: BaseException) -> bool:
        """Whether ``exc`` says that the bucket itself does not exist."""
        return False

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object (a missing one is not an error)."""

    def list_versions(self, prefix: str) -> list[tuple[str, int, str]]:
        """``(key, size, version)`` of every object under ``prefix``, from the listing alone;
        the version changes whenever the object is written again (S3's ETag, GCS's
        generation). ``""`` where a backend cannot tell: discovery then reads the object on
        every look."""
        return [(k, n, "") for k, n in self.list(prefix)]

    @abc.abstractmethod
    def list(self, prefix: str) -> list[tuple[str, int]]:
        """``(key, size)`` of every object under ``prefix``."""

    @abc.abstractmethod
    def classify(self, exc: BaseException) -> FaultKind:
        """What an exception raised by one of the methods above means."""

    def close(self) -> None:  # noqa: B027 - most backends have nothing to release
        """Release connections."""


# -- reads ------------------------------------------------------------------------------------
class ReadOutcome(enum.Enum):
    HIT = "hit"
    CORRUPT = "corrupt"  # the stored page is damaged or not there: drop it
    PACK_GONE = "pack_gone"  # the whole pack object is missing: drop all its pages
    ERROR = "error"  # the read failed (network, breaker): a miss, but keep the entry


@dataclass(slots=True)
class _Slot:
    """One page to read out of a pack, into one or more destination buffers."""

    key: int
    offset: int
    length: int
    dests: list[memoryview]
    outcome: ReadOutcome = ReadOutcome.ERROR


@dataclass(slots=True)
class _Range:
    """One ranged GET: adjacent pages of one pack."""

    pack_id: bytes
    pack_size: int
    start: int
    end: int
    slots: list[_Slot]


def plan_ranges(slots_by_pack: dict[bytes, tuple[int, list[_Slot]]], *,
                max_read_bytes: int) -> list[_Range]:
    """Group the pages to read into ranged GETs: runs of contiguous pages, capped in size.

    A range that covers every page of a pack is widened to the whole object (the manifest is
    small), so the backend can fetch it without a range and check the object's checksum.
    """
    ranges: list[_Range] = []
    for pack_id, (pack_size, slots) in slots_by_pack.items():
        slots.sort(key=lambda s: s.offset)
        cur: _Range | None = None
        for s in slots:
            if (cur is not None and s.offset == cur.end
                    and s.offset + s.length - cur.start <= max_read_bytes):
                cur.end = s.offset + s.length
                cur.slots.append(s)
            else:
                cur = _Range(pack_id, pack_size, s.offset, s.offset + s.length, [s])
                ranges.append(cur)
    for r in ranges:
        # Widen when at most the manifest follows (< 32 bytes per page, plus the trailer):
        # it costs a few kilobytes and buys an end-to-end checksum where the backend has one.
        if r.start == 0 and r.pack_size - r.end <= _TRAILER.size + 64 + 32 * len(r.slots):
            r.end = r.pack_size
    return ranges


# -- the store --------------------------------------------------------------------------------
class PackState(enum.Enum):
    """What a metadata request found of a pack the index names."""

    PRESENT = "present"
    GONE = "gone"  # missing, or not the object the index describes: its pages are lost
    UNKNOWN = "unknown"  # no answer (network, breaker): nothing can be concluded


class PackedObjectStore(PageStore):
    """A :class:`PageStore` over an :class:`ObjectBackend`, packing pages into big objects."""

    medium = Medium.OBJECT
    # DURABLE: put returns only after the pack upload completed and the entry is committed.
    capabilities = (Capability.REMOTE | Capability.PERSISTENT | Capability.DURABLE
                    | Capability.REPORTS_MISSES)

    def __init__(self, layout: KVLayout, backend: ObjectBackend, config: ObjectTierConfig, *,
                 listener: TierListener | None = None) -> None:
        super().__init__(layout, listener=listener)
        self.config = config
        self._backend = backend
        self._pack_prefix = f"{config.key_prefix}{self.fingerprint:016x}/"
        location = f"{backend.location}/{config.key_prefix}"
        self.breaker = CircuitBreaker(config.breaker, name=location)
        # Discovery's looks in the background must not trip or close the data path's
        # breaker (nor it theirs): a breaker of their own, consulted with this one.
        self._discovery_breaker = CircuitBreaker(config.breaker, name=f"{location} (discovery)")
        self._lock = threading.Lock()  # guards _pending, _used, _seen, _degraded, the stats
        for name in ("rejected_open", "retries", "packs_put", "pack_bytes_put", "ranged_gets",
                     "reread", "packs_existing", "packs_deleted", "rebuilt_pages",
                     "pack_checks", "bucket_checks", "packs_replaced",
                     # discovery (storage/objectdiscovery.py)
                     "announces", "announce_bytes", "announce_failures",
                     "discovery_refreshes", "discovery_requests", "discovery_bytes",
                     "discovery_rescans", "discovered_packs", "discovered_pages",
                     "discovery_gone", "discovery_garbage", "discovery_errors",
                     "discovery_retries"):
            self._stats.extra[name] = 0
        self._closed = False
        self._degraded = False
        self._check_lock = threading.Lock()  # one bucket check at a time
        # Every request runs here, so that the retry policy's deadline bounds it (see
        # storage/resilience.py): the transfer threads plus the rebuild's, a check's and
        # discovery's.
        self._requests = DeadlineRunner(config.max_workers + 3,
                                        name=f"kvbm-{type(self).__name__}-request")
        # Before anything is created: a tier that refuses to open leaves nothing behind.
        problem, _ = self._check_bucket()
        if problem is not None and not config.start_degraded:
            self._requests.close()
            backend.close()
            # ``problem`` names the bucket, its endpoint and the fix: said once.
            raise TierUnavailableError(
                f"{type(self).__name__} cannot open (prefix {config.key_prefix!r}): "
                f"{problem}. Or set start_degraded = true in the [{config.section}] config "
                f"to start without it (the tier then answers misses until the bucket answers)")
        path = Path(config.index_path) if config.index_path else default_index_path(location)
        try:
            self._index = PackIndex(path, location=location, map_size=config.index_map_bytes)
        except BaseException:
            self._requests.close()
            backend.close()
            raise
        self._pool = ThreadPoolExecutor(config.max_workers,
                                        thread_name_prefix=f"kvbm-{type(self).__name__}")
        self._pending: dict[int, Future[bool]] = {}
        # Packs this process has seen in the bucket, with when (time.monotonic): a put trusts
        # the index's entries in them for config.pack_check_interval_s. Entries the index
        # had before this process started are not in here: they are checked before a put
        # counts on them (the bucket may have lost them: lifecycle expiry, a new server).
        self._seen: dict[bytes, float] = {}
        #: Packs whose pages failed verification at rest: a put that builds a pack of the
        #: same name (the same batch again) overwrites the damaged object instead of finding
        #: it there and counting it as stored.
        self._damaged: set[bytes] = set()
        self._used = len(self._index.keys(self.fingerprint)) * self.page_bytes
        self._ready = self._used > 0 or not config.rebuild_if_empty
        self._ready_lock = threading.Lock()
        if problem is not None:
            self._degrade(problem)
        self._discovery = Discovery(
            _DiscoveryHost(self), DiscoverySettings(interval_s=config.discovery_interval_s,
                                    min_interval_s=config.discovery_min_interval_s,
                                    announce=config.announce),
            fingerprint=self.fingerprint, writer=self._index.writer_id,
            heads_prefix=self._pack_prefix + HEADS_DIR, name=f"kvbm-{type(self).__name__}")

    # -- small helpers ------------------------------------------------------------------------
    def object_key(self, pack_id: bytes) -> str:
        return f"{self._pack_prefix}{pack_id.hex()}{PACK_SUFFIX}"

    def locate(self, key: int) -> tuple[str, int, int] | None:
        """``(object key, offset, length)`` of a stored page (header + payload), for tools and
        tests; ``None`` when the page is not in the index."""
        (loc,) = self._index.lookup(self.fingerprint, [check_key(key)])
        return None if loc is None else (self.object_key(loc.pack_id), loc.offset, loc.length)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, d in deltas.items():
                if hasattr(self._stats, name):
                    setattr(self._stats, name, getattr(self._stats, name) + d)
                else:
                    self._stats.extra[name] += d

    def _count_retry(self, exc: BaseException) -> None:
        self._count(retries=1)

    def stats(self) -> TierStats:
        state = self.breaker.state
        with self._lock:
            self._stats.extra["breaker_opens"] = self.breaker.opens
            self._stats.extra["breaker_open"] = int(state is BreakerState.OPEN)
            # 0 closed, 1 half-open, 2 open: the kvbm_breaker_state gauge
            self._stats.extra["breaker_state"] = _BREAKER_CODE[state]
        return self._stats

    def _call(self, fn: Callable[[], T], what: str, *, discovery: bool = False) -> T:
        if discovery:  # discovery's looks: their own breaker and retry count
            return call_with_retry(fn, policy=self.config.retry,
                                   breaker=self._discovery_breaker,
                                   classify=self._backend.classify, what=what,
                                   on_retry=lambda _: self._count(discovery_retries=1),
                                   runner=self._requests)
        return call_with_retry(fn, policy=self.config.retry, breaker=self.breaker,
                               classify=self._backend.classify, what=what,
                               on_retry=self._count_retry, runner=self._requests)

    async def _run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"{type(self).__name__} is closed")

    def _check_items(self, items: Sequence[tuple[int, Buffer]]
                     ) -> tuple[list[int], list[memoryview]]:
        """Keys and payload views of ``(key, buffer)`` pairs, all checked before any use."""
        keys, bufs = check_items(items)
        views: list[memoryview] = []
        for key, buf in zip(keys, bufs, strict=True):
            try:
                views.append(self._check_payload(key, buf))
            except TypeError as e:
                if isinstance(e, InvalidArgumentError):
                    raise
                raise InvalidArgumentError(f"page {key:#x}: not a buffer but a "
                                           f"{type(buf).__name__}") from None
        return keys, views

    # -- is the bucket there? -------------------------------------------------------------------
    def _check_bucket(self) -> tuple[str | None, bool]:
        """Ask the bucket once (transient faults retried). Returns what is wrong with it
        (``None``: it can be used) and whether it answered at all."""
        backend = self._backend

        def classify(exc: BaseException) -> FaultKind:
            kind = backend.classify(exc)
            # S3 answers a missing bucket 404, as it would a missing object: here it is the
            # failure being looked for, and counts against the breaker.
            return FaultKind.PERMANENT if kind in (FaultKind.MISSING, FaultKind.EXISTS) else kind

        self._count(bucket_checks=1)
        try:
            call_with_retry(lambda: backend.check(self._pack_prefix), policy=self.config.retry,
                            breaker=self.breaker, classify=classify,
                            what=f"check {backend.location}", on_retry=self._count_retry,
                            runner=self._requests)
        except TierUnavailableError as e:
            return (f"the bucket does not answer ({e}): check the [{self.config.section}] "
                    f"endpoint, and that the server is up"), False
        except Exception as e:
            return backend.explain(e), True
        return None, True

    def _degrade(self, problem: str) -> None:
        """Stop using the bucket until a check passes (misses, puts refused): the breaker
        opens, and each time its cool-down has passed the next call checks again."""
        with self._lock:
            first = not self._degraded
            self._degraded = True
            self._stats.degraded = 1
        self.breaker.trip()
        if first:
            log.warning("object tier on %s is UNAVAILABLE and runs degraded (every read a "
                        "miss, every write refused) until the bucket answers: %s",
                        self._backend.location, problem)

    def _recheck(self) -> bool:
        """A degraded tier's check (on a pool thread); whether the bucket answers now."""
        with self._check_lock:
            if not self._degraded:
                return True
            if not self.breaker.would_allow():
                return False  # another check just failed
            problem, _ = self._check_bucket()
            if problem is not None:
                self._degrade(problem)
                return False
            with self._lock:
                self._degraded = False
                self._stats.degraded = 0
            log.warning("object tier on %s answers again: serving", self._backend.location)
            return True

    async def _serving(self) -> bool:
        """Whether requests may go out now: the breaker allows it and the bucket is there
        (a degraded tier checks it again here, once its cool-down has passed)."""
        if not self.breaker.would_allow():
            return False
        if self._degraded:
            return await self._run(self._recheck)
        return True

    def _on_permanent(self, exc: BaseException) -> None:
        """A request failed for good (not transiently). When the bucket is the cause (gone
        since the open, credentials revoked), the tier degrades, with one warning, instead
        of failing every request the same way. (A pool thread; one check at a time.)"""
        if self._degraded or not self._check_lock.acquire(blocking=False):
            return
        try:
            if self._backend.bucket_missing(exc):
                self._degrade(self._backend.explain(exc))
                return
            problem, answered = self._check_bucket()
            # No answer is an outage, the breaker's business; degrading is for a bucket
            # that answers "no".
            if problem is not None and answered:
                self._degrade(problem)
        finally:
            self._check_lock.release()

    # -- packs seen in the bucket ----------------------------------------------------------------
    def _saw(self, pack_id: bytes) -> None:
        now = time.monotonic()
        with self._lock:
            self._seen[pack_id] = now

    def _forget_packs(self, pack_ids: Iterable[bytes]) -> None:
        with self._lock:
            for p in pack_ids:
                self._seen.pop(p, None)

    def _trusted(self, pack_id: bytes, now: float) -> bool:
        # Called with self._lock held. What was seen before the last outage the breaker
        # noticed does not count: the server that came back may not hold it (a restarted
        # or restored one).
        seen = self._seen.get(pack_id)
        return (seen is not None and now - seen <= self.config.pack_check_interval_s
                and seen > self.breaker.last_opened)

    def _pack_state(self, pack_id: bytes, size: int) -> PackState:
        """Whether a pack the index names is still in the bucket (on a pool thread)."""
        obj = self.object_key(pack_id)
        self._count(pack_checks=1)
        try:
            found = self._call(lambda: self._backend.size(obj), what=f"head {obj}")
        except TierUnavailableError as e:
            log.debug("cannot check pack %s: %s", obj, e)
            return PackState.UNKNOWN
        except Exception as e:
            if self._backend.classify(e) is FaultKind.MISSING:
                return PackState.GONE
            log.warning("cannot check pack %s: %r", obj, e)
            self._on_permanent(e)
            return PackState.UNKNOWN
        if found != size:
            log.warning("pack %s has %d bytes, not the %d its pages need", obj, found, size)
            return PackState.GONE
        self._saw(pack_id)
        return PackState.PRESENT

    async def _vet(self, keys: list[int]) -> tuple[set[bytes], list[int]]:
        """Before a put counts on index entries among ``keys``, check the packs it has not
        seen lately (one request per pack). Pages of a pack found gone leave the index.
        Returns the packs confirmed now and the keys dropped."""
        locs = self._index.lookup(self.fingerprint, keys)
        now = time.monotonic()
        todo: dict[bytes, int] = {}
        with self._lock:
            for loc in locs:
                if loc is not None and not self._trusted(loc.pack_id, now):
                    todo[loc.pack_id] = loc.pack_size
        if not todo:
            return set(), []
        states = await asyncio.gather(*(self._run(functools.partial(self._pack_state, p, n))
                                        for p, n in todo.items()))
        confirmed = {p for p, st in zip(todo, states, strict=True) if st is PackState.PRESENT}
        gone = [p for p, st in zip(todo, states, strict=True) if st is PackState.GONE]
        dropped = await self._run(functools.partial(self._drop_packs, gone)) if gone else []
        return confirmed, dropped

    def _drop_packs(self, gone: list[bytes]) -> list[int]:
        """Remove every page of packs that are not in the bucket any more (pool thread)."""
        expect = {k: p for p in gone for k in self._index.pack_members(p)}
        removed, _ = self._index.remove(self.fingerprint, list(expect), expect)
        self._forget_packs(gone)
        with self._lock:
            self._used -= len(removed) * self.page_bytes
        if removed:
            log.warning("%d pack(s) under %s are gone from the bucket (lifecycle expiry, a "
                        "new bucket?): dropped their %d page(s) from the index", len(gone),
                        self._pack_prefix, len(removed))
        return removed

    async def _ensure_ready(self) -> None:
        """Rebuild an empty index from the bucket once, before the first operation."""
        if not self._ready and not self._degraded and self.breaker.would_allow():
            await self._run(self._rebuild_once)

    def _rebuild_once(self) -> None:
        with self._ready_lock:
            if self._ready:
                return
            try:
                self._rebuild()
            except Exception as e:
                # Not fatal: the store works without the old pages; try again next time.
                log.warning("cannot rebuild the object index from %s: %s",
                            self._pack_prefix, e)
                if not isinstance(e, TierUnavailableError):
                    self._on_permanent(e)
                return
            self._ready = True

    # -- put --------------------------------------------------------------------------------
    async def put(self, items: Sequence[tuple[int, Buffer]], *,
                  parents: Sequence[int | None] | None = None) -> list[bool]:
        # parents: object stores do not evict (bucket lifecycle rules do), so unused, but
        # checked like every argument.
        self._check_open()
        keys, views = self._check_items(items)  # all or nothing
        check_parents(parents, len(keys))
        if not keys:
            return []
        if not await self._serving():
            self._count(rejected_open=len(keys))
            return [False] * len(keys)
        await self._ensure_ready()
        # Entries this process did not write (or has not seen lately) are checked first: the
        # bucket may have lost their packs, and a put must not claim pages it does not hold.
        confirmed, dropped = await self._vet(keys)

        # Decide per item: new (ours to write), already stored, or being written by a
        # concurrent put (wait for it). The index is checked under the lock after
        # _pending, and writers commit before leaving _pending, so no page is written twice.
        mine: list[tuple[int, memoryview]] = []
        waits: list[Future[bool] | None] = [None] * len(keys)
        outcome: list[bool] = [False] * len(keys)
        skipped = 0
        now = time.monotonic()
        with self._lock:
            locs = self._index.lookup(self.fingerprint, keys)
            for i, (k, view, loc) in enumerate(zip(keys, views, locs, strict=True)):
                fut = self._pending.get(k)
                if fut is not None:
                    # Written by another put, or earlier in this batch (the first one wins).
                    waits[i] = fut
                    skipped += 1
                elif loc is None:
                    mine.append((k, view))
                    self._pending[k] = Future()
                    waits[i] = self._pending[k]
                elif loc.pack_id in confirmed or self._trusted(loc.pack_id, now):
                    outcome[i] = True
                    skipped += 1
                # else: its pack could not be checked (no answer): not claimed, False
        self._count(put_skipped=skipped)

        groups = self._split(mine)
        displaced: set[int] = set()
        if groups:
            for lost in await asyncio.gather(*(
                    asyncio.wrap_future(self._pool.submit(self._put_pack, g)) for g in groups)):
                displaced.update(lost)
            if self.config.announce:
                await self._run(self._announce_now)
        for i, fut in enumerate(waits):
            if fut is not None:
                outcome[i] = await asyncio.wrap_future(fut)
            elif keys[i] in displaced:
                outcome[i] = False  # counted on above, dropped since: not stored
        if displaced:
            self._notify_removed(sorted(displaced), RemovalReason.CORRUPT)
        if dropped:
            # Pages of lost packs are gone unless this put stored them again.
            stored = {k for k, ok in zip(keys, outcome, strict=True) if ok}
            self._notify_removed([k for k in dropped if k not in stored],
                                 RemovalReason.MISSING)
        return outcome

    def _announce_now(self) -> None:
        """Rewrite this writer's head after a put's uploads (pool thread), one small PUT, so
        that other writers find the new packs at their next look. A failure leaves the
        pages stored; discovery's thread tries again later."""
        def put(key: str, data: bytes) -> None:
            self._call(lambda: self._backend.put(key, bytearray(data), create_only=False),
                       what=f"put {key}")

        try:
            self._discovery.announce(put)
        except Exception as e:
            log.warning("cannot write the head %s (tried again later): %r",
                        self._discovery.own_key, e)

    def _split(self, pages: list[tuple[int, memoryview]]) -> list[list[tuple[int, memoryview]]]:
        groups: list[list[tuple[int, memoryview]]] = []
        cur: list[tuple[int, memoryview]] = []
        size = 0
        for k, v in pages:
            rec = HEADER_SIZE + v.nbytes
            if cur and size + rec > self.config.pack_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append((k, v))
            size += rec
        if cur:
            groups.append(cur)
        return groups

    def _put_pack(self, pages: list[tuple[int, memoryview]]) -> list[int]:
        """Build, upload and commit one pack (on a pool thread); resolve its pending keys.
        Returns the keys of other pages the index had filed under the pack's name (see
        :meth:`_displace`)."""
        keys = [k for k, _ in pages]
        ok = False
        try:
            pack = build_pack(self.fingerprint, pages)
            obj = self.object_key(pack.pack_id)
            try:
                self._call(lambda: self._backend.put(
                    obj, pack.data, create_only=self.config.conditional_writes),
                    what=f"put {obj}")
            except TierUnavailableError as e:
                log.warning("pack upload failed, %d page(s) not stored: %s", len(pages), e)
                self._count(errors=len(pages))
                return []
            except Exception as e:
                if self._backend.classify(e) is not FaultKind.EXISTS:
                    log.warning("pack upload of %s failed, %d page(s) not stored: %r", obj,
                                len(pages), e)
                    self._count(errors=len(pages))
                    self._on_permanent(e)
                    return []
                # Create-only write found the object: same name, so the same content,
                # unless it was damaged at rest.
                self._count(packs_existing=1)
                if not self._replace_if_damaged(obj, pack):
                    self._count(errors=len(pages))
                    return []
            self._saw(pack.pack_id)  # before the entries: a put that finds them trusts them
            displaced = self._displace(pack)
            # The pack joins this writer's log with its entries (one commit); the head that
            # tells other writers about it is rewritten at the end of the put.
            announce = None
            if self.config.announce:
                tail = _TRAILER.unpack_from(pack.data, len(pack.data) - _TRAILER.size)[1]
                announce = Announced(pack.pack_id, len(pack.data), tail + _TRAILER.size)
            added = self._index.add(self.fingerprint, pack.entries, announce=announce,
                                    keep=self.config.announce_packs)
            with self._lock:
                self._used += len(added) * self.page_bytes
            self._count(puts=len(added), put_bytes=len(added) * self.page_bytes,
                        put_skipped=len(pages) - len(added), packs_put=1,
                        pack_bytes_put=len(pack.data))
            ok = True
            return displaced
        finally:
            with self._lock:
                for k in keys:
                    fut = self._pending.pop(k, None)
                    if fut is not None:
                        fut.set_result(ok)

    def _displace(self, pack: BuiltPack) -> list[int]:
        """Drop the index entries filed under ``pack``'s name for pages it does not hold.

        The object under that name holds exactly ``pack`` now (uploaded, replaced, or
        checked), so such entries point at nothing: only an object replaced out of band and
        then indexed by a rebuild leaves them. Usually there are none (one cursor step)."""
        mine = {k for k, _ in pack.entries}
        stale = [k for k in self._index.pack_members(pack.pack_id) if k not in mine]
        if not stale:
            return []
        removed, _ = self._index.remove(self.fingerprint, stale,
                                        dict.fromkeys(stale, pack.pack_id))
        with self._lock:
            self._used -= len(removed) * self.page_bytes
        if removed:
            log.warning("pack %s held other pages than its name says (replaced in the "
                        "bucket?): dropped %d stale index entries", self.object_key(
                            pack.pack_id), len(removed))
        return removed

    def _replace_if_damaged(self, obj: str, pack: BuiltPack) -> bool:
        """A create-only upload found ``obj`` there: overwrite it when it is known damaged
        or its manifest and trailer are not the pack's (one ranged read of a few kilobytes);
        whether it holds the pack now. (Overwriting a whole object with the bytes its name
        stands for is always safe.)"""
        with self._lock:
            damaged = pack.pack_id in self._damaged
        if not damaged:
            data = pack.data
            want = _TRAILER.unpack_from(data, len(data) - _TRAILER.size)[1] + _TRAILER.size
            self._count(pack_checks=1)
            try:
                tail = self._call(lambda: self._backend.read(obj, len(data) - want, want,
                                                             whole=False), what=f"get {obj}")
            except TierUnavailableError:
                return False  # cannot tell: not claimed
            except Exception as e:
                if self._backend.classify(e) is not FaultKind.MISSING:
                    log.warning("cannot check pack %s: %r", obj, e)
                    self._on_permanent(e)
                    return False
                tail = b""  # gone since: upload it again
            if tail == data[len(data) - want:]:
                self._saw(pack.pack_id)
                return True
        log.warning("pack %s in the bucket is damaged: uploading it again", obj)
        try:
            self._call(lambda: self._backend.put(obj, pack.data, create_only=False),
                       what=f"put {obj}")
        except Exception as e:
            log.warning("cannot replace the damaged pack %s: %r", obj, e)
            if not isinstance(e, TierUnavailableError):
                self._on_permanent(e)
            return False
        with self._lock:
            self._damaged.discard(pack.pack_id)
        self._count(packs_replaced=1)
        return True

    # -- get --------------------------------------------------------------------------------
    async def get(self, items: Sequence[tuple[int, Buffer]]) -> list[bool]:
        self._check_open()
        keys, dests = self._check_items(items)
        for k, dst in zip(keys, dests, strict=True):
            if dst.readonly:
                # A caller's mistake about the buffer, as the disk tier reports it.
                raise LayoutError(f"the buffer for page {k:#x} is read-only")
        n = len(keys)
        if n == 0:
            return []
        if not await self._serving():
            self._count(gets=n, misses=n, rejected_open=n)
            return [False] * n
        await self._ensure_ready()
        locs = self._index.lookup(self.fingerprint, keys)
        by_pack: dict[bytes, tuple[int, list[_Slot]]] = {}
        slot_of: list[_Slot | None] = []
        # The same key asked twice is read once. Keyed by page, not by place: an index
        # rebuilt from a pack replaced out of band can file two keys at one place, and each
        # must be verified under its own key.
        seen: dict[int, _Slot] = {}
        missing: list[int] = []
        for k, dst, loc in zip(keys, dests, locs, strict=True):
            if loc is None:
                slot_of.append(None)
                missing.append(k)
                continue
            slot = seen.get(k)
            if slot is None:
                slot = _Slot(k, loc.offset, loc.length, [dst])
                seen[k] = slot
                by_pack.setdefault(loc.pack_id, (loc.pack_size, []))[1].append(slot)
            else:
                slot.dests.append(dst)  # the same page asked twice: read once
            slot_of.append(slot)

        # Not in the index: a definite miss, unlike a read that fails (see REPORTS_MISSES).
        self._notify_removed(missing, RemovalReason.MISSING)
        if missing and self.config.discovery_interval_s > 0:
            self._discovery.request_refresh()  # another writer may hold it: look (soon)
        ranges = plan_ranges(by_pack, max_read_bytes=self.config.max_read_bytes)
        if ranges:
            loop = asyncio.get_running_loop()
            await asyncio.gather(*(loop.run_in_executor(self._pool, self._read_range, r)
                                   for r in ranges))
        await self._drop_damaged(ranges)

        hits = [s is not None and s.outcome is ReadOutcome.HIT for s in slot_of]
        nhit = sum(hits)
        damaged = sum(1 for s in slot_of if s is not None
                      and s.outcome in (ReadOutcome.CORRUPT, ReadOutcome.PACK_GONE))
        failed = sum(1 for s in slot_of if s is not None and s.outcome is ReadOutcome.ERROR)
        self._count(gets=n, hits=nhit, misses=n - nhit, get_bytes=nhit * self.page_bytes,
                    corrupt=damaged, errors=failed)
        return hits

    def _read_range(self, r: _Range) -> None:
        """Fetch one range and verify its pages into their buffers (on a pool thread)."""
        obj = self.object_key(r.pack_id)
        whole = r.start == 0 and r.end == r.pack_size
        try:
            data = self._fetch(obj, r.start, r.end - r.start, whole=whole)
        except _PackGone:
            for s in r.slots:
                s.outcome = ReadOutcome.PACK_GONE
            return
        except _ReadFailed:
            return  # outcomes stay ERROR
        self._saw(r.pack_id)
        view = memoryview(data)
        for s in r.slots:
            rel = s.offset - r.start
            if self._verify_into(s, view[rel: rel + s.length]):
                s.outcome = ReadOutcome.HIT
                continue
            # Damaged in flight or at rest? Read this page alone once more before dropping it.
            self._count(reread=1)
            try:
                again = self._fetch(obj, s.offset, s.length, whole=False)
            except _PackGone:
                s.outcome = ReadOutcome.PACK_GONE
                continue
            except _ReadFailed:
                continue
            s.outcome = (ReadOutcome.HIT if self._verify_into(s, memoryview(again))
                         else ReadOutcome.CORRUPT)

    def _fetch(self, obj: str, offset: int, length: int, *, whole: bool) -> bytes:
        self._count(ranged_gets=1)
        try:
            return self._call(lambda: self._backend.read(obj, offset, length, whole=whole),
                              what=f"get {obj}")
        except TierUnavailableError as e:
            log.debug("read of %s failed: %s", obj, e)
            raise _ReadFailed from e
        except Exception as e:
            if self._backend.classify(e) is FaultKind.MISSING:
                raise _PackGone from e
            log.warning("read of %s failed: %r", obj, e)
            self._on_permanent(e)
            raise _ReadFailed from e

    def _verify_into(self, slot: _Slot, piece: memoryview) -> bool:
        if piece.nbytes != slot.length:
            return False  # the object is shorter than the index says: truncated
        first = slot.dests[0]
        payload = piece[HEADER_SIZE:]
        if payload.nbytes != first.nbytes:
            return False
        # Copy, then verify the copy: what the caller gets is exactly what was checked.
        first[:] = payload
        fault = verify_page(piece[:HEADER_SIZE], first, fingerprint=self.fingerprint,
                            seq_hash=slot.key)
        if fault is not None:
            log.debug("page %#x failed verification: %s", slot.key, fault.value)
            return False
        for extra in slot.dests[1:]:
            extra[:] = first
        return True

    async def _drop_damaged(self, ranges: list[_Range]) -> None:
        """Remove damaged pages (and every page of a lost pack) from the index; notify."""
        expect: dict[int, bytes] = {}
        gone: set[bytes] = set()
        for r in ranges:
            for s in r.slots:
                if s.outcome is ReadOutcome.CORRUPT:
                    expect[s.key] = r.pack_id
                elif s.outcome is ReadOutcome.PACK_GONE:
                    gone.add(r.pack_id)
        if not expect and not gone:
            return

        def drop() -> list[int]:
            with self._lock:
                self._damaged.update(expect.values())
            for pack_id in gone:
                for k in self._index.pack_members(pack_id):
                    expect[k] = pack_id
            removed, _ = self._index.remove(self.fingerprint, list(expect), expect)
            self._forget_packs(gone)
            with self._lock:
                self._used -= len(removed) * self.page_bytes
            return removed

        removed = await self._run(drop)
        if removed:
            log.warning("dropped %d damaged or lost page(s) from %s", len(removed),
                        self._pack_prefix)
            self._notify_removed(removed, RemovalReason.CORRUPT)

    # -- exists / delete / keys ---------------------------------------------------------------
    async def exists(self, keys: Sequence[int]) -> list[bool]:
        self._check_open()
        checked = check_keys(keys)
        if not checked:
            return []
        if not await self._serving():
            return [False] * len(checked)  # unreachable now: as good as absent for the engine
        await self._ensure_ready()
        return [loc is not None for loc in self._index.lookup(self.fingerprint, checked)]

    async def delete(self, keys: Sequence[int]) -> int:
        self._check_open()
        checked = check_keys(keys)
        if not checked:
            return 0
        await self._ensure_ready()

        def work() -> int:
            removed, empty = self._index.remove(self.fingerprint, checked)
            with self._lock:
                self._used -= len(removed) * self.page_bytes
            for pack_id in empty:
                self._delete_pack(pack_id)
            return len(removed)

        n = await self._run(work)
        self._count(deleted=n)
        return n

    def _delete_pack(self, pack_id: bytes) -> None:
        # Best effort: a pack that cannot be deleted now is garbage, never wrong data (no
        # index entry points at it any more).
        self._forget_packs([pack_id])
        if self._degraded or not self.breaker.would_allow():
            return
        obj = self.object_key(pack_id)
        try:
            self._call(lambda: self._backend.delete(obj), what=f"delete {obj}")
            self._count(packs_deleted=1)
        except Exception as e:
            if self._backend.classify(e) is not FaultKind.MISSING:
                log.warning("cannot delete pack %s (left as garbage): %r", obj, e)

    async def keys(self) -> list[int]:
        self._check_open()
        await self._ensure_ready()
        return self._index.keys(self.fingerprint)

    # -- rebuild ----------------------------------------------------------------------------
    async def rebuild_index(self) -> int:
        """List this layout's packs and index every page not indexed yet; returns how many
        pages were added. Raises :class:`TierUnavailableError` when the store cannot be
        reached."""
        self._check_open()
        n = await self._run(self._rebuild)
        self._ready = True
        return n

    def _rebuild(self) -> int:
        taken = self._take(self._unindexed(discovery=False)[0], discovered=False)
        self._count(rebuilt_pages=taken.pages)
        log.info("rebuilt object index from the packs under %s: %d page(s)",
                 self._pack_prefix, taken.pages)
        return taken.pages

    def _unindexed(self, *, discovery: bool) -> tuple[list[Announced], int]:
        """List every pack of this layout in the bucket: those the index has no page of, and
        how many objects the listing named."""
        objects = self._call(lambda: self._backend.list(self._pack_prefix),
                             what=f"list {self._pack_prefix}", discovery=discovery)
        todo: list[Announced] = []
        for key, size in objects:
            name = key[len(self._pack_prefix):]
            if not name.endswith(PACK_SUFFIX) or "/" in name:
                continue
            try:
                pack_id = bytes.fromhex(name[: -len(PACK_SUFFIX)])
            except ValueError:
                continue
            if len(pack_id) == 16:
                self._saw(pack_id)  # listed just now: it exists
                if not self._index.has_pack(pack_id):
                    todo.append(Announced(pack_id, size, min(size, _TAIL_GUESS)))
        return todo, len(objects)

    def _take(self, packs: list[Announced], *, discovered: bool) -> Taken:
        """Read the manifests of ``packs``, index their pages, and report the pages added to
        the listener (its optional ``on_discovered``). ``discovered``: counted as pages of
        other writers found while running, not as a rebuild."""
        if not packs:
            return Taken(0, frozenset())
        keys: list[int] = []
        failed: set[bytes] = set()
        taken = garbage = gone = requests = nbytes = 0
        # A private pool: this runs on one of the store's own threads (or discovery's), and
        # waiting there for work queued behind it on the same pool could deadlock.
        with ThreadPoolExecutor(min(self.config.max_workers, len(packs))) as pool:
            read = functools.partial(self._read_manifest, discovery=discovered)
            for p, m in zip(packs, pool.map(read, packs), strict=True):
                requests += m.requests
                nbytes += m.nbytes
                if m.outcome is _Manifest.OK:
                    self._saw(p.pack_id)
                    added = self._index.add(self.fingerprint, m.entries)
                    keys.extend(added)
                    taken += bool(added)
                elif m.outcome is _Manifest.FAILED:
                    failed.add(p.pack_id)
                elif m.outcome is _Manifest.GARBAGE:
                    garbage += 1
                else:
                    gone += 1
        with self._lock:
            self._used += len(keys) * self.page_bytes
        if discovered:
            self._count(discovered_pages=len(keys), discovered_packs=taken,
                        discovery_garbage=garbage, discovery_gone=gone,
                        discovery_requests=requests, discovery_bytes=nbytes)
        if keys:
            self._notify_discovered(keys)
        return Taken(len(keys), frozenset(failed))

    def _notify_discovered(self, keys: list[int]) -> None:
        hook = getattr(self.listener, "on_discovered", None)
        if hook is None:
            return
        try:
            hook(self.medium, keys)
        except Exception:
            # The pages are indexed whatever the listener makes of them.
            log.exception("the listener's on_discovered failed for %d page(s)", len(keys))

    def _read_manifest(self, pack: Announced, *, discovery: bool) -> _ManifestRead:
        key = self.object_key(pack.pack_id)
        size = pack.size
        want = min(size, pack.tail)
        nbytes = 0
        requests = 0

        def tail_of(n: int) -> bytes:
            nonlocal nbytes, requests
            requests += 1
            got = self._call(lambda: self._backend.read(key, size - n, n, whole=False),
                             what=f"get {key}", discovery=discovery)
            nbytes += len(got)
            return got

        try:
            parsed = parse_manifest(tail_of(want), pack_size=size)
            if isinstance(parsed, int):
                parsed = parse_manifest(tail_of(parsed), pack_size=size)
            if isinstance(parsed, int):
                raise ManifestError("manifest changed while read")
        except ManifestError as e:
            log.warning("skipping pack %s: %s", key, e)
            return _ManifestRead(_Manifest.GARBAGE, [], requests, nbytes)
        except TierUnavailableError as e:
            log.warning("skipping pack %s for now: %s", key, e)
            return _ManifestRead(_Manifest.FAILED, [], requests, nbytes)
        except Exception as e:
            if self._backend.classify(e) is FaultKind.MISSING:
                return _ManifestRead(_Manifest.GONE, [], requests, nbytes)
            log.warning("skipping pack %s for now: %r", key, e)
            return _ManifestRead(_Manifest.FAILED, [], requests, nbytes)
        fingerprint, pages = parsed
        if fingerprint != self.fingerprint:
            # Filed under this layout's folder, yet another layout's: nobody honest wrote it.
            log.warning("skipping pack %s: its manifest is of layout %#018x", key, fingerprint)
            return _ManifestRead(_Manifest.GARBAGE, [], requests, nbytes)
        entries = [(k, Location(pack.pack_id, off, ln, size)) for k, off, ln in pages
                   if ln == HEADER_SIZE + self.page_bytes and off + ln <= size]
        return _ManifestRead(_Manifest.OK, entries, requests, nbytes)

    # -- discovery: other writers' packs, found while running ----------------------------------
    async def refresh(self) -> int:
        """Look for packs other writers sharing the bucket, prefix and layout uploaded since
        the last look, and index their pages (storage/objectdiscovery.py); the first look
        also lists every pack. Returns how many pages were added. Raises
        :class:`TierUnavailableError` when the bucket cannot be reached."""
        self._check_open()
        if not await self._serving():
            raise TierUnavailableError(f"{self._backend.location} is not answering now")
        return await self._run(self._discovery.refresh)

    def request_refresh(self) -> None:
        """Ask for a look (see :meth:`refresh`) soon, without waiting: at once, or once
        ``discovery_min_interval_s`` has passed since the last. For hints from outside, such
        as a router that saw another worker store OBJECT pages. Thread-safe."""
        self._check_open()
        self._discovery.request_refresh()

    # -- accounting & lifecycle ---------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int | None:
        return None  # the bucket is the limit; lifecycle rules, not this tier, expire data

    @property
    def used_bytes(self) -> int:
        return self._used

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._pool.shutdown, True)
        # After the uploads: a head rewrite they made due goes out now. Bounded: a look in
        # progress stops at its next request.
        await loop.run_in_executor(None, self._discovery.close,
                                   2 * self.config.retry.deadline_s)
        self._requests.close()
        self._index.close()
        self._backend.close()


class _Manifest(enum.Enum):
    OK = "ok"
    GARBAGE = "garbage"  # damaged, or not this layout's: skipped for good (counted)
    GONE = "gone"  # the pack is not there (deleted since it was listed or announced)
    FAILED = "failed"  # no answer: try again later


@dataclass(frozen=True, slots=True)
class _ManifestRead:
    outcome: _Manifest
    entries: list[tuple[int, Location]]
    requests: int
    nbytes: int


class _DiscoveryHost:
    """The store as discovery sees it (storage/objectdiscovery.py: DiscoveryHost)."""

    def __init__(self, store: PackedObjectStore) -> None:
        self._store = store

    def available(self) -> bool:
        s = self._store
        return (not s._degraded and s.breaker.would_allow()
                and s._discovery_breaker.would_allow())

    def request(self, fn: Callable[[], T], what: str) -> T:
        return self._store._call(fn, what, discovery=True)

    def list_versions(self, prefix: str) -> list[tuple[str, int, str]]:
        return self._store._backend.list_versions(prefix)

    def read(self, key: str, offset: int, length: int, whole: bool) -> bytes:
        backend = self._store._backend
        try:
            return backend.read(key, offset, length, whole=whole)
        except Exception as e:
            if backend.classify(e) is FaultKind.MISSING:
                return b""  # deleted since listed
            raise

    def write(self, key: str, data: bytes) -> None:
        self._store._backend.put(key, bytearray(data), create_only=False)

    def log(self) -> tuple[int, list[Announced]]:
        s = self._store
        return s._index.announced(s.fingerprint)

    def known(self, pack_id: bytes) -> bool:
        return self._store._index.has_pack(pack_id)

    def unindexed(self) -> list[Announced]:
        todo, listed = self._store._unindexed(discovery=True)
        self._store._count(discovery_requests=1 + listed // 1000)  # a LIST answers 1,000
        return todo

    def take(self, packs: list[Announced]) -> Taken:
        return self._store._take(packs, discovered=True)

    def caught_up(self) -> None:
        self._store._ready = True  # no rebuild needed on first use any more

    def count(self, **deltas: int) -> None:
        self._store._count(**deltas)


class _PackGone(Exception):
    """The pack object does not exist (internal signal)."""


class _ReadFailed(Exception):
    """The read did not complete (internal signal)."""
