"""An agent's registered regions: registration, exposure per peer, and the serving side's
check of every range a peer asks for.

A region is private until exposed (to :data:`ALL_PEERS`, a peer name or names) with an
:class:`Access`. A peer's request is refused, with one answer for "no such region" and "not
exposed to you" (a peer learns nothing of other peers' regions), unless every range lies
inside a region exposed to that peer for that operation; then the regions are leased
against deregistration until the request is served.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from kvbm.errors import ClosedError, InvalidArgumentError, RemoteAccessError
from kvbm.transports.backend import Lease
from kvbm.transports.control import encode
from kvbm.transports.descriptors import Op, Segment
from kvbm.transports.metadata import region_entry
from kvbm.transports.regions import ALL_PEERS, Access, RegionHandle, check_name

if TYPE_CHECKING:
    from kvbm.transports.backend import Backend

log = logging.getLogger(__name__)


def check_meta(meta: object) -> dict[str, Any]:
    if meta is None:
        return {}
    if not isinstance(meta, Mapping) or not all(isinstance(k, str) for k in meta):
        raise InvalidArgumentError(f"meta must be a mapping with str keys, got {meta!r}")
    try:
        encode(dict(meta))
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidArgumentError(f"meta must be plain data (msgpack): {e}") from None
    return dict(meta)


def exposure_names(to: object, access: object) -> list[str]:
    """Check an exposure's arguments; the peer names (or ``ALL_PEERS``)."""
    if not isinstance(access, Access) or not access:
        raise InvalidArgumentError(f"access must be an Access flag, got {access!r}")
    names = [to] if isinstance(to, str) else list(to) if isinstance(to, Iterable) else None
    if names is None:
        raise InvalidArgumentError(f"expose to ALL_PEERS, a peer name or names, got {to!r}")
    return [n if n == ALL_PEERS else check_name("peer", n) for n in names]


class RegionTable:
    """The regions of one agent (thread-safe)."""

    def __init__(self, owner: str, on_refuse: Callable[[str, str], None]) -> None:
        self._owner = owner
        self._on_refuse = on_refuse
        self._regions: dict[int, RegionHandle] = {}
        self._lock = threading.Lock()

    def register(self, obj: object, *, name: str | None, expose_to: object, access: object,
                 meta: object, backends: Iterable[Backend]) -> RegionHandle:
        if name is not None:
            check_name("region", name)
        clean = check_meta(meta)
        peers = exposure_names(expose_to, access) if expose_to is not None else []
        region = RegionHandle(obj, name=name, meta=clean)
        with self._lock:
            if name is not None and any(r.name == name for r in self._regions.values()):
                raise InvalidArgumentError(f"a region named {name!r} is registered already")
            for b in backends:
                b.on_register(region)
            self._regions[region.id] = region
        for p in peers:
            region.expose(p, access)  # type: ignore[arg-type]
        return region

    def deregister(self, region: object, timeout: float, backends: Iterable[Backend]) -> None:
        if not isinstance(region, RegionHandle):
            raise InvalidArgumentError(f"expected a RegionHandle, got {region!r}")
        with self._lock:
            if self._regions.get(region.id) is not region:
                return
            del self._regions[region.id]
        # Refused at once, one-sided holders of its key told at once (not after the wait
        # for the transfers the serving side runs on it).
        region.close(0)
        for b in backends:
            b.on_exposure(region)
        if not region.close(timeout):
            log.warning("agent %s: region %r deregistered with transfers still running",
                        self._owner, region)
        for b in backends:
            b.on_deregister(region)

    def own(self, region: object) -> RegionHandle:
        if not isinstance(region, RegionHandle) or not self.owns(region):
            raise InvalidArgumentError(f"{region!r} is not a region registered with this agent")
        return region

    def owns(self, region: RegionHandle) -> bool:
        return self._regions.get(region.id) is region

    def all(self) -> list[RegionHandle]:
        with self._lock:
            return list(self._regions.values())

    def entries_for(self, peer: str, backends: Mapping[str, Backend]) -> list[dict[str, Any]]:
        """The metadata entries of the regions exposed to ``peer``."""
        out = []
        for r in self.all():
            acc = r.access_for(peer)
            if acc is not None and not r.writable:
                acc &= Access.READ
            if not acc or r.closed:
                continue
            out.append(region_entry(r.id, r.name, r.length, r.device, acc, r.meta,
                                    {n: b.region_info(r) for n, b in backends.items()}))
        return out

    def lease_local(self, segments: Sequence[Segment]) -> list[RegionHandle]:
        """Lease the local regions of a transfer; :class:`ClosedError` if one is gone."""
        held: list[RegionHandle] = []
        first = segments[0].local
        regions = [first] if all(s.local is first for s in segments) else list(
            {id(s.local): s.local for s in segments}.values())
        for r in regions:
            if not r.acquire():
                Lease([], held).release()
                raise ClosedError(f"region {r.name or r.id} was deregistered")
            held.append(r)
        return held

    def resolve(self, peer: str, op: Op, ranges: Iterable[tuple[int, int, int]]) -> Lease:
        """Check a peer's ranges (see the module); raises :class:`RemoteAccessError`."""
        pieces: list[tuple[RegionHandle, int, int]] = []
        regions: dict[int, RegionHandle] = {}
        need = 1 if op is Op.READ else 2  # Access's values: no enum operations per range
        for rid, off, n in ranges:
            r = self._regions.get(rid)
            acc = r.access_for(peer) if r is not None else None
            if r is None or acc is None or r.closed:
                self._refuse(peer, f"region {rid} is not registered with {self._owner}")
            if not acc.value & need or (need == 2 and not r.writable):
                self._refuse(peer, f"region {r.name or rid} is not open to {op.value}")
            if not (0 <= off < r.length and 0 < n <= r.length - off):
                self._refuse(peer, f"[{off}, {off + n}) is outside region {r.name or rid} "
                             f"({r.length} bytes)")
            pieces.append((r, off, n))
            regions[rid] = r
        held: list[RegionHandle] = []
        for r in regions.values():
            if not r.acquire():
                Lease([], held).release()
                self._refuse(peer, f"region {r.name or r.id} was deregistered")
            held.append(r)
        return Lease(pieces, held)

    def exposed(self, peer: str, rid: int) -> tuple[RegionHandle, Access]:
        """Region ``rid`` and what ``peer`` may do on it (read-only memory: READ at most);
        refused as :meth:`resolve` refuses."""
        r = self._regions.get(rid)
        acc = r.access_for(peer) if r is not None else None
        if r is None or acc is None or r.closed:
            self._refuse(peer, f"region {rid} is not registered with {self._owner}")
        return r, acc if r.writable else acc & Access.READ

    def _refuse(self, peer: str, why: str) -> NoReturn:
        self._on_refuse(peer, why)
        raise RemoteAccessError(why)
