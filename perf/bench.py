"""The serving benchmark: one request stream replayed against the cluster under each policy.

    python -m perf.bench --preset cpu --out results/cpu
    python -m perf.bench --trace ../shared/traces/AzureLLMInferenceTrace_code.csv --window-s 60 \\
        --policies kunserve,vllm --ranks 4 --store stores/smollm2 --device-memory 768MiB --out DIR

The request stream is built once, deterministically from the seed (trace -> window -> repeat
-> time scale -> upscale -> token lengths -> ``--limit``; prompts of exact token counts) and
saved to ``OUT/requests.jsonl``. Then, for each policy in turn, the cluster starts with
identical settings (only ``serve --policy`` differs) behind Triton, the stream is replayed
over one gRPC bidirectional stream at the trace's arrival times while ``/admin/state`` is
sampled every second, and the cluster is stopped, and checked gone, before the next policy.
A policy whose cluster fails to start is reported as failed; the others still run.

OUT holds: ``requests.jsonl`` (the stream), ``requests.csv`` / ``samples.csv`` /
``events.csv`` (every policy's rows, see ``perf.bench_records``), ``summary.json`` and
``summary.md`` (``perf.bench_stats``; each policy's duration is its makespan, from the run
start to its last answer), the PNG plots of ``perf.bench_plots`` and ``logs/<policy>.log``
(the cluster's output). All times are seconds from the run start, i.e. the moment the
request at trace time 0 is due.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import re
import shlex
import signal
import statistics
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from perf.bench_presets import PRESETS, BenchPreset, validate_preset
from perf.bench_records import (ClusterEvent, RequestRecord, SecondSample, write_events_csv,
                                write_requests_csv, write_samples_csv)
from perf.bench_stats import SLO, compare, markdown_table, summarize, write_summary_json
from perf.traces import (PromptSynthesizer, Trace, busiest_window, load_trace, repeat_window, scale_lengths,
                         time_scale, upscale, window)
from perf.traces.loaders import MOONCAKE_BLOCK_TOKENS
from perf.triton_client import GenerateRequest, GenerateResult, TritonCluster, stream_generate

MODEL = "kunserve"
"""The decoupled (streaming) Triton model of the cluster."""
STOP_TIMEOUT_S = 30.0


def log(message: str) -> None:
    """One progress line, flushed at once (runs take minutes)."""
    print(message, flush=True)


# --- the request stream -----------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSpec:
    """One request of the replayed stream: when it is due, its prompt and its token budget."""

    request_id: str
    arrival_s: float
    input_len: int
    """Tokens of ``prompt`` as the server counts them (special tokens included)."""
    output_len: int
    """``max_tokens`` asked for; generation may stop earlier at end-of-sequence."""
    prompt: str
    source_row: int | None = None
    block_hashes: tuple[int, ...] = ()
    """The trace's ``hash_ids`` (Mooncake): which prompt blocks it shares with other requests."""


def select_trace(p: BenchPreset) -> Trace:
    """The preset's trace after windowing, repetition, time scaling, upscaling and length scaling."""
    trace = load_trace(p.trace_path(), p.trace_format)
    if p.window_start_s is not None:
        trace = window(trace, p.window_start_s, p.window_end_s)
        span = p.window_end_s - p.window_start_s
    elif p.window_s:
        trace = window(trace, *busiest_window(trace, p.window_s))
        span = p.window_s
    else:
        span = trace.duration_s + trace.duration_s / max(len(trace), 1)
    if p.repeat > 1 and span > 0:
        trace = repeat_window(trace, 0.0, span, p.repeat)
    if p.time_scale != 1.0:
        trace = time_scale(trace, p.time_scale)
    if p.upscale != 1.0:
        trace = upscale(trace, p.upscale, seed=p.seed)
    return scale_lengths(trace, p.input_scale, p.output_scale, p.max_input, p.max_output, p.context_len)


