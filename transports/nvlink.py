"""The ``nvlink`` backend: CUDA IPC between processes on one node; the copies run on CUDA
streams (over NVLink where the GPUs have it, else PCIe; on one GPU, its copy engines).

The serving side makes every copy, after checking every range (``Agent.resolve``), so no
peer ever holds a handle to this agent's memory: the *requester* shares its own local
region (``torch.UntypedStorage._share_cuda_``, one share per region and link) in the
request, and the server opens it (``_new_shared_cuda``) and copies between it and its own
region: device to device, or host to device and back when its region is in host memory
(a decode GPU pulling a prefill host pool). The requester's memory must therefore be on a
GPU; a transfer from local host memory goes to ucx or tcp. Note that a CUDA IPC handle
opens the requester's whole allocation (a caching-allocator block can hold other tensors):
the server touches only the ranges of the request, bounded by the shared region's length.

Requests travel over authenticated connections (channel ``nvlink``) of the agent's
listener, pooled as in :mod:`kvbm.transports.links`::

    -> {t: r|w, s: [region, offset, length, ...], l: [share, offset, ...], h: [share, ...]}
    <- {t: ok} once every copy is complete          or  {t: error, code, error}

A share names the GPU by UUID (processes may number devices differently). Unavailable
(and not advertised) unless torch is loaded and sees a CUDA device when the agent starts.
"""

from __future__ import annotations

import collections
import logging
import socket
import sys
import warnings
from typing import Any, ClassVar

from kvbm.errors import RemoteAccessError, TransportError
from kvbm.transports.backend import BackendHost, LinkedBackend
from kvbm.transports.config import TransportConfig
from kvbm.transports.control import ProtocolError, recv_frame, send_frame
from kvbm.transports.descriptors import MAX_DESCRIPTORS, Op, Segment
from kvbm.transports.handle import Transfer
from kvbm.transports.links import LinkPool, check_answer, shutdown
from kvbm.transports.metadata import PeerInfo
from kvbm.transports.regions import DeviceKind, RegionHandle

log = logging.getLogger(__name__)

CHANNEL = "nvlink"
_LIMIT = 1 << 63
#: Opened requester allocations kept per connection (each open maps GPU memory).
_OPENED_PER_LINK = 64
_SHARE_FIELDS = ("gpu", "handle", "size", "soff", "rc", "rco", "ev", "evs", "base", "len")


def _torch() -> Any:
    return sys.modules.get("torch")


def gpu_uuids() -> list[str]:
    torch = _torch()
    return [str(torch.cuda.get_device_properties(i).uuid)
            for i in range(torch.cuda.device_count())]


def share(region: RegionHandle, uuids: list[str]) -> dict[str, Any]:
    """What a peer needs to open ``region`` (a CUDA region of this process) by IPC."""
    t = region.tensor
    assert t is not None and region.device is DeviceKind.CUDA
    storage: Any = t.untyped_storage()
    _dev, handle, size, soff, rc, rco, ev, evs = storage._share_cuda_()
    return {"gpu": uuids[region.device_index], "handle": bytes(handle), "size": int(size),
            "soff": int(soff), "rc": bytes(rc), "rco": int(rco), "ev": bytes(ev or b""),
            "evs": bool(evs), "base": region.base - int(storage.data_ptr()),
            "len": region.length}


