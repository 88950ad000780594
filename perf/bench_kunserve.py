"""KunServe's mechanism, measured: drop latency, exchange and restore against the
transport's raw bandwidth, and pipeline efficiency with and without lookahead.

    python -m perf.bench_kunserve --engine-dir stores/smollm2 [--cost-model FILE]
        [--kv-extensions commit,remap]

Part 1 (mpirun -n 2, 768 MiB per rank): requests with long prompts fill both replicas'
KV; once they decode, ``POST /admin/drop`` fuses the ranks (latency: the call's return,
i.e. until the group serves and the new KV is usable), the exchange of the stale KV runs
live (its bytes and seconds come from ``/admin/state`` events), then ``POST
/admin/restore`` pulls the dropped weights back. Right after each run, raw mpi4py moves
the same bytes between the two ranks (``perf.raw_exchange``: both ways at once, as the
exchange and the restore's weight pull do; ``perf.bench_transport``: one way, once, for
reference); the table gives the medians of each run's exchange throughput / raw bandwidth
and weight pull's time / (bytes / raw bandwidth). Part 1 runs with each KV extension
named (``--kv-extension`` of the cluster: ``commit`` frees the dropped weights and commits
pool pages, ``remap`` maps the weights' memory onto the pool's tail), alternating, side by
side in one table; "weights to KV" is the drop's memory step on each rank (from the
``weights_dropped`` events), the rest of the drop latency being the hand-over of requests
and the group's formation.
Part 2: output throughput of one pp=2 group with and without ``--cost-model`` on a
prefill-heavy mix, as a fraction of two replicas on the same mix (pipeline efficiency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from engines.store import EngineStore
from perf.bench_cluster import Mix, cluster_throughput
from perf.cluster_client import ServingCluster, complete
from perf.mpi_launch import REPO_ROOT, mpirun_command


async def _post(s: aiohttp.ClientSession, url: str, path: str, body: dict) -> tuple[float, dict]:
    t0 = time.perf_counter()
    async with s.post(url + path, json=body) as r:
        data = await r.json()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {data}")
    return time.perf_counter() - t0, data


async def _cycle(url: str, mix: Mix, settle_s: float) -> dict:
    """Fill the KV, drop while decoding, restore while decoding; return the measurements."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as s:
        gen = asyncio.gather(*(complete(s, url, {"prompt": p, "max_tokens": n, "temperature": 0,
                                                 "ignore_eos": True}) for p, n in zip(mix.prompts, mix.max_tokens)))
        task = asyncio.ensure_future(gen)
        await asyncio.sleep(settle_s)
        async with s.get(url + "/admin/state") as r:
            used = sum(x["kv_pages_used"] for x in (await r.json())["ranks"])
        drop_s, _ = await _post(s, url, "/admin/drop", {"group": [0, 1]})
        await asyncio.sleep(1.0)
        restore_s, _ = await _post(s, url, "/admin/restore", {})
        results = await task
        async with s.get(url + "/admin/state") as r:
            events = (await r.json())["events"]
    if any(r.status != 200 for r in results):
        raise RuntimeError("benchmark requests failed")
    return {"drop_s": drop_s, "restore_s": restore_s, "kv_pages_used_at_drop": used, "events": events}


def raw_exchange(nbytes: int, ranks: int = 2) -> float:
    """Aggregate GiB/s of pairs of ranks each swapping ``nbytes`` each way at once, with raw
    mpi4py (perf.raw_exchange)."""
    cmd = mpirun_command(ranks) + [sys.executable, "-m", "perf.raw_exchange", "--bytes", str(nbytes), "--reps", "15"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300).stdout
    m = re.search(r"([\d.]+) GiB/s", out)
    if not m:
        raise RuntimeError(f"could not read perf.raw_exchange's output:\n{out}")
    return float(m.group(1))


