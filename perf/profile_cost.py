"""Profile the engine's step time on this host and fit the lookahead planner's cost model.

    python -m perf.profile_cost --engine-dir stores/smollm2 --out cost_model.json [--threads 1]
                                [--layers N] [--quick] [--contention 1,2,4]

Builds a stage runner over the store's pp1 weights (or their first ``--layers`` layers,
which is faster; the model scales costs by layer count) and a KV pool, then times a grid
of steps: prefill chunks of n tokens after s cached ones, decode batches of b sequences at
a context length, and mixed steps. Each time is the median of a few runs after a warm-up.
The fit (``orchestrator.kunserve.cost_model.fit``) is printed with its r2 and checked on
steps it did not see; the model is written as JSON for ``CostModel.load``.

The file also keeps what the simulator's batch-aware step model needs (``perf.sim.host_cost``):
every timed step (``profile.steps``); what the project's engine loop (``LLMEngine.step``:
schedule, step message, execute, sample, update) adds to the runner's execute for decode
batches (``profile.loop``); and, with ``--contention K,...``, the time of a fixed mix of
steps while K processes run it at once on this host (``profile.contention``): how much ranks
that share the host's cores and memory bus slow each other, beyond their share of the cores.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from engines.errors import EngineError
from engines.kv_cache import KVPool
from engines.mapping import LayerRange
from engines.runner import StageRunner
from engines.sampling import SamplingParams
from engines.step import SeqChunk, StepInput
from engines.store import EngineStore
from orchestrator.core.config import EngineConfig
from orchestrator.kunserve.cost_model import CostModel, fit

logger = logging.getLogger(__name__)

Step = list[tuple[int, int]]
"""A step as its chunks ``(n new tokens, s cached tokens)``."""

# A point whose warm-up run takes this long gets fewer timed runs: the long prefills are
# stable to a few percent, and repeating them would take most of the profile's time.
_POINT_BUDGET_S = 1.0

LOOP_BATCHES = (1, 4, 8, 16)
"""Decode batches the engine-loop measurement runs (none with --quick)."""
LOOP_CONTEXT = 128
"""Prompt tokens of each request of the engine-loop measurement."""
LOOP_STEPS = 9
"""Timed engine steps per batch (their median)."""

DEFAULT_CONTENTION = (1, 2, 4)
"""Process counts ``--contention`` runs by default (the cpu bench preset has 4 ranks)."""
CONTENTION_MIX: tuple[Step, ...] = ([(1, 127)] * 8, [(64, 0)], [(1, 255)] * 16)
"""The steps each process repeats in the contention measurement: decode batches (reading
the weights) and a prefill chunk (compute), as a serving rank interleaves them."""


def training_steps(context: int, quick: bool) -> list[Step]:
    """The grid the fit sees: prefills (n, s), decode batches, mixed steps; clipped to ``context``."""
    ns, ss = ((16, 64, 256), (0, 256, 1024)) if quick else ((16, 64, 128, 256, 512), (0, 256, 1024, 2048))
    # Decode batches at every power of two: a step's time is not linear in its batch (the
    # GEMMs of one row and of 32 run different kernels), and perf.sim's step model
    # interpolates between these points.
    batches, ctxs = ((1, 8, 32), (128, 512)) if quick else ((1, 2, 4, 8, 16, 32), (128, 1024))
    steps: list[Step] = []
    for n in ns:
        for s in ss:
            steps.append([(min(n, context), max(0, min(s, context - n)))])
    for b in batches:
        for c in ctxs:
            steps.append([(1, min(c, context) - 1)] * b)
    mixed = [[(128, 0)] + [(1, 127)] * 8, [(256, 1024)] + [(1, 1023)] * 8,
             [(64, 256), (64, 0)] + [(1, 511)] * 4, [(32, 0)] * 4 + [(1, 255)] * 16]
    steps += [_clip(m, context) for m in (mixed[:2] if quick else mixed)]
    return _unique(steps)


def held_out_steps(context: int, quick: bool) -> list[Step]:
    """Steps the fit does not see, to check its predictions."""
    steps = [[(96, 512)], [(1, 511)] * 16, [(200, 300)] + [(1, 700)] * 4]
    if not quick:
        steps += [[(384, 1536)], [(48, 64)], [(32, 0)] * 4, [(1, 2047)] * 4]
    return _unique([_clip(s, context) for s in steps])


def _clip(step: Step, context: int) -> Step:
    """Shrink chunks so that every sequence fits the model's context."""
    return [(min(n, context), max(0, min(s, context - n))) for n, s in step]


