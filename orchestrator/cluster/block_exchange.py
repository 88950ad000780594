"""The cached blocks that a drop's requests share, on the new leader: from the members'
exports to the pools that run their layers (``Formation`` moves them in its first batch).

A block cached by several members is assembled from the page of each layer that already
lies with the member running that layer, so a prefix every replica had cached moves
nothing; the rest of a block's pages move once, however many requests share it. Until all
its pages are in place a block is neither served to new requests nor evictable
(``CachedBlock.in_place``). A block whose move fails is forgotten once no request refers
to it any more (the formation recomputes the requests that share it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.paging import OutOfPages
from orchestrator.cluster.messages import ExportedBlock, KvMove
from orchestrator.core.block_manager import BlockManager
from orchestrator.core.prefix_cache import CachedBlock


@dataclass
class MovingBlock:
    """A shared cached block some of whose pages are not yet in their layer's owner."""

    block: CachedBlock
    holders: list[int]
    """Per layer, the stage whose pool holds the block's page now."""
    reserved: list[tuple[int, int]] = field(default_factory=list)
    """(stage, page) reserved in the owners for its moves in flight."""


class BlockExchange:
    """The group's shared blocks until each is in place or forgotten."""

    def __init__(self, ranks: tuple[int, ...], blocks: BlockManager) -> None:
        self.ranks = ranks
        self.blocks = blocks
        self.moving: dict[int, MovingBlock] = {}
        """By hash: blocks with pages still to move."""
        self.failed: dict[int, MovingBlock] = {}
        """By hash: blocks whose move failed, until no request refers to them."""
        self.pages_moved = 0
        """Block pages moved (once each, however many requests share the block)."""

    @property
    def done(self) -> bool:
        return not self.moving

    def adopt(self, exported: list[tuple[list[ExportedBlock], list[int]]]) -> None:
        """Cache every member's blocks once: ``exported[i]`` is member i's blocks and, per
        layer, the stage whose pool holds their pages of that layer (a replica's: its own;
        a group's: its stages'). Each layer's page is taken from the stage that runs the
        layer where one has it; the duplicates are freed."""
        blocks = self.blocks
        copies: dict[int, list[tuple[ExportedBlock, list[int]]]] = {}
        taken: dict[int, list[int]] = {}
        for member_blocks, layout in exported:
            for b in member_blocks:
                copies.setdefault(b.hash, []).append((b, layout))
                for layer, page in enumerate(b.pages):
                    taken.setdefault(layout[layer], []).append(page)
        for stage, pages in taken.items():  # one pass over each free list
            blocks.take(stage, pages)
        for h, held in copies.items():
            pages, holders = [], []
            for layer in range(blocks.num_layers):
                owner = blocks.pool_of_layer(layer)
                at = {layout[layer]: b.pages[layer] for b, layout in held}
                src = owner if owner in at else min(at)
                pages.append(at[src])
                holders.append(src)
                for stage, page in at.items():
                    if stage != src:
                        blocks.release(stage, [page])
            in_place = all(holders[layer] == blocks.pool_of_layer(layer) for layer in range(blocks.num_layers))
            first = held[0][0]
            block = CachedBlock(h, first.parent, first.tokens, tuple(pages), in_place=in_place)
            blocks.cache.register(block)
            if not in_place:
                self.moving[h] = MovingBlock(block, holders)

    def plan(self) -> tuple[list[KvMove], list[int]]:
        """The moves of every block not in place (pages reserved at the owners), and the
        hashes of the blocks the owners have no room for."""
        moves, no_room = [], []
        for h, mb in self.moving.items():
            try:
                moves += self._plan(mb)
            except OutOfPages:
                no_room.append(h)
        return moves, no_room

    def _plan(self, mb: MovingBlock) -> list[KvMove]:
        moves = []
        try:
            for layer, holder in enumerate(mb.holders):
                owner = self.blocks.pool_of_layer(layer)
                if holder == owner:
                    continue
                dst = self.blocks.allocate_in(owner, 1)
                mb.reserved.append((owner, dst[0]))
                moves.append(KvMove("", layer, self.ranks[holder], [mb.block.pages[layer]], self.ranks[owner], dst,
                                    block=mb.block.hash))
        except OutOfPages:
            self._release_reserved(mb)
            raise
        return moves

    def landed(self, moves: list[KvMove]) -> list[CachedBlock]:
        """Apply a finished batch's block moves (the source pages are freed); the blocks now
        wholly in place, which may be served from now on."""
        touched = set()
        for m in moves:
            mb = self.moving[m.block]
            owner = self.ranks.index(m.dst_rank)
            self.blocks.release(self.ranks.index(m.src_rank), m.src_pages)
            pages = list(mb.block.pages)
            pages[m.layer] = m.dst_pages[0]
            mb.block.pages = tuple(pages)
            mb.holders[m.layer] = owner
            mb.reserved.remove((owner, m.dst_pages[0]))
            self.pages_moved += 1
            touched.add(m.block)
        placed = []
        for h in touched:
            block = self.moving.pop(h).block
            self.blocks.cache.placed(block)
            placed.append(block)
        return placed

    def fail(self, h: int) -> CachedBlock:
        """Give up on moving block ``h``: it is forgotten once nobody refers to it (``reap``)."""
        mb = self.moving.pop(h)
        self.failed[h] = mb
        return mb.block

    def is_failed(self, block: CachedBlock) -> bool:
        return block.hash in self.failed

    def reap(self) -> None:
        """Forget the failed blocks no request refers to any more; free their pages."""
        for h, mb in list(self.failed.items()):
            if mb.block.refs:
                continue
            self.blocks.cache.forget(mb.block)
            for layer, holder in enumerate(mb.holders):
                self.blocks.release(holder, [mb.block.pages[layer]])
            self._release_reserved(mb)
            del self.failed[h]

    def _release_reserved(self, mb: MovingBlock) -> None:
        for stage, page in mb.reserved:
            self.blocks.release(stage, [page])
        mb.reserved = []
