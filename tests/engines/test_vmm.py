"""Virtual-memory KV extension (engines.vmm): physical chunks move between address ranges
with their bytes, and a remapped KV pool grows onto dropped weights' chunks and gives
them back, with stable page ids and nothing allocated or copied.

Every test of an arena runs on the host driver (shared memory on a CPU) at the page size
and at CUDA's 2 MiB granularity, and, where a GPU is available, on CUDA's driver API;
the tests are sized from the driver's granularity, and the host driver refuses what CUDA
refuses, so a test sized for small pages fails on a CPU as it would on a GPU. The CUDA
driver's own logic (which calls it makes, in which order, what it waits for) is checked
on a CPU too, against stand-in bindings."""

from __future__ import annotations

import mmap
from types import SimpleNamespace

import pytest
import torch

from engines.kv_cache import KVPool
from engines.vmm import Arena, Chunk, VirtualRange, VmmError, make_driver
from engines.vmm.arena import round_up
from engines.vmm.host import HostDriver
from tests.deps import require

needs_gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MiB2 = 2 << 20
"""The granularity CUDA reports for device memory on current GPUs."""
HOST_GRANULARITIES = {"host-page": mmap.PAGESIZE, "host-2MiB": MiB2}


@pytest.fixture(params=[*HOST_GRANULARITIES, pytest.param("cuda", marks=needs_gpu)])
def arena(request) -> Arena:
    if request.param == "cuda":
        return Arena(make_driver(torch.device("cuda")))
    return Arena(HostDriver(HOST_GRANULARITIES[request.param]))


@pytest.fixture(params=list(HOST_GRANULARITIES.values()), ids=list(HOST_GRANULARITIES))
def granularity(request) -> int:
    return request.param


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
    with pytest.raises(VmmError, match="cannot unmap 2 of the 1"):
        rng.pop_many(2)
    rng.close()


def _pool(arena: Arena, num_pages: int = 6, granules: int = 8) -> KVPool:
    """A pool of 512-byte pages with room for ``granules`` chunks of one granule each."""
    max_pages = granules * arena.granularity // 512
    return KVPool(_cfg(), num_pages, 4, torch.float32, arena.driver.device, max_pages=max_pages, arena=arena)


