"""``python -m perf.sim.scale``: how the simulator's wall time and the control plane's
decision time grow with the cluster.

For each size, the same shape of cluster (``--gpu`` GPUs serving ``--model`` as TP
``--tp`` replicas) gets the Azure conversation trace's busiest ``--seconds`` at a rate
proportional to its size (``--rate-per-replica`` times the trace's own rate per replica),
so every replica sees the same load and the cost per simulated second shows how the
simulator scales. Each run prints the wall time, the events and micro-batches simulated,
and the real policy's time per control tick (observe and decide over every instance's
report, median and max), the figure that says whether the planner keeps up at 1,024
instances. Nothing is modelled here beyond what ``python -m perf.sim`` models.

    python -m perf.sim.scale --sizes 8,64,256,1024 --seconds 60 --out runs/sim-scale
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

from perf.bench import select_trace
from perf.sim.stream import synthetic_stream
from perf.sim.cluster import SIMULATED_POLICIES, SimCluster
from perf.sim.gpu_presets import CONV, GpuSimPreset, _stream
from perf.sim.instance import SimRequest


def preset(gpus: int, gpu: str, model: str, tp: int, seconds: float, rate: float, output_scale: float) -> GpuSimPreset:
    replicas = gpus // tp
    return GpuSimPreset(f"scale-{gpus}", "", gpu, gpus, model, tp,
                        _stream(f"scale-{gpus}", CONV, seconds, rate * replicas, 5.0, 0.2, output_scale=output_scale))


def measure(g: GpuSimPreset, policy: str) -> dict:
    t0 = time.perf_counter()
    stream = synthetic_stream(select_trace(g.stream))
    built = time.perf_counter() - t0
    ctx = g.context(policy)
    sims = [SimRequest(rid, t, ids, n) for rid, t, ids, n in stream]
    t0 = time.perf_counter()
    result = SimCluster(ctx, ctx.fabric.num_ranks, policy, sample=False).run(sims)
    wall = time.perf_counter() - t0
    d = result.decision_s
    return {"gpus": g.gpus, "instances": g.ranks, "policy": policy, "requests": len(stream),
            "simulated_s": result.makespan_s, "wall_s": wall, "stream_s": built, "events": result.events,
            "microbatches": result.steps, "reshapes": len(result.reshapes),
            "wall_per_simulated_s": wall / max(result.makespan_s, 1e-9),
            "decision_ms_median": 1e3 * statistics.median(d), "decision_ms_max": 1e3 * max(d), "ticks": len(d)}


def table(rows: list[dict]) -> str:
    lines = ["| GPUs | instances | policy | requests | simulated (s) | wall (s) | wall / simulated s | events | "
             "micro-batches | reshapes | decision per tick median / max (ms) |",
             "|---:|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['gpus']} | {r['instances']} | {r['policy']} | {r['requests']:,} | {r['simulated_s']:.0f} | "
                     f"{r['wall_s']:.1f} | {r['wall_per_simulated_s']:.3f} | {r['events']:,} | "
                     f"{r['microbatches']:,} | {r['reshapes']} | {r['decision_ms_median']:.2f} / "
                     f"{r['decision_ms_max']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.sim.scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="8,64,256,1024", help="cluster sizes in GPUs")
    ap.add_argument("--gpu", default="h100", choices=("h100", "h200"))
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of the trace (its busiest)")
    ap.add_argument("--rate-per-replica", type=float, default=0.25,
                    help="times the trace's rate, per replica (default %(default)s: 8 GPUs at TP2 get the "
                         "trace's own rate)")
    ap.add_argument("--output-scale", type=float, default=3.0)
    ap.add_argument("--policies", default="kunserve", help=f"comma-separated, of {', '.join(SIMULATED_POLICIES)}")
    ap.add_argument("--out", type=Path, default=None, help="also write the rows as DIR/scale.json and scale.md")
    args = ap.parse_args(argv)
    rows = []
    for gpus in (int(x) for x in args.sizes.split(",")):
        g = preset(gpus, args.gpu, args.model, args.tp, args.seconds, args.rate_per_replica, args.output_scale)
        for policy in args.policies.split(","):
            rows.append(measure(g, policy.strip()))
            r = rows[-1]
            print(f"{gpus} GPUs, {policy}: {r['requests']:,} requests, {r['simulated_s']:.0f} s simulated in "
                  f"{r['wall_s']:.1f} s ({r['events']:,} events); decision {r['decision_ms_median']:.2f} ms median, "
                  f"{r['decision_ms_max']:.1f} ms max", flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "scale.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows},
                                                         indent=1))
        (args.out / "scale.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
