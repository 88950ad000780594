"""Tensor parallelism's cost on this host: a TP2 instance against one rank and against two
tp = 1 replicas, on the same requests, medians side by side in one run.

    python -m perf.bench_tp --out runs/tp [--reps 3] [--requests 16] [--max-tokens 32]

The model is a random Llama-shaped one built for the run (``--hidden``, ``--layers``; TP
needs heads and the MLP to split in two, which SmolLM2's 9 heads do not), fp32, stored
with splits tp1 and tp2. Each configuration is an mpirun job of ``perf.tp_throughput_job``
(one torch thread per rank): ``1 rank`` (tp = 1, all requests), ``2 replicas`` (two tp = 1
engines, half each) and ``TP2`` (one instance over two ranks, the all-reduce over MPI:
two per layer, a reduce and a broadcast each). Output tokens per second, from a common
start to the last token; the three run in turn, ``--reps`` times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from perf.mpi_launch import REPO_ROOT, mpirun_command

CONFIGS = (("1 rank", 1, "tp"), ("2 replicas", 2, "replicas"), ("TP2", 2, "tp"))


def build_store(root: Path, hidden: int, layers: int, splits=(1,), tp_sizes=(1, 2)) -> Path:
    from build_scripts.sources.hf_dir import open_hf_dir
    from build_scripts.sources.tiny import TinySpec, write_tiny_hf_dir
    from build_scripts.writer import write_store

    spec = TinySpec(num_layers=layers, hidden_size=hidden, intermediate_size=hidden * 3, num_heads=hidden // 64,
                    num_kv_heads=max(2, hidden // 256), max_position_embeddings=2048, seed=5)
    hf = write_tiny_hf_dir(root / "hf", spec)
    store = root / "store"
    write_store(open_hf_dir(hf), store, list(splits), progress=False, tp_sizes=list(tp_sizes))
    return store


def run_config(store: Path, ranks: int, mode: str, args, out: Path) -> float:
    cmd = mpirun_command(ranks) + [sys.executable, "-m", "perf.tp_throughput_job", str(store), mode,
                                   str(args.requests), str(args.prompt_tokens), str(args.max_tokens), str(out)]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{mode} on {ranks} ranks failed:\n{res.stderr[-3000:]}")
    data = json.loads(out.read_text())
    return data["tokens"] / data["seconds"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_tp", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rates: dict[str, list[float]] = {name: [] for name, _, _ in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp), args.hidden, args.layers)
        for rep in range(args.reps):
            for name, ranks, mode in CONFIGS:
                rates[name].append(run_config(store, ranks, mode, args, Path(tmp) / "out.json"))
                print(f"rep {rep}: {name}: {rates[name][-1]:.1f} tok/s", flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    lines = [f"hidden {args.hidden}, {args.layers} layers, {args.requests} requests of {args.prompt_tokens} prompt "
             f"tokens and {args.max_tokens} output tokens, {args.reps} reps, one torch thread per rank", "",
             "| config | ranks | output tok/s (median) | runs | vs 1 rank | vs 2 replicas |",
             "|:---|---:|---:|:---|---:|---:|"]
    for name, ranks, _ in CONFIGS:
        lines.append(f"| {name} | {ranks} | {med[name]:.1f} | {', '.join(f'{r:.1f}' for r in rates[name])} | "
                     f"{med[name] / med['1 rank']:.2f}x | {med[name] / med['2 replicas']:.2f}x |")
    text = "\n".join(lines)
    print(text)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps({"args": vars(args) | {"out": str(args.out)},
                                                       "rates": rates, "median": med}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
