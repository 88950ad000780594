"""GPU profiles from published figures, and a roofline step model over them.

A step of one stage (``layers`` decoder layers of one TP set) costs

    overhead
    + per layer:  max(GEMM FLOPs / (peak x compute_eff), weight bytes / (HBM x memory_eff))
                + max(attention FLOPs / (peak x compute_eff), KV bytes read / (HBM x memory_eff))
                + 2 all-reduces of the step's activations over NVLink (tp > 1: ring, 2(t-1)/t of the bytes)
    + the LM head's share (a stage of k of L layers carries k/L of it)

so prefill is compute-bound (GEMMs over many tokens), decode memory-bound (the weights and
every sequence's KV read once per step). Activations between pipeline stages are the
fabric's (``perf.sim.fabric``), not this model's. The two efficiency factors are fitted by
``python -m perf.sim.calibrate`` against TensorRT-LLM's published throughput of Llama-3.1-8B
on one H100 (``CALIBRATION``); the fitted values are the defaults below. Every constant
names its source.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engines.config import ModelConfig, parse_dtype
from engines.tensor_parallel import shard_config
from engines.weights import LayerWeights
from orchestrator.kunserve.cost_model import attention_work
from perf.sim.fabric import GpuNodeSpec

MODELS_DIR = Path(__file__).parent / "models"
"""Hugging Face ``config.json`` files of the models the GPU presets serve."""

GB = 1e9
TFLOPS = 1e12


@dataclass(frozen=True)
class GpuProfile:
    name: str
    hbm_bytes: int
    hbm_bandwidth: float
    """Bytes/s."""
    bf16_flops: float
    """Dense (no sparsity) FLOP/s."""
    fp8_flops: float
    node: GpuNodeSpec
    source: str

    def peak_flops(self, dtype: str) -> float:
        return self.fp8_flops if dtype == "fp8" else self.bf16_flops


MiB = 2**20

H100_SXM = GpuProfile(
    "H100 SXM 80GB", 81559 * MiB, 3.35e12, 989 * TFLOPS, 1979 * TFLOPS, GpuNodeSpec(),
    "NVIDIA H100 Tensor Core GPU datasheet: 80 GB HBM3 at 3.35 TB/s; BF16 1,979 and FP8 3,958 "
    "TFLOPS with sparsity, half that dense; NVLink 900 GB/s; PCIe Gen5 128 GB/s. Memory as "
    "nvidia-smi reports it on an H100 SXM: 81,559 MiB")
H200_SXM = GpuProfile(
    "H200 SXM 141GB", 143771 * MiB, 4.8e12, 989 * TFLOPS, 1979 * TFLOPS, GpuNodeSpec(),
    "NVIDIA H200 Tensor Core GPU datasheet: 141 GB HBM3e at 4.8 TB/s; the H100's compute "
    "(BF16 989, FP8 1,979 dense TFLOPS); NVLink 900 GB/s; PCIe Gen5 128 GB/s. Memory as "
    "nvidia-smi reports it on an H200 SXM: 143,771 MiB")
GPUS = {"h100": H100_SXM, "h200": H200_SXM}

COMPUTE_EFF = 0.50
"""Share of peak FLOP/s the GEMMs and attention reach. Fitted with MEMORY_EFF by ``python -m
perf.sim.calibrate`` to ``CALIBRATION`` (2026-12-04, grids 0.4-0.6 x 0.7-0.9 and 0.45-0.5 x
0.9-0.95): 29.8k output tok/s at 128/128 (+8.0%), 14.0k at 1000/1000 (-8.4%); no pair does
better on both (docs/simulator.md)."""
MEMORY_EFF = 0.90
"""Share of HBM bandwidth the weight and KV reads reach (fitted with COMPUTE_EFF, above)."""
STEP_OVERHEAD_S = 300e-6
"""Seconds every step pays beyond its kernels (launch, scheduling, sampling): an assumption,
of the order of TensorRT-LLM's in-flight batching iteration overhead with CUDA graphs."""
ALLREDUCE_LATENCY_S = 8e-6
"""Seconds of one small all-reduce over NVLink within a node (NCCL's latency floor, order of
magnitude from nccl-tests on DGX H100)."""

