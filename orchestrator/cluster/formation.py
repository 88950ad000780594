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

from collections.abc import Callable

from engines.mapping import Holding, LayerRange
from engines.paging import OutOfPages
from orchestrator.core.block_manager import BlockManager, PoolSpec
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.instance import InstanceDriver
from orchestrator.cluster.rank_context import RankContext
from orchestrator.cluster.block_exchange import BlockExchange
from orchestrator.cluster.messages import (BatchId, ExchangeAbort, ExchangeBatch, ExchangeDone, GroupFormed, KvMove,
                                           MemberReady, MovePurpose, ReshapeEvent)
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
    """An adopted request whose KV is where its instance before the drop kept it."""

    req: Request
    home: int
    """The stage index of the member it came from (the leader of its instance)."""
    holders: tuple[int, ...]
    """Per layer, the stage index whose pool holds its pages (all ``home`` for a replica)."""


@dataclass(frozen=True)
class GroupOrigin:
    """What a group was fused from, for the restore that splits it again."""

    parts: tuple[tuple[int, ...], ...]
    """The instances, each its ranks in stage order."""
    base_pages: tuple[int, ...]
    """Per member (stage order), its pool's pages before the drop."""
    held_before: tuple[Holding, ...]
    held_now: tuple[Holding, ...]


