"""The event wire codec against vLLM 0.32's own msgspec structs and its real ZMQ publisher."""

from __future__ import annotations

import math
import threading
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.errors import EventDecodeError, InvalidArgumentError, InvalidKeyError, KvbmError
from kvbm.events import AllBlocksCleared, AllMediaCleared, BlockRemoved, BlockStored
from kvbm.events.wire import (
    END_SEQ,
    EventBatch,
    decode_batch,
    encode_batch,
    encode_frames,
    encode_replay_end,
    encode_replay_reply,
    parse_frames,
    parse_replay_reply,
    parse_replay_request,
    replay_request,
)
from kvbm.medium import Medium

U64_MAX = 2**64 - 1


@pytest.fixture(scope="module")
def vkv() -> Any:
    """vLLM's kv_events module (it imports torch: once per module)."""
    return pytest.importorskip("vllm.distributed.kv_events")


def _sample_events() -> list[Any]:
    toks = list(range(100, 132))
    return [
        BlockStored([1, U64_MAX], None, toks, 16, Medium.GPU),
        BlockStored([7], U64_MAX, toks[:16], 16, Medium.CPU_PINNED, lora_name="ad",
                    lora_id=3, extra_keys=[["ad", ["mm1", 0]]], group_idx=1,
                    kv_cache_spec_kind="full", kv_cache_spec_sliding_window=128,
                    locality="LOCAL", ownership="kvbm", session_id="s1"),
        BlockRemoved([1, 2**63], Medium.DISK),
        BlockRemoved([9], Medium.OBJECT, group_idx=0, locality="REMOTE", ownership="o"),
        AllBlocksCleared(),
    ]


def _to_vllm(vkv: Any, e: Any) -> Any:
    if isinstance(e, BlockStored):
        return vkv.BlockStored(
            block_hashes=e.block_hashes, parent_block_hash=e.parent_block_hash,
            token_ids=e.token_ids, block_size=e.block_size, lora_id=e.lora_id,
            medium=e.medium.value, lora_name=e.lora_name,
            extra_keys=None if e.extra_keys is None else [tuple(k) for k in e.extra_keys],
            group_idx=e.group_idx, kv_cache_spec_kind=e.kv_cache_spec_kind,
            kv_cache_spec_sliding_window=e.kv_cache_spec_sliding_window, locality=e.locality,
            ownership=e.ownership, session_id=e.session_id)
    if isinstance(e, BlockRemoved):
        return vkv.BlockRemoved(block_hashes=e.block_hashes, medium=e.medium.value,
                                group_idx=e.group_idx, locality=e.locality,
                                ownership=e.ownership)
    return vkv.AllBlocksCleared()


@pytest.mark.parametrize("rank", [0, 3, None])
def test_bytes_equal_vllm_encoder(vkv: Any, rank: int | None) -> None:
    import msgspec

    events = _sample_events()
    ours = encode_batch(EventBatch(1234.5, events, rank))
    theirs = msgspec.msgpack.Encoder().encode(
        vkv.KVEventBatch(ts=1234.5, events=[_to_vllm(vkv, e) for e in events],
                         data_parallel_rank=rank))
    assert ours == theirs


def test_vllm_decoder_reads_ours_and_we_read_theirs(vkv: Any) -> None:
    import msgspec

    events = _sample_events()
    got = msgspec.msgpack.Decoder(type=vkv.KVEventBatch).decode(
        encode_batch(EventBatch(2.0, events, 1)))
    assert got.ts == 2.0 and got.data_parallel_rank == 1
    assert [type(e).__name__ for e in got.events] == [type(e).__name__ for e in events]
    assert got.events[1].extra_keys == [("ad", ["mm1", 0])]
    assert got.events[1].session_id == "s1" and got.events[3].locality == "REMOTE"
    assert got.events[2].medium == "DISK"

    payload = msgspec.msgpack.Encoder().encode(
        vkv.KVEventBatch(ts=3.0, events=[_to_vllm(vkv, e) for e in events],
                         data_parallel_rank=0))
    back = decode_batch(payload, strict=True)
    assert back == EventBatch(3.0, events, 0)


