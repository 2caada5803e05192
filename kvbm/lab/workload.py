"""Synthetic request traces in Mooncake's public format.

One JSON object per line: ``{"timestamp": ms, "input_length": tokens, "output_length":
tokens, "hash_ids": [int, ...]}``. Each hash id names one block of ``--block-size-tokens``
prompt tokens *with its whole prefix* (two requests share an id only if they share every
token up to the end of that block), ids numbered in order of first appearance, exactly as
in Mooncake's published traces. The last, partial block of a prompt gets an id too.

The workload is a stream of *sessions* arriving as a Poisson process:

* every session starts with one of a few shared system prompts (Zipf popularity) and,
  optionally, one of many shared documents (Zipf popularity: RAG, a code base, a manual);
* a session is either a single request (one-shot) or a multi-turn conversation: each turn
  resends the whole history (system prompt, document, every earlier user message and
  model reply) plus a new user message, after the reply was generated and the user
  thought (log-normal think time). Long conversations stop at ``max_context`` tokens;
* message, reply, prompt and document lengths are log-normal (heavy tailed); the number
  of turns is geometric with a heavy-tailed mixture of long conversations.

Families are parameter sets describing different services, so a policy tuned on one can be
validated on the others: ``chat`` (assistant traffic: tuning), ``agent`` (tool-using agents:
long tool definitions, many quick turns), ``rag`` (one-shot questions over a shared, skewed
document set) and ``code`` (coding assistant: large shared repository context, medium
conversations, short completions). At the defaults 12,000 ``chat`` requests hold about
180,000 distinct 512-token blocks, the size of Mooncake's conversation trace.

``generate(...)`` returns the records (``bench/make_trace.py`` writes them to a file,
``kvbm demo`` and the tests use them directly).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Family:
    """Parameters of one workload family. Token lengths are log-normal: a median and the
    sigma of the underlying normal (1.0 means the 90th percentile is ~3.6x the median)."""

    name: str
    #: Requests per second, on average, over the whole trace.
    rate: float = 3.3
    system_prompts: int = 24
    system_zipf: float = 1.1
    system_tokens: tuple[float, float] = (1500.0, 0.9)
    #: Fraction of sessions that carry a shared document after the system prompt.
    doc_fraction: float = 0.15
    documents: int = 400
    doc_zipf: float = 0.9
    doc_tokens: tuple[float, float] = (6000.0, 0.8)
    #: Fraction of sessions that are a single request.
    single_shot: float = 0.55
    #: Single-shot prompts carry their own (unshared) context of this length.
    single_tokens: tuple[float, float] = (5000.0, 1.1)
    #: Conversations: mean number of turns (geometric), and the fraction of conversations
    #: drawn from a long-tailed mode with ``long_turns`` mean turns.
    turns: float = 2.5
    long_fraction: float = 0.05
    long_turns: float = 10.0
    user_tokens: tuple[float, float] = (2600.0, 1.2)
    output_tokens: tuple[float, float] = (350.0, 0.9)
    think_seconds: tuple[float, float] = (45.0, 1.0)
    #: Decode speed used to place the next turn after the reply (seconds per output token).
    decode_seconds_per_token: float = 0.02
    max_context: int = 131072


FAMILIES: dict[str, Family] = {
    f.name: f for f in (
        Family("chat"),
        Family(
            "agent", rate=4.0, system_prompts=6, system_zipf=0.8, system_tokens=(7000.0, 0.4),
            doc_fraction=0.3, documents=60, doc_zipf=1.2, doc_tokens=(9000.0, 0.6),
            single_shot=0.2, single_tokens=(2500.0, 1.0), turns=8.0, long_fraction=0.2,
            long_turns=30.0, user_tokens=(700.0, 1.4), output_tokens=(220.0, 0.8),
            think_seconds=(4.0, 1.2)),
        Family(
            "rag", rate=3.0, system_prompts=8, system_zipf=1.3, system_tokens=(900.0, 0.6),
            doc_fraction=0.85, documents=3000, doc_zipf=1.05, doc_tokens=(7000.0, 0.7),
            single_shot=0.75, single_tokens=(600.0, 1.0), turns=2.5, long_fraction=0.05,
            long_turns=8.0, user_tokens=(500.0, 1.0), output_tokens=(300.0, 0.7),
            think_seconds=(90.0, 1.1)),
        Family(
            "code", rate=3.5, system_prompts=12, system_zipf=1.0, system_tokens=(3000.0, 0.5),
            doc_fraction=0.6, documents=200, doc_zipf=1.2, doc_tokens=(12000.0, 0.9),
            single_shot=0.35, single_tokens=(1500.0, 1.2), turns=5.0, long_fraction=0.1,
            long_turns=20.0, user_tokens=(900.0, 1.3), output_tokens=(500.0, 1.0),
            think_seconds=(20.0, 1.2), max_context=65536),
    )
}


def _lognormal(rng: np.random.Generator, spec: tuple[float, float], size: int | None = None
               ) -> Any:
    median, sigma = spec
    out = rng.lognormal(np.log(median), sigma, size)
    return np.maximum(1, np.rint(out)).astype(np.int64)


def _zipf_weights(n: int, s: float) -> np.ndarray:
    w: np.ndarray = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    out: np.ndarray = w / w.sum()
    return out


@dataclass
class _Session:
    start: float
    prefix: list[tuple[int, int]]   # shared segments: (segment id, length)
    turns: list[tuple[int, int, float]]   # (user tokens, output tokens, think seconds)


def _sessions(fam: Family, rng: np.random.Generator, requests: int) -> list[_Session]:
    """Draw sessions until the ones started so far cover ``requests`` requests in time."""
    sys_w = _zipf_weights(fam.system_prompts, fam.system_zipf)
    doc_w = _zipf_weights(fam.documents, fam.doc_zipf)
    # Shuffle which document is popular, so that popularity and id order are unrelated.
    doc_w = doc_w[rng.permutation(fam.documents)]
    sys_len = _lognormal(rng, fam.system_tokens, fam.system_prompts)
    doc_len = _lognormal(rng, fam.doc_tokens, fam.documents)
    mean_turns = (fam.single_shot + (1 - fam.single_shot)
                  * ((1 - fam.long_fraction) * fam.turns + fam.long_fraction * fam.long_turns))
    session_rate = fam.rate / mean_turns
    sessions: list[_Session] = []
    times: list[float] = []
    t = 0.0
    while True:
        t += rng.exponential(1.0 / session_rate)
        s = int(rng.choice(fam.system_prompts, p=sys_w))
        prefix = [(s, int(sys_len[s]))]
        if rng.random() < fam.doc_fraction:
            d = int(rng.choice(fam.documents, p=doc_w))
            prefix.append((fam.system_prompts + d, int(doc_len[d])))
        if rng.random() < fam.single_shot:
            turns = [(int(_lognormal(rng, fam.single_tokens)), int(_lognormal(
                rng, fam.output_tokens)), 0.0)]
        else:
            mean = fam.long_turns if rng.random() < fam.long_fraction else fam.turns
            n = int(rng.geometric(1.0 / mean))
            users = _lognormal(rng, fam.user_tokens, n)
            outs = _lognormal(rng, fam.output_tokens, n)
            thinks = _lognormal(rng, fam.think_seconds, n)
            turns = [(int(u), int(o), float(th)) for u, o, th in zip(users, outs, thinks,
                                                                       strict=True)]
        # Turn times, and the cut at max_context (generate() replays the same rule).
        length = sum(n for _, n in prefix)
        when = t
        for k, (user, output, think) in enumerate(turns):
            times.append(when)
            length += user + output
            if length >= fam.max_context:
                turns = turns[: k + 1]
                break
            when += output * fam.decode_seconds_per_token + think
        sessions.append(_Session(t, prefix, turns))
        # Enough once the requests issued before ``t`` reach the target: sessions started
        # later cannot add any before ``t``.
        if len(sessions) % 64 == 0 and int(np.count_nonzero(np.asarray(times) <= t)) >= requests:
            return sessions


def _block_ids(segments: Sequence[tuple[int, int]], block: int, ids: dict[Any, int]
               ) -> list[int]:
    """Hash ids of the blocks of a prompt made of ``segments`` (prefix semantics)."""
    out: list[int] = []
    parent = -1
    pieces: list[tuple[int, int, int]] = []
    room = block
    for seg, length in segments:
        off = 0
        while off < length:
            take = min(room, length - off)
            pieces.append((seg, off, off + take))
            off += take
            room -= take
            if room == 0:
                key = (parent, tuple(pieces))
                parent = ids.setdefault(key, len(ids))
                out.append(parent)
                pieces = []
                room = block
    if pieces:
        key = (parent, tuple(pieces))
        out.append(ids.setdefault(key, len(ids)))
    return out


def generate(requests: int = 12000, *, seed: int = 0, family: str | Family = "chat",
             block_size_tokens: int = 512, sessions: bool = False, **overrides: Any
             ) -> list[dict[str, Any]]:
    """Records of a synthetic trace, in timestamp order.

    ``family`` names one of :data:`FAMILIES` (or is a :class:`Family`); ``overrides``
    replace its fields (``single_shot=0.8``, ``system_zipf=1.4`` ...). With ``sessions``,
    each record also says what no cache can see in a real trace: ``"session"`` (its index),
    ``"turn"`` (0 for the first request of the session) and ``"turns"`` (how many requests
    the session makes, 1 for a one-shot; some may fall after the end of the trace). The
    hash ids are the same either way.
    """
    fam = FAMILIES[family] if isinstance(family, str) else family
    if overrides:
        fam = dataclasses.replace(fam, **overrides)
    if requests <= 0:
        return []
    rng = np.random.default_rng(seed)
    drawn = _sessions(fam, rng, requests)
    # Unshared segments get ids after every shared one.
    next_seg = fam.system_prompts + fam.documents
    heap: list[tuple[float, int, int]] = []   # (time, session, turn)
    contexts: list[list[tuple[int, int]]] = []
    for i, ses in enumerate(drawn):
        contexts.append(list(ses.prefix))
        heapq.heappush(heap, (ses.start, i, 0))
    ids: dict[Any, int] = {}
    out: list[dict[str, Any]] = []
    while heap and len(out) < requests:
        t, i, k = heapq.heappop(heap)
        ses = drawn[i]
        user, output, think = ses.turns[k]
        ctx = contexts[i]
        ctx.append((next_seg, user))
        next_seg += 1
        length = sum(n for _, n in ctx)
        rec: dict[str, Any] = {"timestamp": int(t * 1000), "input_length": length,
                               "output_length": output,
                               "hash_ids": _block_ids(ctx, block_size_tokens, ids)}
        if sessions:
            rec.update(session=i, turn=k, turns=len(ses.turns))
        out.append(rec)
        ctx.append((next_seg, output))
        next_seg += 1
        if k + 1 < len(ses.turns) and length + output < fam.max_context:
            nxt = t + output * fam.decode_seconds_per_token + think
            heapq.heappush(heap, (nxt, i, k + 1))
        else:
            contexts[i] = []   # the session is over; free its history
    return out


def summarize(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Request count, block references, distinct blocks and the infinite-cache hit ratio."""
    n = refs = 0
    seen: set[int] = set()
    hits = 0
    for r in records:
        n += 1
        ids = r["hash_ids"]
        refs += len(ids)
        for j, h in enumerate(ids):
            if h not in seen:
                # Prefix semantics: the rest of the request is new too.
                seen.update(ids[j:])
                break
            hits += 1
    return {"requests": n, "block_refs": refs, "distinct_blocks": len(seen),
            "infinite_cache_hit_ratio": hits / refs if refs else 0.0}


def write(records: Iterable[dict[str, Any]], fp: Any) -> None:
    for r in records:
        fp.write(json.dumps(r, separators=(",", ":")))
        fp.write("\n")