def build_requests(p: BenchPreset, tokenizer: Any) -> list[RequestSpec]:
    """The request stream of ``p``, prompts made with ``tokenizer``; the same for the same preset."""
    trace = select_trace(p)
    requests = trace.requests[:p.limit] if p.limit else trace.requests
    if not requests:
        raise ValueError(f"the trace selection {trace.name!r} holds no requests; widen the window")
    synth = PromptSynthesizer(tokenizer, seed=p.seed)
    specs = []
    for i, r in enumerate(requests):
        n_in = max(r.input_len, synth.min_tokens)
        n_out = r.output_len if p.context_len is None else max(1, min(r.output_len, p.context_len - n_in))
        prompt = (synth.prompt_blocks(r.block_hashes, n_in, _block_tokens(p)) if r.block_hashes
                  else synth.prompt(n_in, i))
        specs.append(RequestSpec(f"r{i:05d}", r.arrival_s, n_in, n_out, prompt, r.source_row, r.block_hashes))
    return specs


def _block_tokens(p: BenchPreset) -> int:
    """Tokens of one Mooncake ``hash_ids`` block after ``--input-scale`` (rounded up, so the
    blocks still cover a scaled prompt)."""
    return max(1, math.ceil(MOONCAKE_BLOCK_TOKENS * p.input_scale))


def ideal_hit_rate(specs: list[RequestSpec], block_tokens: int) -> float | None:
    """The share of prompt tokens a cache that never evicts could serve: each prompt's
    leading blocks that an earlier request began with too (short of its last token), from
    the trace's hash ids; None when the trace has none."""
    if not any(s.block_hashes for s in specs):
        return None
    seen: set[tuple[int, ...]] = set()
    hits = 0
    for s in sorted(specs, key=lambda x: x.arrival_s):
        shared = 0
        while shared < len(s.block_hashes) and s.block_hashes[:shared + 1] in seen:
            shared += 1
        hits += min(shared * block_tokens, s.input_len - 1)
        seen.update(s.block_hashes[:k] for k in range(1, len(s.block_hashes) + 1))
    return hits / sum(s.input_len for s in specs)


def write_requests_jsonl(path: Path, specs: list[RequestSpec]) -> None:
    """One JSON object per request, in arrival order."""
    with open(path, "w", encoding="utf-8") as f:
        for s in specs:
            f.write(json.dumps(dataclasses.asdict(s)) + "\n")


