"""Chaining the stages of every split in one process gives exactly the pp=1 result, step by step."""

from __future__ import annotations

import pytest
import torch

from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine

PROMPTS = [
    "The quick brown fox",
    "A much longer prompt that will be split into several prefill chunks by the token budget.",
    "Short",
    "Another medium length prompt, arriving later",
]


def make_engine(store, pp_size: int) -> LLMEngine:
    # A 7-token budget forces chunked prefill and steps that mix prefill chunks with decodes.
    return LLMEngine(EngineConfig(engine_dir=store, device="cpu", pp_size=pp_size,
                                  max_num_batched_tokens=7, page_size=4))


def trace(engine: LLMEngine) -> list[tuple[list[tuple[int, int, int]], list[int], torch.Tensor | None]]:
    """Run staggered requests; record each step's chunks, sampled tokens and logits."""
    params = [SamplingParams(max_tokens=10, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=7, ignore_eos=True),
              SamplingParams(max_tokens=12, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=1.2, seed=3, ignore_eos=True)]
    reqs = [engine.make_request(p, s, request_id=str(i)) for i, (p, s) in enumerate(zip(PROMPTS, params))]
    steps, pending = [], list(reqs)
    while pending or engine.scheduler.has_work():
        if pending:  # one new arrival per step, so batches keep changing shape
            engine.add_request(pending.pop(0))
        sched = engine.scheduler.schedule()
        out = engine.executor.execute(sched.to_step())
        engine.scheduler.update(sched, out)
        shape = [(int(c.request.request_id), c.request.num_computed_tokens, c.num_tokens) for c in sched.chunks]
        steps.append((shape, out.tokens, out.logits))
    assert all(r.status.finished for r in reqs)
    return steps


@pytest.mark.parametrize("pp_size", [2, 3, 4])
def test_stages_compose_to_pp1_exactly(tiny_store, pp_size):
    reference = trace(make_engine(tiny_store, 1))
    piped = trace(make_engine(tiny_store, pp_size))
    assert len(piped) == len(reference)
    mixed = sum(1 for shape, _, _ in reference if len({n > 1 for _, _, n in shape}) == 2)
    assert mixed > 0, "the trace must contain steps mixing prefill chunks and decodes"
    for (shape_a, tok_a, log_a), (shape_b, tok_b, log_b) in zip(reference, piped):
        assert shape_a == shape_b
        assert tok_a == tok_b
        if log_a is None:
            assert log_b is None
        else:
            assert torch.equal(log_a, log_b)


def test_uneven_split_layer_ranges(tiny_store):
    engine = make_engine(tiny_store, 4)
    ranges = [(r.layer_range.start, r.layer_range.end) for r in engine.executor.runners]
    assert ranges == [(0, 2), (2, 4), (4, 5), (5, 6)]
    first, *middle, last = engine.executor.runners
    assert first.weights.embedding is not None and first.weights.lm_head is None
    assert all(r.weights.embedding is None and r.weights.lm_head is None for r in middle)
    assert last.weights.lm_head is not None and last.weights.embedding is None
