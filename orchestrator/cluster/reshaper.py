"""Reshaping on one rank: the single owner of its drop and restore protocols.

The ``Reshaper`` receives every reshape order and completion the rank gets, runs the
member's part of a drop and of a restore itself, and holds the leader's state machines
(``Formation`` for a drop, ``Split`` for a restore) while they run:

drop     ``DropGroup`` -> every member hands its requests over, keeps only its stage's
         weights and grows its KV pool, then tells the new leader ``MemberReady``; the
         leader's ``Formation`` adopts them all and exchanges the stale KV.
restore  ``RestoreGroup`` -> the leader's ``Split`` drains and moves the KV home, then
         sends each member ``SplitGroup``: it gives the KV extension back, pulls the
         weights it dropped from its peers and serves its requests as a replica.
"""

from __future__ import annotations

import logging

from engines.mapping import LayerRange
from orchestrator.core.block_manager import PoolSpec
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.formation import Formation
from orchestrator.cluster.instance import InstanceDriver, StageWorker
from orchestrator.cluster.messages import (DropGroup, ExchangeDone, MemberReady, MovePurpose, ReshapeEvent, Restored,
                                           RestoreGroup, SplitGroup)
from orchestrator.cluster.rank_context import RankContext, Role
from orchestrator.cluster.split import Split

logger = logging.getLogger(__name__)


class Reshaper:
    """This rank's part in drops and restores."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        self.formation: Formation | None = None
        """The drop this rank leads, until its exchange is done."""
        self.split: Split | None = None
        """The restore this rank leads, until the members have their orders."""
        self._early: list[MemberReady] = []
        """Members that were ready before this rank had its own drop order."""

    def poll(self) -> None:
        """Advance the protocols this rank leads (each turn of the rank loop)."""
        if self.formation is not None and self.formation.poll():
            self.formation = None
        if self.split is not None:
            self.split.poll(exchanging=self.formation is not None and self.formation.exchanging)

    # Messages ------------------------------------------------------------------------------
    def on_drop_group(self, msg: DropGroup) -> None:
        self.formation = self._drop(msg)
        if self.formation is not None:  # this rank leads the new group
            for early in self._early:
                self.formation.on_member_ready(early)
            self._early = []

    def on_member_ready(self, msg: MemberReady) -> None:
        if self.formation is None:
            self._early.append(msg)  # a peer was faster than our own drop order
        else:
            self.formation.on_member_ready(msg)

    def on_exchange_done(self, msg: ExchangeDone) -> None:
        if msg.id.purpose == MovePurpose.RESTORE and self.split is not None:
            self.split.on_exchange_done(msg)
        elif msg.id.purpose == MovePurpose.EXCHANGE and self.formation is not None:
            self.formation.on_exchange_done(msg)

    def on_restore_group(self, msg: RestoreGroup) -> None:
        driver = self.ctx.driver
        if driver is None or len(driver.ranks) < 2:
            raise RuntimeError(f"rank {self.ctx.rank} got a restore order but leads no group")
        self.split = Split(self.ctx, driver, msg.epoch)

    def on_split_group(self, msg: SplitGroup) -> None:
        self._split(msg)
        self.formation = self.split = None

    # The member's part --------------------------------------------------------------------
    def _ranges(self, ranks: tuple[int, ...]) -> list[LayerRange]:
        mapping = self.ctx.engine.store.mapping(len(ranks), self.ctx.devices.size)
        return [mapping.layer_range(s) for s in range(len(ranks))]

    def _drop(self, msg: DropGroup) -> Formation | None:
        """Hand my requests to the new leader, keep only my stage's weights, grow my KV pool.
        Returns the leader's side of the drop on the new leader, else None."""
        ctx, driver = self.ctx, self.ctx.driver
        if driver is None or len(driver.ranks) != 1:
            raise RuntimeError(f"rank {ctx.rank} got a drop order but is not a replica")
        ctx.to_controller(driver.report())  # tokens and counts from before the drop still reach the controller
        exported = driver.export_requests(home=ctx.rank)
        shared = driver.export_blocks()  # the cached blocks they share; unreferenced ones are given back
        stage = msg.ranks.index(ctx.rank)
        ranges = self._ranges(msg.ranks)
        pages = ctx.devices.drop_to(ranges[stage])
        for d in ctx.devices.last_drop:  # one event per device: each TP rank measured its own
            m = d.measure
            ctx.to_controller(ReshapeEvent(EventKind.WEIGHTS_DROPPED, msg.ranks, {
                "rank": ctx.rank, "world_rank": d.world_rank, "bytes": m.weights_freed, "remapped": m.remapped,
                "kv_pages_added": pages, "seconds": m.seconds, "resident_fall": m.resident_fall,
                "kv_added": m.kv_added, "resident_rise": m.resident_rise, "weight_bytes": d.weight_bytes}))
        role = Role(msg.ranks[0], stage, len(msg.ranks), ranges[stage])
        formation = None
        if stage == 0:  # the driver comes when every member is ready (Formation)
            ctx.take_role(role)
            formation = Formation(ctx, msg.ranks, ranges, msg.epoch)
        else:
            ctx.take_role(role, worker=StageWorker(msg.ranks[0], msg.ranks, stage, ranges, ctx.engine, ctx.messenger))
        ctx.to_controller(ctx.rank_info())
        ready = MemberReady(ctx.rank, msg.epoch, ctx.engine.kv.num_pages, ctx.engine.plan.kv_pages, exported, shared)
        ctx.send_to_rank(msg.ranks[0], ready)
        return formation

    def _split(self, msg: SplitGroup) -> None:
        """Give the KV extension back, pull my dropped weights from the peers, serve as a replica."""
        ctx, engine = self.ctx, self.ctx.engine
        stage = msg.ranks.index(ctx.rank)
        nbytes, seconds = ctx.devices.restore(msg.ranks, self._ranges(msg.ranks), stage, ctx.transport)
        logger.info("restored %.1f MiB of weights from peers in %.3f s (%.2f GiB/s)", nbytes / 2**20, seconds,
                    nbytes / max(seconds, 1e-9) / 2**30)
        ctx.to_controller(ReshapeEvent(EventKind.WEIGHTS_PULLED, msg.ranks, {"rank": ctx.rank, "bytes": nbytes,
                                                                           "seconds": seconds}))
        full = LayerRange(0, engine.cfg.num_hidden_layers)
        driver = InstanceDriver(ctx.rank, (ctx.rank,), [full], [PoolSpec(full, engine.kv.num_pages)], engine,
                                ctx.messenger, ctx.sched_config)
        driver.adopt_blocks(msg.blocks, pool=0)
        for er in msg.requests:
            driver.adopt(er, pool=0)
        driver.audit()
        ctx.take_role(Role(ctx.rank, 0, 1, full), driver=driver)
        ctx.to_controller(ctx.rank_info())
        ctx.to_controller(Restored(ctx.rank, msg.epoch, [er.request_id for er in msg.requests]))
