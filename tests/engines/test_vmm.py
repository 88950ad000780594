"""Virtual-memory KV extension (engines.vmm): physical chunks move between address ranges
with their bytes, and a remapped KV pool grows onto dropped weights' chunks and gives
them back, with stable page ids and nothing allocated or copied.

Every test runs on the host driver (shared memory on a CPU) and, where a GPU is
available, on CUDA's driver API."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engines.kv_cache import KVPool
from engines.vmm import Arena, VirtualRange, VmmError, make_driver
from engines.vmm.host import HostDriver
from tests.deps import require

needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=needs_gpu)])
def arena(request) -> Arena:
    return Arena(make_driver(torch.device(request.param)))


def _cfg():
    """What the pool reads of a model: its KV heads and head size (a page is 512 bytes)."""
    return SimpleNamespace(num_key_value_heads=2, head_size=8)


def test_a_chunk_carries_its_bytes_from_one_range_to_another(arena):
    device = arena.driver.device
    weights = torch.randn(3 * arena.granularity // 4 + 7, device=device)
    buffer = arena.adopt(weights)
    assert arena.owns(buffer) and torch.equal(buffer, weights)
    allocated = arena.allocated

    pool = VirtualRange(arena.driver, 8 * arena.granularity)
    pool.push(arena.chunk(1))
    chunk = arena.reclaim(buffer)
    pool.push(chunk)
    tail = pool.view(pool.mapped)[arena.granularity:arena.granularity + weights.numel() * 4]
    assert torch.equal(tail.view(torch.float32), weights)  # remapped, not copied
    assert arena.allocated == allocated + arena.granularity  # only the pool's own chunk is new

    back = arena.place(pool.pop(), weights.numel(), torch.float32)
    assert torch.equal(back, weights)
    arena.release([arena.reclaim(back)] + pool.close())
    assert arena.allocated == 0


def test_range_and_arena_errors_name_the_problem(arena):
    rng = VirtualRange(arena.driver, arena.granularity)
    rng.push(arena.chunk(1))
    with pytest.raises(VmmError, match="do not fit"):
        rng.push(arena.chunk(1))
    with pytest.raises(VmmError, match="larger than the range"):
        rng.view(2 * arena.granularity)
    with pytest.raises(VmmError, match="not made by the arena"):
        arena.reclaim(torch.zeros(4, device=arena.driver.device))
    with pytest.raises(VmmError, match="does not fit a chunk"):
        arena.place(arena.chunk(1), arena.granularity, torch.float32)
    rng.close()


def _pool(arena: Arena, num_pages: int = 6, max_pages: int = 64) -> KVPool:
    return KVPool(_cfg(), num_pages, 4, torch.float32, arena.driver.device, max_pages=max_pages, arena=arena)


def test_remapped_pool_grows_onto_chunks_and_gives_them_back(arena):
    pool = _pool(arena)
    assert pool.remapped and not pool.reserved and pool.num_pages == 6
    pool.data[:6] = torch.arange(6, dtype=torch.float32, device=pool.data.device).view(6, 1, 1, 1, 1)
    base_ptr = pool.data.data_ptr()

    layers = [arena.adopt(torch.randn(pool.page_bytes * 3 // 4, device=pool.data.device)) for _ in range(3)]
    chunks = [arena.reclaim(t) for t in layers]
    allocated = arena.allocated
    added = pool.extend(chunks)
    grown = pool.num_pages
    assert added == grown - 6 and added * pool.page_bytes >= sum(c.nbytes for c in chunks) - pool.page_bytes
    assert arena.allocated == allocated  # the pool grew on the weights' memory, nothing new
    assert pool.data.data_ptr() == base_ptr  # same pool, same page ids
    assert torch.equal(pool.data[:6, 0, 0, 0, 0].cpu(), torch.arange(6, dtype=torch.float32))
    assert not pool.data[6:grown].any()  # the weights' old bytes are gone from the new pages
    pool.data[6:grown] = 1.5  # the new pages are usable KV

    back = pool.detach_chunks(6)
    assert back == chunks and pool.num_pages == 6
    assert torch.equal(pool.data[:6, 0, 0, 0, 0].cpu(), torch.arange(6, dtype=torch.float32))
    restored = arena.place(back[0], 16, torch.float32)
    assert torch.equal(restored.cpu(), torch.full((16,), 1.5))  # KV bytes, same memory: no copy
    arena.release([arena.reclaim(restored)] + back[1:])


def test_remapped_pool_refuses_the_commit_interface(arena):
    pool = _pool(arena)
    with pytest.raises(ValueError, match="extend"):
        pool.grow(1)
    with pytest.raises(ValueError, match="detach_chunks"):
        pool.shrink(3)
    with pytest.raises(ValueError, match="cannot shrink"):
        pool.detach_chunks(7)
    pages = pool.num_pages
    with pytest.raises(VmmError, match="do not fit"):
        pool.extend([arena.chunk(1), arena.chunk(pool.max_pages * pool.page_bytes)])
    assert pool.num_pages == pages and len(pool.detach_chunks(pages)) == 0  # all or nothing: none mapped


def test_only_a_remapped_pool_takes_chunks():
    pool = KVPool(_cfg(), 6, 4, torch.float32, "cpu", max_pages=12)
    with pytest.raises(ValueError, match="only a remapped pool"):
        pool.extend([])
    with pytest.raises(ValueError, match="only a remapped pool"):
        pool.detach_chunks(3)


def test_host_driver_rejects_a_granularity_off_the_page_size():
    with pytest.raises(VmmError, match="not a multiple of the page size"):
        HostDriver(granularity=1000)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a host without a GPU")
def test_cuda_driver_without_a_gpu_is_a_clear_error():
    with pytest.raises(VmmError, match="cuda.bindings|CUDA build of torch|driver library"):
        make_driver(torch.device("cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real calls (the tests above)")
def test_cuda_driver_calls_convert_their_arguments():
    """Without a GPU the bindings fail only when they load the driver library, after
    converting the arguments: every call the CUDA driver makes gets that far (a wrong
    argument type would raise TypeError first)."""
    cu = require("cuda.bindings.driver")
    from engines.vmm.cuda import CudaDriver, _describe

    drv = object.__new__(CudaDriver)  # its __init__ needs a GPU
    drv._cu, drv.device, drv.granularity = cu, torch.device("cuda", 0), 2 << 20
    drv._prop, drv._access = _describe(cu, 0)
    handle, address = cu.CUmemGenericAllocationHandle(0), 1 << 40
    flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
    calls = {
        "cuInit": lambda: drv._call("cuInit", 0),
        "cuDeviceGet": lambda: drv._call("cuDeviceGet", 0),
        "cuDevicePrimaryCtxRetain": lambda: drv._call("cuDevicePrimaryCtxRetain", cu.CUdevice(0)),
        "cuCtxSetCurrent": lambda: drv._call("cuCtxSetCurrent", cu.CUcontext(0)),
        "cuMemGetAllocationGranularity": lambda: drv._call("cuMemGetAllocationGranularity", drv._prop, flag),
        "reserve": lambda: drv.reserve(4 << 20),
        "free": lambda: drv.free(address, 4 << 20),
        "create": lambda: drv.create(2 << 20),
        "release": lambda: drv.release(handle),
        "map": lambda: drv.map(address, 2 << 20, handle),
        "cuMemUnmap": lambda: drv._call("cuMemUnmap", address, 2 << 20),
    }
    for name, call in calls.items():
        with pytest.raises(Exception) as info:
            call()
        assert type(info.value).__name__ == "DynamicLibNotFoundError", (name, info.value)
