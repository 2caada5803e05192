"""Engine-owned G1: the engine's KV tensors, registered as views (kvbm allocates nothing).

An engine such as vLLM keeps one KV tensor per attention layer and addresses it by its own
block ids. :class:`EngineKV` recognises the tensor format from the shapes the
:class:`~kvbm.layout.KVLayout` implies and exposes, per layer and plane, a zero-copy view
whose elements line up with kvbm's canonical page (``[block_size, heads, head_dim]`` per
plane), so that a mover copies with plain ``copy_`` / ``index_copy_`` calls.

Formats (``T`` block_size, ``H`` this rank's KV heads, ``D`` head_dim):

* :attr:`EngineKVFormat.CPU` -- vLLM's CPU backend, ``[N, H, T, 2*D]``. The shape is
  nominal: the kernel views each (block, head) as ``2*T*D`` elements, the K area then the V
  area, each packed the way its ISA wants (:class:`CpuPacking`, measured with vLLM 0.32's
  ``cpu_attn_reshape_and_cache``): ``VEC`` (x86 without AMX: K as ``[D, T]``, V as
  ``[T, D]``), ``AMX`` (K as ``[T/16, D/2, 16, 2]``, V as ``[D/16, T/2, 16, 2]``).
* :attr:`EngineKVFormat.FLASH_PACKED` -- vLLM 0.32's CUDA flash-attention: the same shape
  ``[N, H, T, 2*D]``, but per token and head K is the first ``D`` of the last dim, V the
  rest (any strides). A CUDA tensor of that shape is this format, a CPU one is ``CPU``.
* :attr:`EngineKVFormat.FLASH` -- ``[2, N, T, H, D]`` (K, V first; older vLLM releases).
* :attr:`EngineKVFormat.MLA` -- ``[N, T, W]`` (or ``[N, 1, T, W]``): one latent of width
  ``W = kv_lora_rank + rope_dim`` per token, identical on every tensor-parallel rank.

Views are "tiled": ``[N, Ta, Tb, H, Da, Db]`` with ``T = Ta*Tb`` and ``D = Da*Db``, so that a
packing that interleaves tokens and dims (AMX) is still one strided view; a page plane
``[n, T, H, D]`` is viewed with the same split.
"""

from __future__ import annotations

import enum
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.errors import BlockIdError, BlockIdTypeError, InvalidArgumentError, LayoutError
from kvbm.layout import KVKind, KVLayout

if TYPE_CHECKING:
    import torch

#: ``(Ta, Tb, Da, Db)``: how one plane's token and dim axes are split in its tiled view.
Tile = tuple[int, int, int, int]


class EngineKVFormat(enum.Enum):
    """The memory format of an engine's per-layer KV tensor (see the module)."""

    CPU = "cpu"
    FLASH_PACKED = "flash_packed"
    FLASH = "flash"
    MLA = "mla"


class CpuPacking(enum.Enum):
    """How vLLM's CPU kernels pack K and V inside one (block, head) of the CPU format."""

    #: the ``vec`` / ``vec16`` kernels: K transposed ``[D, T]``, V ``[T, D]``
    VEC = "vec"
    #: the ``amx`` kernel (bf16, block_size % 32 == 0): VNNI tiles of K and V
    AMX = "amx"

    @classmethod
    def for_vllm_isa(cls, isa: str) -> CpuPacking:
        """The packing of vLLM's CPU attention ISA name (its impl's ``isa``)."""
        packing = {"vec": cls.VEC, "vec16": cls.VEC, "amx": cls.AMX}.get(isa)
        if packing is None:
            raise LayoutError(f"vLLM's CPU attention ISA {isa!r} packs KV in a way kvbm has not "
                              f"verified; known: vec, vec16, amx")
        return packing

    @classmethod
    def detect(cls, layout: KVLayout) -> CpuPacking:
        """What vLLM 0.32 picks on this machine for ``layout`` (its ``_get_attn_isa``)."""
        import torch

        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise LayoutError(f"vLLM's CPU backend on {platform.machine()} packs KV in a way "
                              f"kvbm has not verified; pass cpu_packing= explicitly "
                              f"(CpuPacking.for_vllm_isa(impl.isa))")
        d = layout.head_dim
        if d % 32 != 0 and d % 16 == 0:
            return cls.VEC  # vec16
        if (layout.dtype == "bfloat16" and layout.block_size % 32 == 0
                and torch.cpu._is_amx_tile_supported()):
            return cls.AMX
        return cls.VEC


