"""Typed control messages between ranks (pickled over MPI), and their tags.

Tensor payloads (activations) travel separately through the transport, announced by the
control message that precedes them on the same pair of ranks.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from engines.mapping import Holding
from engines.sampling import SamplingParams, TokenLogprob
from engines.step import SeqChunk, StepOutput
from orchestrator.cluster.event_log import EventKind
from orchestrator.contracts import InstanceStats, TokenEvent, Topology
from orchestrator.core.request import LogprobBuffer

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
    output_token_ids: list[int] = field(default_factory=list)
    """Tokens generated before (``GenerateRequest.output_token_ids``): not sent again."""


@dataclass
class AbortRequest:
    """Controller -> instance leader: cancel this request and free its KV."""

    request_id: str


@dataclass
class InstanceReport:
    """Leader -> controller: token updates and the instance's load."""

    stats: InstanceStats
    updates: list[TokenEvent] = field(default_factory=list)


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
    can_grow_kv: bool = True
    """Whether a drop can turn this rank's weights into KV (not a CUDA pool without the
    virtual-memory driver)."""
    tp_size: int = 1
    world_ranks: tuple[int, ...] = ()
    """The MPI world ranks of the devices behind this rank (its TP set; itself at tp = 1)."""


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
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    """Per token, when its request asked for log-probabilities (empty if none did)."""
    prompt_logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    """Seq id -> the prompt log-probabilities this micro-batch computed."""

    def step_output(self) -> StepOutput:
        """The leader's view of the result, as if its own runner had produced it."""
        return StepOutput(sampled_seq_ids=self.seq_ids, tokens=self.tokens, logprobs=self.logprobs,
                          prompt_logprobs=self.prompt_logprobs)


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


# KunServe: reshaping instances (drop into a group, restore into replicas) ---------------

TAG_KV = 5           # transport: KV page runs moved between ranks
TAG_WEIGHTS = 6      # transport: weight buffers pulled back on restore


@dataclass
class ExportedRequest:
    """A request handed from one leader to another, with where its KV lives."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling: SamplingParams
    max_model_len: int
    num_computed_tokens: int
    block_table: list[list[int]]
    """Per layer, its pages (empty when nothing is computed): in the pool of ``home``, or, for
    a group's requests, of the stage that ran the layer (``MemberReady.layout``)."""
    home: int
    """The rank that hands it over (a replica: the pool holding its pages)."""
    sent: int
    """Output tokens already reported to the controller."""
    num_preemptions: int = 0
    arrival_time: float = 0.0
    num_migrations: int = 0
    logprobs: LogprobBuffer = field(default_factory=LogprobBuffer)
    """Log-probabilities not yet reported, and how far the prompt's are done."""
    prefix_hashes: list[int] = field(default_factory=list)
    """The cached blocks it shares, in order: the first ``len(prefix_hashes)`` pages of each
    layer in ``block_table`` are theirs (handed over once, as ``ExportedBlock``s)."""
    prefix_closed: bool = False
    first_scheduled_time: float | None = None
    """When it was first scheduled, if it was (its first token then names its queue time
    and the instance that computed its prompt)."""
    """Its later full blocks are not to be cached (an equal block was cached first)."""


@dataclass
class ExportedBlock:
    """A cached block handed from one leader to another with the requests that share it:
    its identity and its page of each layer (in the pool that holds that layer there)."""

    hash: int
    parent: int
    tokens: tuple[int, ...]
    pages: tuple[int, ...]


@dataclass
class KvMove:
    """Move one request's pages of one layer from one rank's pool to another's (or within one).

    A move of a cached block's page (``block`` its hash) is made once, whichever requests
    share the block; ``request_id`` is then empty."""

    request_id: str
    layer: int
    src_rank: int
    src_pages: list[int]
    dst_rank: int
    dst_pages: list[int]
    block: int | None = None


@dataclass
class DropGroup:
    """Controller -> each instance's leader (which tells its other stages once drained):
    fuse these instances into one group, ``ranks`` in the new stage order."""

    ranks: tuple[int, ...]
    epoch: int
    parts: tuple[tuple[int, ...], ...] = ()
    """The instances fused, each its ranks in stage order (a replica is one rank); the
    restore returns the group to them. Empty: each rank is a replica."""

    def part_of(self, rank: int) -> tuple[int, ...]:
        return next((p for p in self.parts if rank in p), (rank,))


@dataclass
class MemberReady:
    """Member -> new leader: weights dropped, pool grown; here are my requests."""

    rank: int
    epoch: int
    kv_pages: int
    base_pages: int
    """Its pool's pages before this drop: a restore brings the KV back below them."""
    requests: list[ExportedRequest]
    blocks: list[ExportedBlock] = field(default_factory=list)
    """The cached blocks those requests share, once each (unreferenced ones were given back)."""
    layout: tuple[int, ...] = ()
    """Per layer, the rank whose pool holds those requests' and blocks' pages of that layer
    (the stages of the instance this rank led); empty: all of them in this rank's pool."""
    held_before: Holding | None = None
    """The weights it held before this drop (a restore brings them back), and after it."""
    held_now: Holding | None = None