def test_every_medium_clear_round_trips_and_vllm_reads_a_plain_clear(vkv: Any) -> None:
    """kvbm's clean slate (AllMediaCleared) keeps its meaning through kvbm's codec; vLLM's
    decoder ignores the extra key and reads its own AllBlocksCleared; vLLM's plain event
    stays a plain one (its GPU cache only)."""
    import msgspec

    payload = encode_batch(EventBatch(1.0, [AllMediaCleared(), AllBlocksCleared()], None))
    back = decode_batch(payload, strict=True).events
    assert [type(e) for e in back] == [AllMediaCleared, AllBlocksCleared]
    got = msgspec.msgpack.Decoder(type=vkv.KVEventBatch).decode(payload)
    assert [type(e).__name__ for e in got.events] == ["AllBlocksCleared"] * 2
    theirs = msgspec.msgpack.Encoder().encode(
        vkv.KVEventBatch(ts=1.0, events=[vkv.AllBlocksCleared()], data_parallel_rank=None))
    assert type(decode_batch(theirs).events[0]) is AllBlocksCleared


def test_bytes_hashes_become_vllms_int_hashes(vkv: Any) -> None:
    import msgspec

    digest = bytes(range(32))
    payload = msgspec.msgpack.Encoder().encode(vkv.KVEventBatch(ts=1.0, events=[
        vkv.BlockStored(block_hashes=[digest], parent_block_hash=digest[::-1],
                        token_ids=[1] * 16, block_size=16, lora_id=None, medium="GPU",
                        lora_name=None),
        vkv.BlockRemoved(block_hashes=[digest], medium="CPU")]))
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    b = decode_batch(payload, strict=True)
    stored, removed = b.events
    assert isinstance(stored, BlockStored) and isinstance(removed, BlockRemoved)
    assert stored.block_hashes == [maybe_convert_block_hash(digest)]
    assert stored.parent_block_hash == maybe_convert_block_hash(digest[::-1])
    assert removed.block_hashes == stored.block_hashes
    assert removed.medium is Medium.CPU_PINNED


def test_vllm_placeholder_store_with_no_tokens(vkv: Any) -> None:
    """vLLM's offloading connector announces blocks with block_size 0 and no tokens."""
    import msgspec

    payload = msgspec.msgpack.Encoder().encode(vkv.KVEventBatch(ts=1.0, events=[
        vkv.BlockStored(block_hashes=[5], parent_block_hash=None, token_ids=[], block_size=0,
                        lora_id=None, medium=vkv.MEDIUM_STORAGE, lora_name=None,
                        group_idx=0)], data_parallel_rank=0))
    (e,) = decode_batch(payload, strict=True).events
    assert isinstance(e, BlockStored)
    assert e.block_size == 0 and e.token_ids == [] and e.medium is Medium.DISK


def test_positional_events_of_older_publishers() -> None:
    toks = list(range(16))
    payload = msgpack.packb([5.0, [
        ["BlockStored", [1, 2], None, toks + toks, 16, None],  # before `medium` existed
        ["BlockStored", [3], 2, toks, 16, 7, "cpu", "lora-a"],
        ["BlockStored", [4], 3, toks, 16, None, "OBJECT", None, None, 2, "full", None,
         "LOCAL", None, None, "future-field"],
        ["BlockRemoved", [1]],
        ["BlockRemoved", [3], "STORAGE", 1],
        ["AllBlocksCleared"],
    ], 2])
    b = decode_batch(payload, strict=True)
    assert b.data_parallel_rank == 2 and b.skipped == 0
    assert b.events == [
        BlockStored([1, 2], None, toks + toks, 16, Medium.GPU),
        BlockStored([3], 2, toks, 16, Medium.CPU_PINNED, lora_name="lora-a", lora_id=7),
        BlockStored([4], 3, toks, 16, Medium.OBJECT, group_idx=2, kv_cache_spec_kind="full",
                    locality="LOCAL"),
        BlockRemoved([1], Medium.GPU),
        BlockRemoved([3], Medium.DISK, group_idx=1),
        AllBlocksCleared(),
    ]


