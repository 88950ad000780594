"""Resident memory when half of a model's layers are dropped and loaded back.

    python -m perf.weight_drop_memory --engine-dir stores/smollm2

Loads the pp1 engine, generates greedily, drops every other layer's weights, reloads them
from copies kept aside (standing in for a peer's), and generates again. Prints the
process's resident size (from /proc) at each point next to the dropped layers' bytes.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

from engines.sampling import SamplingParams
from engines.weights import release_freed_memory
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine

MiB = 1 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def settle() -> int:
    gc.collect()
    release_freed_memory(torch.device("cpu"))
    return rss()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.weight_drop_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, default=Path("stores/smollm2"))
    p.add_argument("--prompt", default="The capital of France is")
    args = p.parse_args(argv)
    engine = LLMEngine(EngineConfig(engine_dir=args.engine_dir, device="cpu", kv_cache_memory=64 * MiB))
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    before = engine.generate([args.prompt], sp)[0].token_ids
    weights = engine.executor.runners[0].weights
    dropped = sorted(weights.layers)[1::2]
    # Copies of the dropped layers stand in for the peers that keep them; they are made
    # before the first reading, so they are part of every reading.
    kept = {i: {k: v.clone() for k, v in weights.layers[i].views.items()} for i in dropped}
    nbytes = sum(weights.layers[i].nbytes for i in dropped)
    r0 = settle()
    weights.drop_layers(dropped)
    r1 = settle()
    weights.load_layers(kept)
    r2 = settle()
    after = engine.generate([args.prompt], sp)[0].token_ids
    print(f"dropped {len(dropped)} of {engine.model.num_hidden_layers} layers: {nbytes / MiB:.1f} MiB of weights")
    print(f"resident before drop {r0 / MiB:.1f} MiB, after drop {r1 / MiB:.1f} MiB "
          f"(-{(r0 - r1) / MiB:.1f} MiB, {(r0 - r1) / nbytes:.1%} of the dropped bytes)")
    print(f"after reload {r2 / MiB:.1f} MiB (+{(r2 - r1) / MiB:.1f} MiB)")
    print(f"greedy output identical after reload: {before == after}")
    return 0 if before == after else 1


if __name__ == "__main__":
    raise SystemExit(main())
