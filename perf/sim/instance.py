"""A simulated instance: the project's own scheduler and block manager over one or more
pipeline stages, with each stage's time taken from a cost model instead of a forward pass.

The scheduler (``orchestrator.core.scheduler``) decides every micro-batch as ``serve``'s
leader does (``orchestrator.cluster.instance.schedule_microbatch``): chunked prefill,
decodes, FCFS admission while the KV fits, recompute (or swap) preemption, prefix caching.
A replica runs one step at a time; a pp-g group keeps up to g micro-batches in flight,
each crossing its stages in order, its activations sent between them over the fabric.
Each stage's time is ``cost.step_cost(chunks, its layers)``; the micro-batch ends when the
last stage is done, and each chunk that completes its sequence gets one token (never EOS:
a request runs to its requested length, as ``ignore_eos`` does).

A rank runs one stage job at a time, in arrival order; its jobs cross its compute path
(``perf.sim.fabric``), so ranks that share a host's cores share them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from engines.mapping import LayerRange
from engines.paging import pages_for_tokens
from engines.sampling import SamplingParams
from engines.step import StepOutput
from orchestrator.cluster.instance import instance_stats, schedule_microbatch
from orchestrator.contracts import InstanceStats
from orchestrator.core.block_manager import BlockManager, PoolSpec
from orchestrator.core.request import Request
from orchestrator.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from orchestrator.policy.migration import MigrationConfig
from perf.sim.clock import EventLoop
from perf.sim.loop_turns import Controller, to_controller
from perf.sim.fabric import Fabric
from perf.sim.links import Network
from perf.sim.memory import MemoryLayout

TOKEN = 0
"""The token every simulated step samples (the scheduler only counts them)."""


class StepCost(Protocol):
    def step_cost(self, chunks: list[tuple[int, int]], layers: int | None = None) -> float:
        """Seconds of one stage's step holding chunks ``(new tokens, tokens before them)``."""


@dataclass
class SimRequest:
    """One request's life in the simulation; times are simulated seconds."""

    request_id: str
    arrival_s: float
    prompt_token_ids: Sequence[int]
    """A list, or a ``perf.sim.stream.SyntheticPrompt`` that gives its tokens on demand."""
    max_tokens: int
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None
    preemptions: int = 0
    migrations: int = 0
    error: str | None = None


@dataclass
class SimContext:
    """What every instance of one simulated cluster shares."""

    clock: EventLoop
    net: Network
    fabric: Fabric
    cost: StepCost
    layout: MemoryLayout
    sched: SchedulerConfig
    max_model_len: int
    activation_bytes: int
    """Bytes per token a stage sends the next (hidden size x dtype, per device of the TP set)."""
    on_finish: Callable[[SimRequest], None] = lambda sim: None
    """Set by the cluster that owns the instances."""
    swap_space_bytes: int | None = None
    """Host memory for swapped KV per replica (the swap policy); None: recompute."""
    migration: MigrationConfig | None = None
    """The llumnix policy's thresholds (``serve``'s; None: its defaults)."""
    execs: dict[int, "RankExec"] = field(default_factory=dict)
    microbatches: int = 0
    controller: Controller = field(default_factory=Controller)
    """Dispatch, tokens to the ingress and the control tick run at its rank's loop turns."""

    def rank(self, r: int) -> "RankExec":
        if r not in self.execs:
            self.execs[r] = RankExec(self, r)
        return self.execs[r]


