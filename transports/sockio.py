"""Moving region bytes over a socket: vectored, zero-copy for host memory.

Pieces are ``(region, offset, length)``. Host pieces go out with ``sendmsg`` straight from
the registered memory and come in with ``recvmsg_into`` / ``recv_into`` straight into it
(no intermediate buffer). Device pieces (CUDA) are staged through a host buffer in chunks:
one device-to-host copy per chunk before sending, one host-to-device copy after receiving.

A :class:`Channel` sends a payload of 64 KiB or more so that it starts at a multiple of
4 KiB in its byte stream, padding the header before it (the header says how much). Measured
on loopback: a payload whose start drifts against the kernel's pages (a 5-byte header
before each one) costs the receiver about three times the system time of an aligned one,
and halves the bandwidth.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from collections.abc import Sequence

from kvbm.errors import TransportError, TransportTimeoutError
from kvbm.transports.control import TIMED_OUT, recv_into_exact
from kvbm.transports.regions import DeviceKind, RegionHandle

log = logging.getLogger(__name__)

#: Buffers per sendmsg/recvmsg_into call (Linux allows 1024).
_IOV = 512
#: Staging chunk for device memory.
STAGING_BYTES = 8 << 20
_staging_logged = False

Piece = tuple[RegionHandle, int, int]
#: Payloads of at least ALIGN_MIN bytes start at a multiple of ALIGN in the stream.
ALIGN = 4096
ALIGN_MIN = 64 << 10
_ZEROS_VIEW = memoryview(bytes(ALIGN))


class Staging:
    """A host buffer for device pieces, allocated on first use."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf: bytearray | None = None

    def view(self, n: int) -> memoryview:
        global _staging_logged
        if self._buf is None:
            self._buf = bytearray(STAGING_BYTES)
            if not _staging_logged:
                _staging_logged = True
                log.info("tcp: CUDA regions are staged through host memory (%d MiB chunks)",
                         STAGING_BYTES >> 20)
        return memoryview(self._buf)[:n]


def _io_error(e: OSError, what: str) -> TransportError:
    if isinstance(e, TIMED_OUT):
        return TransportTimeoutError(f"peer made no progress for too long while {what}")
    return TransportError(f"connection lost while {what}: {e}")


def _advance(views: list[memoryview], i: int, sent: int) -> int:
    """The index of the first view not wholly sent after ``sent`` more bytes went from
    ``views[i:]`` (a view sent in part is cut to its rest)."""
    while sent:
        v = views[i]
        if sent >= v.nbytes:
            sent -= v.nbytes
            i += 1
        else:
            views[i] = v[sent:]
            sent = 0
    return i


def _sendv(sock: socket.socket, views: list[memoryview]) -> None:
    if len(views) == 1:
        sock.sendall(views[0])
        return
    i = 0
    while i < len(views):
        i = _advance(views, i, sock.sendmsg(views[i:i + _IOV]))


def _recvv(sock: socket.socket, views: list[memoryview]) -> None:
    if len(views) == 1:
        recv_into_exact(sock, views[0])
        return
    i = 0
    while i < len(views):
        got = sock.recvmsg_into(views[i:i + _IOV], 0, socket.MSG_WAITALL)[0]
        if got == 0:
            raise TransportError("peer closed the connection mid-transfer")
        i = _advance(views, i, got)


def send_pieces(sock: socket.socket, pieces: Sequence[Piece], staging: Staging,
                head: Sequence[bytes | memoryview] = ()) -> None:
    """Send the buffers of ``head`` then the bytes of every piece, in order (host memory:
    one ``sendmsg`` for all of them in the usual case)."""
    views: list[memoryview] = [memoryview(h) for h in head if len(h)]
    try:
        for region, off, n in pieces:
            if region.device is DeviceKind.CPU:
                views.append(region.view(off, n))
                continue
            if views:
                _sendv(sock, views)
                views = []
            done = 0
            while done < n:
                k = min(n - done, STAGING_BYTES)
                buf = staging.view(k)
                region.copy_out(off + done, buf)
                sock.sendall(buf)
                done += k
        if views:
            _sendv(sock, views)
    except OSError as e:
        if isinstance(e, TransportError):
            raise
        raise _io_error(e, "sending") from None


def recv_pieces(sock: socket.socket, pieces: Sequence[Piece], staging: Staging,
                skip: memoryview | None = None) -> None:
    """Receive (and drop) ``skip``'s length of bytes into it, then the bytes of every
    piece, in order, into the regions."""
    views: list[memoryview] = [skip] if skip is not None and skip.nbytes else []
    try:
        for region, off, n in pieces:
            if region.device is DeviceKind.CPU:
                views.append(region.view(off, n))
                continue
            if views:
                _recvv(sock, views)
                views = []
            done = 0
            while done < n:
                k = min(n - done, STAGING_BYTES)
                buf = staging.view(k)
                recv_into_exact(sock, buf)
                region.copy_in(off + done, buf)
                done += k
        if views:
            _recvv(sock, views)
    except OSError as e:
        if isinstance(e, TransportError):
            raise
        raise _io_error(e, "receiving") from None


