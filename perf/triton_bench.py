"""perf_analyzer and genai-perf against the cluster behind Triton, and the Triton hop's cost.

    python -m perf.triton_bench --out runs/triton [--engine-dir stores/smollm2] [--ranks 2]
    python -m perf.triton_bench --out runs/triton --attach   # a cluster already serving on the default ports

1. Installs genai-perf and perf_analyzer (from the ``tritonclient==2.51.0`` manylinux1 wheel,
   whose ``perf_analyzer`` runs on older glibc) into their own environment
   (``--tools-venv``), with ``libb64.so.0d`` and ``libcudart.so.12`` taken from the
   ``nvidia-pytriton`` wheel's bundled libraries.
2. Starts the cluster with ``--triton`` (unless ``--attach``).
3. genai-perf: a concurrency sweep, streaming over gRPC with the store's own tokenizer.
4. perf_analyzer: a request-intervals file cut from a real trace's busiest window
   (``../shared/traces``), the same prompts; TTFT and inter-token latency are computed from
   its profile export.
5. The Triton hop: identical requests sent alternately to the ingress (``/v1/completions``,
   streamed) and through Triton (gRPC stream), TTFT of each measured by the client; the
   median of the paired differences is the hop's cost. Python asyncio clients in pairs,
   then perf_analyzer in alternating rounds. The cluster started here writes its request
   log (``serve --request-log``); each TTFT less the ingress's own for that request gives
   the hop again without the model's time, whose noise a noisy host makes larger than
   the hop.
6. Deterministic output length: genai-perf with ``--output-tokens-mean N
   --output-tokens-stddev 0 --output-tokens-mean-deterministic``, through Triton and to the
   OpenAI completions endpoint; every request must get exactly N output tokens, by the
   cluster's request log (and genai-perf's own, re-tokenized, counts are shown).

``--only load,hop,deterministic`` picks steps (default: all), e.g.
``python -m perf.triton_bench --out runs/triton-det --only deterministic`` (a few minutes).
Everything raw is kept under ``--out``; ``summary.md`` and ``summary.json`` hold the tables.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import venv
from dataclasses import asdict, dataclass
from pathlib import Path

from perf.mpi_launch import REPO_ROOT

TOOLS = ["genai-perf==0.0.16", "tritonclient[http,grpc]==2.51.0"]
DEFAULT_TRACE = REPO_ROOT.parent / "shared" / "traces" / "AzureLLMInferenceTrace_code.csv"


# ----------------------------------------------------------------------------- the tools

@dataclass(frozen=True)
class Tools:
    genai_perf: Path
    perf_analyzer: Path
    env: dict[str, str]


def install_tools(venv_dir: Path) -> Tools:
    """The tools' environment (created on first use) and the libraries perf_analyzer needs."""
    bin_dir = venv_dir / "bin"
    if not (bin_dir / "genai-perf").is_file() or not (bin_dir / "perf_analyzer").is_file():
        print(f"installing {', '.join(TOOLS)} into {venv_dir} ...", flush=True)
        venv.create(venv_dir, with_pip=True)
        subprocess.run([str(bin_dir / "pip"), "install", "-q", *TOOLS], check=True)
    libs = _perf_analyzer_libs(venv_dir / "pa-libs")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               LD_LIBRARY_PATH=os.pathsep.join(p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH")) if p))
    return Tools(bin_dir / "genai-perf", bin_dir / "perf_analyzer", env)


def _perf_analyzer_libs(lib_dir: Path) -> Path:
    """Links named as perf_analyzer asks for them, to the copies bundled in nvidia-pytriton."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise SystemExit("error: nvidia-pytriton is not installed (pip install -e '.[triton]')")
    bundled = Path(spec.origin).parents[1] / "nvidia_pytriton.libs"
    lib_dir.mkdir(parents=True, exist_ok=True)
    for soname, pattern in (("libb64.so.0d", "libb64-*.so.0d"), ("libcudart.so.12", "libcudart-*.so.12*")):
        found = sorted(bundled.glob(pattern))
        if not found:
            raise SystemExit(f"error: {bundled} has no {pattern}; perf_analyzer cannot run")
        link = lib_dir / soname
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    return lib_dir


# ----------------------------------------------------------------------------- genai-perf sweep

@dataclass
class LoadResult:
    """One load point: TTFT and inter-token latency (ms) and throughput."""

    load: str
    requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    output_tok_s: float
    request_s: float


def genai_perf_point(tools: Tools, args: argparse.Namespace, concurrency: int, out: Path) -> LoadResult:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(tools.genai_perf), "profile", "-m", args.model, "--endpoint-type", "kserve",
           "--backend", "tensorrtllm", "-u", args.grpc, "--streaming", "--tokenizer", str(args.tokenizer),
           "--synthetic-input-tokens-mean", str(args.input_tokens), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(args.output_tokens),
           "--concurrency", str(concurrency), "--num-prompts", str(args.num_prompts),
           "--measurement-interval", str(args.measurement_ms), "--random-seed", str(args.seed),
           "--artifact-dir", str(out)]
    _run(cmd, tools.env, out / "genai-perf.log")
    stats = json.loads(next(out.rglob("profile_export_genai_perf.json")).read_text())
    return LoadResult(
        f"concurrency {concurrency}", int(stats["request_count"]["avg"]),
        stats["time_to_first_token"]["p50"], stats["time_to_first_token"]["p99"],
        stats["inter_token_latency"]["p50"], stats["inter_token_latency"]["p99"],
        stats["output_token_throughput"]["avg"], stats["request_throughput"]["avg"])


def _run(cmd: list[str], env: dict[str, str], log: Path) -> None:
    status = _run_status(cmd, env, log)
    if status != 0:
        raise SystemExit(f"error: {cmd[0]} failed with status {status}; see {log}")


def _run_status(cmd: list[str], env: dict[str, str], log: Path) -> int:
    print("  $ " + " ".join(cmd[:2] + ["..."]), f"(log: {log})", flush=True)
    with open(log, "w") as f:
        return subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=log.parent).returncode


# ----------------------------------------------------------------------------- trace intervals

def trace_intervals(trace: Path, count: int, rate: float) -> list[int]:
    """Inter-arrival gaps (µs) of ``count`` consecutive requests of a trace, from the start
    of its busiest minute, time-scaled so that their mean rate is ``rate`` req/s (the bursts
    keep their shape: the coefficient of variation does not change)."""
    from perf.traces import busiest_window, load_trace

    t = load_trace(trace)
    start, _ = busiest_window(t, 60.0)
    arrivals = [r.arrival_s for r in t.requests if r.arrival_s >= start][:count + 1]
    if len(arrivals) < 2 or arrivals[-1] == arrivals[0]:
        raise SystemExit(f"error: {trace} has too few requests after its busiest minute")
    mean_gap = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    scale = 1.0 / (rate * mean_gap)  # multiply gaps by this to get the asked rate
    return [max(1, int((b - a) * scale * 1e6)) for a, b in zip(arrivals, arrivals[1:])]


def perf_analyzer_intervals(tools: Tools, args: argparse.Namespace, inputs: Path, out: Path) -> LoadResult:
    """perf_analyzer replaying the trace's gaps with genai-perf's prompts; stats from its export."""
    gaps = trace_intervals(args.trace, args.trace_requests, args.trace_rate)
    intervals = out / "request_intervals.txt"
    out.mkdir(parents=True, exist_ok=True)
    intervals.write_text("\n".join(map(str, gaps)) + "\n")
    export = out / "profile_export.json"
    export.unlink(missing_ok=True)  # perf_analyzer refuses to overwrite an earlier run's
    cmd = [str(tools.perf_analyzer), "-m", args.model, "--async", "-i", "grpc", "--streaming",
           "-u", args.grpc, "--service-kind", "triton", "--shape", "max_tokens:1", "--shape", "text_input:1",
           "--request-intervals", str(intervals), "--input-data", str(inputs),
           "--measurement-mode", "count_windows", "--measurement-request-count", str(len(gaps)),
           "--stability-percentage", "999", "--profile-export-file", str(export)]
    _run(cmd, tools.env, out / "perf_analyzer.log")
    return _stats_from_export(export, f"{args.trace.stem} gaps @ {args.trace_rate:g} req/s")


def _stats_from_export(export: Path, label: str) -> LoadResult:
    requests = [r for e in json.loads(export.read_text())["experiments"] for r in e["requests"]
                if r.get("response_timestamps")]
    ttft = [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in requests]
    itl = [(r["response_timestamps"][-1] - r["response_timestamps"][0]) / 1e6 / (len(r["response_timestamps"]) - 1)
           for r in requests if len(r["response_timestamps"]) > 1]
    tokens = sum(len(r["response_timestamps"]) for r in requests)
    span = (max(r["response_timestamps"][-1] for r in requests) - min(r["timestamp"] for r in requests)) / 1e9
    return LoadResult(label, len(requests), _pct(ttft, 50), _pct(ttft, 99), _pct(itl, 50), _pct(itl, 99),
                      tokens / span, len(requests) / span)


def _pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


# ----------------------------------------------------------------------------- the Triton hop

@dataclass
class HopResult:
    pairs: int
    ingress_ttft_p50_ms: float
    triton_ttft_p50_ms: float
    paired_diff_p50_ms: float
    paired_diff_p90_ms: float
    transport_diff_p50_ms: float | None = None
    """The same pairs, each side's TTFT less the ingress's own for that request (its request
    log): what remains is the way in and out, so the model's time and its noise cancel."""
    transport_diff_p90_ms: float | None = None
    transport_ingress_p50_ms: float | None = None
    """Median time outside the ingress (client TTFT less the ingress's own), direct."""
    transport_triton_p50_ms: float | None = None
    """The same through Triton."""
    perf_analyzer: dict | None = None
    """The same comparison with perf_analyzer (C++) as the client both ways (via genai-perf):
    rounds, requests per side, pooled TTFT medians and the median of the per-round
    differences (``ttft_*``), and the same without the model's time (``transport_*``)."""


def triton_hop_perf_analyzer(tools: Tools, args: argparse.Namespace, out: Path) -> dict:
    """Alternating genai-perf rounds at concurrency 1, the same synthetic prompts both ways:
    the ingress's OpenAI completions (HTTP) and Triton (gRPC streaming). With the cluster's
    request log, also each request's TTFT less the ingress's own (``time_outside_ingress``)."""
    model_name = _served_model(args.ingress)
    stamps: dict[str, list[list[Stamps]]] = {"ingress": [], "triton": []}
    for i in range(args.hop_rounds):
        common = ["--streaming", "--tokenizer", str(args.tokenizer), "--synthetic-input-tokens-mean", "16",
                  "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", "2", "--concurrency", "1",
                  "--request-count", str(args.hop_requests), "--warmup-request-count", "2",
                  "--random-seed", str(args.seed)]
        sides = {"ingress": ["-m", model_name, "--endpoint-type", "completions", "-u",
                             args.ingress.removeprefix("http://"), "--extra-inputs", "temperature:0"],
                 "triton": ["-m", args.model, "--endpoint-type", "kserve", "--backend", "tensorrtllm",
                            "-u", args.grpc]}
        for side, extra in (sides.items() if i % 2 == 0 else reversed(list(sides.items()))):
            d = out / f"round{i}-{side}"
            d.mkdir(parents=True, exist_ok=True)
            _run([str(tools.genai_perf), "profile", *extra, *common, "--artifact-dir", str(d)], tools.env,
                 d / "genai-perf.log")
            stamps[side].append(_request_stamps(next(d.rglob("profile_export.json"))))
    result = {"rounds": args.hop_rounds, "requests_per_side": sum(map(len, stamps["ingress"])),
              **_side_by_side(stamps, lambda s: s[1] - s[0], "ttft_")}
    if args.request_log is not None:
        from orchestrator.ingress.request_log import read_request_log

        records = read_request_log(args.request_log)
        result.update(_side_by_side(stamps, lambda s: time_outside_ingress(s, records), "transport_"))
    return result


def _side_by_side(stamps: dict[str, list[list[Stamps]]], value, prefix: str) -> dict[str, float]:
    """Pooled medians of ``value`` per side (ms) and the median of the rounds' differences."""
    per_round = {side: [[value(s) * 1e3 for s in rnd] for rnd in rounds] for side, rounds in stamps.items()}
    pooled = {side: statistics.median(v for rnd in rounds for v in rnd) for side, rounds in per_round.items()}
    diffs = [statistics.median(t) - statistics.median(d) for d, t in zip(per_round["ingress"], per_round["triton"])]
    return {f"{prefix}ingress_p50_ms": pooled["ingress"], f"{prefix}triton_p50_ms": pooled["triton"],
            f"{prefix}round_diff_p50_ms": statistics.median(diffs)}


def _request_stamps(export: Path) -> list[Stamps]:
    """(sent, first response) of each request in a profile export, on ``time.monotonic``'s
    clock: perf_analyzer stamps with the wall clock, whose offset is taken right after the run."""
    offset = time.time() - time.monotonic()
    return [(r["timestamp"] / 1e9 - offset, r["response_timestamps"][0] / 1e9 - offset)
            for e in json.loads(export.read_text())["experiments"] for r in e["requests"] if r.get("response_timestamps")]


def _served_model(ingress: str) -> str:
    import urllib.request

    with urllib.request.urlopen(ingress + "/v1/models", timeout=10) as r:
        return json.loads(r.read())["data"][0]["id"]


def triton_hop(args: argparse.Namespace) -> HopResult:
    """Same prompt, one at a time, alternately direct and through Triton (ABBA order)."""
    return asyncio.run(_triton_hop(args))


def time_outside_ingress(stamps: Stamps, records: list[dict]) -> float:
    """A request's TTFT as its client saw it less the ingress's own TTFT for it (seconds):
    the way in and out. Its record is the one the ingress logged arriving inside its window."""
    sent, first = stamps
    record = one_inside(records, sent, first, key=lambda r: r["arrival"])
    if record["first_token"] is None:
        raise SystemExit(f"error: request {record['id']} has no first token in the request log ({record['finish_reason']})")
    return (first - sent) - (record["first_token"] - record["arrival"])


def one_inside(items: list, start, end, key):
    """The one item whose ``key`` falls in ``[start, end]``: a request's own record, when
    requests go one at a time (anything else is refused, naming the count)."""
    found = [item for item in items if start <= key(item) <= end]
    if len(found) != 1:
        raise SystemExit(f"error: {len(found)} records fall inside one request's window ({start}..{end}); "
                         "the hop's requests must go one at a time to a server serving nothing else")
    return found[0]


def transport_diffs(pairs: list[tuple[Stamps, Stamps]], records: list[dict]) -> list[float]:
    """Per pair, the time outside the ingress through Triton minus directly (seconds), sorted."""
    return sorted(time_outside_ingress(t, records) - time_outside_ingress(d, records) for d, t in pairs)


async def _triton_hop(args: argparse.Namespace) -> HopResult:
    """Both clients in one thread on one event loop (aiohttp; tritonclient's asyncio gRPC
    over one open stream), so neither side pays a thread hand-off the other does not."""
    pairs = await paired_requests(args.ingress, args.grpc, args.model, args.hop_pairs)
    direct = [first - sent for (sent, first), _ in pairs]
    through = [first - sent for _, (sent, first) in pairs]
    diffs = sorted(t - d for d, t in zip(direct, through))
    hop = HopResult(len(diffs), statistics.median(direct) * 1e3, statistics.median(through) * 1e3,
                    statistics.median(diffs) * 1e3, _p90(diffs) * 1e3)
    if args.request_log is not None:
        from orchestrator.ingress.request_log import read_request_log

        records = read_request_log(args.request_log)
        transport = transport_diffs(pairs, records)
        hop.transport_diff_p50_ms, hop.transport_diff_p90_ms = statistics.median(transport) * 1e3, _p90(transport) * 1e3
        hop.transport_ingress_p50_ms, hop.transport_triton_p50_ms = (
            statistics.median(time_outside_ingress(side, records) for side in sides) * 1e3 for sides in zip(*pairs))
    return hop


def _p90(sorted_values: list[float]) -> float:
    return sorted_values[int(0.9 * (len(sorted_values) - 1))]


Stamps = tuple[float, float]
"""A request's send time and its first token's arrival at the client (``time.monotonic``)."""


async def paired_requests(ingress: str, grpc: str, model: str, pairs: int) -> list[tuple[Stamps, Stamps]]:
    """``pairs`` prompts, each sent directly to the ingress and through Triton, one request
    at a time, alternating which goes first; (direct, through Triton) stamps per prompt,
    after ``HOP_WARMUP`` unmeasured pairs."""
    import aiohttp

    out = []
    async with aiohttp.ClientSession() as session, _TritonStream(grpc, model) as triton:
        for i in range(pairs + HOP_WARMUP):
            prompt = f"Request {i}: say something."
            pair = {}
            for side in (("ingress", "triton") if i % 2 == 0 else ("triton", "ingress")):
                if side == "ingress":
                    pair[side] = await _ingress_first(session, ingress, prompt)
                else:
                    pair[side] = await triton.first(prompt)
            if i >= HOP_WARMUP:
                out.append((pair["ingress"], pair["triton"]))
    return out


HOP_WARMUP = 5
"""Pairs sent before the measured ones (connections, caches)."""


async def _ingress_first(session, url: str, prompt: str) -> Stamps:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    sent = time.monotonic()
    async with session.post(url + "/v1/completions", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"token_ids": [' in line and b'"token_ids": []' not in line:
                first = time.monotonic()
                break
        await resp.read()
    return sent, first


class _TritonStream:
    """One gRPC stream to Triton (``tritonclient.grpc.aio``); ``first`` sends a request on it
    and returns when it was sent and when its first response came, once its final one is in."""

    def __init__(self, target: str, model: str) -> None:
        self.target, self.model = target, model
        self._requests: asyncio.Queue = asyncio.Queue()
        self._responses: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self) -> "_TritonStream":
        import tritonclient.grpc.aio as aio

        self._client = aio.InferenceServerClient(self.target)
        self._call = self._client.stream_infer(self._feed())
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self._requests.put(None)
        self._reader.cancel()
        self._call.cancel()
        await self._client.close()

    async def _feed(self):
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read(self) -> None:
        async for result, error in self._call:
            await self._responses.put((time.monotonic(), result, error))

    async def first(self, prompt: str) -> Stamps:
        import tritonclient.grpc as grpcclient

        from perf.triton_client import generate_inputs

        request = {"model_name": self.model, "enable_empty_final_response": True,
                   "inputs": generate_inputs(grpcclient, prompt, 2, True)}
        sent = time.monotonic()
        await self._requests.put(request)
        first = None
        while True:
            at, result, error = await asyncio.wait_for(self._responses.get(), 60)
            if error is not None:
                raise SystemExit(f"error: a Triton request failed: {error}")
            first = at if first is None else first
            if result.get_response().parameters["triton_final_response"].bool_param:
                return sent, first


# ----------------------------------------------------------------------------- deterministic output length

@dataclass
class LengthCheck:
    """One genai-perf run with ``--output-tokens-mean N --output-tokens-stddev 0`` (and,
    unless a control, ``--output-tokens-mean-deterministic``): each request's output tokens."""

    route: str
    tokens: int
    """N, the output length asked for."""
    requests: int
    """Requests genai-perf counted."""
    how: str
    """genai-perf's flags beyond the common ones: what asked for the length and what else."""
    deterministic: bool
    """Whether the run asked for exactly N (False: a control that only sets ``max_tokens``)."""
    server: list[int] | None
    """Each request's ``output_tokens`` in the server's request log (None without one)."""
    server_finish: list[str] | None
    genai_perf: dict[str, float]
    """genai-perf's ``output_sequence_length`` stats (it re-tokenizes the text it received)."""
    note: str | None = None

    @property
    def exact(self) -> bool:
        """Every request got exactly N tokens: by the server's log when there is one (every
        request genai-perf counted, finished by ``length``), else by genai-perf's counts."""
        if self.server is not None:
            return (len(self.server) == self.requests > 0 and all(n == self.tokens for n in self.server)
                    and all(f == "length" for f in self.server_finish or ()))
        return self.requests > 0 and self.genai_perf.get("min") == self.genai_perf.get("max") == self.tokens


GENAI_PERF_REFUSES_DETERMINISTIC = "deterministic is only supported with Triton"
"""genai-perf 0.0.16's refusal of ``--output-tokens-mean-deterministic`` for any service
kind but ``triton`` and ``tensorrtllm_engine`` (``ConfigCommand._check_output_tokens_and_service_kind``)."""


def deterministic_length(tools: Tools, args: argparse.Namespace, out: Path) -> list[LengthCheck]:
    """genai-perf asking for exactly N output tokens, through Triton (TensorRT-LLM backend:
    genai-perf adds ``min_length: [N]`` next to ``max_tokens: [N]``) and to the OpenAI
    completions endpoint (genai-perf 0.0.16 refuses the flag there, so ``min_tokens: N``,
    vLLM's field, goes with ``--extra-inputs``: what its vLLM converter adds). Each request's
    output tokens are read from the server's request log; genai-perf's own counts from its
    export.

    With ``--deterministic-stop-token`` (default a newline), each route runs twice more with
    that token ending generation (Triton's ``end_id``, OpenAI's ``stop_token_ids``): once
    asking for N, where the minimum must hold the stop token back, and once without, a
    control that must stop short, so that the check is seen to be able to fail."""
    n = args.deterministic_tokens
    common = ["--streaming", "--tokenizer", str(args.tokenizer),
              "--synthetic-input-tokens-mean", str(args.deterministic_input_tokens),
              "--synthetic-input-tokens-stddev", "0", "--output-tokens-mean", str(n), "--output-tokens-stddev", "0",
              "--concurrency", str(args.deterministic_concurrency),
              "--request-count", str(args.deterministic_requests), "--random-seed", str(args.seed)]
    routes = {"triton": ("Triton gRPC stream (kserve, tensorrtllm)",
                         ["-m", args.model, "--endpoint-type", "kserve", "--backend", "tensorrtllm", "-u", args.grpc]),
              "http": ("OpenAI /v1/completions (streamed)",
                       ["-m", _served_model(args.ingress), "--endpoint-type", "completions",
                        "-u", args.ingress.removeprefix("http://")])}
    variants: list[tuple[str, bool, int | None]] = [("", True, None)]
    if args.deterministic_stop_token:
        stop = _one_token(args.tokenizer, args.deterministic_stop_token)
        variants += [("-stop", True, stop), ("-stop-control", False, stop)]
    checks = []
    for route, (label, extra) in routes.items():
        for suffix, deterministic, stop in variants:
            stop_inputs = [] if stop is None else (
                ["--extra-inputs", f"end_id:{stop}"] if route == "triton"
                else ["--extra-inputs", json.dumps({"stop_token_ids": [stop]}, separators=(",", ":"))])
            checks.append(_length_run(tools, out / f"{route}{suffix}", route, label, n,
                                      [str(tools.genai_perf), "profile", *extra, *common], stop_inputs,
                                      deterministic, args.request_log))
    return checks


def _one_token(tokenizer_dir: Path, text: str) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tokenizer_dir)).encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise SystemExit(f"error: --deterministic-stop-token {text!r} is {len(ids)} tokens, not one")
    return ids[0]


