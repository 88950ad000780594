"""Where weights pulled back by a restore live: the memory the KV extension gives up.

A restore empties the pages a drop added to the KV pool and hands their memory to the
weights about to arrive, so that memory which became KV turns back into weights without
a trip through the allocator. Which kind of memory that is depends on how the pool grew:

- ``RegionMemory``: a committed flat region (the tail of a CPU pool that grew by
  committing pages), cut into aligned pieces by a bump allocator; what is left over is
  handed back to the OS;
- ``ChunkMemory``: the physical chunks unmapped from a remapped pool's tail (CUDA
  virtual memory, or its shared-memory counterpart on a CPU), each mapped under a buffer
  of its own size; chunks left over are freed.

Both fall back to fresh memory for a buffer they cannot hold.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from engines.kv_cache import KVPool
from engines.vmm import Arena, Chunk
from engines.vmm.arena import round_up


class WeightMemory(Protocol):
    """Hands out buffers for restored weights, then gives back what was not taken."""

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised buffer of ``shape``."""

    def finish(self) -> None:
        """Give back the memory nobody took (call once, after the last ``take``)."""


class RegionMemory:
    """Aligned pieces of one flat, committed region (or fresh memory without one)."""

    _ALIGN = 64

    def __init__(self, region: torch.Tensor | None = None, pool: KVPool | None = None) -> None:
        self.region = region
        self.pool = pool
        self.used = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        r = self.region
        if r is not None and r.dtype == dtype and self.used + numel <= r.numel():
            out = r[self.used:self.used + numel].view(shape)
            self.used = -(-(self.used + numel) // self._ALIGN) * self._ALIGN
            return out
        return torch.empty(shape, dtype=dtype, device=device)

    def rest(self) -> torch.Tensor | None:
        """The part of the region nobody took."""
        return None if self.region is None else self.region[min(self.used, self.region.numel()):]

    def finish(self) -> None:
        rest = self.rest()
        if rest is not None and self.pool is not None:
            self.pool.release(rest)


class ChunkMemory:
    """Each buffer in a chunk of exactly its rounded size, mapped in a range of its own."""

    def __init__(self, arena: Arena, chunks: list[Chunk]) -> None:
        self.arena = arena
        self.chunks = list(chunks)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        size = round_up(numel * dtype.itemsize, self.arena.granularity)
        # Exact sizes only: a small tensor must not take a layer's chunk from the layer.
        chunk = next((c for c in self.chunks if c.nbytes == size), None)
        if chunk is None:
            return torch.empty(shape, dtype=dtype, device=device)
        self.chunks.remove(chunk)
        return self.arena.place(chunk, numel, dtype).view(shape)

    def finish(self) -> None:
        self.arena.release(self.chunks)
        self.chunks = []
