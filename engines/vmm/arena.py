"""Reserved ranges with chunks mapped back to back, and the per-device arena of buffers.

Unmapping waits for the device once per batch (``VmmDriver.sync``), not once per chunk:
``VirtualRange.pop_many``, ``Arena.reclaim_all`` and the pool's ``detach_chunks`` unmap
any number of chunks after one wait.
"""

from __future__ import annotations

import logging

import torch

from engines.vmm.driver import Chunk, VmmDriver, VmmError, round_up

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
        """Map ``chunk`` right after the chunks already mapped (if the driver raises, nothing
        was mapped and the chunk is still the caller's)."""
        self.check_room(chunk.nbytes)
        self.driver.map(self.address + self.mapped, chunk.nbytes, chunk.handle)
        self.chunks.append(chunk)
        self.mapped += chunk.nbytes

    def pop(self, synced: bool = False) -> Chunk:
        """Unmap the last chunk and hand it over (still allocated). ``synced``: see ``pop_many``."""
        [chunk] = self.pop_many(1, synced)
        return chunk

    def pop_many(self, count: int, synced: bool = False) -> list[Chunk]:
        """Unmap the last ``count`` chunks, the last one first, and hand them over in mapped
        order. One wait for the device covers them all; none when ``synced`` (the caller
        has called ``driver.sync()`` since the memory was last used) or nothing is unmapped."""
        if not 0 <= count <= len(self.chunks):
            raise VmmError(f"cannot unmap {count} of the {len(self.chunks)} chunks mapped")
        if count and not synced:
            self.driver.sync()
        popped = []
        for _ in range(count):
            chunk = self.chunks[-1]
            self.driver.unmap(self.address + self.mapped - chunk.nbytes, chunk.nbytes)
            self.chunks.pop()
            self.mapped -= chunk.nbytes
            popped.append(chunk)
        return popped[::-1]

    def view(self, nbytes: int) -> torch.Tensor:
        """``uint8`` tensor over the first ``nbytes`` of the range (may run past ``mapped``:
        the caller touches only what is mapped)."""
        if nbytes > self.capacity:
            raise VmmError(f"a view of {nbytes} bytes is larger than the range ({self.capacity})")
        return self.driver.tensor(self.address, nbytes)

    def close(self, synced: bool = False) -> list[Chunk]:
        """Unmap everything, give the address space back; the chunks that were mapped."""
        chunks = self.pop_many(len(self.chunks), synced)
        self.driver.free(self.address, self.capacity)
        return chunks


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
        """A flat tensor of ``numel`` elements over ``chunk``, mapped in a range of its own.
        If mapping fails, the range is given back and the chunk stays the caller's."""
        nbytes = numel * dtype.itemsize
        if nbytes > chunk.nbytes:
            raise VmmError(f"{numel} x {dtype} ({nbytes} bytes) does not fit a chunk of {chunk.nbytes}")
        rng = VirtualRange(self.driver, chunk.nbytes)
        try:
            rng.push(chunk)
        except VmmError:
            rng.close()
            raise
        tensor = rng.view(nbytes).view(dtype)
        self._buffers[tensor.data_ptr()] = rng
        return tensor

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        """A copy of ``tensor`` in a chunk of its own (same shape and dtype); nothing is
        left allocated if mapping the chunk fails."""
        chunk = self.chunk(tensor.numel() * tensor.element_size())
        try:
            flat = self.place(chunk, tensor.numel(), tensor.dtype)
        except VmmError:
            self.release([chunk])
            raise
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
        [chunk] = self.reclaim_all([tensor])
        return chunk

    def reclaim_all(self, tensors: list[torch.Tensor]) -> list[Chunk]:
        """``reclaim`` each buffer, after a single wait for the device (a drop's, however
        many buffers it drops); the chunks in the same order. Nothing is unmapped unless
        every tensor is a distinct buffer made here."""
        ptrs = [t.data_ptr() for t in tensors]
        if len(set(ptrs)) != len(ptrs):
            raise VmmError("a buffer is named twice")
        if any(p not in self._buffers for p in ptrs):
            raise VmmError("this tensor was not made by the arena")
        if ptrs:
            self.driver.sync()
        return [self._buffers.pop(p).close(synced=True)[0] for p in ptrs]
