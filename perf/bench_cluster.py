"""Cluster throughput: one pp=2 group against two replicas, and the orchestrator's overhead.

    python -m perf.bench_cluster --engine-dir stores/smollm2 [--requests 32] [--reps 2]

Part 1 starts ``mpirun -n 2 ... serve`` twice per repetition, as two replicas and as one
pp=2 group (``--groups 0-1``), alternating, and sends both the same request mix at once
over HTTP: output tokens per second from the first send to the last completion. Part 2
compares a one-rank cluster with the single-process engine (``LLMEngine``, in this
process, same settings and one torch thread) on the same mix: the orchestrator's
overhead is one minus their throughput ratio. Medians over the repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import torch

from engines.sampling import SamplingParams
from engines.store import EngineStore
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from perf.cluster_client import ServingCluster, complete


@dataclass(frozen=True)
class Mix:
    """The request mix: token-id prompts of varied length, fixed output lengths."""

    prompts: list[list[int]]
    max_tokens: list[int]

    @classmethod
    def make(cls, vocab: int, n: int, seed: int, prompt_range=(32, 256), output_range=(32, 96)) -> "Mix":
        rng = random.Random(seed)
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
        return cls(prompts, [rng.randint(*output_range) for _ in range(n)])

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)


async def _send_all(url: str, mix: Mix) -> float:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(complete(s, url, {
            "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True})
            for p, n in zip(mix.prompts, mix.max_tokens)))
        elapsed = time.perf_counter() - t0
    bad = [r for r, n in zip(results, mix.max_tokens) if r.status != 200 or len(r.token_ids) != n]
    if bad:
        raise RuntimeError(f"{len(bad)} benchmark requests failed, e.g. {bad[0]}")
    return elapsed


def cluster_throughput(store: Path, n: int, args: list[str], mix: Mix, memory: str) -> tuple[float, dict]:
    """Output tokens/s of the mix on an ``n``-rank cluster, and its /admin/state."""
    with ServingCluster(n, store, *args, device_memory=memory) as cluster:
        asyncio.run(_send_all(cluster.url, Mix(mix.prompts[:2], [4, 4])))  # warm-up
        elapsed = asyncio.run(_send_all(cluster.url, mix))
        state = cluster.state()
    return mix.output_tokens / elapsed, state


def engine_throughput(store: Path, mix: Mix, kv_bytes: int) -> float:
    """Output tokens/s of the mix on the single-process engine with the same KV pool."""
    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(engine_dir=store, device="cpu", kv_cache_memory=kv_bytes))
    sp = [SamplingParams(max_tokens=n, ignore_eos=True) for n in mix.max_tokens]
    engine.generate(mix.prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    t0 = time.perf_counter()
    engine.generate(mix.prompts, sp)
    return mix.output_tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, default=Path("stores/smollm2"))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device-memory", default="768MiB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-overhead", action="store_true")
    args = p.parse_args(argv)
    vocab = EngineStore(args.engine_dir).config.vocab_size
    mix = Mix.make(vocab, args.requests, args.seed)
    print(f"{args.requests} requests, {mix.output_tokens} output tokens, prompts 32-256 tokens, "
          f"device memory {args.device_memory} per rank", flush=True)
    replicas, group = [], []
    for rep in range(args.reps):
        replicas.append(cluster_throughput(args.engine_dir, 2, [], mix, args.device_memory)[0])
        group.append(cluster_throughput(args.engine_dir, 2, ["--groups", "0-1"], mix, args.device_memory)[0])
        print(f"rep {rep}: replicas {replicas[-1]:.1f} tok/s, pp=2 group {group[-1]:.1f} tok/s", flush=True)
    r, g = statistics.median(replicas), statistics.median(group)
    print("\n| 2 ranks as | output tok/s (median) | vs two replicas |\n|---|---:|---:|")
    print(f"| two replicas | {r:.1f} | 1.00 |\n| one pp=2 group | {g:.1f} | {g / r:.2f} |")
    if args.skip_overhead:
        return 0
    half = Mix(mix.prompts[: args.requests // 2], mix.max_tokens[: args.requests // 2])
    cluster, engine = [], []
    for rep in range(args.reps):
        tput, state = cluster_throughput(args.engine_dir, 1, [], half, args.device_memory)
        cluster.append(tput)
        engine.append(engine_throughput(args.engine_dir, half, state["ranks"][0]["kv_bytes"]))
        print(f"rep {rep}: one-rank cluster {cluster[-1]:.1f} tok/s, engine {engine[-1]:.1f} tok/s", flush=True)
    c, e = statistics.median(cluster), statistics.median(engine)
    print("\n| one rank | output tok/s (median) |\n|---|---:|")
    print(f"| single-process engine | {e:.1f} |\n| cluster (HTTP, MPI, controller) | {c:.1f} |")
    print(f"\norchestrator overhead: {1 - c / e:.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