def _length_run(tools: Tools, d: Path, route: str, label: str, n: int, cmd: list[str], inputs: list[str],
                deterministic: bool, request_log: Path | None) -> LengthCheck:
    """One genai-perf run; the request log's records are those that arrived while it ran."""
    d.mkdir(parents=True, exist_ok=True)
    log = d / "genai-perf.log"
    asks = ["--output-tokens-mean-deterministic"] if deterministic else []
    note = None
    start = time.monotonic()
    status = _run_status([*cmd, *inputs, *asks, "--artifact-dir", str(d)], tools.env, log)
    if status != 0 and deterministic and GENAI_PERF_REFUSES_DETERMINISTIC in log.read_text(errors="replace"):
        log.rename(d / "genai-perf-refused.log")
        note = ("genai-perf refuses --output-tokens-mean-deterministic for the openai service kind "
                "(genai-perf-refused.log), so min_tokens goes with --extra-inputs")
        asks = ["--extra-inputs", f"min_tokens:{n}"]
        start = time.monotonic()
        status = _run_status([*cmd, *inputs, *asks, "--artifact-dir", str(d)], tools.env, log)
    if status != 0:
        raise SystemExit(f"error: genai-perf failed with status {status}; see {log}")
    end = time.monotonic()
    stats = json.loads(next(d.rglob("profile_export_genai_perf.json")).read_text())
    server = finish = None
    if request_log is not None:
        from orchestrator.ingress.request_log import read_request_log

        records = [r for r in read_request_log(request_log) if r["route"] == route and start <= r["arrival"] <= end]
        server, finish = [r["output_tokens"] for r in records], [r["finish_reason"] for r in records]
    return LengthCheck(label, n, int(stats["request_count"]["avg"]), " ".join([*asks, *inputs]) or "(max_tokens only)",
                       deterministic, server, finish,
                       {k: stats["output_sequence_length"][k] for k in ("min", "p50", "max", "avg")}, note)