class RankExec:
    """One rank's device: its stage jobs one at a time, first come first served."""

    def __init__(self, ctx: SimContext, rank: int) -> None:
        self.ctx = ctx
        self.rank = rank
        self._queue: deque[tuple[float, Callable[[], None]]] = deque()
        self._running = False
        self.busy_s = 0.0
        self.jobs = 0
        self.computing = False
        """A stage job runs: the rank's loop does not turn until it ends (``perf.sim.loop_turns``)."""
        self._turn: deque[Callable[[], None]] = deque()

    def at_turn(self, action: Callable[[], None]) -> bool:
        """Run ``action`` at this rank's next loop turn: now if it is not computing (False),
        else when its job ends (True)."""
        if not self.computing:
            action()
            return False
        self._turn.append(action)
        return True

    def run(self, seconds: float, then: Callable[[], None]) -> None:
        self._queue.append((seconds, then))
        if not self._running:
            self._next()

    def _next(self) -> None:
        if not self._queue:
            self._running = False
            return
        self._running = True
        seconds, then = self._queue.popleft()
        self.busy_s += seconds
        self.jobs += 1
        self.computing = True

        def done(_t) -> None:
            self.computing = False
            while self._turn:  # the loop turns: it receives, polls and moves KV, then goes on
                self._turn.popleft()()
            then()
            self._next()
        self.ctx.net.transfer(self.ctx.fabric.compute(self.rank), seconds, done)


class SimSwap:
    """Host swap space of one replica (``orchestrator.core.swap.Swapper``): bytes only. The
    copies it books are paid before the step that caused them, over the host path."""

    def __init__(self, capacity: int, layout: MemoryLayout) -> None:
        self.capacity = capacity
        self.layout = layout
        self.used = 0
        self._saved: dict[int, int] = {}
        self.pending_out = 0
        self.pending_in = 0
        self.swapped_bytes = 0

    def _nbytes(self, req: Request) -> int:
        lay = self.layout
        return pages_for_tokens(req.num_computed_tokens, lay.page_size) * lay.num_layers * lay.page_bytes * lay.tp

    def swap_out(self, req: Request) -> bool:
        n = self._nbytes(req)
        if self.used + n > self.capacity:
            return False
        self._saved[req.seq_id] = n
        self.used += n
        self.pending_out += n
        return True

    def swap_in(self, req: Request) -> None:
        n = self._saved.pop(req.seq_id)
        self.used -= n
        self.pending_in += n

    def discard(self, req: Request) -> None:
        self.used -= self._saved.pop(req.seq_id, 0)

    def take_pending(self) -> tuple[int, int]:
        out, inn = self.pending_out, self.pending_in
        self.pending_out = self.pending_in = 0
        self.swapped_bytes += out + inn
        return out, inn


@dataclass
class Moved:
    """A request leaving an instance (a drop or a restore), with where its KV lies now."""

    req: Request
    sim: SimRequest
    computed: int
    """Tokens whose KV it has (0: it is recomputed or never ran)."""
    layer_rank: tuple[int, ...]
    """The rank holding each layer's KV."""


