"""Disaggregated prefill/decode: the transfers a worker runs on its own threads.

* :func:`receive` (decode worker): READ the held blocks from the prefill worker, then read
  its lease word (proof that the blocks were still the request's while they were read; the
  read carries the DONE note), or, in WRITE mode, register a staging region for the
  request, ask the prefill worker to write into it, wait for its WRITTEN note and copy the
  staging region into the blocks. Any failure or timeout: the transfer is released (the
  backend no longer touches the memory), the staging region deregistered (a late write
  reaches nothing), and every block is a load error (vLLM recomputes them).
* :func:`write_blocks` (prefill worker): the WRITE a decode worker asked for.

DONE and WRITE ride on an 8-byte READ of the peer's lease word, because the word itself is
part of the protocol: read after the blocks, it proves they were still the request's (DONE);
read with the WRITE request, it shows at once a prefill side that let the blocks go. The
notes that need no word (DROP, REFUSED, and WRITTEN once the write is complete) go alone
(``Agent.notify``, over the control channel): no data transfer, no scratch word, nothing
the backend must reach.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from kvbm.errors import (
    AuthenticationError,
    BackendUnavailableError,
    KvbmError,
    LayoutError,
    RemoteAccessError,
    TransportError,
)
from kvbm.errors import TransportTimeoutError as _Timeout
from kvbm.integrations.vllm.pd_params import AgentAddr, Lease, PdMode
from kvbm.integrations.vllm.pd_stats import LoadFailure
from kvbm.integrations.vllm.pd_wire import Note, NoteKind, Recv
from kvbm.transports import Op

if TYPE_CHECKING:
    from kvbm.integrations.vllm.kv_regions import KvRegions
    from kvbm.transports import Agent, Peer, RegionHandle, TransferHandle

log = logging.getLogger(__name__)

class LeaseLost(KvbmError):
    """The prefill side let the blocks go before (or while) they were read."""


def path_of(note: Note) -> str:
    """The transport path a DONE or WRITTEN note names (``why``: the backend that carried
    the blocks), as a metric label: one of kvbm's backends, else ``other`` (a peer's words
    must not mint label values)."""
    from kvbm.transports.config import KNOWN_BACKENDS

    return note.why if note.why in KNOWN_BACKENDS else "other"


def failure_reason(e: BaseException) -> LoadFailure:
    """What a failed transfer's error says, for ``pd_load_failures{reason}``."""
    for cls, reason in ((LeaseLost, LoadFailure.LEASE_LOST), (_Timeout, LoadFailure.TIMEOUT),
                        (queue.Empty, LoadFailure.TIMEOUT),
                        (AuthenticationError, LoadFailure.AUTH),
                        (LayoutError, LoadFailure.LAYOUT_MISMATCH),
                        (RemoteAccessError, LoadFailure.REFUSED),
                        (BackendUnavailableError, LoadFailure.NO_PATH),
                        (TransportError, LoadFailure.PEER_DEAD)):
        if isinstance(e, cls):
            return reason
    return LoadFailure.ERROR


@dataclass
class Outcome:
    request_id: str
    ok: bool
    blocks: tuple[int, ...]
    nbytes: int = 0
    seconds: float = 0.0
    backend: str = ""
    why: str = ""
    #: of a failure; None when ok
    reason: LoadFailure | None = None


