"""Live migration of a running request between replicas (the Llumnix baseline's mechanism).

Source leader (``OutgoingMigration``, an explicit state machine):

    OFFERED   the destination is asked to reserve pages for the request (plus headroom);
    COPYING   stage k: the request's pages computed so far go over (the partly filled last
              page again each stage) while it keeps decoding here;
    STOPPING  the new tokens since the last stage are few: the request is held (no new
              micro-batch) until the one in flight returns;
    FINAL     the last pages go over with the request paused (the short final stop);
    DONE      committed: the destination adopts the request, this side frees its pages.

A migration is cancelled only between stages, never with a transfer in flight: if the
request finished, was preempted or aborted, or outgrew the reservation, the destination
frees its reservation and the request stays (or ends) here. Pages travel through the same
``KvMover`` as a drop's exchange, in batches of purpose ``MIGRATION``.

Destination leader (``MigrationTarget``): reserves, forwards its mover's completions to
the source, adopts on commit, frees on cancel.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from engines.paging import pages_for_tokens
from orchestrator.cluster.instance import InstanceDriver
from orchestrator.cluster.messages import (BatchId, ExchangeBatch, ExchangeDone, KvMove, MigrationCancel,
                                           MigrationCommit, MigrationDone, MigrationOffer, MigrationReply,
                                           MovePurpose, StartMigration)
from orchestrator.cluster.rank_context import RankContext
from orchestrator.core.request import Request, RequestStatus

logger = logging.getLogger(__name__)

HEADROOM_TOKENS = 64
"""Room reserved beyond the request's current tokens for what it generates meanwhile."""
MAX_STAGES = 4
"""After this many copy stages the request is stopped for the last one, whatever is left."""
TIMEOUT_S = 30.0
MOVED_REMEMBERED = 1024
"""Aborts race a move only for a report interval; this bounds the memory for them."""


class MigrationState(enum.IntEnum):
    OFFERED = 0
    COPYING = 1
    STOPPING = 2
    FINAL = 3
    DONE = 4


@dataclass
class OutgoingMigration:
    mid: int
    dst: int
    req: Request
    state: MigrationState = MigrationState.OFFERED
    dst_table: list[list[int]] = field(default_factory=list)
    sent_tokens: int = 0
    """Tokens whose KV the last finished stage carried."""
    stage: int = 0
    waiting_for: set[int] = field(default_factory=set)
    bytes_moved: int = 0
    started: float = field(default_factory=time.monotonic)
    stop_started: float = 0.0


