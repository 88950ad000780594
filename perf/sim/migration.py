"""Live migration on the simulated clock (the llumnix baseline), as ``serve`` carries it out
(``orchestrator/cluster/migration.py``), with its copies' times from the fabric.

``SimMigration`` is the same state machine as the real source's:

    OFFERED   the destination reserves pages for the request plus ``HEADROOM_TOKENS``
    COPYING   stage k: the pages computed since the last stage (the partly filled last
              page again) cross the fabric while the request keeps decoding at the source
    STOPPING  the tokens since the last stage fit a page, or ``MAX_STAGES`` stages ran: the
              request is held (no new micro-batch) until the one in flight returns
    FINAL     the last pages cross with the request stopped
    DONE      the destination adopts the request on its reserved pages; the source frees its

It is cancelled between stages, never with a copy in flight: when the request finished or
was preempted, or outgrew the reservation, the destination frees the reservation and the
request stays (or ends) at the source. Which request moves is the real source's rule (the
largest running one with KV that fits the destination's room); which pairs migrate is the
real policy's (``orchestrator.policy.migration``), called by ``perf.sim.cluster``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from engines.paging import pages_for_tokens
from orchestrator.cluster.migration import HEADROOM_TOKENS, MAX_STAGES
from orchestrator.core.request import Request, RequestStatus
from perf.sim.instance import SimContext, SimInstance
from perf.sim.loop_turns import turn_bound_copy


class MigrationPhase(enum.IntEnum):
    OFFERED = 0
    COPYING = 1
    STOPPING = 2
    FINAL = 3
    DONE = 4
    CANCELLED = 5


@dataclass
class MigrationRecord:
    """What one migration did, in simulated seconds and bytes."""

    src: int
    dst: int
    started_s: float
    request_id: str = ""
    done_s: float | None = None
    ok: bool = False
    reason: str = ""
    kv_bytes: int = 0
    stages: int = 0
    stop_s: float = 0.0
    """How long the request was stopped for the last stage."""

    def to_json(self) -> dict:
        return {"kind": "migration", "src": self.src, "dst": self.dst, "started_s": self.started_s,
                "request_id": self.request_id, "done_s": self.done_s, "ok": self.ok, "reason": self.reason,
                "kv_bytes": self.kv_bytes, "stages": self.stages, "stop_s": self.stop_s}


class SimMigration:
    def __init__(self, ctx: SimContext, mid: int, src: SimInstance, dst: SimInstance, room_tokens: int,
                 on_done: Callable[["SimMigration"], None]) -> None:
        self.ctx = ctx
        self.mid = mid
        self.src, self.dst = src, dst
        self.room_tokens = room_tokens
        self.on_done = on_done
        self.phase = MigrationPhase.OFFERED
        self.record = MigrationRecord(src.leader, dst.leader, ctx.clock.now)
        self.req: Request | None = None
        self.holder: Request | None = None
        self.sent_tokens = 0
        self._stopped_at = 0.0

    def start(self) -> None:
        req = self._pick()
        if req is None:
            self._finish(False, "no running request fits the destination")
            return
        self.req, self.record.request_id = req, req.request_id
        n = req.num_tokens + HEADROOM_TOKENS
        holder = Request(f"migration-{self.mid}", [0] * n, None, n)
        if self.dst.paused or not self.dst.scheduler.blocks.allocate(holder, n):
            self._finish(False, "the destination refused: no free KV pages")
            return
        self.holder = holder
        self.phase = MigrationPhase.COPYING
        self._send_stage()

    def _pick(self) -> Request | None:
        """The largest running request with KV, not held, whose tokens and headroom fit the
        destination (``MigrationSource._pick``)."""
        src = self.src
        if len(src.ranks) > 1 or src.paused:
            return None
        fits = [r for r in src.scheduler.running
                if r.status == RequestStatus.RUNNING and r.num_computed_tokens > 0 and r.seq_id not in src.held
                and r.seq_id in src.requests and r.num_tokens + HEADROOM_TOKENS <= self.room_tokens]
        return max(fits, key=lambda r: r.num_tokens, default=None)

    def _send_stage(self) -> None:
        lay, req = self.ctx.layout, self.req
        first = self.sent_tokens // lay.page_size
        last = pages_for_tokens(req.num_computed_tokens, lay.page_size)
        nbytes = max(0, last - first) * lay.num_layers * lay.page_bytes * lay.tp
        self.sent_tokens = req.num_computed_tokens
        self.record.stages += 1
        self.record.kv_bytes += nbytes
        src = self.src.leader  # the source's loop runs the migration: it hears of the landing at its turn
        turn_bound_copy(self.ctx, src, self.dst.leader, nbytes, lambda: self.ctx.rank(src).at_turn(self._landed))

    def _landed(self) -> None:
        req, ps = self.req, self.ctx.layout.page_size
        if self.phase == MigrationPhase.FINAL:
            self._commit()
        elif req.status != RequestStatus.RUNNING or req.seq_id not in self.src.requests:
            self._finish(False, f"the request left the running set ({req.status.name.lower()})")
        elif req.num_computed_tokens - self.sent_tokens <= ps or self.record.stages >= MAX_STAGES:
            self.phase = MigrationPhase.STOPPING
            self.src.held.add(req.seq_id)
            self.src.when_free(req, self._stopped)
        else:
            self._send_stage()

    def _stopped(self) -> None:
        req, ps = self.req, self.ctx.layout.page_size
        if req.status != RequestStatus.RUNNING or req.seq_id not in self.src.requests:
            self._finish(False, "the request finished or was preempted")
        elif pages_for_tokens(req.num_computed_tokens, ps) > len(self.holder.block_table[0]):
            self._finish(False, "the request outgrew the reservation")
        else:
            self.phase = MigrationPhase.FINAL
            self._stopped_at = self.ctx.clock.now
            self._send_stage()

    def _commit(self) -> None:
        moved = self.src.export_one(self.req)
        self.dst.scheduler.blocks.free(self.holder)  # the reservation becomes the request's pages
        self.holder = None
        if not self.dst.adopt(moved, or_recompute=False):
            raise RuntimeError(f"migration {self.mid}: the reserved pages no longer hold {self.req.request_id}")
        self.req.num_migrations += 1
        moved.sim.migrations += 1
        self.record.stop_s = self.ctx.clock.now - self._stopped_at
        self.phase = MigrationPhase.DONE
        self._end(True, "")
        self.dst.kick()
        self.src.kick()

    def _finish(self, ok: bool, reason: str) -> None:
        """End a migration that did not happen: the request stays (or ends) at the source."""
        if self.holder is not None:
            self.dst.scheduler.blocks.free(self.holder)
            self.holder = None
        if self.req is not None and self.req.seq_id in self.src.held:
            self.src.release_held([self.req.seq_id])
        self.phase = MigrationPhase.CANCELLED
        self._end(ok, reason)

    def _end(self, ok: bool, reason: str) -> None:
        self.record.ok, self.record.reason, self.record.done_s = ok, reason, self.ctx.clock.now
        self.on_done(self)
