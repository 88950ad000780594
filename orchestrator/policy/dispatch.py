"""Dispatch policies: which instance (replica or group) serves a new request.

A policy is a small class behind ``DispatchPolicy`` registered by name; the controller
calls ``choose`` and does not know which policy runs.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from engines.paging import block_hashes
from orchestrator.policy.registry import Registry

DEFAULT_BLOCK_TOKENS = 16
"""Tokens per block a prefix-aware policy hashes (the KV page size when the cluster says)."""


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
    capacity_tokens: int = 0
    """Tokens its KV pool holds (0: not reported yet)."""


class DispatchPolicy(ABC):
    """Chooses an instance for each new request."""

    name: str

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        self.block_tokens = block_tokens
        """The KV page size: what a prefix-aware policy hashes prompts by."""

    @abstractmethod
    def choose(self, loads: list[InstanceLoad], prompt_token_ids: Sequence[int] = ()) -> int:
        """Return the chosen instance id for a request with this prompt; ``loads`` is never empty."""


DISPATCH: Registry[DispatchPolicy] = Registry("dispatch policy")
register = DISPATCH.register


def dispatch_policies() -> list[str]:
    return DISPATCH.names()


def make_dispatch_policy(name: str, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> DispatchPolicy:
    return DISPATCH.make(name, block_tokens)


@register
class RoundRobin(DispatchPolicy):
    """Each instance in turn, whatever its size or load."""

    name = "round_robin"

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        super().__init__(block_tokens)
        self._counter = itertools.count()

    def choose(self, loads: list[InstanceLoad], prompt_token_ids: Sequence[int] = ()) -> int:
        return loads[next(self._counter) % len(loads)].instance


@register
class LeastLoaded(DispatchPolicy):
    """Fewest outstanding requests per rank, then the most free KV memory.

    Counting per rank sends a g-rank group g times the requests of a replica.
    """

    name = "least_loaded"

    def choose(self, loads: list[InstanceLoad], prompt_token_ids: Sequence[int] = ()) -> int:
        best = min(loads, key=lambda x: (x.outstanding / x.num_ranks, -x.free_fraction, x.instance))
        return best.instance


@register
class PrefixAware(DispatchPolicy):
    """The instance with the least work for this request: the prompt blocks it would still
    have to prefill plus the blocks of the requests it already serves, per rank.

    ``cost(i) = (B - hit(i)) + outstanding(i) * mean_B / ranks(i)``, with ``B`` the
    request's full prompt blocks, ``hit(i)`` the longest run of them instance i is believed
    to hold, and ``mean_B`` the mean blocks of the requests routed so far. It is Dynamo's
    router score (prefill blocks to compute plus active blocks), with the active blocks
    taken from the controller's outstanding count, which is never stale, rather than from
    the leaders' reports, which lag by a report period and would send a burst of requests
    with one prefix all to one instance. ``hit(i)`` comes from an index of the blocks
    routed to each instance, kept in LRU order and bounded by the instance's KV capacity,
    as llm-d's prefix scorer does: an estimate, since the instance may have evicted them.
    Ties go to the least loaded.
    """

    name = "prefix_aware"

    def __init__(self, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        super().__init__(block_tokens)
        self._index: dict[int, OrderedDict[int, None]] = {}
        self._blocks_routed = 0
        self._requests_routed = 0

    def choose(self, loads: list[InstanceLoad], prompt_token_ids: Sequence[int] = ()) -> int:
        hashes = block_hashes(prompt_token_ids, self.block_tokens)
        mean = self._blocks_routed / self._requests_routed if self._requests_routed else len(hashes)
        def cost(x: InstanceLoad) -> tuple[float, float, float, int]:
            hit = self._hit(x.instance, hashes)
            return (len(hashes) - hit + x.outstanding * mean / x.num_ranks, x.outstanding / x.num_ranks,
                    -x.free_fraction, x.instance)
        best = min(loads, key=cost)
        self._remember(best, hashes)
        return best.instance

    def _hit(self, instance: int, hashes: list[int]) -> int:
        index = self._index.get(instance, {})
        hit = 0
        while hit < len(hashes) and hashes[hit] in index:
            hit += 1
        return hit

    def _remember(self, load: InstanceLoad, hashes: list[int]) -> None:
        index = self._index.setdefault(load.instance, OrderedDict())
        for h in hashes:
            index[h] = None
            index.move_to_end(h)
        limit = load.capacity_tokens // self.block_tokens
        while limit and len(index) > limit:
            index.popitem(last=False)
        self._blocks_routed += len(hashes)
        self._requests_routed += 1
