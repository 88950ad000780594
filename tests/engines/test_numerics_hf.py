"""The engine against Hugging Face transformers on the same weights (independent reference)."""

from __future__ import annotations

import pytest
import torch

from build_scripts.sources.tiny import TinySpec
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from perf.hf_reference import greedy_with_logits as run_with_logits
from tests.conftest import build_tiny_store
from tests.deps import require

transformers = require("transformers")

SPECS = {
    "llama-gqa": TinySpec(),
    "llama-mha": TinySpec(num_heads=4, num_kv_heads=4, num_layers=3, seed=1),
    "llama3-rope-scaling": TinySpec(seed=2, num_layers=4, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "qwen2-bias-tied": TinySpec(arch="qwen2", num_layers=5, intermediate_size=96, seed=3),
}


def hf_greedy(model, prompt_ids: list[int], max_tokens: int):
    ids = torch.tensor([prompt_ids])
    out, past, logits = [], None, []
    with torch.no_grad():
        step_ids = ids
        for _ in range(max_tokens):
            res = model(input_ids=step_ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            last = res.logits[0, -1].float()
            logits.append(last)
            nxt = int(last.argmax())
            out.append(nxt)
            step_ids = torch.tensor([[nxt]])
    return out, torch.stack(logits)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("pp_size,chunk", [(1, 512), (4, 5)])
def test_logits_and_greedy_match_transformers(tmp_path, name, pp_size, chunk):
    """pp=1 with whole-prompt prefill, and a 4-stage (uneven where layers % 4) pipeline with
    5-token prefill chunks: both must match transformers' logits and greedy tokens."""
    spec = SPECS[name]
    pp_size = min(pp_size, spec.num_layers)
    hf_dir, store = build_tiny_store(tmp_path, spec, splits=sorted({1, pp_size}))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(engine_dir=store, device="cpu", pp_size=pp_size,
                                    max_num_batched_tokens=chunk, page_size=4))
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again.")
    ours, our_logits = run_with_logits(engine, prompt, 16)
    ref, ref_logits = hf_greedy(model, prompt, 16)
    assert ours == ref
    torch.testing.assert_close(our_logits, ref_logits, rtol=1e-4, atol=1e-4)