@dataclass(frozen=True)
class BatchTiming:
    bytes: int
    seconds: float
    """The slowest member's time from receiving the batch to its last transfer landing."""


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
    parts: tuple[tuple[int, ...], ...] = ()
    """The instances fused (``DropGroup.parts``); empty: every member a replica."""
    on_formed: Callable[[tuple[int, ...], GroupOrigin], None] | None = None
    """Told what the group was fused from, once it serves."""
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
    shared: BlockExchange | None = None
    """The cached blocks the requests share, until each is at the layers' owners."""
    waiting_on_blocks: list[StaleRequest] = field(default_factory=list)
    """Requests whose own pages have landed, waiting for a block they share."""

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
        layouts = [self._layout(stage, self.ready[rank]) for stage, rank in enumerate(self.ranks)]
        self.shared = BlockExchange(self.ranks, driver.blocks)
        self.shared.adopt([(self.ready[r].blocks, layouts[s]) for s, r in enumerate(self.ranks)])
        ids = []
        for stage, rank in enumerate(self.ranks):
            for er in self.ready[rank].requests:
                has_kv = any(er.block_table)
                req = driver.adopt(er, pool=layouts[stage], held=has_kv)
                if has_kv:
                    self.stale.append(StaleRequest(req, stage, tuple(layouts[stage])))
                ids.append(er.request_id)
        if self.on_formed is not None:
            full = Holding.full(ctx.engine.cfg.num_hidden_layers, ctx.engine.cfg.tie_word_embeddings)
            ready = [self.ready[r] for r in self.ranks]
            self.on_formed(self.ranks, GroupOrigin(self.parts or tuple((r,) for r in self.ranks),
                                                   tuple(m.base_pages for m in ready),
                                                   tuple(m.held_before or full for m in ready),
                                                   tuple(m.held_now or full for m in ready)))
        self.driver = driver
        ctx.take_role(ctx.role, driver=driver)
        self.stale = _interleave_homes(self.stale)
        in_prefill = sum(1 for s in self.stale if s.req.num_computed_tokens < len(s.req.prompt_token_ids))
        ctx.to_controller(GroupFormed(self.ranks[0], self.ranks, ids, self.epoch, len(self.stale), in_prefill))
        self.state = FormationState.EXCHANGING
        self.exchange_started = time.monotonic()
        logger.info("group %s formed: %d requests adopted, %d stale with KV to exchange, %d shared blocks to move",
                    self.ranks, len(ids), len(self.stale), len(self.shared.moving))
        self._launch_blocks()

    def _layout(self, stage: int, ready: MemberReady) -> list[int]:
        """Per layer, the stage whose pool holds the pages of what ``ready`` exported."""
        if not ready.layout:
            return [stage] * self.ctx.engine.cfg.num_hidden_layers
        return [self.ranks.index(r) for r in ready.layout]

    def _launch_blocks(self) -> None:
        """The first batch: the pages of shared blocks that are not at their layer's owner."""
        moves, no_room = self.shared.plan()
        for h in no_room:
            logger.warning("cannot move cached block %#x (no room): recomputing the requests sharing it", h)
            self._fail_block(h)
        if moves:
            self._post(moves, [])

    def _fail_block(self, h: int) -> None:
        """Give up on a block: the requests sharing it are recomputed (now, or when their own
        batch returns); it is forgotten when none refers to it any more."""
        block = self.shared.fail(h)
        for s in [s for s in self.stale if _shares(s.req, block)]:
            self.stale.remove(s)
            self._recompute(s, [])
        for s in [s for s in self.waiting_on_blocks if _shares(s.req, block)]:
            self.waiting_on_blocks.remove(s)
            self.driver.recompute(s.req)  # its own pages are at the owners already
            self.recomputed += 1
        self.shared.reap()

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
        assert not self.waiting_on_blocks and self.shared.done, "exchange done with blocks still moving"
        self.shared.reap()
        self.state = FormationState.DONE
        now = time.monotonic()
        seconds = now - self.exchange_started
        logger.info("group %s: exchange done, %.1f MiB moved in %.3f s (%.3f s since the drop order)",
                    self.ranks, self.bytes_moved / 2**20, seconds, now - self.started)
        self.ctx.to_controller(ReshapeEvent(EventKind.EXCHANGE, self.ranks, {
            "bytes": self.bytes_moved, "seconds": seconds, "batches": self.next_batch,
            "slices": self.slices, "recomputed": self.recomputed, "since_drop_order_s": now - self.started,
            "block_pages": self.shared.pages_moved,
            "batch_bytes": [t.bytes for t in self.batch_log], "batch_seconds": [t.seconds for t in self.batch_log]}))
        self.driver.audit()

    def _batch_id(self, batch: int) -> BatchId:
        return BatchId(MovePurpose.EXCHANGE, self.epoch, batch)

    def _launch(self, batch: list[StaleRequest]) -> None:
        moves, kept = [], []
        for s in batch:
            if any(self.shared.is_failed(b) for b in s.req.prefix_blocks):
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
                if owner == s.holders[layer] or not pages:
                    continue
                dst = blocks.allocate_in(owner, len(pages))
                allocated.append((owner, dst))
                moves.append(KvMove(s.req.request_id, layer, self.ranks[s.holders[layer]], pages, self.ranks[owner],
                                    dst))
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
        for m in b.moves:
            if m.block is not None:
                continue
            driver.blocks.release(self.ranks.index(m.src_rank), m.src_pages)
            req = driver.requests.get(m.request_id)
            if req is not None:
                req.block_table[m.layer][len(req.prefix_blocks):] = m.dst_pages
        for block in self.shared.landed([m for m in b.moves if m.block is not None]):
            for req in driver.requests.values():  # the sharers list the block's new pages
                if _shares(req, block):
                    driver.blocks.refresh_prefix(req)
        self.waiting_on_blocks += b.requests
        self._release_ready()
        if b.moves:  # a batch of requests whose pages are all in shared blocks moves nothing of its own
            self.batch_log.append(BatchTiming(sum(len(m.src_pages) for m in b.moves) * self.ctx.engine.kv.page_bytes,
                                              b.member_seconds))
        self.slices += len(b.moves)
        del self.pending[b.batch]

    def _release_ready(self) -> None:
        """Resume the requests whose own pages and shared blocks are all in place; recompute
        those that share a block whose move failed."""
        waiting, self.waiting_on_blocks = self.waiting_on_blocks, []
        for s in waiting:
            if any(self.shared.is_failed(b) for b in s.req.prefix_blocks):
                self.driver.recompute(s.req)  # its own pages are at the owners: freed from there
                self.recomputed += 1
            elif all(b.in_place for b in s.req.prefix_blocks):
                self.driver.release_held(s.req)
            else:
                self.waiting_on_blocks.append(s)
        self.shared.reap()

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
            self._fail_block(h)

    def _recompute(self, s: StaleRequest, planned: list[tuple[int, list[int]]]) -> None:
        """Fallback: recompute the request. A stale request's pages are where its instance
        kept them, not where its block table's layers now live, so they are named here;
        ``planned`` are the pages reserved for it in the owners' pools."""
        own = [(s.holders[layer], self.driver.blocks.own_pages(s.req, layer)) for layer in range(len(s.req.block_table))]
        self.driver.recompute(s.req, [*own, *planned])
        self.recomputed += 1
        self.shared.reap()


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
