"""Scheduler and block manager on fake requests (no model), plus recompute preemption end to end."""

from __future__ import annotations

import pytest

from engines.errors import RequestError
from engines.sampling import SamplingParams
from engines.step import StepOutput
from orchestrator.core.block_manager import BlockManager
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from orchestrator.core.request import Request, RequestStatus
from orchestrator.core.scheduler import Scheduler, SchedulerConfig
from tests.orchestrator.core.pages import free_pages


def req(rid: str, prompt_len: int, max_tokens: int = 4) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   max_model_len=1024)


def fake_output(sched, token: int = 7) -> StepOutput:
    """Every sampling chunk of the step samples ``token``."""
    step = sched.to_step()
    ids = [c.seq_id for c in step.chunks if c.sample]
    return StepOutput(sampled_seq_ids=ids, tokens=[token] * len(ids))


def test_block_manager_allocates_per_layer_pages():
    bm = BlockManager.single(num_pages=24, page_size=4, num_layers=3)
    r = req("a", 6)
    assert bm.pages_needed(r, 6) == 6  # 2 pages per layer
    assert bm.allocate(r, 6)
    assert [len(row) for row in r.block_table] == [2, 2, 2]
    assert len({p for row in r.block_table for p in row}) == 6
    r.num_computed_tokens = 6
    assert bm.pages_needed(r, 2) == 0  # positions 6 and 7 fit the second page
    assert bm.pages_needed(r, 3) == 3
    assert free_pages(bm) == 18
    bm.free(r)
    assert free_pages(bm) == 24 and r.block_table == []


def test_token_budget_chunks_prefill_and_mixes_decodes():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=8), BlockManager.single(100, 4, 2))
    a, b = req("a", 5), req("b", 12)
    s.add(a)
    s.add(b)
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 5), ("b", 3)]
    s.update(out, fake_output(out))
    assert a.output_token_ids == [7] and b.output_token_ids == []
    out = s.schedule()  # a decodes, b continues its prefill with the rest of the budget
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 7)]
    steps = out.to_step().chunks
    assert steps[1].num_computed == 3 and steps[1].token_ids == list(range(4, 11))
    assert not steps[1].sample
    s.update(out, fake_output(out))
    out = s.schedule()
    assert [(c.request.request_id, c.num_tokens) for c in out.chunks] == [("a", 1), ("b", 2)]
    assert out.to_step().chunks[1].sample


def test_fcfs_head_of_line_waits_for_pages():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager.single(8, 4, 1))
    first, big, small = req("first", 16), req("big", 20), req("small", 2)
    for r in (first, big, small):
        s.add(r)
    out = s.schedule()
    # first takes 4 of the 8 pages; big needs 5 and waits; small would fit in one page,
    # but nothing overtakes the head of the queue.
    assert [c.request.request_id for c in out.chunks] == ["first"]
    assert list(s.waiting) == [big, small]


def test_preempts_newest_when_a_running_request_cannot_grow():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager.single(4, 4, 1))
    old, new = req("old", 8, max_tokens=10), req("new", 8, max_tokens=10)
    s.add(old)
    s.add(new)
    out = s.schedule()
    assert len(out.chunks) == 2 and free_pages(s.blocks) == 0
    s.update(out, fake_output(out))
    out = s.schedule()  # old needs a third page: new is preempted and recomputed later
    assert out.preempted == [new]
    assert new.status == RequestStatus.PREEMPTED and new.num_computed_tokens == 0
    assert s.waiting[0] is new and new.output_token_ids == [7]
    assert [c.request for c in out.chunks] == [old]


def test_request_larger_than_the_cache_is_refused():
    s = Scheduler(SchedulerConfig(), BlockManager.single(4, 4, 2))
    with pytest.raises(RequestError, match="holds 8 tokens"):
        s.add(req("huge", 30))


def test_recompute_preemption_keeps_outputs_identical(tiny_store):
    prompts = [f"prompt number {i} with some padding text" for i in range(6)]
    sp = SamplingParams(max_tokens=24, ignore_eos=True)
    roomy = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu"))
    # 6 layers x 16 tokens a page: 84 pages hold 224 tokens, far less than 6 x 65 in flight.
    tight = LLMEngine(EngineConfig(engine_dir=tiny_store, device="cpu", page_size=16,
                                   kv_cache_memory=84 * 16 * 2 * 2 * 16 * 4))
    expected = [c.token_ids for c in roomy.generate(prompts, sp)]
    reqs = [tight.make_request(p, sp) for p in prompts]
    for r in reqs:
        tight.add_request(r)
    while tight.scheduler.has_work():
        tight.step()
    assert sum(r.num_preemptions for r in reqs) > 0
    assert [r.output_token_ids for r in reqs] == expected


def test_group_block_manager_takes_each_layer_from_its_stage_pool():
    from engines.mapping import LayerRange
    from orchestrator.core.block_manager import PoolSpec

    bm = BlockManager(4, [PoolSpec(LayerRange(0, 2), 10), PoolSpec(LayerRange(2, 3), 3)])
    r = req("a", 8)  # 2 pages per layer
    assert bm.allocate(r, 8)
    assert bm.usage() == [(4, 10), (2, 3)]
    assert all(p < 10 for row in r.block_table[:2] for p in row) and all(p < 3 for p in r.block_table[2])
    assert bm.token_capacity() == 3 * 4  # the small pool holds 3 pages of its one layer
    assert not bm.allocate(req("b", 8), 8)  # stage 1's pool has one page left
    bm.free(r)
    assert bm.usage() == [(0, 10), (0, 3)]


def test_in_flight_requests_are_neither_scheduled_nor_preempted():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager.single(4, 4, 1))
    old, new = req("old", 8, max_tokens=10), req("new", 8, max_tokens=10)
    s.add(old)
    s.add(new)
    out = s.schedule()
    s.update(out, fake_output(out))
    out = s.schedule(busy={new.seq_id})  # new is in flight: old cannot take its pages
    assert out.chunks == [] and out.preempted == []
    assert new.status == RequestStatus.RUNNING
    out = s.schedule(busy={old.seq_id})  # new cannot grow and old is in flight: new waits
    assert out.chunks == [] and out.preempted == [] and new.status == RequestStatus.RUNNING
    out = s.schedule()  # nothing in flight: the usual recompute preemption of the newest
    assert out.preempted == [new] and [c.request for c in out.chunks] == [old]


def test_max_seqs_splits_work_into_micro_batches():
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager.single(100, 4, 1))
    reqs = [req(str(i), 3) for i in range(5)]
    for r in reqs:
        s.add(r)
    first = s.schedule(max_seqs=3)
    busy = {c.request.seq_id for c in first.chunks}
    second = s.schedule(busy=busy, max_seqs=3)
    assert [c.request.request_id for c in first.chunks] == ["0", "1", "2"]
    assert [c.request.request_id for c in second.chunks] == ["3", "4"]


def test_token_ids_slices_as_all_token_ids_does():
    req = Request("r", [1, 2, 3, 4], SamplingParams(max_tokens=8), 64)
    req.output_token_ids = [5, 6, 7]
    whole = req.all_token_ids
    for start in range(0, 8):
        for end in range(start, 9):
            assert req.token_ids(start, end) == whole[start:end], (start, end)
