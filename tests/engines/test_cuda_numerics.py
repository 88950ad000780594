"""The same engine code on CUDA: fp32 matches transformers tightly, bf16 within bf16 error.

Skipped without a CUDA device (CI has none); run on a GPU host with ``pytest -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

from build_scripts.sources.tiny import TinySpec
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from tests.conftest import build_tiny_store
from tests.deps import require
from tests.engines.test_numerics_hf import run_with_logits

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
transformers = require("transformers")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("pp_size", [1, 4])
def test_cuda_fp32_matches_transformers(tmp_path, arch, pp_size):
    spec = TinySpec(arch=arch, intermediate_size=128, seed=4)
    hf_dir, store = build_tiny_store(tmp_path, spec, splits=(1, pp_size))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).cuda().eval()
    engine = LLMEngine(EngineConfig(engine_dir=store, device="cuda", dtype="float32", pp_size=pp_size,
                                    max_num_batched_tokens=6, page_size=4))
    ids = engine.tokenizer.encode("CUDA numerics, checked against the reference implementation.")
    ours, our_logits = run_with_logits(engine, ids, 12)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids], device="cuda"), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    assert ours == ref.sequences[0, len(ids):].tolist()
    ref_logits = torch.stack([step[0].float().cpu() for step in ref.logits])
    torch.testing.assert_close(our_logits, ref_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("pp_size", [1, 2])
def test_cuda_bf16_decodes_close_to_fp32(tmp_path, pp_size):
    """16 decode steps in bf16 (the decode path's mask and kernels, not just the prefill)."""
    hf_dir, store = build_tiny_store(tmp_path, TinySpec(seed=6), splits=(1, 2))
    fp32 = LLMEngine(EngineConfig(engine_dir=store, device="cuda", dtype="float32", pp_size=pp_size, page_size=4))
    bf16 = LLMEngine(EngineConfig(engine_dir=store, device="cuda", dtype="bfloat16", pp_size=pp_size, page_size=4))
    ids = fp32.tokenizer.encode("bf16 on the GPU")
    ref_tokens, ref = run_with_logits(fp32, ids, 16)
    tokens, got = run_with_logits(bf16, ids, 16)
    assert len(tokens) == 16 and bf16.kv.data.dtype == torch.bfloat16
    # The inputs are the same until the first token bf16 picks differently (included).
    same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), 15)
    # bf16 keeps 8 bits of mantissa: compare the distributions, not the last digits.
    assert torch.nn.functional.cosine_similarity(ref[:same + 1], got[:same + 1]).min() > 0.99


@pytest.mark.parametrize("tp,pp_size", [(2, 1), (2, 2)])
def test_cuda_tensor_parallel_fp32_matches_one_rank(tmp_path, tp, pp_size):
    """TP ranks on one GPU, a thread each (the in-process all-reduce), against tp = 1 there."""
    _, store = build_tiny_store(tmp_path, TinySpec(seed=7), splits=(1, pp_size), tp_sizes=(1, tp))
    ids = None
    results = []
    for t, pp in ((tp, pp_size), (1, 1)):
        engine = LLMEngine(EngineConfig(engine_dir=store, device="cuda", dtype="float32", tp_size=t, pp_size=pp,
                                        max_num_batched_tokens=6, page_size=4, enable_prefix_caching=False))
        ids = ids or engine.tokenizer.encode("Tensor parallel ranks on one device, summed by an all-reduce.")
        results.append(run_with_logits(engine, ids, 12))
    (ours, our_logits), (want, want_logits) = results
    assert ours == want
    torch.testing.assert_close(our_logits, want_logits, rtol=1e-4, atol=1e-4)
