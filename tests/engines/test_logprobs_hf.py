"""Log-probabilities against Hugging Face transformers on the same weights: sampled
tokens' and prompt tokens' (``echo``), whole-prompt and chunked prefill, pp 1 and 4."""

from __future__ import annotations

import pytest
import torch

from build_scripts.sources.tiny import TinySpec
from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from tests.conftest import build_tiny_store
from tests.deps import require

transformers = require("transformers")

K = 5


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """``[len(ids), vocab]``: log-probabilities of each position's next token."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def run(engine: LLMEngine, prompt: list[int], params: SamplingParams):
    req = engine.make_request(prompt, params)
    engine.add_request(req)
    while engine.scheduler.has_work():
        engine.step()
    return req


def assert_matches(lp, ref_row: torch.Tensor, token: int) -> None:
    assert lp.token_id == token
    assert abs(lp.logprob - float(ref_row[token])) < 1e-4
    ref_top = torch.topk(ref_row, K)
    assert [t for t, _ in lp.top] == ref_top.indices.tolist()
    assert max(abs(v - r) for (_, v), r in zip(lp.top, ref_top.values.tolist())) < 1e-4


@pytest.mark.parametrize("pp_size,chunk", [(1, 512), (4, 5)])
def test_output_and_prompt_logprobs_match_transformers(tmp_path, pp_size, chunk):
    hf_dir, store = build_tiny_store(tmp_path, TinySpec(), splits=sorted({1, pp_size}))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(engine_dir=store, device="cpu", pp_size=pp_size,
                                    max_num_batched_tokens=chunk, page_size=4))
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog, again and again.")
    req = run(engine, prompt, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=K, prompt_logprobs=K))
    ref = hf_logprobs(model, req.all_token_ids)
    prompt_lps, output_lps = req.logprobs.drain()
    assert len(prompt_lps) == len(prompt) - 1 and len(output_lps) == 8
    for pos, lp in enumerate(prompt_lps, start=1):
        assert_matches(lp, ref[pos - 1], prompt[pos])
    for i, lp in enumerate(output_lps):
        assert_matches(lp, ref[len(prompt) - 1 + i], req.output_token_ids[i])
    # Greedy: the sampled token is the most likely one.
    assert all(lp.top[0][0] == lp.token_id for lp in output_lps)


def test_asking_for_logprobs_changes_no_token(tiny_store):
    engine = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu", max_num_batched_tokens=7, page_size=4))
    prompt = engine.tokenizer.encode("Tokens must not change when log-probabilities are asked for.")
    plain = run(engine, prompt, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=3))
    asked = run(engine, prompt, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0.8, seed=3,
                                               logprobs=3, prompt_logprobs=2))
    assert plain.output_token_ids == asked.output_token_ids
    assert not plain.logprobs.prompt and not plain.logprobs.output  # nothing computed unasked
    assert len(asked.logprobs.output) == 12


def test_a_recomputed_prefill_does_not_score_the_prompt_twice(tiny_store):
    engine = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu", max_num_batched_tokens=4, page_size=4))
    prompt = engine.tokenizer.encode("A prompt long enough for several chunks of four tokens each.")
    req = engine.make_request(prompt, SamplingParams(max_tokens=3, ignore_eos=True, prompt_logprobs=0))
    engine.add_request(req)
    engine.step()
    engine.step()  # two chunks done: positions 1..8 scored
    engine.scheduler.preempt(req)
    assert req.num_computed_tokens == 0
    while engine.scheduler.has_work():
        engine.step()
    positions = [lp.token_id for lp in req.logprobs.prompt]
    assert positions == prompt[1:]  # each prompt position once, in order
