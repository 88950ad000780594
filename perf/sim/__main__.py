"""``python -m perf.sim``: replay a benchmark preset's request stream on a simulated cluster.

    python -m perf.sim --preset sim-cpu --out runs/sim-cpu [--policies vllm,oracle]
        [--cost-model FILE] [--compare-real runs/cpu-1 runs/cpu-2 runs/cpu-3]
    python -m perf.sim --preset sim-8xh100-70b --out runs/sim-8xh100 [--trace F --window S --upscale X]

``sim-cpu`` is the ``cpu`` bench preset (the same stream, ranks, memory and ``serve``
options); any preset of ``perf.bench`` is taken by name. Each replica's KV pool is what
``serve`` would give it (``--device-memory`` less the weights and the 5% workspace), its
scheduler is the project's own, and its step times come from ``--cost-model`` (default:
STORE/cost_model.json, profiled on this host by ``python -m perf.profile_cost``): the
batch-aware curve fitted to its timed steps and the ranks' measured contention
(``perf.sim.host_cost``), or with ``--step-model linear --contention none`` the planner's
linear model over plainly shared cores. Writes
``summary.md``/``summary.json`` (``perf.bench``'s tables), ``requests.jsonl``/``.csv``,
``samples.csv`` (memory per rank each second), ``events.csv`` (decisions, drops, exchanges,
restores, migrations), ``reshapes.jsonl`` (each drop's, restore's and migration's times and
bytes) and the plots;
``--compare-real DIR...`` sets real ``perf.bench`` runs' median and range beside the simulated
figures. The GPU presets (``perf.sim.gpu_presets``) model H100 and H200 clusters with the
roofline step model of ``perf.sim.gpu``. Simulated: every ``serve --policy`` (kunserve's drops,
exchanges and restores and llumnix's live migrations as the real state machines, on the fabric).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import statistics
import time
from pathlib import Path

from engines.config import parse_dtype
from engines.store import EngineStore
from engines.tokenizer import Tokenizer
from orchestrator.cli import build_parser as serve_cli
from orchestrator.core.config import parse_bytes
from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.kunserve.cost_model import CostModel, CostModelError
from orchestrator.serve import config_from_args
from perf.bench import build_requests, select_trace
from perf.bench_presets import PRESETS, BenchPreset
from perf.bench_records import RequestRecord, write_events_csv, write_requests_csv, write_samples_csv
from perf.bench_stats import SLO, compare, markdown_table, summarize, write_summary_json
from orchestrator.policy.bundles import get_policy
from perf.bench_plots import plot_all
from perf.sim.clock import EventLoop
from perf.sim.cluster import SIMULATED_POLICIES, SimCluster, SimResult
from perf.sim.fabric import CpuHost, CpuHostSpec
from perf.sim.gpu_presets import GPU_PRESETS, GpuSimPreset
from perf.sim.host_cost import BatchStepModel, load_host_profile
from perf.sim.instance import SimContext, SimRequest, StepCost
from perf.sim.links import Network
from perf.sim.memory import MemoryLayout
from perf.sim.stream import synthetic_stream

ALIASES = {"sim-cpu": "cpu"}
"""Simulator presets that are a bench preset's cluster and stream."""


def cpu_context(p: BenchPreset, policy: str, cost: StepCost, host_cores: float | None,
                efficiency: tuple[float, ...] = ()) -> SimContext:
    """What ``serve`` gives each rank of ``p`` under ``policy``: its memory (``--device-memory``
    less the weights and the 5% workspace in KV pages), its scheduler limits, on this host."""
    argv = ["serve", "--engine-dir", str(p.store_path()), "--device-memory", p.device_memory, "--policy", policy,
            *p.serve_args]
    cfg = config_from_args(serve_cli().parse_args(argv))
    store = EngineStore(p.store_path())
    m = store.config
    dtype = parse_dtype(cfg.dtype or m.dtype)  # serve on a CPU: the store's dtype unless --dtype
    tp = cfg.tp
    layout = MemoryLayout.for_model(m, dtype, parse_bytes(p.device_memory), cfg.page_size,
                                    tuple(store.tp_splits(tp)) if tp > 1 else tuple(store.splits), tp)
    bundle = get_policy(policy)
    sched = SchedulerConfig(cfg.max_num_batched_tokens, cfg.max_num_seqs, preemption_mode=bundle.preemption,
                            swap_space_bytes=cfg.swap_space, enable_prefix_caching=cfg.enable_prefix_caching)
    clock = EventLoop()
    ranks = p.ranks // tp
    host = CpuHost(CpuHostSpec(host_cores, efficiency=efficiency), ranks)
    return SimContext(clock, Network(clock), host, cost, layout, sched,
                      m.max_position_embeddings, m.hidden_size * dtype.itemsize * tp,
                      swap_space_bytes=cfg.swap_space if bundle.preemption == "swap" else None,
                      migration=cfg.migration)