def raw_bandwidth(sizes: str) -> dict[str, float]:
    """GiB/s of raw mpi4py per message size, from perf.bench_transport (2 ranks, this host)."""
    cmd = mpirun_command(2) + [sys.executable, "-m", "perf.bench_transport", "--sizes", sizes]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300).stdout
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\|\s*(\S+ \S+)\s*\|\s*[\d.]+\s*\|\s*[\d.]+\s*\|\s*([\d.]+)\s*\|\s*([\d.]+)", line)
        if m:
            rows[m.group(1)] = float(m.group(2))
    if not rows:
        raise RuntimeError(f"could not read perf.bench_transport's table:\n{out}")
    return rows


def part1(store: Path, memory: str, requests: int, seed: int, kv_extension: str) -> dict:
    vocab = EngineStore(store).config.vocab_size
    mix = Mix.make(vocab, requests, seed, prompt_range=(400, 600), output_range=(150, 200))
    with ServingCluster(2, store, "--kv-extension", kv_extension, device_memory=memory) as cluster:
        m = asyncio.run(_cycle(cluster.url, mix, settle_s=8.0))
    m["weights_to_kv_s"] = max(e["seconds"] for e in m["events"] if e["event"] == "weights_dropped")
    ex = [e for e in m["events"] if e["event"] == "exchange"][-1]
    pulls = [e for e in m["events"] if e["event"] == "weights_pulled"]
    m["exchange_bytes"], m["exchange_s"] = ex["bytes"], ex["seconds"]
    # The first batch runs before any adopted request resumes: the transfer rate alone.
    m["batch0_bytes"], m["batch0_s"] = ex["batch_bytes"][0], ex["batch_seconds"][0]
    m["weight_bytes"] = max(e["bytes"] for e in pulls)
    m["weights_s"] = max(e["seconds"] for e in pulls)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.bench_kunserve", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, default=Path("stores/smollm2"))
    p.add_argument("--cost-model", type=Path, default=None,
                   help="fitted cost model (default: ENGINE_DIR/cost_model.json, profiled if missing)")
    p.add_argument("--device-memory", default="768MiB")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--skip-pipeline", action="store_true", help="part 1 only")
    p.add_argument("--kv-extensions", default="commit,remap",
                   help="KV extensions to measure part 1 with, side by side (default: %(default)s)")
    args = p.parse_args(argv)
    cost = args.cost_model or args.engine_dir / "cost_model.json"
    if not cost.is_file():
        subprocess.run([sys.executable, "-m", "perf.profile_cost", "--engine-dir", str(args.engine_dir),
                        "--out", str(cost)], check=True, cwd=REPO_ROOT)
    exts = [e.strip() for e in args.kv_extensions.split(",") if e.strip()]
    runs: dict[str, list[dict]] = {ext: [] for ext in exts}
    for seed in range(args.reps):
        for ext in exts:  # alternating, so that both see the same state of the host
            m = part1(args.engine_dir, args.device_memory, args.requests, seed, ext)
            _against_raw(m)
            runs[ext].append(m)
    med = {ext: {k: statistics.median(r[k] for r in rs) for k in _MEDIANS} for ext, rs in runs.items()}
    raw_w = raw_bandwidth("16MiB")["16 MiB"]  # a layer buffer of SmolLM2 is 13.5 MiB
    print(f"\nmedians of {args.reps} runs each, alternating; after each run raw mpi4py moved the same bytes "
          f"between the two ranks (perf.raw_exchange): the first batch's, both ways at once, median "
          f"{statistics.median(r['raw_x'] for rs in runs.values() for r in rs):.2f} GiB/s, and the weight "
          f"bytes, both ways, median {statistics.median(r['raw_xw'] for rs in runs.values() for r in rs):.2f} "
          f"GiB/s; one way at 16 MiB (perf.bench_transport) {raw_w:.2f} GiB/s. Ratios are each run's against "
          "its own raw measurement.\n")
    print("| measure | " + " | ".join(f"--kv-extension {e}" for e in exts) + " |\n|---|" + "---:|" * len(exts))
    for label, cell in _ROWS:
        print(f"| {label} | " + " | ".join(cell(med[e]) for e in exts) + " |")
    result = {"runs": runs, "raw_16mib_gib_s": raw_w, "medians": med}
    if not args.skip_pipeline:
        result["pipeline"] = part2(args.engine_dir, args.device_memory, cost, args.reps)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str))
    return 0


