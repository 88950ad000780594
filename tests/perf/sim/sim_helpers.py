"""A small simulated cluster for the simulator's tests: a 4-layer model on CPU ranks."""

from __future__ import annotations

from dataclasses import replace

from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.kunserve.cost_model import CostModel
from perf.sim.clock import EventLoop
from perf.sim.cluster import SimCluster, SimResult
from perf.sim.fabric import CpuHost, CpuHostSpec
from perf.sim.instance import SimContext, SimRequest
from perf.sim.links import Network
from perf.sim.memory import MemoryLayout

COST = CostModel(fixed_s=0.010, per_token_s=1e-4, per_attention_s=1e-7, per_seq_s=2e-4, layers=4)
LAYERS, PAGE = 4, 4
PAGE_BYTES = 1 << 10
"""One layer's page: 1 KiB."""


def layout(pages: int, layer_weight_pages: int = 100, splits: tuple[int, ...] = (1, 2, 4)) -> MemoryLayout:
    """A device whose replica pool is ``pages`` pages and whose layers weigh ``layer_weight_pages`` pages each."""
    weights = LAYERS * layer_weight_pages * PAGE_BYTES
    device = int((weights + pages * PAGE_BYTES) / 0.95) + 1
    lay = MemoryLayout(LAYERS, 1, device, layer_weight_pages * PAGE_BYTES, 0, PAGE_BYTES, PAGE, splits)
    while lay.replica_pages() > pages:  # the 5% workspace's rounding
        lay = replace(lay, device_bytes=lay.device_bytes - 1)
    return lay


def context(pages: int, budget: int = 64, seqs: int = 8, cores: float | None = None, swap: int | None = None,
            prefix: bool = False, **kw) -> SimContext:
    clock = EventLoop()
    sched = SchedulerConfig(budget, seqs, preemption_mode="swap" if swap else "recompute",
                            enable_prefix_caching=prefix)
    return SimContext(clock, Network(clock), CpuHost(CpuHostSpec(cores), 8), COST, layout(pages, **kw), sched,
                      512, 64, swap_space_bytes=swap)


def simulate(requests: list[SimRequest], ranks: int, ctx: SimContext, policy: str = "vllm", **kw) -> SimResult:
    return SimCluster(ctx, ranks, policy, **kw).run(requests)


def burst(n: int, prompt: int, out: int, gap: float = 0.01) -> list[SimRequest]:
    return [SimRequest(f"r{i}", gap * i, [i % 50] * prompt, out) for i in range(n)]