@dataclass(frozen=True)
class TPShard:
    """This worker's tensor-parallel rank among ``world_size``."""

    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "world_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise InvalidArgumentError(f"TPShard.{name} must be an int, got {v!r}")
        if self.world_size < 1:
            raise InvalidArgumentError(f"TPShard.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise InvalidArgumentError(f"TPShard.rank must be in [0, {self.world_size}), got "
                                       f"{self.rank}")


def tag_columns_needed(layout: KVLayout, world_size: int) -> int:
    """Tag columns a shared pool needs: one per rank that writes part of a page (MHA: every
    rank writes its heads), one for a page replicated on every rank (MLA: rank 0 writes)."""
    TPShard(0, world_size)
    return 1 if layout.replicated_across_tp_ranks else world_size


def _local_heads(layout: KVLayout, shard: TPShard) -> int:
    if layout.kind is KVKind.MLA:
        return 1
    if layout.num_kv_heads % shard.world_size:
        raise LayoutError(f"{layout.num_kv_heads} KV heads do not split evenly over "
                          f"{shard.world_size} tensor-parallel ranks")
    return layout.num_kv_heads // shard.world_size


def _expected_shapes(layout: KVLayout, h: int) -> dict[EngineKVFormat, str]:
    t, d = layout.block_size, layout.head_dim
    if layout.kind is KVKind.MLA:
        return {EngineKVFormat.MLA: f"[N, {t}, {d}] or [N, 1, {t}, {d}]"}
    return {EngineKVFormat.CPU: f"[N, {h}, {t}, {2 * d}] on the CPU",
            EngineKVFormat.FLASH_PACKED: f"[N, {h}, {t}, {2 * d}] on CUDA",
            EngineKVFormat.FLASH: f"[2, N, {t}, {h}, {d}]"}


#: formats of one shape, told apart by the tensor's device unless the caller names one
_SAME_SHAPE = (EngineKVFormat.CPU, EngineKVFormat.FLASH_PACKED)


def _detect(t: torch.Tensor, layout: KVLayout, h: int) -> EngineKVFormat | None:
    bs, d = layout.block_size, layout.head_dim
    s = tuple(t.shape)
    if layout.kind is KVKind.MLA:
        ok = (len(s) == 3 and s[1:] == (bs, d)) or (len(s) == 4 and s[1:] == (1, bs, d))
        return EngineKVFormat.MLA if ok else None
    if len(s) == 5 and s[0] == 2 and s[2:] == (bs, h, d):
        return EngineKVFormat.FLASH
    if len(s) == 4 and s[1:] == (h, bs, 2 * d):
        return EngineKVFormat.CPU if t.device.type == "cpu" else EngineKVFormat.FLASH_PACKED
    return None


