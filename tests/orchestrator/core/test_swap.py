"""Swap preemption: KV of preempted requests parked in host memory and brought back."""

from __future__ import annotations

import pytest
import torch

from engines.kv_cache import KVPool
from engines.mapping import LayerRange
from engines.sampling import SamplingParams
from engines.step import StepOutput
from engines.store import EngineStore
from orchestrator.core.block_manager import BlockManager, PoolSpec
from orchestrator.core.config import EngineConfig
from orchestrator.core.llm_engine import LLMEngine
from orchestrator.core.request import Request, RequestStatus
from orchestrator.core.scheduler import Scheduler, SchedulerConfig
from orchestrator.core.swap import HostSwapSpace
from tests.orchestrator.core.pages import free_pages

PAGE = 16
PAGE_BYTES = PAGE * 2 * 2 * 16 * 4  # tiny Llama: 2 KV heads of 16, float32, K and V
PROMPTS = [("a short one", 30), ("a prompt of middling length, padded a bit", 24),
           ("the longest prompt of them all, with plenty of text to prefill first", 16),
           ("tiny", 40), ("another prompt here", 28), ("and the last of the six prompts", 20)]


# Scheduler with a fake swapper (no model) ---------------------------------------------
class FakeSwapper:
    """Records calls; ``room`` swap-outs succeed, then the space is full."""

    def __init__(self, room: int = 100) -> None:
        self.room = room
        self.held: dict[int, int] = {}  # seq id -> computed tokens at swap-out
        self.calls: list[tuple[str, str]] = []

    def swap_out(self, req: Request) -> bool:
        self.calls.append(("out", req.request_id))
        if len(self.held) >= self.room:
            return False
        self.held[req.seq_id] = req.num_computed_tokens
        return True

    def swap_in(self, req: Request) -> None:
        self.calls.append(("in", req.request_id))
        computed = self.held.pop(req.seq_id)
        assert len(req.block_table[0]) * 4 >= computed + 1  # pages for its KV and the new token

    def discard(self, req: Request) -> None:
        self.calls.append(("discard", req.request_id))
        del self.held[req.seq_id]


def req(rid: str, prompt_len: int, max_tokens: int = 10) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   max_model_len=1024)


def step(s: Scheduler, token: int = 7):
    out = s.schedule()
    ids = [c.seq_id for c in out.to_step().chunks if c.sample]
    s.update(out, StepOutput(sampled_seq_ids=ids, tokens=[token] * len(ids)))
    return out


def two_requests_one_preempted(swapper: FakeSwapper):
    """4 pages of 4 tokens, one layer: old growing to a third page preempts new."""
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=64), BlockManager.single(4, 4, 1), swapper=swapper)
    old, new = req("old", 8, max_tokens=5), req("new", 8, max_tokens=5)
    s.add(old)
    s.add(new)
    step(s)
    out = step(s)
    assert out.preempted == [new]
    return s, old, new


def test_scheduler_swaps_out_keeps_progress_and_swaps_back_in():
    sw = FakeSwapper()
    s, old, new = two_requests_one_preempted(sw)
    assert new.swapped and new.status == RequestStatus.PREEMPTED
    assert new.num_computed_tokens == 8 and new.block_table == [] and s.waiting[0] is new
    assert (new.num_swaps, new.num_preemptions) == (1, 1) and sw.held == {new.seq_id: 8}
    while old.status == RequestStatus.RUNNING:
        step(s)
    out = step(s)  # old finished and freed its pages: new comes back for one decode token
    assert [(c.request, c.num_tokens) for c in out.chunks] == [(new, 1)]
    assert sw.calls == [("out", "new"), ("in", "new")] and not new.swapped
    assert len(new.block_table[0]) == 3  # 9 tokens of 4 a page
    while not new.status.finished:
        step(s)
    assert new.output_token_ids == [7] * 5 and free_pages(s.blocks) == 4


def test_scheduler_recomputes_when_the_swap_space_is_full():
    sw = FakeSwapper(room=0)
    s, old, new = two_requests_one_preempted(sw)
    assert sw.calls == [("out", "new")] and not new.swapped
    assert new.num_computed_tokens == 0 and (new.num_swaps, new.num_preemptions) == (0, 1)


