"""The cache-event wire format: vLLM 0.32's KV events, byte for byte (DESIGN.md §5).

A batch is the msgpack array ``[ts, events, data_parallel_rank]``; each event is a map tagged
``"type"`` whose keys are vLLM's field names in vLLM's order, optional fields omitted when
unset (what vLLM's msgspec encoder writes). It travels on ZMQ PUB as the frames
``[topic, seq (8-byte big-endian), payload]``; a replay socket (ROUTER) answers a DEALER's
``[b"", start_seq]`` with the buffered batches and an end marker (seq -1, empty payload).
The frame helpers live in :mod:`kvbm.events.frames` and are re-exported here.

Decoding is lenient where the senders differ and strict where bytes are garbage:

- events as maps (vLLM) or as positional arrays ``["BlockStored", hashes, parent, ...]``
  (older publishers, Dynamo), unknown keys ignored, trailing optional fields optional;
- hashes as u64 ints, or as bytes (vLLM with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`` sends
  sha256 digests): bytes become their low 64 bits read big-endian, exactly the int vLLM
  itself would have sent;
- ``medium``: kvbm's names (``GPU``, ``CPU_PINNED``, ``DISK``, ``OBJECT``), case-insensitive;
  ``None`` (older vLLM) is ``GPU``; vLLM's offloading connectors' ``"CPU"`` is host memory
  (``CPU_PINNED``) and their ``"STORAGE"`` is local disk (``DISK``);
- an event that breaks the format (unknown type, a hash outside ``[0, 2**64)``, a field of the
  wrong type, an unknown medium) is skipped and counted in :attr:`EventBatch.skipped`
  (``strict=True`` raises instead); a payload that is not a batch at all raises
  :class:`~kvbm.errors.EventDecodeError`. Nothing else ever escapes.

Token ids are checked as unsigned 32-bit ints in C (``array``); a msgpack ``true`` among them
reads as 1 (a per-token type check would cost more than the indexer's own work).
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Any

import msgpack

from kvbm.errors import EventDecodeError, InvalidArgumentError, InvalidKeyError
from kvbm.events.frames import (
    END_SEQ,
    encode_frames,
    encode_replay_end,
    encode_replay_reply,
    parse_frames,
    parse_replay_reply,
    parse_replay_request,
    replay_request,
)
from kvbm.events.records import (
    AllBlocksCleared,
    AllMediaCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
)
from kvbm.medium import Medium

__all__ = [
    "END_SEQ", "EventBatch", "check_event", "decode_batch", "encode_batch", "encode_frames",
    "encode_replay_end", "encode_replay_reply", "event_to_wire", "pack_batch", "parse_frames",
    "parse_replay_reply", "parse_replay_request", "replay_request",
]

_U64 = 1 << 64
#: At most this many skip reasons are kept per batch (the count is exact).
_MAX_REASONS = 8

#: Wire names of events' media, and the names other publishers use for the same tiers.
_MEDIA: dict[str, Medium] = {m.value: m for m in Medium}
_MEDIA.update({"CPU": Medium.CPU_PINNED, "STORAGE": Medium.DISK})

# Field order of vLLM 0.32's structs: the key order of the maps, and the positions of the
# array form (after the tag). Fields past _REQUIRED_* are optional in both forms.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                  "medium", "lora_name", "extra_keys", "group_idx", "kv_cache_spec_kind",
                  "kv_cache_spec_sliding_window", "locality", "ownership", "session_id")
_STORED_OPTIONAL = _STORED_FIELDS[7:]  # omitted from the wire when None
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx", "locality", "ownership")
_REMOVED_OPTIONAL = _REMOVED_FIELDS[2:]
_REQUIRED_STORED = 4  # block_hashes .. block_size (older vLLM had no medium, no lora_name)
_REQUIRED_REMOVED = 1


@dataclass(frozen=True, slots=True)
class EventBatch:
    """One published batch. ``skipped`` counts the events a lenient decode dropped, and
    ``skip_reasons`` says why (the first few); both are 0 / empty for a batch to encode."""

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None
    skipped: int = 0
    skip_reasons: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ts = self.ts
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise InvalidArgumentError(f"EventBatch.ts must be a finite number, got {ts!r}")
        if not isinstance(self.events, list):
            raise InvalidArgumentError(
                f"EventBatch.events must be a list, got {type(self.events).__name__}")
        rank = self.data_parallel_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)
                                 or not 0 <= rank < 1 << 31):
            raise InvalidArgumentError(
                f"EventBatch.data_parallel_rank must be None or an int >= 0, got {rank!r}")
        if isinstance(self.skipped, bool) or not isinstance(self.skipped, int) \
                or self.skipped < 0:
            raise InvalidArgumentError(f"EventBatch.skipped must be an int >= 0, "
                                       f"got {self.skipped!r}")


# --- encoding --------------------------------------------------------------------------------

def _u64_list(v: object, what: str) -> list[int]:
    """``v`` as a list of Python ints in ``[0, 2**64)`` (numpy ints accepted), or raise."""
    if not isinstance(v, list | tuple):
        raise InvalidArgumentError(f"{what} must be a list of ints, got {type(v).__name__}")
    if any(type(x) is bool for x in v):
        raise InvalidKeyError(f"{what} must be ints in [0, 2**64), got a bool")
    try:
        return array("Q", v).tolist()  # checks type and range in C
    except OverflowError:
        raise InvalidKeyError(f"{what}: a hash outside [0, 2**64)") from None
    except TypeError:
        raise InvalidKeyError(f"{what} must be ints in [0, 2**64)") from None


def _token_list(v: object, what: str) -> list[int]:
    if not isinstance(v, list | tuple):
        raise InvalidArgumentError(f"{what} must be a list of ints, got {type(v).__name__}")
    try:
        return array("I", v).tolist()
    except (OverflowError, TypeError):
        raise InvalidArgumentError(f"{what} must be ints in [0, 2**32)") from None


def _opt(v: object, tp: type, what: str) -> None:
    if v is not None and (type(v) is bool or not isinstance(v, tp)):
        raise InvalidArgumentError(f"{what} must be None or {tp.__name__}, got {v!r}")


def _wire_stored(e: BlockStored) -> dict[str, object]:
    parent = e.parent_block_hash
    if parent is not None:
        parent = _u64_list([parent], "BlockStored.parent_block_hash")[0]
    if isinstance(e.block_size, bool) or not isinstance(e.block_size, int) or e.block_size < 0:
        raise InvalidArgumentError(f"BlockStored.block_size must be an int >= 0, "
                                   f"got {e.block_size!r}")
    if not isinstance(e.medium, Medium):
        raise InvalidArgumentError(f"BlockStored.medium must be a Medium, got {e.medium!r}")
    _opt(e.lora_id, int, "BlockStored.lora_id")
    _opt(e.lora_name, str, "BlockStored.lora_name")
    _opt(e.extra_keys, list, "BlockStored.extra_keys")
    for name, tp in (("group_idx", int), ("kv_cache_spec_kind", str),
                     ("kv_cache_spec_sliding_window", int), ("locality", str),
                     ("ownership", str), ("session_id", str)):
        _opt(getattr(e, name), tp, f"BlockStored.{name}")
    out: dict[str, object] = {
        "type": "BlockStored",
        "block_hashes": _u64_list(e.block_hashes, "BlockStored.block_hashes"),
        "parent_block_hash": parent,
        "token_ids": _token_list(e.token_ids, "BlockStored.token_ids"),
        "block_size": e.block_size,
        "lora_id": e.lora_id,
        "medium": e.medium.value,
        "lora_name": e.lora_name,
    }
    for name in _STORED_OPTIONAL:
        value = getattr(e, name)
        if value is not None:
            out[name] = value
    return out


def _wire_removed(e: BlockRemoved) -> dict[str, object]:
    if not isinstance(e.medium, Medium):
        raise InvalidArgumentError(f"BlockRemoved.medium must be a Medium, got {e.medium!r}")
    _opt(e.group_idx, int, "BlockRemoved.group_idx")
    _opt(e.locality, str, "BlockRemoved.locality")
    _opt(e.ownership, str, "BlockRemoved.ownership")
    out: dict[str, object] = {
        "type": "BlockRemoved",
        "block_hashes": _u64_list(e.block_hashes, "BlockRemoved.block_hashes"),
        "medium": e.medium.value,
    }
    for name in _REMOVED_OPTIONAL:
        value = getattr(e, name)
        if value is not None:
            out[name] = value
    return out


#: The map key of kvbm's every-medium clear (:class:`AllMediaCleared`; vLLM's decoder
#: ignores a key it does not know and reads an ``AllBlocksCleared``).
_EVERY_MEDIUM = "every_medium"


def _wire_event(e: object) -> dict[str, object]:
    if isinstance(e, BlockStored):
        return _wire_stored(e)
    if isinstance(e, BlockRemoved):
        return _wire_removed(e)
    if isinstance(e, AllMediaCleared):
        return {"type": "AllBlocksCleared", _EVERY_MEDIUM: True}
    if isinstance(e, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise InvalidArgumentError(f"not a cache event (BlockStored, BlockRemoved, "
                               f"AllBlocksCleared): {type(e).__name__}")


def check_event(e: object) -> None:
    """Raise :class:`~kvbm.errors.InvalidArgumentError` (:class:`~kvbm.errors.InvalidKeyError`
    for hashes) unless ``e`` is an event :func:`encode_batch` can put on the wire."""
    event_to_wire(e)


def event_to_wire(e: object) -> dict[str, object]:
    """``e`` checked and as the map vLLM puts on the wire (plain ints, strings, lists): what
    a publisher queues, so that the check and the conversion happen once, on the caller's
    thread, and its own thread only packs. Raises as :func:`check_event`."""
    out = _wire_event(e)
    if isinstance(e, BlockStored) and e.extra_keys is not None:
        try:  # the one field of free-form values: refuse now what msgpack would refuse later
            msgpack.packb(e.extra_keys, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as err:
            raise InvalidArgumentError(f"BlockStored.extra_keys not encodable: {err}") from None
    return out


def pack_batch(ts: float, wire_events: list[dict[str, object]],
               data_parallel_rank: int | None) -> bytes:
    """The msgpack of a batch whose events :func:`event_to_wire` made (not checked again)."""
    out: bytes = msgpack.packb([float(ts), wire_events, data_parallel_rank], use_bin_type=True)
    return out


def encode_batch(batch: EventBatch) -> bytes:
    """``batch`` as vLLM 0.32's msgpack bytes (what its ``msgspec`` encoder writes)."""
    if not isinstance(batch, EventBatch):
        raise InvalidArgumentError(f"encode_batch needs an EventBatch, got {type(batch).__name__}")
    return pack_batch(batch.ts, [event_to_wire(e) for e in batch.events],
                      batch.data_parallel_rank)


