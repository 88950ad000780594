"""GPU cluster presets for the simulator: which GPUs, how many, which model as which
instance shape, and which request stream (a ``perf.bench`` preset's trace and transforms).

Nothing here has run on these clusters: the presets are what ``python -m perf.sim`` models
with the GPU profiles and roofline step model of ``perf.sim.gpu`` and the links of
``perf.sim.fabric``. The serving options follow what TensorRT-LLM and vLLM users run at
this scale (a token budget of 8,192 per step, up to 256 sequences per replica).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from orchestrator.core.scheduler import SchedulerConfig
from orchestrator.policy.bundles import get_policy
from perf.bench_presets import BenchPreset
from perf.sim.clock import EventLoop
from perf.sim.fabric import GpuCluster
from perf.sim.gpu import GPUS, GpuProfile, RooflineCost, load_model
from perf.sim.instance import SimContext
from perf.sim.links import Network
from perf.sim.memory import MemoryLayout

PAGE_SIZE = 32
"""Tokens per KV page (TensorRT-LLM's default ``tokens_per_block`` is 32 in its recent releases)."""
DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@dataclass(frozen=True)
class GpuSimPreset:
    name: str
    description: str
    gpu: str
    """A key of ``perf.sim.gpu.GPUS``."""
    gpus: int
    model: str
    """A file of ``perf/sim/models`` (or a config.json path)."""
    tp: int
    stream: BenchPreset
    """The request stream: its trace, window and transforms, and its SLOs."""
    splits: tuple[int, ...] = (1, 2, 4)
    weight_dtype: str = "bf16"
    kv_dtype: str = "bf16"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    """None: the model's context."""
    swap_space_bytes: int = 64 << 30
    """Host memory for swapped KV per replica (the swap policy)."""
    gpus_per_node: int | None = None
    """None: the GPU's node (8 for H100 and H200 SXM)."""

    @property
    def profile(self) -> GpuProfile:
        return GPUS[self.gpu]

    @property
    def ranks(self) -> int:
        """Instances of ``tp`` GPUs (the cluster's ranks)."""
        if self.gpus % self.tp:
            raise ValueError(f"{self.name}: tp {self.tp} does not divide {self.gpus} GPUs")
        return self.gpus // self.tp

    def context(self, policy: str, cost: RooflineCost | None = None) -> SimContext:
        m = load_model(self.model)
        prof = self.profile
        layout = MemoryLayout.for_model(m, DTYPES[self.weight_dtype], prof.hbm_bytes, PAGE_SIZE, self.splits, self.tp)
        if self.kv_dtype != self.weight_dtype:
            kv = MemoryLayout.for_model(m, DTYPES[self.kv_dtype], prof.hbm_bytes, PAGE_SIZE, self.splits, self.tp)
            layout = dataclasses.replace(layout, page_bytes=kv.page_bytes)
        bundle = get_policy(policy)
        sched = SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, preemption_mode=bundle.preemption,
                                swap_space_bytes=self.swap_space_bytes)
        cost = cost or RooflineCost(prof, m, self.tp, self.weight_dtype, 1 if self.kv_dtype == "fp8" else 2)
        clock = EventLoop()
        node = prof.node if self.gpus_per_node is None else dataclasses.replace(prof.node, gpus_per_node=self.gpus_per_node)
        return SimContext(clock, Network(clock), GpuCluster(node, self.ranks, self.tp), cost, layout, sched,
                          self.max_model_len or m.max_position_embeddings, m.hidden_size * 2 * self.tp,
                          swap_space_bytes=self.swap_space_bytes if bundle.preemption == "swap" else None)


def _stream(name: str, trace: str, window_s: float | None, upscale: float, slo_ttft_s: float,
            slo_tpot_s: float, **kw) -> BenchPreset:
    return BenchPreset(name=name, trace=trace, window_s=window_s, upscale=upscale, ranks=1, store="-",
                       device="cuda", slo_ttft_s=slo_ttft_s, slo_tpot_s=slo_tpot_s, **kw)


CODE = "../shared/traces/AzureLLMInferenceTrace_code.csv"
CONV = "../shared/traces/AzureLLMInferenceTrace_conv.csv"

GPU_PRESETS: dict[str, GpuSimPreset] = {p.name: p for p in (
    GpuSimPreset(
        "sim-8xh100-70b", "8 x H100 SXM (one node), Llama-3-70B bf16 as four TP2 replicas (8.6 GB of KV "
        "per GPU); the busiest 5 minutes of the Azure conversation trace at its own rate, outputs 3x as "
        "recorded (long answers hold KV: the replicas' KV overloads while compute is about half used)",
        "h100", 8, "llama-3-70b", 2,
        _stream("sim-8xh100-70b", CONV, 300.0, 1.0, 5.0, 0.2, output_scale=3.0)),
    GpuSimPreset(
        "sim-8xh100-8b", "8 x H100 SXM (one node), Llama-3-8B bf16 as eight replicas (weights a fifth of "
        "memory: dropping half of them adds a tenth to the KV); the busiest 5 minutes of the Azure "
        "conversation trace at 8x its rate, outputs 3x as recorded: where KunServe has little to give "
        "(the KV never fills)",
        "h100", 8, "llama-3-8b", 1,
        _stream("sim-8xh100-8b", CONV, 300.0, 8.0, 5.0, 0.2, output_scale=3.0)),
    GpuSimPreset(
        "sim-64xh100-70b", "64 x H100 SXM (8 nodes), Llama-3-70B bf16 as 32 TP2 replicas; the busiest 5 "
        "minutes of the Azure conversation trace at 8x its rate, outputs 3x: sim-8xh100-70b's load per "
        "replica on 8 times the cluster (the KV overloads)",
        "h100", 64, "llama-3-70b", 2,
        _stream("sim-64xh100-70b", CONV, 300.0, 8.0, 5.0, 0.2, output_scale=3.0)),
    GpuSimPreset(
        "sim-64xh200-70b", "64 x H200 SXM (8 nodes), Llama-3-70B bf16 as 32 TP2 replicas; one hour of the Azure "
        "conversation trace at 8x its rate",
        "h200", 64, "llama-3-70b", 2,
        _stream("sim-64xh200-70b", CONV, 3600.0, 8.0, 5.0, 0.2)),
    GpuSimPreset(
        "sim-1024xh100-8b", "1,024 x H100 SXM (128 nodes), Llama-3-8B bf16 as 1,024 replicas (weights a fifth "
        "of memory); 10 minutes of the Azure conversation trace at 150x its rate",
        "h100", 1024, "llama-3-8b", 1,
        _stream("sim-1024xh100-8b", CONV, 600.0, 150.0, 5.0, 0.2)),
    GpuSimPreset(
        "sim-1024xh100-70b", "1,024 x H100 SXM (128 nodes), Llama-3-70B bf16 as 512 TP2 replicas; 10 minutes of "
        "the Azure conversation trace at 40x its rate",
        "h100", 1024, "llama-3-70b", 2,
        _stream("sim-1024xh100-70b", CONV, 600.0, 40.0, 5.0, 0.2)),
)}
