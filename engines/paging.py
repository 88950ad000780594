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
    """Free list over page ids ``0 .. num_pages-1``, first in first out.

    The ids never handed out yet are kept as a range (``_next`` on), ahead of the freed
    ones: a pool of a million pages costs nothing until it is used, and the order is the
    one a list of every id would give. A call that picks specific pages (``take``) turns
    the range into a list first."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 0:
            raise ValueError("num_pages must be non-negative")
        self._free: deque[int] = deque()
        self._next = 0
        self._num_pages = num_pages

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return self._num_pages - self._next + len(self._free)

    def _materialize(self) -> None:
        if self._next < self._num_pages:
            fresh = deque(range(self._next, self._num_pages))
            fresh.extend(self._free)
            self._free, self._next = fresh, self._num_pages

    def free_pages(self) -> set[int]:
        return set(range(self._next, self._num_pages)) | set(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} pages, {self.num_free} free")
        fresh = min(n, self._num_pages - self._next)
        out = list(range(self._next, self._next + fresh))
        self._next += fresh
        out += [self._free.popleft() for _ in range(n - fresh)]
        return out

    def free(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def take(self, pages: list[int]) -> None:
        """Mark specific pages as used (they hold KV that arrived from elsewhere)."""
        wanted = set(pages)
        if len(wanted) != len(pages):
            raise ValueError("a page was named twice")
        self._materialize()
        kept = [p for p in self._free if p not in wanted]
        if len(kept) != len(self._free) - len(wanted):
            raise OutOfPages(f"pages {sorted(wanted - set(self._free))[:5]} are not free")
        self._free = deque(kept)

    def allocate_below(self, n: int, limit: int) -> list[int]:
        """``n`` free pages with ids below ``limit`` (the pool's base region)."""
        self._materialize()
        chosen = [p for p in self._free if p < limit][:n]
        if len(chosen) < n:
            raise OutOfPages(f"asked for {n} pages below {limit}, {len(chosen)} free there")
        self.take(chosen)
        return chosen

    def num_free_below(self, limit: int) -> int:
        return max(0, min(limit, self._num_pages) - self._next) + sum(1 for p in self._free if p < limit)


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
