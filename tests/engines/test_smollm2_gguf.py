"""The real demo model: SmolLM2-135M-Instruct from its GGUF, against transformers' own GGUF loader."""

from __future__ import annotations

import pytest
import torch

from tests.deps import require

from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine

transformers = require("transformers")
pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smollm2(smollm2_store):
    from build_scripts.sources.gguf_file import smollm2_gguf_path

    path, store = smollm2_gguf_path(), smollm2_store
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return store, model, tok


def test_tokenizer_matches_transformers(smollm2):
    store, _, hf_tok = smollm2
    engine = LLMEngine(EngineConfig(engine_dir=store, device="cpu", kv_cache_memory=32 << 20))
    for text in [PROMPT, "Hello, world! 123 ünïcödé\n\ttabs", "<|im_start|>user\nhi<|im_end|>"]:
        assert engine.tokenizer.encode(text) == hf_tok(text).input_ids
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert engine.tokenizer.apply_chat_template(chat) == hf_tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("pp_size", [1, 2])
def test_greedy_completion_matches_transformers(smollm2, pp_size):
    store, model, hf_tok = smollm2
    engine = LLMEngine(EngineConfig(engine_dir=store, device="cpu", pp_size=pp_size,
                                    kv_cache_memory=32 << 20))
    ids = hf_tok(PROMPT).input_ids
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        ref_logits = model(torch.tensor([ids])).logits[0, -1]
    req = engine.make_request(ids, SamplingParams(max_tokens=12))
    engine.add_request(req)
    first = True
    while engine.scheduler.has_work():
        sched = engine.scheduler.schedule()
        out = engine.executor.execute(sched.to_step())
        if first:
            torch.testing.assert_close(out.logits[0], ref_logits, rtol=1e-4, atol=2e-4)
            first = False
        engine.scheduler.update(sched, out)
    assert req.output_token_ids == ref[:len(req.output_token_ids)]
    assert len(req.output_token_ids) == len(ref) or req.output_token_ids[-1] in engine.model.eos_token_ids
    assert "Paris" in engine.tokenizer.decode(req.output_token_ids)
