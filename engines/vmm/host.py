"""The virtual-memory driver for a CPU: Linux shared-memory chunks in reserved ranges.

A chunk is a ``memfd_create`` file with its pages allocated up front (``fallocate``), as
``cuMemCreate`` allocates device memory; mapping it is ``mmap(MAP_SHARED | MAP_FIXED)``
over part of a ``PROT_NONE`` reservation, and unmapping puts the reservation back. The
same physical pages can so be unmapped from one range and mapped into another, which is
what ``cuMemUnmap`` / ``cuMemMap`` do on a GPU.

It is the CUDA driver's stand-in in tests, so it follows CUDA's rules where the kernel
would be laxer: it refuses sizes and addresses off the granularity (which can be CUDA's
2 MiB), a map over a mapping or outside a reservation, an unmap or a free of part of
one, and the release of a mapped chunk. Mapping takes CUDA's two steps (map without
access, then grant it), each step is named after its CUDA call in errors, and ``fault``
makes a chosen call fail, to test what a failure leaves behind.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from typing import Callable

import torch

from engines.vmm.driver import VmmError, check_aligned, map_then_grant, round_up

# Linux's values (the same on x86-64 and arm64); Python's mmap module lacks MAP_FIXED.
_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MADV_POPULATE_READ = 22  # Linux 5.14; what MAP_POPULATE does for a shared mapping
_RESERVE = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    for name in ("munmap", "mprotect", "madvise"):
        getattr(libc, name).restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mprotect.argtypes = libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def resident_bytes() -> int:
    """The process's resident memory (Linux /proc): a CPU's "memory in use"."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * mmap.PAGESIZE


