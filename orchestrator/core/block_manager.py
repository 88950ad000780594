"""KV page bookkeeping for one instance's requests: pure CPU, no tensors, no model.

Pages are layer-granular: a request that holds ``t`` tokens owns ``ceil(t / page_size)``
pages in each layer, listed per layer in ``Request.block_table``. An instance has one pool
per member rank (a replica has one; a pp-g group has g, each holding the KV of its stage's
layers only), and a layer's pages come from the pool of the rank that runs the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from engines.mapping import LayerRange
from engines.paging import PageAllocator, pages_for_tokens
from orchestrator.core.request import Request


@dataclass(frozen=True)
class PoolSpec:
    """One rank's KV pool as the instance sees it: the layers it holds and its page count."""

    layers: LayerRange
    num_pages: int


class BlockManager:
    """Allocates and frees the KV pages of requests on one instance."""

    def __init__(self, page_size: int, pools: list[PoolSpec]) -> None:
        if not pools:
            raise ValueError("an instance needs at least one KV pool")
        self.page_size = page_size
        self.specs = list(pools)
        self.allocators = [PageAllocator(p.num_pages) for p in pools]
        self.num_layers = sum(len(p.layers) for p in pools)

    @classmethod
    def single(cls, num_pages: int, page_size: int, num_layers: int) -> "BlockManager":
        """One pool holding every layer (a replica, or stages sharing one process)."""
        return cls(page_size, [PoolSpec(LayerRange(0, num_layers), num_pages)])

    @property
    def num_pages(self) -> int:
        return sum(a.num_pages for a in self.allocators)

    def usage(self) -> list[tuple[int, int]]:
        """``(used, total)`` pages per pool."""
        return [(a.num_pages - a.num_free, a.num_pages) for a in self.allocators]

    def token_capacity(self) -> int:
        """Tokens one request could hold if it had every pool to itself."""
        return min(a.num_pages // len(p.layers) for a, p in zip(self.allocators, self.specs)) * self.page_size

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether a request of ``num_tokens`` tokens fits the empty pools at all."""
        return num_tokens <= self.token_capacity()

    def _new_pages_per_layer(self, req: Request, num_new_tokens: int) -> int:
        held = len(req.block_table[0]) if req.block_table else 0
        need = pages_for_tokens(req.num_computed_tokens + num_new_tokens, self.page_size) - held
        return max(need, 0)

    def pages_needed(self, req: Request, num_new_tokens: int) -> int:
        return self._new_pages_per_layer(req, num_new_tokens) * self.num_layers

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req``; False if any pool is short."""
        per_layer = self._new_pages_per_layer(req, num_new_tokens)
        if any(per_layer * len(p.layers) > a.num_free for a, p in zip(self.allocators, self.specs)):
            return False
        if not req.block_table:
            req.block_table = [[] for _ in range(self.num_layers)]
        if per_layer:
            for alloc, spec in zip(self.allocators, self.specs):
                pages = alloc.allocate(per_layer * len(spec.layers))
                for i, layer in enumerate(spec.layers):
                    req.block_table[layer].extend(pages[i * per_layer:(i + 1) * per_layer])
        return True

    def pool_of_layer(self, layer: int) -> int:
        for i, spec in enumerate(self.specs):
            if layer in spec.layers:
                return i
        raise KeyError(f"layer {layer} is in no pool")

    def take(self, pool: int, pages: list[int]) -> None:
        """Mark pages of one pool as used (KV that is already there, e.g. after a drop)."""
        self.allocators[pool].take(pages)

    def allocate_in(self, pool: int, n: int, below: int | None = None) -> list[int]:
        """``n`` pages from one pool, optionally only from ids below ``below`` (its base region)."""
        alloc = self.allocators[pool]
        return alloc.allocate_below(n, below) if below is not None else alloc.allocate(n)

    def release(self, pool: int, pages: list[int]) -> None:
        self.allocators[pool].free(pages)

    def audit(self, requests) -> None:
        """Check that every page is either free or owned by exactly one request's layer."""
        for i, (alloc, spec) in enumerate(zip(self.allocators, self.specs)):
            owned = [p for r in requests for layer in spec.layers if layer < len(r.block_table)
                     for p in r.block_table[layer]]
            free = alloc.free_pages()
            if len(set(owned)) != len(owned):
                raise RuntimeError(f"pool {i}: a KV page is owned twice")
            if set(owned) & free or len(owned) + len(free) != alloc.num_pages:
                raise RuntimeError(f"pool {i}: {len(owned)} owned + {len(free)} free pages "
                                   f"!= {alloc.num_pages} (leaked or double-booked)")

    def free(self, req: Request) -> None:
        """Return every page of ``req`` to its pool."""
        for alloc, spec in zip(self.allocators, self.specs):
            for layer in spec.layers:
                if layer < len(req.block_table):
                    alloc.free(req.block_table[layer])
        req.block_table = []
