"""Tensor parallelism in the reference engine: TP2, TP2 x PP2, TP3 and TP4 (KV heads
replicated) against the single-process engine and Hugging Face transformers, in fp32.

Each TP rank holds its shard of every layer (written so by ``build_engines --tp``) and its
KV heads' pool; the ranks of a stage run at once, a thread each, and meet in an in-process
all-reduce (``engines/tensor_parallel.ThreadGroup``). The checks: logits within 1e-4 and
identical greedy tokens, with whole and chunked prefills, and in mixed steps (several
requests prefilling and decoding together), step by step.
"""

from __future__ import annotations

import pytest
import torch

from build_scripts.sources.tiny import TinySpec
from engines.errors import StoreError
from engines.store import EngineStore
from engines.tensor_parallel import TpShard, check_tp, shard_config
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from perf.hf_reference import greedy_with_logits, load_hf_model
from tests.conftest import build_tiny_store
from tests.deps import require

transformers = require("transformers")

SPECS = {
    "llama-gqa": TinySpec(),  # 4 heads, 2 KV heads
    "qwen2": TinySpec(arch="qwen2", num_layers=5, intermediate_size=96, seed=3),  # QKV bias, tied, GQA
    "qwen2-6h": TinySpec(arch="qwen2", hidden_size=96, num_heads=6, num_kv_heads=3, intermediate_size=96,
                         num_layers=4, seed=4),
}
CASES = [("llama-gqa", 2, 1, 512), ("llama-gqa", 2, 2, 5), ("llama-gqa", 4, 1, 7),
         ("qwen2", 2, 1, 5), ("qwen2", 2, 2, 512), ("qwen2-6h", 3, 1, 512), ("qwen2-6h", 3, 2, 5)]
PROMPT = "The quick brown fox jumps over the lazy dog, again and again."


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    built = {}
    for name, spec in SPECS.items():
        tps = sorted({1, *(tp for n, tp, _, _ in CASES if n == name)})
        built[name] = build_tiny_store(tmp_path_factory.mktemp(name), spec, splits=(1, 2), tp_sizes=tps)[1]
    return built


def engine(store, tp: int, pp: int, chunk: int) -> LLMEngine:
    return LLMEngine(EngineConfig(engine_dir=store, device="cpu", tp_size=tp, pp_size=pp,
                                  max_num_batched_tokens=chunk, page_size=4, enable_prefix_caching=False))


