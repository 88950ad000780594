"""A restore, the group leader's side (``Split``, an explicit state machine).

    DRAINING  the leader launches nothing new and waits until no micro-batch and no
              exchange batch of the drop is in flight;
    MOVING    every request is placed on one member, its KV allocated in that member's
              base pool region and moved there in one batch (the extension region empties);
              a request no member can hold is recomputed after the split;
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
from orchestrator.cluster.messages import (BatchId, ExchangeBatch, ExchangeDone, ExportedRequest, KvMove, MovePurpose,
                                           ReshapeEvent, SplitGroup)
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
        for m in sorted(members, key=lambda m: -blocks.allocators[m].num_free_below(driver.base_pages[m])):
            moves = self._plan_moves(req, m, driver, blocks)
            if moves is not None:
                self.moves += moves
                return m
        logger.warning("restore: no member can hold %s's KV; it will be recomputed", req.request_id)
        driver.recompute(req)
        self.recomputed += 1
        return min(range(g), key=lambda m: load[m])

    def _plan_moves(self, req: Request, m: int, driver: InstanceDriver, blocks: BlockManager) -> list[KvMove] | None:
        base = driver.base_pages[m]
        moves, allocated = [], []
        for layer, pages in enumerate(req.block_table):
            owner = blocks.pool_of_layer(layer)
            if owner == m and all(p < base for p in pages):
                continue
            try:
                dst = blocks.allocate_in(m, len(pages), below=base)
            except OutOfPages:
                for mm, d in allocated:
                    blocks.release(mm, d)
                return None
            allocated.append((m, dst))
            moves.append(KvMove(req.request_id, layer, driver.ranks[owner], pages, driver.ranks[m], dst))
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
        for mv in self.moves:
            driver.blocks.release(driver.ranks.index(mv.src_rank), mv.src_pages)
            driver.requests[mv.request_id].block_table[mv.layer] = mv.dst_pages
        self.ctx.to_controller(ReshapeEvent(EventKind.RESTORE_MOVES, driver.ranks, {
            "slices": len(self.moves), "recomputed": self.recomputed, "seconds": time.monotonic() - self.started}))
        self._check_extensions_empty()
        # This driver retires with the split: its last tokens and counts reach the controller
        # first (a request whose last step just returned would otherwise lose that token).
        self.ctx.to_controller(driver.report())
        per_member: list[list[ExportedRequest]] = [[] for _ in driver.ranks]
        for er in driver.export_requests(home=-1):
            m = self.assignment[er.request_id]
            er.home = driver.ranks[m]
            per_member[m].append(er)
        self.state = SplitState.SPLIT
        # The peers first: this rank's own split blocks in the weight exchange with them.
        order = sorted(range(len(driver.ranks)), key=lambda m: driver.ranks[m] == self.ctx.rank)
        for m in order:
            self.ctx.send_to_rank(driver.ranks[m], SplitGroup(driver.ranks, self.epoch, per_member[m]))

    def _check_extensions_empty(self) -> None:
        driver = self.driver
        for m, alloc in enumerate(driver.blocks.allocators):
            base = driver.base_pages[m]
            used_above = alloc.num_pages - base - (alloc.num_free - alloc.num_free_below(base))
            if used_above:
                raise RuntimeError(f"restore: {used_above} pages of rank {driver.ranks[m]}'s extension still in use")