def length_table(checks: list[LengthCheck]) -> list[str]:
    """The markdown table of the runs; a control's last column says whether it stopped short."""
    def mmm(values) -> str:
        return f"{min(values):g} / {statistics.median(values):g} / {max(values):g}" if values else "n/a"

    lines = ["| route | genai-perf adds | requests | server log: records; min / median / max output tokens | "
             "genai-perf (re-tokenized): min / median / max | exactly N (server log) |",
             "|---|---|---:|---|---|---|"]
    for c in checks:
        g = c.genai_perf
        server = "n/a" if c.server is None else f"{len(c.server)}; {mmm(c.server)}"
        hits = "" if c.server is None else f"{sum(t == c.tokens for t in c.server)} of {len(c.server)}, "
        verdict = hits + ("all: " + ("yes" if c.exact else "no")) + ("" if c.deterministic else " (control: no expected)")
        lines.append(f"| {c.route} | `{c.how}` | {c.requests} | {server} | "
                     f"{g['min']:g} / {g['p50']:g} / {g['max']:g} | {verdict} |")
    return lines


def lengths_failed(checks: list[LengthCheck]) -> list[str]:
    """What went wrong: a run asking for N that did not get it everywhere, or a control that did."""
    return [f"{c.route} with `{c.how}`: " + ("not every request got exactly N output tokens" if c.deterministic else
                                              "the control got N everywhere, so the check could not have failed")
            for c in checks if c.exact != c.deterministic]


