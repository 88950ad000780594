"""Migration policies: which replica sheds a running request to which, from the leaders'
load reports.

``llumnix``: Llumnix balances the instances' KV load by migrating running requests (with
their KV, while they keep decoding) from loaded instances to less loaded ones; the freed
room admits the loaded instance's queue. A policy picks pairs only; the mechanism
(``cluster/migration.py``) moves.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from orchestrator.contracts import InstanceStats, Topology
from orchestrator.policy.registry import Registry


@dataclass(frozen=True)
class MigrationConfig:
    """When the llumnix policy moves a request."""

    source_usage: float = 0.9
    """An instance sheds load once this fraction of its KV is used, or it has a queue that
    does not fit."""
    target_usage: float = 0.6
    """An instance takes load only while less than this fraction is used and nothing waits."""
    cooldown_s: float = 0.5
    """Between two migrations from the same source (its reports must catch up)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.target_usage < self.source_usage <= 1.0:
            raise ValueError("migration usages must satisfy 0 <= target_usage < source_usage <= 1, got "
                             f"target_usage={self.target_usage}, source_usage={self.source_usage}")
        if self.cooldown_s < 0:
            raise ValueError(f"migration cooldown_s must be >= 0, got {self.cooldown_s}")


@dataclass(frozen=True)
class MigrationDecision:
    """Move one running request from replica ``src`` to ``dst``, which has this much room."""

    src: int
    dst: int
    dst_free_tokens: int


class MigrationPolicy(ABC):
    """Decides migrations from load; knows nothing of how they are done."""

    name: str
    description: str

    @abstractmethod
    def decide(self, stats: dict[int, InstanceStats], topology: Topology, busy: set[int],
               now: float) -> list[MigrationDecision]:
        """Migrations to start now; ``busy`` holds the instances already migrating."""


MIGRATION: Registry[MigrationPolicy] = Registry("migration policy")


@MIGRATION.register
class LlumnixPolicy(MigrationPolicy):
    name = "llumnix"
    description = "running requests move with their KV from loaded replicas to roomy ones"

    def __init__(self, config: MigrationConfig | None = None) -> None:
        self.config = config or MigrationConfig()
        self._last: dict[int, float] = {}

    def decide(self, stats: dict[int, InstanceStats], topology: Topology, busy: set[int],
               now: float) -> list[MigrationDecision]:
        """Pairs (loaded source, roomy destination), each instance in at most one migration."""
        c = self.config
        replicas = [r[0] for r in topology.instances if len(r) == 1 and r[0] in stats and r[0] not in busy]
        sources = sorted((i for i in replicas if self._loaded(stats[i]) and stats[i].running > 0
                          and now - self._last.get(i, 0.0) >= c.cooldown_s),
                         key=lambda i: (-stats[i].waiting, -_usage(stats[i])))
        targets = sorted((i for i in replicas if stats[i].waiting == 0 and _usage(stats[i]) < c.target_usage),
                         key=lambda i: -stats[i].free_tokens)
        out = []
        for src, dst in zip(sources, targets):
            if src == dst:
                continue
            self._last[src] = now
            out.append(MigrationDecision(src, dst, stats[dst].free_tokens))
        return out

    def _loaded(self, s: InstanceStats) -> bool:
        return _usage(s) >= self.config.source_usage or (s.waiting > 0 and s.queued_tokens > s.free_tokens)


def _usage(s: InstanceStats) -> float:
    return s.used_tokens / s.capacity_tokens if s.capacity_tokens else 0.0