def to_records(policy: str, sims: list[SimRequest], input_lens: dict[str, int]) -> list[RequestRecord]:
    return [RequestRecord(policy, s.request_id, s.arrival_s, s.arrival_s, s.token_times_s[0] if s.token_times_s else None,
                          list(s.token_times_s), s.finish_s, input_lens[s.request_id], len(s.token_times_s),
                          s.max_tokens, s.preemptions, s.migrations, s.error) for s in sims]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.sim", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_presets_help())
    ap.add_argument("--preset", default="sim-cpu", choices=sorted([*PRESETS, *ALIASES, *GPU_PRESETS]),
                    metavar="NAME", help="a simulator preset or any perf.bench preset (below)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policies", default=",".join(SIMULATED_POLICIES),
                    help=f"comma-separated; simulated: {', '.join(SIMULATED_POLICIES)}")
    ap.add_argument("--cost-model", type=Path, default=None,
                    help="CPU presets: a perf.profile_cost file (default: STORE/cost_model.json)")
    ap.add_argument("--host-cores", type=float, default=None,
                    help=f"CPU presets: cores the ranks share (default: this host's, {os.cpu_count() or 1}); "
                         "0: a core per rank")
    ap.add_argument("--step-model", choices=("batch", "linear"), default=None,
                    help="CPU presets: batch, the step-time curve fitted to the profile's timed steps "
                         "(perf.sim.host_cost); linear, the lookahead planner's CostModel (default: batch)")
    ap.add_argument("--contention", choices=("measured", "none"), default=None,
                    help="CPU presets: measured, busy ranks slow each other as the profile's --contention "
                         "measured (beyond sharing --host-cores); none, they only share the cores "
                         "(default: measured)")
    ap.add_argument("--trace", default=None, help="GPU presets: another trace file (Azure, BurstGPT or Mooncake)")
    ap.add_argument("--window", type=float, default=None, help="GPU presets: seconds of the trace (its busiest)")
    ap.add_argument("--upscale", type=float, default=None, help="GPU presets: times the trace's rate")
    ap.add_argument("--gpus-per-node", type=int, default=None,
                    help="GPU presets: GPUs per node instead of the GPU's 8 (a what-if of placement: with "
                         "one replica per node every group's exchange and restore cross InfiniBand)")
    ap.add_argument("--compare-real", type=Path, nargs="+", default=None, metavar="DIR",
                    help="perf.bench runs of the same preset: their median and range beside the simulated figures")
    args = ap.parse_args(argv)
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    if bad := [x for x in policies if x not in SIMULATED_POLICIES]:
        ap.error(f"--policies: {', '.join(bad)} not simulated yet (only {', '.join(SIMULATED_POLICIES)})")
    if args.preset in GPU_PRESETS:
        cpu_only = [f"--{k.replace('_', '-')}" for k in ("cost_model", "host_cores", "step_model", "contention")
                    if getattr(args, k) is not None]
        if cpu_only:
            ap.error(f"{', '.join(cpu_only)}: for CPU presets only; {args.preset} uses the roofline of perf.sim.gpu")
        g = GPU_PRESETS[args.preset]
        changes = {k: v for k, v in (("trace", args.trace), ("window_s", args.window), ("upscale", args.upscale))
                   if v is not None}
        if changes:
            g = dataclasses.replace(g, stream=dataclasses.replace(g.stream, **changes))
        if args.gpus_per_node is not None:
            if args.gpus_per_node < g.tp or args.gpus_per_node % g.tp:
                ap.error(f"--gpus-per-node {args.gpus_per_node}: must be a multiple of {g.name}'s tp {g.tp}")
            g = dataclasses.replace(g, gpus_per_node=args.gpus_per_node)
        print(run_gpu(g, policies, args.out))
        return 0
    if trace_opts := [f"--{k.replace('_', '-')}" for k in ("trace", "window", "upscale", "gpus_per_node")
                      if getattr(args, k) is not None]:
        ap.error(f"{', '.join(trace_opts)}: for GPU presets only (a CPU preset's stream is its bench preset's)")
    args.host_cores = float(os.cpu_count() or 1) if args.host_cores is None else args.host_cores
    args.step_model = args.step_model or "batch"
    args.contention = args.contention or "measured"
    p = PRESETS[ALIASES.get(args.preset, args.preset)]
    cost_path = args.cost_model or p.store_path() / "cost_model.json"
    if not cost_path.is_file():
        ap.error(f"no cost model at {cost_path}: fit one with python -m perf.profile_cost --engine-dir "
                 f"{p.store_path()} --out {cost_path}")
    try:
        host = load_host_profile(cost_path)
    except CostModelError as exc:
        ap.error(str(exc))
    refit = (f"re-profile with python -m perf.profile_cost --engine-dir {p.store_path()} --out {cost_path}")
    if args.step_model == "batch" and host.batch is None:
        ap.error(f"--step-model batch: {cost_path} has no timed steps (written by an older perf.profile_cost); "
                 f"{refit}, or pass --step-model linear")
    if args.contention == "measured" and not host.efficiency:
        ap.error(f"--contention measured: {cost_path} has no contention measurement; {refit}, "
                 "or pass --contention none")
    if args.contention == "measured" and not args.host_cores:
        ap.error("--contention measured needs shared cores (--host-cores > 0), or pass --contention none")
    cost = host.batch if args.step_model == "batch" else host.linear
    efficiency = host.efficiency if args.contention == "measured" else ()
    text = run(p, args.preset, policies, cost, args.out, args.compare_real, args.host_cores or None, efficiency)
    print(text)
    return 0


