"""``kvbm hash``: print the block hashes of some tokens.

Input is checked here, before hashing: a bad token or option is one ``kvbm: error:`` line
and exit status 2 (kvbm.cli.main), never a traceback.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvbm.errors import InvalidArgumentError, TokenError

_MAX_TOKEN = (1 << 32) - 1


def _tokens(texts: list[str]) -> list[int]:
    out = []
    for i, text in enumerate(texts):
        # ASCII decimal digits only: int() would also read "1_000", "+5", " 5" and other
        # scripts' digits, and a token id written any of those ways is more likely a mistake.
        t = int(text) if text.isascii() and text.isdigit() else None
        if t is None or not 0 <= t <= _MAX_TOKEN:
            raise TokenError(f"token {i} is {text!r}; tokens must be integers in [0, 2**32)")
        out.append(t)
    return out


def _text(option: str, value: str | None) -> str | None:
    """``value`` if it can be hashed as UTF-8: bytes that are not UTF-8 on the command line
    reach Python as lone surrogates, which ``str.encode`` refuses."""
    if value is not None:
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidArgumentError(f"{option} {value!r} is not valid UTF-8 text") from None
    return value


def _run(args: argparse.Namespace) -> int:
    from kvbm.hashing import hash_blocks

    if args.block_size <= 0:
        raise InvalidArgumentError(f"--block-size must be > 0, got {args.block_size}")
    lora, salt = _text("--lora", args.lora), _text("--salt", args.salt)
    tokens = _tokens(args.tokens)
    h = hash_blocks(tokens, args.block_size, lora_name=lora, salt=salt)
    rest = len(tokens) - len(h) * args.block_size
    if args.json:
        print(json.dumps({
            "block_size": args.block_size, "tokens": len(tokens), "unhashed_tokens": rest,
            "lora": lora, "salt": salt,
            "blocks": [{"local": loc, "sequence": seq}
                       for loc, seq in zip(h.local, h.sequence, strict=True)]}))
        return 0
    if not len(h):
        n = len(tokens)
        print(f"no full block: block_size {args.block_size}, {n} token{'s' if n > 1 else ''} "
              f"(the trailing partial block is never hashed)")
        return 0
    for i, (loc, seq) in enumerate(zip(h.local, h.sequence, strict=True)):
        print(f"block {i}: local {loc:#018x} sequence {seq:#018x}")
    if rest:
        print(f"{rest} trailing token{'s' if rest > 1 else ''} not hashed (a partial block)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("hash", help="print the block hashes of some tokens",
                       description="Block hashes of TOKENS (Dynamo-compatible chained xxh3): "
                                   "the local and sequence hash of each full block.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--block-size", type=int, default=16, help="tokens per block")
    p.add_argument("--lora", help="LoRA adapter name (changes the local-hash seed)")
    p.add_argument("--salt", help="namespace salt (changes the first block's seed)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("tokens", nargs="+", metavar="TOKEN", help="token ids, integers in [0, 2**32)")
    p.set_defaults(fn=_run)
