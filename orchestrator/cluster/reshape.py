"""Reshaping instances, leader side: fusing replicas into a group (drop) and splitting it
back (restore). Each is an explicit state machine driven by messages and the rank ctx.

Drop (``Formation``): every member exports its requests, drops the weights outside its
stage and grows its KV pool; the new leader adopts all requests at once, so new work runs
in pipeline mode immediately. Requests that already have KV ("stale") stay held while
their pages of the layers their home no longer runs move to the layers' owners, in
batches of a few requests, layer by layer; each batch's requests resume as soon as its
moves land. A batch that times out falls back to recomputing its requests.

Restore (``Split``): the leader stops launching work and drains; it places every request
on one member, allocating its KV in that member's base pool region, and moves the pages
there (the extension region empties); then each member gives the extension back, pulls
the weights it dropped from the peers that kept them, and serves its requests as a replica.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field

from engines.mapping import LayerRange
from engines.paging import OutOfPages
from orchestrator.core.block_manager import PoolSpec
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.instance import InstanceDriver
from orchestrator.cluster.rank_context import RankContext
from orchestrator.cluster.messages import (ExchangeAbort, ExchangeBatch, ExchangeDone, ExportedRequest, GroupFormed,
                                           KvMove, MemberReady, RESTORE_BATCH, ReshapeEvent, SplitGroup)
from orchestrator.core.request import Request

logger = logging.getLogger(__name__)

EXCHANGE_BATCH_REQUESTS = 8
"""Stale requests per exchange batch (the reference's choice): bounds the work in flight."""


class FormationState(enum.IntEnum):
    WAITING_MEMBERS = 0
    EXCHANGING = 1
    DONE = 2


@dataclass
class _PendingBatch:
    batch: int
    moves: list[KvMove]
    requests: list[tuple[Request, int]]
    """(request, index of its home pool)"""
    waiting_for: set[int]
    deadline: float
    member_seconds: float = 0.0
    """The slowest member's time from receiving the batch to its last transfer landing."""


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
    stale: list[tuple[Request, int]] = field(default_factory=list)
    pending: dict[int, _PendingBatch] = field(default_factory=dict)
    next_batch: int = 0
    started: float = field(default_factory=time.monotonic)
    exchange_started: float = 0.0
    bytes_moved: int = 0
    slices: int = 0
    """Layer slices (one request's pages of one layer) moved by finished batches."""
    recomputed: int = 0
    """Stale requests that fell back to recomputation (owners' pools full, a batch timed out)."""
    batch_log: list[tuple[int, float]] = field(default_factory=list)
    """(bytes, slowest member's seconds) per finished batch."""

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
        ids = []
        for stage, rank in enumerate(self.ranks):
            for er in self.ready[rank].requests:
                pages = [p for row in er.block_table for p in row]
                if pages:
                    driver.scheduler.blocks.take(stage, pages)
                req = driver.adopt(er, held=bool(pages))
                if pages:
                    self.stale.append((req, stage))
                ids.append(er.request_id)
        self.driver = driver
        ctx.take_role(ctx.role, driver=driver)
        self.stale = _interleave_homes(self.stale)
        in_prefill = sum(1 for req, _ in self.stale if req.num_computed_tokens < len(req.prompt_token_ids))
        ctx.to_controller(GroupFormed(self.ranks[0], self.ranks, ids, self.epoch, len(self.stale), in_prefill))
        self.state = FormationState.EXCHANGING
        self.exchange_started = time.monotonic()
        logger.info("group %s formed: %d requests adopted, %d stale with KV to exchange",
                    self.ranks, len(ids), len(self.stale))

    def poll(self) -> bool:
        """Launch the next batch when few are in flight; handle timeouts. True when done."""
        if self.state != FormationState.EXCHANGING:
            return self.state == FormationState.DONE
        while self.stale and len(self.pending) < 2:
            batch, self.stale = self.stale[:EXCHANGE_BATCH_REQUESTS], self.stale[EXCHANGE_BATCH_REQUESTS:]
            self._launch(batch)
        now = time.monotonic()
        for b in [b for b in self.pending.values() if now > b.deadline]:
            self._abort(b)
        if not self.stale and not self.pending:
            self.state = FormationState.DONE
            now = time.monotonic()
            seconds = now - self.exchange_started
            logger.info("group %s: exchange done, %.1f MiB moved in %.3f s (%.3f s since the drop order)",
                        self.ranks, self.bytes_moved / 2**20, seconds, now - self.started)
            self.ctx.to_controller(ReshapeEvent(EventKind.EXCHANGE, self.ranks, {
                "bytes": self.bytes_moved, "seconds": seconds, "batches": self.next_batch,
                "slices": self.slices, "recomputed": self.recomputed,
                "since_drop_order_s": now - self.started,
                "batch_bytes": [b for b, _ in self.batch_log], "batch_seconds": [t for _, t in self.batch_log]}))
            self.driver.scheduler.blocks.audit(self.driver.requests.values())
        return self.state == FormationState.DONE

    def _launch(self, batch: list[tuple[Request, int]]) -> None:
        driver = self.driver
        blocks = driver.scheduler.blocks
        moves, kept = [], []
        for req, home in batch:
            try:
                req_moves = self._plan_request(req, home, blocks)
            except OutOfPages as exc:  # the owners' pools are full: recompute this one instead
                logger.warning("cannot exchange %s (%s): recomputing it", req.request_id, exc)
                self._recompute(req, home, [])
                continue
            moves += req_moves
            kept.append((req, home))
        moves.sort(key=lambda m: m.layer)  # layer by layer, the same order on every member
        b = _PendingBatch(self.next_batch, moves, kept, {r for m in moves for r in (m.src_rank, m.dst_rank)},
                          time.monotonic() + self.ctx.faults.exchange_timeout_s)
        self.next_batch += 1
        self.pending[b.batch] = b
        if not b.waiting_for:
            self._finish(b)
            return
        msg = ExchangeBatch(self.epoch, b.batch, moves)
        # The other members first: their copies start while this rank still works on its turn.
        for rank in sorted(b.waiting_for, key=lambda r: r == self.ctx.rank):
            self.ctx.send_to_rank(rank, msg)

    def _plan_request(self, req: Request, home: int, blocks) -> list[KvMove]:
        moves, allocated = [], []
        try:
            for layer, pages in enumerate(req.block_table):
                owner = blocks.pool_of_layer(layer)
                if owner == home or not pages:
                    continue
                dst = blocks.allocate_in(owner, len(pages))
                allocated.append((owner, dst))
                moves.append(KvMove(req.request_id, layer, self.ranks[home], pages, self.ranks[owner], dst))
        except OutOfPages:
            for owner, dst in allocated:
                blocks.release(owner, dst)
            raise
        return moves

    def on_exchange_done(self, msg: ExchangeDone) -> None:
        b = self.pending.get(msg.batch)
        if b is None or msg.epoch != self.epoch:
            return
        b.waiting_for.discard(msg.rank)
        self.bytes_moved += msg.bytes_moved
        b.member_seconds = max(b.member_seconds, msg.seconds)
        logger.info("exchange batch %d: rank %d received %.1f MiB in %.3f s (batch launched %.3f s ago)",
                    msg.batch, msg.rank, msg.bytes_moved / 2**20, msg.seconds,
                    time.monotonic() - b.deadline + self.ctx.faults.exchange_timeout_s)
        if not b.waiting_for:
            self._finish(b)

    def _finish(self, b: _PendingBatch) -> None:
        driver = self.driver
        blocks = driver.scheduler.blocks
        for m in b.moves:
            req = driver.requests.get(m.request_id)
            home = self.ranks.index(m.src_rank)
            blocks.release(home, m.src_pages)
            if req is not None:
                req.block_table[m.layer] = m.dst_pages
        for req, _home in b.requests:
            driver.release_held(req)
        self.batch_log.append((sum(len(m.src_pages) for m in b.moves) * self.ctx.engine.kv.page_bytes,
                               b.member_seconds))
        self.slices += len(b.moves)
        del self.pending[b.batch]

    def _abort(self, b: _PendingBatch) -> None:
        logger.error("group %s: exchange batch %d timed out; recomputing its %d requests",
                     self.ranks, b.batch, len(b.requests))
        for rank in sorted(b.waiting_for):
            self.ctx.send_to_rank(rank, ExchangeAbort(self.epoch, b.batch))
        for req, home in b.requests:
            dst = [(self.ranks.index(m.dst_rank), m.dst_pages) for m in b.moves if m.request_id == req.request_id]
            self._recompute(req, home, dst)
        del self.pending[b.batch]

    def _recompute(self, req: Request, home: int, extra: list[tuple[int, list[int]]]) -> None:
        """Fallback: free the request's pages and queue it for recomputation (tokens kept).

        A stale request's pages are all in its home pool, not in the pools of the layers'
        new owners, so they are released here rather than by the scheduler."""
        driver = self.driver
        blocks = driver.scheduler.blocks
        blocks.release(home, [p for row in req.block_table for p in row])
        for pool, pages in extra:
            blocks.release(pool, pages)
        driver.scheduler.requeue(req)
        driver.release_held(req)
        self.recomputed += 1


class SplitState(enum.IntEnum):
    DRAINING = 0
    MOVING = 1
    SPLIT = 2
    """The members have their orders; the rank loop drops this protocol."""


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

    def poll(self, exchanging: bool) -> None:
        """``exchanging``: the drop's exchange still has batches in flight (they finish first)."""
        driver = self.driver
        if self.state == SplitState.DRAINING:
            driver.paused = True
            if driver.inflight or driver.held or exchanging:
                return
            self._plan(driver)
            self.state = SplitState.MOVING
            self._send_moves()

    def _plan(self, driver: InstanceDriver) -> None:
        blocks = driver.scheduler.blocks
        g = len(driver.ranks)
        load = [0] * g
        for req in sorted(driver.requests.values(), key=lambda r: r.arrival_time):
            target = self._place(req, driver, blocks, load)
            self.assignment[req.request_id] = target
            load[target] += req.num_tokens

    def _place(self, req: Request, driver: InstanceDriver, blocks, load: list[int]) -> int:
        """Choose a member for ``req`` and plan its KV moves into that member's base region."""
        g = len(driver.ranks)
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
        driver.scheduler.preempt(req)
        self.recomputed += 1
        return min(range(g), key=lambda m: load[m])

    def _plan_moves(self, req: Request, m: int, driver: InstanceDriver, blocks) -> list[KvMove] | None:
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
        driver = self.driver
        self.moves.sort(key=lambda mv: mv.layer)
        self.waiting_for = {r for mv in self.moves for r in (mv.src_rank, mv.dst_rank)}
        if not self.waiting_for:
            self._split()
            return
        msg = ExchangeBatch(self.epoch, RESTORE_BATCH, self.moves)
        for rank in sorted(self.waiting_for):
            self.ctx.send_to_rank(rank, msg)
        logger.info("restore of group %s: moving %d layer slices home", driver.ranks, len(self.moves))

    def on_exchange_done(self, msg: ExchangeDone) -> None:
        if msg.epoch != self.epoch or msg.batch != RESTORE_BATCH:
            return
        self.waiting_for.discard(msg.rank)
        if not self.waiting_for and self.state == SplitState.MOVING:
            self._split()

    def _split(self) -> None:
        driver = self.driver
        blocks = driver.scheduler.blocks
        for mv in self.moves:
            blocks.release(driver.ranks.index(mv.src_rank), mv.src_pages)
            req = driver.requests[mv.request_id]
            req.block_table[mv.layer] = mv.dst_pages
        self.ctx.to_controller(ReshapeEvent(EventKind.RESTORE_MOVES, driver.ranks, {
            "slices": len(self.moves), "recomputed": self.recomputed, "seconds": time.monotonic() - self.started}))
        for m, alloc in enumerate(blocks.allocators):
            used_above = alloc.num_pages - driver.base_pages[m] - (alloc.num_free - alloc.num_free_below(driver.base_pages[m]))
            if used_above:
                raise RuntimeError(f"restore: {used_above} pages of rank {driver.ranks[m]}'s extension still in use")
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


def _interleave_homes(stale: list[tuple[Request, int]]) -> list[tuple[Request, int]]:
    """Stale requests taken from each home stage in turn.

    A request's KV flows out of its home only, and a receiver does the copying (pulls, on
    one host). Batches that mix every home move bytes in every direction at once, so all
    members copy in parallel instead of one member's requests keeping one link busy while
    the others idle.
    """
    by_home: dict[int, list[tuple[Request, int]]] = {}
    for item in stale:
        by_home.setdefault(item[1], []).append(item)
    queues = list(by_home.values())
    out: list[tuple[Request, int]] = []
    while queues:
        out += [q.pop(0) for q in queues]
        queues = [q for q in queues if q]
    return out