class MigrationSource:
    """The source leader's side of its migrations (at most one request per migration)."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.out: dict[int, OutgoingMigration] = {}
        self.moved: OrderedDict[str, int] = OrderedDict()
        """Request id -> destination of the last ``MOVED_REMEMBERED`` requests that left, so an
        abort sent before the controller learned of the move still reaches the request."""

    @property
    def driver(self) -> InstanceDriver:
        return self.ctx.driver

    def start(self, msg: StartMigration) -> None:
        req = self._pick(msg.dst_free_tokens)
        if req is None:
            self._report(msg.migration_id, msg.dst, None, False, "no running request fits the destination")
            return
        m = OutgoingMigration(msg.migration_id, msg.dst, req)
        self.out[m.mid] = m
        self.ctx.send_to_rank(m.dst, MigrationOffer(m.mid, self.ctx.rank, req.request_id,
                                                     req.num_tokens + HEADROOM_TOKENS))

    def _pick(self, room_tokens: int) -> Request | None:
        """The largest idle running request whose KV (with headroom) fits the destination:
        moving it frees the most room here."""
        d = self.driver
        if d is None or len(d.ranks) > 1 or d.paused:
            return None
        moving = {m.req.seq_id for m in self.out.values()}
        fits = [r for r in d.running()
                if r.status == RequestStatus.RUNNING and r.num_computed_tokens > 0 and r.seq_id not in moving
                and r.seq_id not in d.held and r.num_tokens + HEADROOM_TOKENS <= room_tokens]
        return max(fits, key=lambda r: r.num_tokens, default=None)

    def on_reply(self, msg: MigrationReply) -> None:
        m = self.out.get(msg.migration_id)
        if m is None:
            return
        if msg.block_table is None:
            self._finish(m, False, f"the destination refused: {msg.reason}", cancel=False)
            return
        m.dst_table = msg.block_table
        m.state = MigrationState.COPYING
        self._send_stage(m)

    def _send_stage(self, m: OutgoingMigration) -> None:
        """Copy the pages written since the last stage (from the partly filled one on)."""
        ps = self.driver.blocks.page_size
        first = m.sent_tokens // ps
        last = pages_for_tokens(m.req.num_computed_tokens, ps)
        moves = [KvMove(m.req.request_id, layer, self.ctx.rank, m.req.block_table[layer][first:last],
                        m.dst, m.dst_table[layer][first:last]) for layer in range(len(m.req.block_table))]
        m.sent_tokens = m.req.num_computed_tokens
        m.stage += 1
        m.waiting_for = {self.ctx.rank, m.dst}
        batch = ExchangeBatch(BatchId(MovePurpose.MIGRATION, m.mid, m.stage), moves)
        self.ctx.send_to_rank(m.dst, batch)
        self.ctx.send_to_rank(self.ctx.rank, batch)

    def on_exchange_done(self, msg: ExchangeDone) -> None:
        m = self.out.get(msg.id.epoch)
        if m is None or msg.id.batch != m.stage:
            return
        m.waiting_for.discard(msg.rank)
        if msg.rank == m.dst:
            m.bytes_moved += msg.bytes_moved
        if m.waiting_for:
            return
        if m.state == MigrationState.FINAL:
            self._commit(m)
        elif m.req.status != RequestStatus.RUNNING:
            self._finish(m, False, f"the request left the running set ({m.req.status.name.lower()})")
        elif (m.req.num_computed_tokens - m.sent_tokens <= self.driver.blocks.page_size
              or m.stage >= MAX_STAGES):
            m.state = MigrationState.STOPPING
            self.driver.hold(m.req)
        else:
            self._send_stage(m)

    def poll(self) -> None:
        """Start the final stage once a stopping request has no micro-batch in flight."""
        now = time.monotonic()
        for m in list(self.out.values()):
            if m.state == MigrationState.STOPPING and m.req.seq_id not in self.driver.busy:
                self._final_stage(m, now)
            elif now - m.started > TIMEOUT_S and m.state != MigrationState.DONE:
                logger.warning("migration %d of %s has taken %.0f s (state %s)", m.mid, m.req.request_id,
                               now - m.started, m.state.name)
                m.started = now  # warn again later; a stage in flight cannot be cancelled safely

    def _final_stage(self, m: OutgoingMigration, now: float) -> None:
        rid = m.req.request_id
        ps = self.driver.blocks.page_size
        if rid in self.driver.pending_aborts or m.req.status != RequestStatus.RUNNING:
            self._finish(m, False, "the request was aborted or finished")
        elif pages_for_tokens(m.req.num_computed_tokens, ps) > len(m.dst_table[0]):
            self._finish(m, False, "the request outgrew the reservation")
        else:
            m.state, m.stop_started = MigrationState.FINAL, now
            self._send_stage(m)

    def _commit(self, m: OutgoingMigration) -> None:
        d, req = self.driver, m.req
        if req.request_id in d.pending_aborts:
            self._finish(m, False, "aborted during the final stop")
            return
        er = d.hand_over(req, m.dst_table, m.dst)
        if d.updates:  # tokens made here reach the controller before any made there
            self.ctx.to_controller(d.report())
        self.ctx.send_to_rank(m.dst, MigrationCommit(m.mid, er))
        self.moved[req.request_id] = m.dst
        if len(self.moved) > MOVED_REMEMBERED:
            self.moved.popitem(last=False)
        m.state = MigrationState.DONE
        del self.out[m.mid]
        self._report(m.mid, m.dst, req.request_id, True, "", m)

    def _finish(self, m: OutgoingMigration, ok: bool, reason: str, cancel: bool = True) -> None:
        """End a migration that did not happen: the request stays (or ends) here."""
        self.out.pop(m.mid, None)
        if cancel:
            self.ctx.send_to_rank(m.dst, MigrationCancel(m.mid))
        if m.req.seq_id in self.driver.held:
            self.driver.release_held(m.req)  # runs it again, or performs a pending abort
        self._report(m.mid, m.dst, m.req.request_id, ok, reason, m)

    def _report(self, mid: int, dst: int, request_id: str | None, ok: bool, reason: str,
                m: OutgoingMigration | None = None) -> None:
        now = time.monotonic()
        self.ctx.to_controller(MigrationDone(
            mid, request_id or "", self.ctx.rank, dst, ok, reason,
            m.bytes_moved if m else 0, now - m.started if m else 0.0,
            now - m.stop_started if m and m.stop_started else 0.0, m.stage if m else 0))

    def forward_abort(self, request_id: str) -> int | None:
        """The destination of a request that migrated away, if it did."""
        return self.moved.get(request_id)


@dataclass(frozen=True)
class _Reservation:
    src: int
    """The source leader (it gets this side's completions)."""
    holder: Request
    """A placeholder request that owns the reserved pages until the commit."""


class MigrationTarget:
    """The destination leader's side: reservations and adoption."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.reserved: dict[int, _Reservation] = {}
        """Migration id -> the pages reserved for it."""

    def on_offer(self, msg: MigrationOffer) -> None:
        d = self.ctx.driver
        if d is None or len(d.ranks) > 1 or d.paused:
            self.ctx.send_to_rank(msg.src, MigrationReply(msg.migration_id, None, "not a serving replica"))
            return
        holder = Request(f"migration-{msg.migration_id}", [0] * msg.num_tokens, None, msg.num_tokens)
        if not d.blocks.allocate(holder, msg.num_tokens):
            self.ctx.send_to_rank(msg.src, MigrationReply(msg.migration_id, None, "no free KV pages"))
            return
        self.reserved[msg.migration_id] = _Reservation(msg.src, holder)
        self.ctx.send_to_rank(msg.src, MigrationReply(msg.migration_id, holder.block_table))

    def on_exchange_done(self, msg: ExchangeDone) -> bool:
        """Forward this rank's completion of an incoming migration's stage to its source."""
        entry = self.reserved.get(msg.id.epoch)
        if entry is not None:
            self.ctx.send_to_rank(entry.src, msg)
        return entry is not None

    def on_commit(self, msg: MigrationCommit) -> None:
        self.reserved.pop(msg.migration_id)
        self.ctx.driver.adopt(msg.request)  # the placeholder's pages are its pages now

    def on_cancel(self, msg: MigrationCancel) -> None:
        entry = self.reserved.pop(msg.migration_id, None)
        if entry is not None and self.ctx.driver is not None:
            self.ctx.driver.blocks.free(entry.holder)