def drain(sock: socket.socket, n: int) -> None:
    """Read and drop ``n`` bytes (the payload of a refused WRITE)."""
    buf = memoryview(bytearray(min(n, 1 << 20) or 1))
    try:
        while n > 0:
            got = sock.recv_into(buf[:min(n, buf.nbytes)])
            if got == 0:
                raise TransportError("peer closed the connection")
            n -= got
    except TransportError:
        raise
    except OSError as e:
        raise _io_error(e, "draining a refused write") from None


class Channel:
    """One data connection: its socket, the bytes sent on it so far (for the alignment of
    payloads), a buffer for the padding it receives, and a staging buffer for device
    memory."""

    __slots__ = ("_pad", "_poll", "sock", "staging", "tx")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.staging = Staging()
        self.tx = 0
        self._pad = memoryview(bytearray(ALIGN))
        self._poll: select.poll | None = None

    def recv_small(self, n: int) -> memoryview:
        """The next ``n`` (at most 4096) bytes, a header: in a buffer of this channel, valid
        until its next receive (no allocation per header)."""
        view = self._pad[:n]
        try:
            k = self.sock.recv_into(view, 0, socket.MSG_WAITALL)
        except OSError as e:
            raise _io_error(e, "receiving") from None
        if k == 0:
            raise TransportError("peer closed the connection")
        if k < n:
            recv_into_exact(self.sock, view[k:])
        return view

    def pad_for(self, head: int, nbytes: int) -> int:
        """The padding after a header of ``head`` bytes that aligns a payload of
        ``nbytes`` (none for a small one)."""
        return (-(self.tx + head)) % ALIGN if nbytes >= ALIGN_MIN else 0

    def send(self, head: bytes, pad: int = 0, pieces: Sequence[Piece] = (), nbytes: int = 0
             ) -> None:
        """Send ``head``, ``pad`` zero bytes, then the pieces' bytes (``nbytes`` of them)."""
        if not pieces:
            try:
                self.sock.sendall(head)
            except OSError as e:
                raise _io_error(e, "sending") from None
        elif len(pieces) == 1 and pieces[0][0].device is DeviceKind.CPU:
            # one host range, the usual request: one sendmsg, without send_pieces' loop
            region, off, n = pieces[0]
            views = [memoryview(head), _ZEROS_VIEW[:pad], region.view(off, n)]
            try:
                _sendv(self.sock, views)
            except OSError as e:
                raise _io_error(e, "sending") from None
        else:
            send_pieces(self.sock, pieces, self.staging, (head, _ZEROS_VIEW[:pad]))
        self.tx += len(head) + pad + nbytes

    def send_nowait(self, views: list[memoryview]) -> list[memoryview]:
        """Send as much of ``views`` as the socket takes at once; what is left (the caller
        counts every byte in ``tx``)."""
        i = 0
        try:
            while i < len(views):
                i = _advance(views, i,
                             self.sock.sendmsg(views[i:i + _IOV], (), socket.MSG_DONTWAIT))
        except BlockingIOError:
            pass  # the socket's buffer is full
        except OSError as e:
            raise _io_error(e, "sending") from None
        return views[i:]

    def send_rest(self, views: list[memoryview]) -> None:
        """Send ``views``, waiting as long as the socket's timeout allows."""
        try:
            _sendv(self.sock, views)
        except OSError as e:
            raise _io_error(e, "sending") from None

    def ready(self, write: bool, timeout: float) -> bool:
        """Whether the socket can be written (``write``) or read (data, end of stream or
        an error waiting) within ``timeout`` seconds."""
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock, select.POLLIN)
        self._poll.modify(self.sock, select.POLLOUT if write else select.POLLIN)
        return bool(self._poll.poll(timeout * 1e3))

    def recv(self, pieces: Sequence[Piece], pad: int) -> None:
        """Receive ``pad`` bytes of padding (dropped), then the pieces' bytes."""
        if len(pieces) == 1 and pieces[0][0].device is DeviceKind.CPU:
            # one host range, the usual request: one call, without recv_pieces' loop
            region, off, n = pieces[0]
            try:
                if pad:
                    _recvv(self.sock, [self._pad[:pad], region.view(off, n)])
                else:
                    recv_into_exact(self.sock, region.view(off, n))
            except TransportError:
                raise
            except OSError as e:
                raise _io_error(e, "receiving") from None
            return
        recv_pieces(self.sock, pieces, self.staging, self._pad[:pad])

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
