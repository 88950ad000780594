"""The interface a virtual-memory driver offers, and the choice of driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class VmmError(RuntimeError):
    """A virtual-memory operation failed, or the driver is not available here."""


@dataclass(eq=False)
class Chunk:
    """One physical allocation. It is mapped into at most one range at a time, and whoever
    holds the ``Chunk`` owns it: mapping it elsewhere, or releasing it, is theirs to do."""

    handle: object
    nbytes: int


class VmmDriver(Protocol):
    """Reserve address ranges, create physical chunks, and map chunks into ranges."""

    name: str
    device: torch.device
    granularity: int
    """Sizes and offsets of chunks and ranges are multiples of this many bytes."""

    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` of address space (no memory behind it); its address."""

    def free(self, address: int, nbytes: int) -> None:
        """Give a reserved range (with nothing mapped in it) back."""

    def create(self, nbytes: int) -> object:
        """Allocate ``nbytes`` of physical memory; a handle to it."""

    def release(self, handle: object) -> None:
        """Free a chunk's physical memory (it must not be mapped)."""

    def map(self, address: int, nbytes: int, handle: object) -> None:
        """Map a whole chunk at ``address`` inside a reserved range, readable and writable."""

    def unmap(self, address: int, nbytes: int) -> None:
        """Unmap what is mapped at ``address`` (the range stays reserved). Work the device
        has queued on that memory finishes first."""

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        """A ``uint8`` tensor over ``[address, address + nbytes)``; it does not own the memory."""

    def memory_in_use(self) -> int:
        """Memory in use as the system reports it, for measurements: the whole GPU's on
        CUDA, this process's resident set on a CPU."""


def make_driver(device: torch.device) -> VmmDriver:
    """The driver for ``device``: CUDA's virtual-memory API on a GPU, shared memory on a CPU."""
    if device.type == "cuda":
        from engines.vmm.cuda import CudaDriver
        return CudaDriver(device)
    if device.type == "cpu":
        from engines.vmm.host import HostDriver
        return HostDriver()
    raise VmmError(f"no virtual-memory driver for device type {device.type!r}")
