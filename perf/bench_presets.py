"""Settings of a serving benchmark run (:class:`BenchPreset`) and the named presets.

``python -m perf.bench --preset cpu --out DIR`` replays :data:`PRESETS` ``["cpu"]``; any
explicit flag replaces the matching field (see ``perf/bench.py``). Every number of a run
is a field here, so a run's settings are the preset plus its overrides, written to
``summary.json``.

Relative ``trace`` and ``store`` paths in a preset are relative to the repository root
(the traces live in ``shared/`` beside the checkout: ``../shared/traces/...``).

Rank limits (:func:`validate_preset`): at most :data:`MAX_RANKS` ranks in any case; on the
CPU at most :data:`CPU_OVERSUBSCRIPTION` ranks per core (``os.cpu_count()``), since every
rank is a process with its own copy of the weights and more than that only measures the
OS scheduler; on CUDA at most one rank per visible GPU (each rank takes one).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

from perf.mpi_launch import REPO_ROOT

ALL_POLICIES = ("kunserve", "vllm", "swap", "llumnix", "oracle")
"""The policies of the paper's comparison; a run may name any that ``serve --policy`` knows."""
MAX_RANKS = 64
CPU_OVERSUBSCRIPTION = 4
TRACE_FORMATS = ("auto", "azure", "burstgpt", "mooncake")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class BenchPreset:
    """Everything that decides what a benchmark run replays and against what cluster."""

    name: str = "custom"
    description: str = ""
    # The request stream: trace -> window -> repeat -> time scale -> upscale -> lengths -> limit.
    trace: str = ""
    """Trace file (Azure, BurstGPT or Mooncake); relative to the repository root."""
    trace_format: str = "auto"
    window_s: float | None = None
    """Replay the busiest ``window_s`` seconds of the trace; None or 0: the whole trace."""
    window_start_s: float | None = None
    window_end_s: float | None = None
    """An explicit window ``[start, end)`` (seconds from the trace start); wins over ``window_s``."""
    repeat: int = 1
    """Play the selected window this many times back to back."""
    time_scale: float = 1.0
    """Divide inter-arrival gaps by this: 2 replays twice as fast."""
    upscale: float = 1.0
    """About this many times the requests at the same arrival pattern (< 1 samples)."""
    input_scale: float = 1.0
    output_scale: float = 1.0
    max_input: int | None = None
    max_output: int | None = None
    context_len: int | None = None
    """Prompt + output tokens at most this (the prompt is cut first)."""
    limit: int | None = None
    """Keep only the first ``limit`` requests (smoke runs)."""
    seed: int = 0
    """Seeds the upscale sampling and the prompt texts: the same seed, the same stream."""
    # The cluster.
    ranks: int = 4
    store: str = "stores/smollm2"
    device: str = "auto"
    """``serve --device``: auto, cpu or cuda."""
    device_memory: str = "768MiB"
    """``serve --device-memory``: memory per rank for weights + KV."""
    serve_args: tuple[str, ...] = ()
    """Further ``serve`` options, the same for every policy (only ``--policy`` differs)."""
    policies: tuple[str, ...] = ALL_POLICIES
    # Measuring.
    slo_ttft_s: float = 5.0
    slo_tpot_s: float = 0.25
    drain_timeout_s: float = 120.0
    """After the last request is sent, how long to wait for the answers still due."""
    start_timeout_s: float = 180.0
    """How long a cluster may take to start (Triton's models ready)."""
    sample_interval_s: float = 1.0
    """How often ``/admin/state`` is sampled during a replay."""

    def trace_path(self) -> Path:
        return resolve_path(self.trace)

    def store_path(self) -> Path:
        return resolve_path(self.store)

    def to_json(self) -> dict:
        """The fields as JSON-ready values (tuples as lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


def resolve_path(path: str | Path) -> Path:
    """``path`` itself when absolute, else relative to the repository root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


