"""``kvbm events``: cache events on the wire (``kvbm events tail``).

``tail`` subscribes to a publisher (kvbm's or vLLM's: the same wire) and prints each event as
it arrives, one line each (``--json``: one JSON object each). It follows the sequence numbers:
a gap is noted on stderr and, with ``--replay``, filled from the publisher's replay socket
before the batch that revealed it is printed; a seq that goes back (a publisher restarted) is
noted too. Frames that are not events are noted and skipped; nothing a publisher sends stops
the command.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any, TextIO

from kvbm.config import check_endpoint
from kvbm.errors import EventDecodeError, InvalidArgumentError
from kvbm.events.records import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from kvbm.events.wire import (
    EventBatch,
    decode_batch,
    event_to_wire,
    parse_frames,
    parse_replay_reply,
    replay_request,
)

#: Longest wait for one replay to finish (its end marker), in seconds.
_REPLAY_WAIT_S = 5.0
#: Hashes shown per event in the text output.
_SHOWN = 4


def _hashes(hs: list[int]) -> str:
    shown = " ".join(f"{h:#018x}" for h in hs[:_SHOWN])
    return shown + (f" ... (+{len(hs) - _SHOWN})" if len(hs) > _SHOWN else "")


def _text(seq: int, batch: EventBatch, e: KVEvent) -> str:
    head = f"seq {seq}" + (f" dp {batch.data_parallel_rank}"
                           if batch.data_parallel_rank else "")
    if isinstance(e, BlockStored):
        parent = "none" if e.parent_block_hash is None else f"{e.parent_block_hash:#018x}"
        lora = f" lora {e.lora_name}" if e.lora_name else ""
        return (f"{head} stored  {e.medium.value:<10} {len(e.block_hashes)} block(s) "
                f"{_hashes(e.block_hashes)} parent {parent} tokens {len(e.token_ids)} "
                f"block_size {e.block_size}{lora}")
    if isinstance(e, BlockRemoved):
        return (f"{head} removed {e.medium.value:<10} {len(e.block_hashes)} block(s) "
                f"{_hashes(e.block_hashes)}")
    assert isinstance(e, AllBlocksCleared)
    return f"{head} cleared (every block of every medium)"


def _json(seq: int, batch: EventBatch, e: KVEvent) -> str:
    return json.dumps({"seq": seq, "ts": batch.ts, "data_parallel_rank":
                       batch.data_parallel_rank, **event_to_wire(e)})


class _Tail:
    """Prints events in seq order, healing gaps through the replay socket when it has one."""

    def __init__(self, zmq: Any, ctx: Any, args: argparse.Namespace, out: TextIO,
                 err: TextIO, deadline: float | None) -> None:
        self.zmq, self.ctx = zmq, ctx
        self.replay_endpoint: str | None = args.replay
        self.fmt = _json if args.json else _text
        self.left: int | None = args.count
        self.out, self.err = out, err
        self.deadline = deadline
        self.expect: int | None = args.from_seq

    def note(self, msg: str) -> None:
        print(f"kvbm events: {msg}", file=self.err, flush=True)

    def done(self) -> bool:
        return self.left is not None and self.left <= 0

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def emit(self, seq: int, batch: EventBatch) -> None:
        if batch.skipped:
            self.note(f"seq {seq}: {batch.skipped} event(s) not understood, skipped: "
                      f"{'; '.join(batch.skip_reasons)}")
        for e in batch.events:
            if self.done():
                return
            print(self.fmt(seq, batch, e), file=self.out)
            if self.left is not None:
                self.left -= 1
        self.out.flush()

    def on_frames(self, frames: list[bytes]) -> None:
        try:
            _, seq, payload = parse_frames(frames)
            batch = decode_batch(payload)
        except EventDecodeError as e:
            self.note(f"not an event message, skipped: {e}")
            return
        if self.expect is not None and seq > self.expect:
            self.note(f"gap: batches {self.expect}..{seq - 1} missed")
            if self.replay_endpoint is not None:
                self.fill(self.expect, seq)
        elif self.expect is not None and seq < self.expect:
            self.note(f"seq went back from {self.expect} to {seq} (the publisher restarted?)")
        if not self.done():
            self.emit(seq, batch)
        self.expect = seq + 1

    def fill(self, start: int, stop: int) -> None:
        """Print the replayed batches ``start .. stop-1``."""
        zmq = self.zmq
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        wait = self.remaining_s()
        dealer.setsockopt(zmq.RCVTIMEO, int(1000 * min(_REPLAY_WAIT_S, wait if wait is not None
                                                       else _REPLAY_WAIT_S)))
        got = start
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart(replay_request(start))
            while True:
                seq, payload = parse_replay_reply(dealer.recv_multipart())
                if payload is None:
                    break
                if seq < got or seq >= stop:
                    continue  # before the gap (a restarted publisher) or already live
                if seq > got:
                    self.note(f"replay: batches {got}..{seq - 1} are no longer buffered")
                got = seq + 1
                try:
                    self.emit(seq, decode_batch(payload))
                except EventDecodeError as e:
                    self.note(f"replay: batch {seq} is not a batch, skipped: {e}")
        except zmq.Again:
            self.note(f"replay: no end marker from {self.replay_endpoint} in time")
        except EventDecodeError as e:
            self.note(f"replay: not a replay reply, stopped: {e}")
        finally:
            dealer.close()
        if got < stop:
            self.note(f"replay: batches {got}..{stop - 1} could not be replayed")

    def run(self, sub: Any) -> int:
        while not self.done():
            wait = self.remaining_s()
            if wait is not None and wait <= 0:
                break
            if not sub.poll(1000 if wait is None else min(1000, int(wait * 1000) + 1)):
                continue
            self.on_frames(sub.recv_multipart())
        if self.left is not None and self.left > 0:
            self.note(f"timed out with {self.left} event(s) of --count still to come")
            return 1
        return 0


def _run(args: argparse.Namespace) -> int:
    from kvbm.deps import require

    check_endpoint("ENDPOINT", args.endpoint)
    if args.replay is not None:
        check_endpoint("--replay", args.replay)
    if args.count is not None and args.count <= 0:
        raise InvalidArgumentError(f"--count must be > 0, got {args.count}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise InvalidArgumentError(f"--timeout must be a number of seconds > 0, "
                                   f"got {args.timeout}")
    if args.from_seq is not None and not 0 <= args.from_seq < 1 << 63:
        raise InvalidArgumentError(f"--from must be a seq >= 0, got {args.from_seq}")
    try:
        topic = args.topic.encode()
    except UnicodeEncodeError:
        raise InvalidArgumentError(f"--topic {args.topic!r} is not valid UTF-8 text") from None
    zmq = require("zmq", "events", "kvbm events tail")
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    try:
        try:
            (sub.bind if args.bind else sub.connect)(args.endpoint)
        except zmq.ZMQError as e:
            raise InvalidArgumentError(f"cannot {'bind' if args.bind else 'connect to'} "
                                       f"{args.endpoint!r}: {e}") from None
        try:
            return _Tail(zmq, ctx, args, sys.stdout, sys.stderr, deadline).run(sub)
        except KeyboardInterrupt:
            return 130  # as a shell reports an interrupted command
    finally:
        sub.close()
        ctx.term()


def register(sub: Any) -> None:
    p = sub.add_parser("events", help="cache events on the wire (tail, bridge)",
                       description="Cache events in vLLM's wire format (ZMQ).")
    cmds = p.add_subparsers(dest="events_cmd", metavar="SUBCOMMAND", required=True,
                            parser_class=type(p))
    t = cmds.add_parser("tail", help="print the events of a publisher as they arrive",
                        description="Subscribe to ENDPOINT and print each event as it "
                                    "arrives; note sequence gaps on stderr and fill them from "
                                    "--replay when given.")
    t.add_argument("endpoint", metavar="ENDPOINT", help="the publisher's PUB endpoint, e.g. "
                                                        "tcp://127.0.0.1:5557")
    t.add_argument("--replay", metavar="ENDPOINT", help="the publisher's replay endpoint")
    t.add_argument("--topic", default="", help="topic prefix to subscribe to (default: all)")
    t.add_argument("--json", action="store_true", help="one JSON object per event")
    t.add_argument("--count", type=int, metavar="N", help="stop after N events")
    t.add_argument("--timeout", type=float, metavar="S",
                   help="stop after S seconds (status 1 if --count events did not all arrive)")
    t.add_argument("--from", dest="from_seq", type=int, metavar="SEQ",
                   help="print from batch SEQ on: the batches before the first one received "
                        "come from --replay")
    t.add_argument("--bind", action="store_true",
                   help="bind ENDPOINT (for a publisher that connects) instead of connecting")
    t.set_defaults(fn=_run)
    from kvbm.cli.events_bridge import register_bridge

    register_bridge(cmds)
