"""vLLM's KV tensors of one worker as transport regions: which bytes are a block's, and a
fingerprint that two workers must share before any byte moves between them.

Each layer's tensor is registered whole as region ``kv.<layer index>`` (a view, never a
copy). A block of a layer is one contiguous chunk per KV plane: vLLM's CPU format
``[N, H, T, 2D]``, CUDA's packed flash format and MLA ``[N, T, W]`` hold the block's bytes
in one chunk at ``b * stride``; the older flash format ``[2, N, T, H, D]`` in two (K at
``b * stride``, V at ``N * stride + b * stride``). The region's ``meta`` says where, so a
peer with another number of blocks is addressed right.

A WRITE does not go into the KV tensors: the decode worker registers a staging region per
request (the blocks one after another, every layer and plane: :meth:`KvRegions.staging`),
the prefill worker writes into it, and the decode worker copies it into its blocks once the
prefill side says the write is over (:meth:`KvRegions.stage_in`). Deregistering the staging
region fences the request: a late write reaches nothing, never blocks vLLM reuses.

The fingerprint covers the kvbm layout's (model id, layers, KV heads, head size, block
size, dtype), the engine's tensor format and CPU packing, and the tensor-parallel split:
the bytes of a block mean the same on both sides only when all of them agree.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack

from kvbm.errors import LayoutError
from kvbm.memory.engine_kv import EngineKV, EngineKVFormat

if TYPE_CHECKING:
    import torch

    from kvbm.transports import Agent, PeerInfo, RegionHandle


@dataclass(frozen=True)
class Geometry:
    """Where block ``b`` of one layer lies in its region: ``chunks[p] + b * stride``,
    ``length`` bytes, for each plane ``p``."""

    chunks: tuple[int, ...]
    stride: int
    length: int

    def to_meta(self) -> dict[str, Any]:
        return {"chunks": list(self.chunks), "stride": self.stride, "length": self.length}


def geometry(t: torch.Tensor, fmt: EngineKVFormat) -> Geometry:
    """The block geometry of one layer's tensor (which must be contiguous: a block's
    chunks are then ``stride`` bytes each)."""
    if not t.is_contiguous():
        raise LayoutError(f"kvbm hands off KV tensors that are contiguous; got strides "
                          f"{tuple(t.stride())} for shape {tuple(t.shape)}")
    es = t.element_size()
    if fmt is EngineKVFormat.FLASH:
        stride = t.stride(1) * es
        return Geometry((0, t.stride(0) * es), stride, stride)
    stride = t.stride(0) * es
    return Geometry((0,), stride, stride)


def transfer_fingerprint(kv: EngineKV, tensors: Sequence[torch.Tensor]) -> int:
    """See the module: equal on two workers iff their blocks' bytes are interchangeable."""
    import xxhash

    shapes = [list(t.shape[2:] if kv.format is EngineKVFormat.FLASH else t.shape[1:])
              for t in tensors]
    parts = [kv.layout.fingerprint, kv.format.value,
             None if kv.cpu_packing is None else kv.cpu_packing.value,
             kv.shard.world_size, kv.local_heads, shapes, str(tensors[0].dtype)]
    return int(xxhash.xxh3_64_intdigest(msgpack.packb(parts)))