def _presets_help() -> str:
    lines = ["GPU presets (modelled, see perf/sim/gpu.py):"]
    lines += [f"  {name}: {g.description}" for name, g in GPU_PRESETS.items()]
    lines += ["CPU presets: sim-cpu (the cpu bench preset), or any perf.bench preset by name."]
    return "\n".join(lines)


def run(p: BenchPreset, name: str, policies: list[str], cost: CostModel | BatchStepModel, out: Path,
        real: list[Path] | None = None, host_cores: float | None = None,
        efficiency: tuple[float, ...] = ()) -> str:
    """Simulate ``p``'s stream under each policy on this host's model; write the reports to ``out``."""
    tokenizer = Tokenizer(EngineStore(p.store_path()).tokenizer_dir)
    specs = build_requests(p, tokenizer)
    ids = {s.request_id: tokenizer.encode(s.prompt, add_special_tokens=True) for s in specs}
    stream = [(s.request_id, s.arrival_s, ids[s.request_id], s.output_len) for s in specs]
    meta = {"preset": name, "cost_model": cost.to_json(), "host_cores": host_cores,
            "contention_efficiency": list(efficiency)}
    return simulate_policies(name, policies, lambda policy: cpu_context(p, policy, cost, host_cores, efficiency),
                             stream,
                             SLO(p.slo_ttft_s, p.slo_tpot_s), out, meta, real)