@pytest.mark.parametrize("name,tp,pp,chunk", CASES)
def test_logits_match_the_single_process_engine_and_transformers(stores, name, tp, pp, chunk):
    store = stores[name]
    tp_engine, plain = engine(store, tp, pp, chunk), engine(store, 1, 1, chunk)
    runners = [r for stage in tp_engine.executor.stages for r in stage]
    assert len(runners) == tp * pp and all(r.all_reduce is not None for r in runners)
    assert runners[0].cfg.num_attention_heads == SPECS[name].num_heads // tp  # each rank its heads only
    prompt = plain.tokenizer.encode(PROMPT)
    ours, our_logits = greedy_with_logits(tp_engine, prompt, 12)
    want, want_logits = greedy_with_logits(plain, prompt, 12)
    assert ours == want
    torch.testing.assert_close(our_logits, want_logits, rtol=1e-4, atol=1e-4)
    model = load_hf_model(EngineStore(store))
    ids, hf_logits = torch.tensor([prompt + ours]), None
    with torch.no_grad():
        hf_logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    torch.testing.assert_close(our_logits, hf_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,tp,pp", [("llama-gqa", 2, 2), ("qwen2-6h", 3, 1)])
def test_mixed_steps_give_the_same_logits_step_by_step(stores, name, tp, pp):
    """Requests of different lengths under a small token budget (``tp_mpi_job.run``): steps
    mix chunked prefills with decodes; the same schedule on both engines gives the same
    logits at every step."""
    from tests.engines import tp_mpi_job
    tp_tokens, tp_steps = tp_mpi_job.run(engine(stores[name], tp, pp, 16))
    tokens, steps = tp_mpi_job.run(engine(stores[name], 1, 1, 16))
    assert tp_tokens == tokens
    assert len(tp_steps) == len(steps) and any(s.shape[0] > 1 for s in steps)  # several sampled at once
    for a, b in zip(tp_steps, steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_store_holds_each_ranks_shard_in_tensorrt_llms_rank_order(stores):
    store = EngineStore(stores["llama-gqa"])
    assert (2, 2) in store.shapes and (4, 1) in store.shapes and store.tp_splits(2) == [1, 2]
    mapping = store.mapping(2, tp_size=2)
    assert mapping.world_size == 4 and [mapping.pp_rank(r) for r in range(4)] == [0, 0, 1, 1]
    full, _ = store.load_rank(1, 0)
    for rank in range(4):
        w, layers = store.load_rank(2, rank, tp_size=2)
        layer = w.layers[layers.start]
        assert layer.qkv_w.shape[0] == full.layers[layers.start].qkv_w.shape[0] // 2
        assert layer.down_w.shape[1] == full.cfg.intermediate_size // 2
        assert (w.embedding is not None) == (mapping.pp_rank(rank) == 0)  # replicated on the first stage
    # Rank 1 (tp rank 1 of stage 0) holds query heads 2-3 and KV head 1 of the full projection.
    w1, _ = store.load_rank(2, 1, tp_size=2)
    d, cfg = full.cfg.head_size, full.cfg
    q = full.layers[0].qkv_w[2 * d:4 * d]
    k = full.layers[0].qkv_w[cfg.q_size + d:cfg.q_size + 2 * d]
    torch.testing.assert_close(w1.layers[0].qkv_w[:2 * d], q)
    torch.testing.assert_close(w1.layers[0].qkv_w[2 * d:3 * d], k)


def test_shapes_the_heads_cannot_take_are_refused_with_the_counts():
    from engines.config import ModelConfig
    base = ModelConfig("LlamaForCausalLM", "float32", 300, 64, 128, 4, 4, 2, 16, 512)
    with pytest.raises(StoreError, match="tp 3 does not divide the 4 attention heads"):
        check_tp(base, 3)
    odd = ModelConfig("LlamaForCausalLM", "float32", 300, 192, 96, 4, 12, 4, 16, 512)
    with pytest.raises(StoreError, match="neither divides the 4 KV heads nor is a multiple"):
        check_tp(odd, 3)
    assert shard_config(base, 4).num_key_value_heads == 1  # replicated: each rank keeps one
    with pytest.raises(ValueError, match="out of range"):
        TpShard(2, 2)


def test_build_engines_refuses_a_tp_the_model_cannot_take(tmp_path):
    from build_scripts.build_engines import main
    assert main(["--source", "tiny", "--tp", "3", "--splits", "1", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    assert not (tmp_path / "s" / "tp3pp1").exists()


@pytest.mark.parametrize("name,tp,pp,transport", [("llama-gqa", 2, 1, "mpi"), ("llama-gqa", 2, 2, "gloo"),
                                                  ("qwen2-6h", 3, 1, "mpi")])
def test_tp_ranks_in_separate_processes_sum_through_the_transport(stores, tmp_path, name, tp, pp, transport,
                                                                  mpirun_available):
    """One TP rank per MPI process, the all-reduce over MPI (reduce then broadcast) or over
    torch.distributed (the nccl transport's code, on gloo): the single-process engine's
    tokens and, step by step, its logits."""
    from tests.engines import tp_mpi_job
    from tests.mpi_util import run_mpi_module
    out = tmp_path / "tp.pt"
    res = run_mpi_module(tp, "tests.engines.tp_mpi_job", str(stores[name]), transport, str(pp), str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out)
    want_tokens, want_logits = tp_mpi_job.run(LLMEngine(tp_mpi_job.config(stores[name], 1, 1)))
    assert got["tokens"] == want_tokens
    assert len(got["logits"]) == len(want_logits)
    for a, b in zip(got["logits"], want_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices (NCCL refuses two ranks on one)")
def test_tp2_over_nccl_on_two_gpus(stores, tmp_path, mpirun_available):
    """The NCCL all-reduce: TP2 on two GPUs, fp32, against the single-process engine on the CPU."""
    from tests.engines import tp_mpi_job
    from tests.mpi_util import run_mpi_module
    out = tmp_path / "tp.pt"
    res = run_mpi_module(2, "tests.engines.tp_mpi_job", str(stores["llama-gqa"]), "nccl", "1", str(out), "cuda",
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out)
    want_tokens, want_logits = tp_mpi_job.run(LLMEngine(tp_mpi_job.config(stores["llama-gqa"], 1, 1)))
    assert got["tokens"] == want_tokens
    for a, b in zip(got["logits"], want_logits):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
