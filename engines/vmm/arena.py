"""Reserved ranges with chunks mapped back to back, and the per-device arena of buffers."""

from __future__ import annotations

import logging

import torch

from engines.vmm.driver import Chunk, VmmDriver, VmmError

logger = logging.getLogger(__name__)


class VirtualRange:
    """A reserved address range whose first ``mapped`` bytes are chunks, mapped in order.

    Chunks are pushed onto and popped off the end, so the mapped part is always one
    contiguous prefix: a tensor over it sees one buffer, whichever chunks back it.
    """

    def __init__(self, driver: VmmDriver, capacity: int) -> None:
        self.driver = driver
        self.capacity = round_up(max(capacity, 1), driver.granularity)
        self.address = driver.reserve(self.capacity)
        self.chunks: list[Chunk] = []
        self.mapped = 0

    def check_room(self, nbytes: int) -> None:
        """Raise unless ``nbytes`` more can be mapped."""
        if self.mapped + nbytes > self.capacity:
            raise VmmError(f"{nbytes} bytes of chunks do not fit: {self.mapped} of {self.capacity} "
                           "reserved bytes are mapped")

    def push(self, chunk: Chunk) -> None:
        """Map ``chunk`` right after the chunks already mapped."""
        self.check_room(chunk.nbytes)
        self.driver.map(self.address + self.mapped, chunk.nbytes, chunk.handle)
        self.chunks.append(chunk)
        self.mapped += chunk.nbytes

    def pop(self) -> Chunk:
        """Unmap the last chunk and hand it over (still allocated)."""
        chunk = self.chunks[-1]
        self.driver.unmap(self.address + self.mapped - chunk.nbytes, chunk.nbytes)
        self.chunks.pop()
        self.mapped -= chunk.nbytes
        return chunk

    def view(self, nbytes: int) -> torch.Tensor:
        """``uint8`` tensor over the first ``nbytes`` of the range (may run past ``mapped``:
        the caller touches only what is mapped)."""
        if nbytes > self.capacity:
            raise VmmError(f"a view of {nbytes} bytes is larger than the range ({self.capacity})")
        return self.driver.tensor(self.address, nbytes)

    def close(self) -> list[Chunk]:
        """Unmap everything, give the address space back; the chunks that were mapped."""
        chunks = [self.pop() for _ in range(len(self.chunks))][::-1]
        self.driver.free(self.address, self.capacity)
        return chunks


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class Arena:
    """One device's memory for weights and KV, in chunks that can change roles.

    Each weight buffer made here has a range and a chunk of its own; ``reclaim`` takes the
    chunk back from under a buffer that is no longer used, for the KV pool to map onto its
    tail, and ``place`` maps a chunk under a new buffer (restored weights).
    """

    def __init__(self, driver: VmmDriver) -> None:
        self.driver = driver
        self._buffers: dict[int, VirtualRange] = {}
        self.allocated = 0
        """Bytes of the chunks allocated here and not released."""

    @property
    def granularity(self) -> int:
        return self.driver.granularity

    def chunk(self, nbytes: int) -> Chunk:
        """Allocate a chunk of at least ``nbytes`` (rounded up to the granularity)."""
        size = round_up(max(nbytes, 1), self.granularity)
        chunk = Chunk(self.driver.create(size), size)
        self.allocated += size
        return chunk

    def release(self, chunks: list[Chunk]) -> None:
        """Free chunks' memory (none may be mapped)."""
        for chunk in chunks:
            self.driver.release(chunk.handle)
            self.allocated -= chunk.nbytes

    def place(self, chunk: Chunk, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of ``numel`` elements over ``chunk``, mapped in a range of its own."""
        nbytes = numel * dtype.itemsize
        if nbytes > chunk.nbytes:
            raise VmmError(f"{numel} x {dtype} ({nbytes} bytes) does not fit a chunk of {chunk.nbytes}")
        rng = VirtualRange(self.driver, chunk.nbytes)
        rng.push(chunk)
        tensor = rng.view(nbytes).view(dtype)
        self._buffers[tensor.data_ptr()] = rng
        return tensor

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` in a chunk of its own (same shape and dtype)."""
        flat = self.place(self.chunk(tensor.numel() * tensor.element_size()), tensor.numel(), tensor.dtype)
        flat.copy_(tensor.reshape(-1))
        return flat.view(tensor.shape)

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is (a view starting at) a buffer made by ``place``."""
        return tensor.data_ptr() in self._buffers

    def footprint(self, tensor: torch.Tensor) -> int:
        """Bytes of memory behind a buffer: its chunk's size for buffers made here."""
        rng = self._buffers.get(tensor.data_ptr())
        return rng.mapped if rng is not None else tensor.numel() * tensor.element_size()

    def reclaim(self, tensor: torch.Tensor) -> Chunk:
        """Take a buffer's chunk back. The buffer (and every view of it) must not be used
        again: its addresses no longer have memory behind them."""
        rng = self._buffers.pop(tensor.data_ptr(), None)
        if rng is None:
            raise VmmError("this tensor was not made by the arena")
        [chunk] = rng.close()
        return chunk
