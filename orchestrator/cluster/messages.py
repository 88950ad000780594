"""Typed control messages between ranks (pickled over MPI), and their tags.

Tensor payloads (activations) travel separately through the transport, announced by the
control message that precedes them on the same pair of ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engines.sampling import SamplingParams
from engines.step import SeqChunk
from orchestrator.cluster.topology import Topology

# MPI tags. Control messages are matched by tag; payloads use their own tags.
TAG_CONTROL = 1      # controller <-> ranks: requests, aborts, updates, stats, regroup, shutdown
TAG_STAGE = 2        # stage i -> stage i+1: StageStep
TAG_HIDDEN = 3       # stage i -> stage i+1: the activations StageStep announced
TAG_RESULT = 4       # last stage -> leader: StageResult


@dataclass
class AddRequest:
    """Controller -> instance leader: serve this request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_model_len: int


@dataclass
class AbortRequest:
    """Controller -> instance leader: cancel this request and free its KV."""

    request_id: str


@dataclass
class TokenUpdate:
    """New tokens of one request (the last update has ``finished``)."""

    request_id: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class PoolUsage:
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

    @property
    def free_fraction(self) -> float:
        total = sum(p.total for p in self.pools)
        return sum(p.total - p.used for p in self.pools) / total if total else 0.0


@dataclass
class InstanceReport:
    """Leader -> controller: token updates and the instance's load."""

    stats: InstanceStats
    updates: list[TokenUpdate] = field(default_factory=list)


@dataclass
class RankInfo:
    """Every rank's memory and role; gathered at start and refreshed periodically."""

    rank: int
    kv_pages: int
    weight_bytes: int
    kv_bytes: int
    device_memory: int
    resident_growth: int
    """Resident memory growth since the rank started (what the device accounting stands for)."""
    workspace_bytes: int = 0
    role: str = "replica"
    instance: int = 0
    stage: int = 0
    group_size: int = 1
    layer_range: tuple[int, int] = (0, 0)


@dataclass
class StageStep:
    """Stage i -> stage i+1: run this micro-batch; its activations follow on TAG_HIDDEN."""

    instance: int
    microbatch: int
    chunks: list[SeqChunk]
    """Block tables hold the receiving stage's layers only; token ids are not sent."""
    num_tokens: int
    hidden_size: int
    dtype: str


@dataclass
class StageResult:
    """Last stage -> leader: the micro-batch's sampled tokens."""

    instance: int
    microbatch: int
    seq_ids: list[int]
    tokens: list[int]
    error: str | None = None


@dataclass
class Regroup:
    """Controller -> all ranks: switch to this topology (all instances are idle)."""

    topology: Topology
    epoch: int


@dataclass
class RegroupDone:
    rank: int
    epoch: int


@dataclass
class RankFailed:
    """A rank -> controller: this rank hit a fatal error and is about to abort the job."""

    rank: int
    error: str


@dataclass
class Shutdown:
    """Controller -> all ranks: stop the loop."""

    reason: str
