"""Automatic prefix caching: full KV pages shared by the requests whose tokens they hold.

Pure CPU bookkeeping, no tensors. A *block* is one page-sized run of a request's tokens;
its KV lives in one page per layer, in the pool of the rank that runs the layer. A full,
computed block is identified by a chained hash of its parent block's hash and its own
token ids, so equal hashes mean equal prefixes up to and including the block (the token
ids are kept and compared too: a hash collision is never a hit).

The cache holds, per block hash, the block's pages (one per layer, all pools together, so
a hit is a hit in every stage's pool) and a reference count: the requests whose block
tables list them. A block whose count falls to zero stays cached, in LRU order, until a
page is needed: its pages count as free for the load monitor, and ``evict`` hands them
back to the allocators, least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from engines.paging import ROOT_HASH, block_hash

__all__ = ["ROOT_HASH", "CachedBlock", "PrefixCache", "block_hash"]


@dataclass
class CachedBlock:
    """One cached block: its pages (layer order) and who refers to it."""

    hash: int
    parent: int
    tokens: tuple[int, ...]
    pages: tuple[int, ...]
    """Page id of each layer, in layer order."""
    refs: int = 0
    in_place: bool = True
    """False while a drop or a restore moves some of its pages to the pool that now runs
    their layer: it is then neither served to new requests nor evictable."""


class PrefixCache:
    """Cached blocks by hash, their reference counts, and the LRU of unreferenced ones."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.blocks: dict[int, CachedBlock] = {}
        self.lru: OrderedDict[int, None] = OrderedDict()
        """Hashes of blocks no request refers to, least recently used first."""

    def lookup(self, token_ids: list[int], max_tokens: int) -> list[CachedBlock]:
        """The longest run of cached blocks that starts ``token_ids``, covering at most
        ``max_tokens`` tokens (a request always computes its last token, for its logits)."""
        found, parent = [], ROOT_HASH
        for i in range(max_tokens // self.page_size):
            tokens = tuple(token_ids[i * self.page_size:(i + 1) * self.page_size])
            block = self.blocks.get(block_hash(parent, tokens))
            if block is None or block.tokens != tokens or block.parent != parent or not block.in_place:
                break
            found.append(block)
            parent = block.hash
        return found

    def acquire(self, block: CachedBlock) -> None:
        """One more request refers to ``block``; it is no longer evictable."""
        block.refs += 1
        self.lru.pop(block.hash, None)

    def release(self, block: CachedBlock) -> None:
        """One request less refers to ``block``; at zero it becomes the most recently used
        evictable block (its pages keep their KV)."""
        if block.refs <= 0:
            raise RuntimeError(f"block {block.hash:#x} released more often than acquired")
        block.refs -= 1
        if block.refs == 0 and block.in_place:
            self.lru[block.hash] = None

    def insert(self, parent: int, tokens: tuple[int, ...], pages: tuple[int, ...]) -> CachedBlock | None:
        """Cache a request's full, computed block (referred to by that request), or None if
        an equal block is cached already (the request's pages then stay its own)."""
        h = block_hash(parent, tokens)
        if h in self.blocks:
            return None
        block = self.blocks[h] = CachedBlock(h, parent, tokens, pages, refs=1)
        return block

    def register(self, block: CachedBlock) -> None:
        """Take in a block handed over from another instance (a drop or a restore), with no
        references yet; one that is not ``in_place`` waits for ``placed``."""
        if block.hash in self.blocks:
            raise RuntimeError(f"block {block.hash:#x} is cached already")
        self.blocks[block.hash] = block
        if block.refs == 0 and block.in_place:
            self.lru[block.hash] = None

    def placed(self, block: CachedBlock) -> None:
        """Every page of ``block`` is in its layer's pool now: it may be served (and evicted)."""
        block.in_place = True
        if block.refs == 0:
            self.lru[block.hash] = None

    def forget(self, block: CachedBlock) -> None:
        """Drop a block that no request refers to (its move failed); the caller frees its pages."""
        if block.refs:
            raise RuntimeError(f"block {block.hash:#x} is still referred to {block.refs} times")
        self.lru.pop(block.hash, None)
        del self.blocks[block.hash]

    def evict(self) -> CachedBlock:
        """Forget the least recently used unreferenced block; the caller frees its pages."""
        h, _ = self.lru.popitem(last=False)
        return self.blocks.pop(h)

    def evictable(self) -> list[CachedBlock]:
        return [self.blocks[h] for h in self.lru]
