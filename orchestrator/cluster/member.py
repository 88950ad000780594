"""Reshaping, member side: what every rank of a group does on a drop and on a restore."""

from __future__ import annotations

import logging

from engines.mapping import LayerRange
from orchestrator.core.block_manager import PoolSpec
from orchestrator.cluster.event_log import EventKind
from orchestrator.cluster.instance import InstanceDriver, StageWorker
from orchestrator.cluster.messages import DropGroup, MemberReady, ReshapeEvent, Restored, SplitGroup
from orchestrator.cluster.reshape import Formation
from orchestrator.cluster.weight_pull import exchange_weights

logger = logging.getLogger(__name__)


def group_ranges(loop, ranks: tuple[int, ...]) -> list[LayerRange]:
    mapping = loop.engine.store.mapping(len(ranks))
    return [mapping.layer_range(s) for s in range(len(ranks))]


def on_drop_group(loop, msg: DropGroup) -> None:
    """Hand my requests to the new leader, keep only my stage's weights, grow my KV pool."""
    driver = loop.driver
    if driver is None or len(driver.ranks) != 1:
        raise RuntimeError(f"rank {loop.rank} got a drop order but is not a replica")
    loop.to_controller(driver.report())  # tokens and counts from before the drop still reach the controller
    exported = driver.export_requests(home=loop.rank)
    stage = msg.ranks.index(loop.rank)
    ranges = group_ranges(loop, msg.ranks)
    pages = loop.engine.drop_to(ranges[stage])
    m = loop.engine.last_drop
    loop.to_controller(ReshapeEvent(EventKind.WEIGHTS_DROPPED, msg.ranks, {
        "rank": loop.rank, "bytes": m.weights_freed, "remapped": m.remapped, "kv_pages_added": pages,
        "seconds": m.seconds}))
    loop.driver = None
    loop.role = (msg.ranks[0], stage, len(msg.ranks), ranges[stage])
    if stage == 0:
        loop.formation = Formation(loop, msg.ranks, ranges, msg.epoch)
        for early in loop.early_ready:
            loop.formation.on_member_ready(early)
        loop.early_ready = []
    else:
        loop.worker = StageWorker(msg.ranks[0], msg.ranks, stage, ranges, loop.engine, loop.messenger)
    loop.to_controller(loop.rank_info())
    ready = MemberReady(loop.rank, msg.epoch, loop.engine.kv.num_pages, loop.engine.plan.kv_pages, exported)
    loop.send_to_rank(msg.ranks[0], ready)


def on_split_group(loop, msg: SplitGroup) -> None:
    """Give the KV extension back, pull my dropped weights from the peers, serve as a replica."""
    stage = msg.ranks.index(loop.rank)
    ranges = group_ranges(loop, msg.ranks)
    engine = loop.engine
    # The KV extension's memory (empty now) receives the weights: no allocator, no page faults.
    memory = engine.memory_for_restore()
    nbytes, seconds = exchange_weights(engine.weights, msg.ranks, ranges, stage, loop.transport, memory)
    engine.restored(memory)
    logger.info("restored %.1f MiB of weights from peers in %.3f s (%.2f GiB/s)", nbytes / 2**20, seconds,
                nbytes / max(seconds, 1e-9) / 2**30)
    loop.to_controller(ReshapeEvent(EventKind.WEIGHTS_PULLED, msg.ranks, {"rank": loop.rank, "bytes": nbytes,
                                                                  "seconds": seconds}))
    full = LayerRange(0, engine.cfg.num_hidden_layers)
    driver = InstanceDriver(loop.rank, (loop.rank,), [full], [PoolSpec(full, engine.kv.num_pages)], engine,
                            loop.messenger, loop.sched_config)
    for er in msg.requests:
        pages = [p for row in er.block_table for p in row]
        if pages:
            driver.scheduler.blocks.take(0, pages)
        driver.adopt(er, held=False)
    driver.scheduler.blocks.audit(driver.requests.values())
    loop.driver, loop.worker, loop.formation, loop.split = driver, None, None, None
    loop.role = (loop.rank, 0, 1, full)
    loop.to_controller(loop.rank_info())
    loop.to_controller(Restored(loop.rank, msg.epoch, [er.request_id for er in msg.requests]))