class Peers:
    """Connected peers by agent address (name, host, port); one connect at a time per
    peer. The name is checked by the handshake: an agent that answers at the address under
    another name, or without the secret, is refused."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._lock = threading.Lock()
        self._peers: dict[AgentAddr, Peer] = {}
        self._locks: dict[AgentAddr, threading.Lock] = {}

    def get(self, addr: AgentAddr) -> Peer:
        with self._lock:
            lock = self._locks.setdefault(addr, threading.Lock())
        with lock:
            peer = self._peers.get(addr)
            if peer is None:
                peer = self._agent.connect(addr.host, addr.port, name=addr.name)
                with self._lock:
                    for other in [a for a in self._peers if a.name == addr.name]:
                        del self._peers[other]  # (the agent keeps one link per name)
                    self._peers[addr] = peer
            return peer

    def refresh(self, addr: AgentAddr) -> Peer:
        """The peer with its metadata fetched anew (regions it registered since)."""
        fresh = self._agent.refresh(self.get(addr))
        with self._lock:
            self._peers[addr] = fresh
        return fresh

    def forget(self, name: str) -> None:
        """Drop a peer after an error: the next transfer connects (and fetches its
        metadata) anew."""
        with self._lock:
            gone = [a for a in self._peers if a.name == name]
            for a in gone:
                del self._peers[a]
        if gone:
            with contextlib.suppress(KvbmError):
                self._agent.disconnect(name)


class Carrier:
    """8-byte READs of peers' lease words (see the module), one scratch word each."""

    def __init__(self, agent: Agent, words: int) -> None:
        self.agent = agent
        self._scratch = np.zeros(words, dtype=np.uint64)
        self._region: RegionHandle = agent.register(self._scratch, name="scratch")
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(words):
            self._free.put(i)

    def read_word(self, peer: Peer, slot: int, note: Note | None, deadline: float) -> int:
        """The peer's lease word ``slot``, delivering ``note`` to it once read."""
        try:
            lease = peer.info.region("lease")
        except KeyError:
            raise LayoutError(f"{peer.name} exposes no lease words: not a kvbm prefill/decode "
                              f"worker") from None
        i = self._free.get(timeout=max(0.0, deadline - time.monotonic()))
        try:
            h = self.agent.transfer(peer, Op.READ, [((self._region, 8 * i, 8),
                                                        (lease, 8 * slot, 8))],
                                    notify=None if note is None else note.encode())
            wait(h, deadline)
            return int(self._scratch[i])
        finally:
            self._free.put(i)

    def send(self, peer: Peer, note: Note) -> None:
        """Best effort: a note that nothing waits for (bounded by ``io_timeout_s``)."""
        try:
            self.agent.notify(peer, note.encode())
        except KvbmError as e:
            log.debug("kvbm: %s note to %s not delivered: %s", note.kind.value, peer.name, e)


class Waiters:
    """Decode side, WRITE mode: transfers waiting for the prefill side's answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, int], tuple[threading.Event, list[Note]]] = {}

    def expect(self, request_id: str, token: int) -> tuple[threading.Event, list[Note]]:
        got: tuple[threading.Event, list[Note]] = (threading.Event(), [])
        with self._lock:
            self._waiting[(request_id, token)] = got
        return got

    def cancel(self, request_id: str, token: int) -> None:
        with self._lock:
            self._waiting.pop((request_id, token), None)

    def deliver(self, note: Note) -> bool:
        with self._lock:
            got = self._waiting.pop((note.request_id, note.token), None)
        if got is None:
            return False
        got[1].append(note)
        got[0].set()
        return True


@dataclass
class Context:
    """What a worker's transfers share."""

    agent: Agent
    kv: KvRegions
    peers: Peers
    carrier: Carrier
    waiters: Waiters
    mode: PdMode
    timeout_s: float
    rank: int
    me: AgentAddr


def receive(ctx: Context, recv: Recv) -> Outcome:
    """Decode worker: one request's blocks (see the module). Never raises."""
    t0 = time.monotonic()
    deadline = t0 + ctx.timeout_s
    addr = recv.agents[ctx.rank]
    out = Outcome(recv.request_id, False, recv.local_blocks)
    rid, token = recv.remote_request_id, recv.lease.token
    peer: Peer | None = None
    if not recv.local_blocks:  # only let the prefill side go (best effort)
        try:
            ctx.carrier.send(ctx.peers.get(addr), Note(NoteKind.DROP, rid, token))
        except KvbmError as e:
            log.debug("kvbm: request %s: %s not told to drop: %s", recv.request_id,
                      addr.name, e)
        out.ok = True
        return out
    try:
        peer = ctx.peers.get(addr)
        if ctx.mode is PdMode.READ:
            descs = ctx.kv.descriptors(peer.info, recv.local_blocks, recv.remote_blocks)
            h = ctx.agent.transfer(peer, Op.READ, descs)
            out.backend, out.nbytes = h.backend, h.nbytes
            wait(h, deadline)
            # (the blocks read ride along: the prefill side counts what it served)
            _check_lease(recv.lease, ctx.carrier.read_word(
                peer, recv.lease.slot, Note(NoteKind.DONE, rid, token,
                                            blocks=recv.remote_blocks, why=h.backend),
                deadline))
        else:
            _request_write(ctx, peer, recv, deadline, out)
        out.ok = True
    except Exception as e:  # any failure is a recompute, never an exception into vLLM
        out.why = f"{type(e).__name__}: {e}"
        out.reason = failure_reason(e)
        log.warning("kvbm: request %s: %d blocks from %s not received (%s); vLLM recomputes "
                    "them", recv.request_id, len(recv.local_blocks), addr.name, out.why)
        if peer is not None and not isinstance(e, LeaseLost):
            if isinstance(e, TransportError) and not isinstance(e, _Timeout):
                ctx.peers.forget(peer.name)  # (broken: connect anew next time)
            else:  # the peer may well be fine: let it free the blocks now, not at the lease
                ctx.carrier.send(peer, Note(NoteKind.DROP, rid, token))
    out.seconds = time.monotonic() - t0
    return out


