"""KunServe over TP2 instances, measured on 4 CPU ranks: the fused TP2 x PP2 group's
throughput against the two TP2 replicas it comes from, and the drop's KV exchange against
raw MPI moving the same bytes, medians side by side in one run.

    python -m perf.bench_tp_fuse --out runs/tp_fuse [--reps 3]

The model is a random Llama-shaped one built for the run (hidden 1024, ``--layers``, 16
heads, 4 KV heads, fp32), stored as tp2pp1 and tp2pp2.

Part 1: output tokens/s of one mix of requests (``perf.bench_cluster.Mix``) on two TP2
replicas (``serve --tp 2``) and on one TP2 x PP2 group (``--tp 2 --groups 0-3``),
alternating, ``--reps`` times.

Part 2: two TP2 replicas fill their KV; once the requests decode, ``POST /admin/drop``
fuses them and the exchange moves the stale KV live, in batches of 8 requests (a first one
of shared prefix blocks when the requests share any). Its largest batch's bytes over its
seconds (the slowest leader's, from receiving the batch to its last page landing) are the
transfer's rate; every TP rank
moves its own KV heads, leaders with leaders and followers with followers at the same
time, so the whole exchange moved ``tp`` times the leaders' bytes (what the events count).
Right after each run, raw mpi4py swaps the same bytes between the same pairs at once
(``perf.raw_exchange`` on 4 ranks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
from pathlib import Path

from engines.store import EngineStore
from perf.bench_cluster import Mix, cluster_throughput
from perf.bench_kunserve import _cycle, raw_exchange
from perf.bench_tp import build_store
from perf.cluster_client import ServingCluster

TP = 2


def throughput(store: Path, memory: str, reps: int, requests: int) -> dict[str, list[float]]:
    mix = Mix.make(EngineStore(store).config.vocab_size, requests, 3, prompt_range=(64, 400), output_range=(24, 64))
    rows: dict[str, list[float]] = {"two TP2 replicas": [], "one TP2 x PP2 group": []}
    for rep in range(reps):
        rows["two TP2 replicas"].append(cluster_throughput(store, 4, ["--tp", str(TP)], mix, memory)[0])
        rows["one TP2 x PP2 group"].append(cluster_throughput(store, 4, ["--tp", str(TP), "--groups", "0-3"], mix,
                                                              memory)[0])
        print(f"rep {rep}: " + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in rows.items()), flush=True)
    return rows


def exchange(store: Path, memory: str, seed: int, requests: int) -> dict:
    mix = Mix.make(EngineStore(store).config.vocab_size, requests, seed, prompt_range=(300, 500),
                   output_range=(150, 200))
    with ServingCluster(4, store, "--tp", str(TP), device_memory=memory) as cluster:
        m = asyncio.run(_cycle(cluster.url, mix, settle_s=6.0))
    ex = [e for e in m["events"] if e["event"] == "exchange"][-1]
    dropped = [e for e in m["events"] if e["event"] == "weights_dropped"]  # one per device (world rank)
    largest = max(range(len(ex["batch_bytes"])), key=lambda i: ex["batch_bytes"][i])
    leaders_bytes, seconds = ex["batch_bytes"][largest], ex["batch_seconds"][largest]
    raw = raw_exchange(int(leaders_bytes // 2), ranks=4)  # each rank sends half of its pair's bytes
    rate = TP * leaders_bytes / seconds / 2**30
    return {"drop_s": m["drop_s"], "restore_s": m["restore_s"], "batch0_bytes": TP * leaders_bytes,
            "batch0_s": seconds, "gib_s": rate, "raw_gib_s": raw, "vs_raw": rate / raw,
            "exchange_bytes": TP * ex["bytes"], "exchange_s": ex["seconds"],
            "devices": len(dropped), **{k: statistics.median(e[k] for e in dropped)
                                        for k in ("bytes", "resident_fall", "kv_added", "resident_rise", "weight_bytes")}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_tp_fuse", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--device-memory", default="320MiB")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp), 1024, args.layers, splits=(1, 2), tp_sizes=(TP,))
        rows = throughput(store, args.device_memory, args.reps, args.requests)
        runs = []
        for seed in range(args.reps):
            runs.append(exchange(store, args.device_memory, seed, args.requests))
            print(f"exchange run {seed}: {runs[-1]['gib_s']:.2f} GiB/s, raw {runs[-1]['raw_gib_s']:.2f}", flush=True)
    med = {k: statistics.median(v) for k, v in rows.items()}
    base = med["two TP2 replicas"]
    lines = [f"random Llama-shaped model, hidden 1024, {args.layers} layers, fp32, {args.device_memory} per rank, "
             f"{args.reps} reps, 4 CPU ranks (2 cores)", "",
             "| 4 ranks | output tok/s (median) | runs | vs two TP2 replicas |", "|:---|---:|:---|---:|"]
    for k, v in rows.items():
        lines.append(f"| {k} | {med[k]:.1f} | {', '.join(f'{x:.1f}' for x in v)} | {med[k] / base:.2f}x |")
    mx = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    lines += ["", "| drop of two TP2 replicas into one TP2 x PP2 group (median) | figure |", "|:---|---:|",
              f"| drop latency (the call, until the group serves) | {mx['drop_s'] * 1e3:.0f} ms |",
              f"| KV exchange, largest batch, all 4 ranks | {mx['batch0_bytes'] / 2**20:.1f} MiB in "
              f"{mx['batch0_s'] * 1e3:.0f} ms, {mx['gib_s']:.2f} GiB/s |",
              f"| raw mpi4py, the same bytes, the same two pairs at once | {mx['raw_gib_s']:.2f} GiB/s |",
              f"| exchange / raw | {mx['vs_raw']:.0%} |",
              f"| each device's drop ({mx['devices']:.0f} devices, median): weights freed / resident fall | "
              f"{mx['bytes'] / 2**20:.1f} MiB / {mx['resident_fall'] / 2**20:.1f} MiB |",
              f"| KV added / resident rise | {mx['kv_added'] / 2**20:.1f} MiB / {mx['resident_rise'] / 2**20:.1f} MiB |",
              f"| weights kept per device (of {mx['bytes'] / 2**20 + mx['weight_bytes'] / 2**20:.1f} MiB) | "
              f"{mx['weight_bytes'] / 2**20:.1f} MiB |",
              f"| restore latency (the call, until the replicas serve) | {mx['restore_s'] * 1e3:.0f} ms |"]
    text = "\n".join(lines)
    print(text)
    (args.out / "summary.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "throughput": rows, "exchange": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
