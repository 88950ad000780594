"""A simulated cluster: the request stream on the simulated clock, placed by the project's
own dispatch policy, served by simulated instances (``perf.sim.instance``), reshaped by the
project's own reshape policy (``orchestrator.policy.reshape``: the kunserve policy's load
monitor and drop planner) every ``DECISION_INTERVAL_S``, as ``serve``'s controller does.

Only time is modelled: each decision is the real policy's, on the load the real leaders'
``instance_stats`` reports; each drop and restore is carried out by ``perf.sim.reshape``,
and each of the llumnix policy's migrations by ``perf.sim.migration``, with their transfers
on the fabric's links.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from engines.mapping import LayerRange
from orchestrator.cluster.controller import DECISION_INTERVAL_S
from orchestrator.contracts import Topology
from orchestrator.core.block_manager import PoolSpec
from orchestrator.policy.bundles import get_policy
from orchestrator.policy.dispatch import InstanceLoad, make_dispatch_policy
from orchestrator.policy.migration import MIGRATION, MigrationPolicy
from orchestrator.policy.reshape import ReshapePolicy, make_reshape_policy
from perf.bench_records import ClusterEvent, SecondSample
from perf.sim.instance import SimContext, SimInstance, SimRequest
from perf.sim.loop_turns import to_controller
from perf.sim.migration import MigrationRecord, SimMigration
from perf.sim.reshape import ReshapeRecord, SimDrop, SimRestore

SIMULATED_POLICIES = ("kunserve", "vllm", "swap", "llumnix", "oracle")
"""``serve --policy`` bundles the simulator runs (every one ``serve`` has)."""
SAMPLE_INTERVAL_S = 1.0
"""Simulated seconds between memory samples of every rank (``perf.bench`` samples each second)."""


@contextmanager
def _long_lived_heap():
    """Collect less often while the clock runs: the simulation keeps a large heap of live
    objects (the stream, every request's block tables) that Python's collector would scan
    again and again, which made a control tick of 128 instances take 0.8 s now and then and
    the run grow faster than the cluster. What exists before the run is frozen out of the
    collections (and given back after); the young generation is collected every 50,000
    allocations instead of 700."""
    gc.freeze()
    before = gc.get_threshold()
    gc.set_threshold(50_000, 20, 20)
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


@dataclass
class SimResult:
    requests: list[SimRequest]
    makespan_s: float
    events: int
    steps: int
    reshapes: list[ReshapeRecord] = field(default_factory=list)
    samples: list[SecondSample] = field(default_factory=list)
    cluster_events: list[ClusterEvent] = field(default_factory=list)
    decision_s: list[float] = field(default_factory=list)
    """Wall seconds of each control tick's policy work (observe and decide)."""
    migrations: list[MigrationRecord] = field(default_factory=list)


class SimCluster:
    """Instances over ranks ``0..ranks-1``; one owner (this) for the topology."""

    def __init__(self, ctx: SimContext, ranks: int, policy: str, dispatch: str = "least_loaded",
                 reshape: ReshapePolicy | None = None, sample: bool = True) -> None:
        self.ctx = ctx
        self.policy_name = policy
        self.bundle = get_policy(policy)
        self.migration: MigrationPolicy | None = (MIGRATION.make(self.bundle.migration, ctx.migration)
                                                  if self.bundle.migration else None)
        self.migrating: dict[int, SimMigration] = {}
        layout = ctx.layout
        self.reshape = reshape or make_reshape_policy(self.bundle.reshape, layout.model_memory()
                                                      if self.bundle.reshape != "never" else None)
        self.dispatch = make_dispatch_policy(dispatch, layout.page_size)
        self.instances: dict[int, SimInstance] = {}
        for r in range(ranks):
            self.instances[r] = self._replica(r)
        self.origin: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        """A group's ranks -> the rank tuples of the instances it was fused from."""
        self.stats: dict[int, object] = {}
        """Each leader's load at the last tick (the reports the controller dispatches on)."""
        self._loads: dict[int, InstanceLoad] = {}
        """``_load``'s, since the last tick or topology change."""
        ctx.on_finish = self.on_finish
        self.reshaping: set[int] = set()
        """Leaders of the instances a drop or a restore has taken."""
        self.active: list[SimDrop | SimRestore] = []
        self.deferred: list[SimRequest] = []
        self.total = 0
        self.finished = 0
        self.sample = sample
        self.result = SimResult([], 0.0, 0, 0)

    def _replica(self, rank: int) -> SimInstance:
        layout = self.ctx.layout
        pages = layout.replica_pages()
        if self.bundle.unlimited_kv:  # room for max_num_seqs full contexts, as serve's lazy pool
            pages = self.ctx.sched.max_num_seqs * -(-self.ctx.max_model_len // layout.page_size) * layout.num_layers
        return SimInstance(self.ctx, (rank,), [LayerRange(0, layout.num_layers)],
                           [PoolSpec(LayerRange(0, layout.num_layers), pages)])

    @property
    def topology(self) -> Topology:
        return Topology(tuple(sorted(i.ranks for i in self.instances.values())))

    # The stream ----------------------------------------------------------------------
    def run(self, requests: list[SimRequest]) -> SimResult:
        clock = self.ctx.clock
        self.total = len(requests)
        self.result.requests = requests
        for sim in requests:
            clock.at(sim.arrival_s, lambda sim=sim: to_controller(self.ctx, lambda: self._arrive(sim)))
        clock.at(0.0, self._tick)
        if self.sample:
            clock.at(0.0, self._sample)
        with _long_lived_heap():
            clock.run()
        unfinished = [s for s in requests if s.finish_s is None]
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} requests never finished (first: {unfinished[0].request_id})")
        self.result.makespan_s = max((s.finish_s for s in requests), default=0.0)
        self.result.events = clock.processed
        self.result.steps = self.ctx.microbatches
        return self.result

    def on_finish(self, sim: SimRequest) -> None:
        self.finished += 1

    def _load(self, inst: SimInstance) -> InstanceLoad:
        """The instance's load as the controller sees it: its leader's last report and the
        requests sent there. Kept until either changes (a tick, a topology change, or its
        outstanding count), so that an arrival at 512 instances does not rebuild 512 of them."""
        load = self._loads.get(inst.leader)
        if load is not None and load.outstanding == inst.outstanding and load.num_ranks == len(inst.ranks):
            return load
        load = self._loads[inst.leader] = self._fresh_load(inst)
        return load

    def _fresh_load(self, inst: SimInstance) -> InstanceLoad:
        s = self.stats.get(inst.leader)
        if s is None:  # not reported yet, as the controller sees a new instance
            return InstanceLoad(inst.leader, len(inst.ranks), 1.0, 0, 0, inst.outstanding, 0)
        return InstanceLoad(inst.leader, len(inst.ranks), s.free_fraction, s.waiting, s.running, inst.outstanding,
                            s.capacity_tokens)

    def _arrive(self, sim: SimRequest) -> None:
        ready = [i for i in self.instances.values() if i.leader not in self.reshaping]
        if not ready:
            self.deferred.append(sim)  # every instance is reshaping: dispatch it right after
            return
        loads = [self._load(i) for i in ready]
        self.instances[self.dispatch.choose(loads, sim.prompt_token_ids)].add(sim)

    @property
    def _done(self) -> bool:
        return self.finished >= self.total and not self.active

    # The controller's tick -----------------------------------------------------------
    def _tick(self) -> None:
        """Due: it runs at the controller's next loop turn, and the next is due an interval later."""
        to_controller(self.ctx, self._tick_now)

    def _tick_now(self) -> None:
        if self._done:
            return
        now = self.ctx.clock.now
        t0 = time.perf_counter()
        self.stats = stats = {leader: inst.stats() for leader, inst in self.instances.items()}
        self._loads.clear()
        self.reshape.observe(stats, now)
        actions = [] if self.active else self.reshape.decide(self.topology, now)
        moves = self._decide_migrations(stats, now)
        self.result.decision_s.append(time.perf_counter() - t0)
        for m in moves:
            m.start()
        for action in actions:
            if action.kind == "drop":
                self._begin_drop(action.ranks, action.detail)
            else:
                self._begin_restore(action.ranks, action.detail)
        self.ctx.clock.after(DECISION_INTERVAL_S, self._tick)

    def _decide_migrations(self, stats: dict, now: float) -> list[SimMigration]:
        """The migration policy's pairs (``MigrationBook.start``), as state machines to start."""
        if self.migration is None:
            return []
        busy = {r for m in self.migrating.values() for r in (m.src.leader, m.dst.leader)}
        out = []
        for d in self.migration.decide(stats, self.topology, busy, now):
            mid = len(self.result.migrations) + len(self.migrating) + len(out) + 1
            out.append(SimMigration(self.ctx, mid, self.instances[d.src], self.instances[d.dst],
                                    d.dst_free_tokens, self._migrated))
        for m in out:
            self.migrating[m.mid] = m
        return out

    def _migrated(self, m: SimMigration) -> None:
        del self.migrating[m.mid]
        self.result.migrations.append(m.record)
        if m.record.ok:
            self._event("migration", (m.record.src, m.record.dst), request=m.record.request_id,
                        kv_bytes=m.record.kv_bytes, stages=m.record.stages, stop_s=round(m.record.stop_s, 4))

    def _event(self, kind: str, ranks: tuple[int, ...], **detail) -> None:
        self.result.cluster_events.append(ClusterEvent(self.policy_name, self.ctx.clock.now, kind, json.dumps(
            {"ranks": list(ranks), **detail}, sort_keys=True, separators=(",", ":"), default=str)))

    def _begin_drop(self, ranks: tuple[int, ...], why: dict) -> None:
        parts = self.topology.parts_of(ranks)
        members = [self.instances[p[0]] for p in sorted(parts, key=lambda p: ranks.index(p[0]))]
        self.reshaping.update(m.leader for m in members)
        self._event("decision", ranks, action="drop", **why)
        drop = SimDrop(self.ctx, members, lambda g: self._formed(drop, g), self._reshaped)
        self.active.append(drop)
        drop.start()

    def _formed(self, drop: SimDrop, group: SimInstance) -> None:
        for m in drop.parts:
            del self.instances[m.leader]
            self.reshaping.discard(m.leader)
            self.reshape.forget(m.leader)
        self.instances[group.leader] = group
        self._loads.clear()
        self.origin[group.ranks] = [m.ranks for m in drop.parts]
        self._event("drop", group.ranks, requests=drop.record.requests)
        self._flush_deferred()

    def _begin_restore(self, ranks: tuple[int, ...], why: dict) -> None:
        group = self.instances[ranks[0]]
        self.reshaping.add(group.leader)
        self._event("decision", ranks, action="restore", **why)
        restore = SimRestore(self.ctx, group, self.origin.pop(group.ranks), self._split, self._reshaped)
        self.active.append(restore)
        restore.start()

    def _split(self, group: SimInstance, parts: list[SimInstance]) -> None:
        del self.instances[group.leader]
        self.reshaping.discard(group.leader)
        self.reshape.forget(group.leader)
        self._loads.clear()
        for p in parts:
            self.instances[p.leader] = p
            self.reshaping.add(p.leader)  # until its weights are back

    def _reshaped(self, r: SimDrop | SimRestore) -> None:
        self.active.remove(r)
        self.result.reshapes.append(r.record)
        if isinstance(r, SimRestore):
            for p in r.parts:
                self.reshaping.discard(p.leader)
            self._event("restore", r.record.ranks, requests=r.record.requests, kv_bytes=r.record.kv_bytes,
                        weight_bytes=r.record.weight_bytes)
        else:
            self._event("exchange", r.record.ranks, requests=r.record.requests, kv_bytes=r.record.kv_bytes,
                        seconds=r.record.done_s - r.record.serving_s)
        self._flush_deferred()

    def _flush_deferred(self) -> None:
        deferred, self.deferred = self.deferred, []
        for sim in deferred:
            self._arrive(sim)

    # Memory per rank -----------------------------------------------------------------
    def _sample(self) -> None:
        if self._done:
            return
        layout, now = self.ctx.layout, self.ctx.clock.now
        for inst in self.instances.values():
            blocks = inst.scheduler.blocks
            for rank, rng, (used, total) in zip(inst.ranks, inst.ranges, blocks.usage()):
                weights = layout.weight_bytes(len(rng)) * layout.tp
                kv = total * layout.page_bytes * layout.tp
                free = max(0, layout.device_bytes * layout.tp - weights - kv)
                self.result.samples.append(SecondSample(self.policy_name, now, rank, used, total, weights, kv, free,
                                                        len(inst.scheduler.waiting), len(inst.scheduler.running)))
        self.ctx.clock.after(SAMPLE_INTERVAL_S, self._sample)