def _request_write(ctx: Context, peer: Peer, recv: Recv, deadline: float, out: Outcome
                   ) -> None:
    from kvbm.transports import Access

    rid, token = recv.remote_request_id, recv.lease.token
    base, buf = ctx.kv.staging(len(recv.local_blocks))
    region = ctx.agent.register(buf, name=f"in.{token:016x}", expose_to=peer.name,
                                access=Access.WRITE,
                                meta={"fp": format(ctx.kv.fingerprint, "016x")})
    event, got = ctx.waiters.expect(rid, token)
    try:
        note = Note(NoteKind.WRITE, rid, token, ctx.me, recv.remote_blocks, region.name or "")
        _check_lease(recv.lease, ctx.carrier.read_word(peer, recv.lease.slot, note, deadline))
        if not event.wait(max(0.0, deadline - time.monotonic())):
            raise _Timeout(f"no answer from {peer.name} within {ctx.timeout_s} s")
    finally:
        ctx.waiters.cancel(rid, token)
        # The fence: from here on a write into the region is refused (one in flight is
        # waited for), whatever happened.
        ctx.agent.deregister(region, timeout=ctx.timeout_s)
    answer = got[0]
    if answer.kind is not NoteKind.WRITTEN:
        raise RemoteAccessError(f"{peer.name} refused to write: {answer.why}")
    out.backend = path_of(answer)
    ctx.kv.stage_in(buf, recv.local_blocks)
    ctx.kv.give_back(base)  # (only now: after a failure a late write might still land)
    out.nbytes = buf.numel()


def write_blocks(ctx: Context, held: tuple[int, ...], note: Note, deadline: float) -> Outcome:
    """Prefill worker: write the held blocks ``note.blocks`` into the decode worker's
    staging region ``note.region`` and notify it WRITTEN; on failure tell it REFUSED.
    Never raises."""
    t0 = time.monotonic()
    out = Outcome(note.request_id, False, note.blocks)
    assert note.agent is not None
    peer: Peer | None = None
    try:
        if not set(note.blocks) <= set(held):
            raise LayoutError("asked for blocks the request does not hold")
        peer = ctx.peers.refresh(note.agent)  # (the staging region is new)
        descs = ctx.kv.staging_descriptors(peer.info, note.region, note.blocks)
        h = ctx.agent.transfer(peer, Op.WRITE, descs)
        out.backend, out.nbytes = h.backend, h.nbytes
        wait(h, deadline)
        # WRITTEN only now that every byte is in place (it names the path that wrote)
        ctx.agent.notify(peer, Note(NoteKind.WRITTEN, note.request_id, note.token,
                                    why=h.backend).encode())
        out.ok = True
    except Exception as e:  # the decode side times out or hears REFUSED: it recomputes
        out.why = f"{type(e).__name__}: {e}"
        out.reason = failure_reason(e)
        log.warning("kvbm: request %s: writing %d blocks to %s failed: %s", note.request_id,
                    len(note.blocks), note.agent.name, out.why)
        if isinstance(e, TransportError) and peer is not None:
            ctx.peers.forget(peer.name)
        try:
            peer = ctx.peers.get(note.agent)
            ctx.carrier.send(peer, Note(NoteKind.REFUSED, note.request_id, note.token,
                                        why=out.why))
        except KvbmError:
            pass
    out.seconds = time.monotonic() - t0
    return out


def wait(h: TransferHandle, deadline: float) -> None:
    """Wait for ``h`` until ``deadline``; past it, release it (the backend lets go of the
    memory) and raise the timeout."""
    try:
        h.wait(max(0.0, deadline - time.monotonic()))
    except _Timeout:
        h.release()
        raise
    if h.status.value != "done":
        raise TransportError(f"transfer with {h.peer} {h.status.value}")


def _check_lease(lease: Lease, word: int) -> None:
    if not lease.accepts(word):
        raise LeaseLost("the prefill side released the blocks (its lease ran out) before "
                        "they were read")