def test_two_element_batch_and_int_ts() -> None:
    b = decode_batch(msgpack.packb([7, [{"type": "AllBlocksCleared"}]]))
    assert b == EventBatch(7.0, [AllBlocksCleared()], None)


def test_map_events_ignore_unknown_keys_and_default_missing_optionals() -> None:
    payload = msgpack.packb([1.0, [
        {"type": "BlockStored", "block_hashes": [1], "token_ids": [1, 2], "block_size": 2,
         "new_key": {"x": 1}},
        {"type": "BlockRemoved", "block_hashes": [1], "medium": "gpu", "extra": None},
    ], 0])
    b = decode_batch(payload, strict=True)
    assert b.events == [BlockStored([1], None, [1, 2], 2, Medium.GPU),
                        BlockRemoved([1], Medium.GPU)]


_GOOD = {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU"}
_BAD_EVENTS: list[Any] = [
    {"type": "BlockRemoved", "block_hashes": [-1], "medium": "GPU"},
    {"type": "BlockRemoved", "block_hashes": [True], "medium": "GPU"},
    {"type": "BlockRemoved", "block_hashes": ["1"], "medium": "GPU"},
    {"type": "BlockRemoved", "block_hashes": [1.0], "medium": "GPU"},
    {"type": "BlockRemoved", "block_hashes": [b""], "medium": "GPU"},
    {"type": "BlockRemoved", "block_hashes": 1, "medium": "GPU"},
    {"type": "BlockRemoved", "block_hashes": [1], "medium": "TAPE"},
    {"type": "BlockRemoved", "block_hashes": [1], "medium": 3},
    {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "group_idx": "0"},
    {"type": "BlockRemoved", "medium": "GPU"},
    {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": -5, "token_ids": [1],
     "block_size": 1},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [2**32], "block_size": 1},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [-1], "block_size": 1},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": ["a"], "block_size": 1},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": -1},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": True},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 1,
     "lora_name": 5},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 1,
     "extra_keys": [5]},
    {"type": "BlockStored", "block_hashes": [1], "token_ids": [1]},
    {"type": "Nope"},
    {"block_hashes": [1]},
    ["BlockStored", [1], None, [1]],
    ["Unknown", 1, 2],
    [],
    [[1]],
    "BlockRemoved",
    17,
    None,
]


@pytest.mark.parametrize("bad", _BAD_EVENTS, ids=range(len(_BAD_EVENTS)))
def test_bad_event_skipped_and_counted_or_raised(bad: Any) -> None:
    payload = msgpack.packb([1.0, [_GOOD, bad, _GOOD], 0])
    b = decode_batch(payload)
    assert b.events == [BlockRemoved([1], Medium.GPU)] * 2
    assert b.skipped == 1 and len(b.skip_reasons) == 1
    with pytest.raises(EventDecodeError):
        decode_batch(payload, strict=True)


def test_skip_reasons_are_capped_but_count_is_exact() -> None:
    b = decode_batch(msgpack.packb([1.0, [{"type": "X"}] * 100, 0]))
    assert b.skipped == 100 and b.events == [] and 0 < len(b.skip_reasons) <= 8


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", b"\x93", msgpack.packb({"ts": 1}), msgpack.packb([1.0]),
    msgpack.packb([1.0, [], 0, 0]), msgpack.packb(["x", [], 0]),
    msgpack.packb([math.nan, [], 0]), msgpack.packb([math.inf, [], 0]),
    msgpack.packb([True, [], 0]), msgpack.packb([1.0, {}, 0]), msgpack.packb([1.0, [], -1]),
    msgpack.packb([1.0, [], True]), msgpack.packb([1.0, [], "0"]),
    msgpack.packb([1.0, []]) + b"\x00",  # trailing bytes
    b"\x91" * 10_000,  # nesting deeper than msgpack's stack
    b"\xdd\xff\xff\xff\xff",  # an array header claiming 4 G elements
])
def test_garbage_payload_raises_decode_error(payload: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(payload)


@pytest.mark.parametrize("payload", [None, "text", 5, [b"x"]])
def test_payload_of_wrong_type(payload: Any) -> None:
    with pytest.raises(EventDecodeError):
        decode_batch(payload)


def _check_decode_never_escapes(payload: bytes) -> None:
    try:
        b = decode_batch(payload)
    except KvbmError as e:
        assert isinstance(e, EventDecodeError)
        return
    assert isinstance(b, EventBatch)
    # what was decoded encodes again (a router forwarding it to NATS relies on this)
    assert decode_batch(encode_batch(b), strict=True).events == b.events


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape(payload: bytes) -> None:
    _check_decode_never_escapes(payload)


_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
         | st.text(max_size=12) | st.binary(max_size=12)
         | st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "type", "GPU"]))
