"""A simulated cluster of replicas: the request stream arrives on the simulated clock, the
project's own dispatch policy places each request, and every replica runs its own
scheduler (``perf.sim.replica``).

This first version simulates the policies whose instances stay replicas of one rank
(``vllm``, and ``oracle`` with an unbounded pool); drops, exchanges and restores come
next, on the same clock with the link model (``perf.sim.links``).
"""

from __future__ import annotations

from dataclasses import dataclass

from orchestrator.kunserve.cost_model import CostModel
from orchestrator.policy.dispatch import InstanceLoad, make_dispatch_policy
from perf.sim.clock import EventLoop
from perf.sim.links import Link, Network
from perf.sim.replica import ReplicaSpec, SimReplica, SimRequest

SIMULATED_POLICIES = ("vllm", "oracle")


@dataclass
class SimResult:
    requests: list[SimRequest]
    makespan_s: float
    events: int
    steps: int


def simulate(requests: list[SimRequest], replicas: int, spec: ReplicaSpec, cost: CostModel,
             dispatch: str = "least_loaded", host_cores: float | None = None) -> SimResult:
    """Run ``requests`` (arrival times in simulated seconds) on ``replicas`` replicas;
    ``host_cores``: the ranks share this many cores (None: a core each)."""
    clock = EventLoop()
    done: list[SimRequest] = []
    compute = None if host_cores is None else (Network(clock), Link("host cores", float(host_cores)))
    pool = [SimReplica(i, spec, cost, clock, done.append, compute) for i in range(replicas)]
    policy = make_dispatch_policy(dispatch, spec.page_size)

    def arrive(sim: SimRequest) -> None:
        loads = [InstanceLoad(r.instance, 1, r.free_fraction, len(r.scheduler.waiting), len(r.scheduler.running),
                              r.outstanding, spec.kv_pages // spec.num_layers * spec.page_size) for r in pool]
        pool[policy.choose(loads, sim.prompt_token_ids)].add(sim)

    for sim in requests:
        clock.at(sim.arrival_s, lambda sim=sim: arrive(sim))
    clock.run()
    unfinished = [s for s in requests if s.finish_s is None]
    if unfinished:
        raise RuntimeError(f"{len(unfinished)} requests never finished (first: {unfinished[0].request_id})")
    return SimResult(requests, clock.now, clock.processed, sum(r.steps for r in pool))
