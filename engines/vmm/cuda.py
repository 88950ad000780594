"""The virtual-memory driver for a GPU: CUDA's driver API through ``cuda.bindings.driver``.

Chunks are ``cuMemCreate`` allocations of pinned device memory, ranges come from
``cuMemAddressReserve``, and mapping is ``cuMemMap`` followed by ``cuMemSetAccess``
(read-write for the device). Tensors over a range are made with torch's
``__cuda_array_interface__`` support, so torch kernels read and write the mapped memory
in place. All calls run in the device's primary context, the one torch uses.

Unmapping waits for the compute stream (``sync``), once for a batch of unmaps, as torch's
own expandable segments do (``cudaStreamSynchronize`` on the segment's stream before
``cuMemUnmap``), since ``cuMemUnmap`` is not documented to wait for kernels still using
the memory. Not ``torch.cuda.synchronize``: that waits for NCCL's streams too.
"""

from __future__ import annotations

import torch

from engines.vmm.driver import VmmError, check_aligned, map_then_grant

INSTALL_HINT = "pip install 'kunserve-orchestrator[cuda]' (cuda-bindings 12.x)"


class _DeviceBytes:
    """What ``torch.as_tensor`` needs to wrap device memory it does not own."""

    def __init__(self, address: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "strides": None, "version": 2}


class CudaDriver:
    """``VmmDriver`` for one CUDA device."""

    name = "cuda"

    def __init__(self, device: torch.device) -> None:
        try:
            from cuda.bindings import driver as cu
        except ImportError:
            raise VmmError(f"the CUDA virtual-memory path needs cuda.bindings: {INSTALL_HINT}") from None
        if not torch.cuda.is_available():
            raise VmmError("the CUDA virtual-memory path needs a CUDA build of torch and a GPU")
        self._cu = cu
        self.syncs = 0
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        torch.empty(1, device=self.device)  # torch creates (and makes current) its context
        try:
            self._call("cuInit", 0)
        except VmmError:
            raise
        except Exception as exc:  # noqa: BLE001 - the bindings raise their own types for a missing driver
            raise VmmError(f"the CUDA driver library could not be loaded: {exc}") from None
        cu_device = self._call("cuDeviceGet", index)
        self._context = self._call("cuDevicePrimaryCtxRetain", cu_device)
        self._call("cuCtxSetCurrent", self._context)
        self._prop, self._access = _describe(cu, index)
        flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
        self.granularity = int(self._call("cuMemGetAllocationGranularity", self._prop, flag))

    def _call(self, name: str, *args):
        """Call a driver function; raise on an error, return its results (if any)."""
        cu = self._cu
        result = getattr(cu, name)(*args)
        err, rest = result[0], result[1:]
        if err != cu.CUresult.CUDA_SUCCESS:
            _, text = cu.cuGetErrorName(err)
            text = text.decode() if isinstance(text, bytes) else str(err)
            raise VmmError(f"{name} failed on {self.device}: {text}")
        return rest[0] if len(rest) == 1 else rest

    def reserve(self, nbytes: int) -> int:
        return int(self._call("cuMemAddressReserve", nbytes, self.granularity, 0, 0))

    def free(self, address: int, nbytes: int) -> None:
        self._call("cuMemAddressFree", address, nbytes)

    def create(self, nbytes: int) -> object:
        check_aligned("cuMemCreate", self.device, self.granularity, size=nbytes)
        return self._call("cuMemCreate", nbytes, self._prop, 0)

    def release(self, handle: object) -> None:
        self._call("cuMemRelease", handle)

    def map(self, address: int, nbytes: int, handle: object) -> None:
        check_aligned("cuMemMap", self.device, self.granularity, address=address, size=nbytes)
        map_then_grant(address, lambda: self._call("cuMemMap", address, nbytes, 0, handle, 0),
                       lambda: self._call("cuMemSetAccess", address, nbytes, self._access, 1),
                       lambda: self._call("cuMemUnmap", address, nbytes))

    def sync(self) -> None:
        # The stream torch launches the runners' kernels on; NCCL's streams are not waited for.
        torch.cuda.current_stream(self.device).synchronize()
        self.syncs += 1

    def unmap(self, address: int, nbytes: int) -> None:
        check_aligned("cuMemUnmap", self.device, self.granularity, address=address, size=nbytes)
        self._call("cuMemUnmap", address, nbytes)

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8, device=self.device)
        return torch.as_tensor(_DeviceBytes(address, nbytes), device=self.device)

    def memory_in_use(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free


def _describe(cu, index: int) -> tuple[object, list]:
    """The allocation properties (pinned device memory on GPU ``index``) and the access
    descriptor (read-write from that GPU) every chunk and mapping uses."""
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = index
    access = cu.CUmemAccessDesc()
    access.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    access.location.id = index
    access.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return prop, [access]