_docs = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=6)
                     | st.dictionaries(st.text(max_size=8) | st.sampled_from(
                         ["type", "block_hashes", "token_ids", "block_size", "medium"]),
                         kids, max_size=6), max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(st.floats(), _docs, _docs)
def test_structured_garbage_never_escapes(ts: float, events: Any, rank: Any) -> None:
    _check_decode_never_escapes(msgpack.packb([ts, events, rank]))
    if isinstance(events, list):
        _check_decode_never_escapes(msgpack.packb([1.0, events, 0]))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_payload_never_escapes(data: st.DataObject) -> None:
    good = bytearray(encode_batch(EventBatch(1.0, _sample_events(), 0)))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(good) - 1))
        good[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(good)))
    _check_decode_never_escapes(bytes(good[:cut]))
    _check_decode_never_escapes(bytes(good))


def test_encode_validates_events() -> None:
    ok = BlockStored([1], None, [1], 1, Medium.GPU)
    with pytest.raises(InvalidKeyError):
        encode_batch(EventBatch(1.0, [BlockRemoved([2**64], Medium.GPU)]))
    with pytest.raises(InvalidKeyError):
        encode_batch(EventBatch(1.0, [BlockRemoved([-1], Medium.GPU)]))
    with pytest.raises(InvalidKeyError):
        encode_batch(EventBatch(1.0, [BlockRemoved([True], Medium.GPU)]))
    with pytest.raises(InvalidKeyError):
        encode_batch(EventBatch(1.0, [BlockStored([1], 2**64, [1], 1, Medium.GPU)]))
    with pytest.raises(InvalidArgumentError):
        encode_batch(EventBatch(1.0, [BlockStored([1], None, [2**32], 1, Medium.GPU)]))
    with pytest.raises(InvalidArgumentError):
        encode_batch(EventBatch(1.0, [BlockRemoved([1], "GPU")]))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        encode_batch(EventBatch(1.0, [ok, "event"]))  # type: ignore[list-item]
    with pytest.raises(InvalidArgumentError):
        encode_batch(EventBatch(1.0, [BlockStored([1], None, [1], 1, Medium.GPU,
                                                  extra_keys=[[object()]])]))
    with pytest.raises(InvalidArgumentError):
        encode_batch("batch")  # type: ignore[arg-type]
    for bad_ts in (math.nan, math.inf, "1", True):
        with pytest.raises(InvalidArgumentError):
            EventBatch(bad_ts, [])  # type: ignore[arg-type]
    for bad_rank in (-1, True, 1.0):
        with pytest.raises(InvalidArgumentError):
            EventBatch(1.0, [], bad_rank)  # type: ignore[arg-type]


def test_encode_accepts_numpy_ints() -> None:
    e = BlockStored(list(np.array([1, U64_MAX], dtype=np.uint64)), None,
                    list(np.arange(32, dtype=np.int64)), 16, Medium.GPU)
    back = decode_batch(encode_batch(EventBatch(1.0, [e])), strict=True).events
    assert back == [BlockStored([1, U64_MAX], None, list(range(32)), 16, Medium.GPU)]


# --- frames ----------------------------------------------------------------------------------