def _against_raw(m: dict) -> None:
    """Measure raw mpi4py on the run's own bytes right after it; add the run's ratios."""
    m["raw_x"] = raw_exchange(int(m["batch0_bytes"] // 2))  # the first batch's bytes, both ways at once
    # Both members pull at once (each the layers the other kept): the same bytes swapped.
    m["raw_xw"] = raw_exchange(int(m["weight_bytes"]))
    m["batch0_gib_s"] = m["batch0_bytes"] / m["batch0_s"] / 2**30
    m["batch0_vs_raw"] = m["batch0_gib_s"] / m["raw_x"]
    m["exchange_vs_raw"] = m["exchange_bytes"] / m["exchange_s"] / 2**30 / m["raw_x"]
    m["pull_vs_raw"] = m["weights_s"] / (2 * m["weight_bytes"] / (m["raw_xw"] * 2**30))


_MEDIANS = ("drop_s", "weights_to_kv_s", "restore_s", "exchange_bytes", "exchange_s", "batch0_bytes", "batch0_s",
            "batch0_gib_s", "weight_bytes", "weights_s", "batch0_vs_raw", "exchange_vs_raw", "pull_vs_raw")

_ROWS = [
    ("drop latency (decision to group serving)", lambda m: f"{m['drop_s'] * 1000:.0f} ms"),
    ("weights to KV (the drop's memory step, slowest rank)", lambda m: f"{m['weights_to_kv_s'] * 1000:.1f} ms"),
    ("KV exchange, first batch (before requests resume)", lambda m:
        f"{m['batch0_bytes'] / 2**20:.1f} MiB in {m['batch0_s'] * 1000:.0f} ms, {m['batch0_gib_s']:.2f} GiB/s, "
        f"{m['batch0_vs_raw']:.0%} of raw"),
    ("KV exchange, whole (live: resumed requests compute between its turns)", lambda m:
        f"{m['exchange_bytes'] / 2**20:.1f} MiB in {m['exchange_s'] * 1000:.0f} ms, {m['exchange_vs_raw']:.0%} of raw"),
    ("weights pulled back per rank, both ranks at once", lambda m:
        f"{m['weight_bytes'] / 2**20:.1f} MiB in {m['weights_s'] * 1000:.0f} ms, "
        f"{m['pull_vs_raw']:.2f}x bytes/bandwidth of the same swap"),
    ("restore latency (decision to replicas serving)", lambda m: f"{m['restore_s'] * 1000:.0f} ms"),
]
"""The table's rows: a label and a cell from one extension's medians."""


def part2(store: Path, memory: str, cost: Path, reps: int) -> dict:
    """Pipeline efficiency: a pp=2 group against two replicas, with and without lookahead."""
    vocab = EngineStore(store).config.vocab_size
    mix = Mix.make(vocab, 24, 7, prompt_range=(64, 700), output_range=(16, 48))
    rows = {"replicas": [], "group": [], "group + lookahead": []}
    for _ in range(reps):
        rows["replicas"].append(cluster_throughput(store, 2, [], mix, memory)[0])
        rows["group"].append(cluster_throughput(store, 2, ["--groups", "0-1"], mix, memory)[0])
        rows["group + lookahead"].append(cluster_throughput(store, 2, ["--groups", "0-1", "--cost-model", str(cost)],
                                                           mix, memory)[0])
    med = {k: statistics.median(v) for k, v in rows.items()}
    print("\n| 2 ranks, prefill-heavy mix | output tok/s | pipeline efficiency |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.1f} | {v / med['replicas']:.2f} |")
    return med


if __name__ == "__main__":
    raise SystemExit(main())