# ----------------------------------------------------------------------------- report

def summary_markdown(points: list[LoadResult], hop: HopResult | None, settings: dict,
                     lengths: list[LengthCheck] | None = None) -> str:
    lines = [f"Settings: {', '.join(f'{k}={v}' for k, v in settings.items())}"]
    if points:
        lines += ["", "| load | requests | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) | output tok/s | req/s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        lines.append(f"| {p.load} | {p.requests} | {p.ttft_p50_ms:.1f} | {p.ttft_p99_ms:.1f} | {p.itl_p50_ms:.1f} | "
                     f"{p.itl_p99_ms:.1f} | {p.output_tok_s:.1f} | {p.request_s:.2f} |")
    if hop is not None:
        lines += ["", f"Triton hop, Python asyncio clients ({hop.pairs} paired requests, one at a time): TTFT p50 direct "
                      f"{hop.ingress_ttft_p50_ms:.2f} ms, through Triton {hop.triton_ttft_p50_ms:.2f} ms; "
                      f"paired difference p50 {hop.paired_diff_p50_ms:.2f} ms, p90 {hop.paired_diff_p90_ms:.2f} ms"]
        if hop.transport_diff_p50_ms is not None:
            lines += ["", f"Triton hop without the model's time (each TTFT less the ingress's own, from its request "
                          f"log), same pairs: outside the ingress p50 direct {hop.transport_ingress_p50_ms:.2f} ms, "
                          f"through Triton {hop.transport_triton_p50_ms:.2f} ms; paired difference "
                          f"p50 {hop.transport_diff_p50_ms:.2f} ms, p90 {hop.transport_diff_p90_ms:.2f} ms"]
        pa = hop.perf_analyzer
        if pa:
            lines += ["", f"Triton hop, perf_analyzer both ways ({pa['rounds']} alternating rounds, "
                          f"{pa['requests_per_side']} requests a side): TTFT p50 direct {pa['ttft_ingress_p50_ms']:.2f} ms, "
                          f"through Triton {pa['ttft_triton_p50_ms']:.2f} ms; median of the rounds' differences "
                          f"{pa['ttft_round_diff_p50_ms']:.2f} ms"]
            if "transport_round_diff_p50_ms" in pa:
                lines += ["", f"Triton hop without the model's time, perf_analyzer, same rounds: TTFT less the "
                              f"ingress's own p50 direct {pa['transport_ingress_p50_ms']:.2f} ms, through Triton "
                              f"{pa['transport_triton_p50_ms']:.2f} ms; median of the rounds' differences "
                              f"{pa['transport_round_diff_p50_ms']:.2f} ms"]
    if lengths:
        lines += ["", f"Deterministic output length (genai-perf `--output-tokens-mean {lengths[0].tokens} "
                      "--output-tokens-stddev 0` and what each row adds):", "", *length_table(lengths)]
        lines += [f"\n{note}." for note in dict.fromkeys(f"{c.route}: {c.note}" for c in lengths if c.note)]
        lines += [f"\nFAILED: {why}" for why in lengths_failed(lengths)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m perf.triton_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for raw outputs and the summary")
    p.add_argument("--engine-dir", type=Path, default=REPO_ROOT / "stores" / "smollm2", help="store to serve")
    p.add_argument("--ranks", type=int, default=2, help="ranks of the cluster started here (default: 2)")
    p.add_argument("--device-memory", default="1GiB", help="per-rank memory (default: 1GiB)")
    p.add_argument("--attach", action="store_true",
                   help="use a cluster already serving: Triton on --grpc, ingress on --ingress")
    p.add_argument("--grpc", default="localhost:8001", help="Triton gRPC endpoint with --attach")
    p.add_argument("--ingress", default="http://localhost:8080", help="ingress URL with --attach")
    p.add_argument("--model", default="kunserve", help="served model name (default: kunserve)")
    p.add_argument("--tools-venv", type=Path, default=REPO_ROOT / ".venv-triton-tools",
                   help="environment for genai-perf and perf_analyzer (created on first use)")
    p.add_argument("--concurrency", default="1,2,4,8", help="genai-perf concurrency sweep (default: 1,2,4,8)")
    p.add_argument("--input-tokens", type=int, default=128, help="prompt tokens (default: 128)")
    p.add_argument("--output-tokens", type=int, default=32, help="output tokens (default: 32)")
    p.add_argument("--num-prompts", type=int, default=50, help="distinct prompts / trace requests (default: 50)")
    p.add_argument("--measurement-ms", type=int, default=10000, help="genai-perf measurement window (ms)")
    p.add_argument("--trace", type=Path, default=DEFAULT_TRACE, help="trace for the request-intervals run")
    p.add_argument("--trace-requests", type=int, default=60,
                   help="requests of the trace replayed, from its busiest minute on (default: 60)")
    p.add_argument("--trace-rate", type=float, default=1.0,
                   help="mean request rate the trace window is scaled to (req/s, default: 1)")
    p.add_argument("--hop-pairs", type=int, default=200, help="paired requests for the hop measurement")
    p.add_argument("--hop-rounds", type=int, default=6,
                   help="alternating perf_analyzer rounds for the hop, each side (default: 6; 0 skips)")
    p.add_argument("--hop-requests", type=int, default=40, help="requests per side and round (default: 40)")
    p.add_argument("--hop-only", action="store_true", help="measure only the Triton hop (the same as --only hop)")
    p.add_argument("--only", default=",".join(STEPS),
                   help=f"the steps to run, comma-separated, of {','.join(STEPS)} (default: all): load is the "
                        "genai-perf sweep and the perf_analyzer trace replay, hop the Triton hop, deterministic "
                        "the exact-output-length check")
    p.add_argument("--deterministic-tokens", type=int, default=24,
                   help="output tokens asked for (and checked) in the deterministic step (default: 24)")
    p.add_argument("--deterministic-requests", type=int, default=24, help="requests per route (default: 24)")
    p.add_argument("--deterministic-concurrency", type=int, default=2, help="concurrency (default: 2)")
    p.add_argument("--deterministic-input-tokens", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--deterministic-stop-token", default="\n",
                   help="a one-token text that also ends generation in two more runs a route, one asking for N "
                        "(the minimum must hold it back) and a control without (it must stop short); "
                        "'' skips them (default: a newline)")
    p.add_argument("--request-log", type=Path, default=None,
                   help="the cluster's --request-log, read to take the model's time out of the hop "
                        "(default: the cluster this script starts writes OUT/requests.jsonl; none with --attach)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.only = {"hop"} if args.hop_only else {s.strip() for s in args.only.split(",") if s.strip()}
    if unknown := args.only - set(STEPS):
        p.error(f"--only: unknown step(s) {', '.join(sorted(unknown))} (of {', '.join(STEPS)})")
    return args


STEPS = ("load", "hop", "deterministic")


def _load_points(tools: Tools, args: argparse.Namespace) -> list[LoadResult]:
    points = [genai_perf_point(tools, args, c, args.out / "genai-perf" / f"concurrency{c}") for c in args.concurrency]
    inputs = next((args.out / "genai-perf").rglob("inputs.json"))
    points.append(perf_analyzer_intervals(tools, args, inputs, args.out / "perf_analyzer-trace"))
    return points


def run(args: argparse.Namespace) -> int:
    from engines.store import EngineStore

    args.out = args.out.resolve()  # the tools run with their own working directories
    args.trace = args.trace.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.tokenizer = EngineStore(args.engine_dir).tokenizer_dir.resolve()
    tools = install_tools(args.tools_venv)
    cluster = None
    if not args.attach:
        from perf.triton_client import TritonCluster

        args.request_log = args.out / "requests.jsonl"
        args.request_log.unlink(missing_ok=True)
        cluster = TritonCluster(args.ranks, args.engine_dir, "--request-log", str(args.request_log),
                                device_memory=args.device_memory, model_names="kunserve")
        print(f"starting the cluster ({args.ranks} ranks) behind Triton ...", flush=True)
        cluster.start()
        args.grpc, args.ingress = cluster.grpc_target, cluster.url
    hop, lengths = None, []
    try:
        points = _load_points(tools, args) if "load" in args.only else []
        if "hop" in args.only:
            hop = triton_hop(args)
            if args.hop_rounds:
                hop.perf_analyzer = triton_hop_perf_analyzer(tools, args, args.out / "hop-perf_analyzer")
        if "deterministic" in args.only:
            lengths = deterministic_length(tools, args, args.out / "deterministic")
    finally:
        if cluster is not None:
            cluster.stop()
    settings = {"store": args.engine_dir.name, "ranks": args.ranks, "steps": ",".join(s for s in STEPS if s in args.only)}
    if "load" in args.only:
        settings.update(input_tokens=args.input_tokens, output_tokens=args.output_tokens, trace=args.trace.name)
    if lengths:
        settings.update(deterministic_tokens=args.deterministic_tokens, deterministic_requests=args.deterministic_requests,
                        deterministic_concurrency=args.deterministic_concurrency,
                        deterministic_input_tokens=args.deterministic_input_tokens,
                        deterministic_stop_token=repr(args.deterministic_stop_token))
    md = summary_markdown(points, hop, settings, lengths)
    (args.out / "summary.md").write_text(md)
    (args.out / "summary.json").write_text(json.dumps(
        {"settings": settings, "points": [asdict(p) for p in points], "triton_hop": hop and asdict(hop),
         "deterministic_length": [dict(asdict(c), exact=c.exact) for c in lengths],
         "deterministic_failed": lengths_failed(lengths)}, indent=2))
    print(md)
    if failed := lengths_failed(lengths):
        print("error: the deterministic-length check failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
