"""An instance's load as its leader reports it: what the controller, the dispatcher and the
reshape and migration policies read."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PoolUsage:
    """One rank's KV pool: pages used and in all."""

    rank: int
    used: int
    total: int


@dataclass
class InstanceStats:
    """An instance's load, as its leader sees it."""

    instance: int
    waiting: int
    running: int
    pools: list[PoolUsage]
    capacity_tokens: int = 0
    """Tokens its KV pools hold (a group's: what every stage can hold)."""
    demand_tokens: int = 0
    """Tokens its running and waiting requests hold or need now."""
    used_tokens: int = 0
    queued_tokens: int = 0
    """Tokens of the requests waiting for admission."""
    free_tokens: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    """Events since the previous report: preemptions, swaps, migrations."""

    @property
    def free_fraction(self) -> float:
        total = sum(p.total for p in self.pools)
        return sum(p.total - p.used for p in self.pools) / total if total else 0.0