def run_gpu(g: GpuSimPreset, policies: list[str], out: Path) -> str:
    """Simulate a GPU preset's stream under each policy; write the reports to ``out``."""
    t0 = time.perf_counter()
    stream = synthetic_stream(select_trace(g.stream))
    print(f"{g.name}: {len(stream)} requests over {stream[-1][1] if stream else 0:.0f} s, {g.gpus} x "
          f"{g.profile.name}, {g.model} as {g.ranks} tp{g.tp} replicas (stream built in "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)
    meta = {"preset": g.name, "gpu": g.profile.name, "gpus": g.gpus, "model": g.model, "tp": g.tp,
            "gpus_per_node": g.gpus_per_node or g.profile.node.gpus_per_node,
            "gpu_source": g.profile.source, "stream": g.stream.to_json()}
    return simulate_policies(g.name, policies, g.context, stream, SLO(g.stream.slo_ttft_s, g.stream.slo_tpot_s),
                             out, meta)


def simulate_policies(name: str, policies: list[str], make_ctx, stream, slo: SLO, out: Path, meta: dict,
                      real: list[Path] | None = None) -> str:
    """``stream``: (request id, arrival s, prompt ids, max tokens); returns summary.md."""
    out.mkdir(parents=True, exist_ok=True)
    input_lens = {rid: len(ids) for rid, _, ids, _ in stream}
    summaries, records, samples, events, reshapes, timings = {}, [], [], [], [], []
    meta = {**meta, "runs": {}}
    for policy in policies:
        ctx = make_ctx(policy)
        sims = [SimRequest(rid, t, ids, n) for rid, t, ids, n in stream]
        t0 = time.perf_counter()
        result = SimCluster(ctx, ctx.fabric.num_ranks, policy).run(sims)
        wall = time.perf_counter() - t0
        recs = to_records(policy, result.requests, input_lens)
        records += recs
        samples += result.samples
        events += result.cluster_events
        reshapes += [dict(policy=policy, **r.to_json()) for r in [*result.reshapes, *result.migrations]]
        timings += reshape_timings(policy, ctx, result)
        summaries[policy] = summarize(recs, result.makespan_s, slo, policy)
        meta["runs"][policy] = run_meta(ctx, result, wall)
        print(f"[{policy}] simulated {result.makespan_s:.1f} s of serving in {wall:.2f} s of wall time "
              f"({result.events} events, {result.steps} micro-batches, {ctx.layout.replica_pages()} KV pages "
              f"per replica, {len(result.reshapes)} reshapes, {sum(m.ok for m in result.migrations)} migrations, "
              f"{ctx.controller.deferred} controller actions waited for rank 0's step)", flush=True)
    ratios = compare(summaries, base="kunserve" if "kunserve" in summaries else policies[0])
    text = f"# Simulated: {name}\n\n{markdown_table(summaries, ratios)}"
    if timings:
        text += "\n" + timings_table(timings)
    if real:
        text += "\n" + compare_real(real, summaries)
    (out / "summary.md").write_text(text)
    write_summary_json(out / "summary.json", summaries, ratios, slo, meta)
    with open(out / "requests.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")
    with open(out / "reshapes.jsonl", "w") as f:
        for r in reshapes:
            f.write(json.dumps(r) + "\n")
    write_requests_csv(out / "requests.csv", records)
    write_samples_csv(out / "samples.csv", samples)
    write_events_csv(out / "events.csv", events)
    plot_all(out, records, samples, events)
    return text


def reshape_timings(policy: str, ctx: SimContext, result: SimResult) -> list[dict]:
    """Each drop's, restore's and migration's seconds and bytes, with the links it crossed."""
    out = []
    for r in result.reshapes:
        out.append({"policy": policy, "kind": r.kind, "links": ctx.fabric.link_kind(r.ranks), "ranks": len(r.ranks),
                    "to_serve_s": (r.serving_s or r.started_s) - r.started_s,
                    "moves_s": (r.done_s or r.started_s) - (r.serving_s or r.started_s) if r.kind == "drop" else
                    (r.done_s or r.started_s) - r.started_s,
                    "kv_bytes": r.kv_bytes, "weight_bytes": r.weight_bytes})
    for m in result.migrations:
        if m.ok:
            out.append({"policy": policy, "kind": "migration", "links": ctx.fabric.link_kind((m.src, m.dst)),
                        "ranks": 2, "to_serve_s": m.stop_s, "moves_s": (m.done_s or m.started_s) - m.started_s,
                        "kv_bytes": m.kv_bytes, "weight_bytes": 0})
    return out


