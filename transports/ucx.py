"""The ``ucx`` backend: bytes move through UCX (ucxx), requests through the agent's
authenticated connections.

UCX picks its transport: shared memory and cross-memory attach between processes on one
host, RDMA or its own tcp across hosts (``UCX_TLS`` and ``UCX_NET_DEVICES`` are honoured;
when the agent listens on a loopback address and ``UCX_NET_DEVICES`` is unset, UCX is held
to ``lo`` too). There is no UCX listener: per link, each side creates a worker and the two
exchange worker addresses over an authenticated connection (channel ``ucx``) of the agent's
listener, then connect endpoints to them. A link is one such connection with its two
workers; a peer gets up to ``parallel_connections`` links and a transfer of at least
``split_threshold_bytes`` is split across them, as with tcp (the requesting side:
:mod:`kvbm.transports.ucx_client`). Progress is blocking, in the thread that moves a
transfer (:mod:`kvbm.transports.ucx_io`): no thread spins.

On a link, per transfer (message ``m`` travels as a tagged message ``tag | m``)::

    READ   -> {t: r, s: [region, offset, length, ...], g: [count, ...], tag}
           <- the server sends every message (no answer)   or  {t: error, code, error}
    WRITE  -> {t: w, s: [...], g: [...], tag}, then the requester sends every message
           <- once all landed, a 1-byte message tagged ``tag | ANSWER``
                                                             or  {t: error, code, error}

A message carries ``g[m]`` consecutive ranges (no ``g``: one each). One range travels
zero-copy from / into its memory. Several (a run of host ranges each under
``ucx_io.SMALL_BYTES``, together at most ``ucx_io.GROUP_BYTES``; the requester groups,
the server checks the bounds) are coalesced: the sender gathers them into its link's
staging buffer, the receiver receives into its own and scatters — a message per 32 KiB
range cost ~20-50 us, the copies ~3 us. Each side moves the messages in windows whose
coalesced ones fit ``ucx_io.STAGING_BYTES`` and reuses the buffer for the next window
once the previous one is through; the sides need not agree on windows, as each goes
through the messages in order. Neighbours contiguous on both sides are merged into one
range by the requester before any of this.

No "ok" ever travels on the connection: an answer there would cost the requester a
wake-up of its own, where the first message (READ) or the ANSWER message (WRITE) arrives
with UCX's own traffic. A requester posts its receives only once the server's first
message is there (``Worker.arrived``), so a refusal never leaves one posted.

The serving side checks every range (``Agent.resolve``) before it posts a single operation;
the messages of a refused WRITE are received into a 1-byte buffer (UCX drops the rest), so
nothing outside the checked ranges is ever touched. Requests come only over the
authenticated connection: a tagged message cannot ask for anything.

Why tags and not one-sided RMA (what NIXL does: no serving thread per transfer, hence its
lead on small transfers). Handing a peer rkeys for exactly its regions would move the
range check to the requester, and on one host nothing would enforce it on this side:
UCX carries RMA on user memory there by cross-memory attach (``process_vm_readv``), which
the kernel allows on the whole address space of any process the peer may ptrace, whatever
the rkey says; where that is unavailable (another uid; tcp across hosts) UCX emulates RMA
with messages whose handler writes wherever the sender says, for any endpoint, once the
context has the RMA feature. Nor can such a key be revoked: a region deregistered here
could still be written by a peer that holds its key. Only hardware that checks keys
(InfiniBand) keeps the promise that every remote range is checked on the serving side.
Where both agents trust each other that much, ``transport.ucx_rma`` turns one-sided
transfers on (:mod:`kvbm.transports.ucx_rma`: keys granted per region over the link's
connection, revoked when a region goes, ranges checked by the requester); the link's
hello says whether both sides want it (``rma``), and the serving loop then also answers
key requests (``{t: k}``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import logging
import os
import socket
import sys
import threading
from typing import Any, ClassVar

import numpy as np

from kvbm.errors import RemoteAccessError, TransportError
from kvbm.transports import ucx_io, ucx_rma
from kvbm.transports.backend import BackendHost, LinkedBackend
from kvbm.transports.control import (
    ProtocolError,
    expect_map,
    pack_frame,
    recv_frame,
    send_frame,
)
from kvbm.transports.descriptors import MAX_DESCRIPTORS, Op, Segment
from kvbm.transports.handle import Transfer
from kvbm.transports.links import LinkPool
from kvbm.transports.metadata import PeerInfo
from kvbm.transports.regions import Access, DeviceKind, RegionHandle
from kvbm.transports.ucx_client import CHANNEL, PROTOCOL, UcxLink, pool
from kvbm.transports.ucx_rma import Mapping

log = logging.getLogger(__name__)

_LIMIT = 1 << 63
#: A WRITE's answer (its arrival is the news; the byte is not looked at).
_LANDED = np.ones(1, np.uint8)


def _cuda_ready() -> bool:
    torch = sys.modules.get("torch")  # CUDA regions exist only if torch is loaded
    return bool(torch is not None and torch.cuda.is_available())


def _options(host: str) -> dict[str, str]:
    if "UCX_NET_DEVICES" in os.environ:
        return {}
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return {"NET_DEVICES": "lo"}
    return {}


def _parse_request(frame: Any) -> tuple[Op, list[tuple[int, int, int]], int,
                                        list[tuple[int, int, int]]]:
    """The op, the ranges, the tag and the messages (``ucx_io.messages``) of a request."""
    if not isinstance(frame, dict) or frame.get("t") not in ("r", "w"):
        raise ProtocolError("not a ucx transfer request")
    flat, tag, counts = frame.get("s"), frame.get("tag"), frame.get("g")
    if (not isinstance(flat, list) or not flat or len(flat) % 3
            or len(flat) > 3 * MAX_DESCRIPTORS
            or not all(type(x) is int and 0 <= x < _LIMIT for x in flat)):
        raise ProtocolError("malformed ranges in a ucx transfer request")
    if type(tag) is not int or not 0 < tag < _LIMIT or tag & ucx_io.TAG_INDEX_MASK:
        raise ProtocolError("malformed tag in a ucx transfer request")
    it = iter(flat)
    ranges = list(zip(it, it, it, strict=True))
    lengths = [n for _, _, n in ranges]
    if counts is None:
        msgs = [(i, i + 1, n) for i, n in enumerate(lengths)]
    else:
        if not isinstance(counts, list) or not all(type(c) is int for c in counts):
            raise ProtocolError("malformed message counts in a ucx transfer request")
        try:
            msgs = ucx_io.messages(counts, lengths)
        except ValueError as e:
            raise ProtocolError(f"ucx transfer request: {e}") from None
    op = Op.READ if frame["t"] == "r" else Op.WRITE
    return op, ranges, tag, msgs


#: Regions one key request may name.
_MAX_KEY_REGIONS = 4096


class _Served:
    """The serving side of one link: its socket (written by the serving thread and by
    revocations from others, hence the lock) and the keys it holds (region id -> the
    ``Access`` value granted)."""

    def __init__(self, sock: socket.socket, peer: str, context: Any) -> None:
        self.sock = sock
        self.peer = peer
        #: The UCX context of the link's worker (keys are packed on it).
        self.context = context
        self.lock = threading.Lock()
        self.granted: dict[int, int] = {}

    def send(self, frame: Any) -> None:
        with self.lock:
            send_frame(self.sock, frame)

    def revoke(self, rid: int) -> None:
        """Tell the peer, without waiting on it (the caller holds the grant lock): a peer
        whose socket would block, or that is gone, loses the link instead."""
        if self.granted.pop(rid, None) is None:
            return
        data = pack_frame({"t": "revoke", "r": [rid]})
        with self.lock:
            try:
                sent = self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                sent = -1
        if sent != len(data):
            log.debug("ucx: cannot revoke a key from %s at once: closing its link", self.peer)
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def _parse_key_request(frame: dict[str, Any]) -> list[int]:
    rids = frame.get("r")
    if (not isinstance(rids, list) or not 0 < len(rids) <= _MAX_KEY_REGIONS
            or not all(type(x) is int and 0 <= x < _LIMIT for x in rids)):
        raise ProtocolError("malformed ucx key request")
    return rids


class UcxBackend(LinkedBackend[LinkPool[UcxLink]]):
    """See the module docstring."""

    name: ClassVar[str] = "ucx"
    rank: ClassVar[int] = 20

    @classmethod
    def probe(cls) -> str | None:
        try:
            found = importlib.util.find_spec("ucxx") is not None
        except (ImportError, ValueError):
            found = False
        return None if found else "ucx needs ucxx (pip install 'kvtier[ucx]')"

    def __init__(self, host: BackendHost) -> None:
        super().__init__(host)
        host.add_channel(CHANNEL, self._serve)
        #: One-sided mode (ucx_rma): (region id, UCX context) -> the region's memory map
        #: on that context (a context per UCX environment: see ucx_io.context), and the
        #: links holding a region's key. Grants and revocations are ordered by this lock.
        self._rma = host.config.ucx_rma
        self._grant_lock = threading.Lock()
        self._maps: dict[tuple[int, int], Mapping] = {}
        self._holders: dict[int, set[_Served]] = {}
        # Load UCX in the background now: the first link would otherwise wait ~1.5 s.
        threading.Thread(target=self._warm_up, name="kvbm-ucx-load", daemon=True).start()

    def _warm_up(self) -> None:
        try:
            self.context()
        except Exception as e:  # reported again, as a failed transfer, on first use
            log.warning("ucx: cannot start UCX: %s", e)

    def context(self, rma: bool = False) -> Any:
        return ucx_io.context(_options(self.host.config.host), rma)

    def info(self) -> dict[str, Any]:
        return {"cuda": _cuda_ready(), "rma": self._rma}

    def can_carry(self, peer: PeerInfo, op: Op, segments: list[Segment]) -> str | None:
        # Per region, not per segment: a handoff has thousands of segments and few regions.
        if (any(r.device is DeviceKind.CUDA for r in {id(s.local): s.local for s in segments}
                .values()) and not _cuda_ready()):
            return "no CUDA here"
        for rid in {s.remote_id for s in segments}:
            remote = peer.regions.get(rid)
            if (remote is not None and remote.device is DeviceKind.CUDA
                    and not peer.backends.get(self.name, {}).get("cuda")):
                return f"{peer.name}'s UCX cannot reach its CUDA memory"
        return None

    # -- requesting side -----------------------------------------------------------------
    def submit(self, xfer: Transfer) -> None:
        with self._lock:
            if self._closed:
                raise TransportError("ucx backend is closed")
            links = self._links.get(xfer.peer.name)
            if links is None:
                links = self._links[xfer.peer.name] = pool(
                    xfer.peer.name, lambda p: self.host.open_channel(p, CHANNEL),
                    self.context, self.host.config)
        links.submit(xfer)

    # -- serving side ----------------------------------------------------------------------
    def _serve(self, sock: socket.socket, peer: str) -> None:
        cfg = self.host.config
        hello = expect_map(recv_frame(sock, cfg.max_frame_bytes), "hello")
        if hello.get("v") != PROTOCOL:
            raise ProtocolError(f"peer speaks ucx protocol {hello.get('v')!r}, not {PROTOCOL}")
        rma = self._rma and hello.get("rma") is True and ucx_rma.available()
        ctx = self.context(rma)
        w = ucx_io.Worker(ctx)
        stage = ucx_io.Staging()
        served = _Served(sock, peer, ctx)
        try:
            w.connect(hello.get("addr"))
            served.send({"t": "hello", "addr": w.address, "v": PROTOCOL, "rma": rma})
            while True:
                if rma:  # a peer's RMA that UCX emulates with messages needs our progress
                    w.progress_until_readable(sock)
                frame = recv_frame(sock, cfg.max_frame_bytes, idle=True)
                if rma and isinstance(frame, dict) and frame.get("t") == "k":
                    self._grant(served, _parse_key_request(frame))
                    continue
                self._serve_one(served, w, stage, *_parse_request(frame))
        finally:
            with self._grant_lock:
                for rid in served.granted:
                    self._holders.get(rid, set()).discard(served)
                served.granted.clear()
            w.close()

    # -- one-sided mode: keys --------------------------------------------------------------
    def _grant(self, served: _Served, rids: list[int]) -> None:
        """Answer a key request: a key per region, each exposed to this peer and in host
        memory, or one refusal (and no key)."""
        entries: list[tuple[int, int, int, int, bytes]] = []
        with self._grant_lock:
            try:
                for rid in rids:
                    if self._closed:
                        raise TransportError("ucx backend is closed")
                    region, access = self.host.exposed(served.peer, rid)
                    if region.device is not DeviceKind.CPU:
                        raise RemoteAccessError(f"region {region.name or rid} is not in host "
                                                f"memory (one-sided transfers reach host "
                                                f"memory only)")
                    m = self._maps.get((rid, id(served.context)))
                    if m is None:
                        m = self._maps[rid, id(served.context)] = Mapping(
                            served.context, region.base, region.length)
                    entries.append((rid, region.base, region.length, access.value, m.rkey))
            except RemoteAccessError as e:
                served.send({"t": "error", "code": "access", "error": str(e)})
                return
            except TransportError as e:  # UCX would not map it: no key, the link goes on
                served.send({"t": "error", "code": "unsupported", "error": str(e)})
                return
            for rid, _, _, bits, _ in entries:
                served.granted[rid] = bits
                self._holders.setdefault(rid, set()).add(served)
            self.host.count_event("rma_keys_granted", len(entries))
            served.send({"t": "keys", "k": [list(e) for e in entries]})

    def on_deregister(self, region: RegionHandle) -> None:
        with self._grant_lock:
            for served in self._holders.pop(region.id, set()):
                served.revoke(region.id)
            maps = [self._maps.pop(k) for k in [k for k in self._maps if k[0] == region.id]]
        for m in maps:
            m.unmap()

    def on_exposure(self, region: RegionHandle) -> None:
        """Keys whose holder's access changed, or whose region is going, are revoked
        (asked for again, the grant says what the peer may do now)."""
        with self._grant_lock:
            holders = self._holders.get(region.id, set())
            for served in list(holders):
                acc = None if region.closed else region.access_for(served.peer)
                if acc is not None and not region.writable:
                    acc &= Access.READ  # as the table grants it (RegionTable.exposed)
                if (acc.value if acc else 0) != served.granted.get(region.id):
                    served.revoke(region.id)
                    holders.discard(served)

    def close(self) -> None:
        super().close()
        with self._grant_lock:
            maps, self._maps = list(self._maps.values()), {}
        for m in maps:
            m.unmap()

    def _serve_one(self, served: _Served, w: ucx_io.Worker,
                   stage: ucx_io.Staging, op: Op, ranges: list[tuple[int, int, int]],
                   tag: int, msgs: list[tuple[int, int, int]]) -> None:
        host, timeout = self.host, self.host.config.io_timeout_s
        sock, peer = served.sock, served.peer
        try:
            lease = host.resolve(peer, op, ranges)
        except RemoteAccessError as e:
            if op is Op.WRITE:  # take the peer's messages off the wire, touching nothing
                scratch = np.empty(1, np.uint8)
                w.drive([w.recv(scratch, tag | m) for m in range(len(msgs))], timeout,
                        sock=sock, tolerate=ucx_io.truncated)
            served.send({"t": "error", "code": "access", "error": str(e)})
            return
        with lease:
            try:
                bufs = [ucx_io.buffer(r, off, n, w.cuda) for r, off, n in lease.pieces]
                if any(hi - lo > 1 and r.device is not DeviceKind.CPU
                       for lo, hi, _ in msgs for r, _, _ in lease.pieces[lo:hi]):
                    raise TransportError("ucx: coalesced ranges must be in host memory")
            except TransportError as e:
                served.send({"t": "error", "code": "unsupported", "error": str(e)})
                raise  # a WRITE's messages are still coming: this link is done
            # Counted before the answer: the requester may see its transfer done before
            # this thread runs again, and its view of our counters must include it.
            host.count_event("served_requests")
            host.count_event("served_bytes", sum(n for _, _, n in ranges))
            # Window by window (ucx_io.windows): the staging buffer is reused for the next
            # once this one's messages are through. No "ok" for a READ: the first
            # message's arrival tells the requester (ucx_client).
            for first, end in ucx_io.windows(msgs):
                buf, o = stage.get(ucx_io.staged_bytes(msgs, first, end)), 0
                reqs: list[Any] = []
                staged: list[tuple[int, memoryview, list[memoryview]]] = []
                for m in range(first, end):
                    lo, hi, n = msgs[m]
                    if hi - lo == 1:
                        b = bufs[lo]
                    else:
                        b, o = buf[o:o + n], o + n
                        if op is Op.READ:
                            ucx_io.gather(bufs[lo:hi], b)
                        else:
                            staged.append((len(reqs), b, bufs[lo:hi]))
                    reqs.append(w.send(b, tag | m) if op is Op.READ else w.recv(b, tag | m))
                ucx_io.finish(ucx_io.drive_staged(w, reqs, staged, timeout, sock=sock))
            if op is Op.WRITE:
                w.drive([w.send(_LANDED, tag | ucx_io.ANSWER)], timeout, sock=sock)


BACKEND = UcxBackend