def test_abort_and_release_of_a_swapped_request_drop_its_host_copy():
    sw = FakeSwapper()
    s, _, new = two_requests_one_preempted(sw)
    s.abort(new)
    assert sw.calls[-1] == ("discard", "new") and sw.held == {} and not new.swapped
    assert new.status == RequestStatus.FINISHED_ABORTED and new not in s.waiting

    sw = FakeSwapper()
    s, _, new = two_requests_one_preempted(sw)
    s.release(new)  # handed to another instance: its KV cannot follow, so it is recomputed there
    assert sw.held == {} and not new.swapped and new.num_computed_tokens == 0 and new not in s.waiting


def test_explicit_preempt_never_swaps():
    sw = FakeSwapper()
    s = Scheduler(SchedulerConfig(), BlockManager.single(8, 4, 1), swapper=sw)
    r = req("r", 6)
    s.add(r)
    step(s)
    s.preempt(r)  # e.g. a failed KV move: the pages may be stale
    assert sw.calls == [] and r.num_computed_tokens == 0 and not r.swapped


def test_swap_needs_one_pool():
    two = BlockManager(4, [PoolSpec(LayerRange(0, 1), 4), PoolSpec(LayerRange(1, 2), 4)])
    with pytest.raises(NotImplementedError, match="one rank"):
        Scheduler(SchedulerConfig(), two, swapper=FakeSwapper())


# HostSwapSpace on a real KV pool ------------------------------------------------------
@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_host_swap_space_round_trip(tiny_store, device):
    kv = KVPool(EngineStore(tiny_store).config, 12, 4, torch.float32, device)
    kv.data.copy_(torch.randn_like(kv.data))
    before = kv.data.clone()
    space = HostSwapSpace(kv, capacity_bytes=4 * kv.page_bytes)
    r = req("r", 5)
    r.block_table, r.num_computed_tokens = [[0, 1, 9], [2, 3, 10]], 5  # page 9/10: reserved, not computed
    assert space.swap_out(r)
    assert space.stats.bytes_used == 4 * kv.page_bytes and r in space
    host = space._saved[r.seq_id].host
    assert host.device.type == "cpu" and host.is_pinned() == (device == "cuda")
    kv.data.zero_()
    r.block_table = [[5, 6, 7], [8, 11, 4]]
    space.swap_in(r)
    for old, new in [(0, 5), (1, 6), (2, 8), (3, 11)]:
        assert torch.equal(kv.data[new], before[old])
    assert not kv.data[7].any() and not kv.data[4].any()  # pages past the computed tokens
    assert space.stats.bytes_used == 0 and (space.stats.num_swap_out, space.stats.num_swap_in) == (1, 1)
    assert space.stats.bytes_in == space.stats.bytes_out == 4 * kv.page_bytes
    r.block_table, r.num_computed_tokens = [[0, 1, 2]], 9  # 3 of the 4 pages of room
    assert space.swap_out(r)
    big = req("big", 8)  # 2 more pages would overflow: refused, nothing copied
    big.block_table, big.num_computed_tokens = [[3, 4]], 8
    assert not space.swap_out(big) and big not in space and space.stats.num_rejected == 1
    space.discard(r)
    assert space.stats.bytes_used == 0 and len(space) == 0
    with pytest.raises(NotImplementedError, match="one rank"):
        HostSwapSpace([kv, kv])


# End to end on the tiny Llama -------------------------------------------------------
def make_engine(store, pages: int | None = None, budget: int = 512, pp_size: int = 1, **kw) -> LLMEngine:
    memory = pages * PAGE_BYTES if pages else 256 << 20
    return LLMEngine(EngineConfig(engine_dir=store, device="cpu", page_size=PAGE, kv_cache_memory=memory,
                                  max_num_batched_tokens=budget, pp_size=pp_size), **kw)


def run(engine: LLMEngine) -> tuple[list[Request], int]:
    """Run PROMPTS to completion; return the requests and the tokens the model computed."""
    computed = 0
    execute = engine.executor.execute

    def counting(step_input):
        nonlocal computed
        computed += sum(c.num_tokens for c in step_input.chunks)
        return execute(step_input)

    engine.executor.execute = counting
    reqs = [engine.make_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in PROMPTS]
    for r in reqs:
        engine.add_request(r)
    while engine.scheduler.has_work():
        engine.step()
    assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
    return reqs, computed


def no_recompute(reqs: list[Request]) -> int:
    """Tokens computed if nothing is computed twice: the last sampled token is never fed."""
    return sum(r.num_tokens - 1 for r in reqs)


def assert_all_freed(engine: LLMEngine, reqs: list[Request]) -> None:
    blocks = engine.scheduler.blocks
    blocks.audit(reqs)
    assert free_pages(blocks) == blocks.num_pages
    if engine.swap_space is not None:
        assert engine.swap_space.stats.bytes_used == 0 and len(engine.swap_space) == 0


