"""KV layout: the shape of one block's keys and values, and how pages are arranged."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import xxhash

from kvbm.errors import LayoutError

# dtype name -> bytes per element. Names are torch's; torch itself is imported lazily.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "uint8": 1,
    "int8": 1,
}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
                  "fp8": "float8_e4m3fn", "float": "float32"}


class Arrangement(enum.Enum):
    """How the pages of one pool are laid out in memory."""

    #: one buffer ``[num_blocks, num_layers, kv_planes, block_size, heads, head_dim]``; a
    #: block is one contiguous page (what host, disk and network tiers want).
    FULLY_CONTIGUOUS = "fully_contiguous"
    #: one buffer per layer ``[num_blocks, kv_planes, block_size, heads, head_dim]`` (vLLM's way).
    LAYER_SEPARATE = "layer_separate"


class KVKind(enum.Enum):
    """What the attention layers keep per token."""

    #: separate keys and values: two planes per layer, ``num_kv_heads`` heads of ``head_dim``.
    MHA = "mha"
    #: multi-head latent attention (DeepSeek-V2/V3/R1): one latent vector per token and layer,
    #: ``kv_lora_rank + rope_dim`` wide, identical on every tensor-parallel rank. One plane,
    #: ``num_kv_heads`` is 1 and ``head_dim`` is the latent width.
    MLA = "mla"

    @property
    def planes(self) -> int:
        """KV planes per layer: 2 (K and V) for MHA, 1 (the latent) for MLA."""
        return 2 if self is KVKind.MHA else 1


def normalize_dtype(dtype: Any) -> str:
    """Accept ``"bfloat16"``, ``"bf16"`` or a ``torch.dtype``; return the canonical name."""
    name = str(dtype).removeprefix("torch.")
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPE_SIZES:
        raise LayoutError(f"unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_SIZES)}")
    return name


#: Largest value of one dimension: far beyond any model, and within what the fingerprint
#: encoding and the tiers' page headers take.
MAX_DIMENSION = (1 << 31) - 1


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise LayoutError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not 0 < value <= MAX_DIMENSION:
        raise LayoutError(f"{name} must be in [1, {MAX_DIMENSION}], got {value}")
    return value


@dataclass(frozen=True)
class KVLayout:
    """Shape of the KV of one block:
    ``num_layers x kv_planes x block_size x num_kv_heads x head_dim``.

    ``kind`` says what a plane is: :attr:`KVKind.MHA` (the default) keeps K and V, two planes;
    :attr:`KVKind.MLA` keeps one latent vector per token, one plane, with ``num_kv_heads`` 1
    and ``head_dim`` the latent width (``kv_lora_rank + rope_dim``, 576 for DeepSeek-V3).
    ``model_id`` takes part in the fingerprint so that two models with equal shapes never
    read each other's pages.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str = "bfloat16"
    arrangement: Arrangement = Arrangement.FULLY_CONTIGUOUS
    model_id: str = ""
    kind: KVKind = KVKind.MHA
    _fingerprint: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _positive_int(name, getattr(self, name))
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if isinstance(self.arrangement, str):
            try:
                object.__setattr__(self, "arrangement", Arrangement(self.arrangement))
            except ValueError:
                raise LayoutError(
                    f"unknown arrangement {self.arrangement!r}; expected one of "
                    f"{[a.value for a in Arrangement]}") from None
        if not isinstance(self.arrangement, Arrangement):
            raise LayoutError(f"arrangement must be an Arrangement, got {self.arrangement!r}")
        if isinstance(self.kind, str):
            try:
                object.__setattr__(self, "kind", KVKind(self.kind))
            except ValueError:
                raise LayoutError(f"unknown kind {self.kind!r}; expected one of "
                                  f"{[k.value for k in KVKind]}") from None
        if not isinstance(self.kind, KVKind):
            raise LayoutError(f"kind must be a KVKind, got {self.kind!r}")
        if self.kind is KVKind.MLA and self.num_kv_heads != 1:
            # The latent is shared by all heads: more than one "head" would be a copy of it.
            raise LayoutError(f"an MLA layout keeps one latent vector per token: num_kv_heads "
                              f"must be 1 (head_dim is the latent width), got "
                              f"{self.num_kv_heads}")
        if not isinstance(self.model_id, str):
            raise LayoutError(f"model_id must be a str, got {self.model_id!r}")
        try:
            self.model_id.encode()  # part of the fingerprint, as UTF-8
        except UnicodeEncodeError:
            raise LayoutError(f"model_id has no UTF-8 form (a lone surrogate): "
                              f"{self.model_id!r}") from None
        fields = [self.num_layers, self.num_kv_heads, self.head_dim, self.block_size,
                  self.dtype, self.model_id]
        if self.kind is not KVKind.MHA:
            # Appended only for other kinds, so every MHA fingerprint (and the disk stores
            # written under it) stays what it was before kinds existed.
            fields.append(self.kind.value)
        # The arrangement is not part of the fingerprint: a page is always stored contiguous,
        # whatever the device arrangement, so both arrangements can share lower tiers.
        object.__setattr__(self, "_fingerprint",
                           xxhash.xxh3_64_intdigest(msgpack.packb(["kvbm-layout-v1", *fields])))

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def kv_planes(self) -> int:
        """Planes per layer and block: 2 (K and V) for MHA, 1 (the latent) for MLA."""
        return self.kind.planes

    @property
    def replicated_across_tp_ranks(self) -> bool:
        """Whether every tensor-parallel rank holds the same page (MLA's latent is not
        sharded by head), so a page need be stored once rather than once per rank."""
        return self.kind is KVKind.MLA

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        """Shape of one block of one layer: ``(kv_planes, block_size, heads, head_dim)``."""
        return (self.kv_planes, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """One whole block, contiguous: ``(layers, kv_planes, block_size, heads, head_dim)``."""
        return (self.num_layers, *self.layer_shape)

    @property
    def elements_per_block(self) -> int:
        return (self.num_layers * self.kv_planes * self.block_size * self.num_kv_heads
                * self.head_dim)

    @property
    def bytes_per_block(self) -> int:
        return self.elements_per_block * self.itemsize

    @property
    def bytes_per_layer_block(self) -> int:
        return self.bytes_per_block // self.num_layers

    @property
    def fingerprint(self) -> int:
        """64-bit identity of the page format (kind, shape, dtype, model id)."""
        return self._fingerprint

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "block_size": self.block_size, "dtype": self.dtype,
                "arrangement": self.arrangement.value, "model_id": self.model_id,
                "kind": self.kind.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KVLayout:
        if not isinstance(d, Mapping):
            raise LayoutError(f"a layout is a mapping of its fields, got {type(d).__name__}")
        known = {"num_layers", "num_kv_heads", "head_dim", "block_size", "dtype",
                 "arrangement", "model_id", "kind"}
        unknown = set(d) - known
        if unknown:
            raise LayoutError(f"unknown layout fields {sorted(unknown, key=repr)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise LayoutError(f"invalid layout {d!r}: {e}") from None


#: Named layouts for benchmarks and the demo.
PRESETS: dict[str, KVLayout] = {
    # Llama-3-8B: 32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks = 2 MiB pages.
    "llama3-8b": KVLayout(32, 8, 128, 16, "bfloat16", model_id="llama3-8b"),
    # A small page (32 KiB): 2 layers of the above.
    "small": KVLayout(2, 4, 64, 16, "bfloat16", model_id="small"),
    # Metadata-sized pages for policy replays.
    "tiny": KVLayout(1, 1, 4, 16, "float16", model_id="tiny"),
    # DeepSeek-V3/R1 (MLA): 61 layers, one latent of 512 + 64 (rope) per token, bf16,
    # 64-token blocks = 4392 KiB pages, the same on every tensor-parallel rank.
    "deepseek-v3": KVLayout(61, 1, 576, 64, "bfloat16", model_id="deepseek-v3",
                            kind=KVKind.MLA),
}
