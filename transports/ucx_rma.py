"""One-sided transfers (UCX RMA) for the ucx backend's opt-in ``ucx_rma`` mode.

NIXL's model: the serving agent hands a peer *remote keys* to the host regions exposed to
it, and the peer then reads (``ucp_get``) and writes (``ucp_put`` + flush) them with no
serving thread per transfer. That is what makes small transfers cheap (no wake-up on the
serving side), and it moves the range check to the requester: this module checks every
range against the region's length and access as granted before a byte moves, but the
serving side no longer sees the transfers. On one host UCX carries RMA by cross-memory
attach, which the kernel does not confine to the keyed regions — so this mode is for peers
that are trusted (as every NIXL peer is), and it is off unless both agents turn it on
(``transport.ucx_rma``). The default ucx mode keeps the serving side's check of every range.

Keys are asked for per region on the link's authenticated connection (``{t: k, r: [id]}``
-> ``{t: keys, k: [[id, address, length, access, rkey], ...]}``), only for regions
exposed to that peer (the serving side's check moves to the grant). When a region is
deregistered, or its exposure to a holder changes, the serving side sends
``{t: revoke, r: [id]}`` on every link holding its key; the requester reads pending
revocations before every transfer and drops those keys, so no transfer that starts after
a revocation reached it uses a revoked key (one already under way may still finish, as in
NIXL: deregister only memory no peer is transferring).

The bindings are ctypes calls into the ``libucp`` that ucxx loaded (ucxx 0.52's Python API
has no memory handles or remote keys): no build step, ~1 us per call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from kvbm.errors import RemoteAccessError, TransportError, TransportTimeoutError
from kvbm.transports.descriptors import Op, Segment
from kvbm.transports.handle import TransferCancelled
from kvbm.transports.regions import Access

log = logging.getLogger(__name__)

_UCS_OK = 0
_UCS_INPROGRESS = 1
#: A status pointer at or above this (``(uintptr_t)UCS_ERR_LAST``) is an error code.
_ERR_FLOOR = (1 << 64) - 100
#: ``ucp_mem_map_params_t`` fields set: address and length (existing memory).
_MAP_ADDRESS_LENGTH = 0b11
#: Longest single wait for a pending operation (cancellation is seen within it).
_SLICE_S = 0.05
#: Progress rounds on one pending operation before the general wait (cross-memory attach
#: moves the bytes inside these calls: 1-2 rounds; UCX's tcp needs the network).
_SPINS = 16
#: Largest packed key accepted from a peer (UCX's are tens to hundreds of bytes).
MAX_RKEY_BYTES = 64 << 10


class _MapParams(ctypes.Structure):
    _fields_ = [("field_mask", ctypes.c_uint64), ("address", ctypes.c_void_p),
                ("length", ctypes.c_size_t), ("flags", ctypes.c_uint),
                ("prot", ctypes.c_uint), ("memory_type", ctypes.c_int),
                ("exported_memh_buffer", ctypes.c_void_p)]


_lock = threading.Lock()
_ucp: Any = None
_why_not: str | None = None
#: A zeroed ``ucp_request_param_t`` (no attributes: UCX allocates requests, no callback);
#: larger than the struct on any UCX 1.x.
_PARAM = ctypes.create_string_buffer(256)


def _bind() -> Any:
    vp, st = ctypes.c_void_p, ctypes.c_size_t
    path = None
    try:
        import libucx  # the wheel ucxx depends on: the very library ucxx loaded

        cand = os.path.join(os.path.dirname(libucx.__file__), "lib", "libucp.so")
        path = cand if os.path.exists(cand) else None
    except ImportError:
        pass
    path = path or ctypes.util.find_library("ucp")
    if path is None:
        raise OSError("libucp not found")
    lib = ctypes.CDLL(path)
    for name, res, args in (
            ("ucp_get_nbx", vp, [vp, vp, st, ctypes.c_uint64, vp, vp]),
            ("ucp_put_nbx", vp, [vp, vp, st, ctypes.c_uint64, vp, vp]),
            ("ucp_ep_flush_nbx", vp, [vp, vp]),
            ("ucp_request_check_status", ctypes.c_int, [vp]),
            ("ucp_request_cancel", None, [vp, vp]),
            ("ucp_request_free", None, [vp]),
            ("ucp_worker_progress", ctypes.c_uint, [vp]),
            ("ucp_mem_map", ctypes.c_int, [vp, ctypes.POINTER(_MapParams),
                                           ctypes.POINTER(vp)]),
            ("ucp_mem_unmap", ctypes.c_int, [vp, vp]),
            ("ucp_rkey_pack", ctypes.c_int, [vp, vp, ctypes.POINTER(vp),
                                             ctypes.POINTER(st)]),
            ("ucp_rkey_buffer_release", None, [vp]),
            ("ucp_ep_rkey_unpack", ctypes.c_int, [vp, ctypes.c_char_p, ctypes.POINTER(vp)]),
            ("ucp_rkey_destroy", None, [vp])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def ucp() -> Any:
    """The bound ``libucp``; :class:`TransportError` where it cannot be loaded."""
    global _ucp, _why_not
    with _lock:
        if _ucp is None and _why_not is None:
            try:
                _ucp = _bind()
            except (OSError, AttributeError) as e:
                _why_not = f"cannot bind libucp for RMA: {e}"
                log.warning("ucx: %s", _why_not)
        if _ucp is None:
            raise TransportError(f"ucx: {_why_not}")
        return _ucp


def available() -> bool:
    try:
        ucp()
    except TransportError:
        return False
    return True


# -- the serving side: memory maps and grants ----------------------------------------------------
#: Memory maps and key packing are serialised in this process (threads of the serving
#: side and key templates of requesters share a UCX context).
_map_lock = threading.Lock()


class Mapping:
    """A host region mapped for RMA on one UCX context, and its packed key."""

    def __init__(self, context: Any, address: int, length: int) -> None:
        with _map_lock:
            self._map(context, address, length)

    def _map(self, context: Any, address: int, length: int) -> None:
        lib = ucp()
        self._context = context
        memh = ctypes.c_void_p()
        params = _MapParams(field_mask=_MAP_ADDRESS_LENGTH, address=address, length=length)
        st = lib.ucp_mem_map(context.handle, ctypes.byref(params), ctypes.byref(memh))
        if st != _UCS_OK:
            raise TransportError(f"ucx: ucp_mem_map failed (status {st})")
        self._memh: int | None = memh.value
        buf, size = ctypes.c_void_p(), ctypes.c_size_t()
        st = lib.ucp_rkey_pack(context.handle, memh, ctypes.byref(buf), ctypes.byref(size))
        if st != _UCS_OK:
            lib.ucp_mem_unmap(context.handle, memh)
            self._memh = None
            raise TransportError(f"ucx: ucp_rkey_pack failed (status {st})")
        self.rkey = ctypes.string_at(buf, size.value)
        lib.ucp_rkey_buffer_release(buf)

    def unmap(self) -> None:
        with _map_lock:
            memh, self._memh = self._memh, None
            if memh is not None:
                ucp().ucp_mem_unmap(self._context.handle, memh)


# -- the requesting side: keys and moving bytes --------------------------------------------------
class Key(NamedTuple):
    address: int
    length: int
    access: int
    rkey: int  # ucp_rkey_h, unpacked on the link's endpoint


def parse_keys(frame: Any) -> list[tuple[int, int, int, int, bytes]]:
    """The ``[id, address, length, access, rkey]`` entries of a ``keys`` answer (checked:
    what a peer sends must not crash UCX's unpacking or fool the range checks)."""
    entries = frame.get("k") if isinstance(frame, dict) else None
    if not isinstance(entries, list):
        raise TransportError("ucx: malformed keys answer")
    out = []
    for e in entries:
        if (not isinstance(e, list) or len(e) != 5
                or not all(type(x) is int and 0 <= x < 1 << 64 for x in e[:4])
                or not isinstance(e[4], bytes) or not 0 < len(e[4]) <= MAX_RKEY_BYTES
                or e[2] <= 0 or e[1] + e[2] > 1 << 64 or not e[3] & 3 or e[3] & ~3):
            raise TransportError("ucx: malformed key in a keys answer")
        out.append((e[0], e[1], e[2], e[3], e[4]))
    return out


def _layout(packed: bytes) -> tuple[int, int, tuple[int, ...], int] | None:
    """``(md map, memory type, size of each memory domain's key, end of those keys)`` of
    a packed key (UCX's format: a little-endian 64-bit map of memory domains, a memory
    type byte, then a length-prefixed key per domain in the map, then system device
    data); ``None`` when it does not parse."""
    if len(packed) < 9:
        return None
    md_map, o, sizes = int.from_bytes(packed[:8], "little"), 9, []
    for bit in range(64):
        if md_map >> bit & 1:
            if o >= len(packed):
                return None
            sizes.append(packed[o])
            o += 1 + packed[o]
    return (md_map, packed[8], tuple(sizes), o) if o <= len(packed) else None


_templates: dict[int, bytes] = {}


def template(context: Any) -> bytes:
    """A key this process packs for host memory on ``context`` (cached): what a peer's
    key must look like (see :func:`verify`)."""
    with _lock:
        got = _templates.get(id(context))
    if got is None:
        probe = ctypes.create_string_buffer(4096)
        m = Mapping(context, ctypes.addressof(probe), len(probe))
        got = m.rkey
        m.unmap()
        with _lock:
            _templates[id(context)] = got
    return got


def verify(packed: bytes, like: bytes) -> None:
    """Refuse (:class:`TransportError`) a peer's key that does not have the layout of
    ``like`` (same memory domains, memory type and key sizes, same system device data):
    UCX unpacks a key without bounds checks, and a malformed one crashes the process.
    Where both ends run one UCX on one host the keys agree; a peer whose keys differ
    (other hardware) gets two-sided transfers instead."""
    mine, theirs = _layout(like), _layout(packed)
    if (mine is None or theirs is None or theirs[:3] != mine[:3]
            or packed[theirs[3]:] != like[mine[3]:]):
        raise TransportError("ucx: the peer's remote key does not have this UCX's layout")


def unpack(ep: Any, packed: bytes, like: bytes) -> int:
    """The key handle of ``packed`` on ``ep``, once :func:`verify` (against ``like``)
    passed."""
    verify(packed, like)
    rkey = ctypes.c_void_p()
    st = ucp().ucp_ep_rkey_unpack(ep.handle, packed, ctypes.byref(rkey))
    if st != _UCS_OK or not rkey.value:
        raise TransportError(f"ucx: the peer's remote key does not unpack (status {st})")
    return rkey.value


def destroy(key: Key) -> None:
    ucp().ucp_rkey_destroy(key.rkey)


def check(keys: dict[int, Key], op: Op, segs: Sequence[Segment]) -> None:
    """Every range inside its granted region, with the access ``op`` needs; raises
    :class:`RemoteAccessError` before anything moves."""
    need = (Access.READ if op is Op.READ else Access.WRITE).value  # keys carry Access values
    for s in segs:
        k = keys.get(s.remote_id)
        if k is None:
            raise RemoteAccessError(f"peer refused: region {s.remote_id} is not open to "
                                    f"this agent")
        if not k.access & need:
            raise RemoteAccessError(f"peer refused: region {s.remote_id} is not open to "
                                    f"{op.value}")
        if not (0 <= s.remote_offset < k.length and 0 < s.length <= k.length - s.remote_offset):
            raise RemoteAccessError(
                f"peer refused: [{s.remote_offset}, {s.remote_offset + s.length}) is outside "
                f"region {s.remote_id} ({k.length} bytes)")


def move(worker: Any, ep: Any, keys: dict[int, Key], op: Op, segs: Sequence[Segment],
         timeout: float, cancelled: Callable[[], bool] | None = None,
         abandoned: list[int] | None = None) -> None:
    """Read (``ucp_get``) or write (``ucp_put``, then a flush: the bytes are in the peer's
    memory when this returns) ``segs`` (checked with :func:`check`; host memory on both
    sides). Cross-memory attach completes each operation in the call; other transports
    finish in :func:`wait`."""
    lib = ucp()
    eph = ep.handle
    fn = lib.ucp_get_nbx if op is Op.READ else lib.ucp_put_nbx
    pending: list[int] = []
    try:
        for s in segs:
            k = keys[s.remote_id]
            r = fn(eph, s.local.base + s.local_offset, s.length,
                   k.address + s.remote_offset, k.rkey, _PARAM)
            if r:
                if r >= _ERR_FLOOR:
                    raise TransportError(f"ucx: RMA {op.value} failed (status {r - (1 << 64)})")
                pending.append(r)
        if op is Op.WRITE:
            r = lib.ucp_ep_flush_nbx(eph, _PARAM)
            if r:
                if r >= _ERR_FLOOR:
                    raise TransportError(f"ucx: flush failed (status {r - (1 << 64)})")
                pending.append(r)
        if pending:
            wait(worker, pending, timeout, cancelled)
    except BaseException:
        # Abandoned: RMA operations cannot be recalled, so they stay with the caller
        # (``abandoned``), whose keys must outlive them (see :func:`settle`).
        for r in pending:
            lib.ucp_request_cancel(worker.handle, r)
        if abandoned is not None:
            abandoned.extend(pending)
        else:
            for r in pending:
                lib.ucp_request_free(r)
        raise


def settle(worker: Any, abandoned: list[int], seconds: float) -> bool:
    """Progress ``worker`` for up to ``seconds`` until the ``abandoned`` operations ended
    (each ended one freed and removed); whether none is left. Keys an operation uses must
    not be destroyed before it ended (UCX's rule)."""
    lib = ucp()
    end = time.monotonic() + seconds
    while abandoned:
        lib.ucp_worker_progress(worker.handle)
        for r in list(abandoned):
            if lib.ucp_request_check_status(r) != _UCS_INPROGRESS:
                abandoned.remove(r)
                lib.ucp_request_free(r)
        if time.monotonic() > end:
            break
    return not abandoned


def wait(worker: Any, pending: list[int], timeout: float,
         cancelled: Callable[[], bool] | None) -> None:
    """Progress ``worker`` (blocking on its wake-up fd between rounds) until every request
    of ``pending`` completed; each completed one is freed and removed."""
    lib = ucp()
    wh = worker.handle
    if len(pending) == 1:  # the usual case: one operation, moved by the progress calls
        r, check, progress = pending[0], lib.ucp_request_check_status, lib.ucp_worker_progress
        for _ in range(_SPINS):
            progress(wh)
            st = check(r)
            if st != _UCS_INPROGRESS:
                pending.clear()
                lib.ucp_request_free(r)
                if st != _UCS_OK:
                    raise TransportError(f"ucx: RMA operation failed (status {st})")
                return
    epfd = worker.epoll_file_descriptor
    deadline = time.monotonic() + timeout
    while pending:
        lib.ucp_worker_progress(wh)
        done = 0
        for r in list(pending):
            st = lib.ucp_request_check_status(r)
            if st == _UCS_INPROGRESS:
                continue
            pending.remove(r)
            lib.ucp_request_free(r)
            done += 1
            if st != _UCS_OK:
                raise TransportError(f"ucx: RMA operation failed (status {st})")
        if not pending:
            return
        now = time.monotonic()
        if done:
            deadline = now + timeout
        if cancelled is not None and cancelled():
            raise TransferCancelled("cancelled")
        if now > deadline:
            raise TransportTimeoutError(f"ucx: no RMA progress for {timeout} s")
        if worker.arm():  # nothing to do until UCX wakes us
            select.select([epfd], [], [], _SLICE_S)
