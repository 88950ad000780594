"""Pure-CPU page bookkeeping for the layer-granular KV cache (no tensors here).

A page holds ``page_size`` tokens of one layer's K and V. A sequence's block table lists,
for each layer the rank runs, the pages holding its tokens in order. Because pages are
per layer, the KV of a single layer can be freed, extended or moved on its own.
"""

from __future__ import annotations

from collections import deque


def pages_for_tokens(num_tokens: int, page_size: int) -> int:
    """Pages one layer needs to hold ``num_tokens`` tokens."""
    return -(-num_tokens // page_size)


class OutOfPages(Exception):
    """Raised when an allocation asks for more pages than are free."""


class PageAllocator:
    """Free list over page ids ``0 .. num_pages-1``."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError("num_pages must be non-negative")
        self._free: deque[int] = deque(range(num_pages))
        self._num_pages = num_pages

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_pages(self) -> set[int]:
        return set(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} pages, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def take(self, pages: list[int]) -> None:
        """Mark specific pages as used (they hold KV that arrived from elsewhere)."""
        wanted = set(pages)
        if len(wanted) != len(pages):
            raise ValueError("a page was named twice")
        kept = [p for p in self._free if p not in wanted]
        if len(kept) != len(self._free) - len(wanted):
            raise OutOfPages(f"pages {sorted(wanted - set(self._free))[:5]} are not free")
        self._free = deque(kept)

    def allocate_below(self, n: int, limit: int) -> list[int]:
        """``n`` free pages with ids below ``limit`` (the pool's base region)."""
        chosen = [p for p in self._free if p < limit][:n]
        if len(chosen) < n:
            raise OutOfPages(f"asked for {n} pages below {limit}, {len(chosen)} free there")
        self.take(chosen)
        return chosen

    def num_free_below(self, limit: int) -> int:
        return sum(1 for p in self._free if p < limit)


ROOT_HASH = 0
"""The parent hash of a sequence's first block."""


def block_hash(parent: int, tokens: tuple[int, ...]) -> int:
    """The chained hash of one page-sized block of tokens: equal only if the parent's hash
    and the tokens are (modulo collisions, which a cache rules out by comparing tokens)."""
    return hash((parent, tokens))


def block_hashes(token_ids, page_size: int, num_blocks: int | None = None) -> list[int]:
    """The chained hashes of the first ``num_blocks`` (default: all) full blocks of ``token_ids``."""
    n = len(token_ids) // page_size if num_blocks is None else num_blocks
    out, parent = [], ROOT_HASH
    for i in range(n):
        parent = block_hash(parent, tuple(token_ids[i * page_size:(i + 1) * page_size]))
        out.append(parent)
    return out