# --- decoding --------------------------------------------------------------------------------

def _bad(msg: str) -> EventDecodeError:
    return EventDecodeError(msg)


def _hash(x: object, what: str) -> int:
    if type(x) is int:
        if 0 <= x < _U64:
            return x
        raise _bad(f"{what}: hash {x} outside [0, 2**64)")
    if isinstance(x, bytes) and x:
        # vLLM's own rule for int hashes: the low 64 bits of the digest, big-endian
        return int.from_bytes(x, "big") & (_U64 - 1)
    raise _bad(f"{what}: a hash must be a u64 int or non-empty bytes, got {type(x).__name__}")


def _hashes(v: object, what: str) -> list[int]:
    if type(v) is not list:
        raise _bad(f"{what} must be an array, got {type(v).__name__}")
    if set(map(type, v)) <= {int}:
        try:
            array("Q", v)  # the range check, in C
        except OverflowError:
            raise _bad(f"{what}: a hash outside [0, 2**64)") from None
        return v
    return [_hash(x, what) for x in v]


def _tokens(v: object, what: str) -> list[int]:
    if type(v) is not list:
        raise _bad(f"{what} must be an array, got {type(v).__name__}")
    try:
        array("I", v)
    except (OverflowError, TypeError):
        raise _bad(f"{what} must be ints in [0, 2**32)") from None
    return v


