"""The GPU side of the simulator: models from config.json, the roofline step model's regimes
(decode reads the weights, prefill is bound by FLOP/s, TP splits both and adds all-reduces)
and the memory a 70B replica leaves for KV on an H100."""

from __future__ import annotations

import pytest
import torch

from perf.sim.gpu import H100_SXM, H200_SXM, RooflineCost, load_model
from perf.sim.gpu_presets import GPU_PRESETS, PAGE_SIZE
from perf.sim.memory import MemoryLayout

GB = 1e9


def test_models_follow_their_config_json():
    m = load_model("llama-3-70b")
    assert (m.num_hidden_layers, m.hidden_size, m.num_key_value_heads) == (80, 8192, 8)
    layout = MemoryLayout.for_model(m, torch.bfloat16, H100_SXM.hbm_bytes, PAGE_SIZE, (1, 2), tp=2)
    # 70.6B parameters: about 141 GB in bf16, the decoder layers split over 2 GPUs
    assert 135 * GB < layout.layer_weight_bytes * 80 * 2 + layout.fixed_weight_bytes < 145 * GB
    # KV: 2 (K, V) x 8 heads x 128 x 2 bytes per layer per token, 4 of the heads on each GPU
    assert layout.page_bytes // PAGE_SIZE == 2 * 4 * 128 * 2
    with pytest.raises(ValueError, match="leave no KV"):  # 141 GB does not fit one H100
        MemoryLayout.for_model(m, torch.bfloat16, H100_SXM.hbm_bytes, PAGE_SIZE, (1, 2), tp=1)
    with pytest.raises(ValueError, match="no model"):
        load_model("llama-9-1t")


def test_decode_reads_the_weights_and_prefill_is_compute_bound():
    cost = RooflineCost(H100_SXM, load_model("llama-3-8b"))
    weights_s = cost._layer_weight_bytes * 32 / (H100_SXM.hbm_bandwidth * cost.memory_eff)
    one = cost.step_cost([(1, 100)])
    assert weights_s < one < weights_s * 1.3  # a decode step of one sequence: the weights read once
    assert cost.step_cost([(1, 100)] * 8) < one * 1.1  # batching decode is nearly free
    p4k, p8k = cost.step_cost([(4096, 0)]), cost.step_cost([(8192, 0)])
    assert 1.9 < p8k / p4k < 2.2  # prefill: linear in tokens (FLOP-bound)
    assert p8k > 10 * one


def test_tp_halves_the_work_and_adds_all_reduces_and_a_stage_pays_its_share():
    m = load_model("llama-3-70b")
    tp1, tp2 = RooflineCost(H100_SXM, m, 1), RooflineCost(H100_SXM, m, 2)
    prefill = [(4096, 0)]
    assert 0.5 < tp2.step_cost(prefill) / tp1.step_cost(prefill) < 0.6
    assert tp2.allreduce_seconds(4096) > 0 and tp1.allreduce_seconds(4096) == 0
    half = tp2.step_cost(prefill, layers=40) - tp2.overhead_s
    assert half == pytest.approx((tp2.step_cost(prefill) - tp2.overhead_s) / 2)
    # the H200's bandwidth makes decode faster, its compute leaves prefill as it was
    h200 = RooflineCost(H200_SXM, m, 2)
    assert h200.step_cost([(1, 100)]) < 0.8 * tp2.step_cost([(1, 100)])
    assert h200.step_cost(prefill) == pytest.approx(tp2.step_cost(prefill), rel=0.02)


def test_a_70b_tp2_replica_on_h100s_keeps_a_few_gb_of_kv_per_gpu():
    ctx = GPU_PRESETS["sim-8xh100-70b"].context("kunserve")
    layout = ctx.layout
    kv_per_gpu = layout.replica_pages() * layout.page_bytes
    assert 3 * GB < kv_per_gpu < 12 * GB
    # dropping half the layers frees about 35 GB per GPU for KV
    assert layout.stage_pages(40) * layout.page_bytes - kv_per_gpu > 30 * GB
