"""A simulated replica: the project's own scheduler and block manager, with each step's
time taken from a cost model instead of a forward pass.

The scheduler (``orchestrator.core.scheduler``) decides every step as it does in ``serve``:
chunked prefill, decodes, FCFS admission while the KV fits, recompute preemption of the
newest request when a running one cannot grow, prefix caching. The step's chunks ``(n,
s)`` (new tokens after cached ones) go to ``CostModel.step_cost``; the step ends that many
simulated seconds later, when each sampling chunk gets one token (never EOS: a request
runs to its requested length, as ``ignore_eos`` does).

The cost model is a rank's time alone on its core. On a host whose ranks outnumber its
cores, the steps in flight share them: each step is that many core-seconds of work over
the path (its rank's core, 1 core-second per second; the host's cores, shared), on the
same processor-sharing model as the links (``perf.sim.links``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from engines.mapping import LayerRange
from engines.sampling import SamplingParams
from engines.step import StepOutput
from orchestrator.core.block_manager import BlockManager, PoolSpec
from orchestrator.core.request import Request
from orchestrator.core.scheduler import Scheduler, SchedulerConfig
from orchestrator.kunserve.cost_model import CostModel
from perf.sim.clock import EventLoop
from perf.sim.links import Link, Network

TOKEN = 0
"""The token every simulated step samples (the scheduler only counts them)."""


@dataclass
class SimRequest:
    """One request's life in the simulation; times are simulated seconds."""

    request_id: str
    arrival_s: float
    prompt_token_ids: list[int]
    max_tokens: int
    token_times_s: list[float] = field(default_factory=list)
    finish_s: float | None = None
    preemptions: int = 0
    error: str | None = None


@dataclass(frozen=True)
class ReplicaSpec:
    """One replica's memory and limits, as ``serve`` would give it."""

    num_layers: int
    kv_pages: int
    page_size: int
    max_model_len: int
    sched: SchedulerConfig = SchedulerConfig()


class SimReplica:
    """One instance of one rank, on the simulated clock."""

    def __init__(self, instance: int, spec: ReplicaSpec, cost: CostModel, clock: EventLoop,
                 on_finish: Callable[[SimRequest], None], compute: tuple[Network, Link] | None = None) -> None:
        """``compute``: the host's CPU (a network and its shared cores link) whose cores this
        rank's steps share with the other ranks' (None: every rank has a core of its own)."""
        self.instance = instance
        self.compute = compute
        self._core = Link(f"rank {instance} core", 1.0)
        self.spec = spec
        self.cost = cost
        self.clock = clock
        self.on_finish = on_finish
        pools = [PoolSpec(LayerRange(0, spec.num_layers), spec.kv_pages)]
        self.scheduler = Scheduler(spec.sched, BlockManager(spec.page_size, pools, spec.sched.enable_prefix_caching))
        self.requests: dict[int, tuple[Request, SimRequest]] = {}
        self.busy = False
        self.steps = 0
        self.busy_s = 0.0

    @property
    def outstanding(self) -> int:
        return len(self.requests)

    @property
    def free_fraction(self) -> float:
        alloc = self.scheduler.blocks.allocators[0]
        return alloc.num_free / alloc.num_pages

    def add(self, sim: SimRequest) -> None:
        req = Request(sim.request_id, sim.prompt_token_ids, SamplingParams(max_tokens=sim.max_tokens, ignore_eos=True),
                      self.spec.max_model_len)
        try:
            self.scheduler.add(req)
        except Exception as exc:  # the request cannot fit this replica at all: it fails, as in serve
            sim.error, sim.finish_s = str(exc), self.clock.now
            self.on_finish(sim)
            return
        self.requests[req.seq_id] = (req, sim)
        self._kick()

    def _kick(self) -> None:
        if not self.busy and self.scheduler.has_work():
            self._step()

    def _step(self) -> None:
        sched = self.scheduler.schedule()
        for req in sched.preempted:
            if req.seq_id in self.requests:
                self.requests[req.seq_id][1].preemptions = req.num_preemptions
        if not sched.chunks:
            self._reap()
            return
        chunks = [(c.num_tokens, c.request.num_computed_tokens if c.start is None else c.start) for c in sched.chunks]
        seconds = self.cost.step_cost(chunks, self.spec.num_layers)
        self.busy = True
        self.steps += 1
        self.busy_s += seconds
        if self.compute is None:
            self.clock.after(seconds, lambda: self._done(sched))
        else:
            net, cores = self.compute
            net.transfer([self._core, cores], seconds, lambda _t: self._done(sched))

    def _done(self, sched) -> None:
        self.busy = False
        sampled = [c.request.seq_id for c in sched.chunks
                   if (c.request.num_computed_tokens if c.start is None else c.start) + c.num_tokens
                   == c.request.num_tokens]
        now = self.clock.now
        self.scheduler.update(sched, StepOutput(sampled_seq_ids=sampled, tokens=[TOKEN] * len(sampled)))
        for seq in sampled:
            if seq in self.requests:
                self.requests[seq][1].token_times_s.append(now)
        self._reap()
        self._kick()

    def _reap(self) -> None:
        """Requests the scheduler finished (done, or refused as too large) leave."""
        for seq, (req, sim) in list(self.requests.items()):
            if req.status.finished:
                del self.requests[seq]
                sim.finish_s = self.clock.now
                sim.preemptions = req.num_preemptions
                if req.error:
                    sim.error = req.error
                self.on_finish(sim)
