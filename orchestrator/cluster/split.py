"""A restore, the group leader's side (``Split``, an explicit state machine).

    DRAINING  the leader launches nothing new and waits until no micro-batch and no
              exchange batch of the drop is in flight;
    MOVING    every request is placed on one member, its KV allocated in that member's
              base pool region and moved there in one batch (the extension region empties);
              a request no member can hold is recomputed after the split. A cached block
              the requests share is copied once to each member that keeps one of them (a
              layer's page stays where it is for the member that runs the layer), and is
              shared there again; blocks no request refers to are given back;
    SPLIT     each member has its order (``SplitGroup``): give the extension back, pull the
              dropped weights from the peers that kept them, serve its requests as a
              replica (``Reshaper``). The rank loop drops this protocol.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from engines.paging import OutOfPages
from orchestrator.core.block_manager import BlockManager
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.instance import InstanceDriver
from orchestrator.cluster.rank_context import RankContext
from orchestrator.cluster.messages import (BatchId, ExchangeBatch, ExchangeDone, ExportedBlock, ExportedRequest, KvMove,
                                           MovePurpose, ReshapeEvent, SplitGroup)
from orchestrator.core.request import Request

logger = logging.getLogger(__name__)


class SplitState(enum.IntEnum):
    DRAINING = 0
    MOVING = 1
    SPLIT = 2


@dataclass
class Split:
    """The leader's side of a restore."""

    ctx: RankContext
    driver: InstanceDriver
    epoch: int
    state: SplitState = SplitState.DRAINING
    assignment: dict[str, int] = field(default_factory=dict)
    """request id -> member stage index it goes to."""
    moves: list[KvMove] = field(default_factory=list)
    waiting_for: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    recomputed: int = 0
    """Requests with KV that no member could hold: they are recomputed after the split."""
    copies: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """(block hash, member) -> the block's page of each layer in that member's base region."""

    @property
    def batch_id(self) -> BatchId:
        return BatchId(MovePurpose.RESTORE, self.epoch, 0)

    def poll(self, exchanging: bool) -> None:
        """``exchanging``: the drop's exchange still has batches in flight (they finish first)."""
        driver = self.driver
        if self.state == SplitState.DRAINING:
            driver.pause()
            if driver.inflight or driver.held or exchanging:
                return
            self._plan(driver)
            self.state = SplitState.MOVING
            self._send_moves()

    def _plan(self, driver: InstanceDriver) -> None:
        driver.blocks.drop_unreferenced()  # cached KV no request uses is not carried home
        load = [0] * len(driver.ranks)
        for req in sorted(driver.requests.values(), key=lambda r: r.arrival_time):
            target = self._place(req, driver, load)
            self.assignment[req.request_id] = target
            load[target] += req.num_tokens

    def _place(self, req: Request, driver: InstanceDriver, load: list[int]) -> int:
        """Choose a member for ``req`` and plan its KV moves into that member's base region."""
        g, blocks = len(driver.ranks), driver.blocks
        if req.num_computed_tokens == 0:
            blocks.free(req)  # pages reserved for a chunk that never ran (lookahead left it)
            return min(range(g), key=lambda m: load[m])
        members = [] if self.ctx.faults.restore_no_room else range(g)
        # The most room first (the load spreads); among equals, the member that already gets
        # copies of the blocks it shares.
        for m in sorted(members, key=lambda m: (-blocks.allocators[m].num_free_below(driver.base_pages[m]),
                                                -sum((b.hash, m) in self.copies for b in req.prefix_blocks))):
            moves = self._plan_moves(req, m, driver, blocks)
            if moves is not None:
                self.moves += moves
                return m
        logger.warning("restore: no member can hold %s's KV; it will be recomputed", req.request_id)
        driver.recompute(req)
        self.recomputed += 1
        return min(range(g), key=lambda m: load[m])

    def _plan_moves(self, req: Request, m: int, driver: InstanceDriver, blocks: BlockManager) -> list[KvMove] | None:
        """The moves that bring ``req``'s KV into member ``m``'s base region (its shared blocks
        once per member), or None if it has no room."""
        base, ranks = driver.base_pages[m], driver.ranks
        moves, allocated, copies = [], [], {}

        def place(layer: int, pages: list[int], request_id: str, block: int | None) -> list[int]:
            owner = blocks.pool_of_layer(layer)
            if owner == m and all(p < base for p in pages):
                return pages
            dst = blocks.allocate_in(m, len(pages), below=base)
            allocated.extend(dst)
            moves.append(KvMove(request_id, layer, ranks[owner], pages, ranks[m], dst, block=block))
            return dst

        try:
            for b in req.prefix_blocks:
                if (b.hash, m) not in self.copies:
                    copies[b.hash, m] = [place(layer, [p], "", b.hash)[0] for layer, p in enumerate(b.pages)]
            for layer in range(len(req.block_table)):
                if blocks.own_pages(req, layer):
                    place(layer, blocks.own_pages(req, layer), req.request_id, None)
        except OutOfPages:
            blocks.release(m, allocated)
            return None
        self.copies.update(copies)
        return moves

    def _send_moves(self) -> None:
        self.moves.sort(key=lambda mv: mv.layer)
        self.waiting_for = {r for mv in self.moves for r in (mv.src_rank, mv.dst_rank)}
        if not self.waiting_for:
            self._split()
            return
        msg = ExchangeBatch(self.batch_id, self.moves)
        for rank in sorted(self.waiting_for):
            self.ctx.send_to_rank(rank, msg)
        logger.info("restore of group %s: moving %d layer slices home", self.driver.ranks, len(self.moves))

    def on_exchange_done(self, msg: ExchangeDone) -> None:
        if msg.id != self.batch_id:
            return
        self.waiting_for.discard(msg.rank)
        if not self.waiting_for and self.state == SplitState.MOVING:
            self._split()

    def _split(self) -> None:
        driver = self.driver
        blocks = driver.blocks
        for mv in self.moves:
            if mv.block is None:
                blocks.release(driver.ranks.index(mv.src_rank), mv.src_pages)
                req = driver.requests[mv.request_id]
                req.block_table[mv.layer][len(req.prefix_blocks):] = mv.dst_pages
        self._release_block_pages()
        self.ctx.to_controller(ReshapeEvent(EventKind.RESTORE_MOVES, driver.ranks, {
            "slices": len(self.moves), "recomputed": self.recomputed, "seconds": time.monotonic() - self.started,
            "block_pages": sum(mv.block is not None for mv in self.moves)}))
        self._check_extensions_empty()
        # This driver retires with the split: its last tokens and counts reach the controller
        # first (a request whose last step just returned would otherwise lose that token).
        self.ctx.to_controller(driver.report())
        for req in driver.requests.values():  # each lists its member's copies of the blocks it shares
            m = self.assignment[req.request_id]
            for layer, row in enumerate(req.block_table):
                row[:len(req.prefix_blocks)] = [self.copies[b.hash, m][layer] for b in req.prefix_blocks]
        per_member: list[list[ExportedRequest]] = [[] for _ in driver.ranks]
        for er in driver.export_requests(home=-1):
            m = self.assignment[er.request_id]
            er.home = driver.ranks[m]
            per_member[m].append(er)
        per_block: list[list[ExportedBlock]] = [[] for _ in driver.ranks]
        for (h, m), pages in self.copies.items():
            b = blocks.cache.blocks[h]
            per_block[m].append(ExportedBlock(h, b.parent, b.tokens, tuple(pages)))
        self.state = SplitState.SPLIT
        # The peers first: this rank's own split blocks in the weight exchange with them.
        order = sorted(range(len(driver.ranks)), key=lambda m: driver.ranks[m] == self.ctx.rank)
        for m in order:
            self.ctx.send_to_rank(driver.ranks[m], SplitGroup(driver.ranks, self.epoch, per_member[m], per_block[m]))

    def _release_block_pages(self) -> None:
        """Free the group's cached-block pages that no member keeps in place (each once)."""
        blocks = self.driver.blocks
        if blocks.cache is None:
            return
        for b in blocks.cache.blocks.values():
            for layer, page in enumerate(b.pages):
                owner = blocks.pool_of_layer(layer)
                kept = self.copies.get((b.hash, owner))
                if kept is None or kept[layer] != page:
                    blocks.release(owner, [page])

    def _check_extensions_empty(self) -> None:
        driver = self.driver
        for m, alloc in enumerate(driver.blocks.allocators):
            base = driver.base_pages[m]
            used_above = alloc.num_pages - base - (alloc.num_free - alloc.num_free_below(base))
            if used_above:
                raise RuntimeError(f"restore: {used_above} pages of rank {driver.ranks[m]}'s extension still in use")
