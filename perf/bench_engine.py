"""Engine throughput against transformers, same model, same weights, same threads.

    python -m perf.bench_engine --engine-dir stores/smollm2 [--batch-sizes 1,8,32] [--device cuda --dtype bfloat16]

For each batch size: prefill throughput (prompt tokens/s for a batch of equal prompts in
one step) and decode throughput (generated tokens/s over ``--decode-steps`` steps), for the
engine (its whole step: schedule, execute, sample) and for transformers (forward with a
DynamicCache plus argmax). The two alternate within each repetition, and the table shows
medians and the engine/transformers ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from perf.hf_reference import load_hf_model


def engine_run(engine: LLMEngine, batch: int, prompt_len: int, steps: int, seed: int) -> tuple[float, float]:
    """Seconds for one prefill step of ``batch`` prompts, then for ``steps`` decode steps."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(batch):
        ids = torch.randint(0, engine.model.vocab_size, (prompt_len,), generator=gen).tolist()
        engine.add_request(engine.make_request(ids, SamplingParams(max_tokens=steps + 1, ignore_eos=True)))
    sync = _synchronizer(engine.kv.data.device)
    t0 = sync()
    engine.step()  # the whole batch's prefill fits the step's token budget
    t1 = sync()
    for _ in range(steps):
        engine.step()
    t2 = sync()
    if engine.scheduler.has_work():
        raise RuntimeError("benchmark requests did not finish as planned")
    return t1 - t0, t2 - t1


@torch.inference_mode()
def hf_run(model, vocab: int, batch: int, prompt_len: int, steps: int, seed: int) -> tuple[float, float]:
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=gen).to(device)
    cache = DynamicCache()
    sync = _synchronizer(device)
    t0 = sync()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = sync()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = sync()
    return t1 - t0, t2 - t1


def _synchronizer(device: torch.device):
    """A clock that first waits for the device's queued work (GPU kernels run asynchronously)."""
    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, default=Path("stores/smollm2"))
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cpu", help="cpu or cuda (both sides on it)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the store's on CPU, bfloat16 on CUDA)")
    p.add_argument("--json-out", type=Path, default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    engine = LLMEngine(EngineConfig(engine_dir=args.engine_dir, device=args.device, dtype=args.dtype,
                                    kv_cache_memory=1 << 30, max_num_seqs=max(batches),
                                    max_num_batched_tokens=max(batches) * args.prompt_len))
    model = load_hf_model(engine.store, dtype=engine.kv.data.dtype).to(engine.kv.data.device)
    vocab = engine.model.vocab_size
    # Warm up both (first calls allocate and pick kernels).
    engine_run(engine, 2, 16, 2, 0)
    hf_run(model, vocab, 2, 16, 2, 0)
    rows = []
    for b in batches:
        e_pre, e_dec, h_pre, h_dec = [], [], [], []
        for rep in range(args.reps):
            pre, dec = engine_run(engine, b, args.prompt_len, args.decode_steps, rep)
            e_pre.append(b * args.prompt_len / pre)
            e_dec.append(b * args.decode_steps / dec)
            pre, dec = hf_run(model, vocab, b, args.prompt_len, args.decode_steps, rep)
            h_pre.append(b * args.prompt_len / pre)
            h_dec.append(b * args.decode_steps / dec)
        row = {"batch": b, "engine_prefill": statistics.median(e_pre), "hf_prefill": statistics.median(h_pre),
               "engine_decode": statistics.median(e_dec), "hf_decode": statistics.median(h_dec)}
        row["prefill_ratio"] = row["engine_prefill"] / row["hf_prefill"]
        row["decode_ratio"] = row["engine_decode"] / row["hf_decode"]
        rows.append(row)
        print(f"batch {b}: prefill {row['prefill_ratio']:.2f}x, decode {row['decode_ratio']:.2f}x", flush=True)
    print(f"\n{engine.store.source} | {engine.kv.data.dtype} on {args.device} | {args.threads} threads | "
          f"prompt {args.prompt_len} tokens | {args.decode_steps} decode steps | median of {args.reps}\n")
    print("| batch | prefill tok/s engine | prefill tok/s transformers | ratio "
          "| decode tok/s engine | decode tok/s transformers | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['batch']} | {r['engine_prefill']:.0f} | {r['hf_prefill']:.0f} | {r['prefill_ratio']:.2f} "
              f"| {r['engine_decode']:.1f} | {r['hf_decode']:.1f} | {r['decode_ratio']:.2f} |")
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