class HostDriver:
    """``VmmDriver`` over process memory, for ``torch.device("cpu")``.

    ``granularity``: a multiple of the page size; 2 MiB runs code at a GPU's granularity.
    ``fault``: called with each CUDA call's name before the step that stands for it; when
    it returns true, that step fails as the call would.
    """

    name = "host"

    def __init__(self, granularity: int = mmap.PAGESIZE, fault: Callable[[str], bool] | None = None) -> None:
        if not sys.platform.startswith("linux") or not hasattr(os, "memfd_create"):
            raise VmmError("the host virtual-memory driver needs Linux (memfd_create, mmap MAP_FIXED)")
        if granularity <= 0 or granularity % mmap.PAGESIZE:
            raise VmmError(f"granularity {granularity} is not a multiple of the page size {mmap.PAGESIZE}")
        self.device = torch.device("cpu")
        self.granularity = granularity
        self.fault = fault
        self.syncs = 0
        self._libc = _libc()
        self._failed = ctypes.c_void_p(-1).value
        self._reserved: dict[int, int] = {}
        self._mapped: dict[int, tuple[int, int]] = {}
        """Address -> (bytes, chunk's fd) of each mapping."""
        self._chunks: dict[int, int] = {}
        """Fd -> bytes of each chunk not released."""

    @property
    def mappings(self) -> dict[int, int]:
        """Address -> bytes of what is mapped now (tests check what a failure left behind)."""
        return {address: nbytes for address, (nbytes, _) in self._mapped.items()}

    @property
    def reservations(self) -> dict[int, int]:
        """Address -> bytes of the ranges reserved now."""
        return dict(self._reserved)

    def _fail(self, call: str, why: str) -> VmmError:
        return VmmError(f"{call} failed on {self.device}: {why}")

    def _enter(self, call: str) -> None:
        """Fail ``call`` if ``fault`` says so (once per call)."""
        if self.fault is not None and self.fault(call):
            raise self._fail(call, "injected fault")

    def _require(self, call: str, ok: bool, why: str) -> None:
        """Fail ``call`` as CUDA would (CUDA_ERROR_INVALID_VALUE) when one of its rules is broken."""
        if not ok:
            raise self._fail(call, why)

    def _errno(self, call: str, what: str) -> VmmError:
        return self._fail(call, f"{what}: {os.strerror(ctypes.get_errno())}")

    def _mmap(self, address: int, nbytes: int, prot: int, flags: int, fd: int, call: str) -> int:
        got = self._libc.mmap(address or None, nbytes, prot, flags, fd, 0)
        if got == self._failed or got is None:
            raise self._errno(call, f"mmap of {nbytes} bytes")
        return got

    def _munmap(self, address: int, nbytes: int, call: str) -> None:
        if nbytes and self._libc.munmap(address, nbytes) != 0:
            raise self._errno(call, f"munmap at {address:#x}")

    def reserve(self, nbytes: int) -> int:
        call = "cuMemAddressReserve"
        self._enter(call)
        self._require(call, nbytes > 0 and nbytes % mmap.PAGESIZE == 0,
                      f"size {nbytes:#x} is not a positive multiple of the page size")
        # mmap aligns to a page only: take one granule more and trim both ends.
        span = nbytes + self.granularity - mmap.PAGESIZE
        base = self._mmap(0, span, _PROT_NONE, _RESERVE, -1, call)
        address = round_up(base, self.granularity)
        self._munmap(base, address - base, call)
        self._munmap(address + nbytes, base + span - address - nbytes, call)
        self._reserved[address] = nbytes
        return address

    def free(self, address: int, nbytes: int) -> None:
        call = "cuMemAddressFree"
        self._enter(call)
        self._require(call, self._reserved.get(address) == nbytes,
                      f"{address:#x} (+{nbytes:#x}) is not a whole reserved range")
        self._require(call, not self._mapped_within(address, nbytes), f"{address:#x} still has chunks mapped")
        self._munmap(address, nbytes, call)
        del self._reserved[address]

    def create(self, nbytes: int) -> int:
        call = "cuMemCreate"
        self._enter(call)
        check_aligned(call, self.device, self.granularity, size=nbytes)
        fd = os.memfd_create("kunserve-chunk", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, nbytes)
            os.posix_fallocate(fd, 0, nbytes)  # the memory is taken now, not at first touch
        except OSError as exc:
            os.close(fd)
            raise self._fail(call, f"allocating {nbytes} bytes: {exc}") from None
        self._chunks[fd] = nbytes
        return fd

    def release(self, handle: object) -> None:
        call, fd = "cuMemRelease", int(handle)
        self._enter(call)
        self._require(call, fd in self._chunks, f"{fd} is not a chunk of this driver")
        self._require(call, all(f != fd for _, f in self._mapped.values()), "the chunk is still mapped")
        os.close(fd)  # the pages go once no mapping holds them
        del self._chunks[fd]

    def map(self, address: int, nbytes: int, handle: object) -> None:
        fd = int(handle)
        map_then_grant(address, lambda: self._map(address, nbytes, fd), lambda: self._grant(address, nbytes),
                       lambda: self.unmap(address, nbytes))

    def _map(self, address: int, nbytes: int, fd: int) -> None:
        """``cuMemMap``: the chunk's pages at ``address``, without access yet."""
        call = "cuMemMap"
        self._enter(call)
        check_aligned(call, self.device, self.granularity, address=address, size=nbytes)
        self._require(call, nbytes <= self._chunks.get(fd, -1), f"{fd} is no chunk of {nbytes:#x} bytes or more")
        self._require(call, self._inside_reservation(address, nbytes), f"{address:#x} is outside a reserved range")
        self._require(call, not self._mapped_within(address, nbytes), f"{address:#x} is mapped already")
        self._mmap(address, nbytes, _PROT_NONE, _MAP_SHARED | _MAP_FIXED, fd, call)
        self._mapped[address] = (nbytes, fd)

    def _grant(self, address: int, nbytes: int) -> None:
        """``cuMemSetAccess``: read-write. The page tables are filled now, in one pass, as
        CUDA does, rather than by a fault per 4 KiB page at first touch (the weight pull on
        restore, which receives into freshly mapped chunks: 72 ms in a run of
        perf.bench_kunserve without it, 56 ms in a later run with it)."""
        call = "cuMemSetAccess"
        self._enter(call)
        if self._libc.mprotect(address, nbytes, _PROT_RW) != 0:
            raise self._errno(call, f"mprotect at {address:#x}")
        if self._libc.madvise(address, nbytes, _MADV_POPULATE_READ) != 0 and ctypes.get_errno() != errno.EINVAL:
            raise self._errno(call, f"populating {address:#x}")  # EINVAL: a kernel before 5.14

    def sync(self) -> None:
        # Nothing to wait for: torch's CPU kernels have finished when they return.
        self.syncs += 1

    def unmap(self, address: int, nbytes: int) -> None:
        call = "cuMemUnmap"
        self._enter(call)
        self._require(call, self._mapped.get(address, (None,))[0] == nbytes,
                      f"{address:#x} (+{nbytes:#x}) is not one whole mapping")
        # Replacing the mapping keeps the range reserved (munmap would let anything land there).
        self._mmap(address, nbytes, _PROT_NONE, _RESERVE | _MAP_FIXED, -1, call)
        del self._mapped[address]

    def _inside_reservation(self, address: int, nbytes: int) -> bool:
        return any(a <= address and address + nbytes <= a + n for a, n in self._reserved.items())

    def _mapped_within(self, address: int, nbytes: int) -> bool:
        return any(a < address + nbytes and address < a + n for a, (n, _) in self._mapped.items())

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8)

    def memory_in_use(self) -> int:
        return resident_bytes()
