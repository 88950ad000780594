"""Reshaping on one rank: the single owner of its drop and restore protocols.

The ``Reshaper`` receives every reshape order and completion the rank gets, runs the
member's part of a drop and of a restore itself, and holds the leader's state machines
(``Formation`` for a drop, ``Split`` for a restore) while they run:

drop     ``DropGroup`` -> each fused instance's leader (a group's once it has drained
         its pipeline, then telling its other stages) hands its requests over; every
         member keeps only its new stage's weights and grows its KV pool, then tells the
         new leader ``MemberReady``; the leader's ``Formation`` adopts them all and
         exchanges the stale KV.
restore  ``RestoreGroup`` -> the leader's ``Split`` drains and moves the KV home, then
         sends each member ``SplitGroup``: it gives the KV extension back, pulls the
         weights it dropped from its peers and serves in the instance it was fused from
         (a replica, or a stage of a group).
"""

from __future__ import annotations

import logging

from engines.mapping import Holding, LayerRange
from orchestrator.core.block_manager import PoolSpec
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.formation import Formation, GroupOrigin
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
        self._draining: DropGroup | None = None
        """A drop order for the group this rank leads, waiting for its pipeline to drain."""
        self.origins: dict[tuple[int, ...], GroupOrigin] = {}
        """What each group this rank formed was fused from, until the group splits again."""

    def poll(self) -> None:
        """Advance the protocols this rank leads (each turn of the rank loop)."""
        if self.formation is not None and self.formation.poll():
            self.formation = None
        self._drop_if_drained()
        if self.split is not None:
            self.split.poll(exchanging=self.formation is not None and self.formation.exchanging)

    # Messages ------------------------------------------------------------------------------
    def on_drop_group(self, msg: DropGroup) -> None:
        driver = self.ctx.driver
        if driver is not None and len(driver.ranks) > 1:
            driver.pause()  # the group this rank leads drains first (and finishes its own exchange)
            self._draining = msg
            self._drop_if_drained()
        else:
            self._begin_drop(msg)

    def _drop_if_drained(self) -> None:
        """The group this rank leads has drained: its other stages get the order (no
        micro-batch is left for them), and this rank drops."""
        if self._draining is None or not self._drained():
            return
        msg, self._draining = self._draining, None
        for rank in self.ctx.driver.ranks[1:]:
            self.ctx.send_to_rank(rank, msg)
        self._begin_drop(msg)

    def _begin_drop(self, msg: DropGroup) -> None:
        self.formation = self._drop(msg)
        if self.formation is not None:  # this rank leads the new group
            early, self._early = [m for m in self._early if m.epoch == msg.epoch], []
            for m in early:
                self.formation.on_member_ready(m)

    def on_member_ready(self, msg: MemberReady) -> None:
        if self.formation is None or self.formation.epoch != msg.epoch:
            self._early.append(msg)  # a peer was faster than our own drop order (or our drain)
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
        self.split = Split(self.ctx, driver, msg.epoch, self.origins.pop(driver.ranks, None))

    def on_split_group(self, msg: SplitGroup) -> None:
        self._split(msg)
        self.formation = self.split = None

    # The member's part --------------------------------------------------------------------
    def _drained(self) -> bool:
        driver = self.ctx.driver
        return self.formation is None and not driver.inflight and not driver.held

    def _ranges(self, ranks: tuple[int, ...]) -> list[LayerRange]:
        mapping = self.ctx.engine.store.mapping(len(ranks), self.ctx.devices.size)
        return [mapping.layer_range(s) for s in range(len(ranks))]

    def _drop(self, msg: DropGroup) -> Formation | None:
        """Hand my instance's requests to the new leader (if I lead one), keep only my new
        stage's weights, grow my KV pool. Returns the leader's side of the drop on the new
        leader, else None."""
        ctx, driver, engine = self.ctx, self.ctx.driver, self.ctx.engine
        exported, shared, layout = [], [], ()
        if driver is not None:  # the instance's requests, their pages where its stages keep them
            ctx.to_controller(driver.report())  # tokens and counts from before the drop still reach the controller
            exported = driver.export_requests(home=ctx.rank)
            shared = driver.export_blocks()  # the cached blocks they share; unreferenced ones are given back
            if len(driver.ranks) > 1:
                layout = tuple(driver.ranks[driver.blocks.pool_of_layer(layer)]
                               for layer in range(engine.cfg.num_hidden_layers))
        elif ctx.worker is None:
            raise RuntimeError(f"rank {ctx.rank} got a drop order but serves in no instance")
        stage = msg.ranks.index(ctx.rank)
        ranges = self._ranges(msg.ranks)
        before, base = engine.holding(), engine.kv.num_pages
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
            formation = Formation(ctx, msg.ranks, ranges, msg.epoch, msg.parts, self._remember)
        else:
            ctx.take_role(role, worker=StageWorker(msg.ranks[0], msg.ranks, stage, ranges, engine, ctx.messenger))
        ctx.to_controller(ctx.rank_info())
        ready = MemberReady(ctx.rank, msg.epoch, engine.kv.num_pages, base, exported, shared, layout, before,
                            engine.holding())
        ctx.send_to_rank(msg.ranks[0], ready)
        return formation

    def _remember(self, ranks: tuple[int, ...], origin: GroupOrigin) -> None:
        self.origins[ranks] = origin

    def _split(self, msg: SplitGroup) -> None:
        """Give the KV extension back, pull my dropped weights from the peers, serve in the
        instance I was fused from."""
        ctx, engine = self.ctx, self.ctx.engine
        stage = msg.ranks.index(ctx.rank)
        full = [Holding.full(engine.cfg.num_hidden_layers, engine.cfg.tie_word_embeddings)] * len(msg.ranks)
        nbytes, seconds = ctx.devices.restore(msg.ranks, list(msg.held_now) or full, list(msg.held_target) or full,
                                              stage, ctx.transport)
        logger.info("restored %.1f MiB of weights from peers in %.3f s (%.2f GiB/s)", nbytes / 2**20, seconds,
                    nbytes / max(seconds, 1e-9) / 2**30)
        ctx.to_controller(ReshapeEvent(EventKind.WEIGHTS_PULLED, msg.ranks, {"rank": ctx.rank, "bytes": nbytes,
                                                                           "seconds": seconds}))
        part = msg.part or (ctx.rank,)
        ranges = self._ranges(part)
        pstage = part.index(ctx.rank)
        role = Role(part[0], pstage, len(part), ranges[pstage])
        if pstage == 0:
            pools = [PoolSpec(r, n) for r, n in zip(ranges, msg.part_pages or (engine.kv.num_pages,))]
            driver = InstanceDriver(ctx.rank, part, ranges, pools, engine, ctx.messenger, ctx.sched_config,
                                    ctx.cost_model if len(part) > 1 else None)
            layer_pools = [driver.blocks.pool_of_layer(layer) for layer in range(engine.cfg.num_hidden_layers)]
            driver.adopt_blocks(msg.blocks, pool=layer_pools)
            for er in msg.requests:
                driver.adopt(er, pool=layer_pools)
            driver.audit()
            ctx.take_role(role, driver=driver)
        else:
            ctx.take_role(role, worker=StageWorker(part[0], part, pstage, ranges, engine, ctx.messenger))
        ctx.to_controller(ctx.rank_info())
        ctx.to_controller(Restored(ctx.rank, msg.epoch, [er.request_id for er in msg.requests]))
