"""The interface a virtual-memory driver offers, the rules both drivers enforce, and the
choice of driver."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

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
    """Reserve address ranges, create physical chunks, and map chunks into ranges.

    Sizes and addresses follow CUDA's rules on both drivers (the host driver enforces them,
    so that code sized wrongly fails on a CPU as it would on a GPU): chunks, mappings and
    their addresses are multiples of ``granularity``; an unmap or a free names exactly one
    whole mapping or reservation.
    """

    name: str
    device: torch.device
    granularity: int
    """Sizes and offsets of chunks and ranges are multiples of this many bytes."""
    syncs: int
    """How many times ``sync`` has waited: one per batch of unmaps (a drop, a restore),
    however many chunks the batch unmaps."""

    def reserve(self, nbytes: int) -> int:
        """Reserve ``nbytes`` of address space (no memory behind it), aligned to the
        granularity; its address."""

    def free(self, address: int, nbytes: int) -> None:
        """Give a reserved range (with nothing mapped in it) back."""

    def create(self, nbytes: int) -> object:
        """Allocate ``nbytes`` of physical memory; a handle to it."""

    def release(self, handle: object) -> None:
        """Free a chunk's physical memory (it must not be mapped)."""

    def map(self, address: int, nbytes: int, handle: object) -> None:
        """Map a whole chunk at ``address`` inside a reserved range, readable and writable.
        If it raises, nothing is left mapped there."""

    def sync(self) -> None:
        """Wait for the work queued so far that may use memory about to be unmapped: the
        compute (current) stream's kernels. Not the whole device: a rank waiting here for
        its NCCL streams could wait on a transfer its peer, in its own drop, never posts.
        Transfers on the memory are the caller's to have waited for."""

    def unmap(self, address: int, nbytes: int) -> None:
        """Unmap what is mapped at ``address`` (the range stays reserved). It does not wait:
        the caller has called ``sync`` since the memory was last used, once for a batch."""

    def tensor(self, address: int, nbytes: int) -> torch.Tensor:
        """A ``uint8`` tensor over ``[address, address + nbytes)``; it does not own the memory."""

    def memory_in_use(self) -> int:
        """Memory in use as the system reports it, for measurements: the whole GPU's on
        CUDA, this process's resident set on a CPU."""


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def check_aligned(call: str, device: torch.device, granularity: int, **values: int) -> None:
    """Raise, naming the call, unless every value is a multiple of ``granularity`` (sizes
    positive): CUDA refuses such a call with CUDA_ERROR_INVALID_VALUE, the host driver here."""
    for what, value in values.items():
        if value % granularity or (what == "size" and value <= 0):
            raise VmmError(f"{call} failed on {device}: {what} {value:#x} is not a positive multiple "
                           f"of the granularity {granularity:#x}")


def map_then_grant(address: int, mapping: Callable[[], None], grant: Callable[[], None],
                   undo: Callable[[], None]) -> None:
    """Map, then grant access; if the grant fails, unmap before raising. The caller records
    a mapping only once ``map`` returns, so one left behind would be unknown to it: its
    address could not be mapped again, nor its chunk moved."""
    mapping()
    try:
        grant()
    except VmmError as exc:
        try:
            undo()
        except VmmError as undo_exc:
            raise VmmError(f"{exc}; unmapping {address:#x} again failed too, it stays mapped: "
                           f"{undo_exc}") from exc
        raise


def make_driver(device: torch.device) -> VmmDriver:
    """The driver for ``device``: CUDA's virtual-memory API on a GPU, shared memory on a CPU."""
    if device.type == "cuda":
        from engines.vmm.cuda import CudaDriver
        return CudaDriver(device)
    if device.type == "cpu":
        from engines.vmm.host import HostDriver
        return HostDriver()
    raise VmmError(f"no virtual-memory driver for device type {device.type!r}")
