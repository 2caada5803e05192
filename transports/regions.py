"""Memory regions an agent registers, and what a peer learns of them.

A region is one contiguous byte range of memory that stays alive while registered: a torch
tensor (CPU, or CUDA), a numpy array, anything with ``__cuda_array_interface__`` (cupy,
numba: seen through torch), a kvbm host pool (:class:`kvbm.pool.HostPool`, the shared-memory
:class:`kvbm.memory.shm.SharedHostPool` included: its pages), or any object with the
buffer protocol (``bytearray``, ``mmap``). The region keeps a reference to the memory, so it
cannot be freed under a transfer; a read-only buffer makes a region peers can only READ.

Host regions are reached through :meth:`RegionHandle.view` (a zero-copy ``memoryview``);
device regions through :meth:`RegionHandle.copy_out` / :meth:`RegionHandle.copy_in`, which
stage through host memory (what the tcp backend does with CUDA memory: one device-host copy
per range, said in its log). ``RegionHandle.tensor`` is the byte view a device-aware backend
(nvlink, ucx) works on directly.
"""

from __future__ import annotations

import enum
import re
import secrets
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.errors import ClosedError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

#: What ``expose_to`` takes to open a region to every authenticated peer.
ALL_PEERS = "*"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")


def check_name(kind: str, name: object) -> str:
    """An agent, peer or region name: 1-128 characters of ``[A-Za-z0-9._:/-]``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgumentError(f"{kind} name must be 1-128 characters of letters, digits "
                                   f"and ._:/- (starting with a letter or digit), got {name!r}")
    return name


class DeviceKind(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


class Access(enum.Flag):
    """What a peer may do to an exposed region."""

    READ = 1
    WRITE = 2
    READ_WRITE = 3


@dataclass(frozen=True)
class RemoteRegion:
    """A peer's region as its metadata describes it (only those exposed to this agent)."""

    id: int
    length: int
    device: DeviceKind
    access: Access
    name: str | None = None
    #: What the owner attached at registration (a layout fingerprint, a block size ...).
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: Per backend: what that backend published about the region (an rkey, an IPC handle).
    backends: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