CPU = BenchPreset(
    name="cpu",
    description="SmolLM2-135M (fp32, 513 MiB of weights per rank) on 4 CPU ranks of 560 MiB each, so the "
                "weights take most of a rank's memory, as on a GPU serving a large model, and each "
                "replica's KV holds about 430 tokens. It replays the busiest minute of the Azure code "
                "trace, thinned to 1 request in 10 (its bursts keep their shape), with prompts scaled to "
                "1/10 (clipped at 256 tokens) and outputs scaled 4x (clipped at 128) so that requests "
                "hold their KV for seconds: the replicas' KV overloads during the bursts. About 13 min "
                "for all five policies on a 2-core host.",
    trace="../shared/traces/AzureLLMInferenceTrace_code.csv",
    window_s=60.0,
    time_scale=1.0,
    upscale=0.1,            # ~80 of the busiest minute's 723 requests
    input_scale=0.1,        # mean prompt ~2,000 -> ~140 tokens after the clip
    max_input=256,
    output_scale=4.0,       # the code trace's outputs are short (median 13 tokens)
    max_output=128,
    context_len=None,
    ranks=4,
    store="stores/smollm2",
    device="cpu",
    device_memory="560MiB",
    serve_args=("--max-num-seqs", "16", "--max-queued-requests", "10000"),
    slo_ttft_s=5.0,
    slo_tpot_s=0.5,
    drain_timeout_s=240.0,
    start_timeout_s=180.0,
)

CPU_CHAT = dataclasses.replace(
    CPU,
    name="cpu-chat",
    description="The cpu preset's cluster on a multi-turn chat stream that shares prefixes: "
                "perf/traces/data/chat_bursty.jsonl (python -m perf.traces.write_chat), 23 sessions over one "
                "system prompt, 3 turns each, each turn's prompt the previous one's plus a block, a 4x burst "
                "of new sessions in seconds 20-35; Mooncake blocks scaled to 26 tokens (prompts of "
                "128-180 tokens), outputs 2x. Prefix caching is on for every policy (the default).",
    trace="perf/traces/data/chat_bursty.jsonl",
    window_s=None,
    upscale=1.0,
    input_scale=0.05,
    output_scale=2.0,
)

CPU_TP = dataclasses.replace(
    CPU,
    name="cpu-tp",
    description="The cpu preset's stream on two TP2 instances over 4 CPU ranks: a Llama-shaped model "
                "with random weights (hidden 1024, 12 layers, 16 heads, 4 KV heads, MLP 3072, fp32; `make "
                "stores/cpu-tp/config.json`), 278 MiB of weights per rank (its half of every layer) in "
                "300 MiB, so the weights take 93% of a rank's memory and each instance's KV holds about "
                "590 tokens. kunserve fuses the two into one TP2 x PP2 group, freeing half of every "
                "rank's layers (+12,000 tokens of KV). The weights being random, the texts mean nothing; "
                "the timings do.",
    store="stores/cpu-tp",
    device_memory="300MiB",
    serve_args=("--tp", "2", "--max-num-seqs", "16", "--max-queued-requests", "10000"),
    policies=("kunserve", "vllm", "oracle"),
)

GPU = BenchPreset(
    name="gpu",
    description="UNTESTED here (no multi-GPU host): 8 CUDA ranks, one per GPU, each serving an "
                "8B-class Llama store built with `python -m build_scripts.build_engines --source "
                "HF_DIR --splits 1,2,4,8 --dtype bfloat16 --out stores/llama3-8b`, replaying the busiest "
                "5 min of the Azure code trace at full token lengths (8K context).",
    trace="../shared/traces/AzureLLMInferenceTrace_code.csv",
    window_s=300.0,
    ranks=8,
    store="stores/llama3-8b",
    device="cuda",
    device_memory="64GiB",
    context_len=8192,
    serve_args=("--max-num-seqs", "256", "--max-num-batched-tokens", "8192", "--max-queued-requests", "100000"),
    slo_ttft_s=2.0,
    slo_tpot_s=0.1,
    drain_timeout_s=600.0,
    start_timeout_s=600.0,
)

PRESETS: dict[str, BenchPreset] = {p.name: p for p in (CPU, CPU_CHAT, CPU_TP, GPU)}


def _positive(name: str, value: float | None) -> list[str]:
    return [] if value is None or value > 0 else [f"{name} must be > 0, got {value}"]


def _at_least(name: str, value: int | None, least: int) -> list[str]:
    return [] if value is None or value >= least else [f"{name} must be >= {least}, got {value}"]


def _device_is_cuda(device: str) -> bool:
    if device == "auto":
        import torch
        return torch.cuda.is_available()
    return device.startswith("cuda")


def rank_limit(device: str, cpu_count: int | None = None, cuda_devices: int | None = None) -> tuple[int, str]:
    """The most ranks allowed on ``device`` here, and why (for the error message)."""
    if _device_is_cuda(device):
        if cuda_devices is None:
            import torch
            cuda_devices = torch.cuda.device_count()
        if cuda_devices < MAX_RANKS:
            return cuda_devices, f"each CUDA rank takes one GPU and {cuda_devices} are visible"
        return MAX_RANKS, f"the benchmark runs at most {MAX_RANKS} ranks"
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    if cores * CPU_OVERSUBSCRIPTION < MAX_RANKS:
        return cores * CPU_OVERSUBSCRIPTION, (f"on the CPU at most {CPU_OVERSUBSCRIPTION} ranks per core run "
                                              f"and this host has {cores} cores")
    return MAX_RANKS, f"the benchmark runs at most {MAX_RANKS} ranks"


