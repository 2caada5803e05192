"""The backend interface, the registry of backends, and path selection.

A backend moves the bytes of a transfer; the :class:`~kvbm.transports.Agent` does the rest
(regions, peers, authentication, descriptor checks, handles, notifications, stats). To add
one (``ucx``, ``nvlink``), write a module ``kvbm.transports.<name>`` that defines a
:class:`Backend` subclass and ends with ``BACKEND = ThatClass``; the registry imports it
lazily the first time an agent asks for that name (``_MODULES`` below maps the names).

What a backend implements::

    class MyBackend(Backend):
        name = "ucx"; rank = 20                     # selection prefers the higher rank
        @classmethod
        def probe(cls) -> str | None: ...           # None if usable here, else why not
        def __init__(self, host: BackendHost): ...  # host = the agent (see BackendHost)
        def info(self) -> dict: ...                 # public addressing, in the metadata
        def region_info(self, region) -> dict: ...  # per exposed region (rkey, IPC handle)
        def on_register(self, region) / on_deregister(self, region)  # memory registration
        def can_carry(self, peer, op, segments) -> str | None: ...   # None: yes; else why not
        def submit(self, xfer: Transfer) -> None: ...                # start, don't block
        def forget_peer(self, name) / close(self)

Contracts:

* ``submit`` returns at once; the backend later calls ``xfer.complete(error_or_None)``
  exactly once, after it stopped touching every segment's memory. Errors are
  :class:`~kvbm.errors.TransportError` subclasses; a refusal by the serving side is a
  :class:`~kvbm.errors.RemoteAccessError`. On ``xfer.cancelled`` (see ``Transfer.on_cancel``)
  a backend stops soon and completes with any error (the agent reports CANCELLED).
* The agent completes the transfer: it releases the local regions' leases, sends the
  notification (``xfer.notify``) over the control channel after the data is in place, and
  sets the handle. A backend never sends notifications itself.
* ``info()`` and ``region_info()`` must be msgpack-able plain data (bytes, str, int, lists,
  maps with str keys). ``region_info`` goes only to peers the region is exposed to; a
  one-sided backend (RMA, IPC) must hand out nothing that reaches memory beyond the region.
* Serving side: a backend that receives requests (tcp) checks them with
  ``host.resolve(peer, op, [(region_id, offset, length), ...])``, which raises
  ``RemoteAccessError`` or returns a :class:`Lease` of the checked ranges (release it when
  done). A backend gets authenticated sockets from ``host.open_channel(peer, chan)`` and
  serves them with ``host.add_channel(chan, handler)``; ``chan`` is its name.
* Local memory: ``segment.local.view(off, n)`` (host regions, zero-copy), ``copy_out`` /
  ``copy_in`` (any region, staging a device one through host memory), ``.tensor`` (a flat
  ``uint8`` torch view of torch/cupy/pool regions), ``.base`` / ``.length`` / ``.device`` /
  ``.device_index`` / ``.obj``.
"""

from __future__ import annotations

import abc
import importlib
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from kvbm.transports.config import KNOWN_BACKENDS, TransportConfig
from kvbm.transports.descriptors import Op, Segment
from kvbm.transports.handle import Transfer
from kvbm.transports.metadata import PeerInfo
from kvbm.transports.regions import Access, RegionHandle

if TYPE_CHECKING:
    from types import TracebackType

#: Where each known backend lives (imported on first use).
_MODULES = {"tcp": "kvbm.transports.tcp", "ucx": "kvbm.transports.ucx",
            "nvlink": "kvbm.transports.nvlink"}
_REGISTRY: dict[str, type[Backend]] = {}


class Lease:
    """Checked serving-side ranges ``(region, offset, length)``, with the regions held
    against deregistration until :meth:`release` (or the end of a ``with`` block)."""

    __slots__ = ("_held", "pieces")

    def __init__(self, pieces: list[tuple[RegionHandle, int, int]],
                 held: list[RegionHandle]) -> None:
        self.pieces = pieces
        self._held = held

    def release(self) -> None:
        held, self._held = self._held, []
        for r in held:
            r.release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class BackendHost(Protocol):
    """What an agent offers its backends."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> TransportConfig: ...

    def open_channel(self, peer: PeerInfo, chan: str) -> socket.socket:
        """An authenticated connection to ``peer``'s listener for channel ``chan``."""
        ...

    def add_channel(self, chan: str, handler: Callable[[socket.socket, str], None]) -> None:
        """Hand authenticated incoming connections of ``chan`` to ``handler(sock, peer)``,
        on a thread of their own; the socket is closed when the handler returns."""
        ...

    def resolve(self, peer: str, op: Op, ranges: Iterable[tuple[int, int, int]]) -> Lease:
        """Check ranges a peer asked for (see the module); raises RemoteAccessError."""
        ...

    def exposed(self, peer: str, rid: int) -> tuple[RegionHandle, Access]:
        """Region ``rid`` and what ``peer`` may do on it (one-sided grants); raises
        RemoteAccessError as :meth:`resolve` does."""
        ...

    def count_event(self, event: str, n: int = 1) -> None:
        """Add ``n`` to the agent's counter ``event`` (``served_requests``, ...)."""
        ...