class RegionHandle:
    """A registered region of the local agent (what :meth:`Agent.register` returns).

    ``id`` is random (63 bits), never reused: a peer holding a stale id reaches nothing.
    """

    __slots__ = ("_cond", "_exposure", "_host", "_leases", "base", "closed", "device",
                 "device_index", "id", "length", "meta", "name", "obj", "tensor", "writable")

    def __init__(self, obj: object, *, name: str | None, meta: Mapping[str, Any]) -> None:
        self.obj = obj
        self.name = name
        self.meta = dict(meta)
        self.id = secrets.randbits(63) or 1
        self.closed = False
        self._leases = 0
        self._cond = threading.Condition()
        #: peer name (or ALL_PEERS) -> Access
        self._exposure: dict[str, Access] = {}
        self.tensor: torch.Tensor | None = None
        self._host: np.ndarray[Any, np.dtype[np.uint8]] | None = None
        self.device_index = 0
        self._adopt(obj)

    # -- what the memory is --------------------------------------------------------------
    def _adopt(self, obj: object) -> None:
        torch = sys.modules.get("torch")  # an object can be a tensor only if torch is loaded
        if torch is not None and not isinstance(obj, torch.Tensor) and hasattr(
                obj, "__cuda_array_interface__"):
            obj = torch.as_tensor(obj, device="cuda")  # cupy, numba: zero-copy through torch
        if torch is not None and isinstance(obj, torch.Tensor):
            self._adopt_tensor(obj)
            return
        raw = getattr(obj, "raw", None)
        if torch is not None and isinstance(raw, torch.Tensor) and _is_host_pool(obj):
            self._adopt_tensor(raw)  # a kvbm host pool: its pages, [num_blocks, page] bytes
            return
        if isinstance(obj, np.ndarray):
            if not obj.flags.c_contiguous:
                raise InvalidArgumentError("a numpy region must be C-contiguous")
            host = obj.reshape(-1).view(np.uint8)
        else:
            try:
                host = np.frombuffer(obj, dtype=np.uint8)  # type: ignore[call-overload]
            except (TypeError, ValueError, BufferError) as e:
                raise InvalidArgumentError(
                    f"cannot register a {type(obj).__name__}: a region is a torch tensor, a "
                    f"numpy array, a cupy array, a kvbm host pool or a contiguous buffer "
                    f"({e})") from None
        self._set_host(host)

    def _adopt_tensor(self, t: torch.Tensor) -> None:
        if not t.is_contiguous():
            raise InvalidArgumentError("a tensor region must be contiguous")
        import torch

        flat = t.detach().reshape(-1).view(torch.uint8)
        if t.device.type == "cpu":
            self._set_host(flat.numpy())
        elif t.device.type == "cuda":
            if flat.numel() == 0:
                raise InvalidArgumentError("cannot register an empty region")
            self.tensor = flat
            self.device = DeviceKind.CUDA
            self.device_index = int(t.device.index or 0)
            self.base = int(flat.data_ptr())
            self.length = int(flat.numel())
            self.writable = True
            return
        else:
            raise InvalidArgumentError(f"cannot register memory on device {t.device}: cpu "
                                       f"and cuda only")
        self.tensor = flat

    def _set_host(self, host: np.ndarray[Any, np.dtype[np.uint8]]) -> None:
        if host.size == 0:
            raise InvalidArgumentError("cannot register an empty region")
        self._host = host
        self.device = DeviceKind.CPU
        self.base = int(host.__array_interface__["data"][0])
        self.length = int(host.size)
        self.writable = bool(host.flags.writeable)

    # -- access by backends -----------------------------------------------------------------
    def view(self, offset: int, length: int) -> memoryview:
        """Zero-copy bytes ``[offset, offset+length)`` of a host region (checked)."""
        self._check_range(offset, length)
        if self._host is None:
            raise InvalidArgumentError(f"region {self.id} is on {self.device.value}: use "
                                       f"copy_out / copy_in")
        return self._host.data[offset:offset + length]

    def copy_out(self, offset: int, dst: memoryview) -> None:
        """Copy ``len(dst)`` bytes from ``offset`` into host memory ``dst``."""
        n = dst.nbytes
        self._check_range(offset, n)
        if self._host is not None:
            dst[:] = self._host.data[offset:offset + n]
            return
        import torch

        assert self.tensor is not None
        torch.frombuffer(dst, dtype=torch.uint8).copy_(self.tensor[offset:offset + n])

    def copy_in(self, offset: int, src: memoryview) -> None:
        """Copy host bytes ``src`` into the region at ``offset``."""
        n = src.nbytes
        self._check_range(offset, n)
        if self._host is not None:
            self._host.data[offset:offset + n] = src
            return
        import torch

        assert self.tensor is not None
        self.tensor[offset:offset + n].copy_(torch.frombuffer(src, dtype=torch.uint8))

    def _check_range(self, offset: int, length: int) -> None:
        if not (offset >= 0 and length > 0 and offset + length <= self.length):
            raise InvalidArgumentError(f"range [{offset}, {offset + length}) outside region "
                                       f"{self.id} of {self.length} bytes")

    # -- exposure and leases (the serving side's checks) ---------------------------------------
    def access_for(self, peer: str) -> Access | None:
        """What ``peer`` may do here, or ``None``."""
        got = self._exposure.get(peer)
        every = self._exposure.get(ALL_PEERS)
        if got is None or every is None:
            return got or every
        return got | every

    def expose(self, peer: str, access: Access) -> None:
        self._exposure[peer] = access

    def unexpose(self, peer: str) -> None:
        self._exposure.pop(peer, None)

    def acquire(self) -> bool:
        """Take a lease for one in-flight operation; ``False`` once deregistered."""
        with self._cond:
            if self.closed:
                return False
            self._leases += 1
            return True

    def release(self) -> None:
        with self._cond:
            self._leases -= 1
            if self.closed and self._leases <= 0:  # only close() ever waits
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Refuse new leases and wait up to ``timeout`` s for the live ones; whether they
        all ended. The memory stays referenced by this object either way."""
        with self._cond:
            self.closed = True
            return self._cond.wait_for(lambda: self._leases <= 0, timeout)

    def check_open(self) -> None:
        if self.closed:
            raise ClosedError(f"region {self.name or self.id} was deregistered")

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return (f"RegionHandle({self.id}{name}, {self.length} bytes on {self.device.value}"
                f"{'' if self.writable else ', read-only'}{', closed' if self.closed else ''})")


def _is_host_pool(obj: object) -> bool:
    from kvbm.pool import HostPool  # only reached for objects with a tensor ``raw``

    return isinstance(obj, HostPool)
