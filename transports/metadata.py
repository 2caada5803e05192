"""An agent's metadata blob: who it is, how to reach it, what a given peer may touch.

Plain msgpack data (never pickle), built per peer: a region appears only in the metadata of
the peers it is exposed to, with what each backend published about it::

    {v: 1, agent: "prefill-0", instance: <random 63-bit int>, node: "<host id>",
     host: "127.0.0.1", port: 5600, meta: {...},
     backends: {"tcp": {...}, "ucx": {"address": b"..."}},
     regions: [{id, name, length, device: "cpu"|"cuda", access: 1|2|3, meta: {...},
                backends: {"ucx": {...}}}, ...]}

``node`` identifies the machine (boot id and host name hashed): backends that work within
one node only (nvlink, shared memory) compare it.
"""

from __future__ import annotations

import functools
import hashlib
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvbm.transports.control import ProtocolError
from kvbm.transports.regions import Access, DeviceKind, RemoteRegion

METADATA_VERSION = 1


@functools.cache
def node_id() -> str:
    """A stable id of this machine (boot id + host name, hashed)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return hashlib.sha256(f"{boot}/{socket.gethostname()}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PeerInfo:
    """A peer as its metadata describes it to this agent."""

    name: str
    instance: int
    node: str
    host: str
    port: int
    backends: Mapping[str, Mapping[str, Any]]
    regions: Mapping[int, RemoteRegion]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def region(self, name: str) -> RemoteRegion:
        """The exposed region registered under ``name``; ``KeyError`` if there is none."""
        for r in self.regions.values():
            if r.name == name:
                return r
        raise KeyError(f"{self.name} exposes no region named {name!r} to this agent")

    @property
    def same_node(self) -> bool:
        """Whether the peer runs on this machine."""
        return self.node == node_id()


def region_entry(rid: int, name: str | None, length: int, device: DeviceKind, access: Access,
                 meta: Mapping[str, Any], backends: Mapping[str, Mapping[str, Any]]
                 ) -> dict[str, Any]:
    return {"id": rid, "name": name, "length": length, "device": device.value,
            "access": access.value, "meta": dict(meta),
            "backends": {k: dict(v) for k, v in backends.items()}}


def build(name: str, instance: int, host: str, port: int,
          backends: Mapping[str, Mapping[str, Any]], regions: list[dict[str, Any]],
          meta: Mapping[str, Any]) -> dict[str, Any]:
    return {"v": METADATA_VERSION, "agent": name, "instance": instance, "node": node_id(),
            "host": host, "port": port, "meta": dict(meta),
            "backends": {k: dict(v) for k, v in backends.items()}, "regions": regions}


def _get(d: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = d.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (
            kind if isinstance(kind, tuple) else (kind,))):
        raise ProtocolError(f"metadata: {where}{key} missing or malformed")
    return value


def _str_map(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError(f"metadata: {where} is not a map of names")
    return value


def parse(data: Any) -> PeerInfo:
    """Check and read a peer's metadata; :class:`TransportError` if malformed."""
    d = _str_map(data, "the blob")
    if d.get("v") != METADATA_VERSION:
        raise ProtocolError(f"metadata version {d.get('v')!r}, expected {METADATA_VERSION}")
    backends = _str_map(d.get("backends"), "backends")
    for k, v in backends.items():
        _str_map(v, f"backends.{k}")
    regions: dict[int, RemoteRegion] = {}
    raw_regions = d.get("regions")
    if not isinstance(raw_regions, list):
        raise ProtocolError("metadata: regions is not a list")
    for i, r in enumerate(raw_regions):
        r = _str_map(r, f"regions[{i}]")
        where = f"regions[{i}]."
        rid = _get(r, "id", int, where)
        length = _get(r, "length", int, where)
        name = r.get("name")
        try:
            device = DeviceKind(_get(r, "device", str, where))
            access = Access(_get(r, "access", int, where))
        except ValueError:
            raise ProtocolError(f"metadata: {where}device/access malformed") from None
        if not (0 < rid < 1 << 63 and 0 < length < 1 << 62) or not (
                name is None or isinstance(name, str)):
            raise ProtocolError(f"metadata: {where} out of range")
        rb = _str_map(r.get("backends", {}), f"{where}backends")
        regions[rid] = RemoteRegion(rid, length, device, access, name,
                                    _str_map(r.get("meta", {}), f"{where}meta"),
                                    {k: _str_map(v, f"{where}backends.{k}")
                                     for k, v in rb.items()})
    port = _get(d, "port", int, "")
    if not 0 <= port < 65536:
        raise ProtocolError("metadata: port out of range")
    return PeerInfo(name=_get(d, "agent", str, ""), instance=_get(d, "instance", int, ""),
                    node=_get(d, "node", str, ""), host=_get(d, "host", str, ""), port=port,
                    backends=backends, regions=regions, meta=_str_map(d.get("meta", {}), "meta"))
