"""The virtual-memory driver for a CPU: Linux shared-memory chunks in reserved ranges.

A chunk is a ``memfd_create`` file with its pages allocated up front (``fallocate``), as
``cuMemCreate`` allocates device memory; mapping it is ``mmap(MAP_SHARED | MAP_FIXED)``
over part of a ``PROT_NONE`` reservation, and unmapping puts the reservation back. The
same physical pages can so be unmapped from one range and mapped into another, which is
what ``cuMemUnmap`` / ``cuMemMap`` do on a GPU.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import torch

from engines.vmm.driver import VmmError

# Linux's values (the same on x86-64 and arm64); Python's mmap module lacks MAP_FIXED.
_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MAP_POPULATE = 0x8000
_RESERVE = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


def resident_bytes() -> int:
    """The process's resident memory (Linux /proc): a CPU's "memory in use"."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


class HostDriver:
    """``VmmDriver`` over process memory, for ``torch.device("cpu")``."""

    name = "host"

    def __init__(self, granularity: int = mmap.PAGESIZE) -> None:
        if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
            raise VmmError("the host virtual-memory driver needs Linux (memfd_create, mmap MAP_FIXED)")
        if granularity <= 0 or granularity % mmap.PAGESIZE:
            raise VmmError(f"granularity {granularity} is not a multiple of the page size {mmap.PAGESIZE}")
        self.device = torch.device("cpu")
        self.granularity = granularity
        self._libc = _libc()
        self._failed = ctypes.c_void_p(-1).value

    def _mmap(self, address: int, nbytes: int, prot: int, flags: int, fd: int, what: str) -> int:
        got = self._libc.mmap(address or None, nbytes, prot, flags, fd, 0)
        if got == self._failed or got is None:
            err = ctypes.get_errno()
            raise VmmError(f"{what} of {nbytes} bytes failed: {os.strerror(err)}")
        return got

    def reserve(self, nbytes: int) -> int:
        return self._mmap(0, nbytes, _PROT_NONE, _RESERVE, -1, "reserving address space")

    def free(self, address: int, nbytes: int) -> None:
        if self._libc.munmap(address, nbytes) != 0:
            raise VmmError(f"freeing the range at {address:#x}: {os.strerror(ctypes.get_errno())}")

    def create(self, nbytes: int) -> int:
        fd = os.memfd_create("kunserve-chunk", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)  # the memory is taken now, not at first touch
        except OSError as exc:
            os.close(fd)
            raise VmmError(f"allocating a chunk of {nbytes} bytes failed: {exc}") from None
        return fd

    def release(self, handle: object) -> None:
        os.close(int(handle))  # the pages go once no mapping holds them

    def map(self, address: int, nbytes: int, handle: object) -> None:
        # Populated: the page tables are filled now, in one pass, as cuMemMap does, rather
        # than by a fault per 4 KiB page at first touch (the weight pull on restore, which
        # receives into freshly mapped chunks: 72 ms in a run of perf.bench_kunserve
        # without it, 56 ms in a later run with it).
        self._mmap(address, nbytes, _PROT_RW, _MAP_SHARED | _MAP_FIXED | _MAP_POPULATE, int(handle),
                   "mapping a chunk")

    def unmap(self, address: int, nbytes: int) -> None:
        # Replacing the mapping keeps the range reserved (munmap would let anything land there).
        self._mmap(address, nbytes, _PROT_NONE, _RESERVE | _MAP_FIXED, -1, "unmapping a chunk")

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)

    def memory_in_use(self) -> int:
        return resident_bytes()
