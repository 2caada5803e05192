"""The ZMQ frames of cache events, as vLLM 0.32 lays them out (DESIGN.md §5).

PUB: ``[topic, seq (8-byte big-endian), payload]``. Replay: a DEALER sends ``[b"", start]``
(the ROUTER sees ``[identity, b"", start]``); each buffered batch comes back as
``[b"", topic, seq, payload]`` (older vLLM: ``[b"", seq, payload]``, also accepted), then the
end marker, seq -1 with an empty payload. Re-exported by :mod:`kvbm.events.wire`.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvbm.errors import EventDecodeError, InvalidArgumentError

__all__ = [
    "END_SEQ", "encode_frames", "encode_replay_end", "encode_replay_reply", "parse_frames",
    "parse_replay_reply", "parse_replay_request", "replay_request",
]

_U64 = 1 << 64
#: The seq of the replay end marker (8 bytes of 0xFF: -1 signed, as vLLM writes it).
END_SEQ = -1
_END_SEQ_BYTES = b"\xff" * 8


def _seq_bytes(seq: object, what: str) -> bytes:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < _U64:
        raise InvalidArgumentError(f"{what} must be an int in [0, 2**64), got {seq!r}")
    return seq.to_bytes(8, "big")


def _frame(b: object, what: str) -> bytes:
    if isinstance(b, bytes):
        return b
    if isinstance(b, bytearray | memoryview):
        return bytes(b)
    raise EventDecodeError(f"{what} must be bytes, got {type(b).__name__}")


def _seq(b: bytes, what: str) -> int:
    if len(b) != 8:
        raise EventDecodeError(f"{what} must be 8 bytes, got {len(b)}")
    return int.from_bytes(b, "big")


def encode_frames(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """The PUB frames of one batch: ``[topic, seq as 8-byte big-endian, payload]``."""
    if not isinstance(topic, bytes) or not isinstance(payload, bytes):
        raise InvalidArgumentError("topic and payload must be bytes")
    return [topic, _seq_bytes(seq, "seq"), payload]


def parse_frames(frames: Sequence[bytes]) -> tuple[bytes, int, bytes]:
    """``(topic, seq, payload)`` of a PUB message, or :class:`~kvbm.errors.EventDecodeError`."""
    if not isinstance(frames, list | tuple) or len(frames) != 3:
        n = len(frames) if isinstance(frames, list | tuple) else type(frames).__name__
        raise EventDecodeError(f"an event message has 3 frames [topic, seq, payload], got {n}")
    topic, seq, payload = (_frame(f, "frame") for f in frames)
    return topic, _seq(seq, "seq frame"), payload


def replay_request(start_seq: int) -> list[bytes]:
    """What a DEALER sends to a replay socket to get every buffered batch from ``start_seq``."""
    return [b"", _seq_bytes(start_seq, "start_seq")]


def parse_replay_request(frames: Sequence[bytes]) -> tuple[bytes, int]:
    """``(client identity, start_seq)`` of a request as a ROUTER receives it
    (``[identity, b"", start BE8]``), or :class:`~kvbm.errors.EventDecodeError`."""
    if not isinstance(frames, list | tuple) or len(frames) != 3:
        raise EventDecodeError("a replay request has 3 frames [identity, b'', start_seq]")
    ident, empty, start = (_frame(f, "frame") for f in frames)
    if empty:
        raise EventDecodeError("a replay request's delimiter frame must be empty")
    return ident, _seq(start, "start_seq frame")


def encode_replay_reply(topic: bytes, seq: int, payload: bytes) -> list[bytes]:
    """One replayed batch as vLLM 0.32 sends it after the client identity:
    ``[b"", topic, seq, payload]``."""
    return [b"", *encode_frames(topic, seq, payload)]


def encode_replay_end() -> list[bytes]:
    """The end marker of a replay, as vLLM 0.32 sends it: ``[b"", b"", seq -1, b""]``."""
    return [b"", b"", _END_SEQ_BYTES, b""]


def parse_replay_reply(frames: Sequence[bytes]) -> tuple[int, bytes | None]:
    """``(seq, payload)`` of a replay reply as a DEALER receives it, or ``(-1, None)`` for the
    end marker. Accepts vLLM 0.32's ``[b"", topic, seq, payload]`` and the older
    ``[b"", seq, payload]``."""
    if not isinstance(frames, list | tuple) or len(frames) not in (3, 4):
        raise EventDecodeError("a replay reply has 3 or 4 frames ([b'', (topic,) seq, payload])")
    parts = [_frame(f, "frame") for f in frames]
    if parts[0]:
        raise EventDecodeError("a replay reply's delimiter frame must be empty")
    seq_b, payload = parts[-2], parts[-1]
    if len(seq_b) != 8:
        raise EventDecodeError(f"seq frame must be 8 bytes, got {len(seq_b)}")
    if seq_b == _END_SEQ_BYTES:
        return END_SEQ, None
    return int.from_bytes(seq_b, "big"), payload