def read_requests_jsonl(path: Path) -> list[RequestSpec]:
    """The requests written by :func:`write_requests_jsonl`."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [RequestSpec(**{**r, "block_hashes": tuple(r.get("block_hashes", ()))}) for r in rows]


def describe_stream(specs: list[RequestSpec]) -> str:
    """A one-line summary: count, span, mean lengths."""
    span = specs[-1].arrival_s if specs else 0.0
    mean_in = statistics.fmean(s.input_len for s in specs)
    mean_out = statistics.fmean(s.output_len for s in specs)
    return (f"{len(specs)} requests over {span:.1f} s ({len(specs) / max(span, 1e-9):.2f} req/s), "
            f"prompt {mean_in:.0f} tokens, output <= {mean_out:.0f} tokens on average")


# --- replay over Triton's gRPC stream -------------------------------------------------------


async def replay(target: str, specs: list[RequestSpec], t0: float, deadline: float,
                 model: str = MODEL) -> dict[str, GenerateResult]:
    """Send ``specs`` at ``t0 + arrival_s`` (perf_counter) over one gRPC stream; collect answers.

    Requests still unanswered at ``deadline`` (perf_counter), or when the stream breaks,
    get an error; nothing raises.
    """
    requests = [GenerateRequest(s.request_id, s.prompt, s.output_len, send_at_s=s.arrival_s) for s in specs]
    return await stream_generate(target, model, requests, max(deadline - time.perf_counter(), 0.1), start=t0)


def to_record(policy: str, spec: RequestSpec, a: GenerateResult, t0: float) -> RequestRecord:
    """The record of one answer, times in seconds from ``t0``."""
    rel = (lambda t: None if t is None else t - t0)
    error = a.error
    if error is None and a.finished_s is None:
        error = "no final response"
    return RequestRecord(
        policy=policy, request_id=spec.request_id, arrival_s=spec.arrival_s,
        sent_s=rel(a.sent_s) if a.sent_s else spec.arrival_s,
        first_token_s=rel(a.first_token_s), token_times_s=[t - t0 for t in a.response_times_s],
        finish_s=rel(a.finished_s), input_len=spec.input_len, output_len=len(a.token_ids),
        requested_output_len=spec.output_len, preemptions=a.preemptions or 0,
        migrations=a.migrations or 0, error=error)


# --- sampling /admin/state ---------------------------------------------------------------------


def rank_samples(policy: str, t_s: float, state: dict) -> list[SecondSample]:
    """One sample per rank of an ``/admin/state`` snapshot.

    ``queued``/``running`` are those of the instance the rank serves in (every rank of a
    pipelined group shows its group's); ``free_bytes`` is device memory minus weights minus
    the KV pool, at least 0.
    """
    by_rank = {r: inst for inst in state.get("instances", []) for r in inst["ranks"]}
    out = []
    for r in state.get("ranks", []):
        inst = by_rank.get(r["rank"], {})
        free = r.get("device_memory_bytes", 0) - r["weight_bytes"] - r.get("kv_bytes", 0)
        out.append(SecondSample(policy, t_s, r["rank"], r["kv_pages_used"], r["kv_pages_total"],
                                r["weight_bytes"], r.get("kv_bytes", 0), max(free, 0),
                                inst.get("waiting", 0), inst.get("running", 0)))
    return out


def new_events(policy: str, t_s: float, state: dict, seen: set[str], t0_wall: float) -> list[ClusterEvent]:
    """Events of ``state`` not in ``seen`` (which is updated), timed by their wall-clock ``time``."""
    out = []
    for e in state.get("events", []):
        key = json.dumps(e, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        when = e.get("time")
        t = when - t0_wall if isinstance(when, (int, float)) else t_s
        detail = {k: v for k, v in e.items() if k not in ("event", "time")}
        out.append(ClusterEvent(policy, t, str(e.get("event", "?")),
                                json.dumps(detail, sort_keys=True, separators=(",", ":"), default=str)))
    return out


class StateSampler:
    """Polls ``fetch()`` (the ``/admin/state`` JSON) every ``interval_s`` in a thread."""

    def __init__(self, policy: str, fetch: Callable[[], dict], t0: float, t0_wall: float,
                 interval_s: float = 1.0) -> None:
        self.policy, self.fetch, self.t0, self.t0_wall, self.interval_s = policy, fetch, t0, t0_wall, interval_s
        self.samples: list[SecondSample] = []
        self.events: list[ClusterEvent] = []
        self.last_state: dict = {}
        self.failures = 0
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"sampler-{policy}", daemon=True)

    def start(self) -> "StateSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling, then take one last sample (late events)."""
        self._stop.set()
        self._thread.join()
        self.sample_once()

    def sample_once(self) -> None:
        try:
            state = self.fetch()
        except Exception:  # a busy or dying cluster: the next poll tries again
            self.failures += 1
            return
        t = time.perf_counter() - self.t0
        self.last_state = state
        self.samples += rank_samples(self.policy, t, state)
        self.events += new_events(self.policy, t, state, self._seen, self.t0_wall)

    def _loop(self) -> None:
        while True:
            self.sample_once()
            if self._stop.wait(self.interval_s):
                return


# --- one policy --------------------------------------------------------------------------------


@dataclass
class PolicyRun:
    """What one policy's run produced, and how long its phases took."""

    policy: str
    ok: bool = False
    error: str | None = None
    startup_s: float | None = None
    replay_s: float | None = None
    stop_s: float | None = None
    makespan_s: float = 0.0
    records: list[RequestRecord] = field(default_factory=list)
    samples: list[SecondSample] = field(default_factory=list)
    events: list[ClusterEvent] = field(default_factory=list)
    counters: dict = field(default_factory=dict)
    sample_failures: int = 0
    cached_tokens: int | None = None
    """Prompt tokens served from the prefix cache (the request log's ``cached_tokens``)."""
    prompt_tokens: int = 0
    log_file: str | None = None
    lingering: str | None = None
    """Set when the cluster would not go away after the run (later runs must not start)."""

    def meta(self) -> dict:
        """This run for ``summary.json``'s meta (no per-request data)."""
        return {"status": "ok" if self.ok else "failed", "error": self.error, "startup_s": self.startup_s,
                "replay_s": self.replay_s, "stop_s": self.stop_s, "makespan_s": self.makespan_s,
                "request_errors": sum(r.error is not None for r in self.records),
                "counters": self.counters, "sample_failures": self.sample_failures, "log": self.log_file,
                "cached_tokens": self.cached_tokens, "prompt_tokens": self.prompt_tokens}


class ClusterLingers(RuntimeError):
    """A stopped cluster still has processes or open ports: later runs would share the host."""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _triton_pids(cluster: TritonCluster) -> list[int]:
    """tritonserver processes serving this cluster's gRPC port (found by their command line)."""
    want = str(cluster.triton_grpc)
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # gone meanwhile
            continue
        if "tritonserver" in argv[0] and any(a == "--grpc-port" and b == want for a, b in zip(argv, argv[1:])):
            pids.append(int(entry.name))
    return pids


def _kill(pgid: int, pids: list[int]) -> None:
    for kill, target in [(os.killpg, pgid)] + [(os.kill, pid) for pid in pids]:
        try:
            kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_cluster(cluster: TritonCluster, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop the cluster and wait until its processes are gone, tritonserver included.

    mpirun's ranks share its process group; tritonserver runs in its own session but dies
    with rank 0. What is still there after ``timeout_s`` is killed; ``ClusterLingers`` if
    even that does not clear it.
    """
    cluster.stop()
    if cluster.proc is None:
        return
    pgid = cluster.proc.pid
    deadline = time.monotonic() + timeout_s
    killed = False
    while _group_alive(pgid) or _triton_pids(cluster):
        if time.monotonic() > deadline:
            if killed:
                raise ClusterLingers(f"the cluster (process group {pgid}) is still up {2 * timeout_s:.0f} s "
                                     f"after it was stopped")
            killed, deadline = True, time.monotonic() + timeout_s
            _kill(pgid, _triton_pids(cluster))
        time.sleep(0.2)


def _keep_log(cluster: TritonCluster, out: Path, policy: str) -> str | None:
    """Move the cluster's log to ``OUT/logs/<policy>.log``; its path relative to OUT."""
    dest = out / "logs" / (re.sub(r"[^A-Za-z0-9_.-]", "_", policy) + ".log")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        dest.write_text(cluster.output(), encoding="utf-8")
        cluster.log.unlink(missing_ok=True)
        cluster.log = dest  # the same text: whoever reads it on (the tests' log check) finds it here
    except OSError:
        return None
    return str(dest.relative_to(out))


def _reason(exc: BaseException, output: str) -> str:
    """The line of the cluster's ``output`` that says what went wrong, else the exception's first."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    said = [line for line in lines if re.search(r"\berror\b", line, re.IGNORECASE)
            and not line.startswith(("Primary job", "---"))]
    if said:
        return said[0]
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def start_cluster(p: BenchPreset, policy: str, request_log: Path | None = None) -> TritonCluster:
    """A cluster object for ``policy`` with the preset's settings (not started); its request
    log (``serve --request-log``) goes to ``request_log`` when given."""
    log_args = ("--request-log", str(request_log)) if request_log is not None else ()
    return TritonCluster(p.ranks, p.store_path(), "--policy", policy, "--device", p.device, *p.serve_args,
                         *log_args, device_memory=p.device_memory, model_names=MODEL)


def _replay_policy(p: BenchPreset, run: PolicyRun, specs: list[RequestSpec], cluster: TritonCluster) -> None:
    t0_wall, t0 = time.time(), time.perf_counter()
    sampler = StateSampler(run.policy, cluster.state, t0, t0_wall, p.sample_interval_s).start()
    try:
        deadline = t0 + specs[-1].arrival_s + p.drain_timeout_s
        answers = asyncio.run(replay(cluster.grpc_target, specs, t0, deadline))
    finally:
        sampler.stop()
    run.replay_s = time.perf_counter() - t0
    run.records = [to_record(run.policy, s, answers[s.request_id], t0) for s in specs]
    run.samples, run.events = sampler.samples, sampler.events
    run.counters, run.sample_failures = sampler.last_state.get("counters", {}), sampler.failures
    run.makespan_s = max([specs[-1].arrival_s, 1e-3] + [r.finish_s for r in run.records if r.finish_s is not None])
    run.ok = True
    errors = sum(r.error is not None for r in run.records)
    log(f"[{run.policy}] replayed {len(specs)} requests in {run.replay_s:.1f} s, {errors} errors"
        + (f" (first: {next(r.error for r in run.records if r.error)})" if errors else ""))


def run_policy(p: BenchPreset, policy: str, specs: list[RequestSpec], out: Path) -> PolicyRun:
    """Start the cluster under ``policy``, replay ``specs``, stop it; failures end up in the result."""
    run = PolicyRun(policy)
    request_log = out / "logs" / f"{policy}-requests.jsonl"
    request_log.parent.mkdir(parents=True, exist_ok=True)
    request_log.unlink(missing_ok=True)
    cluster = start_cluster(p, policy, request_log)
    t = time.perf_counter()
    try:
        cluster.start(timeout=p.start_timeout_s)
        run.startup_s = time.perf_counter() - t
        log(f"[{policy}] cluster up in {run.startup_s:.1f} s")
        _replay_policy(p, run, specs, cluster)
    except Exception as exc:
        phase = "cluster did not start" if run.startup_s is None else "replay failed"
        run.ok, run.error = False, f"{phase}: {_reason(exc, cluster.output() if run.startup_s is None else '')}"
        log(f"[{policy}] FAILED: {run.error}")
    finally:
        _stop_and_keep_log(run, cluster, out)
    if request_log.exists():
        run.cached_tokens, run.prompt_tokens = cached_prompt_tokens(request_log)
    return run


def cached_prompt_tokens(request_log: Path) -> tuple[int | None, int]:
    """(prompt tokens served from the prefix cache when each request was first scheduled,
    prompt tokens) over a run's request log; None for the first without caching."""
    from orchestrator.ingress.request_log import read_request_log

    records = read_request_log(request_log)
    cached = [r["cached_tokens"] for r in records if "cached_tokens" in r]
    return (sum(cached) if cached else None), sum(r["prompt_tokens"] for r in records)


def _stop_and_keep_log(run: PolicyRun, cluster: TritonCluster, out: Path) -> None:
    t = time.perf_counter()
    try:
        stop_cluster(cluster)
        log(f"[{run.policy}] cluster stopped in {time.perf_counter() - t:.1f} s")
    except ClusterLingers as exc:
        run.lingering = str(exc)
        log(f"[{run.policy}] {exc}")
    run.stop_s = time.perf_counter() - t
    run.log_file = _keep_log(cluster, out, run.policy)


# --- reports -------------------------------------------------------------------------------------


def _settings_lines(p: BenchPreset, specs: list[RequestSpec]) -> list[str]:
    if p.window_start_s is not None:
        win = f"[{p.window_start_s:g}, {p.window_end_s:g}) s"
    else:
        win = f"busiest {p.window_s:g} s" if p.window_s else "whole trace"
    return [
        f"- preset: `{p.name}`; trace `{p.trace}` ({p.trace_format}), window {win}, repeat {p.repeat}, "
        f"time scale {p.time_scale:g}, upscale {p.upscale:g}, seed {p.seed}",
        f"- lengths: input x{p.input_scale:g} <= {p.max_input}, output x{p.output_scale:g} <= {p.max_output}, "
        f"context {p.context_len}, limit {p.limit}",
        f"- stream: {describe_stream(specs)}",
        f"- cluster: {p.ranks} ranks, store `{p.store}`, device {p.device}, {p.device_memory} per rank, "
        f"serve args `{' '.join(p.serve_args) or '-'}`",
        f"- SLO: TTFT <= {p.slo_ttft_s * 1e3:g} ms, TPOT <= {p.slo_tpot_s * 1e3:g} ms; "
        f"durations are each policy's makespan (run start to last answer)",
        "- failed requests count as infinite TTFT and E2E in the percentiles and the P99 ratios "
        "(`failed` in the table when a percentile falls on them); TPOT is over successful requests",
    ] + ([f"- prefix sharing: the trace's hash ids allow {ideal:.1%} of the prompt tokens to be prefix-cache "
          f"hits (the ideal the Prefix hits column is held against: the prompt tokens each request found "
          f"cached when first scheduled, from the request log; Lookups hit is vLLM's counter ratio, where a "
          f"preempted request looks up again)"]
         if (ideal := ideal_hit_rate(specs, _block_tokens(p))) is not None else [])


def _runs_table(runs: list[PolicyRun]) -> list[str]:
    fmt = (lambda v: "-" if v is None else f"{v:.1f}")
    lines = ["| Policy | Status | Start (s) | Replay (s) | Stop (s) | Request errors | Drops | Restores "
             "| Prefix hits | Lookups hit |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        status = "ok" if r.ok else f"failed: {r.error}"
        queries = r.counters.get("prefix_cache_queries")  # present only with prefix caching on
        lookups = "-" if not queries else f"{r.counters.get('prefix_cache_hits', 0) / queries:.1%}"
        hits = "-" if r.cached_tokens is None or not r.prompt_tokens else f"{r.cached_tokens / r.prompt_tokens:.1%}"
        lines.append(f"| {r.policy} | {status} | {fmt(r.startup_s)} | {fmt(r.replay_s)} | {fmt(r.stop_s)} | "
                     f"{sum(x.error is not None for x in r.records)} | {int(r.counters.get('drops', 0))} | "
                     f"{int(r.counters.get('restores', 0))} | {hits} | {lookups} |")
    return lines


def write_reports(out: Path, p: BenchPreset, specs: list[RequestSpec], runs: list[PolicyRun],
                  overrides: dict | None = None) -> str:
    """Write the CSVs, summary.json, summary.md and the plots; return the Markdown results table."""
    records = [r for run in runs for r in run.records]
    samples = [s for run in runs for s in run.samples]
    events = [e for run in runs for e in run.events]
    write_requests_csv(out / "requests.csv", records)
    write_samples_csv(out / "samples.csv", samples)
    write_events_csv(out / "events.csv", events)
    slo = SLO(p.slo_ttft_s, p.slo_tpot_s)
    summaries = {run.policy: summarize(run.records, run.makespan_s, slo, policy=run.policy) for run in runs if run.ok}
    ratios = compare(summaries)
    meta = {"preset": p.to_json(), "overrides": overrides or {}, "stream": describe_stream(specs),
            "requests": len(specs), "duration": "each policy's makespan: run start to its last answer",
            "runs": {run.policy: run.meta() for run in runs},
            "failed_policies": [run.policy for run in runs if not run.ok]}
    write_summary_json(out / "summary.json", summaries, ratios, slo, meta)
    table = markdown_table(summaries, ratios)
    md = [f"# Serving benchmark: {', '.join(run.policy for run in runs)}", "", *_settings_lines(p, specs), "",
          "## Results", "", table, "## Runs", "", *_runs_table(runs), ""]
    (out / "summary.md").write_text("\n".join(md), encoding="utf-8")
    _plot(out, records, samples, events)
    return table


def _plot(out: Path, records: list, samples: list, events: list) -> None:
    from perf.bench_plots import plot_all

    t = time.perf_counter()
    try:
        paths = plot_all(out, records, samples, events)
    except Exception as exc:  # the numbers are written; a plot error must not lose them
        log(f"plots failed: {type(exc).__name__}: {exc}")
        return
    log(f"plots: {', '.join(p.name for p in paths)} in {time.perf_counter() - t:.1f} s")


# --- the whole benchmark -------------------------------------------------------------------------


def make_stream(p: BenchPreset, out: Path) -> list[RequestSpec]:
    """Build the request stream of ``p`` and save it to ``OUT/requests.jsonl``."""
    from engines.store import EngineStore
    from engines.tokenizer import Tokenizer

    t = time.perf_counter()
    specs = build_requests(p, Tokenizer(EngineStore(p.store_path()).tokenizer_dir))
    write_requests_jsonl(out / "requests.jsonl", specs)
    log(f"request stream: {describe_stream(specs)}; built in {time.perf_counter() - t:.1f} s")
    return specs


def run_benchmark(p: BenchPreset, out: Path, overrides: dict | None = None) -> int:
    """Run every policy of ``p``; 0 when all ran, 1 when one failed (the reports are written anyway)."""
    out.mkdir(parents=True, exist_ok=True)
    specs = make_stream(p, out)
    runs: list[PolicyRun] = []
    lingering: str | None = None
    for policy in p.policies:
        if lingering:
            runs.append(PolicyRun(policy, error=f"not run: {lingering}"))
            continue
        runs.append(run_policy(p, policy, specs, out))
        lingering = runs[-1].lingering
        if lingering:
            log(f"[{policy}] the remaining policies are not run")
    table = write_reports(out, p, specs, runs, overrides)
    print("\n" + table, flush=True)
    failed = [r.policy for r in runs if not r.ok]
    if failed:
        log(f"failed: {', '.join(failed)} (see {out / 'summary.md'})")
    return 1 if failed else 0


# --- the command line ------------------------------------------------------------------------------


def _policies(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


_DESCRIPTION = """\
Replay one request stream against the serving cluster, behind Triton (gRPC streaming), under
each policy in turn: start the cluster with identical settings but --policy, replay the stream
at its arrival times while sampling /admin/state every second, stop the cluster, next policy.

  python -m perf.bench --preset cpu --out results/cpu
  python -m perf.bench --preset cpu --policies kunserve,vllm --limit 20 --out /tmp/smoke
  python -m perf.bench --trace TRACE.csv --window-s 60 --upscale 0.5 --max-input 256 \\
      --policies kunserve,vllm --ranks 4 --store stores/smollm2 --device-memory 768MiB --out DIR

Explicit flags override the preset's fields (--serve-arg adds to the preset's serve args).
OUT gets requests.jsonl (the stream), requests.csv, samples.csv, events.csv, summary.json,
summary.md, ttft_cdf.png, p99_ttft_over_time.png, memory_<policy>.png and logs/<policy>.log.
Exit status: 0 when every policy ran, 1 when one failed (reports are still written), 2 on
bad arguments."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m perf.bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_DESCRIPTION,
        epilog="presets (python -m perf.bench_presets lists their fields):\n"
               + "\n".join(textwrap.fill(f"{k}: {v.description}", 100, initial_indent="  ",
                                          subsequent_indent="    ") for k, v in PRESETS.items()))
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from a named preset")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    g = p.add_argument_group("request stream")
    g.add_argument("--trace", type=Path, help="trace file: Azure CSV, BurstGPT CSV or Mooncake JSONL")
    g.add_argument("--trace-format", choices=["auto", "azure", "burstgpt", "mooncake"], help="default: auto")
    g.add_argument("--window-s", type=float, help="replay the busiest W seconds (0: the whole trace)")
    g.add_argument("--window", type=float, nargs=2, metavar=("START", "END"),
                   help="replay the explicit window [START, END) seconds instead")
    g.add_argument("--repeat", type=int, help="play the selected window this many times back to back")
    g.add_argument("--time-scale", type=float, help="divide inter-arrival gaps by this (2: twice as fast)")
    g.add_argument("--upscale", type=float, help="about this many times the requests (<1 samples)")
    g.add_argument("--input-scale", type=float, help="multiply prompt lengths")
    g.add_argument("--output-scale", type=float, help="multiply output lengths")
    g.add_argument("--max-input", type=int, help="clip prompts to this many tokens")
    g.add_argument("--max-output", type=int, help="clip outputs (max_tokens) to this many tokens")
    g.add_argument("--context-len", type=int, help="prompt + output at most this many tokens")
    g.add_argument("--limit", type=int, help="only the first N requests (smoke runs)")
    g.add_argument("--seed", type=int, help="seed of the upscale sampling and the prompt texts")
    g = p.add_argument_group("cluster")
    g.add_argument("--policies", type=_policies, help="comma-separated, run in this order, e.g. kunserve,vllm")
    g.add_argument("--ranks", type=int, help="MPI ranks (one replica each at start)")
    g.add_argument("--store", type=Path, help="engine store directory")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="serve --device")
    g.add_argument("--device-memory", help="memory per rank for weights + KV, e.g. 768MiB")
    g.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="extra serve option(s), the same for every policy, appended after the preset's; "
                        "use the = form: --serve-arg=--max-num-seqs=8 or --serve-arg='--page-size 32'")
    g.add_argument("--start-timeout-s", type=float, help="how long a cluster may take to start")
    g = p.add_argument_group("measuring")
    g.add_argument("--slo-ttft-ms", type=float, help="TTFT bound of the SLO")
    g.add_argument("--slo-tpot-ms", type=float, help="TPOT bound of the SLO")
    g.add_argument("--drain-timeout-s", type=float, help="wait this long after the last send for answers")
    g.add_argument("--sample-interval-s", type=float, help="/admin/state polling period (default 1)")
    return p


_SAME_NAME = ("trace_format", "repeat", "time_scale", "upscale", "input_scale", "output_scale", "max_input",
              "max_output", "context_len", "limit", "seed", "policies", "ranks", "device", "device_memory",
              "start_timeout_s", "drain_timeout_s", "sample_interval_s")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The preset fields that explicit flags set."""
    o: dict[str, Any] = {k: getattr(args, k) for k in _SAME_NAME if getattr(args, k) is not None}
    for name in ("trace", "store"):
        if getattr(args, name) is not None:
            o[name] = str(getattr(args, name).expanduser().resolve())
    if args.window_s is not None:
        o.update(window_s=args.window_s, window_start_s=None, window_end_s=None)
    if args.window is not None:
        o.update(window_start_s=args.window[0], window_end_s=args.window[1])
    for flag in ("ttft", "tpot"):
        if getattr(args, f"slo_{flag}_ms") is not None:
            o[f"slo_{flag}_s"] = getattr(args, f"slo_{flag}_ms") / 1e3
    return o


def config_from_args(args: argparse.Namespace) -> tuple[BenchPreset, dict[str, Any]]:
    """The preset (or a blank one) with the flags' overrides; and the overrides."""
    base = PRESETS[args.preset] if args.preset else BenchPreset()
    overrides = overrides_from_args(args)
    extra = tuple(a for arg in args.serve_arg for a in shlex.split(arg))
    preset = dataclasses.replace(base, **overrides, serve_args=base.serve_args + extra)
    if extra:
        overrides["serve_args"] = list(preset.serve_args)
    return preset, overrides


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        preset, overrides = config_from_args(args)
        validate_preset(preset)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return run_benchmark(preset, args.out, overrides)
    except ValueError as exc:  # a trace that cannot be read, an empty selection
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