def _field(v: object, tp: type, what: str) -> Any:
    if v is None or (type(v) is not bool and isinstance(v, tp)):
        return v
    raise _bad(f"{what} must be null or {tp.__name__}, got {type(v).__name__}")


def _medium(v: object, what: str) -> Medium:
    if v is None:
        return Medium.GPU  # vLLM before `medium` existed: its own (device) cache
    if isinstance(v, str):
        m = _MEDIA.get(v.upper())
        if m is not None:
            return m
    raise _bad(f"{what}: unknown medium {v!r}")


def _fields(raw: list[Any] | dict[Any, Any], names: tuple[str, ...], required: int,
            kind: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        # a map may leave out any null field, parent_block_hash included
        missing = [n for n in names[:required] if n not in raw and n != "parent_block_hash"]
        if missing:
            raise _bad(f"{kind} lacks {missing}")
        return {n: raw.get(n) for n in names}
    if len(raw) - 1 < required:
        raise _bad(f"{kind} as an array needs at least {required} fields, got {len(raw) - 1}")
    values = raw[1:1 + len(names)]
    return dict(zip(names, values + [None] * (len(names) - len(values)), strict=True))


def _decode_event(raw: object) -> KVEvent:
    if isinstance(raw, dict):
        tag = raw.get("type")
    elif isinstance(raw, list) and raw:
        tag = raw[0]
    else:
        raise _bad(f"an event must be a map or a non-empty array, got {type(raw).__name__}")
    if tag == "BlockStored":
        f = _fields(raw, _STORED_FIELDS, _REQUIRED_STORED, tag)
        parent = f["parent_block_hash"]
        size = f["block_size"]
        if type(size) is not int or size < 0:
            raise _bad(f"BlockStored.block_size must be an int >= 0, got {size!r}")
        extra = _field(f["extra_keys"], list, "BlockStored.extra_keys")
        if extra is not None and any(k is not None and type(k) is not list for k in extra):
            raise _bad("BlockStored.extra_keys entries must be arrays or null")
        return BlockStored(
            block_hashes=_hashes(f["block_hashes"], "BlockStored.block_hashes"),
            parent_block_hash=(None if parent is None
                               else _hash(parent, "BlockStored.parent_block_hash")),
            token_ids=_tokens(f["token_ids"], "BlockStored.token_ids"),
            block_size=size,
            medium=_medium(f["medium"], "BlockStored.medium"),
            lora_name=_field(f["lora_name"], str, "BlockStored.lora_name"),
            lora_id=_field(f["lora_id"], int, "BlockStored.lora_id"),
            extra_keys=extra,
            group_idx=_field(f["group_idx"], int, "BlockStored.group_idx"),
            kv_cache_spec_kind=_field(f["kv_cache_spec_kind"], str,
                                      "BlockStored.kv_cache_spec_kind"),
            kv_cache_spec_sliding_window=_field(f["kv_cache_spec_sliding_window"], int,
                                                "BlockStored.kv_cache_spec_sliding_window"),
            locality=_field(f["locality"], str, "BlockStored.locality"),
            ownership=_field(f["ownership"], str, "BlockStored.ownership"),
            session_id=_field(f["session_id"], str, "BlockStored.session_id"))
    if tag == "BlockRemoved":
        f = _fields(raw, _REMOVED_FIELDS, _REQUIRED_REMOVED, tag)
        return BlockRemoved(
            block_hashes=_hashes(f["block_hashes"], "BlockRemoved.block_hashes"),
            medium=_medium(f["medium"], "BlockRemoved.medium"),
            group_idx=_field(f["group_idx"], int, "BlockRemoved.group_idx"),
            locality=_field(f["locality"], str, "BlockRemoved.locality"),
            ownership=_field(f["ownership"], str, "BlockRemoved.ownership"))
    if tag == "AllBlocksCleared":
        if isinstance(raw, dict) and raw.get(_EVERY_MEDIUM) is True:
            return AllMediaCleared()
        return AllBlocksCleared()
    shown = tag if isinstance(tag, str | int | None) else type(tag).__name__
    raise _bad(f"unknown event type {shown!r:.80}")


def decode_batch(payload: bytes, *, strict: bool = False) -> EventBatch:
    """Decode one batch's msgpack. Events that break the format are skipped and counted
    (``strict=True``: raise :class:`~kvbm.errors.EventDecodeError` instead); a payload that is
    not a batch raises :class:`~kvbm.errors.EventDecodeError`."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise EventDecodeError(f"payload must be bytes, got {type(payload).__name__}")
    try:
        # Lengths are capped by the payload's size (msgpack's default), nesting by its stack:
        # a hostile header cannot make it allocate more than the bytes it was given.
        obj = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises a zoo (ExtraData, FormatError, ValueError ...)
        raise EventDecodeError(f"not a msgpack document: {type(e).__name__}: {e}"[:200]) \
            from None
    if type(obj) is not list or len(obj) not in (2, 3):
        raise EventDecodeError("a batch must be the array [ts, events, data_parallel_rank]")
    ts, events = obj[0], obj[1]
    rank = obj[2] if len(obj) == 3 else None
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise EventDecodeError(f"batch ts must be a finite number, got {ts!r:.40}")
    if type(events) is not list:
        raise EventDecodeError(f"batch events must be an array, got {type(events).__name__}")
    if rank is not None and (type(rank) is not int or not 0 <= rank < 1 << 31):
        raise EventDecodeError(f"batch data_parallel_rank must be null or an int >= 0, "
                               f"got {rank!r:.40}")
    out: list[KVEvent] = []
    reasons: list[str] = []
    skipped = 0
    for raw in events:
        try:
            out.append(_decode_event(raw))
        except EventDecodeError as e:
            if strict:
                raise
            skipped += 1
            if len(reasons) < _MAX_REASONS:
                reasons.append(str(e))
    return EventBatch(float(ts), out, rank, skipped, tuple(reasons))