class NvLink:
    """A connection to the peer, and the shares of local regions sent over it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.shares: dict[int, dict[str, Any]] = {}

    def close(self) -> None:
        shutdown(self.sock)
        self.sock.close()


def exchange(cfg: TransportConfig, uuids: list[str], link: NvLink, xfer: Transfer,
             segs: list[Segment]) -> None:
    torch = _torch()
    index: dict[int, int] = {}
    sent: list[dict[str, Any]] = []
    flat: list[int] = []
    loc: list[int] = []
    for s in segs:
        i = index.get(s.local.id)
        if i is None:
            sh = link.shares.get(s.local.id)
            if sh is None:
                sh = link.shares[s.local.id] = share(s.local, uuids)
            i = index[s.local.id] = len(sent)
            sent.append(sh)
        flat += (s.remote_id, s.remote_offset, s.length)
        loc += (i, s.local_offset)
    if xfer.op is Op.WRITE:  # what the caller's kernels wrote must be there before we ask
        for dev in {s.local.device_index for s in segs}:
            torch.cuda.current_stream(dev).synchronize()
    send_frame(link.sock, {"t": "r" if xfer.op is Op.READ else "w", "s": flat, "l": loc,
                           "h": sent})
    check_answer(recv_frame(link.sock, cfg.max_frame_bytes))


def _parse_request(frame: Any) -> tuple[Op, list[tuple[int, int, int]], list[tuple[int, int]],
                                         list[dict[str, Any]]]:
    if not isinstance(frame, dict) or frame.get("t") not in ("r", "w"):
        raise ProtocolError("not an nvlink transfer request")
    flat, loc, shares = frame.get("s"), frame.get("l"), frame.get("h")
    if (not isinstance(flat, list) or not flat or len(flat) % 3
            or len(flat) > 3 * MAX_DESCRIPTORS or not isinstance(loc, list)
            or len(loc) != 2 * (len(flat) // 3) or not isinstance(shares, list)
            or not all(type(x) is int and 0 <= x < _LIMIT for x in flat + loc)):
        raise ProtocolError("malformed ranges in an nvlink transfer request")
    for sh in shares:
        if (not isinstance(sh, dict) or any(k not in sh for k in _SHARE_FIELDS)
                or not all(isinstance(sh[k], bytes) for k in ("handle", "rc", "ev"))
                or not isinstance(sh["gpu"], str) or not isinstance(sh["evs"], bool)
                or not all(type(sh[k]) is int and 0 <= sh[k] < _LIMIT
                           for k in ("size", "soff", "rco", "base", "len"))
                or sh["base"] + sh["len"] > sh["size"]):
            raise ProtocolError("malformed share in an nvlink transfer request")
    it, lit = iter(flat), iter(loc)
    pairs = list(zip(lit, lit, strict=True))
    if any(i >= len(shares) for i, _ in pairs):
        raise ProtocolError("an nvlink descriptor names no share")
    op = Op.READ if frame["t"] == "r" else Op.WRITE
    return op, list(zip(it, it, it, strict=True)), pairs, shares


class _Opened:
    """The requester allocations one connection opened (bounded, least recently used
    dropped: dropping one releases the requester's memory on its side)."""

    def __init__(self, uuids: list[str]) -> None:
        self._uuids = uuids
        self._cache: collections.OrderedDict[tuple[bytes, int, bytes, int], Any] = (
            collections.OrderedDict())

    def flat(self, sh: dict[str, Any]) -> Any:
        """The shared region as a flat uint8 CUDA tensor of this process."""
        torch = _torch()
        if sh["gpu"] not in self._uuids:
            raise TransportError(f"nvlink: GPU {sh['gpu']} is not visible here")
        dev = self._uuids.index(sh["gpu"])
        # One opened storage per share: each share holds one count of the requester's
        # reference counter, which dropping the storage gives back.
        key = (sh["handle"], sh["soff"], sh["rc"], sh["rco"])
        storage = self._cache.get(key)
        if storage is None:
            torch.cuda._lazy_init()
            try:
                storage = torch.UntypedStorage._new_shared_cuda(
                    dev, sh["handle"], sh["size"], sh["soff"], sh["rc"], sh["rco"],
                    sh["ev"], sh["evs"])
            except Exception as e:  # not the same node, a stale handle, ...
                raise TransportError(f"nvlink: cannot open the peer's memory: {e}") from None
            self._cache[key] = storage
            while len(self._cache) > _OPENED_PER_LINK:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        t = torch.empty(0, dtype=torch.uint8, device=f"cuda:{dev}")
        return t.set_(storage, sh["base"], (sh["len"],))

    def clear(self) -> None:
        self._cache.clear()


def _local_slice(region: RegionHandle, off: int, n: int) -> Any:
    torch = _torch()
    if region.device is DeviceKind.CUDA:
        assert region.tensor is not None
        return region.tensor[off:off + n]
    with warnings.catch_warnings():  # a read-only region: only ever a copy's source
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(region.view(off, n), dtype=torch.uint8)


class NvlinkBackend(LinkedBackend[LinkPool[NvLink]]):
    """See the module docstring."""

    name: ClassVar[str] = "nvlink"
    rank: ClassVar[int] = 30

    @classmethod
    def probe(cls) -> str | None:
        torch = _torch()
        if torch is None:
            return "torch is not loaded in this process (no CUDA memory to move)"
        if not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def __init__(self, host: BackendHost) -> None:
        super().__init__(host)
        self._uuids = gpu_uuids()
        host.add_channel(CHANNEL, self._serve)

    def info(self) -> dict[str, Any]:
        return {"gpus": list(self._uuids)}

    def can_carry(self, peer: PeerInfo, op: Op, segments: list[Segment]) -> str | None:
        if not peer.same_node:
            return f"{peer.name} runs on another node"
        theirs = peer.backends.get(self.name, {}).get("gpus")
        for s in segments:
            if s.local.device is not DeviceKind.CUDA:
                return "local memory is on the host (nvlink moves to and from GPU memory)"
            if not isinstance(theirs, list) or self._uuids[s.local.device_index] not in theirs:
                return f"{peer.name} does not see GPU {s.local.device_index} of this process"
        return None

    # -- requesting side -----------------------------------------------------------------
    def submit(self, xfer: Transfer) -> None:
        cfg = self.host.config
        with self._lock:
            if self._closed:
                raise TransportError("nvlink backend is closed")
            links = self._links.get(xfer.peer.name)
            if links is None:
                links = self._links[xfer.peer.name] = LinkPool(
                    "nvlink", xfer.peer.name,
                    lambda p: NvLink(self.host.open_channel(p, CHANNEL)),
                    lambda link, x, s: exchange(cfg, self._uuids, link, x, s), cfg)
        links.submit(xfer)

    # -- serving side ----------------------------------------------------------------------
    def _serve(self, sock: socket.socket, peer: str) -> None:
        opened = _Opened(self._uuids)
        streams: dict[int, Any] = {}
        try:
            while True:
                frame = recv_frame(sock, self.host.config.max_frame_bytes, idle=True)
                self._serve_one(sock, peer, opened, streams, *_parse_request(frame))
        finally:
            opened.clear()

    def _serve_one(self, sock: socket.socket, peer: str, opened: _Opened,
                   streams: dict[int, Any], op: Op, ranges: list[tuple[int, int, int]],
                   loc: list[tuple[int, int]], shares: list[dict[str, Any]]) -> None:
        torch = _torch()
        host = self.host
        try:
            lease = host.resolve(peer, op, ranges)
        except RemoteAccessError as e:
            send_frame(sock, {"t": "error", "code": "access", "error": str(e)})
            return
        with lease:
            try:
                theirs = [opened.flat(sh) for sh in shares]
            except TransportError as e:
                send_frame(sock, {"t": "error", "code": "unsupported", "error": str(e)})
                return
            for (_, _, n), (i, loff) in zip(ranges, loc, strict=True):
                if loff + n > theirs[i].numel():
                    send_frame(sock, {"t": "error", "code": "access",
                                      "error": "a local range is outside its shared region"})
                    return
            host.count_event("served_requests")
            host.count_event("served_bytes", sum(n for _, _, n in ranges))
            used = []
            for (region, off, n), (i, loff) in zip(lease.pieces, loc, strict=True):
                remote = theirs[i][loff:loff + n]
                dev = remote.device.index
                stream = streams.get(dev)
                if stream is None:
                    stream = streams[dev] = torch.cuda.Stream(device=dev)
                with torch.cuda.stream(stream):
                    if op is Op.READ:
                        remote.copy_(_local_slice(region, off, n), non_blocking=True)
                    else:
                        _local_slice(region, off, n).copy_(remote, non_blocking=True)
                used.append(stream)
            for stream in set(used):
                stream.synchronize()  # the copies are complete before the answer says so
        send_frame(sock, {"t": "ok"})


BACKEND = NvlinkBackend
