"""Swap preemption (the InferCept / vLLM ``swap`` baseline): a preempted request's KV
goes to host memory and comes back when it is rescheduled, so nothing is recomputed.

The scheduler sees only the small ``Swapper`` protocol; ``HostSwapSpace`` is the tensor
side. It keeps, per swapped request, ONE contiguous host tensor holding the pages of
every layer (``[layers * pages, 2, page_size, kv_heads, head_size]``), copied out of the
KV pool with one ``index_select`` and back with one ``index_copy_`` into the pages the
request gets on its return. Copies are blocking: the step that follows reads or reuses
the pages, and the recorded seconds are then the real cost of the swap.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from engines.kv_cache import KVPool
from engines.paging import pages_for_tokens
from orchestrator.core.request import Request

DEFAULT_SWAP_SPACE = 4 << 30
"""Bytes of host swap space by default (vLLM's ``swap_space`` is 4 GiB too)."""

ONE_RANK_ONLY = ("swap preemption needs the instance's KV on one rank (a single KV pool); "
                 "a pipeline group spreads it over {} pools")


class Swapper(Protocol):
    """What the scheduler needs from a swap space; it never sees tensors."""

    def swap_out(self, req: Request) -> bool:
        """Save the KV of ``req``'s computed tokens off the device; False if there is no room
        (then nothing was saved and the request must be recomputed)."""
        ...

    def swap_in(self, req: Request) -> None:
        """Restore the saved KV into ``req.block_table`` (newly allocated) and drop the copy."""
        ...

    def discard(self, req: Request) -> None:
        """Drop the saved KV of ``req`` (aborted, or handed elsewhere to be recomputed)."""
        ...


@dataclass
class SwapStats:
    """Counters of a swap space, for metrics."""

    bytes_used: int = 0
    """Host bytes held now."""
    peak_bytes: int = 0
    num_swap_out: int = 0
    num_swap_in: int = 0
    num_rejected: int = 0
    """Swap-outs refused because the space was full (those requests were recomputed)."""
    num_discarded: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    swap_out_seconds: float = 0.0
    swap_in_seconds: float = 0.0


@dataclass
class _Saved:
    host: torch.Tensor
    pages_per_layer: int


class HostSwapSpace:
    """Host memory holding the KV of swapped-out requests, for one single-pool instance."""

    def __init__(self, pools: KVPool | Sequence[KVPool], capacity_bytes: int = DEFAULT_SWAP_SPACE) -> None:
        pools = [pools] if isinstance(pools, KVPool) else list(pools)
        if len(pools) != 1:
            raise NotImplementedError(ONE_RANK_ONLY.format(len(pools)))
        if capacity_bytes < 0:
            raise ValueError("swap space capacity must be >= 0 bytes")
        self.kv = pools[0]
        self.capacity_bytes = capacity_bytes
        self.stats = SwapStats()
        self._saved: dict[int, _Saved] = {}
        # Pinned host memory makes the device copies real DMA transfers (as vLLM's swap does).
        self._pin = self.kv.data.device.type == "cuda"

    def __contains__(self, req: Request) -> bool:
        return req.seq_id in self._saved

    def __len__(self) -> int:
        return len(self._saved)

    def swap_out(self, req: Request) -> bool:
        """Copy the pages holding ``req``'s computed tokens to host memory."""
        if req.seq_id in self._saved:
            raise RuntimeError(f"{req.request_id} is already swapped out")
        # Only pages of computed tokens: pages reserved for a chunk that never ran hold nothing.
        per_layer = pages_for_tokens(req.num_computed_tokens, self.kv.page_size)
        pages = [p for row in req.block_table for p in row[:per_layer]]
        if not pages:
            return False  # nothing computed: recomputing costs nothing
        nbytes = len(pages) * self.kv.page_bytes
        if self.stats.bytes_used + nbytes > self.capacity_bytes:
            self.stats.num_rejected += 1
            return False
        start = time.perf_counter()
        host = self._to_host(self.kv.data.index_select(0, self._index(pages)))
        self._saved[req.seq_id] = _Saved(host, per_layer)
        s = self.stats
        s.swap_out_seconds += time.perf_counter() - start
        s.num_swap_out += 1
        s.bytes_out += nbytes
        s.bytes_used += nbytes
        s.peak_bytes = max(s.peak_bytes, s.bytes_used)
        return True

    def swap_in(self, req: Request) -> None:
        """Copy the saved pages into the first pages of each layer of ``req.block_table``."""
        saved = self._saved.pop(req.seq_id, None)
        if saved is None:
            raise RuntimeError(f"{req.request_id} has no KV in the swap space")
        n = saved.pages_per_layer
        if len(req.block_table) * n != saved.host.shape[0] or any(len(row) < n for row in req.block_table):
            raise RuntimeError(f"{req.request_id}: the new block table cannot hold its {n} pages per layer")
        start = time.perf_counter()
        pages = [p for row in req.block_table for p in row[:n]]
        self.kv.data.index_copy_(0, self._index(pages), saved.host.to(self.kv.data.device))
        s = self.stats
        s.swap_in_seconds += time.perf_counter() - start
        s.num_swap_in += 1
        s.bytes_in += self._nbytes(saved)
        s.bytes_used -= self._nbytes(saved)

    def discard(self, req: Request) -> None:
        """Free the host copy of ``req`` if there is one."""
        saved = self._saved.pop(req.seq_id, None)
        if saved is not None:
            self.stats.num_discarded += 1
            self.stats.bytes_used -= self._nbytes(saved)

    def _index(self, pages: list[int]) -> torch.Tensor:
        return torch.tensor(pages, dtype=torch.long, device=self.kv.data.device)

    def _to_host(self, gathered: torch.Tensor) -> torch.Tensor:
        if gathered.device.type == "cpu":
            return gathered  # index_select already made a separate copy
        host = torch.empty(gathered.shape, dtype=gathered.dtype, pin_memory=self._pin)
        host.copy_(gathered)
        return host

    def _nbytes(self, saved: _Saved) -> int:
        return saved.host.shape[0] * self.kv.page_bytes