def timings_table(timings: list[dict]) -> str:
    """Medians per (policy, kind, links, group size): a drop's time from its decision until
    the group serves and the exchange after it; a restore's until its parts serve; a
    migration's stop and its whole copy."""
    groups: dict[tuple, list[dict]] = {}
    for t in timings:
        groups.setdefault((t["policy"], t["kind"], t["links"], t["ranks"]), []).append(t)
    lines = ["## Reshapes and migrations (medians)", "",
             "A drop: decision to the group serving (drain and remap), then the KV exchange while it serves. "
             "A restore: decision to every part serving (drain, KV move, weight pull). A migration: the "
             "request's final stop, and the whole copy.", "",
             "| policy | kind | links | ranks | count | to serve / stop (ms) | exchange / copy (ms) | "
             "KV moved (MiB) | weights (MiB) |", "|:---|:---|:---|---:|---:|---:|---:|---:|---:|"]
    med = statistics.median
    for (policy, kind, links, ranks), ts in sorted(groups.items()):
        lines.append(f"| {policy} | {kind} | {links} | {ranks} | {len(ts)} | {med(t['to_serve_s'] for t in ts) * 1e3:.1f} "
                     f"| {med(t['moves_s'] for t in ts) * 1e3:.1f} | {med(t['kv_bytes'] for t in ts) / 2**20:,.0f} "
                     f"| {med(t['weight_bytes'] for t in ts) / 2**20:,.0f} |")
    return "\n".join(lines) + "\n"


def run_meta(ctx: SimContext, result: SimResult, wall: float) -> dict:
    d = result.decision_s
    return {"kv_pages": ctx.layout.replica_pages(), "events": result.events, "steps": result.steps,
            "simulated_s": result.makespan_s, "wall_s": wall, "reshapes": len(result.reshapes),
            "migrations": sum(m.ok for m in result.migrations), "controller_deferred": ctx.controller.deferred,
            "decision_ms_median": 1e3 * statistics.median(d) if d else None,
            "decision_ms_max": 1e3 * max(d) if d else None, "ticks": len(d)}


_COMPARED = (("TTFT P50", "ttft_p50_s", 0.15), ("TTFT P99", "ttft_p99_s", 0.30), ("TPOT P50", "tpot_p50_s", 0.15))
"""Compared figures and the issue's tolerance on each (simulated against the real median)."""


def compare_real(runs: list[Path], simulated: dict) -> str:
    """Simulated against real ``perf.bench`` runs of the same stream, policy by policy: the
    real median and range (ms), sim / median, whether it is within the tolerance, and the
    policies' ranking by P99 TTFT in each."""
    reals = [json.loads((run / "summary.json").read_text())["policies"] for run in runs]
    lines = [f"Real: {len(runs)} run(s), {', '.join(str(r) for r in runs)}.", "",
             "| policy | metric | real median (ms) | real range (ms) | simulated (ms) | sim / median | within |",
             "|:---|:---|---:|---:|---:|---:|:---|"]
    medians: dict[str, float] = {}
    for policy, s in simulated.items():
        for label, key, tol in _COMPARED:
            got = [r[policy][key] for r in reals if isinstance(r.get(policy, {}).get(key), (int, float))]
            v = getattr(s, key)
            if not got or v is None:
                continue
            med = statistics.median(got)
            if key == "ttft_p99_s":
                medians[policy] = med
            ok = "yes" if abs(v / med - 1) <= tol else "no"
            lines.append(f"| {policy} | {label} | {med * 1e3:.0f} | {min(got) * 1e3:.0f}-{max(got) * 1e3:.0f} | "
                         f"{v * 1e3:.0f} | {v / med:.2f} | {ok} (±{tol:.0%}) |")
    ranked = [p for p in medians if simulated[p].ttft_p99_s is not None]
    real_rank = sorted(ranked, key=medians.get)
    sim_rank = sorted(ranked, key=lambda p: simulated[p].ttft_p99_s)
    lines += ["", f"Ranking by P99 TTFT: real {' < '.join(real_rank)}; simulated {' < '.join(sim_rank)} "
              f"({'the same' if real_rank == sim_rank else 'different'})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
