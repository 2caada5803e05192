"""Discovery: the object tier as a cluster-wide cache.

Workers that share a bucket, a prefix and a layout (fingerprint) find each other's pages
while they run, not only after a restart with an empty index:

* **Heads.** Each writer keeps one small *head* object (storage/objecthead.py),
  ``{prefix}{fingerprint:016x}/heads/{writer id}.kvhead``, listing its newest packs (up to
  ``announce_packs``), numbered by the writer's log (storage/objectindex.py). A put that
  uploaded packs rewrites it before returning (one PUT of ``56 + 40 * packs`` bytes; a
  failed rewrite is tried again by this module's thread, as is a head that lags the log
  after a restart).
* **Refresh.** Every ``discovery_interval_s`` (and, rate-limited to one per
  ``discovery_min_interval_s``, when a read asks for a page the index does not know, or
  :meth:`Discovery.request_refresh` is called with a hint from outside), a reader lists
  the ``heads/`` folder: **one LIST request** for up to 1,000 writers, whose answer carries
  each head's version (S3 ETag, GCS generation). Only heads that changed are read: one
  ranged GET of the header and the 32 newest records (1,336 bytes; a second GET only when a
  writer uploaded more than 32 packs since the last look). Each pack not yet indexed costs
  one ranged GET of its manifest (about 32 bytes per page). With nothing new, a refresh is
  that one LIST.
* **Catching up.** The first refresh of a store, and any refresh that finds a writer
  further ahead than its head lists, also lists every pack of the layout (one LIST per
  1,000 packs) and reads the manifests of those not indexed, as a rebuild does.
* **Trust.** Nothing another writer wrote is taken on trust. Heads of other layouts live
  in other folders and are never listed; a head or record whose checksum, fingerprint,
  writer id or numbers do not add up is skipped and counted (``discovery_garbage``), as is
  a manifest that does not fit its pack or names another fingerprint. Pages are indexed
  from the pack's own manifest, and every page is verified when it is read (header,
  fingerprint, key, xxh3-128), as always. A pack deleted by another writer after it was
  discovered is a miss on read (its pages leave the index), never an error or wrong data.
  Pages of a namespace salt are filed under hashes no other salt produces, so they are
  never matched by a manager with another salt.

The pages found are added to the local index and reported to the store's listener through
its optional ``on_discovered(medium, keys)`` method (the block manager records them as
pages of the tier, to be linked when a prefix matches them).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from kvbm.storage.objecthead import (
    HEAD_SIZE,
    HEAD_SUFFIX,
    MAX_HEAD_PACKS,
    RECORD_SIZE,
    HeadError,
    HeadInfo,
    decode_header,
    decode_records,
    encode_head,
    head_key,
)
from kvbm.storage.objectindex import Announced

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Records read together with the header.
_FIRST_RECORDS = 32


# -- the seam to the store ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Taken:
    """What reading the manifests of some packs gave."""

    pages: int
    #: packs whose manifest could not be read now (no answer): asked again next time
    failed: frozenset[bytes]


class DiscoveryHost(Protocol):
    """What discovery needs of the store it serves (PackedObjectStore)."""

    def available(self) -> bool:
        """Whether requests may go out now (open, not degraded, breaker allows)."""

    def request(self, fn: Callable[[], T], what: str) -> T:
        """Run one request under the store's retry policy and discovery's own breaker
        (looks in the background never trip, nor close, the data path's)."""

    def list_versions(self, prefix: str) -> list[tuple[str, int, str]]:
        """``(key, size, version token)`` under ``prefix`` (no retries: see request)."""

    def read(self, key: str, offset: int, length: int, whole: bool) -> bytes: ...

    def write(self, key: str, data: bytes) -> None: ...

    def log(self) -> tuple[int, list[Announced]]:
        """This writer's newest pack number and its newest packs, newest first."""

    def known(self, pack_id: bytes) -> bool:
        """Whether the local index has pages of this pack."""

    def unindexed(self) -> list[Announced]:
        """Every pack of the layout in the bucket the index has no page of (a full list)."""

    def take(self, packs: list[Announced]) -> Taken:
        """Read the packs' manifests, index their pages, report them to the listener."""

    def caught_up(self) -> None:
        """Every pack in the bucket was looked at once: the index holds all there was (as
        after a rebuild)."""

    def count(self, **deltas: int) -> None: ...


@dataclass(frozen=True, kw_only=True)
class DiscoverySettings:
    interval_s: float
    min_interval_s: float
    announce: bool


@dataclass(slots=True)
class _Seen:
    token: str
    seq: int


class Discovery:
    """Announces this writer's packs and finds other writers' (see the module docstring).

    One daemon thread per store does both; :meth:`refresh` runs a refresh on the caller's
    thread (one at a time)."""

    def __init__(self, host: DiscoveryHost, settings: DiscoverySettings, *, fingerprint: int,
                 writer: bytes, heads_prefix: str, name: str) -> None:
        self._host = host
        self._settings = settings
        self._fingerprint = fingerprint
        self._writer = writer
        self._prefix = heads_prefix
        self.own_key = head_key(heads_prefix, writer)
        self._seen: dict[str, _Seen] = {}
        self._caught_up = False  # the first refresh lists every pack
        self._announced = -1  # the log number the head in the bucket shows (-1: unknown)
        self._announce_lock = threading.Lock()  # one head write at a time, in log order
        self._refresh_lock = threading.Lock()
        self._cond = threading.Condition()
        self._stopping = False
        self._announce_due = False  # a head write failed: the thread tries again
        self._refresh_asked = False
        now = time.monotonic()
        self._last_refresh = now
        self._next_refresh = now + settings.interval_s if settings.interval_s > 0 else None
        self._retry_at = 0.0  # after a failed or refused announce
        self._thread = threading.Thread(target=self._loop, name=f"{name}-discovery",
                                        daemon=True)
        self._thread.start()

    # -- called by the store (any thread) --------------------------------------------------
    def announce(self, put: Callable[[str, bytes], None]) -> None:
        """Rewrite the head if it is behind this writer's log; ``put(key, data)`` makes the
        request (a put's own, under the store's breaker). Writes run one at a time, each
        with the log as it is then, so a later head never loses to an earlier one. Raises
        what ``put`` raises; the thread then tries again later."""
        try:
            with self._announce_lock:
                seq, packs = self._host.log()
                if seq == 0 or seq == self._announced:
                    return
                data = encode_head(self._fingerprint, self._writer, seq, packs)
                put(self.own_key, data)
                self._announced = seq
                self._host.count(announces=1, announce_bytes=len(data))
        except Exception:
            self._host.count(announce_failures=1)
            with self._cond:
                self._announce_due = True
                self._retry_at = time.monotonic() + max(1.0, self._settings.min_interval_s)
                self._cond.notify()
            raise

    def request_refresh(self) -> None:
        """Refresh soon: at once, or when ``min_interval_s`` has passed since the last."""
        with self._cond:
            self._refresh_asked = True
            self._cond.notify()

    def refresh(self) -> int:
        """One refresh now, on this thread; the pages added. Raises when the bucket cannot
        be listed (TierUnavailableError, or the backend's error)."""
        with self._refresh_lock:
            try:
                return self._refresh()
            except _Stopped:
                return 0
            finally:
                self._last_refresh = time.monotonic()

    def close(self, timeout_s: float) -> None:
        """Stop the thread; a head rewrite that failed before is tried once more first
        (bounded by the retry policy). Waits at most ``timeout_s``."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout_s)

    # -- the thread ---------------------------------------------------------------------------
    def _due(self, now: float) -> tuple[bool, bool, float | None]:
        """(announce now, refresh now, when to look again); with ``self._cond`` held."""
        refresh_at = self._next_refresh
        if self._refresh_asked:
            asked = self._last_refresh + self._settings.min_interval_s
            refresh_at = asked if refresh_at is None else min(refresh_at, asked)
        announce_at = self._retry_at if self._announce_due else None
        times = [t for t in (refresh_at, announce_at) if t is not None]
        return (announce_at is not None and announce_at <= now,
                refresh_at is not None and refresh_at <= now, min(times) if times else None)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    announce, refresh, wake = self._due(now)
                    if self._stopping or announce or refresh:
                        break
                    self._cond.wait(None if wake is None else max(0.0, wake - now))
                stopping = self._stopping
                announce = announce or (stopping and self._announce_due)
                if announce:
                    self._announce_due = False
                if refresh and not stopping:
                    self._refresh_asked = False
            if announce or refresh:
                self._announce_safely()
            if stopping:
                return
            if refresh:
                self._refresh_safely()

    def _announce_safely(self) -> None:
        """The thread's head write: after a failed one, and at each periodic look (a
        restarted writer's head may lag its log: packs committed just before a crash)."""
        if not self._settings.announce:
            return
        if not self._host.available():
            with self._cond:
                self._announce_due = True
                self._retry_at = time.monotonic() + max(1.0, self._settings.min_interval_s)
            return
        host = self._host
        try:
            self.announce(lambda key, data: host.request(lambda: host.write(key, data),
                                                         f"put {key}"))
        except Exception as e:
            log.warning("cannot write the head %s (tried again later): %r", self.own_key, e)

    def _refresh_safely(self) -> None:
        now = time.monotonic()
        with self._cond:
            if self._next_refresh is not None:
                self._next_refresh = now + self._settings.interval_s
        if not self._host.available():
            return
        try:
            self.refresh()
        except Exception as e:
            log.warning("discovery refresh under %s failed (tried again later): %r",
                        self._prefix, e)
            self._host.count(discovery_errors=1)

    # -- one refresh --------------------------------------------------------------------------
    def _refresh(self) -> int:
        host = self._host
        host.count(discovery_refreshes=1)
        listed = host.request(lambda: host.list_versions(self._prefix), f"list {self._prefix}")
        host.count(discovery_requests=1 + len(listed) // 1000)
        seen: dict[str, _Seen] = {}
        todo: dict[bytes, Announced] = {}
        origin: dict[bytes, str] = {}
        behind = not self._caught_up
        for key, size, token in listed:
            if self._stopping:
                raise _Stopped
            name = key[len(self._prefix):]
            if key == self.own_key or not key.startswith(self._prefix):
                continue
            old = self._seen.get(key)
            if old is not None and token and old.token == token:
                seen[key] = old
                continue
            got = self._read_head(key, name, size, old)
            if got is None:  # no answer: as before, read again next time
                if old is not None:
                    seen[key] = _Seen("", old.seq)
                continue
            seq, packs, gap = got
            seen[key] = _Seen(token, seq)
            behind |= gap
            for p in packs:
                if p.pack_id not in todo:
                    todo[p.pack_id] = p
                    origin[p.pack_id] = key
        if self._stopping:
            raise _Stopped
        if behind:
            host.count(discovery_rescans=1)
            for p in host.unindexed():
                todo.setdefault(p.pack_id, p)
        new = [p for p in todo.values() if not host.known(p.pack_id)]
        taken = host.take(new) if new else Taken(0, frozenset())
        for pack_id in taken.failed:
            key = origin.get(pack_id, "")
            old = self._seen.get(key)
            if key in seen:  # its head is read again next time, from where it was
                seen[key] = _Seen("", old.seq if old is not None else 0)
        self._seen = seen
        if behind and not taken.failed:
            self._caught_up = True
            host.caught_up()
        return taken.pages

    def _read_head(self, key: str, name: str, size: int, old: _Seen | None
                   ) -> tuple[int, list[Announced], bool] | None:
        """(log number, packs new since ``old``, whether packs were missed) of one head;
        ``None`` when it cannot be read now. A garbage head gives no packs."""
        host = self._host
        try:
            if not name.endswith(HEAD_SUFFIX) or "/" in name:
                raise HeadError(f"not a head's name: {name!r}")
            try:
                writer = bytes.fromhex(name[: -len(HEAD_SUFFIX)])
            except ValueError:
                raise HeadError(f"not a head's name: {name!r}") from None
            if len(writer) != 16:
                raise HeadError(f"not a head's name: {name!r}")
            if not HEAD_SIZE <= size <= HEAD_SIZE + RECORD_SIZE * MAX_HEAD_PACKS:
                raise HeadError(f"a head of {size} bytes")
            want = min(size, HEAD_SIZE + RECORD_SIZE * _FIRST_RECORDS)
            data = self._get(key, 0, want, whole=want == size)
            try:
                info = decode_header(data, fingerprint=self._fingerprint, writer=writer)
                return self._head_packs(key, writer, data, info, old)
            except HeadError:
                # The writer may have rewritten its head between the list and these reads
                # (two ranged reads can see two versions): read it whole, in one request,
                # before calling it garbage.
                data = self._get(key, 0, HEAD_SIZE + RECORD_SIZE * MAX_HEAD_PACKS, whole=True)
                info = decode_header(data, fingerprint=self._fingerprint, writer=writer)
                return self._head_packs(key, writer, data, info, old)
        except HeadError as e:
            log.warning("skipping head %s: %s", key, e)
            host.count(discovery_garbage=1)
            # Not read again until it changes; then from where this writer was before.
            return (old.seq if old is not None else 0), [], False
        except _Gone:
            return None if old is None else (old.seq, [], False)
        except Exception as e:
            log.info("cannot read head %s now: %r", key, e)
            host.count(discovery_errors=1)
            return None

    def _head_packs(self, key: str, writer: bytes, data: bytes, info: HeadInfo,
                    old: _Seen | None) -> tuple[int, list[Announced], bool]:
        """(log number, packs new since ``old``, whether packs were missed) of a head whose
        header is ``info`` and whose first bytes are ``data``."""
        if old is None or info.seq < old.seq:  # new to us, or its log started over
            new, gap = info.count, info.seq > info.count
        else:
            new = min(info.seq - old.seq, info.count)
            gap = info.seq - old.seq > info.count
        records = data[HEAD_SIZE: HEAD_SIZE + RECORD_SIZE * new]
        have = len(records) // RECORD_SIZE
        if have < new:
            records += self._get(key, HEAD_SIZE + RECORD_SIZE * have,
                                 RECORD_SIZE * (new - have), whole=False)
        packs = decode_records(records, info=info, fingerprint=self._fingerprint,
                               writer=writer, first=0)
        if len(packs) < new:
            raise HeadError(f"{len(packs)} of {new} records there")
        return info.seq, packs, gap

    def _get(self, key: str, offset: int, length: int, *, whole: bool) -> bytes:
        host = self._host
        data = host.request(lambda: host.read(key, offset, length, whole), f"get {key}")
        host.count(discovery_requests=1, discovery_bytes=len(data))
        if not data:
            raise _Gone
        return data


class _Stopped(Exception):
    """The store is closing: a refresh stops between requests."""


class _Gone(Exception):
    """The object is not there (deleted since it was listed)."""
