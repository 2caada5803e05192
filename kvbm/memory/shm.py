"""G2 in shared memory: one host pool mapped by the scheduler process and its workers.

vLLM runs its scheduler (kvbm's control plane) and its workers (the data plane) in separate
processes. The scheduler creates the pool (:meth:`SharedHostPool.create`) and owns its slot
allocator; each worker attaches to it by name (:meth:`SharedHostPool.attach`) and copies
pages between the engine's KV tensors and the pool. Only the name (a ``str``) and the layout
(``KVLayout.to_dict()``) cross between them: nothing is pickled.

The pool is a file in ``/dev/shm`` (the temporary directory where that is absent or not
writable) mapped ``MAP_SHARED`` by every process: a header (magic, version, layout
fingerprint, sizes, creator), the tags, then the pages; :mod:`kvbm.memory.shm_file` has the
format. Where CUDA is present the mapping is registered as pinned memory
(``cudaHostRegister``), so that copies between it and the GPU are DMA.

**Tags** say which block a page holds, per column (one column per writer of a page, e.g.
one per tensor-parallel rank; 1 by default). ``0`` means empty or being written. A writer
sets ``tags[slot, col] = 0``, copies the page (and waits for that copy, a GPU one too), then
sets ``tags[slot, col] = seq_hash``. A reader compares the tag with the block's sequence hash
before and after using the page and drops the page when either differs: a page whose tag
is not the block's hash is never served. Tags guard against a crashed or misrouted writer;
they are a check, not the synchronisation: that a page is complete before it is read, and
not rewritten while it is read, is the control plane's job (slots are allocated and freed
by the creator only, and completions travel through a pipe or socket, whose system calls
also order the memory writes on CPUs that reorder them).

A creator's :meth:`~SharedHostPool.close` unmaps and removes the file; an attacher's only
unmaps. A creator that exits without closing removes its file at exit, and one killed
leaves a file that the next :meth:`~SharedHostPool.create` with the same prefix removes
(only files of this user, of the exact name pattern, whose header names a creator in this
pid namespace that is no longer alive).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import secrets
import stat
import weakref
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.capacity import allocation_errors, check_pool_fits, host_available_bytes
from kvbm.deps import require
from kvbm.errors import (
    ClosedError,
    ConfigError,
    InvalidArgumentError,
    LayoutMismatchError,
    StorageError,
)
from kvbm.layout import KVLayout
from kvbm.memory.shm_file import (
    MAX_TAG_COLUMNS,
    PoolHeader,
    check_name,
    check_prefix,
    shm_directory,
    sweep_stale,
)
from kvbm.pool import HostPool, SlotAllocator

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def _check_common(layout: object, pin_memory: object) -> bool:
    """Check the arguments both constructors take; returns whether to pin."""
    if not isinstance(layout, KVLayout):
        raise InvalidArgumentError(f"layout must be a KVLayout (KVLayout.from_dict of the "
                                   f"creator's to_dict()), got {type(layout).__name__}")
    if pin_memory is not None and not isinstance(pin_memory, bool):
        raise InvalidArgumentError(f"pin_memory must be True, False or None, got {pin_memory!r}")
    require("torch", "engine", "the host tier (G2)")
    import torch

    cuda = torch.cuda.is_available()
    if pin_memory and not cuda:
        raise ConfigError("host.pin_memory=True needs CUDA; this torch sees no GPU "
                          "(leave it unset to pin only where CUDA is present)")
    return cuda if pin_memory is None else pin_memory


class _Mapping:
    """What must be released with a pool, held apart from it so that a finalizer can."""

    def __init__(self, mm: mmap.mmap, path: Path, owner: bool) -> None:
        self.mm, self.path, self.owner_pid = mm, path, os.getpid() if owner else -1
        self.registered = 0  # the address registered with CUDA, 0: none


def _release(m: _Mapping) -> None:
    if m.registered:
        with contextlib.suppress(Exception):  # at exit CUDA may be gone: nothing to undo
            import torch

            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            torch.cuda.check_error(cudart.cudaHostUnregister(m.registered))
        m.registered = 0
    try:
        m.mm.close()
    except BufferError:  # a caller still holds a view: unmapped when the last one goes
        log.debug("shared host pool %s: views outlive close(); unmapped with them", m.path)
    if m.owner_pid == os.getpid():  # never from a forked child of the creator
        with contextlib.suppress(FileNotFoundError):
            os.unlink(m.path)


class SharedHostPool(HostPool):
    """A :class:`HostPool` whose pages and tags live in a shared file (see the module).

    The creator's :attr:`allocator` is the one that hands out slots; an attacher's is there
    for the slot checks of :meth:`page` and :meth:`block_view` only.
    """

    name: str
    path: Path
    #: whether this process created the pool (and removes its file)
    owner: bool
    _closed: bool
    _mapping: _Mapping
    _finalizer: weakref.finalize[[_Mapping], SharedHostPool]
    _raw: torch.Tensor | None
    _buffer: torch.Tensor | None
    _tags: np.ndarray[Any, Any] | None

    def __init__(self, layout: KVLayout, num_blocks: int, pin_memory: bool | None = None
                 ) -> None:
        raise InvalidArgumentError("use SharedHostPool.create(...) or SharedHostPool.attach("
                                   "name, layout)")

    @classmethod
    def create(cls, layout: KVLayout, num_blocks: int, *, tag_columns: int = 1,
               prefix: str = "kvbm", pin_memory: bool | None = None) -> SharedHostPool:
        """Create a new pool of ``num_blocks`` zeroed pages (tags 0), owned by this process:
        its close, or its exit, removes the file. Removes ``prefix``'s stale files first."""
        pin = _check_common(layout, pin_memory)
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks <= 0:
            raise ConfigError(f"a pool needs a positive number of blocks, got {num_blocks!r}")
        if (isinstance(tag_columns, bool) or not isinstance(tag_columns, int)
                or not 1 <= tag_columns <= MAX_TAG_COLUMNS):
            raise InvalidArgumentError(f"tag_columns must be an int in [1, {MAX_TAG_COLUMNS}], "
                                       f"got {tag_columns!r}")
        check_prefix(prefix)
        page, d = layout.bytes_per_block, shm_directory()
        header = PoolHeader.new(layout, num_blocks, tag_columns)
        total = header.total_bytes
        avail = host_available_bytes()
        with contextlib.suppress(OSError):  # the shm filesystem has a size of its own
            st = os.statvfs(d)
            free = st.f_bavail * st.f_frsize
            avail = free if avail is None else min(avail, free)
        if avail is not None:
            avail = max(0, avail - (total - num_blocks * page))  # less the header and tags
        check_pool_fits(f"host tier (shared, {d})", num_blocks, page, avail, "host.num_blocks")
        sweep_stale(prefix)
        path = d / f"{prefix}-{os.getpid()}-{secrets.token_hex(8)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            # The header first: from here on the sweep can tell whose file this is.
            os.pwrite(fd, header.pack(), 0)
            with allocation_errors("host tier (shared)", num_blocks, page, "host.num_blocks"):
                try:  # reserve the memory now: a sparse file could SIGBUS at a first touch
                    os.posix_fallocate(fd, 0, total)
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # not on this fs
                        raise
                    os.ftruncate(fd, total)
                mm = _map(fd, total)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        finally:
            os.close(fd)
        pool = cls._build(layout, header, mm, path, pin, owner=True)
        log.debug("G2 shared pool %s: %d blocks of %d bytes, %d tag column(s)", path.name,
                  num_blocks, page, tag_columns)
        return pool

    @classmethod
    def attach(cls, name: str, layout: KVLayout, *, pin_memory: bool | None = None
               ) -> SharedHostPool:
        """Map the existing pool ``name``, created with ``layout``; never removes it."""
        check_name(name)
        pin = _check_common(layout, pin_memory)
        path = shm_directory() / name
        what = f"shared host pool {name!r} ({path})"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise StorageError(f"no {what}: its creator has not made it, or closed it") from None
        except OSError as e:
            raise StorageError(f"cannot open {what}: {e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise StorageError(f"{what} is not a regular file")
            h = PoolHeader.read(fd, what)
            if h.fingerprint != layout.fingerprint or h.bytes_per_block != layout.bytes_per_block:
                raise LayoutMismatchError(
                    f"{what} holds pages of layout {h.fingerprint:#018x} ({h.bytes_per_block} "
                    f"bytes each), not of the given layout {layout.fingerprint:#018x} "
                    f"({layout.bytes_per_block} bytes): attach with the creator's "
                    f"KVLayout.to_dict()")
            if st.st_size < h.total_bytes:
                raise StorageError(f"{what} is {st.st_size} bytes, its header says "
                                   f"{h.total_bytes}: truncated")
            try:
                mm = _map(fd, h.total_bytes)
            except OSError as e:
                raise StorageError(f"cannot map {what}: {e}") from None
        finally:
            os.close(fd)
        return cls._build(layout, h, mm, path, pin, owner=False)

    @classmethod
    def _build(cls, layout: KVLayout, h: PoolHeader, mm: mmap.mmap, path: Path, pin: bool, *,
               owner: bool) -> SharedHostPool:
        import torch

        self = cls.__new__(cls)
        self.layout, self.pinned, self._closed = layout, False, False
        self.name, self.path, self.owner = path.name, path, owner
        self.allocator = SlotAllocator(h.num_blocks)
        self._mapping = m = _Mapping(mm, path, owner)
        self._finalizer = weakref.finalize(self, _release, m)
        try:
            whole = np.frombuffer(mm, dtype=np.uint8)
            if pin:
                self.pinned = _pin(m, whole.ctypes.data, len(whole))
            tags = whole[h.tags_offset:h.tags_offset + h.num_blocks * h.tag_columns * 8]
            self._tags = tags.view(np.uint64).reshape(h.num_blocks, h.tag_columns)
            pages = whole[h.pages_offset:h.total_bytes].reshape(h.num_blocks, h.bytes_per_block)
            del whole, tags
            self._adopt(torch.from_numpy(pages))
        except BaseException:
            self.close()
            raise
        return self

    # -- HostPool, guarded ---------------------------------------------------------------------
    @property
    def raw(self) -> torch.Tensor:
        if self._raw is None:
            raise ClosedError(f"shared host pool {self.name} is closed")
        return self._raw

    @raw.setter
    def raw(self, value: torch.Tensor) -> None:
        self._raw = value

    @property
    def buffer(self) -> torch.Tensor:
        if self._buffer is None:
            raise ClosedError(f"shared host pool {self.name} is closed")
        return self._buffer

    @buffer.setter
    def buffer(self, value: torch.Tensor) -> None:
        self._buffer = value

    @property
    def tags(self) -> np.ndarray[Any, Any]:
        """``uint64[num_blocks, tag_columns]`` in the shared file (see the module)."""
        if self._tags is None:
            raise ClosedError(f"shared host pool {self.name} is closed")
        return self._tags

    @property
    def closed(self) -> bool:
        return self._closed

    def page(self, slot: int) -> memoryview:
        if self._closed:
            raise ClosedError(f"shared host pool {self.name} is closed")
        return super().page(slot)

    def block_view(self, slot: int) -> torch.Tensor:
        if self._closed:
            raise ClosedError(f"shared host pool {self.name} is closed")
        return super().block_view(slot)

    # -- lifetime --------------------------------------------------------------------------------
    def unlink(self) -> None:
        """Remove the file now (a creator or an attacher); processes that mapped it keep
        their mapping, none can attach any more. Idempotent."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def close(self) -> None:
        """Unmap (the creator also removes the file). Idempotent; afterwards page(),
        block_view(), raw, buffer and tags raise :class:`ClosedError`."""
        self._closed = True
        # Our own views go first, so that the mapping can be closed now.
        self._raw = self._buffer = self._tags = None
        self.__dict__.pop("_np", None)
        self.__dict__.pop("_flat", None)
        self._finalizer()

    def __enter__(self) -> SharedHostPool:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.num_blocks} blocks"
        return f"SharedHostPool({self.name!r}, {state}, owner={self.owner})"


def _map(fd: int, size: int) -> mmap.mmap:
    """``size`` bytes of ``fd`` shared, with page tables filled now where Linux allows, so
    that the first copy into a page runs at memcpy speed."""
    flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
    mm = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    with contextlib.suppress(AttributeError, OSError):  # shmem huge pages only if enabled
        mm.madvise(mmap.MADV_HUGEPAGE)
    return mm


def _pin(m: _Mapping, ptr: int, nbytes: int) -> bool:
    """Register the mapping with CUDA as pinned (copies to and from the GPU are then DMA)."""
    import torch

    try:
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        torch.cuda.check_error(cudart.cudaHostRegister(ptr, nbytes, 0))
    except Exception as e:
        raise ConfigError(f"cannot register the shared host pool {m.path.name} with CUDA as "
                          f"pinned memory ({e}); set host.pin_memory=false") from e
    m.registered = ptr
    return True
