"""A drop, the new leader's side (``Formation``, an explicit state machine).

Every member exports its requests, drops the weights outside its stage and grows its KV
pool (``Reshaper``); the new leader adopts all requests at once, so new work runs in
pipeline mode immediately. Requests that already have KV ("stale") stay held while their
pages of the layers their home no longer runs move to the layers' owners, in batches of a
few requests, layer by layer; each batch's requests resume as soon as its moves land. A
request the owners have no room for, and every request of a batch that times out, falls
back to recomputation (``InstanceDriver.recompute``).

With prefix caching, the cached blocks the requests share come once each: a block cached
by several members is assembled from the pages that already lie in each layer's owner,
the rest of its pages move once, in the first batch, whichever requests share it; they
stay shared on arrival. A request resumes when its own pages and its blocks have landed.
A block that cannot move is forgotten and the requests sharing it are recomputed.

    WAITING_MEMBERS  until every member's ``MemberReady``; then the driver is made
    EXCHANGING       up to two batches in flight; each lands or times out
    DONE             no stale request left: the event is reported, the pages audited
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from engines.mapping import LayerRange
from engines.paging import OutOfPages
from orchestrator.core.block_manager import BlockManager, PoolSpec
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.instance import InstanceDriver
from orchestrator.cluster.rank_context import RankContext
from orchestrator.cluster.messages import (BatchId, ExchangeAbort, ExchangeBatch, ExchangeDone, ExportedBlock,
                                           GroupFormed, KvMove, MemberReady, MovePurpose, ReshapeEvent)
from orchestrator.core.prefix_cache import CachedBlock
from orchestrator.core.request import Request

logger = logging.getLogger(__name__)

EXCHANGE_BATCH_REQUESTS = 8
"""Stale requests per exchange batch (the reference's choice): bounds the work in flight."""
BATCHES_IN_FLIGHT = 2
"""Batches posted at once: the next one's transfers start while the last one's land."""


class FormationState(enum.IntEnum):
    WAITING_MEMBERS = 0
    EXCHANGING = 1
    DONE = 2


@dataclass(frozen=True)
class StaleRequest:
    """An adopted request whose KV is all in its home member's pool."""

    req: Request
    home: int
    """The stage index of the member it came from."""


@dataclass(frozen=True)
class BatchTiming:
    bytes: int
    seconds: float
    """The slowest member's time from receiving the batch to its last transfer landing."""


@dataclass
class _MovingBlock:
    """A shared cached block some of whose pages are not yet in their layer's owner."""

    block: CachedBlock
    holders: list[int]
    """Per layer, the stage whose pool holds the block's page now."""
    reserved: list[tuple[int, int]] = field(default_factory=list)
    """(stage, page) reserved in the owners for its moves in flight."""


@dataclass
class _PendingBatch:
    batch: int
    moves: list[KvMove]
    requests: list[StaleRequest]
    waiting_for: set[int]
    deadline: float
    member_seconds: float = 0.0


@dataclass
class Formation:
    """The new leader's side of a drop."""

    ctx: RankContext
    ranks: tuple[int, ...]
    ranges: list[LayerRange]
    epoch: int
    state: FormationState = FormationState.WAITING_MEMBERS
    driver: InstanceDriver | None = None
    """The group's driver, made once every member is ready."""
    ready: dict[int, MemberReady] = field(default_factory=dict)
    stale: list[StaleRequest] = field(default_factory=list)
    pending: dict[int, _PendingBatch] = field(default_factory=dict)
    next_batch: int = 0
    started: float = field(default_factory=time.monotonic)
    exchange_started: float = 0.0
    bytes_moved: int = 0
    slices: int = 0
    """Layer slices (one request's pages of one layer) moved by finished batches."""
    recomputed: int = 0
    """Stale requests that fell back to recomputation (owners' pools full, a batch timed out)."""
    batch_log: list[BatchTiming] = field(default_factory=list)
    moving_blocks: dict[int, _MovingBlock] = field(default_factory=dict)
    """Shared cached blocks by hash, until all their pages are at the owners."""
    failed_blocks: dict[int, _MovingBlock] = field(default_factory=dict)
    """Blocks whose move failed: forgotten once the requests sharing them are recomputed."""
    waiting_on_blocks: list[StaleRequest] = field(default_factory=list)
    """Requests whose own pages have landed, waiting for a block they share."""
    block_pages_moved: int = 0
    """Pages of shared cached blocks moved (once each, however many requests share them)."""

    @property
    def exchanging(self) -> bool:
        """Batches are in flight (a restore waits for them)."""
        return bool(self.pending)

    def on_member_ready(self, msg: MemberReady) -> None:
        self.ready[msg.rank] = msg
        if len(self.ready) == len(self.ranks):
            self._form()

    def _form(self) -> None:
        ctx = self.ctx
        pools = [PoolSpec(r, self.ready[rank].kv_pages) for r, rank in zip(self.ranges, self.ranks)]
        driver = InstanceDriver(self.ranks[0], self.ranks, self.ranges, pools, ctx.engine, ctx.messenger,
                                ctx.sched_config, ctx.cost_model)
        driver.base_pages = [self.ready[r].base_pages for r in self.ranks]
        self._adopt_blocks(driver)
        ids = []
        for stage, rank in enumerate(self.ranks):
            for er in self.ready[rank].requests:
                has_kv = any(er.block_table)
                req = driver.adopt(er, pool=stage, held=has_kv)
                if has_kv:
                    self.stale.append(StaleRequest(req, stage))
                ids.append(er.request_id)
        self.driver = driver
        ctx.take_role(ctx.role, driver=driver)
        self.stale = _interleave_homes(self.stale)
        in_prefill = sum(1 for s in self.stale if s.req.num_computed_tokens < len(s.req.prompt_token_ids))
        ctx.to_controller(GroupFormed(self.ranks[0], self.ranks, ids, self.epoch, len(self.stale), in_prefill))
        self.state = FormationState.EXCHANGING
        self.exchange_started = time.monotonic()
        logger.info("group %s formed: %d requests adopted, %d stale with KV to exchange, %d shared blocks to move",
                    self.ranks, len(ids), len(self.stale), len(self.moving_blocks))
        self._launch_blocks()

    def _adopt_blocks(self, driver: InstanceDriver) -> None:
        """Cache every member's shared blocks once; a block cached by several members takes
        each layer's page from the member that runs the layer, where one has it."""
        blocks = driver.blocks
        copies: dict[int, dict[int, ExportedBlock]] = {}
        for stage, rank in enumerate(self.ranks):
            for b in self.ready[rank].blocks:
                copies.setdefault(b.hash, {})[stage] = b
                blocks.take(stage, list(b.pages))
        for h, by_stage in copies.items():
            first = next(iter(by_stage.values()))
            pages, holders = [], []
            for layer in range(blocks.num_layers):
                owner = blocks.pool_of_layer(layer)
                src = owner if owner in by_stage else min(by_stage)
                pages.append(by_stage[src].pages[layer])
                holders.append(src)
                for stage, b in by_stage.items():
                    if stage != src:  # a duplicate: this layer's page is taken from another member
                        blocks.release(stage, [b.pages[layer]])
            in_place = all(holders[layer] == blocks.pool_of_layer(layer) for layer in range(blocks.num_layers))
            block = CachedBlock(h, first.parent, first.tokens, tuple(pages), in_place=in_place)
            blocks.cache.register(block)
            if not in_place:
                self.moving_blocks[h] = _MovingBlock(block, holders)

    def _launch_blocks(self) -> None:
        """The first batch: the pages of shared blocks that are not at their layer's owner."""
        if not self.moving_blocks:
            return
        moves = []
        for mb in list(self.moving_blocks.values()):
            try:
                moves += self._plan_block(mb)
            except OutOfPages as exc:
                logger.warning("cannot move cached block %#x (%s): recomputing the requests sharing it",
                               mb.block.hash, exc)
                self._fail_block(mb)
        self._post(moves, [])

    def _plan_block(self, mb: _MovingBlock) -> list[KvMove]:
        blocks, moves = self.driver.blocks, []
        try:
            for layer, holder in enumerate(mb.holders):
                owner = blocks.pool_of_layer(layer)
                if holder == owner:
                    continue
                dst = blocks.allocate_in(owner, 1)
                mb.reserved.append((owner, dst[0]))
                moves.append(KvMove("", layer, self.ranks[holder], [mb.block.pages[layer]], self.ranks[owner], dst,
                                    block=mb.block.hash))
        except OutOfPages:
            self._release_reserved(mb)
            raise
        return moves

    def _release_reserved(self, mb: _MovingBlock) -> None:
        for stage, page in mb.reserved:
            self.driver.blocks.release(stage, [page])
        mb.reserved = []

    def _fail_block(self, mb: _MovingBlock) -> None:
        """Give up on a block: the requests sharing it are recomputed (now, or when their own
        batch returns); it is forgotten when none refers to it any more."""
        del self.moving_blocks[mb.block.hash]
        self.failed_blocks[mb.block.hash] = mb
        for s in [s for s in self.stale if _shares(s.req, mb.block)]:
            self.stale.remove(s)
            self._recompute(s, [])
        for s in [s for s in self.waiting_on_blocks if _shares(s.req, mb.block)]:
            self.waiting_on_blocks.remove(s)
            self.driver.recompute(s.req)  # its own pages are at the owners already
            self.recomputed += 1
        self._reap_failed_blocks()

    def _reap_failed_blocks(self) -> None:
        blocks = self.driver.blocks
        for h, mb in list(self.failed_blocks.items()):
            if mb.block.refs:
                continue
            blocks.cache.forget(mb.block)
            for layer, holder in enumerate(mb.holders):
                blocks.release(holder, [mb.block.pages[layer]])
            self._release_reserved(mb)
            del self.failed_blocks[h]

    def poll(self) -> bool:
        """Launch the next batch when few are in flight; handle timeouts. True when done."""
        if self.state != FormationState.EXCHANGING:
            return self.state == FormationState.DONE
        while self.stale and len(self.pending) < BATCHES_IN_FLIGHT:
            batch, self.stale = self.stale[:EXCHANGE_BATCH_REQUESTS], self.stale[EXCHANGE_BATCH_REQUESTS:]
            self._launch(batch)
        now = time.monotonic()
        for b in [b for b in self.pending.values() if now > b.deadline]:
            self._abort(b)
        if not self.stale and not self.pending:
            self._done()
        return self.state == FormationState.DONE

    def _done(self) -> None:
        assert not self.waiting_on_blocks and not self.moving_blocks, "exchange done with blocks still moving"
        self._reap_failed_blocks()
        self.state = FormationState.DONE
        now = time.monotonic()
        seconds = now - self.exchange_started
        logger.info("group %s: exchange done, %.1f MiB moved in %.3f s (%.3f s since the drop order)",
                    self.ranks, self.bytes_moved / 2**20, seconds, now - self.started)
        self.ctx.to_controller(ReshapeEvent(EventKind.EXCHANGE, self.ranks, {
            "bytes": self.bytes_moved, "seconds": seconds, "batches": self.next_batch,
            "slices": self.slices, "recomputed": self.recomputed, "since_drop_order_s": now - self.started,
            "block_pages": self.block_pages_moved,
            "batch_bytes": [t.bytes for t in self.batch_log], "batch_seconds": [t.seconds for t in self.batch_log]}))
        self.driver.audit()

    def _batch_id(self, batch: int) -> BatchId:
        return BatchId(MovePurpose.EXCHANGE, self.epoch, batch)

    def _launch(self, batch: list[StaleRequest]) -> None:
        moves, kept = [], []
        for s in batch:
            if any(b.hash in self.failed_blocks for b in s.req.prefix_blocks):
                self._recompute(s, [])
                continue
            try:
                req_moves = self._plan_request(s, self.driver.blocks)
            except OutOfPages as exc:  # the owners' pools are full: recompute this one instead
                logger.warning("cannot exchange %s (%s): recomputing it", s.req.request_id, exc)
                self._recompute(s, [])
                continue
            moves += req_moves
            kept.append(s)
        self._post(moves, kept)

    def _post(self, moves: list[KvMove], kept: list[StaleRequest]) -> None:
        moves.sort(key=lambda m: m.layer)  # layer by layer, the same order on every member
        b = _PendingBatch(self.next_batch, moves, kept, {r for m in moves for r in (m.src_rank, m.dst_rank)},
                          time.monotonic() + self.ctx.faults.exchange_timeout_s)
        self.next_batch += 1
        self.pending[b.batch] = b
        if not b.waiting_for:
            self._finish(b)
            return
        msg = ExchangeBatch(self._batch_id(b.batch), moves)
        # The other members first: their copies start while this rank still works on its turn.
        for rank in sorted(b.waiting_for, key=lambda r: r == self.ctx.rank):
            self.ctx.send_to_rank(rank, msg)

    def _plan_request(self, s: StaleRequest, blocks: BlockManager) -> list[KvMove]:
        moves, allocated = [], []
        try:
            for layer in range(len(s.req.block_table)):
                owner = blocks.pool_of_layer(layer)
                pages = blocks.own_pages(s.req, layer)  # the shared blocks move once, on their own
                if owner == s.home or not pages:
                    continue
                dst = blocks.allocate_in(owner, len(pages))
                allocated.append((owner, dst))
                moves.append(KvMove(s.req.request_id, layer, self.ranks[s.home], pages, self.ranks[owner], dst))
        except OutOfPages:
            for owner, dst in allocated:
                blocks.release(owner, dst)
            raise
        return moves

    def on_exchange_done(self, msg: ExchangeDone) -> None:
        b = self.pending.get(msg.id.batch)
        if b is None or msg.id != self._batch_id(b.batch):
            return
        b.waiting_for.discard(msg.rank)
        self.bytes_moved += msg.bytes_moved
        b.member_seconds = max(b.member_seconds, msg.seconds)
        logger.info("exchange batch %d: rank %d received %.1f MiB in %.3f s (batch launched %.3f s ago)",
                    msg.id.batch, msg.rank, msg.bytes_moved / 2**20, msg.seconds,
                    time.monotonic() - b.deadline + self.ctx.faults.exchange_timeout_s)
        if not b.waiting_for:
            self._finish(b)

    def _finish(self, b: _PendingBatch) -> None:
        driver = self.driver
        landed: set[int] = set()
        for m in b.moves:
            driver.blocks.release(self.ranks.index(m.src_rank), m.src_pages)
            if m.block is not None:
                self._block_page_landed(m)
                landed.add(m.block)
                continue
            req = driver.requests.get(m.request_id)
            if req is not None:
                req.block_table[m.layer][len(req.prefix_blocks):] = m.dst_pages
        for h in landed:
            self._block_landed(self.moving_blocks.pop(h))
        self.waiting_on_blocks += b.requests
        self._release_ready()
        if b.moves:  # a batch of requests whose pages are all in shared blocks moves nothing of its own
            self.batch_log.append(BatchTiming(sum(len(m.src_pages) for m in b.moves) * self.ctx.engine.kv.page_bytes,
                                              b.member_seconds))
        self.slices += len(b.moves)
        del self.pending[b.batch]

    def _block_page_landed(self, m: KvMove) -> None:
        mb = self.moving_blocks[m.block]
        owner = self.ranks.index(m.dst_rank)
        pages = list(mb.block.pages)
        pages[m.layer] = m.dst_pages[0]
        mb.block.pages = tuple(pages)
        mb.holders[m.layer] = owner
        mb.reserved.remove((owner, m.dst_pages[0]))
        self.block_pages_moved += 1

    def _block_landed(self, mb: _MovingBlock) -> None:
        """All of a block's pages are at their owners: requests list them, new ones may hit."""
        self.driver.blocks.cache.placed(mb.block)
        for req in self.driver.requests.values():
            if _shares(req, mb.block):
                self.driver.blocks.refresh_prefix(req)

    def _release_ready(self) -> None:
        """Resume the requests whose own pages and shared blocks are all in place; recompute
        those that share a block whose move failed."""
        waiting, self.waiting_on_blocks = self.waiting_on_blocks, []
        for s in waiting:
            if any(b.hash in self.failed_blocks for b in s.req.prefix_blocks):
                self.driver.recompute(s.req)  # its own pages are at the owners: freed from there
                self.recomputed += 1
            elif all(b.in_place for b in s.req.prefix_blocks):
                self.driver.release_held(s.req)
            else:
                self.waiting_on_blocks.append(s)
        self._reap_failed_blocks()

    def _abort(self, b: _PendingBatch) -> None:
        logger.error("group %s: exchange batch %d timed out; recomputing its %d requests",
                     self.ranks, b.batch, len(b.requests))
        for rank in sorted(b.waiting_for):
            self.ctx.send_to_rank(rank, ExchangeAbort(self._batch_id(b.batch)))
        for s in b.requests:
            dst = [(self.ranks.index(m.dst_rank), m.dst_pages) for m in b.moves if m.request_id == s.req.request_id]
            self._recompute(s, dst)
        del self.pending[b.batch]
        for h in {m.block for m in b.moves if m.block is not None}:
            self._fail_block(self.moving_blocks[h])

    def _recompute(self, s: StaleRequest, planned: list[tuple[int, list[int]]]) -> None:
        """Fallback: recompute the request. A stale request's pages are all in its home pool,
        not where its block table's layers now live, so they are named here; ``planned``
        are the pages reserved for it in the owners' pools."""
        own = [p for layer in range(len(s.req.block_table)) for p in self.driver.blocks.own_pages(s.req, layer)]
        self.driver.recompute(s.req, [(s.home, own), *planned])
        self.recomputed += 1
        self._reap_failed_blocks()


def _shares(req: Request, block: CachedBlock) -> bool:
    return any(b is block for b in req.prefix_blocks)


def _interleave_homes(stale: list[StaleRequest]) -> list[StaleRequest]:
    """Stale requests taken from each home stage in turn.

    A request's KV flows out of its home only, and a receiver does the copying (pulls, on
    one host). Batches that mix every home move bytes in every direction at once, so all
    members copy in parallel instead of one member's requests keeping one link busy while
    the others idle.
    """
    by_home: dict[int, list[StaleRequest]] = {}
    for s in stale:
        by_home.setdefault(s.home, []).append(s)
    queues = list(by_home.values())
    out: list[StaleRequest] = []
    while queues:
        out += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return out
