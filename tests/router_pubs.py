"""Publishers for the router's tests: a scripted one (every seq, gap and replay answer chosen
by the test) and a model of a worker's state that emits the events of random changes.

``ScriptedPublisher`` speaks the wire format through kvbm.events.wire only; it uses an XPUB
socket so a test can wait until a subscriber's subscription arrived instead of sleeping.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import zmq

from kvbm.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbm.events.wire import (
    EventBatch,
    encode_batch,
    encode_frames,
    encode_replay_end,
    encode_replay_reply,
    parse_replay_request,
)
from kvbm.hashing import hash_blocks
from kvbm.medium import Medium

WAIT_S = 30.0  # generous: a broken subscriber fails the test, a slow machine does not


class ScriptedPublisher:
    """PUB (XPUB) + ROUTER replay on 127.0.0.1. ``batch(seq, events)`` publishes and buffers a
    batch under a seq the test chooses; ``live=False`` only buffers it (a batch the
    subscriber missed), ``forget`` drops batches from the replay buffer."""

    def __init__(self, port: int = 0, replay_port: int = 0, *, topic: bytes = b"",
                 replay: bool = True, buffer: dict[int, bytes] | None = None) -> None:
        # ``buffer``: the replay buffer before the sockets open (a subscriber may connect
        # and ask for a replay the moment they do)
        self.buffer: dict[int, bytes] = dict(buffer or {})
        self.ctx = zmq.Context()
        self.topic = topic
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind(f"tcp://127.0.0.1:{port or '*'}")
        self.endpoint = self.pub.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.replays: list[int] = []  # start seqs asked for
        #: frames sent (after the client identity) before each genuine replay answer
        self.bad_replies: list[list[bytes]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.replay_endpoint: str | None = None
        self._thread: threading.Thread | None = None
        if replay:
            self.router = self.ctx.socket(zmq.ROUTER)
            self.router.setsockopt(zmq.LINGER, 0)
            self.router.bind(f"tcp://127.0.0.1:{replay_port or '*'}")
            self.replay_endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    @property
    def replay_port(self) -> int:
        assert self.replay_endpoint is not None
        return int(self.replay_endpoint.rsplit(":", 1)[1])

    def wait_subscriber(self, timeout: float = WAIT_S) -> None:
        """Until a subscription arrives (sends before it would be dropped by PUB)."""
        if not self.pub.poll(int(timeout * 1000)):
            raise AssertionError("no subscriber connected")
        msg = self.pub.recv()
        assert msg[:1] == b"\x01", msg

    def batch(self, seq: int, events: list[KVEvent], *, live: bool = True) -> bytes:
        payload = payload_of(events)
        with self._lock:
            self.buffer[seq] = payload
        if live:
            self.pub.send_multipart(encode_frames(self.topic, seq, payload))
        return payload

    def send_raw(self, frames: list[bytes]) -> None:
        self.pub.send_multipart(frames)

    def forget(self, *seqs: int) -> None:
        with self._lock:
            for s in seqs:
                self.buffer.pop(s, None)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(20):
                continue
            ident, start = parse_replay_request(self.router.recv_multipart())
            with self._lock:
                self.replays.append(start)
                items = sorted((s, p) for s, p in self.buffer.items() if s >= start)
            for frames in self.bad_replies:
                self.router.send_multipart([ident, *frames])
            for s, p in items:
                self.router.send_multipart([ident, *encode_replay_reply(self.topic, s, p)])
            self.router.send_multipart([ident, *encode_replay_end()])

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self.router.close(linger=0)
        self.pub.close(linger=0)
        self.ctx.term()


def payload_of(events: list[KVEvent]) -> bytes:
    return encode_batch(EventBatch(time.time(), events))


class WorkerModel:
    """A worker's blocks (publisher hash -> media) and the events of random changes to it:
    prompts stored run by run and removed from the tail in one medium (each medium's blocks
    of a prompt stay a prefix: no child without its parent), or all cleared. Hashes are
    vLLM-like (opaque) for GPU and kvbm's for the lower tiers."""

    def __init__(self, seed: int, block_size: int = 4, prompts: int = 64,
                 blocks: int = 8, clear_p: float = 0.0005) -> None:
        self.rng = random.Random(seed)
        self.clear_p = clear_p
        self.bs = block_size
        self.prompts = []
        for _ in range(prompts):
            toks = [self.rng.randrange(1 << 20) for _ in range(block_size * blocks)]
            seq = hash_blocks(toks, block_size).sequence
            self.prompts.append((toks, seq))
        self.held: dict[int, set[Medium]] = {}

    def _pub(self, seq_hash: int, medium: Medium) -> int:
        return seq_hash if medium is not Medium.GPU else (seq_hash * 0x9E3779B97F4A7C15) % 2**64

    def step(self) -> list[KVEvent]:
        """One random change, as the events a worker would publish for it."""
        r = self.rng.random()
        p = self.rng.randrange(len(self.prompts))
        toks, seq = self.prompts[p]
        medium = self.rng.choice(list(Medium))
        k = 0  # blocks of prompt p held in the medium, a prefix
        while k < len(seq) and medium in self.held.get(self._pub(seq[k], medium), ()):
            k += 1
        if r < 0.6:  # store the next blocks of prompt p (their parent is held: lineage)
            if k == len(seq):
                return []
            b = min(len(seq), k + self.rng.randrange(1, 5))
            hs = [self._pub(s, medium) for s in seq[k:b]]
            for h in hs:
                self.held.setdefault(h, set()).add(medium)
            parent = self._pub(seq[k - 1], medium) if k else None
            return [BlockStored(hs, parent, toks[k * self.bs: b * self.bs], self.bs, medium)]
        if r < 1 - self.clear_p:  # remove the last blocks of that prefix (leaves first)
            if k == 0:
                return []
            hs = [self._pub(s, medium) for s in seq[max(0, k - self.rng.randrange(1, 4)):k]]
            for h in hs:
                self.held[h].discard(medium)
                if not self.held[h]:
                    del self.held[h]
            return [BlockRemoved(hs, medium)]
        # as kvbm's BlockManager.clear(): the lower tiers' removals explicitly, then
        # AllBlocksCleared, which a router reads as the GPU's (vLLM's prefix-cache reset)
        out: list[KVEvent] = []
        for m in Medium:
            hs = [h for h, media in self.held.items() if m in media]
            if hs and m is not Medium.GPU:
                out.append(BlockRemoved(hs, m))
        self.held.clear()
        return [*out, AllBlocksCleared()]

    def snapshot(self) -> list[KVEvent]:
        """The whole state as stores (what a publisher's resync re-announces)."""
        out: list[KVEvent] = []
        for toks, seq in self.prompts:
            for medium in Medium:
                hs = [self._pub(s, medium) for s in seq]
                n = 0
                while n < len(hs) and medium in self.held.get(hs[n], ()):
                    n += 1
                if n:
                    out.append(BlockStored(hs[:n], None, toks[: n * self.bs], self.bs, medium))
        return out

    def blocks(self) -> dict[int, frozenset[Medium]]:
        return {h: frozenset(m) for h, m in self.held.items() if m}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(cond: Any, timeout: float = WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
