"""The contract between the front ends (the HTTP ingress, the Triton relay) and the cluster.

The ingress (aiohttp, in its own thread and event loop on the controller rank) parses and
validates requests, then calls an ``IngressBackend``. The real backend is the cluster
controller; tests use an in-process fake. All methods are called from the ingress's event
loop thread; ``submit`` returns an asyncio queue that the backend fills (thread-safely)
with ``TokenEvent``s until one has ``finished=True``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from engines.sampling import SamplingParams, TokenLogprob
from engines.tokenizer import Tokenizer


@dataclass
class GenerateRequest:
    """A validated, tokenized request, as the ingress hands it to the backend."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    """When the HTTP request arrived (TTFT counts from here, queueing included)."""
    output_token_ids: list[int] = field(default_factory=list)
    """Tokens it already generated and its client already has: a request resumed on a new
    job after the one serving it died (``orchestrator.supervisor``). It continues after
    them as if it had never stopped (they count toward ``max_tokens`` and select the
    seeded stream of the next token) and only new tokens come back."""


@dataclass
class TokenEvent:
    """New tokens of one request; the last event of a request has ``finished=True``."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    """``stop``, ``length`` or ``abort`` once finished."""
    error: str | None = None
    """Set when the request failed in the cluster (the stream ends with an error)."""
    num_preemptions: int = 0
    """On the last event: how often the request was preempted (its KV dropped or swapped)."""
    num_migrations: int = 0
    """On the last event: how often it moved between replicas with its KV (llumnix)."""
    queue_time_s: float | None = None
    """On the request's first event with tokens: seconds it waited in its instance's queue
    before its first step was scheduled (vLLM's ``request_queue_time``); None elsewhere."""
    num_cached_tokens: int | None = None
    """On the first event with tokens, with prefix caching on: prompt tokens whose KV came
    from the cache (OpenAI's ``usage.prompt_tokens_details.cached_tokens``)."""
    instance: int | None = None
    """On the first event with tokens: the instance (its leader rank) that computed the
    prompt, for the request log."""
    instance_shape: str | None = None
    """With ``instance``: its ``tp{T}xpp{P}`` then."""
    logprobs: list[TokenLogprob] | None = None
    """When the request asked for them: one per token of ``token_ids``."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """When asked for: prompt positions scored since the last event (positions 1.. in order)."""
    cluster_failed: bool = False
    """With ``error``: the cluster went down (shutting down, a rank died), not the request;
    a supervisor sends such a request to its next job instead of failing it."""


@dataclass
class RankState:
    """What ``/admin/state`` shows per rank."""

    rank: int
    role: str
    """``replica``, or ``group`` when the rank is a stage of a pipelined group."""
    instance: int
    stage: int
    group_size: int
    layer_range: tuple[int, int]
    weight_bytes: int
    kv_pages_total: int
    kv_pages_used: int
    device_memory_bytes: int
    resident_bytes: int
    """The process's resident memory growth since start (weights + KV + workspace)."""
    kv_bytes: int = 0
    workspace_bytes: int = 0
    """Part of the device memory kept for activations and scratch."""
    tp_size: int = 1
    world_ranks: list[int] = field(default_factory=list)
    """The MPI world ranks of the devices behind this rank: its TP set (itself at tp 1)."""


@dataclass
class InstanceState:
    """What ``/admin/state`` shows per serving instance (a replica or a group)."""

    instance: int
    ranks: list[int]
    waiting: int
    running: int
    shape: str = "tp1xpp1"
    """``tp{T}xpp{P}``: T tensor-parallel devices in each of its P pipeline stages."""
    world_ranks: list[int] = field(default_factory=list)
    """The MPI world ranks of all its devices, stage by stage."""


@dataclass
class ClusterState:
    ranks: list[RankState]
    instances: list[InstanceState]
    queued: int
    """Requests accepted by the controller that have no first token yet."""
    events: list[dict] = field(default_factory=list)
    """Recent drops, exchanges and restores with their measurements, oldest first."""
    counters: dict[str, float] = field(default_factory=dict)
    """Running totals since start: drops, restores, exchange bytes/seconds, weight bytes/seconds."""

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict
        return asdict(self)


class IngressBackend(Protocol):
    """What the ingress needs from the cluster."""

    model_name: str
    tokenizer: Tokenizer
    max_model_len: int

    def submit(self, req: GenerateRequest) -> asyncio.Queue[TokenEvent]:
        """Queue a request; raises ``QueueFullError`` or ``BackendUnavailable``."""

    def abort(self, request_id: str) -> None:
        """Cancel a request (client went away); its KV is freed in the cluster."""

    def healthy(self) -> bool:
        """True only when every rank is up and the cluster serves."""

    def state(self) -> ClusterState:
        """A snapshot for ``/admin/state`` and ``/metrics``."""

    def regroup(self, groups: str) -> None:
        """Change the grouping of idle ranks (``"0-1,2,3"``): ValueError for a bad text,
        ``Refused`` if not possible now, ``ReshapeTimeout`` if it did not finish in time."""

    def drop(self, ranks: list[int]) -> tuple[int, ...] | None:
        """Fuse the instances on these ranks into a pipelined group (KunServe drop); returns
        its ranks in stage order; ``Refused`` if not possible now, ``ReshapeTimeout`` if it
        did not finish in time."""

    def restore(self, ranks: list[int] | None) -> list[tuple[int, ...]]:
        """Split one group (or all) back into replicas; returns the groups split (errors as
        for ``drop``)."""

    def plan(self) -> dict[str, Any]:
        """What the reshape policy would do now, without doing it."""
