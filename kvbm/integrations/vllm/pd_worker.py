"""Disaggregated prefill/decode, the worker side: a transport agent over vLLM's KV memory.

Each worker starts a :class:`kvbm.transports.Agent` (``[transport]``: address, port +
rank, shared secret) and registers vLLM's KV tensors with it, one region per layer (see
:mod:`~kvbm.integrations.vllm.kv_regions`), plus its lease words. Its scheduler side learns
the agent's address through vLLM's handshake (:meth:`DisaggWorker.handshake`).

* **Prefill**: a :class:`~kvbm.integrations.vllm.pd_wire.Hold` writes the lease's token and
  keeps the request until the decode side's DONE or DROP note, the end of the WRITE it asked
  for, or the lease's end; then the release marker is written and the request reported sent
  (vLLM frees its blocks). A note may arrive before its hold (the decode side was fast): it
  waits for it.
* **Decode**: a :class:`~kvbm.integrations.vllm.pd_wire.Recv` runs on the worker's threads
  (:func:`~kvbm.integrations.vllm.pd_jobs.receive`); when it is over the request is reported
  received, with every block of a failed transfer as a load error.

Nothing here blocks vLLM's step on a peer: connects and transfers run on the threads.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvbm.errors import InvalidArgumentError
from kvbm.integrations.vllm.config import ConnectorSettings
from kvbm.integrations.vllm.pd_jobs import (
    Carrier,
    Context,
    Outcome,
    Peers,
    Waiters,
    path_of,
    receive,
    write_blocks,
)
from kvbm.integrations.vllm.pd_params import AgentAddr, DisaggConfig, Lease, Roles, release_marker
from kvbm.integrations.vllm.pd_stats import LeaseEnd, PdMeter
from kvbm.integrations.vllm.pd_wire import DisaggStep, Handshake, Note, NoteKind
from kvbm.integrations.vllm.stats import KvbmConnectorStats

if TYPE_CHECKING:
    import torch

    from kvbm.memory.engine_kv import EngineKV
    from kvbm.transports import Notification

log = logging.getLogger(__name__)

#: Notes kept for holds that have not arrived yet, at most.
_EARLY_LIMIT = 4096


@dataclass
class WorkerCounters:
    """What one worker moved (plain data)."""

    #: decode: requests received, their bytes and seconds; transfers that failed
    received: int = 0
    received_bytes: int = 0
    receive_seconds: float = 0.0
    receive_failures: int = 0
    #: prefill: holds let go on the decode side's word (DONE / DROP), after its WRITE,
    #: and at the lease's end; WRITEs that failed
    released_done: int = 0
    released_drop: int = 0
    released_written: int = 0
    expired: int = 0
    write_failures: int = 0
    #: notes that were not kvbm's or named no hold this worker has or will have
    stray_notes: int = 0
    #: the last transfers (decode: received; prefill: written), newest last
    recent: collections.deque[Outcome] = field(
        default_factory=lambda: collections.deque(maxlen=256))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["recent"] = [{**dataclasses.asdict(o), "reason": o.reason and o.reason.value}
                         for o in self.recent]
        return out


@dataclass
class _Hold:
    lease: Lease
    blocks: tuple[int, ...]
    deadline: float
    job: Future[Outcome] | None = None


def agent_name(engine_id: str, rank: int) -> str:
    clean = re.sub(r"[^A-Za-z0-9._:/-]", "-", engine_id)[:96] or "engine"
    return f"kvbm-{clean}-tp{rank}"


class DisaggWorker:
    """See the module docstring. One per vLLM worker (TP rank)."""

    def __init__(self, settings: ConnectorSettings, config: DisaggConfig, roles: Roles,
                 engine_id: str, rank: int) -> None:
        self.settings = settings
        self.config = config
        self.roles = roles
        self.rank = rank
        self.name = agent_name(engine_id, rank)
        self.counters = WorkerCounters()
        #: for vLLM's stats (see pd_stats)
        self.meter = PdMeter()
        self.agent: Any = None
        self._ctx: Context | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._lease: np.ndarray[Any, np.dtype[np.uint64]] | None = None
        self._notes: queue.SimpleQueue[Note] = queue.SimpleQueue()
        self._holds: dict[str, _Hold] = {}
        self._early: collections.OrderedDict[tuple[str, int], tuple[Note, float]] = \
            collections.OrderedDict()
        self._recvs: dict[str, Future[Outcome]] = {}
        self._sending: set[str] = set()
        self._recving: set[str] = set()
        self._errors: set[int] = set()

    # -------------------------------------------------------------------------- setup --
    def register(self, kv: EngineKV, tensors: list[torch.Tensor]) -> None:
        """Start the agent and register vLLM's KV tensors (vLLM's ``register_kv_caches``)."""
        from kvbm.integrations.vllm.kv_regions import KvRegions
        from kvbm.transports import ALL_PEERS, Access, Agent

        tcfg = self.settings.config.transport
        if tcfg.port:
            tcfg = dataclasses.replace(tcfg, port=tcfg.port + self.rank)
        agent = Agent(self.name, tcfg, on_notification=self._on_notification)
        try:
            # Peers READ a prefill worker's KV; nobody writes into vLLM's KV directly (a
            # WRITE goes to a staging region of its own, see kv_regions).
            regions = KvRegions(agent, kv, tensors, Access.READ if self.roles.produce
                                else None, spare=self.config.threads)
            self._lease = np.zeros(self.config.max_handoffs, dtype=np.uint64)
            agent.register(self._lease, name="lease", expose_to=ALL_PEERS, access=Access.READ)
            carrier = Carrier(agent, self.config.threads + 2)
        except BaseException:
            agent.close()
            raise
        self.agent = agent
        host, port = agent.address
        self._ctx = Context(agent, regions, Peers(agent), carrier, Waiters(), self.config.mode,
                            self.config.timeout_s, self.rank, AgentAddr(self.name, host, port))
        self._pool = ThreadPoolExecutor(self.config.threads, thread_name_prefix="kvbm-pd")
        log.info("kvbm: worker %d serves prefill/decode transfers as %s on %s:%d "
                 "(%s, fingerprint %016x)", self.rank, self.name, host, port,
                 ", ".join(agent.backends), regions.fingerprint)

    def handshake(self) -> bytes:
        """This worker's agent, for the scheduler side (vLLM's handshake metadata)."""
        assert self._ctx is not None, "register_kv_caches first"
        return Handshake(self.rank, self._ctx.me).encode()

    # -------------------------------------------------------------------------- steps --
    def bind(self, payload: bytes | None) -> None:
        """This step's holds and transfers (they start now, on the worker's threads)."""
        if payload is None:
            return
        step = DisaggStep.decode(payload)
        if self._ctx is None or self._pool is None or self._lease is None:
            log.error("kvbm: prefill/decode work before vLLM registered its KV caches")
            for r in step.recvs:
                if r.local_blocks:
                    self._errors.update(r.local_blocks)
                    self._recving.add(r.request_id)
            self._sending.update(h.request_id for h in step.holds)
            return
        now = time.monotonic()
        for h in step.holds:
            if not 0 <= h.lease.slot < len(self._lease):
                raise InvalidArgumentError(f"lease slot {h.lease.slot} out of range")
            self._lease[h.lease.slot] = h.lease.token
            self._holds[h.request_id] = _Hold(h.lease, h.block_ids, now + h.lease_s)
            note = self._early.pop((h.request_id, h.lease.token), None)
            if note is not None:
                self._apply(note[0])
        for r in step.recvs:
            self._recvs[r.request_id] = self._pool.submit(receive, self._ctx, r)

    def finished(self) -> tuple[set[str] | None, set[str] | None]:
        """Requests let go (prefill) and received (decode) since the last call."""
        while True:
            try:
                self._apply(self._notes.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        for rid, hold in list(self._holds.items()):
            if hold.job is not None:
                if hold.job.done():
                    out = hold.job.result()
                    self._record(out, sent=True)
                    self._release(rid, LeaseEnd.WRITTEN if out.ok else LeaseEnd.WRITE_FAILED)
            elif now >= hold.deadline:
                log.warning("kvbm: request %s: no decode instance took its blocks within "
                            "%.0f s; they are freed", rid, self.config.lease_s)
                self._release(rid, LeaseEnd.EXPIRED)
        for rid, fut in list(self._recvs.items()):
            if fut.done():
                del self._recvs[rid]
                out = fut.result()
                if out.blocks:
                    self._record(out, sent=False)
                    self._recving.add(rid)
                    if not out.ok:
                        self._errors.update(out.blocks)
        while self._early and next(iter(self._early.values()))[1] < now:
            self._early.popitem(last=False)
        sending, recving = self._sending, self._recving
        self._sending, self._recving = set(), set()
        return sending or None, recving or None

    def load_errors(self) -> set[int]:
        out, self._errors = self._errors, set()
        return out

    def take_stats(self) -> KvbmConnectorStats | None:
        """What this worker counted since the last call (vLLM's worker-side
        ``get_kv_connector_stats``, with kvbm's copies)."""
        return self.meter.take()

    # ---------------------------------------------------------------------- internals --
    def _on_notification(self, n: Notification) -> None:
        """On the agent's thread: answers to WRITE go to their waiters, the rest to the
        step's poll."""
        try:
            note = Note.decode(n.data)
        except InvalidArgumentError as e:
            self._stray()
            log.warning("kvbm: a note from %s was refused: %s", n.peer, e)
            return
        ctx = self._ctx
        if note.kind in (NoteKind.WRITTEN, NoteKind.REFUSED):
            if ctx is None or not ctx.waiters.deliver(note):
                self._stray()
            return
        self._notes.put(note)

    def _apply(self, note: Note) -> None:
        hold = self._holds.get(note.request_id)
        if hold is None or hold.lease.token != note.token:
            if self.roles.produce and len(self._early) < _EARLY_LIMIT:
                # (a hold for it may come in this or the next step: keep it for a lease)
                self._early[(note.request_id, note.token)] = (
                    note, time.monotonic() + self.config.lease_s)
            else:
                self._stray()
            return
        if hold.job is not None:
            return  # a WRITE for it runs: it ends the hold
        if note.kind is NoteKind.WRITE:
            assert self._pool is not None and self._ctx is not None
            hold.job = self._pool.submit(write_blocks, self._ctx, hold.blocks, note,
                                         hold.deadline)
        elif note.kind is NoteKind.DONE:
            # the blocks the decode side says it read, of those held (all: an older peer)
            read = set(note.blocks) & set(hold.blocks) if note.blocks else set(hold.blocks)
            self._served("read", path_of(note), len(read))
            self._release(note.request_id, LeaseEnd.DONE)
        elif note.kind is NoteKind.DROP:
            self._release(note.request_id, LeaseEnd.DROP)

    def _stray(self) -> None:
        self.counters.stray_notes += 1
        self.meter.add("pd_stray_notes")

    def _served(self, op: str, backend: str, blocks: int, nbytes: int | None = None) -> None:
        if blocks and self._ctx is not None:
            self.meter.add("pd_served_blocks", blocks, (op, backend))
            self.meter.add("pd_served_bytes", blocks * self._ctx.kv.block_bytes
                           if nbytes is None else nbytes, (op, backend))

    def _release(self, rid: str, why: LeaseEnd) -> None:
        hold = self._holds.pop(rid)
        assert self._lease is not None
        # The marker first: a decode side reading the word from now on knows the blocks
        # may be reused; vLLM frees them only after the report below.
        self._lease[hold.lease.slot] = release_marker(hold.lease.token)
        self._sending.add(rid)
        self.meter.add("pd_leases_released", 1, (why,))
        c = self.counters
        if why is LeaseEnd.DONE:
            c.released_done += 1
        elif why is LeaseEnd.DROP:
            c.released_drop += 1
        elif why is LeaseEnd.WRITTEN:
            c.released_written += 1
        elif why is LeaseEnd.WRITE_FAILED:
            c.write_failures += 1
        else:
            c.expired += 1

    def _record(self, out: Outcome, *, sent: bool) -> None:
        c, m = self.counters, self.meter
        c.recent.append(out)
        if sent:
            if out.ok:
                self._served("write", out.backend, len(out.blocks), out.nbytes)
            return
        if out.ok:
            c.received += 1
            c.received_bytes += out.nbytes
            c.receive_seconds += out.seconds
            m.add("pd_loads_done", 1, (out.backend,))
            m.add("pd_received_blocks", len(out.blocks), (out.backend,))
            m.add("pd_received_bytes", out.nbytes, (out.backend,))
            m.observe("pd_handoff", out.seconds)
        else:
            c.receive_failures += 1
            m.add("pd_load_failures", 1, (out.reason or "error",))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self.agent is not None:
            self.agent.close()
            self.agent = None