class MovePurpose(enum.Enum):
    """Which protocol a batch of KV moves belongs to; it routes the batch's completions."""

    EXCHANGE = "exchange"
    """A drop's: stale requests' pages go to the owners of their layers."""
    RESTORE = "restore"
    """A restore's one batch: every request's pages go to the member that keeps it."""
    MIGRATION = "migration"
    """One stage of a live migration (Llumnix); ``epoch`` is the migration id."""


@dataclass(frozen=True)
class BatchId:
    """Names a batch of KV moves: its protocol, that protocol's epoch, and the batch within it."""

    purpose: MovePurpose
    epoch: int
    """The drop's or restore's epoch, or the migration id."""
    batch: int
    """A drop's batches count from 0; a restore has one (0); a migration's are its stages."""


@dataclass
class ExchangeBatch:
    """Leader -> members: perform these moves, in this order (the same list on every member)."""

    id: BatchId
    moves: list[KvMove]


@dataclass
class ExchangeDone:
    """Member -> the batch's owner: my part of the batch has landed."""

    rank: int
    id: BatchId
    bytes_moved: int = 0
    seconds: float = 0.0


@dataclass
class ExchangeAbort:
    """Leader -> members: stop the batch (timed out); its requests are recomputed instead."""

    id: BatchId


@dataclass
class GroupFormed:
    """Leader -> controller: the group serves; these requests now belong to it."""

    instance: int
    ranks: tuple[int, ...]
    request_ids: list[str]
    epoch: int
    stale: int = 0
    """Adopted requests with KV to exchange."""
    in_prefill: int = 0
    """Of those, requests whose prompt was not fully computed at the drop."""


@dataclass
class ReshapeEvent:
    """Leader or member -> controller: a finished phase of a drop or restore, with measurements."""

    kind: EventKind
    """``WEIGHTS_DROPPED``, ``EXCHANGE``, ``RESTORE_MOVES`` or ``WEIGHTS_PULLED``."""
    ranks: tuple[int, ...]
    detail: dict = field(default_factory=dict)


@dataclass
class RestoreGroup:
    """Controller -> group leader: split the group back into the instances it was fused
    from (replicas, for a group that started as one)."""

    epoch: int


@dataclass
class SplitGroup:
    """Leader -> each member: reload the dropped weights from the peers, then serve these
    requests as a replica (their KV is in your base pool)."""

    ranks: tuple[int, ...]
    epoch: int
    requests: list[ExportedRequest]
    blocks: list[ExportedBlock] = field(default_factory=list)
    """The cached blocks those requests share, their pages in your base pool."""
    part: tuple[int, ...] = ()
    """The instance this member serves in again (its ranks in stage order); empty: itself,
    a replica. Its leader gets the part's requests and blocks, their pages in the part's
    base pools, each layer in the pool of the stage that runs it."""
    part_pages: tuple[int, ...] = ()
    """The pool pages of each stage of ``part`` once restored."""
    held_now: tuple[Holding, ...] = ()
    """What each member of ``ranks`` holds now, and what it gets back (empty: every member
    gets the full model, as a replica started with)."""
    held_target: tuple[Holding, ...] = ()


@dataclass
class Restored:
    """Member -> controller: I am a replica again, serving these requests."""

    rank: int
    epoch: int
    request_ids: list[str]


# ----------------------------------------------------------------------------- live migration (llumnix)

@dataclass
class StartMigration:
    """Controller -> source leader: move one running request to ``dst`` (it picks which)."""

    migration_id: int
    dst: int
    dst_free_tokens: int


@dataclass
class MigrationOffer:
    """Source -> destination leader: reserve room for this request's KV."""

    migration_id: int
    src: int
    request_id: str
    num_tokens: int


@dataclass
class MigrationReply:
    """Destination -> source: the pages reserved per layer, or None and why not."""

    migration_id: int
    block_table: list[list[int]] | None
    reason: str = ""


@dataclass
class MigrationCommit:
    """Source -> destination: all KV has landed; the request is yours from here."""

    migration_id: int
    request: ExportedRequest


@dataclass
class MigrationCancel:
    """Source -> destination: give the reservation back (nothing is in flight any more)."""

    migration_id: int


@dataclass
class MigrationDone:
    """Source -> controller: how a migration ended."""

    migration_id: int
    request_id: str
    src: int
    dst: int
    ok: bool
    reason: str = ""
    bytes_moved: int = 0
    seconds: float = 0.0
    stop_seconds: float = 0.0
    """How long the request was paused for the last copy (Llumnix's short final stop)."""
    stages: int = 0