def _check_window(p: BenchPreset) -> list[str]:
    start, end = p.window_start_s, p.window_end_s
    if (start is None) != (end is None):
        return ["an explicit window needs both window_start_s and window_end_s"]
    if start is not None and not 0 <= start < end:
        return [f"the window needs 0 <= start < end, got [{start}, {end})"]
    return [] if p.window_s is None or p.window_s >= 0 else [f"window_s must be >= 0, got {p.window_s}"]


def _check_lengths(p: BenchPreset) -> list[str]:
    return (_positive("input_scale", p.input_scale) + _positive("output_scale", p.output_scale)
            + _at_least("max_input", p.max_input, 1) + _at_least("max_output", p.max_output, 1)
            + _at_least("context_len", p.context_len, 2) + _at_least("limit", p.limit, 1))


def _check_measuring(p: BenchPreset) -> list[str]:
    from orchestrator.core.config import parse_bytes

    errors = [e for name in ("slo_ttft_s", "slo_tpot_s", "drain_timeout_s", "start_timeout_s",
                             "sample_interval_s") for e in _positive(name, getattr(p, name))]
    try:
        parse_bytes(p.device_memory)
    except ValueError as exc:
        errors.append(f"device_memory: {exc}")
    return errors


def _check_policies(p: BenchPreset) -> list[str]:
    if not p.policies:
        return ["no policies to run"]
    dupes = sorted({x for x in p.policies if p.policies.count(x) > 1})
    return [f"policies named twice: {', '.join(dupes)}"] if dupes else []


def _check_ranks(p: BenchPreset, cpu_count: int | None, cuda_devices: int | None) -> list[str]:
    if p.ranks < 1:
        return [f"ranks must be >= 1, got {p.ranks}"]
    if p.ranks > MAX_RANKS:
        return [f"{p.ranks} ranks asked for, but the benchmark runs at most {MAX_RANKS}"]
    limit, why = rank_limit(p.device, cpu_count, cuda_devices)
    if p.ranks > limit:
        return [f"{p.ranks} ranks asked for on device {p.device!r}, but at most {limit} are allowed: {why}"]
    return []


def validate_preset(p: BenchPreset, cpu_count: int | None = None, cuda_devices: int | None = None) -> None:
    """Raise ValueError naming every problem of ``p`` (one per line).

    ``cpu_count`` / ``cuda_devices`` stand in for this host's (tests); files are checked to
    exist, except that an empty ``trace`` is its own error.
    """
    errors = []
    if p.device not in DEVICES and not p.device.startswith("cuda:"):
        errors.append(f"device must be one of {', '.join(DEVICES)}, got {p.device!r}")
    else:
        errors += _check_ranks(p, cpu_count, cuda_devices)
    if p.trace_format not in TRACE_FORMATS:
        errors.append(f"trace_format must be one of {', '.join(TRACE_FORMATS)}, got {p.trace_format!r}")
    errors += _check_window(p) + _check_lengths(p) + _check_measuring(p) + _check_policies(p)
    errors += _at_least("repeat", p.repeat, 1) + _positive("time_scale", p.time_scale)
    errors += _positive("upscale", p.upscale)
    errors += _check_files(p)
    if errors:
        raise ValueError("\n".join(errors))


def _check_files(p: BenchPreset) -> list[str]:
    errors = []
    if not p.trace:
        errors.append("no trace: give --trace FILE or a --preset")
    elif not p.trace_path().is_file():
        errors.append(f"trace file {p.trace_path()} does not exist")
    if not (p.store_path() / "config.json").is_file():
        errors.append(f"engine store {p.store_path()} does not exist (no config.json); "
                      f"build it with python -m build_scripts.build_engines")
    return errors


__all__ = ["ALL_POLICIES", "BenchPreset", "CPU", "CPU_OVERSUBSCRIPTION", "GPU", "MAX_RANKS", "PRESETS",
           "rank_limit", "resolve_path", "validate_preset"]


if __name__ == "__main__":  # python -m perf.bench_presets: every preset's fields
    import json

    print(json.dumps({name: p.to_json() for name, p in PRESETS.items()}, indent=2))