def test_frames_round_trip_and_errors() -> None:
    frames = encode_frames(b"kv", 2**40 + 3, b"payload")
    assert frames == [b"kv", (2**40 + 3).to_bytes(8, "big"), b"payload"]
    assert parse_frames(frames) == (b"kv", 2**40 + 3, b"payload")
    assert parse_frames([bytearray(b""), memoryview(bytes(8)), b""]) == (b"", 0, b"")
    for bad in ([b"kv", bytes(8)], [b"kv", bytes(8), b"", b""], [b"kv", bytes(7), b"p"],
                [b"kv", bytes(9), b"p"], [b"kv", 5, b"p"], b"abc", None):
        with pytest.raises(EventDecodeError):
            parse_frames(bad)  # type: ignore[arg-type]
    for seq in (-1, 2**64, True, 1.5):
        with pytest.raises(InvalidArgumentError):
            encode_frames(b"", seq, b"")  # type: ignore[arg-type]


def test_replay_shapes() -> None:
    assert replay_request(42) == [b"", (42).to_bytes(8, "big")]
    assert parse_replay_request([b"id", b"", (42).to_bytes(8, "big")]) == (b"id", 42)
    for bad in ([b"id", b"x", bytes(8)], [b"id", b"", bytes(4)], [b"", bytes(8)]):
        with pytest.raises(EventDecodeError):
            parse_replay_request(bad)
    with pytest.raises(InvalidArgumentError):
        replay_request(-1)
    # vLLM 0.32 (topic in the reply), the older shape without it, and the end marker in both
    assert parse_replay_reply(encode_replay_reply(b"t", 7, b"p")) == (7, b"p")
    assert parse_replay_reply([b"", (7).to_bytes(8, "big"), b"p"]) == (7, b"p")
    assert parse_replay_reply(encode_replay_end()) == (END_SEQ, None)
    assert parse_replay_reply([b"", (-1).to_bytes(8, "big", signed=True), b""]) == (-1, None)
    for bad in ([b"", b"p"], [b"x", bytes(8), b"p"], [b"", b"t", bytes(3), b"p"],
                [b"", b"t", bytes(8), b"p", b""], "frames"):
        with pytest.raises(EventDecodeError):
            parse_replay_reply(bad)  # type: ignore[arg-type]


def test_against_vllms_real_zmq_publisher(vkv: Any) -> None:
    """vLLM's own ZmqEventPublisher: its PUB frames and its replay replies parse and decode."""
    import zmq

    from kvbm.testing.servers import free_port

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 10_000)
    sub_port = sub.bind_to_random_port("tcp://127.0.0.1")
    replay_port = free_port()
    # a non-wildcard tcp endpoint makes vLLM's PUB connect (to our bound SUB)
    pub = vkv.ZmqEventPublisher(0, endpoint=f"tcp://127.0.0.1:{sub_port}",
                                replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
                                topic="kv")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 10_000)
    try:
        events = _sample_events()
        # PUB drops what it sends before the connection is up: publish until one arrives
        got: list[tuple[bytes, int, bytes]] = []
        stop = threading.Event()

        def pump() -> None:
            while not stop.wait(0.05):
                pub.publish(vkv.KVEventBatch(ts=1.0, events=[_to_vllm(vkv, e) for e in events]))

        t = threading.Thread(target=pump)
        t.start()
        try:
            got.append(parse_frames(sub.recv_multipart()))
            got.append(parse_frames(sub.recv_multipart()))
        finally:
            stop.set()
            t.join()
        (topic, seq, payload), (_, seq2, _) = got
        assert topic == b"kv" and seq2 == seq + 1
        assert decode_batch(payload, strict=True) == EventBatch(1.0, events, 0)

        dealer.connect(f"tcp://127.0.0.1:{replay_port}")
        dealer.send_multipart(replay_request(seq))
        replies = []
        while True:
            rseq, rpayload = parse_replay_reply(dealer.recv_multipart())
            if rpayload is None:
                break
            replies.append(rseq)
            assert decode_batch(rpayload, strict=True).events == events
        assert replies[:2] == [seq, seq + 1] and replies == list(range(seq, seq + len(replies)))
    finally:
        dealer.close(linger=0)
        pub.shutdown()
        sub.close(linger=0)