class KvRegions:
    """One worker's KV tensors registered with ``agent`` (see the module)."""

    def __init__(self, agent: Agent, kv: EngineKV, tensors: Sequence[torch.Tensor],
                 expose: Any = None, spare: int = 4) -> None:
        """``expose``: the :class:`~kvbm.transports.Access` every peer gets, or ``None``;
        ``spare``: staging buffers kept for reuse."""
        if len(tensors) != kv.layout.num_layers:
            raise LayoutError(f"{len(tensors)} KV tensors for {kv.layout.num_layers} layers")
        self.agent = agent
        self.tensors = list(tensors)
        self.fingerprint = transfer_fingerprint(kv, self.tensors)
        self.geometry = [geometry(t, kv.format) for t in self.tensors]
        self.num_blocks = kv.num_blocks
        #: bytes of one block on this worker, every layer and plane
        self.block_bytes = sum(len(g.chunks) * g.length for g in self.geometry)
        self._expose = expose
        self._lock = threading.Lock()
        self._spare: list[torch.Tensor] = []
        self._max_spare = spare
        self.regions: list[RegionHandle] = []
        self._register()

    def _register(self) -> None:
        from kvbm.transports import ALL_PEERS

        fp = format(self.fingerprint, "016x")
        out = []
        try:
            for i, (t, g) in enumerate(zip(self.tensors, self.geometry, strict=True)):
                out.append(self.agent.register(
                    t, name=f"kv.{i}", meta={"fp": fp, **g.to_meta()},
                    expose_to=None if self._expose is None else ALL_PEERS,
                    **({} if self._expose is None else {"access": self._expose})))
        except BaseException:
            for r in out:
                self.agent.deregister(r, timeout=1.0)
            raise
        self.regions = out

    # -- staging (WRITE) ------------------------------------------------------------------
    def staging(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A staging buffer for ``n`` blocks (per layer and plane, the blocks one after
        another, on the KV tensors' device): ``(buffer, its first n blocks' bytes)``.
        Buffers given back are reused (fresh memory faults on the first write)."""
        import torch

        need = n * self.block_bytes
        with self._lock:
            fits = [b for b in self._spare if b.numel() >= need]
            if fits:
                buf = min(fits, key=lambda b: b.numel())
                self._spare.remove(buf)
                return buf, buf[:need]
        buf = torch.empty(need, dtype=torch.uint8, device=self.tensors[0].device)
        return buf, buf

    def give_back(self, buf: torch.Tensor) -> None:
        """A staging buffer nothing can write into any more (its region deregistered
        after the write was over)."""
        with self._lock:
            self._spare.append(buf)
            if len(self._spare) > self._max_spare:
                self._spare.remove(min(self._spare, key=lambda b: b.numel()))

    def _staged(self, n: int) -> list[tuple[int, int, int]]:
        """``(layer, plane offset in the layer's region, offset in the staging buffer)``."""
        out, off = [], 0
        for i, g in enumerate(self.geometry):
            for c in g.chunks:
                out.append((i, c, off))
                off += n * g.length
        return out

    def staging_descriptors(self, peer: PeerInfo, region: str, blocks: Sequence[int]
                            ) -> list[tuple[tuple[Any, int, int], tuple[Any, int, int]]]:
        """Prefill side: our ``blocks`` -> the decode worker's staging region ``region``."""
        try:
            theirs = peer.region(region)
        except KeyError:
            raise LayoutError(f"{peer.name} exposes no staging region {region!r} to this "
                              f"worker (it gave up on the request)") from None
        fp = theirs.meta.get("fp") if hasattr(theirs.meta, "get") else None
        if fp != format(self.fingerprint, "016x"):
            raise LayoutError(f"{peer.name}'s KV layout (fingerprint {fp}) is not this "
                              f"worker's ({self.fingerprint:016x})")
        n = len(blocks)
        if theirs.length != n * self.block_bytes:
            raise LayoutError(f"{peer.name}'s staging region holds {theirs.length} bytes, "
                              f"{n} blocks are {n * self.block_bytes}")
        out = []
        for i, c, off in self._staged(n):
            g = self.geometry[i]
            for j, b in enumerate(blocks):
                if not 0 <= b < self.num_blocks:
                    raise LayoutError(f"block {b} out of range")
                out.append(((self.regions[i], c + b * g.stride, g.length),
                            (theirs, off + j * g.length, g.length)))
        return out

    def stage_in(self, buf: torch.Tensor, blocks: Sequence[int]) -> None:
        """Decode side: copy a complete staging buffer into ``blocks``: one copy per run
        of consecutive blocks (plain memcpy; a gather of byte rows is many times slower)."""
        import torch

        n = len(blocks)
        runs = _runs(blocks)
        for i, c, off in self._staged(n):
            g = self.geometry[i]
            flat = self.tensors[i].view(-1).view(torch.uint8)
            for j, first, count in runs:
                a = c + first * g.stride
                src = off + j * g.length
                flat[a:a + count * g.length].copy_(buf[src:src + count * g.length])

    def descriptors(self, peer: PeerInfo, local_blocks: Sequence[int],
                    remote_blocks: Sequence[int]) -> list[tuple[tuple[Any, int, int],
                                                             tuple[Any, int, int]]]:
        """``((local region, offset, n), (remote region, offset, n))`` pairs moving
        ``remote_blocks[i]`` of ``peer`` <-> ``local_blocks[i]`` here, every layer and
        plane. :class:`LayoutError` when the peer's blocks are not laid out like ours."""
        if len(local_blocks) != len(remote_blocks):
            raise LayoutError("a transfer needs as many local as remote blocks")
        regions = self.regions
        out = []
        for i, (mine, g) in enumerate(zip(regions, self.geometry, strict=True)):
            try:
                theirs = peer.region(f"kv.{i}")
            except KeyError:
                raise LayoutError(f"{peer.name} exposes no KV region kv.{i} to this worker "
                                  f"(another model, or not a prefill/decode peer)") from None
            rg = _remote_geometry(peer.name, i, theirs.meta, self.fingerprint, g)
            for c_mine, c_theirs in zip(g.chunks, rg.chunks, strict=True):
                for lb, rb in zip(local_blocks, remote_blocks, strict=True):
                    if not 0 <= lb < self.num_blocks:
                        raise LayoutError(f"local block {lb} out of range")
                    out.append(((mine, c_mine + lb * g.stride, g.length),
                                (theirs, c_theirs + rb * rg.stride, g.length)))
        return out

    def close(self) -> None:
        with self._lock:
            for r in self.regions:
                self.agent.deregister(r, timeout=1.0)
            self.regions = []


def _remote_geometry(peer: str, layer: int, meta: Any, fingerprint: int, mine: Geometry
                     ) -> Geometry:
    fp = meta.get("fp") if hasattr(meta, "get") else None
    if fp != format(fingerprint, "016x"):
        raise LayoutError(f"the KV layout of {peer} (fingerprint {fp}) is not this worker's "
                          f"({fingerprint:016x}): model, shape, dtype, block size, attention "
                          f"backend and tensor-parallel size must all be the same on the "
                          f"prefill and the decode instance (kvbm_model_id names the model)")
    try:
        g = Geometry(tuple(int(c) for c in meta["chunks"]), int(meta["stride"]),
                     int(meta["length"]))
    except (KeyError, TypeError, ValueError):
        raise LayoutError(f"{peer} describes its KV region kv.{layer} badly") from None
    if len(g.chunks) != len(mine.chunks) or g.length != mine.length or g.stride < g.length:
        raise LayoutError(f"{peer}'s KV region kv.{layer} has another block geometry")
    return g


def _runs(blocks: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(index in blocks, first block, count)`` of each run of consecutive blocks."""
    out: list[tuple[int, int, int]] = []
    for j, b in enumerate(blocks):
        if out and out[-1][1] + out[-1][2] == b:
            out[-1] = (out[-1][0], out[-1][1], out[-1][2] + 1)
        else:
            out.append((j, b, 1))
    return out