def _tiled(t: torch.Tensor, fmt: EngineKVFormat, packing: CpuPacking | None, layout: KVLayout,
           h: int) -> tuple[list[torch.Tensor], list[Tile]]:
    """Per plane: the tiled view ``[N, Ta, Tb, H, Da, Db]`` of ``t`` and its tile."""
    bs, d = layout.block_size, layout.head_dim
    plain: Tile = (1, bs, 1, d)
    if fmt is EngineKVFormat.MLA:
        x = t if t.dim() == 3 else t[:, 0]
        return [x.unsqueeze(1).unsqueeze(3).unsqueeze(4)], [plain]
    if fmt is EngineKVFormat.FLASH:
        return [t[p].unsqueeze(1).unsqueeze(4) for p in range(2)], [plain, plain]
    if fmt is EngineKVFormat.FLASH_PACKED:
        return ([t[..., p * d:(p + 1) * d].permute(0, 2, 1, 3).unsqueeze(1).unsqueeze(4)
                 for p in range(2)], [plain, plain])
    n = t.shape[0]
    want = (bs * 2 * d, 2 * d, 1)
    if any(size > 1 and st != w for size, st, w in zip(t.shape[1:], t.stride()[1:], want,
                                                        strict=True)):
        # The kernel addresses a (block, head) as 2*T*D contiguous elements.
        raise LayoutError(f"a CPU-format KV tensor must be dense within a block, got strides "
                          f"{tuple(t.stride())} for shape {tuple(t.shape)}")
    base = t.view(n, h, 2, bs * d)
    k, v = base[:, :, 0], base[:, :, 1]
    if packing is CpuPacking.VEC:
        return ([k.view(n, h, d, bs).permute(0, 3, 1, 2).unsqueeze(1).unsqueeze(4),
                 v.view(n, h, bs, d).permute(0, 2, 1, 3).unsqueeze(1).unsqueeze(4)],
                [plain, plain])
    if bs % 32 or d % 32:
        raise LayoutError(f"the AMX packing is verified for block_size and head_dim multiples "
                          f"of 32, got block_size {bs}, head_dim {d}")
    # K: (n, h, t_hi, d_hi, t_lo, d_lo); V: (n, h, d_hi, t_hi, d_lo, t_lo).
    kt = k.view(n, h, bs // 16, d // 2, 16, 2).permute(0, 2, 4, 1, 3, 5)
    vt = v.view(n, h, d // 16, bs // 2, 16, 2).permute(0, 3, 5, 1, 2, 4)
    return [kt, vt], [(bs // 16, 16, d // 2, 2), (bs // 2, 2, d // 16, 16)]


class EngineKV:
    """The engine's KV tensors of one worker (one TP rank), one per attention layer, in the
    model's layer order (the same on every rank). ``layout`` describes the whole model (all
    KV heads); with MHA each tensor holds this rank's ``num_kv_heads / world_size``
    contiguous heads, with MLA the full latent. Never copies or allocates the tensors."""

    def __init__(self, layers: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                 layout: KVLayout, *, shard: TPShard | None = None,
                 kv_format: EngineKVFormat | None = None,
                 cpu_packing: CpuPacking | None = None) -> None:
        import torch

        shard = TPShard() if shard is None else shard
        if not isinstance(layout, KVLayout):
            raise InvalidArgumentError(f"layout must be a KVLayout, got {type(layout).__name__}")
        if not isinstance(shard, TPShard):
            raise InvalidArgumentError(f"shard must be a TPShard, got {type(shard).__name__}")
        if kv_format is not None and not isinstance(kv_format, EngineKVFormat):
            raise InvalidArgumentError(f"kv_format must be an EngineKVFormat, got {kv_format!r}")
        if cpu_packing is not None and not isinstance(cpu_packing, CpuPacking):
            raise InvalidArgumentError(f"cpu_packing must be a CpuPacking, got {cpu_packing!r}")
        if isinstance(layers, Mapping):
            names = tuple(layers)
            if not all(isinstance(k, str) for k in names):
                raise InvalidArgumentError("layer names must be str")
            tensors = [layers[k] for k in names]
        elif isinstance(layers, Sequence) and not isinstance(layers, str | bytes):
            tensors, names = list(layers), tuple(str(i) for i in range(len(layers)))
        else:
            raise InvalidArgumentError(f"layers must be a mapping of layer name to tensor or a "
                                       f"sequence of tensors, got {type(layers).__name__}")
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise InvalidArgumentError("every layer must be a torch.Tensor")
        if len(tensors) != layout.num_layers:
            raise LayoutError(f"{len(tensors)} KV tensors given, the layout has "
                              f"{layout.num_layers} layers")
        h = _local_heads(layout, shard)
        dtype = layout.torch_dtype()
        expected = _expected_shapes(layout, h)
        fmts: list[EngineKVFormat] = []
        for name, t in zip(names, tensors, strict=True):
            if t.dtype != dtype:
                raise LayoutError(f"layer {name!r}: dtype {t.dtype}, the layout's is {dtype}")
            if t.is_meta:  # no bytes behind it: copies "into" it would report done
                raise LayoutError(f"layer {name!r}: a meta tensor holds no KV")
            if any(n > 1 and st == 0 for n, st in zip(t.shape, t.stride(), strict=True)):
                # An expanded tensor: a copy into one block would write the others too.
                raise LayoutError(f"layer {name!r}: its elements overlap (strides "
                                  f"{tuple(t.stride())} for shape {tuple(t.shape)})")
            f = _detect(t, layout, h)
            if f in _SAME_SHAPE and kv_format in _SAME_SHAPE:
                f = kv_format  # one shape, two meanings: the caller says which
            if f is None or (kv_format is not None and f is not kv_format):
                want = ([expected[kv_format]] if kv_format in expected
                        else list(expected.values()))
                raise LayoutError(f"layer {name!r}: KV tensor of shape {tuple(t.shape)} on "
                                  f"{t.device} is not a recognised format for {h} heads of "
                                  f"{layout.head_dim}, block_size {layout.block_size}; "
                                  f"expected {' or '.join(want)}")
            fmts.append(f)
        fmt = fmts[0]
        first = tensors[0]
        nb = first.shape[1] if fmt is EngineKVFormat.FLASH else first.shape[0]
        for name, t, f in zip(names, tensors, fmts, strict=True):
            n = t.shape[1] if f is EngineKVFormat.FLASH else t.shape[0]
            if f is not fmt or n != nb or t.device != first.device:
                raise LayoutError(f"layer {name!r} ({f.value}, {n} blocks, {t.device}) differs "
                                  f"from layer {names[0]!r} ({fmt.value}, {nb} blocks, "
                                  f"{first.device}): all layers must agree")
        if nb < 1:
            raise LayoutError("the KV tensors hold no blocks")
        packing = None
        if fmt is EngineKVFormat.CPU:
            packing = cpu_packing if cpu_packing is not None else CpuPacking.detect(layout)
        views = [_tiled(t, fmt, packing, layout, h) for t in tensors]
        self.layout, self.shard, self.format, self.cpu_packing = layout, shard, fmt, packing
        self.names: tuple[str, ...] = names
        self.num_blocks: int = int(nb)
        self.device: torch.device = first.device
        self.local_heads = h
        self._index = {n: i for i, n in enumerate(names)}
        self._planes = [tuple(v) for v, _ in views]
        self.tiles: tuple[Tile, ...] = tuple(views[0][1])

    @property
    def head_range(self) -> slice:
        """The heads of a page that this rank holds."""
        h = self.local_heads
        if self.layout.kind is KVKind.MLA:
            return slice(0, 1)
        return slice(self.shard.rank * h, (self.shard.rank + 1) * h)

    @property
    def writes_pages(self) -> bool:
        """False where another rank writes this rank's part of a page (a replicated MLA
        latent is stored once, by rank 0)."""
        return not self.layout.replicated_across_tp_ranks or self.shard.rank == 0

    @property
    def tag_column(self) -> int:
        """The tag column this rank writes (MHA: its rank; MLA: 0)."""
        return 0 if self.layout.replicated_across_tp_ranks else self.shard.rank

    @property
    def tag_columns(self) -> tuple[int, ...]:
        """The tag columns that must all carry a block's hash for its page to be whole."""
        return tuple(range(tag_columns_needed(self.layout, self.shard.world_size)))

    tag_columns_needed = staticmethod(tag_columns_needed)

    def layer_index(self, name: str) -> int:
        """The index of the layer named ``name`` (a key of the mapping given)."""
        try:
            return self._index[name]
        except (KeyError, TypeError):
            raise InvalidArgumentError(f"unknown layer {name!r}") from None

    def planes(self, layer_index: int) -> tuple[torch.Tensor, ...]:
        """Zero-copy tiled views ``[num_blocks, Ta, Tb, local_heads, Da, Db]`` of one layer,
        one per KV plane (K, V; or the MLA latent); :attr:`tiles` gives each split."""
        if (isinstance(layer_index, bool) or not isinstance(layer_index, int)
                or not 0 <= layer_index < len(self._planes)):
            raise InvalidArgumentError(f"layer index must be an int in [0, "
                                       f"{len(self._planes)}), got {layer_index!r}")
        return self._planes[layer_index]

    def plane(self, layer_index: int, plane: int) -> torch.Tensor:
        """One plane as ``[num_blocks, block_size, local_heads, head_dim]``: a view where the
        packing allows (all but AMX), else a copy."""
        p = self.planes(layer_index)[plane]
        return p.reshape(p.shape[0], self.layout.block_size, self.local_heads,
                         self.layout.head_dim)

    def check_block_ids(self, ids: Iterable[Any]) -> list[int]:
        """The ids as ints; :class:`BlockIdTypeError` / :class:`BlockIdError` for one that is
        not an int or out of ``[0, num_blocks)``."""
        out = []
        for b in ids:
            if isinstance(b, bool) or not isinstance(b, int):
                raise BlockIdTypeError(f"block id must be an int, got {b!r}")
            if not 0 <= b < self.num_blocks:
                raise BlockIdError(f"block id {b} out of range [0, {self.num_blocks})")
            out.append(int(b))
        return out

    def __repr__(self) -> str:
        return (f"EngineKV({self.format.value}, {len(self.names)} layers x {self.num_blocks} "
                f"blocks, heads {self.head_range.start}:{self.head_range.stop}, {self.device})")
