"""Reshaping, member side: what every rank of a group does on a drop and on a restore."""

from __future__ import annotations

import logging

from engines.mapping import LayerRange
from orchestrator.core.block_manager import PoolSpec
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.instance import InstanceDriver, StageWorker
from orchestrator.cluster.messages import DropGroup, MemberReady, ReshapeEvent, Restored, SplitGroup
from orchestrator.cluster.rank_context import RankContext, Role
from orchestrator.cluster.reshape import Formation
from orchestrator.cluster.weight_pull import exchange_weights

logger = logging.getLogger(__name__)


def group_ranges(ctx: RankContext, ranks: tuple[int, ...]) -> list[LayerRange]:
    mapping = ctx.engine.store.mapping(len(ranks))
    return [mapping.layer_range(s) for s in range(len(ranks))]


def on_drop_group(ctx: RankContext, msg: DropGroup) -> Formation | None:
    """Hand my requests to the new leader, keep only my stage's weights, grow my KV pool.
    Returns the leader's side of the drop on the new leader, else None."""
    driver = ctx.driver
    if driver is None or len(driver.ranks) != 1:
        raise RuntimeError(f"rank {ctx.rank} got a drop order but is not a replica")
    ctx.to_controller(driver.report())  # tokens and counts from before the drop still reach the controller
    exported = driver.export_requests(home=ctx.rank)
    stage = msg.ranks.index(ctx.rank)
    ranges = group_ranges(ctx, msg.ranks)
    pages = ctx.engine.drop_to(ranges[stage])
    m = ctx.engine.last_drop
    ctx.to_controller(ReshapeEvent(EventKind.WEIGHTS_DROPPED, msg.ranks, {
        "rank": ctx.rank, "bytes": m.weights_freed, "remapped": m.remapped, "kv_pages_added": pages,
        "seconds": m.seconds}))
    role = Role(msg.ranks[0], stage, len(msg.ranks), ranges[stage])
    formation = None
    if stage == 0:  # the driver comes when every member is ready (Formation)
        ctx.take_role(role)
        formation = Formation(ctx, msg.ranks, ranges, msg.epoch)
    else:
        ctx.take_role(role, worker=StageWorker(msg.ranks[0], msg.ranks, stage, ranges, ctx.engine, ctx.messenger))
    ctx.to_controller(ctx.rank_info())
    ready = MemberReady(ctx.rank, msg.epoch, ctx.engine.kv.num_pages, ctx.engine.plan.kv_pages, exported)
    ctx.send_to_rank(msg.ranks[0], ready)
    return formation


def on_split_group(ctx: RankContext, msg: SplitGroup) -> None:
    """Give the KV extension back, pull my dropped weights from the peers, serve as a replica."""
    stage = msg.ranks.index(ctx.rank)
    ranges = group_ranges(ctx, msg.ranks)
    engine = ctx.engine
    # The KV extension's memory (empty now) receives the weights: no allocator, no page faults.
    memory = engine.memory_for_restore()
    nbytes, seconds = exchange_weights(engine.weights, msg.ranks, ranges, stage, ctx.transport, memory)
    engine.restored(memory)
    logger.info("restored %.1f MiB of weights from peers in %.3f s (%.2f GiB/s)", nbytes / 2**20, seconds,
                nbytes / max(seconds, 1e-9) / 2**30)
    ctx.to_controller(ReshapeEvent(EventKind.WEIGHTS_PULLED, msg.ranks, {"rank": ctx.rank, "bytes": nbytes,
                                                                  "seconds": seconds}))
    full = LayerRange(0, engine.cfg.num_hidden_layers)
    driver = InstanceDriver(ctx.rank, (ctx.rank,), [full], [PoolSpec(full, engine.kv.num_pages)], engine,
                            ctx.messenger, ctx.sched_config)
    for er in msg.requests:
        pages = [p for row in er.block_table for p in row]
        if pages:
            driver.scheduler.blocks.take(0, pages)
        driver.adopt(er, held=False)
    driver.scheduler.blocks.audit(driver.requests.values())
    ctx.take_role(Role(ctx.rank, 0, 1, full), driver=driver)
    ctx.to_controller(ctx.rank_info())
    ctx.to_controller(Restored(ctx.rank, msg.epoch, [er.request_id for er in msg.requests]))