def _unique(steps: list[Step]) -> list[Step]:
    seen, out = set(), []
    for step in steps:
        if tuple(step) not in seen:
            seen.add(tuple(step))
            out.append(step)
    return out


def pages_needed(step: Step, page_size: int, layers: int) -> int:
    """KV pages a step's sequences occupy, every sequence on pages of its own."""
    return sum(-(-(n + s) // page_size) for n, s in step) * layers


class StepTimer:
    """Builds real steps for a runner (distinct KV pages per sequence) and times them."""

    def __init__(self, runner: StageRunner, page_size: int, vocab: int, reps: int) -> None:
        self.runner = runner
        self.page_size = page_size
        self.vocab = vocab
        self.reps = reps
        self.gen = torch.Generator().manual_seed(0)
        self.sampling = SamplingParams(max_tokens=1)

    def make_step(self, step: Step) -> StepInput:
        """A StepInput with random tokens; a last stage samples every chunk (greedy)."""
        layers, chunks, next_page = len(self.runner.layer_range), [], 0
        hidden = None
        for i, (n, s) in enumerate(step):
            blocks = -(-(n + s) // self.page_size)
            table = [list(range(next_page + k * blocks, next_page + (k + 1) * blocks)) for k in range(layers)]
            next_page += layers * blocks
            ids = torch.randint(0, self.vocab, (n,), generator=self.gen).tolist()
            chunks.append(SeqChunk(seq_id=i, num_computed=s, num_tokens=n, block_table=table,
                                   token_ids=ids, sample=self.runner.is_last, sampling=self.sampling))
        if not self.runner.is_first:
            hidden = torch.randn(sum(n for n, _ in step), self.runner.cfg.hidden_size, generator=self.gen)
        return StepInput(chunks=chunks, hidden=hidden)

    def time(self, step: Step) -> float:
        """Median seconds of the step after one warm-up run (fewer runs for long steps)."""
        inp = self.make_step(step)
        warm = self._run(inp)
        reps = max(1, min(self.reps, int(_POINT_BUDGET_S / max(warm, 1e-9))))
        return statistics.median(self._run(inp) for _ in range(reps))

    def _run(self, inp: StepInput) -> float:
        sync = torch.cuda.synchronize if self.runner.device.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        self.runner.execute(inp)
        sync()
        return time.perf_counter() - t0


def build_runner(store: EngineStore, layers: int, config: EngineConfig,
                 num_pages: int) -> StageRunner:
    """A runner over the first ``layers`` layers of the pp1 weights, the rest dropped."""
    device = config.torch_device()
    dtype = config.torch_dtype(store.config.torch_dtype)
    weights, full = store.load_rank(1, 0, device=device, dtype=dtype)
    if layers < len(full):
        weights.drop_layers(range(layers, full.end))
    kv = KVPool(store.config, num_pages, config.page_size, dtype, device)
    return StageRunner(store.config, weights, LayerRange(0, layers), kv)


def describe(step: Step) -> str:
    """``"16 x (1, 511)"``-style summary of a step's chunks."""
    return " + ".join(f"{k} x {c}" if k > 1 else str(c) for c, k in Counter(step).items())


def host_name(device: torch.device) -> str:
    """Host and processor, for the model's metadata."""
    if device.type == "cuda":
        return f"{platform.node()}: {torch.cuda.get_device_name(device)}"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{platform.node()}: {cpu}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.profile_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, default=Path("stores/smollm2"))
    p.add_argument("--out", type=Path, default=Path("cost_model.json"))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (CPU)")
    p.add_argument("--layers", type=int, default=None, help="profile the first N layers only")
    p.add_argument("--quick", action="store_true", help="a small grid, for tests")
    p.add_argument("--reps", type=int, default=3, help="timed runs per step (median)")
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N] or auto")
    p.add_argument("--dtype", default=None, help="compute dtype (default: as the engine picks)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--contention", default=None, metavar="K,...",
                   help="also time a mix of steps with K processes at once, for each K "
                        f"(default: {','.join(map(str, DEFAULT_CONTENTION))}; none with --quick; 0: none)")
    p.add_argument("--contention-seconds", type=float, default=None,
                   help="seconds each process repeats the mix, all at once (default: 4)")
    args = p.parse_args(argv)
    try:
        spec = args.contention if args.contention is not None else (
            "0" if args.quick else ",".join(map(str, DEFAULT_CONTENTION)))
        counts = tuple(int(x) for x in spec.split(",") if x.strip())
    except ValueError:
        p.error(f"--contention: expected comma-separated process counts, got {args.contention!r}")
    if counts == (0,):
        counts = ()
    if any(k < 1 for k in counts) or (counts and counts[0] != 1):
        p.error(f"--contention: counts must be >= 1 and start with 1 (the baseline), got {args.contention!r}")
    if args.contention_seconds is not None and not counts:
        p.error("--contention-seconds: no contention measurement to time (--contention is 0, or --quick without it)")
    if args.contention_seconds is not None and not args.contention_seconds > 0:
        p.error(f"--contention-seconds must be > 0, got {args.contention_seconds}")
    args.contention = counts
    args.contention_seconds = args.contention_seconds or 4.0
    return args


def make_timer(args: argparse.Namespace, steps: list[Step]) -> tuple[EngineStore, int, StepTimer]:
    """The store, the profiled layer count, and a timer whose KV pool holds any of ``steps``."""
    store = EngineStore(args.engine_dir)
    total_layers = store.config.num_hidden_layers
    layers = args.layers or total_layers
    if not 1 <= layers <= total_layers:
        raise ValueError(f"--layers must be between 1 and {total_layers}, got {layers}")
    config = EngineConfig(engine_dir=args.engine_dir, device=args.device, dtype=args.dtype,
                          page_size=args.page_size)
    pages = max(pages_needed(s, args.page_size, layers) for s in steps)
    runner = build_runner(store, layers, config, pages)
    timer = StepTimer(runner, args.page_size, store.config.vocab_size, 2 if args.quick else args.reps)
    timer.time([(16, 0), (1, 15)])  # first calls allocate and pick kernels
    return store, layers, timer


Samples = list[tuple[Step, float]]


def profile(args: argparse.Namespace) -> tuple[CostModel, Samples, list[tuple[Step, float, float]], dict | None]:
    """Time the grids and fit; returns the model, the timed steps, (step, measured,
    predicted) for the steps held out, and the engine loop's overhead (None with --quick)."""
    context = EngineStore(args.engine_dir).config.max_position_embeddings
    train, held = training_steps(context, args.quick), held_out_steps(context, args.quick)
    store, layers, timer = make_timer(args, train + held)
    runner = timer.runner
    samples: Samples = []
    for step in train:
        samples.append((step, timer.time(step)))
        logger.info("%-40s %.4f s", describe(step), samples[-1][1])
    model = fit(samples, layers, host=host_name(runner.device), dtype=str(runner.dtype).removeprefix("torch."),
                threads=torch.get_num_threads() if runner.device.type == "cpu" else 0,
                model=store.path.resolve().name)
    checks = [(step, timer.time(step), model.step_cost(step)) for step in held]
    loop = None if args.quick else loop_overhead(args, timer, layers)
    return model, samples, checks, loop


def loop_overhead(args: argparse.Namespace, timer: StepTimer, layers: int) -> dict:
    """Per decode batch of ``LOOP_BATCHES``: the median seconds of ``LLMEngine.step`` and of
    the runner's execute of the same chunks (scaled to every layer when ``--layers`` profiled
    fewer); their difference is what the loop adds."""
    from orchestrator.core.llm_engine import LLMEngine

    store = EngineStore(args.engine_dir)
    total = store.config.num_hidden_layers
    engine = LLMEngine(EngineConfig(engine_dir=args.engine_dir, device=args.device, dtype=args.dtype,
                                    page_size=args.page_size, kv_cache_memory=256 << 20))
    out: dict = {"batches": [], "engine_seconds": [], "runner_seconds": []}
    for b in LOOP_BATCHES:
        sampling = SamplingParams(max_tokens=LOOP_STEPS + 2, ignore_eos=True)
        reqs = [engine.make_request([(7 * i + j) % store.config.vocab_size for j in range(LOOP_CONTEXT)], sampling)
                for i in range(b)]
        for r in reqs:
            engine.add_request(r)
        while any(r.num_computed_tokens < LOOP_CONTEXT for r in reqs):
            engine.step()  # the prefills
        engine.step()  # the first decode allocates
        times = []
        for _ in range(LOOP_STEPS):
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        while engine.scheduler.has_work():
            engine.step()
        runner = timer.time([(1, LOOP_CONTEXT + LOOP_STEPS // 2)] * b) * total / layers
        out["batches"].append(b)
        out["engine_seconds"].append(statistics.median(times))
        out["runner_seconds"].append(runner)
        logger.info("engine loop: %d decoding, step %.4f s, execute %.4f s", b, out["engine_seconds"][-1], runner)
    return out


def _contention_worker(args: argparse.Namespace, barrier, results, index: int) -> None:
    """One process of the contention measurement: repeat the mix for ``--contention-seconds``
    once every process is ready; report the mean seconds of one pass."""
    torch.set_num_threads(args.threads)
    _store, _layers, timer = make_timer(args, list(CONTENTION_MIX))
    inputs = [timer.make_step(step) for step in CONTENTION_MIX]
    for inp in inputs:
        timer.runner.execute(inp)
    barrier.wait()
    t0, passes = time.perf_counter(), 0
    while time.perf_counter() - t0 < args.contention_seconds:
        for inp in inputs:
            timer.runner.execute(inp)
        passes += 1
    results[index] = (time.perf_counter() - t0) / passes


def contention(args: argparse.Namespace, counts: tuple[int, ...]) -> dict:
    """Seconds of one pass of ``CONTENTION_MIX`` per process with k processes at once, for
    each k of ``counts``; the processes are fresh (spawned), one intra-op thread setting as
    the profile's."""
    ctx = multiprocessing.get_context("spawn")
    seconds = []
    for k in counts:
        barrier, results = ctx.Barrier(k), ctx.Array("d", k)
        procs = [ctx.Process(target=_contention_worker, args=(args, barrier, results, i)) for i in range(k)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode != 0 for proc in procs):
            raise RuntimeError(f"a contention process failed with {k} processes (exit codes "
                               f"{[proc.exitcode for proc in procs]})")
        seconds.append(statistics.mean(results[:]))
        logger.info("contention: %d processes, %.4f s per pass each", k, seconds[-1])
    return {"cores": os.cpu_count(), "processes": list(counts), "pass_seconds": seconds,
            "mix": [list(map(list, step)) for step in CONTENTION_MIX]}


def report_contention(data: dict) -> None:
    base, cores = data["pass_seconds"][0], data["cores"]
    print(f"\ncontention: the step mix with k processes at once on {cores} cores")
    print("| processes | s per pass | slowdown | beyond the core share |")
    print("|---:|---:|---:|---:|")
    for k, t in zip(data["processes"], data["pass_seconds"]):
        share = max(1.0, k / cores)
        print(f"| {k} | {t:.4f} | {t / base:.2f}x | {t / base / share:.2f}x |")


def report(model: CostModel, checks: list[tuple[Step, float, float]], seconds: float) -> None:
    print(f"cost model for {model.model} ({model.layers} layers, {model.dtype}, {model.threads} threads) "
          f"on {model.host}")
    print(f"  fixed_s         {model.fixed_s * 1e3:10.4f} ms per step")
    print(f"  per_token_s     {model.per_token_s * 1e6:10.3f} us per new token")
    print(f"  per_attention_s {model.per_attention_s * 1e9:10.4f} ns per unit of attention work")
    print(f"  per_seq_s       {model.per_seq_s * 1e6:10.3f} us per sequence")
    print(f"  r2 {model.r2:.4f} over {model.samples} steps; profiled in {seconds:.1f} s\n")
    print("held out: | step (n, s) | measured ms | predicted ms | error |")
    print("|---|---:|---:|---:|")
    for step, measured, predicted in checks:
        print(f"| {describe(step)} | {measured * 1e3:.2f} | {predicted * 1e3:.2f} "
              f"| {(predicted - measured) / measured:+.1%} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        model, samples, checks, loop = profile(args)
        crowd = contention(args, args.contention) if args.contention else None
    except (EngineError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report(model, checks, time.perf_counter() - t0)
    if crowd:
        report_contention(crowd)
    steps = [{"chunks": [list(c) for c in step], "seconds": t} for step, t in samples]
    model.save(args.out, extra={"profile": {"steps": steps, "loop": loop, "contention": crowd,
                                            "page_size": args.page_size}})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