class SimInstance:
    """One serving instance (a replica or a pipelined group) on the simulated clock."""

    def __init__(self, ctx: SimContext, ranks: tuple[int, ...], ranges: list[LayerRange], pools: list[PoolSpec]) -> None:
        self.ctx = ctx
        self.ranks = ranks
        self.ranges = ranges
        self.pools = pools
        cfg = ctx.sched
        if len(ranks) > 1:  # a group of g stages runs g micro-batches, each as large as a replica's
            cfg = replace(cfg, max_num_seqs=cfg.max_num_seqs * len(ranks))
        self.swap = SimSwap(ctx.swap_space_bytes, ctx.layout) if ctx.swap_space_bytes and len(ranks) == 1 else None
        self.scheduler = Scheduler(cfg, BlockManager(ctx.layout.page_size, pools, cfg.enable_prefix_caching),
                                   swapper=self.swap)
        self.requests: dict[int, tuple[Request, SimRequest]] = {}
        self.busy: dict[int, int] = {}
        """Seq id -> micro-batches in flight that hold it (none: not listed)."""
        self.held: set[int] = set()
        self.inflight = 0
        self.paused = False
        self._on_idle: Callable[[], None] | None = None
        self._when_free: dict[int, list[Callable[[], None]]] = {}
        """Per sequence, what runs once no micro-batch in flight holds it (a migration's stop)."""
        self.steps = 0

    @property
    def leader(self) -> int:
        return self.ranks[0]

    @property
    def outstanding(self) -> int:
        return len(self.requests)

    def stats(self) -> InstanceStats:
        stats = instance_stats(self.leader, self.ranks, self.scheduler)
        self.scheduler.counts.clear()
        return stats

    def layer_rank(self) -> tuple[int, ...]:
        return tuple(r for r, rng in zip(self.ranks, self.ranges) for _ in rng)

    # Requests in and out ---------------------------------------------------------------
    def add(self, sim: SimRequest) -> None:
        req = Request(sim.request_id, list(sim.prompt_token_ids),  # built here, let go when it ends
                      SamplingParams(max_tokens=sim.max_tokens, ignore_eos=True), self.ctx.max_model_len)
        try:
            self.scheduler.add(req)
        except Exception as exc:  # the request cannot fit this instance at all: it fails, as in serve
            sim.error, sim.finish_s = str(exc), self.ctx.clock.now
            self.ctx.on_finish(sim)
            return
        self.requests[req.seq_id] = (req, sim)
        self.kick()

    def export(self) -> list[Moved]:
        """Give up every request (nothing may be in flight); its pages here are freed."""
        assert not self.inflight, "export with micro-batches in flight"
        return [self.export_one(req) for req, _ in list(self.requests.values())]

    def adopt(self, m: Moved, held: bool = False, or_recompute: bool = True) -> bool:
        """Take ``m`` over with pages for its computed tokens (held until its KV lands when
        ``held``). When they do not fit: False, and the request is queued here to be
        recomputed (a preemption, counted as one), or (not ``or_recompute``) left alone."""
        req = m.req
        req.block_table, req.num_computed_tokens = [], m.computed
        ok = m.computed == 0 or self.scheduler.blocks.allocate(req, 0)
        if not ok:
            req.block_table, req.num_computed_tokens = [], 0
            if not or_recompute:
                return False
            m.computed = 0
            req.num_preemptions += 1
        self.scheduler.adopt(req)
        self.requests[req.seq_id] = (req, m.sim)
        if held and ok and m.computed:
            self.held.add(req.seq_id)
        return ok

    def export_one(self, req: Request) -> Moved:
        """Give up one request that no micro-batch in flight holds (a migration's commit);
        its pages here are freed (a swapped request's KV stays behind: it is recomputed)."""
        assert req.seq_id not in self.busy, "export of a request in flight"
        _, sim = self.requests.pop(req.seq_id)
        self.held.discard(req.seq_id)
        self.scheduler.release(req)
        computed = req.num_computed_tokens
        self.scheduler.blocks.free(req)
        return Moved(req, sim, computed, self.layer_rank())

    def when_free(self, req: Request, then: Callable[[], None]) -> None:
        """Run ``then`` once no micro-batch in flight holds ``req`` (now, if none does)."""
        if req.seq_id not in self.busy:
            self.ctx.clock.after(0.0, then)
        else:
            self._when_free.setdefault(req.seq_id, []).append(then)

    def release_held(self, seq_ids: list[int]) -> None:
        self.held.difference_update(seq_ids)
        self.kick()

    def pause(self, on_idle: Callable[[], None]) -> None:
        """Launch nothing more; ``on_idle`` runs once no micro-batch is in flight."""
        self.paused = True
        if self.inflight:
            self._on_idle = on_idle
        else:
            on_idle()

    # Steps ------------------------------------------------------------------------------
    def kick(self) -> None:
        while not self.paused and self.inflight < len(self.ranks):
            sched = schedule_microbatch(self.scheduler, set(self.busy), self.held, len(self.ranks))
            if sched.preempted:
                self._sync_preemptions(sched)
                self._reap([r for r in sched.preempted if r.status.finished])  # refused as too large
            if not sched.chunks:
                return
            self._launch(sched)

    def _sync_preemptions(self, sched: SchedulerOutput) -> None:
        for req in sched.preempted:
            if req.seq_id in self.requests:
                self.requests[req.seq_id][1].preemptions = req.num_preemptions

    def _launch(self, sched: SchedulerOutput) -> None:
        chunks = [(c.num_tokens, c.request.num_computed_tokens if c.start is None else c.start) for c in sched.chunks]
        sampled = [c.request.seq_id for c, (n, s) in zip(sched.chunks, chunks) if s + n == c.request.num_tokens]
        self.inflight += 1
        self.steps += 1
        self.ctx.microbatches += 1
        busy = self.busy
        for c in sched.chunks:
            seq = c.request.seq_id
            busy[seq] = busy.get(seq, 0) + 1
        tokens = sum(n for n, _ in chunks)
        ctx, fabric = self.ctx, self.ctx.fabric

        def stage(i: int) -> None:
            rank = self.ranks[i]
            seconds = ctx.cost.step_cost(chunks, len(self.ranges[i]))
            if i + 1 < len(self.ranks):
                after = lambda: ctx.net.transfer(fabric.path(rank, self.ranks[i + 1]), tokens * ctx.activation_bytes,
                                                 lambda _t: stage(i + 1))
            elif len(self.ranks) > 1:  # the last stage returns the sampled tokens to the leader
                after = lambda: ctx.net.transfer(fabric.path(rank, self.leader), 8 * len(sampled),
                                                 lambda _t: self._done(sched, sampled))
            else:
                after = lambda: self._done(sched, sampled)
            ctx.rank(rank).run(seconds, after)

        copies = self.swap.take_pending() if self.swap is not None else (0, 0)
        moves = [(to_host, n) for to_host, n in zip((True, False), copies) if n]
        if not moves:
            stage(0)
            return
        left = [len(moves)]  # the step's swaps are copied before it runs, both ways at once

        def copied(_t) -> None:
            left[0] -= 1
            if not left[0]:
                stage(0)
        for to_host, n in moves:
            ctx.net.transfer(fabric.host(self.leader, to_host), n, copied)

    def _done(self, sched: SchedulerOutput, sampled: list[int]) -> None:
        self.inflight -= 1
        busy = self.busy
        for c in sched.chunks:
            seq = c.request.seq_id
            if busy[seq] == 1:
                del busy[seq]
            else:
                busy[seq] -= 1
        finished = self.scheduler.update(sched, StepOutput(sampled_seq_ids=sampled, tokens=[TOKEN] * len(sampled)))
        sims = [self.requests[seq][1] for seq in sampled if seq in self.requests]
        if sims:
            to_controller(self.ctx, lambda: self._delivered(sims))
        self._reap(finished)
        for seq in [q for q in self._when_free if q not in self.busy]:
            for then in self._when_free.pop(seq):
                self.ctx.clock.after(0.0, then)  # after this step's bookkeeping, not inside it
        if self.paused:
            if not self.inflight and self._on_idle is not None:
                on_idle, self._on_idle = self._on_idle, None
                on_idle()
            return
        self.kick()

    def _delivered(self, sims: list[SimRequest]) -> None:
        """The controller hands a step's tokens to the ingress: the clients see them now."""
        now = self.ctx.clock.now
        for sim in sims:
            sim.token_times_s.append(now)

    def _ended(self, sim: SimRequest) -> None:
        sim.finish_s = self.ctx.clock.now  # after its last token, through the same turn
        self.ctx.on_finish(sim)

    def _reap(self, finished: list[Request]) -> None:
        """Requests the scheduler finished (done, or refused as too large) leave."""
        for req in finished:
            if req.seq_id in self.requests:
                _, sim = self.requests.pop(req.seq_id)
                sim.preemptions = req.num_preemptions
                if req.error:
                    sim.error = req.error
                to_controller(self.ctx, lambda sim=sim: self._ended(sim))