class Backend(abc.ABC):
    """Base class of the transport backends (see the module docstring)."""

    name: ClassVar[str]
    #: Preference in path selection: nvlink 30 > ucx 20 > tcp 10.
    rank: ClassVar[int]

    @classmethod
    @abc.abstractmethod
    def probe(cls) -> str | None:
        """``None`` if this backend can run in this process, else the reason it cannot."""

    def __init__(self, host: BackendHost) -> None:
        self.host = host

    def info(self) -> dict[str, Any]:
        """Public addressing and capabilities, published in the agent's metadata."""
        return {}

    def region_info(self, region: RegionHandle) -> dict[str, Any]:
        """What a peer needs to reach ``region`` through this backend."""
        return {}

    def on_register(self, region: RegionHandle) -> None:  # noqa: B027 - an optional hook
        """A region was registered (register it with the hardware here)."""

    def on_deregister(self, region: RegionHandle) -> None:  # noqa: B027 - an optional hook
        """A region is gone (no transfer uses it any more)."""

    def on_exposure(self, region: RegionHandle) -> None:  # noqa: B027 - an optional hook
        """Who may do what on ``region`` changed (``Agent.expose`` / ``unexpose``)."""

    def can_carry(self, peer: PeerInfo, op: Op, segments: list[Segment]) -> str | None:
        """``None`` if this backend can carry the transfer, else the reason it cannot."""
        return None

    @abc.abstractmethod
    def submit(self, xfer: Transfer) -> None:
        """Start moving ``xfer``'s segments; complete it later (see the module)."""

    def forget_peer(self, peer: str) -> None:  # noqa: B027 - an optional hook
        """Drop connections and state of ``peer`` (disconnected or gone)."""

    def close(self) -> None:  # noqa: B027 - an optional hook
        """Stop; pending transfers complete with an error."""


class _Closable(Protocol):
    def close(self) -> None: ...


L = TypeVar("L", bound=_Closable)


class LinkedBackend(Backend, Generic[L]):
    """A backend that keeps its connections to each peer in one object (``_links``), made
    under ``_lock`` on the first transfer to that peer: forgetting a peer closes it, closing
    the backend forgets every peer."""

    def __init__(self, host: BackendHost) -> None:
        super().__init__(host)
        self._lock = threading.Lock()
        self._links: dict[str, L] = {}
        self._closed = False

    def forget_peer(self, peer: str) -> None:
        with self._lock:
            links = self._links.pop(peer, None)
        if links is not None:
            links.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            peers = list(self._links)
        for p in peers:
            self.forget_peer(p)


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Make ``cls`` available under ``cls.name`` (a module's ``BACKEND`` is registered
    when the module is first loaded)."""
    _REGISTRY[cls.name] = cls
    return cls


def backend_class(name: str) -> tuple[type[Backend] | None, str | None]:
    """``(class, None)`` for a usable backend, or ``(None, why not)``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        module = _MODULES.get(name)
        if module is None:
            return None, f"no backend named {name!r}"
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                return None, f"{name} needs {e.name}, which is not installed"
            return None, f"this kvbm has no {name} backend"
        cls = getattr(mod, "BACKEND", None)
        if not (isinstance(cls, type) and issubclass(cls, Backend)):
            return None, f"{module} defines no BACKEND"
        register_backend(cls)
    why = cls.probe()
    return (cls, None) if why is None else (None, why)


def available_backends(names: Iterable[str] = ()) -> dict[str, type[Backend] | str]:
    """Each name (default: every known backend) to its class, or to why it is unusable."""
    out: dict[str, type[Backend] | str] = {}
    for name in tuple(names) or KNOWN_BACKENDS:
        cls, why = backend_class(name)
        out[name] = cls if cls is not None else str(why)
    return out
