"""Greedy tokens with the prefix cache are those without it, and the cache was used:
full hit, a hit ending mid-page, two requests sharing pages at once, a preempted request
hitting its own prefix; pp 1 and 2 stages in one process."""

from __future__ import annotations

import pytest

from engines.sampling import SamplingParams
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine

GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
SYSTEM = "You are a helpful assistant who answers briefly and well. "


def engine(store, caching: bool, pp: int = 1) -> LLMEngine:
    e = LLMEngine(EngineConfig(engine_dir=store, device="cpu", page_size=4, pp_size=pp,
                               enable_prefix_caching=caching, max_num_batched_tokens=64))
    computed = []
    execute = e.executor.execute

    def counting(step):
        computed.append(sum(c.num_tokens for c in step.chunks))
        return execute(step)

    e.executor.execute = counting
    e.computed_tokens = computed  # prefill and decode tokens the runners computed
    return e


def run(e: LLMEngine, prompts: list[str]) -> list[list[int]]:
    return [c.token_ids for c in e.generate(prompts, GREEDY)]


def audit(e: LLMEngine, running=()) -> None:
    e.scheduler.blocks.audit(list(running))


@pytest.mark.parametrize("pp", [1, 2])
def test_a_full_hit_and_a_hit_ending_mid_page(tiny_store, pp):
    prompts = [SYSTEM + "What is two plus two?", SYSTEM + "What is two plus two?", SYSTEM + "Name a colour."]
    plain = engine(tiny_store, False, pp)
    cached = engine(tiny_store, True, pp)
    want = [run(plain, [p])[0] for p in prompts]
    got = [run(cached, [p])[0] for p in prompts]
    assert got == want
    assert cached.scheduler.counts["prefix_cache_hits"] > 0 and sum(cached.computed_tokens) < sum(plain.computed_tokens)
    audit(cached)


def test_two_requests_share_pages_at_once(tiny_store):
    plain, cached = engine(tiny_store, False), engine(tiny_store, True)
    a_prompt, b_prompt = SYSTEM + "First question here?", SYSTEM + "Second one, longer, here?"
    want = run(plain, [a_prompt]) + run(plain, [b_prompt])
    a = cached.make_request(a_prompt, GREEDY)
    cached.add_request(a)
    cached.step()  # a's prefill: its full blocks are cached
    b = cached.make_request(b_prompt, GREEDY)
    cached.add_request(b)
    cached.step()
    shared = [blk for blk in b.prefix_blocks if any(blk is x for x in a.prefix_blocks)]
    assert shared and all(blk.refs == 2 for blk in shared) and b.num_cached_tokens > 0
    audit(cached, [a, b])
    while cached.scheduler.has_work():
        cached.step()
    assert [a.output_token_ids, b.output_token_ids] == want
    audit(cached)


def test_a_preempted_request_hits_its_own_prefix(tiny_store):
    plain, cached = engine(tiny_store, False), engine(tiny_store, True)
    prompt = SYSTEM + "Preempt me after a few tokens, please."
    want = run(plain, [prompt])[0]
    req = cached.make_request(prompt, GREEDY)
    cached.add_request(req)
    for _ in range(4):
        cached.step()
    cached.scheduler.preempt(req)
    assert req.num_computed_tokens == 0 and req.num_preemptions == 1
    before = cached.scheduler.counts["prefix_cache_hits"]
    cached.step()  # recomputed: the prompt and the tokens so far come back from the cache
    assert cached.scheduler.counts["prefix_cache_hits"] - before >= len(req.prompt_token_ids) // 4 * 4
    while cached.scheduler.has_work():
        cached.step()
    assert req.output_token_ids == want
    audit(cached)


def test_a_swapped_request_sharing_a_prefix_comes_back_identical(tiny_store):
    plain = engine(tiny_store, False)
    prompts = [SYSTEM + "Swap me out, then back in.", SYSTEM + "And keep me running meanwhile."]
    want = [run(plain, [p])[0] for p in prompts]
    e = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu", page_size=4, enable_prefix_caching=True,
                               max_num_batched_tokens=64), preemption_mode="swap", swap_space_bytes=64 << 20)
    a = e.make_request(prompts[0], GREEDY)
    e.add_request(a)
    e.step()
    b = e.make_request(prompts[1], GREEDY)
    e.add_request(b)
    e.step()
    assert b.prefix_blocks and any(blk is x for blk in b.prefix_blocks for x in a.prefix_blocks)
    e.scheduler._preempt(a)  # swap a out while b still shares its first blocks
    assert a.swapped and all(blk.refs == 1 for blk in b.prefix_blocks)
    e.scheduler.blocks.audit([b])
    while e.scheduler.has_work():
        e.step()
    assert [a.output_token_ids, b.output_token_ids] == want and a.num_swaps == 1
    e.scheduler.blocks.audit([])
