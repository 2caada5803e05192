import pytest
import torch

from kvbm import Arrangement, KVLayout
from kvbm.errors import BlockIdError, BlockStateError, ConfigError, PoolExhaustedError
from kvbm.pool import DevicePool, HostPool, SlotAllocator, copy_blocks


def test_allocate_free_order_and_counts():
    a = SlotAllocator(5)
    assert a.allocate(2) == [0, 1]
    assert a.num_free == 3
    a.free([1, 0])
    assert a.free_slots() == [2, 3, 4, 1, 0]  # freed pages go to the tail
    assert a.allocate(4) == [2, 3, 4, 1]
    assert [a.refcount(s) for s in range(5)] == [0, 1, 1, 1, 1]


def test_exhaustion_and_double_free_leave_state_unchanged():
    a = SlotAllocator(3)
    got = a.allocate(2)
    with pytest.raises(PoolExhaustedError):
        a.allocate(2)
    assert a.num_free == 1 and a.free_slots() == [2]
    a.free([got[0]])
    before = a.free_slots()
    with pytest.raises(BlockStateError):
        a.free([got[1], got[0]])  # got[0] is already free
    assert a.free_slots() == before and a.refcount(got[1]) == 1


def test_take_specific_slot_from_middle():
    a = SlotAllocator(4)
    a.take(2)
    assert a.free_slots() == [0, 1, 3] and a.refcount(2) == 1
    with pytest.raises(BlockStateError):
        a.take(2)


def test_check_and_refcounts():
    a = SlotAllocator(2)
    with pytest.raises(BlockIdError):
        a.check(2)
    with pytest.raises(BlockIdError):
        a.check(-1)
    with pytest.raises(BlockIdError):
        a.check("0")
    assert a.check(torch.tensor(1)) == 1
    (s,) = a.allocate(1)
    assert a.incref(s) == 2 and a.decref(s) == 1 and a.decref(s) == 0
    with pytest.raises(BlockStateError):
        a.decref(s)


@pytest.mark.parametrize("n", [0, -1, 2.0, True])
def test_zero_blocks_is_a_config_error(n):
    with pytest.raises(ConfigError):
        SlotAllocator(n)


@pytest.mark.parametrize("arr", list(Arrangement))
def test_device_pool_views_and_copies(arr):
    lay = KVLayout(3, 2, 4, 8, "bfloat16", arr)
    dev = DevicePool(lay, 4, "cpu")
    host = HostPool(lay, 4)
    assert not host.pinned  # no CUDA here: plain memory
    v = dev.block_view(1)
    if arr is Arrangement.FULLY_CONTIGUOUS:
        assert v.shape == lay.block_shape
        v.copy_(torch.arange(v.numel(), dtype=torch.float32).view(v.shape))
    else:
        assert len(v) == 3 and v[0].shape == lay.layer_shape
        for i, t in enumerate(v):
            t.copy_(torch.full(t.shape, float(i + 1)))
    copy_blocks(dev, [1], host, [3])
    expect = torch.stack(list(v)) if isinstance(v, list) else v
    assert torch.equal(host.block_view(3), expect)
    assert len(host.page(3)) == lay.bytes_per_block
    copy_blocks(host, [3], dev, [0])
    got = dev.block_view(0)
    assert torch.equal(torch.stack(list(got)) if isinstance(got, list) else got, expect)


def test_host_page_is_the_block_bytes_and_checks_its_slot():
    lay = KVLayout(2, 1, 4, 4, "float16")
    host = HostPool(lay, 3)
    page = host.page(2)
    assert len(page) == lay.bytes_per_block and page.format == "B" and not page.readonly
    page[:] = bytes(range(len(page)))   # writes land in the block, zero-copy
    assert bytes(host.raw[2].numpy()) == bytes(range(len(page)))
    assert not any(host.raw[1].numpy()) and not any(host.raw[0].numpy())
    for bad in (-1, 3, 10):
        with pytest.raises(IndexError, match="out of range"):
            host.page(bad)


def test_pinned_host_pool_without_cuda_is_refused():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ConfigError, match="needs CUDA"):
        HostPool(KVLayout(1, 1, 1, 1, "float16"), 2, pin_memory=True)


@pytest.mark.gpu
def test_pinned_host_pool_with_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lay = KVLayout(2, 2, 4, 8, "bfloat16")
    host = HostPool(lay, 2)
    assert host.pinned and host.raw.is_pinned()
    dev = DevicePool(lay, 2, "auto")
    assert dev.device.type == "cuda"
    dev.block_view(0).fill_(3)
    copy_blocks(dev, [0], host, [1])
    assert bool((host.block_view(1) == 3).all())


@pytest.mark.parametrize("src_arr", list(Arrangement))
@pytest.mark.parametrize("dst_arr", list(Arrangement))
def test_copy_blocks_runs_and_scattered_slots(src_arr, dst_arr):
    # Runs of adjacent slots (one copy_ each) mixed with scattered ones, both directions.
    lay = KVLayout(3, 2, 4, 4, "bfloat16")
    n = 24
    dev = DevicePool(KVLayout(3, 2, 4, 4, "bfloat16", arrangement=src_arr), n, "cpu")
    host = HostPool(lay, n)
    ref = torch.randn((n, *lay.block_shape)).to(torch.bfloat16)
    for s in range(n):
        v = dev.block_view(s)
        for i, t in enumerate(v if isinstance(v, list) else [v]):
            t.copy_(ref[s, i] if isinstance(v, list) else ref[s])
    src = [0, 1, 2, 3, 10, 5, 6, 20, 21, 22, 9]
    dst = [4, 5, 6, 7, 0, 12, 13, 1, 2, 3, 23]
    copy_blocks(dev, src, host, dst)
    for s, d in zip(src, dst, strict=True):
        assert torch.equal(host.block_view(d), ref[s])
    back = DevicePool(KVLayout(3, 2, 4, 4, "bfloat16", arrangement=dst_arr), n, "cpu")
    copy_blocks(host, dst, back, src)
    for s in src:
        v = back.block_view(s)
        got = torch.stack(list(v)) if isinstance(v, list) else v
        assert torch.equal(got, ref[s])
    with pytest.raises(ValueError):
        copy_blocks(host, [0, 1], back, [0])