CALIBRATION = (
    # (input, output, published output tok/s): Llama-3.1-8B FP8, one H100 SXM, TP1, max load.
    (128, 128, 27_600.0),
    (1000, 1000, 15_300.0),
)
"""TensorRT-LLM's performance overview (docs/source/performance/perf-overview.md, v0.13-v0.15:
Llama 3.1 8B, FP8, H100 SXM, TP 1), as the issue quotes them."""


def load_model(name: str, dtype: str = "bfloat16") -> ModelConfig:
    """A model of ``MODELS_DIR`` by file stem (``llama-3-70b``) or a path to a ``config.json``."""
    path = Path(name)
    if not path.is_file():
        path = MODELS_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MODELS_DIR.glob("*.json")))
        raise ValueError(f"no model {name!r}: give a config.json path or one of {known}")
    hf = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    return ModelConfig.from_hf_config(hf, dtype=dtype)


@dataclass(frozen=True)
class RooflineCost:
    """Seconds of one stage's step on a TP set of ``tp`` GPUs (``perf.sim.instance.StepCost``)."""

    gpu: GpuProfile
    model: ModelConfig
    tp: int = 1
    weight_dtype: str = "bf16"
    """``bf16`` or ``fp8`` (weights, and the GEMMs' peak)."""
    kv_bytes_per_elem: int = 2
    compute_eff: float = COMPUTE_EFF
    memory_eff: float = MEMORY_EFF
    overhead_s: float = STEP_OVERHEAD_S

    def __post_init__(self) -> None:
        shard = shard_config(self.model, self.tp)
        w = 1 if self.weight_dtype == "fp8" else 2
        m = self.model
        object.__setattr__(self, "_layer_params", LayerWeights.buffer_numel(shard))
        object.__setattr__(self, "_layer_weight_bytes", LayerWeights.buffer_numel(shard) * w)
        object.__setattr__(self, "_kv_token_bytes", 2 * shard.num_key_value_heads * m.head_size
                           * self.kv_bytes_per_elem)
        object.__setattr__(self, "_attn_flops", 4 * shard.num_attention_heads * m.head_size)
        object.__setattr__(self, "_head_params", m.vocab_size * m.hidden_size)
        object.__setattr__(self, "_head_bytes", m.vocab_size * m.hidden_size * w)
        # Every step reads these: computed once (the profile and the factors are fixed).
        object.__setattr__(self, "_flops_s", self.gpu.peak_flops(self.weight_dtype) * self.compute_eff)
        object.__setattr__(self, "_bw_s", self.gpu.hbm_bandwidth * self.memory_eff)
        object.__setattr__(self, "_attn_flops_s", self.gpu.bf16_flops * self.compute_eff)

    def allreduce_seconds(self, tokens: int) -> float:
        if self.tp == 1:
            return 0.0
        nbytes = tokens * self.model.hidden_size * 2  # bf16 activations
        return ALLREDUCE_LATENCY_S + 2 * (self.tp - 1) / self.tp * nbytes / self.gpu.node.nvlink_bandwidth

    def step_cost(self, chunks: list[tuple[int, int]], layers: int | None = None) -> float:
        if not chunks:
            return 0.0
        k = self.model.num_hidden_layers if layers is None else layers
        tokens = sum(n for n, _ in chunks)
        flops, bw = self._flops_s, self._bw_s
        gemm = max(2 * self._layer_params * tokens / flops, self._layer_weight_bytes / bw)
        attn_flops = self._attn_flops * sum(attention_work(n, s) for n, s in chunks)
        kv_read = self._kv_token_bytes * sum(n + s for n, s in chunks)
        attn = max(attn_flops / self._attn_flops_s, kv_read / bw)
        per_layer = gemm + attn + 2 * self.allreduce_seconds(tokens)
        sampled = len(chunks)  # at most one logits row per chunk
        head = max(2 * self._head_params * sampled / flops, self._head_bytes / bw)
        return self.overhead_s + k * per_layer + head * k / self.model.num_hidden_layers


def kv_dtype_bytes(name: str) -> int:
    return 1 if name == "fp8" else torch.empty((), dtype=parse_dtype(name)).element_size()
