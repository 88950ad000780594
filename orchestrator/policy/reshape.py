"""Reshape policies: when to fuse replicas into groups and when to split them again.

A policy reads the leaders' load reports and returns actions; the controller carries
them out with the same drop and restore mechanism the admin endpoints use. ``vllm``
never reshapes (the KV-centric baseline); ``kunserve`` drops when instances vote
overload (the load monitor) along the drop planner's plan, and restores a group when its
demand has been low and not rising for a while (hysteresis).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from orchestrator.contracts import InstanceStats, Topology
from orchestrator.kunserve.load_monitor import LoadMonitor, LoadSample, MonitorConfig
from orchestrator.kunserve.planner import DropPlan, InstanceSnapshot, ModelMemory, allowed_group_sizes, plan_drop
from orchestrator.policy.registry import Registry


@dataclass(frozen=True)
class Action:
    kind: str
    """``drop`` or ``restore``."""
    ranks: tuple[int, ...]
    detail: dict = field(default_factory=dict)
    """Why: the plan's deficit and reason for a drop, the level and trend for a restore."""


class ReshapePolicy(ABC):
    """Decides drops and restores from load; knows nothing of how they are done."""

    name: str
    description: str

    def observe(self, stats: dict[int, InstanceStats], now: float) -> None:
        """Record the latest load of every instance."""

    @abstractmethod
    def decide(self, topology: Topology, now: float) -> list[Action]:
        """Actions to start now (the controller calls this only when nothing is reshaping)."""

    def plan(self, topology: Topology) -> DropPlan | None:
        """What a drop would do now (for ``GET /admin/plan``), or None if the policy never drops."""
        return None

    def forget(self, instance: int) -> None:
        """An instance went away (fused into a group, or a group split)."""


RESHAPE: Registry[ReshapePolicy] = Registry("reshape policy")


@RESHAPE.register
class NeverReshape(ReshapePolicy):
    name = "never"
    description = "never fuses or splits instances (the KV-centric baselines)"

    def decide(self, topology: Topology, now: float) -> list[Action]:
        return []


@RESHAPE.register
class KunServePolicy(ReshapePolicy):
    name = "kunserve"
    description = ("parameter-centric: on KV overload fuse replicas into pipelined groups that drop "
                   "weights for KV; restore when the burst has passed")

    def __init__(self, mem: ModelMemory | None, monitor: MonitorConfig | None = None,
                 min_group_age_s: float = 2.0) -> None:
        if mem is None:
            raise ValueError("the kunserve policy needs the model's memory figures")
        allowed_group_sizes(mem)  # a store without a pipeline split cannot drop: say so at start
        self.mem = mem
        self.monitor = LoadMonitor(monitor)
        self.min_group_age_s = min_group_age_s
        self._born: dict[int, float] = {}

    def observe(self, stats: dict[int, InstanceStats], now: float) -> None:
        for inst, s in stats.items():
            if s.capacity_tokens <= 0:
                continue
            self.monitor.add(LoadSample(inst, now, s.capacity_tokens, s.demand_tokens, s.used_tokens,
                                        s.queued_tokens, s.free_tokens, s.waiting))

    def _snapshot(self, topology: Topology) -> list[InstanceSnapshot]:
        latest = self.monitor.snapshot()
        out = []
        for ranks in topology.instances:
            s = latest.get(ranks[0])
            if s is not None:
                out.append(InstanceSnapshot(ranks[0], ranks, s.capacity_tokens, s.demand_tokens, s.queued_tokens,
                                            min(s.free_tokens, s.capacity_tokens),
                                            self.monitor.votes_overload(ranks[0])))
        return out

    def plan(self, topology: Topology) -> DropPlan:
        return plan_drop(self._snapshot(topology), self.mem)

    def decide(self, topology: Topology, now: float) -> list[Action]:
        plan = self.plan(topology)
        if not plan.empty:
            for group in plan.groups:
                self._born[group[0]] = now
            why = {"deficit_tokens": plan.deficit_tokens, "added_tokens": plan.added_tokens, "reason": plan.reason}
            # A plan names instances; the drop names their ranks (a group's, all of them).
            return [Action("drop", tuple(r for inst in group for r in topology.ranks_of_rank(inst)), why)
                    for group in plan.groups]
        actions = []
        for ranks in topology.instances:
            young = now - self._born.get(ranks[0], 0.0) < self.min_group_age_s
            if (len(ranks) > 1 and not young and self.monitor.wants_restore(ranks[0])
                    and self._fits_as_replicas(ranks)):
                actions.append(Action("restore", ranks, {"level": round(self.monitor.level(ranks[0]), 4),
                                                         "trend_per_s": self.monitor.trend(ranks[0])}))
        return actions

    def _fits_as_replicas(self, ranks: tuple[int, ...]) -> bool:
        """The group's demand would sit below the restore level of the replicas it splits
        into. The group's own level says nothing here: its pool is several times theirs, so
        a group restored on it would overload at once and drop again (thrashing)."""
        latest = self.monitor.snapshot().get(ranks[0])
        if latest is None:
            return False
        replica_tokens = self.mem.kv_pool_bytes // self.mem.kv_bytes_per_token
        return latest.demand_tokens <= self.monitor.config.restore_level * replica_tokens * len(ranks)

    def forget(self, instance: int) -> None:
        self.monitor.forget(instance)


def make_reshape_policy(name: str, mem: ModelMemory | None, monitor: MonitorConfig | None = None) -> ReshapePolicy:
    """The reshape policy a serving bundle names (``policy.bundles``); only kunserve reads
    the model's memory figures and the monitor's settings."""
    cls = RESHAPE.get(name)
    return cls(mem, monitor) if cls is KunServePolicy else cls()
