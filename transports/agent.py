"""The agent: one process's endpoint for moving bytes to and from its peers (NIXL-like).

    agent = Agent("decode-0", TransportConfig(secret=...))         # listens at once
    kv = agent.register(kv_tensor, name="kv.0", expose_to=ALL_PEERS)
    peer = agent.connect("10.0.0.5", 5600)                         # authenticated both ways
    src = peer.info.region("kv.0")                                 # what it exposed to us
    with agent.transfer(peer, Op.READ, [((kv, 0, n), (src, off, n))], notify=b"req-7") as h:
        h.wait(timeout=10)
    agent.notify(peer, b"req-7 dropped")                            # a note without data

Regions are private until exposed: ``register(..., expose_to=ALL_PEERS | name | names)`` or
:meth:`Agent.expose` later, each with an :class:`Access` (READ, WRITE or both). A peer's
names are claims among holders of the shared secret: exposure per peer keeps honest peers
apart and limits mistakes, it is no defence against a peer that holds the secret and lies.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kvbm.errors import (
    ClosedError,
    InvalidArgumentError,
    RemoteAccessError,
    TransportError,
)
from kvbm.transports import stats as _stats
from kvbm.transports.backend import Backend, Lease, available_backends
from kvbm.transports.config import KNOWN_BACKENDS, TransportConfig
from kvbm.transports.control import ProtocolError, encode
from kvbm.transports.descriptors import Op, check_descriptors, total_bytes
from kvbm.transports.handle import Transfer, TransferHandle, TransferStatus
from kvbm.transports.inbox import Inbox, Notification
from kvbm.transports.metadata import PeerInfo, build
from kvbm.transports.peer import CONTROL, ControlLink, open_connection
from kvbm.transports.regions import ALL_PEERS, Access, RegionHandle, check_name
from kvbm.transports.select import choose
from kvbm.transports.server import Listener, RateLimitedLog, serve_control
from kvbm.transports.table import RegionTable, check_meta, exposure_names

log = logging.getLogger(__name__)

#: The largest payload of :meth:`Agent.notify` (a note, not data: data goes by transfer).
MAX_NOTIFY_BYTES = 64 << 10


@dataclass(frozen=True)
class Peer:
    """A connected peer: its name and the metadata it sent (``refresh`` fetches it anew)."""

    name: str
    info: PeerInfo


class Agent:
    """See the module docstring. Thread-safe; close it (or use ``with``) when done."""

    def __init__(self, name: str, config: TransportConfig | None = None, *,
                 meta: Mapping[str, Any] | None = None,
                 on_notification: Callable[[Notification], None] | None = None) -> None:
        check_name("agent", name)
        config = TransportConfig() if config is None else config
        if not isinstance(config, TransportConfig):
            raise InvalidArgumentError(f"config must be a TransportConfig, got {config!r}")
        if on_notification is not None and not callable(on_notification):
            raise InvalidArgumentError("on_notification must be callable")
        self._meta = check_meta(meta)
        self._secret = config.resolve_secret()
        self.name = name
        self.config = config
        self.stats = _stats.AgentStats()
        self._instance = secrets.randbits(63)
        self._table = RegionTable(name, self._refused)
        self._peers: dict[str, tuple[Peer, ControlLink]] = {}
        self._lock = threading.RLock()
        self._closed = False
        self._inbox = Inbox(name, config.max_notifications, self.stats, on_notification)
        self._pending: dict[Transfer, tuple[TransferHandle, list[RegionHandle]]] = {}
        self._rlog = RateLimitedLog()
        self._paths_logged: set[tuple[str, str]] = set()
        self._listener = Listener(name, self._secret, config, self.stats.count)
        self._listener.add_channel(CONTROL, self._serve_control)
        self.backends: dict[str, Backend] = {}
        try:
            for bname, cls in available_backends(config.backend_names()).items():
                if isinstance(cls, str):
                    log.debug("agent %s: backend %s unavailable: %s", name, bname, cls)
                    continue
                self.backends[bname] = cls(self)
            if not self.backends:
                raise TransportError(f"agent {name}: no transport backend can run here")
        except BaseException:
            self._listener.close()
            for b in self.backends.values():
                b.close()
            raise
        self._listener.start()
        log.info("agent %s listening on %s:%d, backends %s", name, config.host,
                 self._listener.port, ", ".join(self.backends))

    # -- identity ------------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """``(host, port)`` peers connect to."""
        return self.config.public_host, self._listener.port

    # -- regions -------------------------------------------------------------------------------
    def register(self, obj: object, *, name: str | None = None,
                 expose_to: str | Iterable[str] | None = None,
                 access: Access = Access.READ_WRITE,
                 meta: Mapping[str, Any] | None = None) -> RegionHandle:
        """Register memory (see :mod:`kvbm.transports.regions` for what it can be), private
        unless ``expose_to`` names peers (or ``ALL_PEERS``) that may do ``access`` on it.
        ``name`` (unique here) and ``meta`` (plain data) reach those peers' metadata."""
        self._check_open()
        return self._table.register(obj, name=name, expose_to=expose_to, access=access,
                                    meta=meta, backends=self.backends.values())

    def deregister(self, region: RegionHandle, timeout: float | None = None) -> None:
        """Refuse new transfers on ``region`` at once and wait (up to ``timeout``, default
        ``io_timeout_s``) for those in flight. Idempotent."""
        self._table.deregister(region, self.config.io_timeout_s if timeout is None else timeout,
                               self.backends.values())

    def expose(self, region: RegionHandle, to: str | Iterable[str] = ALL_PEERS,
               access: Access = Access.READ_WRITE) -> None:
        """Let peer(s) ``to`` (or every peer) do ``access`` on ``region``. Peers see it in
        metadata fetched afterwards (``connect`` / ``refresh``)."""
        peers = exposure_names(to, access)
        r = self._table.own(region)
        for p in peers:
            r.expose(p, access)
        for b in self.backends.values():
            b.on_exposure(r)

    def unexpose(self, region: RegionHandle, to: str | Iterable[str] = ALL_PEERS) -> None:
        """Withdraw what :meth:`expose` granted ``to``; transfers already running finish."""
        r = self._table.own(region)
        for p in exposure_names(to, Access.READ):
            r.unexpose(p)
        for b in self.backends.values():
            b.on_exposure(r)

    def regions(self) -> list[RegionHandle]:
        return self._table.all()

    # -- metadata ------------------------------------------------------------------------------
    def metadata_for(self, peer: str) -> dict[str, Any]:
        """The metadata ``peer`` gets (plain data; only the regions exposed to it)."""
        host, port = self.address
        return build(self.name, self._instance, host, port,
                     {n: b.info() for n, b in self.backends.items()},
                     self._table.entries_for(peer, self.backends), self._meta)

    def metadata(self, peer: str = ALL_PEERS) -> bytes:
        """The msgpack blob of :meth:`metadata_for` (``ALL_PEERS``: what every peer sees)."""
        return encode(self.metadata_for(peer))

    # -- peers ---------------------------------------------------------------------------------
    def connect(self, host: str, port: int, *, name: str | None = None) -> Peer:
        """Authenticate with the agent at ``host:port`` (that must be ``name`` if given) and
        fetch its metadata. Connecting again to the same agent refreshes it (transfers in
        flight go on, unless the agent restarted meanwhile)."""
        self._check_open()
        if not isinstance(host, str) or not host:
            raise InvalidArgumentError(f"host must be a non-empty string, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidArgumentError(f"port must be an int in [1, 65535], got {port!r}")
        if name is not None:
            check_name("peer", name)
        link = ControlLink(host, port, secret=self._secret, name=self.name,
                           config=self.config, expect=name)
        try:
            info = link.metadata()
            peer = Peer(info.name, info)
        except BaseException:
            link.close()
            raise
        with self._lock:
            old = self._peers.pop(peer.name, None)
            self._peers[peer.name] = (peer, link)
        if old is not None:
            old[1].close()
            if old[0].info.instance != info.instance:  # it restarted: its connections died
                for b in self.backends.values():
                    b.forget_peer(peer.name)
        return peer

    def refresh(self, peer: Peer | str) -> Peer:
        """Fetch the peer's metadata again (regions registered or exposed since; after a
        restart of the peer, its new regions: data connections reopen by themselves)."""
        p, link = self._peer(peer)
        fresh = Peer(p.name, link.metadata())
        with self._lock:
            if p.name in self._peers:
                self._peers[p.name] = (fresh, link)
        return fresh

    def disconnect(self, peer: Peer | str) -> None:
        p, link = self._peer(peer)
        with self._lock:
            self._peers.pop(p.name, None)
        link.close()
        for b in self.backends.values():
            b.forget_peer(p.name)

    def peers(self) -> list[Peer]:
        with self._lock:
            return [p for p, _ in self._peers.values()]

    def _peer(self, peer: object) -> tuple[Peer, ControlLink]:
        name = peer.name if isinstance(peer, Peer) else peer
        with self._lock:
            got = self._peers.get(name) if isinstance(name, str) else None
        if got is None:
            raise InvalidArgumentError(f"not connected to a peer {name!r} (Agent.connect)")
        return got

    # -- transfers -----------------------------------------------------------------------------
    def transfer(self, peer: Peer | str, op: Op, descs: Iterable[Any], *,
                 notify: bytes | None = None, require: str | None = None) -> TransferHandle:
        """Start moving ``descs`` (see :mod:`kvbm.transports.descriptors`); returns at once.

        ``notify`` (bytes, at most :attr:`max_notify_bytes`) reaches the peer
        (``notifications()``) after the data is in place; the handle is DONE only then.
        ``require`` names the backend that must carry it (else
        :class:`~kvbm.errors.BackendUnavailableError`); default ``transport.require``, or
        the best one both agents run (nvlink > ucx > tcp)."""
        self._check_open()
        p, _ = self._peer(peer)
        if notify is not None and (not isinstance(notify, bytes)
                                   or len(notify) > self.max_notify_bytes):
            raise InvalidArgumentError(f"notify must be bytes of at most "
                                       f"{self.max_notify_bytes}, got "
                                       f"{type(notify).__name__}")
        require = self.config.require if require is None else require
        if require is not None and require not in KNOWN_BACKENDS:
            raise InvalidArgumentError(f"require must be one of {list(KNOWN_BACKENDS)} or None,"
                                       f" got {require!r}")
        if not isinstance(descs, list | tuple):
            if not isinstance(descs, Iterable) or isinstance(descs, str | bytes):
                raise InvalidArgumentError(f"descs must be a list of descriptors, got "
                                           f"{type(descs).__name__}")
            descs = list(descs)
        segs = check_descriptors(op, descs, is_local=self._table.owns)
        backend = choose(self.backends, p.info, op, segs, require, count=self.stats.count)
        held = self._table.lease_local(segs)
        xfer = Transfer(p.info, op, segs, total_bytes(segs), notify, self._finish)
        handle = TransferHandle(xfer, backend.name, self.config.io_timeout_s)
        with self._lock:
            self._pending[xfer] = (handle, held)
        if (p.name, backend.name) not in self._paths_logged:
            self._paths_logged.add((p.name, backend.name))
            log.info("agent %s: transfers with %s go through %s", self.name, p.name,
                     backend.name)
        try:
            backend.submit(xfer)
        except Exception as e:  # a backend that fails at submit fails this transfer only
            xfer.complete(e if isinstance(e, TransportError) else TransportError(
                f"{backend.name} could not start the transfer: {e}"))
        return handle

    def _finish(self, xfer: Transfer, error: BaseException | None) -> None:
        with self._lock:
            handle, held = self._pending.pop(xfer)
        status = TransferStatus.FAILED
        try:
            status, error = self._conclude(xfer, error, held)
        except Exception as e:  # never leave a handle pending: its waiters would hang
            log.exception("agent %s: finishing a transfer failed", self.name)
            error = TransportError(f"finishing the transfer failed: {e!r}")
        finally:
            self.stats.transfer(handle.backend, status, xfer.nbytes)
            handle._finish(status, error)

    def _conclude(self, xfer: Transfer, error: BaseException | None, held: list[RegionHandle]
                  ) -> tuple[TransferStatus, BaseException | None]:
        for r in held:
            r.release()
        if error is None and xfer.notify is not None and not xfer.cancelled.is_set():
            try:
                self._peer(xfer.peer.name)[1].notify(xfer.notify)
            except (TransportError, InvalidArgumentError) as e:
                error = TransportError(f"data moved, but the notification to "
                                       f"{xfer.peer.name} failed: {e}")
        if xfer.cancelled.is_set() and not isinstance(error, RemoteAccessError):
            return TransferStatus.CANCELLED, None
        if error is not None:
            log.debug("agent %s: %s with %s failed: %s", self.name, xfer.op.value,
                      xfer.peer.name, error)
            return TransferStatus.FAILED, error
        return TransferStatus.DONE, None

    # -- notifications -------------------------------------------------------------------------
    @property
    def max_notify_bytes(self) -> int:
        """The largest payload :meth:`notify` sends (and this agent takes from a peer's
        notify): :data:`MAX_NOTIFY_BYTES`, less where ``max_frame_bytes`` is smaller."""
        return min(MAX_NOTIFY_BYTES, self.config.max_frame_bytes // 2)

    def notify(self, peer: Peer | str, payload: bytes) -> None:
        """Deliver ``payload`` to ``peer``'s notifications (its inbox or callback, where its
        transfers' notifications arrive), over the authenticated control channel, moving no
        data. Returns once the peer took it. :class:`~kvbm.errors.InvalidArgumentError` for
        a payload that is not bytes or longer than :attr:`max_notify_bytes`, or a peer not
        connected; :class:`~kvbm.errors.TransportError` when the peer is gone (not
        repeated: it may have arrived); :class:`~kvbm.errors.ClosedError` after close."""
        self._check_open()
        if not isinstance(peer, Peer | str):
            raise InvalidArgumentError(f"peer must be a Peer or a peer's name, got "
                                       f"{type(peer).__name__}")
        if not isinstance(payload, bytes | bytearray | memoryview):
            raise InvalidArgumentError(f"payload must be bytes, got {type(payload).__name__}")
        data = bytes(payload)
        if len(data) > self.max_notify_bytes:
            raise InvalidArgumentError(f"a notification of {len(data)} bytes; at most "
                                       f"{self.max_notify_bytes} (move data by transfer)")
        _, link = self._peer(peer)
        link.notify(data)

    def notifications(self) -> list[Notification]:
        """Take every notification received so far (oldest first)."""
        return self._inbox.take_all()

    def next_notification(self, timeout: float | None = None) -> Notification | None:
        """Take the oldest notification, waiting up to ``timeout`` s; ``None`` if none came."""
        return self._inbox.next(timeout)

    # -- serving -------------------------------------------------------------------------------
    def _serve_control(self, sock: socket.socket, peer: str) -> None:
        serve_control(sock, peer, self.config.max_frame_bytes, self.metadata_for,
                      lambda data: self._take_note(peer, data))

    def _take_note(self, peer: str, data: bytes) -> None:
        """A peer's notification (``notify``, or a transfer's): one over the limit is the
        peer breaking the protocol; its connection is closed, the inbox never sees it."""
        if len(data) > self.max_notify_bytes:
            raise ProtocolError(f"{peer} sent a notification of {len(data)} bytes, at most "
                                f"{self.max_notify_bytes} allowed")
        self._inbox.deliver(Notification(peer, data))

    def resolve(self, peer: str, op: Op, ranges: Iterable[tuple[int, int, int]]) -> Lease:
        """The serving side's check of a peer's request (see backend.BackendHost)."""
        return self._table.resolve(peer, op, ranges)

    def exposed(self, peer: str, rid: int) -> tuple[RegionHandle, Access]:
        """One region a peer may reach, for a one-sided grant (see backend.BackendHost)."""
        return self._table.exposed(peer, rid)

    def _refused(self, peer: str, why: str) -> None:
        self.stats.count("refused_requests")
        self._rlog.warning("refuse:" + peer, "agent %s refused %s: %s", self.name, peer, why)

    # BackendHost
    def open_channel(self, peer: PeerInfo, chan: str) -> socket.socket:
        self._check_open()
        sock, _ = open_connection(peer.host, peer.port, secret=self._secret, name=self.name,
                                  chan=chan, config=self.config, expect=peer.name)
        return sock

    def add_channel(self, chan: str, handler: Callable[[socket.socket, str], None]) -> None:
        self._listener.add_channel(chan, handler)

    def count_event(self, event: str, n: int = 1) -> None:
        self.stats.count(event, n)

    # -- lifetime ------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"agent {self.name} is closed")

    def close(self) -> None:
        """Stop listening, fail what is pending, drop peers and regions. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
            links = [link for _, link in self._peers.values()]
            self._peers.clear()
        self._listener.close()
        for x in pending:
            x.cancel()
        for b in self.backends.values():
            b.close()
        for link in links:
            link.close()
        for r in self.regions():
            self.deregister(r, timeout=1.0)
        self._inbox.close()

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        host, port = self.address
        return (f"Agent({self.name!r}, {host}:{port}, backends={list(self.backends)}"
                f"{', closed' if self._closed else ''})")


__all__ = ["Agent", "Notification", "Peer"]
