"""``python -m perf.sim.calibrate``: fit the roofline's two efficiency factors to published
serving throughput, by simulating the benchmark that produced it.

TensorRT-LLM's figures (``perf.sim.gpu.CALIBRATION``) are offline throughput: every request
queued at once, the engine at its largest batch. Each is replayed on one simulated H100
with Llama-3.1-8B's shape in FP8 (weights and KV), the project's scheduler with a token
budget of 8,192 and up to 2,048 sequences (``trtllm-bench``'s defaults), and the output
tokens per second compared. A grid over (compute_eff, memory_eff) keeps the pair with the
smallest worst relative error, and prints every pair tried.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time

from perf.sim.cluster import SimCluster
from perf.sim.gpu import CALIBRATION, H100_SXM, RooflineCost, load_model
from perf.sim.gpu_presets import GpuSimPreset
from perf.sim.instance import SimRequest

MODEL = "llama-3-8b"
"""Llama-3.1-8B has Llama-3-8B's shape (only its RoPE scaling and context differ)."""


def offline_throughput(compute_eff: float, memory_eff: float, isl: int, osl: int, requests: int) -> float:
    """Output tokens/s of ``requests`` requests of ``isl``/``osl`` tokens queued at once."""
    preset = GpuSimPreset("calibration", "", "h100", 1, MODEL, 1, stream=None, weight_dtype="fp8", kv_dtype="fp8",
                          max_num_seqs=2048, max_num_batched_tokens=8192, max_model_len=isl + osl + 1)
    cost = RooflineCost(H100_SXM, load_model(MODEL), 1, "fp8", 1, compute_eff, memory_eff)
    ctx = preset.context("vllm", cost)
    ctx.sched = dataclasses.replace(ctx.sched, enable_prefix_caching=False)
    sims = [SimRequest(f"r{i}", 0.0, [(i * 131 + j) % 100_000 for j in range(isl)], osl) for i in range(requests)]
    result = SimCluster(ctx, 1, "vllm", sample=False).run(sims)
    return sum(len(s.token_times_s) for s in result.requests) / result.makespan_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.sim.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--compute", default="0.3,0.4,0.5,0.6,0.7", help="compute_eff values to try")
    ap.add_argument("--memory", default="0.5,0.6,0.7,0.8,0.9", help="memory_eff values to try")
    ap.add_argument("--requests", type=int, default=3000, help="requests per throughput run")
    args = ap.parse_args(argv)
    grid = list(itertools.product(map(float, args.compute.split(",")), map(float, args.memory.split(","))))
    print("| compute_eff | memory_eff | " + " | ".join(f"{i}/{o} sim (tok/s) | vs {p:,.0f}" for i, o, p in CALIBRATION)
          + " | worst error |")
    print("|---:|---:|" + "---:|---:|" * len(CALIBRATION) + "---:|")
    best, t0 = None, time.perf_counter()
    for ce, me in grid:
        got = [offline_throughput(ce, me, i, o, args.requests) for i, o, _ in CALIBRATION]
        errs = [g / p - 1 for g, (_, _, p) in zip(got, CALIBRATION)]
        worst = max(abs(e) for e in errs)
        print(f"| {ce:.2f} | {me:.2f} | " + " | ".join(f"{g:,.0f} | {e:+.1%}" for g, e in zip(got, errs))
              + f" | {worst:.1%} |", flush=True)
        if best is None or worst < best[0]:
            best = (worst, ce, me)
    print(f"\nbest: compute_eff={best[1]:.2f} memory_eff={best[2]:.2f} (worst error {best[0]:.1%}); "
          f"{len(grid)} pairs in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