def _layers(arena: Arena, n: int) -> list[torch.Tensor]:
    """``n`` weight buffers of three quarters of a granule each (one chunk apiece)."""
    return [arena.adopt(torch.randn(3 * arena.granularity // 16, device=arena.driver.device)) for _ in range(n)]


def test_remapped_pool_grows_onto_chunks_and_gives_them_back(arena):
    pool = _pool(arena)
    assert pool.remapped and not pool.reserved and pool.num_pages == 6
    pool.data[:6] = torch.arange(6, dtype=torch.float32, device=pool.data.device).view(6, 1, 1, 1, 1)
    base_ptr = pool.data.data_ptr()

    chunks = [arena.reclaim(t) for t in _layers(arena, 3)]
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
    chunks = [arena.chunk(1), arena.chunk(pool.max_pages * pool.page_bytes)]
    with pytest.raises(VmmError, match="do not fit"):
        pool.extend(chunks)
    assert pool.num_pages == pages and len(pool.detach_chunks(pages)) == 0  # all or nothing: none mapped
    arena.release(chunks)


def test_a_reservation_sized_in_small_pages_takes_one_chunk_of_2mib():
    """What the pool test above did when it was sized for 4 KiB pages (64 pages of 512
    bytes): at CUDA's granularity its reservation holds its first chunk and nothing more.
    The host driver at 2 MiB fails the same way, on any machine."""
    arena = Arena(HostDriver(MiB2))
    pool = KVPool(_cfg(), 6, 4, torch.float32, "cpu", max_pages=64, arena=arena)
    with pytest.raises(VmmError, match="do not fit"):
        pool.extend([arena.reclaim(t) for t in _layers(arena, 3)])


def test_unmapping_waits_for_the_device_once_per_batch(arena):
    """A drop unmaps tens of chunks; it waits for the device's queued work once, not once a
    chunk, and mapping never waits."""
    drv, n = arena.driver, 5
    buffers = _layers(arena, n)
    waits = drv.syncs
    with pytest.raises(VmmError, match="not made by the arena"):
        arena.reclaim_all(buffers + [torch.zeros(4, device=drv.device)])
    with pytest.raises(VmmError, match="named twice"):
        arena.reclaim_all([buffers[0], buffers[0]])
    assert drv.syncs == waits and all(arena.owns(t) for t in buffers)  # refused before any wait or unmap

    chunks = arena.reclaim_all(buffers)
    assert drv.syncs == waits + 1 and len(chunks) == n and not any(arena.owns(t) for t in buffers)
    pool = _pool(arena)
    pool.extend(chunks)
    assert drv.syncs == waits + 1  # mapping waits for nothing
    assert pool.detach_chunks(6) == chunks and drv.syncs == waits + 2
    assert pool.detach_chunks(6) == [] and drv.syncs == waits + 2  # nothing to unmap, nothing to wait for

    rng = VirtualRange(drv, n * arena.granularity)
    for chunk in chunks:
        rng.push(chunk)
    assert rng.close() == chunks and drv.syncs == waits + 3
    [buffer] = _layers(arena, 1)
    arena.release(chunks + [arena.reclaim(buffer)])
    assert drv.syncs == waits + 4 and arena.allocated == round_up(6 * pool.page_bytes, arena.granularity)


def _os_maps_a_chunk(address: int, nbytes: int) -> bool:
    """Whether the kernel has a chunk (a ``kunserve-chunk`` memfd) mapped in the range."""
    with open("/proc/self/maps") as f:
        for line in f:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            if "kunserve-chunk" in line and start < address + nbytes and address < end:
                return True
    return False


def test_host_driver_refuses_what_cuda_refuses(granularity):
    drv = HostDriver(granularity)
    g = granularity
    address = drv.reserve(4 * g)
    handle, other = drv.create(g), drv.create(g)
    assert address % g == 0  # reserved at the granularity's alignment, as CUDA reserves
    for bad in (g // 2, 0):
        with pytest.raises(VmmError, match="cuMemCreate failed on cpu: size"):
            drv.create(bad)
    with pytest.raises(VmmError, match="cuMemAddressReserve failed"):
        drv.reserve(mmap.PAGESIZE // 2)
    with pytest.raises(VmmError, match="cuMemMap failed on cpu: address"):
        drv.map(address + g // 2, g, handle)
    with pytest.raises(VmmError, match="cuMemMap failed on cpu: size"):
        drv.map(address, g // 2, handle)
    with pytest.raises(VmmError, match="cuMemMap failed on cpu: .*no chunk of"):
        drv.map(address, 2 * g, handle)
    with pytest.raises(VmmError, match="cuMemMap failed on cpu: .*outside a reserved range"):
        drv.map(address + 4 * g, g, handle)
    drv.map(address, g, handle)
    drv.map(address + g, g, other)
    with pytest.raises(VmmError, match="cuMemMap failed on cpu: .*mapped already"):
        drv.map(address, g, drv.create(g))
    with pytest.raises(VmmError, match="cuMemUnmap failed on cpu: .*not one whole mapping"):
        drv.unmap(address, 2 * g)  # two mappings at once
    with pytest.raises(VmmError, match="cuMemRelease failed on cpu: .*still mapped"):
        drv.release(handle)
    with pytest.raises(VmmError, match="cuMemAddressFree failed on cpu: .*still has chunks mapped"):
        drv.free(address, 4 * g)
    with pytest.raises(VmmError, match="cuMemAddressFree failed on cpu: .*not a whole reserved range"):
        drv.free(address, 2 * g)
    assert drv.mappings == {address: g, address + g: g}
    drv.unmap(address + g, g)
    drv.unmap(address, g)
    drv.release(handle)
    drv.release(other)
    drv.free(address, 4 * g)
    assert drv.mappings == {} and drv.reservations == {} and not _os_maps_a_chunk(address, 4 * g)


def _fail_call(name: str, nth: int = 1):
    """A fault hook failing the ``nth`` call of ``name`` from now on."""
    seen = {name: 0}

    def fault(call: str) -> bool:
        seen[name] += call == name
        return call == name and seen[name] == nth
    return fault


def test_a_failed_set_access_leaves_no_mapping_behind(granularity):
    drv = HostDriver(granularity, fault=lambda call: call == "cuMemSetAccess")
    arena, g = Arena(drv), granularity
    rng = VirtualRange(drv, 2 * g)
    chunk = arena.chunk(g)
    with pytest.raises(VmmError, match="cuMemSetAccess failed on cpu"):
        rng.push(chunk)
    assert drv.mappings == {} and not _os_maps_a_chunk(rng.address, rng.capacity)
    assert rng.chunks == [] and rng.mapped == 0
    with pytest.raises(VmmError, match="cuMemSetAccess failed on cpu"):
        arena.adopt(torch.ones(8))
    assert arena.allocated == g and drv.reservations == {rng.address: rng.capacity}  # nothing leaked

    drv.fault = None
    rng.push(chunk)  # the address was left free: the chunk maps there now
    rng.view(g)[:4] = 7
    assert drv.mappings == {rng.address: g}
    arena.release(rng.close())
    assert drv.mappings == {} and drv.reservations == {} and arena.allocated == 0


def test_a_failed_unmap_after_a_failed_set_access_says_the_mapping_stays(granularity):
    drv = HostDriver(granularity, fault=lambda call: call in ("cuMemSetAccess", "cuMemUnmap"))
    address, handle = drv.reserve(granularity), drv.create(granularity)
    with pytest.raises(VmmError, match="cuMemSetAccess failed on cpu.*stays mapped: cuMemUnmap failed on cpu"):
        drv.map(address, granularity, handle)
    assert drv.mappings == {address: granularity}  # so the driver knows it is there
    drv.fault = None
    drv.unmap(address, granularity)
    drv.release(handle)
    drv.free(address, granularity)


def test_an_extend_that_fails_midway_maps_none_of_its_chunks(granularity):
    arena = Arena(HostDriver(granularity))
    pool = _pool(arena)
    pages, mapped = pool.num_pages, arena.driver.mappings
    chunks = [arena.reclaim(t) for t in _layers(arena, 3)]
    arena.driver.fault = _fail_call("cuMemSetAccess", nth=3)
    with pytest.raises(VmmError, match="cuMemSetAccess failed on cpu"):
        pool.extend(chunks)
    assert pool.num_pages == pages and arena.driver.mappings == mapped
    arena.release(chunks)  # unmapped, so still the caller's to free (the driver refuses a mapped one)


class _Bindings:
    """Stands in for ``cuda.bindings.driver``: records every call; those named in ``fail``
    return an error, the others success with ``results[name]`` (if any)."""

    class CUresult:
        CUDA_SUCCESS = 0

    def __init__(self, fail: tuple[str, ...] = ()) -> None:
        self.fail, self.calls = fail, []
        self.results = {"cuMemAddressReserve": 1 << 40, "cuMemCreate": "handle"}

    def cuGetErrorName(self, err):
        return 0, b"CUDA_ERROR_INVALID_VALUE"

    def __getattr__(self, name: str):
        def call(*args):
            self.calls.append((name, args))
            err = 1 if name in self.fail else 0
            return (err, self.results[name]) if name in self.results else (err,)
        return call


class _Stream:
    def __init__(self) -> None:
        self.synchronized = 0

    def synchronize(self) -> None:
        self.synchronized += 1


@pytest.fixture
def stand_in_cuda(monkeypatch):
    """A ``CudaDriver`` over stand-in bindings, and the stand-in compute stream it waits on;
    waiting for the whole device fails the test."""
    from engines.vmm.cuda import CudaDriver

    def whole_device(*args, **kwargs):
        raise AssertionError("torch.cuda.synchronize: waits for every stream, NCCL's too")

    def make(fail: tuple[str, ...] = ()) -> tuple[CudaDriver, _Bindings, _Stream]:
        drv, cu, stream = object.__new__(CudaDriver), _Bindings(fail), _Stream()  # its __init__ needs a GPU
        drv._cu, drv.device, drv.granularity, drv.syncs = cu, torch.device("cuda", 0), MiB2, 0
        drv._prop, drv._access = "prop", ["access"]
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
        monkeypatch.setattr(torch.cuda, "synchronize", whole_device)
        return drv, cu, stream
    return make


def test_cuda_driver_waits_for_the_compute_stream_once_and_unmaps_in_reverse(stand_in_cuda):
    drv, cu, stream = stand_in_cuda()
    rng = VirtualRange(drv, 4 * MiB2)
    chunks = [Chunk(f"handle{i}", MiB2) for i in range(4)]
    for chunk in chunks:
        rng.push(chunk)
    assert stream.synchronized == 0  # mapping waits for nothing
    assert rng.close() == chunks
    assert stream.synchronized == 1 and drv.syncs == 1
    unmapped = [args for name, args in cu.calls if name == "cuMemUnmap"]
    assert unmapped == [(rng.address + i * MiB2, MiB2) for i in (3, 2, 1, 0)]  # the last mapped first
    assert cu.calls[-1] == ("cuMemAddressFree", (rng.address, 4 * MiB2))


def test_cuda_driver_unmaps_what_it_could_not_grant_access_to(stand_in_cuda):
    drv, cu, stream = stand_in_cuda(fail=("cuMemSetAccess",))
    rng = VirtualRange(drv, 2 * MiB2)
    with pytest.raises(VmmError, match="cuMemSetAccess failed on cuda:0: CUDA_ERROR_INVALID_VALUE"):
        rng.push(Chunk("handle", MiB2))
    assert [name for name, _ in cu.calls] == ["cuMemAddressReserve", "cuMemMap", "cuMemSetAccess", "cuMemUnmap"]
    assert cu.calls[-1][1] == (rng.address, MiB2) and rng.chunks == [] and rng.mapped == 0
    assert stream.synchronized == 0  # nothing ran on memory no kernel could reach

    drv, cu, _ = stand_in_cuda(fail=("cuMemSetAccess", "cuMemUnmap"))
    with pytest.raises(VmmError, match="cuMemSetAccess failed.*stays mapped: cuMemUnmap failed"):
        drv.map(1 << 40, MiB2, "handle")


def test_cuda_driver_checks_alignment_before_calling(stand_in_cuda):
    drv, cu, _ = stand_in_cuda()
    with pytest.raises(VmmError, match="cuMemCreate failed on cuda:0: size"):
        drv.create(MiB2 // 2)
    with pytest.raises(VmmError, match="cuMemMap failed on cuda:0: address"):
        drv.map((1 << 40) + 4096, MiB2, "handle")
    with pytest.raises(VmmError, match="cuMemUnmap failed on cuda:0: size"):
        drv.unmap(1 << 40, 4096)
    assert cu.calls == []


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
    drv._cu, drv.device, drv.granularity, drv.syncs = cu, torch.device("cuda", 0), MiB2, 0
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
        "create": lambda: drv.create(MiB2),
        "release": lambda: drv.release(handle),
        "map": lambda: drv.map(address, MiB2, handle),
        "cuMemSetAccess": lambda: drv._call("cuMemSetAccess", address, MiB2, drv._access, 1),
        "unmap": lambda: drv.unmap(address, MiB2),
    }
    for name, call in calls.items():
        with pytest.raises(Exception) as info:
            call()
        assert type(info.value).__name__ == "DynamicLibNotFoundError", (name, info.value)
