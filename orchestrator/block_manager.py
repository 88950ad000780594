"""KV page bookkeeping for one instance's requests: pure CPU, no tensors, no model.

Pages are layer-granular: a request that holds ``t`` tokens owns ``ceil(t / page_size)``
pages in each of the instance's layers, listed per layer in ``Request.block_table``.
"""

from __future__ import annotations

from engines.paging import PageAllocator, pages_for_tokens
from orchestrator.request import Request


class BlockManager:
    """Allocates and frees the KV pages of requests on one instance."""

    def __init__(self, num_pages: int, page_size: int, num_layers: int) -> None:
        self.page_size = page_size
        self.num_layers = num_layers
        self.allocator = PageAllocator(num_pages)

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    def token_capacity(self) -> int:
        """Tokens the whole pool holds when every layer needs a page per ``page_size`` tokens."""
        return self.num_pages // self.num_layers * self.page_size

    def pages_needed(self, req: Request, num_new_tokens: int) -> int:
        held = len(req.block_table[0]) if req.block_table else 0
        per_layer = pages_for_tokens(req.num_computed_tokens + num_new_tokens, self.page_size) - held
        return max(per_layer, 0) * self.num_layers

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req``; False if pages are short."""
        need = self.pages_needed(req, num_new_tokens)
        if need > self.allocator.num_free:
            return False
        if not req.block_table:
            req.block_table = [[] for _ in range(self.num_layers)]
        per_layer = need // self.num_layers
        if per_layer:
            pages = self.allocator.allocate(need)
            for layer, row in enumerate(req.block_table):
                row.extend(pages[layer * per_layer:(layer + 1) * per_layer])
        return True

    def free(self, req: Request) -> None:
        """Return every page of ``req`` to the pool."""
        for row in req.block_table:
            self.allocator.free(row)
        req.block_table = []
