"""A restore, the group leader's side (``Split``, an explicit state machine).

    DRAINING  the leader launches nothing new and waits until no micro-batch and no
              exchange batch of the drop is in flight;
    MOVING    every request is placed on one of the instances the group was fused from (its
              parts: replicas, or groups of their own), its KV of each layer allocated in
              the base pool region of the part's stage that runs the layer and moved there
              in one batch (the extension region empties); a request no part can hold is
              recomputed after the split. A cached block the requests share is copied once
              to each part that keeps one of them (a layer's page stays where it is when
              it is already there), and is shared there again; blocks no request refers to
              are given back;
    SPLIT     each member has its order (``SplitGroup``): give the extension back, pull the
              dropped weights from the peers that kept them, serve in its part: its
              leader with the part's requests (``Reshaper``). The rank loop drops this
              protocol.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from engines.mapping import pp_partition
from engines.paging import OutOfPages
from orchestrator.core.block_manager import BlockManager
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.formation import GroupOrigin
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
    origin: GroupOrigin | None = None
    """What a drop fused the group from; None: a group it started as, which splits into
    replicas that hold every weight already."""
    state: SplitState = SplitState.DRAINING
    assignment: dict[str, int] = field(default_factory=dict)
    """request id -> the part it goes to."""
    moves: list[KvMove] = field(default_factory=list)
    waiting_for: set[int] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    recomputed: int = 0
    """Requests with KV that no member could hold: they are recomputed after the split."""
    copies: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    """(block hash, part) -> the block's page of each layer in the base region of the
    part's stage that runs the layer."""
    kept: set[tuple[int, int]] = field(default_factory=set)
    """(member, page): cached-block pages that a part keeps where they are."""

    def __post_init__(self) -> None:
        ranks = self.driver.ranks
        self.parts = self.origin.parts if self.origin else tuple((r,) for r in ranks)
        self.base = (list(self.origin.base_pages) if self.origin
                     else [a.num_pages for a in self.driver.blocks.allocators])
        """Per member, its pool's pages before the drop: the KV goes below them."""
        num_layers = self.driver.ranges[-1].end
        self.layer_member: list[list[int]] = []
        """Per part, per layer, the member (index in the group) whose stage of the part runs it."""
        for part in self.parts:
            counts = pp_partition(num_layers, len(part))
            stage_of = [s for s, n in enumerate(counts) for _ in range(n)]
            self.layer_member.append([ranks.index(part[stage_of[layer]]) for layer in range(num_layers)])

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
        load = [0] * len(self.parts)
        for req in sorted(driver.requests.values(), key=lambda r: r.arrival_time):
            target = self._place(req, driver, load)
            self.assignment[req.request_id] = target
            load[target] += req.num_tokens

    def _room(self, p: int) -> int:
        """Free pages below the base of the part's tightest member."""
        allocators = self.driver.blocks.allocators
        return min(allocators[m].num_free_below(self.base[m]) for m in set(self.layer_member[p]))

    def _place(self, req: Request, driver: InstanceDriver, load: list[int]) -> int:
        """Choose a part for ``req`` and plan its KV moves into that part's base regions."""
        blocks = driver.blocks
        parts = range(len(self.parts))
        if req.num_computed_tokens == 0:
            blocks.free(req)  # pages reserved for a chunk that never ran (lookahead left it)
            return min(parts, key=lambda p: load[p])
        candidates = [] if self.ctx.faults.restore_no_room else parts
        # The most room first (the load spreads); among equals, the part that already gets
        # copies of the blocks it shares.
        for p in sorted(candidates, key=lambda p: (-self._room(p), -sum((b.hash, p) in self.copies
                                                                         for b in req.prefix_blocks))):
            moves = self._plan_moves(req, p, blocks)
            if moves is not None:
                self.moves += moves
                return p
        logger.warning("restore: no part can hold %s's KV; it will be recomputed", req.request_id)
        driver.recompute(req)
        self.recomputed += 1
        return min(parts, key=lambda p: load[p])

    def _plan_moves(self, req: Request, p: int, blocks: BlockManager) -> list[KvMove] | None:
        """The moves that bring ``req``'s KV into part ``p``'s base regions (its shared blocks
        once per part), or None if it has no room."""
        ranks, members = self.driver.ranks, self.layer_member[p]
        moves, allocated, copies, kept = [], [], {}, set()

        def place(layer: int, pages: list[int], request_id: str, block: int | None) -> list[int]:
            owner, m = blocks.pool_of_layer(layer), members[layer]
            if owner == m and all(pg < self.base[m] for pg in pages):
                if block is not None:
                    kept.update((m, page) for page in pages)
                return pages
            dst = blocks.allocate_in(m, len(pages), below=self.base[m])
            allocated.append((m, dst))
            moves.append(KvMove(request_id, layer, ranks[owner], pages, ranks[m], dst, block=block))
            return dst

        try:
            for b in req.prefix_blocks:
                if (b.hash, p) not in self.copies:
                    copies[b.hash, p] = [place(layer, [pg], "", b.hash)[0] for layer, pg in enumerate(b.pages)]
            for layer in range(len(req.block_table)):
                if blocks.own_pages(req, layer):
                    place(layer, blocks.own_pages(req, layer), req.request_id, None)
        except OutOfPages:
            for m, dst in allocated:
                blocks.release(m, dst)
            return None
        self.copies.update(copies)
        self.kept |= kept
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
        for req in driver.requests.values():  # each lists its part's copies of the blocks it shares
            m = self.assignment[req.request_id]
            for layer, row in enumerate(req.block_table):
                row[:len(req.prefix_blocks)] = [self.copies[b.hash, m][layer] for b in req.prefix_blocks]
        per_part: list[list[ExportedRequest]] = [[] for _ in self.parts]
        for er in driver.export_requests(home=-1):
            p = self.assignment[er.request_id]
            er.home = self.parts[p][0]
            per_part[p].append(er)
        per_block: list[list[ExportedBlock]] = [[] for _ in self.parts]
        for (h, p), pages in self.copies.items():
            b = blocks.cache.blocks[h]
            per_block[p].append(ExportedBlock(h, b.parent, b.tokens, tuple(pages)))
        self.state = SplitState.SPLIT
        origin, ranks = self.origin, driver.ranks
        # The peers first: this rank's own split blocks in the weight exchange with them.
        for m in sorted(range(len(ranks)), key=lambda m: ranks[m] == self.ctx.rank):
            p = next(i for i, part in enumerate(self.parts) if ranks[m] in part)
            part, leads = self.parts[p], self.parts[p][0] == ranks[m]
            self.ctx.send_to_rank(ranks[m], SplitGroup(
                ranks, self.epoch, per_part[p] if leads else [], per_block[p] if leads else [], part,
                tuple(self.base[ranks.index(r)] for r in part),
                origin.held_now if origin else (), origin.held_before if origin else ()))

    def _release_block_pages(self) -> None:
        """Free the group's cached-block pages that no member keeps in place (each once)."""
        blocks = self.driver.blocks
        if blocks.cache is None:
            return
        for b in blocks.cache.blocks.values():
            for layer, page in enumerate(b.pages):
                owner = blocks.pool_of_layer(layer)
                if (owner, page) not in self.kept:
                    blocks.release(owner, [page])

    def _check_extensions_empty(self) -> None:
        driver = self.driver
        for m, alloc in enumerate(driver.blocks.allocators):
            base = self.base[m]
            used_above = alloc.num_pages - base - (alloc.num_free - alloc.num_free_below(base))
            if used_above:
                raise RuntimeError(f"restore: {used_above} pages of rank {driver.ranks[m]}'s extension still in use")
