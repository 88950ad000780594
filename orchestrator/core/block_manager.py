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
from orchestrator.core.prefix_cache import ROOT_HASH, CachedBlock, PrefixCache
from orchestrator.core.request import Request


@dataclass(frozen=True)
class PoolSpec:
    """One rank's KV pool as the instance sees it: the layers it holds and its page count."""

    layers: LayerRange
    num_pages: int


class BlockManager:
    """Allocates and frees the KV pages of requests on one instance."""

    def __init__(self, page_size: int, pools: list[PoolSpec], prefix_caching: bool = False) -> None:
        if not pools:
            raise ValueError("an instance needs at least one KV pool")
        self.page_size = page_size
        self.specs = list(pools)
        self.allocators = [PageAllocator(p.num_pages) for p in pools]
        self.num_layers = sum(len(p.layers) for p in pools)
        self.cache = PrefixCache(page_size) if prefix_caching else None
        """Full computed blocks shared between requests (None: no prefix caching)."""

    @classmethod
    def single(cls, num_pages: int, page_size: int, num_layers: int,
               prefix_caching: bool = False) -> "BlockManager":
        """One pool holding every layer (a replica, or stages sharing one process)."""
        return cls(page_size, [PoolSpec(LayerRange(0, num_layers), num_pages)], prefix_caching)

    @property
    def num_pages(self) -> int:
        return sum(a.num_pages for a in self.allocators)

    def usage(self) -> list[tuple[int, int]]:
        """``(used, total)`` pages per pool; cached pages no request refers to count as free
        (they are given back as soon as a page is needed)."""
        return [(a.num_pages - self._free(i), a.num_pages) for i, a in enumerate(self.allocators)]

    def _evictable(self, pool: int) -> int:
        """Pages of ``pool`` in unreferenced cached blocks (a block has one page per layer)."""
        return len(self.cache.lru) * len(self.specs[pool].layers) if self.cache is not None else 0

    def _free(self, pool: int) -> int:
        return self.allocators[pool].num_free + self._evictable(pool)

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
        """Make room for ``num_new_tokens`` more tokens of ``req``; False if any pool is short
        (unreferenced cached blocks are evicted first, least recently used first)."""
        table = req.block_table
        if table and -(-(req.num_computed_tokens + num_new_tokens) // self.page_size) <= len(table[0]):
            return True  # most decode steps: the last page has room (checked inline, it is every step)
        per_layer = self._new_pages_per_layer(req, num_new_tokens)
        need = [per_layer * len(p.layers) for p in self.specs]
        if any(n > self._free(i) for i, n in enumerate(need)):
            return False
        while any(n > a.num_free for n, a in zip(need, self.allocators)):
            self._release_pages(self.cache.evict())
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
        """Check that every page is either free, owned by exactly one request's layer, or in
        exactly one cached block; and that each cached block's references are the requests
        that list it."""
        requests = list(requests)
        cached = list(self.cache.blocks.values()) if self.cache is not None else []
        for block in cached:
            holders = sum(any(b is block for b in r.prefix_blocks) for r in requests)
            if holders != block.refs or (block.refs == 0) != (block.hash in self.cache.lru):
                raise RuntimeError(f"cached block {block.hash:#x}: {block.refs} references, {holders} holders")
        for i, (alloc, spec) in enumerate(zip(self.allocators, self.specs)):
            owned = [p for r in requests for layer in spec.layers if layer < len(r.block_table)
                     for p in r.block_table[layer][len(r.prefix_blocks):]]
            owned += [b.pages[layer] for b in cached for layer in spec.layers]
            free = alloc.free_pages()
            if len(set(owned)) != len(owned):
                raise RuntimeError(f"pool {i}: a KV page is owned twice")
            if set(owned) & free or len(owned) + len(free) != alloc.num_pages:
                raise RuntimeError(f"pool {i}: {len(owned)} owned + {len(free)} free pages "
                                   f"!= {alloc.num_pages} (leaked or double-booked)")

    def free(self, req: Request) -> None:
        """Return every page of ``req`` to its pool; its cached blocks lose a reference (and
        stay cached)."""
        shared = len(req.prefix_blocks)
        for alloc, spec in zip(self.allocators, self.specs):
            for layer in spec.layers:
                if layer < len(req.block_table):
                    alloc.free(req.block_table[layer][shared:])
        self.forget(req)

    def forget(self, req: Request) -> None:
        """Drop ``req``'s references to cached blocks and its block table; the caller has
        freed its own pages (or is about to requeue it without them). The last block is
        released first, so it is evicted first: a prefix loses its tail before its head, and
        what stays is still reachable from the root (vLLM frees in this order too)."""
        for block in reversed(req.prefix_blocks):
            self.cache.release(block)
        req.block_table = []
        req.prefix_blocks = []
        req.prefix_closed = False

    @staticmethod
    def own_pages(req: Request, layer: int) -> list[int]:
        """``req``'s pages of ``layer`` that are its alone (after the cached blocks it shares)."""
        return req.block_table[layer][len(req.prefix_blocks):]

    # Prefix caching ---------------------------------------------------------------------
    def match(self, req: Request) -> int | None:
        """Start a request that holds no KV with the longest cached prefix of its tokens (at
        most all but its last token); the tokens served from the cache, or None when there
        was nothing to look up (no cache, the request holds KV already, or it asks for its
        prompt's log-probabilities, which need every prompt position computed: vLLM skips
        the cache for those too)."""
        if self.cache is None or req.block_table or req.num_computed_tokens or req.swapped:
            return None
        if req.sampling.prompt_logprobs is not None:
            return None
        blocks = self.cache.lookup(req.all_token_ids, req.num_tokens - 1)
        for block in blocks:
            self.cache.acquire(block)
        req.block_table = [[b.pages[layer] for b in blocks] for layer in range(self.num_layers)]
        req.prefix_blocks = list(blocks)
        req.num_computed_tokens = len(blocks) * self.page_size
        return req.num_computed_tokens

    def unmatch(self, req: Request) -> None:
        """Undo ``match`` for a request that could not be scheduled after all (no room for
        the rest of it): it waits holding no pages, and looks up again next time."""
        self.forget(req)
        req.num_computed_tokens = 0

    def cache_computed(self, req: Request) -> None:
        """Cache the request's blocks that are full and computed, in order (after a step)."""
        if self.cache is None or req.prefix_closed:
            return
        first, end = len(req.prefix_blocks), req.num_computed_tokens // self.page_size
        if first >= end:  # most steps: no block filled up (decode fills one every page_size steps)
            return
        ps = self.page_size
        rows = req.block_table[:self.num_layers]
        for i in range(first, end):
            parent = req.prefix_blocks[-1].hash if req.prefix_blocks else ROOT_HASH
            pages = tuple([row[i] for row in rows])
            block = self.cache.insert(parent, tuple(req.token_ids(i * ps, (i + 1) * ps)), pages)
            if block is None:
                req.prefix_closed = True
                return
            req.prefix_blocks.append(block)

    # Handing cached blocks between instances (a drop, a restore) ------------------------
    def shared_blocks(self) -> list[CachedBlock]:
        """The cached blocks requests refer to now (they go with those requests)."""
        return [b for b in self.cache.blocks.values() if b.refs] if self.cache is not None else []

    def drop_unreferenced(self) -> int:
        """Give back every cached block no request refers to (an instance about to be
        reshaped keeps only the KV its requests use); the pages freed."""
        freed = 0
        while self.cache is not None and self.cache.lru:
            self._release_pages(self.cache.evict())
            freed += self.num_layers
        return freed

    def link_prefix(self, req: Request, hashes: list[int]) -> None:
        """Make ``req`` refer to the cached blocks ``hashes`` (its leading blocks, already
        registered here) and list their pages at the head of its block table."""
        if not hashes:
            return
        if self.cache is None:
            raise RuntimeError(f"{req.request_id} shares cached blocks but this instance has no prefix cache")
        req.prefix_blocks = [self.cache.blocks[h] for h in hashes]
        for block in req.prefix_blocks:
            self.cache.acquire(block)
        self.refresh_prefix(req)

    @staticmethod
    def refresh_prefix(req: Request) -> None:
        """List the current pages of ``req``'s cached blocks at the head of its block table
        (after a move changed where a block's pages are)."""
        n = len(req.prefix_blocks)
        for layer, row in enumerate(req.block_table):
            row[:n] = [b.pages[layer] for b in req.prefix_blocks]

    def _release_pages(self, block: CachedBlock) -> None:
        for alloc, spec in zip(self.allocators, self.specs):
            alloc.free([block.pages[layer] for layer in spec.layers])
