"""Dispatch policies: which instance (replica or group) serves a new request.

A policy is a small class behind ``DispatchPolicy`` registered by name; the controller
calls ``choose`` and does not know which policy runs.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from dataclasses import dataclass

from orchestrator.policy.registry import Registry


@dataclass(frozen=True)
class InstanceLoad:
    """What a policy sees of one instance."""

    instance: int
    num_ranks: int
    free_fraction: float
    """Free KV pages over total, from the leader's last report."""
    waiting: int
    running: int
    outstanding: int
    """Requests the controller sent there that have not finished (never stale)."""


class DispatchPolicy(ABC):
    """Chooses an instance for each new request."""

    name: str

    @abstractmethod
    def choose(self, loads: list[InstanceLoad]) -> int:
        """Return the chosen instance id; ``loads`` is never empty."""


DISPATCH: Registry[DispatchPolicy] = Registry("dispatch policy")
register = DISPATCH.register


def dispatch_policies() -> list[str]:
    return DISPATCH.names()


def make_dispatch_policy(name: str) -> DispatchPolicy:
    return DISPATCH.make(name)


@register
class RoundRobin(DispatchPolicy):
    """Each instance in turn, whatever its size or load."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, loads: list[InstanceLoad]) -> int:
        return loads[next(self._counter) % len(loads)].instance


@register
class LeastLoaded(DispatchPolicy):
    """Fewest outstanding requests per rank, then the most free KV memory.

    Counting per rank sends a g-rank group g times the requests of a replica.
    """

    name = "least_loaded"

    def choose(self, loads: list[InstanceLoad]) -> int:
        best = min(loads, key=lambda x: (x.outstanding / x.num_ranks, -x.free_fraction, x.instance))
        return best.instance
