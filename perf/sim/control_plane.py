"""The control plane's decision time at scale: the real policies on synthetic load.

    python -m perf.sim.control_plane --instances 8,64,256,1024 --ticks 300

For each cluster size, ``--ticks`` control ticks of the project's own code are timed: the
kunserve reshape policy (``observe`` then ``decide``: the load monitor, the overload vote,
the drop planner, the restore decision), the llumnix migration policy's ``decide``, and
per request the dispatch policies' ``choose`` over every instance. The load is made up,
not simulated: every instance sits at half its KV until a burst lifts a third of them
over capacity with queued requests (ticks 100-200), then falls back. Drops and restores
the policy decides are applied to the topology at once (as if they took no time), so
later ticks see the groups. Instances are Llama-3-70B TP2 replicas on H100 (80 GB) by
default; the figures the planner reads come from ``perf.sim.memory`` as in the simulator.

Only wall time is measured here; the simulator (``python -m perf.sim``) is what models
time. Medians and maxima in milliseconds are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from orchestrator.contracts import InstanceStats, PoolUsage, Topology
from orchestrator.kunserve.load_monitor import MonitorConfig
from orchestrator.policy.dispatch import InstanceLoad, dispatch_policies, make_dispatch_policy
from orchestrator.policy.migration import MIGRATION
from orchestrator.policy.reshape import make_reshape_policy
from perf.sim.gpu import GPUS, load_model
from perf.sim.memory import MemoryLayout

BURST = (100, 200)
"""Ticks during which a third of the instances are overloaded."""


def _stats(leader: int, ranks: tuple[int, ...], capacity: int, level: float, queued: int, rng: random.Random) -> InstanceStats:
    capacity = capacity * len(ranks)  # a group's added KV, roughly
    used = min(capacity, int(capacity * min(level, 1.0) * rng.uniform(0.95, 1.0)))
    demand = used + queued
    pools = [PoolUsage(r, used // 16, capacity // 16) for r in ranks]
    return InstanceStats(leader, waiting=queued // 500, running=max(1, used // 2000), pools=pools,
                         capacity_tokens=capacity, demand_tokens=demand, used_tokens=used, queued_tokens=queued,
                         free_tokens=capacity - used)


def _level(leader: int, tick: int, n: int) -> tuple[float, int]:
    """(KV level, queued tokens) of an instance at a tick: half full, a burst on a third."""
    if BURST[0] <= tick < BURST[1] and leader % 3 == 0:
        return 1.0, 20_000
    return 0.5, 0


def measure(n: int, ticks: int, layout: MemoryLayout, seed: int = 0) -> dict:
    rng = random.Random(seed)
    mem = layout.model_memory()
    capacity = mem.kv_pool_bytes // mem.kv_bytes_per_token
    reshape = make_reshape_policy("kunserve", mem, MonitorConfig())
    migration = MIGRATION.make("llumnix", None)
    dispatch = {name: make_dispatch_policy(name, layout.page_size) for name in dispatch_policies()}
    topology = Topology.replicas(n)
    origin: dict[tuple[int, ...], tuple[tuple[int, ...], ...]] = {}
    tick_s, mig_s, drops, restores = [], [], 0, 0
    choose_s: dict[str, list[float]] = {name: [] for name in dispatch}
    prompt = list(range(512))
    for tick in range(ticks):
        now = tick * 0.1
        stats = {r[0]: _stats(r[0], r, capacity, *_level(r[0], tick, n), rng) for r in topology.instances}
        t0 = time.perf_counter()
        reshape.observe(stats, now)
        actions = reshape.decide(topology, now)
        tick_s.append(time.perf_counter() - t0)
        for action in actions:
            ranks = tuple(action.ranks)
            if action.kind == "drop":
                origin[ranks] = topology.parts_of(ranks)
                topology = topology.fuse(ranks)
                drops += 1
            else:
                topology = topology.split(ranks, origin.pop(ranks, ()))
                restores += 1
            for r in ranks:
                reshape.forget(r)
        t0 = time.perf_counter()
        migration.decide({k: v for k, v in stats.items()}, topology, set(), now)
        mig_s.append(time.perf_counter() - t0)
        loads = [InstanceLoad(s.instance, len(s.pools), s.free_fraction, s.waiting, s.running, s.running,
                              s.capacity_tokens) for s in stats.values()]
        for name, policy in dispatch.items():
            t0 = time.perf_counter()
            policy.choose(loads, prompt)
            choose_s[name].append(time.perf_counter() - t0)
    ms = lambda xs: (1e3 * statistics.median(xs), 1e3 * max(xs))  # noqa: E731
    return {"instances": n, "kunserve_tick": ms(tick_s), "llumnix_tick": ms(mig_s), "drops": drops,
            "restores": restores, "dispatch": {k: ms(v) for k, v in choose_s.items()}}


def table(rows: list[dict]) -> str:
    names = list(rows[0]["dispatch"])
    head = ("| instances | kunserve tick, median / max (ms) | drops / restores decided | llumnix tick (ms) | "
            + " | ".join(f"dispatch {k} per request (ms)" for k in names) + " |")
    lines = [head, "|" + "---:|" * (4 + len(names))]
    for r in rows:
        d = " | ".join(f"{r['dispatch'][k][0]:.3f} / {r['dispatch'][k][1]:.2f}" for k in names)
        lines.append(f"| {r['instances']:,} | {r['kunserve_tick'][0]:.2f} / {r['kunserve_tick'][1]:.1f} | "
                     f"{r['drops']} / {r['restores']} | {r['llumnix_tick'][0]:.2f} / {r['llumnix_tick'][1]:.1f} | "
                     f"{d} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", default="8,64,256,1024", help="comma-separated cluster sizes (instances)")
    p.add_argument("--ticks", type=int, default=300)
    p.add_argument("--model", default="llama-3-70b")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--tp", type=int, default=2)
    args = p.parse_args(argv)
    gpu = GPUS[args.gpu]
    layout = MemoryLayout.for_model(load_model(args.model), torch.bfloat16, gpu.hbm_bytes, 16, (1, 2, 4), tp=args.tp)
    rows = [measure(int(n), args.ticks, layout) for n in args.instances.split(",")]
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