@pytest.fixture(scope="module")
def reference(tiny_store) -> list[list[int]]:
    reqs, computed = run(make_engine(tiny_store))
    assert computed == no_recompute(reqs)  # a roomy pool preempts nothing
    return [r.output_token_ids for r in reqs]


def record_swap_outs(engine: LLMEngine) -> list[tuple[int, int]]:
    """(computed tokens, prompt tokens) of each request at its successful swap-outs."""
    seen, swap_out = [], engine.swap_space.swap_out

    def recording(req):
        ok = swap_out(req)
        if ok:
            seen.append((req.num_computed_tokens, len(req.prompt_token_ids)))
        return ok

    engine.swap_space.swap_out = recording
    return seen


# 40 pages of 6 layers hold ~106 tokens: far less than the six requests' ~370 at the end.
# A budget of 8 chunks the prefills, so some requests are swapped out halfway through theirs;
# pp=2 chains two stages over one pool, each reading its layers' rows of the block table.
@pytest.mark.parametrize("budget,pp_size", [(512, 1), (8, 1), (512, 2)],
                         ids=["whole-prefill", "chunked-prefill", "pp2"])
def test_swap_preemption_matches_without_recompute(tiny_store, reference, budget, pp_size):
    recompute, recomputed = run(make_engine(tiny_store, pages=40, budget=budget, pp_size=pp_size))
    assert sum(r.num_preemptions for r in recompute) > 0 and recomputed > no_recompute(recompute)
    assert [r.output_token_ids for r in recompute] == reference

    engine = make_engine(tiny_store, pages=40, budget=budget, pp_size=pp_size, preemption_mode="swap")
    swapped_at = record_swap_outs(engine)
    reqs, computed = run(engine)
    if budget == 8:
        assert any(done < prompt for done, prompt in swapped_at)  # mid-prefill swaps
    assert any(done % PAGE for done, _ in swapped_at)  # a partly filled last page
    stats = engine.swap_space.stats
    assert sum(r.num_swaps for r in reqs) == stats.num_swap_out == stats.num_swap_in > 0
    assert sum(r.num_preemptions for r in reqs) == stats.num_swap_out  # every preemption swapped
    assert computed == no_recompute(reqs)
    assert [r.output_token_ids for r in reqs] == reference
    assert stats.peak_bytes > 0 and stats.swap_out_seconds > 0 and stats.swap_in_seconds > 0
    assert_all_freed(engine, reqs)


@pytest.mark.parametrize("pages", [1, 12], ids=["nothing-fits", "some-fit"])
def test_full_swap_space_falls_back_to_recompute(tiny_store, reference, pages):
    engine = make_engine(tiny_store, pages=60, preemption_mode="swap", swap_space_bytes=pages * PAGE_BYTES)
    reqs, computed = run(engine)
    stats = engine.swap_space.stats
    assert stats.num_rejected > 0 and computed > no_recompute(reqs)
    assert sum(r.num_preemptions for r in reqs) == stats.num_swap_out + stats.num_rejected
    assert (stats.num_swap_out > 0) == (pages > 1) and stats.peak_bytes <= pages * PAGE_BYTES
    assert [r.output_token_ids for r in reqs] == reference
    assert_all_freed(engine, reqs)


def test_abort_of_a_swapped_request_frees_its_host_copy(tiny_store, reference):
    engine = make_engine(tiny_store, pages=60, preemption_mode="swap")
    reqs = [engine.make_request(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in PROMPTS]
    for r in reqs:
        engine.add_request(r)
    while not any(r.swapped for r in reqs):
        engine.step()
    victim = next(r for r in reqs if r.swapped)
    held = engine.swap_space.stats.bytes_used
    assert held > 0 and victim in engine.swap_space
    engine.scheduler.abort(victim)
    assert victim not in engine.swap_space and engine.swap_space.stats.bytes_used < held
    assert victim.status == RequestStatus.FINISHED_ABORTED and engine.swap_space.stats.num_discarded == 1
    while engine.scheduler.has_work():
        engine.step()
    others = [(r.output_token_ids, ref) for r, ref in zip(reqs, reference) if r is not victim]
    assert all(out == ref for out, ref in others)
    assert_all_freed(engine, reqs)


def test_unknown_preemption_mode_is_refused(tiny_store):
    with pytest.raises(ValueError, match="preemption_mode 'drop'"):
        make_engine(tiny_store, preemption_mode="drop")
